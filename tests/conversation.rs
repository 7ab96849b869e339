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

fn reply_fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/replies")
        .join(name);
    String::from_utf8(std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}")))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The words of the notification that every reply fixture quotes.
const QUOTED: [&str; 2] = ["Pouvez-vous redémarrer", "Could you restart"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_reply_logs_and_passes_on_only_its_own_words() {
    let cases: [(&str, &str, &str); 8] = [
        ("mutt.eml", "alice@u.example", "Merci, le voyant est vert maintenant. Tout fonctionne.\n\nAlice\n"),
        ("neomutt-fr.eml", "alice@u.example", "Merci, le voyant est vert maintenant. Tout fonctionne.\n\nAlice\n"),
        ("gmail-fr.eml", "alice@u.example", "Merci, le voyant est vert maintenant.\n\nAlice\n"),
        ("thunderbird-fr.eml", "alice@u.example", "Merci, le voyant est vert maintenant.\n\nAlice\n"),
        (
            "outlook-fr.eml",
            "alice@u.example",
            "Merci, le voyant est vert maintenant.\n\nAlice Martin\nService comptabilité\n[cid:image001.png@01DB4437.2A1B3C40]\n",
        ),
        ("outlook-en.eml", "bob@u.example", "Thanks, the light is green now.\n\nBob\n"),
        ("apple-mail.eml", "bob@u.example", "Thanks, the light is green now.\n\nBob\n"),
        // Written below the quote: nothing above the line, the entry says so.
        (
            "s-nail-below.eml",
            "alice@u.example",
            "[Rien n'a été écrit au-dessus de la ligne « Répondez au-dessus de cette ligne ».]\n",
        ),
    ];
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    assert_eq!(number, "TKT0000001", "the fixtures answer TKT0000001");
    g.settle().await;
    for (file, from, own_words) in cases {
        let before = g.sink.messages().len();
        let reply = g.send(from, &[PUBLIC], &reply_fixture(file)).await;
        assert!(reply.starts_with("250"), "{file}: {reply}");
        let t = g.show(&number);
        let entry = entries(&t).last().cloned().unwrap_or_default();
        assert_eq!(entry["body"], own_words, "{file}: {entry}");
        let sent = g.settle().await;
        let copies = &sent[before..];
        assert!(!copies.is_empty(), "{file}: passed on");
        for copy in copies {
            let m = mail_parser::MessageParser::default()
                .parse(&copy.data)
                .expect("a copy parses");
            let text = m.body_text(0).unwrap_or_default().replace("\r\n", "\n");
            let html = m.body_html(0).map(|h| h.into_owned()).unwrap_or_default();
            for quoted in QUOTED {
                assert!(!text.contains(quoted), "{file}: {text}");
                assert!(!html.contains(quoted), "{file}: {html}");
            }
            // The copy's own marker, once, then the reply's words.
            assert_eq!(text.matches("##").count(), 2, "{file}: {text}");
            let own = own_words.lines().next().unwrap_or_default();
            assert!(text.contains(own), "{file}: {text}");
            if !html.is_empty() {
                assert!(html.contains(own), "{file}: {html}");
            }
            // Outlook's signature logo stays on the ticket, unlisted.
            assert!(!text.contains("image001.png ("), "{file}: {text}");
        }
    }
    let t = g.show(&number);
    let logo = entries(&t)
        .iter()
        .flat_map(|e| e["attachments"].as_array().cloned().unwrap_or_default())
        .find(|a| a["filename"] == "image001.png");
    assert!(logo.is_some(), "the logo is kept on the ticket: {t}");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_without_the_marker_is_never_cut() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    // mutt's reply to a mail without the marker (the receipt, say): the
    // attribution and the quote are the writer's to keep.
    let reply =
        reply_fixture("mutt.eml").replace("> ## Répondez au-dessus de cette ligne ##\n", "");
    let answer = g.send("alice@u.example", &[PUBLIC], &reply).await;
    assert!(answer.starts_with("250"), "{answer}");
    let t = g.show(&number);
    let body = entries(&t).last().cloned().unwrap_or_default()["body"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(body.starts_with("Merci, le voyant est vert"), "{body}");
    assert!(
        body.contains("Jean Agent via Soutien TI wrote:\n> \n> Bonjour Alice,"),
        "{body}"
    );
    g.stop().await;
}

/// A message from Alice with one PDF attached.
fn with_pdf(number: &str, id: &str, name: &str, pdf: &[u8]) -> String {
    use std::fmt::Write;
    let mut b64 = String::new();
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in pdf.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            let c = if i <= chunk.len() {
                table[(n >> (18 - 6 * i) & 63) as usize]
            } else {
                b'='
            };
            b64.push(c as char);
        }
    }
    let mut m = String::new();
    let _ = write!(
        m,
        "From: Alice Martin <alice@u.example>\nTo: support@example.org\nSubject: RE: [{number}] Imprimante\n\
         Message-ID: <{id}@u.example>\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b\"\n\n\
         --b\nContent-Type: text/plain; charset=utf-8\n\nVoici le rapport.\n\
         --b\nContent-Type: application/pdf; name=\"{name}\"\nContent-Disposition: attachment; filename=\"{name}\"\n\
         Content-Transfer-Encoding: base64\n\n{b64}\n--b--\n"
    );
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachment_already_on_the_ticket_is_stored_once_and_listed_once() {
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    let pdf = b"%PDF-1.4\n% rapport du technicien\n%%EOF\n".to_vec();
    let listed_in = |sent: &[Received], name: &str| {
        sent.iter()
            .filter(|m| {
                let parsed = mail_parser::MessageParser::default().parse(&m.data);
                parsed
                    .and_then(|p| p.body_text(0).map(|t| t.contains(&format!("{name} ("))))
                    .unwrap_or(false)
            })
            .count()
    };
    let mut before = g.sink.messages().len();
    for (i, name) in ["rapport.pdf", "rapport (1).pdf"].iter().enumerate() {
        let message = with_pdf(&number, &format!("pdf-{i}"), name, &pdf);
        let reply = g.send("alice@u.example", &[PUBLIC], &message).await;
        assert!(reply.starts_with("250"), "{reply}");
        let sent = g.settle().await;
        let copies = &sent[before..];
        assert!(!copies.is_empty());
        // Listed in the copies of the first message only.
        let expected = if i == 0 { copies.len() } else { 0 };
        assert_eq!(listed_in(copies, name), expected, "{name}");
        before = sent.len();
    }
    // Both entries name their attachment; the bytes are stored once.
    let t = g.show(&number);
    let names: Vec<String> = entries(&t)
        .iter()
        .flat_map(|e| e["attachments"].as_array().cloned().unwrap_or_default())
        .map(|a| a["filename"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["rapport.pdf", "rapport (1).pdf"]);
    let db = rusqlite::Connection::open(g.dir.path().join("state/crmgate.db")).expect("db");
    let stored: i64 = db
        .query_row(
            "SELECT count(*) FROM attachments WHERE length(data) + COALESCE(length(content), 0) > 0",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(stored, 1);

    // Outlook's signature logo, in two replies: kept, never listed.
    for id in ["<logo-1@u.example>", "<logo-2@u.example>"] {
        let reply = reply_fixture("outlook-fr.eml").replace(
            "<PAXPR02MB7001A1B2C3D4E5F6A7B8C9D0@PAXPR02MB7001.eurprd02.prod.outlook.com>",
            id,
        );
        let answer = g.send("alice@u.example", &[PUBLIC], &reply).await;
        assert!(answer.starts_with("250"), "{answer}");
        let sent = g.settle().await;
        assert_eq!(listed_in(&sent[before..], "image001.png"), 0);
        before = sent.len();
    }
    g.stop().await;
}
