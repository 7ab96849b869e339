//! The outbox worker against a real SMTP sink (and the file relay): rows
//! queued the way the writer queues them, the worker started with
//! `relay::run`, outcomes read back from the database.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pki::TestPki;
use common::sink::Sink;
use crmgate::config::Config;
use crmgate::relay::{self, FailureHook, RelayError};
use crmgate::store::outbox::{self, OutboxRow, OutboxStatus};
use crmgate::store::{args, Db, Location};
use rusqlite::Connection;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PUBLIC: &str = "support@crm.test";

/// A state directory, a configuration pointing at `relay_url`, and the
/// failures the hook saw.
struct Harness {
    /// Holds the state directory until the test ends.
    _dir: tempfile::TempDir,
    config: Arc<Config>,
    failures: Arc<Mutex<Vec<(i64, String)>>>,
}

impl Harness {
    fn new(relay_url: &str) -> Harness {
        Harness::with_extra(relay_url, "")
    }

    fn with_extra(relay_url: &str, extra_relay_keys: &str) -> Harness {
        Harness::build(relay_url, (1, 4), extra_relay_keys)
    }

    /// A retry far beyond the test's length: a deferred recipient is tried
    /// once, however slow the machine is.
    fn without_retries(relay_url: &str) -> Harness {
        Harness::build(relay_url, (600, 600), "")
    }

    fn build(relay_url: &str, (initial, max): (u64, u64), extra_relay_keys: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[gateway]\nhostname = \"crm.test\"\nstate_dir = {state:?}\n\
             [addresses]\npublic = \"{PUBLIC}\"\ninternal = \"support-notes@crm.test\"\n\
             [relay]\nurl = {relay_url:?}\nretry_initial_seconds = {initial}\n\
             retry_max_seconds = {max}\n{extra_relay_keys}\n",
            state = dir.path().display().to_string(),
        );
        let config = Config::from_toml(&text, "test").unwrap();
        Harness {
            _dir: dir,
            config: Arc::new(config),
            failures: Arc::default(),
        }
    }

    fn db_path(&self) -> PathBuf {
        self.config.database_path()
    }

    fn conn(&self) -> Connection {
        crmgate::store::open(&self.db_path()).unwrap()
    }

    fn db(&self) -> Db {
        Db::Sqlite(self.conn())
    }

    /// Queue a row as the writer does: due now, recipients as JSON.
    fn queue(&self, recipients: &[&str], subject: &str) -> i64 {
        let body = format!("Body of {subject}.\r\n.a line that starts with a dot\r\n");
        self.queue_body(recipients, subject, body.as_bytes())
    }

    /// [`Harness::queue`] with this body (any bytes).
    fn queue_body(&self, recipients: &[&str], subject: &str, body: &[u8]) -> i64 {
        let conn = self.db();
        let now = crmgate::store::now();
        let message_id = format!("<{subject}@crm.test>");
        let mut message = format!(
            "From: support@crm.test\r\nTo: {}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n\r\n",
            recipients.join(", ")
        )
        .into_bytes();
        message.extend_from_slice(body);
        let recipients: Vec<String> = recipients.iter().map(|r| r.to_string()).collect();
        crmgate::store::tickets::insert_outbox(
            &conn,
            None,
            None,
            crmgate::helpdesk::OutboxKind::Send(crmgate::helpdesk::SendKind::PublicCopy),
            &recipients,
            &message_id,
            &message,
            now,
        )
        .unwrap()
    }

    fn row(&self, id: i64) -> OutboxRow {
        outbox::get(&self.db(), id).unwrap()
    }

    /// The hook the lead's daemon installs logs a system entry; this one
    /// writes a quarantine row, to prove its writes commit with the outcome.
    fn hook(&self) -> FailureHook {
        let failures = Arc::clone(&self.failures);
        Arc::new(move |conn: &Db, row: &OutboxRow, error: &str| {
            conn.exec(
                "INSERT INTO quarantine (at, reason, message_id) VALUES (0, ?1, ?2)",
                args![&format!("relay failure: {error}"), &row.message_id],
            )?;
            failures.lock().unwrap().push((row.id, error.to_string()));
            Ok(())
        })
    }

    fn start(&self) -> Worker {
        let wake = Arc::new(Notify::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay::run(
            Arc::clone(&self.config),
            Location::of(&self.config),
            Arc::clone(&wake),
            shutdown.clone(),
            self.hook(),
        ));
        Worker {
            wake,
            shutdown,
            task,
        }
    }

    /// Poll the database until `done` holds for row `id`.
    async fn wait_row(
        &self,
        id: i64,
        timeout: Duration,
        done: impl Fn(&OutboxRow) -> bool,
    ) -> OutboxRow {
        let deadline = Instant::now() + timeout;
        loop {
            let row = self.row(id);
            if done(&row) {
                return row;
            }
            assert!(
                Instant::now() < deadline,
                "row {id} did not get there in {timeout:?}: {row:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Worker {
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), RelayError>>,
}

impl Worker {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the worker stops within 5 s of shutdown")
            .unwrap()
            .unwrap();
    }
}

fn subject_of(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    text.lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or("")
        .to_string()
}

fn is_sent(row: &OutboxRow) -> bool {
    row.status == OutboxStatus::Sent
}

/// Sent or failed: the worker is done with the row.
fn is_settled(row: &OutboxRow) -> bool {
    row.status != OutboxStatus::Queued
}

/// A session that failed before anything was handed over: after
/// `attempts` tries the row is still queued, its error says each of
/// `expected`, and the sink got no message, no login, no AUTH in clear.
async fn assert_still_queued(h: &Harness, sink: &Sink, id: i64, attempts: i64, expected: &[&str]) {
    let row = h
        .wait_row(id, Duration::from_secs(5), |r| r.attempts >= attempts)
        .await;
    assert_eq!(row.status, OutboxStatus::Queued, "{row:?}");
    let error = row.last_error.unwrap_or_default();
    for e in expected {
        assert!(error.contains(e), "{e:?} not in {error:?}");
    }
    assert!(sink.messages().is_empty());
    assert!(sink.logins().is_empty(), "{:?}", sink.logins());
    assert_eq!(sink.auth_in_clear(), 0);
}

#[tokio::test]
async fn rows_are_sent_in_order_over_one_session_and_marked_sent() {
    let sink = Sink::start().await;
    let h = Harness::new(&sink.url());
    let ids: Vec<i64> = (1..=5)
        .map(|i| h.queue(&["a@example.org", "b@example.org"], &format!("message-{i}")))
        .collect();
    let worker = h.start();
    worker.wake.notify_one();

    let got = sink.wait_for(5, Duration::from_secs(5)).await;
    let subjects: Vec<String> = got.iter().map(|m| subject_of(&m.data)).collect();
    assert_eq!(
        subjects,
        [
            "message-1",
            "message-2",
            "message-3",
            "message-4",
            "message-5"
        ]
    );
    for (message, id) in got.iter().zip(&ids) {
        assert_eq!(message.rcpt_to, ["a@example.org", "b@example.org"]);
        // The envelope sender is the row's bounce address, never a person.
        assert_eq!(
            message.mail_from,
            crmgate::thread::bounce_address(PUBLIC, *id, None)
        );
        // Dot-stuffed on the wire, unstuffed by the sink, CRLF kept, and no
        // blank line added at the end.
        assert!(
            message
                .text()
                .ends_with(".\r\n.a line that starts with a dot\r\n"),
            "{}",
            message.text()
        );
        assert!(!message.text().ends_with("\r\n\r\n"));
    }
    for id in ids {
        let row = h.wait_row(id, Duration::from_secs(5), is_sent).await;
        assert_eq!((row.attempts, row.last_error), (1, None));
    }
    assert_eq!(sink.sessions(), 1, "a burst goes over one session");
    worker.stop().await;
}

/// More rows than one batch: the next batch is read and composed while
/// one is sent; each row still goes once, none is left behind.
#[tokio::test]
async fn a_backlog_of_several_batches_is_sent_once_each() {
    let sink = Sink::start().await;
    let h = Harness::new(&sink.url());
    let count = 2 * 256 + 44;
    let ids: Vec<i64> = (1..=count)
        .map(|i| {
            h.queue(
                &[&format!("r{}@example.org", i % 7)],
                &format!("backlog-{i}"),
            )
        })
        .collect();
    let worker = h.start();
    worker.wake.notify_one();

    let got = sink.wait_for(count, Duration::from_secs(30)).await;
    for id in &ids {
        let row = h.wait_row(*id, Duration::from_secs(10), is_sent).await;
        assert_eq!(row.attempts, 1, "{row:?}");
    }
    // Nothing more arrives once every row is marked sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut subjects: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| subject_of(&m.data))
        .collect();
    assert_eq!(
        subjects.len(),
        count,
        "{} then {}",
        got.len(),
        subjects.len()
    );
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), count, "a row was sent twice");
    worker.stop().await;
}

#[tokio::test]
async fn rows_queued_by_another_process_leave_within_a_second_without_a_wake() {
    let sink = Sink::start().await;
    let h = Harness::new(&sink.url());
    let worker = h.start();
    // Let the worker settle into its idle wait first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queued_at = Instant::now();
    h.queue(&["a@example.org"], "from-the-cli");
    sink.wait_for(1, Duration::from_secs(3)).await;
    assert!(
        queued_at.elapsed() < Duration::from_millis(1500),
        "{:?}",
        queued_at.elapsed()
    );
    worker.stop().await;
}

#[tokio::test]
async fn file_relay_writes_one_eml_per_message() {
    let dir = tempfile::tempdir().unwrap();
    let sent = dir.path().join("out/sent");
    let h = Harness::new(&format!("file://{}", sent.display()));
    let first = h.queue(&["a@example.org"], "first");
    let second = h.queue(&["b@example.org", "c@example.org"], "second");
    let worker = h.start();
    h.wait_row(second, Duration::from_secs(5), is_sent).await;
    assert!(is_sent(&h.row(first)));

    let eml = |id: i64| sent.join(format!("{id:010}.eml"));
    assert_eq!(std::fs::read(eml(first)).unwrap(), h.row(first).message);
    assert_eq!(subject_of(&std::fs::read(eml(second)).unwrap()), "second");
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eml(second).with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(
        envelope["forward_path"],
        serde_json::json!(["b@example.org", "c@example.org"])
    );
    assert_eq!(
        envelope["reverse_path"],
        crmgate::thread::bounce_address(PUBLIC, second, None)
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_4xx_outage_is_retried_with_backoff_and_drained_in_order() {
    let sink = Sink::start().await;
    sink.set_outage(true);
    let h = Harness::new(&sink.url());
    let ids: Vec<i64> = (1..=3)
        .map(|i| h.queue(&["a@example.org"], &format!("m{i}")))
        .collect();
    let worker = h.start();

    for &id in &ids {
        let row = h
            .wait_row(id, Duration::from_secs(5), |r| r.attempts >= 1)
            .await;
        assert_eq!(row.status, OutboxStatus::Queued);
        assert!(
            row.last_error
                .as_deref()
                .unwrap_or("")
                .contains("451 4.3.0"),
            "{row:?}"
        );
        assert!(row.next_attempt_at > crmgate::store::now() - 1);
    }
    // Backoff 1 s, 2 s, 4 s: after 2.5 s at most 3 attempts, not a hot loop.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for &id in &ids {
        let attempts = h.row(id).attempts;
        assert!((1..=3).contains(&attempts), "row {id}: {attempts} attempts");
    }
    assert!(sink.messages().is_empty());

    sink.set_outage(false);
    let got = sink.wait_for(3, Duration::from_secs(8)).await;
    let subjects: Vec<String> = got.iter().map(|m| subject_of(&m.data)).collect();
    assert_eq!(subjects, ["m1", "m2", "m3"]);
    for id in ids {
        let row = h.wait_row(id, Duration::from_secs(5), is_sent).await;
        assert!(row.attempts >= 2);
    }
    assert!(h.failures.lock().unwrap().is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn a_closed_port_defers_the_whole_batch_until_the_relay_is_back() {
    let sink = Sink::start().await;
    sink.close().await;
    let h = Harness::new(&sink.url());
    let a = h.queue(&["a@example.org"], "while-down-1");
    let b = h.queue(&["b@example.org"], "while-down-2");
    let worker = h.start();
    for id in [a, b] {
        let row = h
            .wait_row(id, Duration::from_secs(5), |r| r.attempts >= 1)
            .await;
        assert!(
            row.last_error
                .as_deref()
                .unwrap_or("")
                .contains("cannot connect"),
            "{row:?}"
        );
    }
    sink.reopen().await;
    let got = sink.wait_for(2, Duration::from_secs(8)).await;
    assert_eq!(subject_of(&got[0].data), "while-down-1");
    assert_eq!(subject_of(&got[1].data), "while-down-2");
    h.wait_row(b, Duration::from_secs(5), is_sent).await;
    worker.stop().await;
}

#[tokio::test]
async fn a_session_the_relay_dropped_is_replaced_without_a_retry() {
    let sink = Sink::start().await;
    let h = Harness::new(&sink.url());
    let worker = h.start();
    let first = h.queue(&["a@example.org"], "before");
    worker.wake.notify_one();
    h.wait_row(first, Duration::from_secs(5), is_sent).await;
    // The relay restarts: the worker's pooled session is dead.
    sink.reopen().await;
    let second = h.queue(&["a@example.org"], "after");
    worker.wake.notify_one();
    let row = h.wait_row(second, Duration::from_secs(5), is_sent).await;
    assert_eq!(
        row.attempts, 1,
        "sent on a fresh session at the first attempt"
    );
    assert_eq!(sink.sessions(), 2);
    worker.stop().await;
}

#[tokio::test]
async fn a_5xx_recipient_fails_only_its_row_and_calls_the_hook() {
    let sink = Sink::start().await;
    sink.refuse_recipient("gone@example.org");
    let h = Harness::new(&sink.url());
    let mixed = h.queue(&["a@example.org", "gone@example.org"], "mixed");
    let only_refused = h.queue(&["gone@example.org"], "refused");
    let fine = h.queue(&["c@example.org"], "fine");
    let worker = h.start();

    let row = h.wait_row(mixed, Duration::from_secs(5), is_settled).await;
    assert_eq!(row.status, OutboxStatus::Failed);
    let error = row.last_error.unwrap();
    assert!(
        error.contains("gone@example.org") && error.contains("550 5.1.1"),
        "{error}"
    );
    assert!(!error.contains("a@example.org"), "{error}");
    let row = h
        .wait_row(only_refused, Duration::from_secs(5), is_settled)
        .await;
    assert_eq!(row.status, OutboxStatus::Failed);
    h.wait_row(fine, Duration::from_secs(5), is_sent).await;

    // The others still got their mail, once.
    let got = sink.messages();
    let delivered: Vec<(String, Vec<String>)> = got
        .iter()
        .map(|m| (subject_of(&m.data), m.rcpt_to.clone()))
        .collect();
    assert_eq!(
        delivered,
        [
            ("mixed".to_string(), vec!["a@example.org".to_string()]),
            ("fine".to_string(), vec!["c@example.org".to_string()]),
        ]
    );
    let failures = h.failures.lock().unwrap().clone();
    assert_eq!(
        failures.iter().map(|f| f.0).collect::<Vec<_>>(),
        [mixed, only_refused]
    );
    // The hook wrote in the transaction that failed the row.
    let logged: i64 = h
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM quarantine WHERE reason LIKE 'relay failure:%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(logged, 2);
    assert_eq!(sink.sessions(), 1, "a refusal does not cost the session");
    worker.stop().await;
}

/// Three messages, each to a refused, a deferred and a fine recipient and
/// the last to the fine one only, through a relay that pipelines or not:
/// the same outcomes either way. Returns the sink's (envelopes, envelopes
/// in one write).
async fn mixed_recipients_through(pipelining: bool) -> (usize, usize) {
    let sink = Sink::start().await;
    sink.set_pipelining(pipelining);
    sink.refuse_recipient("gone@example.org");
    sink.defer_recipient("full@example.org");
    // On a loaded machine a 1 s retry of full@ came before the end, and
    // the sink counted a fifth envelope.
    let h = Harness::without_retries(&sink.url());
    let recipients = ["gone@example.org", "full@example.org", "a@example.org"];
    let mixed: Vec<i64> = (0..3)
        .map(|i| h.queue(&recipients, &format!("mixed-{i}")))
        .collect();
    let last = h.queue(&["a@example.org"], "last");
    let worker = h.start();
    h.wait_row(last, Duration::from_secs(5), is_sent).await;
    for id in mixed {
        // Delivered to one, refused to another: the row waits for the third.
        let row = h
            .wait_row(id, Duration::from_secs(5), |r| r.attempts >= 1)
            .await;
        assert_eq!(row.status, OutboxStatus::Queued);
        assert_eq!(row.recipients, ["full@example.org"]);
        let error = row.last_error.unwrap_or_default();
        assert!(error.contains("452 4.2.2"), "{error}");
    }
    let refused: Vec<i64> = h.failures.lock().unwrap().iter().map(|f| f.0).collect();
    assert_eq!(refused, [1, 2, 3], "gone@ refused on each row");
    let delivered: Vec<(String, Vec<String>)> = sink
        .messages()
        .iter()
        .map(|m| (subject_of(&m.data), m.rcpt_to.clone()))
        .collect();
    let a = vec!["a@example.org".to_string()];
    assert_eq!(
        delivered,
        [
            ("mixed-0".to_string(), a.clone()),
            ("mixed-1".to_string(), a.clone()),
            ("mixed-2".to_string(), a.clone()),
            ("last".to_string(), a.clone()),
        ]
    );
    assert_eq!(sink.sessions(), 1, "refusals do not cost the session");
    worker.stop().await;
    sink.envelopes()
}

#[tokio::test]
async fn a_relay_that_pipelines_gets_each_envelope_in_one_write() {
    let (envelopes, in_one_write) = mixed_recipients_through(true).await;
    assert_eq!(envelopes, 4);
    assert_eq!(in_one_write, 4, "MAIL, RCPTs and DATA together");
}

#[tokio::test]
async fn a_relay_that_does_not_pipeline_gets_one_command_at_a_time() {
    let (envelopes, in_one_write) = mixed_recipients_through(false).await;
    assert_eq!(envelopes, 4);
    assert_eq!(in_one_write, 0);
}

#[tokio::test]
async fn an_8bit_message_that_is_not_utf8_arrives_byte_for_byte() {
    let sink = Sink::start().await;
    let h = Harness::new(&sink.url());
    // Latin-1, as an old client writes it, with a line that starts with a dot.
    let body = b"Caf\xe9 cr\xe8me\r\n.\r\n..deux points\r\nfin\r\n";
    let latin1 = h.queue_body(&["a@example.org"], "latin1", body);
    let utf8 = h.queue_body(
        &["a@example.org"],
        "utf8",
        "Café\r\n.\r\nfin\r\n".as_bytes(),
    );
    let worker = h.start();
    h.wait_row(latin1, Duration::from_secs(5), is_sent).await;
    h.wait_row(utf8, Duration::from_secs(5), is_sent).await;
    let got = sink.messages();
    assert_eq!(got.len(), 2);
    assert!(got[0].data.ends_with(body), "{:?}", got[0].data);
    assert!(got[1].data.ends_with("Café\r\n.\r\nfin\r\n".as_bytes()));
    worker.stop().await;
}

#[tokio::test]
async fn a_refused_sender_fails_the_row_and_the_pipelined_session_stays_in_step() {
    let sink = Sink::start().await;
    sink.set_refuse_mail(true);
    let h = Harness::new(&sink.url());
    let refused = h.queue(&["a@example.org", "b@example.org"], "refused");
    let worker = h.start();
    let row = h
        .wait_row(refused, Duration::from_secs(5), is_settled)
        .await;
    assert_eq!(row.status, OutboxStatus::Failed);
    let error = row.last_error.unwrap_or_default();
    assert!(error.contains("MAIL FROM: 550 5.7.1"), "{error}");

    // The RCPT and DATA replies of the refused envelope were all read: the
    // next message goes on the same session and gets its own replies.
    sink.set_refuse_mail(false);
    let next = h.queue(&["a@example.org"], "next");
    worker.wake.notify_one();
    h.wait_row(next, Duration::from_secs(5), is_sent).await;
    let subjects: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| subject_of(&m.data))
        .collect();
    assert_eq!(subjects, ["next"]);
    assert_eq!(sink.sessions(), 1);
    assert_eq!(sink.envelopes(), (2, 2));
    worker.stop().await;
}

#[tokio::test]
async fn a_4xx_recipient_is_retried_alone_and_the_others_get_the_message_once() {
    let sink = Sink::start().await;
    sink.defer_recipient("full@example.org");
    let h = Harness::new(&sink.url());
    let id = h.queue(&["a@example.org", "full@example.org"], "partly-deferred");
    let worker = h.start();
    let row = h
        .wait_row(id, Duration::from_secs(5), |r| r.attempts >= 1)
        .await;
    assert_eq!(row.status, OutboxStatus::Queued);
    assert_eq!(row.recipients, ["full@example.org"]);
    assert!(
        row.last_error
            .as_deref()
            .unwrap_or("")
            .contains("452 4.2.2"),
        "{row:?}"
    );

    sink.accept_recipient("full@example.org");
    let row = h.wait_row(id, Duration::from_secs(5), is_sent).await;
    // On a busy machine the backoff may come round once more before the
    // recipient is accepted: that attempt is refused at RCPT and carries
    // no message, so what the sink received is the same.
    assert!(row.attempts >= 2, "{row:?}");
    let rcpts: Vec<Vec<String>> = sink.messages().into_iter().map(|m| m.rcpt_to).collect();
    assert_eq!(
        rcpts,
        [
            vec!["a@example.org".to_string()],
            vec!["full@example.org".to_string()]
        ]
    );
    assert!(h.failures.lock().unwrap().is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_relay_that_never_greets() {
    // Bound and listening, so the connection is made, but never accepted:
    // no greeting ever comes.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = Harness::new(&format!("smtp://{}", mute.local_addr().unwrap()));
    let id = h.queue(&["a@example.org"], "never-greeted");
    let worker = h.start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.stop().await;
    let row = h.row(id);
    assert_eq!(
        (row.status, row.attempts),
        (OutboxStatus::Queued, 0),
        "nothing to record: {row:?}"
    );
}

#[tokio::test]
async fn a_restart_resumes_the_queued_rows() {
    let sink = Sink::start().await;
    sink.set_outage(true);
    let h = Harness::new(&sink.url());
    let ids: Vec<i64> = (1..=3)
        .map(|i| h.queue(&["a@example.org"], &format!("r{i}")))
        .collect();
    let worker = h.start();
    h.wait_row(ids[2], Duration::from_secs(5), |r| r.attempts >= 1)
        .await;
    worker.stop().await;
    assert!(ids
        .iter()
        .all(|&id| h.row(id).status == OutboxStatus::Queued));

    sink.set_outage(false);
    let worker = h.start();
    let got = sink.wait_for(3, Duration::from_secs(5)).await;
    let subjects: Vec<String> = got.iter().map(|m| subject_of(&m.data)).collect();
    assert_eq!(subjects, ["r1", "r2", "r3"]);
    for id in ids {
        h.wait_row(id, Duration::from_secs(5), is_sent).await;
    }
    worker.stop().await;
}

#[tokio::test]
async fn credentials_come_from_the_password_file() {
    let sink = Sink::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("relay-password");
    std::fs::write(&password_file, "s3cret pass\nignored second line\n").unwrap();
    let extra = format!(
        "username = \"crmgate\"\npassword_file = {:?}\n",
        path_str(&password_file)
    );
    let h = Harness::with_extra(&sink.url(), &extra);
    let id = h.queue(&["a@example.org"], "authenticated");
    let worker = h.start();
    h.wait_row(id, Duration::from_secs(5), is_sent).await;
    assert_eq!(
        sink.logins(),
        [("crmgate".to_string(), "s3cret pass".to_string())]
    );
    worker.stop().await;
}

/// A password never goes in clear text over a network: to a relay that is
/// not on loopback and offers no STARTTLS, the session fails before AUTH
/// and the row waits. The test needs an address of this machine that is not
/// loopback; without one it says so and checks nothing.
#[tokio::test]
async fn no_password_in_clear_text_beyond_loopback() {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let ip = probe
        .connect("192.0.2.1:9")
        .and_then(|()| probe.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    let Some(ip) = ip else {
        eprintln!("no non-loopback address on this machine: test not run");
        return;
    };
    let sink = Sink::start_on(ip).await;
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("relay-password");
    std::fs::write(&password_file, "s3cret pass\n").unwrap();
    let extra = format!(
        "username = \"crmgate\"\npassword_file = {:?}\n",
        path_str(&password_file)
    );
    let h = Harness::with_extra(&sink.url(), &extra);
    let id = h.queue(&["a@example.org"], "not in clear text");
    let worker = h.start();
    assert_still_queued(&h, &sink, id, 1, &["no password in clear text"]).await;
    worker.stop().await;
}

#[tokio::test]
async fn shutdown_returns_promptly_when_idle() {
    let sink = Sink::start().await;
    let h = Harness::new(&sink.url());
    let worker = h.start();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = Instant::now();
    worker.stop().await;
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "{:?}",
        asked.elapsed()
    );
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

/// How long 200 messages take to drain through the worker to the sink.
/// `cargo test --release --test relay -- --ignored --nocapture burst`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn burst_of_200_messages() {
    let sink = Sink::start().await;
    let h = Harness::new(&sink.url());
    let ids: Vec<i64> = (0..200)
        .map(|i| h.queue(&["a@example.org", "b@example.org"], &format!("burst-{i}")))
        .collect();
    let started = Instant::now();
    let worker = h.start();
    sink.wait_for(200, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    h.wait_row(ids[199], Duration::from_secs(10), is_sent).await;
    println!(
        "relay worker: 200 messages in {elapsed:?} ({:?} per message, {} session(s))",
        elapsed / 200,
        sink.sessions()
    );
    worker.stop().await;
}

/// The same burst through lettre's own pooled transport, whose sockets do
/// not set TCP_NODELAY: the baseline the relay worker's workaround beats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn burst_of_200_messages_through_stock_lettre() {
    use lettre::{AsyncTransport, Tokio1Executor};
    let sink = Sink::start().await;
    let transport = lettre::AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sink.addr().port())
        .build();
    let envelope = lettre::address::Envelope::new(
        Some("support@crm.test".parse().unwrap()),
        vec![
            "a@example.org".parse().unwrap(),
            "b@example.org".parse().unwrap(),
        ],
    )
    .unwrap();
    let started = Instant::now();
    for i in 0..200 {
        let message = format!("Subject: burst-{i}\r\n\r\nBody.\r\n");
        transport
            .send_raw(&envelope, message.as_bytes())
            .await
            .unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "stock lettre: 200 messages in {elapsed:?} ({:?} per message, {} session(s))",
        elapsed / 200,
        sink.sessions()
    );
}

#[tokio::test]
async fn smtps_to_a_plain_text_relay_is_a_tls_failure_and_a_retry() {
    let sink = Sink::start().await;
    let h = Harness::new(&format!("smtps://{}", sink.addr()));
    let id = h.queue(&["a@example.org"], "over-tls");
    let worker = h.start();
    assert_still_queued(&h, &sink, id, 1, &["TLS handshake failed"]).await;
    worker.stop().await;
}

/// `[relay]` keys for a relay with a private CA: the test CA in `ca_file`
/// and, when `login`, `username = "crmgate"` with its password in a file.
/// The files live in `dir`.
fn tls_keys(dir: &Path, pki: &TestPki, login: bool) -> String {
    let mut keys = format!("ca_file = {:?}\n", path_str(&pki.write_ca(dir)));
    if login {
        let password_file = dir.join("relay-password");
        std::fs::write(&password_file, "s3cret over TLS\n").unwrap();
        keys.push_str(&format!(
            "username = \"crmgate\"\npassword_file = {:?}\n",
            path_str(&password_file)
        ));
    }
    keys
}

fn crmgate_login() -> Option<(String, String)> {
    Some(("crmgate".to_string(), "s3cret over TLS".to_string()))
}

#[tokio::test]
async fn tls_required_to_a_relay_of_the_ca_in_ca_file_logs_in_inside_tls() {
    let pki = TestPki::new();
    let sink = Sink::start_starttls(Arc::clone(&pki.server)).await;
    let files = tempfile::tempdir().unwrap();
    let h = Harness::with_extra(
        &format!("{}?tls=required", sink.url()),
        &tls_keys(files.path(), &pki, true),
    );
    let first = h.queue(&["a@example.org"], "over-starttls-1");
    let second = h.queue(&["b@example.org"], "over-starttls-2");
    let worker = h.start();
    for id in [first, second] {
        let row = h.wait_row(id, Duration::from_secs(5), is_sent).await;
        assert_eq!((row.attempts, row.last_error), (1, None));
    }
    let got = sink.messages();
    assert_eq!(got.len(), 2);
    for message in &got {
        assert!(message.tls, "sent in clear text: {message:?}");
        assert_eq!(message.login, crmgate_login());
    }
    // The sink offers AUTH before STARTTLS too; crmgate did not take it.
    assert_eq!(sink.auth_in_clear(), 0);
    assert_eq!(sink.logins().len(), 1, "one login for the session");
    assert_eq!(sink.sessions(), 1, "the TLS session is reused");
    worker.stop().await;
}

#[tokio::test]
async fn smtps_to_a_relay_of_the_ca_in_ca_file_is_delivered_over_tls() {
    let pki = TestPki::new();
    let sink = Sink::start_smtps(Arc::clone(&pki.server)).await;
    assert!(sink.url().starts_with("smtps://"), "{}", sink.url());
    let files = tempfile::tempdir().unwrap();
    let h = Harness::with_extra(&sink.url(), &tls_keys(files.path(), &pki, true));
    let id = h.queue(&["a@example.org"], "over-smtps");
    let worker = h.start();
    h.wait_row(id, Duration::from_secs(5), is_sent).await;
    let got = sink.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(subject_of(&got[0].data), "over-smtps");
    assert!(got[0].tls);
    assert_eq!(got[0].login, crmgate_login());
    assert_eq!(sink.auth_in_clear(), 0);
    worker.stop().await;
}

/// Without `ca_file` the private CA is unknown: the handshake fails, no
/// password leaves, the row stays queued and is retried, and the error
/// says what to fix.
#[tokio::test]
async fn an_untrusted_relay_certificate_is_a_retry_that_names_ca_file() {
    let pki = TestPki::new();
    let sink = Sink::start_starttls(Arc::clone(&pki.server)).await;
    let files = tempfile::tempdir().unwrap();
    let mut keys = tls_keys(files.path(), &pki, true);
    keys = keys
        .lines()
        .filter(|l| !l.starts_with("ca_file"))
        .collect::<Vec<_>>()
        .join("\n");
    let h = Harness::with_extra(&format!("{}?tls=required", sink.url()), &keys);
    let id = h.queue(&["a@example.org"], "untrusted");
    let worker = h.start();

    // Retried: a second attempt after the 1 s backoff, still queued.
    let expected = ["STARTTLS failed", "UnknownIssuer", "relay.ca_file"];
    assert_still_queued(&h, &sink, id, 2, &expected).await;
    assert!(h.failures.lock().unwrap().is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn smtps_to_a_relay_of_an_unknown_ca_names_ca_file() {
    let pki = TestPki::new();
    let sink = Sink::start_smtps(Arc::clone(&pki.server)).await;
    let h = Harness::new(&sink.url());
    let id = h.queue(&["a@example.org"], "untrusted-smtps");
    let worker = h.start();
    let expected = ["TLS handshake failed", "UnknownIssuer", "relay.ca_file"];
    assert_still_queued(&h, &sink, id, 1, &expected).await;
    worker.stop().await;
}

#[tokio::test]
async fn plain_smtp_url_upgrades_with_starttls_when_the_relay_offers_it() {
    let pki = TestPki::new();
    let sink = Sink::start_starttls(Arc::clone(&pki.server)).await;
    let files = tempfile::tempdir().unwrap();
    let h = Harness::with_extra(&sink.url(), &tls_keys(files.path(), &pki, false));
    assert!(!sink.url().contains("tls="), "{}", sink.url());
    let id = h.queue(&["a@example.org"], "opportunistic");
    let worker = h.start();
    h.wait_row(id, Duration::from_secs(5), is_sent).await;
    let got = sink.messages();
    assert_eq!(got.len(), 1);
    assert!(got[0].tls, "opportunistic TLS was not used");
    assert_eq!(got[0].login, None);
    worker.stop().await;
}

/// Opportunistic TLS still verifies: once STARTTLS is offered, a refused
/// certificate does not make crmgate fall back to clear text.
#[tokio::test]
async fn plain_smtp_url_does_not_fall_back_to_clear_text_after_a_refused_certificate() {
    let pki = TestPki::new();
    let sink = Sink::start_starttls(Arc::clone(&pki.server)).await;
    let h = Harness::new(&sink.url());
    let id = h.queue(&["a@example.org"], "no-fallback");
    let worker = h.start();
    assert_still_queued(&h, &sink, id, 1, &["UnknownIssuer"]).await;
    worker.stop().await;
}

/// A relay (or a man in the middle) that offers no STARTTLS: with
/// tls=required crmgate sends no AUTH and no message in clear text.
#[tokio::test]
async fn tls_required_without_starttls_sends_neither_password_nor_message() {
    let pki = TestPki::new();
    let sink = Sink::start().await;
    let files = tempfile::tempdir().unwrap();
    let h = Harness::with_extra(
        &format!("{}?tls=required", sink.url()),
        &tls_keys(files.path(), &pki, true),
    );
    let id = h.queue(&["a@example.org"], "stripped");
    let worker = h.start();
    assert_still_queued(&h, &sink, id, 1, &["STARTTLS is not offered"]).await;
    worker.stop().await;
}

/// The sink itself: the daemon tests rely on it answering a pipelined
/// client in order and unstuffing dots.
#[tokio::test]
async fn the_sink_answers_a_pipelined_session_in_order() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let sink = Sink::start().await;
    sink.refuse_recipient("gone@example.org");
    let stream = tokio::net::TcpStream::connect(sink.addr()).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    write
        .write_all(
            b"EHLO client.test\r\nMAIL FROM:<s@crm.test> BODY=8BITMIME\r\n\
              RCPT TO:<a@example.org>\r\nRCPT TO:<gone@example.org>\r\nDATA\r\n",
        )
        .await
        .unwrap();
    let mut codes = Vec::new();
    while codes.len() < 6 {
        let mut line = String::new();
        read.read_line(&mut line).await.unwrap();
        if line.as_bytes().get(3) == Some(&b' ') {
            codes.push(line[..3].to_string());
        }
    }
    assert_eq!(codes, ["220", "250", "250", "250", "550", "354"]);
    write
        .write_all(b"Subject: dots\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n")
        .await
        .unwrap();
    let got = sink.wait_for(1, Duration::from_secs(2)).await;
    assert_eq!(got[0].data, b"Subject: dots\r\n\r\n.leading dot\r\n");
    assert_eq!(got[0].rcpt_to, ["a@example.org"]);
    assert_eq!(got[0].mail_from, "s@crm.test");
}
