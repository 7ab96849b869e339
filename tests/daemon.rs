//! The whole daemon, end to end: the real listener on 127.0.0.1:0, a real
//! SQLite file or PostgreSQL database (each test runs on both), a real
//! SMTP sink as the relay, and the real `crmgate`
//! binary for `ticket show --json`, as a user would drive it.

mod common;

use std::path::PathBuf;

use common::client::Client;
use common::gateway::*;
use common::sink::Received;
use serde_json::Value;

async fn a_requester_opens_a_ticket_and_gets_a_receipt() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    assert_eq!(number, "TKT0000001");
    let t = g.show(&number);
    assert_eq!(t["state"], "new");
    assert_eq!(t["subject"], "Imprimante en panne");
    assert_eq!(t["requesters"], serde_json::json!(["alice@u.example"]));
    assert_eq!(t["watch_list"], serde_json::json!(["carol@u.example"]));
    assert_eq!(t["work_notes_list"], serde_json::json!([JANE, BOB]));
    assert_eq!(t["entries"][0]["kind"], "comment");
    assert_eq!(
        t["entries"][0]["body"].as_str().unwrap().trim(),
        "Elle ne marche plus."
    );

    let sent = g.settle().await;
    let receipt = to(&sent, "alice@u.example");
    assert_eq!(receipt.len(), 1, "{sent:?}");
    let text = receipt[0].text();
    assert!(
        header(&text, "Subject").unwrap().contains("[TKT0000001]"),
        "{text}"
    );
    assert_eq!(header(&text, "Auto-Submitted"), Some("auto-replied"));
    assert_eq!(header(&text, "Precedence"), Some("bulk"));
    assert_eq!(header(&text, "X-Crmgate-Loop"), Some("crm.example.org"));
    assert!(
        receipt[0].mail_from.starts_with("support+bounce-"),
        "{}",
        receipt[0].mail_from
    );
    // The agents get the comment; Carol had it in Cc.
    assert_eq!(to(&sent, JANE).len(), 1);
    assert!(to(&sent, "carol@u.example").is_empty());
    g.stop().await;
}

async fn an_agents_comment_reaches_requesters_without_any_agent_address() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let reply = g
        .send(
            JANE,
            &[PUBLIC],
            &format!(
                "From: Jane Doe <Jane.Doe@example.org>\nTo: support@example.org\nSubject: RE: [{number}] Imprimante en panne\n\
                 Message-ID: <jane-1@example.org>\nIn-Reply-To: <open-1@u.example>\n\n\
                 Bonjour, redémarrez-la.\n--\nJane Doe, jane.doe@example.org, mailto:JANE.DOE@EXAMPLE.ORG\n\n\
                 Le 3 mars, Alice <alice@u.example> a écrit :\n> Elle ne marche plus.\n"
            ),
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let sent = g.settle().await;
    let new: Vec<Received> = before.of(&sent).to_vec();
    let public = to(&new, "alice@u.example");
    assert_eq!(public.len(), 1, "{new:?}");
    assert_eq!(public[0].rcpt_to, ["alice@u.example", "carol@u.example"]);
    let raw = public[0].text().to_ascii_lowercase();
    assert!(!raw.contains("jane.doe@example.org"), "{raw}");
    assert!(
        !raw.contains("jane-1@example.org"),
        "an agent's Message-ID leaked: {raw}"
    );
    assert!(raw.contains("jane doe via soutien ti"), "{raw}");
    assert!(raw.contains("support@example.org"));
    // Bob gets the agent copy; Jane does not get her own mail back.
    assert_eq!(to(&new, BOB).len(), 1);
    assert!(to(&new, JANE).is_empty());
    assert_eq!(g.show(&number)["state"], "open");
    g.stop().await;
}

async fn a_work_note_reaches_only_the_other_agents_and_outsiders_are_refused() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let note = |from: &str| {
        format!("From: {from}\nTo: support-notes@example.org\nSubject: [{number}] note interne\nMessage-ID: <note-{from}>\n\nVoir le pilote.\n")
    };
    let reply = g.send(JANE, &[INTERNAL], &note(JANE)).await;
    assert!(reply.starts_with("250"), "{reply}");
    let sent = g.settle().await;
    let new = before.of(&sent);
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0].rcpt_to, [BOB]);
    assert!(header(&new[0].text(), "From").unwrap().contains(INTERNAL));

    let reply = g
        .send(
            "mallory@evil.example",
            &[INTERNAL],
            &note("mallory@evil.example"),
        )
        .await;
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    let kinds: Vec<Value> = g.show(&number)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].clone())
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "work_note").count(), 1);
    g.stop().await;
}

async fn an_agents_from_from_an_untrusted_peer_cannot_write_a_work_note() {
    let mut g =
        Gateway::start("trusted_relays = [\"192.0.2.0/24\"]\nauthserv_id = \"mx.example.org\"")
            .await;
    let message = "From: Jane Doe <jane.doe@example.org>\nTo: support-notes@example.org\nSubject: note\n\nx\n";
    let reply = g.send(JANE, &[INTERNAL], message).await;
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    // A forged Authentication-Results of another authserv-id does not help.
    let forged = format!(
        "Authentication-Results: evil.example; dmarc=pass header.from=example.org\n{message}"
    );
    assert!(g
        .send(JANE, &[INTERNAL], &forged)
        .await
        .starts_with("550 5.7.1"));
    // Our own authserv-id with dmarc=pass does.
    let real = format!("Authentication-Results: mx.example.org; dkim=pass header.d=example.org; dmarc=pass header.from=example.org\n{message}");
    let reply = g.send(JANE, &[INTERNAL], &real).await;
    assert!(reply.starts_with("250"), "{reply}");
    g.stop().await;
}

async fn a_stranger_on_a_ticket_reaches_only_the_agents() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let reply = g
        .send(
            "stranger@else.example",
            &[PUBLIC],
            &format!("From: stranger@else.example\nTo: support@example.org\nSubject: Re: {number}\n\nJe devine des numéros.\n"),
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let sent = g.settle().await;
    let new = before.of(&sent);
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0].rcpt_to, [JANE, BOB]);
    let entries = g.show(&number)["entries"].clone();
    assert_eq!(entries.as_array().unwrap().last().unwrap()["kind"], "email");
    g.stop().await;
}

async fn a_foreign_recipient_is_refused() {
    let mut g = Gateway::start("").await;
    let reply = g
        .send(
            "alice@u.example",
            &["someone@elsewhere.example"],
            "Subject: x\n\nx\n",
        )
        .await;
    assert!(reply.starts_with("550 5.1.1"), "{reply}");
    g.stop().await;
}

async fn reply_all_and_the_same_message_id_twice_make_one_entry_and_no_second_copy() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let reply_all = format!(
        "From: Alice Martin <alice@u.example>\nTo: support@example.org\nCc: carol@u.example\n\
         Subject: RE: [{number}] Imprimante en panne\nMessage-ID: <reply-all@u.example>\n\nToujours en panne.\n"
    );
    // The requester's client sends once to the CRM, and the MTA delivers it twice.
    assert!(g
        .send("alice@u.example", &[PUBLIC], &reply_all)
        .await
        .starts_with("250"));
    assert!(g
        .send("alice@u.example", &[PUBLIC], &reply_all)
        .await
        .starts_with("250"));
    let sent = g.settle().await;
    let new = before.of(&sent);
    // Carol had it in Cc and Alice sent it: only the agents get a copy, once.
    assert!(to(new, "carol@u.example").is_empty(), "{new:?}");
    assert_eq!(to(new, JANE).len(), 1, "{new:?}");
    let entries = g.show(&number)["entries"].clone();
    let same: Vec<&Value> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["message_id"] == "reply-all@u.example")
        .collect();
    assert_eq!(same.len(), 1);
    g.stop().await;
}

async fn an_out_of_office_is_logged_and_never_answered() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let ooo = format!(
        "From: alice@u.example\nTo: support@example.org\nSubject: Automatic reply: [{number}] Imprimante\n\
         Auto-Submitted: auto-replied\nX-Auto-Response-Suppress: All\n\nJe suis absente.\n"
    );
    assert!(g
        .send("alice@u.example", &[PUBLIC], &ooo)
        .await
        .starts_with("250"));
    assert_eq!(g.settle().await.len(), before.count());
    let entries = g.show(&number)["entries"].clone();
    assert_eq!(
        entries.as_array().unwrap().last().unwrap()["kind"],
        "system"
    );
    g.stop().await;
}

async fn a_pdf_stays_on_the_ticket_and_is_only_named_in_notifications() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let message = format!(
        "From: Alice Martin <alice@u.example>\nTo: support@example.org\nSubject: RE: [{number}] Imprimante\n\
         MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n--b1\nContent-Type: text/plain; charset=utf-8\n\n\
         Voici le rapport.\n--b1\nContent-Type: application/pdf; name=\"rapport.pdf\"\nContent-Disposition: attachment; filename=\"rapport.pdf\"\n\
         Content-Transfer-Encoding: base64\n\nJVBERi0xLjQKJcfsj6IKMSAwIG9iago8PC9UeXBlL0NhdGFsb2c+PgplbmRvYmoKdHJhaWxlcgo8PC9Sb290IDEgMCBSPj4KJSVFT0YK\n--b1--\n"
    );
    assert!(g
        .send("alice@u.example", &[PUBLIC], &message)
        .await
        .starts_with("250"));
    let sent = g.settle().await;
    let copies = before.of(&sent);
    let agent_copy = to(copies, JANE);
    assert_eq!(agent_copy.len(), 1, "{copies:?}");
    let text = agent_copy[0].text();
    assert!(text.contains("rapport.pdf"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("application/pdf"),
        "the PDF was attached: {text}"
    );
    let entries = g.show(&number)["entries"].clone();
    let last = entries.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["attachments"][0]["filename"], "rapport.pdf");
    assert_eq!(last["attachments"][0]["content_type"], "application/pdf");
    assert_eq!(last["attachments"][0]["size"], 78);
    g.stop().await;
}

async fn a_long_text_stays_whole_on_the_ticket_and_copies_carry_its_beginning() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    // 3 MB of text: over the 64 KiB stored in place and the 1 MiB a copy carries.
    let line = "Le journal de l'imprimante : bourrage papier, bac 2, toner bas.\n";
    let body = line.repeat(3_000_000 / line.len());
    let message = format!(
        "From: Alice Martin <alice@u.example>\nTo: support@example.org\nSubject: RE: [{number}] Imprimante\n\
         MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n{body}"
    );
    assert!(g
        .send("alice@u.example", &[PUBLIC], &message)
        .await
        .starts_with("250"));
    let sent = g.settle().await;
    let agent_copy = to(before.of(&sent), JANE);
    assert_eq!(agent_copy.len(), 1);
    assert!(
        agent_copy[0].data.len() < 1_500_000,
        "{} bytes",
        agent_copy[0].data.len()
    );
    let parsed = mail_parser::MessageParser::default()
        .parse(&agent_copy[0].data)
        .unwrap();
    let text = parsed.body_text(0).unwrap().replace("\r\n", "\n");
    let text = text
        .strip_prefix("## Répondez au-dessus de cette ligne ##\n\n")
        .expect("the copy starts with the reply marker");
    assert!(body.starts_with(text.split("\n[…").next().unwrap()));
    assert!(
        text.contains(&format!("its whole text is on ticket {number}"))
            || text.contains(&format!("le texte entier est sur le billet {number}")),
        "no note in the copy"
    );
    let entries = g.show(&number)["entries"].clone();
    let last = entries.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["body"].as_str().unwrap().trim_end(), body.trim_end());
    g.stop().await;
}

async fn a_reply_threads_by_in_reply_to_alone_and_survives_a_restart() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    let sent = g.settle().await;
    let receipt = to(&sent, "alice@u.example");
    let receipt_id = header(&receipt[0].text(), "Message-ID")
        .unwrap()
        .trim_matches(['<', '>'])
        .to_string();
    assert!(
        receipt_id.starts_with(&format!("{number}.")),
        "{receipt_id}"
    );

    g.stop().await;
    g.boot().await;

    let reply = format!(
        "From: alice@u.example\nTo: support@example.org\nSubject: sans numero\nIn-Reply-To: <{receipt_id}>\n\nMerci.\n"
    );
    assert!(g
        .send("alice@u.example", &[PUBLIC], &reply)
        .await
        .starts_with("250"));
    let list = g.json(&["ticket", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let entries = g.show(&number)["entries"].clone();
    assert_eq!(
        entries.as_array().unwrap().last().unwrap()["body"]
            .as_str()
            .unwrap()
            .trim(),
        "Merci."
    );
    g.stop().await;
}

async fn every_corpus_message_is_accepted_and_logged() {
    let mut g = Gateway::start("").await;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/corpus");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "eml"));
    files.sort();
    assert!(files.len() >= 100, "{} fixtures", files.len());
    let mut c = Client::connect(g.addr).await;
    c.expect("220").await;
    c.cmd("EHLO client.example.net", "250").await;
    for file in &files {
        let raw = std::fs::read(file).unwrap();
        // Normalise line ends to CRLF as an MTA would send them.
        let mut crlf = Vec::with_capacity(raw.len() + raw.len() / 20);
        for (i, b) in raw.iter().enumerate() {
            if *b == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
                crlf.push(b'\r');
            }
            crlf.push(*b);
        }
        if !crlf.ends_with(b"\r\n") {
            crlf.extend_from_slice(b"\r\n");
        }
        c.cmd("MAIL FROM:<sender@corpus.example>", "250").await;
        c.cmd(&format!("RCPT TO:<{PUBLIC}>"), "250").await;
        let reply = c.data(&crlf, "").await;
        assert!(reply.starts_with("250"), "{}: {reply}", file.display());
    }
    c.cmd("QUIT", "221").await;
    let tickets = g
        .json(&["ticket", "list", "--json"])
        .as_array()
        .unwrap()
        .len();
    let quarantined = g
        .json(&["quarantine", "list", "--json"])
        .as_array()
        .unwrap()
        .len();
    assert!(
        tickets > 0 && quarantined > 0,
        "tickets {tickets}, quarantined {quarantined}"
    );
    // Every file is exactly once either an entry, a duplicate counted on
    // its first entry, or a quarantine row.
    let mut logged = 0;
    for t in g.json(&["ticket", "list", "--json"]).as_array().unwrap() {
        for e in g.show(t["number"].as_str().unwrap())["entries"]
            .as_array()
            .unwrap()
        {
            if e["kind"] != "receipt" {
                logged += 1 + e["duplicates"].as_u64().unwrap() as usize;
            }
        }
    }
    assert_eq!(
        logged + quarantined,
        files.len(),
        "entries {logged} + quarantined {quarantined}"
    );
    g.stop().await;
}

async fn mail_to_postmaster_reaches_the_operator_and_the_quarantine() {
    let mut g = Gateway::start("").await;
    g.stop().await;
    g.operator = Some("ops@example.org".into());
    g.boot().await;
    let reply = g
        .send(
            "someone@else.example",
            &["postmaster@crm.example.org"],
            "From: someone@else.example\nTo: postmaster@crm.example.org\nSubject: your server\n\nHello.\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let sent = g.settle().await;
    let to_ops = to(&sent, "ops@example.org");
    assert_eq!(to_ops.len(), 1, "{sent:?}");
    assert!(to_ops[0].text().contains("Subject: your server"));
    let q = g.json(&["quarantine", "list", "--json"]);
    assert_eq!(q[0]["reason"], "postmaster");
    g.stop().await;
}

/// A NUL in the text (PostgreSQL's text holds none) is stored, not
/// answered 451 at every attempt: there it becomes U+FFFD.
async fn a_message_with_a_nul_in_its_subject_and_body_is_logged() {
    let g = Gateway::start("").await;
    let reply = g
        .send(
            "alice@u.example",
            &[PUBLIC],
            "From: Alice <alice@u.example>\r\nTo: support@example.org\r\n\
             Subject: Imprimante\0 HS\r\nMessage-ID: <nul@u.example>\r\n\r\n\
             Elle\0 ne marche plus.\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let t = g.show("TKT0000001");
    let subject = t["subject"].as_str().unwrap();
    assert!(
        subject == "Imprimante\0 HS" || subject == "Imprimante\u{fffd} HS",
        "{subject:?}"
    );
    let body = t["entries"][0]["body"].as_str().unwrap();
    assert!(body.starts_with("Elle"), "{body:?}");
    assert!(body.contains("ne marche plus."), "{body:?}");
    g.settle().await;
}

both_engines!(
    a_message_with_a_nul_in_its_subject_and_body_is_logged,
    a_requester_opens_a_ticket_and_gets_a_receipt,
    an_agents_comment_reaches_requesters_without_any_agent_address,
    a_work_note_reaches_only_the_other_agents_and_outsiders_are_refused,
    an_agents_from_from_an_untrusted_peer_cannot_write_a_work_note,
    a_stranger_on_a_ticket_reaches_only_the_agents,
    a_foreign_recipient_is_refused,
    reply_all_and_the_same_message_id_twice_make_one_entry_and_no_second_copy,
    an_out_of_office_is_logged_and_never_answered,
    a_pdf_stays_on_the_ticket_and_is_only_named_in_notifications,
    a_long_text_stays_whole_on_the_ticket_and_copies_carry_its_beginning,
    a_reply_threads_by_in_reply_to_alone_and_survives_a_restart,
    every_corpus_message_is_accepted_and_logged,
    mail_to_postmaster_reaches_the_operator_and_the_quarantine,
);
