//! An SMTP sink for tests: a real server on 127.0.0.1, port 0, that plays
//! the relay crmgate sends through. It keeps every message it accepts, and
//! can be told to misbehave the ways a real relay does: a 4xx outage, a
//! 5xx to MAIL, a 5xx or 4xx for given recipients, no PIPELINING, or its
//! port closed for a while.
//!
//! It speaks enough ESMTP for lettre and for hand-written sessions: EHLO
//! (PIPELINING, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, AUTH PLAIN, and
//! STARTTLS when it has a certificate), HELO, MAIL, RCPT, DATA with
//! dot-unstuffing, RSET, NOOP, QUIT. Commands are answered in order as they
//! are read, so a pipelined client works.
//!
//! With a certificate ([`Sink::start_starttls`], [`Sink::start_smtps`]) it
//! is a TLS relay, and each message records whether it came over TLS and
//! with which AUTH login, so a test sees what the relay would have seen.

// Each test binary uses a different part of this helper.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// One message the sink accepted, with its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The message as the client meant it: dot-unstuffed, CRLF line ends,
    /// without the final `.` line.
    pub data: Vec<u8>,
    /// The transaction ran inside TLS (STARTTLS or smtps).
    pub tls: bool,
    /// The AUTH PLAIN login of the session, as (user, password).
    pub login: Option<(String, String)>,
}

impl Received {
    /// The data as text, for assertions.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

#[derive(Default)]
struct State {
    messages: Vec<Received>,
    /// Answer every MAIL FROM with `451 4.3.0`: the relay is "down" while
    /// still accepting connections.
    outage: bool,
    /// Answer every MAIL FROM with `550 5.7.1`: the message is refused.
    refuse_mail: bool,
    /// Leave PIPELINING out of the EHLO reply.
    no_pipelining: bool,
    /// MAIL commands received, and those that came in one write with
    /// their RCPTs and DATA (RFC 2920 pipelining).
    envelopes: usize,
    envelopes_in_one_write: usize,
    /// Lower-cased recipients answered `550 5.1.1` at RCPT.
    refused: HashSet<String>,
    /// Lower-cased recipients answered `452 4.2.2` at RCPT (mailbox full).
    deferred: HashSet<String>,
    /// How many SMTP sessions were opened: tells a test whether the client
    /// reused its connection.
    sessions: usize,
    /// The `user` of each AUTH PLAIN, with its password.
    logins: Vec<(String, String)>,
    /// AUTH commands (of any mechanism) received outside TLS.
    auth_in_clear: usize,
}

/// How the sink offers TLS.
#[derive(Clone)]
enum SinkTls {
    None,
    /// Plain SMTP, STARTTLS advertised and served with this configuration.
    StartTls(Arc<ServerConfig>),
    /// TLS from the first byte (`smtps://`).
    Implicit(Arc<ServerConfig>),
}

/// What a session runs over: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A running sink. Dropping it stops the server.
pub struct Sink {
    addr: SocketAddr,
    tls: SinkTls,
    state: Arc<Mutex<State>>,
    running: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

impl Sink {
    /// Start a sink on a free port of 127.0.0.1.
    pub async fn start() -> Sink {
        Sink::start_with(SinkTls::None)
    }

    /// A sink that advertises STARTTLS and serves it with `tls` (e.g.
    /// [`super::pki::TestPki::server`]).
    pub async fn start_starttls(tls: Arc<ServerConfig>) -> Sink {
        Sink::start_with(SinkTls::StartTls(tls))
    }

    /// A sink that speaks TLS from the first byte, as on port 465.
    pub async fn start_smtps(tls: Arc<ServerConfig>) -> Sink {
        Sink::start_with(SinkTls::Implicit(tls))
    }

    /// A plain sink on a free port of `ip` (e.g. a non-loopback address).
    #[allow(dead_code)] // not every test binary uses every sink
    pub async fn start_on(ip: std::net::IpAddr) -> Sink {
        Sink::start_at(SinkTls::None, SocketAddr::new(ip, 0))
    }

    fn start_with(tls: SinkTls) -> Sink {
        Sink::start_at(tls, "127.0.0.1:0".parse().unwrap())
    }

    fn start_at(tls: SinkTls, at: SocketAddr) -> Sink {
        let listener = bind(at);
        let addr = listener.local_addr().unwrap();
        let sink = Sink {
            addr,
            tls,
            state: Arc::default(),
            running: Mutex::new(None),
        };
        sink.serve(listener);
        sink
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay URL for a crmgate configuration, e.g. `smtp://127.0.0.1:40123`
    /// (`smtps://` for a sink started with [`Sink::start_smtps`]).
    pub fn url(&self) -> String {
        let scheme = match self.tls {
            SinkTls::Implicit(_) => "smtps",
            SinkTls::None | SinkTls::StartTls(_) => "smtp",
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Every message accepted so far, in order.
    pub fn messages(&self) -> Vec<Received> {
        self.state().messages.clone()
    }

    /// Wait until at least `n` messages were accepted; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            assert!(
                Instant::now() < deadline,
                "the sink got {} message(s) within {timeout:?}, expected {n}",
                messages.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Turn the 4xx outage on or off (`451 4.3.0` to every MAIL FROM).
    pub fn set_outage(&self, on: bool) {
        self.state().outage = on;
    }

    /// Refuse every MAIL FROM with `550 5.7.1` (on), or stop (off).
    pub fn set_refuse_mail(&self, on: bool) {
        self.state().refuse_mail = on;
    }

    /// Offer PIPELINING in EHLO replies (the default) or not.
    pub fn set_pipelining(&self, on: bool) {
        self.state().no_pipelining = !on;
    }

    /// (MAIL commands received, those that came in one write with the
    /// transaction's DATA).
    pub fn envelopes(&self) -> (usize, usize) {
        let state = self.state();
        (state.envelopes, state.envelopes_in_one_write)
    }

    /// Answer `550 5.1.1` to RCPT TO this address from now on.
    pub fn refuse_recipient(&self, address: &str) {
        self.state().refused.insert(address.to_ascii_lowercase());
    }

    /// Answer `452 4.2.2` to RCPT TO this address until [`Sink::accept_recipient`].
    pub fn defer_recipient(&self, address: &str) {
        self.state().deferred.insert(address.to_ascii_lowercase());
    }

    /// Stop refusing or deferring this address.
    pub fn accept_recipient(&self, address: &str) {
        let address = address.to_ascii_lowercase();
        let mut state = self.state();
        state.refused.remove(&address);
        state.deferred.remove(&address);
    }

    /// How many SMTP sessions were opened since the start.
    pub fn sessions(&self) -> usize {
        self.state().sessions
    }

    /// The AUTH PLAIN logins seen, as (user, password).
    pub fn logins(&self) -> Vec<(String, String)> {
        self.state().logins.clone()
    }

    /// How many AUTH commands came outside TLS, whatever their mechanism.
    pub fn auth_in_clear(&self) -> usize {
        self.state().auth_in_clear
    }

    /// Close the port and drop every open session: connections are
    /// refused until [`Sink::reopen`].
    pub async fn close(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((token, task)) = running {
            token.cancel();
            let _ = task.await;
        }
    }

    /// Listen again on the same port.
    pub async fn reopen(&self) {
        self.close().await;
        self.serve(bind(self.addr));
    }

    fn serve(&self, listener: TcpListener) {
        let token = CancellationToken::new();
        let state = Arc::clone(&self.state);
        let tls = self.tls.clone();
        let stop = token.clone();
        let task = tokio::spawn(async move {
            let mut sessions = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        lock(&state).sessions += 1;
                        sessions.spawn(session(stream, Arc::clone(&state), tls.clone(), stop.clone()));
                    }
                }
            }
            drop(listener);
            // Sessions end on the same token; wait so that `close` returns
            // only once every socket is gone.
            while sessions.join_next().await.is_some() {}
        });
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) = Some((token, task));
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some((token, _)) = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            token.cancel();
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bind with SO_REUSEADDR so that [`Sink::reopen`] gets the same port back
/// even with connections of the last run in TIME_WAIT.
fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(128).unwrap()
}

/// The address between `<` and `>` of a MAIL or RCPT argument.
fn path_of(argument: &str) -> Option<String> {
    let start = argument.find('<')?;
    let end = argument[start..].find('>')? + start;
    Some(argument[start + 1..end].to_string())
}

async fn session(
    stream: TcpStream,
    state: Arc<Mutex<State>>,
    tls: SinkTls,
    stop: CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => {}
        _ = converse(stream, &state, tls) => {}
    }
}

/// One SMTP session; returns on QUIT, EOF or an I/O error (a TLS handshake
/// the client gave up on is one).
async fn converse(tcp: TcpStream, state: &Mutex<State>, tls: SinkTls) -> std::io::Result<()> {
    // `starttls` is what STARTTLS would use, while it is still on offer.
    let (stream, mut starttls, mut encrypted): (Box<dyn Stream>, _, _) = match tls {
        SinkTls::None => (Box::new(tcp), None, false),
        SinkTls::StartTls(config) => (Box::new(tcp), Some(config), false),
        SinkTls::Implicit(config) => {
            let stream = TlsAcceptor::from(config).accept(tcp).await?;
            (Box::new(stream), None, true)
        }
    };
    let mut conn = BufReader::new(stream);
    conn.write_all(b"220 sink.test ESMTP test sink\r\n").await?;
    let mut mail_from: Option<String> = None;
    let mut rcpt_to: Vec<String> = Vec::new();
    let mut login: Option<(String, String)> = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        if conn.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let command = String::from_utf8_lossy(&line).trim_end().to_string();
        let verb = command
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        if verb == "MAIL" {
            // What is already read past MAIL came in the same write.
            let in_one_write = conn.buffer().windows(6).any(|w| w == b"DATA\r\n");
            let mut state = lock(state);
            state.envelopes += 1;
            state.envelopes_in_one_write += usize::from(in_one_write);
        }
        let reply: String = match verb.as_str() {
            "EHLO" => format!(
                "250-sink.test\r\n{}250-8BITMIME\r\n250-SMTPUTF8\r\n\
                 250-ENHANCEDSTATUSCODES\r\n{}250-AUTH PLAIN\r\n250 SIZE 52428800\r\n",
                if lock(state).no_pipelining {
                    ""
                } else {
                    "250-PIPELINING\r\n"
                },
                if starttls.is_some() {
                    "250-STARTTLS\r\n"
                } else {
                    ""
                }
            ),
            "STARTTLS" => match starttls.take() {
                Some(config) => {
                    conn.write_all(b"220 2.0.0 ready to start TLS\r\n").await?;
                    conn.flush().await?;
                    // What the client pipelined after STARTTLS in clear
                    // text is dropped with the buffer (RFC 3207 §4.2).
                    let tcp = conn.into_inner();
                    let stream = TlsAcceptor::from(config).accept(tcp).await?;
                    conn = BufReader::new(Box::new(stream));
                    encrypted = true;
                    mail_from = None;
                    rcpt_to.clear();
                    login = None;
                    continue;
                }
                None if encrypted => "503 5.5.1 TLS already active\r\n".into(),
                None => "502 5.5.1 STARTTLS not offered\r\n".into(),
            },
            "HELO" => "250 sink.test\r\n".into(),
            "NOOP" => "250 2.0.0 OK\r\n".into(),
            "RSET" => {
                mail_from = None;
                rcpt_to.clear();
                "250 2.0.0 OK\r\n".into()
            }
            "QUIT" => {
                conn.write_all(b"221 2.0.0 bye\r\n").await?;
                conn.flush().await?;
                return Ok(());
            }
            "AUTH" => {
                if !encrypted {
                    lock(state).auth_in_clear += 1;
                }
                let plain = command.split_whitespace().nth(2).and_then(decode_plain);
                match plain {
                    Some(plain) => {
                        lock(state).logins.push(plain.clone());
                        login = Some(plain);
                        "235 2.7.0 authenticated\r\n".into()
                    }
                    None => "535 5.7.8 only AUTH PLAIN with an initial response\r\n".into(),
                }
            }
            "MAIL" => match path_of(&command) {
                _ if lock(state).outage => "451 4.3.0 try again later (test outage)\r\n".into(),
                _ if lock(state).refuse_mail => "550 5.7.1 sender refused (test)\r\n".into(),
                Some(from) => {
                    mail_from = Some(from);
                    rcpt_to.clear();
                    "250 2.1.0 OK\r\n".into()
                }
                None => "501 5.5.4 syntax: MAIL FROM:<address>\r\n".into(),
            },
            "RCPT" => match path_of(&command) {
                _ if mail_from.is_none() => "503 5.5.1 MAIL first\r\n".into(),
                Some(to) if lock(state).refused.contains(&to.to_ascii_lowercase()) => {
                    format!("550 5.1.1 <{to}>: no such user here\r\n")
                }
                Some(to) if lock(state).deferred.contains(&to.to_ascii_lowercase()) => {
                    format!("452 4.2.2 <{to}>: mailbox full, try later\r\n")
                }
                Some(to) => {
                    rcpt_to.push(to);
                    "250 2.1.5 OK\r\n".into()
                }
                None => "501 5.5.4 syntax: RCPT TO:<address>\r\n".into(),
            },
            "DATA" if rcpt_to.is_empty() => "554 5.5.1 no valid recipients\r\n".into(),
            "DATA" => {
                conn.write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                conn.flush().await?;
                let data = read_data(&mut conn).await?;
                let received = Received {
                    mail_from: mail_from.take().unwrap_or_default(),
                    rcpt_to: std::mem::take(&mut rcpt_to),
                    data,
                    tls: encrypted,
                    login: login.clone(),
                };
                lock(state).messages.push(received);
                "250 2.0.0 OK queued\r\n".into()
            }
            _ => "500 5.5.2 command not recognized\r\n".into(),
        };
        conn.write_all(reply.as_bytes()).await?;
        conn.flush().await?;
    }
}

/// Read DATA lines up to `.` alone on a line, removing the stuffed dots.
async fn read_data(read: &mut (impl AsyncBufRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" {
            return Ok(data);
        }
        let unstuffed = if line.starts_with(b".") {
            &line[1..]
        } else {
            &line[..]
        };
        data.extend_from_slice(unstuffed);
    }
}

/// `base64("\0user\0password")` → (user, password).
fn decode_plain(encoded: &str) -> Option<(String, String)> {
    let decoded = decode_base64(encoded)?;
    let mut parts = decoded.split(|&b| b == 0).skip(1);
    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let password = String::from_utf8(parts.next()?.to_vec()).ok()?;
    Some((user, password))
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for &c in text.as_bytes().iter().filter(|&&c| c != b'=') {
        let value = ALPHABET.iter().position(|&a| a == c)? as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Some(out)
}
