//! A tiny SMTP client for readable protocol tests.
//!
//! ```ignore
//! let mut s = Client::connect(addr).await;
//! s.expect("220").await;
//! s.cmd("EHLO x", "250").await;
//! s.cmd("RCPT TO:<a@b>", "550 5.1.1").await;
//! s.data(b"Subject: hi\r\n\r\nbody\r\n", "250").await;
//! ```
//!
//! Every wait is bounded ([`Client::timeout`]), so a server that stops
//! answering fails the test instead of hanging it. Failures panic with the
//! reply that was received: this is test code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

/// Anything the client can talk over: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub struct Client {
    stream: Box<dyn Stream>,
    /// Bytes received and not yet returned as part of a reply.
    buf: Vec<u8>,
    /// Upper bound on each wait for the server.
    pub timeout: Duration,
}

impl Client {
    /// Connects over TCP; the greeting is left for [`Client::expect`].
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        Self {
            stream: Box::new(stream),
            buf: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Connects over TCP from `source` (e.g. 127.0.0.2), to stand for
    /// another client host; the greeting is left for [`Client::expect`].
    pub async fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("socket: {e}"));
        socket
            .bind(SocketAddr::new(source, 0))
            .unwrap_or_else(|e| panic!("bind {source}: {e}"));
        let stream = socket
            .connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr} from {source}: {e}"));
        Self {
            stream: Box::new(stream),
            buf: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Reads one whole reply (all lines of a multi-line reply) and returns
    /// it, CRLFs included. Panics on timeout or end of stream.
    pub async fn read_reply(&mut self) -> String {
        match self.try_read_reply().await {
            Some(reply) => reply,
            None => panic!(
                "connection closed while waiting for a reply (got {:?})",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Like [`Client::read_reply`], but `None` when the server closed the
    /// connection before a complete reply.
    pub async fn try_read_reply(&mut self) -> Option<String> {
        let mut reply = String::new();
        loop {
            let line = self.read_line().await?;
            reply.push_str(&line);
            // "250-" continues a reply, "250 " (or a bare "250") ends it.
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(reply);
            }
        }
    }

    async fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(self.timeout, self.stream.read(&mut chunk))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no reply within {:?} (got {:?})",
                        self.timeout,
                        String::from_utf8_lossy(&self.buf)
                    )
                });
            match read {
                Ok(0) | Err(_) => return None,
                Ok(count) => self.buf.extend_from_slice(&chunk[..count]),
            }
        }
    }

    /// Reads a reply and checks that its last line starts with `prefix`
    /// (e.g. "250", "550 5.1.1"). Returns the whole reply.
    pub async fn expect(&mut self, prefix: &str) -> String {
        let reply = self.read_reply().await;
        let last = reply.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(prefix),
            "expected a reply starting with {prefix:?}, got {reply:?}"
        );
        reply
    }

    /// Sends `line` (CRLF added) and expects a reply starting with `prefix`.
    pub async fn cmd(&mut self, line: &str, prefix: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.expect(prefix).await
    }

    /// Writes raw bytes, as they are.
    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(self.timeout, self.stream.write_all(bytes))
            .await
            .unwrap_or_else(|_| panic!("write blocked for {:?}", self.timeout))
            .unwrap_or_else(|e| panic!("write failed: {e}"));
    }

    /// Writes raw bytes unless the server has answered or closed: `false`
    /// once a reply (or the end of the stream) is waiting to be read.
    pub async fn send_or_closed(&mut self, bytes: &[u8]) -> bool {
        let mut probe = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(1), self.stream.read(&mut probe)).await {
            Err(_nothing_yet) => {}
            Ok(Ok(0) | Err(_)) => return false,
            Ok(Ok(count)) => {
                self.buf.extend_from_slice(&probe[..count]);
                return false;
            }
        }
        matches!(
            tokio::time::timeout(self.timeout, self.stream.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// DATA, then `message` dot-stuffed and terminated; expects `prefix`
    /// as the reply to the end of data.
    pub async fn data(&mut self, message: &[u8], prefix: &str) -> String {
        self.cmd("DATA", "354").await;
        self.send(&dot_stuff(message)).await;
        self.send(b".\r\n").await;
        self.expect(prefix).await
    }

    /// One whole transaction after EHLO: MAIL, RCPT for each recipient, DATA.
    pub async fn transaction(&mut self, from: &str, to: &[&str], message: &[u8], prefix: &str) {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        for rcpt in to {
            self.cmd(&format!("RCPT TO:<{rcpt}>"), "250").await;
        }
        self.data(message, prefix).await;
    }

    /// True when the server closes the connection without sending more.
    pub async fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(self.timeout, self.stream.read(&mut chunk)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// STARTTLS and the handshake; `server_name` must match the certificate.
    pub async fn starttls(mut self, config: Arc<ClientConfig>, server_name: &str) -> Self {
        self.cmd("STARTTLS", "220").await;
        self.into_tls(config, server_name).await
    }

    /// The TLS handshake, once the `220` to STARTTLS has been read.
    pub async fn into_tls(self, config: Arc<ClientConfig>, server_name: &str) -> Self {
        assert!(
            self.buf.is_empty(),
            "clear-text data after the 220 to STARTTLS: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let name = ServerName::try_from(server_name.to_string())
            .unwrap_or_else(|e| panic!("bad server name {server_name}: {e}"));
        let tls = tokio::time::timeout(
            self.timeout,
            TlsConnector::from(config).connect(name, self.stream),
        )
        .await
        .unwrap_or_else(|_| panic!("TLS handshake timed out"))
        .unwrap_or_else(|e| panic!("TLS handshake failed: {e}"));
        Self {
            stream: Box::new(tls),
            buf: Vec::new(),
            timeout: self.timeout,
        }
    }
}

/// Dot-stuffs `message` for DATA (a dot that starts a CRLF line; a bare
/// LF does not end a line in SMTP) and makes sure it ends with CRLF.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 16);
    let mut at_line_start = true;
    let mut previous = 0u8;
    for &byte in message {
        if at_line_start && byte == b'.' {
            out.push(b'.');
        }
        out.push(byte);
        at_line_start = byte == b'\n' && previous == b'\r';
        previous = byte;
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}
