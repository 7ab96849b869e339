//! Whether the daemon works, for `/healthz` and systemd's watchdog: the
//! SMTP listener runs, the writer thread answers, the relay worker runs,
//! and (for `/healthz`) the database takes a write.
//!
//! The writer is asked, not watched: a ping goes through its queue and its
//! transaction like any job (an empty set of relay marks), so a writer
//! stuck on a lock, a disk or a bug stops answering and the pings to
//! systemd stop with it. On PostgreSQL several writers share that queue
//! and a ping reaches one of them: each of the others is watched too, so
//! one that ended or is stuck in a batch is seen ([`Writer::all_running`]).
//!
//! The database is asked on a connection of the probes' own. A SQLite file
//! is opened anew each time (a kept one would go on answering for a file
//! that was removed); a PostgreSQL connection is kept between probes, since
//! each new one is a backend process, an authentication and perhaps a TLS
//! handshake, every few seconds, for as long as the daemon runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::outbox::{self, Backlog, MarkRequest};
use crate::store::{Db, Location, StoreError};
use crate::writer::Writer;

/// How long the writer may take to answer a ping.
pub const WRITER_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The parts a health check asks about; the daemon sets the flags.
pub struct Health {
    location: Location,
    /// The probes' PostgreSQL connection, once one has answered.
    kept: Arc<std::sync::Mutex<Option<Db>>>,
    writer: Writer,
    /// The SMTP accept loop runs.
    pub listener: AtomicBool,
    /// A relay worker runs (not waiting to be started again after an error).
    pub relay: AtomicBool,
}

impl Health {
    pub fn new(location: Location, writer: Writer) -> Health {
        Health {
            location,
            kept: Arc::new(std::sync::Mutex::new(None)),
            writer,
            listener: AtomicBool::new(false),
            relay: AtomicBool::new(false),
        }
    }

    /// The listener, the writer and the relay worker all make progress.
    ///
    /// # Errors
    /// The first that does not, in words.
    pub async fn progress(&self, writer_within: Duration) -> Result<(), String> {
        if !self.listener.load(Ordering::Relaxed) {
            return Err("the SMTP listener is not running".into());
        }
        if !self.relay.load(Ordering::Relaxed) {
            return Err(
                "the relay worker is not running (it is started again after an error)".into(),
            );
        }
        self.ping_writer(writer_within).await?;
        self.writer.all_running(writer_within)
    }

    /// [`Health::progress`], and the database takes a write on a
    /// connection of its own: what `/healthz` answers.
    ///
    /// # Errors
    /// The reason, for the 503's body.
    pub async fn check(&self) -> Result<(), String> {
        self.progress(WRITER_ANSWER_WITHIN).await?;
        let probe = self.ask_database(outbox::can_write).await;
        match probe {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "the database {} cannot be written: {e}",
                self.location
            )),
            Err(e) => Err(format!("the database check failed: {e}")),
        }
    }

    /// The outbox for `/metrics`; zeros (and a warning) if it cannot be read.
    pub async fn backlog(&self) -> Backlog {
        let read = self
            .ask_database(|conn| outbox::backlog(conn, crate::store::now()))
            .await;
        match read {
            Ok(Ok(backlog)) => backlog,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "metrics: cannot read the outbox");
                Backlog::default()
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: the outbox read failed");
                Backlog::default()
            }
        }
    }

    /// `ask` on the probes' connection, on a blocking thread. A kept
    /// PostgreSQL connection that fails is dropped and `ask` put once more
    /// on a new one, so a server that restarted since the last probe is
    /// not reported down; a new connection that fails is the answer.
    async fn ask_database<T: Send + 'static>(
        &self,
        ask: fn(&Db) -> Result<T, StoreError>,
    ) -> Result<Result<T, StoreError>, tokio::task::JoinError> {
        let (location, kept) = (self.location.clone(), Arc::clone(&self.kept));
        tokio::task::spawn_blocking(move || {
            if let Location::Sqlite(_) = location {
                return outbox::connect_existing(&location).and_then(|conn| ask(&conn));
            }
            let mut kept = kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(conn) = kept.take() {
                if let Ok(answer) = ask(&conn) {
                    *kept = Some(conn);
                    return Ok(answer);
                }
            }
            let conn = outbox::connect_existing(&location)?;
            let answer = ask(&conn)?;
            *kept = Some(conn);
            Ok(answer)
        })
        .await
    }

    async fn ping_writer(&self, within: Duration) -> Result<(), String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ping = MarkRequest {
            settled: Vec::new(),
            now: crate::store::now(),
            on_failed: Arc::new(|_, _, _| Ok(())),
            reply,
        };
        let asked = async {
            self.writer.record_marks(ping).await;
            answer.await
        };
        match tokio::time::timeout(within, asked).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("the database writer failed: {e}")),
            Ok(Err(_)) => Err("the database writer has stopped".into()),
            Err(_) => Err(format!(
                "the database writer has not answered for {} s",
                within.as_secs()
            )),
        }
    }
}

/// Send `WATCHDOG=1` to systemd every half `WatchdogSec=` while
/// [`Health::progress`] holds; nothing when the unit sets no watchdog.
pub async fn watchdog(health: Arc<Health>, shutdown: CancellationToken) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    let mut failing = false;
    loop {
        let started = tokio::time::Instant::now();
        match health.progress(every).await {
            Ok(()) => {
                if failing {
                    tracing::info!("watchdog: every part makes progress again; pinging systemd");
                    failing = false;
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
            Err(reason) => {
                if !failing {
                    tracing::error!(%reason, "watchdog: no ping to systemd, which restarts crmgate if this lasts");
                    failing = true;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(started + every) => {}
        }
    }
}
