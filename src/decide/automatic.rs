//! Rule 4, Automatic mail: what marks it, and what becomes of it — a
//! `system` entry on the ticket it names, never re-emitted, never answered,
//! never a new ticket; a delivery report about our own mail is a bounce.

use super::{Bounce, Decision, Facts, Plan, PlannedEntry, Recorded, TicketTarget, TicketView};
use crate::helpdesk::{EntryKind, Envelope, QuarantineReason};
use crate::parse::{AutoSignal, Inbound, Mailbox};

/// Why a message is automatic (rule 4), in words for its `system` entry:
/// header signals, an empty reverse-path, or a MAILER-DAEMON/postmaster
/// sender. `None`: a person's mail.
pub(super) fn reason(
    facts: &Facts<'_>,
    envelope: &Envelope,
    inbound: &Inbound,
    sender: Option<&Mailbox>,
) -> Option<String> {
    if let Some(signal) = &inbound.auto {
        // A list of `[auto] human_lists` is people writing: its List-*
        // headers and `Precedence: list|bulk` do not make it automatic.
        let human_list = inbound
            .list_ids
            .iter()
            .any(|id| facts.config.auto.human_lists.contains(id));
        let list_signal = match signal {
            AutoSignal::Header(name) => {
                name.eq_ignore_ascii_case("List-Id")
                    || name.eq_ignore_ascii_case("List-Unsubscribe")
            }
            AutoSignal::Precedence(value) => !value.to_ascii_lowercase().starts_with("junk"),
            _ => false,
        };
        if !(human_list && list_signal) {
            return Some(signal.describe());
        }
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

/// Rule 4: automatic mail becomes a `system` entry on the ticket it names,
/// or goes to the quarantine; a delivery report about our mail is a bounce.
pub(super) fn automatic(
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
        decision: Recorded::Automatic,
        follows: None,
    }))
}
