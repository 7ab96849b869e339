//! Daemon: starts the writer, the relay worker and the SMTP listener, and
//! stops them in order.
//!
//! [`serve`] takes a listener that is already bound, so the tests start the
//! very code the binary runs on `127.0.0.1:0`. SIGTERM (or SIGINT) stops
//! accepting, lets the sessions in flight finish, lets the relay worker
//! finish the message it is sending, and returns. SIGHUP re-reads the
//! configuration file: the agents list (former agents leave every
//! work-notes list) and the templates change without dropping a
//! connection; the listen address, the database and the relay need a restart.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::Health;
use crate::intake::{Intake, Runtime};
use crate::metrics::{Metrics, RelayResult};
use crate::store::{self, tickets};
use crate::writer::Writer;

/// Run the daemon until SIGTERM/SIGINT: the `crmgate serve` command.
///
/// # Errors
/// The configuration, the database or the listen address cannot be used.
pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(config.smtp.listen)
            .await
            .with_context(|| format!("smtp.listen: cannot listen on {}", config.smtp.listen))?;
        let shutdown = CancellationToken::new();
        let config_path = reload_path(&config);
        let reload = Arc::new(Notify::new());
        spawn_signals(shutdown.clone(), reload.clone())?;
        serve(
            config,
            listener,
            shutdown,
            Some((config_path, reload)),
            true,
        )
        .await
    })
}

/// The file SIGHUP re-reads: where this configuration came from.
fn reload_path(config: &Config) -> Option<PathBuf> {
    (config.origin != "embedded default").then(|| PathBuf::from(&config.origin))
}

fn spawn_signals(shutdown: CancellationToken, reload: Arc<Notify>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); shutdown.cancel(); break; }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); shutdown.cancel(); break; }
                _ = hup.recv() => { tracing::info!("SIGHUP: reloading"); reload.notify_one(); }
            }
        }
    });
    Ok(())
}

/// Serve on a bound listener until `shutdown` is cancelled.
///
/// `reload`: the configuration file and the signal to re-read it.
/// `notify_systemd`: tell systemd we are ready once the listener is up.
///
/// # Errors
/// The database cannot be opened, or a part stops with an error.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    reload: Option<(Option<PathBuf>, Arc<Notify>)>,
    notify_systemd: bool,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let location = store::Location::of(&config);
    // Off tokio's threads: the PostgreSQL client runs a runtime of its
    // own, which may be neither made, used nor dropped on them.
    let (conns, first) = {
        let (location, config) = (location.clone(), config.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<store::Db>, Runtime)> {
            let conn = store::connect(&location, store::Durability::Full)
                .with_context(|| format!("opening {location}"))?;
            let removed = tickets::sync_agents(&conn, &config.agents, store::now())?;
            if !removed.is_empty() {
                tracing::info!(?removed, "former agents taken off every work-notes list");
            }
            if let Some(sqlite) = conn.sqlite() {
                store::tune_for_writer(sqlite)?;
            }
            let mut first = Runtime::new(config.clone())?;
            first.load_former_agents(&conn)?;
            if conn.is_postgres() {
                match store::outbox::name_instance(&config.gateway.state_dir) {
                    Ok(instance) => {
                        let released =
                            store::outbox::release_former_leases(&conn, instance, store::now())?;
                        if released > 0 {
                            tracing::info!(
                                released,
                                instance,
                                "outgoing rows leased by this instance's former run taken back"
                            );
                        }
                    }
                    // Its rows wait for their leases to run out, as another
                    // instance's would.
                    Err(e) => tracing::warn!(
                        error = %e,
                        state_dir = %config.gateway.state_dir.display(),
                        "cannot name this instance after its state directory: \
                         after a restart, the rows it had leased wait 60 s"
                    ),
                }
            }
            let mut conns = vec![conn];
            if matches!(location, store::Location::Postgres { .. }) {
                while conns.len() < crate::writer::POSTGRES_WRITERS {
                    conns.push(
                        store::connect(&location, store::Durability::Full)
                            .with_context(|| format!("opening {location} for another writer"))?,
                    );
                }
            }
            Ok((conns, first))
        })
        .await??
    };
    let runtime = Arc::new(RwLock::new(Arc::new(first)));
    let wake = Arc::new(Notify::new());
    let progress = Arc::new(store::CheckpointProgress::default());
    let metrics = Arc::new(Metrics::new());
    let writer = Writer::spawn(
        conns,
        runtime.clone(),
        wake.clone(),
        progress.clone(),
        metrics.clone(),
    )
    .context("starting the writer thread")?;
    let writers = writer.threads();
    let health = Arc::new(Health::new(location.clone(), writer.clone()));

    let mut settings = crate::smtp::Settings::from_config(&config);
    settings.metrics = metrics.clone();
    if let Some(files) = &config.smtp.tls {
        settings.tls = Some(
            crate::smtp::load_tls(&files.cert, &files.key)
                .context("smtp.tls_cert / smtp.tls_key")?,
        );
    }
    // The relay worker's outcomes go through the writers' queue too: on
    // SQLite one writer, so neither waits for the other's lock.
    let (marks, mut marks_in) = tokio::sync::mpsc::channel::<crate::store::outbox::MarkRequest>(16);
    let marks_writer = writer.clone();
    let relay_metrics = metrics.clone();
    tokio::spawn(async move {
        while let Some(request) = marks_in.recv().await {
            count_attempts(&relay_metrics, &request);
            marks_writer.record_marks(request).await;
        }
    });
    let verifier = if config.auth.verify {
        Some(
            crate::auth::Verifier::new(
                &config.auth.dns_servers,
                config.auth.dns_timeout,
                &config.gateway.hostname,
            )
            .context("[auth] verify needs a resolver: set auth.dns_servers")?,
        )
    } else {
        None
    };
    let intake = Arc::new(Intake {
        runtime: runtime.clone(),
        writer,
        verifier,
    });

    let relay = tokio::spawn(supervise_relay(
        config.clone(),
        location.clone(),
        wake.clone(),
        shutdown.clone(),
        failure_hook(runtime.clone()),
        marks,
        health.clone(),
    ));

    if let Some((path, signal)) = reload {
        let runtime = runtime.clone();
        let location = location.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = signal.notified() => {
                        let (path, runtime, location) = (path.clone(), runtime.clone(), location.clone());
                        let _ = tokio::task::spawn_blocking(move || {
                            reload_runtime(path.as_deref(), &runtime, &location);
                        })
                        .await;
                    }
                }
            }
        });
    }

    // PostgreSQL checkpoints by itself.
    let checkpointer = match &location {
        store::Location::Sqlite(path) => Some(spawn_checkpointer(
            path.clone(),
            progress,
            shutdown.clone(),
        )?),
        store::Location::Postgres { .. } => None,
    };

    if let Some(address) = config.metrics.listen {
        let http = TcpListener::bind(address)
            .await
            .with_context(|| format!("metrics.listen: cannot listen on {address}"))?;
        tracing::info!(
            "metrics: GET /metrics and /healthz on http://{}",
            http.local_addr()?
        );
        tokio::spawn(crate::metrics::serve_http(
            http,
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(
        configuration = %config.origin,
        database = %location,
        agents = config.agents.len(),
        relay = %config.raw.relay.url,
        listen = %listener.local_addr()?,
        "crmgate ready: configuration {}, database {}, {} agent(s), relay {}, SMTP on {}",
        config.origin,
        location,
        config.agents.len(),
        config.raw.relay.url,
        listener.local_addr()?
    );
    health.listener.store(true, Ordering::Relaxed);
    if notify_systemd {
        // Not under systemd this is a no-op.
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tokio::spawn(crate::health::watchdog(health.clone(), shutdown.clone()));
    }
    let listened = crate::smtp::run(listener, Arc::new(settings), intake, shutdown.clone()).await;
    health.listener.store(false, Ordering::Relaxed);
    shutdown.cancel();
    if let Err(e) = relay.await {
        tracing::error!(error = %e, "relay supervisor panicked");
    }
    // The sessions and the relay worker are done: once the health checks
    // let go of the last handle, every writer commits what its queue holds
    // and ends.
    drop(health);
    if !writers.ended(WRITERS_END_WITHIN).await {
        tracing::warn!("a database writer has not ended: its last batch may be lost");
    }
    if let Some(checkpointer) = checkpointer {
        let _ = checkpointer.join();
    }
    let pending = tokio::task::spawn_blocking(move || {
        store::connect(&location, store::Durability::Full)
            .and_then(|conn| store::outbox::queued_count(&conn))
    })
    .await;
    if let Ok(Ok(pending)) = pending {
        if pending > 0 {
            tracing::info!(pending, "stopped; queued mail is sent at the next start");
        } else {
            tracing::info!("stopped; the outbox is empty");
        }
    }
    listened.context("SMTP listener")?;
    Ok(())
}

/// How long shutdown waits for the writers to commit their last batches
/// (one batch is a few hundred milliseconds at most).
const WRITERS_END_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the supervisor waits before starting a relay worker that
/// stopped with an error or panicked.
const RELAY_RESTART_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Keep a relay worker running until shutdown. The listener keeps taking
/// mail whatever happens here, so a worker that stops with an error or
/// panics (a database it cannot open, a bug in a dependency) would leave
/// the outbox growing in silence: it is logged at once and started again.
async fn supervise_relay(
    config: Arc<Config>,
    location: store::Location,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    on_failed: crate::relay::FailureHook,
    marks: tokio::sync::mpsc::Sender<crate::store::outbox::MarkRequest>,
    health: Arc<Health>,
) {
    let start = || {
        let worker = crate::relay::run_with(
            config.clone(),
            location.clone(),
            wake.clone(),
            shutdown.clone(),
            on_failed.clone(),
            Some(marks.clone()),
        );
        let health = health.clone();
        async move {
            let _running = RelayRunning::new(health);
            worker.await
        }
    };
    supervise("relay worker", &shutdown, RELAY_RESTART_AFTER, start).await;
}

/// `Health::relay` is true while a relay worker runs: set when it starts,
/// cleared when it ends, returns an error or panics.
struct RelayRunning(Arc<Health>);

impl RelayRunning {
    fn new(health: Arc<Health>) -> RelayRunning {
        health.relay.store(true, Ordering::Relaxed);
        RelayRunning(health)
    }
}

impl Drop for RelayRunning {
    fn drop(&mut self) {
        self.0.relay.store(false, Ordering::Relaxed);
    }
}

/// One relay attempt per row whose outcome the worker reports.
fn count_attempts(metrics: &Metrics, request: &crate::store::outbox::MarkRequest) {
    use crate::store::outbox::Disposition;
    for (_, disposition) in &request.settled {
        metrics.relay_attempt(match disposition {
            Disposition::Sent => RelayResult::Sent,
            Disposition::Retry { .. } => RelayResult::Retry,
            Disposition::Failed { .. } => RelayResult::Failed,
        });
    }
}

/// Run the task `start` makes until it returns `Ok` or `shutdown` is
/// cancelled; after an error or a panic, log it and start it again.
/// Returns how many times it was started.
async fn supervise<F, Fut, E>(
    what: &str,
    shutdown: &CancellationToken,
    restart_after: std::time::Duration,
    mut start: F,
) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let mut starts = 0;
    loop {
        starts += 1;
        let why = match tokio::spawn(start()).await {
            Ok(Ok(())) => return starts,
            Ok(Err(e)) => format!("stopped with an error: {e}"),
            Err(e) => format!("panicked: {e}"),
        };
        if shutdown.is_cancelled() {
            tracing::error!(error = %why, "{what}");
            return starts;
        }
        tracing::error!(
            error = %why,
            restart_in_s = restart_after.as_secs_f64(),
            "{what}; queued work waits for the restart"
        );
        tokio::select! {
            () = shutdown.cancelled() => return starts,
            () = tokio::time::sleep(restart_after) => {}
        }
    }
}

/// How often the checkpointer copies the WAL back into the database file
/// while nothing is written.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// How often while the WAL grows: under load the writer commits a few
/// hundred frames in this time, and its own checkpoint
/// ([`store::finish_checkpoint`]) then only has the last ones to copy.
const CHECKPOINT_EVERY_UNDER_LOAD: std::time::Duration = std::time::Duration::from_millis(10);

/// WAL frames written since the last look that mean "under load" (a few
/// messages' worth): at a trickle the checkpointer keeps its slow pace.
const LOAD_FRAMES: i64 = 64;

/// Frames written between two looks at the WAL's size: after the writer
/// started it over, all of it is new.
fn wal_growth(last: Option<i64>, now: i64) -> i64 {
    match last {
        Some(last) if now >= last => now - last,
        Some(_) => now,
        None => 0,
    }
}

/// Checkpoints on a thread of their own, so the writer's commits seldom pay
/// for one: the writer's own checkpoints ([`store::finish_checkpoint`])
/// only catch the last frames this one could not, so the WAL starts over.
/// Under load the writer is the daemon's narrowest point: each page this
/// thread copies is one the writer need not (`bench/README.md` has the
/// measurements).
fn spawn_checkpointer(
    db_path: PathBuf,
    progress: Arc<store::CheckpointProgress>,
    shutdown: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let conn = store::open(&db_path)?;
    Ok(std::thread::Builder::new()
        .name("crmgate-checkpoint".into())
        .spawn(move || {
            let mut last_size = None;
            let mut pause = CHECKPOINT_EVERY;
            while !shutdown.is_cancelled() {
                std::thread::sleep(pause);
                match store::checkpoint(&conn, Some(&progress)) {
                    Ok(size) => {
                        pause = if wal_growth(last_size, size) >= LOAD_FRAMES {
                            CHECKPOINT_EVERY_UNDER_LOAD
                        } else {
                            CHECKPOINT_EVERY
                        };
                        last_size = Some(size);
                    }
                    Err(e) => tracing::warn!(error = %e, "checkpoint failed; trying again"),
                }
            }
            // A last one, so a stopped daemon leaves a short WAL.
            let _ = store::checkpoint(&conn, None);
        })?)
}

fn reload_runtime(
    path: Option<&std::path::Path>,
    runtime: &Arc<RwLock<Arc<Runtime>>>,
    location: &store::Location,
) {
    let Some(path) = path else {
        tracing::info!("running on the embedded default: nothing to reload");
        return;
    };
    let result = (|| -> anyhow::Result<()> {
        let config = Config::load(Some(path))?;
        let running = match runtime.read() {
            Ok(guard) => guard.config.clone(),
            Err(poisoned) => poisoned.into_inner().config.clone(),
        };
        for key in restart_only_changes(&running, &config) {
            tracing::warn!(
                key,
                "SIGHUP: {key} changed, but only a restart applies it; the running value stays"
            );
        }
        let mut new = Runtime::new(Arc::new(config))?;
        let conn = store::connect(location, store::Durability::Full)?;
        let removed = tickets::sync_agents(&conn, &new.config.agents, store::now())?;
        new.load_former_agents(&conn)?;
        tracing::info!(
            agents = new.config.agents.len(),
            ?removed,
            "configuration reloaded"
        );
        match runtime.write() {
            Ok(mut guard) => *guard = Arc::new(new),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(new),
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::error!(error = %format!("{e:#}"), "reload refused; the running configuration stays");
    }
}

/// The keys whose new value a reload does not apply: the sockets, the
/// database, the relay and the log are set up once, at start.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&running.raw, &new.raw);
    let mut changed = Vec::new();
    let mut check = |key: &'static str, differ: bool| {
        if differ {
            changed.push(key);
        }
    };
    check("smtp.listen", a.smtp.listen != b.smtp.listen);
    check("smtp.tls_cert", a.smtp.tls_cert != b.smtp.tls_cert);
    check("smtp.tls_key", a.smtp.tls_key != b.smtp.tls_key);
    check(
        "gateway.state_dir",
        a.gateway.state_dir != b.gateway.state_dir,
    );
    check("relay.url", a.relay.url != b.relay.url);
    check("relay.username", a.relay.username != b.relay.username);
    check(
        "relay.password_file",
        a.relay.password_file != b.relay.password_file,
    );
    check("relay.ca_file", a.relay.ca_file != b.relay.ca_file);
    check("store.url", a.store.url != b.store.url);
    check(
        "store.password_file",
        a.store.password_file != b.store.password_file,
    );
    check("metrics.listen", a.metrics.listen != b.metrics.listen);
    check("log.format", a.log.format != b.log.format);
    changed
}

/// A permanent delivery failure: a system entry and a notice to the
/// work-notes list, in the transaction that marks the row failed (when
/// `decide::failure_notice` says one is due).
fn failure_hook(runtime: Arc<RwLock<Arc<Runtime>>>) -> crate::relay::FailureHook {
    Arc::new(move |conn, row, error| {
        let rt = match runtime.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let Some(ticket_id) = row.ticket_id else {
            return Ok(());
        };
        let view = tickets::view(conn, ticket_id)?;
        crate::apply::failure_notice(
            conn,
            &rt,
            &view,
            &row.kind,
            &row.recipients.join(", "),
            error,
            store::now(),
        )
        .map(|_told| ())
        .map_err(|e| store::StoreError::Invalid(e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn wal_growth_counts_from_zero_after_the_wal_started_over() {
        assert_eq!(wal_growth(None, 500), 0, "the first look says nothing");
        assert_eq!(wal_growth(Some(100), 400), 300);
        assert_eq!(wal_growth(Some(900), 120), 120, "started over");
        assert_eq!(wal_growth(Some(120), 120), 0, "idle");
    }

    #[tokio::test]
    async fn a_worker_that_fails_or_panics_is_started_again_until_it_ends() {
        let shutdown = CancellationToken::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let start = || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => Err("database locked"),
                    1 => panic!("a bug in a dependency"),
                    _ => Ok(()),
                }
            }
        };
        let pause = std::time::Duration::from_millis(5);
        let starts = supervise("test worker", &shutdown, pause, start).await;
        assert_eq!(starts, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn no_restart_after_shutdown() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let start = || async { Err::<(), _>("stopped") };
        let pause = std::time::Duration::from_secs(3600);
        assert_eq!(supervise("test worker", &shutdown, pause, start).await, 1);
    }
}
