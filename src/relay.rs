//! Relay: the outbox worker, the last stage of the pipeline. It sends the
//! rows the store queued through the configured relay (SMTP via lettre, or
//! `.eml` files), in id order, and records each outcome back in the row:
//! sent, retried later with backoff (4xx, relay unreachable), or failed
//! (5xx, or given up after `give_up_after_hours`), in which case the
//! [`FailureHook`] logs it on the ticket in the same transaction.
//!
//! One long-lived task owns the relay sessions: a small pool of
//! [`RELAY_CONNECTIONS`] lanes, each a session of its own. A ticket's rows
//! always take the same lane, so a ticket's mail leaves in the order it was
//! written while other tickets' mail goes out beside it. Outcomes are
//! recorded as they come, those that arrive together in one transaction:
//! in the daemon by the writer thread, in its batches ([`run_with`]: one
//! writer, so neither waits for the other's lock), else on the worker's
//! own connection. Database work runs on tokio's blocking pool, so a busy
//! SQLite never stalls the SMTP listener.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use crate::auth::DkimSigner;
use crate::config::{Config, RelayTarget};
use crate::store::outbox::{self, MarkRequest, OutboxRow};
use crate::store::{self, StoreError};

// Recorded by the store (in the daemon, by the writer thread): defined
// there, so the writer needs nothing of the relay.
pub use crate::store::outbox::{Disposition, FailureHook};

mod file;
mod smtp;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay worker: {0}")]
    Store(#[from] StoreError),
    #[error("relay worker: a database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("relay worker: cannot prepare TLS towards the relay: {0}")]
    Tls(String),
    #[error("relay worker: outcomes not recorded by the writer: {0}")]
    Marks(String),
}

/// At most this many rows are read per query; the worker loops until none is due.
const BATCH: usize = 256;
/// Sessions with the relay at most: enough to keep a local relay busy while
/// each lane waits for its replies, few enough to stay far below any relay's
/// per-client connection limit (Postfix: 50).
pub const RELAY_CONNECTIONS: usize = 4;
/// The longest the worker sleeps without looking at the table: the CLI
/// queues rows from another process, and the SPEC promises they leave
/// within a second.
const POLL: Duration = Duration::from_secs(1);
/// After a database error, wait this long before trying again.
const STORE_PAUSE: Duration = Duration::from_secs(1);

/// Run the outbox worker until `shutdown` is cancelled; then finish the
/// message in flight, close the relay session and return.
///
/// It wakes when the next row is due, when `wake` is notified (the writer
/// committed rows), at least every [`POLL`], and at shutdown.
///
/// # Errors
/// The database cannot be opened, the reply secret read, or the TLS
/// configuration built (the configuration check makes that last one
/// unexpected). Errors while running (database busy, relay down) are logged
/// and retried, never returned: the queue is durable and the worker keeps
/// draining it.
pub async fn run(
    config: Arc<Config>,
    location: store::Location,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    on_failed: FailureHook,
) -> Result<(), RelayError> {
    run_with(config, location, wake, shutdown, on_failed, None).await
}

/// [`run`], with the outcomes written by the daemon's writer thread when
/// `marks` is given (the daemon forwards each request to
/// [`crate::writer::Writer::record_marks`]), else on the worker's own
/// connection.
///
/// # Errors
/// As [`run`].
pub async fn run_with(
    config: Arc<Config>,
    location: store::Location,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    on_failed: FailureHook,
    marks: Option<tokio::sync::mpsc::Sender<MarkRequest>>,
) -> Result<(), RelayError> {
    let key = config.security.reply_secret.clone();
    let conn =
        tokio::task::spawn_blocking(move || store::connect(&location, store::Durability::Relaxed))
            .await??;
    let template = Lane::new(&config)?;
    let mut worker = Worker {
        db: Shared(Arc::new(Mutex::new(conn))),
        lanes: Lane::pool(&template),
        template,
        marks,
        policy: RetryPolicy::from_config(&config),
        public_address: config.addresses.public.clone(),
        key,
        dkim: config.auth.dkim.clone(),
        on_failed,
        unrecorded: Vec::new(),
        relay_down: None,
    };
    worker.run(&wake, &shutdown).await;
    for lane in &mut worker.lanes {
        lane.close().await;
    }
    worker.record_unrecorded().await;
    for (row, _) in &worker.unrecorded {
        error!(
            outbox_id = row.id,
            "outcome not recorded at shutdown; the row will be sent again"
        );
    }
    Ok(())
}

/// How long to wait before the next attempt, and when to stop trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial_seconds: i64,
    pub max_seconds: i64,
    pub give_up_after_seconds: i64,
}

impl RetryPolicy {
    pub fn from_config(config: &Config) -> RetryPolicy {
        let seconds = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        RetryPolicy {
            initial_seconds: seconds(config.relay.retry_initial_seconds),
            max_seconds: seconds(config.relay.retry_max_seconds),
            give_up_after_seconds: seconds(config.relay.give_up_after_hours).saturating_mul(3600),
        }
    }

    /// The delay after a failed attempt when `attempts` were made before
    /// it: the initial delay, doubling, capped at the maximum.
    pub fn delay(&self, attempts: i64) -> i64 {
        let doublings = u32::try_from(attempts.clamp(0, 62)).unwrap_or(62);
        self.initial_seconds
            .saturating_mul(1_i64 << doublings)
            .min(self.max_seconds)
    }
}

/// What the relay said about one recipient of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientOutcome {
    Delivered,
    /// 4xx, or the session broke: try again later.
    Deferred(String),
    /// 5xx: never try this recipient again.
    Refused(String),
}

/// Decide what an attempt means for the row.
///
/// All delivered: sent. None deferred but some refused: failed, naming the
/// refused (the others did get it). Some deferred: retry those only, after
/// the backoff, unless the row is older than the give-up time. The next
/// attempt is never scheduled past the give-up time, so the last try
/// happens then and not up to `retry_max_seconds` later.
pub fn dispose(
    row: &OutboxRow,
    outcomes: &[(String, RecipientOutcome)],
    now: i64,
    policy: &RetryPolicy,
) -> Disposition {
    let mut deferred = Vec::new();
    let mut refused = Vec::new();
    let mut delivered = 0;
    for (recipient, outcome) in outcomes {
        match outcome {
            RecipientOutcome::Delivered => delivered += 1,
            RecipientOutcome::Deferred(why) => deferred.push((recipient.clone(), why.clone())),
            RecipientOutcome::Refused(why) => refused.push((recipient.clone(), why.clone())),
        }
    }
    let name = |list: &[(String, String)]| {
        list.iter()
            .map(|(recipient, why)| {
                if why.contains(recipient.as_str()) {
                    why.clone()
                } else {
                    format!("{recipient}: {why}")
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let refused_text = (!refused.is_empty()).then(|| format!("refused: {}", name(&refused)));
    let delivered_note = if delivered > 0 && (!refused.is_empty() || !deferred.is_empty()) {
        format!(" (delivered to the {delivered} other recipient(s))")
    } else {
        String::new()
    };

    if outcomes.is_empty() {
        // A writer bug, not a delivery: say so rather than call it sent.
        return Disposition::Failed {
            error: "the row has no recipients".into(),
        };
    }
    if deferred.is_empty() {
        return match refused_text {
            None => Disposition::Sent,
            Some(text) => Disposition::Failed {
                error: format!("{text}{delivered_note}"),
            },
        };
    }

    let mut error = format!("deferred: {}", name(&deferred));
    if let Some(text) = &refused_text {
        error = format!("{error}; {text}");
    }
    error.push_str(&delivered_note);
    let give_up_at = row.created_at.saturating_add(policy.give_up_after_seconds);
    if now >= give_up_at {
        let hours = policy.give_up_after_seconds / 3600;
        return Disposition::Failed {
            error: format!(
                "gave up after {hours} h and {} attempt(s): {error}",
                row.attempts + 1
            ),
        };
    }
    let next_at = now
        .saturating_add(policy.delay(row.attempts))
        .min(give_up_at)
        .max(now + 1);
    let narrow_to = (deferred.len() < row.recipients.len())
        .then(|| deferred.iter().map(|(r, _)| r.clone()).collect());
    Disposition::Retry {
        next_at,
        error,
        narrow_to,
        refused: refused_text,
    }
}

/// Record the outcomes of a batch in one transaction on the worker's own
/// connection (when it runs without the daemon's writer).
///
/// # Errors
/// A database error; the transaction is then rolled back, and nothing of
/// the batch is recorded.
fn record(
    conn: &mut store::Db,
    settled: &[(OutboxRow, Disposition)],
    now: i64,
    on_failed: &FailureHook,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    outbox::write_marks(&tx, settled, now, on_failed)?;
    tx.commit()?;
    Ok(())
}

/// The worker's connection, shared with the blocking pool.
#[derive(Clone)]
struct Shared(Arc<Mutex<store::Db>>);

impl Shared {
    /// Run `f` on the blocking pool with the connection.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut store::Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, RelayError> {
        let conn = Arc::clone(&self.0);
        let result = tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await?;
        Ok(result?)
    }
}

/// One way out: the file relay, or one session with the SMTP relay.
enum Lane {
    File(file::FileRelay),
    /// Boxed: the session is large, the file relay is a path.
    Smtp(Box<smtp::SmtpRelay>),
}

impl Lane {
    /// The lanes of the configured relay, copies of `template`:
    /// [`RELAY_CONNECTIONS`] sessions with an SMTP relay, one writer of
    /// `.eml` files.
    fn pool(template: &Lane) -> Vec<Lane> {
        let lanes = match template {
            Lane::File(_) => 1,
            Lane::Smtp(_) => RELAY_CONNECTIONS,
        };
        (0..lanes).map(|_| template.fresh()).collect()
    }

    /// A lane like this one, without a session.
    fn fresh(&self) -> Lane {
        match self {
            Lane::File(relay) => Lane::File(relay.clone()),
            Lane::Smtp(relay) => Lane::Smtp(Box::new(relay.fresh())),
        }
    }

    /// The configured relay, TLS configuration built once.
    ///
    /// # Errors
    /// [`RelayError::Tls`] when the TLS configuration cannot be built.
    fn new(config: &Config) -> Result<Lane, RelayError> {
        Ok(match &config.relay.target {
            RelayTarget::File(dir) => Lane::File(file::FileRelay::new(dir.clone())),
            RelayTarget::Smtp { host, port, tls } => {
                let credentials = config
                    .relay
                    .username
                    .clone()
                    .zip(config.relay.password_file.clone());
                let relay = smtp::SmtpRelay::new(
                    host.clone(),
                    *port,
                    *tls,
                    &config.relay.ca_certificates,
                    &config.gateway.hostname,
                    credentials,
                )
                .map_err(RelayError::Tls)?;
                Lane::Smtp(Box::new(relay))
            }
        })
    }

    async fn close(&mut self) {
        if let Lane::Smtp(relay) = self {
            relay.close().await;
        }
    }

    async fn close_if_idle(&mut self) {
        if let Lane::Smtp(relay) = self {
            relay.close_if_idle().await;
        }
    }

    /// Hand one row to the relay.
    async fn attempt(
        &mut self,
        row: &OutboxRow,
        mail_from: &str,
        shutdown: &CancellationToken,
    ) -> Attempt {
        match self {
            Lane::Smtp(relay) => {
                match relay
                    .send(mail_from, &row.recipients, &row.message, shutdown)
                    .await
                {
                    Ok(outcomes) => Attempt::Outcomes(outcomes),
                    Err(smtp::SessionFailure::Down(reason)) => Attempt::RelayDown(reason),
                    Err(smtp::SessionFailure::Interrupted) => Attempt::Interrupted,
                }
            }
            Lane::File(relay) => {
                let relay = relay.clone();
                let (id, recipients, message) =
                    (row.id, row.recipients.clone(), row.message.clone());
                let from = mail_from.to_string();
                let written = tokio::task::spawn_blocking(move || {
                    relay.write(id, &from, &recipients, &message)
                })
                .await;
                let outcome = match written {
                    Ok(Ok(_)) => RecipientOutcome::Delivered,
                    Ok(Err(e)) => {
                        RecipientOutcome::Deferred(format!("cannot write the .eml file: {e}"))
                    }
                    Err(e) => RecipientOutcome::Deferred(format!("file relay task failed: {e}")),
                };
                Attempt::Outcomes(
                    row.recipients
                        .iter()
                        .map(|r| (r.clone(), outcome.clone()))
                        .collect(),
                )
            }
        }
    }
}

/// Which lane a row takes: always the same for a ticket, so a ticket's
/// mail is sent in order; rows of no ticket take the first.
fn lane_of(row: &OutboxRow, lanes: usize) -> usize {
    let ticket = u64::try_from(row.ticket_id.unwrap_or(0)).unwrap_or(0);
    usize::try_from(ticket % lanes.max(1) as u64).unwrap_or(0)
}

/// Send one lane's rows in order over its session, handing each result to
/// `done` as soon as it is known. When the relay cannot be used, the rest
/// of the lane is answered with the same reason, without a connection
/// attempt each; at shutdown, the rows not yet handed over are left out
/// (they stay queued).
async fn run_lane(
    mut lane: Lane,
    rows: Vec<OutboxRow>,
    public_address: String,
    key: Option<Vec<u8>>,
    dkim: Option<Arc<DkimSigner>>,
    shutdown: CancellationToken,
    done: tokio::sync::mpsc::UnboundedSender<(OutboxRow, Attempt)>,
) -> Lane {
    let mut rows = rows.into_iter();
    while let Some(row) = rows.next() {
        if shutdown.is_cancelled() {
            break;
        }
        let row = match &dkim {
            Some(signer) => signed(signer, row),
            None => row,
        };
        let mail_from = crate::thread::bounce_address(&public_address, row.id, key.as_deref());
        let span = info_span!(
            "delivery",
            outbox_id = row.id,
            message_id = %row.message_id,
            recipients = %row.recipients.join(","),
            attempt = row.attempts + 1,
        );
        match lane
            .attempt(&row, &mail_from, &shutdown)
            .instrument(span.clone())
            .await
        {
            Attempt::Interrupted => break,
            Attempt::RelayDown(reason) => {
                warn!(parent: &span, error = %reason, "relay unreachable");
                for row in std::iter::once(row).chain(rows.by_ref()) {
                    let _ = done.send((row, Attempt::RelayDown(reason.clone())));
                }
                break;
            }
            // The worker records it with whatever else came meanwhile.
            outcomes => {
                let _ = done.send((row, outcomes));
            }
        }
    }
    lane
}

/// Why a planned copy could not be composed.
#[derive(Debug, thiserror::Error)]
pub enum PlannedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Compose(#[from] crate::compose::ComposeError),
}

/// The bytes of a planned copy, composed now from its plan and its entry
/// as read back: the same bytes ingest would have composed (see
/// [`crate::compose::plan`]).
///
/// # Errors
/// A database error, no such entry, or a plan that cannot be read.
pub fn compose_planned(
    conn: &store::Db,
    row: &OutboxRow,
    plan: &str,
) -> Result<Vec<u8>, PlannedError> {
    use crate::compose::plan::{self, CopyPlan, EntryBody, PlannedText};
    use crate::compose::ComposeError;
    let plan = CopyPlan::from_json(plan)?;
    let Some(crate::helpdesk::OutboxKind::Send(kind)) =
        crate::helpdesk::OutboxKind::parse(&row.kind)
    else {
        return Err(ComposeError::Plan(format!("a plan for a {} row", row.kind)).into());
    };
    let needs_entry = plan.attachments || !matches!(plan.text, PlannedText::Here(_));
    let entry_id = row.entry_id.filter(|_| needs_entry);
    let body = entry_id
        .map(|id| outbox::entry_body(conn, id))
        .transpose()?;
    let attachments = match entry_id {
        Some(id) if plan.attachments => outbox::entry_attachments(conn, id)?,
        _ => Vec::new(),
    };
    let entry = body.as_ref().map(|(text, html)| EntryBody {
        text,
        html: html.as_deref(),
        attachments: attachments.into(),
    });
    let draft = plan::draft(kind, &row.message_id, &plan, entry)?;
    Ok(crate::compose::compose(&draft)?)
}

/// Rows whose copy cannot be composed, each with why.
pub type Unsendable = Vec<(OutboxRow, String)>;

/// A batch of due rows with their copies composed, and those that could
/// not be.
type Composed = (Vec<OutboxRow>, Unsendable);

/// Up to [`BATCH`] rows due after id `after`, composed.
async fn fetch(db: &Shared, now: i64, after: i64) -> Result<Composed, RelayError> {
    db.call(move |c| {
        let due = outbox::due_after(c, now, after, BATCH)?;
        composed(c, due)
    })
    .await
}

/// Compose the planned copies of `rows`. A row whose copy cannot be
/// composed (its entry gone, a plan this version cannot read) comes back
/// apart with why, to be failed; a database error fails the whole read, to
/// be tried again.
///
/// # Errors
/// A database error other than a missing entry.
pub fn composed(
    conn: &store::Db,
    rows: Vec<OutboxRow>,
) -> Result<(Vec<OutboxRow>, Unsendable), StoreError> {
    let mut ready = Vec::with_capacity(rows.len());
    let mut unsendable = Vec::new();
    for mut row in rows {
        let Some(plan) = row.plan.take() else {
            ready.push(row);
            continue;
        };
        match compose_planned(conn, &row, &plan) {
            Ok(message) => {
                row.message = message;
                ready.push(row);
            }
            Err(PlannedError::Store(e @ (StoreError::NotFound(_) | StoreError::Invalid(_)))) => {
                unsendable.push((row, format!("cannot compose the copy: {e}")));
            }
            Err(PlannedError::Store(e)) => return Err(e),
            Err(PlannedError::Compose(e)) => unsendable.push((row, e.to_string())),
        }
    }
    Ok((ready, unsendable))
}

/// The row with a `DKIM-Signature` on its message, signed here, at send
/// time: nothing changes the message after this, so the signature holds.
/// A message that cannot be signed (a From without a domain) goes unsigned
/// rather than not at all, with a warning.
fn signed(signer: &DkimSigner, mut row: OutboxRow) -> OutboxRow {
    let from = crate::auth::sign::from_address(&row.message);
    match from.as_deref().map(|from| signer.sign(&row.message, from)) {
        Some(Ok(message)) => row.message = message,
        Some(Err(error)) => warn!(outbox_id = row.id, %error, "sent without DKIM signature"),
        None => warn!(
            outbox_id = row.id,
            "no From address: sent without DKIM signature"
        ),
    }
    row
}

/// The result of one attempt at a row.
enum Attempt {
    Outcomes(Vec<(String, RecipientOutcome)>),
    /// The relay could not be used at all: the rest of the batch waits too.
    RelayDown(String),
    /// Shutdown came before anything was handed to the relay.
    Interrupted,
}

struct Worker {
    db: Shared,
    /// The sessions with the relay; each is lent to a task while a batch
    /// is sent.
    lanes: Vec<Lane>,
    /// What a lane that failed is replaced with.
    template: Lane,
    /// The daemon's writer, when it records the outcomes.
    marks: Option<tokio::sync::mpsc::Sender<MarkRequest>>,
    policy: RetryPolicy,
    public_address: String,
    key: Option<Vec<u8>>,
    /// Signs every message as it goes out, when `[auth]` has a DKIM key.
    dkim: Option<Arc<DkimSigner>>,
    on_failed: FailureHook,
    /// Outcomes the database refused to record (busy, disk full): retried
    /// before anything else, and their rows are not sent again meanwhile.
    unrecorded: Vec<(OutboxRow, Disposition)>,
    /// Consecutive passes that found the relay down, and until when nothing
    /// is tried. The backoff of an outage belongs to the relay, not to each
    /// row: every queued row waits for the same moment, so the outbox drains
    /// in order when the relay is back.
    relay_down: Option<(u32, i64)>,
}

impl Worker {
    async fn run(&mut self, wake: &Notify, shutdown: &CancellationToken) {
        // The next batch, read and composed on the blocking pool while the
        // last one is sent: composing is most of the worker's time, and
        // under a backlog the lanes would otherwise wait for it.
        let mut ahead: Option<tokio::task::JoinHandle<Result<Composed, RelayError>>> = None;
        while !shutdown.is_cancelled() {
            self.record_unrecorded().await;
            let now = store::now();
            if let Some((_, until)) = self.relay_down.filter(|(_, until)| *until > now) {
                // New rows wait too: sent before the older ones, they would
                // overtake them. A batch read ahead is read again later (on
                // PostgreSQL its rows stay leased to this instance, which
                // takes them back).
                ahead = None;
                pause(self::until(until), shutdown).await;
                continue;
            }
            let fetched = match ahead.take() {
                Some(next) => match next.await {
                    Ok(Ok((batch, unsendable))) if batch.is_empty() && unsendable.is_empty() => {
                        fetch(&self.db, now, 0).await
                    }
                    Ok(fetched) => fetched,
                    Err(e) => Err(e.into()),
                },
                None => fetch(&self.db, now, 0).await,
            };
            let batch = match fetched {
                Ok((batch, unsendable)) => {
                    self.fail_unsendable(unsendable).await;
                    batch
                }
                Err(e) => {
                    error!(error = %e, "cannot read the outbox");
                    pause(STORE_PAUSE, shutdown).await;
                    continue;
                }
            };
            let skip: HashSet<i64> = self.unrecorded.iter().map(|(r, _)| r.id).collect();
            let batch: Vec<OutboxRow> = batch
                .into_iter()
                .filter(|r| !skip.contains(&r.id))
                .collect();
            if batch.is_empty() {
                if !self.unrecorded.is_empty() {
                    pause(STORE_PAUSE, shutdown).await;
                    continue;
                }
                self.idle(wake, shutdown).await;
                continue;
            }
            if let Some(last) = batch.last().filter(|_| batch.len() == BATCH) {
                // A full batch: more rows are likely queued behind it.
                let (db, after) = (self.db.clone(), last.id);
                ahead = Some(tokio::spawn(async move { fetch(&db, now, after).await }));
            }
            self.send_batch(batch, shutdown).await;
        }
    }

    /// Rows whose copy cannot be composed fail now, told on their ticket
    /// like any failure: sending them later would fail the same way.
    async fn fail_unsendable(&mut self, unsendable: Unsendable) {
        if unsendable.is_empty() {
            return;
        }
        let settled: Vec<(OutboxRow, Disposition)> = unsendable
            .into_iter()
            .map(|(row, error)| {
                error!(outbox_id = row.id, error = %error, "cannot compose the copy");
                (row, Disposition::Failed { error })
            })
            .collect();
        if let Err(e) = self.record(settled.clone(), store::now()).await {
            error!(error = %e, rows = settled.len(), "cannot record the outcomes; will try again");
            self.unrecorded.extend(settled);
        }
    }

    /// Sleep until the next row is due, at most [`POLL`], or until woken.
    async fn idle(&mut self, wake: &Notify, shutdown: &CancellationToken) {
        for lane in &mut self.lanes {
            lane.close_if_idle().await;
        }
        let next_due = self
            .db
            .call(|c| outbox::next_due_at(c))
            .await
            .unwrap_or_else(|e| {
                error!(error = %e, "cannot read the outbox");
                None
            });
        let wait = match next_due {
            Some(at) => until(at).min(POLL),
            None => POLL,
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }

    /// Send a batch over the lanes, recording outcomes as they come: each
    /// transaction holds every outcome that arrived while the previous one
    /// was written (group commit, as for inbound mail), so a crash re-sends
    /// only the few rows whose marks were not written yet.
    async fn send_batch(&mut self, batch: Vec<OutboxRow>, shutdown: &CancellationToken) {
        let last_id = batch.last().map_or(0, |r| r.id);
        let mut lanes: Vec<Option<Lane>> = std::mem::take(&mut self.lanes)
            .into_iter()
            .map(Some)
            .collect();
        let mut rows_of: Vec<Vec<OutboxRow>> = lanes.iter().map(|_| Vec::new()).collect();
        for row in batch {
            rows_of[lane_of(&row, lanes.len())].push(row);
        }
        let (done, mut results) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, rows) in rows_of.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let Some(lane) = lanes[i].take() else {
                continue;
            };
            let (public_address, key, dkim, shutdown, done) = (
                self.public_address.clone(),
                self.key.clone(),
                self.dkim.clone(),
                shutdown.clone(),
                done.clone(),
            );
            tasks.spawn(async move {
                let lane = run_lane(lane, rows, public_address, key, dkim, shutdown, done).await;
                (i, lane)
            });
        }
        drop(done);

        let mut down = false;
        let mut delivered = false;
        while let Some(first) = results.recv().await {
            let mut arrived = vec![first];
            while let Ok(more) = results.try_recv() {
                arrived.push(more);
            }
            let settled = self.settle(arrived, &mut down, &mut delivered);
            if settled.is_empty() {
                continue;
            }
            if let Err(e) = self.record(settled.clone(), store::now()).await {
                error!(error = %e, rows = settled.len(), "cannot record the outcomes; will try again");
                self.unrecorded.extend(settled);
            }
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, lane)) => lanes[i] = Some(lane),
                // Its rows not yet sent stay queued; the lane gets a fresh
                // session below.
                Err(e) => error!(error = %e, "a relay lane failed"),
            }
        }
        self.lanes = lanes
            .into_iter()
            .map(|lane| lane.unwrap_or_else(|| self.template.fresh()))
            .collect();
        if delivered {
            self.relay_down = None;
        }
        if down {
            // One failure says the relay is down for every row.
            self.defer_all(last_id).await;
        }
    }

    /// Decide what each attempt means for its row, and log it.
    fn settle(
        &self,
        attempts: Vec<(OutboxRow, Attempt)>,
        down: &mut bool,
        delivered: &mut bool,
    ) -> Vec<(OutboxRow, Disposition)> {
        let now = store::now();
        let mut settled = Vec::with_capacity(attempts.len());
        for (row, attempt) in attempts {
            let outcomes = match attempt {
                Attempt::Outcomes(outcomes) => outcomes,
                Attempt::RelayDown(reason) => {
                    *down = true;
                    row.recipients
                        .iter()
                        .map(|r| (r.clone(), RecipientOutcome::Deferred(reason.clone())))
                        .collect()
                }
                Attempt::Interrupted => continue,
            };
            *delivered |= outcomes
                .iter()
                .any(|(_, o)| *o == RecipientOutcome::Delivered);
            let disposition = dispose(&row, &outcomes, now, &self.policy);
            let span = info_span!("delivery", outbox_id = row.id, message_id = %row.message_id);
            let _entered = span.enter();
            match &disposition {
                Disposition::Sent => info!(outcome = "sent", "delivered"),
                Disposition::Retry { next_at, error, .. } => {
                    info!(outcome = "retry", retry_in = next_at - now, error = %error, "deferred")
                }
                Disposition::Failed { error } => {
                    warn!(outcome = "failed", error = %error, "failed")
                }
            }
            // The marks need the row's id, kind and recipients, not its
            // message: drop it, so keeping a copy of the batch's outcomes
            // until they are committed does not copy every message.
            let row = OutboxRow {
                message: Vec::new(),
                ..row
            };
            settled.push((row, disposition));
        }
        settled
    }

    /// The relay is down: every queued row up to this batch, and every row
    /// due before the relay's next try, waits for that same moment.
    async fn defer_all(&mut self, last_id: i64) {
        let failures = self.relay_down.map_or(0, |(n, _)| n) + 1;
        let until = store::now() + self.policy.delay(i64::from(failures) - 1);
        self.relay_down = Some((failures, until));
        let deferred = self
            .db
            .call(move |c| outbox::defer_queued(c, until, last_id))
            .await;
        if let Err(e) = deferred {
            error!(error = %e, "cannot defer the outbox");
        }
    }

    async fn record(
        &self,
        settled: Vec<(OutboxRow, Disposition)>,
        now: i64,
    ) -> Result<(), RelayError> {
        let hook = Arc::clone(&self.on_failed);
        let Some(marks) = &self.marks else {
            return self.db.call(move |c| record(c, &settled, now, &hook)).await;
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = MarkRequest {
            settled,
            now,
            on_failed: hook,
            reply,
        };
        if marks.send(request).await.is_err() {
            return Err(RelayError::Marks("the writer thread has stopped".into()));
        }
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(RelayError::Marks(why)),
            Err(_) => Err(RelayError::Marks("no answer from the writer thread".into())),
        }
    }

    async fn record_unrecorded(&mut self) {
        if self.unrecorded.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.unrecorded);
        if let Err(e) = self.record(pending.clone(), store::now()).await {
            error!(rows = pending.len(), error = %e, "still cannot record the outcomes");
            self.unrecorded = pending;
        }
    }
}

/// How long until the Unix second `at` begins (zero if it has).
fn until(at: i64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at = Duration::from_secs(u64::try_from(at).unwrap_or(0));
    at.saturating_sub(now)
}

async fn pause(duration: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(duration) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::outbox::OutboxStatus;

    const POLICY: RetryPolicy = RetryPolicy {
        initial_seconds: 30,
        max_seconds: 3600,
        give_up_after_seconds: 72 * 3600,
    };

    fn row(recipients: &[&str], attempts: i64, created_at: i64) -> OutboxRow {
        OutboxRow {
            id: 7,
            ticket_id: Some(1),
            entry_id: Some(2),
            kind: "public_copy".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            message_id: "<m@h>".into(),
            message: b"x\r\n".to_vec(),
            plan: None,
            status: OutboxStatus::Queued,
            attempts,
            next_attempt_at: created_at,
            last_error: None,
            created_at,
        }
    }

    fn outcomes(list: &[(&str, RecipientOutcome)]) -> Vec<(String, RecipientOutcome)> {
        list.iter()
            .map(|(r, o)| (r.to_string(), o.clone()))
            .collect()
    }

    use RecipientOutcome::{Deferred, Delivered, Refused};

    #[test]
    fn backoff_doubles_from_the_initial_delay_up_to_the_maximum() {
        let delays: Vec<i64> = (0..9).map(|a| POLICY.delay(a)).collect();
        assert_eq!(delays, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(POLICY.delay(10_000), 3600);
    }

    #[test]
    fn a_row_without_recipients_fails() {
        let r = row(&[], 0, 1000);
        assert!(matches!(
            dispose(&r, &[], 1000, &POLICY),
            Disposition::Failed { .. }
        ));
    }

    #[test]
    fn all_delivered_is_sent() {
        let r = row(&["a@x", "b@x"], 0, 1000);
        let o = outcomes(&[("a@x", Delivered), ("b@x", Delivered)]);
        assert_eq!(dispose(&r, &o, 1000, &POLICY), Disposition::Sent);
    }

    #[test]
    fn one_refused_recipient_fails_the_row_naming_it() {
        let r = row(&["a@x", "b@x"], 0, 1000);
        let o = outcomes(&[
            ("a@x", Delivered),
            ("b@x", Refused("RCPT TO:<b@x>: 550 5.1.1 unknown".into())),
        ]);
        match dispose(&r, &o, 1000, &POLICY) {
            Disposition::Failed { error } => {
                assert!(
                    error.contains("RCPT TO:<b@x>: 550 5.1.1 unknown"),
                    "{error}"
                );
                assert!(!error.contains("a@x"), "{error}");
                assert!(error.contains("delivered to the 1 other"), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_deferral_retries_after_the_backoff_for_that_attempt() {
        let r = row(&["a@x"], 3, 1000);
        let o = outcomes(&[("a@x", Deferred("451 4.3.0 later".into()))]);
        match dispose(&r, &o, 2000, &POLICY) {
            Disposition::Retry {
                next_at,
                error,
                narrow_to,
                refused,
            } => {
                assert_eq!(next_at, 2000 + 240);
                assert!(error.contains("451 4.3.0 later"));
                assert_eq!((narrow_to, refused), (None, None));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_partial_deferral_retries_only_the_deferred_recipients() {
        let r = row(&["a@x", "b@x", "c@x"], 0, 1000);
        let o = outcomes(&[
            ("a@x", Delivered),
            ("b@x", Deferred("452 4.2.2 mailbox full".into())),
            ("c@x", Refused("550 5.1.1 unknown".into())),
        ]);
        match dispose(&r, &o, 1000, &POLICY) {
            Disposition::Retry {
                narrow_to, refused, ..
            } => {
                assert_eq!(narrow_to, Some(vec!["b@x".to_string()]));
                assert_eq!(refused.as_deref(), Some("refused: c@x: 550 5.1.1 unknown"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deferrals_give_up_after_the_configured_hours_and_never_schedule_past_it() {
        let created = 1000;
        let deadline = created + 72 * 3600;
        let o = outcomes(&[("a@x", Deferred("421 4.4.2 down".into()))]);
        match dispose(&row(&["a@x"], 20, created), &o, deadline - 10, &POLICY) {
            Disposition::Retry { next_at, .. } => assert_eq!(next_at, deadline),
            other => panic!("{other:?}"),
        }
        match dispose(&row(&["a@x"], 21, created), &o, deadline, &POLICY) {
            Disposition::Failed { error } => {
                assert!(
                    error.starts_with("gave up after 72 h and 22 attempt(s)"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
