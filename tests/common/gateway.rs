//! The whole daemon for end-to-end tests: the real listener on
//! 127.0.0.1:0, a real SQLite file in a temporary directory, a real SMTP
//! sink as its relay, and the real `crmgate` binary for the commands.
//!
//! Moved here from `tests/daemon.rs` so the hostile tests (`spoofing.rs`)
//! and the daemon tests drive the gateway the same way. `Gateway::start`
//! takes extra lines for the `[security]` section; without a
//! `trusted_relays` line there, loopback (the tests' own peer) is trusted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::client::{self, Client};
use super::sink::{Received, Sink};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const JANE: &str = "jane.doe@example.org";
pub const BOB: &str = "bob.agent@example.org";
pub const PUBLIC: &str = "support@example.org";
pub const INTERNAL: &str = "support-notes@example.org";

pub struct Gateway {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub sink: Sink,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    extra: String,
}

fn config_text(dir: &std::path::Path, relay: &str, extra: &str) -> String {
    let trusted = if extra.contains("trusted_relays") {
        ""
    } else {
        "trusted_relays = [\"127.0.0.0/8\"]\n"
    };
    format!(
        r#"
[gateway]
hostname = "crm.example.org"
state_dir = "{state}"
language = "fr"
display_name = "Soutien TI"

[smtp]
listen = "127.0.0.1:0"

[addresses]
public = "{PUBLIC}"
internal = "{INTERNAL}"

[relay]
url = "{relay}"
retry_initial_seconds = 1
retry_max_seconds = 2

[security]
{trusted}{extra}

[[agents]]
name = "Jane Doe"
email = "Jane.Doe@example.org"
default_notes_list = true

[[agents]]
name = "Bob Agent"
email = "{BOB}"
default_notes_list = true
"#,
        state = dir.join("state").display(),
    )
}

impl Gateway {
    pub async fn start(extra: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start().await;
        let mut g = Gateway {
            addr: "127.0.0.1:1".parse().unwrap(),
            dir,
            sink,
            shutdown: CancellationToken::new(),
            task: None,
            extra: extra.to_string(),
        };
        g.boot().await;
        g
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("crmgate.toml")
    }

    pub async fn boot(&mut self) {
        let text = config_text(self.dir.path(), &self.sink.url(), &self.extra);
        std::fs::write(self.config_path(), &text).unwrap();
        let config = crmgate::config::Config::from_toml(&text, "test").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.addr = listener.local_addr().unwrap();
        self.shutdown = CancellationToken::new();
        let shutdown = self.shutdown.clone();
        self.task = Some(tokio::spawn(crmgate::daemon::serve(
            config, listener, shutdown, None, false,
        )));
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("the daemon stops within 20 s")
                .unwrap()
                .unwrap();
        }
    }

    /// One SMTP transaction; returns the reply to the end of data (or to
    /// the first refused RCPT).
    pub async fn send(&self, from: &str, rcpt: &[&str], message: &str) -> String {
        let mut c = Client::connect(self.addr).await;
        c.expect("220").await;
        c.cmd("EHLO client.example.net", "250").await;
        c.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        for r in rcpt {
            let reply = c.cmd(&format!("RCPT TO:<{r}>"), "").await;
            if !reply.starts_with("250") {
                return reply;
            }
        }
        c.cmd("DATA", "354").await;
        c.send(&client::dot_stuff(
            message
                .replace('\n', "\r\n")
                .replace("\r\r\n", "\r\n")
                .as_bytes(),
        ))
        .await;
        c.send(b".\r\n").await;
        let reply = c.read_reply().await;
        c.cmd("QUIT", "221").await;
        reply
    }

    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_crmgate"))
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "crmgate {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    pub fn show(&self, number: &str) -> Value {
        self.json(&["ticket", "show", number, "--json"])
    }

    /// Wait until the outbox has no queued row, then return what the relay got.
    pub async fn settle(&self) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let rows = self.json(&["outbox", "list", "--json"]);
            let queued = rows
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["status"] == "queued")
                .count();
            if queued == 0 {
                return self.sink.messages();
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "outbox did not drain: {rows}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Open a ticket as Alice with Carol in Cc; returns its number.
    pub async fn open_ticket(&self) -> String {
        let reply = self
            .send(
                "alice@u.example",
                &[PUBLIC],
                "From: Alice Martin <alice@u.example>\nTo: support@example.org\nCc: carol@u.example\n\
                 Subject: Imprimante en panne\nMessage-ID: <open-1@u.example>\n\nElle ne marche plus.\n",
            )
            .await;
        assert!(reply.starts_with("250"), "{reply}");
        let list = self.json(&["ticket", "list", "--json"]);
        list[0]["number"].as_str().unwrap().to_string()
    }
}

pub fn to(messages: &[Received], address: &str) -> Vec<Received> {
    messages
        .iter()
        .filter(|m| m.rcpt_to.iter().any(|r| r == address))
        .cloned()
        .collect()
}

pub fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let head = text.split("\r\n\r\n").next()?;
    head.lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with(&format!("{}:", name.to_ascii_lowercase()))
        })
        .map(|l| l[name.len() + 1..].trim())
}
