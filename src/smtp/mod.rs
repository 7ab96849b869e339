//! Receive: the embedded SMTP listener.
//!
//! A tokio accept loop; each session is driven by smtp-proto's parser. The
//! session owns the protocol (limits, pipelining, dot-stuffing, timeouts);
//! what to do with a finished message is the [`Deliver`] implementation's
//! business, and its [`Verdict`] becomes the reply to DATA.
//!
//! [`run`] takes a listener that is already bound, so the daemon and the
//! tests run the same code (the daemon binds before it reports ready, the
//! tests bind `127.0.0.1:0`). Files: `session` (the read/answer loop),
//! `command` (dispatch), one file per verb (`ehlo`, `mail`, `rcpt`), `data`
//! (DATA with its limits), `tls` (certificates), `replies` (every reply).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

mod clients;
mod command;
mod data;
mod ehlo;
mod mail;
mod rcpt;
pub mod replies;
mod session;
mod tls;

pub use data::MAX_DATA_LINE;
pub use session::MAX_COMMAND_LINE;
pub use tls::{load_tls, TlsError};

use clients::{ClientSlot, Clients};
use session::{Next, Session};

/// The envelope is a noun every stage reads (the rules believe a From by
/// its peer), so it lives in `helpdesk`; the listener fills it.
pub use crate::helpdesk::Envelope;

/// What became of a message handed over at the end of DATA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Durably committed (or quarantined, or recorded as a duplicate): `250`.
    Stored,
    /// Refused by policy: `550 5.7.1` followed by this sentence.
    Refused(String),
    /// Could not be committed: `451 4.3.0`, the client retries.
    TempFailure,
    /// The sender could not be verified (a DNS failure during crmgate's
    /// own SPF/DKIM check): `451 4.4.3`, nothing stored, the client retries.
    AuthTempFailure,
}

/// The stage after the listener: takes a whole message and says what became of it.
pub trait Deliver: Send + Sync + 'static {
    /// Is this RCPT address one crmgate accepts (a CRM address, with or
    /// without `+tag`, or postmaster)?
    fn accepts_recipient(&self, address: &str) -> bool;

    /// Store one message. Must not return `Stored` before the commit is durable.
    fn deliver(&self, envelope: Envelope, raw: Vec<u8>) -> impl Future<Output = Verdict> + Send;
}

/// The listener's limits and identity, fixed for the life of the daemon.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Named in the greeting and the EHLO reply.
    pub hostname: String,
    /// Advertised as SIZE; a larger message is refused `552 5.3.4`.
    pub max_message_bytes: usize,
    /// Accepted RCPTs per transaction; beyond, `452 4.5.3`.
    pub max_recipients: usize,
    /// Concurrent sessions; beyond, the connection is answered `421 4.7.0`
    /// and closed, so a flood cannot exhaust memory or file descriptors.
    pub max_sessions: usize,
    /// Concurrent sessions from one client (one IPv4 address, one IPv6
    /// /64); beyond, `421 4.7.0`, so that one host cannot take every slot.
    pub max_sessions_per_client: usize,
    /// Clients exempt from `max_sessions_per_client`: the trusted relays,
    /// through which all mail arrives from one address.
    pub exempt_clients: Vec<ipnet::IpNet>,
    /// How long the session waits for the next command (and for the client
    /// to read a reply) before `421 4.4.2`.
    pub idle_timeout: Duration,
    /// Command lines per session (STARTTLS included) before `421 4.7.0`:
    /// a client that never sends a message cannot hold a slot forever.
    pub max_commands: usize,
    /// How long one read may wait during DATA.
    pub data_timeout: Duration,
    /// How long the whole DATA may take: a client that trickles a byte
    /// before each `data_timeout` would otherwise keep its session forever.
    pub data_deadline: Duration,
    /// How long [`run`] waits, once stopped, for sessions to finish the
    /// transaction in flight before dropping them.
    pub shutdown_grace: Duration,
    /// STARTTLS is offered only when set (see [`load_tls`]).
    pub tls: Option<Arc<ServerConfig>>,
    /// Sessions open, replies by code, accept latency: the daemon's own.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Settings {
    /// The listener's settings from the checked configuration. TLS is left
    /// unset: loading the certificate is [`load_tls`]'s job, so that its
    /// errors are reported on their own.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            hostname: config.gateway.hostname.clone(),
            max_message_bytes: config.smtp.max_message_bytes,
            max_recipients: config.smtp.max_recipients,
            max_sessions: config.smtp.max_sessions,
            max_sessions_per_client: config.smtp.max_sessions_per_client,
            exempt_clients: config.security.trusted_relays.clone(),
            // RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes.
            idle_timeout: Duration::from_secs(5 * 60),
            // About 3,000 messages of MAIL, RCPT, DATA: enough for an MTA that
            // reuses its connection, bounded for one that never sends one.
            max_commands: 10_000,
            // RFC 5321 §4.5.3.2.6: 3 minutes per data block; we are lenient.
            data_timeout: Duration::from_secs(5 * 60),
            data_deadline: Duration::from_secs(10 * 60),
            shutdown_grace: Duration::from_secs(30),
            tls: None,
            metrics: Arc::default(),
        }
    }
}

/// Serves SMTP on `listener` until `shutdown` is cancelled.
///
/// One task per session. On shutdown the listener stops accepting; sessions
/// between transactions are answered `421 4.3.0`, a session in the middle
/// of one may finish it (its DATA is delivered and answered) before it gets
/// the `421`. `run` returns once every session has ended, or after
/// [`Settings::shutdown_grace`], dropping the sessions still running (their
/// clients retry: nothing was answered `250` that was not stored).
///
/// # Errors
///
/// None in practice: failed accepts (a client that vanished, a full file
/// descriptor table) are logged and the loop carries on. The `Result` is
/// kept so the daemon can treat the listener like its other tasks.
pub async fn run<D: Deliver>(
    listener: TcpListener,
    settings: Arc<Settings>,
    deliver: Arc<D>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(settings.max_sessions));
    let clients = Clients::new(
        settings.max_sessions_per_client,
        settings.exempt_clients.clone(),
    );
    let mut sessions = JoinSet::new();
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default();
    let next_session = AtomicU64::new(1);
    if let Ok(address) = listener.local_addr() {
        info!(%address, "SMTP listener ready");
    }

    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(ended) = sessions.join_next(), if !sessions.is_empty() => {
                if let Err(error) = ended {
                    warn!(%error, "SMTP session task failed");
                }
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: wait a little rather than spin.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };

        let id = format!("{epoch:x}.{}", next_session.fetch_add(1, Ordering::Relaxed));
        let span = tracing::info_span!("smtp", %peer, session = %id);
        let Some(client) = clients.admit(peer.ip()) else {
            sessions.spawn(
                refuse(
                    stream,
                    settings.idle_timeout,
                    "too many sessions from this client",
                )
                .instrument(span),
            );
            continue;
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let session = Session::new(
                    settings.clone(),
                    deliver.clone(),
                    shutdown.clone(),
                    peer,
                    id,
                );
                let metrics = settings.metrics.clone();
                metrics.session_opened();
                sessions.spawn(
                    async move {
                        connection(stream, session, (slot, client)).await;
                        metrics.session_closed();
                    }
                    .instrument(span),
                );
            }
            Err(_) => {
                sessions.spawn(
                    refuse(stream, settings.idle_timeout, "too many sessions").instrument(span),
                );
            }
        }
    }

    drop(listener);
    let remaining = sessions.len();
    if remaining > 0 {
        info!(remaining, "waiting for SMTP sessions to finish");
    }
    let drained = tokio::time::timeout(settings.shutdown_grace, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            remaining = sessions.len(),
            "dropping SMTP sessions still running after the grace period"
        );
        sessions.shutdown().await;
    }
    Ok(())
}

/// Beyond `max_sessions` or `max_sessions_per_client`: answer `421 4.7.0`
/// and close, without reading.
async fn refuse(mut stream: TcpStream, limit: Duration, why: &'static str) {
    debug!(why);
    let mut out = Vec::new();
    replies::REPLY_TOO_MANY_SESSIONS.write_to(&mut out);
    let _ = tokio::time::timeout(limit, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

/// One connection from greeting to close, through STARTTLS if asked.
async fn connection<D: Deliver>(
    mut stream: TcpStream,
    mut session: Session<D>,
    _slots: (OwnedSemaphorePermit, ClientSlot),
) {
    debug!("session opened");
    let outcome = async {
        if !session.greet(&mut stream).await? {
            return Ok(Next::Close);
        }
        session.serve(&mut stream).await
    }
    .await;

    match outcome {
        Ok(Next::Close) => {
            let _ = stream.shutdown().await;
        }
        Ok(Next::StartTls) => starttls(stream, session).await,
        Err(error) => debug!(%error, "session ended"),
    }
    debug!("session closed");
}

/// The TLS handshake, then the rest of the session inside TLS.
async fn starttls<D: Deliver>(stream: TcpStream, mut session: Session<D>) {
    let Some(config) = session.settings.tls.clone() else {
        return;
    };
    let handshake = TlsAcceptor::from(config).accept(stream);
    let mut stream = match tokio::time::timeout(session.settings.idle_timeout, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            debug!(%error, "TLS handshake failed");
            return;
        }
        Err(_elapsed) => {
            debug!("TLS handshake timed out");
            return;
        }
    };
    debug!("TLS established");
    session.reset_for_tls();
    match session.serve(&mut stream).await {
        // STARTTLS inside TLS is refused, so only Close comes back here.
        Ok(_) => {
            let _ = stream.shutdown().await;
        }
        Err(error) => debug!(%error, "session ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn settings_take_the_smtp_section_and_leave_tls_to_load_tls() {
        let config = Config::from_toml(
            "[gateway]\nhostname = \"mx.example.org\"\n\
             [smtp]\nmax_message_bytes = 1000\nmax_recipients = 7\nmax_sessions = 9\n",
            "test",
        )
        .unwrap();
        let settings = Settings::from_config(&config);
        assert_eq!(settings.hostname, "mx.example.org");
        assert_eq!(settings.max_message_bytes, 1000);
        assert_eq!(settings.max_recipients, 7);
        assert_eq!(settings.max_sessions, 9);
        assert_eq!(settings.max_sessions_per_client, 20);
        assert_eq!(settings.exempt_clients.len(), 2);
        assert_eq!(settings.data_deadline, Duration::from_secs(600));
        assert_eq!(settings.idle_timeout, Duration::from_secs(300));
        assert!(settings.tls.is_none());
    }
}
