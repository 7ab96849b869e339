//! Compose: a planned outgoing message ([`Draft`]) → RFC 5322 bytes.
//!
//! Built with mail-builder. This is also where the rule "no agent address
//! reaches a non-agent" is enforced on the wire: for a draft with a
//! [`Scrub`], every agent and former-agent address is replaced by the public
//! address in the headers and in the decoded text and HTML (quoted "From:" /
//! "De :" / "wrote:" lines, signatures, `mailto:` links, HTML entities)
//! before the message is encoded again.

mod scrub;

use mail_builder::headers::address::Address;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::MessageBuilder;

use crate::config::Language;
use crate::parse::{Attachment, Mailbox};

pub use scrub::{scrub_html, scrub_text, Scrubber};

/// Which kind of outgoing message, for headers (Auto-Submitted, Precedence)
/// and for the outbox's `kind` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendKind {
    /// A comment, to the watch group.
    PublicCopy,
    /// A comment, to the work-notes list.
    AgentCopy,
    /// A work note, to the work-notes list.
    WorkNote,
    /// A partner's mail (`email` entry), to the work-notes list.
    PartnerCopy,
    /// Receipt confirmation of a new ticket.
    Receipt,
    /// Closure notice of a resolved ticket.
    Closure,
    /// "Reply to the CRM only" notice to an agent who replied to all.
    ReplyAllNotice,
    /// A delivery failure, told to the work-notes list.
    FailureNotice,
    /// The ticket's e-mail function: a person's mail, attachments included.
    Email,
}

impl SendKind {
    /// The value of the outbox `kind` column and of logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SendKind::PublicCopy => "public_copy",
            SendKind::AgentCopy => "agent_copy",
            SendKind::WorkNote => "work_note",
            SendKind::PartnerCopy => "partner_copy",
            SendKind::Receipt => "receipt",
            SendKind::Closure => "closure",
            SendKind::ReplyAllNotice => "reply_all_notice",
            SendKind::FailureNotice => "failure_notice",
            SendKind::Email => "email",
        }
    }

    /// A notification or automatic message (everything but the e-mail function).
    pub fn is_automatic(self) -> bool {
        self != SendKind::Email
    }
}

/// Replace these addresses (agents and former agents, lower-cased) with the
/// public address everywhere in the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scrub {
    pub addresses: Vec<String>,
    pub replacement: String,
}

/// Everything needed to build one outgoing message; no I/O, no clock.
#[derive(Debug, Clone)]
pub struct Draft {
    pub kind: SendKind,
    pub ticket_number: String,
    pub language: Language,
    /// Display name of the From header, e.g. "Jane Doe via Soutien TI".
    pub from_name: String,
    /// A CRM address: the public or the internal one.
    pub from_address: String,
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
    let scrubber = draft.scrub.as_ref().map(Scrubber::new);
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
    let mut message = MessageBuilder::new()
        .from(from.clone())
        .reply_to(from)
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
        .map(|(name, size)| attachment_line(draft.language, &one_line(name), *size))
        .collect();
    message = message.text_body(clean(&text_with_lines(&draft.text, &lines)));
    if let Some(html) = &draft.html {
        let html = html_with_lines(html, &lines);
        message = message.html_body(match &scrubber {
            Some(scrubber) => scrubber.html(&html),
            None => html,
        });
    }

    if draft.kind == SendKind::Email {
        for attachment in &draft.attachments {
            message = attach(message, attachment, scrubber.as_ref());
        }
    }

    Ok(message.write_to_vec()?)
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
        | SendKind::FailureNotice => vec![
            ("Auto-Submitted", "auto-generated"),
            ("X-Auto-Response-Suppress", "OOF, AutoReply"),
        ],
    }
}

/// `[NUMBER] subject`, with the tag exactly once wherever the draft's
/// subject already had it: a second tag would make replies' subjects grow
/// and confuse the thread lookup.
fn tagged_subject(number: &str, subject: &str) -> String {
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

fn text_with_lines(text: &str, lines: &[String]) -> String {
    if lines.is_empty() {
        return text.to_string();
    }
    let mut out = text.trim_end().to_string();
    if !out.is_empty() {
        out.push_str("\n\n");
    }
    for line in lines {
        out.push_str(line);
        out.push('\n');
    }
    out
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
fn attach<'x>(
    message: MessageBuilder<'x>,
    attachment: &Attachment,
    scrubber: Option<&Scrubber>,
) -> MessageBuilder<'x> {
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
            message.attachment(content_type, filename, text)
        }
        _ => message.attachment(content_type, filename, attachment.data.clone()),
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
