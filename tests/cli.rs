//! The command line as an operator meets it: configuration errors that
//! name the key, the lookup order, one-line failures, usage errors.

use std::process::{Command, Output};

fn crmgate(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crmgate"));
    cmd.current_dir(dir).args(args).env_remove("CRMGATE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[gateway]\nlanguage = \"en\"\n").unwrap();
    let o = crmgate(
        dir.path(),
        &["check-config", "--config", path.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("language = \"en\""), "{out}");
    assert!(out.contains("listen = \"127.0.0.1:2525\""), "{out}");
}

#[test]
fn every_bad_key_is_named_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[smtp]\nmax_sessions = 0\n[relay]\nurl = \"ftp://x\"\n",
    )
    .unwrap();
    let o = crmgate(
        dir.path(),
        &["--config", path.to_str().unwrap(), "check-config"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("smtp.max_sessions") && err.contains("relay.url"),
        "{err}"
    );

    std::fs::write(&path, "[smtp]\nlisten = \"127.0.0.1:25\"\nlsiten = 1\n").unwrap();
    let err = stderr(&crmgate(
        dir.path(),
        &["check-config", "--config", path.to_str().unwrap()],
        &[],
    ));
    assert!(err.contains("smtp.lsiten"), "{err}");
}

#[test]
fn a_named_file_that_does_not_exist_is_an_error_and_the_environment_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let o = crmgate(
        dir.path(),
        &["check-config", "--config", "nowhere.toml"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nowhere.toml"));
    let o = crmgate(
        dir.path(),
        &["check-config"],
        &[("CRMGATE_CONFIG", "also-nowhere.toml")],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("also-nowhere.toml"));
}

#[test]
fn a_broken_template_is_a_check_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let templates = dir.path().join("templates");
    std::fs::create_dir(&templates).unwrap();
    std::fs::write(templates.join("receipt.fr.txt"), "{% for %}").unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!("[auto]\ntemplates_dir = \"{}\"\n", templates.display()),
    )
    .unwrap();
    let o = crmgate(
        dir.path(),
        &["check-config", "--config", path.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("receipt.fr.txt"), "{}", stderr(&o));
}

#[test]
fn check_config_reads_relay_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let ca = dir.path().join("ca.pem");
    let config = format!(
        "[relay]\nurl = \"smtp://relay.example.org:587?tls=required\"\nca_file = {:?}\n",
        ca.display().to_string()
    );
    std::fs::write(&path, &config).unwrap();
    let check = || {
        crmgate(
            dir.path(),
            &["check-config", "--config", path.to_str().unwrap()],
            &[],
        )
    };

    // Missing, then present but with no certificate (a key, say).
    let o = check();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("relay.ca_file: cannot read"),
        "{}",
        stderr(&o)
    );
    let generated = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
    std::fs::write(&ca, generated.signing_key.serialize_pem()).unwrap();
    let o = check();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("relay.ca_file") && err.contains("no certificate"),
        "{err}"
    );

    std::fs::write(&ca, generated.cert.pem()).unwrap();
    let o = check();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("ca_file = "), "{out}");
}

#[test]
fn usage_errors_exit_2_and_unknown_tickets_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    // Only serve and deliver create a database: this one is made here.
    crmgate::store::open(&dir.path().join("crmgate-data/crmgate.db")).unwrap();
    let o = crmgate(dir.path(), &["ticket", "frobnicate"], &[]);
    assert_eq!(o.status.code(), Some(2));
    let o = crmgate(dir.path(), &["ticket", "show", "TKT0000099"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim(), "crmgate: no ticket TKT0000099");
    let o = crmgate(dir.path(), &["ticket", "list", "--json"], &[]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}

/// Issue 14 / 17: a configuration `deliver` could not read or use exited 1,
/// which Postfix's pipe(8) takes as permanent (`dsn=5.3.0, bounced`): one
/// typo in crmgate.toml bounced every incoming request. 75 makes the MTA
/// keep the mail until the file is fixed.
#[test]
fn deliver_exits_75_not_1_when_the_configuration_cannot_be_read_or_used() {
    use std::io::Write as _;
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crmgate.toml");
    // As master.cf runs it: the file, then deliver, the envelope, the message on stdin.
    let pipe = |env: &[(&str, &str)], config: Option<&std::path::Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crmgate"));
        cmd.current_dir(dir.path()).env_remove("CRMGATE_CONFIG");
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        cmd.args([
            "deliver",
            "--sender",
            "alice@u.example",
            "--recipient",
            "support@example.org",
        ]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let written = child.stdin.take().unwrap().write_all(
            b"From: alice@u.example\nTo: support@example.org\nSubject: Imprimante\n\
              Message-ID: <pipe-75@u.example>\n\nElle ne marche plus.\n",
        );
        // A refused configuration may end the process before it reads the
        // message (Postfix takes that as well): only the exit status counts then.
        if let Err(e) = written {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        child.wait_with_output().unwrap()
    };
    let good = format!(
        "[gateway]\nstate_dir = \"{}\"\n[addresses]\npublic = \"support@example.org\"\n\
         internal = \"support-notes@example.org\"\n[relay]\nurl = \"file://{}\"\n",
        dir.path().join("state").display(),
        dir.path().join("sent").display()
    );

    // A file named by --config that is not there.
    let o = pipe(&[], Some(&dir.path().join("nowhere.toml")));
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(stderr(&o).contains("nowhere.toml"), "{}", stderr(&o));
    // One named by $CRMGATE_CONFIG that is not there.
    let o = pipe(&[("CRMGATE_CONFIG", "also-nowhere.toml")], None);
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(stderr(&o).contains("also-nowhere.toml"), "{}", stderr(&o));
    // A TOML syntax error (the operator's typo of issue 14).
    std::fs::write(&path, good.replace("[relay]", "[relay\n")).unwrap();
    let o = pipe(&[], Some(&path));
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    // A value that parses but cannot be used.
    std::fs::write(&path, format!("{good}[smtp]\nmax_sessions = 0\n")).unwrap();
    let o = pipe(&[], Some(&path));
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(stderr(&o).contains("smtp.max_sessions"), "{}", stderr(&o));
    assert!(
        !dir.path().join("state").exists(),
        "nothing is stored on a configuration that was refused"
    );

    // Fixed, the same delivery (as the MTA retries it) is stored.
    std::fs::write(&path, &good).unwrap();
    let o = pipe(&[], Some(&path));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(dir.path().join("state").join("crmgate.db").exists());
}
