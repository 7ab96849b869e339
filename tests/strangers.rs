//! What a stranger can make crmgate do (issue 11): a header full of Cc
//! adds no watcher, an agent's Message-ID never reaches a requester, and
//! an Exchange inbox rule's forward is a person's mail. The real daemon,
//! a real SMTP sink.

mod common;

use common::gateway::{header, to, Gateway, BOB, JANE, PUBLIC};

#[tokio::test]
async fn a_strangers_500_cc_mail_adds_no_watcher() {
    let g = Gateway::start("").await;
    let cc: Vec<String> = (0..500).map(|i| format!("victim{i}@u.example")).collect();
    let message = format!(
        "From: \"PayPal Security\" <mallory@evil.example>\nTo: {PUBLIC}\nCc: {}\n\
         Subject: Votre compte\n\nCliquez ici.\n",
        cc.join(",\n ")
    );
    let reply = g.send("mallory@evil.example", &[PUBLIC], &message).await;
    assert!(reply.starts_with("250"), "{reply}");
    let number = g.json(&["ticket", "list", "--json"])[0]["number"]
        .as_str()
        .unwrap()
        .to_string();
    let watchers = g.json(&["watch", "list", &number, "--json"]);
    assert_eq!(watchers.as_array().unwrap().len(), 0, "{watchers}");
    let shown = g.show(&number);
    assert!(
        shown["entries"].as_array().unwrap().iter().any(
            |e| e["kind"] == "system" && e["body"].as_str().unwrap().contains("max_cc_on_open")
        ),
        "{shown}"
    );
    // An agent's comment reaches the stranger alone, not the 500.
    let (code, _, err) = g.cli(&["ticket", "comment", &number, "--by", JANE, "--body", "Non."]);
    assert_eq!(code, 0, "{err}");
    let sent = g.settle().await;
    assert!(sent
        .iter()
        .all(|m| !m.rcpt_to.iter().any(|r| r.starts_with("victim"))));
}

/// The Message-ID tokens of the threading headers of a message.
fn threading(text: &str) -> String {
    format!(
        "{} {}",
        header(text, "In-Reply-To").unwrap_or_default(),
        header(text, "References").unwrap_or_default()
    )
}

#[tokio::test]
async fn a_forward_opened_tickets_public_mail_carries_no_agent_message_id() {
    let g = Gateway::start("").await;
    let forward = format!(
        "From: Jane Doe <{JANE}>\nTo: {PUBLIC}\nSubject: TR: Imprimante\n\
         Message-ID: <AM0PR01MB1234.agent@outlook.example.org>\n\n\
         Peux-tu regarder ?\n\n---------- Forwarded message ---------\n\
         From: Victor Victim <victor@u.example>\nDate: Mon, Mar 4, 2024 at 10:12 AM\n\
         Subject: Imprimante\nTo: Jane Doe <{JANE}>\n\nElle ne marche plus.\n"
    );
    let reply = g.send(JANE, &[PUBLIC], &forward).await;
    assert!(reply.starts_with("250"), "{reply}");
    let number = g.json(&["ticket", "list", "--json"])[0]["number"]
        .as_str()
        .unwrap()
        .to_string();
    // A later agent comment by mail, with its own Outlook Message-ID, and
    // one through the CLI.
    let comment = format!(
        "From: Bob Agent <{BOB}>\nTo: {PUBLIC}\nSubject: Re: [{number}] Imprimante\n\
         Message-ID: <AM0PR01MB5678.agent@outlook.example.org>\n\nLe toner arrive.\n"
    );
    let reply = g.send(BOB, &[PUBLIC], &comment).await;
    assert!(reply.starts_with("250"), "{reply}");
    let (code, _, err) = g.cli(&[
        "ticket", "comment", &number, "--by", JANE, "--body", "Voilà.",
    ]);
    assert_eq!(code, 0, "{err}");
    let sent = g.settle().await;
    let to_victor = to(&sent, "victor@u.example");
    assert!(
        to_victor.len() >= 3,
        "receipt and two public copies: {}",
        to_victor.len()
    );
    for message in &to_victor {
        let text = message.text();
        let ids = threading(&text);
        assert!(!ids.contains("outlook.example.org"), "{ids}\n{text}");
        assert!(!text.contains("AM0PR01MB"), "{text}");
    }
    // The agents still thread on them.
    let to_agents = to(&sent, BOB);
    assert!(to_agents
        .iter()
        .any(|m| threading(&m.text()).contains("AM0PR01MB1234")));
}

#[tokio::test]
async fn an_exchange_inbox_rules_forward_is_a_persons_mail() {
    let g = Gateway::start("").await;
    let message = format!(
        "From: Alice Martin <alice@u.example>\nTo: {PUBLIC}\nSubject: Imprimante\n\
         X-MS-Exchange-Inbox-Rules-Loop: alice@u.example\n\nElle ne marche plus.\n"
    );
    let reply = g.send("alice@u.example", &[PUBLIC], &message).await;
    assert!(reply.starts_with("250"), "{reply}");
    let tickets = g.json(&["ticket", "list", "--json"]);
    assert_eq!(tickets.as_array().unwrap().len(), 1, "{tickets}");
    let quarantined = g.json(&["quarantine", "list", "--json"]);
    assert_eq!(quarantined.as_array().unwrap().len(), 0, "{quarantined}");
}

#[tokio::test]
async fn a_burst_from_one_sender_stops_at_the_cap_of_copies_per_hour() {
    let g = Gateway::start_with("", "[auto]\nmax_resends_per_sender_hour = 5\n").await;
    for i in 0..6 {
        let message =
            format!("From: mallory@evil.example\nTo: {PUBLIC}\nSubject: Offre {i}\n\nAchetez.\n");
        let reply = g.send("mallory@evil.example", &[PUBLIC], &message).await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    let sent = g.settle().await;
    // Each mail would be copied to the two agents: twelve copies, five sent.
    let copies = sent
        .iter()
        .filter(|m| m.text().contains("Achetez"))
        .map(|m| m.rcpt_to.len())
        .sum::<usize>();
    assert_eq!(copies, 5, "{}", sent.len());
    let tickets = g.json(&["ticket", "list", "--json"]);
    assert_eq!(
        tickets.as_array().unwrap().len(),
        6,
        "every mail is still logged"
    );
    let last = tickets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["subject"] == "Offre 5")
        .unwrap()["number"]
        .as_str()
        .unwrap()
        .to_string();
    let shown = g.show(&last);
    assert!(
        shown["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "system"
                && e["body"]
                    .as_str()
                    .unwrap()
                    .contains("max_resends_per_sender_hour")),
        "{shown}"
    );
}
