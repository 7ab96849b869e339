//! Intake: one inbound message through thread → decide → compose → store,
//! inside the store's transaction. The SMTP listener and `crmgate deliver`
//! both end here.
//!
//! In the daemon, a single writer thread owns the connection and commits in
//! batches (group commit): each SMTP session waits for the commit that holds
//! its message, so `250` still means "on disk" while one fsync serves many
//! messages. Each message runs in a savepoint of its own, so one that fails
//! is answered `451` without taking its batch down with it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{oneshot, Notify};

use crate::compose::{self, Draft, Scrub};
use crate::config::Config;
use crate::decide::{self, Decision, Facts, Plan, PlannedSend, TicketTarget, TicketView};
use crate::helpdesk::{EntryKind, OutboxKind, QuarantineReason, Role, SendKind, TicketState};
use crate::parse::{self, Inbound, Mailbox, ParseError};
use crate::smtp::{Deliver, Envelope, Verdict};
use crate::store::{self, tickets, StoreError};
use crate::templates::{self, Templates};

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Compose(#[from] compose::ComposeError),
    #[error(transparent)]
    Template(#[from] templates::TemplateError),
}

impl From<rusqlite_migration::Error> for IntakeError {
    fn from(e: rusqlite_migration::Error) -> Self {
        IntakeError::Store(StoreError::Migration(e))
    }
}

/// What the rules run on; replaced as a whole on reload (SIGHUP).
#[derive(Debug)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub templates: Templates,
    /// Content of `reply_secret_file`, trimmed.
    pub reply_key: Option<Vec<u8>>,
    /// Addresses that were agents once. They change only when the agents
    /// are synced (start, SIGHUP), so they are read then, not per message.
    pub former_agents: BTreeSet<String>,
    /// What mail to non-agents is scrubbed of: agents and former agents.
    pub scrub: Scrub,
}

impl Runtime {
    /// # Errors
    /// A template that does not compile, or an unreadable key file.
    pub fn new(config: Arc<Config>) -> Result<Runtime, anyhow::Error> {
        let templates = Templates::load(config.templates_dir.as_deref())?;
        let reply_key = match &config.reply_secret_file {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| {
                        anyhow::anyhow!("security.reply_secret_file: {}: {e}", path.display())
                    })?
                    .trim_ascii()
                    .to_vec(),
            ),
            None => None,
        };
        let mut runtime = Runtime {
            scrub: Scrub {
                addresses: Vec::new(),
                replacement: config.public_address.clone(),
            },
            config,
            templates,
            reply_key,
            former_agents: BTreeSet::new(),
        };
        runtime.set_former_agents(BTreeSet::new());
        Ok(runtime)
    }

    /// Read the former agents from the log (after `tickets::sync_agents`).
    ///
    /// # Errors
    /// A database error.
    pub fn load_former_agents(&mut self, conn: &Connection) -> Result<(), StoreError> {
        self.set_former_agents(tickets::former_agents(conn)?);
        Ok(())
    }

    fn set_former_agents(&mut self, former_agents: BTreeSet<String>) {
        let mut addresses: BTreeSet<String> =
            self.config.agents.iter().map(|a| a.email.clone()).collect();
        addresses.extend(former_agents.iter().cloned());
        self.scrub.addresses = addresses.into_iter().collect();
        self.former_agents = former_agents;
    }

    /// What the rules read besides the message.
    pub fn facts(&self) -> Facts<'_> {
        Facts {
            config: &self.config,
            former_agents: &self.former_agents,
            reply_key: self.reply_key.as_deref(),
        }
    }
}

/// A message as it arrives: envelope, raw bytes, and the parse result
/// (parsed before it reaches the writer, off the single writer thread).
pub struct Arrival {
    pub envelope: Envelope,
    pub raw: Vec<u8>,
    pub parsed: Result<Inbound, ParseError>,
}

impl Arrival {
    pub fn new(envelope: Envelope, raw: Vec<u8>) -> Arrival {
        let parsed = parse::parse(&raw);
        Arrival {
            envelope,
            raw,
            parsed,
        }
    }
}

/// What became of one message: its verdict and the words of its log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub ticket: Option<String>,
    pub decision: &'static str,
    /// Outgoing messages queued.
    pub queued: usize,
}

impl Outcome {
    /// Not stored: the client is answered 451 and sends it again.
    fn not_stored() -> Outcome {
        Outcome {
            verdict: Verdict::TempFailure,
            ticket: None,
            decision: "error",
            queued: 0,
        }
    }
}

/// Process one message on `conn`, which the caller has put in a transaction
/// (or savepoint).
///
/// # Errors
/// Any database or composing failure: the caller rolls back and answers
/// `451 4.3.0`.
pub fn process(
    conn: &Connection,
    rt: &Runtime,
    arrival: &Arrival,
    now: i64,
) -> Result<Outcome, IntakeError> {
    let config = &rt.config;
    let env = &arrival.envelope;
    let inbound = match &arrival.parsed {
        Ok(inbound) => inbound,
        Err(ParseError::Unparseable) => {
            keep_in_quarantine(conn, arrival, now, "unparseable", None, None, None)?;
            return Ok(Outcome {
                verdict: Verdict::Stored,
                ticket: None,
                decision: "unparseable",
                queued: 0,
            });
        }
    };

    let ticket = find_ticket(conn, rt, env, inbound)?;
    let sender = inbound
        .from
        .as_ref()
        .map(|m| m.address.clone())
        .or_else(|| env.mail_from.clone())
        .unwrap_or_default();
    let duplicate_of = tickets::duplicate_of(
        conn,
        &sender,
        inbound.message_id.as_deref(),
        &inbound.subject,
        &inbound.body_hash,
        now,
    )?;
    let decision = decide::decide(&rt.facts(), env, inbound, ticket.as_ref(), duplicate_of);
    let quarantine = |reason: &str| {
        keep_in_quarantine(
            conn,
            arrival,
            now,
            reason,
            Some(&sender).filter(|s| !s.is_empty()).map(String::as_str),
            Some(&inbound.subject),
            inbound.message_id.as_deref(),
        )
    };
    let number = ticket.as_ref().map(|t| t.number.clone());
    match decision {
        Decision::Quarantine(reason) => {
            quarantine(reason.as_str())?;
            let mut queued = 0;
            if let (QuarantineReason::Postmaster, Some(operator)) = (reason, &config.operator) {
                forward_to_operator(conn, config, operator, inbound, &arrival.raw, now)?;
                queued = 1;
            }
            Ok(Outcome {
                verdict: Verdict::Stored,
                ticket: number,
                decision: reason.as_str(),
                queued,
            })
        }
        Decision::Duplicate { entry_id } => {
            tickets::count_duplicate(conn, entry_id)?;
            Ok(Outcome {
                verdict: Verdict::Stored,
                ticket: number,
                decision: "duplicate",
                queued: 0,
            })
        }
        Decision::Refuse(sentence) => {
            // Kept so an operator can see who tried; the sender gets the 550.
            quarantine("refused")?;
            Ok(Outcome {
                verdict: Verdict::Refused(sentence),
                ticket: number,
                decision: "refused",
                queued: 0,
            })
        }
        Decision::Record(plan) => {
            let raw_id = store_raw(conn, arrival, now)?;
            let applied = apply(
                conn,
                rt,
                &plan,
                ticket.as_ref(),
                inbound,
                &sender,
                Some(raw_id),
                now,
            )?;
            Ok(Outcome {
                verdict: Verdict::Stored,
                ticket: Some(applied.number),
                decision: plan.decision,
                queued: applied.queued,
            })
        }
    }
}

/// Keep a message that goes to no ticket, raw, with the reason.
fn keep_in_quarantine(
    conn: &Connection,
    arrival: &Arrival,
    now: i64,
    reason: &str,
    sender: Option<&str>,
    subject: Option<&str>,
    message_id: Option<&str>,
) -> Result<(), IntakeError> {
    let env = &arrival.envelope;
    let raw_id = store_raw(conn, arrival, now)?;
    tickets::insert_quarantine(
        conn,
        now,
        reason,
        sender.or(env.mail_from.as_deref()),
        subject,
        message_id,
        Some(raw_id),
    )?;
    Ok(())
}

/// The raw message, stored once with its envelope.
fn store_raw(conn: &Connection, arrival: &Arrival, now: i64) -> Result<i64, IntakeError> {
    let env = &arrival.envelope;
    Ok(tickets::insert_raw(
        conn,
        now,
        Some(&env.peer.to_string()),
        env.mail_from.as_deref(),
        &env.rcpt_to,
        &arrival.raw,
    )?)
}

/// Mail to postmaster@ goes on, unchanged but for our loop header, to the
/// operator (`[gateway] operator`): RFC 5321 wants a human to read it.
fn forward_to_operator(
    conn: &Connection,
    config: &Config,
    operator: &str,
    inbound: &Inbound,
    raw: &[u8],
    now: i64,
) -> Result<(), IntakeError> {
    let mut message = format!("X-Crmgate-Loop: {}\r\n", config.hostname).into_bytes();
    message.extend_from_slice(raw);
    let message_id = inbound.message_id.clone().unwrap_or_else(|| {
        format!(
            "postmaster.{:016x}@{}",
            rand::random::<u64>(),
            config.hostname
        )
    });
    tickets::insert_outbox(
        conn,
        None,
        None,
        OutboxKind::Postmaster,
        &[operator.to_string()],
        &message_id,
        &message,
        now,
    )?;
    Ok(())
}

/// Threading: our bounce address, our signed reply address, then the
/// Subject's number, a `+NUMBER` tag, In-Reply-To/References, and the
/// Message-ID a delivery report returns.
fn find_ticket(
    conn: &Connection,
    rt: &Runtime,
    env: &Envelope,
    inbound: &Inbound,
) -> Result<Option<TicketView>, IntakeError> {
    let config = &rt.config;
    let mut found = None;
    for rcpt in &env.rcpt_to {
        if let Some(id) = crate::thread::parse_bounce_address(
            rcpt,
            &config.public_address,
            rt.reply_key.as_deref(),
        ) {
            found = tickets::find_by_outbox_id(conn, id)?;
            if found.is_some() {
                break;
            }
        }
    }
    if found.is_none() {
        let crm = [
            config.public_address.as_str(),
            config.internal_address.as_str(),
        ];
        let c = crate::thread::candidates(
            &inbound.subject,
            &env.rcpt_to,
            &crm,
            &inbound.in_reply_to,
            &inbound.references,
            &config.ticket_pattern,
            rt.reply_key.as_deref(),
        );
        let numbers = c.signed_numbers.iter().chain(&c.subject_numbers);
        for number in numbers.chain(&c.tag_numbers) {
            if let Some(id) = tickets::find_by_number(conn, number)? {
                found = Some(id);
                break;
            }
        }
        let returned = inbound
            .report
            .as_ref()
            .and_then(|r| r.original_message_id.clone());
        if found.is_none() {
            for id in c.message_ids.iter().chain(returned.as_ref()) {
                if let Some(t) = tickets::find_by_message_id(conn, id)? {
                    found = Some(t);
                    break;
                }
            }
        }
    }
    Ok(match found {
        Some(id) => Some(tickets::view(conn, id)?),
        None => None,
    })
}

/// What applying a plan wrote.
pub struct Applied {
    pub number: String,
    pub queued: usize,
}

/// Write a plan: the ticket and its lists, the entries, the outbox rows.
///
/// # Errors
/// Database, template or composing failures.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    conn: &Connection,
    rt: &Runtime,
    plan: &Plan,
    ticket: Option<&TicketView>,
    inbound: &Inbound,
    sender: &str,
    raw_id: Option<i64>,
    now: i64,
) -> Result<Applied, IntakeError> {
    let config = &rt.config;
    let view = match &plan.ticket {
        TicketTarget::New(new) => {
            let state = plan.state.unwrap_or(TicketState::New);
            let (id, _) = tickets::create(
                conn,
                new,
                state,
                &config.ticket_prefix,
                config.ticket_digits,
                now,
            )?;
            tickets::view(conn, id)?
        }
        TicketTarget::Existing(id) => {
            if let Some(state) = plan.state {
                tickets::set_state(conn, *id, state, now)?;
            } else {
                tickets::touch(conn, *id, now)?;
            }
            for agent in &plan.join_work_notes {
                tickets::add_participant(conn, *id, Role::Notes, &Mailbox::new(None, agent), now)?;
            }
            match ticket {
                Some(t) if t.id == *id => t.clone(),
                _ => tickets::view(conn, *id)?,
            }
        }
    };

    // Entries, in order; the inbound message's attachments go on the first
    // entry that keeps them.
    let mut entry_ids = Vec::with_capacity(plan.entries.len());
    let mut entry_texts = Vec::with_capacity(plan.entries.len());
    let mut attachments_kept = false;
    let listed: Vec<(String, u64)> = inbound
        .attachments
        .iter()
        .map(|a| (a.filename.clone(), a.data.len() as u64))
        .collect();
    for entry in &plan.entries {
        let text: std::borrow::Cow<'_, str> = match entry.kind {
            EntryKind::Receipt => render(rt, "receipt", &view, "", "")?.into(),
            EntryKind::Closure => render(rt, "closure", &view, "", "")?.into(),
            _ => (*entry.text).into(),
        };
        let stands_for_message =
            entry.message_id.is_some() || (entry.keeps_attachments && !attachments_kept);
        let id = tickets::insert_entry(
            conn,
            &tickets::EntryRow {
                ticket_id: view.id,
                kind: entry.kind,
                from: &entry.author,
                at: now,
                subject: &entry.subject,
                body: &text,
                html: entry.html.as_deref(),
                message_id: entry.message_id.as_deref(),
                by_agent: entry.by_agent,
                sender: stands_for_message.then_some(sender),
                body_hash: stands_for_message.then_some(inbound.body_hash.as_str()),
                raw_id: if matches!(entry.kind, EntryKind::Receipt | EntryKind::Closure) {
                    None
                } else {
                    raw_id
                },
            },
        )?;
        if entry.keeps_attachments && !attachments_kept {
            for a in &inbound.attachments {
                tickets::insert_attachment(conn, id, a)?;
            }
            attachments_kept = true;
        }
        if let Some(mid) = &entry.message_id {
            tickets::insert_thread_id(conn, mid, view.id, entry.by_agent, now)?;
        }
        entry_ids.push(id);
        entry_texts.push(text);
    }

    let mut queued = 0;
    if let Some(bounce) = &plan.bounce {
        queued += apply_bounce(conn, rt, &view, bounce, now)?;
    }

    let mut thread = view.thread.clone();
    for entry in &plan.entries {
        if let Some(mid) = &entry.message_id {
            thread.push(crate::decide::ThreadRef {
                message_id: mid.clone(),
                agent_inbound: entry.by_agent,
            });
        }
    }
    for send in &plan.sends {
        if send.kind == SendKind::ReplyAllNotice
            && !first_notice_today(conn, view.id, &send.envelope, now)?
        {
            continue;
        }
        let Some(entry) = plan.entries.get(send.entry) else {
            continue;
        };
        let (subject, text, html) = match send.kind {
            SendKind::ReplyAllNotice => (
                templates::subject("reply_all", config.language, &view.subject),
                render(rt, "reply_all", &view, "", "")?,
                None,
            ),
            SendKind::Receipt | SendKind::Closure => (
                templates::subject(
                    if send.kind == SendKind::Receipt {
                        "receipt"
                    } else {
                        "closure"
                    },
                    config.language,
                    &view.subject,
                ),
                entry_texts[send.entry].to_string(),
                None,
            ),
            _ => (
                if entry.subject.is_empty() {
                    view.subject.clone()
                } else {
                    entry.subject.clone()
                },
                notification_text(&entry_texts[send.entry], &view.number, config.language),
                // A text that long is cut: the HTML would say more than it.
                entry
                    .html
                    .clone()
                    .filter(|_| entry_texts[send.entry].len() <= NOTIFICATION_TEXT_MAX)
                    .filter(|html| html.len() <= NOTIFICATION_TEXT_MAX),
            ),
        };
        let listed_attachments = if entry.keeps_attachments && send.kind != SendKind::Receipt {
            listed.clone()
        } else {
            Vec::new()
        };
        let content = Content {
            subject,
            text,
            html,
            listed_attachments,
            attachments: Vec::new(),
            written_by_agent: entry.by_agent,
        };
        let queued_id = queue(
            conn,
            rt,
            &view,
            &thread,
            send,
            content,
            Some(entry_ids[send.entry]),
            now,
        )?;
        queued += usize::from(queued_id.is_some());
    }
    Ok(Applied {
        number: view.number,
        queued,
    })
}

/// The most text one copy carries. Real mail is far below it; a longer
/// text (a log pasted whole, 25 MB of it) stays whole on the ticket, and
/// each copy carries its beginning and says where the rest is, instead of
/// holding the whole text once more per copy while it is composed, stored
/// and sent.
pub const NOTIFICATION_TEXT_MAX: usize = 1024 * 1024;

/// `text`, cut at the last line end before [`NOTIFICATION_TEXT_MAX`] with
/// a note naming the ticket, when it is longer.
fn notification_text(text: &str, number: &str, language: crate::config::Language) -> String {
    if text.len() <= NOTIFICATION_TEXT_MAX {
        return text.to_string();
    }
    let mut end = NOTIFICATION_TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let head = &text[..end];
    let head = head.rfind('\n').map_or(head, |i| &head[..=i]);
    let note = templates::cut_note(language, text.len(), number);
    let mut out = String::with_capacity(head.len() + note.len());
    out.push_str(head);
    out.push_str(&note);
    out
}

fn render(
    rt: &Runtime,
    name: &str,
    view: &TicketView,
    recipients: &str,
    reason: &str,
) -> Result<String, IntakeError> {
    let config = &rt.config;
    Ok(rt.templates.render(
        name,
        config.language,
        &templates::Context {
            number: &view.number,
            subject: &view.subject,
            display_name: &config.display_name,
            public_address: &config.public_address,
            recipients,
            reason,
        },
    )?)
}

/// One "reply to the CRM only" notice per agent, ticket and day.
fn first_notice_today(
    conn: &Connection,
    ticket_id: i64,
    agents: &[String],
    now: i64,
) -> Result<bool, IntakeError> {
    let day = now / 86_400;
    let mut first = false;
    for agent in agents {
        first |= conn.execute(
            "INSERT OR IGNORE INTO reply_all_notices (ticket_id, agent, day) VALUES (?1, ?2, ?3)",
            rusqlite::params![ticket_id, agent, day.to_string()],
        )? > 0;
    }
    Ok(first)
}

/// A delivery report about our mail: mark the row failed and tell the
/// work-notes list (never for a failed notice itself: no loop of notices).
fn apply_bounce(
    conn: &Connection,
    rt: &Runtime,
    view: &TicketView,
    bounce: &decide::Bounce,
    now: i64,
) -> Result<usize, IntakeError> {
    let id = match (bounce.outbox_id, &bounce.original_message_id) {
        (Some(id), _) => Some(id),
        (None, Some(mid)) => conn
            .query_row(
                "SELECT id FROM outbox WHERE message_id = ?1 ORDER BY id LIMIT 1",
                [mid],
                |r| r.get::<_, i64>(0),
            )
            .optional()?,
        (None, None) => None,
    };
    let row = match id {
        Some(id) => match crate::store::outbox::get(conn, id) {
            Ok(row) => Some(row),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        },
        None => None,
    };
    let Some(row) = row else {
        return Ok(0);
    };
    let failed = if bounce.failed_recipients.is_empty() {
        row.recipients.join(", ")
    } else {
        bounce.failed_recipients.join(", ")
    };
    let reason = if bounce.diagnostic.is_empty() {
        "delivery report".to_string()
    } else {
        bounce.diagnostic.clone()
    };
    let newly_failed = crate::store::outbox::mark_failed_by_report(
        conn,
        row.id,
        &format!("bounced: {failed}: {reason}"),
    )?;
    // Told once per row, and never about a failed notice: no loop of notices.
    if !newly_failed
        || row.kind == SendKind::FailureNotice.as_str()
        || row.kind == SendKind::ReplyAllNotice.as_str()
        || view.work_notes_list.is_empty()
    {
        return Ok(0);
    }
    failure_notice(conn, rt, view, &failed, &reason, now)?;
    Ok(1)
}

/// Tell the work-notes list that mail of the ticket could not be delivered.
///
/// # Errors
/// Database, template or composing failures.
pub fn failure_notice(
    conn: &Connection,
    rt: &Runtime,
    view: &TicketView,
    failed: &str,
    reason: &str,
    now: i64,
) -> Result<(), IntakeError> {
    let config = &rt.config;
    let text = render(rt, "failure", view, failed, reason)?;
    let system = Mailbox::new(Some(&config.display_name), &config.public_address);
    let entry_id = tickets::insert_system_entry(
        conn,
        view.id,
        &system,
        &templates::subject("failure", config.language, &view.subject),
        &text,
        now,
    )?;
    let notes: Vec<Mailbox> = view
        .work_notes_list
        .iter()
        .map(|a| Mailbox::new(config.agent(a).map(|x| x.name.as_str()), a))
        .collect();
    let send = PlannedSend {
        kind: SendKind::FailureNotice,
        entry: 0,
        from_name: config.display_name.clone(),
        from_address: config.internal_address.clone(),
        envelope: notes.iter().map(|m| m.address.clone()).collect(),
        to: notes,
        cc: Vec::new(),
        agents_only: true,
    };
    let subject = templates::subject("failure", config.language, &view.subject);
    let content = Content {
        subject,
        text,
        html: None,
        listed_attachments: Vec::new(),
        attachments: Vec::new(),
        written_by_agent: false,
    };
    queue(
        conn,
        rt,
        view,
        &view.thread,
        &send,
        content,
        Some(entry_id),
        now,
    )?;
    Ok(())
}

/// What one outgoing message says.
pub struct Content {
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
    /// Kept on the ticket, named in the body.
    pub listed_attachments: Vec<(String, u64)>,
    /// Sent along: the e-mail function only.
    pub attachments: Vec<crate::parse::Attachment>,
    /// Written by a believed agent: never capped.
    pub written_by_agent: bool,
}

/// Compose one planned message and put it in the outbox, less the
/// recipients a cap holds back (each noted in a `system` entry). `None`
/// when nobody is left to send to.
///
/// # Errors
/// Database or composing failures.
#[allow(clippy::too_many_arguments)]
pub fn queue(
    conn: &Connection,
    rt: &Runtime,
    view: &TicketView,
    thread: &[crate::decide::ThreadRef],
    send: &PlannedSend,
    content: Content,
    entry_id: Option<i64>,
    now: i64,
) -> Result<Option<i64>, IntakeError> {
    let config = &rt.config;
    let cap = decide::cap(send.kind, content.written_by_agent);
    let mut envelope = Vec::with_capacity(send.envelope.len());
    let mut held_back = Vec::new();
    for address in &send.envelope {
        let sent = if cap == decide::Cap::Never {
            decide::SentCounts::default()
        } else {
            tickets::sent_counts(
                conn,
                address,
                view.id,
                decide::SentCounts::caps(config),
                now,
            )?
        };
        if decide::within_cap(config, cap, sent) {
            envelope.push(address.clone());
        } else {
            held_back.push(address.as_str());
        }
    }
    if !held_back.is_empty() {
        let system = Mailbox::new(Some(&config.display_name), &config.public_address);
        let text = format!(
            "{} not sent to {}: {} reached (see [auto] in the configuration).",
            send.kind.as_str(),
            held_back.join(", "),
            if cap == decide::Cap::Automatic {
                "the cap of automatic messages per address"
            } else {
                "the cap of re-sends per recipient and ticket"
            },
        );
        tickets::insert_system_entry(conn, view.id, &system, &view.subject, &text, now)?;
        tracing::warn!(ticket = %view.number, kind = send.kind.as_str(), held_back = ?held_back, "cap reached");
    }
    if envelope.is_empty() {
        return Ok(None);
    }
    if cap != decide::Cap::Never {
        for address in &envelope {
            tickets::record_send(conn, address, view.id, cap == decide::Cap::Automatic, now)?;
        }
    }
    // Mail to non-agents never threads on an agent's own Message-ID.
    let visible: Vec<&str> = thread
        .iter()
        .filter(|r| send.agents_only || !r.agent_inbound)
        .map(|r| r.message_id.as_str())
        .collect();
    let mut references: Vec<String> = Vec::new();
    if let Some(first) = visible.first() {
        references.push((*first).to_string());
    }
    let tail_start = visible.len().saturating_sub(10).max(1);
    references.extend(visible.iter().skip(tail_start).map(|s| s.to_string()));
    let scrub = (!send.agents_only).then(|| rt.scrub.clone());
    let message_id = format!(
        "{}.{:016x}@{}",
        view.number,
        rand::random::<u64>(),
        config.hostname
    );
    let draft = Draft {
        kind: send.kind,
        ticket_number: view.number.clone(),
        language: config.language,
        from_name: send.from_name.clone(),
        from_address: send.from_address.clone(),
        reply_address: match send.kind {
            SendKind::WorkNote => crate::thread::reply_address(
                &config.internal_address,
                &view.number,
                rt.reply_key.as_deref(),
            ),
            _ => None,
        },
        to: send.to.clone(),
        cc: send.cc.clone(),
        subject: content.subject,
        text: content.text,
        html: content.html,
        listed_attachments: content.listed_attachments,
        attachments: content.attachments,
        message_id: message_id.clone(),
        in_reply_to: references.last().cloned(),
        references,
        date: now,
        loop_host: config.hostname.clone(),
        scrub,
    };
    let bytes = compose::compose(&draft)?;
    let id = tickets::insert_outbox(
        conn,
        Some(view.id),
        entry_id,
        send.kind.into(),
        &envelope,
        &message_id,
        &bytes,
        now,
    )?;
    tickets::insert_thread_id(conn, &message_id, view.id, false, now)?;
    Ok(Some(id))
}

// ---------------------------------------------------------------------------
// The writer thread: group commit.
// ---------------------------------------------------------------------------

/// How often the writer forgets `sends` rows no cap counts any more, and
/// at most how many each time (up to 500 rows a second, above any real
/// helpdesk's rate of capped mail): the table stays about a day deep, and
/// the commits around wait a few milliseconds at most.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
const PRUNE_ROWS: i64 = 5_000;

/// How many messages one commit may hold at most.
const MAX_BATCH: usize = 256;

// Messages are the common job and were this size before marks joined
// them: boxing them would cost an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
enum Job {
    /// An inbound message, answered with its verdict once committed.
    Message {
        arrival: Arrival,
        reply: oneshot::Sender<Verdict>,
    },
    /// The relay worker's outcomes, answered once committed: written by
    /// the one writer, in its batches, they never wait for its lock (nor
    /// make it wait for theirs).
    Marks(crate::relay::MarkRequest),
}

/// What became of one job of a batch.
enum Done {
    Message(Outcome),
    Marks(Result<(), String>),
}

/// The handle SMTP sessions (and the relay worker) use to hand work to the
/// writer thread.
#[derive(Clone)]
pub struct Writer {
    jobs: tokio::sync::mpsc::Sender<Job>,
}

impl Writer {
    /// Start the writer thread on its own connection, and the thread that
    /// makes its commits durable and answers them.
    ///
    /// # Errors
    /// A thread cannot be spawned, or the connection's durability cannot be
    /// set.
    pub fn spawn(
        mut conn: Connection,
        runtime: Arc<RwLock<Arc<Runtime>>>,
        wake: Arc<Notify>,
        checkpoints: Arc<store::CheckpointProgress>,
    ) -> std::io::Result<Writer> {
        let (jobs, mut rx) = tokio::sync::mpsc::channel::<Job>(4 * MAX_BATCH);
        let wal = WalFile::take_over_syncs(&conn)?;
        let (committed, to_answer) = std::sync::mpsc::channel::<Committed>();
        std::thread::Builder::new()
            .name("crmgate-sync".into())
            .spawn(move || sync_and_answer(wal, &to_answer, &wake))?;
        std::thread::Builder::new()
            .name("crmgate-writer".into())
            .spawn(move || {
                let mut pruned_at = std::time::Instant::now();
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let rt = match runtime.read() {
                        Ok(guard) => guard.clone(),
                        Err(poisoned) => poisoned.into_inner().clone(),
                    };
                    let done = write_batch(&mut conn, &rt, &batch);
                    // Without the answering thread the replies are dropped:
                    // each session then answers 451.
                    let _ = committed.send(Committed { batch, done });
                    if let Err(e) = store::finish_checkpoint(&conn, &checkpoints) {
                        tracing::warn!(error = %e, "checkpoint failed: the WAL stays long a while");
                    }
                    if pruned_at.elapsed() >= PRUNE_EVERY {
                        pruned_at = std::time::Instant::now();
                        match tickets::prune_sends(&conn, store::now(), PRUNE_ROWS) {
                            Ok(0) => {}
                            Ok(n) => tracing::debug!(
                                rows = n,
                                "forgot sends older than a day (no cap counts them)"
                            ),
                            Err(e) => tracing::warn!(error = %e, "cannot prune old sends"),
                        }
                    }
                }
            })?;
        Ok(Writer { jobs })
    }

    /// Hand a message over and wait for the commit that holds it.
    pub async fn submit(&self, arrival: Arrival) -> Verdict {
        let (reply, answer) = oneshot::channel();
        // The channel is bounded: a full queue makes the session wait (back
        // pressure) without blocking tokio's worker thread.
        if self
            .jobs
            .send(Job::Message { arrival, reply })
            .await
            .is_err()
        {
            return Verdict::TempFailure;
        }
        answer.await.unwrap_or(Verdict::TempFailure)
    }

    /// Hand the relay worker's outcomes over; `marks.reply` is answered
    /// once they are committed (or could not be).
    pub async fn record_marks(&self, marks: crate::relay::MarkRequest) {
        if let Err(refused) = self.jobs.send(Job::Marks(marks)).await {
            if let Job::Marks(marks) = refused.0 {
                let _ = marks
                    .reply
                    .send(Err("the writer thread has stopped".into()));
            }
        }
    }
}

/// A committed batch, waiting for its WAL frames to reach the disk.
struct Committed {
    batch: Vec<Job>,
    done: Vec<Done>,
}

/// The writer's WAL, synced by the answering thread.
///
/// With `synchronous=FULL`, every commit waited for its fsync on the
/// writer thread, which then sat idle (15 % of its time under load) while
/// the next sessions' messages waited for it. Now the writer commits with
/// `synchronous=NORMAL` (in WAL mode: consistent, and nothing reaches the
/// disk at commit) and goes on with the next batch, while this thread
/// fdatasyncs the WAL file and only then answers the batches committed
/// before: the frames, and the WAL header of a WAL that started over,
/// are on disk before a `250`, as before. One fdatasync also covers every
/// batch committed while the one before it ran. Checkpoints still sync the
/// WAL before copying it back (SQLite does that at `NORMAL` too).
struct WalFile {
    path: Option<PathBuf>,
    /// The file, and its inode: SQLite deletes the WAL when the last
    /// connection closes, so a new one may stand at the same path.
    open: Option<(std::fs::File, u64)>,
}

impl WalFile {
    /// Set the writer's connection to commit without syncing, when its WAL
    /// can be synced here (a database in a file, in WAL mode); otherwise it
    /// stays `FULL` and [`WalFile::sync`] has nothing to do.
    fn take_over_syncs(conn: &Connection) -> std::io::Result<WalFile> {
        // SQLite keeps its rollback journal where WAL cannot be had (a
        // file system without shared memory): there is no WAL to sync then.
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(std::io::Error::other)?;
        let path = conn
            .path()
            .filter(|p| !p.is_empty() && mode.eq_ignore_ascii_case("wal"))
            .map(|p| PathBuf::from(format!("{p}-wal")));
        if path.is_some() {
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(std::io::Error::other)?;
        }
        Ok(WalFile { path, open: None })
    }

    fn sync(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let Some(path) = &self.path else {
            return Ok(());
        };
        let now_there = std::fs::metadata(path)?.ino();
        if !matches!(&self.open, Some((_, inode)) if *inode == now_there) {
            let file = std::fs::File::open(path)?;
            let inode = file.metadata()?.ino();
            self.open = Some((file, inode));
        }
        match &self.open {
            Some((file, _)) => file.sync_data(),
            None => Ok(()),
        }
    }
}

/// The answering thread: sync the WAL, then answer every batch committed
/// before the sync began, then wake the relay (whose rows are now durable).
/// A failed sync answers its messages 451: what the disk may not hold is
/// not promised, and a sender that tries again is recognised by its
/// Message-ID if the first copy survived after all.
fn sync_and_answer(
    mut wal: WalFile,
    committed: &std::sync::mpsc::Receiver<Committed>,
    wake: &Notify,
) {
    while let Ok(first) = committed.recv() {
        let mut batches = vec![first];
        batches.extend(committed.try_iter());
        let synced = match wal.sync() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot sync the WAL: its messages are answered 451");
                false
            }
        };
        let mut wake_relay = false;
        for Committed { batch, done } in batches {
            for (job, done) in batch.into_iter().zip(done) {
                let done = match done {
                    Done::Message(_) if !synced => Done::Message(Outcome::not_stored()),
                    Done::Marks(_) if !synced => Done::Marks(Err("the WAL sync failed".into())),
                    done => done,
                };
                wake_relay |= answer(job, done);
            }
        }
        if wake_relay {
            wake.notify_one();
        }
    }
}

/// Answer one job of a committed batch; whether the relay has rows to send.
fn answer(job: Job, done: Done) -> bool {
    match (job, done) {
        (Job::Message { arrival, reply }, Done::Message(outcome)) => {
            log_outcome(&arrival, &outcome);
            let queued = outcome.queued > 0;
            let _ = reply.send(outcome.verdict);
            queued
        }
        (Job::Marks(marks), Done::Marks(result)) => {
            // A failure may have queued a notice.
            let may_queue = result.is_ok() && marks.may_queue();
            let _ = marks.reply.send(result);
            may_queue
        }
        // `write_batch` answers each job in kind.
        (Job::Message { reply, .. }, Done::Marks(_)) => {
            let _ = reply.send(Verdict::TempFailure);
            false
        }
        (Job::Marks(marks), Done::Message(_)) => {
            let _ = marks.reply.send(Err("not recorded".into()));
            false
        }
    }
}

fn log_outcome(arrival: &Arrival, outcome: &Outcome) {
    let message_id = arrival
        .parsed
        .as_ref()
        .ok()
        .and_then(|i| i.message_id.as_deref())
        .unwrap_or("-");
    tracing::info!(
        ticket = outcome.ticket.as_deref().unwrap_or("-"),
        message_id,
        decision = outcome.decision,
        queued = outcome.queued,
        verdict = ?outcome.verdict,
        "message"
    );
}

/// One transaction for the whole batch, one savepoint per job.
fn write_batch(conn: &mut Connection, rt: &Runtime, batch: &[Job]) -> Vec<Done> {
    let now = store::now();
    let raw_bytes: usize = batch
        .iter()
        .map(|job| match job {
            Job::Message { arrival, .. } => arrival.raw.len(),
            Job::Marks(_) => 0,
        })
        .sum();
    let large = raw_bytes > LARGE_BATCH_BYTES;
    if large {
        if let Err(e) = store::writer_cache(conn, true) {
            tracing::warn!(error = %e, "cannot shrink the page cache for a large message");
        }
    }
    let done = write_batch_in_transaction(conn, rt, batch, now);
    if large {
        if let Err(e) = store::writer_cache(conn, false) {
            tracing::warn!(error = %e, "cannot restore the page cache");
        }
    }
    done
}

/// Above this many bytes of raw mail, a batch is written with a small page
/// cache ([`store::writer_cache`]).
const LARGE_BATCH_BYTES: usize = 4 * 1024 * 1024;

fn write_batch_in_transaction(
    conn: &mut Connection,
    rt: &Runtime,
    batch: &[Job],
    now: i64,
) -> Vec<Done> {
    let failed = |why: &str| -> Vec<Done> {
        batch
            .iter()
            .map(|job| match job {
                Job::Message { .. } => Done::Message(Outcome::not_stored()),
                Job::Marks(_) => Done::Marks(Err(why.to_string())),
            })
            .collect()
    };
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            tracing::error!(error = %e, "cannot begin a transaction");
            return failed(&format!("cannot begin a transaction: {e}"));
        }
    };
    let mut done = Vec::with_capacity(batch.len());
    for job in batch {
        let result = match job {
            Job::Message { arrival, .. } => {
                store::in_savepoint(&tx, |conn| process(conn, rt, arrival, now)).map(|r| {
                    Done::Message(r.unwrap_or_else(|e| {
                        tracing::error!(error = %e, "message not stored");
                        Outcome::not_stored()
                    }))
                })
            }
            Job::Marks(marks) => store::in_savepoint(&tx, |conn| marks.write(conn))
                .map(|r| Done::Marks(r.map_err(|e| e.to_string()))),
        };
        match result {
            Ok(d) => done.push(d),
            Err(e) => {
                // Dropping `tx` rolls the whole batch back.
                tracing::error!(error = %e, "savepoint failed: the whole batch is answered 451");
                return failed(&format!("savepoint failed: {e}"));
            }
        }
    }
    if let Err(e) = tx.commit() {
        tracing::error!(error = %e, "commit failed: the whole batch is answered 451");
        return failed(&format!("commit failed: {e}"));
    }
    done
}

/// The [`Deliver`] the SMTP listener hands messages to.
pub struct Intake {
    pub runtime: Arc<RwLock<Arc<Runtime>>>,
    pub writer: Writer,
}

impl Intake {
    fn config(&self) -> Arc<Config> {
        match self.runtime.read() {
            Ok(guard) => guard.config.clone(),
            Err(poisoned) => poisoned.into_inner().config.clone(),
        }
    }
}

/// Above this size a message is parsed on a blocking thread, so a 25 MB
/// attachment does not stall the other sessions of the same worker.
const PARSE_INLINE_MAX: usize = 256 * 1024;

impl Deliver for Intake {
    fn accepts_recipient(&self, address: &str) -> bool {
        decide::accepts_recipient(&self.config(), address)
    }

    async fn deliver(&self, envelope: Envelope, raw: Vec<u8>) -> Verdict {
        let arrival = if raw.len() <= PARSE_INLINE_MAX {
            Arrival::new(envelope, raw)
        } else {
            match tokio::task::spawn_blocking(move || Arrival::new(envelope, raw)).await {
                Ok(arrival) => arrival,
                Err(_) => return Verdict::TempFailure,
            }
        };
        self.writer.submit(arrival).await
    }
}

/// `crmgate deliver` and tests: one message, one transaction, no thread.
///
/// # Errors
/// Database failures (the caller answers 75, temporary).
pub fn deliver_once(
    conn: &mut Connection,
    rt: &Runtime,
    arrival: &Arrival,
) -> Result<Outcome, IntakeError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let outcome = process(&tx, rt, arrival, store::now())?;
    tx.commit()?;
    log_outcome(arrival, &outcome);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Language;

    fn synchronous(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn the_writer_commits_without_syncing_and_the_wal_it_syncs_is_the_one_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("log.db");
        let conn = store::open(&db).unwrap();
        let mut wal = WalFile::take_over_syncs(&conn).unwrap();
        assert_eq!(synchronous(&conn), 1, "NORMAL");
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        wal.sync().unwrap();
        let first = wal.open.as_ref().map(|(_, inode)| *inode).unwrap();

        // Another WAL at the same path (SQLite deleted and made it anew).
        let path = dir.path().join("log.db-wal");
        std::fs::rename(&path, dir.path().join("old-wal")).unwrap();
        std::fs::write(&path, b"").unwrap();
        wal.sync().unwrap();
        let second = wal.open.as_ref().map(|(_, inode)| *inode).unwrap();
        assert_ne!(first, second);

        // No WAL to sync is an error: the batch is not answered 250.
        std::fs::remove_file(&path).unwrap();
        assert!(wal.sync().is_err());
    }

    #[test]
    fn without_a_wal_the_writer_keeps_syncing_each_commit_itself() {
        let dir = tempfile::tempdir().unwrap();
        let conn = store::open(&dir.path().join("log.db")).unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        let mut wal = WalFile::take_over_syncs(&conn).unwrap();
        assert_eq!(synchronous(&conn), 2, "FULL");
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        wal.sync().unwrap();
        assert!(wal.open.is_none());
    }

    #[test]
    fn a_short_text_goes_into_copies_whole() {
        let text = "Bonjour,\nl'imprimante ne marche plus.\n";
        assert_eq!(notification_text(text, "TKT0000001", Language::Fr), text);
    }

    #[test]
    fn a_long_text_is_cut_at_a_line_end_with_a_note_naming_the_ticket() {
        let line = "é".repeat(40) + "\n";
        let text = line.repeat(2 * NOTIFICATION_TEXT_MAX / line.len());
        let cut = notification_text(&text, "TKT0000042", Language::En);
        assert!(cut.len() <= NOTIFICATION_TEXT_MAX + 200, "{}", cut.len());
        let (head, note) = cut.split_once("\n[… cut:").unwrap();
        assert!(text.starts_with(head) && head.ends_with('\n'));
        assert!(note.contains(&format!("{} bytes", text.len())), "{note}");
        assert!(note.contains("ticket TKT0000042"), "{note}");
    }
}
