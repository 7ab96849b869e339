//! One SMTP session: the read/answer loop and the session's state.
//!
//! The loop reads in bounded chunks, answers every complete command line in
//! the buffer, and writes the batched replies only when it needs more input
//! (PIPELINING: one write per group of commands). The verbs live in their
//! own files (`ehlo`, `mail`, `rcpt`, `command`); DATA is driven from here
//! because it alternates between the socket and [`super::data`].
//!
//! The same loop serves the plain TCP stream and, after STARTTLS, the TLS
//! stream: it returns [`Next::StartTls`] and the caller runs it again on the
//! upgraded stream with the state reset (RFC 3207).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::data::{DataProblem, DataReader, Fed};
use super::replies::{self, Reply};
use super::{Deliver, Envelope, Settings, Verdict};

/// Longest command line, line ending excluded. RFC 5321 allows 512
/// octets; 4 KiB leaves room for long SMTPUTF8 addresses and parameters
/// while keeping what one client can make us buffer small.
pub const MAX_COMMAND_LINE: usize = 4096;

/// Size of one read. Also bounds how much of an overlong line is ever in
/// memory.
const READ_CHUNK: usize = 64 * 1024;

/// Why a session ended early; logged at debug, never shown to the client.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("client stopped reading our replies")]
    WriteTimeout,
}

/// What the caller does once [`Session::serve`] returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Close,
    /// `220 Ready to start TLS` was sent: do the handshake, then serve again.
    StartTls,
}

/// What one command asks of the loop.
pub(super) enum Step {
    Continue,
    Data(DataReader),
    StartTls,
    Close,
}

/// The transaction opened by MAIL, up to the reply to DATA.
#[derive(Debug)]
pub(super) struct Transaction {
    /// `None` for the null reverse-path. Lower-cased.
    pub mail_from: Option<String>,
    /// Accepted recipients, lower-cased, in RCPT order, without duplicates.
    pub rcpt_to: Vec<String>,
    /// The SIZE declared at MAIL, to receive the message in one allocation.
    pub size_hint: usize,
}

/// Bytes read but not yet consumed.
struct Input {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Input {
    fn new() -> Self {
        Self {
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, count: usize) {
        self.start = (self.start + count).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Room to read into, after moving what is pending to the front.
    fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }
}

enum Filled {
    Bytes,
    Eof,
    TimedOut,
    ShuttingDown,
}

pub(super) struct Session<D> {
    pub(super) settings: Arc<Settings>,
    pub(super) deliver: Arc<D>,
    shutdown: CancellationToken,
    pub(super) peer: SocketAddr,
    /// Names this session in queue ids.
    id: String,
    input: Input,
    /// Replies not yet written: flushed when the loop needs more input.
    out: Vec<u8>,
    /// After an overlong command line was answered: drop bytes up to its end.
    skipping_line: bool,
    /// When the first byte of the command line still incomplete arrived:
    /// the whole line must follow within `idle_timeout` of it, so a client
    /// trickling one byte at a time cannot hold the session.
    line_started: Option<Instant>,
    /// Counts every command line, across STARTTLS, against `max_commands`.
    commands: usize,
    transactions: usize,
    pub(super) tls_active: bool,
    pub(super) helo: Option<String>,
    pub(super) transaction: Option<Transaction>,
}

impl<D: Deliver> Session<D> {
    pub(super) fn new(
        settings: Arc<Settings>,
        deliver: Arc<D>,
        shutdown: CancellationToken,
        peer: SocketAddr,
        id: String,
    ) -> Self {
        Self {
            settings,
            deliver,
            shutdown,
            peer,
            id,
            input: Input::new(),
            out: Vec::with_capacity(1024),
            skipping_line: false,
            line_started: None,
            commands: 0,
            transactions: 0,
            tls_active: false,
            helo: None,
            transaction: None,
        }
    }

    pub(super) fn reply(&mut self, reply: Reply) {
        self.settings.metrics.reply(reply.code);
        reply.write_to(&mut self.out);
    }

    pub(super) fn out(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Writes the greeting; returns `false` (after answering `421`) when
    /// the daemon is already stopping.
    ///
    /// # Errors
    ///
    /// The client closed the connection or does not read.
    pub(super) async fn greet<S>(&mut self, stream: &mut S) -> Result<bool, SessionError>
    where
        S: AsyncWrite + Unpin,
    {
        if self.shutdown.is_cancelled() {
            self.reply(replies::REPLY_SHUTTING_DOWN);
            self.flush(stream).await?;
            return Ok(false);
        }
        replies::write_greeting(&mut self.out, &self.settings.hostname);
        self.flush(stream).await?;
        Ok(true)
    }

    /// Forgets everything said before STARTTLS (RFC 3207 §4.2): the client
    /// must EHLO again, and bytes it pipelined in clear text after STARTTLS
    /// are dropped rather than run as commands inside TLS.
    pub(super) fn reset_for_tls(&mut self) {
        self.input.clear();
        self.skipping_line = false;
        self.line_started = None;
        self.helo = None;
        self.transaction = None;
        self.tls_active = true;
    }

    /// Answers commands until the client quits, a limit ends the session,
    /// or STARTTLS asks for the stream to be upgraded.
    ///
    /// # Errors
    ///
    /// A read or write failed, or the client stopped reading replies.
    pub(super) async fn serve<S>(&mut self, stream: &mut S) -> Result<Next, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            while let Some(line) = self.next_line() {
                self.commands += 1;
                if self.commands > self.settings.max_commands {
                    debug!(commands = self.commands, "too many commands");
                    self.reply(replies::REPLY_TOO_MANY_COMMANDS);
                    self.flush(stream).await?;
                    return Ok(Next::Close);
                }
                let step = match line {
                    Line::TooLong => {
                        debug!("command line too long");
                        self.reply(replies::REPLY_LINE_TOO_LONG);
                        Step::Continue
                    }
                    Line::Command(line) => self.command(&line),
                };
                match step {
                    Step::Continue => {}
                    Step::Close => {
                        self.flush(stream).await?;
                        return Ok(Next::Close);
                    }
                    Step::StartTls => {
                        self.flush(stream).await?;
                        return Ok(Next::StartTls);
                    }
                    Step::Data(reader) => {
                        if self.receive_data(stream, reader).await? == AfterData::Close {
                            return Ok(Next::Close);
                        }
                    }
                }
            }

            self.flush(stream).await?;
            // Between transactions a stopping daemon may end the session;
            // inside one it lets the client finish (graceful stop).
            let may_stop = self.transaction.is_none();
            let limit = self.line_limit();
            match self.fill(stream, limit, may_stop).await? {
                Filled::Bytes => {}
                Filled::Eof => return Ok(Next::Close),
                Filled::TimedOut => {
                    debug!("idle timeout");
                    self.reply(replies::REPLY_IDLE_TIMEOUT);
                    self.flush(stream).await?;
                    return Ok(Next::Close);
                }
                Filled::ShuttingDown => {
                    debug!("shutting down");
                    self.reply(replies::REPLY_SHUTTING_DOWN);
                    self.flush(stream).await?;
                    return Ok(Next::Close);
                }
            }
        }
    }

    /// How long the next read may wait: the idle time, or what is left of
    /// it since the first byte of the line still incomplete.
    fn line_limit(&mut self) -> Duration {
        if self.input.pending().is_empty() && !self.skipping_line {
            self.line_started = None;
            return self.settings.idle_timeout;
        }
        let started = *self.line_started.get_or_insert_with(Instant::now);
        self.settings.idle_timeout.saturating_sub(started.elapsed())
    }

    /// Takes the next complete command line from the buffer, if any.
    fn next_line(&mut self) -> Option<Line> {
        loop {
            let pending = self.input.pending();
            let newline = pending.iter().position(|&b| b == b'\n');
            if self.skipping_line {
                match newline {
                    Some(pos) => {
                        self.input.consume(pos + 1);
                        self.skipping_line = false;
                        self.line_started = None;
                        continue;
                    }
                    None => {
                        self.input.clear();
                        return None;
                    }
                }
            }
            return match newline {
                Some(pos) => {
                    self.line_started = None;
                    let content = pos - usize::from(pos > 0 && pending[pos - 1] == b'\r');
                    let line = if content > MAX_COMMAND_LINE {
                        Line::TooLong
                    } else {
                        Line::Command(pending[..=pos].to_vec())
                    };
                    self.input.consume(pos + 1);
                    Some(line)
                }
                // No line end yet and already too long: answer now and
                // drop the rest of the line as it arrives, so a client
                // cannot make us buffer an endless line.
                None if pending.len() > MAX_COMMAND_LINE + 1 => {
                    self.input.clear();
                    self.skipping_line = true;
                    Some(Line::TooLong)
                }
                None => None,
            };
        }
    }

    /// Receives the message after `354`, hands it to the next stage and
    /// answers with its verdict.
    async fn receive_data<S>(
        &mut self,
        stream: &mut S,
        mut reader: DataReader,
    ) -> Result<AfterData, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.line_started = None;
        let deadline = Instant::now() + self.settings.data_deadline;
        let result = loop {
            if !self.input.pending().is_empty() {
                match reader.feed(self.input.pending()) {
                    Fed::NeedMore => self.input.clear(),
                    Fed::Done { consumed, result } => {
                        self.input.consume(consumed);
                        break result;
                    }
                }
            }
            self.flush(stream).await?;
            let limit = self
                .settings
                .data_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            match self.fill(stream, limit, false).await? {
                Filled::Bytes => {}
                // A message cut short is not a message: nothing is delivered.
                Filled::Eof | Filled::ShuttingDown => return Ok(AfterData::Close),
                Filled::TimedOut => {
                    debug!("timeout during DATA");
                    self.reply(replies::REPLY_IDLE_TIMEOUT);
                    self.flush(stream).await?;
                    return Ok(AfterData::Close);
                }
            }
        };

        let Some(transaction) = self.transaction.take() else {
            // DATA is only started with a transaction; nothing to deliver.
            self.reply(replies::REPLY_MAIL_FIRST);
            return Ok(AfterData::Continue);
        };
        match result {
            Err(DataProblem::TooLarge) => {
                debug!("message too large");
                self.reply(replies::REPLY_TOO_LARGE);
            }
            Err(DataProblem::LineTooLong) => {
                debug!("data line too long");
                self.reply(replies::REPLY_LINE_TOO_LONG);
            }
            Ok(raw) => {
                let envelope = Envelope {
                    peer: self.peer.ip().to_canonical(),
                    helo: self.helo.clone().unwrap_or_default(),
                    mail_from: transaction.mail_from,
                    rcpt_to: transaction.rcpt_to,
                };
                let size = raw.len();
                let data_ended = std::time::Instant::now();
                let verdict = self.deliver.deliver(envelope, raw).await;
                debug!(size, ?verdict, "message handed over");
                match verdict {
                    Verdict::Stored => {
                        self.transactions += 1;
                        let queue_id = format!("{}.{}", self.id, self.transactions);
                        self.settings.metrics.reply(replies::REPLY_STORED.code);
                        replies::REPLY_STORED.write_with(&mut self.out, &queue_id);
                    }
                    Verdict::Refused(reason) => {
                        self.settings.metrics.reply(replies::REPLY_REFUSED.code);
                        replies::REPLY_REFUSED.write_with(&mut self.out, &reason);
                    }
                    Verdict::TempFailure => self.reply(replies::REPLY_TEMP_FAILURE),
                    Verdict::AuthTempFailure => self.reply(replies::REPLY_AUTH_TEMP_FAILURE),
                }
                self.settings.metrics.accepted_in(data_ended.elapsed());
            }
        }
        Ok(AfterData::Continue)
    }

    /// Reads once into the input buffer, bounded by `limit`; when
    /// `may_stop`, a shutdown wins over waiting for the client.
    async fn fill<S>(
        &mut self,
        stream: &mut S,
        limit: Duration,
        may_stop: bool,
    ) -> Result<Filled, SessionError>
    where
        S: AsyncRead + Unpin,
    {
        // A deadline already past: the client had its time, whatever it
        // has sent since.
        if limit.is_zero() {
            return Ok(Filled::TimedOut);
        }
        let shutdown = self.shutdown.clone();
        let spare = self.input.spare();
        tokio::select! {
            biased;
            () = shutdown.cancelled(), if may_stop => Ok(Filled::ShuttingDown),
            read = tokio::time::timeout(limit, stream.read(spare)) => match read {
                Err(_elapsed) => Ok(Filled::TimedOut),
                Ok(Ok(0)) => Ok(Filled::Eof),
                Ok(Ok(count)) => {
                    self.input.end += count;
                    Ok(Filled::Bytes)
                }
                Ok(Err(error)) => Err(error.into()),
            },
        }
    }

    /// Writes the batched replies.
    async fn flush<S>(&mut self, stream: &mut S) -> Result<(), SessionError>
    where
        S: AsyncWrite + Unpin,
    {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = async {
            stream.write_all(&self.out).await?;
            stream.flush().await
        };
        match tokio::time::timeout(self.settings.idle_timeout, write).await {
            Ok(result) => result?,
            Err(_elapsed) => return Err(SessionError::WriteTimeout),
        }
        self.out.clear();
        Ok(())
    }
}

/// Whether the session goes on after a DATA transfer.
#[derive(Debug, PartialEq, Eq)]
enum AfterData {
    Continue,
    /// The client vanished or timed out in the middle of the message.
    Close,
}

/// A command line as taken from the input.
enum Line {
    /// The whole line, line ending included, as smtp-proto wants it.
    Command(Vec<u8>),
    TooLong,
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

    use super::*;

    struct Accepting;

    impl Deliver for Accepting {
        fn accepts_recipient(&self, _address: &str) -> bool {
            true
        }

        async fn deliver(&self, _envelope: Envelope, _raw: Vec<u8>) -> Verdict {
            Verdict::Stored
        }
    }

    /// Counts the writes the session makes.
    struct Counting {
        inner: DuplexStream,
        writes: usize,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.writes += 1;
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    fn session() -> Session<Accepting> {
        let settings = Settings {
            hostname: "mx.test".into(),
            max_message_bytes: 1000,
            max_recipients: 10,
            max_sessions: 1,
            max_sessions_per_client: 1,
            exempt_clients: vec![],
            idle_timeout: Duration::from_secs(5),
            max_commands: 100,
            data_timeout: Duration::from_secs(5),
            data_deadline: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(1),
            tls: None,
            metrics: Default::default(),
        };
        let peer = SocketAddr::from(([127, 0, 0, 1], 2525));
        Session::new(
            Arc::new(settings),
            Arc::new(Accepting),
            CancellationToken::new(),
            peer,
            "t".into(),
        )
    }

    #[tokio::test]
    async fn pipelined_commands_get_their_replies_in_one_write() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut stream = Counting {
            inner: server,
            writes: 0,
        };
        client
            .write_all(
                b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nNOOP\r\nRSET\r\nQUIT\r\n",
            )
            .await
            .unwrap();
        let next = session().serve(&mut stream).await.unwrap();
        assert_eq!(next, Next::Close);
        assert_eq!(stream.writes, 1);
        drop(stream);
        let mut replies = String::new();
        client.read_to_string(&mut replies).await.unwrap();
        let last_lines: Vec<&str> = replies
            .lines()
            .filter(|line| !line.starts_with("250-"))
            .collect();
        assert_eq!(
            last_lines,
            [
                "250 ENHANCEDSTATUSCODES",
                "250 2.1.0 Sender ok",
                "250 2.1.5 Recipient ok",
                "250 2.0.0 Ok",
                "250 2.0.0 Ok",
                "221 2.0.0 Bye"
            ]
        );
    }

    #[tokio::test]
    async fn a_two_mib_command_line_gets_one_500_and_its_tail_is_not_run() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut session = session();
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 32 * 1024];
            for _ in 0..64 {
                client.write_all(&chunk).await.unwrap();
            }
            client.write_all(b"\r\nQUIT\r\n").await.unwrap();
            let mut replies = String::new();
            client.read_to_string(&mut replies).await.unwrap();
            replies
        });
        // The input buffer is a fixed READ_CHUNK: the line cannot be held whole.
        session.serve(&mut server).await.unwrap();
        drop(server);
        let replies = writer.await.unwrap();
        assert_eq!(replies, "500 5.5.2 Line too long\r\n221 2.0.0 Bye\r\n");
    }
}
