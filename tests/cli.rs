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
    let o = crmgate(dir.path(), &["ticket", "frobnicate"], &[]);
    assert_eq!(o.status.code(), Some(2));
    let o = crmgate(dir.path(), &["ticket", "show", "TKT0000099"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim(), "crmgate: no ticket TKT0000099");
    let o = crmgate(dir.path(), &["ticket", "list", "--json"], &[]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}
