//! Decide: the helpdesk's rules as a pure function.
//!
//! From plain data — the envelope, the parsed message, the ticket it threads
//! to (if any), the configuration — to a plain [`Decision`]: which ticket,
//! which entries, which lists change, who receives what under which From.
//! No socket, no SQL, no clock: the time comes in as a value. This is where
//! a reader learns the rules of the SPEC, in its order, and where most unit
//! tests live.

use std::collections::BTreeSet;

use crate::config::{Config, Language};
use crate::helpdesk::{EntryKind, Envelope, QuarantineReason, SendKind, TicketState};
use crate::parse::{Inbound, Mailbox};

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
    /// Shared with the inbound message when it is its text: a long text is
    /// not copied once more.
    pub text: std::sync::Arc<str>,
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
    /// Agents who join the work-notes list of an existing ticket.
    pub join_work_notes: Vec<String>,
    pub sends: Vec<PlannedSend>,
    /// A delivery report about mail crmgate sent: the store marks that
    /// outbox row failed and tells the work-notes list.
    pub bounce: Option<Bounce>,
    /// The word logged for this message: comment, work_note, email, automatic…
    pub decision: &'static str,
}

/// What a delivery report says about one of our outbox rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    /// From the VERP envelope recipient or the returned message's headers.
    pub outbox_id: Option<i64>,
    /// Message-ID of the returned message, to find the row otherwise.
    pub original_message_id: Option<String>,
    pub failed_recipients: Vec<String>,
    pub diagnostic: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Quarantine(QuarantineReason),
    /// Already in the log: count it on that entry.
    Duplicate {
        entry_id: i64,
    },
    /// Refused by policy: `550 5.7.1` with this sentence.
    Refuse(String),
    Record(Box<Plan>),
}

/// What the rules read besides the message: configuration and history.
pub struct Facts<'a> {
    pub config: &'a Config,
    /// Addresses that were agents once and are no longer: never in a watch
    /// group, always scrubbed.
    pub former_agents: &'a BTreeSet<String>,
    /// Key of `reply_secret_file`, for our signed bounce addresses.
    pub reply_key: Option<&'a [u8]>,
}

impl Facts<'_> {
    fn is_crm_address(&self, address: &str) -> bool {
        let base = crate::thread::strip_tag(address);
        base == self.config.addresses.public || base == self.config.addresses.internal
    }

    fn is_agent_or_former(&self, address: &str) -> bool {
        self.config.agent(address).is_some() || self.former_agents.contains(address)
    }

    /// Addresses crmgate never sends to: its own, and robots that cannot read.
    fn never_send_to(&self, address: &str) -> bool {
        self.is_crm_address(address) || is_robot_address(address)
    }

    /// May this address be in a watch group?
    fn may_watch(&self, address: &str) -> bool {
        !self.is_agent_or_former(address) && !self.never_send_to(address)
    }
}

/// MAILER-DAEMON, postmaster and no-reply-like local parts.
pub fn is_robot_address(address: &str) -> bool {
    let local = address
        .rsplit_once('@')
        .map_or(address, |(l, _)| l)
        .to_ascii_lowercase();
    let squashed: String = local
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    matches!(local.as_str(), "mailer-daemon" | "postmaster")
        || squashed.starts_with("noreply")
        || squashed.starts_with("donotreply")
        || squashed.starts_with("nepasrepondre")
        || squashed == "bounce"
        || squashed == "bounces"
}

/// Which limit an outgoing message counts against (SPEC, "Limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// Mail written by a believed agent, and the e-mail function: never capped.
    Never,
    /// Receipts, closures and notices: per address per hour and per day.
    Automatic,
    /// A re-sent copy of non-agent mail: per recipient and ticket per hour,
    /// so two auto-responders without headers cannot ping-pong through us.
    Resend,
}

/// The cap an outgoing message of `kind` counts against.
pub fn cap(kind: SendKind, written_by_agent: bool) -> Cap {
    match kind {
        SendKind::Email => Cap::Never,
        SendKind::Receipt
        | SendKind::Closure
        | SendKind::ReplyAllNotice
        | SendKind::FailureNotice => Cap::Automatic,
        SendKind::PublicCopy | SendKind::AgentCopy | SendKind::WorkNote | SendKind::PartnerCopy => {
            if written_by_agent {
                Cap::Never
            } else {
                Cap::Resend
            }
        }
    }
}

impl SentCounts {
    /// The configured limits, in the same shape: the store counts no further.
    pub fn caps(config: &Config) -> SentCounts {
        SentCounts {
            automatic_last_hour: config.auto.max_per_address_per_hour,
            automatic_last_day: config.auto.max_per_address_per_day,
            resends_on_ticket_last_hour: config.auto.max_resends_per_ticket_hour,
        }
    }
}

/// Is one more message to an address within its cap, given what was
/// already sent to it (counted by the store)?
pub fn within_cap(config: &Config, cap: Cap, sent: SentCounts) -> bool {
    match cap {
        Cap::Never => true,
        Cap::Automatic => {
            sent.automatic_last_hour < config.auto.max_per_address_per_hour
                && sent.automatic_last_day < config.auto.max_per_address_per_day
        }
        Cap::Resend => sent.resends_on_ticket_last_hour < config.auto.max_resends_per_ticket_hour,
    }
}

/// What the store counted for one address (or, as caps, the limits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SentCounts {
    pub automatic_last_hour: u32,
    pub automatic_last_day: u32,
    pub resends_on_ticket_last_hour: u32,
}

/// Is this RCPT address one crmgate accepts? CRM addresses with or without
/// `+tag`, and postmaster at the hostname or a CRM address's domain
/// (RFC 5321 §4.5.1). Never a relay.
pub fn accepts_recipient(config: &Config, address: &str) -> bool {
    let address = address.trim().to_ascii_lowercase();
    let base = crate::thread::strip_tag(&address);
    if base == config.addresses.public || base == config.addresses.internal {
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
            domain == config.gateway.hostname
                || [&config.addresses.public, &config.addresses.internal]
                    .iter()
                    .any(|a| a.rsplit_once('@').is_some_and(|(_, d)| d == domain))
        }
        _ => false,
    }
}

/// Is the From of this message believed? The SMTP peer is a trusted relay,
/// or the top-most `Authentication-Results` of our own `authserv_id` says
/// `dmarc=pass` or a `dkim=pass` aligned with the From domain. Only the
/// top-most one of our id counts: our MTA adds its own above anything the
/// sender wrote, so a forged one can only stand below it.
pub fn from_is_believed(
    config: &Config,
    envelope: &Envelope,
    inbound: &Inbound,
    from: &str,
) -> bool {
    if config
        .security
        .trusted_relays
        .iter()
        .any(|net| net.contains(&envelope.peer))
    {
        return true;
    }
    let Some(id) = &config.security.authserv_id else {
        return false;
    };
    let Some(result) = inbound.auth_results.iter().find(|r| &r.authserv_id == id) else {
        return false;
    };
    let from_domain = from.rsplit_once('@').map_or("", |(_, d)| d);
    result.dmarc_pass
        || result
            .dkim_pass_domains
            .iter()
            .any(|d| !d.is_empty() && (from_domain == d || from_domain.ends_with(&format!(".{d}"))))
}

/// The sender as the rules see it: the From mailbox, else the envelope sender.
fn sender_of(envelope: &Envelope, inbound: &Inbound) -> Option<Mailbox> {
    inbound
        .from
        .clone()
        .filter(|m| !m.address.is_empty())
        .or_else(|| envelope.mail_from.as_deref().map(|a| Mailbox::new(None, a)))
}

/// Automatic mail (SPEC rule 4): header signals, an empty reverse-path, or
/// a MAILER-DAEMON/postmaster sender.
fn automatic_reason(
    envelope: &Envelope,
    inbound: &Inbound,
    sender: Option<&Mailbox>,
) -> Option<String> {
    if let Some(signal) = &inbound.auto {
        return Some(signal.describe());
    }
    if envelope.mail_from.is_none() {
        return Some("empty reverse-path".into());
    }
    for address in [
        envelope.mail_from.as_deref(),
        sender.map(|m| m.address.as_str()),
    ]
    .into_iter()
    .flatten()
    {
        let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
        if local.eq_ignore_ascii_case("mailer-daemon") || local.eq_ignore_ascii_case("postmaster") {
            return Some(format!("sender {address}"));
        }
    }
    None
}

fn display_name(mailbox: &Mailbox, config: &Config) -> String {
    let name = config
        .agent(&mailbox.address)
        .map(|a| a.name.clone())
        .filter(|n| !n.is_empty())
        .or_else(|| mailbox.name.clone())
        .unwrap_or_else(|| {
            mailbox
                .address
                .split('@')
                .next()
                .unwrap_or_default()
                .to_string()
        });
    format!("{name} via {}", config.gateway.display_name)
}

/// The display name of an agent's From that is not believed: marked, in
/// the helpdesk's language, so no agent takes it for a colleague's word.
fn unverified_name(mailbox: &Mailbox, config: &Config) -> String {
    let name = mailbox.name.as_deref().unwrap_or(&mailbox.address);
    let mark = unverified_mark(config.gateway.language);
    format!(
        "{name} ({mark}: {}) via {}",
        mailbox.address, config.gateway.display_name
    )
}

/// The mark itself (`"Jane Doe (expéditeur non vérifié: jane.doe@…) via
/// Soutien TI"`): part of the From that decide chooses, so it lives here.
fn unverified_mark(language: Language) -> &'static str {
    match language {
        Language::Fr => "expéditeur non vérifié",
        Language::En => "unverified sender",
    }
}

fn contains(list: &[Mailbox], address: &str) -> bool {
    list.iter().any(|m| m.address == address)
}

fn push_unique(list: &mut Vec<Mailbox>, mailbox: Mailbox) {
    if !contains(list, &mailbox.address) {
        list.push(mailbox);
    }
}

/// Decide what becomes of one parsed message, in the SPEC's order.
///
/// `ticket` is what threading found; `duplicate_of` the entry that already
/// holds this message, if the store found one.
pub fn decide(
    facts: &Facts<'_>,
    envelope: &Envelope,
    inbound: &Inbound,
    ticket: Option<&TicketView>,
    duplicate_of: Option<i64>,
) -> Decision {
    let config = facts.config;

    // 1. Loop: our own mail came back.
    if inbound
        .loop_hosts
        .iter()
        .any(|h| h.trim().eq_ignore_ascii_case(&config.gateway.hostname))
    {
        return Decision::Quarantine(QuarantineReason::Loop);
    }
    // 2. Duplicate: reply-all, or several deliveries of one message.
    if let Some(entry_id) = duplicate_of {
        return Decision::Duplicate { entry_id };
    }
    // Mail for the postmaster alone is for a human operator, not a ticket.
    if !envelope.rcpt_to.is_empty() && envelope.rcpt_to.iter().all(|r| is_postmaster(config, r)) {
        return Decision::Quarantine(QuarantineReason::Postmaster);
    }

    let sender = sender_of(envelope, inbound);
    // 4. Automatic mail: logged on its ticket, never re-emitted nor answered.
    if let Some(reason) = automatic_reason(envelope, inbound, sender.as_ref()) {
        return automatic(facts, envelope, inbound, ticket, sender, reason);
    }
    let Some(sender) = sender else {
        // No From and a null reverse-path is automatic above; this is a
        // message with no sender at all that is not automatic: nothing to
        // answer and nobody to thread it for.
        return Decision::Quarantine(QuarantineReason::Unparseable);
    };

    let agent = config.agent(&sender.address).is_some()
        && from_is_believed(config, envelope, inbound, &sender.address);

    // 5. Channel: the internal address anywhere makes a work note.
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
    if internal && !agent {
        return Decision::Refuse(format!(
            "Only the helpdesk's agents may write work notes to {}; write to {} instead",
            config.addresses.internal, config.addresses.public
        ));
    }

    let mut plan = Plan {
        ticket: match ticket {
            Some(t) => TicketTarget::Existing(t.id),
            None => TicketTarget::New(NewTicket {
                subject: String::new(),
                requesters: Vec::new(),
                watch_list: Vec::new(),
                work_notes_list: Vec::new(),
                owner: None,
            }),
        },
        entries: Vec::new(),
        state: None,
        join_work_notes: Vec::new(),
        sends: Vec::new(),
        bounce: None,
        decision: "comment",
    };
    let subject = crate::thread::clean_subject(&inbound.subject, &config.ticket.pattern);
    let inbound_entry = |kind: EntryKind, author: &Mailbox| PlannedEntry {
        kind,
        author: author.clone(),
        by_agent: agent,
        subject: subject.clone(),
        text: inbound.text.clone(),
        html: inbound.html.clone(),
        keeps_attachments: true,
        message_id: inbound.message_id.clone(),
    };

    match ticket {
        None => {
            let mut new = NewTicket {
                subject: if subject.is_empty() {
                    "(sans objet)".into()
                } else {
                    subject.clone()
                },
                requesters: Vec::new(),
                watch_list: Vec::new(),
                work_notes_list: config
                    .agents
                    .iter()
                    .filter(|a| a.default_notes_list)
                    .map(|a| a.email.clone())
                    .collect(),
                owner: None,
            };
            // 6. New ticket.
            let forward = inbound.forward.as_ref().filter(|f| {
                agent
                    && !internal
                    && facts.may_watch(&f.original_from.address)
                    && f.original_from.address != sender.address
            });
            if internal {
                // A new ticket by work note: no requester, no receipt.
                add_agent(&mut new.work_notes_list, &sender.address);
                new.owner = Some(sender.address.clone());
                plan.entries
                    .push(inbound_entry(EntryKind::WorkNote, &sender));
                plan.decision = "work_note";
            } else if let Some(forward) = forward {
                // An agent forwarded a requester's mail: the ticket is the requester's.
                new.requesters.push(forward.original_from.clone());
                if !forward.original_subject.trim().is_empty() {
                    new.subject = crate::thread::clean_subject(
                        &forward.original_subject,
                        &config.ticket.pattern,
                    );
                }
                add_agent(&mut new.work_notes_list, &sender.address);
                plan.entries.push(PlannedEntry {
                    kind: EntryKind::Comment,
                    author: forward.original_from.clone(),
                    by_agent: false,
                    subject: new.subject.clone(),
                    text: forward.original_text.as_str().into(),
                    html: None,
                    keeps_attachments: true,
                    message_id: inbound.message_id.clone(),
                });
                if !forward.agent_text.trim().is_empty() {
                    plan.entries.push(PlannedEntry {
                        kind: EntryKind::WorkNote,
                        author: sender.clone(),
                        by_agent: true,
                        subject: new.subject.clone(),
                        text: forward.agent_text.as_str().into(),
                        html: None,
                        keeps_attachments: false,
                        message_id: None,
                    });
                }
                plan.decision = "forward";
            } else if agent {
                // An agent opens a ticket for nobody in particular: theirs.
                add_agent(&mut new.work_notes_list, &sender.address);
                new.owner = Some(sender.address.clone());
                plan.entries
                    .push(inbound_entry(EntryKind::Comment, &sender));
            } else {
                // An outsider opens a ticket for themselves. An agent's From
                // that is not believed (a forgery, or an agent writing from
                // an unauthenticated path), a former agent or a CRM address
                // is an outsider too, but never joins a watch group: the
                // ticket then has no requester.
                if !facts.is_agent_or_former(&sender.address)
                    && !facts.is_crm_address(&sender.address)
                {
                    new.requesters.push(sender.clone());
                }
                plan.entries
                    .push(inbound_entry(EntryKind::Comment, &sender));
            }
            if config.watch.add_cc_on_open && !internal {
                for m in inbound.to.iter().chain(&inbound.cc) {
                    if facts.may_watch(&m.address)
                        && !contains(&new.requesters, &m.address)
                        && m.address != sender.address
                    {
                        push_unique(&mut new.watch_list, m.clone());
                    }
                }
            }
            let view = TicketView {
                id: 0,
                number: String::new(),
                subject: new.subject.clone(),
                state: TicketState::New,
                owner: new.owner.clone(),
                requesters: new.requesters.clone(),
                watch_list: new.watch_list.clone(),
                work_notes_list: new.work_notes_list.clone(),
                thread: Vec::new(),
            };
            plan_sends(facts, inbound, &view, &sender, agent, &mut plan);
            if plan.decision == "forward" {
                // The requester gets only the receipt: drop the public copy.
                plan.sends.retain(|s| s.kind != SendKind::PublicCopy);
            }
            plan_receipt(facts, envelope, inbound, &sender, agent, &new, &mut plan);
            plan.ticket = TicketTarget::New(new);
        }
        Some(t) => {
            let in_watch_group = contains(&t.requesters, &sender.address)
                || contains(&t.watch_list, &sender.address);
            let kind = if internal {
                plan.decision = "work_note";
                EntryKind::WorkNote
            } else if agent || in_watch_group {
                EntryKind::Comment
            } else {
                // A partner, or a stranger who guessed a ticket number: the
                // agents only, never the watch group.
                plan.decision = "email";
                EntryKind::Email
            };
            plan.entries.push(inbound_entry(kind, &sender));
            if agent && !t.work_notes_list.contains(&sender.address) {
                plan.join_work_notes.push(sender.address.clone());
            }
            // 9. State.
            let agent_on_new = agent && t.state == TicketState::New;
            let requester_reopens = !agent
                && kind == EntryKind::Comment
                && t.state == TicketState::Resolved
                && config.ticket.reopen_on_reply
                && contains(&t.requesters, &sender.address);
            if agent_on_new || requester_reopens {
                plan.state = Some(TicketState::Open);
            }
            plan_sends(facts, inbound, t, &sender, agent, &mut plan);
        }
    }
    if agent && plan.state.is_none() {
        if let TicketTarget::New(_) = plan.ticket {
            // An agent's entry moves `new` to `open`; the store creates the
            // ticket in the state the plan says.
            plan.state = Some(TicketState::Open);
        }
    }
    Decision::Record(Box::new(plan))
}

fn add_agent(list: &mut Vec<String>, address: &str) {
    if !list.iter().any(|a| a == address) {
        list.push(address.to_string());
    }
}

/// 7 and 8: who receives the message of `plan.entries[0]`, under which From.
fn plan_sends(
    facts: &Facts<'_>,
    inbound: &Inbound,
    ticket: &TicketView,
    sender: &Mailbox,
    agent: bool,
    plan: &mut Plan,
) {
    let config = facts.config;
    let Some(entry) = plan.entries.first() else {
        return;
    };
    // An agent's From that is not believed: a forgery, or the agent writing
    // from a path that does not authenticate. The agents see it marked, and
    // the agent named gets the copy too, so a forgery does not go unnoticed.
    let unverified = !agent && config.agent(&sender.address).is_some();
    // Those who had the inbound message directly: the reply-all duplicate.
    let had_it: BTreeSet<&str> = inbound
        .to
        .iter()
        .chain(&inbound.cc)
        .map(|m| m.address.as_str())
        .chain((!unverified).then_some(sender.address.as_str()))
        .collect();
    let envelope_of = |addresses: Vec<&str>| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for a in addresses {
            if !had_it.contains(a) && !facts.never_send_to(a) && !out.iter().any(|o| o == a) {
                out.push(a.to_string());
            }
        }
        out
    };
    let author = &entry.author;
    let from_name = match unverified && author.address == sender.address {
        true => unverified_name(author, config),
        false => display_name(author, config),
    };
    let mut notes_list: Vec<String> = ticket.work_notes_list.clone();
    for a in &plan.join_work_notes {
        add_agent(&mut notes_list, a);
    }
    let notes_boxes: Vec<Mailbox> = notes_list
        .iter()
        .map(|a| Mailbox::new(config.agent(a).map(|x| x.name.as_str()), a))
        .collect();
    let agents_send = |kind: SendKind, from_address: &str| PlannedSend {
        kind,
        entry: 0,
        from_name: from_name.clone(),
        from_address: from_address.to_string(),
        to: notes_boxes.clone(),
        cc: Vec::new(),
        envelope: envelope_of(notes_list.iter().map(String::as_str).collect()),
        agents_only: true,
    };
    match entry.kind {
        EntryKind::WorkNote => {
            plan.sends
                .push(agents_send(SendKind::WorkNote, &config.addresses.internal));
        }
        EntryKind::Email => {
            plan.sends
                .push(agents_send(SendKind::PartnerCopy, &config.addresses.public));
        }
        EntryKind::Comment => {
            let requesters: Vec<Mailbox> = ticket
                .requesters
                .iter()
                .filter(|m| facts.may_watch(&m.address))
                .cloned()
                .collect();
            let watch: Vec<Mailbox> = ticket
                .watch_list
                .iter()
                .filter(|m| facts.may_watch(&m.address) && !contains(&requesters, &m.address))
                .cloned()
                .collect();
            let group: Vec<&str> = requesters
                .iter()
                .chain(&watch)
                .map(|m| m.address.as_str())
                .collect();
            plan.sends.push(PlannedSend {
                kind: SendKind::PublicCopy,
                entry: 0,
                from_name: from_name.clone(),
                from_address: config.addresses.public.clone(),
                to: requesters.clone(),
                cc: watch.clone(),
                envelope: envelope_of(group),
                agents_only: false,
            });
            plan.sends
                .push(agents_send(SendKind::AgentCopy, &config.addresses.public));
            // 8. Reply-all guard: the agent wrote to requesters directly.
            if agent
                && inbound.to.iter().chain(&inbound.cc).any(|m| {
                    !facts.is_crm_address(&m.address) && !facts.is_agent_or_former(&m.address)
                })
            {
                plan.sends.push(PlannedSend {
                    kind: SendKind::ReplyAllNotice,
                    entry: 0,
                    from_name: config.gateway.display_name.clone(),
                    from_address: config.addresses.public.clone(),
                    to: vec![sender.clone()],
                    cc: Vec::new(),
                    envelope: vec![sender.address.clone()],
                    agents_only: true,
                });
            }
        }
        _ => {}
    }
    // A message with nobody to send to is not queued.
    plan.sends.retain(|s| !s.envelope.is_empty());
}

/// Receipt confirmation of a ticket opened by mail, without backscatter.
fn plan_receipt(
    facts: &Facts<'_>,
    envelope: &Envelope,
    inbound: &Inbound,
    sender: &Mailbox,
    agent: bool,
    new: &NewTicket,
    plan: &mut Plan,
) {
    let config = facts.config;
    let forwarded = plan.decision == "forward";
    let wanted = match config.auto.receipt {
        crate::config::ReceiptPolicy::All => !plan.entries.is_empty(),
        crate::config::ReceiptPolicy::Forward => forwarded,
        crate::config::ReceiptPolicy::None => false,
    };
    if !wanted || new.requesters.is_empty() || inbound.spam_flag {
        return;
    }
    let Some(mail_from) = envelope.mail_from.as_deref() else {
        return;
    };
    // A From that the envelope does not back is how backscatter starts;
    // a believed agent's forward is the one exception.
    let backed = crate::thread::strip_tag(mail_from).eq_ignore_ascii_case(&sender.address);
    let agent_forward = forwarded && agent;
    if !(backed || agent_forward) {
        return;
    }
    let recipients: Vec<Mailbox> = new
        .requesters
        .iter()
        .filter(|m| !facts.never_send_to(&m.address) && !facts.is_agent_or_former(&m.address))
        .cloned()
        .collect();
    if recipients.is_empty() {
        return;
    }
    plan.entries.push(PlannedEntry {
        kind: EntryKind::Receipt,
        author: Mailbox::new(Some(&config.gateway.display_name), &config.addresses.public),
        by_agent: false,
        subject: new.subject.clone(),
        text: "".into(),
        html: None,
        keeps_attachments: false,
        message_id: None,
    });
    plan.sends.push(PlannedSend {
        kind: SendKind::Receipt,
        entry: plan.entries.len() - 1,
        from_name: config.gateway.display_name.clone(),
        from_address: config.addresses.public.clone(),
        envelope: recipients.iter().map(|m| m.address.clone()).collect(),
        to: recipients,
        cc: Vec::new(),
        agents_only: false,
    });
}

/// Rule 4: automatic mail becomes a `system` entry on the ticket it names,
/// or goes to the quarantine; a delivery report about our mail is a bounce.
fn automatic(
    facts: &Facts<'_>,
    envelope: &Envelope,
    inbound: &Inbound,
    ticket: Option<&TicketView>,
    sender: Option<Mailbox>,
    reason: String,
) -> Decision {
    let config = facts.config;
    let verp = envelope.rcpt_to.iter().find_map(|r| {
        crate::thread::parse_bounce_address(r, &config.addresses.public, facts.reply_key)
    });
    let bounce = inbound.report.as_ref().map(|report| Bounce {
        outbox_id: verp,
        original_message_id: report.original_message_id.clone(),
        failed_recipients: report.failed_recipients.clone(),
        diagnostic: report.diagnostic.clone(),
    });
    let Some(ticket) = ticket else {
        return Decision::Quarantine(QuarantineReason::Automatic);
    };
    let author = sender.unwrap_or_else(|| Mailbox::new(Some("MAILER-DAEMON"), "mailer-daemon"));
    Decision::Record(Box::new(Plan {
        ticket: TicketTarget::Existing(ticket.id),
        entries: vec![PlannedEntry {
            kind: EntryKind::System,
            author,
            by_agent: false,
            subject: inbound.subject.clone(),
            text: format!(
                "Automatic mail ({reason}), not re-sent.\n\n{}",
                inbound.text
            )
            .into(),
            html: None,
            keeps_attachments: false,
            message_id: inbound.message_id.clone(),
        }],
        state: None,
        join_work_notes: Vec::new(),
        sends: Vec::new(),
        bounce,
        decision: "automatic",
    }))
}

/// An agent publishes from the CRM (`crmgate ticket comment|work-note`):
/// the same entry and the same mail as if the agent had written by mail.
pub fn publish(
    facts: &Facts<'_>,
    ticket: &TicketView,
    agent: &Mailbox,
    kind: EntryKind,
    text: &str,
) -> Plan {
    let mut plan = Plan {
        ticket: TicketTarget::Existing(ticket.id),
        entries: vec![PlannedEntry {
            kind,
            author: agent.clone(),
            by_agent: true,
            subject: ticket.subject.clone(),
            text: text.into(),
            html: None,
            keeps_attachments: false,
            message_id: None,
        }],
        state: (ticket.state == TicketState::New).then_some(TicketState::Open),
        join_work_notes: if ticket.work_notes_list.contains(&agent.address) {
            Vec::new()
        } else {
            vec![agent.address.clone()]
        },
        sends: Vec::new(),
        bounce: None,
        decision: if kind == EntryKind::WorkNote {
            "work_note"
        } else {
            "comment"
        },
    };
    // Published from the CRM: nobody had it directly.
    let inbound = Inbound {
        from: Some(agent.clone()),
        ..Inbound::default()
    };
    plan_sends(facts, &inbound, ticket, agent, true, &mut plan);
    plan
}

/// A ticket set to resolved: a closure entry, and the closure notice to the
/// watch group when `[auto] closure` is on.
pub fn resolve(facts: &Facts<'_>, ticket: &TicketView) -> Plan {
    let config = facts.config;
    let system = Mailbox::new(Some(&config.gateway.display_name), &config.addresses.public);
    let group: Vec<Mailbox> = ticket
        .requesters
        .iter()
        .chain(&ticket.watch_list)
        .filter(|m| facts.may_watch(&m.address))
        .cloned()
        .collect();
    let mut plan = Plan {
        ticket: TicketTarget::Existing(ticket.id),
        entries: vec![PlannedEntry {
            kind: EntryKind::Closure,
            author: system,
            by_agent: false,
            subject: ticket.subject.clone(),
            text: "".into(),
            html: None,
            keeps_attachments: false,
            message_id: None,
        }],
        state: Some(TicketState::Resolved),
        join_work_notes: Vec::new(),
        sends: Vec::new(),
        bounce: None,
        decision: "closure",
    };
    if config.auto.closure && !group.is_empty() {
        let requesters: Vec<Mailbox> = group
            .iter()
            .filter(|m| contains(&ticket.requesters, &m.address))
            .cloned()
            .collect();
        let watch: Vec<Mailbox> = group
            .iter()
            .filter(|m| !contains(&requesters, &m.address))
            .cloned()
            .collect();
        plan.sends.push(PlannedSend {
            kind: SendKind::Closure,
            entry: 0,
            from_name: config.gateway.display_name.clone(),
            from_address: config.addresses.public.clone(),
            envelope: group.iter().map(|m| m.address.clone()).collect(),
            to: requesters,
            cc: watch,
            agents_only: false,
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::AuthResult;

    const AGENT: &str = "jane.doe@example.org";
    const AGENT2: &str = "bob.agent@example.org";

    fn config() -> Config {
        Config::from_toml(
            r#"
[gateway]
hostname = "crm.example.org"
[addresses]
public = "support@example.org"
internal = "support-notes@example.org"
[security]
trusted_relays = ["10.0.0.0/8"]
authserv_id = "mx.example.org"
[[agents]]
name = "Jane Doe"
email = "Jane.Doe@example.org"
default_notes_list = true
[[agents]]
name = "Bob Agent"
email = "bob.agent@example.org"
default_notes_list = true
"#,
            "test",
        )
        .unwrap()
    }

    fn envelope(from: &str, rcpt: &[&str], trusted: bool) -> Envelope {
        Envelope {
            peer: if trusted {
                [10, 0, 0, 5].into()
            } else {
                [192, 0, 2, 1].into()
            },
            helo: "client".into(),
            mail_from: Some(from.into()),
            rcpt_to: rcpt.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn mail(from: &str, to: &[&str], cc: &[&str], subject: &str) -> Inbound {
        Inbound {
            from: Some(Mailbox::new(None, from)),
            to: to.iter().map(|a| Mailbox::new(None, a)).collect(),
            cc: cc.iter().map(|a| Mailbox::new(None, a)).collect(),
            subject: subject.into(),
            message_id: Some(format!("{}@client", subject.len())),
            text: "Bonjour".into(),
            body_hash: "h".into(),
            ..Inbound::default()
        }
    }

    fn ticket() -> TicketView {
        TicketView {
            id: 7,
            number: "TKT0000007".into(),
            subject: "Imprimante".into(),
            state: TicketState::Open,
            owner: Some(AGENT.into()),
            requesters: vec![Mailbox::new(Some("Alice"), "alice@u.example")],
            watch_list: vec![Mailbox::new(None, "carol@u.example")],
            work_notes_list: vec![AGENT.into(), AGENT2.into()],
            thread: Vec::new(),
        }
    }

    fn run(env: &Envelope, inbound: &Inbound, t: Option<&TicketView>) -> Decision {
        let config = config();
        let former = BTreeSet::from(["old.agent@example.org".to_string()]);
        let facts = Facts {
            config: &config,
            former_agents: &former,
            reply_key: None,
        };
        decide(&facts, env, inbound, t, None)
    }

    fn plan(d: Decision) -> Plan {
        match d {
            Decision::Record(p) => *p,
            other => panic!("expected a plan, got {other:?}"),
        }
    }

    fn send(p: &Plan, kind: SendKind) -> &PlannedSend {
        p.sends
            .iter()
            .find(|s| s.kind == kind)
            .unwrap_or_else(|| panic!("no {kind:?} in {:?}", p.sends))
    }

    #[test]
    fn recipients_accepted_are_crm_addresses_and_postmaster_only() {
        let c = config();
        for ok in [
            "support@example.org",
            "SUPPORT+TKT0000001@example.org",
            "support-notes@example.org",
            "postmaster@crm.example.org",
            "postmaster@example.org",
            "postmaster",
        ] {
            assert!(accepts_recipient(&c, ok), "{ok}");
        }
        for no in [
            "alice@u.example",
            "support@other.org",
            "postmaster@other.org",
            "supportx@example.org",
        ] {
            assert!(!accepts_recipient(&c, no), "{no}");
        }
    }

    #[test]
    fn a_requester_opens_a_ticket_with_cc_on_the_watch_list_and_a_receipt() {
        let env = envelope("alice@u.example", &["support@example.org"], false);
        let inbound = mail(
            "alice@u.example",
            &["support@example.org"],
            &["carol@u.example", AGENT, "support+tkt@example.org"],
            "Imprimante",
        );
        let p = plan(run(&env, &inbound, None));
        let TicketTarget::New(new) = &p.ticket else {
            panic!()
        };
        assert_eq!(new.requesters[0].address, "alice@u.example");
        assert_eq!(
            new.watch_list
                .iter()
                .map(|m| m.address.as_str())
                .collect::<Vec<_>>(),
            ["carol@u.example"]
        );
        assert_eq!(new.work_notes_list, [AGENT, AGENT2]);
        assert_eq!(p.entries[0].kind, EntryKind::Comment);
        let receipt = send(&p, SendKind::Receipt);
        assert_eq!(receipt.envelope, ["alice@u.example"]);
        // The agent copy goes to the agents who did not have it directly.
        assert_eq!(send(&p, SendKind::AgentCopy).envelope, [AGENT2]);
        // Carol was in Cc: no public copy for her, and nobody else.
        assert!(p.sends.iter().all(|s| s.kind != SendKind::PublicCopy));
    }

    #[test]
    fn an_agents_comment_reaches_the_watch_group_under_the_helpdesk_name() {
        let env = envelope(AGENT, &["support@example.org"], true);
        let inbound = mail(
            AGENT,
            &["support@example.org"],
            &[],
            "RE: [TKT0000007] Imprimante",
        );
        let t = ticket();
        let p = plan(run(&env, &inbound, Some(&t)));
        let public = send(&p, SendKind::PublicCopy);
        assert_eq!(public.from_name, "Jane Doe via Soutien TI");
        assert_eq!(public.from_address, "support@example.org");
        assert_eq!(public.envelope, ["alice@u.example", "carol@u.example"]);
        assert!(!public.agents_only);
        assert_eq!(send(&p, SendKind::AgentCopy).envelope, [AGENT2]);
        assert!(p.sends.iter().all(|s| s.kind != SendKind::ReplyAllNotice));
    }

    #[test]
    fn a_work_note_reaches_only_the_other_agents() {
        let env = envelope(AGENT, &["support-notes@example.org"], true);
        let inbound = mail(
            AGENT,
            &["support-notes@example.org"],
            &[],
            "[TKT0000007] note",
        );
        let p = plan(run(&env, &inbound, Some(&ticket())));
        assert_eq!(p.entries[0].kind, EntryKind::WorkNote);
        assert_eq!(p.sends.len(), 1);
        assert_eq!(p.sends[0].kind, SendKind::WorkNote);
        assert_eq!(p.sends[0].from_address, "support-notes@example.org");
        assert_eq!(p.sends[0].envelope, [AGENT2]);
    }

    #[test]
    fn a_work_note_from_an_outsider_or_an_unbelieved_agent_is_refused() {
        let inbound = mail(
            "mallory@evil.example",
            &["support-notes@example.org"],
            &[],
            "[TKT0000007] x",
        );
        let env = envelope("mallory@evil.example", &["support-notes@example.org"], true);
        assert!(matches!(
            run(&env, &inbound, Some(&ticket())),
            Decision::Refuse(_)
        ));
        // The agent's From from an untrusted peer, no Authentication-Results.
        let inbound = mail(AGENT, &["support-notes@example.org"], &[], "[TKT0000007] x");
        let env = envelope(AGENT, &["support-notes@example.org"], false);
        assert!(matches!(
            run(&env, &inbound, Some(&ticket())),
            Decision::Refuse(_)
        ));
        // Internal address only in Cc, envelope to the public one: still a work note.
        let inbound = mail(
            "mallory@evil.example",
            &["support@example.org"],
            &["support-notes@example.org"],
            "x",
        );
        let env = envelope("mallory@evil.example", &["support@example.org"], false);
        assert!(matches!(run(&env, &inbound, None), Decision::Refuse(_)));
    }

    #[test]
    fn authentication_results_of_our_authserv_make_an_agent_believed() {
        let env = envelope(AGENT, &["support-notes@example.org"], false);
        let mut inbound = mail(AGENT, &["support-notes@example.org"], &[], "[TKT0000007] x");
        inbound.auth_results = vec![AuthResult {
            authserv_id: "mx.example.org".into(),
            dmarc_pass: false,
            dkim_pass_domains: vec!["example.org".into()],
        }];
        assert!(matches!(
            run(&env, &inbound, Some(&ticket())),
            Decision::Record(_)
        ));
        // Another authserv-id, or a non-aligned DKIM domain: not believed.
        inbound.auth_results[0].authserv_id = "evil.example".into();
        assert!(matches!(
            run(&env, &inbound, Some(&ticket())),
            Decision::Refuse(_)
        ));
        inbound.auth_results[0] = AuthResult {
            authserv_id: "mx.example.org".into(),
            dmarc_pass: false,
            dkim_pass_domains: vec!["evil.example".into()],
        };
        assert!(matches!(
            run(&env, &inbound, Some(&ticket())),
            Decision::Refuse(_)
        ));
        // A forged pass below our MTA's own failing result does not count.
        inbound.auth_results = vec![
            AuthResult {
                authserv_id: "mx.example.org".into(),
                dmarc_pass: false,
                dkim_pass_domains: vec![],
            },
            AuthResult {
                authserv_id: "mx.example.org".into(),
                dmarc_pass: true,
                dkim_pass_domains: vec![],
            },
        ];
        assert!(matches!(
            run(&env, &inbound, Some(&ticket())),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn a_stranger_on_an_existing_ticket_reaches_the_agents_only() {
        let env = envelope("stranger@else.example", &["support@example.org"], false);
        let inbound = mail(
            "stranger@else.example",
            &["support@example.org"],
            &[],
            "[TKT0000007] hello",
        );
        let p = plan(run(&env, &inbound, Some(&ticket())));
        assert_eq!(p.entries[0].kind, EntryKind::Email);
        assert_eq!(p.sends.len(), 1);
        assert_eq!(p.sends[0].kind, SendKind::PartnerCopy);
        assert!(p.sends[0].agents_only);
        assert_eq!(p.sends[0].envelope, [AGENT, AGENT2]);
    }

    #[test]
    fn a_requesters_reply_all_gives_the_ccd_watcher_no_second_copy() {
        let env = envelope("alice@u.example", &["support@example.org"], false);
        let inbound = mail(
            "alice@u.example",
            &["support@example.org"],
            &["carol@u.example"],
            "RE: [TKT0000007] x",
        );
        let p = plan(run(&env, &inbound, Some(&ticket())));
        // Alice is the sender and Carol had it in Cc: nobody left in the public envelope.
        assert!(p.sends.iter().all(|s| s.kind != SendKind::PublicCopy));
        let public_headers_would_show = ticket().watch_list;
        assert_eq!(public_headers_would_show[0].address, "carol@u.example");
    }

    #[test]
    fn an_agent_who_replied_to_all_gets_a_notice() {
        let env = envelope(AGENT, &["support@example.org"], true);
        let inbound = mail(
            AGENT,
            &["support@example.org", "alice@u.example"],
            &[],
            "RE: [TKT0000007] x",
        );
        let p = plan(run(&env, &inbound, Some(&ticket())));
        let notice = send(&p, SendKind::ReplyAllNotice);
        assert_eq!(notice.envelope, [AGENT]);
        // Alice had it directly; Carol did not.
        assert_eq!(send(&p, SendKind::PublicCopy).envelope, ["carol@u.example"]);
    }

    #[test]
    fn loop_duplicate_automatic_in_that_order() {
        let config = config();
        let env = envelope("alice@u.example", &["support@example.org"], false);
        let mut inbound = mail("alice@u.example", &["support@example.org"], &[], "x");
        inbound.loop_hosts = vec!["CRM.example.org".into()];
        assert_eq!(
            run(&env, &inbound, None),
            Decision::Quarantine(QuarantineReason::Loop)
        );
        inbound.loop_hosts.clear();
        let former = BTreeSet::new();
        let facts = Facts {
            config: &config,
            former_agents: &former,
            reply_key: None,
        };
        assert_eq!(
            decide(&facts, &env, &inbound, None, Some(3)),
            Decision::Duplicate { entry_id: 3 }
        );
        inbound.auto = Some(crate::parse::AutoSignal::AutoSubmitted(
            "auto-replied".into(),
        ));
        assert_eq!(
            run(&env, &inbound, None),
            Decision::Quarantine(QuarantineReason::Automatic)
        );
        let p = plan(run(&env, &inbound, Some(&ticket())));
        assert_eq!(p.entries[0].kind, EntryKind::System);
        assert!(p.sends.is_empty());
        // A null reverse-path is automatic too.
        inbound.auto = None;
        let mut bounce_env = env.clone();
        bounce_env.mail_from = None;
        assert_eq!(
            run(&bounce_env, &inbound, None),
            Decision::Quarantine(QuarantineReason::Automatic)
        );
    }

    #[test]
    fn an_agents_forward_opens_the_ticket_for_the_original_sender() {
        let env = envelope(AGENT, &["support@example.org"], true);
        let mut inbound = mail(AGENT, &["support@example.org"], &[], "TR: Imprimante");
        inbound.forward = Some(crate::parse::Forward {
            original_from: Mailbox::new(Some("Alice"), "alice@u.example"),
            original_subject: "Imprimante".into(),
            original_text: "Elle ne marche plus".into(),
            agent_text: "Peux-tu regarder ?".into(),
        });
        let p = plan(run(&env, &inbound, None));
        let TicketTarget::New(new) = &p.ticket else {
            panic!()
        };
        assert_eq!(new.requesters[0].address, "alice@u.example");
        assert_eq!(p.entries[0].kind, EntryKind::Comment);
        assert_eq!(p.entries[0].author.address, "alice@u.example");
        assert_eq!(p.entries[1].kind, EntryKind::WorkNote);
        // The requester gets the receipt and nothing else.
        let to_alice: Vec<_> = p
            .sends
            .iter()
            .filter(|s| s.envelope.iter().any(|a| a == "alice@u.example"))
            .collect();
        assert_eq!(to_alice.len(), 1);
        assert_eq!(to_alice[0].kind, SendKind::Receipt);
    }

    #[test]
    fn an_agent_without_forward_opens_an_owned_ticket_without_requester() {
        let env = envelope(AGENT, &["support@example.org"], true);
        let inbound = mail(AGENT, &["support@example.org"], &[], "Fwd: Serveur");
        let p = plan(run(&env, &inbound, None));
        let TicketTarget::New(new) = &p.ticket else {
            panic!()
        };
        assert!(new.requesters.is_empty());
        assert_eq!(new.owner.as_deref(), Some(AGENT));
        assert_eq!(p.state, Some(TicketState::Open));
        assert!(p.sends.iter().all(|s| s.kind != SendKind::Receipt));
    }

    #[test]
    fn no_receipt_without_a_backed_sender() {
        let inbound = mail("alice@u.example", &["support@example.org"], &[], "x");
        let env = envelope("someone-else@u.example", &["support@example.org"], false);
        let p = plan(run(&env, &inbound, None));
        assert!(p.sends.iter().all(|s| s.kind != SendKind::Receipt));
        let mut spam = inbound.clone();
        spam.spam_flag = true;
        let p = plan(run(
            &envelope("alice@u.example", &["support@example.org"], false),
            &spam,
            None,
        ));
        assert!(p.sends.iter().all(|s| s.kind != SendKind::Receipt));
    }

    #[test]
    fn a_requesters_reply_reopens_a_resolved_ticket() {
        let mut t = ticket();
        t.state = TicketState::Resolved;
        let env = envelope("alice@u.example", &["support@example.org"], false);
        let p = plan(run(
            &env,
            &mail(
                "alice@u.example",
                &["support@example.org"],
                &[],
                "RE: [TKT0000007]",
            ),
            Some(&t),
        ));
        assert_eq!(p.state, Some(TicketState::Open));
    }

    #[test]
    fn an_unbelieved_agent_comment_is_marked_and_reaches_the_agent_named() {
        let env = envelope(AGENT, &["support@example.org"], false);
        let mut inbound = mail(AGENT, &["support@example.org"], &[], "RE: [TKT0000007]");
        inbound.from = Some(Mailbox::new(Some("Jane Doe"), AGENT));
        let p = plan(run(&env, &inbound, Some(&ticket())));
        assert_eq!(p.entries[0].kind, EntryKind::Email);
        let copy = send(&p, SendKind::PartnerCopy);
        assert_eq!(
            copy.from_name,
            "Jane Doe (expéditeur non vérifié: jane.doe@example.org) via Soutien TI"
        );
        assert_eq!(copy.envelope, [AGENT, AGENT2], "Jane learns of it too");
        // The same mail believed (trusted peer): a comment, unmarked, and
        // Jane does not get her own words back.
        let p = plan(run(
            &envelope(AGENT, &["support@example.org"], true),
            &inbound,
            Some(&ticket()),
        ));
        let copy = send(&p, SendKind::AgentCopy);
        assert_eq!(copy.from_name, "Jane Doe via Soutien TI");
        assert_eq!(copy.envelope, [AGENT2]);
    }

    #[test]
    fn an_unbelieved_agent_from_opening_a_ticket_is_no_requester() {
        // Found by tests/properties.rs: a forged agent From (untrusted peer,
        // no Authentication-Results) opened a ticket with the agent as its
        // requester, i.e. in the watch group.
        for from in [AGENT, "old.agent@example.org", "support@example.org"] {
            let env = envelope("other@else.example", &["support@example.org"], false);
            let inbound = mail(from, &["support@example.org"], &[], "Imprimante");
            let p = plan(run(&env, &inbound, None));
            let TicketTarget::New(new) = &p.ticket else {
                panic!()
            };
            assert!(new.requesters.is_empty(), "{from}: {:?}", new.requesters);
            assert_eq!(p.entries[0].kind, EntryKind::Comment);
            assert!(!p.entries[0].by_agent);
            assert!(p.sends.iter().all(|s| s.agents_only), "{:?}", p.sends);
        }
    }

    #[test]
    fn watch_groups_never_hold_agents_former_agents_or_crm_addresses() {
        let env = envelope("alice@u.example", &["support@example.org"], false);
        let inbound = mail(
            "alice@u.example",
            &["support@example.org", "old.agent@example.org"],
            &[
                "Jane.Doe@example.org",
                "support+x@example.org",
                "mailer-daemon@u.example",
                "noreply@u.example",
            ],
            "x",
        );
        let p = plan(run(&env, &inbound, None));
        let TicketTarget::New(new) = &p.ticket else {
            panic!()
        };
        assert!(new.watch_list.is_empty(), "{:?}", new.watch_list);
    }
}
