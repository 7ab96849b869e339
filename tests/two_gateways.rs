//! Two MX hosts, one PostgreSQL database: two `crmgate serve` processes
//! on one database and one relay, mail sent to each and the same messages
//! to both at once, one of them SIGKILLed while the relay is down and its
//! outbox rows are leased. Every message answered `250` is in the log
//! exactly once; every outbox row is delivered (at least once: the
//! doubles are counted), the dead one's rows by the other once their
//! lease has run out, or at once by the same instance started again.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::gateway::{header, INTERNAL, JANE, PUBLIC};
use common::sink::Sink;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Instance {
    child: Child,
    addr: SocketAddr,
    config: PathBuf,
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

async fn start(dir: &Path, name: &str, url: &str, relay: &str) -> Instance {
    let addr = free_port();
    let state = dir.join(name);
    let text = format!(
        "[gateway]\nhostname = \"crm.example.org\"\nstate_dir = \"{state}\"\n\
         [smtp]\nlisten = \"{addr}\"\n\
         [addresses]\npublic = \"{PUBLIC}\"\ninternal = \"{INTERNAL}\"\n\
         [relay]\nurl = \"{relay}\"\nretry_initial_seconds = 1\nretry_max_seconds = 1\n\
         [store]\nurl = \"{url}\"\n\
         [security]\ntrusted_relays = [\"127.0.0.0/8\"]\n\
         [[agents]]\nname = \"Jane Doe\"\nemail = \"{JANE}\"\ndefault_notes_list = true\n",
        state = state.display(),
    );
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, text).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_crmgate"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{name} did not listen on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Instance {
        child,
        addr,
        config,
    }
}

impl Instance {
    /// SIGKILL, and reap it.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// `n` new messages of their own to `addr`, ids `{prefix}-{i}`, each
/// reply noted.
async fn send_own(
    addr: SocketAddr,
    prefix: &str,
    n: usize,
    answered: &mut BTreeMap<String, usize>,
) {
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let from = format!("r-{id}@u.example");
        let reply = send(addr, &from, PUBLIC, &message(&id, &id)).await;
        note_reply(answered, &id, reply);
    }
}

/// One SMTP transaction; the reply to the end of data, or `None` when the
/// instance is gone (refused, reset) or answered something else first.
async fn send(addr: SocketAddr, from: &str, rcpt: &str, message: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut buf = Vec::new();
    async fn reply(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = buf.drain(..end + 2).collect();
                let line = String::from_utf8_lossy(&line).into_owned();
                if line.as_bytes().get(3) != Some(&b'-') {
                    return Some(line);
                }
                continue;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    let data = message.replace('\n', "\r\n");
    reply(&mut stream, &mut buf).await?;
    for (line, want) in [
        ("EHLO mx.example.net".to_string(), "250"),
        (format!("MAIL FROM:<{from}>"), "250"),
        (format!("RCPT TO:<{rcpt}>"), "250"),
        ("DATA".to_string(), "354"),
    ] {
        stream
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .ok()?;
        if !reply(&mut stream, &mut buf).await?.starts_with(want) {
            return None;
        }
    }
    stream
        .write_all(format!("{data}\r\n.\r\n").as_bytes())
        .await
        .ok()?;
    let answer = reply(&mut stream, &mut buf).await;
    let _ = stream.write_all(b"QUIT\r\n").await;
    answer
}

fn json(config: &Path, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_crmgate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "crmgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every message answered `250` is logged exactly once, on a ticket of
/// its own, its other deliveries counted as duplicates of that entry.
fn assert_each_answer_logged_once(config: &Path, answered: &BTreeMap<String, usize>) {
    let tickets = json(config, &["ticket", "list", "--json"]);
    let mut logged: BTreeMap<String, (usize, i64)> = BTreeMap::new();
    for t in tickets.as_array().unwrap() {
        let shown = json(
            config,
            &["ticket", "show", t["number"].as_str().unwrap(), "--json"],
        );
        for e in shown["entries"].as_array().unwrap() {
            if let Some(mid) = e["message_id"].as_str() {
                let id = mid.trim_end_matches("@u.example").to_string();
                let entry = logged.entry(id).or_default();
                entry.0 += 1;
                entry.1 += e["duplicates"].as_i64().unwrap();
            }
        }
    }
    for (id, times) in answered {
        let (entries, duplicates) = logged.get(id).copied().unwrap_or_default();
        assert_eq!(
            entries, 1,
            "{id}: answered 250 {times} time(s), logged {entries}"
        );
        assert_eq!(duplicates as usize, times - 1, "{id}");
    }
    assert_eq!(
        tickets.as_array().unwrap().len(),
        answered.len(),
        "one ticket each"
    );
}

fn note_reply(answered: &mut BTreeMap<String, usize>, id: &str, reply: Option<String>) {
    if reply.is_some_and(|r| r.starts_with("250")) {
        *answered.entry(id.to_string()).or_default() += 1;
    }
}

fn message(id: &str, subject: &str) -> String {
    format!(
        "From: Requester <r-{id}@u.example>\nTo: {PUBLIC}\nSubject: {subject}\n\
         Message-ID: <{id}@u.example>\n\nLe message {id}.\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_database_log_each_message_once_and_deliver_every_row() {
    let Some(url) = common::test_cluster::database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let mut a = start(dir.path(), "a", &url, &sink.url()).await;
    let mut b = start(dir.path(), "b", &url, &sink.url()).await;
    // The relay is down: the rows stay queued, leased by whoever tried.
    sink.set_outage(true);

    // Each MX host its own mail, and the same messages to both at once.
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..16 {
        let id = format!("own-{i}");
        let to = if i % 2 == 0 { a.addr } else { b.addr };
        let reply = send(to, &format!("r-{id}@u.example"), PUBLIC, &message(&id, &id)).await;
        note_reply(&mut answered, &id, reply);
    }
    for i in 0..12 {
        let id = format!("both-{i}");
        let text = message(&id, &id);
        let from = format!("r-{id}@u.example");
        let (ra, rb) = tokio::join!(
            send(a.addr, &from, PUBLIC, &text),
            send(b.addr, &from, PUBLIC, &text)
        );
        note_reply(&mut answered, &id, ra);
        note_reply(&mut answered, &id, rb);
    }
    // Both have tried (and leased) their rows by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill();
    sink.set_outage(false);
    send_own(b.addr, "after", 8, &mut answered).await;

    // B delivers its rows, then the dead one's once their lease ran out.
    let deadline = Instant::now() + Duration::from_secs(150);
    let rows = loop {
        let rows = json(&b.config, &["outbox", "list", "--json"]);
        let waiting = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["status"] != "sent")
            .count();
        if waiting == 0 {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} rows not delivered: {rows}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Every message answered 250 is logged exactly once, its other
    // deliveries counted as duplicates.
    assert_eq!(answered.len(), 16 + 12 + 8, "{answered:?}");
    assert_each_answer_logged_once(&b.config, &answered);

    // Every row delivered at least once; the doubles (a row sent by A
    // whose mark died with it) counted.
    let rows = rows.as_array().unwrap();
    let received = sink.messages();
    let mut by_message_id: BTreeMap<String, usize> = BTreeMap::new();
    for m in &received {
        let text = m.text();
        let id = header(&text, "Message-ID").unwrap_or_default().to_string();
        *by_message_id.entry(id).or_default() += 1;
    }
    assert!(
        by_message_id.len() >= rows.len(),
        "{} rows, {} distinct messages received",
        rows.len(),
        by_message_id.len()
    );
    let doubles: usize = by_message_id.values().map(|n| n - 1).sum();
    eprintln!(
        "two gateways: {} messages answered 250, {} outbox rows, {} received by the relay, {doubles} doubles",
        answered.values().sum::<usize>(),
        rows.len(),
        received.len()
    );
    b.kill();
}

/// One instance, its several PostgreSQL writers and 16 SMTP sessions at
/// once, each its own messages and copies of the same few messages sent by
/// four sessions at the same moment: every message answered `250` is
/// logged exactly once, its other deliveries counted as duplicates, and
/// none is answered 451.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_instance_logs_each_message_of_sixteen_concurrent_sessions_once() {
    let Some(url) = common::test_cluster::database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let a = start(dir.path(), "a", &url, &sink.url()).await;

    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    let mut sent = 0;
    for round in 0..3 {
        let mut sessions = tokio::task::JoinSet::new();
        for i in 0..16 {
            for id in [
                format!("own-{round}-{i}"),
                format!("same-{round}-{}", i % 4),
            ] {
                let addr = a.addr;
                sessions.spawn(async move {
                    let text = message(&id, &id);
                    let reply = send(addr, &format!("r-{id}@u.example"), PUBLIC, &text).await;
                    (id, reply)
                });
                sent += 1;
            }
        }
        while let Some(done) = sessions.join_next().await {
            let (id, reply) = done.unwrap();
            assert!(
                reply.as_deref().is_some_and(|r| r.starts_with("250")),
                "{id}: {reply:?}"
            );
            note_reply(&mut answered, &id, reply);
        }
    }

    assert_eq!(answered.values().sum::<usize>(), sent);
    assert_eq!(answered.len(), 3 * (16 + 4), "{answered:?}");
    assert_each_answer_logged_once(&a.config, &answered);
    let mut a = a;
    a.kill();
}

/// An instance SIGKILLed while its rows are leased and started again on
/// the same state directory takes them back at once: delivered well before
/// their 60 s lease would have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_again_after_sigkill_sends_its_leased_rows_at_once() {
    let Some(url) = common::test_cluster::database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    sink.set_outage(true);
    let mut a = start(dir.path(), "a", &url, &sink.url()).await;
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    send_own(a.addr, "leased", 6, &mut answered).await;
    assert_eq!(answered.len(), 6, "{answered:?}");
    // The relay worker has tried, and leased, every row by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill();
    sink.set_outage(false);

    let started = Instant::now();
    let mut again = start(dir.path(), "a", &url, &sink.url()).await;
    let within = Duration::from_secs(30);
    loop {
        let rows = json(&again.config, &["outbox", "list", "--json"]);
        let rows = rows.as_array().unwrap();
        if !rows.is_empty() && rows.iter().all(|r| r["status"] == "sent") {
            break;
        }
        assert!(
            started.elapsed() < within,
            "rows still waiting after {within:?} (their lease is 60 s): {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
    assert!(log.contains("former run taken back"), "{log}");
    assert_each_answer_logged_once(&again.config, &answered);
    again.kill();
}
