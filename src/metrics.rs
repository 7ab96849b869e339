//! What an operator graphs and alerts on: the counters each stage moves
//! (messages by decision, SMTP replies by code, relay attempts by result),
//! the accept latency, and the outbox as the database sees it at scrape
//! time. [`serve_http`] answers `GET /metrics` (Prometheus text format) and
//! `GET /healthz` on `[metrics] listen`.
//!
//! One [`Metrics`] per daemon, handed to the stages that count, so two
//! daemons in one process (the tests) count apart. The hot path only adds
//! to atomics; nothing is read from the database until a scrape asks.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::store::outbox;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: u16,
}

/// How one attempt to send an outbox row ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayResult {
    Sent,
    Retry,
    Failed,
}

impl RelayResult {
    fn as_str(self) -> &'static str {
        match self {
            RelayResult::Sent => "sent",
            RelayResult::Retry => "retry",
            RelayResult::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// The daemon's counters and gauges.
pub struct Metrics {
    registry: Registry,
    messages: Family<DecisionLabel, Counter>,
    sessions: Gauge,
    replies: Family<CodeLabel, Counter>,
    accept: Histogram,
    relay_attempts: Family<ResultLabel, Counter>,
    outbox_rows: Family<StatusLabel, Gauge>,
    oldest_queued: Gauge<f64, AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let messages = Family::<DecisionLabel, Counter>::default();
        registry.register(
            "crmgate_messages",
            "Messages taken in, by the decision logged for them",
            messages.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "crmgate_smtp_sessions",
            "SMTP sessions open now",
            sessions.clone(),
        );
        let replies = Family::<CodeLabel, Counter>::default();
        registry.register(
            "crmgate_smtp_replies",
            "SMTP replies sent, by code",
            replies.clone(),
        );
        // 0.5 ms to about 16 s: a group commit is a millisecond or two, a
        // 25 MB message or a stalled disk seconds.
        let accept = Histogram::new([
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 15.0,
        ]);
        registry.register(
            "crmgate_accept_seconds",
            "From the end of DATA to the reply",
            accept.clone(),
        );
        let relay_attempts = Family::<ResultLabel, Counter>::default();
        registry.register(
            "crmgate_relay_attempts",
            "Attempts to send an outbox row, by result",
            relay_attempts.clone(),
        );
        let outbox_rows = Family::<StatusLabel, Gauge>::default();
        registry.register(
            "crmgate_outbox_rows",
            "Outbox rows queued or failed, at scrape time",
            outbox_rows.clone(),
        );
        let oldest_queued = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "crmgate_outbox_oldest_queued_seconds",
            "Age of the oldest queued outbox row (0: none queued)",
            oldest_queued.clone(),
        );
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("crmgate_build_info", "The running version", build_info);
        for status in ["queued", "failed"] {
            outbox_rows.get_or_create(&StatusLabel { status }).set(0);
        }
        Metrics {
            registry,
            messages,
            sessions,
            replies,
            accept,
            relay_attempts,
            outbox_rows,
            oldest_queued,
        }
    }

    /// One message taken in, with the word its log line carries.
    pub fn message(&self, decision: &'static str) {
        self.messages
            .get_or_create(&DecisionLabel { decision })
            .inc();
    }

    pub fn reply(&self, code: u16) {
        self.replies.get_or_create(&CodeLabel { code }).inc();
    }

    pub fn session_opened(&self) {
        self.sessions.inc();
    }

    pub fn session_closed(&self) {
        self.sessions.dec();
    }

    pub fn accepted_in(&self, elapsed: Duration) {
        self.accept.observe(elapsed.as_secs_f64());
    }

    pub fn relay_attempt(&self, result: RelayResult) {
        self.relay_attempts
            .get_or_create(&ResultLabel {
                result: result.as_str(),
            })
            .inc();
    }

    /// The text of `/metrics`, the outbox gauges set from `backlog` first.
    pub fn render(&self, backlog: &outbox::Backlog) -> String {
        self.outbox_rows
            .get_or_create(&StatusLabel { status: "queued" })
            .set(backlog.queued);
        self.outbox_rows
            .get_or_create(&StatusLabel { status: "failed" })
            .set(backlog.failed);
        self.oldest_queued.set(backlog.oldest_queued_seconds as f64);
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        text
    }
}

/// Bounds on one HTTP request: a scraper sends a few hundred bytes at once.
const REQUEST_LIMIT: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Answer `GET /metrics` and `GET /healthz` on `listener` until shutdown:
/// HTTP/1.0, one request per connection, which is all a scraper and a
/// health checker need.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &metrics, &health)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics, health: &Health) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && !request.windows(2).any(|w| w == b"\n\n")
    {
        let n = stream.read(&mut buf).await?;
        if n == 0 || request.len() + n > REQUEST_LIMIT {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            let backlog = health.backlog().await;
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.render(&backlog),
            )
        }
        ("GET", "/healthz") => match health.check().await {
            Ok(()) => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_string()),
            Err(reason) => (
                "503 Service Unavailable",
                "text/plain; charset=utf-8",
                format!("{reason}\n"),
            ),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only /metrics and /healthz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET only\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
