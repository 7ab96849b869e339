//! The outbox: outgoing mail waiting for the relay, as rows.
//!
//! The writer queues a row in the same transaction as the entry it belongs
//! to; the relay worker ([`crate::relay`]) picks the rows that are due, in
//! id order, and records each attempt here. The retry schedule lives in the
//! `next_attempt_at` and `attempts` columns rather than in sleeps, so a
//! restart, or a `crmgate outbox retry` from another process, simply
//! changes what the next query returns.
//!
//! The relay's outcomes ([`Disposition`], [`MarkRequest`]) are defined
//! here, beside the updates that record them: in the daemon the writer
//! thread records them in its batches, and needs nothing of the relay.

use super::db::{args, Db, Row, Value};
use serde::Serialize;

use super::{Result, StoreError};

/// Where a row stands. Only `Queued` rows are ever sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxStatus {
    /// Waiting for its `next_attempt_at`.
    Queued,
    /// Accepted by the relay (or written to the file relay) for every
    /// recipient left on the row.
    Sent,
    /// Refused permanently, or given up after `give_up_after_hours`; stays
    /// until an operator runs `crmgate outbox retry`.
    Failed,
}

impl OutboxStatus {
    /// The value of the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Queued => "queued",
            OutboxStatus::Sent => "sent",
            OutboxStatus::Failed => "failed",
        }
    }

    fn from_column(text: &str) -> Result<OutboxStatus> {
        match text {
            "queued" => Ok(OutboxStatus::Queued),
            "sent" => Ok(OutboxStatus::Sent),
            "failed" => Ok(OutboxStatus::Failed),
            other => Err(StoreError::Invalid(format!(
                "outbox status {other:?} is not queued, sent or failed"
            ))),
        }
    }
}

/// One outgoing message as the relay worker needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The queue order: a ticket's mail leaves in id order.
    pub id: i64,
    /// The ticket the message belongs to (none for postmaster mail passed
    /// on to the operator): where a failure is logged.
    pub ticket_id: Option<i64>,
    /// The entry the message carries, when it carries one.
    pub entry_id: Option<i64>,
    /// What the message is (`public_copy`, `receipt`, …): for logs, and so
    /// the failure hook can refuse to notify about a failed notice.
    pub kind: String,
    /// Envelope recipients still to deliver. Narrowed when some recipients
    /// were accepted and others deferred, so a retry never sends twice.
    pub recipients: Vec<String>,
    /// The message's own Message-ID: a delivery report names it.
    pub message_id: String,
    /// The full RFC 5322 message, CRLF line ends: as stored for a row
    /// queued as bytes, composed by the relay from [`OutboxRow::plan`]
    /// otherwise (left empty in the outcomes the relay worker records:
    /// they do not need it).
    pub message: Vec<u8>,
    /// The copy's plan (`compose::plan::CopyPlan` as JSON), when it was
    /// queued as one: the relay composes [`OutboxRow::message`] from it.
    pub plan: Option<String>,
    /// Only queued rows are sent.
    pub status: OutboxStatus,
    /// Attempts made so far: the backoff doubles with each.
    pub attempts: i64,
    /// Unix seconds; not sent before then (the retry schedule, as data).
    pub next_attempt_at: i64,
    /// What the relay said last, for the operator (`outbox list`).
    pub last_error: Option<String>,
    /// Unix seconds; the give-up clock starts here.
    pub created_at: i64,
}

/// A row as `crmgate outbox list` shows it: no message bytes, the ticket by
/// its number. Serializes to the SPEC's `outbox list --json` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboxSummary {
    /// What `outbox retry ID` takes.
    pub id: i64,
    /// The ticket number (`TKT0000042`), when the row belongs to a ticket.
    pub ticket: Option<String>,
    /// As [`OutboxRow::kind`].
    pub kind: String,
    /// The envelope recipients still to deliver.
    pub recipients: Vec<String>,
    /// Queued, sent or failed: what an operator looks for.
    pub status: OutboxStatus,
    /// Attempts made so far.
    pub attempts: i64,
    /// Why the last attempt did not deliver, if it did not.
    pub last_error: Option<String>,
    /// When the row is tried next (not in the SPEC's JSON).
    #[serde(skip)]
    pub next_attempt_at: i64,
    /// When the row was queued (not in the SPEC's JSON).
    #[serde(skip)]
    pub created_at: i64,
}

/// The columns of an [`OutboxRow`], from `outbox AS o LEFT JOIN
/// outbox_messages AS m` (see [`ROW_FROM`]). A copy's plan is in its row;
/// a row queued before that was so has it, or its bytes, in `m`.
const ROW_COLUMNS: &str = "o.id, o.ticket_id, o.entry_id, o.kind, o.recipients, o.message_id, \
     m.message, o.status, o.attempts, o.next_attempt_at, o.last_error, o.created_at, \
     COALESCE(o.plan, m.plan)";

/// A row and its message's bytes, which live apart (written once, never
/// with the row's changes). A left join, so that a row with neither its
/// plan nor its bytes is an error the relay reports rather than a row it
/// never sees.
const ROW_FROM: &str = "outbox AS o LEFT JOIN outbox_messages AS m ON m.outbox_id = o.id";

/// Column values as read, before the JSON and the status are checked.
type RawRow = (
    i64,
    Option<i64>,
    Option<i64>,
    String,
    String,
    String,
    Option<Vec<u8>>,
    String,
    i64,
    i64,
    Option<String>,
    i64,
    Option<String>,
);

fn raw_row(r: &Row<'_>) -> Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
    ))
}

fn parse_recipients(id: i64, json: &str) -> Result<Vec<String>> {
    serde_json::from_str(json).map_err(|e| {
        StoreError::Invalid(format!(
            "outbox row {id}: recipients are not a JSON array of strings: {e}"
        ))
    })
}

fn into_row(raw: RawRow) -> Result<OutboxRow> {
    let (
        id,
        ticket_id,
        entry_id,
        kind,
        recipients,
        message_id,
        message,
        status,
        attempts,
        next_attempt_at,
        last_error,
        created_at,
        plan,
    ) = raw;
    let message = match message {
        Some(bytes) => bytes,
        None if plan.is_some() => Vec::new(),
        None => {
            return Err(StoreError::Invalid(format!(
                "outbox row {id}: its message is missing"
            )))
        }
    };
    let plan = plan.filter(|_| message.is_empty());
    Ok(OutboxRow {
        id,
        ticket_id,
        entry_id,
        kind,
        recipients: parse_recipients(id, &recipients)?,
        message_id,
        message,
        plan,
        status: OutboxStatus::from_column(&status)?,
        attempts,
        next_attempt_at,
        last_error,
        created_at,
    })
}

/// Queued rows whose time has come, oldest first: the relay sends them in
/// this order so a ticket's mail arrives in the order it was written. Read
/// along the queued rows' id index, never by sorting the whole queue.
///
/// # Errors
/// A database error, or a row whose recipients or status column is corrupt.
pub fn due(conn: &Db, now: i64, limit: usize) -> Result<Vec<OutboxRow>> {
    due_after(conn, now, 0, limit)
}

/// [`due`], from the rows after id `after` on: the relay's next batch,
/// read while the rows up to `after` are still being sent.
///
/// # Errors
/// As [`due`].
pub fn due_after(conn: &Db, now: i64, after: i64, limit: usize) -> Result<Vec<OutboxRow>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let raws = match conn {
        Db::Sqlite(_) => conn.query_all(
            &format!(
                "SELECT {ROW_COLUMNS} FROM outbox AS o INDEXED BY outbox_queued
                     LEFT JOIN outbox_messages AS m ON m.outbox_id = o.id
                 WHERE o.status = 'queued' AND o.next_attempt_at <= ?1 AND o.id > ?3
                 ORDER BY o.id LIMIT ?2"
            ),
            args![now, limit, after],
            raw_row,
        )?,
        Db::Postgres(_) => lease_due(conn, now, after, limit, instance_id())?,
    };
    raws.into_iter().map(into_row).collect()
}

/// How long a row taken by one instance's relay worker is its own: after
/// that, another instance takes it over (the first one died mid-send).
pub const LEASE_SECONDS: i64 = 60;

/// This instance's name among those that share a PostgreSQL database: the
/// lease holder of the rows its relay worker sends. `host/state:pid:random`
/// once [`name_instance`] has read the state directory's name (the daemon
/// does at start), `host:pid:random` before (the CLI, tests).
pub fn instance_id() -> &'static str {
    INSTANCE.get_or_init(|| instance_name(None))
}

static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn instance_name(state: Option<&str>) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let place = match state {
        Some(state) => format!("{}/{state}", host.trim()),
        None => host.trim().to_string(),
    };
    format!(
        "{place}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Name this instance after its host and its state directory, whose
/// `instance` file keeps a random name made at the first start: the same
/// daemon started again (after a crash, a SIGKILL, a reboot) knows the
/// rows leased by its former run ([`release_former_leases`]). Returns the
/// instance's name.
///
/// # Errors
/// The state directory cannot be made, or its `instance` file read or
/// written.
pub fn name_instance(state_dir: &std::path::Path) -> std::io::Result<&'static str> {
    let state = instance_state(state_dir)?;
    Ok(INSTANCE.get_or_init(|| instance_name(Some(&state))))
}

/// The random name in `state_dir/instance`, made the first time.
fn instance_state(state_dir: &std::path::Path) -> std::io::Result<String> {
    std::fs::create_dir_all(state_dir)?;
    let file = state_dir.join("instance");
    match std::fs::read_to_string(&file) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let state = format!("{:016x}", rand::random::<u64>());
    std::fs::write(&file, format!("{state}\n"))?;
    Ok(state)
}

/// PostgreSQL: give back at once the queued rows that a former run of this
/// instance (same host, same state directory, a process no longer
/// running) had leased, rather than leaving them 60 s to their lease: a
/// daemon restarted after a crash sends them now. A holder whose process
/// still runs (a second daemon on the same state directory, which it
/// should not share) keeps its rows. Returns how many were given back.
///
/// # Errors
/// A database error.
pub fn release_former_leases(conn: &Db, current: &str, now: i64) -> Result<u64> {
    let Some((place, _)) = current.split_once(':') else {
        return Ok(0);
    };
    if !place.contains('/') || !conn.is_postgres() {
        return Ok(0);
    }
    let prefix = format!("{place}:");
    let holders: Vec<String> = conn.query_all(
        "SELECT DISTINCT leased_by FROM outbox
         WHERE status = 'queued' AND leased_until > ?1
           AND starts_with(leased_by, ?2) AND leased_by <> ?3",
        args![now, prefix.as_str(), current],
        |r| r.get(0),
    )?;
    let mut released = 0;
    for holder in holders {
        let pid = holder[prefix.len()..].split(':').next().unwrap_or("");
        let running = !pid.is_empty() && std::path::Path::new("/proc").join(pid).exists();
        if running {
            continue;
        }
        released += conn.exec(
            "UPDATE outbox SET leased_by = NULL, leased_until = NULL
             WHERE status = 'queued' AND leased_by = ?1",
            args![holder.as_str()],
        )?;
    }
    Ok(released)
}

/// PostgreSQL: take the due rows no other instance holds (`FOR UPDATE SKIP
/// LOCKED`, then a lease of [`LEASE_SECONDS`] in `leased_until`), so each
/// row is sent by one instance at a time; the rows of an instance that
/// died are taken over once its lease has run out. The lease is one
/// autocommitted statement: the rows are ours before any is sent.
fn lease_due(conn: &Db, now: i64, after: i64, limit: i64, holder: &str) -> Result<Vec<RawRow>> {
    conn.query_all(
        &format!(
            "WITH taken AS (
                 UPDATE outbox SET leased_by = ?3, leased_until = ?4
                 WHERE id IN (
                     SELECT id FROM outbox
                     WHERE status = 'queued' AND next_attempt_at <= ?1 AND id > ?5
                       AND (leased_until IS NULL OR leased_until <= ?1 OR leased_by = ?3)
                     ORDER BY id LIMIT ?2
                     FOR UPDATE SKIP LOCKED)
                 RETURNING *)
             SELECT {ROW_COLUMNS} FROM taken AS o
                 LEFT JOIN outbox_messages AS m ON m.outbox_id = o.id
             ORDER BY o.id"
        ),
        args![now, limit, holder, now.saturating_add(LEASE_SECONDS), after],
        raw_row,
    )
}

/// When the earliest queued row is due (possibly in the past), or `None`
/// when nothing is queued: the worker sleeps until then.
///
/// # Errors
/// A database error.
pub fn next_due_at(conn: &Db) -> Result<Option<i64>> {
    match conn {
        Db::Sqlite(_) => conn.query_row(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE status = 'queued'",
            &[],
            |r| r.get(0),
        ),
        // A row another instance holds is due for this one when its lease
        // runs out, not before: else the worker would ask again at once.
        Db::Postgres(_) => conn.query_row(
            "SELECT MIN(CASE WHEN leased_by <> ?1 AND leased_until > next_attempt_at
                             THEN leased_until ELSE next_attempt_at END)
             FROM outbox WHERE status = 'queued'",
            args![instance_id()],
            |r| r.get(0),
        ),
    }
}

/// How many rows wait for the relay: what a stopping daemon leaves for
/// the next start, said in its last log line.
///
/// # Errors
/// A database error.
pub fn queued_count(conn: &Db) -> Result<i64> {
    conn.query_row(
        "SELECT COUNT(*) FROM outbox WHERE status = 'queued'",
        &[],
        |r| r.get(0),
    )
}

/// A ticket's rows in id order, along `outbox_ticket`.
pub(crate) const FIRST_WITH_MESSAGE_ID: &str =
    "SELECT id FROM outbox WHERE ticket_id = ?1 AND message_id = ?2 ORDER BY id LIMIT 1";

/// The first row sent with this Message-ID: a delivery report that names
/// no outbox row (no signed bounce address) still returns the Message-ID
/// of the message it is about. `number`: the ticket the ID names
/// (`thread::own_message_id_number`), whose rows are searched along
/// `outbox_ticket`; there is no index of outgoing Message-IDs.
///
/// # Errors
/// A database error.
pub fn first_with_message_id(conn: &Db, message_id: &str, number: &str) -> Result<Option<i64>> {
    let Some(ticket) = super::tickets::find_by_number(conn, number)? else {
        return Ok(None);
    };
    conn.query_opt(FIRST_WITH_MESSAGE_ID, args![ticket, message_id], |r| {
        r.get(0)
    })
}

/// One row by id.
///
/// # Errors
/// `NotFound` when there is no such row; a database error.
pub fn get(conn: &Db, id: i64) -> Result<OutboxRow> {
    let raw = conn
        .query_opt(
            &format!("SELECT {ROW_COLUMNS} FROM {ROW_FROM} WHERE o.id = ?1"),
            args![id],
            raw_row,
        )?
        .ok_or_else(|| StoreError::NotFound(format!("no outbox row {id}")))?;
    into_row(raw)
}

/// What a planned copy carries of its entry: the text and HTML, as
/// written.
///
/// # Errors
/// `NotFound` when there is no such entry; a database error, or a text
/// that is not UTF-8.
pub fn entry_body(conn: &Db, entry_id: i64) -> Result<(String, Option<String>)> {
    use super::tickets::{entry_text, ENTRY_TEXT};
    if let Some(sqlite) = conn.sqlite() {
        return sqlite_entry_body(conn, sqlite, entry_id);
    }
    conn.query_opt(
        &format!(
            "SELECT {ENTRY_TEXT}, e.html
             FROM entries AS e LEFT JOIN raw_messages AS r ON r.id = e.raw_id WHERE e.id = ?1"
        ),
        args![entry_id],
        |r| Ok((entry_text(r, 0)?, r.get::<Option<String>>(2)?)),
    )?
    .ok_or_else(|| StoreError::NotFound(format!("no entry {entry_id}")))
}

/// [`entry_body`] on SQLite: a long text kept in its raw message is read
/// from it in pieces ([`super::tickets::text_from_raw_in_pieces`]), not as
/// a column.
fn sqlite_entry_body(
    conn: &Db,
    sqlite: &rusqlite::Connection,
    entry_id: i64,
) -> Result<(String, Option<String>)> {
    use super::tickets::{entry_text, text_from_raw_in_pieces};
    let (text, html, long) = conn
        .query_opt(
            "SELECT COALESCE(e.long_body, e.body),
                    CASE WHEN e.raw_body_len <= ?2
                         THEN substr(r.data, e.raw_body_at + 1, e.raw_body_len) END,
                    e.html, e.raw_id, e.raw_body_at, e.raw_body_len
             FROM entries AS e LEFT JOIN raw_messages AS r ON r.id = e.raw_id WHERE e.id = ?1",
            args![entry_id, super::db::BLOB_IN_PLACE as i64],
            |r| {
                let long = match (
                    r.get::<Option<i64>>(3)?,
                    r.get::<Option<i64>>(4)?,
                    r.get::<Option<i64>>(5)?,
                ) {
                    (Some(raw), Some(at), Some(len)) if len > super::db::BLOB_IN_PLACE as i64 => {
                        Some((raw, at, len))
                    }
                    _ => None,
                };
                let text = match long {
                    Some(_) => String::new(),
                    None => entry_text(r, 0)?,
                };
                Ok((text, r.get::<Option<String>>(2)?, long))
            },
        )?
        .ok_or_else(|| StoreError::NotFound(format!("no entry {entry_id}")))?;
    let text = match long {
        Some((raw, at, len)) => text_from_raw_in_pieces(sqlite, raw, at, len)?,
        None => text,
    };
    Ok((text, html))
}

/// The attachments kept on an entry, in the order they were kept, each
/// with its bytes (from the row that holds them when the ticket had them
/// already): what the e-mail function's copy sends along.
///
/// # Errors
/// A database error.
pub fn entry_attachments(conn: &Db, entry_id: i64) -> Result<Vec<crate::parse::Attachment>> {
    conn.query_all(
        "SELECT a.filename, a.content_type,
                CASE WHEN a.same_as IS NULL THEN COALESCE(a.content, a.data)
                     ELSE COALESCE(h.content, h.data) END
         FROM attachments AS a LEFT JOIN attachments AS h ON h.id = a.same_as
         WHERE a.entry_id = ?1 ORDER BY a.id",
        args![entry_id],
        |r| {
            Ok(crate::parse::Attachment {
                filename: r.get(0)?,
                content_type: r.get(1)?,
                data: r.get::<Option<Vec<u8>>>(2)?.unwrap_or_default(),
                inline: false,
            })
        },
    )
}

/// Fails with `NotFound` when an update touched no row, so a caller never
/// believes it recorded an outcome it did not.
fn one_row(changed: u64, id: i64) -> Result<()> {
    if changed == 0 {
        return Err(StoreError::NotFound(format!("no queued outbox row {id}")));
    }
    Ok(())
}

/// The relay accepted the message for every recipient left on the row.
///
/// # Errors
/// `NotFound` when the row is not queued; a database error.
pub fn mark_sent(conn: &Db, id: i64, now: i64) -> Result<()> {
    let changed = conn.exec(
        "UPDATE outbox SET status = 'sent', sent_at = ?2, attempts = attempts + 1,
                last_error = NULL
         WHERE id = ?1 AND status = 'queued'",
        args![id, now],
    )?;
    one_row(changed, id)
}

/// A temporary failure: count the attempt and try again at `next_at`.
///
/// # Errors
/// `NotFound` when the row is not queued; a database error.
pub fn mark_retry(conn: &Db, id: i64, next_at: i64, error: &str) -> Result<()> {
    let changed = conn.exec(
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3
         WHERE id = ?1 AND status = 'queued'",
        args![id, next_at, error],
    )?;
    one_row(changed, id)
}

/// A permanent failure, or the give-up time passed: the row stays failed
/// until an operator retries it.
///
/// # Errors
/// `NotFound` when the row is not queued; a database error.
pub fn mark_failed(conn: &Db, id: i64, error: &str) -> Result<()> {
    let changed = conn.exec(
        "UPDATE outbox SET status = 'failed', attempts = attempts + 1, last_error = ?2
         WHERE id = ?1 AND status = 'queued'",
        args![id, error],
    )?;
    one_row(changed, id)
}

/// A delivery report (RFC 3464) says the relay could not deliver a row
/// after all: mark it failed even though it was sent. Returns `false` when
/// the row was failed already, so the caller tells the work-notes list
/// only once however many reports arrive.
///
/// # Errors
/// `NotFound` when there is no such row; a database error.
pub fn mark_failed_by_report(conn: &Db, id: i64, error: &str) -> Result<bool> {
    let changed = conn.exec(
        "UPDATE outbox SET status = 'failed', last_error = ?2
         WHERE id = ?1 AND status IN ('queued', 'sent')",
        args![id, error],
    )?;
    if changed == 0 {
        get(conn, id)?;
    }
    Ok(changed == 1)
}

/// Keep only `recipients` on a queued row: the others were delivered (or
/// refused for good) in an attempt that deferred these, and a retry must
/// not send the message to them again.
///
/// # Errors
/// `NotFound` when the row is not queued; a database error.
pub fn narrow_recipients(conn: &Db, id: i64, recipients: &[String]) -> Result<()> {
    let json = serde_json::to_string(recipients)
        .map_err(|e| StoreError::Invalid(format!("outbox row {id}: recipients: {e}")))?;
    let changed = conn.exec(
        "UPDATE outbox SET recipients = ?2 WHERE id = ?1 AND status = 'queued'",
        args![id, &json],
    )?;
    one_row(changed, id)
}

/// Every row, newest first, for `crmgate outbox list`.
///
/// # Errors
/// A database error, or a row whose recipients or status column is corrupt.
pub fn list(conn: &Db) -> Result<Vec<OutboxSummary>> {
    let raws = conn.query_all(
        "SELECT o.id, CAST(t.number AS TEXT), o.kind, o.recipients, o.status, o.attempts, o.last_error,
                o.next_attempt_at, o.created_at
         FROM outbox o LEFT JOIN tickets t ON t.id = o.ticket_id
         ORDER BY o.id DESC",
        &[],
        |r| {
            Ok((
                r.get::<i64>(0)?,
                r.get::<Option<String>>(1)?,
                r.get::<String>(2)?,
                r.get::<String>(3)?,
                r.get::<String>(4)?,
                r.get::<i64>(5)?,
                r.get::<Option<String>>(6)?,
                r.get::<i64>(7)?,
                r.get::<i64>(8)?,
            ))
        },
    )?;
    raws.into_iter()
        .map(
            |(id, ticket, kind, recipients, status, attempts, last_error, next, created)| {
                Ok(OutboxSummary {
                    id,
                    ticket,
                    kind,
                    recipients: parse_recipients(id, &recipients)?,
                    status: OutboxStatus::from_column(&status)?,
                    attempts,
                    last_error,
                    next_attempt_at: next,
                    created_at: created,
                })
            },
        )
        .collect()
}

/// `crmgate outbox retry [ID]`: put failed rows back in the queue, due now,
/// with their attempt count reset so the backoff starts over. With an id,
/// that row only (a queued row is just made due now); without, every failed
/// row and every queued row waiting for a backoff. Returns how many rows
/// were changed.
///
/// The give-up clock still runs from `created_at`: a row retried after
/// `give_up_after_hours` gets one more attempt, then fails again on a
/// temporary error.
///
/// # Errors
/// `NotFound` for an id with no row, `Invalid` for a row already sent; a
/// database error.
pub fn retry(conn: &Db, id: Option<i64>, now: i64) -> Result<usize> {
    match id {
        Some(id) => {
            let row = get(conn, id)?;
            if row.status == OutboxStatus::Sent {
                return Err(StoreError::Invalid(format!(
                    "outbox row {id} was sent already; nothing to retry"
                )));
            }
            Ok(conn.exec(
                "UPDATE outbox SET status = 'queued', next_attempt_at = ?2,
                        attempts = CASE status WHEN 'failed' THEN 0 ELSE attempts END
                 WHERE id = ?1 AND status IN ('queued', 'failed')",
                args![id, now],
            )? as usize)
        }
        // Each part along its partial index: the sent rows, nearly all of
        // a large log, are never read.
        None => Ok(conn.exec(
            "UPDATE outbox SET status = 'queued', next_attempt_at = ?1,
                    attempts = CASE status WHEN 'failed' THEN 0 ELSE attempts END
             WHERE id IN (SELECT id FROM outbox WHERE status = 'failed'
                          UNION ALL
                          SELECT id FROM outbox WHERE status = 'queued' AND next_attempt_at > ?1)",
            args![now],
        )? as usize),
    }
}

/// The relay is down until `until`: every queued row due before then, and
/// every queued row up to `last_id` (whatever its own backoff), is tried
/// again at that moment, so they go out in id order.
///
/// # Errors
/// A database error.
pub fn defer_queued(conn: &Db, until: i64, last_id: i64) -> Result<usize> {
    Ok(conn.exec(
        "UPDATE outbox SET next_attempt_at = ?1
         WHERE status = 'queued' AND (next_attempt_at < ?1 OR id <= ?2)",
        args![until, last_id],
    )? as usize)
}

// ---------------------------------------------------------------------------
// The relay worker's outcomes, as the writer records them.
// ---------------------------------------------------------------------------

/// Called when a row fails for good (or some of its recipients do), inside
/// the transaction that records it, with the reason; the daemon uses it to
/// log a `system` entry on the ticket and tell the work-notes list. An
/// error from the hook is logged and the failure recorded without it: a
/// failed hook must not make the worker resend the message.
pub type FailureHook =
    std::sync::Arc<dyn Fn(&Db, &OutboxRow, &str) -> Result<(), StoreError> + Send + Sync>;

/// What to record for a row after an attempt: a pure function of the row,
/// the per-recipient outcomes, the time and the policy ([`crate::relay::dispose`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Every recipient left on the row took it.
    Sent,
    /// Some recipients deferred it: try those again later.
    Retry {
        /// Unix seconds of the next attempt (the backoff, never past the
        /// give-up time).
        next_at: i64,
        /// The replies of this attempt, for `last_error`.
        error: String,
        /// The recipients left for next time, when fewer than the row has:
        /// the others were delivered or refused.
        narrow_to: Option<Vec<String>>,
        /// Recipients refused for good in this attempt, for the hook.
        refused: Option<String>,
    },
    /// Refused for good, or given up: the row stays failed and the hook
    /// tells the ticket.
    Failed {
        /// Why, for `last_error` and the hook.
        error: String,
    },
}

/// Outcomes for the daemon's writer thread to record in its next batch
/// (see [`crate::relay::run_with`]): one writer, so the worker's marks never wait for
/// the database's write lock, nor make inbound mail wait for theirs.
pub struct MarkRequest {
    /// Each attempted row (without its message bytes) and its outcome.
    pub settled: Vec<(OutboxRow, Disposition)>,
    /// When the attempts ended: the hook's entries carry this time.
    pub now: i64,
    /// Logs each failure on its ticket, in the same transaction.
    pub on_failed: FailureHook,
    /// Answered once the marks are committed, or with why they are not.
    pub reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

impl MarkRequest {
    /// Write the marks on `conn`, which the caller has put in a
    /// transaction (see [`write_marks`]).
    ///
    /// # Errors
    /// A database error.
    pub fn write(&self, conn: &Db) -> Result<(), StoreError> {
        write_marks(conn, &self.settled, self.now, &self.on_failed)
    }

    /// Whether a failure hook may have queued a notice.
    pub fn may_queue(&self) -> bool {
        self.settled
            .iter()
            .any(|(_, d)| !matches!(d, Disposition::Sent))
    }
}

/// Write outcomes, each failure with its hook, on a connection in a
/// transaction. A row that is no longer queued (an operator's `outbox
/// retry`, a delivery report that came first) keeps what it has: its
/// outcome is logged and dropped, the others are written.
///
/// # Errors
/// A database error.
pub fn write_marks(
    conn: &Db,
    settled: &[(OutboxRow, Disposition)],
    now: i64,
    on_failed: &FailureHook,
) -> Result<(), StoreError> {
    let mut settled: Vec<&(OutboxRow, Disposition)> = settled.iter().collect();
    if conn.is_postgres() {
        // The rows sent, nearly all of them, in one statement rather than
        // one a row: each statement is a round trip and an executor's
        // start-up on the server. SQLite's are function calls.
        let sent: Vec<i64> = settled
            .iter()
            .filter(|(_, d)| matches!(d, Disposition::Sent))
            .map(|(row, _)| row.id)
            .collect();
        if sent.len() > 1 {
            let marked: Vec<i64> = conn.query_all(
                "UPDATE outbox SET status = 'sent', sent_at = ?2, attempts = attempts + 1,
                        last_error = NULL
                 WHERE id = ANY(?1) AND status = 'queued' RETURNING id",
                &[Value::Ints(&sent), Value::Int(now)],
                |r| r.get(0),
            )?;
            for id in sent.iter().filter(|id| !marked.contains(id)) {
                tracing::warn!(
                    outbox_id = id,
                    "outcome not recorded: no queued outbox row {id}"
                );
            }
            settled.retain(|(_, d)| !matches!(d, Disposition::Sent));
        }
    }
    for (row, disposition) in settled {
        match record_one(conn, row, disposition, now, on_failed) {
            Ok(()) => {}
            Err(StoreError::NotFound(why)) => {
                tracing::warn!(outbox_id = row.id, "outcome not recorded: {why}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Record one disposition, with the hook for failures. Each mark is a
/// single `UPDATE ... WHERE status = 'queued'`: `NotFound` means it changed
/// nothing.
fn record_one(
    conn: &Db,
    row: &OutboxRow,
    disposition: &Disposition,
    now: i64,
    on_failed: &FailureHook,
) -> Result<(), StoreError> {
    let hook_reason = match disposition {
        Disposition::Sent => {
            mark_sent(conn, row.id, now)?;
            None
        }
        Disposition::Retry {
            next_at,
            error,
            narrow_to,
            refused,
        } => {
            if let Some(keep) = narrow_to {
                narrow_recipients(conn, row.id, keep)?;
            }
            mark_retry(conn, row.id, *next_at, error)?;
            refused.as_deref()
        }
        Disposition::Failed { error } => {
            mark_failed(conn, row.id, error)?;
            Some(error.as_str())
        }
    };
    if let Some(reason) = hook_reason {
        // A savepoint, so that a hook failing half-way leaves nothing behind
        // while the outcome itself is still committed.
        if let Err(e) = super::in_savepoint(conn, |sp| on_failed(sp, row, reason))? {
            tracing::error!(outbox_id = row.id, error = %e, "failure hook failed; failure recorded without it");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TestLog as Log;

    /// A receipt queued as its plan (`{}`), no bytes, at time 100.
    fn queue_plan(conn: &Db) -> i64 {
        crate::store::tickets::insert_outbox_plan(
            conn,
            None,
            None,
            crate::helpdesk::OutboxKind::Send(crate::helpdesk::SendKind::Receipt),
            &["r@x".into()],
            "<new@x>",
            "{}",
            100,
        )
        .unwrap()
    }

    /// A way to queue rows the way the writer does.
    impl Log {
        fn queue(&self, recipients: &[&str], next_at: i64) -> i64 {
            let recipients: Vec<String> = recipients.iter().map(|r| r.to_string()).collect();
            let id = crate::store::tickets::insert_outbox(
                &self.conn,
                None,
                None,
                crate::helpdesk::OutboxKind::Send(crate::helpdesk::SendKind::PublicCopy),
                &recipients,
                "<m@x>",
                b"a\r\n",
                100,
            )
            .unwrap();
            self.conn
                .exec(
                    "UPDATE outbox SET next_attempt_at = ?2 WHERE id = ?1",
                    args![id, next_at],
                )
                .unwrap();
            id
        }
    }

    #[test]
    fn due_returns_queued_rows_whose_time_has_come_in_id_order() {
        for db in Log::all() {
            let late = db.queue(&["a@x"], 500);
            let first = db.queue(&["b@x"], 100);
            let second = db.queue(&["c@x", "d@x"], 200);
            let sent = db.queue(&["e@x"], 100);
            mark_sent(&db.conn, sent, 150).unwrap();

            let rows = due(&db.conn, 200, 10).unwrap();
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            assert_eq!(ids, [first, second]);
            assert_eq!(rows[1].recipients, ["c@x", "d@x"]);
            assert_eq!(rows[1].message, b"a\r\n");
            assert_eq!(rows[1].status, OutboxStatus::Queued);
            assert_eq!(due(&db.conn, 200, 1).unwrap().len(), 1);
            assert_eq!(due(&db.conn, 1000, 10).unwrap()[0].id, late);
        }
    }

    #[test]
    fn on_postgres_a_row_is_leased_by_one_instance_until_its_lease_runs_out() {
        let Some(db) = Log::postgres() else {
            return;
        };
        let rows: Vec<i64> = (0..3).map(|i| db.queue(&["a@x"], 100 + i)).collect();
        let taken = |now, holder| -> Vec<i64> {
            lease_due(&db.conn, now, 0, 10, holder)
                .unwrap()
                .into_iter()
                .map(|r| r.0)
                .collect()
        };
        assert_eq!(taken(101, "a"), rows[..2], "what is due");
        assert_eq!(taken(102, "b"), rows[2..], "not what another holds");
        assert_eq!(taken(103, "a"), rows[..2], "a holder takes its own again");
        assert!(taken(150, "c").is_empty());
        // a and b died: their leases run out 60 s after they last took
        // the rows, and another instance takes them over.
        assert_eq!(
            taken(102 + LEASE_SECONDS, "c"),
            rows[2..],
            "b's, not yet a's"
        );
        assert_eq!(taken(103 + LEASE_SECONDS, "c"), rows, "and a's");
        assert!(taken(103 + LEASE_SECONDS, "a").is_empty());
        // A row marked sent is nobody's to take.
        mark_sent(&db.conn, rows[2], 170).unwrap();
        assert_eq!(taken(1_000, "b"), rows[..2]);
    }

    #[test]
    fn on_postgres_a_restarted_instance_takes_back_the_rows_its_former_run_leased() {
        let Some(db) = Log::postgres() else {
            return;
        };
        let rows: Vec<i64> = (0..4).map(|i| db.queue(&["a@x"], 100 + i)).collect();
        let lease = |row: i64, holder: &str| {
            db.conn
                .exec(
                    "UPDATE outbox SET leased_by = ?1, leased_until = ?2 WHERE id = ?3",
                    args![holder, 1_000_i64, row],
                )
                .unwrap();
        };
        // No process has a pid above the kernel's maximum (2^22).
        let dead = "mx1/5eed:99999999:aaaaaaaa";
        let alive = format!("mx1/5eed:{}:bbbbbbbb", std::process::id());
        lease(rows[0], dead);
        lease(rows[1], dead);
        lease(rows[2], &alive);
        lease(rows[3], "mx2/f00d:99999999:cccccccc");
        let now = "mx1/5eed:4242:dddddddd";
        assert_eq!(release_former_leases(&db.conn, now, 500).unwrap(), 2);
        let taken: Vec<i64> = lease_due(&db.conn, 500, 0, 10, now)
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(
            taken,
            rows[..2],
            "its former run's rows, not those of a running process nor another host's"
        );
        // Without a state directory in its name (the CLI), nothing.
        lease(rows[0], dead);
        assert_eq!(
            release_former_leases(&db.conn, "mx1:4242:dddddddd", 500).unwrap(),
            0
        );
    }

    #[test]
    fn the_instance_file_names_the_same_daemon_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let first = instance_state(&state_dir).unwrap();
        assert_eq!(first.len(), 16);
        assert_eq!(instance_state(&state_dir).unwrap(), first, "kept");
        let other = instance_state(&dir.path().join("elsewhere")).unwrap();
        assert_ne!(other, first);
        let name = instance_name(Some(&first));
        let (place, rest) = name.split_once(':').unwrap();
        assert!(place.ends_with(&format!("/{first}")), "{name}");
        assert!(
            rest.starts_with(&format!("{}:", std::process::id())),
            "{name}"
        );
    }

    #[test]
    fn next_due_at_is_the_earliest_queued_row() {
        for db in Log::all() {
            assert_eq!(next_due_at(&db.conn).unwrap(), None);
            let a = db.queue(&["a@x"], 300);
            db.queue(&["b@x"], 400);
            assert_eq!(next_due_at(&db.conn).unwrap(), Some(300));
            mark_failed(&db.conn, a, "550 no").unwrap();
            assert_eq!(next_due_at(&db.conn).unwrap(), Some(400));
        }
    }

    #[test]
    fn outcomes_count_attempts_and_only_touch_queued_rows() {
        for db in Log::all() {
            let id = db.queue(&["a@x"], 100);
            mark_retry(&db.conn, id, 160, "451 later").unwrap();
            let row = get(&db.conn, id).unwrap();
            assert_eq!((row.attempts, row.next_attempt_at), (1, 160));
            assert_eq!(row.last_error.as_deref(), Some("451 later"));

            mark_sent(&db.conn, id, 170).unwrap();
            let row = get(&db.conn, id).unwrap();
            assert_eq!(
                (row.status, row.attempts, row.last_error),
                (OutboxStatus::Sent, 2, None)
            );
            // A sent row cannot be failed or retried by a late outcome.
            assert!(matches!(
                mark_failed(&db.conn, id, "x"),
                Err(StoreError::NotFound(_))
            ));
            assert!(matches!(
                mark_retry(&db.conn, id, 1, "x"),
                Err(StoreError::NotFound(_))
            ));
            assert!(matches!(get(&db.conn, 999), Err(StoreError::NotFound(_))));
        }
    }

    #[test]
    fn a_delivery_report_fails_a_sent_row_once() {
        for db in Log::all() {
            let id = db.queue(&["a@x"], 100);
            mark_sent(&db.conn, id, 150).unwrap();
            assert!(mark_failed_by_report(&db.conn, id, "5.1.1 user unknown").unwrap());
            let row = get(&db.conn, id).unwrap();
            assert_eq!(row.status, OutboxStatus::Failed);
            assert_eq!(row.last_error.as_deref(), Some("5.1.1 user unknown"));
            assert!(!mark_failed_by_report(&db.conn, id, "again").unwrap());
            assert!(matches!(
                mark_failed_by_report(&db.conn, 999, "x"),
                Err(StoreError::NotFound(_))
            ));
        }
    }

    #[test]
    fn narrowing_keeps_only_the_deferred_recipients() {
        for db in Log::all() {
            let id = db.queue(&["a@x", "b@x", "c@x"], 100);
            narrow_recipients(&db.conn, id, &["c@x".to_string()]).unwrap();
            assert_eq!(get(&db.conn, id).unwrap().recipients, ["c@x"]);
        }
    }

    #[test]
    fn retry_requeues_failed_rows_due_now_with_a_fresh_backoff() {
        for db in Log::all() {
            let failed = db.queue(&["a@x"], 100);
            mark_retry(&db.conn, failed, 100, "451").unwrap();
            mark_failed(&db.conn, failed, "550").unwrap();
            let waiting = db.queue(&["b@x"], 9_000);
            let sent = db.queue(&["c@x"], 100);
            mark_sent(&db.conn, sent, 100).unwrap();

            assert_eq!(retry(&db.conn, None, 1_000).unwrap(), 2);
            let row = get(&db.conn, failed).unwrap();
            assert_eq!(
                (row.status, row.attempts, row.next_attempt_at),
                (OutboxStatus::Queued, 0, 1_000)
            );
            assert_eq!(get(&db.conn, waiting).unwrap().next_attempt_at, 1_000);
            assert_eq!(get(&db.conn, sent).unwrap().status, OutboxStatus::Sent);
        }
    }

    #[test]
    fn retry_of_one_row_names_missing_and_sent_rows() {
        for db in Log::all() {
            let a = db.queue(&["a@x"], 100);
            let b = db.queue(&["b@x"], 100);
            mark_failed(&db.conn, a, "550").unwrap();
            mark_failed(&db.conn, b, "550").unwrap();
            assert_eq!(retry(&db.conn, Some(a), 500).unwrap(), 1);
            assert_eq!(get(&db.conn, a).unwrap().status, OutboxStatus::Queued);
            assert_eq!(get(&db.conn, b).unwrap().status, OutboxStatus::Failed);

            mark_sent(&db.conn, a, 600).unwrap();
            assert!(matches!(
                retry(&db.conn, Some(a), 700),
                Err(StoreError::Invalid(_))
            ));
            assert!(matches!(
                retry(&db.conn, Some(42), 700),
                Err(StoreError::NotFound(_))
            ));
        }
    }

    #[test]
    fn list_shows_ticket_numbers_and_serializes_like_the_spec() {
        for db in Log::all() {
            let ticket: i64 = db
                .conn
                .query_row(
                    "INSERT INTO tickets (number, subject, state, created_at, updated_at)
                 VALUES ('TKT0000042', 's', 'new', 1, 1) RETURNING id",
                    &[],
                    |r| r.get(0),
                )
                .unwrap();
            let id = db.queue(&["a@x"], 100);
            db.conn
                .exec(
                    "UPDATE outbox SET ticket_id = ?1 WHERE id = ?2",
                    args![ticket, id],
                )
                .unwrap();
            let other = db.queue(&["b@x"], 100);
            mark_failed(&db.conn, other, "550 5.1.1 unknown").unwrap();

            let rows = list(&db.conn).unwrap();
            assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), [other, id]);
            assert_eq!(rows[1].ticket.as_deref(), Some("TKT0000042"));
            let json = serde_json::to_value(&rows[0]).unwrap();
            assert_eq!(
                json,
                serde_json::json!({"id": other, "ticket": null, "kind": "public_copy",
                "recipients": ["b@x"], "status": "failed", "attempts": 1,
                "last_error": "550 5.1.1 unknown"})
            );
        }
    }

    /// Bytes that a careless store would change: CR LF and bare LF, a
    /// leading dot, NUL, 8-bit, and a blob large enough to be written in
    /// place rather than bound.
    fn awkward_message(len: usize) -> Vec<u8> {
        let mut m = b"From: support@crm.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n\r\n\
                      .a dot\r\nbare\nlf\0nul \xc3\xa9\xff\r\n"
            .to_vec();
        while m.len() < len {
            m.extend_from_slice(format!("line {} of the body\r\n", m.len()).as_bytes());
        }
        m
    }

    #[test]
    fn a_queued_message_reads_back_byte_identical_after_a_restart_and_every_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crmgate.db");
        let small = awkward_message(5_000);
        let large = awkward_message(300_000);
        let (a, b) = {
            let conn = Db::Sqlite(crate::store::open(&path).unwrap());
            let queue = |message: &[u8]| {
                crate::store::tickets::insert_outbox(
                    &conn,
                    None,
                    None,
                    crate::helpdesk::OutboxKind::Send(crate::helpdesk::SendKind::AgentCopy),
                    &["a@x".into(), "b@x".into()],
                    "<m@x>",
                    message,
                    100,
                )
                .unwrap()
            };
            (queue(&small), queue(&large))
        };
        // The daemon restarts: a new connection on the same file.
        let conn = Db::Sqlite(crate::store::open(&path).unwrap());
        let rows = due(&conn, 100, 10).unwrap();
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), [a, b]);
        assert_eq!(rows[0].message, small);
        assert_eq!(rows[1].message, large);
        // The row changes with each attempt; the bytes never do.
        mark_retry(&conn, a, 150, "451 later").unwrap();
        narrow_recipients(&conn, a, &["b@x".to_string()]).unwrap();
        assert_eq!(get(&conn, a).unwrap().message, small);
        mark_sent(&conn, a, 160).unwrap();
        mark_failed(&conn, b, "550 no").unwrap();
        retry(&conn, Some(b), 170).unwrap();
        drop(conn);
        let conn = Db::Sqlite(crate::store::open(&path).unwrap());
        let (row_a, row_b) = (get(&conn, a).unwrap(), get(&conn, b).unwrap());
        assert_eq!(
            (row_a.status, row_a.recipients),
            (OutboxStatus::Sent, vec!["b@x".to_string()])
        );
        assert_eq!(row_a.message, small);
        assert_eq!(row_b.message, large);
    }

    #[test]
    fn the_upgrade_moves_each_message_out_of_its_row_byte_identical() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crmgate.db");
        let message = awkward_message(7_000);
        {
            // A log from before the bytes had a table of their own.
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            crate::store::migrations().to_version(&mut conn, 5).unwrap();
            conn.execute(
                "INSERT INTO outbox (kind, recipients, message_id, message, next_attempt_at, created_at)
                 VALUES ('receipt', '[\"r@x\"]', '<old@x>', ?1, 100, 100)",
                [&message],
            )
            .unwrap();
        }
        let conn = Db::Sqlite(crate::store::open(&path).unwrap());
        let rows = due(&conn, 100, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].message_id.as_str(), &rows[0].message),
            ("<old@x>", &message)
        );
        let columns: Vec<String> = conn
            .query_all("SELECT name FROM pragma_table_info('outbox')", &[], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(!columns.iter().any(|c| c == "message"), "{columns:?}");
    }

    #[test]
    fn a_row_queued_as_bytes_before_plans_is_still_sent_from_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crmgate.db");
        let message = awkward_message(7_000);
        let id = {
            // A log from before the copies were planned, its row as
            // crmgate wrote it then.
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            crate::store::migrations().to_version(&mut conn, 7).unwrap();
            conn.execute(
                "INSERT INTO outbox (kind, recipients, message_id, next_attempt_at, created_at)
                 VALUES ('receipt', '[\"r@x\"]', '<old@x>', 100, 100)",
                [],
            )
            .unwrap();
            let id = conn.last_insert_rowid();
            conn.execute(
                "INSERT INTO outbox_messages (outbox_id, message) VALUES (?1, ?2)",
                rusqlite::params![id, &message],
            )
            .unwrap();
            id
        };
        let conn = Db::Sqlite(crate::store::open(&path).unwrap());
        let rows = due(&conn, 100, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].id, &rows[0].message), (id, &message));
        assert_eq!(rows[0].plan, None);
        // Beside it, a row queued now is its plan, and no bytes.
        let planned = queue_plan(&conn);
        let row = get(&conn, planned).unwrap();
        assert_eq!((row.message.len(), row.plan.as_deref()), (0, Some("{}")));
    }

    #[test]
    fn a_row_planned_before_plans_moved_into_the_row_is_still_sent_from_its_plan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crmgate.db");
        let (old, failed) = {
            // A log from before: the plan in `outbox_messages`, and a
            // failed row, which the failed rows' index takes in.
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            crate::store::migrations()
                .to_version(&mut conn, 12)
                .unwrap();
            let mut ids = Vec::new();
            for status in ["queued", "failed"] {
                conn.execute(
                    "INSERT INTO outbox (kind, recipients, message_id, status, next_attempt_at, created_at)
                     VALUES ('receipt', '[\"r@x\"]', '<old@x>', ?1, 100, 100)",
                    [status],
                )
                .unwrap();
                let id = conn.last_insert_rowid();
                conn.execute(
                    "INSERT INTO outbox_messages (outbox_id, message, plan) VALUES (?1, X'', '{\"old\":1}')",
                    [id],
                )
                .unwrap();
                ids.push(id);
            }
            (ids[0], ids[1])
        };
        let conn = Db::Sqlite(crate::store::open(&path).unwrap());
        let rows = due(&conn, 100, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].id, rows[0].message.len(), rows[0].plan.as_deref()),
            (old, 0, Some("{\"old\":1}"))
        );
        assert_eq!(next_due_at(&conn).unwrap(), Some(100));
        assert_eq!(
            (
                backlog(&conn, 100).unwrap().queued,
                backlog(&conn, 100).unwrap().failed
            ),
            (1, 1)
        );
        // A row queued now keeps its plan in its own row.
        let planned = queue_plan(&conn);
        let in_messages: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM outbox_messages WHERE outbox_id = ?1",
                args![planned],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(in_messages, 0);
        let row = get(&conn, planned).unwrap();
        assert_eq!((row.message.len(), row.plan.as_deref()), (0, Some("{}")));
        mark_sent(&conn, old, 101).unwrap();
        assert_eq!(retry(&conn, Some(failed), 102).unwrap(), 1);
        let due_ids: Vec<i64> = due(&conn, 200, 10).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(due_ids, vec![failed, planned]);
    }

    #[test]
    fn a_row_without_its_message_is_an_error_not_a_row_never_sent() {
        for db in Log::all() {
            let id = db.queue(&["a@x"], 100);
            db.conn
                .exec(
                    "DELETE FROM outbox_messages WHERE outbox_id = ?1",
                    args![id],
                )
                .unwrap();
            assert!(matches!(
                due(&db.conn, 100, 10),
                Err(StoreError::Invalid(_))
            ));
            assert!(matches!(get(&db.conn, id), Err(StoreError::Invalid(_))));
        }
    }

    #[test]
    fn corrupt_recipients_are_an_error_not_a_panic() {
        for db in Log::all() {
            let id = db.queue(&["a@x"], 100);
            db.conn
                .exec(
                    "UPDATE outbox SET recipients = 'a@x' WHERE id = ?1",
                    args![id],
                )
                .unwrap();
            assert!(matches!(
                due(&db.conn, 100, 10),
                Err(StoreError::Invalid(_))
            ));
        }
    }

    #[test]
    fn queued_count_is_what_a_stopping_daemon_leaves() {
        for db in Log::all() {
            assert_eq!(queued_count(&db.conn).unwrap(), 0);
            let a = db.queue(&["a@x"], 100);
            db.queue(&["b@x"], 9_000);
            let c = db.queue(&["c@x"], 100);
            mark_sent(&db.conn, a, 150).unwrap();
            mark_failed(&db.conn, c, "550").unwrap();
            assert_eq!(queued_count(&db.conn).unwrap(), 1, "a later row counts too");
        }
    }

    #[test]
    fn a_message_id_finds_the_first_row_that_sent_it_on_the_ticket_it_names() {
        use crate::decide::NewTicket;
        use crate::store::tickets;
        for db in Log::all() {
            let mine = |number: &str, message_id: &str| {
                let ticket = tickets::find_by_number(&db.conn, number).unwrap().unwrap();
                tickets::insert_outbox(
                    &db.conn,
                    Some(ticket),
                    None,
                    crate::helpdesk::OutboxKind::Send(crate::helpdesk::SendKind::PublicCopy),
                    &["a@x".to_string()],
                    message_id,
                    b"a\r\n",
                    100,
                )
                .unwrap()
            };
            let ticket = |subject: &str| {
                let new = NewTicket {
                    subject: subject.into(),
                    requesters: Vec::new(),
                    watch_list: Vec::new(),
                    work_notes_list: Vec::new(),
                    owner: None,
                };
                tickets::create(
                    &db.conn,
                    &new,
                    crate::helpdesk::TicketState::New,
                    "TKT",
                    7,
                    100,
                )
                .unwrap()
                .0
            };
            let (one, two) = (ticket("One"), ticket("Two"));
            assert_ne!(one, two);
            let id = crate::thread::own_message_id("TKT0000001", "crm.example.com");
            let sent = mine("TKT0000001", &id);
            mine("TKT0000001", &id);
            mine(
                "TKT0000002",
                &crate::thread::own_message_id("TKT0000002", "h"),
            );
            assert_eq!(
                first_with_message_id(&db.conn, &id, "TKT0000001").unwrap(),
                Some(sent)
            );
            // Looked for on its own ticket only; an unknown one, nowhere.
            assert_eq!(
                first_with_message_id(&db.conn, &id, "TKT0000002").unwrap(),
                None
            );
            assert_eq!(
                first_with_message_id(&db.conn, &id, "TKT0000099").unwrap(),
                None
            );
            let other = crate::thread::own_message_id("TKT0000001", "crm.example.com");
            assert_eq!(
                first_with_message_id(&db.conn, &other, "TKT0000001").unwrap(),
                None
            );
        }
    }

    #[test]
    fn marks_are_written_with_their_hook_and_a_row_no_longer_queued_keeps_its_state() {
        for db in Log::all() {
            let sent = db.queue(&["a@x"], 100);
            let retried = db.queue(&["b@x", "c@x"], 100);
            let failed = db.queue(&["d@x"], 100);
            let gone = db.queue(&["e@x"], 100);
            let broken_hook = db.queue(&["f@x"], 100);
            // An operator's retry or a report came first: no longer queued.
            mark_failed(&db.conn, gone, "550 before").unwrap();
            let row = |id| get(&db.conn, id).unwrap();
            let settled = vec![
                (row(sent), Disposition::Sent),
                (
                    row(retried),
                    Disposition::Retry {
                        next_at: 400,
                        error: "452 full".into(),
                        narrow_to: Some(vec!["c@x".into()]),
                        refused: Some("refused: b@x".into()),
                    },
                ),
                (
                    row(failed),
                    Disposition::Failed {
                        error: "550 unknown".into(),
                    },
                ),
                (row(gone), Disposition::Sent),
                (
                    row(broken_hook),
                    Disposition::Failed {
                        error: "550 hook".into(),
                    },
                ),
            ];
            let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let seen = told.clone();
            let hook: FailureHook = std::sync::Arc::new(move |conn, row, reason| {
                conn.exec(
                    "INSERT INTO quarantine (at, reason) VALUES (0, ?1)",
                    args![&format!("hook: {reason}")],
                )?;
                seen.lock().unwrap().push((row.id, reason.to_string()));
                if reason == "550 hook" {
                    return Err(StoreError::Invalid("the hook failed half-way".into()));
                }
                Ok(())
            });
            // In a transaction, as the writer and the relay worker write them.
            db.conn.exec("BEGIN", &[]).unwrap();
            write_marks(&db.conn, &settled, 300, &hook).unwrap();
            db.conn.exec("COMMIT", &[]).unwrap();

            assert_eq!(row(sent).status, OutboxStatus::Sent);
            let r = row(retried);
            assert_eq!((r.status, r.next_attempt_at), (OutboxStatus::Queued, 400));
            assert_eq!(r.recipients, ["c@x"]);
            assert_eq!(row(failed).status, OutboxStatus::Failed);
            let g = row(gone);
            assert_eq!(
                (g.status, g.last_error.as_deref()),
                (OutboxStatus::Failed, Some("550 before"))
            );
            let b = row(broken_hook);
            assert_eq!(
                (b.status, b.last_error.as_deref()),
                (OutboxStatus::Failed, Some("550 hook")),
                "recorded without its hook"
            );
            assert_eq!(
                *told.lock().unwrap(),
                [
                    (retried, "refused: b@x".to_string()),
                    (failed, "550 unknown".to_string()),
                    (broken_hook, "550 hook".to_string())
                ]
            );
            // The failed hook's write was rolled back with it; the others stay.
            let noted: Vec<String> = db
                .conn
                .query_all("SELECT reason FROM quarantine ORDER BY id", &[], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(noted, ["hook: refused: b@x", "hook: 550 unknown"]);

            let request = |settled| MarkRequest {
                settled,
                now: 0,
                on_failed: hook.clone(),
                reply: tokio::sync::oneshot::channel().0,
            };
            assert!(!request(vec![(row(sent), Disposition::Sent)]).may_queue());
            assert!(
                request(settled.clone()).may_queue(),
                "a failure may queue a notice"
            );
        }
    }
}

/// The outbox as `/metrics` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Rows the relay worker has still to send.
    pub queued: i64,
    /// Rows given up on, until `crmgate outbox retry`.
    pub failed: i64,
    /// Since the oldest queued row was queued; 0 when none is.
    pub oldest_queued_seconds: i64,
}

/// Count the queued and failed rows and age the oldest queued one.
///
/// # Errors
/// A database error.
pub fn backlog(conn: &Db, now: i64) -> Result<Backlog> {
    // Each count along its partial index: the sent rows, nearly all of a
    // large log, are never read.
    let (queued, failed) = conn.query_row(
        "SELECT (SELECT COUNT(*) FROM outbox WHERE status = 'queued'),
                (SELECT COUNT(*) FROM outbox WHERE status = 'failed')",
        &[],
        |r| Ok((r.get::<i64>(0)?, r.get::<i64>(1)?)),
    )?;
    let oldest: Option<i64> = conn.query_row(
        "SELECT MIN(created_at) FROM outbox WHERE status = 'queued'",
        &[],
        |r| r.get(0),
    )?;
    Ok(Backlog {
        queued,
        failed,
        oldest_queued_seconds: oldest.map_or(0, |at| (now - at).max(0)),
    })
}

/// A connection to the database at `path` as it is: never created, its
/// schema untouched, a short busy timeout. For the health check and the
/// scrape, which must report a database that is gone, not make a new one.
///
/// # Errors
/// There is no database there, or it cannot be opened.
pub fn connect_existing(location: &super::Location) -> Result<Db> {
    match location {
        super::Location::Sqlite(path) => {
            let conn = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(std::time::Duration::from_secs(2))?;
            Ok(Db::Sqlite(conn))
        }
        super::Location::Postgres { .. } => super::connect_postgres(location, false),
    }
}

/// Whether the database takes a write now: a write lock taken and given
/// back, nothing written. `/healthz` asks it on a connection of its own.
///
/// # Errors
/// The database is locked past the busy timeout, read-only, or gone.
pub fn can_write(conn: &Db) -> Result<()> {
    match conn {
        Db::Sqlite(_) => conn.batch("BEGIN IMMEDIATE; ROLLBACK;"),
        // A primary that takes writes (not a standby, not read-only).
        Db::Postgres(_) => {
            let read_only: String =
                conn.query_row("SHOW transaction_read_only", &[], |r| r.get(0))?;
            if read_only == "on" {
                return Err(StoreError::Invalid("the database is read-only".into()));
            }
            Ok(())
        }
    }
}
