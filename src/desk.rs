//! Desk: what an agent does on a ticket without writing a mail — comment,
//! work note, e-mail, resolve, reopen, assign, change a list.
//!
//! Each operation is planned by `decide` (the same rules as for inbound
//! mail: who may watch, under which From, which notices go) and written by
//! `apply` and `store`, on a connection the caller has put in a
//! transaction. Arguments are plain data (a ticket number as typed, an
//! agent's mailbox, texts), so the CLI and, later, agents' quick actions by
//! mail drive the very same code; printing and exit codes stay with the
//! caller.

use crate::store::Db;

use crate::apply::{self, Applied, ApplyError};
use crate::config::Config;
use crate::decide::quick::{QuickAction, QuickBlock};
use crate::decide::{self, NotAdmitted};
use crate::helpdesk::{EntryKind, Role, TicketState};
use crate::intake::Runtime;
use crate::parse::{Attachment, Inbound, Mailbox};
use crate::store::{self, tickets, StoreError};

/// Why a ticket operation was refused or failed; its text is what the
/// user reads, so it says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum DeskError {
    /// Only agents publish, e-mail, own or sit on a work-notes list.
    #[error("{address} is not an agent: add it under [[agents]] in {origin}")]
    NotAnAgent {
        address: String,
        /// The configuration file to add it to.
        origin: String,
    },
    /// Typed by a person, and not an address.
    #[error("{0} is not a mail address")]
    NotAnAddress(String),
    /// A second closure would send a second closure notice.
    #[error("{0} is already resolved")]
    AlreadyResolved(String),
    /// Only a resolved ticket reopens.
    #[error("{0} is not resolved")]
    NotResolved(String),
    /// `decide::admit_to_watch_group`: agents never see public mail as watchers.
    #[error("{0} is an agent: agents go on the work-notes list, never in the watch group")]
    AgentInWatchGroup(String),
    /// `decide::admit_to_watch_group`: crmgate never writes to itself.
    #[error("{0} is a CRM address")]
    CrmAddress(String),
    /// Already on the list it was to join, or not on the one to leave.
    #[error("{address} is {already} the {list} of {number}")]
    Unchanged {
        address: String,
        /// "already on" or "not on".
        already: &'static str,
        list: &'static str,
        number: String,
    },
    /// The ticket's e-mail function never writes to the helpdesk itself:
    /// the copy would come back in as a new message about the ticket.
    #[error(
        "{0} is a CRM address: the ticket's e-mail goes to people, never to the helpdesk itself"
    )]
    EmailToCrm(String),
    /// Every recipient was one crmgate never writes to, or held back.
    #[error("{0}: nobody to send the e-mail to")]
    NobodyToEmail(String),
    /// Writing the plan failed: the caller rolls back.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// No such ticket, or the database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T> = std::result::Result<T, DeskError>;

impl DeskError {
    /// A refusal the user can mend (the rules said no), as opposed to a
    /// failure of the database or of composing, which is retried.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, DeskError::Apply(_) | DeskError::Store(_))
    }
}

/// The agent configured at `address`, with the name mail shows.
///
/// # Errors
/// [`DeskError::NotAnAgent`], naming the file to add it to.
pub fn agent(config: &Config, address: &str) -> Result<Mailbox> {
    match config.agent(address) {
        Some(agent) => Ok(Mailbox::new(Some(&agent.name), &agent.email)),
        None => Err(DeskError::NotAnAgent {
            address: address.to_string(),
            origin: config.origin.clone(),
        }),
    }
}

/// Check addresses typed by a person before anything is written.
///
/// # Errors
/// [`DeskError::NotAnAddress`] for the first that is not one.
pub fn mail_addresses<'a>(addresses: impl IntoIterator<Item = &'a String>) -> Result<()> {
    match addresses
        .into_iter()
        .find(|a| !crate::config::is_address(a))
    {
        Some(bad) => Err(DeskError::NotAnAddress(bad.clone())),
        None => Ok(()),
    }
}

/// Check the recipients of the ticket's e-mail function: mail addresses,
/// and none of crmgate's own. [`email`] checks them too; a caller checks
/// early to refuse before it reads attachments.
///
/// # Errors
/// [`DeskError::NotAnAddress`] or [`DeskError::EmailToCrm`] for the first
/// address refused.
pub fn email_recipients<'a>(
    config: &Config,
    addresses: impl IntoIterator<Item = &'a String> + Clone,
) -> Result<()> {
    mail_addresses(addresses.clone())?;
    match addresses
        .into_iter()
        .find(|a| decide::accepts_recipient(config, a))
    {
        Some(crm) => Err(DeskError::EmailToCrm(crm.clone())),
        None => Ok(()),
    }
}

/// Publish a comment or a work note as `agent`: the same entry and mail as
/// if the agent had written it by mail (`decide::publish`).
///
/// # Errors
/// No such ticket, or a database, template or composing failure.
pub fn publish(
    conn: &Db,
    rt: &Runtime,
    number: &str,
    agent: &Mailbox,
    kind: EntryKind,
    text: &str,
) -> Result<Applied> {
    let view = tickets::view(conn, tickets::require(conn, number)?)?;
    let plan = decide::publish(&rt.facts(), &view, agent, kind, text);
    let inbound = Inbound::default();
    let now = store::now();
    let sender = agent.address.as_str();
    Ok(apply::apply(
        conn,
        rt,
        &plan,
        Some(&view),
        &inbound,
        sender,
        None,
        now,
    )?)
}

/// A message of the ticket's e-mail function, as an agent typed it.
pub struct Email<'a> {
    /// The ticket, as typed.
    pub number: &'a str,
    /// Who writes: the From says "<agent> via <display_name>".
    pub agent: &'a Mailbox,
    /// Shown and sent to, as typed.
    pub to: &'a [String],
    /// Shown in Cc and sent to.
    pub cc: &'a [String],
    /// Cleaned of prefixes; `[NUMBER]` is added when composed.
    pub subject: &'a str,
    /// The entry's text and the message's body.
    pub text: &'a str,
    /// Sent along and kept on the entry.
    pub attachments: &'a [Attachment],
}

/// Send mail of the ticket's e-mail function (`decide::email`): logged as
/// an `email` entry with its attachments; returns the ticket's number and
/// the outbox row.
///
/// # Errors
/// A recipient refused, no such ticket, nobody left to send to, or a
/// database or composing failure.
pub fn email(conn: &Db, rt: &Runtime, email: &Email<'_>) -> Result<(String, i64)> {
    email_recipients(&rt.config, email.to.iter().chain(email.cc))?;
    let now = store::now();
    let id = tickets::require(conn, email.number)?;
    let view = tickets::view(conn, id)?;
    let (entry, send) = decide::email(
        &rt.facts(),
        email.agent,
        email.to,
        email.cc,
        email.subject,
        email.text,
    );
    let entry_id = tickets::insert_entry(
        conn,
        &tickets::EntryRow {
            ticket_id: id,
            kind: entry.kind,
            from: &entry.author,
            at: now,
            subject: &entry.subject,
            body: &entry.text,
            html: None,
            message_id: None,
            by_agent: entry.by_agent,
            sender: None,
            body_hash: None,
            raw_id: None,
            raw: None,
        },
    )?;
    for a in email.attachments {
        tickets::insert_attachment(conn, entry_id, a)?;
    }
    let content = apply::Content {
        subject: entry.subject.clone(),
        text: crate::compose::plan::PlannedText::Entry,
        entry: Some(crate::compose::plan::EntryBody {
            text: email.text,
            html: None,
            attachments: email.attachments.into(),
        }),
        listed_attachments: Vec::new(),
        attachments: true,
        written_by_agent: true,
        copied_from: None,
    };
    let thread = &view.thread;
    let outbox_id = apply::queue(conn, rt, &view, thread, &send, content, Some(entry_id), now)?;
    tickets::touch(conn, id, now)?;
    match outbox_id {
        Some(outbox_id) => Ok((view.number, outbox_id)),
        None => Err(DeskError::NobodyToEmail(view.number)),
    }
}

/// Set a ticket resolved (`decide::resolve`: the closure entry and notice),
/// by an agent or by the CRM; returns the ticket's number.
///
/// # Errors
/// No such ticket, already resolved, or a database or composing failure.
pub fn resolve(conn: &Db, rt: &Runtime, number: &str, by: Option<&Mailbox>) -> Result<String> {
    let view = tickets::view(conn, tickets::require(conn, number)?)?;
    if view.state == TicketState::Resolved {
        return Err(DeskError::AlreadyResolved(number.to_string()));
    }
    let mut plan = decide::resolve(&rt.facts(), &view);
    if let Some(agent) = by {
        plan.entries[0].text = format!("resolved by {}", agent.address).into();
    }
    let inbound = Inbound::default();
    apply::apply(
        conn,
        rt,
        &plan,
        Some(&view),
        &inbound,
        "",
        None,
        store::now(),
    )?;
    Ok(view.number)
}

/// Set a resolved ticket open again, noted in a `system` entry; returns
/// the ticket's number.
///
/// # Errors
/// No such ticket, not resolved, or a database failure.
pub fn reopen(conn: &Db, rt: &Runtime, number: &str, by: Option<&Mailbox>) -> Result<String> {
    let id = tickets::require(conn, number)?;
    let view = tickets::view(conn, id)?;
    if view.state != TicketState::Resolved {
        return Err(DeskError::NotResolved(number.to_string()));
    }
    let now = store::now();
    tickets::set_state(conn, id, TicketState::Open, now)?;
    let by = by.map(|a| format!(" by {}", a.address)).unwrap_or_default();
    system_entry(conn, rt, id, &format!("reopened{by}"), now)?;
    Ok(view.number)
}

/// A quick action that could not run: its line, and why.
#[derive(Debug)]
pub struct ActionFailed {
    /// As the agent wrote it.
    pub line: String,
    pub error: DeskError,
}

/// Carry out a believed agent's quick actions on ticket `number`, in the
/// order written, each through the same operation as the CLI's and each
/// noted in a `system` entry naming the agent and the line. `inbound` is
/// the message without its block: `/email` sends its text and attachments.
///
/// # Errors
/// The first action that fails, with its line; the caller rolls back the
/// whole message (nothing half-done).
pub fn quick_actions(
    conn: &Db,
    rt: &Runtime,
    number: &str,
    agent: &Mailbox,
    block: &QuickBlock,
    inbound: &Inbound,
) -> std::result::Result<(), ActionFailed> {
    for line in &block.lines {
        quick_action(conn, rt, number, agent, &line.action, inbound).map_err(|error| {
            ActionFailed {
                line: line.line.clone(),
                error,
            }
        })?;
        let id = tickets::require(conn, number).map_err(|e| ActionFailed {
            line: line.line.clone(),
            error: e.into(),
        })?;
        system_entry(
            conn,
            rt,
            id,
            &format!("{}: {}", agent.address, line.line),
            store::now(),
        )
        .map_err(|error| ActionFailed {
            line: line.line.clone(),
            error,
        })?;
    }
    Ok(())
}

fn quick_action(
    conn: &Db,
    rt: &Runtime,
    number: &str,
    agent: &Mailbox,
    action: &QuickAction,
    inbound: &Inbound,
) -> Result<()> {
    let config = &rt.config;
    match action {
        QuickAction::Resolve => resolve(conn, rt, number, Some(agent)).map(drop),
        QuickAction::Reopen => reopen(conn, rt, number, Some(agent)).map(drop),
        QuickAction::Assign(address) => assign(conn, rt, number, &self::agent(config, address)?),
        QuickAction::List(change) => {
            for address in &change.addresses {
                change_list(conn, rt, number, change.role, address, change.add)?;
            }
            Ok(())
        }
        QuickAction::Email(to) => {
            let subject = crate::thread::clean_subject(&inbound.subject, &config.ticket.pattern);
            email(
                conn,
                rt,
                &Email {
                    number,
                    agent,
                    to: &to.to,
                    cc: &to.cc,
                    subject: &subject,
                    text: &inbound.text,
                    attachments: &inbound.attachments,
                },
            )
            .map(drop)
        }
        QuickAction::Help => {
            let view = tickets::view(conn, tickets::require(conn, number)?)?;
            let notice = apply::AgentNotice {
                agent,
                template: "quick_help",
                subject: &view.subject,
                line: "",
                reason: &crate::templates::Phrase::default(),
            };
            apply::queue_agent_notice(conn, rt, Some(&view), &notice, store::now())?;
            Ok(())
        }
    }
}

/// Make `agent` the ticket's owner; the owner is on the work-notes list.
///
/// # Errors
/// No such ticket, or a database failure.
pub fn assign(conn: &Db, rt: &Runtime, number: &str, agent: &Mailbox) -> Result<()> {
    let id = tickets::require(conn, number)?;
    let now = store::now();
    tickets::set_owner(conn, id, Some(&agent.address), now)?;
    tickets::add_participant(conn, id, Role::Notes, agent, now)?;
    system_entry(conn, rt, id, &format!("assigned to {}", agent.address), now)?;
    Ok(())
}

/// Add `address` to one of the ticket's lists, or take it off, noted in a
/// `system` entry. The watch group admits no agent and no CRM address
/// (`decide::admit_to_watch_group`); the caller checks that the
/// work-notes list gets agents only.
///
/// # Errors
/// Not a mail address, no such ticket, an address the rules refuse, no
/// change to make, or a database failure.
pub fn change_list(
    conn: &Db,
    rt: &Runtime,
    number: &str,
    role: Role,
    address: &str,
    add: bool,
) -> Result<()> {
    let address = address.trim().to_ascii_lowercase();
    mail_addresses([&address])?;
    let id = tickets::require(conn, number)?;
    let now = store::now();
    if add && role != Role::Notes {
        match decide::admit_to_watch_group(&rt.facts(), &address) {
            Ok(()) => {}
            Err(NotAdmitted::Agent) => return Err(DeskError::AgentInWatchGroup(address)),
            Err(NotAdmitted::CrmAddress) => return Err(DeskError::CrmAddress(address)),
        }
    }
    let changed = if add {
        tickets::add_participant(conn, id, role, &Mailbox::new(None, &address), now)?
    } else {
        tickets::remove_participant(conn, id, role, &address)?
    };
    if !changed {
        return Err(DeskError::Unchanged {
            address,
            already: if add { "already on" } else { "not on" },
            list: role.list_name(),
            number: number.to_string(),
        });
    }
    tickets::touch(conn, id, now)?;
    let change = if add { "added to" } else { "removed from" };
    let text = format!("{address} {change} {}", role.list_name());
    system_entry(conn, rt, id, &text, now)?;
    Ok(())
}

/// A `system` entry by the helpdesk itself, under the ticket's subject.
fn system_entry(conn: &Db, rt: &Runtime, ticket_id: i64, text: &str, now: i64) -> Result<()> {
    let subject = tickets::subject(conn, ticket_id)?;
    let system = decide::helpdesk(&rt.config);
    tickets::insert_system_entry(conn, ticket_id, &system, &subject, text, now)?;
    Ok(())
}
