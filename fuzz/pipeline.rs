//! The intake without its database, for the fuzzer and the regression tests.
//!
//! Raw bytes → `parse::parse` → `decide::decide` (a fixed configuration with
//! two agents and a former agent; an envelope and a ticket view chosen by
//! the input's last two bytes, so that seed files stay ordinary mail) →
//! `compose::compose` of every planned send, with the scrub `apply::queue`
//! uses. Then the rules' invariants are checked on the plan and on the bytes
//! that would leave; a broken one is returned as [`Violation`].
//!
//! `fuzz/fuzz_targets/intake.rs` panics on a violation (libFuzzer then
//! saves the input), and `tests/fuzz_regressions.rs` runs the inputs kept
//! under `fixtures/fuzz/` through [`run`] so a fixed bug stays fixed. The
//! file is included in both by `#[path]`, so the two can never drift apart.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::IpAddr;

use crmgate::compose::{self, Draft, Scrub};
use crmgate::config::Config;
use crmgate::decide::{self, Decision, Facts, Plan, ThreadRef, TicketView};
use crmgate::helpdesk::{Envelope, SendKind, TicketState};
use crmgate::parse::{self, Inbound, Mailbox};

pub const JANE: &str = "jane.doe@example.org";
pub const BOB: &str = "bob.agent@example.org";
pub const FORMER: &str = "old.agent@example.org";
pub const PUBLIC: &str = "support@example.org";
pub const INTERNAL: &str = "support-notes@example.org";
/// The peer crmgate believes (in `trusted_relays`) and one it does not.
pub const TRUSTED_PEER: [u8; 4] = [10, 0, 0, 5];
pub const UNTRUSTED_PEER: [u8; 4] = [192, 0, 2, 1];

/// The configuration every run uses (`fixtures/rules.toml`, shared with
/// decide's unit tests): two agents, a trusted network that is not
/// loopback, and an authserv-id, so both ways of believing an agent are
/// reachable.
pub const CONFIG: &str = include_str!("../fixtures/rules.toml");

/// A rule the output broke, in words a bug report can quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What stays the same across runs: built once per process.
pub struct Fixed {
    pub config: Config,
    pub former: BTreeSet<String>,
}

impl Fixed {
    /// # Panics
    /// Only if [`CONFIG`] (a constant) stops being valid.
    pub fn new() -> Fixed {
        let config = match Config::from_toml(CONFIG, "fuzz") {
            Ok(c) => c,
            Err(e) => panic!("the fuzz configuration is invalid: {e}"),
        };
        Fixed {
            config,
            former: BTreeSet::from([FORMER.to_string()]),
        }
    }

    pub fn facts(&self) -> Facts<'_> {
        Facts {
            config: &self.config,
            former_agents: &self.former,
            reply_key: None,
        }
    }
}

impl Default for Fixed {
    fn default() -> Self {
        Fixed::new()
    }
}

/// The envelope and ticket an input stands for, from its last two bytes
/// (the first bytes are the header block the mutator should be free to
/// change without also changing who sent it).
pub fn envelope_for(data: &[u8], inbound: &Inbound) -> (Envelope, u8) {
    let n = data.len();
    let a = if n >= 1 { data[n - 1] } else { 0 };
    let b = if n >= 2 { data[n - 2] } else { 0 };
    let peer: IpAddr = if a & 1 == 1 {
        TRUSTED_PEER.into()
    } else {
        UNTRUSTED_PEER.into()
    };
    let from = inbound.from.as_ref().map(|m| m.address.clone());
    let mail_from = match (a >> 1) % 5 {
        0 => None,
        1 => from.or_else(|| Some("alice@u.example".into())),
        2 => Some("alice@u.example".into()),
        3 => Some("mallory@evil.example".into()),
        _ => Some(JANE.into()),
    };
    let rcpt: Vec<String> = match (a >> 4) % 6 {
        0 => vec![PUBLIC.into()],
        1 => vec![INTERNAL.into()],
        2 => vec![PUBLIC.into(), INTERNAL.into()],
        3 => vec!["support+TKT0000007@example.org".into()],
        4 => vec!["postmaster@crm.example.org".into()],
        _ => vec![PUBLIC.into(), "postmaster@example.org".into()],
    };
    (
        Envelope {
            peer,
            helo: "client.example.net".into(),
            mail_from,
            rcpt_to: rcpt,
        },
        b,
    )
}

/// The time decisions are made at (Unix seconds, in 2027).
pub const NOW: i64 = 1_800_000_000;

/// An existing ticket as the store would show it: Alice requester, Carol
/// watching, the agents on the work-notes list. Bits of `b` put the sender
/// among the requesters or the watch list and pick the state; a resolved
/// one was resolved an hour ago or, with bit 64, a year ago (past the
/// reopen window: a requester's reply opens a new ticket).
pub fn ticket_for(b: u8, inbound: &Inbound) -> TicketView {
    let mut requesters = vec![Mailbox::new(Some("Alice"), "alice@u.example")];
    let mut watch_list = vec![Mailbox::new(None, "carol@u.example")];
    if let Some(from) = &inbound.from {
        if b & 1 == 1 {
            requesters.push(from.clone());
        } else if b & 2 == 2 {
            watch_list.push(from.clone());
        }
    }
    let mut work_notes_list = vec![JANE.to_string()];
    if b & 4 == 4 {
        work_notes_list.push(BOB.to_string());
    }
    let state = match (b >> 3) % 3 {
        0 => TicketState::New,
        1 => TicketState::Open,
        _ => TicketState::Resolved,
    };
    let resolved_ago = if b & 64 == 64 { 365 * 86_400 } else { 3_600 };
    TicketView {
        id: 7,
        number: "TKT0000007".into(),
        subject: "Imprimante".into(),
        state,
        resolved_at: (state == TicketState::Resolved).then_some(NOW - resolved_ago),
        owner: (b & 32 == 32).then(|| JANE.to_string()),
        requesters,
        watch_list,
        work_notes_list,
        thread: vec![
            ThreadRef {
                message_id: "TKT0000007.1@crm.example.org".into(),
                agent_inbound: false,
            },
            ThreadRef {
                message_id: "agent-secret-1@example.org".into(),
                agent_inbound: true,
            },
        ],
    }
}

/// One input through parse → decide (with and without a ticket) → compose,
/// checking every invariant on the way.
///
/// # Errors
/// The first [`Violation`] found.
pub fn run(fixed: &Fixed, data: &[u8]) -> Result<(), Violation> {
    let Ok(inbound) = parse::parse(data) else {
        return Ok(());
    };
    let (envelope, b) = envelope_for(data, &inbound);
    let facts = fixed.facts();
    let view = ticket_for(b, &inbound);
    for ticket in [None, Some(&view)] {
        let decision = decide::decide(&facts, &envelope, &inbound, ticket, None, NOW);
        if let Decision::Record(plan) = decision {
            check_plan(fixed, &envelope, &inbound, ticket, &plan)?;
            let number = ticket.map_or("TKT0000099", |t| t.number.as_str());
            let thread: &[ThreadRef] = ticket.map_or(&[], |t| t.thread.as_slice());
            for (i, send) in plan.sends.iter().enumerate() {
                let bytes = compose_send(fixed, &inbound, &plan, i, number, thread)?;
                if !send.agents_only {
                    check_no_agent_address(fixed, &bytes)
                        .map_err(|v| Violation(format!("{:?}: {v}", send.kind)))?;
                    check_no_agent_message_id(&bytes)
                        .map_err(|v| Violation(format!("{:?}: {v}", send.kind)))?;
                }
            }
        }
    }
    Ok(())
}

/// An agent's own inbound Message-ID (the one [`ticket_for`] puts in the
/// thread) never threads mail to non-agents: In-Reply-To and References
/// of the header block are searched, folded lines included.
///
/// # Errors
/// The header that names it.
pub fn check_no_agent_message_id(bytes: &[u8]) -> Result<(), Violation> {
    let raw = String::from_utf8_lossy(bytes).to_lowercase();
    let head = raw.split("\r\n\r\n").next().unwrap_or_default();
    let mut in_threading = false;
    for line in head.split("\r\n") {
        if !line.starts_with([' ', '\t']) {
            in_threading = line.starts_with("references:") || line.starts_with("in-reply-to:");
        }
        if in_threading && line.contains("agent-secret-1@example.org") {
            return Err(Violation(format!(
                "an agent's own Message-ID threads mail to non-agents: {line}"
            )));
        }
    }
    Ok(())
}

/// The scrub `apply::queue` applies to mail for non-agents.
pub fn scrub_for(fixed: &Fixed) -> Scrub {
    let mut addresses: BTreeSet<String> = fixed
        .config
        .agents
        .iter()
        .map(|a| a.email.clone())
        .collect();
    addresses.extend(fixed.former.iter().cloned());
    Scrub {
        addresses: addresses.into_iter().collect(),
        replacement: fixed.config.addresses.public.clone(),
    }
}

/// Compose send `i` of `plan` as `apply::apply` and `apply::queue` do:
/// the entry's subject, text and HTML, the inbound attachments listed, the
/// thread without agents' own Message-IDs for non-agents, the scrub.
///
/// # Errors
/// A composing failure, reported as a violation (compose must not fail on
/// what decide planned).
pub fn compose_send(
    fixed: &Fixed,
    inbound: &Inbound,
    plan: &Plan,
    i: usize,
    number: &str,
    thread: &[ThreadRef],
) -> Result<Vec<u8>, Violation> {
    let send = &plan.sends[i];
    let Some(entry) = plan.entries.get(send.entry) else {
        return Err(Violation(format!("send {i} names no entry")));
    };
    // decide's own choice, as `apply::queue` makes it: the bytes checks
    // below then catch an agent's Message-ID it would let through.
    let references = decide::references(&decide::thread_with(thread, plan), send.agents_only);
    let listed = if entry.keeps_attachments && send.kind != SendKind::Receipt {
        inbound
            .attachments
            .iter()
            .map(|a| (a.filename.clone(), a.data.len() as u64))
            .collect()
    } else {
        Vec::new()
    };
    let draft = Draft {
        kind: send.kind,
        ticket_number: number.to_string(),
        language: fixed.config.gateway.language,
        from_name: send.from_name.clone(),
        from_address: send.from_address.clone(),
        reply_address: None,
        to: send.to.clone(),
        cc: send.cc.clone(),
        subject: entry.subject.clone(),
        text: entry.text.to_string(),
        html: entry.html.clone(),
        listed_attachments: listed,
        attachments: Vec::new(),
        message_id: format!("{number}.fuzz@crm.example.org"),
        in_reply_to: references.last().cloned(),
        references,
        date: 1_800_000_000,
        loop_host: fixed.config.gateway.hostname.clone(),
        scrub: (!send.agents_only).then(|| scrub_for(fixed)),
    };
    compose::compose(&draft).map_err(|e| Violation(format!("compose failed: {e}")))
}

fn is_agent(fixed: &Fixed, address: &str) -> bool {
    fixed.config.agent(address).is_some()
}

fn is_crm(fixed: &Fixed, address: &str) -> bool {
    let base = crmgate::thread::strip_tag(address);
    base == fixed.config.addresses.public || base == fixed.config.addresses.internal
}

/// The invariants of a plan (SPEC "The rules it enforces" and rule 7).
///
/// # Errors
/// The first rule broken.
pub fn check_plan(
    fixed: &Fixed,
    envelope: &Envelope,
    inbound: &Inbound,
    ticket: Option<&TicketView>,
    plan: &Plan,
) -> Result<(), Violation> {
    let sender = inbound
        .from
        .as_ref()
        .map(|m| m.address.clone())
        .filter(|a| !a.is_empty())
        .or_else(|| envelope.mail_from.clone())
        .unwrap_or_default();
    // One copy of each entry per recipient: a forward's two entries (the
    // requester's comment, the agent's own words) are two messages.
    let mut seen: BTreeSet<(usize, &str)> = BTreeSet::new();
    for send in &plan.sends {
        for address in &send.envelope {
            if is_crm(fixed, address) {
                return Err(Violation(format!(
                    "{:?} has the CRM address {address} as envelope recipient",
                    send.kind
                )));
            }
            if !seen.insert((send.entry, address.as_str())) {
                return Err(Violation(format!(
                    "{address} receives entry {} twice ({:?} and another send)",
                    send.entry, send.kind
                )));
            }
            let copy = matches!(
                send.kind,
                SendKind::PublicCopy
                    | SendKind::AgentCopy
                    | SendKind::WorkNote
                    | SendKind::PartnerCopy
            );
            // Only an agent whose From was not believed gets the copy back,
            // marked with the address, so a forgery does not go unnoticed.
            let unverified_agent = is_agent(fixed, address)
                && send.agents_only
                && !plan.entries.get(send.entry).is_some_and(|e| e.by_agent)
                && send
                    .from_name
                    .to_ascii_lowercase()
                    .contains(&address.to_ascii_lowercase());
            if copy && *address == sender && !unverified_agent {
                return Err(Violation(format!(
                    "the sender {address} gets its own message back ({:?})",
                    send.kind
                )));
            }
            let internal = matches!(
                send.kind,
                SendKind::AgentCopy | SendKind::WorkNote | SendKind::PartnerCopy
            );
            if (internal || send.agents_only) && !is_agent(fixed, address) {
                return Err(Violation(format!(
                    "{:?} goes to the non-agent {address}",
                    send.kind
                )));
            }
        }
        if !send.agents_only {
            // Headers show the whole group: for non-agents, no agent,
            // former agent or CRM address may be in it.
            for m in send.to.iter().chain(&send.cc) {
                let a = m.address.as_str();
                if is_agent(fixed, a) || fixed.former.contains(a) || is_crm(fixed, a) {
                    return Err(Violation(format!(
                        "{:?} shows {a} in its To/Cc to non-agents",
                        send.kind
                    )));
                }
            }
        }
        if send.kind == SendKind::WorkNote && !send.agents_only {
            return Err(Violation("a work note is not marked agents-only".into()));
        }
    }
    if let decide::TicketTarget::New(new) = &plan.ticket {
        for m in new.requesters.iter().chain(&new.watch_list) {
            let a = m.address.as_str();
            if is_agent(fixed, a) || fixed.former.contains(a) || is_crm(fixed, a) {
                return Err(Violation(format!("the new ticket's watch group holds {a}")));
            }
        }
        for a in &new.work_notes_list {
            if !is_agent(fixed, a) {
                return Err(Violation(format!(
                    "the new ticket's work-notes list holds the non-agent {a}"
                )));
            }
        }
    }
    let _ = ticket;
    Ok(())
}

/// The header lines that carry Message-IDs: they thread the conversation
/// and are chosen by decide (agents' own ids are already left out for
/// non-agents), so an id that happens to look like an address is not a leak.
const THREAD_HEADERS: [&str; 3] = ["message-id:", "in-reply-to:", "references:"];

/// No agent or former-agent address, as a whole address, in the raw bytes
/// (threading headers aside) nor in any decoded part of the message.
///
/// # Errors
/// Where the address was found.
pub fn check_no_agent_address(fixed: &Fixed, bytes: &[u8]) -> Result<(), Violation> {
    let addresses: Vec<String> = fixed
        .config
        .agents
        .iter()
        .map(|a| a.email.clone())
        .chain(fixed.former.iter().cloned())
        .collect();
    let raw = String::from_utf8_lossy(bytes).to_lowercase();
    let mut outside_threading = String::new();
    let mut skipping = false;
    for line in raw.split("\r\n") {
        if line.is_empty() {
            skipping = false;
        } else if line.starts_with([' ', '\t']) {
            if skipping {
                continue;
            }
        } else {
            skipping = THREAD_HEADERS.iter().any(|h| line.starts_with(h));
            if skipping {
                continue;
            }
        }
        outside_threading.push_str(line);
        outside_threading.push('\n');
    }
    // A quoted-printable soft line break (`=` at the end of a body line)
    // joins two lines: it is no boundary. The fuzzer had a line break put
    // before `bob.agent@…` inside `-bob.agent@…`, another address.
    if let Some(split) = outside_threading.find("\n\n") {
        let body = outside_threading[split..].replace("=\n", "");
        outside_threading.truncate(split);
        outside_threading.push_str(&body);
    }
    // Nor is the end of an RFC 2047 encoded word that the next one, on the
    // folded line, continues: `…@example.org?=` then ` =?utf-8?q?nnn…`
    // reads `…@example.orgnnn`, another domain (found by the fuzzer).
    let outside_threading = outside_threading.replace("?=\n =?utf-8?q?", "");
    for address in &addresses {
        if contains_whole(&outside_threading, address) {
            return Err(Violation(format!("{address} in the raw message")));
        }
    }
    let Ok(parsed) = parse::parse(bytes) else {
        return Err(Violation("crmgate cannot parse its own message".into()));
    };
    let mut decoded: Vec<(&str, String)> = vec![
        ("subject", parsed.subject.to_lowercase()),
        ("text", parsed.text.to_lowercase()),
        (
            "html",
            parsed.html.clone().unwrap_or_default().to_lowercase(),
        ),
    ];
    for m in parsed
        .from
        .iter()
        .chain(&parsed.to)
        .chain(&parsed.cc)
        .chain(&parsed.reply_to)
    {
        decoded.push(("address header", m.address.clone()));
        decoded.push((
            "display name",
            m.name.clone().unwrap_or_default().to_lowercase(),
        ));
    }
    for a in &parsed.attachments {
        decoded.push(("attachment name", a.filename.to_lowercase()));
    }
    for (place, text) in &decoded {
        for address in &addresses {
            if contains_whole(text, address) {
                return Err(Violation(format!("{address} in the decoded {place}")));
            }
        }
    }
    Ok(())
}

/// Does `haystack` (lower-cased) hold `address` as a whole address, i.e. not
/// as the tail of a longer local part nor the head of a longer domain? That
/// is the scrubber's own notion (`jan@x.org` is not `an@x.org`).
pub fn contains_whole(haystack: &str, address: &str) -> bool {
    let local_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c);
    let mut from = 0;
    while let Some(at) = haystack[from..].find(address) {
        let start = from + at;
        let end = start + address.len();
        let before_ok = !haystack[..start]
            .chars()
            .next_back()
            .is_some_and(local_char);
        let mut after = haystack[end..].chars();
        let after_ok = match after.next() {
            None => true,
            Some(c) if c.is_ascii_alphanumeric() || c == '-' => false,
            Some('.') => !after.next().is_some_and(|c| c.is_ascii_alphanumeric()),
            Some(_) => true,
        };
        if before_ok && after_ok {
            return true;
        }
        from = start + 1;
        while !haystack.is_char_boundary(from) {
            from += 1;
        }
    }
    false
}
