//! A whole crmgate daemon for end-to-end tests: the real listener on
//! 127.0.0.1:0, a real SQLite file in a temporary directory (or a database
//! of its own on the tests' PostgreSQL cluster, see [`Engine`]), a real
//! SMTP sink as the relay, and the real `crmgate` binary for the commands.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::{dot_stuff, Client};
use super::sink::{Received, Sink};

pub const JANE: &str = "jane.doe@example.org";
pub const BOB: &str = "bob.agent@example.org";
pub const PUBLIC: &str = "support@example.org";
pub const INTERNAL: &str = "support-notes@example.org";

/// The store a gateway runs on. The tests that matter run on both
/// ([`both_engines!`]); the others on SQLite, the embedded default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

thread_local! {
    /// The engine the gateways a test starts run on: set for the test's
    /// thread by [`Engine::run`] (a tokio test's body runs there).
    static ENGINE: std::cell::Cell<Engine> = const { std::cell::Cell::new(Engine::Sqlite) };
}

impl Engine {
    /// Run a test's body with its gateways on this engine; on PostgreSQL,
    /// nothing when `CRMGATE_TEST_NO_PG=1`.
    pub async fn run<F: std::future::Future<Output = ()>>(self, test: impl FnOnce() -> F) {
        if self == Engine::Postgres && super::test_cluster::skipped() {
            eprintln!("CRMGATE_TEST_NO_PG=1: this test's PostgreSQL run is skipped");
            return;
        }
        ENGINE.with(|e| e.set(self));
        test().await;
    }
}

/// Each test named, once on SQLite (`sqlite::NAME`) and once on PostgreSQL
/// (`postgres::NAME`); each is an `async fn NAME()` of the file.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::gateway::Engine::Sqlite.run(super::$name).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::gateway::Engine::Postgres.run(super::$name).await
                }
            )*
        }
    };
}

pub struct Gateway {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub sink: Sink,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// TOML added to [security].
    pub extra: String,
    /// TOML added at the end (more [[agents]], [auto]).
    pub tail: String,
    /// (name, address) of the agents, all on every new work-notes list.
    pub agents: Vec<(String, String)>,
    /// `[gateway] operator`.
    pub operator: Option<String>,
    /// `[gateway] language`.
    pub language: String,
    /// `[store] url`: empty for SQLite in the state directory.
    pub store_url: String,
}

/// The gateway's configuration file.
fn config_text(g: &Gateway) -> String {
    let (dir, relay, extra, tail, agents, operator, language, store_url) = (
        g.dir.path(),
        g.sink.url(),
        &g.extra,
        &g.tail,
        &g.agents,
        g.operator.as_deref().unwrap_or(""),
        &g.language,
        &g.store_url,
    );
    let agents: String = agents
        .iter()
        .map(|(name, email)| {
            format!(
                "[[agents]]\nname = \"{name}\"\nemail = \"{email}\"\ndefault_notes_list = true\n\n"
            )
        })
        .collect();
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
language = "{language}"
display_name = "Soutien TI"
operator = "{operator}"

[smtp]
listen = "127.0.0.1:0"

[addresses]
public = "{PUBLIC}"
internal = "{INTERNAL}"

[relay]
url = "{relay}"
retry_initial_seconds = 1
retry_max_seconds = 2

[store]
url = "{store_url}"

[security]
{trusted}{extra}

{agents}
{tail}
"#,
        state = dir.join("state").display(),
    )
}

impl Gateway {
    pub async fn start(extra: &str) -> Gateway {
        Gateway::start_with(extra, "").await
    }

    pub async fn start_with(extra: &str, tail: &str) -> Gateway {
        Gateway::start_in("fr", extra, tail).await
    }

    /// With `[gateway] language = LANGUAGE`.
    pub async fn start_in(language: &str, extra: &str, tail: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start().await;
        let store_url = match ENGINE.with(std::cell::Cell::get) {
            Engine::Sqlite => String::new(),
            Engine::Postgres => super::test_cluster::database().expect("a test database"),
        };
        let mut g = Gateway {
            store_url,
            addr: "127.0.0.1:1".parse().unwrap(),
            dir,
            sink,
            shutdown: CancellationToken::new(),
            task: None,
            extra: extra.to_string(),
            tail: tail.to_string(),
            operator: None,
            language: language.to_string(),
            agents: vec![
                ("Jane Doe".into(), "Jane.Doe@example.org".into()),
                ("Bob Agent".into(), BOB.into()),
            ],
        };
        g.boot().await;
        g
    }

    /// Run `f` on a connection to this gateway's log, on its engine, on a
    /// thread of its own (a PostgreSQL client may not be made or used on
    /// a tokio thread).
    pub fn with_db<T: Send>(&self, f: impl FnOnce(&crmgate::store::Db) -> T + Send) -> T {
        let text = std::fs::read_to_string(self.config_path()).unwrap();
        let config = crmgate::config::Config::from_toml(&text, "test").unwrap();
        let location = crmgate::store::Location::of(&config);
        std::thread::scope(|s| {
            s.spawn(|| {
                let db =
                    crmgate::store::connect(&location, crmgate::store::Durability::Full).unwrap();
                f(&db)
            })
            .join()
            .unwrap()
        })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("crmgate.toml")
    }

    pub async fn boot(&mut self) {
        let text = config_text(self);
        std::fs::write(self.config_path(), &text).unwrap();
        let config = crmgate::config::Config::from_toml(&text, "test").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.addr = listener.local_addr().unwrap();
        self.shutdown = CancellationToken::new();
        let shutdown = self.shutdown.clone();
        self.task = Some(tokio::spawn(crmgate::daemon::serve(
            config, listener, shutdown, None, false,
        )));
        // Ready once it greets: the database is open and the agents synced.
        let mut c = Client::connect(self.addr).await;
        c.expect("220").await;
        c.cmd("QUIT", "221").await;
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
        c.send(&dot_stuff(
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

    /// `crmgate deliver ARGS` on this gateway's configuration, `message` on
    /// its stdin, as an MTA's pipe transport runs it.
    pub fn deliver(&self, args: &[&str], message: &[u8]) -> Output {
        deliver(&self.config_path(), args, message)
    }

    /// Where the relay's count of messages stands now: [`Mark::of`] gives
    /// what arrived after it.
    pub fn mark(&self) -> Mark {
        Mark(self.sink.messages().len())
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

/// `crmgate --config CONFIG deliver ARGS` with `message` on its stdin;
/// stdout and stderr are captured.
pub fn deliver(config: &Path, args: &[&str], message: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crmgate"))
        .arg("--config")
        .arg(config)
        .arg("deliver")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(message).unwrap();
    child.wait_with_output().unwrap()
}

/// A count of the messages the relay had received: the mail a step of a
/// test caused is what came after it.
#[derive(Debug, Clone, Copy)]
pub struct Mark(usize);

impl Mark {
    /// Before the first message.
    pub const START: Mark = Mark(0);

    /// At the end of what the relay got so far.
    pub fn after(sent: &[Received]) -> Mark {
        Mark(sent.len())
    }

    /// The messages of `sent` that came after the mark.
    pub fn of(self, sent: &[Received]) -> &[Received] {
        &sent[self.0..]
    }

    /// How many messages there were at the mark.
    pub fn count(self) -> usize {
        self.0
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
