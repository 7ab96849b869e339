//! The rules on plain values: one test per rule or per case a bug showed.

use super::*;
use crate::parse::AuthResult;

const AGENT: &str = "jane.doe@example.org";
const AGENT2: &str = "bob.agent@example.org";
/// The time of the decisions (Unix seconds, in 2027).
const NOW: i64 = 1_800_000_000;
const DAY: i64 = 86_400;

fn config() -> Config {
    let mut config = Config::from_toml(include_str!("../../fixtures/rules.toml"), "test")
        .expect("fixtures/rules.toml");
    // Here Bob joins every new ticket's work-notes list too, so a ticket
    // opened by mail has two agents to copy.
    config.agents[1].default_notes_list = true;
    config
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
        resolved_at: None,
        owner: Some(AGENT.into()),
        requesters: vec![Mailbox::new(Some("Alice"), "alice@u.example")],
        watch_list: vec![Mailbox::new(None, "carol@u.example")],
        work_notes_list: vec![AGENT.into(), AGENT2.into()],
        thread: Vec::new(),
    }
}

/// `f` on the facts of `config`, with old.agent@ as the former agent.
fn with_facts<T>(config: &Config, f: impl FnOnce(&Facts<'_>) -> T) -> T {
    let former = BTreeSet::from(["old.agent@example.org".to_string()]);
    f(&Facts {
        config,
        former_agents: &former,
        reply_key: None,
    })
}

fn run(env: &Envelope, inbound: &Inbound, t: Option<&TicketView>) -> Decision {
    with_facts(&config(), |facts| decide(facts, env, inbound, t, None, NOW))
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
    assert_eq!(
        with_facts(&config, |facts| decide(
            facts,
            &env,
            &inbound,
            None,
            Some(3),
            NOW
        )),
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
    t.resolved_at = Some(NOW - DAY);
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

#[test]
fn references_hold_the_first_and_the_last_ten_never_an_agents_id_for_non_agents() {
    let thread: Vec<ThreadRef> = (0..15)
        .map(|i| ThreadRef {
            message_id: format!("m{i}@x"),
            agent_inbound: i == 14,
        })
        .collect();
    let to_agents = references(&thread, true);
    assert_eq!(to_agents.len(), 11);
    assert_eq!(to_agents[0], "m0@x");
    assert_eq!(to_agents[1], "m5@x");
    assert_eq!(to_agents.last().map(String::as_str), Some("m14@x"));
    let to_others = references(&thread, false);
    assert_eq!(to_others[0], "m0@x");
    assert_eq!(to_others[1], "m4@x");
    assert!(!to_others.iter().any(|r| r == "m14@x"));
}

#[test]
fn no_failure_notice_about_a_notice_nor_to_an_empty_work_notes_list() {
    with_facts(&config(), no_failure_notice_about_a_notice);
}

fn no_failure_notice_about_a_notice(facts: &Facts<'_>) {
    let t = ticket();
    let notice = failure_notice(facts, &t, "public_copy").expect("a notice");
    assert_eq!(notice.envelope, [AGENT, AGENT2]);
    assert!(notice.agents_only);
    assert!(failure_notice(facts, &t, "failure_notice").is_none());
    assert!(failure_notice(facts, &t, "reply_all_notice").is_none());
    let mut alone = ticket();
    alone.work_notes_list.clear();
    assert!(failure_notice(facts, &alone, "public_copy").is_none());
}

#[test]
fn the_e_mail_function_names_an_agent_without_a_name_by_local_part() {
    let mut config = config();
    config.agents[0].name = String::new();
    let agent = Mailbox::new(None, AGENT);
    let to = ["x@u.example".to_string()];
    let (entry, send) = with_facts(&config, |f| email(f, &agent, &to, &[], "RE: hi", "t"));
    assert_eq!(entry.kind, EntryKind::Email);
    assert_eq!(send.from_name, "jane.doe via Soutien TI");
    assert_eq!(send.envelope, ["x@u.example"]);
}

#[test]
fn the_watch_group_admits_no_agent_and_no_crm_address() {
    with_facts(&config(), the_watch_group_admits);
}

fn the_watch_group_admits(facts: &Facts<'_>) {
    assert_eq!(admit_to_watch_group(facts, AGENT), Err(NotAdmitted::Agent));
    assert_eq!(
        admit_to_watch_group(facts, "old.agent@example.org"),
        Err(NotAdmitted::Agent)
    );
    assert_eq!(
        admit_to_watch_group(facts, "support+x@example.org"),
        Err(NotAdmitted::CrmAddress)
    );
    assert_eq!(admit_to_watch_group(facts, "carol@u.example"), Ok(()));
}

#[test]
fn crmgates_own_check_believes_an_agent_and_an_spf_fail_stops_the_receipt() {
    let mut inbound = mail(AGENT, &["support-notes@example.org"], &[], "[TKT0000007] x");
    let env = envelope(AGENT, &["support-notes@example.org"], false);
    inbound.sender_check.from_verified = true;
    let p = plan(run(&env, &inbound, Some(&ticket())));
    assert_eq!(p.entries[0].kind, EntryKind::WorkNote);

    let env = envelope("alice@u.example", &["support@example.org"], false);
    let mut inbound = mail(
        "alice@u.example",
        &["support@example.org"],
        &[],
        "Imprimante",
    );
    inbound.sender_check.spf_fail = Some("u.example".into());
    let p = plan(run(&env, &inbound, None));
    assert!(p.sends.iter().all(|s| s.kind != SendKind::Receipt));
    let system = p
        .entries
        .iter()
        .find(|e| e.kind == EntryKind::System)
        .unwrap();
    assert!(system.text.contains("SPF") && system.text.contains("u.example"));
    // The ticket itself is opened as for anyone.
    assert_eq!(p.entries[0].kind, EntryKind::Comment);
}

#[test]
fn a_strangers_opening_mail_with_more_cc_than_max_cc_on_open_adds_no_watcher() {
    let env = envelope("mallory@evil.example", &["support@example.org"], false);
    let many: Vec<String> = (0..500).map(|i| format!("victim{i}@u.example")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let inbound = mail(
        "mallory@evil.example",
        &["support@example.org"],
        &many,
        "PayPal",
    );
    let p = plan(run(&env, &inbound, None));
    let TicketTarget::New(new) = &p.ticket else {
        panic!()
    };
    assert!(new.watch_list.is_empty());
    let note = p
        .entries
        .iter()
        .find(|e| e.kind == EntryKind::System)
        .unwrap();
    assert!(note.text.contains("500 addresses") && note.text.contains("max_cc_on_open (10)"));
    assert!(
        p.sends
            .iter()
            .all(|s| !s.envelope.iter().any(|a| a.starts_with("victim"))),
        "{:?}",
        p.sends
    );

    // Ten is within the bound; a believed agent has none.
    let inbound = mail(
        "alice@u.example",
        &["support@example.org"],
        &many[..10],
        "x",
    );
    let p = plan(run(
        &envelope("alice@u.example", &["support@example.org"], false),
        &inbound,
        None,
    ));
    let TicketTarget::New(new) = &p.ticket else {
        panic!()
    };
    assert_eq!(new.watch_list.len(), 10);
    let inbound = mail(AGENT, &["support@example.org"], &many[..30], "x");
    let p = plan(run(
        &envelope(AGENT, &["support@example.org"], true),
        &inbound,
        None,
    ));
    let TicketTarget::New(new) = &p.ticket else {
        panic!()
    };
    assert_eq!(new.watch_list.len(), 30);
}

#[test]
fn a_human_list_opens_tickets_other_lists_are_automatic() {
    let mut config = config();
    config.auto.human_lists = vec!["staff.u.example".into()];
    let former = BTreeSet::new();
    let facts = Facts {
        config: &config,
        former_agents: &former,
        reply_key: None,
    };
    let env = envelope("alice@u.example", &["support@example.org"], false);
    let mut inbound = mail("alice@u.example", &["support@example.org"], &[], "Panne");
    inbound.auto = Some(crate::parse::AutoSignal::Precedence("list".into()));
    inbound.list_ids = vec!["staff.u.example".into()];
    let p = plan(decide(&facts, &env, &inbound, None, None, NOW));
    assert_eq!(p.entries[0].kind, EntryKind::Comment);
    inbound.list_ids = vec!["news.u.example".into()];
    assert!(matches!(
        decide(&facts, &env, &inbound, None, None, NOW),
        Decision::Quarantine(QuarantineReason::Automatic)
    ));
}

/// The ticket of [`ticket`], resolved `ago` seconds before [`NOW`].
fn resolved(ago: i64) -> TicketView {
    TicketView {
        state: TicketState::Resolved,
        resolved_at: Some(NOW - ago),
        ..ticket()
    }
}

/// Alice's reply to TKT0000007, with `config`.
fn alices_reply(config: &Config, t: &TicketView) -> Plan {
    let env = envelope("alice@u.example", &["support@example.org"], false);
    let inbound = mail(
        "alice@u.example",
        &["support@example.org"],
        &[],
        "RE: [TKT0000007] Imprimante",
    );
    plan(with_facts(config, |facts| {
        decide(facts, &env, &inbound, Some(t), None, NOW)
    }))
}

#[test]
fn a_requesters_reply_within_the_reopen_window_reopens_and_a_later_one_opens_a_new_ticket() {
    let config = config();
    assert_eq!(config.ticket.reopen_within_days, 30);
    for ago in [30 * DAY - 1, 30 * DAY] {
        let p = alices_reply(&config, &resolved(ago));
        assert_eq!(p.ticket, TicketTarget::Existing(7), "{ago}");
        assert_eq!(p.state, Some(TicketState::Open));
        assert_eq!(p.follows, None);
    }
    let p = alices_reply(&config, &resolved(30 * DAY + 1));
    let TicketTarget::New(new) = &p.ticket else {
        panic!("a new ticket: {p:?}")
    };
    // As any ticket Alice's mail opens: hers, the default work-notes list,
    // no watcher of the old ticket (Carol), no owner.
    assert_eq!(new.requesters, [Mailbox::new(None, "alice@u.example")]);
    assert!(new.watch_list.is_empty());
    assert_eq!(new.work_notes_list, [AGENT, AGENT2]);
    assert_eq!(new.owner, None);
    assert_eq!(new.subject, "Imprimante");
    assert_eq!(p.state, None);
    assert_eq!(p.decision, Recorded::Comment);
    // The message once, then the first `system` entry naming the old ticket.
    let kinds: Vec<EntryKind> = p.entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EntryKind::Comment, EntryKind::System, EntryKind::Receipt]
    );
    assert!(p.entries[0].message_id.is_some());
    assert!(p.entries[1].text.contains("follows TKT0000007"), "{p:?}");
    assert!(p.entries[1].text.contains("30 days"));
    assert_eq!(
        p.follows,
        Some(Follows {
            id: 7,
            subject: "Imprimante".into(),
            sender: "alice@u.example".into(),
            days: 30,
        })
    );
    assert_eq!(send(&p, SendKind::Receipt).envelope, ["alice@u.example"]);
    assert_eq!(send(&p, SendKind::Receipt).entry, 2);
    assert_eq!(send(&p, SendKind::AgentCopy).entry, 0);
    assert!(followed_by(p.follows.as_ref().unwrap(), "TKT0000042").contains("opened TKT0000042"));
}

#[test]
fn with_no_reopen_window_every_reply_to_a_resolved_ticket_opens_a_new_one() {
    let mut config = config();
    config.ticket.reopen_within_days = 0;
    for ago in [0, 1, DAY] {
        let p = alices_reply(&config, &resolved(ago));
        assert!(matches!(p.ticket, TicketTarget::New(_)), "{ago}: {p:?}");
        assert_eq!(p.follows.as_ref().map(|f| f.id), Some(7));
    }
    // An open ticket takes the reply as always.
    let p = alices_reply(&config, &ticket());
    assert_eq!(p.ticket, TicketTarget::Existing(7));
}

#[test]
fn past_the_window_only_a_requesters_reopening_reply_opens_a_new_ticket() {
    let late = resolved(31 * DAY);
    // reopen_on_reply off: the reply stays on the resolved ticket, as ever.
    let mut config = config();
    config.ticket.reopen_on_reply = false;
    let p = alices_reply(&config, &late);
    assert_eq!(
        (p.ticket, p.state, p.follows),
        (TicketTarget::Existing(7), None, None)
    );
    // A watcher's reply never reopened: it stays on the ticket too.
    let env = envelope("carol@u.example", &["support@example.org"], false);
    let inbound = mail(
        "carol@u.example",
        &["support@example.org"],
        &[],
        "RE: [TKT0000007]",
    );
    let p = plan(run(&env, &inbound, Some(&late)));
    assert_eq!(
        (p.ticket, p.state, p.follows),
        (TicketTarget::Existing(7), None, None)
    );
    // An agent's comment on the resolved ticket stays on it, as before.
    let env = envelope(AGENT, &["support@example.org"], true);
    let inbound = mail(AGENT, &["support@example.org"], &[], "RE: [TKT0000007]");
    let p = plan(run(&env, &inbound, Some(&late)));
    assert_eq!(
        (p.ticket, p.state, p.follows),
        (TicketTarget::Existing(7), None, None)
    );
    assert_eq!(p.entries[0].kind, EntryKind::Comment);
}
