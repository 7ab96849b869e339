//! The limits (SPEC, "Outgoing mail", Limits): which cap an outgoing
//! message counts against, and whether one more is within it. The store
//! counts what was sent; the rule is here.

use crate::config::Config;
use crate::helpdesk::SendKind;

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
        // The e-mail function is a person's mail; a quick-action notice only
        // ever answers a believed agent's own mail.
        SendKind::Email | SendKind::QuickActionNotice => Cap::Never,
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
    /// Automatic messages to the address in the last hour.
    pub automatic_last_hour: u32,
    /// Automatic messages to the address in the last day.
    pub automatic_last_day: u32,
    /// Re-sent copies of non-agent mail to the address on this ticket in
    /// the last hour.
    pub resends_on_ticket_last_hour: u32,
}

/// What the `system` entry says of the recipients that
/// `max_resends_per_sender_hour` held back.
pub fn sender_cap_note(kind: SendKind, sender: &str, held_back: &[&str]) -> String {
    format!(
        "{} not sent to {}: the copies that mail from {sender} caused in the last hour \
         reached [auto] max_resends_per_sender_hour.",
        kind.as_str(),
        held_back.join(", "),
    )
}

/// What the `system` entry says of the recipients a cap held back (SPEC:
/// "What a cap holds back becomes a `system` entry"), so an agent sees who
/// was not written to and why.
pub fn held_back_note(kind: SendKind, cap: Cap, held_back: &[&str]) -> String {
    format!(
        "{} not sent to {}: {} reached (see [auto] in the configuration).",
        kind.as_str(),
        held_back.join(", "),
        if cap == Cap::Automatic {
            "the cap of automatic messages per address"
        } else {
            "the cap of re-sends per recipient and ticket"
        },
    )
}
