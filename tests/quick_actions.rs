//! Quick actions, end to end: a believed agent runs the ticket from a mail
//! client (SPEC, "Quick actions"), over real SMTP into the running daemon
//! and through `crmgate deliver`, with a real SMTP sink as the relay.

mod common;

use common::gateway::*;
use common::sink::Received;
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

/// What the list of quick actions says first, in each language.
const HELP_FR: &str = "Voici les actions rapides";
const HELP_EN: &str = "These are the quick actions";

/// The phrases `body` must hold in the order the configured `language`
/// writes them: each language's, the first one first; and none of a
/// language it does not write.
fn assert_in_order(language: &str, body: &str, fr: &str, en: &str) {
    let expected: &[&str] = match language {
        "fr" => &[fr],
        "en" => &[en],
        "fr+en" => &[fr, en],
        _ => &[en, fr],
    };
    let found: Vec<usize> = expected
        .iter()
        .map(|p| {
            body.find(p)
                .unwrap_or_else(|| panic!("{language}: no {p:?} in {body}"))
        })
        .collect();
    assert!(found.windows(2).all(|w| w[0] < w[1]), "{language}: {body}");
    for p in [fr, en] {
        if !expected.contains(&p) {
            assert!(!body.contains(p), "{language}: {p:?} in {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_answers_with_the_list_in_each_language_and_opens_no_ticket() {
    for language in ["fr", "en", "fr+en", "en+fr"] {
        let mut g = Gateway::start_in(language, "", "").await;
        let message = format!("From: Jane Doe <{JANE}>\nTo: {PUBLIC}\nSubject: aide\n\n/aide\n");
        assert!(g.send(JANE, &[PUBLIC], &message).await.starts_with("250"));
        let sent = g.settle().await;
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].rcpt_to, [JANE]);
        let body = decoded_body(&sent[0].data);
        assert_in_order(language, &body, HELP_FR, HELP_EN);
        assert_in_order(language, &body, "/résoudre  ", "/resolve  ");
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

// ---------------------------------------------------------------------------
// The SPEC's quick-action table, row by row, in English and in French: each
// line on a ticket of its own, as a message of only that line from Jane, a
// believed agent, to the public and the internal address in turn. Each row
// checks what it changed on the ticket, the
// `system` entry naming Jane and the line, and the mail it caused.
// ---------------------------------------------------------------------------

const ALICE: &str = "alice@u.example";
const CAROL: &str = "carol@u.example";
const DAVE: &str = "dave@u.example";
const ERIN: &str = "erin@u.example";

/// A ticket of its own for each `n`: Alice opens it, Carol in Cc (so on the
/// watch list); Jane and Bob are on its work-notes list. Returns its number
/// once the receipt has left.
async fn ticket(g: &Gateway, n: usize) -> String {
    let subject = format!("Imprimante {n}");
    let reply = g
        .send(
            ALICE,
            &[PUBLIC],
            &format!(
                "From: Alice Martin <{ALICE}>\nTo: {PUBLIC}\nCc: {CAROL}\nSubject: {subject}\n\
                 Message-ID: <open-{n}@u.example>\n\nElle ne marche plus ({n}).\n"
            ),
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    g.settle().await;
    let list = g.json(&["ticket", "list", "--json"]);
    list.as_array()
        .unwrap()
        .iter()
        .find(|t| t["subject"] == subject.as_str())
        .unwrap_or_else(|| panic!("no ticket {subject}: {list}"))["number"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Where the `n`th line of a row goes: the public and the internal address
/// in turn, as agents write to either.
fn address(n: usize) -> &'static str {
    if n.is_multiple_of(2) {
        PUBLIC
    } else {
        INTERNAL
    }
}

/// Jane's message on ticket `number` of `text` (quick actions at its top),
/// to the `n`th line's address; returns the ticket after it and the mail
/// it caused.
async fn act(g: &Gateway, number: &str, n: usize, text: &str) -> (Value, Vec<Received>) {
    let before = g.mark();
    let to = address(n);
    let message = format!(
        "From: Jane Doe <{JANE}>\nTo: {to}\nSubject: RE: [{number}] Imprimante\n\
         Message-ID: <act-{number}-{}@example.org>\n\n{text}",
        text.len()
    );
    let reply = g.send(JANE, &[to], &message).await;
    assert!(reply.starts_with("250"), "{text}: {reply}");
    let sent = g.settle().await;
    (g.show(number), before.of(&sent).to_vec())
}

/// The ticket has a `system` entry naming Jane and `line`, and no comment
/// or work note of Jane's: the message was only its block.
fn assert_done_by_jane(t: &Value, line: &str) {
    let e = entries(t);
    assert!(
        e.iter().any(|e| e["kind"] == "system"
            && e["body"].as_str().unwrap().contains(JANE)
            && e["body"].as_str().unwrap().contains(line)),
        "no system entry naming {JANE} and {line:?}: {t}"
    );
    assert!(
        !e.iter()
            .any(|e| e["from"] == JANE && (e["kind"] == "comment" || e["kind"] == "work_note")),
        "{line}: a message of only actions logs no entry of its own: {t}"
    );
    assert!(
        !e.iter()
            .any(|e| e["kind"] != "system" && e["body"].as_str().unwrap().contains(line)),
        "{line}: the block is taken out: {t}"
    );
}

fn list(t: &Value, name: &str) -> Vec<String> {
    t[name]
        .as_array()
        .unwrap_or_else(|| panic!("no {name}: {t}"))
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_resolve_and_resoudre_set_resolved_and_send_the_closure_in_the_configured_language() {
    for (language, closure) in [("fr", "Billet résolu"), ("en", "Ticket resolved")] {
        let mut g = Gateway::start_in(language, "", "").await;
        for (n, line) in ["/resolve", "/résoudre", "/resoudre", "/Résoudre"]
            .into_iter()
            .enumerate()
        {
            let number = ticket(&g, n).await;
            let (t, sent) = act(&g, &number, n, &format!("{line}\n")).await;
            assert_eq!(t["state"], "resolved", "{language} {line}");
            assert_done_by_jane(&t, line);
            assert!(kinds(&t).contains(&"closure".to_string()), "{t}");
            // The closure, to the watch group: Alice and Carol, nobody else.
            assert_eq!(sent.len(), 1, "{language} {line}: {sent:?}");
            let mut rcpt = sent[0].rcpt_to.clone();
            rcpt.sort();
            assert_eq!(rcpt, [ALICE, CAROL]);
            let subject = header(&sent[0].text(), "Subject").unwrap().to_string();
            assert!(subject.contains(&format!("[{number}]")), "{subject}");
            let body = decoded_body(&sent[0].data);
            assert_in_order(language, &body, "est maintenant résolu", "is now resolved");
            assert!(
                decoded_subject(&sent[0].data).contains(closure),
                "{language}: {subject}"
            );
        }
        g.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_reopen_and_rouvrir_set_a_resolved_ticket_open() {
    let mut g = Gateway::start("").await;
    for (n, line) in ["/reopen", "/rouvrir", "/ROUVRIR"].into_iter().enumerate() {
        let number = ticket(&g, n).await;
        let (code, _, err) = g.cli(&["ticket", "resolve", &number]);
        assert_eq!(code, 0, "{err}");
        g.settle().await;
        let (t, sent) = act(&g, &number, n, &format!("{line}\n")).await;
        assert_eq!(t["state"], "open", "{line}: {t}");
        assert_done_by_jane(&t, line);
        assert!(
            entries(&t)
                .iter()
                .any(|e| e["kind"] == "system"
                    && e["body"] == format!("reopened by {JANE}").as_str()),
            "{t}"
        );
        assert!(sent.is_empty(), "{line}: {sent:?}");
    }
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_assign_and_assigner_set_the_owner_me_and_moi_being_the_sender() {
    let mut g = Gateway::start("").await;
    let rows = [
        (format!("/assign {BOB}"), BOB),
        (format!("/assigner <{BOB}>"), BOB),
        ("/assign me".to_string(), JANE),
        ("/assigner moi".to_string(), JANE),
        ("/ASSIGNER MOI".to_string(), JANE),
    ];
    for (n, (line, owner)) in rows.iter().enumerate() {
        let number = ticket(&g, n).await;
        let (t, sent) = act(&g, &number, n, &format!("{line}\n")).await;
        assert_eq!(t["owner"], *owner, "{line}: {t}");
        assert!(
            list(&t, "work_notes_list").contains(&owner.to_string()),
            "{t}"
        );
        assert!(
            entries(&t)
                .iter()
                .any(|e| e["kind"] == "system"
                    && e["body"] == format!("assigned to {owner}").as_str()),
            "{t}"
        );
        assert_done_by_jane(&t, line);
        assert!(sent.is_empty(), "{line}: {sent:?}");
    }
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_watch_and_surveillance_add_and_remove_on_the_watch_list() {
    let mut g = Gateway::start("").await;
    let rows = [
        (
            format!("/watch add {DAVE}, <{ERIN}>"),
            vec![CAROL, DAVE, ERIN],
        ),
        (
            format!("/surveillance ajouter {DAVE} {ERIN}"),
            vec![CAROL, DAVE, ERIN],
        ),
        (format!("/Surveillance Ajouter <{DAVE}>"), vec![CAROL, DAVE]),
        (format!("/watch remove {CAROL}"), vec![]),
        (format!("/surveillance retirer <{CAROL}>"), vec![]),
    ];
    for (n, (line, expected)) in rows.iter().enumerate() {
        let number = ticket(&g, n).await;
        assert_eq!(list(&g.show(&number), "watch_list"), [CAROL]);
        let (t, sent) = act(&g, &number, n, &format!("{line}\n")).await;
        let mut watch = list(&t, "watch_list");
        watch.sort();
        assert_eq!(watch, *expected, "{line}: {t}");
        assert_eq!(list(&t, "requesters"), [ALICE], "{line}");
        assert_done_by_jane(&t, line);
        assert!(sent.is_empty(), "{line}: {sent:?}");
    }
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_notes_add_ajouter_remove_retirer_change_the_work_notes_list() {
    let mut g = Gateway::start("").await;
    let rows = [
        (format!("/notes add {BOB}"), true),
        (format!("/notes ajouter <{BOB}>"), true),
        (format!("/notes remove {BOB}"), false),
        (format!("/notes retirer {BOB}"), false),
        (format!("/NOTES RETIRER {BOB}"), false),
    ];
    for (n, (line, add)) in rows.iter().enumerate() {
        let number = ticket(&g, n).await;
        if *add {
            let (code, _, err) = g.cli(&["notes-list", "remove", &number, BOB]);
            assert_eq!(code, 0, "{err}");
        }
        assert_eq!(
            list(&g.show(&number), "work_notes_list").contains(&BOB.to_string()),
            !add
        );
        let (t, sent) = act(&g, &number, n, &format!("{line}\n")).await;
        let notes = list(&t, "work_notes_list");
        assert_eq!(notes.contains(&BOB.to_string()), *add, "{line}: {t}");
        assert!(notes.contains(&JANE.to_string()), "{line}: {t}");
        assert_done_by_jane(&t, line);
        assert!(sent.is_empty(), "{line}: {sent:?}");
    }
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_requester_and_demandeur_add_and_remove_requesters() {
    let mut g = Gateway::start("").await;
    let rows = [
        (format!("/requester add {DAVE}"), vec![ALICE, DAVE]),
        (
            format!("/demandeur ajouter <{DAVE}>, {ERIN}"),
            vec![ALICE, DAVE, ERIN],
        ),
        (format!("/requester remove {ALICE}"), vec![]),
        (format!("/demandeur retirer {ALICE}"), vec![]),
    ];
    for (n, (line, expected)) in rows.iter().enumerate() {
        let number = ticket(&g, n).await;
        let (t, sent) = act(&g, &number, n, &format!("{line}\n")).await;
        let mut requesters = list(&t, "requesters");
        requesters.sort();
        assert_eq!(requesters, *expected, "{line}: {t}");
        assert_eq!(list(&t, "watch_list"), [CAROL], "{line}");
        assert_done_by_jane(&t, line);
        assert!(sent.is_empty(), "{line}: {sent:?}");
    }
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_email_and_courriel_send_the_text_to_the_partners_as_an_email_entry() {
    let mut g = Gateway::start("").await;
    let rows = [
        "/email partner@vendor.example cc other@vendor.example",
        "/courriel <partner@vendor.example> cc <other@vendor.example>",
        "/Courriel partner@vendor.example, CC, other@vendor.example",
    ];
    for (n, line) in rows.into_iter().enumerate() {
        let number = ticket(&g, n).await;
        let text = format!("{line}\n\nPouvez-vous remplacer l'unite {n} ?\n");
        let (t, sent) = act(&g, &number, n, &text).await;
        // The partner mail only: nothing to the requester, the watcher or
        // the agents (as the existing /email test has it).
        assert_eq!(sent.len(), 1, "{line}: {sent:?}");
        let to_partner: Vec<&Received> = sent
            .iter()
            .filter(|m| m.rcpt_to.iter().any(|r| r == "partner@vendor.example"))
            .collect();
        assert_eq!(to_partner.len(), 1, "{line}: {sent:?}");
        assert_eq!(
            to_partner[0].rcpt_to,
            ["partner@vendor.example", "other@vendor.example"]
        );
        let mail = to_partner[0].text();
        assert!(
            header(&mail, "Cc")
                .unwrap()
                .contains("other@vendor.example"),
            "{mail}"
        );
        assert!(header(&mail, "Subject")
            .unwrap()
            .contains(&format!("[{number}]")));
        let body = decoded_body(&to_partner[0].data);
        assert!(body.contains(&format!("remplacer l'unite {n}")), "{body}");
        assert!(!body.contains(line) && !body.contains("/email"), "{body}");
        let email = entries(&t)
            .into_iter()
            .find(|e| e["kind"] == "email")
            .unwrap_or_else(|| panic!("{line}: no email entry: {t}"));
        assert!(email["body"]
            .as_str()
            .unwrap()
            .contains(&format!("l'unite {n}")));
        assert_done_by_jane(&t, line);
    }
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_help_and_aide_on_a_ticket_answer_the_agent_in_the_configured_languages() {
    for language in ["fr", "en", "fr+en", "en+fr"] {
        let mut g = Gateway::start_in(language, "", "").await;
        for (n, line) in ["/help", "/aide", "/AIDE"].into_iter().enumerate() {
            let number = ticket(&g, n).await;
            let (t, sent) = act(&g, &number, n, &format!("{line}\n")).await;
            assert_eq!(sent.len(), 1, "{language} {line}: {sent:?}");
            assert_eq!(sent[0].rcpt_to, [JANE]);
            let subject = decoded_subject(&sent[0].data);
            assert!(subject.contains(&format!("[{number}]")), "{subject}");
            assert_in_order(language, &subject, "Actions rapides", "Quick actions");
            let body = decoded_body(&sent[0].data);
            assert!(body.contains(&number), "{body}");
            assert_in_order(language, &body, HELP_FR, HELP_EN);
            assert_done_by_jane(&t, line);
        }
        g.stop().await;
    }
}

/// The Subject of a message, its encoded words undone.
fn decoded_subject(data: &[u8]) -> String {
    let message = mail_parser::MessageParser::default().parse(data).unwrap();
    message.subject().unwrap_or_default().to_string()
}
