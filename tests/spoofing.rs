//! Spoofed agents, end to end: an outsider who forges an agent's From must
//! get nowhere. The gateway runs with `trusted_relays` that do not hold
//! 127.0.0.1 (the tests' own peer) and `authserv_id = "mx.example.org"`, so
//! an agent is believed only on a passing `Authentication-Results` of that
//! id standing top-most. Each attack is tried with every forgery below;
//! a genuine result of ours is the control that shows the test can fail.
//!
//! Per the SPEC, an unbelieved agent From is an outsider: a stranger's mail.
//! It may not write a work note (`550 5.7.1`), publish as the helpdesk (its
//! comment reaches the agents only, as a partner's `email` entry), open a
//! ticket for someone else by a forged forward, or read a work note.
//! The same forgeries through `crmgate deliver` (the pipe transport) are
//! refused with exit 77.

mod common;

use common::gateway::{header, to, Gateway, Mark, BOB, INTERNAL, JANE, PUBLIC};
use common::sink::Received;
use serde_json::Value;

/// Loopback is not trusted; our MTA's authserv-id is.
const HOSTILE: &str = "trusted_relays = [\"192.0.2.0/24\"]\nauthserv_id = \"mx.example.org\"";

/// The forgeries: `Authentication-Results` lines an outsider can get into
/// the message (or nothing at all), each with the hole it probes.
const FORGERIES: [(&str, &str); 8] = [
    ("no Authentication-Results at all", ""),
    (
        "a passing result of another authserv-id",
        "Authentication-Results: evil.example; dkim=pass header.d=example.org; dmarc=pass header.from=example.org\n",
    ),
    (
        "a forged pass placed below our MTA's failing result",
        "Authentication-Results: mx.example.org; dkim=none; dmarc=fail header.from=example.org\n\
         Authentication-Results: mx.example.org; dkim=pass header.d=example.org; dmarc=pass header.from=example.org\n",
    ),
    (
        "DKIM pass for a non-aligned domain",
        "Authentication-Results: mx.example.org; dkim=pass header.d=evil.example; dmarc=fail header.from=example.org\n",
    ),
    (
        "DKIM pass for a look-alike domain that ends like the From's",
        "Authentication-Results: mx.example.org; dkim=pass header.d=evilexample.org; dkim=pass header.d=example.org.evil.example; dmarc=fail\n",
    ),
    (
        "dmarc=pass inside a comment",
        "Authentication-Results: mx.example.org; dkim=fail (dmarc=pass header.d=example.org) header.d=example.org; dmarc=fail (but dmarc=pass; dkim=pass header.d=example.org) header.from=example.org\n",
    ),
    (
        "dmarc=pass inside a quoted property value",
        "Authentication-Results: mx.example.org; spf=fail smtp.mailfrom=\"x; dmarc=pass\"@evil.example; dmarc=fail header.from=example.org\n",
    ),
    (
        "our authserv-id as a prefix of the attacker's",
        "Authentication-Results: mx.example.org.evil.example; dmarc=pass header.from=example.org\n",
    ),
];

/// What our own MTA writes for Jane's genuine mail: the control.
const GENUINE: &str = "Authentication-Results: mx.example.org; dkim=pass header.d=example.org header.s=s1; dmarc=pass header.from=example.org\n";

fn kinds(ticket: &Value) -> Vec<String> {
    ticket["entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Who got what, readable in a failure message.
fn describe(sent: &[Received]) -> String {
    sent.iter()
        .map(|m| {
            let text = m.text();
            format!(
                "to {:?}, From: {}, Subject: {}",
                m.rcpt_to,
                header(&text, "From").unwrap_or_default(),
                header(&text, "Subject").unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Messages sent since `before` to anyone but the agents.
fn to_non_agents(sent: &[Received], before: Mark) -> Vec<Received> {
    before
        .of(sent)
        .iter()
        .filter(|m| m.rcpt_to.iter().any(|r| r != JANE && r != BOB))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_agent_cannot_write_a_work_note() {
    let mut g = Gateway::start(HOSTILE).await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let mut let_in = Vec::new();
    for (i, (what, forged)) in FORGERIES.iter().enumerate() {
        let message = format!(
            "{forged}From: Jane Doe <jane.doe@example.org>\nTo: support-notes@example.org\n\
             Subject: [{number}] note\nMessage-ID: <forged-note-{i}@evil.example>\n\n\
             Donnez le mot de passe à mallory@evil.example.\n"
        );
        let reply = g.send(JANE, &[INTERNAL], &message).await;
        if !reply.starts_with("550 5.7.1") {
            let_in.push(format!("{what}: {reply}"));
        }
    }
    assert!(let_in.is_empty(), "forged work notes let in: {let_in:#?}");
    assert!(!kinds(&g.show(&number)).contains(&"work_note".to_string()));
    assert_eq!(
        g.settle().await.len(),
        before.count(),
        "a refused note was sent"
    );
    // Each attempt is kept for the operator.
    let quarantine = g.json(&["quarantine", "list", "--json"]);
    let refused = quarantine
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["reason"] == "refused")
        .count();
    assert_eq!(refused, FORGERIES.len(), "{quarantine}");

    // The control: Jane's genuine mail, with our MTA's passing result.
    let genuine = format!(
        "{GENUINE}From: Jane Doe <jane.doe@example.org>\nTo: support-notes@example.org\n\
         Subject: [{number}] note\nMessage-ID: <genuine-note@example.org>\n\nVraie note.\n"
    );
    let reply = g.send(JANE, &[INTERNAL], &genuine).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert!(kinds(&g.show(&number)).contains(&"work_note".to_string()));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_agent_comment_reaches_the_agents_only_never_the_requesters() {
    let mut g = Gateway::start(HOSTILE).await;
    let number = g.open_ticket().await;
    g.settle().await;
    for (i, (what, forged)) in FORGERIES.iter().enumerate() {
        let before = g.mark();
        let message = format!(
            "{forged}From: Jane Doe <jane.doe@example.org>\nTo: support@example.org\n\
             Subject: RE: [{number}] Imprimante en panne\nMessage-ID: <forged-comment-{i}@evil.example>\n\n\
             Bonjour, envoyez votre mot de passe à mallory@evil.example.\n"
        );
        let reply = g.send(JANE, &[PUBLIC], &message).await;
        assert!(reply.starts_with("250"), "{what}: {reply}");
        let sent = g.settle().await;
        let leaked = to_non_agents(&sent, before);
        assert!(
            leaked.is_empty(),
            "{what}: published to requesters as the helpdesk: {}",
            describe(&leaked)
        );
        // An outsider's mail: an `email` entry for the agents, not an agent's comment.
        let t = g.show(&number);
        let last = t["entries"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["kind"], "email", "{what}: {last}");
        assert_eq!(
            t["state"], "new",
            "{what}: a forged agent opened the ticket"
        );
        let agent_copies = before.of(&sent);
        assert_eq!(agent_copies.len(), 1, "{what}: {}", describe(agent_copies));
        // Jane, whose name was forged, learns of it; both see it marked.
        assert_eq!(agent_copies[0].rcpt_to, [JANE, BOB], "{what}");
        let from = mail_parser::MessageParser::default()
            .parse(&agent_copies[0].data)
            .and_then(|m| {
                m.from()
                    .and_then(|f| f.first())
                    .and_then(|f| f.name().map(str::to_string))
            });
        assert_eq!(
            from.as_deref(),
            Some("Jane Doe (expéditeur non vérifié: jane.doe@example.org) via Soutien TI"),
            "{what}"
        );
        assert_eq!(
            header(&agent_copies[0].text(), "Auto-Submitted"),
            Some("auto-generated")
        );
    }

    // The control: the same comment, genuine, reaches Alice and Carol.
    let before = g.mark();
    let genuine = format!(
        "{GENUINE}From: Jane Doe <jane.doe@example.org>\nTo: support@example.org\n\
         Subject: RE: [{number}] Imprimante en panne\nMessage-ID: <genuine-comment@example.org>\n\nRedémarrez-la.\n"
    );
    assert!(g.send(JANE, &[PUBLIC], &genuine).await.starts_with("250"));
    let sent = g.settle().await;
    let public = to(before.of(&sent), "alice@u.example");
    assert_eq!(public.len(), 1, "{}", describe(before.of(&sent)));
    assert!(header(&public[0].text(), "From")
        .unwrap()
        .contains("Jane Doe via Soutien TI"));
    g.stop().await;
}

/// A Gmail-style forward of Victim's mail, as an agent would send it.
fn forward(forged: &str, i: usize) -> String {
    format!(
        "{forged}From: Jane Doe <jane.doe@example.org>\nTo: support@example.org\n\
         Subject: Fwd: Compte bloqué {i}\nMessage-ID: <forged-forward-{i}@evil.example>\n\n\
         Peux-tu regarder ?\n\n---------- Forwarded message ---------\n\
         From: Victor Victim <victim@u.example>\nDate: Mon, Mar 4, 2024 at 10:12 AM\n\
         Subject: Compte bloqué {i}\nTo: Jane Doe <jane.doe@example.org>\n\n\
         Mon compte est bloqué.\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_agent_forward_opens_no_ticket_for_someone_else() {
    let mut g = Gateway::start(HOSTILE).await;
    for (i, (what, forged)) in FORGERIES.iter().enumerate() {
        let reply = g.send(JANE, &[PUBLIC], &forward(forged, i)).await;
        assert!(reply.starts_with("250"), "{what}: {reply}");
    }
    let sent = g.settle().await;
    assert!(
        to(&sent, "victim@u.example").is_empty(),
        "the victim got mail from a forged forward: {}",
        describe(&sent)
    );
    let list = g.json(&["ticket", "list", "--json"]);
    let mut wrong = Vec::new();
    assert_eq!(list.as_array().unwrap().len(), FORGERIES.len(), "{list}");
    for t in list.as_array().unwrap() {
        let subject = t["subject"].as_str().unwrap_or_default();
        let i: usize = subject
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let what = FORGERIES.get(i).map_or(subject, |f| f.0);
        let requesters = &t["requesters"];
        let holds = |a: &str| {
            requesters
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x == a))
        };
        if holds("victim@u.example") {
            wrong.push(format!("{what}: the ticket was opened for the victim"));
        }
        if holds(JANE) {
            // The SPEC: a watch group never contains an agent.
            wrong.push(format!("{what}: the agent's address is a requester"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\n{list}");
    assert!(
        to_non_agents(&sent, Mark::START).is_empty(),
        "{}",
        describe(&sent)
    );

    // The control: the genuine forward opens the ticket for Victim, who gets the receipt.
    let before = Mark::after(&sent);
    let reply = g.send(JANE, &[PUBLIC], &forward(GENUINE, 99)).await;
    assert!(reply.starts_with("250"), "{reply}");
    let sent = g.settle().await;
    let receipt = to(before.of(&sent), "victim@u.example");
    assert_eq!(receipt.len(), 1, "{}", describe(before.of(&sent)));
    g.stop().await;
}

/// Jane writes a work note through the CLI; returns everything the relay
/// has got since the gateway started, and the note as Bob received it
/// (`body` in ASCII: it is looked for in the encoded message).
async fn jane_writes_a_work_note(
    g: &Gateway,
    number: &str,
    body: &str,
) -> (Vec<Received>, Received) {
    let (code, _, err) = g.cli(&["ticket", "work-note", number, "--by", JANE, "--body", body]);
    assert_eq!(code, 0, "{err}");
    let sent = g.settle().await;
    let note: Vec<Received> = to(&sent, BOB)
        .into_iter()
        .filter(|m| m.text().contains(body))
        .collect();
    assert_eq!(note.len(), 1, "{}", describe(&sent));
    let note = note[0].clone();
    (sent, note)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsider_cannot_read_a_work_note() {
    let mut g = Gateway::start(HOSTILE).await;
    let number = g.open_ticket().await;
    g.settle().await;
    let body = "Le mot de passe provisoire est hunter2.";
    let (sent, note) = jane_writes_a_work_note(&g, &number, body).await;
    let note_id = header(&note.text(), "Message-ID").unwrap().to_string();
    let before = Mark::after(&sent);

    // Replies to the work note: as Mallory, as Alice the requester, and as
    // a forged Jane, to the internal address, a +tag of it, or with it in Cc.
    let attempts: Vec<(&str, &str, Vec<&str>, String)> = vec![
        (
            "an outsider's reply to the internal address",
            "mallory@evil.example",
            vec![INTERNAL],
            format!("From: mallory@evil.example\nTo: {INTERNAL}\nSubject: RE: [{number}] Imprimante en panne\nIn-Reply-To: {note_id}\n\nEt le mot de passe ?\n"),
        ),
        (
            "an outsider's reply to a +tag of the internal address",
            "mallory@evil.example",
            vec!["support-notes+tkt0000001@example.org"],
            format!("From: mallory@evil.example\nTo: support-notes+{number}@example.org\nSubject: RE: [{number}] x\nIn-Reply-To: {note_id}\n\nEt alors ?\n"),
        ),
        (
            "an outsider with the internal address in Cc only",
            "mallory@evil.example",
            vec![PUBLIC],
            format!("From: mallory@evil.example\nTo: {PUBLIC}\nCc: {INTERNAL}\nSubject: RE: [{number}] x\nIn-Reply-To: {note_id}\n\nEt alors ?\n"),
        ),
        (
            "the requester's reply to the internal address",
            "alice@u.example",
            vec![INTERNAL],
            format!("From: Alice Martin <alice@u.example>\nTo: {INTERNAL}\nSubject: RE: [{number}] x\nIn-Reply-To: {note_id}\n\nJe veux voir.\n"),
        ),
        (
            "a forged agent's reply to the internal address",
            JANE,
            vec![INTERNAL],
            format!("From: Jane Doe <jane.doe@example.org>\nTo: {INTERNAL}\nCc: mallory@evil.example\nSubject: RE: [{number}] x\nIn-Reply-To: {note_id}\n\nAjoute mallory.\n"),
        ),
    ];
    let mut let_in = Vec::new();
    for (what, from, rcpt, message) in &attempts {
        let reply = g.send(from, rcpt, message).await;
        if !reply.starts_with("550 5.7.1") {
            let_in.push(format!("{what}: {reply}"));
        }
    }
    assert!(let_in.is_empty(), "{let_in:#?}");

    // A reply to the public address that threads on the note's Message-ID:
    // accepted as a stranger's mail, for the agents only.
    let reply = g
        .send(
            "mallory@evil.example",
            &[PUBLIC],
            &format!("From: mallory@evil.example\nTo: {PUBLIC}\nSubject: RE: la note\nIn-Reply-To: {note_id}\nReferences: {note_id}\n\nJe veux la note.\n"),
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let sent = g.settle().await;
    for m in before.of(&sent) {
        assert!(
            m.rcpt_to.iter().all(|r| r == JANE || r == BOB),
            "mail to a non-agent after the note: {}",
            describe(std::slice::from_ref(m))
        );
    }
    // Nobody but the agents ever saw the note's text.
    for m in &sent {
        if m.rcpt_to.iter().any(|r| r != JANE && r != BOB) {
            assert!(!m.text().contains("hunter2"), "{}", m.text());
        }
    }
    let t = g.show(&number);
    let everyone: Vec<&Value> = ["requesters", "watch_list", "work_notes_list"]
        .iter()
        .flat_map(|k| t[*k].as_array().into_iter().flatten())
        .collect();
    assert!(everyone.iter().all(|a| *a != "mallory@evil.example"), "{t}");
    g.stop().await;
}

/// `crmgate deliver` (the MTA's pipe transport) runs with peer 127.0.0.1:
/// when loopback is not trusted, a forged agent is refused there too (exit
/// 77, EX_NOPERM), and believed only on our MTA's passing result. With the
/// default `trusted_relays` (loopback) every agent From through the pipe
/// would be believed: see docs/security.md (the threat model).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_agent_through_the_pipe_transport_is_refused() {
    let mut g = Gateway::start(HOSTILE).await;
    let number = g.open_ticket().await;
    g.settle().await;
    let deliver = |message: &str| -> i32 {
        let args = ["--sender", JANE, "--recipient", INTERNAL];
        g.deliver(&args, message.as_bytes())
            .status
            .code()
            .unwrap_or(-1)
    };
    let mut let_in = Vec::new();
    for (i, (what, forged)) in FORGERIES.iter().enumerate() {
        let message = format!(
            "{forged}From: Jane Doe <jane.doe@example.org>\nTo: {INTERNAL}\n\
             Subject: [{number}] note\nMessage-ID: <piped-{i}@evil.example>\n\nx\n"
        );
        let code = deliver(&message);
        if code != 77 {
            let_in.push(format!("{what}: exit {code}"));
        }
    }
    assert!(let_in.is_empty(), "{let_in:#?}");
    let genuine = format!(
        "{GENUINE}From: Jane Doe <jane.doe@example.org>\nTo: {INTERNAL}\n\
         Subject: [{number}] note\nMessage-ID: <piped-genuine@example.org>\n\nx\n"
    );
    assert_eq!(deliver(&genuine), 0);
    assert!(kinds(&g.show(&number)).contains(&"work_note".to_string()));
    g.stop().await;
}

/// Forgeries that ride on a *genuine* pass of our MTA for another domain:
/// the attacker's own domain passes DMARC, and the From crmgate reads is
/// the agent's. Found here: crmgate believed `dmarc=pass` without comparing
/// its `header.from` with the From it reads, so a parser difference between
/// the MTA's DMARC check and mail-parser (which reads the *last* of two From
/// headers) made a forged agent believed. `parse` now counts `dmarc=pass`
/// only for the domain of a single From header with a single mailbox.
const PASS_FOR_ANOTHER_DOMAIN: [(&str, &str); 3] = [
    (
        "dmarc=pass for another header.from domain",
        "Authentication-Results: mx.example.org; dkim=pass header.d=evil.example; dmarc=pass header.from=evil.example\n\
         From: Jane Doe <jane.doe@example.org>\n",
    ),
    (
        "two From headers, the attacker's first",
        "Authentication-Results: mx.example.org; dkim=pass header.d=evil.example; dmarc=pass header.from=evil.example\n\
         From: Mallory <mallory@evil.example>\nFrom: Jane Doe <jane.doe@example.org>\n",
    ),
    (
        "two mailboxes in one From, the agent's first",
        "Authentication-Results: mx.example.org; dkim=pass header.d=evil.example; dmarc=pass header.from=evil.example\n\
         From: Jane Doe <jane.doe@example.org>, Mallory <mallory@evil.example>\n",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dmarc_pass_for_another_domain_does_not_make_an_agent() {
    let mut g = Gateway::start(HOSTILE).await;
    let number = g.open_ticket().await;
    g.settle().await;
    let mut let_in = Vec::new();
    for (i, (what, head)) in PASS_FOR_ANOTHER_DOMAIN.iter().enumerate() {
        let message = format!(
            "{head}To: {INTERNAL}\nSubject: [{number}] note\nMessage-ID: <other-domain-{i}@evil.example>\n\nx\n"
        );
        let reply = g.send("mallory@evil.example", &[INTERNAL], &message).await;
        if !reply.starts_with("550 5.7.1") {
            let_in.push(format!("{what}: {reply}"));
        }
    }
    assert!(let_in.is_empty(), "forged work notes let in: {let_in:#?}");
    g.stop().await;
}

/// With `reply_secret_file`, a work note's Reply-To is
/// `support-notes+NUMBER.MAC@…`: an agent's reply to it comes back as a
/// work note on that ticket even when the Subject lost its number; the same
/// address with another number or a made-up MAC names no ticket; and an
/// outsider who has the address still cannot write a work note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_a_work_note_comes_back_as_a_work_note_on_its_ticket() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("reply.key");
    std::fs::write(&key, "9f2c61d0a4b84e17b3c55e0a7d2f8c41\n").unwrap();
    let mut g = Gateway::start(&format!(
        "{HOSTILE}\nreply_secret_file = \"{}\"",
        key.display()
    ))
    .await;
    let number = g.open_ticket().await;
    let (sent, note) = jane_writes_a_work_note(&g, &number, "Carte reseau a changer.").await;
    let text = note.text();
    assert!(
        header(&text, "From").is_some_and(|f| f.ends_with(&format!("<{INTERNAL}>"))),
        "{text}"
    );
    let reply_to_of = |m: &Received| -> Option<String> {
        let parsed = mail_parser::MessageParser::default().parse(&m.data)?;
        let first = parsed.reply_to()?.first()?;
        first.address().map(str::to_string)
    };
    let signed = reply_to_of(&note).unwrap_or_default();
    assert!(
        signed.starts_with(&format!("support-notes+{number}.")) && signed.ends_with("@example.org"),
        "work note Reply-To: {signed:?}"
    );
    // The public copy and the receipt keep Reply-To = From.
    let to_alice = to(&sent, "alice@u.example");
    assert!(!to_alice.is_empty(), "{}", describe(&sent));
    for m in &to_alice {
        assert_eq!(reply_to_of(m).as_deref(), Some(PUBLIC), "{}", m.text());
    }
    let entries = kinds(&g.show(&number)).len();
    // Bob's genuine mail to `address`; its reply must be 250.
    let bob_writes_to = |address: String, subject: &'static str| {
        let message = format!(
            "{GENUINE}From: Bob Agent <{BOB}>\nTo: {address}\nSubject: {subject}\n\nBonjour.\n"
        );
        let g = &g;
        async move {
            let reply = g.send(BOB, &[&address], &message).await;
            assert!(reply.starts_with("250"), "{address}: {reply}");
        }
    };

    // Bob's genuine reply to the signed address, the Subject rewritten.
    bob_writes_to(signed.clone(), "commande passée").await;
    let t = g.show(&number);
    let k = kinds(&t);
    assert_eq!(k.len(), entries + 1, "{t}");
    assert_eq!(k.last().map(String::as_str), Some("work_note"), "{t}");
    assert_eq!(
        g.json(&["ticket", "list", "--json"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // The MAC moved to another number, or made up: the tag names nothing,
    // so Bob's mail (no number in the Subject) opens a ticket of its own.
    let local = signed.split_once('@').map(|(l, _)| l).unwrap_or_default();
    let mac = local.rsplit_once('.').map(|(_, m)| m).unwrap_or_default();
    for (forged, subject) in [
        (
            format!("support-notes+TKT0000009.{mac}@example.org"),
            "autre 0",
        ),
        (
            format!("support-notes+{number}.0123456789@example.org"),
            "autre 1",
        ),
    ] {
        bob_writes_to(forged.clone(), subject).await;
        assert_eq!(kinds(&g.show(&number)).len(), entries + 1, "{forged}");
    }
    assert_eq!(
        g.json(&["ticket", "list", "--json"])
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    // The address is no key to the notes: Mallory, and Alice, are refused.
    for from in ["mallory@evil.example", "alice@u.example"] {
        let reply = g
            .send(
                from,
                &[&signed],
                &format!("From: {from}\nTo: {signed}\nSubject: RE: [{number}] x\n\nMontrez-moi.\n"),
            )
            .await;
        assert!(reply.starts_with("550 5.7.1"), "{from}: {reply}");
    }
    g.stop().await;
}
