//! The helpdesk's rules as properties: over generated envelopes, inbound
//! messages and ticket views, `decide::decide`'s plan and the bytes
//! `compose::compose` makes of it keep the SPEC's invariants.
//!
//! Senders are drawn among agents (in any letter case), a former agent,
//! the requester, a watcher and strangers; To/Cc among all of those plus the
//! CRM addresses and robots; the peer is trusted or not, with or without an
//! `Authentication-Results` of ours; bodies quote agents' addresses the ways
//! mail clients do. The invariants themselves live in `fuzz/pipeline.rs`,
//! shared with the fuzz target, so the fuzzer and these tests judge alike:
//!
//! - a work note, an agent copy and a partner copy reach agents only;
//! - no CRM address is ever an envelope recipient;
//! - nobody receives one message twice, and no copy goes back to its sender;
//! - a watch group (a new ticket's lists, a public copy's To/Cc) holds no
//!   agent, former agent or CRM address;
//! - after compose with the intake's scrub, mail to non-agents carries no
//!   agent or former-agent address, raw or decoded.
//!
//! Fast enough for CI: a few seconds in a debug build.

#[path = "../fuzz/pipeline.rs"]
mod pipeline;

use std::net::IpAddr;
use std::sync::OnceLock;

use crmgate::decide::{self, Decision, ThreadRef, TicketView};
use crmgate::helpdesk::{EntryKind, Envelope, TicketState};
use crmgate::parse::{AuthResult, Forward, Inbound, Mailbox};
use pipeline::{Fixed, BOB, FORMER, INTERNAL, JANE, PUBLIC};
use proptest::prelude::*;

/// The configuration is parsed once: parsing it per case would dominate.
fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(Fixed::new)
}

/// Who writes, as the rules tell people apart.
fn sender() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(JANE.to_string()),
        2 => Just(BOB.to_string()),
        1 => Just(FORMER.to_string()),
        2 => Just("alice@u.example".to_string()),
        1 => Just("carol@u.example".to_string()),
        2 => "[a-z]{1,6}@(evil|else|u)\\.example",
    ]
}

/// Anyone who may appear in To/Cc, the CRM's own addresses and robots included.
fn anyone() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(JANE.to_string()),
        Just("JANE.DOE@EXAMPLE.ORG".to_string()),
        Just(BOB.to_string()),
        Just(FORMER.to_string()),
        Just("alice@u.example".to_string()),
        Just("carol@u.example".to_string()),
        Just("dave@u.example".to_string()),
        Just(PUBLIC.to_string()),
        Just(INTERNAL.to_string()),
        Just("support+tkt0000007@example.org".to_string()),
        Just("Support-Notes+x@Example.org".to_string()),
        Just("noreply@u.example".to_string()),
        Just("mailer-daemon@u.example".to_string()),
        "[a-z]{1,6}@(evil|else)\\.example",
    ]
}

/// Body text that quotes agents' addresses the ways clients and people do.
fn body() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("Bonjour,\n".to_string()),
        Just("Le 3 mai, Jane Doe <jane.doe@example.org> a écrit :\n".to_string()),
        Just("On Mon, Bob Agent <BOB.AGENT@example.org> wrote:\n".to_string()),
        Just("De : old.agent@example.org\n".to_string()),
        Just("> -- \n> Jane Doe, jane.doe@example.org, poste 1234\n".to_string()),
        Just("mailto:jane.doe@example.org?subject=x\n".to_string()),
        Just("jane.doe+tickets@example.org\n".to_string()),
        Just("jane.doe%40example.org\n".to_string()),
        Just("écrire à alice@u.example ou carol@u.example\n".to_string()),
        "[ -~]{0,40}\n",
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

fn html() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(
            "<p>De&nbsp;: <a href=\"mailto:jane.doe@example.org\">Jane</a></p>".to_string()
        )),
        Just(Some("<p>jane.doe&#64;example.org</p>".to_string())),
        Just(Some("<p>bob.<b>agent</b>@example.org</p>".to_string())),
        Just(Some(
            "<p>old.agent&commat;example&period;org</p>".to_string()
        )),
        "<p>[ -~]{0,30}</p>".prop_map(Some),
    ]
}

fn mailboxes(max: usize) -> impl Strategy<Value = Vec<Mailbox>> {
    prop::collection::vec((anyone(), prop::option::of("[A-Za-z .]{1,12}")), 0..max).prop_map(|v| {
        v.into_iter()
            .map(|(a, n)| Mailbox::new(n.as_deref(), &a))
            .collect()
    })
}

fn auth_results() -> impl Strategy<Value = Vec<AuthResult>> {
    let one = (
        prop_oneof![Just("mx.example.org"), Just("evil.example")],
        any::<bool>(),
        prop::collection::vec(
            prop_oneof![Just("example.org"), Just("evil.example"), Just("")],
            0..2,
        ),
    )
        .prop_map(|(id, dmarc, dkim)| AuthResult {
            authserv_id: id.to_string(),
            dmarc_pass: dmarc,
            dkim_pass_domains: dkim.into_iter().map(str::to_string).collect(),
        });
    prop::collection::vec(one, 0..3)
}

/// An envelope and the message it carries.
fn arrival() -> impl Strategy<Value = (Envelope, Inbound)> {
    (
        (
            sender(),
            any::<bool>(),
            0u8..4,
            prop::collection::vec(
                prop_oneof![
                    Just(PUBLIC.to_string()),
                    Just(INTERNAL.to_string()),
                    Just("support+tkt0000007@example.org".to_string()),
                ],
                1..3,
            ),
            mailboxes(4),
            mailboxes(3),
            auth_results(),
        ),
        (
            body(),
            html(),
            prop::option::of((sender(), body(), body())),
            prop::collection::vec("[a-z.@ ]{1,20}", 0..2),
            any::<bool>(),
        ),
    )
        .prop_map(
            |((from, trusted, mail_from, rcpt, to, cc, auth), (text, html, fwd, files, spam))| {
                let envelope = Envelope {
                    peer: if trusted {
                        IpAddr::from(pipeline::TRUSTED_PEER)
                    } else {
                        IpAddr::from(pipeline::UNTRUSTED_PEER)
                    },
                    helo: "client".into(),
                    mail_from: match mail_from {
                        0 => None,
                        1 => Some("other@else.example".into()),
                        _ => Some(from.clone()),
                    },
                    rcpt_to: rcpt,
                };
                let inbound = Inbound {
                    from: Some(Mailbox::new(Some("Sender Name"), &from)),
                    to,
                    cc,
                    subject: "RE: [TKT0000007] Imprimante jane.doe@example.org".into(),
                    message_id: Some(format!("{}.{}@client", from.len(), text.len())),
                    text: text.into(),
                    html,
                    attachments: files
                        .into_iter()
                        .map(|f| crmgate::parse::Attachment {
                            filename: f,
                            content_type: "text/plain".into(),
                            data: b"x".to_vec(),
                            inline: false,
                        })
                        .collect(),
                    auth_results: auth,
                    spam_flag: spam,
                    forward: fwd.map(|(original, agent_text, original_text)| Forward {
                        original_from: Mailbox::new(None, &original),
                        original_subject: "Imprimante".into(),
                        original_text,
                        agent_text,
                    }),
                    body_hash: "h".into(),
                    ..Inbound::default()
                };
                (envelope, inbound)
            },
        )
}

/// A ticket as the store shows it. Its requesters and watch list may hold
/// anyone (an address added by hand, an agent removed since), its
/// work-notes list current agents only (the store takes a removed agent
/// off every list at start and reload).
fn ticket() -> impl Strategy<Value = Option<TicketView>> {
    prop::option::of((
        mailboxes(3),
        mailboxes(3),
        prop::sample::subsequence(vec![JANE.to_string(), BOB.to_string()], 0..=2),
        0u8..4,
    ))
    .prop_map(|o| {
        o.map(|(requesters, watch_list, notes, state)| TicketView {
            id: 7,
            number: "TKT0000007".into(),
            subject: "Imprimante".into(),
            state: match state {
                0 => TicketState::New,
                1 => TicketState::Open,
                _ => TicketState::Resolved,
            },
            // Resolved an hour ago, or (3) a year ago: past the reopen window.
            resolved_at: match state {
                2 => Some(pipeline::NOW - 3_600),
                3 => Some(pipeline::NOW - 365 * 86_400),
                _ => None,
            },
            owner: notes.first().cloned(),
            requesters,
            watch_list,
            work_notes_list: notes,
            thread: vec![ThreadRef {
                message_id: "agent-own@example.org".into(),
                agent_inbound: true,
            }],
        })
    })
}

/// decide, then compose every send; the first rule broken, with the evidence.
fn keeps_the_rules(
    fixed: &Fixed,
    envelope: &Envelope,
    inbound: &Inbound,
    ticket: Option<&TicketView>,
) -> Result<(), String> {
    let facts = fixed.facts();
    let Decision::Record(plan) =
        decide::decide(&facts, envelope, inbound, ticket, None, pipeline::NOW)
    else {
        return Ok(());
    };
    pipeline::check_plan(fixed, envelope, inbound, ticket, &plan)
        .map_err(|v| format!("{v}\nplan: {plan:#?}"))?;
    let thread: &[ThreadRef] = ticket.map_or(&[], |t| t.thread.as_slice());
    for (i, send) in plan.sends.iter().enumerate() {
        let bytes = pipeline::compose_send(fixed, inbound, &plan, i, "TKT0000007", thread)
            .map_err(|v| v.to_string())?;
        if !send.agents_only {
            pipeline::check_no_agent_address(fixed, &bytes).map_err(|v| {
                format!("{:?}: {v}\n{}", send.kind, String::from_utf8_lossy(&bytes))
            })?;
        }
    }
    Ok(())
}

/// 128 cases per property by default (a few seconds in a debug build, for
/// CI); `PROPTEST_CASES=5000 cargo test --test properties` for a long run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn plans_and_the_mail_they_make_keep_the_rules(
        (envelope, inbound) in arrival(),
        ticket in ticket(),
    ) {
        let fixed = fixed();
        if let Err(v) = keeps_the_rules(fixed, &envelope, &inbound, ticket.as_ref()) {
            prop_assert!(false, "{}", v);
        }
    }

    /// Only a believed agent writes a work note: anyone else who names the
    /// internal address, in the envelope or in To/Cc, is refused.
    #[test]
    fn only_a_believed_agent_gets_a_work_note_in(
        (envelope, inbound) in arrival(),
        ticket in ticket(),
    ) {
        let fixed = fixed();
        let facts = fixed.facts();
        let sender = inbound.from.as_ref().map(|m| m.address.clone()).unwrap_or_default();
        let believed = fixed.config.agent(&sender).is_some()
            && decide::from_is_believed(&fixed.config, &envelope, &inbound, &sender);
        let decision = decide::decide(&facts, &envelope, &inbound, ticket.as_ref(), None, pipeline::NOW);
        if let Decision::Record(plan) = &decision {
            let notes = plan.entries.iter().any(|e| e.kind == EntryKind::WorkNote);
            // A believed agent's forward also logs their words as a work note.
            prop_assert!(!notes || believed, "a work note from {sender} (not believed): {plan:#?}");
            for e in &plan.entries {
                prop_assert!(!e.by_agent || believed, "entry by_agent for {sender}");
            }
        }
    }
}
