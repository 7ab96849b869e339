//! The command line: clap definitions (what the user typed) and dispatch
//! (checked values, then the store). Commands that change a ticket write to
//! the same database as the running daemon; the daemon's relay worker sends
//! what they queue within a second.

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::decide;
use crate::desk;
use crate::helpdesk::{EntryKind, Role, TicketState};
use crate::intake::{self, Arrival, Runtime};
use crate::parse::Attachment;
use crate::smtp::{Envelope, Verdict};
use crate::store::{self, outbox, tickets, Db, Location};

#[derive(Debug, Parser)]
#[command(name = "crmgate", version, about = "Mail gateway of a helpdesk CRM")]
pub struct Cli {
    /// Configuration file (default: $CRMGATE_CONFIG, then /etc/crmgate/crmgate.toml,
    /// then the embedded default).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: SMTP listener and relay worker.
    Serve,
    /// Validate the configuration and print the effective values.
    CheckConfig,
    /// Take one message on stdin, for an MTA's pipe transport (sysexits codes).
    Deliver {
        #[arg(long = "recipient", required = true, num_args = 1.., value_name = "ADDR")]
        recipients: Vec<String>,
        #[arg(long, value_name = "ADDR")]
        sender: Option<String>,
    },
    /// Tickets.
    #[command(subcommand)]
    Ticket(TicketCommand),
    /// A ticket's requesters.
    #[command(subcommand)]
    Requester(ListChange),
    /// A ticket's watch list.
    #[command(subcommand)]
    Watch(ListCommand),
    /// A ticket's work-notes list.
    #[command(subcommand, name = "notes-list")]
    NotesList(ListCommand),
    /// Outgoing mail.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Mail that went to no ticket.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// The DNS TXT record to publish for [auth] dkim_selector and dkim_key_file.
    DkimRecord,
    /// The ticket log's database.
    #[command(subcommand)]
    Store(StoreCommand),
    /// The shell completion script on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The manual page (roff) on stdout.
    Man,
}

#[derive(Debug, Args)]
pub struct Body {
    #[arg(
        long,
        conflicts_with = "body_file",
        required_unless_present = "body_file"
    )]
    pub body: Option<String>,
    #[arg(long, value_name = "FILE")]
    pub body_file: Option<PathBuf>,
}

/// `ticket email`: what the agent typed.
#[derive(Debug, Args)]
pub struct EmailArgs {
    pub number: String,
    #[arg(long, value_name = "AGENT")]
    pub by: String,
    #[arg(long = "to", required = true, value_name = "ADDR")]
    pub to: Vec<String>,
    #[arg(long = "cc", value_name = "ADDR")]
    pub cc: Vec<String>,
    #[arg(long)]
    pub subject: String,
    #[command(flatten)]
    pub body: Body,
    #[arg(long = "attach", value_name = "FILE")]
    pub attach: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TicketCommand {
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    Show {
        number: String,
        #[arg(long)]
        json: bool,
    },
    /// Publish a comment, as if the agent had mailed it.
    Comment {
        number: String,
        #[arg(long, value_name = "AGENT")]
        by: String,
        #[command(flatten)]
        body: Body,
    },
    /// Publish a work note, as if the agent had mailed it.
    #[command(name = "work-note")]
    WorkNote {
        number: String,
        #[arg(long, value_name = "AGENT")]
        by: String,
        #[command(flatten)]
        body: Body,
    },
    /// The ticket's e-mail function: mail anyone, attachments included; logged.
    Email(EmailArgs),
    Resolve {
        number: String,
        #[arg(long, value_name = "AGENT")]
        by: Option<String>,
    },
    Reopen {
        number: String,
        #[arg(long, value_name = "AGENT")]
        by: Option<String>,
    },
    Assign {
        number: String,
        agent: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ListChange {
    Add { number: String, address: String },
    Remove { number: String, address: String },
}

#[derive(Debug, Subcommand)]
pub enum ListCommand {
    Add {
        number: String,
        address: String,
    },
    Remove {
        number: String,
        address: String,
    },
    List {
        number: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Queue failed rows again (all, or one).
    Retry { id: Option<i64> },
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Its headers and text, or with --raw the bytes as they arrived.
    Show {
        id: i64,
        #[arg(long)]
        raw: bool,
    },
    /// Process it now as if it had just arrived (mail wrongly taken as automatic).
    Release { id: i64 },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy the whole log into an empty database at URL (e.g. from the SQLite default to PostgreSQL).
    #[command(
        long_about = "Copy the whole log of the configured database (every ticket, entry, raw \
message, attachment, list, outbox row and quarantined message) into an empty database at URL, \
keeping row ids and ticket numbers, then print the rows copied per table. The copy is one \
transaction on the target: all of it or nothing. A target that holds any row of a log is \
refused, and nothing is written to it. The source is read in one snapshot: the daemon may keep \
running, but mail it takes after the copy started is not copied (stop it, or copy again into a \
fresh database, before pointing it at the new one)."
    )]
    Copy {
        /// postgres://user@host:5432/dbname (an existing database: crmgate creates its
        /// tables there), or sqlite://PATH (a new file); never with a password in it.
        #[arg(long, value_name = "URL")]
        to: String,
        /// The target's password, in a file (the configuration's [store] password_file is
        /// the source's). Without it, none is sent (trust or peer authentication).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// CA certificates (PEM) trusted for the target's TLS, on top of the web PKI's (the
        /// configuration's [store] ca_file is the source's).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
    },
}

/// sysexits.h codes of `crmgate deliver`.
pub mod sysexits {
    pub const OK: i32 = 0;
    pub const DATAERR: i32 = 65;
    pub const NOUSER: i32 = 67;
    pub const TEMPFAIL: i32 = 75;
    pub const NOPERM: i32 = 77;
    /// `crmgate serve` with a configuration it cannot use: systemd's
    /// `RestartPreventExitStatus=` keeps a typo from restarting it in a loop.
    pub const CONFIG: i32 = 78;
}

/// Run a parsed command line; the exit code on success.
///
/// # Errors
/// Anything that makes the command fail: `main` prints it on one line and exits 1.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Completions { shell } => return print_completions(shell),
        Command::Man => return print_man(),
        _ => {}
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        // An MTA's pipe transport bounces the mail on any status but 75: a
        // typo in the file must leave the mail in its queue, not bounce it.
        Err(e) if matches!(cli.command, Command::Deliver { .. }) => {
            eprintln!("crmgate: {e}");
            return Ok(sysexits::TEMPFAIL);
        }
        Err(e) if matches!(cli.command, Command::Serve) => {
            eprintln!("crmgate: {e}");
            return Ok(sysexits::CONFIG);
        }
        Err(e) => return Err(e.into()),
    };
    init_logging(config.log.format);
    match cli.command {
        Command::CheckConfig => {
            Runtime::new(Arc::new(config.clone()))?;
            crate::config::check_state_dir(&config)?;
            let text = toml::to_string_pretty(&config.raw).context("printing the configuration")?;
            println!("# effective configuration ({})\n{text}", config.origin);
            Ok(0)
        }
        Command::Serve => serve(config),
        Command::Deliver { recipients, sender } => Ok(deliver(config, recipients, sender)),
        Command::DkimRecord => {
            print!("{}", dkim_record(&config)?);
            Ok(0)
        }
        Command::Store(StoreCommand::Copy {
            to,
            password_file,
            ca_file,
        }) => {
            store_copy(&config, &to, password_file.as_deref(), ca_file.as_deref())?;
            Ok(0)
        }
        command => {
            let mut runtime = Runtime::new(Arc::new(config))?;
            let mut conn = open_existing(&runtime.config)?;
            runtime.load_former_agents(&conn)?;
            dispatch(&mut conn, &runtime, command)?;
            Ok(0)
        }
    }
}

/// `crmgate serve`: a configuration it cannot use (templates, state
/// directory) exits [`sysexits::CONFIG`], anything later 1.
fn serve(config: Config) -> anyhow::Result<i32> {
    let checked = Runtime::new(Arc::new(config.clone()))
        .map(drop)
        .and_then(|()| crate::config::check_state_dir(&config).map_err(anyhow::Error::from));
    if let Err(e) = checked {
        eprintln!("crmgate: {e:#}");
        return Ok(sysexits::CONFIG);
    }
    crate::daemon::run(config)?;
    Ok(0)
}

/// The database of a command that is not `serve` or `deliver`: only those
/// create one, so a command run from the wrong directory (or with the
/// wrong configuration) says where it looked instead of starting an empty
/// database there.
fn open_existing(config: &Config) -> anyhow::Result<Db> {
    let location = Location::of(config);
    if let Location::Sqlite(path) = &location {
        if !path.exists() {
            bail!(
                "no database at {} (gateway.state_dir of {}): give the daemon's configuration with --config FILE",
                path.display(),
                config.origin
            );
        }
    }
    Ok(store::connect(&location, store::Durability::Full)?)
}

fn deliver(config: Config, recipients: Vec<String>, sender: Option<String>) -> i32 {
    let limit = config.smtp.max_message_bytes;
    let mut raw = Vec::new();
    // One byte past the limit says "too large" without reading the rest.
    if let Err(e) = std::io::stdin()
        .take(limit as u64 + 1)
        .read_to_end(&mut raw)
    {
        eprintln!("crmgate: cannot read the message: {e}");
        return sysexits::TEMPFAIL;
    }
    if raw.len() > limit {
        eprintln!("crmgate: 552 5.3.4 message larger than {limit} bytes (smtp.max_message_bytes)");
        return sysexits::DATAERR;
    }
    if raw.iter().all(u8::is_ascii_whitespace) {
        eprintln!("crmgate: empty message");
        return sysexits::DATAERR;
    }
    if let Some(bad) = recipients
        .iter()
        .find(|r| !decide::accepts_recipient(&config, r))
    {
        eprintln!("crmgate: {bad}: no such address here");
        return sysexits::NOUSER;
    }
    let mut runtime = match Runtime::new(Arc::new(config)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crmgate: {e:#}");
            return sysexits::TEMPFAIL;
        }
    };
    let envelope = Envelope {
        // A pipe transport runs on the MTA's own machine: the peer is local,
        // and whether that is trusted is `trusted_relays`' say.
        peer: IpAddr::from([127, 0, 0, 1]),
        helo: "localhost".into(),
        mail_from: None,
        rcpt_to: recipients.iter().map(|r| r.to_ascii_lowercase()).collect(),
    };
    let mut arrival = Arrival::new(envelope, raw);
    let Ok(parsed) = &arrival.parsed else {
        eprintln!("crmgate: not an RFC 5322 message");
        return sysexits::DATAERR;
    };
    arrival.envelope.mail_from = match sender {
        // `--sender ''` or `<>`: the MTA says the reverse-path was null.
        Some(s) => Some(s)
            .filter(|s| !s.is_empty() && s != "<>")
            .map(|s| s.to_ascii_lowercase()),
        None => unknown_sender(&arrival.raw, parsed),
    };
    let location = Location::of(&runtime.config);
    let mut conn = match store::connect(&location, store::Durability::Full)
        .and_then(|c| runtime.load_former_agents(&c).map(|()| c))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crmgate: {e}");
            return sysexits::TEMPFAIL;
        }
    };
    match intake::deliver_once(&mut conn, &runtime, &arrival) {
        Ok(outcome) => match outcome.verdict {
            Verdict::Stored => sysexits::OK,
            Verdict::Refused(sentence) => {
                eprintln!("crmgate: {sentence}");
                sysexits::NOPERM
            }
            Verdict::TempFailure | Verdict::AuthTempFailure => sysexits::TEMPFAIL,
        },
        Err(e) => {
            eprintln!("crmgate: {e}");
            sysexits::TEMPFAIL
        }
    }
}

fn dispatch(conn: &mut Db, rt: &Runtime, command: Command) -> anyhow::Result<()> {
    let config = &rt.config;
    match command {
        Command::Ticket(TicketCommand::List { state, json }) => {
            let state = match state.as_deref() {
                None => None,
                Some(s) => Some(
                    TicketState::parse(s)
                        .with_context(|| format!("--state {s}: use new, open or resolved"))?,
                ),
            };
            print_rows(&tickets::list(conn, state)?, json, |t| {
                format!(
                    "{}  {:<8}  {}  {}",
                    t.number,
                    t.state,
                    t.requesters.join(","),
                    t.subject
                )
            })?;
        }
        Command::Ticket(TicketCommand::Show { number, json }) => {
            let id = tickets::require(conn, &number)?;
            let info = tickets::info(conn, id)?;
            emit(show_text(&info, json)?.as_bytes())?;
        }
        Command::Ticket(TicketCommand::Comment { number, by, body }) => {
            publish(conn, rt, &number, &by, EntryKind::Comment, &body)?
        }
        Command::Ticket(TicketCommand::WorkNote { number, by, body }) => {
            publish(conn, rt, &number, &by, EntryKind::WorkNote, &body)?
        }
        Command::Ticket(TicketCommand::Email(args)) => email(conn, rt, &args)?,
        Command::Ticket(TicketCommand::Resolve { number, by }) => {
            let by = by.map(|b| desk::agent(config, &b)).transpose()?;
            let number =
                in_transaction(conn, |tx| Ok(desk::resolve(tx, rt, &number, by.as_ref())?))?;
            println!("{number} resolved");
        }
        Command::Ticket(TicketCommand::Reopen { number, by }) => {
            let by = by.map(|b| desk::agent(config, &b)).transpose()?;
            let number =
                in_transaction(conn, |tx| Ok(desk::reopen(tx, rt, &number, by.as_ref())?))?;
            println!("{number} reopened");
        }
        Command::Ticket(TicketCommand::Assign { number, agent }) => {
            let agent = desk::agent(config, &agent)?;
            in_transaction(conn, |tx| Ok(desk::assign(tx, rt, &number, &agent)?))?;
            println!("{number} assigned to {}", agent.address);
        }
        Command::Requester(change) => {
            let (number, address, add) = match change {
                ListChange::Add { number, address } => (number, address, true),
                ListChange::Remove { number, address } => (number, address, false),
            };
            change_list(conn, rt, &number, Role::Requester, &address, add)?;
        }
        Command::Watch(ListCommand::Add { number, address }) => {
            change_list(conn, rt, &number, Role::Watch, &address, true)?
        }
        Command::Watch(ListCommand::Remove { number, address }) => {
            change_list(conn, rt, &number, Role::Watch, &address, false)?
        }
        Command::Watch(ListCommand::List { number, json }) => {
            print_list(conn, &number, Role::Watch, json)?
        }
        Command::NotesList(ListCommand::Add { number, address }) => {
            desk::agent(config, &address)?;
            change_list(conn, rt, &number, Role::Notes, &address, true)?
        }
        Command::NotesList(ListCommand::Remove { number, address }) => {
            change_list(conn, rt, &number, Role::Notes, &address, false)?
        }
        Command::NotesList(ListCommand::List { number, json }) => {
            print_list(conn, &number, Role::Notes, json)?
        }
        Command::Outbox(OutboxCommand::List { json }) => {
            print_rows(&outbox::list(conn)?, json, |r| {
                format!(
                    "{}  {}  {}  {}  attempts={}  {}",
                    r.id,
                    r.ticket.as_deref().unwrap_or("-"),
                    r.kind,
                    r.status.as_str(),
                    r.attempts,
                    r.recipients.join(",")
                )
            })?;
        }
        Command::Outbox(OutboxCommand::Retry { id }) => {
            let n = outbox::retry(conn, id, store::now())?;
            if n == 0 {
                bail!(
                    "no failed outbox row{}",
                    id.map(|i| format!(" with id {i}")).unwrap_or_default()
                );
            }
            println!("{n} row(s) queued again");
        }
        Command::Quarantine(QuarantineCommand::Show { id, raw }) => {
            show_quarantined(conn, id, raw)?
        }
        Command::Quarantine(QuarantineCommand::Release { id }) => {
            release_quarantined(conn, rt, id)?
        }
        Command::Quarantine(QuarantineCommand::List { json }) => {
            print_rows(&tickets::quarantine_list(conn)?, json, |q| {
                format!(
                    "{}  {}  {:<10}  {}  {}",
                    q.id,
                    q.at,
                    q.reason,
                    q.sender.as_deref().unwrap_or("-"),
                    q.subject.as_deref().unwrap_or("")
                )
            })?;
        }
        Command::Serve
        | Command::CheckConfig
        | Command::Deliver { .. }
        | Command::Completions { .. }
        | Command::Man
        | Command::Store(_)
        | Command::DkimRecord => {}
    }
    Ok(())
}

/// The record of each domain crmgate signs for (those of the CRM
/// addresses), in zone-file form: the TXT text cut in strings of 255
/// characters at most, as DNS requires.
fn dkim_record(config: &Config) -> anyhow::Result<String> {
    let Some(signer) = &config.auth.dkim else {
        anyhow::bail!(
            "no DKIM key: set [auth] dkim_selector and dkim_key_file in {}",
            config.origin
        );
    };
    let mut domains: Vec<&str> = [&config.addresses.public, &config.addresses.internal]
        .iter()
        .filter_map(|a| a.rsplit_once('@').map(|(_, d)| d))
        .collect();
    domains.dedup();
    let record = signer.record();
    let strings: Vec<String> = record
        .as_bytes()
        .chunks(255)
        .map(|chunk| format!("\"{}\"", String::from_utf8_lossy(chunk)))
        .collect();
    Ok(domains
        .iter()
        .map(|domain| {
            format!(
                "{}. IN TXT ( {} )\n",
                signer.record_name(domain),
                strings.join(" ")
            )
        })
        .collect())
}

/// One JSON document, or one line per row for a person.
fn print_rows<T: serde::Serialize>(
    rows: &[T],
    json: bool,
    line: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    let mut text = String::new();
    if json {
        text = serde_json::to_string_pretty(rows)?;
        text.push('\n');
    } else {
        for row in rows {
            text.push_str(&line(row));
            text.push('\n');
        }
    }
    emit(text.as_bytes())
}

fn in_transaction<T>(conn: &mut Db, f: impl FnOnce(&Db) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let tx = conn.transaction()?;
    let value = f(&tx)?;
    tx.commit()?;
    Ok(value)
}

fn read_body(body: &Body) -> anyhow::Result<String> {
    match (&body.body, &body.body_file) {
        (Some(text), _) => Ok(text.clone()),
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("--body-file {}", path.display()))
        }
        (None, None) => bail!("give --body or --body-file"),
    }
}

/// `ticket comment|work-note`: published as the agent (`desk::publish`).
fn publish(
    conn: &mut Db,
    rt: &Runtime,
    number: &str,
    by: &str,
    kind: EntryKind,
    body: &Body,
) -> anyhow::Result<()> {
    let agent = desk::agent(&rt.config, by)?;
    let text = read_body(body)?;
    let applied = in_transaction(conn, |tx| {
        Ok(desk::publish(tx, rt, number, &agent, kind, &text)?)
    })?;
    println!(
        "{} {} published, {} message(s) queued",
        applied.number,
        kind.as_str(),
        applied.queued
    );
    Ok(())
}

/// `ticket email`: the files read and the addresses checked before the
/// transaction, then `desk::email`.
fn email(conn: &mut Db, rt: &Runtime, args: &EmailArgs) -> anyhow::Result<()> {
    let agent = desk::agent(&rt.config, &args.by)?;
    let text = read_body(&args.body)?;
    desk::email_recipients(&rt.config, args.to.iter().chain(&args.cc))?;
    let attachments = args
        .attach
        .iter()
        .map(|p| read_attachment(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let email = desk::Email {
        number: &args.number,
        agent: &agent,
        to: &args.to,
        cc: &args.cc,
        subject: &args.subject,
        text: &text,
        attachments: &attachments,
    };
    let (number, outbox_id) = in_transaction(conn, |tx| Ok(desk::email(tx, rt, &email)?))?;
    println!("{number} e-mail queued (outbox {outbox_id})");
    Ok(())
}

/// `requester|watch|notes-list add|remove` (`desk::change_list`).
fn change_list(
    conn: &mut Db,
    rt: &Runtime,
    number: &str,
    role: Role,
    address: &str,
    add: bool,
) -> anyhow::Result<()> {
    in_transaction(conn, |tx| {
        Ok(desk::change_list(tx, rt, number, role, address, add)?)
    })?;
    println!(
        "{number}: {} {} {}",
        address.trim().to_ascii_lowercase(),
        if add { "added to" } else { "removed from" },
        role.list_name()
    );
    Ok(())
}

fn read_attachment(path: &Path) -> anyhow::Result<Attachment> {
    let data = std::fs::read(path).with_context(|| format!("--attach {}", path.display()))?;
    let filename = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "attachment".into());
    Ok(Attachment {
        content_type: content_type_of(&filename).to_string(),
        filename,
        data,
        inline: false,
    })
}

fn content_type_of(filename: &str) -> &'static str {
    let ext = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "pdf" => "application/pdf",
        "txt" | "log" => "text/plain",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "csv" => "text/csv",
        "zip" => "application/zip",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "eml" => "message/rfc822",
        _ => "application/octet-stream",
    }
}

fn print_list(conn: &Db, number: &str, role: Role, json: bool) -> anyhow::Result<()> {
    let id = tickets::require(conn, number)?;
    let info = tickets::info(conn, id)?;
    let list = if role == Role::Watch {
        info.watch_list
    } else {
        info.work_notes_list
    };
    print_rows(&list, json, String::clone)
}

/// `ticket show`, as one text: written at once, so a closed pipe is one
/// error [`emit`] can ignore.
fn show_text(info: &tickets::TicketInfo, json: bool) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    if json {
        return Ok(serde_json::to_string_pretty(info)? + "\n");
    }
    let mut t = String::new();
    writeln!(t, "{}  [{}]  {}", info.number, info.state, info.subject)?;
    writeln!(t, "owner: {}", info.owner.as_deref().unwrap_or("-"))?;
    writeln!(t, "requesters: {}", info.requesters.join(", "))?;
    writeln!(t, "watch list: {}", info.watch_list.join(", "))?;
    writeln!(t, "work-notes list: {}", info.work_notes_list.join(", "))?;
    for e in &info.entries {
        writeln!(t, "\n--- {} by {} at {}", e.kind, e.from, e.at)?;
        writeln!(t, "{}", e.body.trim_end())?;
        for a in &e.attachments {
            writeln!(
                t,
                "[attachment {} ({}, {} bytes)]",
                a.filename, a.content_type, a.size
            )?;
        }
    }
    Ok(t)
}

/// Write to stdout; a reader that went away (`| head -1`) is not a failure.
fn emit(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::from(e).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}

/// The sender of a message given without `--sender`: unknown, so what the
/// message says — the Return-Path the MTA wrote (`<>` there is a real null
/// reverse-path), else the From address. Never the null reverse-path by
/// default, which would make a person's mail automatic.
fn unknown_sender(raw: &[u8], parsed: &crate::parse::Inbound) -> Option<String> {
    if let Some(path) = return_path(raw) {
        let path = path
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .trim();
        return (!path.is_empty()).then(|| path.to_ascii_lowercase());
    }
    parsed
        .from
        .as_ref()
        .map(|m| m.address.to_ascii_lowercase())
        .filter(|a| !a.is_empty())
}

/// The first `Return-Path:` of the header block, unfolded.
fn return_path(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    while let Some(line) = lines.next() {
        if line.is_empty() {
            return None;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("return-path") {
            let mut value = value.to_string();
            for more in lines.by_ref() {
                if !more.starts_with([' ', '\t']) {
                    break;
                }
                value.push_str(more);
            }
            return Some(value);
        }
    }
    None
}

fn require_quarantined(conn: &Db, id: i64) -> anyhow::Result<tickets::QuarantinedMessage> {
    tickets::quarantined(conn, id)?.with_context(|| {
        format!("no quarantined message with id {id} (see crmgate quarantine list)")
    })
}

/// `quarantine show`: the header block and the text as crmgate read it, or
/// the bytes as they arrived.
fn show_quarantined(conn: &Db, id: i64, raw: bool) -> anyhow::Result<()> {
    let q = require_quarantined(conn, id)?;
    if raw {
        return emit(&q.data);
    }
    let data = String::from_utf8_lossy(&q.data);
    let headers = data
        .split_once("\r\n\r\n")
        .or_else(|| data.split_once("\n\n"))
        .map_or(&*data, |(h, _)| h);
    let text = crate::parse::parse(&q.data)
        .map(|i| i.text.to_string())
        .unwrap_or_else(|_| "(not an RFC 5322 message: see --raw)".into());
    let out = format!(
        "quarantine {}  {}  {}\nenvelope: from {} to {}\n\n{}\n\n{}\n",
        q.info.id,
        q.info.at,
        q.info.reason,
        q.mail_from.as_deref().unwrap_or("<>"),
        q.rcpt_to.join(", "),
        headers.trim_end(),
        text.trim_end()
    );
    emit(out.as_bytes())
}

/// `quarantine release`: the message goes through intake again as if it
/// had just arrived — with the sender a message without one gets now
/// ([`unknown_sender`]), for mail taken as automatic for its null
/// reverse-path — and leaves the quarantine in the same transaction.
fn release_quarantined(conn: &mut Db, rt: &Runtime, id: i64) -> anyhow::Result<()> {
    let q = require_quarantined(conn, id)?;
    let peer = q
        .peer
        .as_deref()
        .and_then(|p| p.parse::<IpAddr>().ok())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let envelope = Envelope {
        peer,
        helo: "localhost".into(),
        mail_from: q.mail_from.clone(),
        rcpt_to: q.rcpt_to.clone(),
    };
    let mut arrival = Arrival::new(envelope, q.data);
    if arrival.envelope.mail_from.is_none() {
        if let Ok(parsed) = &arrival.parsed {
            arrival.envelope.mail_from = unknown_sender(&arrival.raw, parsed);
        }
    }
    let tx = conn.transaction()?;
    tickets::remove_quarantined(&tx, id)?;
    let outcome = intake::process(&tx, rt, &arrival, store::now())?;
    tx.commit()?;
    intake::log_outcome(&arrival, &outcome);
    println!(
        "quarantine {id} released: {} on {}, {} message(s) queued",
        outcome.decision,
        outcome.ticket.as_deref().unwrap_or("no ticket"),
        outcome.queued
    );
    Ok(())
}

/// `crmgate store copy --to URL`: the configured log into an empty
/// database; a progress line on a terminal, the rows copied per table at
/// the end.
fn store_copy(
    config: &Config,
    to: &str,
    password_file: Option<&Path>,
    ca_file: Option<&Path>,
) -> anyhow::Result<()> {
    use std::io::{IsTerminal as _, Write as _};
    let password = password_file
        .map(|f| {
            std::fs::read_to_string(f)
                .map(|t| t.trim_end_matches(['\n', '\r']).to_string())
                .with_context(|| format!("--password-file {}", f.display()))
        })
        .transpose()?;
    let ca_certificates = ca_file
        .map(|f| crate::config::read_ca_bundle(f).map_err(|e| anyhow::anyhow!("--ca-file: {e}")))
        .transpose()?
        .unwrap_or_default();
    let target = store::copy::target(to, password, ca_certificates)?;
    let source = open_existing(config)?;
    let from = Location::of(config);
    let terminal = std::io::stderr().is_terminal();
    let mut progress = |table: &str, done: u64, total: u64| {
        if terminal {
            let width = 30;
            let filled = (done * width)
                .checked_div(total)
                .unwrap_or(width)
                .min(width) as usize;
            eprint!(
                "\r\x1b[K{table:<18} [{}{}] {done}/{total}",
                "#".repeat(filled),
                " ".repeat(width as usize - filled)
            );
            let _ = std::io::stderr().flush();
        }
    };
    let copied = store::copy::copy(&source, &target, &mut progress);
    if terminal {
        eprint!("\r\x1b[K");
    }
    let copied = copied?;
    let mut out = format!("copied {from} into {target}:\n");
    for (table, rows) in &copied {
        out.push_str(&format!("{rows:>10} {table}\n"));
    }
    let total: u64 = copied.iter().map(|(_, n)| n).sum();
    out.push_str(&format!("{total:>10} rows in all\n"));
    emit(out.as_bytes())
}

fn print_completions(shell: clap_complete::Shell) -> anyhow::Result<i32> {
    use clap::CommandFactory as _;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "crmgate", &mut out);
    emit(&out)?;
    Ok(0)
}

fn print_man() -> anyhow::Result<i32> {
    use clap::CommandFactory as _;
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .context("rendering the manual page")?;
    emit(&out)?;
    Ok(0)
}

/// Log lines on stderr, as text or (`[log] format = "json"`) one JSON
/// object per line; `$CRMGATE_LOG` filters them (default `info`).
fn init_logging(format: crate::config::LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CRMGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rusqlite_migration=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (none in the binary) keeps the first subscriber.
    let _ = match format {
        crate::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        crate::config::LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}
