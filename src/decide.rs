//! Decide: the helpdesk's rules as a pure function.
//!
//! From plain data — the envelope, the parsed message, the ticket it threads
//! to (if any), the configuration — to a plain [`Decision`]: which ticket,
//! which entries, which lists change, who receives what under which From.
//! No socket, no SQL, no clock: the time comes in as a value. This is where
//! a reader learns the rules of the SPEC, in its order, and where most unit
//! tests live.

use std::collections::BTreeSet;

use crate::compose::SendKind;
use crate::config::Config;
use crate::parse::{Inbound, Mailbox};
use crate::smtp::Envelope;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketState {
    New,
    Open,
    Resolved,
}

impl TicketState {
    pub fn as_str(self) -> &'static str {
        match self {
            TicketState::New => "new",
            TicketState::Open => "open",
            TicketState::Resolved => "resolved",
        }
    }

    pub fn parse(text: &str) -> Option<TicketState> {
        match text {
            "new" => Some(TicketState::New),
            "open" => Some(TicketState::Open),
            "resolved" => Some(TicketState::Resolved),
            _ => None,
        }
    }
}

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

/// A Message-ID already on the ticket, for the threading headers of outgoing mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadRef {
    pub message_id: String,
    /// An agent's own inbound Message-ID: never shown to non-agents.
    pub agent_inbound: bool,
}

/// What the rules need to know of an existing ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketView {
    pub id: i64,
    pub number: String,
    pub subject: String,
    pub state: TicketState,
    pub owner: Option<String>,
    pub requesters: Vec<Mailbox>,
    pub watch_list: Vec<Mailbox>,
    /// Agents' addresses, lower-cased.
    pub work_notes_list: Vec<String>,
    /// The first Message-ID and the most recent ones, oldest first.
    pub thread: Vec<ThreadRef>,
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
}

impl QuarantineReason {
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineReason::Loop => "loop",
            QuarantineReason::Automatic => "automatic",
            QuarantineReason::Unparseable => "unparseable",
            QuarantineReason::Postmaster => "postmaster",
        }
    }
}

/// The ticket a plan writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TicketTarget {
    Existing(i64),
    New(NewTicket),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTicket {
    pub subject: String,
    pub requesters: Vec<Mailbox>,
    pub watch_list: Vec<Mailbox>,
    pub work_notes_list: Vec<String>,
    pub owner: Option<String>,
}

/// One entry to add to the ticket's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEntry {
    pub kind: EntryKind,
    pub author: Mailbox,
    /// Written by a believed agent.
    pub by_agent: bool,
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
    /// The inbound message's attachments are kept on this entry.
    pub keeps_attachments: bool,
    /// The inbound Message-ID, on the entry that stands for the message.
    pub message_id: Option<String>,
}

/// One outgoing message to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSend {
    pub kind: SendKind,
    /// Index into [`Plan::entries`] of the entry this message carries.
    pub entry: usize,
    pub from_name: String,
    pub from_address: String,
    /// Shown in the headers: the whole group.
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    /// Who actually receives it (lower-cased): the group less the sender and
    /// those who had the inbound mail directly.
    pub envelope: Vec<String>,
    /// Only agents receive it: no scrubbing, agents' Message-IDs may thread.
    pub agents_only: bool,
}

/// Everything one accepted message changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub ticket: TicketTarget,
    pub entries: Vec<PlannedEntry>,
    /// New state of an existing ticket, when it changes.
    pub state: Option<TicketState>,
    pub sends: Vec<PlannedSend>,
    /// The ticket's log word for this message: comment, work_note, email, automatic…
    pub decision: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Quarantine(QuarantineReason),
    /// Already in the log: count it on that entry.
    Duplicate { entry_id: i64 },
    /// Refused by policy: `550 5.7.1` with this sentence.
    Refuse(String),
    Record(Plan),
}

/// Facts about the sender and the configuration that the rules read.
pub struct Facts<'a> {
    pub config: &'a Config,
    /// Addresses that were agents once and are no longer.
    pub former_agents: &'a BTreeSet<String>,
}

/// Is this RCPT address one crmgate accepts? CRM addresses with or without
/// `+tag`, and postmaster at the hostname or a CRM address's domain
/// (RFC 5321 §4.5.1). Never a relay.
pub fn accepts_recipient(config: &Config, address: &str) -> bool {
    let address = address.trim().to_ascii_lowercase();
    let base = crate::thread::strip_tag(&address);
    if base == config.public_address || base == config.internal_address {
        return true;
    }
    is_postmaster(config, &address)
}

/// `postmaster` (bare, or at the hostname or a CRM domain).
pub fn is_postmaster(config: &Config, address: &str) -> bool {
    let address = address.to_ascii_lowercase();
    if address == "postmaster" {
        return true;
    }
    match address.split_once('@') {
        Some(("postmaster", domain)) => {
            domain == config.hostname
                || [&config.public_address, &config.internal_address]
                    .iter()
                    .any(|a| a.rsplit_once('@').is_some_and(|(_, d)| d == domain))
        }
        _ => false,
    }
}

/// Decide what becomes of one parsed message.
pub fn decide(
    facts: &Facts<'_>,
    envelope: &Envelope,
    inbound: &Inbound,
    ticket: Option<&TicketView>,
    now: i64,
) -> Decision {
    let _ = (facts, envelope, inbound, ticket, now);
    Decision::Quarantine(QuarantineReason::Automatic)
}
