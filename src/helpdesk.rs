//! The helpdesk's nouns, shared by every stage.
//!
//! A ticket's state, an entry's kind, a list's role, an outgoing message's
//! kind, why mail went to the quarantine, and the SMTP envelope a message
//! came with: plain values with the words the database and the logs use.
//! They sit at the bottom of the tree, importing nothing of crmgate, so
//! `decide` can speak them without importing the stages that send, compose
//! or receive mail, and the store can write them without importing
//! `decide`.

use std::net::IpAddr;

/// Where a ticket is in its life (the `tickets.state` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketState {
    New,
    Open,
    Resolved,
}

impl TicketState {
    /// The word of the `state` column, the CLI and the JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            TicketState::New => "new",
            TicketState::Open => "open",
            TicketState::Resolved => "resolved",
        }
    }

    /// The state named by `text` (`ticket list --state`, the database).
    pub fn parse(text: &str) -> Option<TicketState> {
        match text {
            "new" => Some(TicketState::New),
            "open" => Some(TicketState::Open),
            "resolved" => Some(TicketState::Resolved),
            _ => None,
        }
    }
}

/// What an entry of a ticket's log is (the `entries.kind` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Comment,
    WorkNote,
    Email,
    Receipt,
    Closure,
    System,
}

impl EntryKind {
    /// The word of the `kind` column and of `ticket show`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Comment => "comment",
            EntryKind::WorkNote => "work_note",
            EntryKind::Email => "email",
            EntryKind::Receipt => "receipt",
            EntryKind::Closure => "closure",
            EntryKind::System => "system",
        }
    }
}

/// Which list of a ticket an address is on (the `participants.role`
/// column): the requesters and the watch list make the watch group, the
/// work-notes list holds agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Requester,
    Watch,
    Notes,
}

impl Role {
    /// The word of the `role` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Requester => "requester",
            Role::Watch => "watch",
            Role::Notes => "notes",
        }
    }

    /// The role named by the `role` column.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "requester" => Some(Role::Requester),
            "watch" => Some(Role::Watch),
            "notes" => Some(Role::Notes),
            _ => None,
        }
    }

    /// The list's name in messages to a person.
    pub fn list_name(self) -> &'static str {
        match self {
            Role::Requester => "requesters",
            Role::Watch => "watch list",
            Role::Notes => "work-notes list",
        }
    }
}

/// Which kind of outgoing message, for headers (Auto-Submitted, Precedence),
/// for the caps, and for the outbox's `kind` column.
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
    /// To an agent: the list of quick actions, or why a line was refused.
    QuickActionNotice,
}

impl SendKind {
    const ALL: [SendKind; 10] = [
        SendKind::PublicCopy,
        SendKind::AgentCopy,
        SendKind::WorkNote,
        SendKind::PartnerCopy,
        SendKind::Receipt,
        SendKind::Closure,
        SendKind::ReplyAllNotice,
        SendKind::FailureNotice,
        SendKind::Email,
        SendKind::QuickActionNotice,
    ];

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
            SendKind::QuickActionNotice => "quick_action_notice",
        }
    }

    /// A notification or automatic message (everything but the e-mail function).
    pub fn is_automatic(self) -> bool {
        self != SendKind::Email
    }
}

/// What an outbox row carries (its `kind` column): a message planned for a
/// ticket, or postmaster mail passed on to the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    Send(SendKind),
    /// Mail to postmaster@, forwarded to `[gateway] operator`: no ticket's.
    Postmaster,
}

impl OutboxKind {
    /// The value of the outbox `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Send(kind) => kind.as_str(),
            OutboxKind::Postmaster => "postmaster",
        }
    }

    /// The kind a stored `kind` column names; `None` for a word this
    /// version does not write.
    pub fn parse(text: &str) -> Option<OutboxKind> {
        if text == "postmaster" {
            return Some(OutboxKind::Postmaster);
        }
        SendKind::ALL
            .into_iter()
            .find(|k| k.as_str() == text)
            .map(OutboxKind::Send)
    }
}

impl From<SendKind> for OutboxKind {
    fn from(kind: SendKind) -> OutboxKind {
        OutboxKind::Send(kind)
    }
}

/// Why a message went to the quarantine instead of a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineReason {
    /// Carried our own `X-Crmgate-Loop`.
    Loop,
    /// Automatic mail that names no ticket.
    Automatic,
    /// The header block could not be parsed.
    Unparseable,
    /// Mail to postmaster@.
    Postmaster,
    /// Refused by policy (`550 5.7.1`), or a refused quick-action block on
    /// a message that opened no ticket: kept so an operator sees attempts.
    Refused,
    /// An agent's `/help` on no ticket: answered, and kept.
    QuickHelp,
}

impl QuarantineReason {
    /// The word of the quarantine's `reason` column and of the log line.
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineReason::Loop => "loop",
            QuarantineReason::Automatic => "automatic",
            QuarantineReason::Unparseable => "unparseable",
            QuarantineReason::Postmaster => "postmaster",
            QuarantineReason::Refused => "refused",
            QuarantineReason::QuickHelp => "quick_help",
        }
    }
}

/// The SMTP envelope of one transaction: what the listener (or `crmgate
/// deliver`) knows of a message besides its bytes, and what the rules read
/// of it (the peer, the reverse-path, the recipients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The peer's address: decides whether an agent's From is believed.
    pub peer: IpAddr,
    pub helo: String,
    /// `None` for the null reverse-path `MAIL FROM:<>`. Lower-cased.
    pub mail_from: Option<String>,
    /// Accepted recipients, lower-cased, in RCPT order.
    pub rcpt_to: Vec<String>,
}

/// What crmgate's own checks of the sender found (SPEC, Security): computed
/// where DNS may be asked, before decide, and read by the rules as data.
/// Parse leaves it empty; so does mail nobody checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderCheck {
    /// A valid DKIM signature or an SPF pass aligned with the From domain:
    /// an agent's From is believed.
    pub from_verified: bool,
    /// The envelope sender's SPF said `fail` (the domain named): no
    /// receipt goes to it, against backscatter.
    pub spf_fail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outbox_kind_reads_back_from_its_column_word() {
        for kind in SendKind::ALL {
            assert_eq!(
                OutboxKind::parse(kind.as_str()),
                Some(OutboxKind::Send(kind))
            );
        }
        assert_eq!(
            OutboxKind::parse("postmaster"),
            Some(OutboxKind::Postmaster)
        );
        assert_eq!(OutboxKind::parse("fax"), None);
        for role in [Role::Requester, Role::Watch, Role::Notes] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
    }
}
