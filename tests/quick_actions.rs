//! Quick actions, end to end: a believed agent runs the ticket from a mail
//! client (SPEC, "Quick actions"), over real SMTP into the running daemon
//! and through `crmgate deliver`, with a real SMTP sink as the relay.

mod common;

use common::gateway::*;
use serde_json::Value;

fn entries(t: &Value) -> Vec<Value> {
    t["entries"].as_array().unwrap().clone()
}

fn kinds(t: &Value) -> Vec<String> {
    entries(t)
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

/// Jane's reply on the ticket, `body` as her text.
fn reply(number: &str, to: &str, body: &str) -> String {
    format!(
        "From: Jane Doe <{JANE}>\nTo: {to}\nSubject: RE: [{number}] Imprimante en panne\n\
         Message-ID: <jane-{}@example.org>\n\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_resolve_reaches_the_requester_then_the_closure() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let message = reply(
        &number,
        PUBLIC,
        "/resolve\n\nLe toner est change, bonne journee.\n",
    );
    assert!(g.send(JANE, &[PUBLIC], &message).await.starts_with("250"));
    let sent = g.settle().await;
    let to_alice = to(before.of(&sent), "alice@u.example");
    assert_eq!(
        to_alice.len(),
        2,
        "the comment, then the closure: {to_alice:?}"
    );
    assert!(to_alice[0].text().contains("Le toner est change"));
    assert!(
        !to_alice[0].text().contains("/resolve"),
        "the block is taken out"
    );
    assert_eq!(header(&to_alice[1].text(), "Precedence"), Some("bulk"));
    let t = g.show(&number);
    assert_eq!(t["state"], "resolved");
    // Alice's comment and its receipt, then Jane's answer, the closure it
    // caused and the system entry naming Jane and the action.
    assert_eq!(kinds(&t)[2..], ["comment", "closure", "system"]);
    let e = entries(&t);
    assert!(!e[2]["body"].as_str().unwrap().contains("/resolve"));
    assert!(e[4]["body"].as_str().unwrap().contains(JANE));
    assert!(e[4]["body"].as_str().unwrap().contains("/resolve"));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_assign_above_an_outlook_quote_reemits_nothing_and_sets_the_owner() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let body = format!(
        "/assign {BOB}\n\n________________________________\nDe : Soutien TI <{PUBLIC}>\n\
         Envoye : lundi 30 novembre 2026 10:00\nA : Jane Doe\nObjet : [{number}] Imprimante en panne\n\n\
         Elle ne marche plus.\n"
    );
    assert!(g
        .send(JANE, &[INTERNAL], &reply(&number, INTERNAL, &body))
        .await
        .starts_with("250"));
    let sent = g.settle().await;
    assert!(before.of(&sent).is_empty(), "{:?}", before.of(&sent));
    let t = g.show(&number);
    assert_eq!(t["owner"], BOB);
    assert!(!kinds(&t).iter().any(|k| k == "work_note"), "{t}");
    assert!(entries(&t)
        .iter()
        .any(|e| e["kind"] == "system" && e["body"].as_str().unwrap().contains("/assign")));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_add_of_an_agent_or_a_crm_address_is_refused_with_a_notice_and_changes_nothing() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    for (i, address) in [BOB, PUBLIC].iter().enumerate() {
        let before = g.mark();
        let body = format!("/resolve\n/watch add {address}\n\nVoir plus bas {i}.\n");
        assert!(g
            .send(JANE, &[PUBLIC], &reply(&number, PUBLIC, &body))
            .await
            .starts_with("250"));
        let sent = g.settle().await;
        let after = before.of(&sent);
        assert_eq!(after.len(), 1, "only the notice: {after:?}");
        assert_eq!(after[0].rcpt_to, [JANE]);
        assert!(after[0].text().contains(&format!("/watch add {address}")));
        let t = g.show(&number);
        assert_eq!(t["state"], "new", "nothing of the message is carried out");
        assert_eq!(t["watch_list"], serde_json::json!(["carol@u.example"]));
        let last = entries(&t).last().unwrap().clone();
        assert_eq!(last["kind"], "system");
        assert!(last["body"].as_str().unwrap().contains("refused"), "{last}");
    }
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_with_a_pdf_reaches_the_partner_and_cc_with_the_number_and_no_agent_address() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let message = format!(
        "From: Jane Doe <{JANE}>\nTo: {PUBLIC}\nSubject: RE: [{number}] Imprimante en panne\n\
         Message-ID: <jane-email@example.org>\nMIME-Version: 1.0\n\
         Content-Type: multipart/mixed; boundary=\"b\"\n\n--b\nContent-Type: text/plain\n\n\
         /email partner@vendor.example cc other@vendor.example\n\nPouvez-vous remplacer l'unite ?\n\
         Jane Doe, {JANE}\n--b\nContent-Type: application/pdf; name=\"devis.pdf\"\n\
         Content-Disposition: attachment; filename=\"devis.pdf\"\nContent-Transfer-Encoding: base64\n\n\
         JVBERi0xLjQKJcfsj6IK\n--b--\n"
    );
    assert!(g.send(JANE, &[PUBLIC], &message).await.starts_with("250"));
    let sent = g.settle().await;
    let after = before.of(&sent);
    assert_eq!(after.len(), 1, "the e-mail only: {after:?}");
    let mail = &after[0];
    assert_eq!(
        mail.rcpt_to,
        ["partner@vendor.example", "other@vendor.example"]
    );
    let text = mail.text();
    assert!(header(&text, "Subject")
        .unwrap()
        .contains(&format!("[{number}]")));
    assert!(
        text.contains("devis.pdf") && text.contains("JVBERi0xLjQK"),
        "{text}"
    );
    assert!(!text.to_ascii_lowercase().contains(JANE), "{text}");
    assert!(!text.contains("/email"), "{text}");
    let t = g.show(&number);
    let kinds = kinds(&t);
    assert!(kinds.contains(&"email".to_string()), "{kinds:?}");
    assert!(!kinds[1..].contains(&"comment".to_string()), "{kinds:?}");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requesters_resolve_is_text_and_changes_nothing() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let message = format!(
        "From: alice@u.example\nTo: {PUBLIC}\nSubject: Re: [{number}] Imprimante\n\n/resolve\nmerci\n"
    );
    assert!(g
        .send("alice@u.example", &[PUBLIC], &message)
        .await
        .starts_with("250"));
    let sent = g.settle().await;
    let t = g.show(&number);
    assert_eq!(t["state"], "new");
    let last = entries(&t).last().unwrap().clone();
    assert_eq!(last["kind"], "comment");
    assert!(last["body"].as_str().unwrap().contains("/resolve"));
    assert!(to(before.of(&sent), "carol@u.example")[0]
        .text()
        .contains("/resolve"));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_agents_resolve_from_an_untrusted_peer_changes_nothing() {
    let mut g = Gateway::start_with("trusted_relays = []\n", "[auth]\nverify = false\n").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let message = reply(&number, PUBLIC, "/resolve\n\nc'est fait\n");
    assert!(g.send(JANE, &[PUBLIC], &message).await.starts_with("250"));
    g.settle().await;
    let t = g.show(&number);
    assert_ne!(t["state"], "resolved");
    assert!(entries(&t)
        .iter()
        .any(|e| e["body"].as_str().unwrap().contains("/resolve")));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_word_carries_out_nothing_and_the_agent_is_told_in_french() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let before = g.mark();
    let body = "/assign me\n/fermer\n\nFini.\n";
    assert!(g
        .send(JANE, &[PUBLIC], &reply(&number, PUBLIC, body))
        .await
        .starts_with("250"));
    let sent = g.settle().await;
    let after = before.of(&sent);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].rcpt_to, [JANE]);
    let text = after[0].text();
    assert!(text.contains("/fermer"), "{text}");
    assert!(header(&text, "Subject").unwrap().contains(&number));
    let t = g.show(&number);
    assert_eq!(
        t["owner"],
        Value::Null,
        "the valid /assign is not carried out"
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_answers_with_the_list_in_each_language_and_opens_no_ticket() {
    for (language, word) in [("fr", "/résoudre"), ("en", "/resolve")] {
        let mut g = Gateway::start("").await;
        let text = std::fs::read_to_string(g.config_path()).unwrap();
        std::fs::write(
            g.config_path(),
            text.replace("language = \"fr\"", &format!("language = \"{language}\"")),
        )
        .unwrap();
        g.stop().await;
        g.boot().await;
        let message = format!("From: Jane Doe <{JANE}>\nTo: {PUBLIC}\nSubject: aide\n\n/aide\n");
        assert!(g.send(JANE, &[PUBLIC], &message).await.starts_with("250"));
        let sent = g.settle().await;
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].rcpt_to, [JANE]);
        let body = decoded_body(&sent[0].data);
        assert!(body.contains(word), "{language}: {body}");
        let list = g.json(&["ticket", "list", "--json"]);
        assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
        g.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_through_crmgate_deliver_as_a_pipe_transport() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let message = reply(&number, PUBLIC, "/resoudre\n");
    let out = g.deliver(
        &["--sender", JANE, "--recipient", PUBLIC],
        message.as_bytes(),
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    g.settle().await;
    let t = g.show(&number);
    assert_eq!(t["state"], "resolved");
    assert!(!kinds(&t)[1..].contains(&"comment".to_string()), "{t}");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_that_opens_a_ticket_reads_the_block_from_the_agents_own_words() {
    let mut g = Gateway::start("").await;
    let message = format!(
        "From: Jane Doe <{JANE}>\nTo: {PUBLIC}\nSubject: TR: Imprimante\nMessage-ID: <fwd-q@example.org>\n\n\
         /assign {BOB}\n\n-------- Message transfere --------\nDe : Sophie Martin <sophie@u.example>\n\
         Date : lun. 30 nov. 2026 10:00\nObjet : Imprimante\nA : Jane Doe <{JANE}>\n\n\
         Elle ne marche plus.\n"
    );
    assert!(g.send(JANE, &[PUBLIC], &message).await.starts_with("250"));
    g.settle().await;
    let list = g.json(&["ticket", "list", "--json"]);
    let number = list[0]["number"].as_str().unwrap().to_string();
    let t = g.show(&number);
    assert_eq!(t["owner"], BOB, "{t}");
    assert!(!entries(&t)
        .iter()
        .any(|e| e["kind"] == "work_note" || e["body"].as_str().unwrap().starts_with("/assign")));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_agents_own_words_reach_the_other_agents_as_a_work_note() {
    let mut g = Gateway::start("").await;
    let message = format!(
        "From: Jane Doe <{JANE}>\nTo: {PUBLIC}\nSubject: TR: Imprimante\nMessage-ID: <fwd-w@example.org>\n\n\
         Bob, peux-tu passer au local 12 ?\n\n-------- Message transfere --------\n\
         De : Sophie Martin <sophie@u.example>\nDate : lun. 30 nov. 2026 10:00\nObjet : Imprimante\n\
         A : Jane Doe <{JANE}>\n\nElle ne marche plus.\n"
    );
    assert!(g.send(JANE, &[PUBLIC], &message).await.starts_with("250"));
    let sent = g.settle().await;
    let to_bob = to(&sent, BOB);
    let note = to_bob
        .iter()
        .find(|m| m.text().contains("local 12"))
        .unwrap_or_else(|| panic!("no work note to Bob: {to_bob:?}"));
    assert!(header(&note.text(), "From").unwrap().contains(INTERNAL));
    assert!(to(&sent, JANE)
        .iter()
        .all(|m| !m.text().contains("local 12")));
    assert!(to(&sent, "sophie@u.example")
        .iter()
        .all(|m| !m.text().contains("local 12")));
    g.stop().await;
}

/// The text of a message, its transfer encoding undone.
fn decoded_body(data: &[u8]) -> String {
    let message = mail_parser::MessageParser::default().parse(data).unwrap();
    message.body_text(0).unwrap_or_default().into_owned()
}
