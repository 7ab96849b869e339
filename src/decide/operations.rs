//! What an agent does from the CRM rather than by mail (`crmgate ticket
//! comment|work-note|resolve`): the same rules as for a message, on plain
//! data, so the CLI (and later quick actions) plan nothing of their own.

use super::TicketView;
use super::{from, reemit, Facts, Plan, PlannedEntry, PlannedSend, Recorded, TicketTarget};
use crate::helpdesk::{EntryKind, SendKind, TicketState};
use crate::parse::{Inbound, Mailbox};

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
            Recorded::WorkNote
        } else {
            Recorded::Comment
        },
        follows: None,
    };
    // Published from the CRM: nobody had it directly.
    let inbound = Inbound {
        from: Some(agent.clone()),
        ..Inbound::default()
    };
    reemit::re_emit(facts, &inbound, ticket, agent, true, &mut plan);
    plan
}

/// The ticket's e-mail function (`crmgate ticket email`): an agent's own
/// mail to anyone, logged as an `email` entry and sent To and Cc whom the
/// agent chose, From `"<agent> via <display_name>"` at the public address
/// — a person's mail, so never capped and sent with its attachments.
pub fn email(
    facts: &Facts<'_>,
    agent: &Mailbox,
    to: &[String],
    cc: &[String],
    subject: &str,
    text: &str,
) -> (PlannedEntry, PlannedSend) {
    let config = facts.config;
    let subject = crate::thread::clean_subject(subject, &config.ticket.pattern);
    let to: Vec<Mailbox> = to.iter().map(|a| Mailbox::new(None, a)).collect();
    let cc: Vec<Mailbox> = cc.iter().map(|a| Mailbox::new(None, a)).collect();
    let entry = PlannedEntry {
        kind: EntryKind::Email,
        author: agent.clone(),
        by_agent: true,
        subject,
        text: text.into(),
        html: None,
        keeps_attachments: true,
        message_id: None,
    };
    let send = PlannedSend {
        kind: SendKind::Email,
        entry: 0,
        from_name: from::via_display_name(agent, config),
        from_address: config.addresses.public.clone(),
        envelope: to.iter().chain(&cc).map(|m| m.address.clone()).collect(),
        to,
        cc,
        agents_only: false,
    };
    (entry, send)
}

/// A ticket set to resolved: a closure entry, and the closure notice to the
/// watch group when `[auto] closure` is on.
pub fn resolve(facts: &Facts<'_>, ticket: &TicketView) -> Plan {
    let config = facts.config;
    let mut plan = Plan {
        ticket: TicketTarget::Existing(ticket.id),
        entries: vec![PlannedEntry {
            kind: EntryKind::Closure,
            author: from::helpdesk(config),
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
        decision: Recorded::Closure,
        follows: None,
    };
    let (requesters, watch) = facts.watch_group(ticket);
    if config.auto.closure && !(requesters.is_empty() && watch.is_empty()) {
        plan.sends.push(PlannedSend {
            kind: SendKind::Closure,
            entry: 0,
            from_name: config.gateway.display_name.clone(),
            from_address: config.addresses.public.clone(),
            envelope: requesters
                .iter()
                .chain(&watch)
                .map(|m| m.address.clone())
                .collect(),
            to: requesters,
            cc: watch,
            agents_only: false,
        });
    }
    plan
}
