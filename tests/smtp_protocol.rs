//! The SMTP listener, spoken to over TCP: each behaviour the SPEC's "SMTP
//! listener" section promises, against `crmgate::smtp::run` on
//! 127.0.0.1:0 with a recording `Deliver` in place of the store.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::client::Client;
use crmgate::smtp::{self, Deliver, Envelope, Settings, Verdict, MAX_COMMAND_LINE, MAX_DATA_LINE};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_util::sync::CancellationToken;

/// Stands in for the store: accepts the recipients it was given, records
/// what it receives, answers the verdict it is told to.
struct Recorder {
    recipients: Vec<String>,
    verdict: Mutex<Verdict>,
    messages: Mutex<Vec<(Envelope, Vec<u8>)>>,
    /// Makes `deliver` slow, to catch a transaction in flight.
    delay: Mutex<Duration>,
    /// Notified when `deliver` is entered.
    delivering: Notify,
}

impl Recorder {
    fn new() -> Self {
        Self {
            recipients: vec![
                "support@localhost".into(),
                "support-notes@localhost".into(),
                "postmaster".into(),
            ],
            verdict: Mutex::new(Verdict::Stored),
            messages: Mutex::new(Vec::new()),
            delay: Mutex::new(Duration::ZERO),
            delivering: Notify::new(),
        }
    }

    fn answer(&self, verdict: Verdict) {
        *self.verdict.lock().unwrap() = verdict;
    }

    fn messages(&self) -> Vec<(Envelope, Vec<u8>)> {
        self.messages.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.messages.lock().unwrap().len()
    }
}

impl Deliver for Recorder {
    fn accepts_recipient(&self, address: &str) -> bool {
        self.recipients.iter().any(|known| known == address)
    }

    async fn deliver(&self, envelope: Envelope, raw: Vec<u8>) -> Verdict {
        self.delivering.notify_one();
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        self.messages.lock().unwrap().push((envelope, raw));
        self.verdict.lock().unwrap().clone()
    }
}

fn settings() -> Settings {
    Settings {
        hostname: "mx.test".into(),
        max_message_bytes: 64 * 1024,
        max_recipients: 3,
        max_sessions: 16,
        max_sessions_per_client: 16,
        exempt_clients: vec![],
        idle_timeout: Duration::from_secs(10),
        max_commands: 100,
        data_timeout: Duration::from_secs(10),
        data_deadline: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(5),
        tls: None,
        metrics: Default::default(),
    }
}

struct Server {
    addr: SocketAddr,
    recorder: Arc<Recorder>,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(settings: Settings) -> Self {
        Self::start_with(settings, Recorder::new()).await
    }

    async fn start_with(settings: Settings, recorder: Recorder) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = Arc::new(recorder);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(smtp::run(
            listener,
            Arc::new(settings),
            recorder.clone(),
            shutdown.clone(),
        ));
        Self {
            addr,
            recorder,
            shutdown,
            task,
        }
    }

    /// A client past the greeting and EHLO.
    async fn session(&self) -> Client {
        let mut client = Client::connect(self.addr).await;
        client.expect("220 mx.test ESMTP crmgate").await;
        client.cmd("EHLO client.test", "250").await;
        client
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("run returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

const MESSAGE: &[u8] =
    b"From: a@example.org\r\nTo: support@localhost\r\nSubject: hi\r\n\r\nHello\r\n";

#[tokio::test]
async fn greeting_and_ehlo_advertise_exactly_the_promised_extensions() {
    let server = Server::start(settings()).await;
    let mut client = Client::connect(server.addr).await;
    client.expect("220 mx.test ESMTP crmgate").await;
    let ehlo = client.cmd("EHLO client.test", "250 ").await;
    assert!(ehlo.starts_with("250-mx.test\r\n"), "{ehlo}");
    for keyword in [
        "SIZE 65536",
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(ehlo.contains(keyword), "{keyword} missing from {ehlo}");
    }
    for absent in ["STARTTLS", "DSN", "AUTH", "CHUNKING"] {
        assert!(!ehlo.contains(absent), "{absent} advertised in {ehlo}");
    }
    client.cmd("HELO client.test", "250 mx.test").await;
    client.cmd("QUIT", "221 2.0.0").await;
    assert!(client.is_closed().await);
    server.stop().await;
}

#[tokio::test]
async fn a_transaction_hands_envelope_and_exact_bytes_to_the_next_stage() {
    let server = Server::start(settings()).await;
    let mut client = server.session().await;
    client
        .cmd(
            "MAIL FROM:<Alice@Example.ORG> SIZE=100 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x1",
            "250 2.1.0",
        )
        .await;
    client
        .cmd(
            "RCPT TO:<Support@LocalHost> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;support@localhost",
            "250 2.1.5",
        )
        .await;
    client
        .cmd("RCPT TO:<support-notes@localhost>", "250 2.1.5")
        .await;
    // The same recipient twice is one recipient.
    client.cmd("RCPT TO:<support@localhost>", "250 2.1.5").await;
    // 8-bit text, a line that starts with a dot, a lone CR and LF inside lines.
    let message =
        "Subject: caf\u{e9}\r\n\r\n.leading dot\r\n..two\r\nbare\nlf and\rcr\r\n\u{e9}t\u{e9}\r\n";
    let reply = client.data(message.as_bytes(), "250 2.0.0").await;
    assert!(reply.contains("queued as"), "{reply}");

    let messages = server.recorder.messages();
    assert_eq!(messages.len(), 1);
    let (envelope, raw) = &messages[0];
    assert_eq!(raw.as_slice(), message.as_bytes());
    assert_eq!(envelope.mail_from.as_deref(), Some("alice@example.org"));
    assert_eq!(
        envelope.rcpt_to,
        vec!["support@localhost", "support-notes@localhost"]
    );
    assert_eq!(envelope.helo, "client.test");
    assert_eq!(envelope.peer.to_string(), "127.0.0.1");
    server.stop().await;
}

#[tokio::test]
async fn null_reverse_path_is_accepted_and_postmaster_is_a_recipient() {
    let server = Server::start(settings()).await;
    let mut client = server.session().await;
    client.cmd("MAIL FROM:<>", "250 2.1.0").await;
    client.cmd("RCPT TO:<Postmaster>", "250 2.1.5").await;
    client.data(MESSAGE, "250").await;
    let messages = server.recorder.messages();
    assert_eq!(messages[0].0.mail_from, None);
    assert_eq!(messages[0].0.rcpt_to, vec!["postmaster"]);
    server.stop().await;
}

#[tokio::test]
async fn parameters_outside_the_accepted_list_get_555() {
    let server = Server::start(settings()).await;
    let mut client = server.session().await;
    client
        .cmd("MAIL FROM:<a@b.example> FOO=bar", "555 5.5.4")
        .await;
    client
        .cmd("MAIL FROM:<a@b.example> REQUIRETLS", "555 5.5.4")
        .await;
    client
        .cmd("MAIL FROM:<a@b.example> AUTH=<>", "555 5.5.4")
        .await;
    client
        .cmd("MAIL FROM:<a@b.example> HOLDFOR=10", "555 5.5.4")
        .await;
    client.cmd("MAIL FROM:<a@b.example>", "250").await;
    client
        .cmd("RCPT TO:<support@localhost> XFOO=1", "555 5.5.4")
        .await;
    client
        .cmd("RCPT TO:<support@localhost> CONNEG", "555 5.5.4")
        .await;
    client.cmd("RCPT TO:<support@localhost>", "250").await;
    client.data(MESSAGE, "250").await;
    server.stop().await;
}

#[tokio::test]
async fn declared_size_over_the_limit_is_refused_at_mail() {
    let server = Server::start(settings()).await;
    let mut client = server.session().await;
    client
        .cmd("MAIL FROM:<a@b.example> SIZE=65537", "552 5.3.4")
        .await;
    client
        .cmd("MAIL FROM:<a@b.example> SIZE=65536", "250")
        .await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_recipients_get_550_and_the_recipient_limit_452() {
    let server = Server::start(settings()).await;
    let mut client = server.session().await;
    client.cmd("MAIL FROM:<a@b.example>", "250").await;
    client
        .cmd("RCPT TO:<someone@elsewhere.example>", "550 5.1.1")
        .await;
    client.cmd("RCPT TO:<support@localhost>", "250").await;
    client
        .cmd("RCPT TO:<support+tkt1@localhost>", "550 5.1.1")
        .await;
    client.cmd("RCPT TO:<support-notes@localhost>", "250").await;
    client.cmd("RCPT TO:<postmaster>", "250").await;
    // max_recipients is 3.
    client.cmd("RCPT TO:<support@localhost>", "250").await;
    client.cmd("RCPT TO:<other@localhost>", "452 4.5.3").await;
    client.data(MESSAGE, "250").await;
    assert_eq!(server.recorder.messages()[0].0.rcpt_to.len(), 3);
    server.stop().await;
}

#[tokio::test]
async fn commands_out_of_sequence_get_503() {
    let server = Server::start(settings()).await;
    let mut client = Client::connect(server.addr).await;
    client.expect("220").await;
    client.cmd("MAIL FROM:<a@b.example>", "503 5.5.1").await;
    client.cmd("RCPT TO:<support@localhost>", "503 5.5.1").await;
    client.cmd("DATA", "503 5.5.1").await;
    client.cmd("HELO client.test", "250").await;
    client.cmd("MAIL FROM:<a@b.example>", "250").await;
    client.cmd("MAIL FROM:<a@b.example>", "503 5.5.1").await;
    client.cmd("DATA", "503 5.5.1").await;
    client.cmd("RSET", "250 2.0.0").await;
    client.cmd("RCPT TO:<support@localhost>", "503 5.5.1").await;
    assert_eq!(server.recorder.count(), 0);
    server.stop().await;
}

#[tokio::test]
async fn unknown_commands_syntax_errors_and_the_small_verbs() {
    let server = Server::start(settings()).await;
    let mut client = server.session().await;
    client.cmd("FROBNICATE now", "500 5.5.1").await;
    client.cmd("EHLO", "501").await;
    client.cmd("MAIL FROM:a@b.example", "501").await;
    client.cmd("MAIL FROM:<not an address>", "501").await;
    client.cmd("AUTH PLAIN AGFAYg==", "502 5.5.1").await;
    client.cmd("STARTTLS", "502 5.5.1").await;
    client.cmd("NOOP", "250 2.0.0").await;
    client.cmd("VRFY jane", "252 2.5.0").await;
    client.cmd("RSET", "250 2.0.0").await;
    client.cmd("QUIT", "221 2.0.0").await;
    assert!(client.is_closed().await);
    server.stop().await;
}

#[tokio::test]
async fn each_verdict_becomes_its_reply_and_the_session_goes_on() {
    let server = Server::start(settings()).await;
    let mut client = server.session().await;
    let to = ["support@localhost"];

    server
        .recorder
        .answer(Verdict::Refused("Work notes are for agents only.".into()));
    client
        .transaction(
            "a@b.example",
            &to,
            MESSAGE,
            "550 5.7.1 Work notes are for agents only.",
        )
        .await;

    server.recorder.answer(Verdict::TempFailure);
    client
        .transaction("a@b.example", &to, MESSAGE, "451 4.3.0")
        .await;

    // Regression (mailin-embedded): the session must not hang after a 4xx.
    server.recorder.answer(Verdict::Stored);
    client
        .transaction("a@b.example", &to, MESSAGE, "250 2.0.0")
        .await;
    client.cmd("QUIT", "221").await;
    assert_eq!(server.recorder.count(), 3);
    server.stop().await;
}

#[tokio::test]
async fn bare_lf_or_cr_dots_do_not_end_data_no_smuggling() {
    let server = Server::start(settings()).await;
    let mut client = server.session().await;
    client.cmd("MAIL FROM:<a@b.example>", "250").await;
    client.cmd("RCPT TO:<support@localhost>", "250").await;
    client.cmd("DATA", "354").await;
    let smuggled = b"Subject: x\r\n\r\nfirst\n.\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<support@localhost>\r\nDATA\r\nsecond\r.\r\nthird\n.\r\nfourth\r\n";
    client.send(smuggled).await;
    client.send(b".\r\n").await;
    // One reply for one message: nothing inside was run as a command.
    client.expect("250 2.0.0").await;
    client.cmd("NOOP", "250 2.0.0").await;
    let messages = server.recorder.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].1.as_slice(), &smuggled[..]);
    server.stop().await;
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let server = Server::start(settings()).await;
    let mut client = Client::connect(server.addr).await;
    client.expect("220").await;
    client
        .send(
            b"EHLO client.test\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<nobody@x.example>\r\nRCPT TO:<support@localhost>\r\nDATA\r\n",
        )
        .await;
    client.expect("250 ").await;
    client.expect("250 2.1.0").await;
    client.expect("550 5.1.1").await;
    client.expect("250 2.1.5").await;
    client.expect("354").await;
    // The end of data and the next commands in one packet too.
    client
        .send(b"Subject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<>\r\nRSET\r\nQUIT\r\n")
        .await;
    client.expect("250 2.0.0").await;
    client.expect("250 2.1.0").await;
    client.expect("250 2.0.0").await;
    client.expect("221").await;
    assert_eq!(server.recorder.count(), 1);
    server.stop().await;
}

#[tokio::test]
async fn data_lines_of_one_mib_pass_longer_ones_get_500_without_delivery() {
    let mut settings = settings();
    settings.max_message_bytes = 4 * 1024 * 1024;
    let server = Server::start(settings).await;
    let mut client = server.session().await;
    let to = ["support@localhost"];

    let mut message = b"Subject: long\r\n\r\n".to_vec();
    message.extend(std::iter::repeat_n(b'x', MAX_DATA_LINE));
    message.extend_from_slice(b"\r\n");
    client
        .transaction("a@b.example", &to, &message, "250")
        .await;
    assert_eq!(server.recorder.messages()[0].1, message);

    let mut message = b"Subject: too long\r\n\r\n".to_vec();
    message.extend(std::iter::repeat_n(b'x', 3 * MAX_DATA_LINE));
    message.extend_from_slice(b"\r\nafter\r\n");
    client
        .transaction("a@b.example", &to, &message, "500 5.5.2")
        .await;
    client.cmd("NOOP", "250").await;
    client.transaction("a@b.example", &to, MESSAGE, "250").await;
    assert_eq!(server.recorder.count(), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_message_over_the_size_limit_gets_552_and_is_not_delivered() {
    let server = Server::start(settings()).await;
    let mut client = server.session().await;
    let mut message = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..2000 {
        message.extend_from_slice(b"0123456789012345678901234567890123456789\r\n");
    }
    client
        .transaction("a@b.example", &["support@localhost"], &message, "552 5.3.4")
        .await;
    client.cmd("NOOP", "250").await;
    assert_eq!(server.recorder.count(), 0);
    server.stop().await;
}

#[tokio::test]
async fn overlong_command_lines_get_500_and_the_session_goes_on() {
    let server = Server::start(settings()).await;
    let mut client = server.session().await;

    // Exactly at the limit: parsed (NOOP takes any argument).
    let line = format!("NOOP {}", "a".repeat(MAX_COMMAND_LINE - 5));
    client.cmd(&line, "250").await;

    // Over it, in one packet.
    let line = format!("NOOP {}", "a".repeat(MAX_COMMAND_LINE));
    client.cmd(&line, "500 5.5.2").await;

    // Far over it, arriving in pieces: one reply, then the line is skipped.
    client.send(b"MAIL FROM:<").await;
    let chunk = vec![b'a'; 16 * 1024];
    for _ in 0..16 {
        client.send(&chunk).await;
    }
    client.expect("500 5.5.2").await;
    client.send(b"@b.example>\r\n").await;
    client.cmd("NOOP", "250 2.0.0").await;
    server.stop().await;
}

#[tokio::test]
async fn an_idle_session_gets_421_and_is_closed() {
    let mut settings = settings();
    settings.idle_timeout = Duration::from_millis(300);
    let server = Server::start(settings).await;
    let mut client = server.session().await;
    let started = Instant::now();
    client.expect("421 4.4.2").await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(client.is_closed().await);
    server.stop().await;
}

#[tokio::test]
async fn too_many_commands_get_421() {
    let mut settings = settings();
    settings.max_commands = 5;
    let server = Server::start(settings).await;
    let mut client = server.session().await; // EHLO is command 1
    for _ in 0..4 {
        client.cmd("NOOP", "250").await;
    }
    client.cmd("NOOP", "421 4.7.0").await;
    assert!(client.is_closed().await);
    server.stop().await;
}

#[tokio::test]
async fn sessions_beyond_the_limit_are_answered_421_and_closed() {
    let mut settings = settings();
    settings.max_sessions = 2;
    let server = Server::start(settings).await;
    let mut first = server.session().await;
    let mut second = server.session().await;

    let mut third = Client::connect(server.addr).await;
    third.expect("421 4.7.0 Too many connections").await;
    assert!(third.is_closed().await);

    // A slot frees when a session ends.
    first.cmd("QUIT", "221").await;
    assert!(first.is_closed().await);
    let mut fourth = Client::connect(server.addr).await;
    fourth.expect("220").await;
    second.cmd("NOOP", "250").await;
    server.stop().await;
}

/// Another host, as the tests can have one: any 127/8 address is local.
fn host(n: u8) -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, n])
}

#[tokio::test]
async fn thirty_trickling_sockets_from_one_address_leave_other_clients_served() {
    let mut settings = settings();
    settings.max_sessions = 25;
    settings.max_sessions_per_client = 20;
    let server = Server::start(settings).await;

    let mut trickling = Vec::new();
    let mut refused = 0;
    for _ in 0..30 {
        let mut client = Client::connect_from(server.addr, host(2)).await;
        let greeting = client.read_reply().await;
        if greeting.starts_with("421 4.7.0") {
            assert!(client.is_closed().await);
            refused += 1;
        } else {
            assert!(greeting.starts_with("220"), "{greeting:?}");
            client.send(b"N").await;
            trickling.push(client);
        }
    }
    assert_eq!((trickling.len(), refused), (20, 10));

    // Another client still has a slot, and is served whole.
    let mut other = Client::connect_from(server.addr, host(3)).await;
    other.expect("220").await;
    other.cmd("EHLO other.test", "250").await;
    other
        .transaction(
            "a@example.org",
            &["support@localhost"],
            MESSAGE,
            "250 2.0.0",
        )
        .await;
    for client in &mut trickling {
        client.send(b"O").await;
    }

    // A session that ends gives its client a slot back.
    let mut first = trickling.remove(0);
    first.send(b"OP\r\nQUIT\r\n").await;
    first.expect("250").await;
    first.expect("221").await;
    let mut again = Client::connect_from(server.addr, host(2)).await;
    again.expect("220").await;
    server.stop().await;
}

#[tokio::test]
async fn trusted_relays_are_exempt_from_the_limit_per_client() {
    let mut settings = settings();
    settings.max_sessions_per_client = 1;
    settings.exempt_clients = vec!["127.0.0.4/32".parse().unwrap()];
    let server = Server::start(settings).await;
    let mut relay = Vec::new();
    for _ in 0..3 {
        let mut client = Client::connect_from(server.addr, host(4)).await;
        client.expect("220").await;
        relay.push(client);
    }
    let mut one = Client::connect_from(server.addr, host(5)).await;
    one.expect("220").await;
    let mut two = Client::connect_from(server.addr, host(5)).await;
    two.expect("421 4.7.0").await;
    server.stop().await;
}

#[tokio::test]
async fn a_command_line_trickled_byte_by_byte_ends_within_the_idle_time_of_its_first_byte() {
    let mut settings = settings();
    settings.idle_timeout = Duration::from_millis(800);
    let server = Server::start(settings).await;
    let mut client = server.session().await;
    // Each byte comes well within the idle time; the line never ends.
    let mut sent = 0;
    let reply = loop {
        if client.send_or_closed(b"x").await {
            sent += 1;
        } else {
            break client.try_read_reply().await;
        }
        assert!(
            sent < 40,
            "a line of {sent} bytes trickled for 8 s and the session is still open"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(sent >= 3, "closed after {sent} bytes");
    assert!(reply.unwrap_or_default().starts_with("421 4.4.2"));
    server.stop().await;
}

#[tokio::test]
async fn a_trickled_message_ends_at_the_data_deadline_and_is_not_delivered() {
    let mut settings = settings();
    settings.data_timeout = Duration::from_millis(800);
    settings.data_deadline = Duration::from_millis(1500);
    let server = Server::start(settings).await;
    let mut client = server.session().await;
    client.cmd("MAIL FROM:<a@example.org>", "250").await;
    client.cmd("RCPT TO:<support@localhost>", "250").await;
    client.cmd("DATA", "354").await;
    let mut sent = 0;
    let reply = loop {
        if client.send_or_closed(b"Subject: x\r\n").await {
            sent += 1;
        } else {
            break client.try_read_reply().await;
        }
        assert!(
            sent < 40,
            "DATA trickled for 8 s and the session is still open"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(sent >= 5, "closed after {sent} lines");
    assert!(reply.unwrap_or_default().starts_with("421 4.4.2"));
    assert_eq!(server.recorder.count(), 0);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_answers_idle_sessions_421_and_lets_data_in_flight_finish() {
    let recorder = Recorder::new();
    *recorder.delay.lock().unwrap() = Duration::from_millis(500);
    let server = Server::start_with(settings(), recorder).await;

    let mut idle = server.session().await;
    let mut busy = server.session().await;
    busy.cmd("MAIL FROM:<a@b.example>", "250").await;
    busy.cmd("RCPT TO:<support@localhost>", "250").await;
    busy.cmd("DATA", "354").await;
    busy.send(&common::client::dot_stuff(MESSAGE)).await;
    busy.send(b".\r\n").await;
    server.recorder.delivering.notified().await;

    server.shutdown.cancel();
    idle.expect("421 4.3.0").await;
    assert!(idle.is_closed().await);
    // The message being stored is answered, then the session is ended.
    busy.expect("250 2.0.0").await;
    busy.expect("421 4.3.0").await;
    assert_eq!(server.recorder.count(), 1);

    let addr = server.addr;
    server.stop().await;
    // The listener is gone.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn shutdown_lets_an_open_transaction_finish_within_the_grace_period() {
    let mut settings = settings();
    settings.shutdown_grace = Duration::from_millis(800);
    let server = Server::start(settings).await;

    let mut finishing = server.session().await;
    finishing.cmd("MAIL FROM:<a@b.example>", "250").await;
    let mut stalled = server.session().await;
    stalled.cmd("MAIL FROM:<a@b.example>", "250").await;

    server.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    finishing.cmd("RCPT TO:<support@localhost>", "250").await;
    finishing.data(MESSAGE, "250 2.0.0").await;
    finishing.expect("421 4.3.0").await;

    // The stalled one is dropped when the grace period ends.
    let started = Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(stalled.is_closed().await);
}

#[tokio::test]
async fn an_unfinished_message_is_never_delivered() {
    let server = Server::start(settings()).await;
    let mut client = server.session().await;
    client.cmd("MAIL FROM:<a@b.example>", "250").await;
    client.cmd("RCPT TO:<support@localhost>", "250").await;
    client.cmd("DATA", "354").await;
    client.send(b"Subject: cut\r\n\r\nhalf a mess").await;
    drop(client);
    // A fresh session is served; the cut message never reached the store.
    let mut other = server.session().await;
    other.cmd("NOOP", "250").await;
    assert_eq!(server.recorder.count(), 0);
    server.stop().await;
}

/// A self-signed certificate for "localhost", written as PEM files and
/// loaded through `load_tls`, and a client configuration that trusts it.
fn tls_pair(dir: &std::path::Path) -> (Arc<rustls::ServerConfig>, Arc<ClientConfig>) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, generated.cert.pem()).unwrap();
    std::fs::write(&key_path, generated.signing_key.serialize_pem()).unwrap();
    let server = smtp::load_tls(&cert_path, &key_path).unwrap();

    let mut roots = RootCertStore::empty();
    roots.add(generated.cert.der().clone()).unwrap();
    let client =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    (server, Arc::new(client))
}

#[tokio::test]
async fn starttls_upgrades_and_resets_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let (server_tls, client_tls) = tls_pair(dir.path());
    let mut settings = settings();
    settings.tls = Some(server_tls);
    let server = Server::start(settings).await;

    let mut client = server.session().await;
    client.cmd("MAIL FROM:<a@b.example>", "250").await;
    // Re-greet to see the capabilities; then STARTTLS with a NOOP pipelined
    // in clear text, which must be dropped, not run inside TLS.
    let ehlo = client.cmd("EHLO client.test", "250 ").await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    client.send(b"STARTTLS\r\nNOOP\r\n").await;
    client.expect("220 2.0.0").await;
    let mut client = client.into_tls(client_tls, "localhost").await;

    // State reset: EHLO needed again, no transaction left over.
    client.cmd("MAIL FROM:<a@b.example>", "503 5.5.1").await;
    let ehlo = client.cmd("EHLO client.test", "250 ").await;
    assert!(ehlo.starts_with("250-mx.test"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    client.cmd("STARTTLS", "503 5.5.1").await;
    client
        .transaction("a@b.example", &["support@localhost"], MESSAGE, "250 2.0.0")
        .await;
    client.cmd("QUIT", "221").await;
    assert_eq!(server.recorder.messages()[0].1, MESSAGE);
    server.stop().await;
}

#[tokio::test]
async fn starttls_through_the_client_helper() {
    let dir = tempfile::tempdir().unwrap();
    let (server_tls, client_tls) = tls_pair(dir.path());
    let mut settings = settings();
    settings.tls = Some(server_tls);
    let server = Server::start(settings).await;
    let client = server.session().await;
    let mut client = client.starttls(client_tls, "localhost").await;
    client.cmd("EHLO client.test", "250").await;
    client.cmd("NOOP", "250 2.0.0").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_25_mb_message_arrives_intact_while_other_sessions_are_answered() {
    const SIZE: usize = 25 * 1000 * 1000;
    let mut settings = settings();
    settings.max_message_bytes = 26_214_400;
    let server = Server::start(settings).await;
    let line: Vec<u8> = (0..998u32)
        .map(|i| 0x80 + (i % 0x7f) as u8) // 8-bit bytes, never CR or LF
        .chain(*b"\r\n")
        .collect();
    let lines = SIZE / line.len();

    let addr = server.addr;
    let sender_line = line.clone();
    let sender = tokio::spawn(async move {
        let mut client = Client::connect(addr).await;
        client.timeout = Duration::from_secs(60);
        client.expect("220").await;
        client.cmd("EHLO big.test", "250").await;
        client
            .cmd(&format!("MAIL FROM:<a@b.example> SIZE={SIZE}"), "250")
            .await;
        client.cmd("RCPT TO:<support@localhost>", "250").await;
        client.cmd("DATA", "354").await;
        let block: Vec<u8> = sender_line.repeat(64);
        for _ in 0..lines / 64 {
            client.send(&block).await;
        }
        for _ in 0..lines % 64 {
            client.send(&sender_line).await;
        }
        client.send(b".\r\n").await;
        client.expect("250 2.0.0").await;
    });

    // Meanwhile, another session is answered promptly, several times.
    for _ in 0..5 {
        let started = Instant::now();
        let mut other = server.session().await;
        other.cmd("NOOP", "250").await;
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    sender.await.unwrap();

    {
        // Checked in place: a clone would double what this test measures.
        let messages = server.recorder.messages.lock().unwrap();
        let raw = &messages[0].1;
        assert_eq!(raw.len(), lines * line.len());
        assert!(raw.chunks(line.len()).all(|chunk| chunk == line.as_slice()));
    }
    server.stop().await;
}
