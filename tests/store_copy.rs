//! `crmgate store copy --to URL`: a SQLite log with each kind of entry,
//! copied into an empty PostgreSQL database, reads back the same through
//! every listing command; a database that is not empty is refused.

mod common;

use common::gateway::*;
use serde_json::Value;

/// The gateway's configuration, on the PostgreSQL database at `url`.
fn on_postgres(g: &Gateway, url: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(g.config_path()).unwrap();
    let moved = text.replace("[store]\nurl = \"\"", &format!("[store]\nurl = \"{url}\""));
    assert_ne!(moved, text);
    let path = g.dir.path().join("on-postgres.toml");
    std::fs::write(&path, moved).unwrap();
    path
}

fn cli(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crmgate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(config: &std::path::Path, args: &[&str]) -> Value {
    let (code, out, err) = cli(config, args);
    assert_eq!(code, 0, "crmgate {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_log_copied_into_postgresql_shows_every_ticket_the_same() {
    let Some(url) = common::test_cluster::database() else {
        return;
    };
    let mut g = Gateway::start("").await;
    // A ticket with its receipt, a comment, a work note, an attachment, a
    // duplicate; a second one resolved (closure, system entries); mail to
    // postmaster (quarantine, a copy to no ticket).
    let number = g.open_ticket().await;
    let mails = [
        (
            JANE,
            PUBLIC,
            format!("From: Jane Doe <{JANE}>\nTo: {PUBLIC}\nSubject: Re: [{number}] Imprimante\nMessage-ID: <c1@example.org>\n\nJe passe demain.\n"),
        ),
        (
            JANE,
            INTERNAL,
            format!("From: {JANE}\nTo: {INTERNAL}\nSubject: [{number}] note\nMessage-ID: <n1@example.org>\n\nVoir le pilote.\n"),
        ),
        (
            "alice@u.example",
            PUBLIC,
            format!(
                "From: alice@u.example\nTo: {PUBLIC}\nSubject: Re: [{number}] rapport\nMessage-ID: <a1@u.example>\n\
                 MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n--b1\nContent-Type: text/plain; charset=utf-8\n\n\
                 Voici le rapport.\n--b1\nContent-Type: application/pdf; name=\"rapport.pdf\"\nContent-Disposition: attachment; filename=\"rapport.pdf\"\n\
                 Content-Transfer-Encoding: base64\n\nJVBERi0xLjQKJcfsj6IKMSAwIG9iago8PC9UeXBlL0NhdGFsb2c+PgplbmRvYmoKdHJhaWxlcgo8PC9Sb290IDEgMCBSPj4KJSVFT0YK\n--b1--\n"
            ),
        ),
        (
            "alice@u.example",
            PUBLIC,
            format!("From: alice@u.example\nTo: {PUBLIC}\nSubject: Re: [{number}] rapport\nMessage-ID: <a1@u.example>\n\
                 MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n--b1\nContent-Type: text/plain; charset=utf-8\n\n\
                 Voici le rapport.\n--b1\nContent-Type: application/pdf; name=\"rapport.pdf\"\nContent-Disposition: attachment; filename=\"rapport.pdf\"\n\
                 Content-Transfer-Encoding: base64\n\nJVBERi0xLjQKJcfsj6IKMSAwIG9iago8PC9UeXBlL0NhdGFsb2c+PgplbmRvYmoKdHJhaWxlcgo8PC9Sb290IDEgMCBSPj4KJSVFT0YK\n--b1--\n"),
        ),
        (
            "bob@b.example",
            PUBLIC,
            format!("From: bob@b.example\nTo: {PUBLIC}\nSubject: Scanner\nMessage-ID: <s1@b.example>\n\nLe scanner.\n"),
        ),
        (
            "mailer-daemon@relay.example",
            "postmaster@crm.example.org",
            "From: mailer-daemon@relay.example\nTo: postmaster@crm.example.org\nSubject: your server\n\nHello.\n".to_string(),
        ),
    ];
    for (from, rcpt, text) in &mails {
        let reply = g.send(from, &[rcpt], text).await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    g.settle().await;
    let tickets = g.json(&["ticket", "list", "--json"]);
    let numbers: Vec<String> = tickets
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["number"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(numbers.len(), 2, "{tickets}");
    let (code, _, err) = g.cli(&["ticket", "resolve", &numbers[1], "--by", JANE]);
    assert_eq!(code, 0, "{err}");
    g.settle().await;
    g.stop().await;

    let (code, out, err) = g.cli(&["store", "copy", "--to", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 tickets"), "{out}");
    assert!(out.contains("1 quarantine"), "{out}");

    let pg = on_postgres(&g, &url);
    let sqlite = g.config_path();
    for args in [
        &["ticket", "list", "--json"][..],
        &["outbox", "list", "--json"],
        &["quarantine", "list", "--json"],
        &["watch", "list", &numbers[0], "--json"],
        &["notes-list", "list", &numbers[0], "--json"],
    ] {
        assert_eq!(json(&sqlite, args), json(&pg, args), "{args:?}");
    }
    let kinds: Vec<String> = numbers
        .iter()
        .flat_map(|number| {
            let args = ["ticket", "show", number, "--json"];
            let shown = json(&sqlite, &args);
            assert_eq!(shown, json(&pg, &args), "{number}");
            shown["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["kind"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    for kind in ["comment", "work_note", "receipt", "closure"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    let shown = json(&pg, &["ticket", "show", &numbers[0], "--json"]);
    assert!(shown["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["duplicates"] == 1 && e["attachments"][0]["filename"] == "rapport.pdf"));

    // New rows on PostgreSQL go on after the copied ids.
    let (code, _, err) = cli(
        &pg,
        &[
            "ticket",
            "comment",
            &numbers[0],
            "--by",
            JANE,
            "--body",
            "Après la copie.",
        ],
    );
    assert_eq!(code, 0, "{err}");

    // A second copy finds the database full and copies nothing.
    let (code, _, err) = g.cli(&["store", "copy", "--to", &url]);
    assert_eq!(code, 1);
    assert!(err.contains("not empty"), "{err}");
    assert!(err.contains("tickets"), "{err}");
}
