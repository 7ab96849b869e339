//! `crmgate store copy --to URL`: a SQLite log with each kind of entry,
//! made by the real daemon and commands, copied into an empty PostgreSQL
//! database (and a SQLite file), reads back the same through every listing
//! command; a database that is not empty is refused and nothing written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

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

/// The gateway's configuration with `[store] url` set to `url`.
fn config_on(g: &Gateway, url: &str, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(g.config_path()).unwrap();
    assert!(text.contains("[store]\nurl = \"\""), "{text}");
    let path = g.dir.path().join(name);
    std::fs::write(
        &path,
        text.replace("[store]\nurl = \"\"", &format!("[store]\nurl = \"{url}\"")),
    )
    .unwrap();
    path
}

/// The rows per table that `store copy` printed (`   12 entries`), but
/// the total.
fn copied(summary: &str) -> Vec<(String, u64)> {
    summary
        .lines()
        .skip(1)
        .filter(|l| !l.ends_with("rows in all"))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let rows = words.next()?.parse().ok()?;
            Some((words.next()?.to_string(), rows))
        })
        .collect()
}

/// Everything the commands read of a log: every ticket shown, the outbox,
/// the quarantine and each quarantined message's bytes.
fn everything(config: &Path) -> Vec<Value> {
    let list = json(config, &["ticket", "list", "--json"]);
    let mut all = vec![list.clone()];
    for t in list.as_array().unwrap() {
        all.push(json(
            config,
            &["ticket", "show", t["number"].as_str().unwrap(), "--json"],
        ));
    }
    all.push(json(config, &["outbox", "list", "--json"]));
    let quarantine = json(config, &["quarantine", "list", "--json"]);
    for q in quarantine.as_array().unwrap() {
        let id = q["id"].to_string();
        let (code, raw, err) = cli(config, &["quarantine", "show", &id, "--raw"]);
        assert_eq!(code, 0, "{err}");
        all.push(Value::String(raw));
    }
    all.push(quarantine);
    all
}

/// A log with each kind of entry, an attachment, a long text, a
/// quarantined message, a reply-all notice, outbox rows sent and one
/// queued, a row sent as its bytes (mail to the postmaster, passed on to
/// the operator; the copies are rows of their plans), made through the
/// daemon and the commands.
async fn a_full_log(g: &mut Gateway) -> String {
    g.stop().await;
    g.operator = Some("ops@example.org".into());
    g.boot().await;
    let number = g.open_ticket().await; // email + receipt
    let pdf = format!(
        "From: Alice Martin <alice@u.example>\nTo: {PUBLIC}\nSubject: RE: [{number}] Imprimante\n\
         MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n--b1\nContent-Type: text/plain; charset=utf-8\n\n\
         Voici le rapport.\n--b1\nContent-Type: application/pdf; name=\"rapport.pdf\"\nContent-Disposition: attachment; filename=\"rapport.pdf\"\n\
         Content-Transfer-Encoding: base64\n\nJVBERi0xLjQKJcfsj6IKMSAwIG9iago8PC9UeXBlL0NhdGFsb2c+PgplbmRvYmoKdHJhaWxlcgo8PC9Sb290IDEgMCBSPj4KJSVFT0YK\n--b1--\n"
    );
    assert!(g
        .send("alice@u.example", &[PUBLIC], &pdf)
        .await
        .starts_with("250"));
    let long = format!(
        "From: Alice Martin <alice@u.example>\nTo: {PUBLIC}\nSubject: RE: [{number}] Imprimante\n\
         Content-Type: text/html; charset=utf-8\n\n<p>{}</p>\n",
        "Le journal de l'imprimante, ligne apr\u{e8}s ligne. ".repeat(2000)
    );
    assert!(g
        .send("alice@u.example", &[PUBLIC], &long)
        .await
        .starts_with("250"));
    // An agent answering to all: a reply-all notice.
    let reply_all = format!(
        "From: Jane Doe <{JANE}>\nTo: {PUBLIC}\nCc: alice@u.example\nSubject: RE: [{number}] Imprimante\n\n\
         Je regarde.\n"
    );
    assert!(g.send(JANE, &[PUBLIC], &reply_all).await.starts_with("250"));
    // Mail to the postmaster: the quarantine.
    assert!(g
        .send(
            "someone@else.example",
            &["postmaster@crm.example.org"],
            "From: someone@else.example\nTo: postmaster@crm.example.org\nSubject: your server\n\nHello.\n",
        )
        .await
        .starts_with("250"));
    let attachment = g.dir.path().join("devis.txt");
    std::fs::write(&attachment, "Toner noir, 2 cartouches.\n").unwrap();
    let attachment = attachment.display().to_string();
    for args in [
        vec![
            "ticket",
            "email",
            &number,
            "--by",
            JANE,
            "--to",
            "vendor@shop.example",
            "--subject",
            "Toner",
            "--body",
            "Deux cartouches, s'il vous plaît.",
            "--attach",
            &attachment,
        ],
        vec![
            "ticket",
            "comment",
            &number,
            "--by",
            JANE,
            "--body",
            "Le toner est commandé.",
        ],
        vec![
            "ticket",
            "work-note",
            &number,
            "--by",
            BOB,
            "--body",
            "Fournisseur relancé.",
        ],
        vec!["ticket", "assign", &number, BOB],
        vec!["ticket", "resolve", &number, "--by", JANE],
    ] {
        let (code, _, err) = g.cli(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
    }
    let second = g
        .send(
            "dave@u.example",
            &[PUBLIC],
            "From: dave@u.example\nTo: support@example.org\nSubject: Wifi\nMessage-ID: <wifi@u.example>\n\nPlus de wifi.\n",
        )
        .await;
    assert!(second.starts_with("250"), "{second}");
    g.settle().await;
    g.stop().await;
    // With the daemon stopped, a comment's copy stays queued.
    let (code, _, err) = g.cli(&[
        "ticket",
        "comment",
        &number,
        "--by",
        JANE,
        "--body",
        "Encore une chose.",
    ]);
    assert_eq!(code, 0, "{err}");
    number
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_of_a_log_copies_into_postgres_and_sqlite_and_a_second_copy_writes_nothing() {
    let Some(url) = common::test_cluster::database() else {
        return;
    };
    let mut g = Gateway::start("").await;
    let number = a_full_log(&mut g).await;
    let source = g.config_path();
    let before = everything(&source);
    let shown = &before[1];
    let mut kinds: Vec<&str> = shown["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "closure",
            "comment",
            "email",
            "receipt",
            "system",
            "work_note"
        ],
    );
    let outbox = before.iter().rev().nth(2).unwrap().clone();
    let statuses: Vec<&str> = outbox
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert!(
        statuses.contains(&"sent") && statuses.contains(&"queued"),
        "{outbox}"
    );

    // A SQLite target: the crmgate.db of another state directory.
    let state = g.dir.path().join("copy-state");
    let sqlite = {
        let text = std::fs::read_to_string(g.config_path()).unwrap();
        let old = g.dir.path().join("state").display().to_string();
        assert!(text.contains(&old));
        let path = g.dir.path().join("sqlite.toml");
        std::fs::write(&path, text.replace(&old, &state.display().to_string())).unwrap();
        path
    };
    for (to, target) in [
        (url.clone(), config_on(&g, &url, "postgres.toml")),
        (
            format!("sqlite://{}", state.join("crmgate.db").display()),
            sqlite,
        ),
    ] {
        let (code, out, err) = g.cli(&["store", "copy", "--to", &to]);
        assert_eq!(code, 0, "store copy --to {to}: {err}");
        let rows = copied(&out);
        for (table, n) in &rows {
            assert!(*n > 0, "{to}: no {table} copied: {out}");
        }
        assert_eq!(rows.len(), 12, "every table: {out}");
        assert_eq!(everything(&target), before, "{to}: the copy reads the same");

        // The ids go on after the copied ones: a new message opens the next
        // ticket, its entries and outbox rows after the copied ones.
        let next = common::gateway::deliver(
            &target,
            &["--recipient", PUBLIC],
            b"From: erin@u.example\nTo: support@example.org\nSubject: Scanner\n\nLe scanner aussi.\n",
        );
        assert!(
            next.status.success(),
            "{}",
            String::from_utf8_lossy(&next.stderr)
        );
        let list = json(&target, &["ticket", "list", "--json"]);
        let numbers: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["number"].as_str().unwrap())
            .collect();
        assert!(numbers.contains(&"TKT0000003"), "{to}: {numbers:?}");
        assert!(numbers.contains(&number.as_str()));
        let after_new = everything(&target);

        // Again into the same database: refused, one line, nothing written.
        let (code, out, err) = g.cli(&["store", "copy", "--to", &to]);
        assert_eq!(code, 1, "{to}: {out}{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("not empty"), "{err}");
        assert_eq!(everything(&target), after_new, "{to}: nothing written");
    }
    // The source is as it was.
    assert_eq!(everything(&source), before);
}

#[test]
fn the_manual_and_the_completions_name_store_copy() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_crmgate"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let man = run(&["man"]);
    assert!(man.contains("crmgate\\-store(1)"), "{man}");
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("crmgate__subcmd__store__subcmd__copy"),
        "{bash}"
    );
    assert!(bash.contains("--password-file"), "{bash}");
    let help = run(&["store", "copy", "--help"]);
    assert!(
        help.contains("--to <URL>") && help.contains("empty database"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_over_tls_needs_the_servers_ca_and_the_log_is_read_there_with_store_ca_file() {
    let Some((name, tls)) = common::test_cluster::tls_database() else {
        return;
    };
    let mut g = Gateway::start("").await;
    let number = g.open_ticket().await;
    g.settle().await;
    g.stop().await;
    let url = format!(
        "postgres://crmgate@localhost:{}/{name}?sslmode=require",
        tls.port
    );

    let (code, _, err) = g.cli(&["store", "copy", "--to", &url]);
    assert_eq!(code, 1, "copied to a server nobody vouched for");
    assert!(
        err.contains("not trusted") && err.contains("--ca-file"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let ca = g.dir.path().join("db-ca.pem");
    std::fs::write(&ca, &tls.ca_pem).unwrap();
    let ca = ca.display().to_string();
    let (code, out, err) = g.cli(&["store", "copy", "--to", &url, "--ca-file", &ca]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("1 tickets") || out.contains("1 ticket"),
        "{out}"
    );

    let text = std::fs::read_to_string(g.config_path()).unwrap();
    let on_tls = text.replace(
        "[store]\nurl = \"\"",
        &format!("[store]\nurl = \"{url}\"\nca_file = {ca:?}"),
    );
    assert_ne!(on_tls, text);
    let config = g.dir.path().join("on-tls.toml");
    std::fs::write(&config, on_tls).unwrap();
    let args = ["ticket", "show", number.as_str(), "--json"];
    assert_eq!(json(&config, &args), json(&g.config_path(), &args));
}
