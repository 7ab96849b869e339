//! The helpdesk's life cycle, end to end: forwards that open tickets for
//! the requester, closure and reopening, the e-mail function and its
//! partners, bounces, caps, the reply-all notice, `crmgate deliver`, and
//! agents who leave.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::client::Client;
use common::gateway::*;
use serde_json::Value;

const MORE_AGENTS: &str = r#"
[[agents]]
name = "Jean Agent"
email = "jean.agent@example.org"

[[agents]]
name = "John Agent"
email = "john.agent@example.org"
"#;

fn fixture(path: &str) -> String {
    let bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(path),
    )
    .unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn last_entry(t: &Value) -> Value {
    t["entries"].as_array().unwrap().last().unwrap().clone()
}

async fn a_forward_from_each_client_opens_a_ticket_for_the_original_sender() {
    let cases = [
        (
            "forwards/outlook-fr.eml",
            "jean.agent@example.org",
            "sophie.martin@example.com",
        ),
        ("forwards/gmail.eml", "jean.agent@example.org", ""),
        ("forwards/gmail-de.eml", "jean.agent@example.org", ""),
        ("forwards/outlook-en.eml", "john.agent@example.org", ""),
        ("forwards/apple-mail.eml", "jean.agent@example.org", ""),
        ("forwards/thunderbird.eml", "jean.agent@example.org", ""),
        (
            "forwards/thunderbird-fr-html.eml",
            "jean.agent@example.org",
            "",
        ),
    ];
    let mut g = Gateway::start_with("", MORE_AGENTS).await;
    for (i, (file, agent, expected)) in cases.iter().enumerate() {
        let message = fixture(file);
        let reply = g.send(agent, &[PUBLIC], &message).await;
        assert!(reply.starts_with("250"), "{file}: {reply}");
        let number = format!("TKT{:07}", i + 1);
        let t = g.show(&number);
        let requesters = t["requesters"].as_array().unwrap();
        assert_eq!(requesters.len(), 1, "{file}: {t}");
        let requester = requesters[0].as_str().unwrap();
        assert_ne!(requester, *agent, "{file}");
        if !expected.is_empty() {
            assert_eq!(requester, *expected, "{file}");
        }
        let kinds: Vec<&str> = t["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds[0], "comment", "{file}: {kinds:?}");
        assert_eq!(t["entries"][0]["from"], requester, "{file}");
        assert!(kinds.contains(&"work_note"), "{file}: {kinds:?}");
        assert!(kinds.contains(&"receipt"), "{file}: {kinds:?}");
        assert!(
            t["work_notes_list"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == agent),
            "{file}: {t}"
        );

        let sent = g.settle().await;
        let to_requester = to(&sent, requester);
        assert_eq!(
            to_requester.len(),
            1,
            "{file}: the requester gets the receipt only"
        );
        let text = to_requester[0].text();
        assert_eq!(
            header(&text, "Auto-Submitted"),
            Some("auto-replied"),
            "{file}"
        );
        assert!(
            !text.to_ascii_lowercase().contains(agent),
            "{file}: the agent's address leaked: {text}"
        );
    }
    // A subject prefix alone is no forward: the agent's own ticket, no requester.
    let reply = g
        .send(
            "jean.agent@example.org",
            &[PUBLIC],
            &fixture("forwards/subject-prefix-only.eml"),
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let t = g.show(&format!("TKT{:07}", cases.len() + 1));
    assert_eq!(t["requesters"], serde_json::json!([]));
    assert_eq!(t["owner"], "jean.agent@example.org");
    g.stop().await;
}

async fn resolve_sends_the_closure_to_the_watch_group_and_a_reply_reopens() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let (code, out, err) = g.cli(&["ticket", "resolve", &number, "--by", JANE]);
    assert_eq!(code, 0, "{out}{err}");
    let sent = g.settle().await;
    let closure: Vec<_> = before.of(&sent).to_vec();
    assert_eq!(closure.len(), 1, "{closure:?}");
    assert_eq!(closure[0].rcpt_to, ["alice@u.example", "carol@u.example"]);
    let text = closure[0].text();
    assert_eq!(header(&text, "Auto-Submitted"), Some("auto-generated"));
    assert_eq!(header(&text, "Precedence"), Some("bulk"));
    assert!(header(&text, "Subject")
        .unwrap()
        .contains(&format!("[{number}]")));
    assert_eq!(g.show(&number)["state"], "resolved");
    // Resolving twice is an error with one line.
    let (code, _, err) = g.cli(&["ticket", "resolve", &number]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let reply = format!("From: alice@u.example\nTo: support@example.org\nSubject: Re: [{number}] encore\n\nCa recommence.\n");
    assert!(g
        .send("alice@u.example", &[PUBLIC], &reply)
        .await
        .starts_with("250"));
    assert_eq!(g.show(&number)["state"], "open");
    g.cli(&["ticket", "resolve", &number]);
    let (code, _, err) = g.cli(&["ticket", "reopen", &number, "--by", BOB]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(g.show(&number)["state"], "open");
    g.stop().await;
}

/// Move a resolved ticket's resolution `days` into the past. The daemon
/// reads the real clock, so the test edits the log as an operator could,
/// between two messages; returns the new `resolved_at`.
fn resolved_days_ago(g: &Gateway, number: &str, days: i64) -> i64 {
    use crmgate::store::args;
    g.with_db(|db| {
        let changed = db
            .exec(
                "UPDATE tickets SET resolved_at = resolved_at - ?2 * 86400 \
                 WHERE number = ?1 AND state = 'resolved' AND resolved_at IS NOT NULL",
                args![number, days],
            )
            .unwrap();
        assert_eq!(changed, 1, "{number} is resolved with a time of resolution");
        db.query_row(
            "SELECT resolved_at FROM tickets WHERE number = ?1",
            args![number],
            |r| r.get(0),
        )
        .unwrap()
    })
}

fn has_system_entry(t: &Value, words: &str) -> bool {
    t["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "system" && e["body"].as_str().unwrap().contains(words))
}

async fn a_requesters_reply_past_the_reopen_window_opens_a_new_ticket_naming_the_old_one() {
    let mut g = Gateway::start("").await;
    let old = g.open_ticket().await;
    g.settle().await;
    let reply = |n: u32, text: &str| {
        format!(
            "From: Alice Martin <alice@u.example>\nTo: support@example.org\n\
             Subject: Re: [{old}] Imprimante en panne\nMessage-ID: <late-{n}@u.example>\n\
             In-Reply-To: <open-1@u.example>\n\n{text}\n"
        )
    };

    // 29 days after the resolution: the reply reopens the ticket.
    let (code, _, err) = g.cli(&["ticket", "resolve", &old, "--by", JANE]);
    assert_eq!(code, 0, "{err}");
    let now = crmgate::store::now();
    let at = resolved_days_ago(&g, &old, 29);
    assert!((now - 29 * 86_400 - at).abs() < 60, "{at}");
    let sent = reply(1, "Toujours en panne.");
    assert!(g
        .send("alice@u.example", &[PUBLIC], &sent)
        .await
        .starts_with("250"));
    assert_eq!(g.show(&old)["state"], "open");
    assert_eq!(
        g.json(&["ticket", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // 31 days after the next resolution: a new ticket.
    let (code, _, err) = g.cli(&["ticket", "resolve", &old]);
    assert_eq!(code, 0, "{err}");
    resolved_days_ago(&g, &old, 31);
    g.settle().await;
    let before = g.mark();
    let sent = reply(2, "Elle refait le meme bruit.");
    assert!(g
        .send("alice@u.example", &[PUBLIC], &sent)
        .await
        .starts_with("250"));
    let list = g.json(&["ticket", "list", "--json"]);
    let new: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["number"].as_str().unwrap().to_string())
        .filter(|n| *n != old)
        .collect();
    assert_eq!(new.len(), 1, "{list}");
    let new = &new[0];

    let o = g.show(&old);
    assert_eq!(o["state"], "resolved");
    assert!(has_system_entry(&o, &format!("opened {new}")), "{o}");
    assert!(
        !o["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["body"].as_str().unwrap().contains("meme bruit")),
        "the reply is logged on the new ticket only: {o}"
    );

    let t = g.show(new);
    assert_eq!(t["requesters"], serde_json::json!(["alice@u.example"]));
    assert_eq!(
        t["watch_list"],
        serde_json::json!([]),
        "Carol is not copied"
    );
    let entries = t["entries"].as_array().unwrap();
    assert_eq!(entries[0]["kind"], "comment");
    assert!(entries[0]["body"].as_str().unwrap().contains("meme bruit"));
    let first_system = entries.iter().find(|e| e["kind"] == "system").unwrap();
    assert!(
        first_system["body"]
            .as_str()
            .unwrap()
            .contains(&format!("follows {old}")),
        "{t}"
    );
    // Alice gets the receipt of the new ticket, as for any ticket she opens.
    let sent = g.settle().await;
    let to_alice = to(before.of(&sent), "alice@u.example");
    assert_eq!(to_alice.len(), 1, "{to_alice:?}");
    assert!(header(&to_alice[0].text(), "Subject")
        .unwrap()
        .contains(&format!("[{new}]")));
    g.stop().await;
}

async fn the_email_function_sends_attachments_and_a_partner_reply_reaches_only_agents() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let a = g.dir.path().join("journal.txt");
    let b = g.dir.path().join("capture.png");
    std::fs::write(&a, "ligne 1\nligne 2\n").unwrap();
    std::fs::write(&b, [0x89, b'P', b'N', b'G', 0, 1, 2, 3]).unwrap();
    let (code, out, err) = g.cli(&[
        "ticket",
        "email",
        &number,
        "--by",
        JANE,
        "--to",
        "vendor@partner.example",
        "--subject",
        "Pilote d'imprimante",
        "--body",
        "Bonjour, voyez les pièces jointes. Jane, jane.doe@example.org",
        "--attach",
        a.to_str().unwrap(),
        "--attach",
        b.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let sent = g.settle().await;
    let mail = to(before.of(&sent), "vendor@partner.example");
    assert_eq!(mail.len(), 1);
    let text = mail[0].text();
    assert!(
        text.contains("journal.txt") && text.contains("capture.png"),
        "{text}"
    );
    assert!(
        header(&text, "Auto-Submitted").is_none(),
        "a person's mail: {text}"
    );
    assert!(header(&text, "Subject")
        .unwrap()
        .contains(&format!("[{number}]")));
    assert!(
        !text.to_ascii_lowercase().contains("jane.doe@example.org"),
        "{text}"
    );
    let entry = last_entry(&g.show(&number));
    assert_eq!(entry["kind"], "email");
    assert_eq!(entry["attachments"].as_array().unwrap().len(), 2);

    // The partner answers; only the agents see it.
    let mid = header(&text, "Message-ID").unwrap().to_string();
    let before = g.mark();
    let reply = format!("From: vendor@partner.example\nTo: support@example.org\nSubject: Re: pilote\nIn-Reply-To: {mid}\n\nVoici le pilote.\n");
    assert!(g
        .send("vendor@partner.example", &[PUBLIC], &reply)
        .await
        .starts_with("250"));
    let sent = g.settle().await;
    let new = before.of(&sent);
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0].rcpt_to, [JANE, BOB]);
    assert_eq!(last_entry(&g.show(&number))["kind"], "email");
    g.stop().await;
}

async fn a_postfix_dsn_marks_the_row_failed_and_tells_the_agents() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    let sent = g.settle().await;
    let receipt = to(&sent, "alice@u.example").remove(0);
    let bounce_to = receipt.mail_from.clone();
    let original_id = header(&receipt.text(), "Message-ID").unwrap().to_string();
    let before = Mark::after(&sent);
    let dsn = postfix_dsn(&bounce_to, &original_id);
    let mut c = Client::connect(g.addr).await;
    c.expect("220").await;
    c.cmd("EHLO mx.u.example", "250").await;
    c.transaction(
        "",
        &[&bounce_to],
        dsn.replace('\n', "\r\n").as_bytes(),
        "250",
    )
    .await;
    let rows = g.json(&["outbox", "list", "--json"]);
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "receipt")
        .unwrap()
        .clone();
    assert_eq!(row["status"], "failed", "{rows}");
    assert!(
        row["last_error"].as_str().unwrap().contains("User unknown"),
        "{row}"
    );
    let sent = g.settle().await;
    let notices = before.of(&sent);
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].rcpt_to, [JANE, BOB]);
    assert!(notices[0].text().contains("alice@u.example"));
    let kinds: Vec<Value> = g.show(&number)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].clone())
        .collect();
    assert!(
        kinds.iter().filter(|k| *k == "system").count() >= 2,
        "{kinds:?}"
    );
    g.stop().await;
}

/// The report Postfix returns for a copy to alice@u.example that bounced:
/// to `to`, about the message `original_id` (with its angle brackets).
fn postfix_dsn(to: &str, original_id: &str) -> String {
    format!(
        "From: MAILER-DAEMON@mx.u.example (Mail Delivery System)\nTo: {to}\nSubject: Undelivered Mail Returned to Sender\n\
         Auto-Submitted: auto-replied\nMIME-Version: 1.0\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"B1\"\n\n\
         --B1\nContent-Description: Notification\nContent-Type: text/plain; charset=us-ascii\n\n\
         This is the mail system at host mx.u.example.\n\nI'm sorry to have to inform you that your message could not\nbe delivered.\n\n\
         --B1\nContent-Description: Delivery report\nContent-Type: message/delivery-status\n\n\
         Reporting-MTA: dns; mx.u.example\nArrival-Date: Fri, 27 Nov 2026 10:00:00 +0000\n\n\
         Final-Recipient: rfc822; alice@u.example\nOriginal-Recipient: rfc822;alice@u.example\nAction: failed\nStatus: 5.1.1\n\
         Diagnostic-Code: smtp; 550 5.1.1 <alice@u.example>: Recipient address rejected: User unknown\n\n\
         --B1\nContent-Description: Undelivered Message Headers\nContent-Type: text/rfc822-headers\n\n\
         From: Soutien TI <support@example.org>\nTo: alice@u.example\nMessage-ID: {original_id}\nSubject: receipt\n\n--B1--\n"
    )
}

/// A report sent to the public address rather than to the copy's signed
/// bounce address is matched by the Message-ID it returns, through the
/// ticket number in that Message-ID.
async fn a_dsn_without_bounce_address_finds_the_row_by_its_message_id() {
    let mut g = Gateway::start("").await;
    g.open_ticket().await;
    let sent = g.settle().await;
    let receipt = to(&sent, "alice@u.example").remove(0);
    let original_id = header(&receipt.text(), "Message-ID").unwrap().to_string();
    let dsn = postfix_dsn(PUBLIC, &original_id);
    let mut c = Client::connect(g.addr).await;
    c.expect("220").await;
    c.cmd("EHLO mx.u.example", "250").await;
    c.transaction("", &[PUBLIC], dsn.replace('\n', "\r\n").as_bytes(), "250")
        .await;
    let rows = g.json(&["outbox", "list", "--json"]);
    let rows = rows.as_array().unwrap();
    let receipt_row = rows.iter().find(|r| r["kind"] == "receipt").unwrap();
    assert_eq!(receipt_row["status"], "failed", "{rows:?}");
    assert!(
        receipt_row["last_error"]
            .as_str()
            .unwrap()
            .contains("User unknown"),
        "{receipt_row}"
    );
    assert_eq!(
        g.json(&["ticket", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    g.stop().await;
}

/// A reply whose only link to its ticket is the Message-ID of the copy it
/// answers (no number in the Subject, no tag) threads to that ticket; a
/// Message-ID shaped as ours that no copy had threads nowhere.
async fn a_reply_naming_only_our_copy_threads_and_a_lookalike_does_not() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    let sent = g.settle().await;
    let receipt = to(&sent, "alice@u.example").remove(0);
    let ours = header(&receipt.text(), "Message-ID").unwrap().to_string();
    assert!(ours.starts_with(&format!("<{number}.")), "{ours}");
    let entries = |g: &Gateway| g.show(&number)["entries"].as_array().unwrap().len();
    let before = entries(&g);
    let reply = format!(
        "From: Alice Martin <alice@u.example>\nTo: support@example.org\nSubject: Re: merci\n\
         Message-ID: <only-ours@u.example>\nIn-Reply-To: {ours}\n\nUne question encore.\n"
    );
    assert!(g
        .send("alice@u.example", &[PUBLIC], &reply)
        .await
        .starts_with("250"));
    g.settle().await;
    assert_eq!(entries(&g), before + 1);
    let t = g.show(&number);
    assert_eq!(last_entry(&t)["message_id"], "only-ours@u.example", "{t}");

    let (local, host) = ours.trim_matches(['<', '>']).split_once('@').unwrap();
    let lookalike = format!(
        "<{}.0123456789abcdef@{host}>",
        local.split_once('.').unwrap().0
    );
    assert_ne!(lookalike, ours);
    let stray = format!(
        "From: Alice Martin <alice@u.example>\nTo: support@example.org\nSubject: Re: autre chose\n\
         Message-ID: <lookalike@u.example>\nIn-Reply-To: {lookalike}\n\nAutre chose.\n"
    );
    assert!(g
        .send("alice@u.example", &[PUBLIC], &stray)
        .await
        .starts_with("250"));
    g.settle().await;
    assert_eq!(
        entries(&g),
        before + 1,
        "not on the ticket its number names"
    );
    let list = g.json(&["ticket", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    g.stop().await;
}

async fn an_auto_responder_without_auto_headers_is_cut_off_by_the_cap() {
    let mut g = Gateway::start_with("", "[auto]\nmax_resends_per_ticket_hour = 3\n").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    for i in 0..6 {
        let reply = format!(
            "From: alice@u.example\nTo: support@example.org\nSubject: Re: [{number}] Imprimante\nMessage-ID: <auto-{i}@u.example>\n\nJe suis en vacances ({i}).\n"
        );
        assert!(g
            .send("alice@u.example", &[PUBLIC], &reply)
            .await
            .starts_with("250"));
    }
    let sent = g.settle().await;
    let new = before.of(&sent);
    assert_eq!(to(new, "carol@u.example").len(), 3, "{new:?}");
    // Bob's count started with the agent copy of the opening mail.
    assert_eq!(to(new, BOB).len(), 2);
    let held: Vec<Value> = g.show(&number)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "system" && e["body"].as_str().unwrap().contains("not sent to"))
        .cloned()
        .collect();
    // One per held-back send: Bob's 4 agent copies, Carol's 3 public copies.
    assert_eq!(held.len(), 7, "{held:?}");
    // An agent's mail is never capped.
    let before = g.mark();
    let agent = format!("From: Jane.Doe@example.org\nTo: support@example.org\nSubject: Re: [{number}] Imprimante\n\nNous regardons.\n");
    assert!(g.send(JANE, &[PUBLIC], &agent).await.starts_with("250"));
    let sent = g.settle().await;
    assert_eq!(to(before.of(&sent), "carol@u.example").len(), 1);
    g.stop().await;
}

async fn an_agent_who_replies_to_all_gets_the_notice_once_a_day() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    for i in 0..2 {
        let m = format!(
            "From: Jane Doe <jane.doe@example.org>\nTo: support@example.org, alice@u.example\nSubject: RE: [{number}] Imprimante\nMessage-ID: <ra-{i}@example.org>\n\nRéponse {i}.\n"
        );
        assert!(g.send(JANE, &[PUBLIC], &m).await.starts_with("250"));
    }
    let sent = g.settle().await;
    let to_jane = to(before.of(&sent), JANE);
    assert_eq!(to_jane.len(), 1, "{to_jane:?}");
    assert!(to_jane[0].text().contains("CRM"), "{}", to_jane[0].text());
    g.stop().await;
}

async fn a_message_through_deliver_lands_like_one_over_smtp() {
    let mut g = Gateway::start("").await;
    let message = "From: Alice <alice@u.example>\nTo: support@example.org\nSubject: Par le pipe\nMessage-ID: <pipe-1@u.example>\n\nBonjour.\n";
    let run = |args: &[&str], input: &str| {
        let out = g.deliver(args, input.as_bytes());
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(
        &["--recipient", PUBLIC, "--sender", "alice@u.example"],
        message,
    );
    assert_eq!(code, 0, "{err}");
    let t = g.show("TKT0000001");
    assert_eq!(t["requesters"], serde_json::json!(["alice@u.example"]));
    assert_eq!(t["entries"][0]["message_id"], "pipe-1@u.example");
    // The running daemon sends what the pipe queued.
    let sent = g.settle().await;
    assert_eq!(to(&sent, "alice@u.example").len(), 1);
    // The same message again is a duplicate, not a second entry.
    assert_eq!(
        run(
            &["--recipient", PUBLIC, "--sender", "alice@u.example"],
            message
        )
        .0,
        0
    );
    assert_eq!(g.show("TKT0000001")["entries"].as_array().unwrap().len(), 2);
    // sysexits: unknown address, empty input, refused work note.
    assert_eq!(run(&["--recipient", "nobody@example.org"], message).0, 67);
    assert_eq!(run(&["--recipient", PUBLIC], "").0, 65);
    let note =
        "From: mallory@evil.example\nTo: support-notes@example.org\nSubject: [TKT0000001] x\n\nx\n";
    assert_eq!(
        run(
            &["--recipient", INTERNAL, "--sender", "mallory@evil.example"],
            note
        )
        .0,
        77
    );
    g.stop().await;
}

async fn a_removed_agent_leaves_the_lists_and_stays_scrubbed() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    let (code, _, err) = g.cli(&["ticket", "assign", &number, BOB]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(g.show(&number)["owner"], BOB);
    g.settle().await;
    g.stop().await;
    g.agents.retain(|(_, email)| email != BOB);
    g.boot().await;
    let t = g.show(&number);
    assert_eq!(t["work_notes_list"], serde_json::json!([JANE]));
    assert_eq!(t["owner"], Value::Null);
    // Bob, now a former agent, is still scrubbed from what requesters get.
    let before = g.mark();
    let m = format!(
        "From: Jane Doe <jane.doe@example.org>\nTo: support@example.org\nSubject: RE: [{number}] x\n\nBob (bob.agent@example.org) est parti.\n"
    );
    assert!(g.send(JANE, &[PUBLIC], &m).await.starts_with("250"));
    let sent = g.settle().await;
    let public = to(before.of(&sent), "alice@u.example");
    assert_eq!(public.len(), 1);
    assert!(
        !public[0].text().to_ascii_lowercase().contains(BOB),
        "{}",
        public[0].text()
    );
    // And cannot be put back on a list.
    let (code, _, _) = g.cli(&["notes-list", "add", &number, BOB]);
    assert_eq!(code, 1);
    let (code, _, _) = g.cli(&["watch", "add", &number, BOB]);
    assert_eq!(code, 1);
    g.stop().await;
}

/// The copies waiting in the outbox, composed from their plans as the
/// relay composes them now, by Message-ID.
fn planned_copies(g: &Gateway) -> Vec<(String, Vec<u8>)> {
    g.with_db(|conn| {
        // Read as `outbox list` reads, not as the relay takes them: on
        // PostgreSQL `due` leases the rows, and skips those the daemon's
        // relay (trying them against the refusing sink) holds.
        let queued = crmgate::store::outbox::list(conn).unwrap();
        let rows: Vec<_> = queued
            .iter()
            .filter(|s| s.status == crmgate::store::outbox::OutboxStatus::Queued)
            .map(|s| crmgate::store::outbox::get(conn, s.id).unwrap())
            .collect();
        assert!(rows.iter().all(|r| r.plan.is_some()), "every copy planned");
        let (rows, unsendable) = crmgate::relay::composed(conn, rows).unwrap();
        assert!(unsendable.is_empty(), "{unsendable:?}");
        rows.into_iter()
            .map(|r| (r.message_id, r.message))
            .collect()
    })
}

/// Each planned copy arrived once, exactly as planned, under its Message-ID.
fn assert_arrived_as_planned(planned: &[(String, Vec<u8>)], sent: &[common::sink::Received]) {
    assert!(!planned.is_empty());
    for (message_id, bytes) in planned {
        let arrived: Vec<_> = sent
            .iter()
            .filter(|m| header(&m.text(), "Message-ID") == Some(format!("<{message_id}>").as_str()))
            .collect();
        assert_eq!(arrived.len(), 1, "{message_id}");
        assert_eq!(
            arrived[0].text(),
            String::from_utf8_lossy(bytes),
            "{message_id}"
        );
    }
}

async fn a_copy_queued_before_a_restart_is_composed_after_it_as_planned() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    g.sink.set_outage(true);
    let reply = format!(
        "From: Alice Martin <alice@u.example>\nTo: support@example.org\n\
         Subject: Re: [{number}] Imprimante en panne\nMessage-ID: <reply-2@u.example>\n\
         In-Reply-To: <open-1@u.example>\n\n\
         Toujours en panne. Jane Doe <jane.doe@example.org> devait passer.\n"
    );
    assert!(g
        .send("alice@u.example", &[PUBLIC], &reply)
        .await
        .starts_with("250"));
    let planned = planned_copies(&g);
    g.stop().await;
    g.sink.set_outage(false);
    g.boot().await;
    let sent = g.settle().await;
    let new = before.of(&sent);
    assert_arrived_as_planned(&planned, new);
    // Carol's copy (the watch list): threaded under Alice's first message,
    // and Jane's address scrubbed from it.
    let carol = to(new, "carol@u.example");
    assert_eq!(carol.len(), 1);
    let text = carol[0].text();
    let references = header(&text, "References").unwrap_or_default();
    assert!(references.contains("<open-1@u.example>"), "{text}");
    assert!(!text.to_ascii_lowercase().contains(JANE), "{text}");
    assert!(text.contains(PUBLIC), "{text}");
    g.stop().await;
}

async fn an_agent_removed_before_a_copy_leaves_is_still_scrubbed_from_it() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    g.sink.set_outage(true);
    let m = format!(
        "From: Jane Doe <jane.doe@example.org>\nTo: support@example.org\nSubject: RE: [{number}] x\n\n\
         Bob Agent <bob.agent@example.org> passe demain.\n"
    );
    assert!(g.send(JANE, &[PUBLIC], &m).await.starts_with("250"));
    let planned = planned_copies(&g);
    g.stop().await;
    // Bob leaves the configuration before the copies leave.
    g.agents.retain(|(_, email)| email != BOB);
    g.sink.set_outage(false);
    g.boot().await;
    let sent = g.settle().await;
    let new = before.of(&sent);
    assert_arrived_as_planned(&planned, new);
    let public = to(new, "alice@u.example");
    assert_eq!(public.len(), 1);
    let text = public[0].text().to_ascii_lowercase();
    assert!(!text.contains(BOB), "{text}");
    assert!(text.contains("passe demain"), "{text}");
    g.stop().await;
}

async fn publishing_from_the_command_line_sends_as_if_the_agent_had_mailed() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let (code, out, err) = g.cli(&[
        "ticket",
        "comment",
        &number,
        "--by",
        JANE,
        "--body",
        "Redémarrez l'imprimante.",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = g.cli(&[
        "ticket",
        "work-note",
        &number,
        "--by",
        BOB,
        "--body",
        "Pilote à mettre à jour.",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let sent = g.settle().await;
    let new = before.of(&sent);
    let public = to(new, "alice@u.example");
    assert_eq!(public.len(), 1, "{new:?}");
    assert_eq!(public[0].rcpt_to, ["alice@u.example", "carol@u.example"]);
    assert!(public[0].text().contains("Jane Doe via Soutien TI"));
    assert!(
        !public[0].text().contains("Pilote"),
        "a work note reached a requester"
    );
    // Bob gets Jane's comment; Jane gets Bob's work note; nobody gets their own.
    let to_bob = to(new, BOB);
    let to_jane = to(new, JANE);
    assert_eq!((to_bob.len(), to_jane.len()), (1, 1), "{new:?}");
    assert!(header(&to_jane[0].text(), "From")
        .unwrap()
        .contains(INTERNAL));
    let t = g.show(&number);
    assert_eq!(t["state"], "open");
    let kinds: Vec<&str> = t["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.ends_with(&["comment", "work_note"]), "{kinds:?}");
    // Only agents publish.
    let (code, _, err) = g.cli(&[
        "ticket",
        "comment",
        &number,
        "--by",
        "alice@u.example",
        "--body",
        "x",
    ]);
    assert_eq!(code, 1, "{err}");
    g.stop().await;
}

async fn receipts_to_one_address_are_capped_per_hour() {
    let mut g = Gateway::start_with("", "[auto]\nmax_per_address_per_hour = 2\n").await;
    for i in 0..3 {
        let m = format!("From: alice@u.example\nTo: support@example.org\nSubject: Demande {i}\nMessage-ID: <cap-{i}@u.example>\n\nBonjour {i}.\n");
        assert!(g
            .send("alice@u.example", &[PUBLIC], &m)
            .await
            .starts_with("250"));
    }
    let sent = g.settle().await;
    assert_eq!(to(&sent, "alice@u.example").len(), 2, "{sent:?}");
    let third = g.show("TKT0000003");
    let held = last_entry(&third);
    assert_eq!(held["kind"], "system", "{third}");
    assert!(
        held["body"].as_str().unwrap().contains("alice@u.example"),
        "{held}"
    );
    g.stop().await;
}

/// The real binary: ready once it listens, SIGHUP reloads the agents,
/// SIGTERM stops it with exit 0.
#[test]
fn the_binary_reloads_on_sighup_and_stops_cleanly_on_sigterm() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = |agents: &str| {
        format!(
            "[gateway]\nstate_dir = \"{}\"\n[smtp]\nlisten = \"127.0.0.1:{port}\"\n[relay]\nurl = \"file://{}\"\n{agents}",
            dir.path().join("state").display(),
            dir.path().join("sent").display()
        )
    };
    let both = "[[agents]]\nname = \"A\"\nemail = \"a@example.org\"\ndefault_notes_list = true\n\
                [[agents]]\nname = \"B\"\nemail = \"b@example.org\"\ndefault_notes_list = true\n";
    let path = dir.path().join("crmgate.toml");
    std::fs::write(&path, config(both)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_crmgate"))
        .args(["--config", path.to_str().unwrap(), "serve"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the daemon never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_crmgate"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)
    };
    let delivered = deliver(
        &path,
        &[
            "--recipient",
            "support@localhost",
            "--sender",
            "r@u.example",
        ],
        b"From: r@u.example\r\nSubject: x\r\n\r\nx\r\n",
    );
    assert!(delivered.status.success());
    assert_eq!(
        cli(&["notes-list", "list", "TKT0000001", "--json"]),
        serde_json::json!(["a@example.org", "b@example.org"])
    );

    std::fs::write(
        &path,
        config(&both[..both.find("[[agents]]\nname = \"B\"").unwrap()]),
    )
    .unwrap();
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    loop {
        if cli(&["notes-list", "list", "TKT0000001", "--json"])
            == serde_json::json!(["a@example.org"])
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "SIGHUP did not take b@ off the list"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still listening after the reload.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "SIGTERM did not stop the daemon"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}

both_engines!(
    a_forward_from_each_client_opens_a_ticket_for_the_original_sender,
    resolve_sends_the_closure_to_the_watch_group_and_a_reply_reopens,
    a_requesters_reply_past_the_reopen_window_opens_a_new_ticket_naming_the_old_one,
    the_email_function_sends_attachments_and_a_partner_reply_reaches_only_agents,
    a_postfix_dsn_marks_the_row_failed_and_tells_the_agents,
    a_dsn_without_bounce_address_finds_the_row_by_its_message_id,
    a_reply_naming_only_our_copy_threads_and_a_lookalike_does_not,
    an_auto_responder_without_auto_headers_is_cut_off_by_the_cap,
    an_agent_who_replies_to_all_gets_the_notice_once_a_day,
    a_message_through_deliver_lands_like_one_over_smtp,
    a_removed_agent_leaves_the_lists_and_stays_scrubbed,
    a_copy_queued_before_a_restart_is_composed_after_it_as_planned,
    an_agent_removed_before_a_copy_leaves_is_still_scrubbed_from_it,
    publishing_from_the_command_line_sends_as_if_the_agent_had_mailed,
    receipts_to_one_address_are_capped_per_hour,
);
