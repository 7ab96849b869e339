//! Apply: a plan that `decide` made, written to the store and turned into
//! outgoing mail. The ticket and its lists change, the entries are logged,
//! and each planned send is capped and queued in the outbox as the plan of
//! its copy (who, what, scrubbed of whom: [`crate::compose::plan`]), which
//! the relay composes when it sends it, all in the caller's transaction. Inbound mail
//! ([`crate::intake`]), the CLI's ticket commands and the relay's failure
//! hook all queue their mail here.

use crate::store::Db;

use crate::compose;
use crate::compose::plan::{CopyPlan, EntryBody, PlannedText};
use crate::decide::{self, Plan, PlannedEntry, PlannedSend, TicketTarget, TicketView};
use crate::helpdesk::{EntryKind, Role, SendKind, TicketState};
use crate::intake::Runtime;
use crate::parse::{Inbound, Mailbox};
use crate::store::{outbox, tickets, StoreError};
use crate::templates;

/// Why a plan could not be written: the caller rolls its transaction back.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Compose(#[from] compose::ComposeError),
    #[error(transparent)]
    Template(#[from] templates::TemplateError),
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
    conn: &Db,
    rt: &Runtime,
    plan: &Plan,
    ticket: Option<&TicketView>,
    inbound: &Inbound,
    sender: &str,
    raw: Option<(i64, &[u8])>,
    now: i64,
) -> Result<Applied, ApplyError> {
    let config = &rt.config;
    let view = match &plan.ticket {
        TicketTarget::New(new) => {
            let state = plan.state.unwrap_or(TicketState::New);
            let view = tickets::create_and_view(
                conn,
                new,
                state,
                &config.ticket.prefix,
                config.ticket.digits,
                now,
            )?;
            if let Some(old) = &plan.follows {
                // Rule 9: the resolved ticket a late reply left names the
                // new one; it stays resolved and untouched otherwise.
                let text = decide::followed_by(old, &view.number);
                let helpdesk = decide::helpdesk(config);
                tickets::insert_system_entry(conn, old.id, &helpdesk, &old.subject, &text, now)?;
            }
            view
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
    let mut listed: Vec<(String, u64)> = Vec::new();
    // The Message-IDs the message gives the ticket, its own and its
    // copies', inserted together at the end.
    let mut thread_ids: Vec<(String, bool, bool)> = Vec::new();
    for entry in &plan.entries {
        let text: std::borrow::Cow<'_, str> = match entry.kind {
            EntryKind::Receipt => render(rt, "receipt", &view, "", "")?.into(),
            EntryKind::Closure => render(rt, "closure", &view, "", "")?.into(),
            _ => (*entry.text).into(),
        };
        let crmgates_own = matches!(entry.kind, EntryKind::Receipt | EntryKind::Closure);
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
                raw_id: raw.map(|(id, _)| id).filter(|_| !crmgates_own),
                raw: raw.map(|(_, data)| data).filter(|_| !crmgates_own),
            },
        )?;
        if entry.keeps_attachments && !attachments_kept {
            for a in &inbound.attachments {
                // Listed once: not when the ticket has these bytes already,
                // nor an inline image (a signature's logo).
                if tickets::insert_attachment(conn, id, a)? && !a.inline {
                    listed.push((a.filename.clone(), a.data.len() as u64));
                }
            }
            attachments_kept = true;
        }
        if let Some(mid) = &entry.message_id {
            thread_ids.push((mid.clone(), threads_agents_only(rt, entry, sender), false));
        }
        entry_ids.push(id);
        entry_texts.push(text);
    }

    let mut queued = 0;
    if let Some(bounce) = &plan.bounce {
        // Its notice's Message-ID threads after the message's.
        insert_thread_ids(conn, view.id, &std::mem::take(&mut thread_ids), now)?;
        queued += apply_bounce(conn, rt, &view, bounce, now)?;
    }

    let mut thread = decide::thread_with(&view.thread, plan);
    // thread_with goes by each entry's author; mail from an agent's address
    // (a forward's comment, which is the requester's; a forger's mail) threads
    // agents' mail only as well, as its stored thread id says.
    let added = plan.entries.iter().filter(|e| e.message_id.is_some());
    for (reference, entry) in thread[view.thread.len()..].iter_mut().zip(added) {
        reference.agent_inbound |= threads_agents_only(rt, entry, sender);
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
        let (subject, text) = match send.kind {
            SendKind::ReplyAllNotice => (
                templates::subject("reply_all", config.gateway.language, &view.subject),
                PlannedText::Here(render(rt, "reply_all", &view, "", "")?),
            ),
            SendKind::Receipt | SendKind::Closure => (
                templates::subject(
                    if send.kind == SendKind::Receipt {
                        "receipt"
                    } else {
                        "closure"
                    },
                    config.gateway.language,
                    &view.subject,
                ),
                // The receipt's (closure's) entry is its rendered template.
                PlannedText::Entry,
            ),
            _ => (
                if entry.subject.is_empty() {
                    view.subject.clone()
                } else {
                    entry.subject.clone()
                },
                PlannedText::Notification,
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
            entry: Some(EntryBody {
                text: &entry_texts[send.entry],
                html: entry.html.as_deref(),
                attachments: Vec::new().into(),
            }),
            listed_attachments,
            attachments: false,
            written_by_agent: entry.by_agent,
            copied_from: (!entry.by_agent).then(|| sender.to_ascii_lowercase()),
        };
        let queued_copy = queue_copy(
            conn,
            rt,
            &view,
            &thread,
            send,
            content,
            Some(entry_ids[send.entry]),
            now,
        )?;
        if let Some((_, message_id)) = queued_copy {
            thread_ids.push((message_id, false, true));
            queued += 1;
        }
    }
    insert_thread_ids(conn, view.id, &thread_ids, now)?;
    Ok(Applied {
        number: view.number,
        queued,
    })
}

fn insert_thread_ids(
    conn: &Db,
    ticket_id: i64,
    ids: &[(String, bool, bool)],
    now: i64,
) -> Result<(), StoreError> {
    let ids: Vec<tickets::ThreadId<'_>> = ids
        .iter()
        .map(|(message_id, agent_inbound, ours)| tickets::ThreadId {
            message_id,
            agent_inbound: *agent_inbound,
            ours: *ours,
        })
        .collect();
    tickets::insert_thread_ids(conn, ticket_id, &ids, now)
}

fn render(
    rt: &Runtime,
    name: &str,
    view: &TicketView,
    recipients: &str,
    reason: &str,
) -> Result<String, ApplyError> {
    let config = &rt.config;
    Ok(rt.templates.render(
        name,
        config.gateway.language,
        &templates::Context {
            number: &view.number,
            subject: &view.subject,
            display_name: &config.gateway.display_name,
            public_address: &config.addresses.public,
            recipients,
            reason: &templates::Phrase::same(reason),
            line: "",
        },
    )?)
}

/// One "reply to the CRM only" notice per agent, ticket and day.
fn first_notice_today(
    conn: &Db,
    ticket_id: i64,
    agents: &[String],
    now: i64,
) -> Result<bool, ApplyError> {
    let day = decide::reply_all_notice_day(now);
    let mut first = false;
    for agent in agents {
        first |= tickets::first_reply_all_notice(conn, ticket_id, agent, day)?;
    }
    Ok(first)
}

/// A delivery report about our mail: mark the row failed and tell the
/// work-notes list when `decide::failure_notice` says so.
fn apply_bounce(
    conn: &Db,
    rt: &Runtime,
    view: &TicketView,
    bounce: &decide::Bounce,
    now: i64,
) -> Result<usize, ApplyError> {
    let id = match (bounce.outbox_id, &bounce.original_message_id) {
        (Some(id), _) => Some(id),
        (None, Some(mid)) => {
            match crate::thread::own_message_id_number(mid, &rt.config.ticket.prefix) {
                Some(number) => outbox::first_with_message_id(conn, mid, &number)?,
                None => None,
            }
        }
        (None, None) => None,
    };
    let row = match id {
        Some(id) => match outbox::get(conn, id) {
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
    let newly_failed =
        outbox::mark_failed_by_report(conn, row.id, &format!("bounced: {failed}: {reason}"))?;
    // Told once per row (and `decide` tells whether at all).
    if !newly_failed {
        return Ok(0);
    }
    let told = failure_notice(conn, rt, view, &row.kind, &failed, &reason, now)?;
    Ok(usize::from(told))
}

/// Tell the work-notes list that mail of the ticket (an outbox row of
/// `failed_kind`) could not be delivered, when `decide::failure_notice`
/// plans a notice; `true` when it did.
///
/// # Errors
/// Database, template or composing failures.
pub fn failure_notice(
    conn: &Db,
    rt: &Runtime,
    view: &TicketView,
    failed_kind: &str,
    failed: &str,
    reason: &str,
    now: i64,
) -> Result<bool, ApplyError> {
    let Some(send) = decide::failure_notice(&rt.facts(), view, failed_kind) else {
        return Ok(false);
    };
    let config = &rt.config;
    let text = render(rt, "failure", view, failed, reason)?;
    let subject = templates::subject("failure", config.gateway.language, &view.subject);
    let system = decide::helpdesk(config);
    let entry_id = tickets::insert_system_entry(conn, view.id, &system, &subject, &text, now)?;
    let content = Content::notice(subject, text, false);
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
    Ok(true)
}

/// What one outgoing message says.
pub struct Content<'a> {
    pub subject: String,
    /// Its own text, or its entry's (see [`PlannedText`]).
    pub text: PlannedText,
    /// The entry it carries, as written in this transaction: what the copy
    /// composed at send time reads back. Here it only gives tests the
    /// draft ingest would compose, to compare with that copy.
    pub entry: Option<EntryBody<'a>>,
    /// Kept on the ticket, named in the body.
    pub listed_attachments: Vec<(String, u64)>,
    /// The entry's attachments are sent along: the e-mail function only.
    pub attachments: bool,
    /// Written by a believed agent: never capped.
    pub written_by_agent: bool,
    /// The non-agent whose mail this copies, lower-cased: its copies count
    /// against `max_resends_per_sender_hour`. `None` for crmgate's own mail.
    pub copied_from: Option<String>,
}

/// Does the Message-ID of this entry thread agents' mail only? So it does
/// for mail from an agent's address (an agent's forward, whose comment is
/// the requester's; a work note; a forger's mail under an agent's From):
/// public copies never name it, so no agent's Message-ID (and domain)
/// reaches a requester.
fn threads_agents_only(rt: &Runtime, entry: &PlannedEntry, sender: &str) -> bool {
    entry.by_agent
        || entry.kind == EntryKind::WorkNote
        || rt.config.agent(sender).is_some()
        || rt.former_agents.contains(&sender.to_ascii_lowercase())
}

impl Content<'_> {
    /// A notice crmgate writes itself: text only, no attachment listed.
    fn notice(subject: String, text: String, written_by_agent: bool) -> Content<'static> {
        Content {
            subject,
            text: PlannedText::Here(text),
            entry: None,
            listed_attachments: Vec::new(),
            attachments: false,
            written_by_agent,
            copied_from: None,
        }
    }
}

/// Plan one message and put it in the outbox, less the recipients a cap
/// holds back (each noted in a `system` entry): the relay composes it when
/// it sends it (see [`crate::compose::plan`]). `None` when nobody is left
/// to send to.
///
/// # Errors
/// Database or composing failures.
#[allow(clippy::too_many_arguments)]
pub fn queue(
    conn: &Db,
    rt: &Runtime,
    view: &TicketView,
    thread: &[crate::decide::ThreadRef],
    send: &PlannedSend,
    content: Content<'_>,
    entry_id: Option<i64>,
    now: i64,
) -> Result<Option<i64>, ApplyError> {
    let queued = queue_copy(conn, rt, view, thread, send, content, entry_id, now)?;
    let Some((id, message_id)) = queued else {
        return Ok(None);
    };
    tickets::insert_thread_id(conn, &message_id, view.id, false, true, now)?;
    Ok(Some(id))
}

/// [`queue`], but the copy's Message-ID is left for the caller to remember
/// on the ticket: the row's id and that Message-ID.
#[allow(clippy::too_many_arguments)]
fn queue_copy(
    conn: &Db,
    rt: &Runtime,
    view: &TicketView,
    thread: &[crate::decide::ThreadRef],
    send: &PlannedSend,
    content: Content<'_>,
    entry_id: Option<i64>,
    now: i64,
) -> Result<Option<(i64, String)>, ApplyError> {
    let config = &rt.config;
    let cap = decide::cap(send.kind, content.written_by_agent);
    // One sender's copies, all tickets together: a stranger who opens a
    // new ticket each time is not bounded by the cap per ticket. Counted
    // with the first address's.
    let copied_from = content
        .copied_from
        .as_deref()
        .filter(|_| cap == decide::Cap::Resend);
    let limit = config.auto.max_resends_per_sender_hour;
    let mut caused = 0;
    let mut envelope = Vec::with_capacity(send.envelope.len());
    let mut held_back = Vec::new();
    for (i, address) in send.envelope.iter().enumerate() {
        let sent = if cap == decide::Cap::Never {
            decide::SentCounts::default()
        } else {
            let copies_of = copied_from.filter(|_| i == 0).map(|s| (s, limit));
            let (sent, copies) = tickets::sent_counts(
                conn,
                address,
                view.id,
                decide::SentCounts::caps(config),
                copies_of,
                now,
            )?;
            caused += copies;
            sent
        };
        if decide::within_cap(config, cap, sent) {
            envelope.push(address.clone());
        } else {
            held_back.push(address.as_str());
        }
    }
    if !held_back.is_empty() {
        let system = decide::helpdesk(config);
        let text = decide::held_back_note(send.kind, cap, &held_back);
        tickets::insert_system_entry(conn, view.id, &system, &view.subject, &text, now)?;
        tracing::warn!(ticket = %view.number, kind = send.kind.as_str(), held_back = ?held_back, "cap reached");
    }
    if let Some(sender) = copied_from {
        let mut over = Vec::new();
        envelope.retain(|address| {
            if caused < limit {
                caused += 1;
                true
            } else {
                over.push(address.clone());
                false
            }
        });
        if !over.is_empty() {
            let over: Vec<&str> = over.iter().map(String::as_str).collect();
            let text = decide::sender_cap_note(send.kind, sender, &over);
            let system = decide::helpdesk(config);
            tickets::insert_system_entry(conn, view.id, &system, &view.subject, &text, now)?;
            tracing::warn!(ticket = %view.number, sender, held_back = ?over, "cap of copies per sender reached");
        }
    }
    if envelope.is_empty() {
        return Ok(None);
    }
    if cap != decide::Cap::Never {
        for address in &envelope {
            tickets::record_send(
                conn,
                address,
                view.id,
                cap == decide::Cap::Automatic,
                copied_from,
                now,
            )?;
        }
    }
    let references = decide::references(thread, send.agents_only);
    let scrub = (!send.agents_only).then(|| rt.scrub.clone());
    let message_id = crate::thread::own_message_id(&view.number, &config.gateway.hostname);
    let copy = CopyPlan {
        number: view.number.clone(),
        language: config.gateway.language,
        from_name: send.from_name.clone(),
        from_address: send.from_address.clone(),
        reply_address: match send.kind {
            SendKind::WorkNote => crate::thread::reply_address(
                &config.addresses.internal,
                &view.number,
                rt.reply_key.as_deref(),
            ),
            _ => None,
        },
        to: send.to.clone(),
        cc: send.cc.clone(),
        subject: content.subject,
        text: content.text,
        listed: content.listed_attachments,
        attachments: content.attachments,
        in_reply_to: references.last().cloned(),
        references,
        date: now,
        loop_host: config.gateway.hostname.clone(),
        scrub,
    };
    planned(send.kind, &message_id, &copy, content.entry)?;
    let id = tickets::insert_outbox_plan(
        conn,
        Some(view.id),
        entry_id,
        send.kind.into(),
        &envelope,
        &message_id,
        &copy.to_json()?,
        now,
    )?;
    Ok(Some((id, message_id)))
}

/// A notice to one agent about a quick action.
pub struct AgentNotice<'a> {
    /// Who asked.
    pub agent: &'a Mailbox,
    /// `quick_help` or `quick_refused`.
    pub template: &'a str,
    /// The ticket's subject (or the message's, on no ticket).
    pub subject: &'a str,
    /// The refused line, as written; empty for the help.
    pub line: &'a str,
    /// Why it was refused, in each language; empty for the help.
    pub reason: &'a templates::Phrase,
}

/// Queue an [`AgentNotice`]: on the ticket when there is one, else as an
/// outbox row of no ticket (a refused block in a message that opened none).
///
/// # Errors
/// Template, composing or database failures.
pub fn queue_agent_notice(
    conn: &Db,
    rt: &Runtime,
    view: Option<&TicketView>,
    notice: &AgentNotice<'_>,
    now: i64,
) -> Result<Option<i64>, ApplyError> {
    let AgentNotice {
        agent,
        template,
        subject,
        line,
        reason,
    } = *notice;
    let config = &rt.config;
    let language = config.gateway.language;
    let number = view.map_or("", |v| v.number.as_str());
    let text = rt.templates.render(
        template,
        language,
        &templates::Context {
            number,
            subject,
            display_name: &config.gateway.display_name,
            public_address: &config.addresses.public,
            recipients: "",
            reason,
            line,
        },
    )?;
    let subject = templates::subject(template, language, subject);
    let send = PlannedSend {
        kind: SendKind::QuickActionNotice,
        entry: 0,
        from_name: config.gateway.display_name.clone(),
        from_address: config.addresses.public.clone(),
        to: vec![agent.clone()],
        cc: Vec::new(),
        envelope: vec![agent.address.clone()],
        agents_only: true,
    };
    if let Some(view) = view {
        let content = Content::notice(subject, text, true);
        return queue(conn, rt, view, &view.thread, &send, content, None, now);
    }
    let message_id = format!(
        "quick.{:016x}@{}",
        rand::random::<u64>(),
        config.gateway.hostname
    );
    let copy = CopyPlan {
        number: String::new(),
        language,
        from_name: send.from_name,
        from_address: send.from_address,
        reply_address: None,
        to: send.to,
        cc: Vec::new(),
        subject,
        text: PlannedText::Here(text),
        listed: Vec::new(),
        attachments: false,
        in_reply_to: None,
        references: Vec::new(),
        date: now,
        loop_host: config.gateway.hostname.clone(),
        scrub: None,
    };
    planned(send.kind, &message_id, &copy, None)?;
    let id = tickets::insert_outbox_plan(
        conn,
        None,
        None,
        send.kind.into(),
        &send.envelope,
        &message_id,
        &copy.to_json()?,
        now,
    )?;
    Ok(Some(id))
}

/// The draft of a copy as ingest plans it, from the entry as written in
/// this transaction rather than read back: the tests compose it and
/// compare it, byte for byte, with the copy the relay composes at send
/// time. Outside the tests, nothing is composed here.
///
/// # Errors
/// A plan that names an entry it is not given.
fn planned(
    kind: SendKind,
    message_id: &str,
    copy: &CopyPlan,
    entry: Option<EntryBody<'_>>,
) -> Result<(), ApplyError> {
    #[cfg(test)]
    tests::record_ingest_draft(compose::plan::draft(kind, message_id, copy, entry)?);
    #[cfg(not(test))]
    let _ = (kind, message_id, copy, entry);
    Ok(())
}

#[cfg(test)]
mod tests;
