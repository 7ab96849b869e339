//! Forwarded mail inside an agent's message (SPEC rule 6).
//!
//! When an agent forwards a requester's mail to the CRM, the new ticket is
//! opened for the original sender, the forwarded text becomes that
//! requester's comment and the agent's own words a work note. Two shapes
//! exist: the original attached as `message/rfc822`, or — far more common —
//! pasted inline under a client-specific separator and a small block of
//! header lines. The block layouts recognised here are the ones Gmail,
//! Outlook (English and French), Apple Mail, Thunderbird and mutt really
//! produce; a Subject prefix alone (`Fwd:`, `TR:`) is never enough.

use std::borrow::Cow;
use std::sync::LazyLock;

use mail_parser::{Message, PartType};
use regex::Regex;

use super::{html, mailboxes, unfold, Forward, Mailbox};

/// A forward attached as a message: the first `message/rfc822` part that
/// has a From address.
///
/// `text` is the top-level text body (the agent's words), `subject` the
/// outer Subject, used when the attached message has none.
pub(super) fn attached(message: &Message<'_>, text: &str, subject: &str) -> Option<Forward> {
    message.attachments().find_map(|part| {
        let PartType::Message(original) = &part.body else {
            return None;
        };
        let original_from = mailboxes(original.from()).into_iter().next()?;
        let original_text = original
            .text_bodies()
            .filter_map(|p| match &p.body {
                PartType::Text(t) => Some(t.replace("\r\n", "\n")),
                PartType::Html(h) => Some(html::to_text(h)),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n");
        Some(Forward {
            original_from,
            original_subject: original
                .subject()
                .map(unfold)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| subject.to_string()),
            original_text: original_text.trim().to_string(),
            agent_text: text.trim().to_string(),
        })
    })
}

/// A forward pasted inline in the text body.
///
/// The first separator line followed by a header block with a usable From
/// wins; failing any separator, a bare header block (Outlook for Mac and
/// the new Outlook draw only a rule, lost in text) counts when it has at
/// least From, Subject and a Date/Sent or To line.
pub(super) fn inline(text: &str, subject: &str) -> Option<Forward> {
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if is_separator(line) {
            if let Some(forward) = block_at(&lines, i + 1, i, subject, false) {
                return Some(forward);
            }
        }
    }
    for (i, line) in lines.iter().enumerate() {
        if matches!(header_line(line), Some((Field::From, _))) {
            if let Some(forward) = block_at(&lines, i, i, subject, true) {
                return Some(forward);
            }
        }
    }
    None
}

/// Lines that open a forwarded (or quoted-original) block.
static SEPARATOR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)^\s*(?:
            -{2,}\s*(?:
                forwarded\ message|original\ message|
                message\ transf[ée]r[ée]|message\ d'origine|message\ original|
                weitergeleitete\ nachricht|urspr[üu]ngliche\ nachricht|
                mensaje\ reenviado|mensaje\ original|
                messaggio\ inoltrato|messaggio\ originale|
                doorgestuurd\ bericht|oorspronkelijk\ bericht
            )\s*-{2,}
          | -{2,}\s*forwarded\ message\ from\ .*-{2,}
          | (?:begin\ forwarded\ message|d[ée]but\ du\ message\ r[ée]exp[ée]di[ée]
             |anfang\ der\ weitergeleiteten\ nachricht|inicio\ del\ mensaje\ reenviado)\s*:
          | _{10,}
        )\s*$",
    )
    .unwrap_or_else(|e| unreachable!("constant regex: {e}"))
});

pub(super) fn is_separator(line: &str) -> bool {
    SEPARATOR.is_match(&plain_spaces(line))
}

/// The line with its non-breaking spaces made plain, copied only when it
/// has some: every line of every body passes here.
fn plain_spaces(line: &str) -> Cow<'_, str> {
    const NON_BREAKING: [char; 2] = ['\u{a0}', '\u{202f}'];
    if line.contains(NON_BREAKING) {
        Cow::Owned(line.replace(NON_BREAKING, " "))
    } else {
        Cow::Borrowed(line)
    }
}

/// The header fields of a forwarded block that matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    From,
    Subject,
    Date,
    To,
    Cc,
    /// Reply-To and the like: part of the block, not used.
    Other,
}

/// A `Key: value` line of a forwarded block, in the languages the
/// helpdesk meets. Outlook in French writes `De :` with a (non-breaking)
/// space before the colon; Gmail's text rendering of bold labels gives
/// `*From:*`; Thunderbird separates label and value with a tab.
pub(super) fn header_line(line: &str) -> Option<(Field, String)> {
    let (key, value) = line.split_once(':')?;
    let key = plain_spaces(key);
    let key = key.trim().trim_matches('*').trim().to_lowercase();
    if key.chars().count() > 20 {
        return None;
    }
    let field = match key.as_str() {
        "from" | "de" | "von" | "da" | "van" | "fra" | "från" => Field::From,
        "subject" | "objet" | "betreff" | "oggetto" | "asunto" | "onderwerp" | "sujet" => {
            Field::Subject
        }
        "date" | "sent" | "envoyé" | "datum" | "gesendet" | "enviado" | "inviato" | "verzonden"
        | "fecha" | "data" => Field::Date,
        "to" | "à" | "a" | "an" | "para" | "aan" | "pour" => Field::To,
        "cc" | "kopie" | "copie" => Field::Cc,
        "reply-to" | "répondre à" | "antwort an" | "importance" | "priorité" | "bcc" | "cci" => {
            Field::Other
        }
        _ => return None,
    };
    let value = plain_spaces(value)
        .trim()
        .trim_start_matches('*')
        .trim()
        .to_string();
    Some((field, value))
}

/// The forwarded block whose header lines start at `start` (blank lines
/// skipped); `agent_end` is the index of the first line that is not the
/// agent's. `bare`: no separator was seen, so ask for more evidence.
fn block_at(
    lines: &[&str],
    start: usize,
    agent_end: usize,
    subject: &str,
    bare: bool,
) -> Option<Forward> {
    let mut i = start;
    while lines.get(i).is_some_and(|l| l.trim().is_empty()) {
        i += 1;
    }
    let mut from = None;
    let mut original_subject = None;
    let mut seen = Vec::new();
    let mut last = None;
    while let Some(line) = lines.get(i) {
        if line.trim().is_empty() {
            break;
        }
        match header_line(line) {
            Some((field, value)) => {
                match field {
                    Field::From if from.is_none() => from = Some(value),
                    Field::Subject if original_subject.is_none() => original_subject = Some(value),
                    _ => {}
                }
                seen.push(field);
                last = Some(field);
            }
            // A long To or Cc list wrapped onto the next line.
            None if matches!(last, Some(Field::To | Field::Cc)) => {}
            None => break,
        }
        i += 1;
    }
    let from = from?;
    if bare
        && !(seen.contains(&Field::Subject)
            && (seen.contains(&Field::Date) || seen.contains(&Field::To)))
    {
        return None;
    }
    let original_from = parse_mailbox(&from)?;
    let body: Vec<&str> = lines.get(i..).unwrap_or_default().to_vec();
    let mut original_text = body.join("\n").trim().to_string();
    // mutt closes its block.
    if let Some(pos) = original_text.rfind("----- End forwarded message -----") {
        original_text = original_text[..pos].trim_end().to_string();
    }
    let agent_text = lines
        .get(..agent_end)
        .unwrap_or_default()
        .join("\n")
        .trim()
        .to_string();
    Some(Forward {
        original_from,
        original_subject: original_subject
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| subject.to_string()),
        original_text,
        agent_text,
    })
}

/// The mailbox of a forwarded block's From line: `Name <addr>`,
/// `"Name" <addr>`, Outlook's `Name [mailto:addr]`, `Name <mailto:addr>`,
/// or a bare `addr`. `None` when there is no address (Exchange shows only
/// the name of internal senders).
fn parse_mailbox(value: &str) -> Option<Mailbox> {
    let value = value.trim();
    let (name, address) = if let Some(open) = value.find("[mailto:") {
        let rest = &value[open + "[mailto:".len()..];
        (&value[..open], rest.split(']').next().unwrap_or(rest))
    } else if let (Some(open), Some(close)) = (value.rfind('<'), value.rfind('>')) {
        if close > open {
            (&value[..open], &value[open + 1..close])
        } else {
            ("", value)
        }
    } else {
        let address = value
            .split_whitespace()
            .find(|w| w.contains('@'))
            .unwrap_or_default();
        let name = value.replacen(address, "", 1);
        return build_mailbox(&name, address);
    };
    build_mailbox(name, address)
}

fn build_mailbox(name: &str, address: &str) -> Option<Mailbox> {
    let address = address
        .trim()
        .trim_start_matches("mailto:")
        .trim_matches(|c: char| matches!(c, '<' | '>' | '(' | ')' | '[' | ']' | ',' | ';' | '"'));
    let (local, domain) = address.split_once('@')?;
    if local.is_empty()
        || domain.is_empty()
        || !domain.contains('.') && domain != "localhost"
        || address.chars().any(char::is_whitespace)
    {
        return None;
    }
    let name = name
        .trim()
        .trim_matches(|c: char| c == '"' || c == '\'' || c.is_whitespace());
    let name = (!name.is_empty() && !name.eq_ignore_ascii_case(address)).then_some(name);
    Some(Mailbox::new(name, address))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(name: Option<&str>, address: &str) -> Mailbox {
        Mailbox::new(name, address)
    }

    #[test]
    fn from_line_shapes() {
        assert_eq!(
            parse_mailbox("Jane Doe <Jane.Doe@Example.com>"),
            Some(mailbox(Some("Jane Doe"), "jane.doe@example.com"))
        );
        assert_eq!(
            parse_mailbox("\"Doe, Jane\" <jane@example.com>"),
            Some(mailbox(Some("Doe, Jane"), "jane@example.com"))
        );
        assert_eq!(
            parse_mailbox("Jane Doe [mailto:jane@example.com]"),
            Some(mailbox(Some("Jane Doe"), "jane@example.com"))
        );
        assert_eq!(
            parse_mailbox("Jane Doe <mailto:jane@example.com>"),
            Some(mailbox(Some("Jane Doe"), "jane@example.com"))
        );
        assert_eq!(
            parse_mailbox("jane@example.com"),
            Some(mailbox(None, "jane@example.com"))
        );
        assert_eq!(parse_mailbox("Doe, Jane"), None);
    }

    #[test]
    fn french_outlook_labels_with_non_breaking_space() {
        assert_eq!(
            header_line("De\u{a0}: Jane <jane@example.com>"),
            Some((Field::From, "Jane <jane@example.com>".into()))
        );
        assert_eq!(
            header_line("Objet : Panne"),
            Some((Field::Subject, "Panne".into()))
        );
        assert_eq!(
            header_line("*From:* Jane <jane@example.com>"),
            Some((Field::From, "Jane <jane@example.com>".into()))
        );
        assert_eq!(header_line("Note: call back tomorrow"), None);
    }

    /// The forward found in a hand-made fixture of `fixtures/forwards/`.
    fn forward_of(raw: &[u8]) -> Forward {
        match crate::parse::parse(raw) {
            Ok(inbound) => match inbound.forward {
                Some(forward) => forward,
                None => panic!("no forward found in:\n{}", inbound.text),
            },
            Err(e) => panic!("fixture does not parse: {e}"),
        }
    }

    #[test]
    fn gmail_forwarded_message_block() {
        let f = forward_of(include_bytes!("../../fixtures/forwards/gmail.eml"));
        assert_eq!(
            f.original_from,
            mailbox(Some("Marie Dupont"), "marie.dupont@example.com")
        );
        assert_eq!(f.original_subject, "Imprimante en panne");
        assert_eq!(f.agent_text, "Peux-tu regarder ? Elle est au 2e.");
        assert_eq!(
            f.original_text,
            "Bonjour,\n\nL'imprimante du 2e étage ne répond plus depuis ce matin.\n\nMerci,\nMarie"
        );
    }

    #[test]
    fn gmail_in_german_weitergeleitete_nachricht() {
        let f = forward_of(include_bytes!("../../fixtures/forwards/gmail-de.eml"));
        assert_eq!(
            f.original_from,
            mailbox(Some("Hans Müller"), "hans.mueller@example.de")
        );
        assert_eq!(f.original_subject, "Drucker druckt nicht");
        assert_eq!(f.agent_text, "Bitte ein Ticket anlegen.");
        assert!(f.original_text.starts_with("Guten Tag,\n\nder Drucker"));
    }

    #[test]
    fn outlook_english_underscore_rule() {
        let f = forward_of(include_bytes!("../../fixtures/forwards/outlook-en.eml"));
        assert_eq!(
            f.original_from,
            mailbox(Some("Mary Smith"), "mary.smith@example.com")
        );
        assert_eq!(f.original_subject, "Printer out of order");
        assert_eq!(
            f.agent_text,
            "Can you take this one? She is on the 3rd floor.\n\nJohn"
        );
        assert_eq!(
            f.original_text,
            "Hello,\n\nThe printer on the 3rd floor shows error 59.\n\nRegards,\nMary"
        );
    }

    #[test]
    fn outlook_original_message_with_mailto_brackets() {
        let f = forward_of(include_bytes!(
            "../../fixtures/forwards/outlook-original-message.eml"
        ));
        assert_eq!(
            f.original_from,
            mailbox(Some("Mary Smith"), "mary.smith@example.com")
        );
        assert_eq!(f.original_subject, "VPN does not connect");
        assert_eq!(f.agent_text, "Please open a ticket for this.");
        assert!(f.original_text.starts_with("Hi John,\nthe VPN client"));
    }

    #[test]
    fn outlook_french_without_rule_and_non_breaking_spaces() {
        let f = forward_of(include_bytes!("../../fixtures/forwards/outlook-fr.eml"));
        assert_eq!(
            f.original_from,
            mailbox(Some("Sophie Martin"), "sophie.martin@example.com")
        );
        assert_eq!(f.original_subject, "Écran noir au démarrage");
        assert_eq!(
            f.agent_text,
            "Bonjour,\n\nPeux-tu ouvrir un ticket pour Mme Martin ?\n\nCordialement,\nJean"
        );
        assert_eq!(
            f.original_text,
            "Bonjour Jean,\n\nMon écran reste noir au démarrage depuis la mise à jour.\n\nMerci d'avance,\nSophie Martin"
        );
    }

    #[test]
    fn apple_mail_begin_forwarded_message() {
        let f = forward_of(include_bytes!("../../fixtures/forwards/apple-mail.eml"));
        assert_eq!(
            f.original_from,
            mailbox(Some("Paul Bernard"), "paul.bernard@example.net")
        );
        assert_eq!(f.original_subject, "Mot de passe oublié");
        assert_eq!(f.agent_text, "Voir ci-dessous.\n\nJean");
        assert_eq!(
            f.original_text,
            "Bonjour,\n\nJe n'arrive plus à me connecter à l'intranet.\n\nPaul"
        );
    }

    #[test]
    fn thunderbird_tab_separated_header_lines() {
        let f = forward_of(include_bytes!("../../fixtures/forwards/thunderbird.eml"));
        assert_eq!(
            f.original_from,
            mailbox(Some("Luc Petit"), "luc.petit@example.com")
        );
        assert_eq!(f.original_subject, "Accès au partage réseau");
        assert_eq!(f.agent_text, "Pour info, à traiter en priorité.");
        assert_eq!(
            f.original_text,
            "Bonjour,\n\nJe n'ai plus accès au partage \\\\serveur\\compta.\n\nLuc"
        );
    }

    #[test]
    fn thunderbird_french_html_header_table() {
        let f = forward_of(include_bytes!(
            "../../fixtures/forwards/thunderbird-fr-html.eml"
        ));
        assert_eq!(
            f.original_from,
            mailbox(Some("Claire Roux"), "claire.roux@example.com")
        );
        assert_eq!(f.original_subject, "Clavier défectueux");
        assert_eq!(f.agent_text, "Nouvelle demande, merci.");
        assert_eq!(
            f.original_text,
            "Bonjour,\nLa touche Entrée de mon clavier ne fonctionne plus.\nClaire"
        );
    }

    #[test]
    fn attached_message_rfc822() {
        let f = forward_of(include_bytes!(
            "../../fixtures/corpus/170-phpmime-issue158a.eml"
        ));
        assert_eq!(
            f.original_from,
            mailbox(Some("Example Name"), "example@example.com")
        );
        assert_eq!(f.original_subject, "Test 5");
        assert_eq!(f.agent_text, "An RFC 822 forward with a HTML body");
        assert!(f
            .original_text
            .starts_with("An original PLAIN TEXT message body"));
    }

    #[test]
    fn outlook_french_html_rendering() {
        // What Outlook desktop puts in its HTML part, rendered to text.
        let html = "<div class=WordSection1><p class=MsoNormal>Peux-tu voir&nbsp;?<o:p></o:p></p>\
            <p class=MsoNormal><o:p>&nbsp;</o:p></p>\
            <div style='border:none;border-top:solid #E1E1E1 1.0pt;padding:3.0pt 0cm 0cm 0cm'>\
            <p class=MsoNormal><b>De&nbsp;:</b> Sophie Martin &lt;sophie.martin@example.com&gt; <br>\
            <b>Envoy&eacute;&nbsp;:</b> lundi 4 mars 2024 10:12<br><b>&Agrave;&nbsp;:</b> Jean Agent \
            &lt;jean.agent@example.org&gt;<br><b>Objet&nbsp;:</b> &Eacute;cran noir<o:p></o:p></p></div>\
            <p class=MsoNormal><o:p>&nbsp;</o:p></p><p class=MsoNormal>Bonjour,<o:p></o:p></p>\
            <p class=MsoNormal>Mon &eacute;cran reste noir.<o:p></o:p></p></div>";
        let text = html::to_text(html);
        let f = inline(&text, "TR: Écran noir").expect("forward in Outlook HTML");
        assert_eq!(
            f.original_from,
            mailbox(Some("Sophie Martin"), "sophie.martin@example.com")
        );
        assert_eq!(f.original_subject, "Écran noir");
        assert_eq!(f.agent_text, "Peux-tu voir ?");
        assert_eq!(f.original_text, "Bonjour,\nMon écran reste noir.");
    }

    #[test]
    fn mutt_forwarded_message_from_block() {
        let text = "FYI\n\n----- Forwarded message from Ann Lee <ann@example.com> -----\n\n\
                    Date: Mon, 4 Mar 2024 10:12:00 +0100\nFrom: Ann Lee <ann@example.com>\n\
                    To: jean@example.org\nSubject: Scanner\n\nThe scanner is jammed.\n\n\
                    ----- End forwarded message -----\n";
        let f = inline(text, "Fwd: Scanner").expect("mutt block");
        assert_eq!(f.original_from, mailbox(Some("Ann Lee"), "ann@example.com"));
        assert_eq!(f.original_subject, "Scanner");
        assert_eq!(f.original_text, "The scanner is jammed.");
        assert_eq!(f.agent_text, "FYI");
    }

    #[test]
    fn a_subject_prefix_alone_is_not_a_forward_fixture() {
        let inbound = crate::parse::parse(include_bytes!(
            "../../fixtures/forwards/subject-prefix-only.eml"
        ))
        .expect("parses");
        assert_eq!(inbound.subject, "TR: Imprimante");
        assert_eq!(inbound.forward, None);
    }

    #[test]
    fn a_subject_prefix_alone_is_not_a_forward() {
        assert_eq!(inline("Voir ci-dessous.\n\nMerci", "TR: Panne"), None);
    }

    #[test]
    fn a_lone_from_line_in_prose_is_not_a_forward() {
        let text = "Hello,\n\nFrom: my desk, nothing works.\nThanks";
        assert_eq!(inline(text, "Help"), None);
        let text = "Hi\nFrom: Bob <bob@example.com>\nI cannot log in.";
        assert_eq!(inline(text, "Help"), None);
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_scanned_without_panic(
            lines in proptest::collection::vec(
                "(-{0,12} ?(Forwarded Message|Message transféré)? ?-{0,12}|(From|De\u{a0}|Objet|Subject|To|Sent) ?: ?[^\n]{0,30}|_{0,12}|\\PC{0,20})",
                0..20,
            )
        ) {
            let text = lines.join("\n");
            if let Some(f) = inline(&text, "s") {
                proptest::prop_assert!(f.original_from.address.contains('@'));
            }
        }
    }
}
