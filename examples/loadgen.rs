//! loadgen: the SMTP load generator of `bench/run` and `scripts/crash-test`,
//! and the recording relay sink of the crash test.
//!
//! Usage:
//!   cargo run --release --example loadgen -- send --server 127.0.0.1:2525 \
//!       [--messages 20000] [--sessions 8] [--size 5120] [--workload new|reply] \
//!       [--rate MSG_PER_S] [--tag RUN] [--acked FILE] [--retries N] [--max-seconds S]
//!   cargo run --release --example loadgen -- sink --record FILE [--listen 127.0.0.1:0] \
//!       [--port-file FILE]
//!
//! Why our own generator rather than Postfix's `smtp-source` alone:
//! `smtp-source` sends the same bytes every time, and crmgate rightly drops
//! repeated mail as duplicates, so a fair load needs a distinct Message-ID
//! per message. `send` pipelines MAIL/RCPT/DATA over N sessions that pull
//! message numbers from one shared counter, timestamps each end-of-data and
//! its reply (the accept latency), can pace itself to a fixed rate (an open
//! schedule: message i leaves at start + i/rate, so a slow server shows as
//! latency, not as a lower offered rate), and can record the Message-IDs
//! that got `250` (what the crash test must find in the log). Every run is
//! bounded by a message count and by `--max-seconds`.
//!
//! `sink` is a small SMTP server that answers 250 to everything and appends
//! the Message-ID of each message it receives to a file: the crash test
//! counts deliveries and duplicates from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
#[command(about = "SMTP load generator and recording sink for crmgate's bench and crash test")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a bounded load and print one JSON line of figures.
    Send(SendArgs),
    /// Receive mail, answer 250, record each Message-ID in a file.
    Sink(SinkArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// No ticket number in the Subject: each message opens a ticket.
    New,
    /// `Re: [TKTnnnnnnn] …` for tickets 1..=--tickets, From their requester.
    Reply,
}

#[derive(Debug, Clone, clap::Args)]
struct SendArgs {
    #[arg(long)]
    server: SocketAddr,
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    #[arg(long, default_value_t = 8)]
    sessions: usize,
    /// Approximate size of each message in bytes (headers included).
    #[arg(long, default_value_t = 5120)]
    size: usize,
    #[arg(long, value_enum, default_value_t = Workload::New)]
    workload: Workload,
    /// Reply workload: the tickets written to, TKT0000001..=TKT<tickets>.
    #[arg(long, default_value_t = 1000)]
    tickets: usize,
    /// Reply workload: the `--tag` of the run that opened those tickets
    /// with one session (ticket n was opened by message n-1), so a reply
    /// comes From that ticket's requester.
    #[arg(long, default_value = "seed")]
    seed_tag: String,
    #[arg(long, default_value = "TKT")]
    prefix: String,
    #[arg(long, default_value_t = 7)]
    digits: usize,
    /// Messages per second over all sessions (open schedule); none: as fast as possible.
    #[arg(long)]
    rate: Option<f64>,
    /// Fill the size with a base64 attachment (multipart/mixed) instead of
    /// plain text: how a large real message looks.
    #[arg(long)]
    attachment: bool,
    /// Makes Message-IDs and senders distinct between runs.
    #[arg(long, default_value = "run")]
    tag: String,
    #[arg(long, default_value = "support@localhost")]
    to: String,
    /// Write the Message-IDs answered 250 here, one a line.
    #[arg(long)]
    acked: Option<PathBuf>,
    /// Send a message again (same bytes) when its session broke or it got a
    /// 4xx, as an MTA would: up to this many more times.
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Stop sending new messages after this long.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
}

#[derive(Debug, Clone, clap::Args)]
struct SinkArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Append each received Message-ID here.
    #[arg(long)]
    record: PathBuf,
    /// Write the bound port here once listening (for `--listen 127.0.0.1:0`).
    #[arg(long)]
    port_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed by the server")]
    Closed,
    #[error("unexpected reply to {step}: {reply}")]
    Protocol { step: &'static str, reply: String },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Send(args) => send(args).await,
        Command::Sink(args) => sink(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What one session counted.
#[derive(Debug, Default)]
struct Tally {
    sent: usize,
    acked: Vec<String>,
    temp: usize,
    perm: usize,
    io_errors: usize,
    /// End-of-data → final reply, microseconds, for every 250.
    latencies_us: Vec<u64>,
}

async fn send(args: SendArgs) -> Result<(), LoadError> {
    let args = Arc::new(args);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.max_seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.sessions.max(1) {
        let (args, next) = (args.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            session(&args, &next, start, deadline).await
        }));
    }
    let mut total = Tally::default();
    for task in tasks {
        // A panicked session counts as nothing sent; the totals show it.
        if let Ok(t) = task.await {
            total.sent += t.sent;
            total.acked.extend(t.acked);
            total.temp += t.temp;
            total.perm += t.perm;
            total.io_errors += t.io_errors;
            total.latencies_us.extend(t.latencies_us);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    total.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        let l = &total.latencies_us;
        if l.is_empty() {
            return 0.0;
        }
        let i = ((l.len() as f64 - 1.0) * p).round() as usize;
        l[i.min(l.len() - 1)] as f64 / 1000.0
    };
    if let Some(path) = &args.acked {
        let mut text = total.acked.join("\n");
        text.push('\n');
        std::fs::write(path, text)?;
    }
    println!(
        "{{\"sent\":{},\"acked\":{},\"temp\":{},\"perm\":{},\"io_errors\":{},\
         \"elapsed_s\":{:.3},\"rate\":{:.1},\"lat_p50_ms\":{:.3},\"lat_p90_ms\":{:.3},\
         \"lat_p99_ms\":{:.3},\"lat_max_ms\":{:.3}}}",
        total.sent,
        total.acked.len(),
        total.temp,
        total.perm,
        total.io_errors,
        elapsed,
        total.acked.len() as f64 / elapsed.max(1e-9),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
    );
    Ok(())
}

/// One SMTP session's reading and writing halves.
struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Conn {
    async fn open(server: SocketAddr) -> Result<Conn, LoadError> {
        let stream = TcpStream::connect(server).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut conn = Conn {
            reader: BufReader::new(r),
            writer: w,
        };
        conn.expect("greeting", "220").await?;
        conn.writer.write_all(b"EHLO loadgen.test\r\n").await?;
        conn.expect("EHLO", "250").await?;
        Ok(conn)
    }

    /// Read one (possibly multi-line) reply; return it whole.
    async fn reply(&mut self) -> Result<String, LoadError> {
        let mut whole = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(LoadError::Closed);
            }
            let last = line.as_bytes().get(3) != Some(&b'-');
            whole.push_str(&line);
            if last {
                return Ok(whole);
            }
        }
    }

    async fn expect(&mut self, step: &'static str, code: &str) -> Result<String, LoadError> {
        let reply = self.reply().await?;
        if reply.starts_with(code) {
            Ok(reply)
        } else {
            Err(LoadError::Protocol { step, reply })
        }
    }
}

/// How one attempt at one message ended.
enum Attempt {
    Acked(Duration),
    Temp,
    Perm,
}

async fn session(args: &SendArgs, next: &AtomicUsize, start: Instant, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<Conn> = None;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= args.messages || Instant::now() >= deadline {
            break;
        }
        if let Some(rate) = args.rate {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let (message_id, sender, bytes) = message(args, i);
        tally.sent += 1;
        for attempt in 0..=args.retries {
            if Instant::now() >= deadline {
                break;
            }
            if conn.is_none() {
                match Conn::open(args.server).await {
                    Ok(c) => conn = Some(c),
                    Err(_) => {
                        tally.io_errors += 1;
                        // The daemon may be restarting (crash test): pause.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            match transaction(c, &sender, &args.to, &bytes).await {
                Ok(Attempt::Acked(latency)) => {
                    tally.latencies_us.push(latency.as_micros() as u64);
                    tally.acked.push(message_id.clone());
                    break;
                }
                Ok(Attempt::Perm) => {
                    tally.perm += 1;
                    break;
                }
                Ok(Attempt::Temp) => {
                    tally.temp += 1;
                    if attempt < args.retries {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Err(_) => {
                    tally.io_errors += 1;
                    conn = None;
                }
            }
        }
    }
    if let Some(mut c) = conn {
        let _ = c.writer.write_all(b"QUIT\r\n").await;
        let _ = c.reply().await;
    }
    tally
}

/// MAIL, RCPT and DATA pipelined in one write, then the message.
async fn transaction(
    c: &mut Conn,
    sender: &str,
    to: &str,
    bytes: &[u8],
) -> Result<Attempt, LoadError> {
    let head = format!("MAIL FROM:<{sender}>\r\nRCPT TO:<{to}>\r\nDATA\r\n");
    c.writer.write_all(head.as_bytes()).await?;
    let mail = c.reply().await?;
    let rcpt = c.reply().await?;
    let data = c.reply().await?;
    if !data.starts_with("354") {
        // The server refused the transaction; RSET for the next one.
        c.writer.write_all(b"RSET\r\n").await?;
        c.reply().await?;
        let temp = [&mail, &rcpt, &data].iter().any(|r| r.starts_with('4'));
        return Ok(if temp { Attempt::Temp } else { Attempt::Perm });
    }
    c.writer.write_all(bytes).await?;
    let t0 = Instant::now();
    let end = c.reply().await?;
    let latency = t0.elapsed();
    Ok(match end.as_bytes().first() {
        Some(b'2') => Attempt::Acked(latency),
        Some(b'4') => Attempt::Temp,
        _ => Attempt::Perm,
    })
}

/// Message number `i`: its Message-ID, envelope sender, and the DATA bytes
/// (dot-stuffing never needed: no line starts with a dot), ending `.`.
fn message(args: &SendArgs, i: usize) -> (String, String, Vec<u8>) {
    let message_id = format!("<{}.{}@loadgen.test>", args.tag, i);
    let (sender, subject) = match args.workload {
        Workload::New => (
            format!("req{i}.{}@example.net", args.tag),
            format!("Load test {} message {i}", args.tag),
        ),
        Workload::Reply => {
            let n = i % args.tickets.max(1);
            let number = format!("{}{:0width$}", args.prefix, n + 1, width = args.digits);
            (
                format!("req{n}.{}@example.net", args.seed_tag),
                format!("Re: [{number}] Load test {} message {n}", args.seed_tag),
            )
        }
    };
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let content_type = if args.attachment {
        "multipart/mixed; boundary=\"loadgen-boundary\""
    } else {
        "text/plain; charset=utf-8"
    };
    let mut out = format!(
        "From: Requester {i} <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n\
         Date: {date}\r\nMessage-ID: {message_id}\r\nMIME-Version: 1.0\r\n\
         Content-Type: {content_type}\r\n\r\n",
        to = args.to
    )
    .into_bytes();
    if args.attachment {
        out.extend_from_slice(
            b"--loadgen-boundary\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
              The log file is attached.\r\n--loadgen-boundary\r\n\
              Content-Type: application/octet-stream; name=\"printer.log\"\r\n\
              Content-Disposition: attachment; filename=\"printer.log\"\r\n\
              Content-Transfer-Encoding: base64\r\n\r\n",
        );
        // 76 base64 characters a line: 57 bytes of (arbitrary) content.
        let line = "UHJpbnRlciBsb2c6IHBhcGVyIGphbSBvbiB0cmF5IDIsIHRvbmVyIGxvdywgZHJ1bSBvay4gICAg";
        while out.len() + 24 < args.size {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--loadgen-boundary--\r\n");
    }
    let mut line_no = 0usize;
    while out.len() < args.size {
        let line = format!(
            "Line {line_no} of message {i} ({}): the printer on floor 3 still does not print anything at all.",
            args.tag
        );
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
        line_no += 1;
    }
    out.extend_from_slice(b".\r\n");
    (message_id, sender, out)
}

async fn sink(args: SinkArgs) -> Result<(), LoadError> {
    let listener = TcpListener::bind(args.listen).await?;
    let port = listener.local_addr()?.port();
    if let Some(path) = &args.port_file {
        std::fs::write(path, format!("{port}\n"))?;
    }
    let record = Arc::new(Mutex::new(
        tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.record)
            .await?,
    ));
    loop {
        let (stream, _) = listener.accept().await?;
        let record = record.clone();
        tokio::spawn(async move {
            if let Err(e) = sink_session(stream, record).await {
                eprintln!("loadgen sink: session: {e}");
            }
        });
    }
}

/// One relay session: enough ESMTP for lettre, each message's Message-ID
/// recorded before its 250 (so a 250 the daemon saw is in the record).
async fn sink_session(
    stream: TcpStream,
    record: Arc<Mutex<tokio::fs::File>>,
) -> Result<(), LoadError> {
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    w.write_all(b"220 sink.test ESMTP loadgen\r\n").await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = String::from_utf8_lossy(&line).to_ascii_uppercase();
        let reply: &[u8] = if verb.starts_with("EHLO") {
            b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 104857600\r\n"
        } else if verb.starts_with("DATA") {
            w.write_all(b"354 go ahead\r\n").await?;
            let message_id = read_data(&mut reader).await?;
            let mut file = record.lock().await;
            file.write_all(format!("{}\n", message_id.unwrap_or_else(|| "-".into())).as_bytes())
                .await?;
            file.flush().await?;
            b"250 2.0.0 recorded\r\n"
        } else if verb.starts_with("QUIT") {
            w.write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else if verb.starts_with("STARTTLS") || verb.starts_with("AUTH") {
            b"502 5.5.1 not here\r\n"
        } else {
            b"250 2.0.0 ok\r\n"
        };
        w.write_all(reply).await?;
    }
}

/// Read DATA up to `.` alone on a line; return the Message-ID header's value.
async fn read_data(reader: &mut BufReader<OwnedReadHalf>) -> Result<Option<String>, LoadError> {
    let mut in_headers = true;
    let mut message_id = None;
    let mut pending_id = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Err(LoadError::Closed);
        }
        if line == b".\r\n" {
            return Ok(message_id);
        }
        if !in_headers {
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let trimmed = text.trim_end();
        if trimmed.is_empty() {
            in_headers = false;
            continue;
        }
        if pending_id && text.starts_with([' ', '\t']) {
            message_id = Some(trimmed.trim().to_string());
            pending_id = false;
            continue;
        }
        pending_id = false;
        if let Some((name, value)) = trimmed.split_once(':') {
            if name.eq_ignore_ascii_case("message-id") && message_id.is_none() {
                let value = value.trim();
                if value.is_empty() {
                    pending_id = true;
                } else {
                    message_id = Some(value.to_string());
                }
            }
        }
    }
}
