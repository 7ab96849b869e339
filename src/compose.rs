//! Compose: a planned outgoing message ([`Draft`]) → RFC 5322 bytes.
//!
//! Built with mail-builder. This is also where the rule "no agent address
//! reaches a non-agent" is enforced on the wire: for a draft with a
//! [`Scrub`], every agent and former-agent address is replaced by the public
//! address in the headers and in the decoded text and HTML (quoted "From:" /
//! "De :" / "wrote:" lines, signatures, `mailto:` links, HTML entities)
//! before the message is encoded again.

pub mod plan;
mod scrub;

use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;
use sha2::{Digest, Sha256};

use crate::config::{Language, Languages};
use crate::helpdesk::SendKind;
use crate::parse::{Attachment, Mailbox};

pub use scrub::{scrub_html, scrub_text, Scrubber};

/// Replace these addresses (agents and former agents, lower-cased) with the
/// public address everywhere in the message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Scrub {
    pub addresses: Vec<String>,
    pub replacement: String,
}

/// Everything needed to build one outgoing message; no I/O, no clock.
#[derive(Debug, Clone)]
pub struct Draft {
    pub kind: SendKind,
    pub ticket_number: String,
    /// The languages of the marker lines and attachment lines crmgate adds.
    pub language: Languages,
    /// Display name of the From header, e.g. "Jane Doe via Soutien TI".
    pub from_name: String,
    /// A CRM address: the public or the internal one.
    pub from_address: String,
    /// Reply-To when it is not the From address: a work note's signed
    /// reply address (see [`crate::thread::reply_address`]).
    pub reply_address: Option<String>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    /// The subject without ticket tag or reply prefixes; compose adds `[NUMBER] `.
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
    /// Attachments kept on the ticket, named with their size in the body
    /// (notifications never carry them).
    pub listed_attachments: Vec<(String, u64)>,
    /// Attachments sent along: only for [`SendKind::Email`].
    pub attachments: Vec<Attachment>,
    /// Without angle brackets.
    pub message_id: String,
    pub in_reply_to: Option<String>,
    /// The first message and the last ten, oldest first.
    pub references: Vec<String>,
    /// Unix seconds.
    pub date: i64,
    /// `X-Crmgate-Loop` value: this instance's hostname.
    pub loop_host: String,
    /// `None` for mail that only agents receive.
    pub scrub: Option<Scrub>,
}

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("cannot build the message: {0}")]
    Build(#[from] std::io::Error),
    /// A stored plan that cannot be read, or that lacks its entry.
    #[error("cannot compose from the outbox plan: {0}")]
    Plan(String),
}

/// Build the message bytes.
///
/// The subject gets the `[NUMBER]` tag exactly once; the headers of the
/// kind are added (see [`SendKind`]); a notification names the draft's
/// `listed_attachments` at the end of its body and never carries a file,
/// while [`SendKind::Email`] carries `attachments`. When the draft has a
/// [`Scrub`], every agent address is replaced in the display names, the
/// subject, the bodies and the attachment names (and in the content of text
/// attachments) before encoding. Message-IDs are left as they are: they
/// thread the conversation, and choosing which ones appear is `decide`'s
/// job.
///
/// # Errors
/// Only when mail-builder fails to write into memory.
pub fn compose(draft: &Draft) -> Result<Vec<u8>, ComposeError> {
    let scrubber = draft.scrub.as_ref().map(Scrubber::shared);
    let clean = |text: &str| -> String {
        match &scrubber {
            Some(scrubber) => scrubber.text(text),
            None => text.to_string(),
        }
    };

    let from = Address::new_address(
        Some(one_line(&clean(&draft.from_name))),
        draft.from_address.clone(),
    );
    let reply_to = match &draft.reply_address {
        Some(address) => {
            Address::new_address(Some(one_line(&clean(&draft.from_name))), address.clone())
        }
        None => from.clone(),
    };
    let mut message = MessageBuilder::new()
        .from(from)
        .reply_to(reply_to)
        .header("Message-ID", MessageId::new(bare_id(&draft.message_id)));

    let to = header_mailboxes(&draft.to, &clean);
    if !to.is_empty() {
        message = message.to(Address::new_list(to));
    }
    let cc = header_mailboxes(&draft.cc, &clean);
    if !cc.is_empty() {
        message = message.cc(Address::new_list(cc));
    }
    message = message
        .subject(Text::new(tagged_subject(
            &draft.ticket_number,
            &one_line(&clean(&draft.subject)),
        )))
        .date(draft.date);
    if let Some(parent) = &draft.in_reply_to {
        message = message.in_reply_to(MessageId::new(bare_id(parent)));
    }
    if !draft.references.is_empty() {
        let ids: Vec<String> = draft.references.iter().map(|r| bare_id(r)).collect();
        message = message.references(MessageId::from(ids));
    }
    for (name, value) in kind_headers(draft.kind) {
        message = message.header(name, Raw::new(value));
    }
    message = message.header("X-Crmgate-Loop", Raw::new(one_line(&draft.loop_host)));

    let lines: Vec<String> = draft
        .listed_attachments
        .iter()
        .map(|(name, size)| {
            crate::templates::in_each(draft.language, crate::templates::LANGUAGE_SLASH, |l| {
                attachment_line(l, &one_line(name), *size)
            })
        })
        .collect();
    let markers = match draft.kind {
        SendKind::PublicCopy | SendKind::AgentCopy | SendKind::WorkNote | SendKind::PartnerCopy => {
            crate::templates::reply_marker_lines(draft.language)
        }
        _ => &[],
    };
    // One copy of the text, scrubbed into a second that the first does not
    // outlive: a 25 MB text is in memory three times at most while its
    // copy is written (the entry's, this one, the message's bytes).
    let text = {
        let marked = text_with_marker(&text_with_lines(&draft.text, &lines), markers);
        match &scrubber {
            Some(scrubber) => scrubber.text(&marked),
            None => marked,
        }
    };
    let text = MimePart::new("text/plain", BodyPart::Text(text.into()));
    let html = draft.html.as_ref().map(|html| {
        let html = html_with_marker(&html_with_lines(html, &lines), markers);
        let html = match &scrubber {
            Some(scrubber) => scrubber.html(&html),
            None => html,
        };
        MimePart::new("text/html", BodyPart::Text(html.into()))
    });
    let attachments: Vec<MimePart<'_>> = if draft.kind == SendKind::Email {
        draft
            .attachments
            .iter()
            .map(|attachment| attach(attachment, scrubber.as_deref()))
            .collect()
    } else {
        Vec::new()
    };
    let alternative = |text, html| {
        MimePart::new(
            multipart("alternative", &draft.message_id),
            vec![text, html],
        )
    };
    let body = match (html, attachments.is_empty()) {
        (None, true) => text,
        (Some(html), true) => alternative(text, html),
        (html, false) => {
            let mut parts = Vec::with_capacity(attachments.len() + 1);
            parts.push(match html {
                Some(html) => alternative(text, html),
                None => text,
            });
            parts.extend(attachments);
            MimePart::new(multipart("mixed", &draft.message_id), parts)
        }
    };

    Ok(message.body(body).write_to_vec()?)
}

/// A multipart content type whose boundary comes from the Message-ID, not
/// from the clock as mail-builder's would: the same draft composes to the
/// same bytes, so a copy composed at send time is the one planned at
/// ingest (see [`plan`]). A digest of a random Message-ID, so no text of
/// the message can guess it, and `=_` in it, which neither base64 nor
/// quoted-printable can produce.
fn multipart(subtype: &str, message_id: &str) -> ContentType<'static> {
    let digest = Sha256::digest(message_id.as_bytes());
    ContentType::new(format!("multipart/{subtype}")).attribute(
        "boundary",
        format!("=_{subtype}_{}", hex::encode(&digest[..12])),
    )
}

/// The headers that tell auto-responders and mail filters what a message is
/// (RFC 3834, Microsoft's X-Auto-Response-Suppress). `OOF, AutoReply` rather
/// than `All`, because `All` would also suppress non-delivery reports, which
/// the outbox needs.
fn kind_headers(kind: SendKind) -> Vec<(&'static str, &'static str)> {
    match kind {
        SendKind::Email => Vec::new(),
        SendKind::Receipt => vec![
            ("Auto-Submitted", "auto-replied"),
            ("Precedence", "bulk"),
            ("X-Auto-Response-Suppress", "OOF, AutoReply"),
        ],
        SendKind::Closure => vec![
            ("Auto-Submitted", "auto-generated"),
            ("Precedence", "bulk"),
            ("X-Auto-Response-Suppress", "OOF, AutoReply"),
        ],
        SendKind::PublicCopy
        | SendKind::AgentCopy
        | SendKind::WorkNote
        | SendKind::PartnerCopy
        | SendKind::ReplyAllNotice
        | SendKind::FailureNotice
        | SendKind::QuickActionNotice => vec![
            ("Auto-Submitted", "auto-generated"),
            ("X-Auto-Response-Suppress", "OOF, AutoReply"),
        ],
    }
}

/// `[NUMBER] subject`, with the tag exactly once wherever the draft's
/// subject already had it: a second tag would make replies' subjects grow
/// and confuse the thread lookup.
fn tagged_subject(number: &str, subject: &str) -> String {
    if number.is_empty() {
        // Mail about no ticket (a refused quick action that opened none).
        return subject.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    let tag = format!("[{number}]");
    let mut rest = subject.to_string();
    if !number.is_empty() {
        while let Some(at) = rest.to_ascii_lowercase().find(&tag.to_ascii_lowercase()) {
            rest.replace_range(at..at + tag.len(), " ");
        }
    }
    let rest = rest.split_whitespace().collect::<Vec<_>>().join(" ");
    if rest.is_empty() {
        tag
    } else {
        format!("{tag} {rest}")
    }
}

/// Header text on one line: a CR or LF from a display name or a file name
/// must not start a header of its own.
fn one_line(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// Message-IDs are stored without angle brackets; tolerate them anyway,
/// since mail-builder adds its own.
fn bare_id(id: &str) -> String {
    one_line(id)
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// To or Cc mailboxes, scrubbed: an agent's address shown to a requester
/// (in a display name, or as the address itself) becomes the public
/// address, listed once.
fn header_mailboxes(
    mailboxes: &[Mailbox],
    clean: &dyn Fn(&str) -> String,
) -> Vec<Address<'static>> {
    let mut seen: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for mailbox in mailboxes {
        let address = one_line(&clean(&mailbox.address));
        if address.is_empty() || seen.contains(&address.to_lowercase()) {
            continue;
        }
        seen.push(address.to_lowercase());
        let name = mailbox
            .name
            .as_deref()
            .map(|n| one_line(&clean(n)))
            .filter(|n| !n.is_empty());
        out.push(Address::new_address(name, address));
    }
    out
}

fn text_with_lines<'t>(text: &'t str, lines: &[String]) -> std::borrow::Cow<'t, str> {
    if lines.is_empty() {
        return text.into();
    }
    let mut out = text.trim_end().to_string();
    if !out.is_empty() {
        out.push_str("\n\n");
    }
    for line in lines {
        out.push_str(line);
        out.push('\n');
    }
    out.into()
}

/// The reply marker lines first, then a blank line: a reply's words above
/// them are its entry (see `parse::reply`).
fn text_with_marker(text: &str, markers: &[&str]) -> String {
    let mut out = String::with_capacity(text.len() + 64 * (markers.len() + 1));
    if !markers.is_empty() {
        out.push_str(&markers.join("\n"));
        out.push_str("\n\n");
    }
    out.push_str(text);
    out
}

/// The reply marker lines as a grey paragraph, first in the `<body>`.
fn html_with_marker(html: &str, markers: &[&str]) -> String {
    if markers.is_empty() {
        return html.to_string();
    }
    let lines: Vec<String> = markers.iter().map(|m| escape_html(m)).collect();
    let paragraph = format!("<p style=\"color:#888888\">{}</p>\n", lines.join("<br>\n"));
    let lower = html.to_ascii_lowercase();
    let at = lower
        .find("<body")
        .and_then(|start| html[start..].find('>').map(|gt| start + gt + 1))
        .unwrap_or(0);
    format!("{}{paragraph}{}", &html[..at], &html[at..])
}

/// The attachment lines as paragraphs, before `</body>` when there is one.
fn html_with_lines(html: &str, lines: &[String]) -> String {
    if lines.is_empty() {
        return html.to_string();
    }
    let paragraphs: String = lines
        .iter()
        .map(|line| format!("<p>{}</p>\n", escape_html(line)))
        .collect();
    match html.to_ascii_lowercase().rfind("</body>") {
        Some(at) => format!("{}{}{}", &html[..at], paragraphs, &html[at..]),
        None => format!("{html}\n{paragraphs}"),
    }
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Attach one file of the e-mail function. A text attachment that is valid
/// UTF-8 is scrubbed like the body (a `.txt` or an `.html` is read like one);
/// other files are sent as they are.
fn attach(attachment: &Attachment, scrubber: Option<&Scrubber>) -> MimePart<'static> {
    let content_type = media_type(&attachment.content_type);
    let filename = match scrubber {
        Some(scrubber) => scrubber.text(&one_line(&attachment.filename)),
        None => one_line(&attachment.filename),
    };
    let text = if content_type.starts_with("text/") {
        std::str::from_utf8(&attachment.data).ok()
    } else {
        None
    };
    match (text, scrubber) {
        (Some(text), Some(scrubber)) => {
            let text = if content_type == "text/html" {
                scrubber.html(text)
            } else {
                scrubber.text(text)
            };
            MimePart::new(content_type, BodyPart::Text(text.into())).attachment(filename)
        }
        _ => MimePart::new(
            content_type,
            BodyPart::Binary(attachment.data.clone().into()),
        )
        .attachment(filename),
    }
}

/// The `type/subtype` of a stored content type, parameters dropped (the
/// charset may no longer be true once the text is UTF-8); anything that is
/// not a plain media type becomes `application/octet-stream`.
fn media_type(content_type: &str) -> String {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let token = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    match essence.split_once('/') {
        Some((kind, sub)) if token(kind) && token(sub) => essence,
        _ => "application/octet-stream".to_string(),
    }
}

/// The line naming one attachment kept on the ticket, in the draft's
/// language. Notifications carry these instead of the files (helpdesk rule
/// 5), so that whoever needs a file fetches it from the ticket.
pub fn attachment_line(language: Language, name: &str, size: u64) -> String {
    match language {
        Language::Fr => format!(
            "Pièce jointe conservée au billet : {name} ({})",
            human_size(language, size)
        ),
        Language::En => format!(
            "Attachment kept on the ticket: {name} ({})",
            human_size(language, size)
        ),
    }
}

/// A size as people read it: bytes below 1 KiB, then KB/MB/GB (Ko/Mo/Go in
/// French) in powers of 1024, one decimal below ten.
pub fn human_size(language: Language, size: u64) -> String {
    if size < 1024 {
        return match (language, size) {
            (Language::Fr, 0 | 1) => format!("{size} octet"),
            (Language::Fr, _) => format!("{size} octets"),
            (Language::En, 1) => "1 byte".to_string(),
            (Language::En, _) => format!("{size} bytes"),
        };
    }
    let units: [&str; 4] = match language {
        Language::Fr => ["Ko", "Mo", "Go", "To"],
        Language::En => ["KB", "MB", "GB", "TB"],
    };
    #[allow(clippy::cast_precision_loss)] // a displayed size needs no more
    let mut value = size as f64 / 1024.0;
    let mut unit = 0;
    // 1023.7 KB would print as "1024 KB": say "1 MB" instead.
    while value >= 1023.5 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    let number = if value < 9.95 {
        let shown = format!("{value:.1}");
        let shown = shown.strip_suffix(".0").unwrap_or(&shown).to_string();
        match language {
            Language::Fr => shown.replace('.', ","),
            Language::En => shown,
        }
    } else {
        format!("{value:.0}")
    };
    format!("{number} {}", units[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::{Message, MessageParser, MimeHeaders};

    fn draft(kind: SendKind) -> Draft {
        Draft {
            kind,
            ticket_number: "TKT0000042".into(),
            language: Languages::Fr,
            from_name: "Hélène Côté via Soutien TI".into(),
            from_address: "support@example.com".into(),
            reply_address: None,
            to: vec![Mailbox::new(Some("Zoé Ménard"), "zoe@client.example")],
            cc: vec![],
            subject: "Imprimante en panne à l'étage".into(),
            text: "Bonjour,\nL'imprimante est réparée.\n".into(),
            html: None,
            listed_attachments: vec![],
            attachments: vec![],
            message_id: "TKT0000042.abc123@crm.example.com".into(),
            in_reply_to: None,
            references: vec![],
            date: 1_780_000_000,
            loop_host: "crm.example.com".into(),
            scrub: None,
        }
    }

    fn parse(raw: &[u8]) -> Message<'_> {
        MessageParser::default()
            .parse(raw)
            .expect("compose output parses")
    }

    /// mail-builder writes line breaks as CRLF; compare texts with LF.
    fn lf(text: Option<std::borrow::Cow<'_, str>>) -> Option<String> {
        text.map(|t| t.replace("\r\n", "\n"))
    }

    fn header<'a>(message: &'a Message<'_>, name: &'a str) -> Option<&'a str> {
        message.header_raw(name).map(str::trim)
    }

    const NOTIFICATIONS: [SendKind; 6] = [
        SendKind::PublicCopy,
        SendKind::AgentCopy,
        SendKind::WorkNote,
        SendKind::PartnerCopy,
        SendKind::ReplyAllNotice,
        SendKind::FailureNotice,
    ];

    #[test]
    fn common_headers_decode_back() {
        let mut d = draft(SendKind::PublicCopy);
        d.cc = vec![Mailbox::new(None, "watcher@client.example")];
        d.in_reply_to = Some("first@client.example".into());
        d.references = vec![
            "first@client.example".into(),
            "<TKT0000042.x@crm.example.com>".into(),
        ];
        let raw = compose(&d).expect("compose");
        assert!(raw.is_ascii(), "non-ASCII must be RFC 2047 / MIME encoded");
        let m = parse(&raw);
        let from = m.from().and_then(|a| a.first()).expect("From");
        assert_eq!(from.name(), Some("Hélène Côté via Soutien TI"));
        assert_eq!(from.address(), Some("support@example.com"));
        let reply_to = m.reply_to().and_then(|a| a.first()).expect("Reply-To");
        assert_eq!(reply_to.address(), Some("support@example.com"));
        let to = m.to().and_then(|a| a.first()).expect("To");
        assert_eq!(to.name(), Some("Zoé Ménard"));
        assert_eq!(to.address(), Some("zoe@client.example"));
        let cc = m.cc().and_then(|a| a.first()).expect("Cc");
        assert_eq!(cc.address(), Some("watcher@client.example"));
        assert_eq!(
            m.subject(),
            Some("[TKT0000042] Imprimante en panne à l'étage")
        );
        assert_eq!(m.message_id(), Some("TKT0000042.abc123@crm.example.com"));
        assert_eq!(m.in_reply_to().as_text(), Some("first@client.example"));
        assert_eq!(
            m.references().as_text_list().map(|l| l.to_vec()),
            Some(vec![
                "first@client.example".into(),
                "TKT0000042.x@crm.example.com".into()
            ])
        );
        assert_eq!(m.date().map(|d| d.to_timestamp()), Some(1_780_000_000));
        assert_eq!(header(&m, "X-Crmgate-Loop"), Some("crm.example.com"));
        assert_eq!(header(&m, "MIME-Version"), Some("1.0"));
        assert_eq!(
            lf(m.body_text(0)).as_deref(),
            Some(
                "## Répondez au-dessus de cette ligne ##\n\nBonjour,\nL'imprimante est réparée.\n"
            )
        );
        let root = m.root_part().content_type().expect("Content-Type");
        assert_eq!((root.ctype(), root.subtype()), ("text", Some("plain")));
    }

    #[test]
    fn empty_cc_is_omitted() {
        let raw = compose(&draft(SendKind::WorkNote)).expect("compose");
        let m = parse(&raw);
        assert!(m.header_raw("Cc").is_none());
        assert!(m.header_raw("In-Reply-To").is_none());
        assert!(m.header_raw("References").is_none());
    }

    #[test]
    fn notifications_are_auto_generated_without_precedence() {
        for kind in NOTIFICATIONS {
            let raw = compose(&draft(kind)).expect("compose");
            let m = parse(&raw);
            assert_eq!(
                header(&m, "Auto-Submitted"),
                Some("auto-generated"),
                "{kind:?}"
            );
            assert_eq!(
                header(&m, "X-Auto-Response-Suppress"),
                Some("OOF, AutoReply"),
                "{kind:?}"
            );
            assert_eq!(header(&m, "Precedence"), None, "{kind:?}");
        }
    }

    #[test]
    fn receipt_is_auto_replied_and_bulk() {
        let raw = compose(&draft(SendKind::Receipt)).expect("compose");
        let m = parse(&raw);
        assert_eq!(header(&m, "Auto-Submitted"), Some("auto-replied"));
        assert_eq!(header(&m, "Precedence"), Some("bulk"));
        assert_eq!(
            header(&m, "X-Auto-Response-Suppress"),
            Some("OOF, AutoReply")
        );
    }

    #[test]
    fn closure_is_auto_generated_and_bulk() {
        let raw = compose(&draft(SendKind::Closure)).expect("compose");
        let m = parse(&raw);
        assert_eq!(header(&m, "Auto-Submitted"), Some("auto-generated"));
        assert_eq!(header(&m, "Precedence"), Some("bulk"));
        assert_eq!(
            header(&m, "X-Auto-Response-Suppress"),
            Some("OOF, AutoReply")
        );
    }

    #[test]
    fn email_is_a_persons_mail() {
        let raw = compose(&draft(SendKind::Email)).expect("compose");
        let m = parse(&raw);
        assert_eq!(header(&m, "Auto-Submitted"), None);
        assert_eq!(header(&m, "Precedence"), None);
        assert_eq!(header(&m, "X-Auto-Response-Suppress"), None);
        assert_eq!(header(&m, "X-Crmgate-Loop"), Some("crm.example.com"));
    }

    #[test]
    fn subject_carries_the_tag_once() {
        for subject in [
            "Imprimante",
            "[TKT0000042] Imprimante",
            "[tkt0000042]  Imprimante",
            "Imprimante [TKT0000042]",
        ] {
            let mut d = draft(SendKind::PublicCopy);
            d.subject = subject.into();
            let raw = compose(&d).expect("compose");
            assert_eq!(
                parse(&raw).subject(),
                Some("[TKT0000042] Imprimante"),
                "{subject}"
            );
        }
        let mut d = draft(SendKind::Closure);
        d.subject = String::new();
        let raw = compose(&d).expect("compose");
        assert_eq!(parse(&raw).subject(), Some("[TKT0000042]"));
    }

    #[test]
    fn header_values_cannot_inject_headers() {
        let mut d = draft(SendKind::PublicCopy);
        d.subject = "Hello\r\nBcc: victim@evil.example".into();
        d.from_name = "Jane\r\nX-Evil: 1".into();
        let raw = compose(&d).expect("compose");
        let m = parse(&raw);
        assert!(m.header_raw("Bcc").is_none());
        assert!(m.header_raw("X-Evil").is_none());
        assert_eq!(
            m.subject(),
            Some("[TKT0000042] Hello Bcc: victim@evil.example")
        );
    }

    #[test]
    fn html_alternative_is_kept() {
        let mut d = draft(SendKind::PublicCopy);
        d.html = Some("<html><body><p>Réparée</p></body></html>".into());
        let raw = compose(&d).expect("compose");
        let m = parse(&raw);
        assert_eq!(m.text_body_count(), 1);
        assert_eq!(m.html_body_count(), 1);
        assert!(m.body_html(0).is_some_and(|h| h.contains("<p>Réparée</p>")));
        assert_eq!(m.attachment_count(), 0);
    }

    fn two_files() -> Vec<Attachment> {
        vec![
            Attachment {
                filename: "rapport.pdf".into(),
                content_type: "application/pdf".into(),
                data: b"%PDF-1.4 \x00\x01\x02 binary".to_vec(),
                inline: false,
            },
            Attachment {
                filename: "journal été.txt".into(),
                content_type: "text/plain; charset=utf-8".into(),
                data: "ligne 1\nligne 2 éé\n".as_bytes().to_vec(),
                inline: false,
            },
        ]
    }

    #[test]
    fn email_carries_both_attachments() {
        let mut d = draft(SendKind::Email);
        d.attachments = two_files();
        let raw = compose(&d).expect("compose");
        let m = parse(&raw);
        assert_eq!(m.attachment_count(), 2);
        let parts: Vec<_> = m.attachments().collect();
        assert_eq!(parts[0].attachment_name(), Some("rapport.pdf"));
        assert_eq!(parts[0].contents(), b"%PDF-1.4 \x00\x01\x02 binary");
        assert_eq!(parts[1].attachment_name(), Some("journal été.txt"));
        assert_eq!(
            parts[1]
                .text_contents()
                .map(|t| t.replace("\r\n", "\n"))
                .as_deref(),
            Some("ligne 1\nligne 2 éé\n")
        );
        assert_eq!(
            lf(m.body_text(0)).as_deref(),
            Some("Bonjour,\nL'imprimante est réparée.\n")
        );
    }

    #[test]
    fn notifications_never_carry_attachments() {
        for kind in NOTIFICATIONS
            .into_iter()
            .chain([SendKind::Receipt, SendKind::Closure])
        {
            let mut d = draft(kind);
            d.attachments = two_files();
            let raw = compose(&d).expect("compose");
            assert_eq!(parse(&raw).attachment_count(), 0, "{kind:?}");
        }
    }

    #[test]
    fn notification_lists_attachments_kept_on_the_ticket() {
        let mut d = draft(SendKind::PublicCopy);
        d.listed_attachments = vec![
            ("rapport.pdf".into(), 122_880),
            ("photo.jpg".into(), 1_572_864),
        ];
        d.html = Some("<html><body><p>Réparée</p></body></html>".into());
        let raw = compose(&d).expect("compose");
        let m = parse(&raw);
        assert_eq!(m.attachment_count(), 0);
        let text = lf(m.body_text(0)).expect("text body");
        assert!(
            text.starts_with(
                "## Répondez au-dessus de cette ligne ##\n\nBonjour,\nL'imprimante est réparée.\n\n"
            ),
            "{text}"
        );
        assert!(text.contains("Pièce jointe conservée au billet : rapport.pdf (120 Ko)\n"));
        assert!(text.contains("Pièce jointe conservée au billet : photo.jpg (1,5 Mo)\n"));
        let html = lf(m.body_html(0)).expect("html body");
        assert!(
            html.ends_with(
                "<p>Réparée</p><p>Pièce jointe conservée au billet : rapport.pdf (120 Ko)</p>\n\
                 <p>Pièce jointe conservée au billet : photo.jpg (1,5 Mo)</p>\n</body></html>"
            ),
            "{html}"
        );
    }

    #[test]
    fn attachment_lines_in_both_languages() {
        assert_eq!(
            attachment_line(Language::En, "report.pdf", 120 * 1024),
            "Attachment kept on the ticket: report.pdf (120 KB)"
        );
        assert_eq!(
            attachment_line(Language::Fr, "rapport.pdf", 120 * 1024),
            "Pièce jointe conservée au billet : rapport.pdf (120 Ko)"
        );
        // fr+en: one line per attachment, each language's words on it.
        let mut d = draft(SendKind::PublicCopy);
        d.language = Languages::EnFr;
        d.listed_attachments = vec![("devis.pdf".into(), 2048)];
        let m = parse(&compose(&d).expect("compose")).into_owned();
        let text = lf(m.body_text(0)).unwrap_or_default();
        assert!(
            text.contains(
                "Attachment kept on the ticket: devis.pdf (2 KB) / \
                 Pièce jointe conservée au billet : devis.pdf (2 Ko)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn human_sizes() {
        let cases: [(u64, &str, &str); 9] = [
            (0, "0 octet", "0 bytes"),
            (1, "1 octet", "1 byte"),
            (850, "850 octets", "850 bytes"),
            (1024, "1 Ko", "1 KB"),
            (1536, "1,5 Ko", "1.5 KB"),
            (10_240, "10 Ko", "10 KB"),
            (1024 * 1024 - 1, "1 Mo", "1 MB"),
            (3 * 1024 * 1024 * 1024, "3 Go", "3 GB"),
            (u64::MAX, "16777216 To", "16777216 TB"),
        ];
        for (size, fr, en) in cases {
            assert_eq!(human_size(Language::Fr, size), fr);
            assert_eq!(human_size(Language::En, size), en);
        }
    }

    fn jane_scrub() -> Scrub {
        Scrub {
            addresses: vec!["jane.doe@example.org".into(), "former@example.org".into()],
            replacement: "support@example.com".into(),
        }
    }

    #[test]
    fn scrubbed_draft_hides_agents_in_headers_and_bodies() {
        let mut d = draft(SendKind::PublicCopy);
        d.from_name = "Jane.Doe@Example.org via Soutien TI".into();
        d.to = vec![
            Mailbox::new(Some("Zoé (cc Jane.Doe@example.org)"), "zoe@client.example"),
            Mailbox::new(None, "FORMER@example.org"),
        ];
        d.subject = "Question for jane.doe@example.org".into();
        d.text = "Le lun., Jane <JANE.DOE@EXAMPLE.ORG> a écrit :\n> salut\n".into();
        d.html = Some(
            r#"<p><a href="mailto:jane.doe%40example.org">jane&#46;doe&#64;example&#46;org</a></p>"#
                .into(),
        );
        d.listed_attachments = vec![("de former@example.org.pdf".into(), 10)];
        d.scrub = Some(jane_scrub());
        let raw = compose(&d).expect("compose");
        let lower = String::from_utf8_lossy(&raw).to_lowercase();
        assert!(!lower.contains("jane.doe@example.org"));
        assert!(!lower.contains("former@example.org"), "{lower}");
        let m = parse(&raw);
        let from = m.from().and_then(|a| a.first()).expect("From");
        assert_eq!(from.name(), Some("support@example.com via Soutien TI"));
        let to: Vec<_> = m.to().expect("To").iter().collect();
        assert_eq!(to[0].name(), Some("Zoé (cc support@example.com)"));
        assert_eq!(to[1].address(), Some("support@example.com"));
        assert_eq!(
            m.subject(),
            Some("[TKT0000042] Question for support@example.com")
        );
        let text = lf(m.body_text(0)).expect("text");
        assert!(
            text.contains("Jane <support@example.com> a écrit :"),
            "{text}"
        );
        assert!(text.contains("de support@example.com.pdf"), "{text}");
        let html = m.body_html(0).expect("html");
        assert!(
            html.contains(r#"<a href="mailto:support@example.com">support@example.com</a>"#),
            "{html}"
        );
    }

    #[test]
    fn scrubbed_email_cleans_attachment_names_and_text_files() {
        let mut d = draft(SendKind::Email);
        d.attachments = vec![
            Attachment {
                filename: "notes de jane.doe@example.org.txt".into(),
                content_type: "text/plain".into(),
                data: b"Contact: Jane.Doe@example.org\n".to_vec(),
                inline: false,
            },
            Attachment {
                filename: "scan.bin".into(),
                content_type: "application/octet-stream".into(),
                data: vec![0, 1, 2, 255],
                inline: false,
            },
        ];
        d.scrub = Some(jane_scrub());
        let raw = compose(&d).expect("compose");
        let m = parse(&raw);
        let parts: Vec<_> = m.attachments().collect();
        assert_eq!(
            parts[0].attachment_name(),
            Some("notes de support@example.com.txt")
        );
        assert_eq!(
            parts[0]
                .text_contents()
                .map(|t| t.replace("\r\n", "\n"))
                .as_deref(),
            Some("Contact: support@example.com\n")
        );
        assert_eq!(parts[1].contents(), &[0, 1, 2, 255]);
    }

    #[test]
    fn comment_and_work_note_notifications_start_with_the_reply_marker() {
        for kind in [
            SendKind::PublicCopy,
            SendKind::AgentCopy,
            SendKind::WorkNote,
            SendKind::PartnerCopy,
        ] {
            const FR: &str = "## Répondez au-dessus de cette ligne ##";
            const EN: &str = "## Reply above this line ##";
            for (language, marker) in [
                (Languages::Fr, FR.to_string()),
                (Languages::En, EN.to_string()),
                (Languages::FrEn, format!("{FR}\n{EN}")),
                (Languages::EnFr, format!("{EN}\n{FR}")),
            ] {
                let mut d = draft(kind);
                d.language = language;
                d.html = Some("<html><body class=\"x\"><p>Réparée</p></body></html>".into());
                let m = parse(&compose(&d).expect("compose")).into_owned();
                let text = lf(m.body_text(0)).unwrap_or_default();
                assert!(
                    text.starts_with(&format!("{marker}\n\n")),
                    "{kind:?}: {text}"
                );
                let html = lf(m.body_html(0)).unwrap_or_default();
                // Two markers share the grey paragraph, a line each.
                assert!(
                    html.starts_with(&format!(
                        "<html><body class=\"x\"><p style=\"color:#888888\">{}</p>",
                        marker.replace('\n', "<br>\n")
                    )),
                    "{kind:?}: {html}"
                );
            }
        }
        // Not in crmgate's own notices: nobody answers above a line there.
        for kind in [SendKind::Receipt, SendKind::Closure, SendKind::Email] {
            let m = parse(&compose(&draft(kind)).expect("compose")).into_owned();
            let text = m.body_text(0).unwrap_or_default().into_owned();
            assert!(!text.contains("##"), "{kind:?}: {text}");
        }
    }

    #[test]
    fn unscrubbed_draft_keeps_agent_addresses() {
        let mut d = draft(SendKind::WorkNote);
        d.text = "Voir jane.doe@example.org".into();
        let raw = compose(&d).expect("compose");
        assert_eq!(
            lf(parse(&raw).body_text(0)).as_deref(),
            Some("## Répondez au-dessus de cette ligne ##\n\nVoir jane.doe@example.org")
        );
    }

    #[test]
    fn media_types_are_sanitised() {
        assert_eq!(media_type("Text/Plain; charset=latin1"), "text/plain");
        assert_eq!(media_type(""), "application/octet-stream");
        assert_eq!(
            media_type("text/plain\r\nX-Evil: 1"),
            "application/octet-stream"
        );
    }
}
