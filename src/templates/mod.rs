//! Templates of the automatic messages: receipt, closure, the "reply to the
//! CRM only" notice and the delivery-failure notice, in French and English.
//!
//! Built-in copies are compiled in; `[auto] templates_dir` may hold files of
//! the same names (`receipt.fr.txt`, …) that replace them. Every template is
//! compiled when the configuration is loaded, so a broken one is a
//! `check-config` error and never a surprise at the first new ticket.
//! The fixed phrases (subjects, the marks crmgate adds to copies) live here
//! too, so every word the helpdesk's users read is in one place.
//!
//! A helpdesk of two languages (`fr+en`, `en+fr`) writes each text in both,
//! the first one first: each language's own template (or phrase) is
//! rendered and the results are joined, so an override of one language's
//! file changes that language only and no "both" text exists to drift.

use std::path::Path;

use minijinja::Environment;
use serde::Serialize;

use crate::config::{Language, Languages};

/// The kinds of automatic message that have a template.
pub const NAMES: [&str; 6] = [
    "receipt",
    "closure",
    "reply_all",
    "failure",
    "quick_help",
    "quick_refused",
];

const BUILT_IN: [(&str, &str); 12] = [
    ("receipt.fr.txt", include_str!("receipt.fr.txt")),
    ("receipt.en.txt", include_str!("receipt.en.txt")),
    ("closure.fr.txt", include_str!("closure.fr.txt")),
    ("closure.en.txt", include_str!("closure.en.txt")),
    ("reply_all.fr.txt", include_str!("reply_all.fr.txt")),
    ("reply_all.en.txt", include_str!("reply_all.en.txt")),
    ("failure.fr.txt", include_str!("failure.fr.txt")),
    ("failure.en.txt", include_str!("failure.en.txt")),
    ("quick_help.fr.txt", include_str!("quick_help.fr.txt")),
    ("quick_help.en.txt", include_str!("quick_help.en.txt")),
    ("quick_refused.fr.txt", include_str!("quick_refused.fr.txt")),
    ("quick_refused.en.txt", include_str!("quick_refused.en.txt")),
];

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("auto.templates_dir: cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("auto.templates_dir: template {name}: {source}")]
    Syntax {
        name: String,
        source: minijinja::Error,
    },
    #[error("template {name}: {source}")]
    Render {
        name: String,
        source: minijinja::Error,
    },
}

/// What a template can use.
#[derive(Debug)]
pub struct Context<'a> {
    pub number: &'a str,
    pub subject: &'a str,
    pub display_name: &'a str,
    pub public_address: &'a str,
    /// Failure notice only.
    pub recipients: &'a str,
    /// Failure notice and refused quick action: each language's template
    /// gets its own.
    pub reason: &'a Phrase,
    /// Refused quick action only: the line, as the agent wrote it.
    pub line: &'a str,
}

/// The values one language's template sees (the names templates in
/// `templates_dir` use).
#[derive(Serialize)]
struct Values<'a> {
    number: &'a str,
    subject: &'a str,
    display_name: &'a str,
    public_address: &'a str,
    recipients: &'a str,
    reason: &'a str,
    line: &'a str,
}

/// A text said in each language, for the template of each: why a quick
/// action was refused, say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Phrase {
    fr: String,
    en: String,
}

impl Phrase {
    pub fn new(say: impl Fn(Language) -> String) -> Phrase {
        Phrase {
            fr: say(Language::Fr),
            en: say(Language::En),
        }
    }

    /// A text that is the same in every language (a relay's SMTP reply).
    pub fn same(text: &str) -> Phrase {
        Phrase {
            fr: text.to_string(),
            en: text.to_string(),
        }
    }

    pub fn get(&self, language: Language) -> &str {
        match language {
            Language::Fr => &self.fr,
            Language::En => &self.en,
        }
    }
}

/// What stands between the two languages of a text written in both: a
/// line of its own, so a reader sees where their language starts.
pub const LANGUAGE_RULE: &str = "---";

/// What stands between the two languages of a subject or of a phrase on
/// one line ("Billet résolu / Ticket resolved : …").
pub const LANGUAGE_SLASH: &str = " / ";

/// `say` in each of `languages`, first one first, joined by `separator`.
pub fn in_each(languages: Languages, separator: &str, say: impl Fn(Language) -> String) -> String {
    let said: Vec<String> = languages.each().iter().map(|&l| say(l)).collect();
    said.join(separator)
}

/// Whole texts (a template per language) joined: each but the last
/// without its trailing blank lines, then the rule on a line between
/// blank lines.
fn joined_texts(texts: &[String]) -> String {
    let mut out = String::new();
    for (i, text) in texts.iter().enumerate() {
        if i + 1 < texts.len() {
            out.push_str(text.trim_end());
            out.push_str("\n\n");
            out.push_str(LANGUAGE_RULE);
            out.push_str("\n\n");
        } else {
            out.push_str(text);
        }
    }
    out
}

pub struct Templates {
    env: Environment<'static>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Templates")
    }
}

impl Templates {
    /// The built-in templates, overridden by the files of `dir`.
    ///
    /// # Errors
    /// A file that exists but cannot be read, or a template that does not compile.
    pub fn load(dir: Option<&Path>) -> Result<Templates, TemplateError> {
        let mut env = Environment::new();
        env.set_keep_trailing_newline(true);
        for (name, built_in) in BUILT_IN {
            let source = match dir.map(|d| d.join(name)).filter(|p| p.exists()) {
                Some(path) => {
                    std::fs::read_to_string(&path).map_err(|source| TemplateError::Read {
                        path: path.display().to_string(),
                        source,
                    })?
                }
                None => built_in.to_string(),
            };
            env.add_template_owned(name, source)
                .map_err(|source| TemplateError::Syntax {
                    name: name.to_string(),
                    source,
                })?;
        }
        Ok(Templates { env })
    }

    /// `name` in each of `languages`, each language's template rendered
    /// on its own, joined first one first.
    ///
    /// # Errors
    /// A template that fails at render time (e.g. an unknown filter).
    pub fn render(
        &self,
        name: &str,
        languages: Languages,
        context: &Context<'_>,
    ) -> Result<String, TemplateError> {
        let texts = languages
            .each()
            .iter()
            .map(|&language| self.render_one(name, language, context))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(joined_texts(&texts))
    }

    fn render_one(
        &self,
        name: &str,
        language: Language,
        context: &Context<'_>,
    ) -> Result<String, TemplateError> {
        let file = format!("{name}.{}.txt", language.code());
        let values = Values {
            number: context.number,
            subject: context.subject,
            display_name: context.display_name,
            public_address: context.public_address,
            recipients: context.recipients,
            reason: context.reason.get(language),
            line: context.line,
        };
        self.env
            .get_template(&file)
            .and_then(|t| t.render(&values))
            .map_err(|source| TemplateError::Render { name: file, source })
    }
}

/// The first line of every comment and work-note notification, French
/// then English: a reply's words above it are the entry, the rest (the
/// quoted notification) is cut, see `parse::reply`. Every marker is
/// recognised in replies whatever the configured language.
pub const REPLY_MARKERS: [&str; 2] = [REPLY_MARKER_FR, REPLY_MARKER_EN];
const REPLY_MARKERS_EN_FR: [&str; 2] = [REPLY_MARKER_EN, REPLY_MARKER_FR];
const REPLY_MARKER_FR: &str = "## Répondez au-dessus de cette ligne ##";
const REPLY_MARKER_EN: &str = "## Reply above this line ##";

/// The marker lines a notification starts with, in the order written:
/// one per language of the configuration (`fr+en` writes both, French
/// first).
pub fn reply_marker_lines(languages: Languages) -> &'static [&'static str] {
    match languages {
        Languages::Fr => &REPLY_MARKERS[..1],
        Languages::En => &REPLY_MARKERS[1..],
        Languages::FrEn => &REPLY_MARKERS,
        Languages::EnFr => &REPLY_MARKERS_EN_FR,
    }
}

/// The text of an entry whose reply added nothing above the marker (an
/// attachment sent back alone, say): the entry is kept and says so.
pub fn nothing_added(languages: Languages) -> String {
    in_each(languages, "", |language| {
        match language {
            Language::Fr => {
                "[Rien n'a été écrit au-dessus de la ligne « Répondez au-dessus de cette ligne ».]\n"
            }
            Language::En => "[Nothing was written above the line \"Reply above this line\".]\n",
        }
        .to_string()
    })
}

/// The words the receipt and the closure notice put before the ticket's
/// subject (French, then English). Requesters answer those two; a reply
/// takes them off as it takes off "RE:", see [`crate::thread::clean_subject`],
/// so the ticket's subject does not become "Billet résolu : …".
pub const AUTOMATIC_SUBJECT_WORDS: [&str; 4] = [RECEIPT_FR, RECEIPT_EN, CLOSURE_FR, CLOSURE_EN];
const RECEIPT_FR: &str = "Accusé de réception";
const RECEIPT_EN: &str = "Receipt confirmation";
const CLOSURE_FR: &str = "Billet résolu";
const CLOSURE_EN: &str = "Ticket resolved";

/// The subject of an automatic message, before compose adds `[NUMBER]`:
/// the words of each language joined by [`LANGUAGE_SLASH`], then the
/// ticket's subject after the first language's colon ("Billet résolu /
/// Ticket resolved : Imprimante").
pub fn subject(name: &str, languages: Languages, ticket_subject: &str) -> String {
    let prefix = in_each(languages, LANGUAGE_SLASH, |language| {
        subject_words(name, language).to_string()
    });
    if ticket_subject.is_empty() {
        prefix
    } else {
        let separator = match languages.first() {
            Language::Fr => " : ",
            Language::En => ": ",
        };
        format!("{prefix}{separator}{ticket_subject}")
    }
}

fn subject_words(name: &str, language: Language) -> &'static str {
    match (name, language) {
        ("receipt", Language::Fr) => RECEIPT_FR,
        ("receipt", Language::En) => RECEIPT_EN,
        ("closure", Language::Fr) => CLOSURE_FR,
        ("closure", Language::En) => CLOSURE_EN,
        ("reply_all", Language::Fr) => "Ne répondre qu'au CRM",
        ("reply_all", Language::En) => "Reply to the CRM only",
        ("failure", Language::Fr) => "Échec de remise",
        ("quick_help", Language::Fr) => "Actions rapides",
        ("quick_help", Language::En) => "Quick actions",
        ("quick_refused", Language::Fr) => "Action rapide refusée",
        ("quick_refused", Language::En) => "Quick action refused",
        _ => "Delivery failure",
    }
}

/// Why a quick action is refused, in the notice's language.
pub fn quick_problem(language: Language, problem: &crate::decide::quick::QuickProblem) -> String {
    use crate::decide::quick::QuickProblem as P;
    let fr = language == Language::Fr;
    match (problem, fr) {
        (P::UnknownWord(w), true) => format!("{w} n'est pas une action rapide connue."),
        (P::UnknownWord(w), false) => format!("{w} is not a known quick action."),
        (P::AddOrRemove, true) => "il faut « ajouter » ou « retirer » (add, remove).".into(),
        (P::AddOrRemove, false) => "\"add\" or \"remove\" is missing.".into(),
        (P::MissingArgument, true) => "il manque l'adresse.".into(),
        (P::MissingArgument, false) => "the address is missing.".into(),
        (P::NotAnAddress(a), true) => format!("{a} n'est pas une adresse de courriel."),
        (P::NotAnAddress(a), false) => format!("{a} is not a mail address."),
        (P::NotAnAgent(a), true) => format!("{a} n'est pas un agent du service."),
        (P::NotAnAgent(a), false) => format!("{a} is not one of the helpdesk's agents."),
        (P::AgentInWatchGroup(a), true) => format!(
            "{a} est un agent : les agents suivent un billet par la liste des Notes de travail (/notes ajouter), jamais comme demandeurs ni dans la Liste de surveillance."
        ),
        (P::AgentInWatchGroup(a), false) => format!(
            "{a} is an agent: agents follow a ticket on its work-notes list (/notes add), never as requesters or on the watch list."
        ),
        (P::CrmAddress(a), true) => format!("{a} est une adresse du CRM."),
        (P::CrmAddress(a), false) => format!("{a} is one of the CRM's own addresses."),
        (P::Refused(why), _) => why.clone(),
    }
}

/// The line that ends a text cut short in the copies: how long the message
/// is, and where its whole text is (a line per language).
pub fn cut_note(languages: Languages, length: usize, number: &str) -> String {
    in_each(languages, "", |language| {
        match language {
        Language::Fr => format!(
            "\n[… coupé : ce message fait {length} octets ; le texte entier est sur le billet {number}.]\n"
        ),
        Language::En => format!(
            "\n[… cut: this message is {length} bytes long; its whole text is on ticket {number}.]\n"
        ),
    }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(reason: &Phrase) -> Context<'_> {
        Context {
            number: "TKT0000042",
            subject: "Imprimante",
            display_name: "Soutien TI",
            public_address: "support@example.org",
            recipients: "a@example.org",
            reason,
            line: "/watch add jane.doe@example.org",
        }
    }

    fn smtp_reason() -> Phrase {
        Phrase::same("550 5.1.1 no such user")
    }

    #[test]
    fn built_in_templates_render_in_both_languages() {
        let t = Templates::load(None).unwrap();
        let reason = smtp_reason();
        for name in NAMES {
            for lang in [Languages::Fr, Languages::En] {
                let text = t.render(name, lang, &context(&reason)).unwrap();
                assert!(text.contains("TKT0000042"), "{name}.{lang:?}: {text}");
                assert!(!text.contains(LANGUAGE_RULE), "{name}.{lang:?}: {text}");
            }
        }
        let fr = t
            .render("receipt", Languages::Fr, &context(&reason))
            .unwrap();
        assert!(fr.contains("billet TKT0000042"));
        assert_eq!(
            subject("closure", Languages::En, "Imprimante"),
            "Ticket resolved: Imprimante"
        );
        assert_eq!(
            subject("closure", Languages::Fr, "Imprimante"),
            "Billet résolu : Imprimante"
        );
    }

    #[test]
    fn two_languages_render_each_template_first_one_first_with_a_rule_between() {
        let t = Templates::load(None).unwrap();
        let reason = Phrase::new(|l| match l {
            Language::Fr => "raison en français".into(),
            Language::En => "reason in English".into(),
        });
        for name in NAMES {
            let fr = t.render(name, Languages::Fr, &context(&reason)).unwrap();
            let en = t.render(name, Languages::En, &context(&reason)).unwrap();
            let rule = format!("\n\n{LANGUAGE_RULE}\n\n");
            assert_eq!(
                t.render(name, Languages::FrEn, &context(&reason)).unwrap(),
                format!("{}{rule}{en}", fr.trim_end()),
                "{name}"
            );
            assert_eq!(
                t.render(name, Languages::EnFr, &context(&reason)).unwrap(),
                format!("{}{rule}{fr}", en.trim_end()),
                "{name}"
            );
        }
        // Each language's template gets the reason in its own language.
        let both = t
            .render("quick_refused", Languages::FrEn, &context(&reason))
            .unwrap();
        let (fr, en) = both.split_once("\n---\n").unwrap();
        assert!(fr.contains("est refusée : raison en français"), "{fr}");
        assert!(en.contains("is refused: reason in English"), "{en}");
        assert!(
            !fr.contains("English") && !en.contains("français"),
            "{both}"
        );
        // The receipt and the closure as a requester reads them.
        let receipt = t
            .render("receipt", Languages::EnFr, &context(&reason))
            .unwrap();
        let english = receipt.find("We have received your request").unwrap();
        let french = receipt.find("Nous avons bien reçu votre demande").unwrap();
        assert!(
            english < receipt.find("\n---\n").unwrap() && receipt.find("\n---\n").unwrap() < french
        );
        let closure = t
            .render("closure", Languages::FrEn, &context(&reason))
            .unwrap();
        assert!(
            closure.find("est maintenant résolu").unwrap()
                < closure.find("is now resolved").unwrap()
        );
    }

    #[test]
    fn an_override_of_one_language_changes_that_language_only_in_both() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("receipt.en.txt"), "Got {{ number }}.").unwrap();
        let t = Templates::load(Some(dir.path())).unwrap();
        let reason = smtp_reason();
        let both = t
            .render("receipt", Languages::FrEn, &context(&reason))
            .unwrap();
        assert!(both.starts_with("Bonjour,"), "{both}");
        assert!(both.ends_with("\n\n---\n\nGot TKT0000042."), "{both}");
    }

    #[test]
    fn subjects_of_two_languages_carry_each_words_and_the_first_ones_colon() {
        assert_eq!(
            subject("closure", Languages::FrEn, "Imprimante"),
            "Billet résolu / Ticket resolved : Imprimante"
        );
        assert_eq!(
            subject("receipt", Languages::EnFr, "Imprimante"),
            "Receipt confirmation / Accusé de réception: Imprimante"
        );
        assert_eq!(
            subject("failure", Languages::FrEn, "Imprimante"),
            "Échec de remise / Delivery failure : Imprimante"
        );
        assert_eq!(
            subject("quick_help", Languages::EnFr, ""),
            "Quick actions / Actions rapides"
        );
        for name in NAMES {
            let both = subject(name, Languages::FrEn, "X");
            let fr = subject(name, Languages::Fr, "");
            let en = subject(name, Languages::En, "");
            assert_eq!(both, format!("{fr} / {en} : X"));
        }
    }

    #[test]
    fn marker_lines_and_phrases_of_two_languages() {
        assert_eq!(reply_marker_lines(Languages::Fr), [REPLY_MARKER_FR]);
        assert_eq!(reply_marker_lines(Languages::En), [REPLY_MARKER_EN]);
        assert_eq!(
            reply_marker_lines(Languages::FrEn),
            [REPLY_MARKER_FR, REPLY_MARKER_EN]
        );
        assert_eq!(
            reply_marker_lines(Languages::EnFr),
            [REPLY_MARKER_EN, REPLY_MARKER_FR]
        );
        let nothing = nothing_added(Languages::EnFr);
        let lines: Vec<&str> = nothing.lines().collect();
        assert_eq!(lines.len(), 2, "{nothing}");
        assert!(lines[0].starts_with("[Nothing was written"), "{nothing}");
        assert!(lines[1].starts_with("[Rien n'a été écrit"), "{nothing}");
        assert_eq!(
            in_each(Languages::FrEn, LANGUAGE_SLASH, |l| l.code().to_string()),
            "fr / en"
        );
    }

    #[test]
    fn a_directory_overrides_and_a_broken_template_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("receipt.en.txt"), "Got {{ number }}.").unwrap();
        let t = Templates::load(Some(dir.path())).unwrap();
        assert_eq!(
            t.render("receipt", Languages::En, &context(&smtp_reason()))
                .unwrap(),
            "Got TKT0000042."
        );
        std::fs::write(dir.path().join("closure.fr.txt"), "{% if %}").unwrap();
        let err = Templates::load(Some(dir.path())).unwrap_err();
        assert!(err.to_string().contains("closure.fr.txt"), "{err}");
    }
}
