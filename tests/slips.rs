//! Issue 17's slips, one regression test each, as an operator meets them:
//! the real binary, a real SQLite file, `deliver` fed as a pipe transport
//! feeds it.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

const JANE: &str = "jane.doe@example.org";

impl Setup {
    fn new(extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("crmgate.toml");
        std::fs::write(
            &config,
            format!(
                "[gateway]\nstate_dir = \"{}\"\n[addresses]\npublic = \"support@example.org\"\n\
                 internal = \"support-notes@example.org\"\n[relay]\nurl = \"file://{}\"\n{extra}\n\
                 [[agents]]\nname = \"Jane Doe\"\nemail = \"{JANE}\"\n",
                dir.path().join("state").display(),
                dir.path().join("sent").display()
            ),
        )
        .unwrap();
        Setup { dir, config }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("state").join("crmgate.db")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crmgate"));
        cmd.current_dir(self.dir.path())
            .env_remove("CRMGATE_CONFIG")
            .arg("--config")
            .arg(&self.config)
            .args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `deliver` with the message on stdin; the error of writing it, if
    /// the process stopped reading.
    fn deliver(&self, args: &[&str], message: &[u8]) -> (Output, Option<std::io::Error>) {
        let mut child = self
            .command(&[&["deliver", "--recipient", "support@example.org"], args].concat())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let written = child.stdin.take().unwrap().write_all(message).err();
        (child.wait_with_output().unwrap(), written)
    }

    fn json(&self, args: &[&str]) -> Value {
        let o = self.run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn message(from: &str, id: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "{extra_headers}From: {from}\r\nTo: support@example.org\r\nSubject: Imprimante en panne\r\n\
         Message-ID: <{id}@u.example>\r\n\r\nElle ne marche plus depuis ce matin.\r\n"
    )
    .into_bytes()
}

#[test]
fn deliver_applies_max_message_bytes_reading_no_more_than_that() {
    let s = Setup::new("[smtp]\nmax_message_bytes = 10000\n");
    let mut big = message("alice@u.example", "big", "");
    big.extend(std::iter::repeat_n(b'x', 8 << 20));
    let (o, written) = s.deliver(&["--sender", "alice@u.example"], &big);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("552 5.3.4") && stderr(&o).contains("10000"),
        "{}",
        stderr(&o)
    );
    // It stopped reading at the limit: the 8 MB could not all be written.
    let written = written.expect("the message was read to its end");
    assert_eq!(written.kind(), std::io::ErrorKind::BrokenPipe);
    assert!(!s.db().exists(), "nothing stored");

    // At the limit exactly, it is taken.
    let small = message("alice@u.example", "small", "");
    let mut fits = small.clone();
    fits.truncate(small.len() - 2);
    fits.extend(std::iter::repeat_n(b'y', 10000 - small.len()));
    fits.extend(b"\r\n");
    assert_eq!(fits.len(), 10000);
    let (o, _) = s.deliver(&["--sender", "alice@u.example"], &fits);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn deliver_without_sender_is_sender_unknown_never_the_null_reverse_path() {
    let s = Setup::new("");
    // No --sender, no Return-Path: the From is the sender, a person's mail.
    let (o, _) = s.deliver(&[], &message("alice@u.example", "no-sender", ""));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The Return-Path the MTA wrote is believed first.
    let (o, _) = s.deliver(
        &[],
        &message(
            "bob@v.example",
            "return-path",
            "Return-Path: <bob@v.example>\r\n",
        ),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let tickets = s.json(&["ticket", "list", "--json"]);
    let requesters: Vec<&str> = tickets
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["requesters"][0].as_str().unwrap())
        .collect();
    assert_eq!(requesters, ["alice@u.example", "bob@v.example"]);
    assert_eq!(
        s.json(&["quarantine", "list", "--json"]),
        Value::Array(vec![])
    );

    // A null reverse-path said so (Return-Path: <>) is still automatic.
    let (o, _) = s.deliver(
        &[],
        &message("carol@w.example", "null", "Return-Path: <>\r\n"),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let q = s.json(&["quarantine", "list", "--json"]);
    assert_eq!(q[0]["reason"], "automatic", "{q}");
}

#[test]
fn a_toml_syntax_error_names_the_line_the_key_and_the_fix() {
    let s = Setup::new("[smtp]\nmax_recipients = 10\nlisten = 127.0.0.1:2525\n");
    let o = s.run(&["check-config"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("smtp.listen"), "the key: {err}");
    assert!(err.contains("line 10"), "the line: {err}");
    assert!(
        err.contains("listen = \"127.0.0.1:2525\""),
        "the fix: {err}"
    );
}

#[test]
fn check_config_fails_naming_a_state_dir_that_cannot_be_created_and_serve_names_it_once() {
    let s = Setup::new("");
    let file = s.dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        &s.dir.path().join("state").display().to_string(),
        &file.join("state").display().to_string(),
    );
    std::fs::write(&s.config, text).unwrap();
    let o = s.run(&["check-config"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("gateway.state_dir"), "{}", stderr(&o));

    let o = s.run(&["serve"]);
    assert_eq!(o.status.code(), Some(78), "EX_CONFIG: {}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.matches("gateway.state_dir").count(), 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn serve_exits_78_on_a_configuration_error() {
    let s = Setup::new("[smtp]\nmax_sessions = 0\n");
    let o = s.run(&["serve"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("smtp.max_sessions"), "{}", stderr(&o));
}

#[test]
fn read_only_commands_never_create_a_database_and_say_where_they_looked() {
    let s = Setup::new("");
    for args in [
        &["ticket", "list"][..],
        &["ticket", "show", "TKT0000001"],
        &["outbox", "list", "--json"],
        &["quarantine", "list"],
        &["watch", "list", "TKT0000001"],
        &["notes-list", "list", "TKT0000001"],
        &["quarantine", "show", "1"],
    ] {
        let o = s.run(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains(&s.db().display().to_string()),
            "{args:?} names where it looked: {err}"
        );
    }
    assert!(!s.dir.path().join("state").exists(), "nothing created");
}

#[test]
fn ticket_list_and_outbox_list_do_not_panic_on_a_closed_pipe() {
    let s = Setup::new("");
    let (o, _) = s.deliver(
        &["--sender", "alice@u.example"],
        &message("alice@u.example", "pipe", ""),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for args in [
        &["ticket", "list"][..],
        &["ticket", "list", "--json"],
        &["ticket", "show", "TKT0000001"],
        &["outbox", "list"],
        &["outbox", "list", "--json"],
    ] {
        // The reader is gone before the command writes: `| head -1` at its worst.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = s
            .command(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
}

#[test]
fn ticket_email_to_a_crm_address_is_refused_with_one_line() {
    let s = Setup::new("");
    let (o, _) = s.deliver(
        &["--sender", "alice@u.example"],
        &message("alice@u.example", "crm", ""),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let before = s.json(&["outbox", "list", "--json"]);
    for to in [
        "support@example.org",
        "Support-Notes@Example.org",
        "support+TKT0000001@example.org",
    ] {
        let o = s.run(&[
            "ticket",
            "email",
            "TKT0000001",
            "--by",
            JANE,
            "--to",
            "alice@u.example",
            "--to",
            to,
            "--subject",
            "Votre imprimante",
            "--body",
            "Bonjour",
        ]);
        assert_eq!(o.status.code(), Some(1), "{to}");
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("CRM address"), "{err}");
    }
    assert_eq!(
        s.json(&["outbox", "list", "--json"]),
        before,
        "nothing queued"
    );
}

fn quarantined_person_mail(s: &Setup) -> (i64, Vec<u8>) {
    // As the old `deliver` without --sender stored it: a null reverse-path.
    let raw = message("alice@u.example", "quarantined", "");
    let (o, _) = s.deliver(&["--sender", "<>"], &raw);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let q = s.json(&["quarantine", "list", "--json"]);
    assert_eq!(q[0]["reason"], "automatic", "{q}");
    (q[0]["id"].as_i64().unwrap(), raw)
}

#[test]
fn quarantine_show_prints_headers_and_text_and_raw_the_bytes() {
    let s = Setup::new("");
    let (id, raw) = quarantined_person_mail(&s);
    let o = s.run(&["quarantine", "show", &id.to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Subject: Imprimante en panne"), "{out}");
    assert!(
        out.contains("Elle ne marche plus depuis ce matin."),
        "{out}"
    );
    assert!(out.contains("automatic"), "{out}");

    let o = s.run(&["quarantine", "show", &id.to_string(), "--raw"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(o.stdout, raw);

    let o = s.run(&["quarantine", "show", "999"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("999"), "{}", stderr(&o));
}

#[test]
fn quarantine_release_processes_it_as_if_it_had_just_arrived() {
    let s = Setup::new("");
    let (id, _) = quarantined_person_mail(&s);
    assert_eq!(s.json(&["ticket", "list", "--json"]), Value::Array(vec![]));
    let o = s.run(&["quarantine", "release", &id.to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let tickets = s.json(&["ticket", "list", "--json"]);
    assert_eq!(tickets[0]["requesters"][0], "alice@u.example", "{tickets}");
    assert_eq!(tickets[0]["subject"], "Imprimante en panne");
    assert_eq!(
        s.json(&["quarantine", "list", "--json"]),
        Value::Array(vec![])
    );
    // Its receipt is queued as for any new ticket.
    let outbox = s.json(&["outbox", "list", "--json"]);
    assert_eq!(outbox.as_array().unwrap().len(), 1, "{outbox}");
    let o = s.run(&["quarantine", "release", &id.to_string()]);
    assert_eq!(o.status.code(), Some(1), "released once");
}

#[test]
fn completions_man_and_version_print() {
    let s = Setup::new("");
    let o = s.run(&["completions", "bash"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("_crmgate()") && out.contains("quarantine"),
        "{out}"
    );
    for shell in ["zsh", "fish"] {
        let o = s.run(&["completions", shell]);
        assert_eq!(o.status.code(), Some(0), "{shell}");
        assert!(!o.stdout.is_empty());
    }
    let o = s.run(&["man"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(".TH crmgate 1") && out.contains("check\\-config"),
        "{out}"
    );
    let o = s.run(&["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("crmgate {}", env!("CARGO_PKG_VERSION"))
    );
}
