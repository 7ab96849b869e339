//! The conversation on a ticket, end to end over SMTP: each entry holds
//! the words its writer added and nothing of crmgate's own mail, whether
//! that is the subject of a notice being answered or the quoted
//! notification below a reply.

mod common;

use common::gateway::*;
use common::sink::Received;
use serde_json::Value;

/// The decoded Subject of a message the relay received.
fn subject_of(m: &Received) -> String {
    mail_parser::MessageParser::default()
        .parse(&m.data)
        .and_then(|p| p.subject().map(str::to_string))
        .unwrap_or_default()
}

fn entries(t: &Value) -> Vec<Value> {
    t["entries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_the_closure_notice_keeps_the_tickets_subject() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.sink.messages().len();
    let (code, out, err) = g.cli(&["ticket", "resolve", &number, "--by", JANE]);
    assert_eq!(code, 0, "{out}{err}");
    let sent = g.settle().await;
    let closure = subject_of(&sent[before]);
    assert_eq!(
        closure,
        format!("[{number}] Billet résolu : Imprimante en panne")
    );

    let before = sent.len();
    let reply = format!(
        "From: Alice Martin <alice@u.example>\nTo: support@example.org\n\
         Subject: RE: {closure}\nMIME-Version: 1.0\n\
         Content-Type: text/plain; charset=utf-8\n\nÇa recommence.\n"
    );
    let reply = g.send("alice@u.example", &[PUBLIC], &reply).await;
    assert!(reply.starts_with("250"), "{reply}");
    let t = g.show(&number);
    assert_eq!(t["subject"], "Imprimante en panne");
    let last = entries(&t).last().cloned().unwrap_or_default();
    assert_eq!(last["subject"], "Imprimante en panne", "{t}");
    let sent = g.settle().await;
    let copies = &sent[before..];
    assert!(!copies.is_empty());
    for copy in copies {
        assert_eq!(subject_of(copy), format!("[{number}] Imprimante en panne"));
    }
    g.stop().await;
}
