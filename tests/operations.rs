//! What an operator runs crmgate with: `/metrics` and `/healthz` on a
//! running daemon (the real binary), JSON log lines, SIGHUP on a key only
//! a restart applies, and systemd's watchdog through a real NOTIFY_SOCKET.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::client::Client;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

struct Daemon {
    dir: tempfile::TempDir,
    child: Child,
    smtp: SocketAddr,
    http: SocketAddr,
    config: PathBuf,
    log: PathBuf,
}

fn config_text(dir: &Path, smtp: SocketAddr, http: SocketAddr) -> String {
    format!(
        "[gateway]\nstate_dir = \"{}\"\n[smtp]\nlisten = \"{smtp}\"\n\
         [addresses]\npublic = \"support@example.org\"\ninternal = \"support-notes@example.org\"\n\
         [relay]\nurl = \"file://{}\"\n[auth]\nverify = false\n\
         [metrics]\nlisten = \"{http}\"\n[log]\nformat = \"json\"\n",
        dir.join("state").display(),
        dir.join("sent").display()
    )
}

impl Daemon {
    fn start(env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(env, "")
    }

    /// With `toml` added to the configuration (whole tables).
    fn start_with(env: &[(&str, &str)], toml: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let (smtp, http) = (free_port(), free_port());
        let config = dir.path().join("crmgate.toml");
        std::fs::write(&config, config_text(dir.path(), smtp, http) + toml).unwrap();
        let log = dir.path().join("stderr.log");
        // systemd names the process the watchdog is for: the shell execs
        // crmgate, which keeps the shell's pid.
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "WATCHDOG_PID=$$ exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_crmgate"),
        ])
        .current_dir(dir.path())
        .env_remove("CRMGATE_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let d = Daemon {
            dir,
            child,
            smtp,
            http,
            config,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(smtp).is_err()
            || std::net::TcpStream::connect(http).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("state").join("crmgate.db")
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(self.http).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    /// Every sample of `/metrics`, by name and labels.
    async fn scrape(&self) -> BTreeMap<String, f64> {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').unwrap();
                (name.to_string(), value.parse().unwrap())
            })
            .collect()
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    fn stop(mut self) -> (Option<i32>, String) {
        self.signal("TERM");
        let status = self.child.wait().unwrap();
        (status.code(), self.log_text())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, key: &str) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

fn sum(map: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    map.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

fn message(i: usize) -> Vec<u8> {
    format!(
        "From: Alice <alice{i}@u.example>\r\nTo: support@example.org\r\nSubject: Panne {i}\r\n\
         Message-ID: <m{i}@u.example>\r\n\r\nElle ne marche plus.\r\n"
    )
    .into_bytes()
}

async fn wait_for(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_what_was_sent() {
    let d = Daemon::start(&[]);
    // The start-up probe's connection may still be open for a moment on a
    // loaded machine: count from when it is gone.
    wait_for("the start-up probe's session to end", async || {
        d.scrape().await.get("crmgate_smtp_sessions") == Some(&0.0)
    })
    .await;
    let before = d.scrape().await;
    assert_eq!(
        before.get(&format!(
            "crmgate_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        Some(&1.0),
        "{before:?}"
    );
    assert_eq!(before.get("crmgate_smtp_sessions"), Some(&0.0));

    let mut c = Client::connect(d.smtp).await;
    c.expect("220").await;
    c.cmd("EHLO client.example", "250").await;
    let open = d.scrape().await;
    assert_eq!(open.get("crmgate_smtp_sessions"), Some(&1.0), "one open");
    for i in 0..3 {
        c.transaction(
            &format!("alice{i}@u.example"),
            &["support@example.org"],
            &message(i),
            "250",
        )
        .await;
    }
    c.cmd("MAIL FROM:<x@u.example>", "250").await;
    c.cmd("RCPT TO:<nobody@example.org>", "550").await;
    c.cmd("QUIT", "221").await;
    drop(c);

    // The three receipts, sent as .eml files, and their rows marked sent
    // (the attempt is counted when it ends, its mark committed with the
    // writer's next batch).
    wait_for("the receipts", async || {
        let now = d.scrape().await;
        delta(
            &before,
            &now,
            "crmgate_relay_attempts_total{result=\"sent\"}",
        ) >= 3.0
            && now.get("crmgate_smtp_sessions") == Some(&0.0)
            && now.get("crmgate_outbox_rows{status=\"queued\"}") == Some(&0.0)
    })
    .await;
    let after = d.scrape().await;
    assert_eq!(
        sum(&after, "crmgate_messages_total") - sum(&before, "crmgate_messages_total"),
        3.0
    );
    assert_eq!(delta(&before, &after, "crmgate_accept_seconds_count"), 3.0);
    assert_eq!(
        delta(&before, &after, "crmgate_smtp_replies_total{code=\"354\"}"),
        3.0
    );
    assert_eq!(
        delta(&before, &after, "crmgate_smtp_replies_total{code=\"550\"}"),
        1.0
    );
    // MAIL and RCPT of each of the three, the DATA's 250, and the last MAIL.
    assert_eq!(
        delta(&before, &after, "crmgate_smtp_replies_total{code=\"250\"}"),
        10.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "crmgate_relay_attempts_total{result=\"sent\"}"
        ),
        3.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "crmgate_relay_attempts_total{result=\"retry\"}"
        ),
        0.0
    );
    assert_eq!(
        after.get("crmgate_outbox_rows{status=\"queued\"}"),
        Some(&0.0)
    );
    assert_eq!(
        after.get("crmgate_outbox_rows{status=\"failed\"}"),
        Some(&0.0)
    );
    assert_eq!(
        after.get("crmgate_outbox_oldest_queued_seconds"),
        Some(&0.0)
    );
    let decisions: Vec<&String> = after
        .keys()
        .filter(|k| k.starts_with("crmgate_messages_total"))
        .collect();
    assert_eq!(
        decisions.len(),
        1,
        "one decision for three new tickets: {decisions:?}"
    );

    let (code, log) = d.stop();
    assert_eq!(code, Some(0));
    // Every line is one JSON object.
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let ready = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("crmgate ready")
        })
        .expect("a start-up line");
    let words = ready["message"].as_str().unwrap();
    assert!(
        words.contains("crmgate.toml") && words.contains("crmgate.db"),
        "{words}"
    );
    assert!(
        words.contains("0 agent(s)") && words.contains("relay file://"),
        "{words}"
    );
    assert!(
        !words.contains("File(") && !words.contains('{'),
        "no debug text: {words}"
    );
    let refused = lines
        .iter()
        .find(|l| l["address"] == "nobody@example.org")
        .expect("a line for the refused recipient");
    assert!(
        refused["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_200_then_503_when_the_database_cannot_be_written() {
    let d = Daemon::start(&[]);
    wait_for("healthz", async || d.get("/healthz").await.0 == 200).await;
    assert_eq!(d.get("/healthz").await, (200, "ok\n".into()));
    assert_eq!(d.get("/nothing").await.0, 404);

    // The file at the database's path stops being one that can be written
    // (as root, too, for whom a chmod changes nothing).
    let moved = d.dir.path().join("moved.db");
    std::fs::rename(d.db(), &moved).unwrap();
    std::fs::create_dir(d.db()).unwrap();
    let (status, body) = d.get("/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("cannot be written") && body.contains("crmgate.db"),
        "{body}"
    );

    std::fs::remove_dir(d.db()).unwrap();
    std::fs::rename(&moved, d.db()).unwrap();
    assert_eq!(d.get("/healthz").await.0, 200);
}

/// `sql`'s one integer per row, on a connection of the test's own to the
/// database at `url` (the sync client runs a runtime of its own: not on a
/// tokio thread).
fn admin_query(url: &str, sql: &'static str) -> Vec<i64> {
    let url = url.to_string();
    std::thread::spawn(move || {
        let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        admin
            .query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect()
    })
    .join()
    .unwrap()
}

/// The backend pids of the daemon's connections.
fn crmgate_backends(url: &str) -> std::collections::BTreeSet<i64> {
    admin_query(
        url,
        "SELECT pid::bigint FROM pg_stat_activity \
         WHERE application_name = 'crmgate' AND datname = current_database()",
    )
    .into_iter()
    .collect()
}

/// Sessions ever opened on the database (each of these queries is one).
fn sessions(url: &str) -> i64 {
    admin_query(
        url,
        "SELECT sessions FROM pg_stat_database WHERE datname = current_database()",
    )[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_on_postgresql_keeps_its_connection_and_opens_another_when_it_is_lost() {
    let Some(url) = common::test_cluster::database() else {
        return;
    };
    let d = Daemon::start_with(&[], &format!("[store]\nurl = \"{url}\"\n"));
    wait_for("healthz", async || d.get("/healthz").await.0 == 200).await;
    let after_one = crmgate_backends(&url);
    let before = sessions(&url);
    for _ in 0..10 {
        assert_eq!(d.get("/healthz").await, (200, "ok\n".into()));
        assert_eq!(d.get("/metrics").await.0, 200);
    }
    let opened = sessions(&url) - before;
    assert!(
        opened <= 2,
        "twenty probes opened {opened} sessions (one is the test's own)"
    );
    assert_eq!(
        crmgate_backends(&url),
        after_one,
        "twenty probes, the same connections"
    );

    // An administrator ends every connection of the daemon's: the next
    // probe still answers 200, on a new one (the writers reconnect too).
    let ended = admin_query(
        &url,
        "SELECT pg_terminate_backend(pid)::int::bigint FROM pg_stat_activity \
         WHERE application_name = 'crmgate' AND datname = current_database()",
    );
    assert_eq!(ended.len(), after_one.len());
    assert_eq!(d.get("/healthz").await, (200, "ok\n".into()));
    let now = crmgate_backends(&url);
    assert!(
        !now.is_empty() && now.is_disjoint(&after_one),
        "{now:?} after {after_one:?}"
    );
    let (code, log) = d.stop();
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_that_changes_a_restart_only_key_says_so() {
    let d = Daemon::start(&[]);
    let text = std::fs::read_to_string(&d.config).unwrap().replace(
        &format!("listen = \"{}\"", d.smtp),
        "listen = \"127.0.0.1:1\"",
    );
    std::fs::write(&d.config, text).unwrap();
    d.signal("HUP");
    wait_for("the reload", async || {
        d.log_text().contains("configuration reloaded")
    })
    .await;
    let (_, log) = d.stop();
    let line = log
        .lines()
        .find(|l| l.contains("only a restart applies it"))
        .unwrap_or_else(|| panic!("{log}"));
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["key"], "smtp.listen");
}

/// The datagrams systemd would get, from a socket of the test's own.
fn notifications(socket: &UnixDatagram, for_how_long: Duration) -> Vec<String> {
    let deadline = Instant::now() + for_how_long;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_pings_stop_while_the_writer_is_stuck() {
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    let d = Daemon::start(&[
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        // WatchdogSec=0.6: a ping every 0.3 s.
        ("WATCHDOG_USEC", "600000"),
    ]);
    let first = notifications(&socket, Duration::from_secs(2));
    assert!(first.iter().any(|n| n.contains("READY=1")), "{first:?}");
    let pings = first.iter().filter(|n| n.contains("WATCHDOG=1")).count();
    assert!(pings >= 3, "pings while all is well: {first:?}");

    // Another process holds the write lock: the writer's next transaction
    // waits (as behind a stuck disk), and so does its answer to the ping.
    let db = rusqlite::Connection::open(d.db()).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    // A ping already on its way may still arrive.
    notifications(&socket, Duration::from_millis(700));
    let stalled = notifications(&socket, Duration::from_secs(2));
    assert!(
        !stalled.iter().any(|n| n.contains("WATCHDOG=1")),
        "no ping while the writer is stuck: {stalled:?}"
    );

    db.execute_batch("ROLLBACK").unwrap();
    let again = notifications(&socket, Duration::from_secs(3));
    assert!(
        again.iter().filter(|n| n.contains("WATCHDOG=1")).count() >= 2,
        "pings again: {again:?}"
    );
    let (code, log) = d.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("watchdog: no ping"), "{log}");
}
