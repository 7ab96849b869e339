//! The SMTP side of the relay: one long-lived session with the relay host,
//! reused from message to message so a burst drains over one connection.
//!
//! lettre's high-level transport gives one answer per message and stops at
//! the first refused recipient, and its own sockets never set TCP_NODELAY
//! (each message then waits for Nagle and the peer's delayed ACK).
//! So this module opens the TCP connection itself, sets `nodelay`, hands it
//! to [`AsyncSmtpConnection::connect_with_transport`], and drives MAIL, RCPT
//! and DATA with lettre's command API, keeping one outcome per recipient.
//! lettre cannot pipeline and does not keep the PIPELINING keyword: one
//! more EHLO per session finds it, and then the envelope goes in one write
//! (to a distant relay, half the round trips a message).
//!
//! TLS trusts the web PKI roots plus `relay.ca_file`'s certificates, both
//! prepared once in [`SmtpRelay::new`]: rustls for `smtps://` over our own
//! socket, lettre's [`TlsParameters`] for STARTTLS. AUTH is sent only
//! inside TLS, except to a relay on loopback that offers no STARTTLS (and
//! never without TLS when the URL says `tls=required`).

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lettre::address::Address;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use super::RecipientOutcome;
use crate::config::RelayTls;

/// How long to wait for the TCP connection and TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for one reply; RFC 5321 §4.5.3.2 suggests minutes, and
/// the end of DATA may take a while on a relay that scans content.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// A session unused this long is closed: relays drop idle clients anyway
/// (Postfix after 300 s), and an idle socket holds a slot on theirs.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The session could not be used at all (connect, greeting, EHLO, TLS,
/// AUTH, or the connection dropped mid-transaction): the message is
/// deferred, and so is every other message of the batch, since the relay
/// is the problem, not the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionFailure {
    Down(String),
    /// Shutdown came while connecting: nothing was sent, nothing to record.
    Interrupted,
}

/// Where and how to reach the relay; see [`crate::config::RelayTarget::Smtp`].
pub(crate) struct SmtpRelay {
    host: String,
    port: u16,
    tls: RelayTls,
    /// Built once: the roots are not re-read or re-parsed per connection.
    client_tls: ClientTls,
    hello: ClientId,
    /// Username and the file whose first line is the password; the file is
    /// read at each connection so an operator can rotate it without a restart.
    credentials: Option<(String, PathBuf)>,
    session: Option<Session>,
}

struct Session {
    conn: AsyncSmtpConnection,
    /// The relay offered PIPELINING in its last EHLO reply.
    pipelining: bool,
    last_used: Instant,
}

/// The TLS client configurations, one per way of starting TLS; both trust
/// the same roots.
#[derive(Clone)]
struct ClientTls {
    /// `smtps://`: our own rustls handshake over our own nodelay socket.
    implicit: Arc<rustls::ClientConfig>,
    /// STARTTLS, which lettre performs; cloning it clones an `Arc`.
    starttls: TlsParameters,
}

impl ClientTls {
    /// # Errors
    /// A certificate rustls or lettre cannot take as a root (the
    /// configuration check already refused those, so this is unexpected).
    fn new(host: &str, extra_roots: &[CertificateDer<'static>]) -> Result<ClientTls, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let mut starttls = TlsParameters::builder(host.to_string());
        for certificate in extra_roots {
            roots
                .add(certificate.clone())
                .map_err(|e| format!("relay.ca_file: {e}"))?;
            let certificate = Certificate::from_der(certificate.to_vec())
                .map_err(|e| format!("relay.ca_file: {}", describe(&e)))?;
            starttls = starttls.add_root_certificate(certificate);
        }
        // tokio-rustls is built with the ring provider only: name it rather
        // than rely on a process-wide default that may not be installed.
        let implicit = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        // lettre's builder starts from the web PKI roots (its `webpki-roots`
        // feature) and adds ours, as the implicit configuration does.
        let starttls = starttls.build().map_err(|e| describe(&e))?;
        Ok(ClientTls {
            implicit: Arc::new(implicit),
            starttls,
        })
    }
}

/// A failed SMTP step: either a reply from the relay (the session goes on,
/// except for 421), or a broken session.
enum StepError {
    Reply { code: u16, text: String },
    Broken(String),
}

impl SmtpRelay {
    /// # Errors
    /// The TLS configuration cannot be built from `extra_roots`.
    pub(crate) fn new(
        host: String,
        port: u16,
        tls: RelayTls,
        extra_roots: &[CertificateDer<'static>],
        hostname: &str,
        credentials: Option<(String, PathBuf)>,
    ) -> Result<SmtpRelay, String> {
        Ok(SmtpRelay {
            client_tls: ClientTls::new(&host, extra_roots)?,
            host,
            port,
            tls,
            hello: ClientId::Domain(hostname.to_string()),
            credentials,
            session: None,
        })
    }

    /// Another relay like this one, without a session: a lane of the pool
    /// (the TLS configuration is shared, not built again).
    pub(crate) fn fresh(&self) -> SmtpRelay {
        SmtpRelay {
            host: self.host.clone(),
            port: self.port,
            tls: self.tls,
            client_tls: self.client_tls.clone(),
            hello: self.hello.clone(),
            credentials: self.credentials.clone(),
            session: None,
        }
    }

    /// Deliver one message, reusing the open session when there is one.
    ///
    /// # Errors
    /// [`SessionFailure::Down`] when the relay cannot be reached or the
    /// session breaks, [`SessionFailure::Interrupted`] when `shutdown` comes
    /// while connecting; replies to MAIL, RCPT and DATA are outcomes, not errors.
    pub(crate) async fn send(
        &mut self,
        mail_from: &str,
        recipients: &[String],
        message: &[u8],
        shutdown: &CancellationToken,
    ) -> Result<Vec<(String, RecipientOutcome)>, SessionFailure> {
        let body = wire_body(message);
        if let Some(session) = self.session.take() {
            let (mut conn, pipelining) = (session.conn, session.pipelining);
            match transaction(&mut conn, pipelining, mail_from, recipients, &body).await {
                Ok(outcomes) => {
                    self.keep(conn, pipelining);
                    return Ok(outcomes);
                }
                // The relay may have closed the idle session on its side
                // before we reused it: nothing was sent, start over once on
                // a fresh connection.
                Err(Failed::BeforeMail(_)) => abort(conn).await,
                Err(Failed::During(e)) => {
                    abort(conn).await;
                    return Err(e);
                }
            }
        }
        // Connecting to a relay that does not answer may take the whole
        // CONNECT_TIMEOUT: shutdown does not wait for it.
        let (mut conn, pipelining) = tokio::select! {
            conn = self.connect() => conn?,
            () = shutdown.cancelled() => return Err(SessionFailure::Interrupted),
        };
        match transaction(&mut conn, pipelining, mail_from, recipients, &body).await {
            Ok(outcomes) => {
                self.keep(conn, pipelining);
                Ok(outcomes)
            }
            Err(Failed::BeforeMail(e) | Failed::During(e)) => {
                abort(conn).await;
                Err(e)
            }
        }
    }

    fn keep(&mut self, conn: AsyncSmtpConnection, pipelining: bool) {
        if !conn.has_broken() {
            self.session = Some(Session {
                conn,
                pipelining,
                last_used: Instant::now(),
            });
        }
    }

    /// Close the session if it has been idle for [`IDLE_TIMEOUT`].
    pub(crate) async fn close_if_idle(&mut self) {
        if self
            .session
            .as_ref()
            .is_some_and(|s| s.last_used.elapsed() >= IDLE_TIMEOUT)
        {
            self.close().await;
        }
    }

    /// QUIT the session, if any (at shutdown, or when idle).
    pub(crate) async fn close(&mut self) {
        if let Some(mut session) = self.session.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), session.conn.quit()).await;
        }
    }

    /// Open a session: TCP (nodelay), TLS per the configuration, EHLO, AUTH.
    /// Also says whether the relay pipelines.
    async fn connect(&self) -> Result<(AsyncSmtpConnection, bool), SessionFailure> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            SessionFailure::Down(format!("{what} {}:{}: {e}", self.host, self.port))
        };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| fail("timed out connecting to", &"no answer"))?
        .map_err(|e| fail("cannot connect to", &e))?;
        tcp.set_nodelay(true)
            .map_err(|e| fail("cannot set TCP_NODELAY towards", &e))?;
        let loopback = tcp.peer_addr().is_ok_and(|a| a.ip().is_loopback());

        let stream: Box<dyn AsyncTokioStream> = match self.tls {
            RelayTls::Wrapper => {
                let config = Arc::clone(&self.client_tls.implicit);
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, wrap_tls(config, &self.host, tcp))
                    .await
                    .map_err(|_| fail("TLS handshake timed out with", &"no answer"))?
                    .map_err(|e| fail("TLS handshake failed with", &e))?;
                Box::new(tls)
            }
            RelayTls::Opportunistic | RelayTls::Required => Box::new(tcp),
        };
        let mut conn = tokio::time::timeout(
            REPLY_TIMEOUT,
            AsyncSmtpConnection::connect_with_transport(stream, &self.hello),
        )
        .await
        .map_err(|_| fail("no greeting from", &"timeout"))?
        .map_err(|e| fail("greeting or EHLO refused by", &describe(&e)))?;

        let starttls = match self.tls {
            RelayTls::Wrapper => false,
            RelayTls::Opportunistic => conn.can_starttls(),
            RelayTls::Required if conn.can_starttls() => true,
            RelayTls::Required => {
                abort(conn).await;
                return Err(fail(
                    "tls=required but STARTTLS is not offered by",
                    &"plain text refused",
                ));
            }
        };
        if starttls {
            let parameters = self.client_tls.starttls.clone();
            let upgraded =
                tokio::time::timeout(CONNECT_TIMEOUT, conn.starttls(parameters, &self.hello)).await;
            // No QUIT after a failure here: a failed (or cancelled) handshake
            // leaves lettre's connection without a stream, and writing to it
            // trips a debug assertion inside lettre. Dropping it closes the
            // socket, and a relay that refused STARTTLS sees a hang-up.
            match upgraded {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    drop(conn);
                    let reason = certificate_problem(&e).unwrap_or_else(|| describe(&e));
                    return Err(fail("STARTTLS failed with", &reason));
                }
                Err(_) => {
                    drop(conn);
                    return Err(fail("STARTTLS timed out with", &"no answer"));
                }
            }
        }
        let encrypted = starttls || self.tls == RelayTls::Wrapper;

        // lettre keeps only the EHLO keywords it uses itself, and PIPELINING
        // is not one of them: one more EHLO, once a session, read here. It
        // comes before AUTH (an EHLO after AUTH may log a client out).
        let pipelining = match step(conn.command(Ehlo::new(self.hello.clone()))).await {
            Ok(reply) => offers_pipelining(&reply),
            Err(StepError::Reply { .. }) => false,
            Err(StepError::Broken(e)) => {
                abort(conn).await;
                return Err(fail("EHLO failed with", &e));
            }
        };

        if let Some((username, password_file)) = &self.credentials {
            // With tls=required the checks above already made sure of TLS;
            // this says it where the password leaves. Plain `smtp://` to a
            // relay that offers no STARTTLS: no password in clear text over
            // a network (Postfix's `noplaintext` default), only to a relay
            // on loopback, where nobody but root can listen.
            if !encrypted && (self.tls == RelayTls::Required || !loopback) {
                abort(conn).await;
                return Err(fail(
                    "no password in clear text to",
                    &"the session is not encrypted (the relay offers no STARTTLS); \
                      use smtps:// or a relay that offers STARTTLS",
                ));
            }
            let password = read_password(password_file)
                .await
                .map_err(|e| fail("no password for", &e))?;
            let credentials = Credentials::new(username.clone(), password);
            let authed = tokio::time::timeout(
                REPLY_TIMEOUT,
                conn.auth(&[Mechanism::Plain, Mechanism::Login], &credentials),
            )
            .await;
            // A refused login is a session failure, hence a retry: the
            // operator fixes the password, the queue waits for it.
            let problem = match authed {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(describe(&e)),
                Err(_) => Some("timeout".to_string()),
            };
            if let Some(problem) = problem {
                abort(conn).await;
                return Err(fail("login refused by", &problem));
            }
        }
        Ok((conn, pipelining))
    }
}

/// Whether an EHLO reply lists PIPELINING (RFC 2920).
fn offers_pipelining(reply: &Response) -> bool {
    reply.message().skip(1).any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|keyword| keyword.eq_ignore_ascii_case("PIPELINING"))
    })
}

/// Why a transaction stopped before all its replies were in.
enum Failed {
    /// The session broke at MAIL: nothing was handed over yet.
    BeforeMail(SessionFailure),
    /// The session broke later, possibly after the message was sent.
    During(SessionFailure),
}

/// One SMTP transaction: MAIL, one RCPT per recipient, DATA, the message.
/// Each recipient ends `Delivered`, `Deferred` (4xx) or `Refused` (5xx).
/// To a relay that pipelines, MAIL, the RCPTs and DATA go in one write
/// (RFC 2920): two round trips a message instead of three and one per
/// recipient, for the relay as for us.
async fn transaction(
    conn: &mut AsyncSmtpConnection,
    pipelining: bool,
    mail_from: &str,
    recipients: &[String],
    body: &[u8],
) -> Result<Vec<(String, RecipientOutcome)>, Failed> {
    let all = |outcome: RecipientOutcome| {
        recipients
            .iter()
            .map(|r| (r.clone(), outcome.clone()))
            .collect::<Vec<_>>()
    };
    let from: Address = match mail_from.parse() {
        Ok(a) => a,
        Err(e) => {
            return Ok(all(RecipientOutcome::Refused(format!(
                "bounce address {mail_from:?} is not valid: {e}"
            ))))
        }
    };

    let mut parameters = Vec::new();
    let info = conn.server_info();
    if !body.is_ascii() && info.supports_feature(Extension::EightBitMime) {
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    if recipients.iter().any(|r| !r.is_ascii()) && info.supports_feature(Extension::SmtpUtfEight) {
        parameters.push(MailParameter::SmtpUtfEight);
    }
    let mail = Mail::new(Some(from), parameters);

    let mut outcomes = Vec::with_capacity(recipients.len());
    let mut valid = Vec::with_capacity(recipients.len());
    for recipient in recipients {
        match recipient.parse::<Address>() {
            Ok(address) => valid.push((recipient.clone(), address)),
            Err(e) => {
                let reason = format!("{recipient:?} is not a valid address: {e}");
                outcomes.push((recipient.clone(), RecipientOutcome::Refused(reason)));
            }
        }
    }

    let replies = if pipelining && !valid.is_empty() {
        pipelined_envelope(conn, mail, &valid).await?
    } else {
        envelope_step_by_step(conn, mail, &valid).await?
    };
    let accepted = match replies {
        Envelope::MailRefused { code, reply } => return Ok(all(outcome_for(code, reply))),
        Envelope::Recipients { accepted, refused } => {
            outcomes.extend(refused);
            accepted
        }
    };
    if accepted.is_empty() {
        reset(conn).await.map_err(Failed::During)?;
        return Ok(outcomes);
    }

    let data_outcome = match step(send_message(conn, body)).await {
        Ok(_) => RecipientOutcome::Delivered,
        Err(StepError::Reply { code, text }) if code != 421 => {
            outcome_for(code, format!("end of DATA: {code} {text}"))
        }
        Err(e) => return Err(Failed::During(broken(e))),
    };
    outcomes.extend(accepted.into_iter().map(|r| (r, data_outcome.clone())));
    Ok(outcomes)
}

/// The message after DATA's 354, and the relay's reply to it. lettre's
/// `message` writes the message and the final `.` in two writes (the relay
/// wakes up twice); a message that is UTF-8 (nearly all: mail-builder
/// writes 7-bit) goes in one, dot-stuffed here, through `command`, which
/// writes what it is given and reads one reply.
async fn send_message(
    conn: &mut AsyncSmtpConnection,
    body: &[u8],
) -> Result<Response, lettre::transport::smtp::Error> {
    match std::str::from_utf8(body) {
        Ok(text) => conn.command(DotStuffed(text)).await,
        Err(_) => conn.message(body).await,
    }
}

/// A message with CRLF line ends and no final CRLF (see [`wire_body`]) as
/// it goes on the wire: each line that starts with `.` gets another one
/// (RFC 5321 §4.5.2), then `CRLF . CRLF`.
struct DotStuffed<'a>(&'a str);

impl std::fmt::Display for DotStuffed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, line) in self.0.split("\r\n").enumerate() {
            if i > 0 {
                f.write_str("\r\n")?;
            }
            if line.starts_with('.') {
                f.write_str(".")?;
            }
            f.write_str(line)?;
        }
        f.write_str("\r\n.\r\n")
    }
}

/// How the relay answered the envelope.
enum Envelope {
    /// A 5xx to MAIL: the message is refused for every recipient (the
    /// session was reset).
    MailRefused { code: u16, reply: String },
    /// The recipients it took, and the others with their outcome. When
    /// some were taken, the relay has answered DATA with 354 and waits for
    /// the message; when none were, the session is mid-transaction.
    Recipients {
        accepted: Vec<String>,
        refused: Vec<(String, RecipientOutcome)>,
    },
}

/// MAIL, then each RCPT, then DATA, each awaiting its reply.
async fn envelope_step_by_step(
    conn: &mut AsyncSmtpConnection,
    mail: Mail,
    recipients: &[(String, Address)],
) -> Result<Envelope, Failed> {
    match step(conn.command(mail)).await {
        Ok(_) => {}
        // A 5xx to MAIL refuses this message; a 4xx says the relay cannot
        // take mail now, whatever the message: the whole outbox waits.
        Err(StepError::Reply { code, text }) if code >= 500 => {
            return mail_refused(conn, code, &text).await;
        }
        Err(e) => return Err(Failed::BeforeMail(broken(e))),
    }
    let mut replies = Recipients::default();
    for (recipient, address) in recipients {
        let reply = step(conn.command(Rcpt::new(address.clone(), Vec::new()))).await;
        replies.record(recipient, reply)?;
    }
    if replies.accepted.is_empty() {
        return Ok(replies.into_envelope());
    }
    let data = step(conn.command(Data)).await;
    replies.after_data(conn, data).await
}

/// MAIL, every RCPT and DATA in one write, then their replies in order.
async fn pipelined_envelope(
    conn: &mut AsyncSmtpConnection,
    mail: Mail,
    recipients: &[(String, Address)],
) -> Result<Envelope, Failed> {
    let mut group = mail.to_string();
    for (_, address) in recipients {
        group.push_str(&Rcpt::new(address.clone(), Vec::new()).to_string());
    }
    group.push_str(&Data.to_string());

    let refused_mail = match step(conn.command(group)).await {
        Ok(_) => None,
        Err(StepError::Reply { code, text }) if code >= 500 => Some((code, text)),
        Err(e) => return Err(Failed::BeforeMail(broken(e))),
    };
    let mut replies = Recipients::default();
    for (recipient, _) in recipients {
        replies.record(recipient, step(conn.read_response()).await)?;
    }
    let data = step(conn.read_response()).await;
    if data.is_ok() && (refused_mail.is_some() || replies.accepted.is_empty()) {
        // 354 with nobody to deliver to breaks RFC 2920 §3.1; whatever we
        // sent now would be delivered to someone. Hang up mid-DATA: the
        // relay drops the message, and the rows wait for another session.
        return Err(Failed::During(SessionFailure::Down(
            "the relay opened DATA after refusing the envelope".into(),
        )));
    }
    if let Some((code, text)) = refused_mail {
        return mail_refused(conn, code, &text).await;
    }
    if replies.accepted.is_empty() {
        // DATA was refused, as it must be: nothing to say of it.
        return match data {
            Err(StepError::Broken(e)) => Err(Failed::During(SessionFailure::Down(e))),
            _ => Ok(replies.into_envelope()),
        };
    }
    replies.after_data(conn, data).await
}

/// RSET after a 5xx to MAIL: the message is refused for every recipient.
async fn mail_refused(
    conn: &mut AsyncSmtpConnection,
    code: u16,
    text: &str,
) -> Result<Envelope, Failed> {
    reset(conn).await.map_err(Failed::During)?;
    let reply = format!("MAIL FROM: {code} {text}");
    Ok(Envelope::MailRefused { code, reply })
}

/// The RCPT replies of one envelope, as they come.
#[derive(Default)]
struct Recipients {
    accepted: Vec<String>,
    refused: Vec<(String, RecipientOutcome)>,
}

impl Recipients {
    /// One RCPT reply; a 421 or a broken session ends the transaction.
    fn record(
        &mut self,
        recipient: &str,
        reply: Result<Response, StepError>,
    ) -> Result<(), Failed> {
        match reply {
            Ok(_) => self.accepted.push(recipient.to_string()),
            Err(StepError::Reply { code, text }) if code != 421 => {
                let reply = format!("RCPT TO:<{recipient}>: {code} {text}");
                self.refused
                    .push((recipient.to_string(), outcome_for(code, reply)));
            }
            Err(e) => return Err(Failed::During(broken(e))),
        }
        Ok(())
    }

    /// DATA's reply, some recipients accepted: a 354 leaves the relay
    /// waiting for the message; a refusal is every accepted recipient's
    /// outcome, and RSET cleans the session for the next message.
    async fn after_data(
        mut self,
        conn: &mut AsyncSmtpConnection,
        data: Result<Response, StepError>,
    ) -> Result<Envelope, Failed> {
        let refusal = match data {
            Ok(_) => return Ok(self.into_envelope()),
            Err(StepError::Reply { code, text }) if code != 421 => {
                outcome_for(code, format!("DATA: {code} {text}"))
            }
            Err(e) => return Err(Failed::During(broken(e))),
        };
        reset(conn).await.map_err(Failed::During)?;
        let taken = std::mem::take(&mut self.accepted);
        self.refused
            .extend(taken.into_iter().map(|r| (r, refusal.clone())));
        Ok(self.into_envelope())
    }

    fn into_envelope(self) -> Envelope {
        Envelope::Recipients {
            accepted: self.accepted,
            refused: self.refused,
        }
    }
}

fn outcome_for(code: u16, reply: String) -> RecipientOutcome {
    if code >= 500 {
        RecipientOutcome::Refused(reply)
    } else {
        RecipientOutcome::Deferred(reply)
    }
}

fn broken(e: StepError) -> SessionFailure {
    match e {
        StepError::Reply { code, text } => SessionFailure::Down(format!("{code} {text}")),
        StepError::Broken(reason) => SessionFailure::Down(reason),
    }
}

/// RSET after a transaction the relay refused, so the session is clean for
/// the next message.
async fn reset(conn: &mut AsyncSmtpConnection) -> Result<(), SessionFailure> {
    step(conn.command(Rset)).await.map(drop).map_err(broken)
}

/// Await one reply with [`REPLY_TIMEOUT`], sorting lettre's errors into a
/// reply with a code or a broken session.
async fn step(
    reply: impl std::future::Future<Output = Result<Response, lettre::transport::smtp::Error>>,
) -> Result<Response, StepError> {
    match tokio::time::timeout(REPLY_TIMEOUT, reply).await {
        Err(_) => Err(StepError::Broken(
            "no reply from the relay (timeout)".into(),
        )),
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => match e.status() {
            Some(code) => Err(StepError::Reply {
                code: u16::from(code),
                text: reply_text(&e),
            }),
            None => Err(StepError::Broken(describe(&e))),
        },
    }
}

/// The text of a negative reply (lettre keeps it as the error's source).
fn reply_text(e: &lettre::transport::smtp::Error) -> String {
    std::error::Error::source(e)
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// lettre's error with its cause, on one line.
fn describe(e: &lettre::transport::smtp::Error) -> String {
    e.to_string().replace(['\r', '\n'], " ")
}

async fn abort(mut conn: AsyncSmtpConnection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.abort()).await;
}

async fn read_password(path: &PathBuf) -> Result<String, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// The message as it goes after DATA: CRLF line ends (a bare LF would let
/// a relay end the data early or refuse it), without its last CRLF because
/// [`send_message`] (or lettre) appends `CRLF . CRLF` after dot-stuffing.
pub(crate) fn wire_body(message: &[u8]) -> Cow<'_, [u8]> {
    let bare_lf = message
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || message[i - 1] != b'\r'));
    let mut body = if bare_lf {
        let mut out = Vec::with_capacity(message.len() + message.len() / 32);
        for (i, &b) in message.iter().enumerate() {
            if b == b'\n' && (i == 0 || message[i - 1] != b'\r') {
                out.push(b'\r');
            }
            out.push(b);
        }
        Cow::Owned(out)
    } else {
        Cow::Borrowed(message)
    };
    if body.ends_with(b"\r\n") {
        body = match body {
            Cow::Borrowed(b) => Cow::Borrowed(&b[..b.len() - 2]),
            Cow::Owned(mut v) => {
                v.truncate(v.len() - 2);
                Cow::Owned(v)
            }
        };
    }
    body
}

/// TLS from the first byte (`smtps://`), over our own nodelay socket:
/// lettre's implicit-TLS connect would open a socket of its own.
async fn wrap_tls(
    config: Arc<rustls::ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> Result<WrappedTls, String> {
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| certificate_problem(&e).unwrap_or_else(|| e.to_string()))?;
    Ok(WrappedTls(stream))
}

/// When a TLS handshake failed because we refused the relay's certificate:
/// rustls's reason and what the operator should do about it. rustls's
/// error sits inside an `io::Error` (which does not list it as its
/// source), possibly inside lettre's errors.
fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls @ rustls::Error::InvalidCertificate(problem)) = tls {
            let hint = match problem {
                rustls::CertificateError::UnknownIssuer => {
                    "the relay's certificate is not signed by a CA crmgate trusts; \
                     put that CA (PEM) in relay.ca_file"
                }
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. } => {
                    "the relay's certificate does not name the host of relay.url; \
                     use the name the certificate gives"
                }
                _ => "the relay's certificate was refused",
            };
            return Some(format!("{tls}: {hint}"));
        }
        cause = e.source();
    }
    None
}

/// A client TLS stream that lettre can drive as its transport.
#[derive(Debug)]
struct WrappedTls(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncRead for WrappedTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for WrappedTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for WrappedTls {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a receiving MTA does with DATA: lines up to `.` alone, one
    /// leading dot taken off each. Returns the message and what followed.
    fn unstuff(wire: &[u8]) -> Option<(Vec<u8>, &[u8])> {
        let mut message = Vec::new();
        let mut rest = wire;
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n")? + 2;
            let (line, after) = rest.split_at(end);
            if line == b".\r\n" {
                return Some((message, after));
            }
            message.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            rest = after;
        }
    }

    proptest! {
        /// Whatever the message, the relay reads back exactly it, with
        /// its last line ended, and nothing after the final dot: no line
        /// of the message can end the data early.
        #[test]
        fn a_dot_stuffed_message_reads_back_whole(
            text in proptest::collection::vec(
                prop_oneof![Just("."), Just("a"), Just("\r"), Just("\n"), Just("\r\n"), Just("é")],
                0..60,
            )
        ) {
            let text: String = text.concat();
            let body = wire_body(text.as_bytes());
            let wire = DotStuffed(std::str::from_utf8(&body).unwrap()).to_string();
            let (message, after) = unstuff(wire.as_bytes()).expect("a final dot");
            prop_assert!(after.is_empty());
            let mut expected = body.into_owned();
            expected.extend_from_slice(b"\r\n");
            prop_assert_eq!(message, expected);
        }
    }

    #[test]
    fn a_message_is_dot_stuffed_like_lettre_does_it() {
        let body = wire_body(b".first\r\nx\r\n..two\r\na\r.b\r\n.\r\nend\r\n");
        let text = std::str::from_utf8(&body).unwrap();
        assert_eq!(
            DotStuffed(text).to_string(),
            "..first\r\nx\r\n...two\r\na\r.b\r\n..\r\nend\r\n.\r\n"
        );
    }

    #[test]
    fn wire_body_ends_lines_with_crlf_and_leaves_the_final_one_to_lettre() {
        assert_eq!(&*wire_body(b"a: b\r\n\r\nbody\r\n"), b"a: b\r\n\r\nbody");
        assert_eq!(&*wire_body(b"a: b\n\nbody\n"), b"a: b\r\n\r\nbody");
        assert_eq!(&*wire_body(b"\nx\r\ny"), b"\r\nx\r\ny");
        assert!(matches!(wire_body(b"x\r\ny\r\n"), Cow::Borrowed(_)));
    }

    #[test]
    fn reply_codes_sort_into_deferred_and_refused() {
        assert!(matches!(
            outcome_for(451, "x".into()),
            RecipientOutcome::Deferred(_)
        ));
        assert!(matches!(
            outcome_for(550, "x".into()),
            RecipientOutcome::Refused(_)
        ));
    }
}
