//! Configuration: the one TOML file ops write, read in two stages.
//!
//! Stage one is serde into [`RawConfig`], which mirrors the file exactly and
//! refuses unknown keys. Stage two, [`RawConfig::validate`], checks every
//! value and builds the [`Config`] the daemon runs on, collecting *every*
//! error with its key path so an operator fixes the file in one go.
//! `crmgate check-config` runs exactly this code, before any socket is bound.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use regex::Regex;
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::RootCertStore;

/// Where the configuration is looked for when neither `--config` nor
/// `$CRMGATE_CONFIG` names a file.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/crmgate/crmgate.toml";

/// One problem in the configuration, with the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `smtp.listen` or `agents[2].email`.
    pub key: String,
    /// What is wrong and, where it helps, what to write instead.
    pub reason: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {problem}")]
    Syntax {
        origin: String,
        problem: ConfigProblem,
    },
    #[error("{origin}: {}", join_problems(.problems))]
    Invalid {
        origin: String,
        problems: Vec<ConfigProblem>,
    },
}

fn join_problems(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------
// Stage one: the file as written. Its fields mirror the TOML keys one for
// one and mean what the checked sections below say; only this module and
// `check-config` (which prints it) read them.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    pub(crate) gateway: RawGateway,
    pub(crate) smtp: RawSmtp,
    pub(crate) addresses: RawAddresses,
    pub(crate) ticket: RawTicket,
    pub(crate) watch: RawWatch,
    pub(crate) relay: RawRelay,
    pub(crate) auto: RawAuto,
    pub(crate) security: RawSecurity,
    pub(crate) auth: RawAuth,
    pub(crate) store: RawStore,
    pub(crate) metrics: RawMetrics,
    pub(crate) log: RawLog,
    pub(crate) agents: Vec<RawAgent>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawGateway {
    pub(crate) hostname: String,
    pub(crate) state_dir: String,
    pub(crate) language: String,
    pub(crate) display_name: String,
    pub(crate) operator: String,
}

impl Default for RawGateway {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            state_dir: "./crmgate-data".into(),
            language: "fr".into(),
            display_name: "Soutien TI".into(),
            operator: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSmtp {
    pub(crate) listen: String,
    pub(crate) max_message_bytes: i64,
    pub(crate) max_recipients: i64,
    pub(crate) max_sessions: i64,
    pub(crate) max_sessions_per_client: i64,
    pub(crate) tls_cert: String,
    pub(crate) tls_key: String,
}

impl Default for RawSmtp {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:2525".into(),
            max_message_bytes: 26_214_400,
            max_recipients: 100,
            max_sessions: 256,
            max_sessions_per_client: 20,
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAddresses {
    pub(crate) public: String,
    pub(crate) internal: String,
}

impl Default for RawAddresses {
    fn default() -> Self {
        Self {
            public: "support@localhost".into(),
            internal: "support-notes@localhost".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawTicket {
    pub(crate) prefix: String,
    pub(crate) digits: i64,
    pub(crate) pattern: String,
    pub(crate) reopen_on_reply: bool,
    pub(crate) reopen_within_days: i64,
}

impl Default for RawTicket {
    fn default() -> Self {
        Self {
            prefix: "TKT".into(),
            digits: 7,
            pattern: String::new(),
            reopen_on_reply: true,
            reopen_within_days: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawWatch {
    pub(crate) add_cc_on_open: bool,
    pub(crate) max_cc_on_open: i64,
}

impl Default for RawWatch {
    fn default() -> Self {
        Self {
            add_cc_on_open: true,
            max_cc_on_open: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRelay {
    pub(crate) url: String,
    pub(crate) username: String,
    pub(crate) password_file: String,
    pub(crate) ca_file: String,
    pub(crate) retry_initial_seconds: i64,
    pub(crate) retry_max_seconds: i64,
    pub(crate) give_up_after_hours: i64,
}

impl Default for RawRelay {
    fn default() -> Self {
        Self {
            url: "file://./crmgate-data/sent".into(),
            username: String::new(),
            password_file: String::new(),
            ca_file: String::new(),
            retry_initial_seconds: 30,
            retry_max_seconds: 3600,
            give_up_after_hours: 72,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAuto {
    pub(crate) receipt: String,
    pub(crate) closure: bool,
    pub(crate) max_per_address_per_hour: i64,
    pub(crate) max_per_address_per_day: i64,
    pub(crate) max_resends_per_ticket_hour: i64,
    pub(crate) max_resends_per_sender_hour: i64,
    pub(crate) human_lists: Vec<String>,
    pub(crate) templates_dir: String,
}

impl Default for RawAuto {
    fn default() -> Self {
        Self {
            receipt: "all".into(),
            closure: true,
            max_per_address_per_hour: 10,
            max_per_address_per_day: 30,
            max_resends_per_ticket_hour: 20,
            max_resends_per_sender_hour: 200,
            human_lists: Vec::new(),
            templates_dir: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSecurity {
    pub(crate) trusted_relays: Vec<String>,
    pub(crate) authserv_id: String,
    pub(crate) reply_secret_file: String,
}

impl Default for RawSecurity {
    fn default() -> Self {
        Self {
            trusted_relays: vec!["127.0.0.0/8".into(), "::1/128".into()],
            authserv_id: String::new(),
            reply_secret_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAuth {
    pub(crate) verify: bool,
    pub(crate) dns_servers: Vec<String>,
    pub(crate) dns_timeout_seconds: i64,
    pub(crate) dkim_selector: String,
    pub(crate) dkim_key_file: String,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            verify: true,
            dns_servers: Vec::new(),
            dns_timeout_seconds: 5,
            dkim_selector: String::new(),
            dkim_key_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawStore {
    pub(crate) url: String,
    pub(crate) password_file: String,
    pub(crate) ca_file: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawMetrics {
    pub(crate) listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    pub(crate) format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAgent {
    pub(crate) name: String,
    pub(crate) email: String,
    pub(crate) default_notes_list: bool,
}

// ---------------------------------------------------------------------------
// Stage two: checked values.
// ---------------------------------------------------------------------------

/// One language of the helpdesk's fixed texts: each template and phrase
/// exists in each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Fr,
    En,
}

impl Language {
    pub fn code(self) -> &'static str {
        match self {
            Language::Fr => "fr",
            Language::En => "en",
        }
    }
}

/// `[gateway] language`: the languages automatic mail is written in, in
/// the order written. A helpdesk that serves people of both (`fr+en`)
/// writes every text in each, the first one first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Languages {
    Fr,
    En,
    FrEn,
    EnFr,
}

impl Languages {
    /// Each language, in the order written.
    pub fn each(self) -> &'static [Language] {
        match self {
            Languages::Fr => &[Language::Fr],
            Languages::En => &[Language::En],
            Languages::FrEn => &[Language::Fr, Language::En],
            Languages::EnFr => &[Language::En, Language::Fr],
        }
    }

    /// The language written first (the one of a single-language helpdesk).
    pub fn first(self) -> Language {
        match self {
            Languages::Fr | Languages::FrEn => Language::Fr,
            Languages::En | Languages::EnFr => Language::En,
        }
    }
}

/// When a receipt confirmation goes to the requester of a ticket opened by mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptPolicy {
    All,
    Forward,
    None,
}

/// Where outgoing mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayTarget {
    /// One `.eml` file per message in this directory: the embedded default,
    /// so a fresh machine needs no mail server to see what crmgate sends.
    File(PathBuf),
    Smtp {
        host: String,
        port: u16,
        tls: RelayTls,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTls {
    /// Plain SMTP, STARTTLS used when the relay offers it.
    Opportunistic,
    /// `?tls=required`: STARTTLS or give up.
    Required,
    /// `smtps://`: TLS from the first byte.
    Wrapper,
}

/// One `[[agents]]` entry: a person whose believed mail carries an agent's rights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Shown in "Jane Doe via Soutien TI"; may be empty (the address is shown then).
    pub name: String,
    /// Lower-cased: every comparison of addresses in crmgate is case-insensitive.
    pub email: String,
    /// Put on every new ticket's work-notes list, so someone sees each ticket.
    pub default_notes_list: bool,
}

/// `[gateway]`: who crmgate is and where it keeps its state.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// EHLO name, Message-ID domain and the `X-Crmgate-Loop` value that
    /// tells our own mail coming back; lower-cased.
    pub hostname: String,
    /// Holds `crmgate.db` (and, by default, the sent `.eml` files).
    pub state_dir: PathBuf,
    /// Languages of automatic messages, notices and fixed phrases.
    pub language: Languages,
    /// The helpdesk's name in every From: "Jane Doe via <display_name>".
    pub display_name: String,
    /// Where mail to postmaster@ is forwarded; `None` keeps it in quarantine.
    pub operator: Option<String>,
}

/// `[smtp]`: the listener's address and the bounds it enforces.
#[derive(Debug, Clone)]
pub struct Smtp {
    /// Bound once at start; a change needs a restart.
    pub listen: SocketAddr,
    /// Larger messages are refused `552 5.3.4` without being buffered.
    pub max_message_bytes: usize,
    /// More RCPT than this in one transaction: `452 4.5.3`.
    pub max_recipients: usize,
    /// Sessions beyond this are greeted `421 4.7.0` and closed.
    pub max_sessions: usize,
    /// The same from one client (an IPv4 address, an IPv6 /64), the
    /// trusted relays excepted: one host cannot take every slot.
    pub max_sessions_per_client: usize,
    /// STARTTLS is offered only when both files are set.
    pub tls: Option<TlsFiles>,
}

/// `[addresses]`: the two CRM addresses, lower-cased.
#[derive(Debug, Clone)]
pub struct Addresses {
    /// Comments: the address requesters write to, and every public From.
    pub public: String,
    /// Work notes: mail to it (envelope or To/Cc) is internal.
    pub internal: String,
}

/// `[ticket]`: how ticket numbers look and when a reply reopens a ticket.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Letters before the number, e.g. `TKT`.
    pub prefix: String,
    /// Width of the zero-padded number.
    pub digits: usize,
    /// Finds a ticket number in a Subject; has a group named `number`.
    pub pattern: Regex,
    /// A requester's reply to a resolved ticket reopens it.
    pub reopen_on_reply: bool,
    /// How long after its resolution a reply still reopens a ticket; a
    /// later one opens a new ticket (0: always). Days of 86,400 seconds.
    pub reopen_within_days: u32,
}

/// `[watch]`: who joins a new ticket's watch list.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The other To/Cc of the opening mail join the watch list.
    pub add_cc_on_open: bool,
    /// More Cc than this on a non-agent's opening mail: none join, so a
    /// stranger cannot put hundreds of addresses on a watch list.
    pub max_cc_on_open: usize,
}

/// `[relay]`: where outgoing mail goes and how long it is retried.
#[derive(Debug, Clone)]
pub struct Relay {
    /// `relay.url`, parsed: an SMTP relay or a directory of `.eml` files.
    pub target: RelayTarget,
    /// AUTH user; set together with `password_file`.
    pub username: Option<String>,
    /// The password lives in a file so the configuration can be world-readable.
    pub password_file: Option<PathBuf>,
    /// `relay.ca_file`: CA certificates trusted for the relay's TLS on top of
    /// the web PKI roots, for a relay with a certificate from an internal CA.
    /// Read and checked once, at load: the relay needs a restart to see a
    /// new bundle, like every other relay setting.
    pub ca_certificates: Vec<CertificateDer<'static>>,
    /// First delay after a temporary failure; it doubles on each retry.
    pub retry_initial_seconds: u64,
    /// Ceiling of the doubling delay.
    pub retry_max_seconds: u64,
    /// A row still undelivered this long after it was queued is failed.
    pub give_up_after_hours: u64,
}

/// `[auto]`: automatic messages and the caps that stop mail loops.
#[derive(Debug, Clone)]
pub struct Auto {
    /// Which new tickets get a receipt confirmation.
    pub receipt: ReceiptPolicy,
    /// A closure notice goes to the watch group when a ticket is resolved.
    pub closure: bool,
    /// Automatic messages (receipts, closures, notices) to one address per hour.
    pub max_per_address_per_hour: u32,
    /// The same per day.
    pub max_per_address_per_day: u32,
    /// Re-sends of non-agent mail to one recipient on one ticket per hour, so
    /// two auto-responders without headers cannot ping-pong through crmgate.
    pub max_resends_per_ticket_hour: u32,
    /// Copies that one non-agent sender's mail causes per hour, across all
    /// tickets (each recipient of each copy counts): the per-ticket cap
    /// does not bound a sender who opens a new ticket each time.
    pub max_resends_per_sender_hour: u32,
    /// List-Ids (without angle brackets) or list addresses, lower-cased,
    /// whose mail is a person's mail rather than automatic.
    pub human_lists: Vec<String>,
    /// Overrides the built-in fr/en templates, file by file.
    pub templates_dir: Option<PathBuf>,
}

/// `[security]`: whose From is believed, and the key of signed addresses.
#[derive(Debug, Clone)]
pub struct Security {
    /// SMTP peers that authenticate their senders (the submission server):
    /// an agent's From from them is believed.
    pub trusted_relays: Vec<IpNet>,
    /// `Authentication-Results` of this id (lower-cased) are believed.
    pub authserv_id: Option<String>,
    /// Where the key came from, for messages.
    pub reply_secret_file: Option<PathBuf>,
    /// Content of `reply_secret_file`, trimmed: the key of signed reply and
    /// bounce addresses. Read once, at load, so every stage signs with the
    /// same key until the configuration is loaded again.
    pub reply_secret: Option<Vec<u8>>,
}

/// `[auth]`: crmgate's own SPF/DKIM/DMARC check and its DKIM signature.
#[derive(Debug, Clone)]
pub struct Auth {
    /// Check agents' mail that no trusted relay or `authserv_id` vouches for.
    pub verify: bool,
    /// Resolvers to ask; empty: those of `/etc/resolv.conf`.
    pub dns_servers: Vec<SocketAddr>,
    /// Bound on each DNS query.
    pub dns_timeout: std::time::Duration,
    /// The signing key, read and checked at load (so `check-config` names a
    /// weak or unreadable key), with its selector; `None`: mail goes unsigned.
    pub dkim: Option<std::sync::Arc<crate::auth::DkimSigner>>,
}

/// The validated configuration, nested as the TOML file is. Addresses are
/// stored lower-cased.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from, for messages: a path or "embedded default".
    pub origin: String,
    /// `[gateway]`: name, state directory, language, display name, operator.
    pub gateway: Gateway,
    /// `[smtp]`: the listener and its bounds.
    pub smtp: Smtp,
    /// `[addresses]`: the public and the internal CRM address.
    pub addresses: Addresses,
    /// `[ticket]`: numbers and reopening.
    pub ticket: Ticket,
    /// `[watch]`: who joins a new ticket's watch list.
    pub watch: Watch,
    /// `[relay]`: where outgoing mail goes, and its retries.
    pub relay: Relay,
    /// `[auto]`: automatic messages and the caps against loops.
    pub auto: Auto,
    /// `[security]`: whose From is believed, and the reply secret.
    pub security: Security,
    /// `[auth]`: crmgate's own SPF/DKIM/DMARC check and DKIM signing.
    pub auth: Auth,
    /// `[store]`: which database holds the ticket log.
    pub store: Store,
    /// `[metrics]`: the Prometheus and health endpoint.
    pub metrics: Metrics,
    /// `[log]`: how log lines are written.
    pub log: Log,
    /// Validated, lower-cased, without duplicates.
    pub agents: Vec<Agent>,
    /// The raw form, printed by `check-config` as the effective configuration.
    pub raw: RawConfig,
}

/// `[store]`: SQLite in the state directory, or a PostgreSQL database
/// that several instances may share.
#[derive(Clone, PartialEq, Eq)]
pub enum Store {
    /// The embedded default: `state_dir/crmgate.db`.
    Sqlite,
    /// A `postgres://` URL and the password read from `password_file`.
    Postgres {
        /// As configured, without a password.
        url: String,
        /// Read once when the configuration is loaded; never printed.
        password: Option<String>,
        /// `ca_file`: CA certificates trusted for the server's TLS on top
        /// of the web PKI's.
        ca_certificates: Vec<CertificateDer<'static>>,
    },
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Sqlite => f.write_str("Sqlite"),
            Store::Postgres {
                url,
                password,
                ca_certificates,
            } => f
                .debug_struct("Postgres")
                .field("url", url)
                .field("password", &password.as_ref().map(|_| "…"))
                .field("ca_certificates", &ca_certificates.len())
                .finish(),
        }
    }
}

/// `[metrics]`: the HTTP listener of `/metrics` and `/healthz`.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `None`: no HTTP listener. Bound once at start, like `smtp.listen`.
    pub listen: Option<SocketAddr>,
}

/// How each log line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// tracing's readable lines.
    Text,
    /// One JSON object per line, for a log collector.
    Json,
}

/// `[log]`: read once, before the first line is written; a restart applies a change.
#[derive(Debug, Clone)]
pub struct Log {
    /// Text for a terminal or the journal, JSON for a collector.
    pub format: LogFormat,
}

/// The certificate and key of STARTTLS, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key; read by the listener at start.
    pub key: PathBuf,
}

impl Config {
    /// The database file inside the state directory.
    pub fn database_path(&self) -> PathBuf {
        self.gateway.state_dir.join("crmgate.db")
    }

    /// The embedded default: every key at its default, no agents.
    pub fn embedded_default() -> Config {
        match RawConfig::default().validate("embedded default") {
            Ok(config) => config,
            // The defaults are constants checked by a unit test.
            Err(e) => unreachable!("embedded default is invalid: {e}"),
        }
    }

    /// Parse and validate a configuration text.
    ///
    /// # Errors
    /// `Syntax` for TOML that does not parse or an unknown key / wrong type
    /// (the first one: serde stops there), `Invalid` with every bad value.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw = RawConfig::parse(text, origin)?;
        raw.validate(origin)
    }

    /// Read the configuration a command runs on, in the SPEC's lookup order:
    /// `--config FILE`, `$CRMGATE_CONFIG`, `/etc/crmgate/crmgate.toml`, then
    /// the embedded default. A file named explicitly must exist.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os("CRMGATE_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let path = match explicit.map(Path::to_path_buf).or(from_env) {
            Some(path) => path,
            None => {
                let system = PathBuf::from(SYSTEM_CONFIG_PATH);
                if !system.exists() {
                    return Ok(Config::embedded_default());
                }
                system
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// The agent with this address (any case), if it is one.
    pub fn agent(&self, address: &str) -> Option<&Agent> {
        let address = address.to_ascii_lowercase();
        self.agents.iter().find(|a| a.email == address)
    }
}

impl RawConfig {
    /// # Errors
    /// `Syntax` naming the key path of the first unknown key or wrong type.
    pub fn parse(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
        let syntax = |key: String, reason: String| ConfigError::Syntax {
            origin: origin.to_string(),
            problem: ConfigProblem { key, reason },
        };
        let de = toml::Deserializer::parse(text).map_err(|e| {
            let (key, reason) = explain_syntax(text, e.span(), e.message());
            syntax(key, reason)
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                "(file)".to_string()
            } else {
                key
            };
            syntax(key, e.into_inner().message().to_string())
        })
    }

    /// Check every value, section by section, collecting all problems.
    ///
    /// # Errors
    /// `Invalid` with one [`ConfigProblem`] per bad key.
    pub fn validate(self, origin: &str) -> Result<Config, ConfigError> {
        let mut problems = Problems::default();
        let gateway = self.gateway.validate(&mut problems);
        let smtp = self.smtp.validate(&mut problems);
        let addresses = self.addresses.validate(&mut problems);
        let ticket = self.ticket.validate(&mut problems);
        let watch = Watch {
            add_cc_on_open: self.watch.add_cc_on_open,
            max_cc_on_open: usize::try_from(self.watch.max_cc_on_open).unwrap_or_else(|_| {
                problems.bad(
                    "watch.max_cc_on_open",
                    format!("{} must be 0 or more", self.watch.max_cc_on_open),
                );
                0
            }),
        };
        let relay = self.relay.validate(&mut problems);
        let auto = self.auto.validate(&mut problems);
        let security = self.security.validate(&mut problems);
        let auth = self.auth.validate(&addresses, &mut problems);
        let store = self.store.validate(&mut problems);
        let metrics = self.metrics.validate(&mut problems);
        let log = self.log.validate(&mut problems);
        let agents = validate_agents(&self.agents, &self.addresses, &mut problems);
        if !problems.0.is_empty() {
            return Err(ConfigError::Invalid {
                origin: origin.to_string(),
                problems: problems.0,
            });
        }
        Ok(Config {
            origin: origin.to_string(),
            gateway,
            smtp,
            addresses,
            ticket,
            watch,
            relay,
            auto,
            security,
            auth,
            store,
            metrics,
            log,
            agents,
            raw: self,
        })
    }
}

/// Every problem found so far, in the order of the file.
#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn bad(&mut self, key: &str, reason: String) {
        self.0.push(ConfigProblem {
            key: key.to_string(),
            reason,
        });
    }

    /// A positive whole number that fits `T`, or a problem and `T::default()`.
    fn positive<T: TryFrom<i64> + Default>(&mut self, key: &str, value: i64) -> T {
        match T::try_from(value) {
            Ok(v) if value > 0 => v,
            _ => {
                self.bad(key, format!("{value} must be a positive whole number"));
                T::default()
            }
        }
    }

    /// An optional file that must be readable when it is set.
    fn readable_file(&mut self, key: &str, value: &str) -> Option<PathBuf> {
        let path = (!value.is_empty()).then(|| PathBuf::from(value))?;
        if let Err(e) = std::fs::metadata(&path) {
            self.bad(key, format!("cannot read {}: {e}", path.display()));
        }
        Some(path)
    }
}

impl RawGateway {
    fn validate(&self, p: &mut Problems) -> Gateway {
        if !is_domain(&self.hostname) {
            p.bad(
                "gateway.hostname",
                format!("{:?} is not a host name", self.hostname),
            );
        }
        if self.state_dir.trim().is_empty() {
            p.bad("gateway.state_dir", "must not be empty".into());
        }
        let language = match self.language.as_str() {
            "fr" => Languages::Fr,
            "en" => Languages::En,
            "fr+en" => Languages::FrEn,
            "en+fr" => Languages::EnFr,
            other => {
                p.bad(
                    "gateway.language",
                    format!("{other:?} is not \"fr\", \"en\", \"fr+en\" or \"en+fr\""),
                );
                Languages::Fr
            }
        };
        if self.display_name.trim().is_empty() || self.display_name.contains(['\r', '\n']) {
            p.bad("gateway.display_name", "must be one non-empty line".into());
        }
        let operator = if self.operator.is_empty() {
            None
        } else if is_address(&self.operator) {
            Some(self.operator.to_ascii_lowercase())
        } else {
            p.bad(
                "gateway.operator",
                format!("{:?} is not a mail address", self.operator),
            );
            None
        };
        Gateway {
            hostname: self.hostname.to_ascii_lowercase(),
            state_dir: PathBuf::from(&self.state_dir),
            language,
            display_name: self.display_name.trim().to_string(),
            operator,
        }
    }
}

impl RawSmtp {
    fn validate(&self, p: &mut Problems) -> Smtp {
        let listen = self.listen.parse::<SocketAddr>().unwrap_or_else(|e| {
            p.bad(
                "smtp.listen",
                format!("{:?} is not an address:port ({e})", self.listen),
            );
            SocketAddr::from(([127, 0, 0, 1], 2525))
        });
        let max_message_bytes = p.positive("smtp.max_message_bytes", self.max_message_bytes);
        let max_recipients = p.positive("smtp.max_recipients", self.max_recipients);
        let max_sessions = p.positive("smtp.max_sessions", self.max_sessions);
        let max_sessions_per_client =
            p.positive("smtp.max_sessions_per_client", self.max_sessions_per_client);
        let tls = match (self.tls_cert.is_empty(), self.tls_key.is_empty()) {
            (true, true) => None,
            (false, false) => Some(TlsFiles {
                cert: self.tls_cert.clone().into(),
                key: self.tls_key.clone().into(),
            }),
            (true, false) => {
                p.bad(
                    "smtp.tls_cert",
                    "tls_key is set but tls_cert is empty".into(),
                );
                None
            }
            (false, true) => {
                p.bad(
                    "smtp.tls_key",
                    "tls_cert is set but tls_key is empty".into(),
                );
                None
            }
        };
        if let Some(files) = &tls {
            for (key, path) in [("smtp.tls_cert", &files.cert), ("smtp.tls_key", &files.key)] {
                if let Err(e) = std::fs::metadata(path) {
                    p.bad(key, format!("cannot read {}: {e}", path.display()));
                }
            }
        }
        Smtp {
            listen,
            max_message_bytes,
            max_recipients,
            max_sessions,
            max_sessions_per_client,
            tls,
        }
    }
}

impl RawAddresses {
    fn validate(&self, p: &mut Problems) -> Addresses {
        for (key, value) in [
            ("addresses.public", &self.public),
            ("addresses.internal", &self.internal),
        ] {
            if !is_address(value) {
                p.bad(key, format!("{value:?} is not a mail address"));
            } else if value.split('@').next().is_some_and(|l| l.contains('+')) {
                p.bad(
                    key,
                    format!("{value:?}: a CRM address takes no +tag, crmgate adds its own"),
                );
            }
        }
        if self.public.eq_ignore_ascii_case(&self.internal) {
            p.bad(
                "addresses.internal",
                "must differ from addresses.public".into(),
            );
        }
        Addresses {
            public: self.public.to_ascii_lowercase(),
            internal: self.internal.to_ascii_lowercase(),
        }
    }
}

impl RawTicket {
    fn validate(&self, p: &mut Problems) -> Ticket {
        if self.prefix.is_empty() || !self.prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
            p.bad(
                "ticket.prefix",
                format!("{:?} must be letters or digits", self.prefix),
            );
        }
        let digits = match self.digits {
            1..=18 => self.digits as usize,
            other => {
                p.bad("ticket.digits", format!("{other} is not between 1 and 18"));
                7
            }
        };
        let pattern_text = if self.pattern.is_empty() {
            default_pattern(&self.prefix, digits)
        } else {
            self.pattern.clone()
        };
        let pattern = match regex::RegexBuilder::new(&pattern_text)
            .case_insensitive(self.pattern.is_empty())
            .build()
        {
            Ok(re) if re.capture_names().any(|n| n == Some("number")) => re,
            Ok(_) => {
                p.bad(
                    "ticket.pattern",
                    "has no group named `number`, e.g. (?P<number>...)".into(),
                );
                fallback_pattern()
            }
            Err(e) => {
                p.bad("ticket.pattern", format!("is not a valid regex: {e}"));
                fallback_pattern()
            }
        };
        let reopen_within_days = u32::try_from(self.reopen_within_days).unwrap_or_else(|_| {
            p.bad(
                "ticket.reopen_within_days",
                format!(
                    "{} must be a number of days from 0 to {}",
                    self.reopen_within_days,
                    u32::MAX
                ),
            );
            30
        });
        Ticket {
            prefix: self.prefix.clone(),
            digits,
            pattern,
            reopen_on_reply: self.reopen_on_reply,
            reopen_within_days,
        }
    }
}

impl RawRelay {
    fn validate(&self, p: &mut Problems) -> Relay {
        let target = parse_relay_url(&self.url).unwrap_or_else(|reason| {
            p.bad("relay.url", reason);
            RelayTarget::File(PathBuf::from("./crmgate-data/sent"))
        });
        let username = (!self.username.is_empty()).then(|| self.username.clone());
        let password_file = p.readable_file("relay.password_file", &self.password_file);
        if username.is_some() != password_file.is_some() {
            p.bad(
                "relay.username",
                "username and password_file go together".into(),
            );
        }
        let ca_certificates = if self.ca_file.is_empty() {
            Vec::new()
        } else {
            read_ca_bundle(Path::new(&self.ca_file)).unwrap_or_else(|reason| {
                p.bad("relay.ca_file", reason);
                Vec::new()
            })
        };
        let retry_initial_seconds =
            p.positive("relay.retry_initial_seconds", self.retry_initial_seconds);
        let retry_max_seconds = p.positive("relay.retry_max_seconds", self.retry_max_seconds);
        if self.retry_max_seconds < self.retry_initial_seconds {
            p.bad(
                "relay.retry_max_seconds",
                "must not be below retry_initial_seconds".into(),
            );
        }
        let give_up_after_hours = p.positive("relay.give_up_after_hours", self.give_up_after_hours);
        Relay {
            target,
            username,
            password_file,
            ca_certificates,
            retry_initial_seconds,
            retry_max_seconds,
            give_up_after_hours,
        }
    }
}

impl RawAuto {
    fn validate(&self, p: &mut Problems) -> Auto {
        let receipt = match self.receipt.as_str() {
            "all" => ReceiptPolicy::All,
            "forward" => ReceiptPolicy::Forward,
            "none" => ReceiptPolicy::None,
            other => {
                p.bad(
                    "auto.receipt",
                    format!("{other:?} is not \"all\", \"forward\" or \"none\""),
                );
                ReceiptPolicy::All
            }
        };
        let templates_dir =
            (!self.templates_dir.is_empty()).then(|| PathBuf::from(&self.templates_dir));
        if let Some(dir) = &templates_dir {
            if !dir.is_dir() {
                p.bad(
                    "auto.templates_dir",
                    format!("{} is not a directory", dir.display()),
                );
            }
        }
        Auto {
            receipt,
            closure: self.closure,
            max_per_address_per_hour: p.positive(
                "auto.max_per_address_per_hour",
                self.max_per_address_per_hour,
            ),
            max_per_address_per_day: p
                .positive("auto.max_per_address_per_day", self.max_per_address_per_day),
            max_resends_per_ticket_hour: p.positive(
                "auto.max_resends_per_ticket_hour",
                self.max_resends_per_ticket_hour,
            ),
            max_resends_per_sender_hour: p.positive(
                "auto.max_resends_per_sender_hour",
                self.max_resends_per_sender_hour,
            ),
            human_lists: self
                .human_lists
                .iter()
                .map(|l| {
                    l.trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_ascii_lowercase()
                })
                .filter(|l| !l.is_empty())
                .collect(),
            templates_dir,
        }
    }
}

impl RawAuth {
    fn validate(&self, addresses: &Addresses, p: &mut Problems) -> Auth {
        let mut dns_servers = Vec::new();
        for (i, server) in self.dns_servers.iter().enumerate() {
            let parsed = server.parse::<SocketAddr>().ok().or_else(|| {
                server
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            match parsed {
                Some(address) => dns_servers.push(address),
                None => p.bad(
                    &format!("auth.dns_servers[{i}]"),
                    format!("{server:?} is not an ip or ip:port"),
                ),
            }
        }
        let dns_timeout = std::time::Duration::from_secs(
            p.positive("auth.dns_timeout_seconds", self.dns_timeout_seconds),
        );
        let dkim = match (self.dkim_selector.is_empty(), self.dkim_key_file.is_empty()) {
            (true, true) => None,
            (false, true) => {
                p.bad(
                    "auth.dkim_key_file",
                    "dkim_selector is set but dkim_key_file is empty".into(),
                );
                None
            }
            (true, false) => {
                p.bad(
                    "auth.dkim_selector",
                    "dkim_key_file is set but dkim_selector is empty".into(),
                );
                None
            }
            (false, false) => {
                let domains: Vec<&str> = [&addresses.public, &addresses.internal]
                    .iter()
                    .filter_map(|a| a.rsplit_once('@').map(|(_, d)| d))
                    .collect();
                match crate::auth::DkimSigner::load(
                    Path::new(&self.dkim_key_file),
                    &self.dkim_selector,
                    &domains,
                ) {
                    Ok(signer) => Some(std::sync::Arc::new(signer)),
                    Err(e) => {
                        p.bad("auth.dkim_key_file", e.to_string());
                        None
                    }
                }
            }
        };
        Auth {
            verify: self.verify,
            dns_servers,
            dns_timeout,
            dkim,
        }
    }
}

impl RawSecurity {
    fn validate(&self, p: &mut Problems) -> Security {
        let mut trusted_relays = Vec::new();
        for (i, net) in self.trusted_relays.iter().enumerate() {
            match parse_net(net) {
                Some(n) => trusted_relays.push(n),
                None => p.bad(
                    &format!("security.trusted_relays[{i}]"),
                    format!("{net:?} is not an address or CIDR network"),
                ),
            }
        }
        let authserv_id =
            (!self.authserv_id.is_empty()).then(|| self.authserv_id.to_ascii_lowercase());
        let reply_secret_file =
            (!self.reply_secret_file.is_empty()).then(|| PathBuf::from(&self.reply_secret_file));
        let reply_secret = reply_secret_file
            .as_ref()
            .and_then(|path| match std::fs::read(path) {
                Ok(key) if key.iter().filter(|b| !b.is_ascii_whitespace()).count() >= 16 => {
                    Some(key.trim_ascii().to_vec())
                }
                Ok(_) => {
                    p.bad(
                        "security.reply_secret_file",
                        "holds fewer than 16 bytes of key".into(),
                    );
                    None
                }
                Err(e) => {
                    p.bad(
                        "security.reply_secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    );
                    None
                }
            });
        Security {
            trusted_relays,
            authserv_id,
            reply_secret_file,
            reply_secret,
        }
    }
}

/// A TOML syntax error as an operator can act on it: the key of the line
/// it is on (`smtp.listen`), the line with its number, and the fix.
fn explain_syntax(
    text: &str,
    span: Option<std::ops::Range<usize>>,
    message: &str,
) -> (String, String) {
    let message = message.trim();
    let Some(at) = span.map(|s| s.start.min(text.len())) else {
        return ("(file)".into(), message.to_string());
    };
    let number = text[..at].matches('\n').count() + 1;
    let line = text.lines().nth(number - 1).unwrap_or("").trim();
    let section = text
        .lines()
        .take(number - 1)
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix('[')
                .and_then(|l| l.split(']').next())
                .map(|name| name.trim_matches(['[', ' ']).to_string())
        })
        .last();
    let Some((name, value)) = line.split_once('=') else {
        return (
            section.unwrap_or_else(|| "(file)".into()),
            format!("line {number}: `{line}`: {message}; write key = value, or [section] on a line of its own"),
        );
    };
    let name = name.trim();
    let value = value.split('#').next().unwrap_or("").trim();
    let key = match section {
        Some(section) if !section.is_empty() => format!("{section}.{name}"),
        _ => name.to_string(),
    };
    let quoted = value.starts_with(['"', '\'', '[', '{']);
    let literal = value == "true" || value == "false" || value.parse::<f64>().is_ok();
    let fix = if !quoted && !literal && !value.is_empty() {
        format!("a text value takes double quotes: {name} = \"{value}\"")
    } else if value.is_empty() {
        format!(
            "give a value: {name} = \"…\" (config/crmgate.toml shows each key with its default)"
        )
    } else {
        "see config/crmgate.toml for the form of each key (text in double quotes, lists in [ ])"
            .into()
    };
    (
        key,
        format!("line {number}: `{line}` is not valid TOML ({message}); {fix}"),
    )
}

/// The state directory can be created and written: checked by
/// `check-config` and before `serve` opens the database, so a directory
/// the service user cannot write is named once, as the key it comes from.
///
/// # Errors
/// `Invalid` naming `gateway.state_dir`.
pub fn check_state_dir(config: &Config) -> Result<(), ConfigError> {
    let dir = &config.gateway.state_dir;
    let problem = |reason: String| ConfigError::Invalid {
        origin: config.origin.clone(),
        problems: vec![ConfigProblem {
            key: "gateway.state_dir".into(),
            reason,
        }],
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| problem(format!("cannot create {}: {e}", dir.display())))?;
    let probe = dir.join(format!(".crmgate-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| problem(format!("cannot write in {}: {e}", dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

impl RawStore {
    fn validate(&self, p: &mut Problems) -> Store {
        let url = self.url.trim();
        if url.is_empty() {
            if !self.password_file.is_empty() {
                p.bad(
                    "store.password_file",
                    "is only read with a PostgreSQL store.url".into(),
                );
            }
            if !self.ca_file.is_empty() {
                p.bad(
                    "store.ca_file",
                    "is only read with a PostgreSQL store.url (crmgate store copy takes --ca-file)"
                        .into(),
                );
            }
            return Store::Sqlite;
        }
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            p.bad(
                "store.url",
                format!("{url:?} is neither empty (SQLite) nor a postgres:// URL"),
            );
            return Store::Sqlite;
        }
        match url.parse::<postgres::Config>() {
            Err(e) => p.bad(
                "store.url",
                format!("{url:?} is not a PostgreSQL URL ({e}), e.g. \"postgres://user@host:5432/dbname\""),
            ),
            Ok(c) if c.get_password().is_some() => p.bad(
                "store.url",
                "holds a password: put it in store.password_file".into(),
            ),
            Ok(_) => {}
        }
        let password = if self.password_file.is_empty() {
            None
        } else {
            match std::fs::read_to_string(&self.password_file) {
                Ok(text) => Some(text.trim_end_matches(['\n', '\r']).to_string()),
                Err(e) => {
                    p.bad(
                        "store.password_file",
                        format!("cannot read {}: {e}", self.password_file),
                    );
                    None
                }
            }
        };
        let ca_certificates = if self.ca_file.is_empty() {
            Vec::new()
        } else {
            read_ca_bundle(Path::new(&self.ca_file)).unwrap_or_else(|reason| {
                p.bad("store.ca_file", reason);
                Vec::new()
            })
        };
        Store::Postgres {
            url: url.to_string(),
            password,
            ca_certificates,
        }
    }
}

impl RawMetrics {
    fn validate(&self, p: &mut Problems) -> Metrics {
        let listen = if self.listen.is_empty() {
            None
        } else {
            match self.listen.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(e) => {
                    p.bad(
                        "metrics.listen",
                        format!(
                            "{:?} is not an address:port ({e}), e.g. \"127.0.0.1:9325\"",
                            self.listen
                        ),
                    );
                    None
                }
            }
        };
        Metrics { listen }
    }
}

impl RawLog {
    fn validate(&self, p: &mut Problems) -> Log {
        let format = match self.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                p.bad(
                    "log.format",
                    format!("{other:?} is not \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };
        Log { format }
    }
}

/// The `[[agents]]`, each a distinct address that is not a CRM address.
fn validate_agents(raw: &[RawAgent], addresses: &RawAddresses, p: &mut Problems) -> Vec<Agent> {
    let mut agents = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, agent) in raw.iter().enumerate() {
        let email = agent.email.trim().to_ascii_lowercase();
        if !is_address(&email) {
            p.bad(
                &format!("agents[{i}].email"),
                format!("{:?} is not a mail address", agent.email),
            );
            continue;
        }
        if email == addresses.public.to_ascii_lowercase()
            || email == addresses.internal.to_ascii_lowercase()
        {
            p.bad(&format!("agents[{i}].email"), "is a CRM address".into());
            continue;
        }
        if !seen.insert(email.clone()) {
            p.bad(
                &format!("agents[{i}].email"),
                format!("{email} is listed twice"),
            );
            continue;
        }
        if agent.name.contains(['\r', '\n']) {
            p.bad(&format!("agents[{i}].name"), "must be one line".into());
        }
        agents.push(Agent {
            name: agent.name.trim().to_string(),
            email,
            default_notes_list: agent.default_notes_list,
        });
    }
    agents
}

/// The pattern derived from prefix and digits: the prefix, any case, then
/// exactly `digits` digits not followed by another digit.
fn default_pattern(prefix: &str, digits: usize) -> String {
    format!(
        r"\b(?P<number>{}[0-9]{{{digits}}})(?:[^0-9]|$)",
        regex::escape(prefix)
    )
}

fn fallback_pattern() -> Regex {
    match Regex::new(&default_pattern("TKT", 7)) {
        Ok(re) => re,
        Err(e) => unreachable!("constant pattern: {e}"),
    }
}

fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// The certificates of a PEM bundle (other PEM sections, such as a key, are
/// skipped), each checked to be usable as a trust anchor.
///
/// # Errors
/// The file cannot be read, is not PEM, holds no certificate, or holds one
/// that rustls cannot use as a root; the reason names the file.
pub(crate) fn read_ca_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM bundle: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{} holds no certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    let mut roots = RootCertStore::empty();
    for (i, certificate) in certificates.iter().enumerate() {
        roots.add(certificate.clone()).map_err(|e| {
            format!(
                "certificate {} of {} cannot be a CA: {e}",
                i + 1,
                path.display()
            )
        })?;
    }
    Ok(certificates)
}

/// Parse `smtp://host:port`, `smtp://host:587?tls=required`,
/// `smtps://host:465` or `file://DIR`.
pub fn parse_relay_url(url: &str) -> Result<RelayTarget, String> {
    if let Some(dir) = url.strip_prefix("file://") {
        if dir.is_empty() {
            return Err("file:// needs a directory, e.g. file://./crmgate-data/sent".into());
        }
        return Ok(RelayTarget::File(PathBuf::from(dir)));
    }
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!("{url:?} is not smtp://host:port, smtps://host:port or file://DIR")
    })?;
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = authority.trim_end_matches('/');
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number"))?;
            (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                Some(port),
            )
        }
        _ => (authority.to_string(), None),
    };
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    let mut tls = match scheme {
        "smtp" => RelayTls::Opportunistic,
        "smtps" => RelayTls::Wrapper,
        other => return Err(format!("unknown scheme {other:?}: use smtp, smtps or file")),
    };
    if let Some(query) = query {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair {
                "tls=required" if scheme == "smtp" => tls = RelayTls::Required,
                "tls=opportunistic" if scheme == "smtp" => tls = RelayTls::Opportunistic,
                other => {
                    return Err(format!(
                        "unknown option {other:?}: only tls=required is understood"
                    ))
                }
            }
        }
    }
    let port = port.unwrap_or(match tls {
        RelayTls::Wrapper => 465,
        _ => 25,
    });
    Ok(RelayTarget::Smtp { host, port, tls })
}

/// A rough check that catches typos, not a full RFC 5322 parser.
pub fn is_address(text: &str) -> bool {
    match text.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !local
                    .chars()
                    .any(|c| c.is_whitespace() || c == '<' || c == '>' || c == ',')
                && is_domain(domain)
        }
        None => false,
    }
}

fn is_domain(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match Config::from_toml(text, "test") {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(ConfigError::Syntax { problem, .. }) => vec![problem],
            Err(other) => panic!("unexpected {other}"),
            Ok(_) => vec![],
        }
    }

    #[test]
    fn embedded_default_is_valid_and_matches_spec() {
        let c = Config::embedded_default();
        assert_eq!(c.smtp.listen, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(c.gateway.state_dir, PathBuf::from("./crmgate-data"));
        assert_eq!(
            c.relay.target,
            RelayTarget::File(PathBuf::from("./crmgate-data/sent"))
        );
        assert_eq!(c.addresses.public, "support@localhost");
        assert_eq!(c.gateway.language, Languages::Fr);
        assert!(c.agents.is_empty());
        assert_eq!(c.security.trusted_relays.len(), 2);
    }

    #[test]
    fn repository_config_file_equals_embedded_default() {
        let text = include_str!("../config/crmgate.toml");
        let c = Config::from_toml(text, "config/crmgate.toml").unwrap();
        let d = Config::embedded_default();
        // Compare everything but the agents: the sample shows one, commented out.
        let mut raw = c.raw.clone();
        raw.agents.clear();
        assert_eq!(
            toml::to_string(&raw).unwrap(),
            toml::to_string(&d.raw).unwrap()
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let p = problems("[smtp]\nlisten = \"127.0.0.1:25\"\nlsten = 1\n");
        assert_eq!(p[0].key, "smtp.lsten");
        let p = problems("[[agents]]\nemail = \"a@b.c\"\nmail = \"x\"\n");
        assert_eq!(p[0].key, "agents[0].mail");
    }

    #[test]
    fn bad_values_are_all_reported_with_their_keys() {
        let p = problems(
            "[gateway]\nlanguage = \"de\"\n[smtp]\nlisten = \"nowhere\"\nmax_sessions = 0\n\
             [ticket]\npattern = \"TKT[0-9]+\"\n[relay]\nurl = \"ftp://x\"\n\
             [security]\ntrusted_relays = [\"10.0.0.0/33\"]\n",
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "gateway.language",
                "smtp.listen",
                "smtp.max_sessions",
                "ticket.pattern",
                "relay.url",
                "security.trusted_relays[0]"
            ]
        );
    }

    #[test]
    fn the_reopen_window_is_30_days_by_default_and_never_negative() {
        assert_eq!(Config::embedded_default().ticket.reopen_within_days, 30);
        let c = Config::from_toml("[ticket]\nreopen_within_days = 0\n", "test").unwrap();
        assert_eq!(c.ticket.reopen_within_days, 0);
        let p = problems("[ticket]\nreopen_within_days = -1\n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "ticket.reopen_within_days");
        let p = problems("[ticket]\nreopen_within_days = \"a month\"\n");
        assert_eq!(p[0].key, "ticket.reopen_within_days");
    }

    #[test]
    fn language_is_one_or_both_in_either_order() {
        for (text, languages, each) in [
            ("fr", Languages::Fr, &[Language::Fr][..]),
            ("en", Languages::En, &[Language::En]),
            ("fr+en", Languages::FrEn, &[Language::Fr, Language::En]),
            ("en+fr", Languages::EnFr, &[Language::En, Language::Fr]),
        ] {
            let c = Config::from_toml(&format!("[gateway]\nlanguage = \"{text}\"\n"), "test")
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(c.gateway.language, languages);
            assert_eq!(c.gateway.language.each(), each);
            assert_eq!(c.gateway.language.first(), each[0]);
        }
        for bad in ["de", "fr+de", "fr,en", "FR", "fr+fr", ""] {
            let p = problems(&format!("[gateway]\nlanguage = \"{bad}\"\n"));
            assert_eq!(p.len(), 1, "{bad}: {p:?}");
            assert_eq!(p[0].key, "gateway.language");
            assert!(p[0].reason.contains("fr+en"), "{bad}: {}", p[0].reason);
        }
    }

    #[test]
    fn wrong_type_names_the_key() {
        let p = problems("[smtp]\nmax_recipients = \"many\"\n");
        assert_eq!(p[0].key, "smtp.max_recipients");
    }

    #[test]
    fn relay_ca_file_is_read_at_load_and_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let with_ca = |path: &Path| {
            format!(
                "[relay]\nurl = \"smtp://mx.example.org\"\nca_file = {:?}\n",
                path.display().to_string()
            )
        };
        let reasons = |text: &str| {
            problems(text)
                .into_iter()
                .map(|p| format!("{}: {}", p.key, p.reason))
                .collect::<Vec<_>>()
        };

        let missing = dir.path().join("missing.pem");
        let r = reasons(&with_ca(&missing));
        assert!(
            r.len() == 1 && r[0].starts_with("relay.ca_file: cannot read"),
            "{r:?}"
        );

        // A key file given by mistake: PEM, but no certificate in it.
        let generated = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let key_only = dir.path().join("key.pem");
        std::fs::write(&key_only, generated.signing_key.serialize_pem()).unwrap();
        let r = reasons(&with_ca(&key_only));
        assert!(
            r.len() == 1 && r[0].starts_with("relay.ca_file:") && r[0].contains("no certificate"),
            "{r:?}"
        );

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let r = reasons(&with_ca(&garbage));
        assert!(
            r.len() == 1 && r[0].starts_with("relay.ca_file:") && r[0].contains("cannot be a CA"),
            "{r:?}"
        );

        // A bundle of two, with text between them as bundles often have.
        let other = rcgen::generate_simple_self_signed(vec!["ca2.test".into()]).unwrap();
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(
            &bundle,
            format!(
                "# internal CA\n{}\n# its successor\n{}",
                generated.cert.pem(),
                other.cert.pem()
            ),
        )
        .unwrap();
        let c = Config::from_toml(&with_ca(&bundle), "test").unwrap();
        assert_eq!(
            c.relay.ca_certificates,
            [generated.cert.der().clone(), other.cert.der().clone()]
        );
        assert!(Config::embedded_default().relay.ca_certificates.is_empty());
    }

    #[test]
    fn relay_urls() {
        assert_eq!(
            parse_relay_url("smtp://127.0.0.1:2526").unwrap(),
            RelayTarget::Smtp {
                host: "127.0.0.1".into(),
                port: 2526,
                tls: RelayTls::Opportunistic
            }
        );
        assert_eq!(
            parse_relay_url("smtp://mx.example.org:587?tls=required").unwrap(),
            RelayTarget::Smtp {
                host: "mx.example.org".into(),
                port: 587,
                tls: RelayTls::Required
            }
        );
        assert_eq!(
            parse_relay_url("smtps://mx.example.org").unwrap(),
            RelayTarget::Smtp {
                host: "mx.example.org".into(),
                port: 465,
                tls: RelayTls::Wrapper
            }
        );
        assert!(parse_relay_url("smtp://:25").is_err());
        assert!(parse_relay_url("smtp://h:25?tls=maybe").is_err());
    }

    #[test]
    fn default_pattern_finds_numbers_in_any_case_and_not_longer_ones() {
        let c = Config::embedded_default();
        let caps = c
            .ticket
            .pattern
            .captures("Re: [tkt0000042] imprimante")
            .unwrap();
        assert_eq!(&caps["number"], "tkt0000042");
        assert!(c.ticket.pattern.captures("TKT00000421").is_none());
    }

    #[test]
    fn the_store_is_sqlite_by_default_or_a_postgres_url_with_its_password_in_a_file() {
        assert_eq!(Config::embedded_default().store, Store::Sqlite);
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("pg.pass");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let c = Config::from_toml(
            &format!(
                "[store]\nurl = \"postgres://crmgate@db.example.org:5432/crm\"\npassword_file = {:?}\n",
                secret.display().to_string()
            ),
            "test",
        )
        .unwrap();
        assert_eq!(
            c.store,
            Store::Postgres {
                url: "postgres://crmgate@db.example.org:5432/crm".into(),
                password: Some("s3cret".into()),
                ca_certificates: Vec::new(),
            }
        );
        assert!(
            !format!("{:?}", c.store).contains("s3cret"),
            "never printed"
        );

        let keys =
            |text: &str| -> Vec<String> { problems(text).into_iter().map(|p| p.key).collect() };
        assert_eq!(keys("[store]\nurl = \"mysql://x@y/z\""), ["store.url"]);
        assert_eq!(
            keys("[store]\nurl = \"/var/lib/crmgate.db\""),
            ["store.url"]
        );
        assert_eq!(
            keys("[store]\nurl = \"postgres://u:pw@h/db\""),
            ["store.url"]
        );
        assert_eq!(
            keys("[store]\nurl = \"postgres://u@h/db\"\npassword_file = \"/nonexistent/pass\""),
            ["store.password_file"]
        );
    }

    #[test]
    fn the_stores_ca_file_is_read_at_load_and_only_with_a_postgres_url() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["db.test".into()]).unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, ca.cert.pem()).unwrap();
        let with = |url: &str, file: &Path| {
            format!(
                "[store]\nurl = {url:?}\nca_file = {:?}\n",
                file.display().to_string()
            )
        };
        let c = Config::from_toml(&with("postgres://crmgate@db.test/crm", &pem), "test").unwrap();
        let Store::Postgres {
            ca_certificates, ..
        } = &c.store
        else {
            panic!("{:?}", c.store)
        };
        assert_eq!(ca_certificates, &vec![ca.cert.der().clone()]);

        let reasons = |text: &str| {
            problems(text)
                .into_iter()
                .map(|p| format!("{}: {}", p.key, p.reason))
                .collect::<Vec<_>>()
        };
        let r = reasons(&with(
            "postgres://crmgate@db.test/crm",
            &dir.path().join("missing.pem"),
        ));
        assert!(
            r.len() == 1 && r[0].starts_with("store.ca_file: cannot read"),
            "{r:?}"
        );
        let r = reasons(&with("", &pem));
        assert!(
            r.len() == 1 && r[0].starts_with("store.ca_file: is only read with a PostgreSQL"),
            "{r:?}"
        );
    }
}
