//! Decide: the helpdesk's rules as a pure function.
//!
//! From plain data — the envelope, the parsed message, the ticket it threads
//! to (if any), the configuration — to a plain [`Decision`]: which ticket,
//! which entries, which lists change, who receives what under which From.
//! No socket, no SQL, no clock: the time comes in as a value. This is where
//! a reader learns the rules of the SPEC ("What happens to an inbound
//! message"): [`decide`] calls one function per rule, in the SPEC's order.
//!
//! Sub-modules hold the rules too long for this page: `automatic` (rule 4),
//! `new_ticket` (rule 6), `reemit` (rules 7 and 8, and the receipt),
//! `from` (under which name mail leaves), `trust` (who is believed, who may
//! be in a watch group, which addresses are ours), `caps` (the limits),
//! `notices` (failure and reply-all notices, References) and `operations`
//! (what an agent does from the CRM: the same rules, without an inbound
//! message).

#![warn(missing_docs)]

use std::collections::BTreeSet;

use crate::config::Config;
use crate::helpdesk::{EntryKind, Envelope, QuarantineReason, SendKind, TicketState};
use crate::parse::{Inbound, Mailbox};

mod automatic;
mod caps;
mod from;
mod new_ticket;
mod notices;
mod operations;
pub mod quick;
mod reemit;
mod trust;

pub use caps::{cap, held_back_note, sender_cap_note, within_cap, Cap, SentCounts};
pub use from::{agent_mailboxes, helpdesk, via_display_name};
pub use notices::{failure_notice, references, reply_all_notice_day, thread_with};
pub use operations::{email, publish, resolve};
pub use trust::{
    accepts_recipient, admit_to_watch_group, from_is_believed, is_postmaster, is_robot_address,
    NotAdmitted,
};

/// A Message-ID already on the ticket, for the threading headers of outgoing mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadRef {
    /// Without angle brackets, as the log keeps it.
    pub message_id: String,
    /// An agent's own inbound Message-ID: never shown to non-agents.
    pub agent_inbound: bool,
}

/// What the rules need to know of an existing ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketView {
    /// The row id: what a plan names the ticket by.
    pub id: i64,
    /// The number people see, `[TKT0000007]` in Subjects.
    pub number: String,
    /// The subject without prefixes and tags, for the Subjects of its mail.
    pub subject: String,
    /// For rule 9: an agent's entry opens a new ticket, a reply reopens.
    pub state: TicketState,
    /// For rule 9's reopen window: when it was last set resolved (Unix
    /// seconds); `None` unless it is resolved.
    pub resolved_at: Option<i64>,
    /// The agent who owns it, lower-cased.
    pub owner: Option<String>,
    /// The To of the public copy.
    pub requesters: Vec<Mailbox>,
    /// The Cc of the public copy.
    pub watch_list: Vec<Mailbox>,
    /// Agents' addresses, lower-cased.
    pub work_notes_list: Vec<String>,
    /// The first Message-ID and the most recent ones, oldest first.
    pub thread: Vec<ThreadRef>,
}

/// The ticket a plan writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TicketTarget {
    /// The ticket threading found, by row id.
    Existing(i64),
    /// A ticket the store creates in the plan's transaction.
    New(NewTicket),
}

/// A ticket the message opens (rule 6), as the store creates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTicket {
    /// The opening mail's subject, cleaned; never empty.
    pub subject: String,
    /// The sender, or a forward's original sender, or nobody.
    pub requesters: Vec<Mailbox>,
    /// The other To/Cc of the opening mail (`add_cc_on_open`).
    pub watch_list: Vec<Mailbox>,
    /// Agents with `default_notes_list`, and the agent who opened it.
    pub work_notes_list: Vec<String>,
    /// The agent who opened it for nobody in particular.
    pub owner: Option<String>,
}

impl NewTicket {
    /// The ticket as the re-emit rule sees it before the store gave it an
    /// id or a number: the same lists, nothing threaded yet.
    fn view(&self) -> TicketView {
        TicketView {
            id: 0,
            number: String::new(),
            subject: self.subject.clone(),
            state: TicketState::New,
            resolved_at: None,
            owner: self.owner.clone(),
            requesters: self.requesters.clone(),
            watch_list: self.watch_list.clone(),
            work_notes_list: self.work_notes_list.clone(),
            thread: Vec::new(),
        }
    }
}

/// One entry to add to the ticket's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEntry {
    /// What the entry is: decides who may see it and what is sent.
    pub kind: EntryKind,
    /// Who the log says wrote it (a forward's original sender, not the agent).
    pub author: Mailbox,
    /// Written by a believed agent.
    pub by_agent: bool,
    /// The entry's subject, cleaned.
    pub subject: String,
    /// Shared with the inbound message when it is its text: a long text is
    /// not copied once more.
    pub text: std::sync::Arc<str>,
    /// The inbound HTML, sent along in the copies when it is not too long.
    pub html: Option<String>,
    /// The inbound message's attachments are kept on this entry.
    pub keeps_attachments: bool,
    /// The inbound Message-ID, on the entry that stands for the message.
    pub message_id: Option<String>,
}

/// One outgoing message to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSend {
    /// Headers, caps and the outbox row follow from it.
    pub kind: SendKind,
    /// Index into [`Plan::entries`] of the entry this message carries.
    pub entry: usize,
    /// The From's display name, e.g. "Jane Doe via Soutien TI".
    pub from_name: String,
    /// A CRM address: never an agent's own.
    pub from_address: String,
    /// Shown in the headers: the whole group.
    pub to: Vec<Mailbox>,
    /// Shown in the headers: the watch list of a public copy.
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
    /// The ticket written to, or the one to create.
    pub ticket: TicketTarget,
    /// In log order; sends point into it by index.
    pub entries: Vec<PlannedEntry>,
    /// New state of an existing ticket, when it changes.
    pub state: Option<TicketState>,
    /// Agents who join the work-notes list of an existing ticket.
    pub join_work_notes: Vec<String>,
    /// In queueing order.
    pub sends: Vec<PlannedSend>,
    /// A delivery report about mail crmgate sent: the store marks that
    /// outbox row failed and tells the work-notes list.
    pub bounce: Option<Bounce>,
    /// What the message was, for its log line and metrics.
    pub decision: Recorded,
    /// The resolved ticket that the new one follows (rule 9: a requester's
    /// reply after the reopen window).
    pub follows: Option<Follows>,
}

/// A resolved ticket that a later reply left resolved, opening a new one.
/// The new ticket's first `system` entry, in the plan, names it; the store
/// adds to it the `system` entry naming the new ticket ([`followed_by`]),
/// whose number only the store gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follows {
    /// The old ticket's row id.
    pub id: i64,
    /// The old ticket's subject, for its `system` entry.
    pub subject: String,
    /// Who replied, lower-cased.
    pub sender: String,
    /// Whole days from the resolution to the reply.
    pub days: i64,
}

/// The text of the old ticket's `system` entry naming the ticket a late
/// reply opened.
pub fn followed_by(follows: &Follows, new_number: &str) -> String {
    format!(
        "reply from {} {} days after the resolution, beyond [ticket] reopen_within_days: \
         it opened {new_number}; this ticket stays resolved",
        follows.sender, follows.days
    )
}

/// What a recorded message was: the word of its log line and of
/// `crmgate_messages_total{decision}` (SPEC, "Operations"). Only words:
/// no rule reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A comment: re-emitted to the watch group and the work-notes list.
    Comment,
    /// A work note: to the work-notes list only.
    WorkNote,
    /// A partner's (or a stranger's) mail on a ticket: the agents only.
    Email,
    /// An agent's forward that opened a ticket for its original sender.
    Forward,
    /// Automatic mail logged as a `system` entry, never re-emitted.
    Automatic,
    /// A ticket set to resolved.
    Closure,
}

impl Recorded {
    /// The word logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Recorded::Comment => "comment",
            Recorded::WorkNote => "work_note",
            Recorded::Email => "email",
            Recorded::Forward => "forward",
            Recorded::Automatic => "automatic",
            Recorded::Closure => "closure",
        }
    }
}

/// What a delivery report says about one of our outbox rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    /// From the VERP envelope recipient or the returned message's headers.
    pub outbox_id: Option<i64>,
    /// Message-ID of the returned message, to find the row otherwise.
    pub original_message_id: Option<String>,
    /// Who the report says did not get it; empty: the row's recipients.
    pub failed_recipients: Vec<String>,
    /// The report's reason, quoted to the agents.
    pub diagnostic: String,
}

/// What becomes of one inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Kept raw, on no ticket, for an operator to look at.
    Quarantine(QuarantineReason),
    /// Already in the log: count it on that entry.
    Duplicate {
        /// The entry that holds the first copy.
        entry_id: i64,
    },
    /// Refused by policy: `550 5.7.1` with this sentence.
    Refuse(String),
    /// Written to a ticket: the plan the store applies in one transaction.
    Record(Box<Plan>),
}

/// What the rules read besides the message: configuration and history.
pub struct Facts<'a> {
    /// The policy: addresses, agents, `[auto]`, `[security]`.
    pub config: &'a Config,
    /// Addresses that were agents once and are no longer: never in a watch
    /// group, always scrubbed.
    pub former_agents: &'a BTreeSet<String>,
    /// Key of `reply_secret_file`, for our signed bounce addresses.
    pub reply_key: Option<&'a [u8]>,
}

/// One inbound message past rule 4, with what every later rule asks of it.
struct Message<'a> {
    facts: &'a Facts<'a>,
    envelope: &'a Envelope,
    inbound: &'a Inbound,
    /// The From mailbox, else the envelope sender.
    sender: Mailbox,
    /// The sender is an agent and the From is believed.
    agent: bool,
    /// The internal address is among the recipients or in To/Cc.
    internal: bool,
    /// The Subject without reply prefixes and ticket tags.
    subject: String,
    /// When it is decided (Unix seconds): the reopen window counts to it.
    now: i64,
}

impl Message<'_> {
    /// The entry that stands for the inbound message itself.
    fn entry(&self, kind: EntryKind, author: &Mailbox) -> PlannedEntry {
        PlannedEntry {
            kind,
            author: author.clone(),
            by_agent: self.agent,
            subject: self.subject.clone(),
            text: self.text(),
            html: self.inbound.html.clone(),
            keeps_attachments: true,
            message_id: self.inbound.message_id.clone(),
        }
    }

    /// The message's text; a reply that added nothing above crmgate's
    /// reply marker keeps its entry (its attachments, the fact that the
    /// person answered) with a note saying so.
    fn text(&self) -> std::sync::Arc<str> {
        if self.inbound.cut_at_marker && self.inbound.text.trim().is_empty() {
            crate::templates::nothing_added(self.facts.config.gateway.language).into()
        } else {
            self.inbound.text.clone()
        }
    }
}

/// Which entry a message makes (rule 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    WorkNote,
    Comment,
    /// A partner's mail: the agents only.
    Email,
}

/// Decide what becomes of one parsed message, in the SPEC's order.
///
/// `ticket` is what threading found (rule 3 is `thread`'s and the store's
/// work); `duplicate_of` the entry that already holds this message, if the
/// store found one (rule 2); `now` the time of the decision (Unix seconds),
/// against which the reopen window of rule 9 is measured.
pub fn decide(
    facts: &Facts<'_>,
    envelope: &Envelope,
    inbound: &Inbound,
    ticket: Option<&TicketView>,
    duplicate_of: Option<i64>,
    now: i64,
) -> Decision {
    // Rules 1 and 2 end the processing, as does mail for the postmaster.
    if let Some(decision) = loop_guard(facts.config, inbound)
        .or_else(|| duplicate(duplicate_of))
        .or_else(|| postmaster_only(facts.config, envelope))
    {
        return decision;
    }
    // Rule 4 ends it too; rule 3's threading found `ticket` already.
    let sender = sender_of(envelope, inbound);
    if let Some(reason) = automatic::reason(facts, envelope, inbound, sender.as_ref()) {
        return automatic::automatic(facts, envelope, inbound, ticket, sender, reason);
    }
    let Some(sender) = sender else {
        // No From and a null reverse-path is automatic above; this is a
        // message with no sender at all that is not automatic: nothing to
        // answer and nobody to thread it for.
        return Decision::Quarantine(QuarantineReason::Unparseable);
    };
    let message = Message::new(facts, envelope, inbound, sender, now);
    match channel(&message, ticket) {
        Ok(channel) => Decision::Record(Box::new(record(&message, ticket, channel))),
        Err(refusal) => refusal,
    }
}

/// Rules 3 and 6–9, in order, on a message that goes on a ticket: its
/// entries on the ticket found or a new one, the copies, the reply-all
/// notice, the receipt of a new ticket, the state.
fn record(m: &Message<'_>, found: Option<&TicketView>, channel: Channel) -> Plan {
    // Rule 9 sends a requester's reply after the reopen window to a new
    // ticket: from here on, the message is one that found no ticket.
    let late = found.filter(|t| requester_on_resolved(m, t, channel) && !within_window(m, t));
    let ticket = found.filter(|_| late.is_none());
    let (mut plan, opening) = match ticket {
        Some(t) => (on_ticket(m, t, channel), None),
        None => {
            let (mut plan, opening) = new_ticket::new_ticket(m, channel);
            if let Some(old) = late {
                follow(m, old, &mut plan);
            }
            (plan, Some(opening))
        }
    };
    let opened = match &plan.ticket {
        TicketTarget::New(new) => Some(new.view()),
        TicketTarget::Existing(_) => None,
    };
    if let Some(view) = ticket.or(opened.as_ref()) {
        reemit::re_emit(m.facts, m.inbound, view, &m.sender, m.agent, &mut plan);
    }
    reemit::reply_all_guard(m, &mut plan);
    if let Some(opening) = opening {
        reemit::answer_opening(m, opening, &mut plan);
    }
    state(m, ticket, channel, &mut plan);
    plan
}

impl<'a> Message<'a> {
    fn new(
        facts: &'a Facts<'a>,
        envelope: &'a Envelope,
        inbound: &'a Inbound,
        sender: Mailbox,
        now: i64,
    ) -> Message<'a> {
        let config = facts.config;
        let agent = config.agent(&sender.address).is_some()
            && from_is_believed(config, envelope, inbound, &sender.address);
        let internal = envelope
            .rcpt_to
            .iter()
            .map(String::as_str)
            .chain(
                inbound
                    .to
                    .iter()
                    .chain(&inbound.cc)
                    .map(|m| m.address.as_str()),
            )
            .any(|a| crate::thread::strip_tag(a) == config.addresses.internal);
        Message {
            facts,
            envelope,
            inbound,
            sender,
            agent,
            internal,
            subject: crate::thread::clean_subject(&inbound.subject, &config.ticket.pattern),
            now,
        }
    }
}

/// Rule 1, Loop: a top-level `X-Crmgate-Loop` of this instance is our own
/// mail come back; quarantined, never re-emitted.
fn loop_guard(config: &Config, inbound: &Inbound) -> Option<Decision> {
    inbound
        .loop_hosts
        .iter()
        .any(|h| h.trim().eq_ignore_ascii_case(&config.gateway.hostname))
        .then_some(Decision::Quarantine(QuarantineReason::Loop))
}

/// Rule 2, Duplicate: the store found this message in the log already (a
/// reply-all, or several deliveries of one message): counted on that entry.
fn duplicate(duplicate_of: Option<i64>) -> Option<Decision> {
    duplicate_of.map(|entry_id| Decision::Duplicate { entry_id })
}

/// Mail for the postmaster alone is for a human operator (RFC 5321
/// §4.5.1), not a ticket.
fn postmaster_only(config: &Config, envelope: &Envelope) -> Option<Decision> {
    (!envelope.rcpt_to.is_empty() && envelope.rcpt_to.iter().all(|r| is_postmaster(config, r)))
        .then_some(Decision::Quarantine(QuarantineReason::Postmaster))
}

/// The sender as the rules see it: the From mailbox, else the envelope sender.
fn sender_of(envelope: &Envelope, inbound: &Inbound) -> Option<Mailbox> {
    inbound
        .from
        .clone()
        .filter(|m| !m.address.is_empty())
        .or_else(|| envelope.mail_from.as_deref().map(|a| Mailbox::new(None, a)))
}

/// Rule 5, Channel: the internal address anywhere makes a work note, which
/// only a believed agent may write (`550 5.7.1` otherwise); else a comment
/// from a requester, a watcher or an agent, an `email` entry from anyone
/// else on an existing ticket (a partner, or a stranger who guessed a
/// number: the agents only, never the watch group).
fn channel(m: &Message<'_>, ticket: Option<&TicketView>) -> Result<Channel, Decision> {
    let config = m.facts.config;
    if m.internal && !m.agent {
        return Err(Decision::Refuse(format!(
            "Only the helpdesk's agents may write work notes to {}; write to {} instead",
            config.addresses.internal, config.addresses.public
        )));
    }
    let in_watch_group = |t: &TicketView| {
        contains(&t.requesters, &m.sender.address) || contains(&t.watch_list, &m.sender.address)
    };
    Ok(match ticket {
        _ if m.internal => Channel::WorkNote,
        Some(t) if !m.agent && !in_watch_group(t) => Channel::Email,
        _ => Channel::Comment,
    })
}

/// Rule 3, Ticket: on the ticket threading found, the message is one entry
/// of the kind its channel says, and a believed agent joins the work-notes
/// list.
fn on_ticket(m: &Message<'_>, ticket: &TicketView, channel: Channel) -> Plan {
    let (kind, decision) = match channel {
        Channel::WorkNote => (EntryKind::WorkNote, Recorded::WorkNote),
        Channel::Comment => (EntryKind::Comment, Recorded::Comment),
        Channel::Email => (EntryKind::Email, Recorded::Email),
    };
    let join_work_notes = if m.agent && !ticket.work_notes_list.contains(&m.sender.address) {
        vec![m.sender.address.clone()]
    } else {
        Vec::new()
    };
    Plan {
        ticket: TicketTarget::Existing(ticket.id),
        entries: vec![m.entry(kind, &m.sender)],
        state: None,
        join_work_notes,
        sends: Vec::new(),
        bounce: None,
        decision,
        follows: None,
    }
}

/// Rule 9, State: a believed agent's entry moves `new` to `open` (a ticket
/// an agent opens is created open); a requester's comment on a resolved
/// ticket reopens it when `reopen_on_reply` says so (within the window:
/// [`record`] sent a later one to a new ticket).
fn state(m: &Message<'_>, ticket: Option<&TicketView>, channel: Channel, plan: &mut Plan) {
    let opens = match ticket {
        None => m.agent,
        Some(t) => {
            let agent_on_new = m.agent && t.state == TicketState::New;
            agent_on_new || requester_on_resolved(m, t, channel)
        }
    };
    if opens {
        plan.state = Some(TicketState::Open);
    }
}

/// A requester's comment on a resolved ticket, with `reopen_on_reply` on:
/// it reopens the ticket, or after the window opens a new one. With
/// `reopen_on_reply` off it is a comment on the resolved ticket, whenever
/// it comes. Agents, watchers and partners never reopen (the SPEC names
/// requesters).
fn requester_on_resolved(m: &Message<'_>, t: &TicketView, channel: Channel) -> bool {
    !m.agent
        && channel == Channel::Comment
        && t.state == TicketState::Resolved
        && m.facts.config.ticket.reopen_on_reply
        && contains(&t.requesters, &m.sender.address)
}

/// `reopen_within_days` of the resolution, in seconds: a reply exactly
/// that many days after still reopens; 0 is no window at all. A resolved
/// ticket with no time of resolution (none is left after the migration)
/// counts as just resolved.
fn within_window(m: &Message<'_>, t: &TicketView) -> bool {
    let days = m.facts.config.ticket.reopen_within_days;
    days > 0
        && t.resolved_at
            .is_none_or(|at| m.now.saturating_sub(at) <= i64::from(days) * 86_400)
}

/// Rule 9's new ticket after the window: its first `system` entry (after
/// the message's own) names the old ticket, which the plan then names for
/// the store to note the new number on.
fn follow(m: &Message<'_>, old: &TicketView, plan: &mut Plan) {
    let config = m.facts.config;
    let days = old
        .resolved_at
        .map_or(0, |at| m.now.saturating_sub(at).max(0) / 86_400);
    let TicketTarget::New(new) = &plan.ticket else {
        return;
    };
    let entry = PlannedEntry {
        kind: EntryKind::System,
        author: from::helpdesk(config),
        by_agent: false,
        subject: new.subject.clone(),
        text: format!(
            "follows {}, resolved {days} days before this reply from {} \
             (beyond [ticket] reopen_within_days = {})",
            old.number, m.sender.address, config.ticket.reopen_within_days
        )
        .into(),
        html: None,
        keeps_attachments: false,
        message_id: None,
    };
    // Before any send points into the entries: the message's own stays first.
    let at = plan.entries.len().min(1);
    plan.entries.insert(at, entry);
    plan.follows = Some(Follows {
        id: old.id,
        subject: old.subject.clone(),
        sender: m.sender.address.clone(),
        days,
    });
}

fn contains(list: &[Mailbox], address: &str) -> bool {
    list.iter().any(|m| m.address == address)
}

fn push_unique(list: &mut Vec<Mailbox>, mailbox: Mailbox) {
    if !contains(list, &mailbox.address) {
        list.push(mailbox);
    }
}

fn add_agent(list: &mut Vec<String>, address: &str) {
    if !list.iter().any(|a| a == address) {
        list.push(address.to_string());
    }
}

#[cfg(test)]
mod tests;
