//! Who is who: which From is believed, which addresses are crmgate's own,
//! which may be in a watch group, which are robots never written to.

use super::{contains, Facts, TicketView};
use crate::config::Config;
use crate::helpdesk::Envelope;
use crate::parse::{Inbound, Mailbox};

impl Facts<'_> {
    /// crmgate's own addresses, with or without `+tag`: never a requester,
    /// never written to.
    pub(super) fn is_crm_address(&self, address: &str) -> bool {
        let base = crate::thread::strip_tag(address);
        base == self.config.addresses.public || base == self.config.addresses.internal
    }

    /// Agents and former agents: never in a watch group, always scrubbed.
    pub(super) fn is_agent_or_former(&self, address: &str) -> bool {
        self.config.agent(address).is_some() || self.former_agents.contains(address)
    }

    /// Addresses crmgate never sends to: its own, and robots that cannot read.
    pub(super) fn never_send_to(&self, address: &str) -> bool {
        self.is_crm_address(address) || is_robot_address(address)
    }

    /// May this address be in a watch group? (SPEC, rule 6 and the CLI:
    /// no agent, former agent, CRM address or robot.)
    pub(super) fn may_watch(&self, address: &str) -> bool {
        !self.is_agent_or_former(address) && !self.never_send_to(address)
    }

    /// The watch group of a ticket as mail to it shows it: the requesters,
    /// then the watch list less the requesters, each admitted by
    /// [`Facts::may_watch`] (a list the configuration changed since may
    /// hold an agent now).
    pub(super) fn watch_group(&self, ticket: &TicketView) -> (Vec<Mailbox>, Vec<Mailbox>) {
        let requesters: Vec<Mailbox> = ticket
            .requesters
            .iter()
            .filter(|m| self.may_watch(&m.address))
            .cloned()
            .collect();
        let watch: Vec<Mailbox> = ticket
            .watch_list
            .iter()
            .filter(|m| self.may_watch(&m.address) && !contains(&requesters, &m.address))
            .cloned()
            .collect();
        (requesters, watch)
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
/// `dmarc=pass` or a `dkim=pass` aligned with the From domain, or
/// crmgate's own check passed (`[auth] verify`, done before decide). Only
/// the top-most one of our id counts: our MTA adds its own above anything
/// the sender wrote, so a forged one can only stand below it.
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
        || inbound.sender_check.from_verified
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

/// Why an address may not join a ticket's requesters or watch list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    /// An agent or former agent: agents go on the work-notes list.
    Agent,
    /// One of crmgate's own addresses (or its postmaster).
    CrmAddress,
}

/// May `address` be added to the watch group (requesters, watch list) by
/// hand — the CLI now, agents' quick actions later? Never an agent, a
/// former agent or an address crmgate accepts mail for. The work-notes
/// list takes agents only, which the caller checks against the agents.
///
/// # Errors
/// [`NotAdmitted`]: the reason the address stays off the list.
pub fn admit_to_watch_group(facts: &Facts<'_>, address: &str) -> Result<(), NotAdmitted> {
    if facts.is_agent_or_former(address) {
        return Err(NotAdmitted::Agent);
    }
    if accepts_recipient(facts.config, address) {
        return Err(NotAdmitted::CrmAddress);
    }
    Ok(())
}
