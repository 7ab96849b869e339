//! The rules about crmgate's own notices and threading headers that the
//! store applies: which failure is told to the agents, how often a
//! reply-all notice goes, which Message-IDs a message threads on.

use super::{from, Facts, Plan, PlannedSend, ThreadRef, TicketView};
use crate::helpdesk::{OutboxKind, SendKind};

/// The notice that tells the work-notes list mail of the ticket was not
/// delivered (SPEC, rule 4 and "Outgoing mail", Delivery) — never about a
/// failed notice itself, or notices would answer notices forever; `None`
/// too when the ticket has nobody on its work-notes list.
pub fn failure_notice(
    facts: &Facts<'_>,
    ticket: &TicketView,
    failed_kind: &str,
) -> Option<PlannedSend> {
    let config = facts.config;
    let of_a_notice = matches!(
        OutboxKind::parse(failed_kind),
        Some(OutboxKind::Send(
            SendKind::FailureNotice | SendKind::ReplyAllNotice
        ))
    );
    if of_a_notice || ticket.work_notes_list.is_empty() {
        return None;
    }
    let notes = from::agent_mailboxes(config, &ticket.work_notes_list);
    Some(PlannedSend {
        kind: SendKind::FailureNotice,
        entry: 0,
        from_name: config.gateway.display_name.clone(),
        from_address: config.addresses.internal.clone(),
        envelope: notes.iter().map(|m| m.address.clone()).collect(),
        to: notes,
        cc: Vec::new(),
        agents_only: true,
    })
}

/// Rule 8's "one short notice per ticket and day": the day a reply-all
/// notice counts on (UTC days since the epoch), as the store keys it.
pub fn reply_all_notice_day(now: i64) -> i64 {
    now / 86_400
}

/// What the mail of `plan` threads on: the ticket's thread, then the
/// Message-IDs of the entries the plan adds (the inbound message's own,
/// marked when an agent wrote it).
pub fn thread_with(thread: &[ThreadRef], plan: &Plan) -> Vec<ThreadRef> {
    let added = plan.entries.iter().filter_map(|e| {
        e.message_id.as_ref().map(|mid| ThreadRef {
            message_id: mid.clone(),
            agent_inbound: e.by_agent,
        })
    });
    thread.iter().cloned().chain(added).collect()
}

/// The References of an outgoing message (SPEC, "Outgoing mail"): the
/// ticket's first message and the last ten, never an agent's own inbound
/// Message-ID in mail to non-agents; In-Reply-To is the last of them.
pub fn references(thread: &[ThreadRef], agents_only: bool) -> Vec<String> {
    let visible: Vec<&str> = thread
        .iter()
        .filter(|r| agents_only || !r.agent_inbound)
        .map(|r| r.message_id.as_str())
        .collect();
    let mut references: Vec<String> = Vec::new();
    if let Some(first) = visible.first() {
        references.push((*first).to_string());
    }
    let tail_start = visible.len().saturating_sub(10).max(1);
    references.extend(visible.iter().skip(tail_start).map(|s| s.to_string()));
    references
}
