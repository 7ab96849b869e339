//! Writer: the daemon's database writers, between the SMTP sessions and
//! the store. On SQLite a single thread owns the writing connection; on
//! PostgreSQL a few do ([`POSTGRES_WRITERS`]), each with its own
//! connection, all taking jobs from the same queue. Each commits in
//! batches (group commit): each SMTP session waits for the commit that
//! holds its message, so `250` still means "on disk" while one fsync serves
//! many messages. Each message runs in a savepoint of its own
//! ([`crate::intake::process`]), so one that fails is answered `451`
//! without taking its batch down with it (on PostgreSQL, where a savepoint
//! costs round trips, the batch is tried without them first, and written
//! again with them only when a message fails); on PostgreSQL, one that meets a
//! deadlock with another instance's batch is written again, with the rest
//! of its batch, in a new transaction once those before it are committed.
//! The relay worker's outcomes ([`MarkRequest`]) join the same batches:
//! on SQLite one writer, so neither waits for the other's lock. A last
//! thread syncs the WAL (SQLite) and answers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{oneshot, Notify};

use crate::intake::{self, Arrival, Outcome, Runtime};
use crate::smtp::Verdict;
use crate::store::outbox::MarkRequest;
use crate::store::{self, tickets, Db};

/// How often the writer forgets `sends` rows no cap counts any more, and
/// at most how many each time (up to 500 rows a second, above any real
/// helpdesk's rate of capped mail): the table stays about a day deep, and
/// the commits around wait a few milliseconds at most.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
const PRUNE_ROWS: i64 = 5_000;

/// How many messages one commit may hold at most.
const MAX_BATCH: usize = 256;

/// How long the SQLite writer waits at most, before it writes a batch, for
/// as many messages as the last batch held (group commit). Each commit
/// writes whole the last page of every table and index it touches, some
/// 30 pages whatever it holds: with 8 sessions, batches that each took
/// what happened to be queued held 3 or 4 messages, while the sessions
/// the last commit answered were about to send their next ones. After a
/// batch of one (a single session) the writer does not wait; on
/// PostgreSQL, whose several writers share the queue, it never does. The
/// `250` still waits for the commit and its sync, as before.
const GATHER_AT_MOST: std::time::Duration = std::time::Duration::from_millis(1);
const GATHER_POLL: std::time::Duration = std::time::Duration::from_micros(100);

fn messages(batch: &[Job]) -> usize {
    batch
        .iter()
        .filter(|job| matches!(job, Job::Message { .. }))
        .count()
}

// Messages are the common job and were this size before marks joined
// them: boxing them would cost an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
enum Job {
    /// An inbound message, answered with its verdict once committed.
    Message {
        arrival: Arrival,
        reply: oneshot::Sender<Verdict>,
    },
    /// The relay worker's outcomes, answered once committed: written by
    /// the one writer, in its batches, they never wait for its lock (nor
    /// make it wait for theirs).
    Marks(MarkRequest),
}

/// What became of one job of a batch.
enum Done {
    Message(Outcome),
    Marks(Result<(), String>),
}

/// The handle SMTP sessions (and the relay worker) use to hand work to the
/// writer thread.
#[derive(Clone)]
pub struct Writer {
    jobs: tokio::sync::mpsc::Sender<Job>,
    states: Arc<[WriterState]>,
}

/// How many writer threads the daemon runs on PostgreSQL. Each message is
/// some 10 to 20 statements, each a round trip to the server: one writer spends
/// most of its time waiting for the network, and the server serves several
/// at once (the store's unique keys, advisory lock and the retry of a
/// deadlocked message make concurrent writers safe). SQLite keeps one:
/// one file, one write lock.
pub const POSTGRES_WRITERS: usize = 4;

/// The writer threads, seen from outside: a thread ends once every
/// [`Writer`] handle is dropped and the queue is empty, its last batch
/// committed and handed to the answering thread.
pub struct Threads(Arc<[WriterState]>);

impl Threads {
    /// Wait until every writer thread has ended, at most `within`;
    /// whether they all did.
    pub async fn ended(&self, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            if self.0.iter().all(|s| s.ended.load(Ordering::Relaxed)) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// What the health check reads of one writer thread.
#[derive(Default)]
struct WriterState {
    /// When its current batch began (ms since the epoch), 0 while idle.
    busy_since: AtomicU64,
    /// Its thread has returned or panicked.
    ended: AtomicBool,
}

/// Marks its writer ended when the thread returns or unwinds.
struct Ended<'a>(&'a WriterState);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::Relaxed);
    }
}

fn millis_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
        .max(1)
}

/// One writer thread: take a batch off the shared queue (the lock held
/// only while taking it), write it, hand it to the answering thread.
/// `prunes`: one writer forgets old `sends`, so two never delete the same
/// rows at once.
fn write_from_queue(
    mut conn: Db,
    rx: &std::sync::Mutex<tokio::sync::mpsc::Receiver<Job>>,
    runtime: &RwLock<Arc<Runtime>>,
    committed: &std::sync::mpsc::Sender<Committed>,
    checkpoints: &store::CheckpointProgress,
    state: &WriterState,
    prunes: bool,
) {
    conn.wait_for_locks_at_most(LOCK_WAIT_MS);
    let mut pruned_at = std::time::Instant::now();
    // The messages of the last batch: their sessions, once answered, are
    // likely to send their next one soon.
    let mut last_messages = 0;
    let gathers = conn.sqlite().is_some();
    loop {
        let batch = {
            let mut rx = match rx.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            let Some(first) = rx.blocking_recv() else {
                return;
            };
            let mut batch = vec![first];
            let drain = |rx: &mut tokio::sync::mpsc::Receiver<Job>, batch: &mut Vec<Job>| {
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
            };
            drain(&mut rx, &mut batch);
            if gathers {
                let since = std::time::Instant::now();
                while messages(&batch) < last_messages
                    && batch.len() < MAX_BATCH
                    && since.elapsed() < GATHER_AT_MOST
                {
                    std::thread::sleep(GATHER_POLL);
                    drain(&mut rx, &mut batch);
                }
                last_messages = messages(&batch);
            }
            batch
        };
        state.busy_since.store(millis_now(), Ordering::Relaxed);
        let rt = match runtime.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let done = write_batch(&mut conn, &rt, &batch);
        // Without the answering thread the replies are dropped:
        // each session then answers 451.
        let _ = committed.send(Committed { batch, done });
        if let Some(sqlite) = conn.sqlite() {
            if let Err(e) = store::finish_checkpoint(sqlite, checkpoints) {
                tracing::warn!(error = %e, "checkpoint failed: the WAL stays long a while");
            }
        }
        if prunes && pruned_at.elapsed() >= PRUNE_EVERY {
            pruned_at = std::time::Instant::now();
            match tickets::prune_sends(&conn, store::now(), PRUNE_ROWS) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(
                    rows = n,
                    "forgot sends older than a day (no cap counts them)"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot prune old sends"),
            }
        }
        state.busy_since.store(0, Ordering::Relaxed);
    }
}

impl Writer {
    /// Start the writer thread on its own connection, and the thread that
    /// makes its commits durable and answers them.
    ///
    /// # Errors
    /// A thread cannot be spawned, or the connection's durability cannot be
    /// set.
    pub fn spawn(
        conns: Vec<Db>,
        runtime: Arc<RwLock<Arc<Runtime>>>,
        wake: Arc<Notify>,
        checkpoints: Arc<store::CheckpointProgress>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> std::io::Result<Writer> {
        let (jobs, rx) = tokio::sync::mpsc::channel::<Job>(4 * MAX_BATCH);
        // SQLite has one writer (one file, one write lock): the WAL synced
        // here is its connection's.
        let wal = match conns.first() {
            Some(conn) if conns.len() == 1 => WalFile::take_over_syncs(conn)?,
            _ => WalFile {
                path: None,
                open: None,
            },
        };
        let (committed, to_answer) = std::sync::mpsc::channel::<Committed>();
        std::thread::Builder::new()
            .name("crmgate-sync".into())
            .spawn(move || sync_and_answer(wal, &to_answer, &wake, &metrics))?;
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let states: Arc<[WriterState]> = conns.iter().map(|_| WriterState::default()).collect();
        for (n, conn) in conns.into_iter().enumerate() {
            let (rx, runtime, committed, checkpoints, states) = (
                rx.clone(),
                runtime.clone(),
                committed.clone(),
                checkpoints.clone(),
                states.clone(),
            );
            std::thread::Builder::new()
                .name(format!("crmgate-writer-{n}"))
                .spawn(move || {
                    let state = &states[n];
                    let _ended = Ended(state);
                    write_from_queue(conn, &rx, &runtime, &committed, &checkpoints, state, n == 0);
                })?;
        }
        Ok(Writer { jobs, states })
    }

    /// Every writer thread runs, and none has spent more than `within`
    /// on one batch: each holds its sessions' messages, so one stuck or
    /// ended writer must be seen even while the others answer pings.
    ///
    /// # Errors
    /// The first writer that does not, in words.
    pub fn all_running(&self, within: std::time::Duration) -> Result<(), String> {
        let now = millis_now();
        for (n, state) in self.states.iter().enumerate() {
            if state.ended.load(Ordering::Relaxed) {
                return Err(format!("database writer {n} has stopped"));
            }
            let since = state.busy_since.load(Ordering::Relaxed);
            if since != 0 && now.saturating_sub(since) > within.as_millis() as u64 {
                return Err(format!(
                    "database writer {n} has spent more than {} s on one batch",
                    within.as_secs()
                ));
            }
        }
        Ok(())
    }

    /// The writer threads, to wait for at shutdown, without holding their
    /// queue open.
    pub fn threads(&self) -> Threads {
        Threads(self.states.clone())
    }

    /// Hand a message over and wait for the commit that holds it.
    pub async fn submit(&self, arrival: Arrival) -> Verdict {
        let (reply, answer) = oneshot::channel();
        // The channel is bounded: a full queue makes the session wait (back
        // pressure) without blocking tokio's worker thread.
        if self
            .jobs
            .send(Job::Message { arrival, reply })
            .await
            .is_err()
        {
            return Verdict::TempFailure;
        }
        answer.await.unwrap_or(Verdict::TempFailure)
    }

    /// Hand the relay worker's outcomes over; `marks.reply` is answered
    /// once they are committed (or could not be).
    pub async fn record_marks(&self, marks: MarkRequest) {
        if let Err(refused) = self.jobs.send(Job::Marks(marks)).await {
            if let Job::Marks(marks) = refused.0 {
                let _ = marks
                    .reply
                    .send(Err("the writer thread has stopped".into()));
            }
        }
    }
}

/// A committed batch, waiting for its WAL frames to reach the disk.
struct Committed {
    batch: Vec<Job>,
    done: Vec<Done>,
}

/// The writer's WAL, synced by the answering thread.
///
/// With `synchronous=FULL`, every commit waited for its fsync on the
/// writer thread, which then sat idle while
/// the next sessions' messages waited for it. Now the writer commits with
/// `synchronous=NORMAL` (in WAL mode: consistent, and nothing reaches the
/// disk at commit) and goes on with the next batch, while this thread
/// fdatasyncs the WAL file and only then answers the batches committed
/// before: the frames, and the WAL header of a WAL that started over,
/// are on disk before a `250`, as before. One fdatasync also covers every
/// batch committed while the one before it ran. Checkpoints still sync the
/// WAL before copying it back (SQLite does that at `NORMAL` too).
struct WalFile {
    path: Option<PathBuf>,
    /// The file, and its inode: SQLite deletes the WAL when the last
    /// connection closes, so a new one may stand at the same path.
    open: Option<(std::fs::File, u64)>,
}

impl WalFile {
    /// Set the writer's connection to commit without syncing, when its WAL
    /// can be synced here (a database in a file, in WAL mode); otherwise it
    /// stays `FULL` and [`WalFile::sync`] has nothing to do.
    /// On PostgreSQL there is no WAL of ours: a commit has returned once
    /// the server made it durable (`synchronous_commit` as it has it).
    fn take_over_syncs(conn: &Db) -> std::io::Result<WalFile> {
        let Some(conn) = conn.sqlite() else {
            return Ok(WalFile {
                path: None,
                open: None,
            });
        };
        let path = store::wal_path(conn).map_err(std::io::Error::other)?;
        if path.is_some() {
            store::commit_without_sync(conn).map_err(std::io::Error::other)?;
        }
        Ok(WalFile { path, open: None })
    }

    fn sync(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let Some(path) = &self.path else {
            return Ok(());
        };
        let now_there = std::fs::metadata(path)?.ino();
        if !matches!(&self.open, Some((_, inode)) if *inode == now_there) {
            let file = std::fs::File::open(path)?;
            let inode = file.metadata()?.ino();
            self.open = Some((file, inode));
        }
        match &self.open {
            Some((file, _)) => file.sync_data(),
            None => Ok(()),
        }
    }
}

/// The answering thread: sync the WAL, then answer every batch committed
/// before the sync began, then wake the relay (whose rows are now durable).
/// A failed sync answers its messages 451: what the disk may not hold is
/// not promised, and a sender that tries again is recognised by its
/// Message-ID if the first copy survived after all.
fn sync_and_answer(
    mut wal: WalFile,
    committed: &std::sync::mpsc::Receiver<Committed>,
    wake: &Notify,
    metrics: &crate::metrics::Metrics,
) {
    while let Ok(first) = committed.recv() {
        let mut batches = vec![first];
        batches.extend(committed.try_iter());
        let synced = match wal.sync() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot sync the WAL: its messages are answered 451");
                false
            }
        };
        let mut wake_relay = false;
        for Committed { batch, done } in batches {
            for (job, done) in batch.into_iter().zip(done) {
                let done = match done {
                    Done::Message(_) if !synced => Done::Message(Outcome::not_stored()),
                    Done::Marks(_) if !synced => Done::Marks(Err("the WAL sync failed".into())),
                    done => done,
                };
                wake_relay |= answer(job, done, metrics);
            }
        }
        if wake_relay {
            wake.notify_one();
        }
    }
}

/// Answer one job of a committed batch; whether the relay has rows to send.
fn answer(job: Job, done: Done, metrics: &crate::metrics::Metrics) -> bool {
    match (job, done) {
        (Job::Message { arrival, reply }, Done::Message(outcome)) => {
            intake::log_outcome(&arrival, &outcome);
            metrics.message(outcome.decision);
            let queued = outcome.queued > 0;
            let _ = reply.send(outcome.verdict);
            queued
        }
        (Job::Marks(marks), Done::Marks(result)) => {
            // A failure may have queued a notice.
            let may_queue = result.is_ok() && marks.may_queue();
            let _ = marks.reply.send(result);
            may_queue
        }
        // `write_batch` answers each job in kind.
        (Job::Message { reply, .. }, Done::Marks(_)) => {
            let _ = reply.send(Verdict::TempFailure);
            false
        }
        (Job::Marks(marks), Done::Message(_)) => {
            let _ = marks.reply.send(Err("not recorded".into()));
            false
        }
    }
}

/// One transaction for the whole batch, one savepoint per job.
fn write_batch(conn: &mut Db, rt: &Runtime, batch: &[Job]) -> Vec<Done> {
    let now = store::now();
    let raw_bytes: usize = batch
        .iter()
        .map(|job| match job {
            Job::Message { arrival, .. } => arrival.raw.len(),
            Job::Marks(_) => 0,
        })
        .sum();
    let large = raw_bytes > LARGE_BATCH_BYTES && conn.sqlite().is_some();
    if large {
        if let Err(e) = conn
            .sqlite()
            .map_or(Ok(()), |c| store::writer_cache(c, true))
        {
            tracing::warn!(error = %e, "cannot shrink the page cache for a large message");
        }
    }
    let done = write_batch_in_transaction(conn, rt, batch, now);
    if large {
        if let Err(e) = conn
            .sqlite()
            .map_or(Ok(()), |c| store::writer_cache(c, false))
        {
            tracing::warn!(error = %e, "cannot restore the page cache");
        }
    }
    done
}

/// Above this many bytes of raw mail, a batch is written with a small page
/// cache ([`store::writer_cache`]).
const LARGE_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How long a writer's transaction on PostgreSQL waits for a lock another
/// batch holds (a ticket both update, a message both log) before it is
/// written again as after a deadlock: a batch commits in a few
/// milliseconds, and two that wait for each other were otherwise found
/// only by the server's deadlock check, after a second.
const LOCK_WAIT_MS: u16 = 200;

/// How many times a job that met a deadlock or serialization failure on
/// PostgreSQL is written again, each in a new transaction, before it is
/// answered `451`.
const CONFLICT_RETRIES: u32 = 3;

/// The batch in as few transactions as it takes: one, unless a job meets
/// a transient conflict with another instance's batch on PostgreSQL
/// ([`store::StoreError::is_transient_conflict`]). Then the jobs before it
/// are committed (the locks they hold are what the other batch waits for)
/// and it, with the rest, is written again in a new transaction after a
/// short jittered pause. Done again in the same transaction it would wait again
/// for locks the other batch holds while holding its own. SQLite has one
/// writer and never meets one.
fn write_batch_in_transaction(conn: &mut Db, rt: &Runtime, batch: &[Job], now: i64) -> Vec<Done> {
    if conn.is_postgres() {
        match write_without_savepoints(conn, rt, batch, now) {
            Optimistic::Done(done) => return done,
            Optimistic::WriteAgain => {}
        }
    }
    let mut done = Vec::with_capacity(batch.len());
    // The conflicts the first job not yet written has met.
    let mut conflicts = 0;
    loop {
        let rest = &batch[done.len()..];
        match write_in_transaction(conn, rt, rest, now, conflicts < CONFLICT_RETRIES) {
            Written::All(written) => {
                done.extend(written);
                return done;
            }
            Written::Failed(why) => {
                done.extend(failed(rest, &why));
                return done;
            }
            Written::UpToConflict(written) => {
                conflicts = if written.is_empty() { conflicts + 1 } else { 1 };
                done.extend(written);
                std::thread::sleep(std::time::Duration::from_millis(rand::random_range(5..=50)));
            }
        }
    }
}

/// What [`write_without_savepoints`] came to.
enum Optimistic {
    /// Committed, or failed as a whole (a commit or a `BEGIN` that failed):
    /// what each job is answered.
    Done(Vec<Done>),
    /// A job failed: nothing is left of the batch, which is to be written
    /// again with a savepoint per job.
    WriteAgain,
}

/// On PostgreSQL a savepoint and its release are two round trips a
/// message, and a subtransaction each: the batch is first written without
/// them, in one transaction. The first job that fails (a database error,
/// a deadlock with another instance, a message that instance logged
/// meanwhile) rolls it all back, and the batch is written again job by job
/// in savepoints, where that job alone fails (or is retried) as before.
/// Every job only writes to the database, so writing one twice leaves
/// nothing of the first time.
fn write_without_savepoints(conn: &mut Db, rt: &Runtime, batch: &[Job], now: i64) -> Optimistic {
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            tracing::error!(error = %e, "cannot begin a transaction");
            return Optimistic::Done(failed(batch, &format!("cannot begin a transaction: {e}")));
        }
    };
    let mut done = Vec::with_capacity(batch.len());
    for job in batch {
        let written = match job {
            Job::Message { arrival, .. } => {
                intake::process_without_savepoint(&tx, rt, arrival, now)
                    .map(Done::Message)
                    .map_err(|e| e.to_string())
            }
            Job::Marks(marks) => marks
                .write(&tx)
                .map(|()| Done::Marks(Ok(())))
                .map_err(|e| e.to_string()),
        };
        match written {
            Ok(d) => done.push(d),
            Err(why) => {
                // Dropping `tx` rolls the batch back.
                tracing::debug!(error = %why, "a job failed: the batch is written again, a savepoint per job");
                return Optimistic::WriteAgain;
            }
        }
    }
    // Not written again: a commit whose answer was lost may have been made.
    if let Err(e) = tx.commit() {
        tracing::error!(error = %e, "commit failed: the whole batch is answered 451");
        return Optimistic::Done(failed(batch, &format!("commit failed: {e}")));
    }
    Optimistic::Done(done)
}

/// What one transaction of [`write_batch_in_transaction`] wrote.
enum Written {
    /// Every job, committed.
    All(Vec<Done>),
    /// The jobs before the one that met a transient conflict, committed;
    /// that one and those after it are to be written again.
    UpToConflict(Vec<Done>),
    /// Nothing committed: every job is answered with this failure.
    Failed(String),
}

/// What one job of a transaction came to.
enum Step {
    Done(Done),
    /// A transient conflict: the savepoint is rolled back, the job is to be
    /// written again in a new transaction.
    Conflict(String),
}

fn failed(jobs: &[Job], why: &str) -> Vec<Done> {
    jobs.iter()
        .map(|job| match job {
            Job::Message { .. } => Done::Message(Outcome::not_stored()),
            Job::Marks(_) => Done::Marks(Err(why.to_string())),
        })
        .collect()
}

/// One transaction, one savepoint per job. `first_may_retry`: whether a
/// transient conflict of the first job stops the transaction (the jobs
/// after it always may), or is answered `451` as any failure.
fn write_in_transaction(
    conn: &mut Db,
    rt: &Runtime,
    jobs: &[Job],
    now: i64,
    first_may_retry: bool,
) -> Written {
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            tracing::error!(error = %e, "cannot begin a transaction");
            return Written::Failed(format!("cannot begin a transaction: {e}"));
        }
    };
    let mut done = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        let may_retry = tx.is_postgres() && (i > 0 || first_may_retry);
        let result = match job {
            Job::Message { arrival, .. } => store::in_savepoint(&tx, |conn| {
                intake::process(conn, rt, arrival, now)
            })
            .map(|r| match r {
                Ok(outcome) => Step::Done(Done::Message(outcome)),
                Err(e) if may_retry && e.is_transient_conflict() => Step::Conflict(e.to_string()),
                Err(e) => {
                    tracing::error!(error = %e, "message not stored");
                    Step::Done(Done::Message(Outcome::not_stored()))
                }
            }),
            Job::Marks(marks) => {
                store::in_savepoint(&tx, |conn| marks.write(conn)).map(|r| match r {
                    Err(e) if may_retry && e.is_transient_conflict() => {
                        Step::Conflict(e.to_string())
                    }
                    r => Step::Done(Done::Marks(r.map_err(|e| e.to_string()))),
                })
            }
        };
        match result {
            Ok(Step::Done(d)) => done.push(d),
            Ok(Step::Conflict(why)) => {
                tracing::warn!(
                    error = %why,
                    "conflict with another transaction: the batch so far is committed, the rest written again"
                );
                if let Err(e) = tx.commit() {
                    tracing::error!(error = %e, "commit failed: the whole batch is answered 451");
                    return Written::Failed(format!("commit failed: {e}"));
                }
                return Written::UpToConflict(done);
            }
            Err(e) => {
                // Dropping `tx` rolls the whole batch back.
                tracing::error!(error = %e, "savepoint failed: the whole batch is answered 451");
                return Written::Failed(format!("savepoint failed: {e}"));
            }
        }
    }
    if let Err(e) = tx.commit() {
        tracing::error!(error = %e, "commit failed: the whole batch is answered 451");
        return Written::Failed(format!("commit failed: {e}"));
    }
    Written::All(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synchronous(conn: &rusqlite::Connection) -> i64 {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    fn arrival(id: &str, subject: &str) -> Arrival {
        arrival_from(id, id, subject)
    }

    /// From `r-{sender}@u.example`, Message-ID `<{id}@u.example>`.
    fn arrival_from(sender: &str, id: &str, subject: &str) -> Arrival {
        let envelope = crate::helpdesk::Envelope {
            peer: std::net::IpAddr::from([127, 0, 0, 1]),
            helo: "u.example".into(),
            mail_from: Some(format!("r-{sender}@u.example")),
            rcpt_to: vec!["support@example.org".into()],
        };
        let raw = format!(
            "From: Requester <r-{sender}@u.example>\r\nTo: support@example.org\r\n\
             Subject: {subject}\r\nMessage-ID: <{id}@u.example>\r\n\r\nLe message {id}.\r\n"
        );
        Arrival::new(envelope, raw.into_bytes())
    }

    fn message(id: &str, subject: &str) -> Job {
        Job::Message {
            arrival: arrival(id, subject),
            reply: oneshot::channel().0,
        }
    }

    /// How many entries hold the Message-ID of the test message `id`.
    fn logged(conn: &Db, id: &str) -> i64 {
        conn.query_row(
            "SELECT count(*) FROM entries WHERE message_id LIKE ?1",
            store::args![format!("%{id}@u.example%").as_str()],
            |r| r.get::<i64>(0),
        )
        .unwrap()
    }

    fn verdicts(done: &[Done]) -> Vec<Verdict> {
        done.iter()
            .map(|d| match d {
                Done::Message(outcome) => outcome.verdict.clone(),
                Done::Marks(_) => unreachable!("no marks in these batches"),
            })
            .collect()
    }

    /// A fresh database on the tests' PostgreSQL cluster, and the runtime
    /// of a gateway named crm.example.org with `gateway` added to its
    /// `[gateway]` table and `tables` after it; `None` when
    /// `CRMGATE_TEST_NO_PG=1`.
    fn postgres_runtime(gateway: &str, tables: &str) -> Option<(store::Location, Runtime)> {
        let location = store::test_location()?;
        let config = crate::config::Config::from_toml(
            &format!(
                "[gateway]\nhostname = \"crm.example.org\"\n{gateway}\
                 [addresses]\npublic = \"support@example.org\"\n\
                 internal = \"support-notes@example.org\"\n{tables}"
            ),
            "test",
        )
        .unwrap();
        Some((location, Runtime::new(Arc::new(config)).unwrap()))
    }

    /// Two instances' batches on two tickets in opposite order, the one
    /// (driven by hand, as the other instance's writer does) made sure to
    /// outwait the deadlock check so that the writer's is the transaction
    /// PostgreSQL undoes: its message is written again once the message
    /// before it is committed, and nothing is answered 451.
    #[test]
    fn on_postgres_a_deadlock_with_another_batch_is_written_again_not_answered_451() {
        let Some((location, rt)) =
            postgres_runtime("", "[security]\ntrusted_relays = [\"127.0.0.0/8\"]\n")
        else {
            return;
        };
        let connect = || store::connect(&location, store::Durability::Full).unwrap();
        let (mut a, mut b, watch) = (connect(), connect(), connect());

        let numbers: Vec<String> = ["first", "second"]
            .iter()
            .map(|id| {
                let done = write_batch(&mut a, &rt, &[message(id, id)]);
                match &done[..] {
                    [Done::Message(outcome)] => outcome.ticket.clone().unwrap(),
                    _ => unreachable!("one message, one outcome"),
                }
            })
            .collect();
        let reply =
            |id: &str, ticket: usize| arrival(id, &format!("Re: [{}] {id}", numbers[ticket]));

        // The other instance's batch holds the second ticket.
        let tx = b.transaction().unwrap();
        tx.batch("SET LOCAL deadlock_timeout = '60s'").unwrap();
        let other_first = intake::process(&tx, &rt, &reply("b-second", 1), 0).unwrap();
        let (done, other_second) = std::thread::scope(|s| {
            // The writer's batch takes the first ticket, then waits for
            // the second.
            let writer = s.spawn(|| {
                let batch = [
                    message("a-first", &format!("Re: [{}] a", numbers[0])),
                    message("a-second", &format!("Re: [{}] a", numbers[1])),
                ];
                write_batch(&mut a, &rt, &batch)
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while watch
                .query_row(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                    |r| r.get::<i64>(0),
                )
                .unwrap()
                == 0
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the writer never waited"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            // …and the other batch now waits for the first: a deadlock.
            let other_second = intake::process(&tx, &rt, &reply("b-first", 0), 0).unwrap();
            tx.commit().unwrap();
            (writer.join().unwrap(), other_second)
        });

        assert_eq!(verdicts(&done), [Verdict::Stored, Verdict::Stored]);
        assert_eq!(other_first.verdict, Verdict::Stored);
        assert_eq!(other_second.verdict, Verdict::Stored);
        for id in ["a-first", "a-second", "b-first", "b-second"] {
            assert_eq!(logged(&watch, id), 1, "{id} logged once");
        }
    }

    /// A batch is first written without savepoints on PostgreSQL: a
    /// message that fails there (the test's trigger refuses its entry, as
    /// a full disk or a broken row would) rolls it back, and the batch is
    /// written again, a savepoint per message, where that message alone is
    /// answered `451` and the others are logged once.
    #[test]
    fn on_postgres_a_message_that_fails_is_answered_451_and_the_rest_of_its_batch_logged_once() {
        let Some((location, rt)) = postgres_runtime("", "") else {
            return;
        };
        let mut conn = store::connect(&location, store::Durability::Full).unwrap();
        conn.batch(
            "CREATE FUNCTION refuse_fire() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.subject LIKE '%on fire%' THEN
                     RAISE EXCEPTION 'refused by the test';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_fire BEFORE INSERT ON entries
                 FOR EACH ROW EXECUTE FUNCTION refuse_fire();",
        )
        .unwrap();
        let batch = [
            message("before", "Printer"),
            message("broken", "Printer on fire"),
            message("after", "Scanner"),
        ];
        let done = write_batch(&mut conn, &rt, &batch);
        assert_eq!(
            verdicts(&done),
            [Verdict::Stored, Verdict::TempFailure, Verdict::Stored]
        );
        for (id, times) in [("before", 1), ("broken", 0), ("after", 1)] {
            assert_eq!(logged(&conn, id), times, "{id}");
        }
    }

    /// What a message costs in round trips to PostgreSQL, each kind the
    /// load of `bench/run` sends (bench/README.md lists the statements):
    /// one batch of one message, its statements prepared already, with
    /// the configuration of `bench/harness.py` (one agent on every
    /// work-notes list, so a new ticket is a receipt and an agent's copy,
    /// and a reply an agent's copy). `--nocapture` prints the counts;
    /// the bounds keep them from growing back unseen.
    #[test]
    fn on_postgres_each_kind_of_message_costs_a_known_number_of_round_trips() {
        let Some((location, rt)) = postgres_runtime(
            "language = \"en\"\n",
            "\
             [auto]\nmax_per_address_per_hour = 1000000\n\
             max_per_address_per_day = 1000000\nmax_resends_per_ticket_hour = 1000000\n\
             [[agents]]\nname = \"Jane Agent\"\nemail = \"jane.agent@example.org\"\n\
             default_notes_list = true\n",
        ) else {
            return;
        };
        let mut conn = store::connect(&location, store::Durability::Full).unwrap();
        let mut number = String::new();
        let cost = |conn: &mut Db, job: Job| {
            let before = conn.round_trips();
            let done = write_batch(conn, &rt, &[job]);
            match &done[..] {
                [Done::Message(outcome)] => {
                    assert_eq!(outcome.verdict, Verdict::Stored);
                    (conn.round_trips() - before, outcome.clone())
                }
                _ => unreachable!("one message, one outcome"),
            }
        };
        let mut costs = Vec::new();
        // Twice each: the first prepares its statements.
        for round in ["warm", "count"] {
            let (new, outcome) = cost(&mut conn, message(&format!("new-{round}"), "Printer"));
            // A receipt and the agent's copy, on a ticket of its own.
            assert_eq!((outcome.decision, outcome.queued), ("comment", 2));
            assert_ne!(outcome.ticket.as_ref(), Some(&number));
            number = outcome.ticket.unwrap();
            let (reply, outcome) = cost(
                &mut conn,
                Job::Message {
                    arrival: arrival_from(
                        &format!("new-{round}"),
                        &format!("reply-{round}"),
                        &format!("Re: [{number}] Printer"),
                    ),
                    reply: oneshot::channel().0,
                },
            );
            assert_eq!((outcome.decision, outcome.queued), ("comment", 1));
            let (duplicate, outcome) = cost(
                &mut conn,
                Job::Message {
                    arrival: arrival_from(
                        &format!("new-{round}"),
                        &format!("reply-{round}"),
                        &format!("Re: [{number}] Printer"),
                    ),
                    reply: oneshot::channel().0,
                },
            );
            assert_eq!(outcome.decision, "duplicate");
            costs = vec![
                ("new ticket", new),
                ("reply", reply),
                ("duplicate", duplicate),
            ];
        }
        eprintln!("round trips, each with BEGIN and COMMIT: {costs:?} ({number})");
        for ((kind, trips), most) in costs.into_iter().zip([18, 13, 6]) {
            assert!(
                trips <= most,
                "a {kind} costs {trips} round trips, more than {most}"
            );
        }
    }

    #[test]
    fn the_writer_commits_without_syncing_and_the_wal_it_syncs_is_the_one_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("log.db");
        let conn = Db::Sqlite(store::open(&db).unwrap());
        let mut wal = WalFile::take_over_syncs(&conn).unwrap();
        let conn = conn.sqlite().unwrap();
        assert_eq!(synchronous(conn), 1, "NORMAL");
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        wal.sync().unwrap();
        let first = wal.open.as_ref().map(|(_, inode)| *inode).unwrap();

        // Another WAL at the same path (SQLite deleted and made it anew).
        let path = dir.path().join("log.db-wal");
        std::fs::rename(&path, dir.path().join("old-wal")).unwrap();
        std::fs::write(&path, b"").unwrap();
        wal.sync().unwrap();
        let second = wal.open.as_ref().map(|(_, inode)| *inode).unwrap();
        assert_ne!(first, second);

        // No WAL to sync is an error: the batch is not answered 250.
        std::fs::remove_file(&path).unwrap();
        assert!(wal.sync().is_err());
    }

    #[test]
    fn without_a_wal_the_writer_keeps_syncing_each_commit_itself() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Db::Sqlite(store::open(&dir.path().join("log.db")).unwrap());
        let sqlite = conn.sqlite().unwrap();
        sqlite
            .pragma_update(None, "journal_mode", "DELETE")
            .unwrap();
        let mut wal = WalFile::take_over_syncs(&conn).unwrap();
        let conn = sqlite;
        assert_eq!(synchronous(conn), 2, "FULL");
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        wal.sync().unwrap();
        assert!(wal.open.is_none());
    }
}
