//! Templates of the automatic messages: receipt, closure, the "reply to the
//! CRM only" notice and the delivery-failure notice, in French and English.
//!
//! Built-in copies are compiled in; `[auto] templates_dir` may hold files of
//! the same names (`receipt.fr.txt`, …) that replace them. Every template is
//! compiled when the configuration is loaded, so a broken one is a
//! `check-config` error and never a surprise at the first new ticket.
//! The fixed phrases (subjects, the marks crmgate adds to copies) live here
//! too, so every word the helpdesk's users read is in one place.

use std::path::Path;

use minijinja::Environment;
use serde::Serialize;

use crate::config::Language;

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
#[derive(Debug, Serialize)]
pub struct Context<'a> {
    pub number: &'a str,
    pub subject: &'a str,
    pub display_name: &'a str,
    pub public_address: &'a str,
    /// Failure notice only.
    pub recipients: &'a str,
    /// Failure notice and refused quick action.
    pub reason: &'a str,
    /// Refused quick action only: the line, as the agent wrote it.
    pub line: &'a str,
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

    /// # Errors
    /// A template that fails at render time (e.g. an unknown filter).
    pub fn render(
        &self,
        name: &str,
        language: Language,
        context: &Context<'_>,
    ) -> Result<String, TemplateError> {
        let file = format!("{name}.{}.txt", language.code());
        self.env
            .get_template(&file)
            .and_then(|t| t.render(context))
            .map_err(|source| TemplateError::Render { name: file, source })
    }
}

/// The first line of every comment and work-note notification, French
/// then English: a reply's words above it are the entry, the rest (the
/// quoted notification) is cut, see `parse::reply`. Every marker is
/// recognised in replies whatever the configured language.
pub const REPLY_MARKERS: [&str; 2] = [REPLY_MARKER_FR, REPLY_MARKER_EN];
const REPLY_MARKER_FR: &str = "## Répondez au-dessus de cette ligne ##";
const REPLY_MARKER_EN: &str = "## Reply above this line ##";

/// The marker lines a notification starts with, in the order written:
/// one per language of the configuration (`fr+en` writes both, French
/// first).
pub fn reply_marker_lines(language: Language) -> &'static [&'static str] {
    match language {
        Language::Fr => &REPLY_MARKERS[..1],
        Language::En => &REPLY_MARKERS[1..],
    }
}

/// The text of an entry whose reply added nothing above the marker (an
/// attachment sent back alone, say): the entry is kept and says so.
pub fn nothing_added(language: Language) -> &'static str {
    match language {
        Language::Fr => {
            "[Rien n'a été écrit au-dessus de la ligne « Répondez au-dessus de cette ligne ».]\n"
        }
        Language::En => "[Nothing was written above the line \"Reply above this line\".]\n",
    }
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

/// The subject of an automatic message, before compose adds `[NUMBER]`.
pub fn subject(name: &str, language: Language, ticket_subject: &str) -> String {
    let prefix = match (name, language) {
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
    };
    if ticket_subject.is_empty() {
        prefix.to_string()
    } else {
        let separator = if language == Language::Fr {
            " : "
        } else {
            ": "
        };
        format!("{prefix}{separator}{ticket_subject}")
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
/// is, and where its whole text is.
pub fn cut_note(language: Language, length: usize, number: &str) -> String {
    match language {
        Language::Fr => format!(
            "\n[… coupé : ce message fait {length} octets ; le texte entier est sur le billet {number}.]\n"
        ),
        Language::En => format!(
            "\n[… cut: this message is {length} bytes long; its whole text is on ticket {number}.]\n"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> Context<'static> {
        Context {
            number: "TKT0000042",
            subject: "Imprimante",
            display_name: "Soutien TI",
            public_address: "support@example.org",
            recipients: "a@example.org",
            reason: "550 5.1.1 no such user",
            line: "/watch add jane.doe@example.org",
        }
    }

    #[test]
    fn built_in_templates_render_in_both_languages() {
        let t = Templates::load(None).unwrap();
        for name in NAMES {
            for lang in [Language::Fr, Language::En] {
                let text = t.render(name, lang, &context()).unwrap();
                assert!(text.contains("TKT0000042"), "{name}.{lang:?}: {text}");
            }
        }
        let fr = t.render("receipt", Language::Fr, &context()).unwrap();
        assert!(fr.contains("billet TKT0000042"));
        assert_eq!(
            subject("closure", Language::En, "Imprimante"),
            "Ticket resolved: Imprimante"
        );
        assert_eq!(
            subject("closure", Language::Fr, "Imprimante"),
            "Billet résolu : Imprimante"
        );
    }

    #[test]
    fn a_directory_overrides_and_a_broken_template_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("receipt.en.txt"), "Got {{ number }}.").unwrap();
        let t = Templates::load(Some(dir.path())).unwrap();
        assert_eq!(
            t.render("receipt", Language::En, &context()).unwrap(),
            "Got TKT0000042."
        );
        std::fs::write(dir.path().join("closure.fr.txt"), "{% if %}").unwrap();
        let err = Templates::load(Some(dir.path())).unwrap_err();
        assert!(err.to_string().contains("closure.fr.txt"), "{err}");
    }
}
