//! Rules 7 and 8, and the receipt: who receives a copy of an entry, under
//! which From, and who had it already.

use std::collections::BTreeSet;

use super::new_ticket::Opening;
use super::{add_agent, from, Facts, Message, Plan, PlannedEntry, PlannedSend};
use super::{TicketTarget, TicketView};
use crate::config::ReceiptPolicy;
use crate::helpdesk::{EntryKind, SendKind};
use crate::parse::{Inbound, Mailbox};

/// Rule 7, Re-emit: the entry of `plan.entries[0]` as new messages built by
/// crmgate — a comment to the watch group (public copy) and the work-notes
/// list (agent copy), a work note or a partner's `email` entry to the
/// work-notes list. The headers show the whole group; the envelope leaves
/// out the sender and whoever had the inbound mail in To or Cc.
pub(super) fn re_emit(
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
    let had_it = HadIt::new(facts, inbound, sender, unverified);
    let from_name = from::entry_from_name(config, &entry.author, sender, unverified);
    let mut notes_list: Vec<String> = ticket.work_notes_list.clone();
    for a in &plan.join_work_notes {
        add_agent(&mut notes_list, a);
    }
    let agents_send = |kind: SendKind, from_address: &str| PlannedSend {
        kind,
        entry: 0,
        from_name: from_name.clone(),
        from_address: from_address.to_string(),
        to: from::agent_mailboxes(config, &notes_list),
        cc: Vec::new(),
        envelope: had_it.envelope(notes_list.iter().map(String::as_str)),
        agents_only: true,
    };
    let sends = match entry.kind {
        EntryKind::WorkNote => vec![agents_send(SendKind::WorkNote, &config.addresses.internal)],
        EntryKind::Email => vec![agents_send(SendKind::PartnerCopy, &config.addresses.public)],
        EntryKind::Comment => vec![
            public_copy(facts, ticket, &had_it, from_name.clone()),
            agents_send(SendKind::AgentCopy, &config.addresses.public),
        ],
        _ => Vec::new(),
    };
    // A message with nobody to send to is not queued.
    plan.sends
        .extend(sends.into_iter().filter(|s| !s.envelope.is_empty()));
}

/// Those who had the inbound message directly (the reply-all duplicate),
/// and the addresses crmgate never sends to: what every envelope leaves out.
struct HadIt<'a> {
    facts: &'a Facts<'a>,
    addresses: BTreeSet<&'a str>,
}

impl<'a> HadIt<'a> {
    fn new(
        facts: &'a Facts<'a>,
        inbound: &'a Inbound,
        sender: &'a Mailbox,
        unverified: bool,
    ) -> HadIt<'a> {
        let addresses = inbound
            .to
            .iter()
            .chain(&inbound.cc)
            .map(|m| m.address.as_str())
            .chain((!unverified).then_some(sender.address.as_str()))
            .collect();
        HadIt { facts, addresses }
    }

    /// The envelope of a copy to `group`: each address once, less those
    /// who had it and those never sent to.
    fn envelope<'b>(&self, group: impl IntoIterator<Item = &'b str>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for a in group {
            if !self.addresses.contains(a)
                && !self.facts.never_send_to(a)
                && !out.iter().any(|o| o == a)
            {
                out.push(a.to_string());
            }
        }
        out
    }
}

/// The public copy of a comment: To the requesters, Cc the watch list,
/// each filtered by watch-group admission.
fn public_copy(
    facts: &Facts<'_>,
    ticket: &TicketView,
    had_it: &HadIt<'_>,
    from_name: String,
) -> PlannedSend {
    let (requesters, watch) = facts.watch_group(ticket);
    let group = requesters.iter().chain(&watch).map(|m| m.address.as_str());
    PlannedSend {
        kind: SendKind::PublicCopy,
        entry: 0,
        from_name,
        from_address: facts.config.addresses.public.clone(),
        envelope: had_it.envelope(group),
        to: requesters,
        cc: watch,
        agents_only: false,
    }
}

/// Rule 8, Reply-all guard: a believed agent's comment whose To/Cc holds
/// addresses other than CRM addresses and agents (the agent wrote to
/// requesters directly) is processed normally, and the agent gets a short
/// notice recalling "reply to the CRM only" (the store keeps it to one per
/// agent, ticket and day).
pub(super) fn reply_all_guard(m: &Message<'_>, plan: &mut Plan) {
    let config = m.facts.config;
    let comment = plan.entries.first().map(|e| e.kind) == Some(EntryKind::Comment);
    let wrote_to_others = m.inbound.to.iter().chain(&m.inbound.cc).any(|mailbox| {
        !m.facts.is_crm_address(&mailbox.address) && !m.facts.is_agent_or_former(&mailbox.address)
    });
    if m.agent && comment && wrote_to_others {
        plan.sends.push(PlannedSend {
            kind: SendKind::ReplyAllNotice,
            entry: 0,
            from_name: config.gateway.display_name.clone(),
            from_address: config.addresses.public.clone(),
            to: vec![m.sender.clone()],
            cc: Vec::new(),
            envelope: vec![m.sender.address.clone()],
            agents_only: true,
        });
    }
}

/// Rule 6's answer to the opening mail ("Outgoing mail", Receipt): a
/// forward's requester gets only the receipt, so its public copy goes; the
/// receipt goes to the requesters of a ticket opened by mail, without
/// backscatter.
pub(super) fn answer_opening(m: &Message<'_>, opening: Opening, plan: &mut Plan) {
    if opening == Opening::Forward {
        plan.sends.retain(|s| s.kind != SendKind::PublicCopy);
        forwarding_agents_words(m, plan);
    }
    if let Some((entry, send)) = receipt(m, opening, plan) {
        if let (Some(domain), false) = (&m.inbound.sender_check.spf_fail, m.agent) {
            // SPF says the envelope sender is forged: a receipt would be
            // backscatter to whoever was named.
            plan.entries.push(PlannedEntry {
                kind: EntryKind::System,
                text: format!(
                    "No receipt sent: the SPF record of {domain} does not allow the \
                     sending server (SPF fail), so the sender address may be forged."
                )
                .into(),
                ..entry
            });
            return;
        }
        plan.entries.push(entry);
        plan.sends.push(PlannedSend {
            entry: plan.entries.len() - 1,
            ..send
        });
    }
}

/// Rule 6 makes a forwarding agent's own words above the forwarded part a
/// work note; like any work note it goes to the rest of the work-notes list
/// (rule 7), From the internal address.
fn forwarding_agents_words(m: &Message<'_>, plan: &mut Plan) {
    let config = m.facts.config;
    let TicketTarget::New(new) = &plan.ticket else {
        return;
    };
    let Some(index) = plan
        .entries
        .iter()
        .position(|e| e.kind == EntryKind::WorkNote && e.by_agent)
    else {
        return;
    };
    let envelope: Vec<String> = new
        .work_notes_list
        .iter()
        .filter(|a| **a != m.sender.address)
        .cloned()
        .collect();
    if envelope.is_empty() {
        return;
    }
    plan.sends.push(PlannedSend {
        kind: SendKind::WorkNote,
        entry: index,
        from_name: from::entry_from_name(config, &m.sender, &m.sender, false),
        from_address: config.addresses.internal.clone(),
        to: from::agent_mailboxes(config, &new.work_notes_list),
        cc: Vec::new(),
        envelope,
        agents_only: true,
    });
}

/// The receipt's entry and message, when one is due: `[auto] receipt`
/// wants it, there is a requester, the mail is not spam, and its envelope
/// backs its From (a believed agent's forward is the one exception: a From
/// the envelope does not back is how backscatter starts).
fn receipt(m: &Message<'_>, opening: Opening, plan: &Plan) -> Option<(PlannedEntry, PlannedSend)> {
    let facts = m.facts;
    let config = facts.config;
    let TicketTarget::New(new) = &plan.ticket else {
        return None;
    };
    let forwarded = opening == Opening::Forward;
    let wanted = match config.auto.receipt {
        ReceiptPolicy::All => !plan.entries.is_empty(),
        ReceiptPolicy::Forward => forwarded,
        ReceiptPolicy::None => false,
    };
    if !wanted || new.requesters.is_empty() || m.inbound.spam_flag {
        return None;
    }
    let mail_from = m.envelope.mail_from.as_deref()?;
    let backed = crate::thread::strip_tag(mail_from).eq_ignore_ascii_case(&m.sender.address);
    if !(backed || forwarded && m.agent) {
        return None;
    }
    let recipients: Vec<Mailbox> = new
        .requesters
        .iter()
        .filter(|r| !facts.never_send_to(&r.address) && !facts.is_agent_or_former(&r.address))
        .cloned()
        .collect();
    if recipients.is_empty() {
        return None;
    }
    let entry = PlannedEntry {
        kind: EntryKind::Receipt,
        author: from::helpdesk(config),
        by_agent: false,
        subject: new.subject.clone(),
        text: "".into(),
        html: None,
        keeps_attachments: false,
        message_id: None,
    };
    let send = PlannedSend {
        kind: SendKind::Receipt,
        entry: 0,
        from_name: config.gateway.display_name.clone(),
        from_address: config.addresses.public.clone(),
        envelope: recipients.iter().map(|r| r.address.clone()).collect(),
        to: recipients,
        cc: Vec::new(),
        agents_only: false,
    };
    Some((entry, send))
}
