//! Intake: one inbound message through thread → decide → store → compose,
//! inside the store's transaction. The SMTP listener (through the daemon's
//! [`Writer`], which batches the transactions) and `crmgate deliver` both
//! end here. Threading reads the store, the rules in [`crate::decide`]
//! judge, and a plan to record is written by [`crate::apply`]; what goes to
//! no ticket is kept in quarantine, raw.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use crate::apply::{self, ApplyError};
use crate::auth::{Spf, Verifier, VerifyError};
use crate::compose::Scrub;
use crate::config::Config;
use crate::config::Language;
use crate::decide::quick::{self, QuickAction, QuickBlock, QuickRefusal};
use crate::decide::{self, Decision, Facts, TicketView};
use crate::desk;
use crate::helpdesk::{OutboxKind, QuarantineReason};
use crate::parse::{self, Inbound, Mailbox, ParseError};
use crate::smtp::{Deliver, Envelope, Verdict};
use crate::store::{self, tickets, Db, StoreError};
use crate::templates::{self, Templates};
use crate::writer::Writer;

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Desk(#[from] desk::DeskError),
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
    /// Content of `reply_secret_file`, trimmed (read once, with the configuration).
    pub reply_key: Option<Vec<u8>>,
    /// Addresses that were agents once. They change only when the agents
    /// are synced (start, SIGHUP), so they are read then, not per message.
    pub former_agents: BTreeSet<String>,
    /// What mail to non-agents is scrubbed of: agents and former agents.
    pub scrub: Scrub,
}

impl Runtime {
    /// # Errors
    /// A template that does not compile.
    pub fn new(config: Arc<Config>) -> Result<Runtime, anyhow::Error> {
        let templates = Templates::load(config.auto.templates_dir.as_deref())?;
        let reply_key = config.security.reply_secret.clone();
        let mut runtime = Runtime {
            scrub: Scrub {
                addresses: Vec::new(),
                replacement: config.addresses.public.clone(),
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
    pub fn load_former_agents(&mut self, conn: &Db) -> Result<(), StoreError> {
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
    pub(crate) fn not_stored() -> Outcome {
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
    conn: &Db,
    rt: &Runtime,
    arrival: &Arrival,
    now: i64,
) -> Result<Outcome, IntakeError> {
    if !conn.is_postgres() {
        return process_without_savepoint(conn, rt, arrival, now);
    }
    // Another instance may log the same message at the same moment: its
    // entry wins the unique key, this one undoes its own work and, the
    // other's entry committed and visible now, counts a duplicate.
    match store::in_savepoint(conn, |c| process_without_savepoint(c, rt, arrival, now))? {
        Err(e) if e.already_logged() => process_without_savepoint(conn, rt, arrival, now),
        done => done,
    }
}

impl IntakeError {
    /// A deadlock or serialization failure with another instance
    /// ([`StoreError::is_transient_conflict`]): the message may be written
    /// again in a new transaction.
    pub fn is_transient_conflict(&self) -> bool {
        match self {
            IntakeError::Store(e) | IntakeError::Apply(ApplyError::Store(e)) => {
                e.is_transient_conflict()
            }
            _ => false,
        }
    }

    /// The message was logged by another instance meanwhile.
    fn already_logged(&self) -> bool {
        matches!(
            self,
            IntakeError::Store(StoreError::AlreadyLogged)
                | IntakeError::Apply(ApplyError::Store(StoreError::AlreadyLogged))
        )
    }
}

/// [`process`] without the savepoint it takes on PostgreSQL (two round
/// trips a message): a message another instance logged meanwhile fails
/// with `AlreadyLogged` and leaves what it wrote in the transaction, which
/// the caller then rolls back as a whole (the writer writes the batch
/// again, each message through [`process`] in a savepoint of its own).
///
/// # Errors
/// As [`process`]; then the transaction holds part of the message.
pub fn process_without_savepoint(
    conn: &Db,
    rt: &Runtime,
    arrival: &Arrival,
    now: i64,
) -> Result<Outcome, IntakeError> {
    let config = &rt.config;
    let env = &arrival.envelope;
    let inbound = match &arrival.parsed {
        Ok(inbound) => inbound,
        Err(ParseError::Unparseable) => {
            keep_in_quarantine(
                conn,
                arrival,
                now,
                QuarantineReason::Unparseable,
                None,
                None,
                None,
            )?;
            return Ok(Outcome {
                verdict: Verdict::Stored,
                ticket: None,
                decision: QuarantineReason::Unparseable.as_str(),
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
    // Mail with a Message-ID is logged once by the unique key alone.
    if inbound.message_id.is_none() {
        tickets::hold_duplicate_key(conn, &sender, &inbound.body_hash)?;
    }
    let duplicate_of = tickets::duplicate_of(
        conn,
        &sender,
        inbound.message_id.as_deref(),
        &inbound.subject,
        &inbound.body_hash,
        now,
    )?;
    // Quick actions (SPEC): read off a believed agent's own words first; the
    // rules then see the message without its block.
    let quick = match duplicate_of {
        None => read_quick(rt, env, inbound, ticket.is_none()),
        Some(_) => Quick::None,
    };
    let (inbound, block) = match quick {
        Quick::None => (std::borrow::Cow::Borrowed(inbound), None),
        Quick::Refused { agent, refusal } => {
            let reason = templates::Phrase::new(|language| {
                templates::quick_problem(language, &refusal.problem)
            });
            let refused = Refused {
                agent: &agent,
                line: &refusal.line,
                reason: &reason,
            };
            return refuse_quick(conn, rt, arrival, inbound, ticket.as_ref(), &refused, now);
        }
        Quick::Block {
            agent,
            block,
            inbound: stripped,
        } => {
            if ticket.is_none()
                && block.lines.iter().all(|l| l.action == QuickAction::Help)
                && quick::nothing_remains(&block.rest)
            {
                return help_without_ticket(conn, rt, arrival, inbound, &agent, now);
            }
            (std::borrow::Cow::Owned(*stripped), Some((agent, block)))
        }
    };
    let inbound: &Inbound = &inbound;
    let decision = decide::decide(
        &rt.facts(),
        env,
        inbound,
        ticket.as_ref(),
        duplicate_of,
        now,
    );
    let decision = match (decision, block) {
        (Decision::Record(plan), Some((agent, block))) => {
            let quick = QuickMessage {
                arrival,
                inbound,
                ticket: ticket.as_ref(),
                sender: &sender,
                agent: &agent,
                block: &block,
            };
            return record_with_actions(conn, rt, &quick, *plan, now);
        }
        (decision, _) => decision,
    };
    let quarantine = |reason: QuarantineReason| {
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
            quarantine(reason)?;
            let mut queued = 0;
            if let (QuarantineReason::Postmaster, Some(operator)) =
                (reason, &config.gateway.operator)
            {
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
            quarantine(QuarantineReason::Refused)?;
            Ok(Outcome {
                verdict: Verdict::Refused(sentence),
                ticket: number,
                decision: QuarantineReason::Refused.as_str(),
                queued: 0,
            })
        }
        Decision::Record(plan) => {
            let raw_id = store_raw(conn, arrival, now)?;
            let applied = apply::apply(
                conn,
                rt,
                &plan,
                ticket.as_ref(),
                inbound,
                &sender,
                Some((raw_id, &arrival.raw)),
                now,
            )?;
            Ok(Outcome {
                verdict: Verdict::Stored,
                ticket: Some(applied.number),
                decision: plan.decision.as_str(),
                queued: applied.queued,
            })
        }
    }
}

/// What a believed agent's quick-action block makes of a message.
enum Quick {
    /// Not a believed agent, or no block: the message as it came.
    None,
    /// A line the rules refuse: nothing of the message is carried out.
    Refused {
        agent: Mailbox,
        refusal: QuickRefusal,
    },
    /// Actions to run after the message's entry, and the message without
    /// its block (no HTML: the block would still stand in it).
    Block {
        agent: Mailbox,
        block: QuickBlock,
        inbound: Box<Inbound>,
    },
}

/// Why a message with quick actions was not recorded as it stands.
enum QuickFailed {
    /// An action the rules refused when it ran: the agent is told.
    Action(desk::ActionFailed),
    /// The database or composing failed: 451, the sender retries.
    Intake(IntakeError),
}

/// The block at the top of a believed agent's own words: the text, or on a
/// forward that opens a ticket, the agent's words above the forwarded part.
fn read_quick(rt: &Runtime, env: &Envelope, inbound: &Inbound, opens: bool) -> Quick {
    let config = &rt.config;
    let Some(from) = inbound.from.as_ref() else {
        return Quick::None;
    };
    let Some(agent) = config.agent(&from.address) else {
        return Quick::None;
    };
    if !decide::from_is_believed(config, env, inbound, &from.address) {
        return Quick::None;
    }
    let agent = Mailbox::new(Some(&agent.name), &agent.email);
    let forward = inbound.forward.as_ref().filter(|_| opens);
    let text = forward.map_or(&*inbound.text, |f| f.agent_text.as_str());
    let block = match quick::read_block(text, &agent.address) {
        None => return Quick::None,
        Some(Err(refusal)) => return Quick::Refused { agent, refusal },
        Some(Ok(block)) => block,
    };
    if let Err(refusal) = quick::check(&rt.facts(), &block) {
        return Quick::Refused { agent, refusal };
    }
    let mut stripped = inbound.clone();
    let rest = if quick::nothing_remains(&block.rest) {
        String::new()
    } else {
        block.rest.clone()
    };
    match stripped.forward.as_mut().filter(|_| opens) {
        Some(forward) => forward.agent_text = rest,
        None => stripped.text = rest.into(),
    }
    stripped.html = None;
    Quick::Block {
        agent,
        block,
        inbound: Box::new(stripped),
    }
}

/// A message with a quick-action block, on its way to the store.
struct QuickMessage<'a> {
    arrival: &'a Arrival,
    /// Without its block.
    inbound: &'a Inbound,
    ticket: Option<&'a TicketView>,
    sender: &'a str,
    agent: &'a Mailbox,
    block: &'a QuickBlock,
}

/// Record the message and run its actions in one savepoint: an action the
/// rules refuse as it runs undoes the whole message, which is then kept
/// and answered as a refused block.
fn record_with_actions(
    conn: &Db,
    rt: &Runtime,
    m: &QuickMessage<'_>,
    mut plan: decide::Plan,
    now: i64,
) -> Result<Outcome, IntakeError> {
    let (agent, block) = (m.agent, m.block);
    if quick::nothing_remains(&block.rest)
        || block
            .lines
            .iter()
            .any(|l| matches!(l.action, QuickAction::Email(_)))
    {
        quick::actions_only(&mut plan, &agent.address, block);
    }
    let done = store::in_savepoint(conn, |conn| -> Result<_, QuickFailed> {
        let raw_id = store_raw(conn, m.arrival, now).map_err(QuickFailed::Intake)?;
        let applied = apply::apply(
            conn,
            rt,
            &plan,
            m.ticket,
            m.inbound,
            m.sender,
            Some((raw_id, &m.arrival.raw)),
            now,
        )
        .map_err(|e| QuickFailed::Intake(e.into()))?;
        desk::quick_actions(conn, rt, &applied.number, agent, block, m.inbound)
            .map_err(QuickFailed::Action)?;
        Ok(applied)
    })?;
    match done {
        Ok(applied) => Ok(Outcome {
            verdict: Verdict::Stored,
            ticket: Some(applied.number),
            decision: plan.decision.as_str(),
            queued: applied.queued,
        }),
        Err(QuickFailed::Action(failed)) if failed.error.is_refusal() => {
            let reason = templates::Phrase::new(|language| desk_refusal(language, &failed.error));
            let refused = Refused {
                agent,
                line: &failed.line,
                reason: &reason,
            };
            refuse_quick(conn, rt, m.arrival, m.inbound, m.ticket, &refused, now)
        }
        Err(QuickFailed::Action(failed)) => Err(IntakeError::Desk(failed.error)),
        Err(QuickFailed::Intake(e)) => Err(e),
    }
}

/// Who asked for what, and why not.
struct Refused<'a> {
    agent: &'a Mailbox,
    /// As written.
    line: &'a str,
    /// In each language.
    reason: &'a templates::Phrase,
}

/// A refused block: the message is kept (on its ticket, else in
/// quarantine), a `system` entry says who asked what and why not, and the
/// agent gets a notice quoting the line.
fn refuse_quick(
    conn: &Db,
    rt: &Runtime,
    arrival: &Arrival,
    inbound: &Inbound,
    ticket: Option<&TicketView>,
    refused: &Refused<'_>,
    now: i64,
) -> Result<Outcome, IntakeError> {
    let Refused {
        agent,
        line,
        reason,
    } = *refused;
    let config = &rt.config;
    match ticket {
        Some(view) => {
            store_raw(conn, arrival, now)?;
            let text = format!(
                "quick action refused, from {}: {line}: {}",
                agent.address,
                reason.get(config.gateway.language.first())
            );
            tickets::insert_system_entry(
                conn,
                view.id,
                &decide::helpdesk(config),
                &view.subject,
                &text,
                now,
            )?;
        }
        None => keep_in_quarantine(
            conn,
            arrival,
            now,
            QuarantineReason::Refused,
            Some(&agent.address),
            Some(&inbound.subject),
            inbound.message_id.as_deref(),
        )?,
    }
    let subject = ticket.map_or_else(
        || crate::thread::clean_subject(&inbound.subject, &config.ticket.pattern),
        |t| t.subject.clone(),
    );
    let notice = apply::AgentNotice {
        agent,
        template: "quick_refused",
        subject: &subject,
        line,
        reason,
    };
    apply::queue_agent_notice(conn, rt, ticket, &notice, now)?;
    let reason = reason.get(config.gateway.language.first());
    tracing::info!(agent = %agent.address, line, reason, "quick action refused");
    Ok(Outcome {
        verdict: Verdict::Stored,
        ticket: ticket.map(|t| t.number.clone()),
        decision: "quick_action_refused",
        queued: 1,
    })
}

/// `/help` alone, on no ticket: the agent gets the list, and no ticket is
/// opened for the question (the message is kept in quarantine).
fn help_without_ticket(
    conn: &Db,
    rt: &Runtime,
    arrival: &Arrival,
    inbound: &Inbound,
    agent: &Mailbox,
    now: i64,
) -> Result<Outcome, IntakeError> {
    keep_in_quarantine(
        conn,
        arrival,
        now,
        QuarantineReason::QuickHelp,
        Some(&agent.address),
        Some(&inbound.subject),
        inbound.message_id.as_deref(),
    )?;
    let notice = apply::AgentNotice {
        agent,
        template: "quick_help",
        subject: "",
        line: "",
        reason: &templates::Phrase::default(),
    };
    apply::queue_agent_notice(conn, rt, None, &notice, now)?;
    Ok(Outcome {
        verdict: Verdict::Stored,
        ticket: None,
        decision: QuarantineReason::QuickHelp.as_str(),
        queued: 1,
    })
}

/// What the agent reads when an action was refused as it ran.
fn desk_refusal(language: Language, error: &desk::DeskError) -> String {
    use desk::DeskError as E;
    match (error, language) {
        (E::AlreadyResolved(n), Language::Fr) => format!("le billet {n} est déjà résolu."),
        (E::NotResolved(n), Language::Fr) => format!("le billet {n} n'est pas résolu."),
        (
            E::Unchanged {
                address,
                already: "already on",
                ..
            },
            Language::Fr,
        ) => {
            format!("{address} y figure déjà.")
        }
        (E::Unchanged { address, .. }, Language::Fr) => format!("{address} n'y figure pas."),
        (E::NobodyToEmail(_), Language::Fr) => "aucun destinataire possible.".into(),
        (other, _) => format!("{other}."),
    }
}

/// Keep a message that goes to no ticket, raw, with the reason.
fn keep_in_quarantine(
    conn: &Db,
    arrival: &Arrival,
    now: i64,
    reason: QuarantineReason,
    sender: Option<&str>,
    subject: Option<&str>,
    message_id: Option<&str>,
) -> Result<(), IntakeError> {
    let env = &arrival.envelope;
    let raw_id = store_raw(conn, arrival, now)?;
    tickets::insert_quarantine(
        conn,
        now,
        reason.as_str(),
        sender.or(env.mail_from.as_deref()),
        subject,
        message_id,
        Some(raw_id),
    )?;
    Ok(())
}

/// The raw message, stored once with its envelope.
fn store_raw(conn: &Db, arrival: &Arrival, now: i64) -> Result<i64, IntakeError> {
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
    conn: &Db,
    config: &Config,
    operator: &str,
    inbound: &Inbound,
    raw: &[u8],
    now: i64,
) -> Result<(), IntakeError> {
    let mut message = format!("X-Crmgate-Loop: {}\r\n", config.gateway.hostname).into_bytes();
    message.extend_from_slice(raw);
    let message_id = inbound.message_id.clone().unwrap_or_else(|| {
        format!(
            "postmaster.{:016x}@{}",
            rand::random::<u64>(),
            config.gateway.hostname
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
    conn: &Db,
    rt: &Runtime,
    env: &Envelope,
    inbound: &Inbound,
) -> Result<Option<TicketView>, IntakeError> {
    let config = &rt.config;
    let mut found = None;
    let mut viewed = None;
    for rcpt in &env.rcpt_to {
        if let Some(id) = crate::thread::parse_bounce_address(
            rcpt,
            &config.addresses.public,
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
            config.addresses.public.as_str(),
            config.addresses.internal.as_str(),
        ];
        let c = crate::thread::candidates(
            &inbound.subject,
            &env.rcpt_to,
            &crm,
            &inbound.in_reply_to,
            &inbound.references,
            &config.ticket.pattern,
            rt.reply_key.as_deref(),
        );
        let numbers = c.signed_numbers.iter().chain(&c.subject_numbers);
        for number in numbers.chain(&c.tag_numbers) {
            if let Some(view) = tickets::view_by_number(conn, number)? {
                viewed = Some(view);
                break;
            }
        }
        let returned = inbound
            .report
            .as_ref()
            .and_then(|r| r.original_message_id.clone());
        if viewed.is_none() {
            for id in c.message_ids.iter().chain(returned.as_ref()) {
                let ours = crate::thread::own_message_id_number(id, &config.ticket.prefix);
                if let Some(t) = tickets::find_by_message_id(conn, id, ours.as_deref())? {
                    found = Some(t);
                    break;
                }
            }
        }
    }
    Ok(match (viewed, found) {
        (Some(view), _) => Some(view),
        (None, Some(id)) => Some(tickets::view(conn, id)?),
        (None, None) => None,
    })
}

/// The one info line per message: ticket, Message-ID and decision.
pub(crate) fn log_outcome(arrival: &Arrival, outcome: &Outcome) {
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

/// The [`Deliver`] the SMTP listener hands messages to.
pub struct Intake {
    pub runtime: Arc<RwLock<Arc<Runtime>>>,
    pub writer: Writer,
    /// crmgate's own SPF/DKIM check, when `[auth] verify` is on. Built
    /// once at start: a change of `dns_servers` needs a restart.
    pub verifier: Option<Verifier>,
}

impl Intake {
    fn config(&self) -> Arc<Config> {
        self.current().config.clone()
    }

    fn current(&self) -> Arc<Runtime> {
        match self.runtime.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The SPEC's own check, before the writer (DNS is asked here, never
    /// on the writer's thread): an agent's or former agent's From that no
    /// trusted relay or `authserv_id` vouches for is verified, and the
    /// result stamped on the stored message; a new requester's envelope
    /// sender gets the SPF check that guards receipts from backscatter.
    /// Other mail costs no DNS query. Inbound `Authentication-Results`
    /// under our name are dropped, checked or not.
    ///
    /// # Errors
    ///
    /// A DNS failure left the agent's check open: the sender retries.
    async fn check_sender(&self, arrival: &mut Arrival) -> Result<(), VerifyError> {
        let rt = self.current();
        let config = &rt.config;
        let hostname = config.gateway.hostname.as_str();
        let Ok(inbound) = &mut arrival.parsed else {
            return Ok(());
        };
        inbound
            .auth_results
            .retain(|r| !r.authserv_id.eq_ignore_ascii_case(hostname));
        let mut own = None;
        if let (Some(verifier), Some(from)) = (&self.verifier, inbound.from.clone()) {
            let env = &arrival.envelope;
            let facts = rt.facts();
            let address = from.address.as_str();
            let agent_like =
                config.agent(address).is_some() || facts.former_agents.contains(address);
            if agent_like {
                if !decide::from_is_believed(config, env, inbound, address) {
                    let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
                    let verification = verifier
                        .check(
                            &arrival.raw,
                            env.peer,
                            &env.helo,
                            env.mail_from.as_deref(),
                            domain,
                        )
                        .await?;
                    inbound.sender_check.from_verified = verification.dmarc_pass();
                    own = Some(verification.header(hostname));
                }
            } else if may_get_a_receipt(config, env, inbound)
                && !config
                    .security
                    .trusted_relays
                    .iter()
                    .any(|net| net.contains(&env.peer))
            {
                // Behind a trusted relay the peer is that relay, not the
                // sender's server: SPF would fail everyone.
                let (spf, domain, _) = verifier
                    .spf(env.peer, &env.helo, env.mail_from.as_deref())
                    .await;
                if spf == Spf::Fail {
                    inbound.sender_check.spf_fail = Some(domain);
                }
            }
        }
        if let Some(raw) = crate::auth::restamp(&arrival.raw, hostname, own.as_deref()) {
            arrival.raw = raw;
        }
        Ok(())
    }
}

/// Could this message open a ticket whose requester gets a receipt? Only
/// then is the envelope sender's SPF worth a query: receipts enabled, a
/// reverse-path that backs the From, person's mail, and nothing that names
/// an existing ticket (a ticket number in the Subject or a `+tag`, or a
/// reference to one of crmgate's own Message-IDs).
fn may_get_a_receipt(config: &Config, env: &Envelope, inbound: &Inbound) -> bool {
    let Some(mail_from) = env.mail_from.as_deref() else {
        return false;
    };
    let from = inbound.from.as_ref().map_or("", |m| m.address.as_str());
    let ours = format!("@{}", config.gateway.hostname);
    config.auto.receipt != crate::config::ReceiptPolicy::None
        && crate::thread::strip_tag(mail_from).eq_ignore_ascii_case(from)
        && inbound.auto.is_none()
        && inbound.report.is_none()
        && !inbound.spam_flag
        && crate::thread::subject_numbers(&inbound.subject, &config.ticket.pattern).is_empty()
        && !env
            .rcpt_to
            .iter()
            .any(|r| r.split('@').next().is_some_and(|l| l.contains('+')))
        && !inbound
            .in_reply_to
            .iter()
            .chain(&inbound.references)
            .any(|id| id.to_ascii_lowercase().ends_with(&ours))
}

/// Above this size a message is parsed on a blocking thread, so a 25 MB
/// attachment does not stall the other sessions of the same worker.
const PARSE_INLINE_MAX: usize = 256 * 1024;

impl Deliver for Intake {
    fn accepts_recipient(&self, address: &str) -> bool {
        decide::accepts_recipient(&self.config(), address)
    }

    async fn deliver(&self, envelope: Envelope, raw: Vec<u8>) -> Verdict {
        let mut arrival = if raw.len() <= PARSE_INLINE_MAX {
            Arrival::new(envelope, raw)
        } else {
            match tokio::task::spawn_blocking(move || Arrival::new(envelope, raw)).await {
                Ok(arrival) => arrival,
                Err(_) => return Verdict::TempFailure,
            }
        };
        if let Err(error) = self.check_sender(&mut arrival).await {
            tracing::warn!(%error, peer = %arrival.envelope.peer, "cannot verify the sender: 451");
            return Verdict::AuthTempFailure;
        }
        self.writer.submit(arrival).await
    }
}

/// `crmgate deliver` and tests: one message, one transaction, no thread.
///
/// # Errors
/// Database failures (the caller answers 75, temporary).
pub fn deliver_once(
    conn: &mut Db,
    rt: &Runtime,
    arrival: &Arrival,
) -> Result<Outcome, IntakeError> {
    let tx = conn.transaction()?;
    let outcome = process(&tx, rt, arrival, store::now())?;
    tx.commit()?;
    log_outcome(arrival, &outcome);
    Ok(outcome)
}
