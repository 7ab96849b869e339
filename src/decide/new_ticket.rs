//! Rule 6, New ticket: who the ticket is for, who watches it, which
//! agents see its work notes, and what its first entries are.

use super::{
    add_agent, contains, push_unique, Channel, Message, NewTicket, Plan, PlannedEntry, Recorded,
    TicketTarget,
};
use crate::helpdesk::EntryKind;
use crate::parse::{Forward, Mailbox};

/// How a message opens a ticket: it decides the requester, the first
/// entries and the answer (the receipt, `reemit::answer_opening`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opening {
    /// By work note: no requester, no receipt; the agent owns it.
    WorkNote,
    /// An agent forwarded a requester's mail: the ticket is the requester's.
    Forward,
    /// An agent opens a ticket for nobody in particular: theirs.
    Agent,
    /// An outsider opens a ticket for themselves.
    Outsider,
}

impl Opening {
    fn recorded(self) -> Recorded {
        match self {
            Opening::WorkNote => Recorded::WorkNote,
            Opening::Forward => Recorded::Forward,
            Opening::Agent | Opening::Outsider => Recorded::Comment,
        }
    }
}

/// Rule 6, New ticket: requester = sender (or a believed agent's forward's
/// original sender), the other To/Cc join the watch list
/// (`add_cc_on_open`), agents with `default_notes_list` join the
/// work-notes list.
pub(super) fn new_ticket(m: &Message<'_>, channel: Channel) -> (Plan, Opening) {
    let config = m.facts.config;
    let mut new = NewTicket {
        subject: if m.subject.is_empty() {
            "(sans objet)".into()
        } else {
            m.subject.clone()
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
    let (opening, entries) = match (channel, forward(m)) {
        (Channel::WorkNote, _) => {
            add_agent(&mut new.work_notes_list, &m.sender.address);
            new.owner = Some(m.sender.address.clone());
            let entries = vec![m.entry(EntryKind::WorkNote, &m.sender)];
            (Opening::WorkNote, entries)
        }
        (_, Some(forward)) => (Opening::Forward, forwarded(m, forward, &mut new)),
        _ if m.agent => {
            add_agent(&mut new.work_notes_list, &m.sender.address);
            new.owner = Some(m.sender.address.clone());
            (Opening::Agent, vec![m.entry(EntryKind::Comment, &m.sender)])
        }
        _ => {
            // An agent's From that is not believed (a forgery, or an agent
            // writing from an unauthenticated path), a former agent or a
            // CRM address is an outsider too, but never joins a watch
            // group: the ticket then has no requester.
            let f = m.facts;
            if !f.is_agent_or_former(&m.sender.address) && !f.is_crm_address(&m.sender.address) {
                new.requesters.push(m.sender.clone());
            }
            (
                Opening::Outsider,
                vec![m.entry(EntryKind::Comment, &m.sender)],
            )
        }
    };
    let mut entries = entries;
    if config.watch.add_cc_on_open && opening != Opening::WorkNote {
        if let Some(note) = watch_the_opening_mail(m, &mut new) {
            entries.push(note);
        }
    }
    let plan = Plan {
        ticket: TicketTarget::New(new),
        entries,
        state: None,
        join_work_notes: Vec::new(),
        sends: Vec::new(),
        bounce: None,
        decision: opening.recorded(),
        follows: None,
    };
    (plan, opening)
}

/// The forward that opens the ticket for its original sender: a believed
/// agent's, not a work note, of someone who may be in a watch group and is
/// not the agent.
fn forward<'a>(m: &Message<'a>) -> Option<&'a Forward> {
    m.inbound.forward.as_ref().filter(|f| {
        m.agent
            && !m.internal
            && m.facts.may_watch(&f.original_from.address)
            && f.original_from.address != m.sender.address
    })
}

/// A forward's entries: the forwarded part as the requester's comment, the
/// agent's own words above it as a work note.
fn forwarded(m: &Message<'_>, forward: &Forward, new: &mut NewTicket) -> Vec<PlannedEntry> {
    let config = m.facts.config;
    new.requesters.push(forward.original_from.clone());
    if !forward.original_subject.trim().is_empty() {
        new.subject =
            crate::thread::clean_subject(&forward.original_subject, &config.ticket.pattern);
    }
    add_agent(&mut new.work_notes_list, &m.sender.address);
    let mut entries = vec![PlannedEntry {
        kind: EntryKind::Comment,
        author: forward.original_from.clone(),
        by_agent: false,
        subject: new.subject.clone(),
        text: forward.original_text.as_str().into(),
        html: None,
        keeps_attachments: true,
        message_id: m.inbound.message_id.clone(),
    }];
    if !forward.agent_text.trim().is_empty() {
        entries.push(PlannedEntry {
            kind: EntryKind::WorkNote,
            author: m.sender.clone(),
            by_agent: true,
            subject: new.subject.clone(),
            text: forward.agent_text.as_str().into(),
            html: None,
            keeps_attachments: false,
            message_id: None,
        });
    }
    entries
}

/// `add_cc_on_open`: the opening mail's other To/Cc join the watch list,
/// those a watch group may hold. From anyone but a believed agent, more
/// of them than `max_cc_on_open` join none: a stranger's mail with 500
/// addresses in Cc would otherwise make crmgate write to all 500 of them
/// on every later comment. The `system` entry returned says so.
fn watch_the_opening_mail(m: &Message<'_>, new: &mut NewTicket) -> Option<PlannedEntry> {
    let mut joining: Vec<Mailbox> = Vec::new();
    for mailbox in m.inbound.to.iter().chain(&m.inbound.cc) {
        if m.facts.may_watch(&mailbox.address)
            && !contains(&new.requesters, &mailbox.address)
            && mailbox.address != m.sender.address
        {
            push_unique(&mut joining, mailbox.clone());
        }
    }
    let limit = m.facts.config.watch.max_cc_on_open;
    if !m.agent && joining.len() > limit {
        return Some(PlannedEntry {
            kind: EntryKind::System,
            author: super::from::helpdesk(m.facts.config),
            by_agent: false,
            subject: new.subject.clone(),
            text: format!(
                "{} addresses in To/Cc, more than [watch] max_cc_on_open ({limit}): \
                 none joined the watch list.",
                joining.len()
            )
            .into(),
            html: None,
            keeps_attachments: false,
            message_id: None,
        });
    }
    for mailbox in joining {
        push_unique(&mut new.watch_list, mailbox);
    }
    None
}
