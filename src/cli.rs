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
use rusqlite::{Connection, TransactionBehavior};

use crate::config::Config;
use crate::decide;
use crate::desk;
use crate::helpdesk::{EntryKind, Role, TicketState};
use crate::intake::{self, Arrival, Runtime};
use crate::parse::Attachment;
use crate::smtp::{Envelope, Verdict};
use crate::store::{self, outbox, tickets};

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
}

/// sysexits.h codes of `crmgate deliver`.
pub mod sysexits {
    pub const OK: i32 = 0;
    pub const DATAERR: i32 = 65;
    pub const NOUSER: i32 = 67;
    pub const TEMPFAIL: i32 = 75;
    pub const NOPERM: i32 = 77;
}

/// Run a parsed command line; the exit code on success.
///
/// # Errors
/// Anything that makes the command fail: `main` prints it on one line and exits 1.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        // An MTA's pipe transport bounces the mail on any status but 75: a
        // typo in the file must leave the mail in its queue, not bounce it.
        Err(e) if matches!(cli.command, Command::Deliver { .. }) => {
            eprintln!("crmgate: {e}");
            return Ok(sysexits::TEMPFAIL);
        }
        Err(e) => return Err(e.into()),
    };
    match cli.command {
        Command::CheckConfig => {
            Runtime::new(Arc::new(config.clone()))?;
            let text = toml::to_string_pretty(&config.raw).context("printing the configuration")?;
            println!("# effective configuration ({})\n{text}", config.origin);
            Ok(0)
        }
        Command::Serve => {
            crate::daemon::run(config)?;
            Ok(0)
        }
        Command::Deliver { recipients, sender } => Ok(deliver(config, recipients, sender)),
        Command::DkimRecord => {
            print!("{}", dkim_record(&config)?);
            Ok(0)
        }
        command => {
            let mut runtime = Runtime::new(Arc::new(config))?;
            let mut conn = store::open(&runtime.config.database_path())?;
            runtime.load_former_agents(&conn)?;
            dispatch(&mut conn, &runtime, command)?;
            Ok(0)
        }
    }
}

fn deliver(config: Config, recipients: Vec<String>, sender: Option<String>) -> i32 {
    let mut raw = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut raw) {
        eprintln!("crmgate: cannot read the message: {e}");
        return sysexits::TEMPFAIL;
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
        mail_from: sender
            .filter(|s| !s.is_empty() && s != "<>")
            .map(|s| s.to_ascii_lowercase()),
        rcpt_to: recipients.iter().map(|r| r.to_ascii_lowercase()).collect(),
    };
    let arrival = Arrival::new(envelope, raw);
    if arrival.parsed.is_err() {
        eprintln!("crmgate: not an RFC 5322 message");
        return sysexits::DATAERR;
    }
    let mut conn = match store::open(&runtime.config.database_path())
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

fn dispatch(conn: &mut Connection, rt: &Runtime, command: Command) -> anyhow::Result<()> {
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
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{}  [{}]  {}", info.number, info.state, info.subject);
                println!("owner: {}", info.owner.as_deref().unwrap_or("-"));
                println!("requesters: {}", info.requesters.join(", "));
                println!("watch list: {}", info.watch_list.join(", "));
                println!("work-notes list: {}", info.work_notes_list.join(", "));
                for e in info.entries {
                    println!("\n--- {} by {} at {}", e.kind, e.from, e.at);
                    println!("{}", e.body.trim_end());
                    for a in e.attachments {
                        println!(
                            "[attachment {} ({}, {} bytes)]",
                            a.filename, a.content_type, a.size
                        );
                    }
                }
            }
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
        Command::Serve | Command::CheckConfig | Command::Deliver { .. } | Command::DkimRecord => {}
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
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else {
        for row in rows {
            println!("{}", line(row));
        }
    }
    Ok(())
}

fn in_transaction<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Connection) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
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
    conn: &mut Connection,
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
fn email(conn: &mut Connection, rt: &Runtime, args: &EmailArgs) -> anyhow::Result<()> {
    let agent = desk::agent(&rt.config, &args.by)?;
    let text = read_body(&args.body)?;
    desk::mail_addresses(args.to.iter().chain(&args.cc))?;
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
    conn: &mut Connection,
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

fn print_list(conn: &Connection, number: &str, role: Role, json: bool) -> anyhow::Result<()> {
    let id = tickets::require(conn, number)?;
    let info = tickets::info(conn, id)?;
    let list = if role == Role::Watch {
        info.watch_list
    } else {
        info.work_notes_list
    };
    print_rows(&list, json, String::clone)
}
