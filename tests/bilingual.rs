//! A helpdesk of two languages (`[gateway] language = "fr+en"` or
//! `"en+fr"`), end to end over real SMTP into the running daemon with a
//! real SMTP sink as the relay: every automatic text in both languages,
//! the first one first, and the mail people send back still threads and
//! cuts as in one language.

mod common;

use common::gateway::*;
use common::sink::Received;

const ALICE: &str = "alice@u.example";
const CAROL: &str = "carol@u.example";
const FR_MARKER: &str = "## Répondez au-dessus de cette ligne ##";
const EN_MARKER: &str = "## Reply above this line ##";

fn parsed(m: &Received) -> mail_parser::Message<'_> {
    mail_parser::MessageParser::default()
        .parse(&m.data)
        .unwrap()
}

fn body(m: &Received) -> String {
    parsed(m)
        .body_text(0)
        .unwrap_or_default()
        .replace("\r\n", "\n")
}

fn subject(m: &Received) -> String {
    parsed(m).subject().unwrap_or_default().to_string()
}

/// `first` then a line `---`, then `second`, each once, in `text`.
fn assert_first_then_second(text: &str, first: &str, second: &str) {
    let a = text
        .find(first)
        .unwrap_or_else(|| panic!("no {first:?} in {text}"));
    let b = text
        .find(second)
        .unwrap_or_else(|| panic!("no {second:?} in {text}"));
    let rule = text
        .find("\n\n---\n\n")
        .unwrap_or_else(|| panic!("no rule in {text}"));
    assert!(a < rule && rule < b, "{first:?} then {second:?}: {text}");
    assert_eq!(text.matches(first).count(), 1, "{text}");
    assert_eq!(text.matches(second).count(), 1, "{text}");
}

/// The two languages of a configuration, in the order written.
fn order<'a>(language: &str, fr: &'a str, en: &'a str) -> (&'a str, &'a str) {
    if language == "fr+en" {
        (fr, en)
    } else {
        (en, fr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_closure_and_notices_are_written_in_both_languages_the_first_one_first() {
    for language in ["fr+en", "en+fr"] {
        let mut g = Gateway::start_in(language, "", "").await;

        // The receipt.
        let number = g.open_ticket().await;
        let sent = g.settle().await;
        let receipt = to(&sent, ALICE);
        assert_eq!(receipt.len(), 1, "{sent:?}");
        let (first, second) = order(
            language,
            "Nous avons bien reçu votre demande",
            "We have received your request",
        );
        assert_first_then_second(&body(&receipt[0]), first, second);
        let expected = if language == "fr+en" {
            format!("[{number}] Accusé de réception / Receipt confirmation : Imprimante en panne")
        } else {
            format!("[{number}] Receipt confirmation / Accusé de réception: Imprimante en panne")
        };
        assert_eq!(subject(&receipt[0]), expected);
        let t = g.show(&number);
        let stored = t["entries"][1]["body"].as_str().unwrap();
        assert_eq!(t["entries"][1]["kind"], "receipt");
        assert_first_then_second(stored, first, second);

        // A comment notification starts with both marker lines; the agent
        // who also wrote to the requester directly gets the notice.
        let before = g.mark();
        let message = format!(
            "From: Jane Doe <{JANE}>\nTo: {PUBLIC}\nCc: {ALICE}\n\
             Subject: RE: [{number}] Imprimante en panne\nMessage-ID: <jane-1@example.org>\n\n\
             Le toner est change.\n"
        );
        assert!(g.send(JANE, &[PUBLIC], &message).await.starts_with("250"));
        let sent = g.settle().await;
        let after = before.of(&sent);
        let copy = to(after, CAROL);
        assert_eq!(copy.len(), 1, "{after:?}");
        let (m1, m2) = order(language, FR_MARKER, EN_MARKER);
        assert!(
            body(&copy[0]).starts_with(&format!("{m1}\n{m2}\n\nLe toner est change.")),
            "{}",
            body(&copy[0])
        );
        let notice = to(after, JANE);
        assert_eq!(notice.len(), 1, "{after:?}");
        let (first, second) = order(
            language,
            "Rappel : ne répondez qu'au CRM",
            "Reminder: reply to the CRM only",
        );
        assert_first_then_second(&body(&notice[0]), first, second);
        let (w1, w2) = order(language, "Ne répondre qu'au CRM", "Reply to the CRM only");
        assert!(
            subject(&notice[0]).contains(&format!("{w1} / {w2}")),
            "{}",
            subject(&notice[0])
        );

        // Carol answers above the lines: the cut keeps her words only.
        let quoted: String = body(&copy[0]).lines().map(|l| format!("> {l}\n")).collect();
        let message = format!(
            "From: {CAROL}\nTo: {PUBLIC}\nSubject: RE: [{number}] Imprimante en panne\n\
             Message-ID: <carol-1@u.example>\n\nMerci !\n\nOn Mon, 30 Nov 2026, Soutien TI wrote:\n{quoted}"
        );
        assert!(g.send(CAROL, &[PUBLIC], &message).await.starts_with("250"));
        g.settle().await;
        let t = g.show(&number);
        let last = t["entries"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["from"], CAROL);
        assert_eq!(
            last["body"].as_str().unwrap().trim_end(),
            "Merci !",
            "{last}"
        );

        // The closure, to the watch group.
        let before = g.mark();
        let (code, _, err) = g.cli(&["ticket", "resolve", &number]);
        assert_eq!(code, 0, "{err}");
        let sent = g.settle().await;
        let closure = to(before.of(&sent), ALICE);
        assert_eq!(closure.len(), 1, "{:?}", before.of(&sent));
        let (first, second) = order(language, "est maintenant résolu", "is now resolved");
        assert_first_then_second(&body(&closure[0]), first, second);
        let (w1, w2) = order(language, "Billet résolu", "Ticket resolved");
        let closure_subject = subject(&closure[0]);
        assert!(
            closure_subject.starts_with(&format!("[{number}] {w1} / {w2}")),
            "{closure_subject}"
        );

        // Alice answers the closure: the ticket reopens, and the copy to
        // Carol carries the ticket's subject, not the closure's words.
        let before = g.mark();
        let message = format!(
            "From: Alice Martin <{ALICE}>\nTo: {PUBLIC}\nSubject: RE: {closure_subject}\n\
             Message-ID: <alice-2@u.example>\n\nCa recommence.\n"
        );
        assert!(g.send(ALICE, &[PUBLIC], &message).await.starts_with("250"));
        let sent = g.settle().await;
        let t = g.show(&number);
        assert_eq!(t["state"], "open", "{t}");
        assert_eq!(t["subject"], "Imprimante en panne");
        let copy = to(before.of(&sent), CAROL);
        assert_eq!(copy.len(), 1, "{:?}", before.of(&sent));
        assert_eq!(subject(&copy[0]), format!("[{number}] Imprimante en panne"));

        // A refused quick action: the notice quotes the line and says why
        // in each language.
        let before = g.mark();
        let message = format!(
            "From: Jane Doe <{JANE}>\nTo: {PUBLIC}\nSubject: RE: [{number}] Imprimante en panne\n\
             Message-ID: <jane-2@example.org>\n\n/fermer\n\nFini.\n"
        );
        assert!(g.send(JANE, &[PUBLIC], &message).await.starts_with("250"));
        let sent = g.settle().await;
        let after = before.of(&sent);
        assert_eq!(after.len(), 1, "{after:?}");
        assert_eq!(after[0].rcpt_to, [JANE]);
        let text = body(&after[0]);
        let (first, second) = order(
            language,
            "est refusée : /fermer n'est pas une action rapide connue.",
            "is refused: /fermer is not a known quick action.",
        );
        assert_first_then_second(&text, first, second);
        let (w1, w2) = order(language, "Action rapide refusée", "Quick action refused");
        assert!(subject(&after[0]).contains(&format!("{w1} / {w2}")));
        g.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_refuses_a_language_it_does_not_write_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    for (language, code) in [
        ("fr+en", 0),
        ("en+fr", 0),
        ("de", 1),
        ("fr+de", 1),
        ("en,fr", 1),
    ] {
        std::fs::write(&path, format!("[gateway]\nlanguage = \"{language}\"\n")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_crmgate"))
            .args(["--config", path.to_str().unwrap(), "check-config"])
            .env_remove("CRMGATE_CONFIG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{language}: {err}");
        if code == 1 {
            assert!(err.contains("gateway.language"), "{language}: {err}");
            assert!(err.contains(&format!("{language:?}")), "{language}: {err}");
        } else {
            let printed = String::from_utf8_lossy(&out.stdout);
            assert!(
                printed.contains(&format!("language = \"{language}\"")),
                "{printed}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_failure_notice_is_written_in_both_languages() {
    for language in ["fr+en", "en+fr"] {
        let mut g = Gateway::start_in(language, "", "").await;
        g.sink.refuse_recipient(CAROL);
        let number = g.open_ticket().await;
        g.settle().await;
        let before = g.mark();
        let message = format!(
            "From: Jane Doe <{JANE}>\nTo: {PUBLIC}\nSubject: RE: [{number}] Imprimante en panne\n\
             Message-ID: <jane-f@example.org>\n\nLe toner est change.\n"
        );
        assert!(g.send(JANE, &[PUBLIC], &message).await.starts_with("250"));
        let mut notices = Vec::new();
        for _ in 0..100 {
            let sent = g.settle().await;
            notices = to(before.of(&sent), BOB)
                .into_iter()
                .filter(|m| !body(m).contains("Le toner est change"))
                .collect();
            if !notices.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(
            notices.len(),
            1,
            "{language}: {:?}",
            before.of(&g.sink.messages())
        );
        let text = body(&notices[0]);
        let fr = format!("Un message du billet {number} n'a pas pu être remis.");
        let en = format!("A message of ticket {number} could not be delivered.");
        let (first, second) = order(language, &fr, &en);
        assert_first_then_second(&text, first, second);
        assert_eq!(
            text.matches("550 5.1.1").count(),
            2,
            "the reason in each: {text}"
        );
        let (w1, w2) = order(language, "Échec de remise", "Delivery failure");
        assert!(
            subject(&notices[0]).contains(&format!("{w1} / {w2}")),
            "{}",
            subject(&notices[0])
        );
        g.stop().await;
    }
}
