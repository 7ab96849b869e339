//! Tickets, their lists and their log: the queries threading and the rules
//! need, and the writes a plan makes. Every function takes a connection (or
//! a transaction, which derefs to one) so the caller decides the transaction.

use std::collections::BTreeSet;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::db::{args, Db, Value, BLOB_IN_PLACE};
use super::{Result, StoreError};
use crate::decide::{NewTicket, ThreadRef, TicketView};
use crate::helpdesk::{EntryKind, OutboxKind, Role, TicketState};
use crate::parse::{Attachment, Mailbox};

/// How many of a ticket's most recent Message-IDs threading headers use
/// (the SPEC: the first message and the last ten; a few more are read so
/// that ten remain after agents' own are left out of mail to non-agents).
const THREAD_TAIL: i64 = 30;

/// The ticket a number names (a Subject's `[TKT0000042]`, a `+TKT0000042`
/// tag, or what a user typed: the column ignores case).
pub fn find_by_number(conn: &Db, number: &str) -> Result<Option<i64>> {
    conn.query_opt(
        "SELECT id FROM tickets WHERE number = ?1",
        args![number],
        |r| r.get(0),
    )
}

/// One of our Message-IDs among its ticket's rows, along `thread_ids_ticket`.
pub(crate) const OWN_MESSAGE_ID: &str =
    "SELECT ticket_id FROM thread_ids WHERE ticket_id = ?1 AND message_id = ?2 LIMIT 1";
/// Any other Message-ID, along the partial `thread_ids_message_id`.
pub(crate) const BY_MESSAGE_ID: &str =
    "SELECT ticket_id FROM thread_ids WHERE message_id = ?1 AND ours = 0 ORDER BY seq LIMIT 1";

/// The ticket a Message-ID (inbound or outbound) belongs to. `number`:
/// the ticket an ID shaped as one of ours names
/// (`thread::own_message_id_number`); ours are not in the index of
/// Message-IDs, so such an ID is looked for among that ticket's own, along
/// `thread_ids_ticket`, and found only there. Any other, or one of that
/// shape the ticket does not have (an inbound message may carry it), is
/// looked up in the index.
pub fn find_by_message_id(
    conn: &Db,
    message_id: &str,
    number: Option<&str>,
) -> Result<Option<i64>> {
    if let Some(ticket) = number
        .map(|n| find_by_number(conn, n))
        .transpose()?
        .flatten()
    {
        let known = conn.query_opt(OWN_MESSAGE_ID, args![ticket, message_id], |r| {
            r.get::<i64>(0)
        })?;
        if known.is_some() {
            return Ok(Some(ticket));
        }
    }
    conn.query_opt(BY_MESSAGE_ID, args![message_id], |r| r.get(0))
}

/// The ticket of one of our outbox rows (a bounce names it).
pub fn find_by_outbox_id(conn: &Db, outbox_id: i64) -> Result<Option<i64>> {
    Ok(conn
        .query_opt(
            "SELECT ticket_id FROM outbox WHERE id = ?1",
            args![outbox_id],
            |r| r.get::<Option<i64>>(0),
        )?
        .flatten())
}

/// What the rules need to know of a ticket: its state, its lists and its
/// thread, read once per message.
///
/// # Errors
/// `NotFound` when there is no such ticket; a database error.
pub fn view(conn: &Db, ticket_id: i64) -> Result<TicketView> {
    view_where(conn, "t.id = ?1", Value::Int(ticket_id))?
        .ok_or_else(|| StoreError::NotFound(format!("no ticket with id {ticket_id}")))
}

/// [`view`] of the ticket a number names ([`find_by_number`]), if any.
pub fn view_by_number(conn: &Db, number: &str) -> Result<Option<TicketView>> {
    view_where(conn, "t.number = ?1", Value::Text(number))
}

/// [`view`] of the ticket `condition` on `tickets AS t` picks by `?1`.
fn view_where(conn: &Db, condition: &str, key: Value<'_>) -> Result<Option<TicketView>> {
    // The ticket's row on each of its participants' (once, with NULLs,
    // when it has none): one statement.
    type Row = (
        (i64, String, String, String, Option<String>, Option<i64>),
        Option<(String, String, Option<String>)>,
    );
    let rows: Vec<Row> = conn.query_all(
        &format!(
            "SELECT t.id, t.number, t.subject, t.state, t.owner, t.resolved_at, p.role, p.address, p.name
             FROM tickets AS t LEFT JOIN participants AS p ON p.ticket_id = t.id
             WHERE {condition} ORDER BY p.id"
        ),
        &[key],
        |r| {
            let ticket = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?);
            let person = match r.get::<Option<String>>(6)? {
                Some(role) => Some((role, r.get(7)?, r.get(8)?)),
                None => None,
            };
            Ok((ticket, person))
        },
    )?;
    let Some(((ticket_id, number, subject, state, owner, resolved_at), _)) = rows.first().cloned()
    else {
        return Ok(None);
    };
    let mut requesters = Vec::new();
    let mut watch_list = Vec::new();
    let mut work_notes_list = Vec::new();
    for (role, address, name) in rows.into_iter().filter_map(|(_, person)| person) {
        let mailbox = Mailbox { name, address };
        match Role::parse(&role) {
            Some(Role::Requester) => requesters.push(mailbox),
            Some(Role::Watch) => watch_list.push(mailbox),
            _ => work_notes_list.push(mailbox.address),
        }
    }
    let thread = thread_refs(conn, ticket_id)?;
    Ok(Some(TicketView {
        id: ticket_id,
        number,
        subject,
        state: TicketState::parse(&state).unwrap_or(TicketState::Open),
        resolved_at,
        owner,
        requesters,
        watch_list,
        work_notes_list,
        thread,
    }))
}

/// The first Message-ID of the ticket and its most recent ones, oldest
/// first: both in one statement, the first marked 1.
pub fn thread_refs(conn: &Db, ticket_id: i64) -> Result<Vec<ThreadRef>> {
    let rows: Vec<(bool, i64, ThreadRef)> = conn.query_all(
        "SELECT CAST(0 AS BIGINT), seq, message_id, agent_inbound FROM (
             SELECT seq, message_id, agent_inbound FROM thread_ids
             WHERE ticket_id = ?1 ORDER BY seq DESC LIMIT ?2) AS latest
         UNION ALL
         SELECT CAST(1 AS BIGINT), seq, message_id, agent_inbound FROM (
             SELECT seq, message_id, agent_inbound FROM thread_ids
             WHERE ticket_id = ?1 AND agent_inbound = 0 ORDER BY seq LIMIT 1) AS first",
        args![ticket_id, THREAD_TAIL],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                ThreadRef {
                    message_id: r.get(2)?,
                    agent_inbound: r.get(3)?,
                },
            ))
        },
    )?;
    let (first, mut latest): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(first, ..)| *first);
    latest.sort_by_key(|(_, seq, _)| *seq);
    let mut refs: Vec<ThreadRef> = latest.into_iter().map(|(.., r)| r).collect();
    for (.., f) in first {
        if !refs.iter().any(|r| r.message_id == f.message_id) {
            refs.insert(0, f);
        }
    }
    Ok(refs)
}

/// The duplicate check of a message with a Message-ID: along the
/// threading's `thread_ids_message_id`, which holds every Message-ID of
/// logged mail with its ticket (and finds none for a new message), then
/// that ticket's entries (`apply` keeps the Message-ID of every entry that
/// has one there). So no index of entries is written for it: an
/// index by sender and body, a random place for every message, would be
/// read only by the duplicates it finds.
pub(crate) const DUPLICATE_BY_MESSAGE_ID: &str = "SELECT e.id FROM thread_ids t \
     JOIN entries e ON e.ticket_id = t.ticket_id \
     WHERE t.message_id = ?1 AND t.ours = 0 AND e.message_id = ?1 AND e.sender = ?2 AND e.body_hash = ?3 \
     ORDER BY e.id LIMIT 1";
/// The duplicate check of a message without a Message-ID, along
/// `entries_sender_hash` (which holds those entries only).
pub(crate) const DUPLICATE_WITHOUT_MESSAGE_ID: &str = "SELECT e.id FROM entries e \
     JOIN raw_messages m ON m.id = e.raw_id \
     WHERE e.sender = ?1 AND e.body_hash = ?2 AND e.at >= ?3 AND e.message_id IS NULL \
     AND e.subject = ?4 ORDER BY e.id LIMIT 1";

/// The entry that already holds this message, if any (SPEC rule 2): same
/// Message-ID, sender and body; without a Message-ID, same sender, subject
/// and body within 24 hours.
pub fn duplicate_of(
    conn: &Db,
    sender: &str,
    message_id: Option<&str>,
    subject: &str,
    body_hash: &str,
    now: i64,
) -> Result<Option<i64>> {
    match message_id {
        Some(id) => conn.query_opt(DUPLICATE_BY_MESSAGE_ID, args![id, sender, body_hash], |r| {
            r.get(0)
        }),
        None => conn.query_opt(
            DUPLICATE_WITHOUT_MESSAGE_ID,
            args![sender, body_hash, now - 86_400, subject],
            |r| r.get(0),
        ),
    }
}

/// Several instances on one PostgreSQL database: hold the duplicate key
/// of a message (its sender and body) until the transaction ends, so that
/// an instance receiving the same message at the same moment runs its
/// duplicate check after this one's entry has committed, and finds it.
/// The unique `entries_once` covers mail with a Message-ID by itself (the
/// second instance's entry is refused, and its message counted a
/// duplicate then), so only mail without one takes it: its 24-hour window
/// is what no unique key can express. Nothing to do on SQLite, whose one
/// writer serializes.
pub fn hold_duplicate_key(conn: &Db, sender: &str, body_hash: &str) -> Result<()> {
    if conn.is_postgres() {
        conn.query_row(
            "SELECT CAST(pg_advisory_xact_lock(hashtextextended(?1, 0)) AS TEXT)",
            args![&format!("{sender}\n{body_hash}")],
            |_| Ok(()),
        )?;
    }
    Ok(())
}

/// One more copy of an entry's message arrived (reply-all, several
/// deliveries): counted, not logged again.
pub fn count_duplicate(conn: &Db, entry_id: i64) -> Result<()> {
    conn.exec(
        "UPDATE entries SET duplicates = duplicates + 1 WHERE id = ?1",
        args![entry_id],
    )?;
    Ok(())
}

/// Addresses that were agents once and are no longer configured: mail to
/// non-agents stays scrubbed of them.
pub fn former_agents(conn: &Db) -> Result<BTreeSet<String>> {
    Ok(conn
        .query_all(
            "SELECT address FROM known_agents WHERE removed_at IS NOT NULL",
            &[],
            |r| r.get(0),
        )?
        .into_iter()
        .collect())
}

/// Record the configured agents; those no longer configured become former
/// agents and leave every work-notes list and ownership (SPEC: at the next
/// start or reload). Returns the addresses removed this time.
pub fn sync_agents(conn: &Db, agents: &[crate::config::Agent], now: i64) -> Result<Vec<String>> {
    let configured: BTreeSet<&str> = agents.iter().map(|a| a.email.as_str()).collect();
    for a in agents {
        conn.exec(
            "INSERT INTO known_agents (address, name, first_seen) VALUES (?1, ?2, ?3)
             ON CONFLICT (address) DO UPDATE SET name = excluded.name, removed_at = NULL",
            args![&a.email, &a.name, now],
        )?;
    }
    let active: Vec<String> = conn.query_all(
        "SELECT address FROM known_agents WHERE removed_at IS NULL",
        &[],
        |r| r.get(0),
    )?;
    let mut removed = Vec::new();
    for address in active
        .into_iter()
        .filter(|a| !configured.contains(a.as_str()))
    {
        conn.exec(
            "UPDATE known_agents SET removed_at = ?2 WHERE address = ?1",
            args![&address, now],
        )?;
        conn.exec(
            "DELETE FROM participants WHERE role = 'notes' AND address = ?1",
            args![&address],
        )?;
        conn.exec(
            "UPDATE tickets SET owner = NULL WHERE owner = ?1",
            args![&address],
        )?;
        removed.push(address);
    }
    Ok(removed)
}

/// Create a ticket; its number is the prefix and the row id, zero-padded.
///
/// The engine picks the id (SQLite the next rowid, PostgreSQL its
/// sequence), so instances creating tickets at once never pick the same:
/// on SQLite the row is inserted under a placeholder number, then
/// numbered from its id ([`insert_then_number`]); on PostgreSQL it is
/// inserted numbered, its id taken from the sequence in the same
/// statement ([`insert_numbered`]).
pub fn create(
    conn: &Db,
    new: &NewTicket,
    state: TicketState,
    prefix: &str,
    digits: usize,
    now: i64,
) -> Result<(i64, String)> {
    let view = create_and_view(conn, new, state, prefix, digits, now)?;
    Ok((view.id, view.number))
}

/// [`create`], and what [`view`] would read of the new ticket, from what
/// was written rather than read back: its lists in the order they were
/// inserted, each address once, and no thread yet.
pub fn create_and_view(
    conn: &Db,
    new: &NewTicket,
    state: TicketState,
    prefix: &str,
    digits: usize,
    now: i64,
) -> Result<TicketView> {
    let (id, number) = if conn.is_postgres() {
        insert_numbered(conn, new, state, prefix, digits, now)?
    } else {
        insert_then_number(conn, new, state, prefix, digits, now)?
    };
    let mut lists: Vec<(Role, Mailbox)> = Vec::new();
    let people = (new.requesters.iter().map(|m| (Role::Requester, m.clone())))
        .chain(new.watch_list.iter().map(|m| (Role::Watch, m.clone())))
        .chain(
            new.work_notes_list
                .iter()
                .chain(&new.owner)
                .map(|a| (Role::Notes, Mailbox::new(None, a))),
        );
    for (role, who) in people {
        if !lists
            .iter()
            .any(|(r, m)| *r == role && m.address == who.address)
        {
            lists.push((role, who));
        }
    }
    add_participants(conn, id, &lists, now)?;
    let on = |role: Role| {
        lists
            .iter()
            .filter(move |(r, _)| *r == role)
            .map(|(_, m)| m)
    };
    Ok(TicketView {
        id,
        number,
        subject: new.subject.clone(),
        state,
        resolved_at: None,
        owner: new.owner.clone(),
        requesters: on(Role::Requester).cloned().collect(),
        watch_list: on(Role::Watch).cloned().collect(),
        work_notes_list: on(Role::Notes).map(|m| m.address.clone()).collect(),
        thread: Vec::new(),
    })
}

/// SQLite: the row inserted under a placeholder number no other
/// transaction uses, then numbered from the rowid it got.
fn insert_then_number(
    conn: &Db,
    new: &NewTicket,
    state: TicketState,
    prefix: &str,
    digits: usize,
    now: i64,
) -> Result<(i64, String)> {
    // After every number of the prefix (`~` sorts after the digits and
    // the letters): on the index's last page, where the number goes.
    let placeholder = format!("{prefix}~{:032x}", rand::random::<u128>());
    let id: i64 = conn.query_row(
        "INSERT INTO tickets (number, subject, state, owner, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5) RETURNING id",
        args![
            &placeholder,
            new.subject.as_str(),
            state.as_str(),
            &new.owner,
            now
        ],
        |r| r.get(0),
    )?;
    let number = format!("{prefix}{id:0digits$}");
    conn.exec(
        "UPDATE tickets SET number = ?2 WHERE id = ?1",
        args![id, &number],
    )?;
    Ok((id, number))
}

/// PostgreSQL: the ticket's row inserted with its number, the id taken
/// from the sequence in the same statement (one statement, and no second
/// version of the row as the update under a placeholder leaves). The
/// number is padded as `format!("{prefix}{id:0digits$}")` pads it, never
/// cut.
fn insert_numbered(
    conn: &Db,
    new: &NewTicket,
    state: TicketState,
    prefix: &str,
    digits: usize,
    now: i64,
) -> Result<(i64, String)> {
    let digits = i64::try_from(digits)
        .map_err(|_| StoreError::Invalid(format!("ticket number of {digits} digits")))?;
    conn.query_row(
        "INSERT INTO tickets (id, number, subject, state, owner, created_at, updated_at)
         SELECT n.id,
                ?5 || repeat('0', GREATEST(?6 - length(CAST(n.id AS TEXT)), 0))
                   || CAST(n.id AS TEXT),
                ?1, ?2, ?3, ?4, ?4
         FROM (SELECT nextval('tickets_id_seq') AS id) AS n
         RETURNING id, CAST(number AS TEXT)",
        args![
            new.subject.as_str(),
            state.as_str(),
            &new.owner,
            now,
            prefix,
            digits
        ],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// The VALUES rows of a multi-row INSERT whose statement binds two shared
/// parameters (?1, ?2) and then three of each row's own: `row` gets the
/// placeholder numbers of row i's three.
fn value_rows(count: usize, row: impl Fn([usize; 3]) -> String) -> String {
    (0..count)
        .map(|i| row([3 * i + 3, 3 * i + 4, 3 * i + 5]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Put several people on a ticket's lists in one statement (one row each,
/// in order); those already on theirs stay as they are.
fn add_participants(conn: &Db, ticket_id: i64, people: &[(Role, Mailbox)], now: i64) -> Result<()> {
    if people.is_empty() {
        return Ok(());
    }
    // ?1 the ticket, ?2 the time, then role, address and name of each.
    let rows = value_rows(people.len(), |[role, address, name]| {
        format!("(?1, ?{role}, ?{address}, ?{name}, ?2)")
    });
    let sql = format!(
        "INSERT INTO participants (ticket_id, role, address, name, added_at) VALUES {rows}
         ON CONFLICT DO NOTHING"
    );
    let mut params = vec![Value::Int(ticket_id), Value::Int(now)];
    for (role, who) in people {
        params.extend([
            Value::Text(role.as_str()),
            Value::Text(&who.address),
            Value::from(&who.name),
        ]);
    }
    conn.exec(&sql, &params)?;
    Ok(())
}

/// Add someone to a list; `true` when they were not on it yet.
pub fn add_participant(
    conn: &Db,
    ticket_id: i64,
    role: Role,
    who: &Mailbox,
    now: i64,
) -> Result<bool> {
    Ok(conn.exec(
        "INSERT INTO participants (ticket_id, role, address, name, added_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT DO NOTHING",
        args![ticket_id, role.as_str(), &who.address, &who.name, now],
    )? > 0)
}

/// Take someone off a list; `true` when they were on it.
pub fn remove_participant(conn: &Db, ticket_id: i64, role: Role, address: &str) -> Result<bool> {
    Ok(conn.exec(
        "DELETE FROM participants WHERE ticket_id = ?1 AND role = ?2 AND address = ?3",
        args![ticket_id, role.as_str(), address],
    )? > 0)
}

/// A ticket's subject, for the `system` entries the CLI notes on it.
///
/// # Errors
/// `NotFound` when there is no such ticket; a database error.
pub fn subject(conn: &Db, ticket_id: i64) -> Result<String> {
    conn.query_opt(
        "SELECT subject FROM tickets WHERE id = ?1",
        args![ticket_id],
        |r| r.get(0),
    )?
    .ok_or_else(|| StoreError::NotFound(format!("no ticket with id {ticket_id}")))
}

/// A ticket's state changes (a reply reopens it, an agent resolves it);
/// every path goes through here, so `resolved_at` is the time of the last
/// resolution while resolved, and empty otherwise.
pub fn set_state(conn: &Db, ticket_id: i64, state: TicketState, now: i64) -> Result<()> {
    let resolved_at = (state == TicketState::Resolved).then_some(now);
    conn.exec(
        "UPDATE tickets SET state = ?2, updated_at = ?3, resolved_at = ?4 WHERE id = ?1",
        args![ticket_id, state.as_str(), now, resolved_at],
    )?;
    Ok(())
}

/// The agent responsible for a ticket, or none (a former agent's tickets).
pub fn set_owner(conn: &Db, ticket_id: i64, owner: Option<&str>, now: i64) -> Result<()> {
    conn.exec(
        "UPDATE tickets SET owner = ?2, updated_at = ?3 WHERE id = ?1",
        args![ticket_id, owner, now],
    )?;
    Ok(())
}

/// The ticket changed without a new state: `updated_at` moves, so lists
/// sorted by it show the latest activity.
pub fn touch(conn: &Db, ticket_id: i64, now: i64) -> Result<()> {
    conn.exec(
        "UPDATE tickets SET updated_at = ?2 WHERE id = ?1",
        args![ticket_id, now],
    )?;
    Ok(())
}

/// Store a raw message once; entries and quarantine rows point at it.
pub fn insert_raw(
    conn: &Db,
    now: i64,
    peer: Option<&str>,
    mail_from: Option<&str>,
    rcpt_to: &[String],
    data: &[u8],
) -> Result<i64> {
    let rcpt = serde_json::to_string(rcpt_to).unwrap_or_else(|_| "[]".into());
    let id: i64 = conn.query_row(
        "INSERT INTO raw_messages (received_at, peer, mail_from, rcpt_to, data) VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
        args![now, peer, mail_from, &rcpt, Value::Large(data)],
        |r| r.get(0),
    )?;
    conn.fill_in_place("raw_messages", "data", id, data)?;
    Ok(id)
}

/// One log entry to write: borrowed, so a 25 MB body is not copied to be
/// stored.
pub struct EntryRow<'a> {
    /// The ticket whose log it joins.
    pub ticket_id: i64,
    /// Comment, work note, e-mail…: who may see it and what it sends.
    pub kind: EntryKind,
    /// The author as shown on the ticket.
    pub from: &'a Mailbox,
    /// Unix seconds.
    pub at: i64,
    /// The Subject without the ticket's tag.
    pub subject: &'a str,
    /// The cleaned text (a long one is written in place, see
    /// [`insert_entry`]).
    pub body: &'a str,
    /// The HTML part, when the message had one, kept beside the text.
    pub html: Option<&'a str>,
    /// The inbound Message-ID, for the duplicate check.
    pub message_id: Option<&'a str>,
    /// Written by a believed agent, not merely from an agent's address.
    pub by_agent: bool,
    /// The sender as the duplicate check knows it (envelope or From).
    pub sender: Option<&'a str>,
    /// A hash of the body, so a copy is known without comparing texts.
    pub body_hash: Option<&'a str>,
    /// The raw message it came from, kept as it arrived.
    pub raw_id: Option<i64>,
    /// That raw message's bytes, when at hand: a text that is the first
    /// bytes of its body is not written a second time (see
    /// [`text_in_raw`]).
    pub raw: Option<&'a [u8]>,
}

/// Where `text` stands in `raw` when it is the beginning of the raw
/// message's body, as it is for a plain-text message (the whole body, or
/// the words above the reply marker): `(offset, length)` of those bytes in
/// `raw`, read back by [`text_from_raw`]. `None` for any other text (an
/// encoded body, a MIME part, a line end that is not CRLF): that one is
/// stored. Each LF of `text` must be a CRLF of the body and `text` holds no
/// CR, so that turning each CRLF of those bytes into LF gives `text` back
/// exactly, whatever version of the parser reads the log.
pub fn text_in_raw(raw: &[u8], text: &str) -> Option<(usize, usize)> {
    let start = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let body = &raw[start..];
    let mut at = 0;
    for &b in text.as_bytes() {
        match b {
            b'\r' => return None,
            b'\n' if body.get(at..at + 2) == Some(b"\r\n") => at += 2,
            _ if body.get(at) == Some(&b) && b != b'\n' => at += 1,
            _ => return None,
        }
    }
    Some((start, at))
}

/// An entry's text kept as bytes of its raw message ([`text_in_raw`]).
///
/// # Errors
/// Bytes that are not UTF-8 (not written by [`text_in_raw`]).
pub fn text_from_raw(bytes: &[u8]) -> std::result::Result<String, std::string::FromUtf8Error> {
    let mut text = LineEnds::with_capacity(bytes.len());
    text.push(bytes);
    text.finish()
}

/// [`text_from_raw`] of `len` bytes at `at` of a raw message, read from
/// SQLite in pieces: a column read would hold the whole raw message, then
/// the bytes taken from it, in SQLite's memory beside the text (three
/// times a 25 MB text at once, in the relay composing a copy of it).
///
/// # Errors
/// A database error, a range outside the raw message, or bytes that are
/// not UTF-8.
pub fn text_from_raw_in_pieces(
    conn: &rusqlite::Connection,
    raw_id: i64,
    at: i64,
    len: i64,
) -> Result<String> {
    const PIECE: usize = 64 * 1024;
    let invalid =
        |what: String| StoreError::Invalid(format!("an entry's text in its raw message: {what}"));
    let (Ok(at), Ok(len)) = (usize::try_from(at), usize::try_from(len)) else {
        return Err(invalid(format!("{len} bytes at {at}")));
    };
    let blob = conn.blob_open(rusqlite::MAIN_DB, "raw_messages", "data", raw_id, true)?;
    let mut text = LineEnds::with_capacity(len);
    let mut piece = vec![0; PIECE.min(len)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(PIECE);
        blob.read_at_exact(&mut piece[..n], at + done)
            .map_err(|e| invalid(format!("{len} bytes at {at}: {e}")))?;
        text.push(&piece[..n]);
        done += n;
    }
    text.finish().map_err(|e| invalid(e.to_string()))
}

/// Bytes with each CRLF turned into LF, given in pieces: a CR that ends
/// one piece waits for the first byte of the next.
struct LineEnds {
    out: Vec<u8>,
    cr: bool,
}

impl LineEnds {
    fn with_capacity(len: usize) -> Self {
        LineEnds {
            out: Vec::with_capacity(len),
            cr: false,
        }
    }

    fn push(&mut self, mut piece: &[u8]) {
        if std::mem::take(&mut self.cr) {
            match piece.strip_prefix(b"\n") {
                Some(rest) => {
                    self.out.push(b'\n');
                    piece = rest;
                }
                None if piece.is_empty() => {
                    self.cr = true;
                    return;
                }
                None => self.out.push(b'\r'),
            }
        }
        if let Some(rest) = piece.strip_suffix(b"\r") {
            self.cr = true;
            piece = rest;
        }
        while let Some(i) = piece.windows(2).position(|w| w == b"\r\n") {
            self.out.extend_from_slice(&piece[..i]);
            self.out.push(b'\n');
            piece = &piece[i + 2..];
        }
        self.out.extend_from_slice(piece);
    }

    fn finish(mut self) -> std::result::Result<String, std::string::FromUtf8Error> {
        if self.cr {
            self.out.push(b'\r');
        }
        String::from_utf8(self.out)
    }
}

/// The two columns that give an entry's text, from `entries AS e LEFT
/// JOIN raw_messages AS r ON r.id = e.raw_id`: the stored text (`body`,
/// or `long_body`), then its bytes in the raw message when the entry names
/// them instead (NULL otherwise). Two columns, text and bytes, since
/// PostgreSQL keeps them in columns of two types. Read with
/// [`entry_text`].
pub const ENTRY_TEXT: &str = "COALESCE(e.long_body, e.body), \
     substr(r.data, CAST(e.raw_body_at AS INTEGER) + 1, CAST(e.raw_body_len AS INTEGER))";

/// An entry's text from the two columns of [`ENTRY_TEXT`] at `index`.
///
/// # Errors
/// A column of another type, or a text that is not UTF-8.
pub fn entry_text(r: &super::Row<'_>, index: usize) -> Result<String> {
    match r.with_bytes(index + 1, |bytes| bytes.map(text_from_raw))? {
        Some(text) => text
            .map_err(|e| StoreError::Invalid(format!("an entry's text in its raw message: {e}"))),
        None => r.text(index),
    }
}

/// Log an entry on a ticket; its id, for attachments and outbox rows.
pub fn insert_entry(conn: &Db, e: &EntryRow<'_>) -> Result<i64> {
    // The text of a plain-text message is in its raw message already.
    let in_raw = match (e.raw_id, e.raw) {
        (Some(_), Some(raw)) if !e.body.is_empty() => text_in_raw(raw, e.body),
        _ => None,
    };
    let (body, long) = match in_raw {
        Some(_) => ("", false),
        None => (e.body, e.body.len() > BLOB_IN_PLACE),
    };
    let to_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    // The conflict is PostgreSQL's unique `entries_once` (the same message
    // logged by another instance); SQLite has no such index: one writer.
    let id: i64 = conn.query_opt(
        "INSERT INTO entries (ticket_id, kind, from_addr, from_name, at, subject, body, html, message_id,
                              by_agent, sender, body_hash, raw_id, long_body, raw_body_at, raw_body_len)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
         ON CONFLICT DO NOTHING RETURNING id",
        args![
            e.ticket_id,
            e.kind.as_str(),
            &e.from.address,
            &e.from.name,
            e.at,
            e.subject,
            if long { "" } else { body },
            e.html,
            e.message_id,
            e.by_agent,
            e.sender,
            e.body_hash,
            e.raw_id,
            if long { Value::LargeText(e.body) } else { Value::Null },
            in_raw.map(|(at, _)| to_i64(at)),
            in_raw.map(|(_, len)| to_i64(len)),
        ],
        |r| r.get(0),
    )?
    .ok_or(StoreError::AlreadyLogged)?;
    // A long body goes in `long_body`, written in place on SQLite (see the
    // schema's second migration); readers take either ([`entry_text`]).
    if long {
        conn.fill_in_place("entries", "long_body", id, e.body.as_bytes())?;
    }
    Ok(id)
}

/// A `system` entry: what crmgate itself notes on a ticket (a cap reached,
/// a delivery failure, a list changed from the command line).
pub fn insert_system_entry(
    conn: &Db,
    ticket_id: i64,
    from: &Mailbox,
    subject: &str,
    body: &str,
    now: i64,
) -> Result<i64> {
    insert_entry(
        conn,
        &EntryRow {
            ticket_id,
            kind: EntryKind::System,
            from,
            at: now,
            subject,
            body,
            html: None,
            message_id: None,
            by_agent: false,
            sender: None,
            body_hash: None,
            raw_id: None,
            raw: None,
        },
    )
}

/// Keep an attachment on its entry. Bytes already on the entry's ticket
/// (the logo of every mail of a signature, a document sent back) are
/// stored once: the new row names the attachment and points at the row
/// that holds them (`same_as`). Returns whether the bytes are new on the
/// ticket, which is whether notifications list the attachment.
pub fn insert_attachment(conn: &Db, entry_id: i64, a: &Attachment) -> Result<bool> {
    let sha256 = hex::encode(Sha256::digest(&a.data));
    let held_by: Option<i64> = conn.query_opt(
        "SELECT a.id FROM attachments a JOIN entries e ON e.id = a.entry_id \
         WHERE a.sha256 = ?2 AND a.same_as IS NULL \
           AND e.ticket_id = (SELECT ticket_id FROM entries WHERE id = ?1) \
         ORDER BY a.id LIMIT 1",
        args![entry_id, &sha256],
        |r| r.get(0),
    )?;
    let size = a.data.len() as i64;
    if let Some(held_by) = held_by {
        conn.exec(
            "INSERT INTO attachments (entry_id, filename, content_type, size, data, sha256, same_as) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            args![entry_id, &a.filename, &a.content_type, size, &b""[..], &sha256, held_by],
        )?;
        return Ok(false);
    }
    // The bytes last in the row: `content` (see the migration that made it).
    let id: i64 = conn.query_row(
        "INSERT INTO attachments (entry_id, filename, content_type, size, data, sha256, content) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
        args![
            entry_id,
            &a.filename,
            &a.content_type,
            size,
            &b""[..],
            &sha256,
            Value::Large(&a.data)
        ],
        |r| r.get(0),
    )?;
    conn.fill_in_place("attachments", "content", id, &a.data)?;
    Ok(true)
}

/// Remember a Message-ID on a ticket, for threading both ways. `ours`:
/// the Message-ID of one of our outgoing copies (`thread::own_message_id`),
/// found through the ticket number in it rather than the index of
/// Message-IDs, which it would write at a random place.
pub fn insert_thread_id(
    conn: &Db,
    message_id: &str,
    ticket_id: i64,
    agent_inbound: bool,
    ours: bool,
    now: i64,
) -> Result<()> {
    insert_thread_ids(
        conn,
        ticket_id,
        &[ThreadId {
            message_id,
            agent_inbound,
            ours,
        }],
        now,
    )
}

/// A Message-ID to remember on a ticket ([`insert_thread_id`]).
#[derive(Debug, Clone, Copy)]
pub struct ThreadId<'a> {
    /// As it stands in the header, angle brackets and all.
    pub message_id: &'a str,
    /// An agent's own: never named to non-agents.
    pub agent_inbound: bool,
    /// One of our outgoing copies'.
    pub ours: bool,
}

/// Several Message-IDs of one ticket (a message's and its copies'), in one
/// statement; they thread in this order.
pub fn insert_thread_ids(conn: &Db, ticket_id: i64, ids: &[ThreadId<'_>], now: i64) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    // ?1 the ticket, ?2 the time, then Message-ID, agent_inbound and ours of each.
    let rows = value_rows(ids.len(), |[message_id, agent_inbound, ours]| {
        format!("(?{message_id}, ?1, ?{agent_inbound}, ?{ours}, ?2)")
    });
    let sql = format!(
        "INSERT INTO thread_ids (message_id, ticket_id, agent_inbound, ours, at) VALUES {rows}"
    );
    let mut params = vec![Value::Int(ticket_id), Value::Int(now)];
    for id in ids {
        params.extend([
            Value::Text(id.message_id),
            Value::from(id.agent_inbound),
            Value::from(id.ours),
        ]);
    }
    conn.exec(&sql, &params)?;
    Ok(())
}

/// Keep a message that went to no ticket (unparseable, no ticket found,
/// refused, postmaster…) with the reason, for `crmgate quarantine list`.
pub fn insert_quarantine(
    conn: &Db,
    now: i64,
    reason: &str,
    sender: Option<&str>,
    subject: Option<&str>,
    message_id: Option<&str>,
    raw_id: Option<i64>,
) -> Result<i64> {
    conn.query_row(
        "INSERT INTO quarantine (at, reason, sender, subject, message_id, raw_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
        args![now, reason, sender, subject, message_id, raw_id],
        |r| r.get(0),
    )
}

// ---------------------------------------------------------------------------
// Reading for the command line.
// ---------------------------------------------------------------------------

/// An attachment as `ticket show` names it: no bytes.
#[derive(Debug, Serialize)]
pub struct AttachmentInfo {
    /// The name the sender gave it.
    pub filename: String,
    /// Its MIME type, as sent (or guessed from the name, for `--attach`).
    pub content_type: String,
    /// Bytes.
    pub size: i64,
}

/// An entry as `ticket show --json` prints it (the SPEC's object).
#[derive(Debug, Serialize)]
pub struct EntryInfo {
    /// The log order.
    pub id: i64,
    /// `comment`, `work_note`, `email`, `receipt`, `closure` or `system`.
    pub kind: String,
    /// The author's address.
    pub from: String,
    /// RFC 3339, UTC.
    pub at: String,
    /// The Subject without the ticket's tag.
    pub subject: String,
    /// The whole text, however long.
    pub body: String,
    /// The inbound Message-ID, when it came by mail.
    pub message_id: Option<String>,
    /// How many more copies of the same message arrived.
    pub duplicates: i64,
    /// What the entry keeps, without the bytes.
    pub attachments: Vec<AttachmentInfo>,
}

/// A ticket as `ticket show --json` prints it (the SPEC's object): its
/// lists and its whole log.
#[derive(Debug, Serialize)]
pub struct TicketInfo {
    /// `TKT0000042`.
    pub number: String,
    /// The first message's Subject, cleaned.
    pub subject: String,
    /// `new`, `open` or `resolved`.
    pub state: String,
    /// The responsible agent, if any.
    pub owner: Option<String>,
    /// Who asked: the watch group with the watch list.
    pub requesters: Vec<String>,
    /// Who follows the public conversation.
    pub watch_list: Vec<String>,
    /// The agents who get comments and work notes.
    pub work_notes_list: Vec<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// RFC 3339, UTC: the last change.
    pub updated_at: String,
    /// The log, oldest first.
    pub entries: Vec<EntryInfo>,
}

/// A ticket as `ticket list --json` prints it: enough to pick one.
#[derive(Debug, Serialize)]
pub struct TicketSummary {
    /// `TKT0000042`.
    pub number: String,
    /// The cleaned Subject.
    pub subject: String,
    /// `new`, `open` or `resolved`.
    pub state: String,
    /// Who asked.
    pub requesters: Vec<String>,
    /// RFC 3339, UTC: the last change.
    pub updated_at: String,
}

/// Unix seconds as the CLI shows them (RFC 3339, UTC); empty when out of
/// range, rather than failing a whole listing.
pub fn rfc3339(at: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn addresses(conn: &Db, ticket_id: i64, role: Role) -> Result<Vec<String>> {
    conn.query_all(
        "SELECT address FROM participants WHERE ticket_id = ?1 AND role = ?2 ORDER BY id",
        args![ticket_id, role.as_str()],
        |r| r.get(0),
    )
}

/// Resolve a ticket number as typed by a user (any case) to its id.
///
/// # Errors
/// `NotFound` naming the number.
pub fn require(conn: &Db, number: &str) -> Result<i64> {
    find_by_number(conn, number)?.ok_or_else(|| StoreError::NotFound(format!("no ticket {number}")))
}

/// Everything `ticket show` prints of a ticket.
///
/// # Errors
/// A database error (a missing ticket among them).
pub fn info(conn: &Db, ticket_id: i64) -> Result<TicketInfo> {
    let (number, subject, state, owner, created_at, updated_at): (
        String,
        String,
        String,
        Option<String>,
        i64,
        i64,
    ) = conn.query_row(
        "SELECT number, subject, state, owner, created_at, updated_at FROM tickets WHERE id = ?1",
        args![ticket_id],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        },
    )?;
    let mut entries: Vec<EntryInfo> = conn.query_all(
        &format!(
            "SELECT e.id, e.kind, e.from_addr, e.at, e.subject, {ENTRY_TEXT}, e.message_id, e.duplicates
             FROM entries AS e LEFT JOIN raw_messages AS r ON r.id = e.raw_id
             WHERE e.ticket_id = ?1 ORDER BY e.id"
        ),
        args![ticket_id],
        |r| {
            Ok(EntryInfo {
                id: r.get(0)?,
                kind: r.get(1)?,
                from: r.get(2)?,
                at: rfc3339(r.get(3)?),
                subject: r.get(4)?,
                body: entry_text(r, 5)?,
                message_id: r.get(7)?,
                duplicates: r.get(8)?,
                attachments: Vec::new(),
            })
        },
    )?;
    for e in &mut entries {
        e.attachments = conn.query_all(
            "SELECT filename, content_type, size FROM attachments WHERE entry_id = ?1 ORDER BY id",
            args![e.id],
            |r| {
                Ok(AttachmentInfo {
                    filename: r.get(0)?,
                    content_type: r.get(1)?,
                    size: r.get(2)?,
                })
            },
        )?;
    }
    Ok(TicketInfo {
        number,
        subject,
        state,
        owner,
        requesters: addresses(conn, ticket_id, Role::Requester)?,
        watch_list: addresses(conn, ticket_id, Role::Watch)?,
        work_notes_list: addresses(conn, ticket_id, Role::Notes)?,
        created_at: rfc3339(created_at),
        updated_at: rfc3339(updated_at),
        entries,
    })
}

/// Every ticket in number order, or those in one state, for `ticket list`.
pub fn list(conn: &Db, state: Option<TicketState>) -> Result<Vec<TicketSummary>> {
    let rows: Vec<(i64, String, String, String, i64)> = conn.query_all(
        "SELECT id, number, subject, state, updated_at FROM tickets
         WHERE CAST(?1 AS TEXT) IS NULL OR state = ?1 ORDER BY id",
        args![state.map(TicketState::as_str)],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )?;
    rows.into_iter()
        .map(|(id, number, subject, state, updated_at)| {
            Ok(TicketSummary {
                number,
                subject,
                state,
                requesters: addresses(conn, id, Role::Requester)?,
                updated_at: rfc3339(updated_at),
            })
        })
        .collect()
}

/// A quarantined message as `quarantine list --json` prints it.
#[derive(Debug, Serialize)]
pub struct QuarantineInfo {
    /// The arrival order.
    pub id: i64,
    /// RFC 3339, UTC.
    pub at: String,
    /// Why it went to no ticket (`unparseable`, `refused`, …).
    pub reason: String,
    /// The sender, when one could be read.
    pub sender: Option<String>,
    /// The Subject, when it could be read.
    pub subject: Option<String>,
    /// The Message-ID, when it had one.
    pub message_id: Option<String>,
}

/// Every quarantined message, oldest first, for an operator to look at.
pub fn quarantine_list(conn: &Db) -> Result<Vec<QuarantineInfo>> {
    conn.query_all(
        "SELECT id, at, reason, sender, subject, message_id FROM quarantine ORDER BY id",
        &[],
        |r| {
            Ok(QuarantineInfo {
                id: r.get(0)?,
                at: rfc3339(r.get(1)?),
                reason: r.get(2)?,
                sender: r.get(3)?,
                subject: r.get(4)?,
                message_id: r.get(5)?,
            })
        },
    )
}

/// A quarantined message with what it arrived with, for `quarantine show`
/// and `quarantine release`.
#[derive(Debug)]
pub struct QuarantinedMessage {
    /// What `quarantine list` shows of it.
    pub info: QuarantineInfo,
    /// The client that sent it: a release hands the message on as that
    /// client did.
    pub peer: Option<String>,
    /// The envelope sender, as received.
    pub mail_from: Option<String>,
    /// The envelope recipients, as received.
    pub rcpt_to: Vec<String>,
    /// The message as it arrived, byte for byte.
    pub data: Vec<u8>,
}

/// The quarantine row `id` and its raw message; `None` when there is no
/// such row or it kept no raw message.
pub fn quarantined(conn: &Db, id: i64) -> Result<Option<QuarantinedMessage>> {
    conn.query_opt(
        "SELECT q.id, q.at, q.reason, q.sender, q.subject, q.message_id, \
                    r.peer, r.mail_from, r.rcpt_to, r.data \
             FROM quarantine q JOIN raw_messages r ON r.id = q.raw_id WHERE q.id = ?1",
        args![id],
        |r| {
            let rcpt: String = r.get(8)?;
            Ok(QuarantinedMessage {
                info: QuarantineInfo {
                    id: r.get(0)?,
                    at: rfc3339(r.get(1)?),
                    reason: r.get(2)?,
                    sender: r.get(3)?,
                    subject: r.get(4)?,
                    message_id: r.get(5)?,
                },
                peer: r.get(6)?,
                mail_from: r.get(7)?,
                rcpt_to: serde_json::from_str(&rcpt).unwrap_or_default(),
                data: r.get(9)?,
            })
        },
    )
}

/// Take a row out of the quarantine (its raw message stays, as every raw
/// message does); whether there was one.
pub fn remove_quarantined(conn: &Db, id: i64) -> Result<bool> {
    Ok(conn.exec("DELETE FROM quarantine WHERE id = ?1", args![id])? > 0)
}

/// Queue an outgoing message as its bytes (mail crmgate passes on, and
/// rows queued before plans); the relay worker picks it up. Its bytes go
/// in a table of their own, written this once: the row's status changes
/// rewrite only the row.
#[allow(clippy::too_many_arguments)]
pub fn insert_outbox(
    conn: &Db,
    ticket_id: Option<i64>,
    entry_id: Option<i64>,
    kind: OutboxKind,
    recipients: &[String],
    message_id: &str,
    message: &[u8],
    now: i64,
) -> Result<i64> {
    let id = insert_outbox_row(
        conn,
        (ticket_id, entry_id),
        kind,
        recipients,
        message_id,
        None,
        now,
    )?;
    conn.exec(
        "INSERT INTO outbox_messages (outbox_id, message) VALUES (?1, ?2)",
        args![id, Value::Large(message)],
    )?;
    conn.fill_in_place("outbox_messages", "message", id, message)?;
    Ok(id)
}

/// Queue an outgoing copy as its plan (`compose::plan::CopyPlan`, as
/// JSON): the relay composes it when it sends it, from the plan and the
/// row's entry. In the row itself: a table of its own would be one more
/// B-tree whose last page every commit writes whole.
#[allow(clippy::too_many_arguments)]
pub fn insert_outbox_plan(
    conn: &Db,
    ticket_id: Option<i64>,
    entry_id: Option<i64>,
    kind: OutboxKind,
    recipients: &[String],
    message_id: &str,
    plan: &str,
    now: i64,
) -> Result<i64> {
    insert_outbox_row(
        conn,
        (ticket_id, entry_id),
        kind,
        recipients,
        message_id,
        Some(plan),
        now,
    )
}

/// `on`: the row's ticket and entry.
fn insert_outbox_row(
    conn: &Db,
    (ticket_id, entry_id): (Option<i64>, Option<i64>),
    kind: OutboxKind,
    recipients: &[String],
    message_id: &str,
    plan: Option<&str>,
    now: i64,
) -> Result<i64> {
    let recipients =
        serde_json::to_string(recipients).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let id: i64 = conn.query_row(
        "INSERT INTO outbox (ticket_id, entry_id, kind, recipients, message_id, next_attempt_at, created_at, plan)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7) RETURNING id",
        args![ticket_id, entry_id, kind.as_str(), &recipients, message_id, now, plan],
        |r| r.get(0),
    )?;
    Ok(id)
}

/// How many capped messages went to `address` lately, each count stopped
/// at its cap (see `decide::within_cap`): an agent who receives thousands
/// of copies a day costs no more to check than one who received three.
/// `copies_of`: a sender and `max_resends_per_sender_hour`, whose copies of
/// the last hour (all tickets and addresses together) are counted in the
/// same statement, up to that cap; 0 without one.
pub fn sent_counts(
    conn: &Db,
    address: &str,
    ticket_id: i64,
    caps: crate::decide::SentCounts,
    copies_of: Option<(&str, u32)>,
    now: i64,
) -> Result<(crate::decide::SentCounts, u32)> {
    let (sender, sender_cap) = copies_of.map_or((None, 0), |(s, cap)| (Some(s), cap));
    let count = |r: &super::Row<'_>, i: usize| -> Result<u32> {
        u32::try_from(r.get::<i64>(i)?).map_err(|e| StoreError::Invalid(e.to_string()))
    };
    conn.query_row(
        "SELECT
           (SELECT COUNT(*) FROM (SELECT 1 FROM sends
            WHERE address = ?1 AND automatic = 1 AND at >= ?2 LIMIT ?3) AS automatic_hour),
           (SELECT COUNT(*) FROM (SELECT 1 FROM sends
            WHERE address = ?1 AND automatic = 1 AND at >= ?4 LIMIT ?5) AS automatic_day),
           (SELECT COUNT(*) FROM (SELECT 1 FROM sends
            WHERE ticket_id = ?6 AND address = ?1 AND automatic = 0 AND at >= ?2 LIMIT ?7) AS resends),
           (SELECT COUNT(*) FROM (SELECT 1 FROM sends
            WHERE address = ?8 AND automatic = 2 AND at >= ?2 LIMIT ?9) AS copies)",
        args![
            address,
            now - 3600,
            caps.automatic_last_hour,
            now - 86_400,
            caps.automatic_last_day,
            ticket_id,
            caps.resends_on_ticket_last_hour,
            sender,
            sender_cap
        ],
        |r| {
            Ok((
                crate::decide::SentCounts {
                    automatic_last_hour: count(r, 0)?,
                    automatic_last_day: count(r, 1)?,
                    resends_on_ticket_last_hour: count(r, 2)?,
                },
                count(r, 3)?,
            ))
        },
    )
}

/// How long a `sends` row counts: the longest cap window, a day.
const SENDS_KEPT_SECONDS: i64 = 86_400;

/// Forget at most `limit` of the oldest `sends` rows, once no cap counts
/// them. Rows are appended as time goes, so the oldest lead the rowid
/// order: one look at the first row, then a range of rowids, never a scan.
/// Returns how many were deleted.
pub fn prune_sends(conn: &Db, now: i64, limit: i64) -> Result<usize> {
    let cutoff = now - SENDS_KEPT_SECONDS;
    let first: Option<(i64, i64)> = conn.query_opt(
        "SELECT rowid, at FROM sends ORDER BY rowid LIMIT 1",
        &[],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    match first {
        Some((first, at)) if at < cutoff => Ok(conn.exec(
            "DELETE FROM sends WHERE rowid >= ?1 AND rowid < ?2 AND at < ?3",
            args![first, first + limit, cutoff],
        )? as usize),
        _ => Ok(0),
    }
}

/// Note that `agent` was sent the "reply to the CRM only" notice on this
/// ticket on `day` (Unix days); `true` when it is the first that day, so
/// an agent who keeps replying to all is told once a day, not per message.
///
/// # Errors
/// A database error.
pub fn first_reply_all_notice(conn: &Db, ticket_id: i64, agent: &str, day: i64) -> Result<bool> {
    Ok(conn.exec(
        "INSERT INTO reply_all_notices (ticket_id, agent, day) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        args![ticket_id, agent, &day.to_string()],
    )? > 0)
}

/// Count one capped message to `address`.
pub fn record_send(
    conn: &Db,
    address: &str,
    ticket_id: i64,
    automatic: bool,
    sender: Option<&str>,
    now: i64,
) -> Result<()> {
    // A copy that a sender's mail caused is counted again under the
    // sender's address (`automatic` = 2), for the cap of copies per
    // sender: beside that address's other rows in `sends_address`, where
    // an index of its own by sender was one more B-tree written at a
    // random place for every copy. One statement either way.
    let sql = if sender.is_some() {
        "INSERT INTO sends (address, ticket_id, automatic, at, sender)
         VALUES (?1, ?2, ?3, ?4, ?5), (?5, ?2, 2, ?4, NULL)"
    } else {
        "INSERT INTO sends (address, ticket_id, automatic, at, sender) VALUES (?1, ?2, ?3, ?4, ?5)"
    };
    conn.exec(sql, args![address, ticket_id, automatic, now, sender])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::testing::TestLog as Log;

    impl Log {
        /// A ticket with one requester and nothing else.
        fn ticket(&self, subject: &str) -> i64 {
            let new = NewTicket {
                subject: subject.into(),
                requesters: vec![Mailbox::new(Some("Alice"), "alice@example.org")],
                watch_list: Vec::new(),
                work_notes_list: Vec::new(),
                owner: None,
            };
            create(&self.conn, &new, TicketState::New, "TKT", 7, 100)
                .unwrap()
                .0
        }

        fn entry(&self, ticket_id: i64, e: EntryRow<'_>) -> i64 {
            insert_entry(&self.conn, &EntryRow { ticket_id, ..e }).unwrap()
        }
    }

    fn comment<'a>(from: &'a Mailbox, body: &'a str, at: i64) -> EntryRow<'a> {
        EntryRow {
            ticket_id: 0,
            kind: EntryKind::Comment,
            from,
            at,
            subject: "Printer",
            body,
            html: None,
            message_id: None,
            by_agent: false,
            sender: None,
            body_hash: None,
            raw_id: None,
            raw: None,
        }
    }

    #[test]
    fn a_new_ticket_is_numbered_from_its_row_and_its_people_are_on_their_lists() {
        for db in Log::all() {
            let first = db.ticket("First");
            let new = NewTicket {
                subject: "Printer".into(),
                requesters: vec![Mailbox::new(Some("Alice"), "alice@example.org")],
                watch_list: vec![Mailbox::new(None, "bob@example.org")],
                work_notes_list: vec!["agent@crm.test".into()],
                owner: Some("agent@crm.test".into()),
            };
            let created =
                create_and_view(&db.conn, &new, TicketState::Open, "TKT", 7, 200).unwrap();
            let (id, number) = (created.id, created.number.clone());
            assert_eq!(number, "TKT0000002");
            assert_ne!(id, first);

            let ticket = view(&db.conn, id).unwrap();
            assert_eq!(
                created, ticket,
                "the view written is the view read ({})",
                db.engine
            );
            assert_eq!(ticket.number, "TKT0000002");
            assert_eq!(ticket.subject, "Printer");
            assert_eq!(ticket.state, TicketState::Open);
            assert_eq!(ticket.owner.as_deref(), Some("agent@crm.test"));
            assert_eq!(ticket.requesters, new.requesters);
            assert_eq!(ticket.watch_list, new.watch_list);
            // The owner is on the work-notes list once, however often named.
            assert_eq!(ticket.work_notes_list, ["agent@crm.test"]);
            assert!(ticket.thread.is_empty());

            assert_eq!(find_by_number(&db.conn, "TKT0000002").unwrap(), Some(id));
            assert_eq!(require(&db.conn, "tkt0000002").unwrap(), id, "any case");
            assert_eq!(find_by_number(&db.conn, "TKT0000009").unwrap(), None);
            let missing = require(&db.conn, "TKT0000009").unwrap_err();
            assert!(matches!(&missing, StoreError::NotFound(why) if why == "no ticket TKT0000009"));
            assert!(matches!(view(&db.conn, 99), Err(StoreError::NotFound(_))));
            assert!(matches!(
                subject(&db.conn, 99),
                Err(StoreError::NotFound(_))
            ));
        }
    }

    #[test]
    fn lists_change_one_address_at_a_time_and_say_whether_they_changed() {
        for db in Log::all() {
            let id = db.ticket("Printer");
            let carol = Mailbox::new(Some("Carol"), "carol@example.org");
            assert!(add_participant(&db.conn, id, Role::Watch, &carol, 110).unwrap());
            assert!(!add_participant(&db.conn, id, Role::Watch, &carol, 120).unwrap());
            // The same address may stand on another list.
            assert!(add_participant(&db.conn, id, Role::Requester, &carol, 130).unwrap());
            let ticket = view(&db.conn, id).unwrap();
            assert_eq!(ticket.watch_list, std::slice::from_ref(&carol));
            assert_eq!(ticket.requesters.len(), 2);

            assert!(remove_participant(&db.conn, id, Role::Watch, "carol@example.org").unwrap());
            assert!(!remove_participant(&db.conn, id, Role::Watch, "carol@example.org").unwrap());
            let info = info(&db.conn, id).unwrap();
            assert!(info.watch_list.is_empty());
            assert_eq!(info.requesters, ["alice@example.org", "carol@example.org"]);
        }
    }

    #[test]
    fn state_owner_and_time_of_a_ticket_change_in_place() {
        for db in Log::all() {
            let id = db.ticket("Printer");
            set_state(&db.conn, id, TicketState::Resolved, 3_600).unwrap();
            set_owner(&db.conn, id, Some("agent@crm.test"), 7_200).unwrap();
            let ticket = view(&db.conn, id).unwrap();
            assert_eq!(ticket.state, TicketState::Resolved);
            assert_eq!(ticket.owner.as_deref(), Some("agent@crm.test"));
            touch(&db.conn, id, 86_400).unwrap();
            let info = info(&db.conn, id).unwrap();
            assert_eq!(info.state, "resolved");
            assert_eq!(info.created_at, "1970-01-01T00:01:40Z");
            assert_eq!(info.updated_at, "1970-01-02T00:00:00Z");
            set_owner(&db.conn, id, None, 90_000).unwrap();
            assert_eq!(view(&db.conn, id).unwrap().owner, None);
            assert_eq!(subject(&db.conn, id).unwrap(), "Printer");
            // The resolution's time stays through later changes, goes with a
            // reopening, and is the last one's after a second resolution.
            assert_eq!(
                view(&db.conn, id).unwrap().resolved_at,
                Some(3_600),
                "{}",
                db.engine
            );
            set_state(&db.conn, id, TicketState::Open, 100_000).unwrap();
            assert_eq!(view(&db.conn, id).unwrap().resolved_at, None);
            set_state(&db.conn, id, TicketState::Resolved, 200_000).unwrap();
            assert_eq!(view(&db.conn, id).unwrap().resolved_at, Some(200_000));
        }
    }

    #[test]
    fn tickets_resolved_before_the_migration_count_from_their_last_change() {
        // The migration that adds `tickets.resolved_at` is the eighth.
        const RESOLVED_AT: usize = 8;
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        let migrations = crate::store::migrations();
        migrations.to_version(&mut conn, RESOLVED_AT - 1).unwrap();
        conn.execute_batch(
            "INSERT INTO tickets (id, number, subject, state, created_at, updated_at) VALUES
                 (1, 'TKT1', 'a', 'resolved', 10, 500),
                 (2, 'TKT2', 'b', 'open', 10, 600);",
        )
        .unwrap();
        migrations.to_version(&mut conn, RESOLVED_AT).unwrap();
        let conn = Db::Sqlite(conn);
        assert_eq!(view(&conn, 1).unwrap().resolved_at, Some(500));
        assert_eq!(view(&conn, 2).unwrap().resolved_at, None);
    }

    #[test]
    fn tickets_are_listed_in_order_and_by_state() {
        for db in Log::all() {
            let a = db.ticket("A");
            db.ticket("B");
            set_state(&db.conn, a, TicketState::Resolved, 300).unwrap();
            let all = list(&db.conn, None).unwrap();
            let numbers: Vec<&str> = all.iter().map(|t| t.number.as_str()).collect();
            assert_eq!(numbers, ["TKT0000001", "TKT0000002"]);
            assert_eq!(all[0].requesters, ["alice@example.org"]);
            let resolved = list(&db.conn, Some(TicketState::Resolved)).unwrap();
            assert_eq!(resolved.len(), 1);
            assert_eq!(
                (resolved[0].subject.as_str(), resolved[0].state.as_str()),
                ("A", "resolved")
            );
            assert!(list(&db.conn, Some(TicketState::Open)).unwrap().is_empty());
        }
    }

    #[test]
    fn threading_finds_a_ticket_by_any_of_its_message_ids_and_keeps_the_first_and_the_last() {
        for db in Log::all() {
            let id = db.ticket("Printer");
            let other = db.ticket("Other");
            // An agent's own Message-ID first: the first one kept is the
            // first that is not an agent's.
            insert_thread_id(&db.conn, "<agent-0@x>", id, true, false, 100).unwrap();
            insert_thread_id(&db.conn, "<first@x>", id, false, false, 100).unwrap();
            // One of our copies' Message-IDs (ticket 1 is TKT0000001).
            let ours = crate::thread::own_message_id("TKT0000001", "crm.example.com");
            insert_thread_id(&db.conn, &ours, id, false, true, 150).unwrap();
            for i in 0..40 {
                insert_thread_id(
                    &db.conn,
                    &format!("<m{i}@x>"),
                    id,
                    i % 2 == 0,
                    false,
                    100 + i,
                )
                .unwrap();
            }
            insert_thread_id(&db.conn, "<elsewhere@x>", other, false, false, 200).unwrap();

            assert_eq!(
                find_by_message_id(&db.conn, "<first@x>", None).unwrap(),
                Some(id)
            );
            assert_eq!(
                find_by_message_id(&db.conn, "<elsewhere@x>", None).unwrap(),
                Some(other)
            );
            assert_eq!(
                find_by_message_id(&db.conn, "<unknown@x>", None).unwrap(),
                None
            );

            // Our own copies' Message-IDs: found through the ticket they
            // name, and only when that ticket has them.
            let number = |id: &str| crate::thread::own_message_id_number(id, "TKT");
            assert_eq!(
                find_by_message_id(&db.conn, &ours, number(&ours).as_deref()).unwrap(),
                Some(id)
            );
            let made_up = crate::thread::own_message_id("TKT0000001", "crm.example.com");
            assert_eq!(
                find_by_message_id(&db.conn, &made_up, number(&made_up).as_deref()).unwrap(),
                None,
                "an unknown ID of our shape threads nowhere"
            );
            let moved = ours.replacen("TKT0000001", "TKT0000002", 1);
            assert_eq!(
                find_by_message_id(&db.conn, &moved, number(&moved).as_deref()).unwrap(),
                None,
                "nor on the ticket its number names when that ticket lacks it"
            );
            let unknown_ticket = ours.replacen("TKT0000001", "TKT0000099", 1);
            assert_eq!(
                find_by_message_id(
                    &db.conn,
                    &unknown_ticket,
                    number(&unknown_ticket).as_deref()
                )
                .unwrap(),
                None
            );
            // An inbound message of that shape (another crmgate's copy, or
            // ours come back) is in the index like any other.
            let foreign = crate::thread::own_message_id("TKT0000001", "other.example");
            insert_thread_id(&db.conn, &foreign, other, false, false, 210).unwrap();
            assert_eq!(
                find_by_message_id(&db.conn, &foreign, number(&foreign).as_deref()).unwrap(),
                Some(other)
            );

            let refs = thread_refs(&db.conn, id).unwrap();
            assert_eq!(refs.len(), THREAD_TAIL as usize + 1);
            assert_eq!(
                refs[0],
                ThreadRef {
                    message_id: "<first@x>".into(),
                    agent_inbound: false
                }
            );
            assert_eq!(refs[1].message_id, "<m10@x>");
            assert_eq!(refs.last().unwrap().message_id, "<m39@x>");
            assert!(refs.last().unwrap().agent_inbound == (39 % 2 == 0));
            assert_eq!(view(&db.conn, id).unwrap().thread, refs);
        }
    }

    #[test]
    fn a_message_seen_before_is_found_by_its_message_id_or_within_a_day_by_its_text() {
        for db in Log::all() {
            let id = db.ticket("Printer");
            let alice = Mailbox::new(None, "alice@example.org");
            let raw = insert_raw(&db.conn, 1_000, None, None, &[], b"raw").unwrap();
            let with_id = db.entry(
                id,
                EntryRow {
                    message_id: Some("<a@x>"),
                    sender: Some("alice@example.org"),
                    body_hash: Some("h1"),
                    raw_id: Some(raw),
                    raw: None,
                    ..comment(&alice, "Hello", 1_000)
                },
            );
            // Its Message-ID on the ticket, as `apply` keeps it with the entry.
            insert_thread_id(&db.conn, "<a@x>", id, false, false, 1_000).unwrap();
            let without_id = db.entry(
                id,
                EntryRow {
                    sender: Some("alice@example.org"),
                    body_hash: Some("h2"),
                    raw_id: Some(raw),
                    raw: None,
                    ..comment(&alice, "Hello again", 1_000)
                },
            );
            let found = |mid: Option<&str>, sender: &str, hash: &str, now: i64| {
                duplicate_of(&db.conn, sender, mid, "Printer", hash, now).unwrap()
            };
            assert_eq!(
                found(Some("<a@x>"), "alice@example.org", "h1", 1_000_000),
                Some(with_id)
            );
            assert_eq!(
                found(Some("<a@x>"), "alice@example.org", "other", 1_000),
                None,
                "another body"
            );
            assert_eq!(
                found(Some("<a@x>"), "mallory@example.org", "h1", 1_000),
                None,
                "another sender"
            );
            assert_eq!(
                found(None, "alice@example.org", "h2", 1_000 + 86_400),
                Some(without_id)
            );
            assert_eq!(
                found(None, "alice@example.org", "h2", 1_001 + 86_400),
                None,
                "a day later"
            );
            assert_eq!(
                duplicate_of(&db.conn, "alice@example.org", None, "Other", "h2", 1_000).unwrap(),
                None,
                "another subject"
            );

            count_duplicate(&db.conn, with_id).unwrap();
            count_duplicate(&db.conn, with_id).unwrap();
            let info = info(&db.conn, id).unwrap();
            assert_eq!(info.entries[0].duplicates, 2);
            assert_eq!(info.entries[0].message_id.as_deref(), Some("<a@x>"));
            assert_eq!(info.entries[1].duplicates, 0);
        }
    }

    #[test]
    fn two_instances_logging_the_same_message_at_once_log_it_once() {
        let Some(location) = crate::store::test_location() else {
            return;
        };
        let open = || crate::store::connect(&location, crate::store::Durability::Full).unwrap();
        let (mut a, mut b) = (open(), open());
        let new = NewTicket {
            subject: "Printer".into(),
            requesters: vec![Mailbox::new(None, "alice@example.org")],
            watch_list: Vec::new(),
            work_notes_list: Vec::new(),
            owner: None,
        };
        let ticket = create(&a, &new, TicketState::New, "TKT", 7, 100).unwrap().0;
        let alice: &'static Mailbox = Box::leak(Box::new(Mailbox::new(None, "alice@example.org")));
        let entry = move |message_id| EntryRow {
            ticket_id: ticket,
            message_id,
            sender: Some("alice@example.org"),
            body_hash: Some("h"),
            ..comment(alice, "Hello", 1_000)
        };

        // With a Message-ID: the unique key. B's insert waits for A's
        // transaction, then finds the entry there.
        let tx = a.transaction().unwrap();
        let first = insert_entry(&tx, &entry(Some("<same@x>"))).unwrap();
        let waiting = std::thread::spawn(move || {
            let tx = b.transaction().unwrap();
            let second = insert_entry(&tx, &entry(Some("<same@x>")));
            drop(tx);
            (b, matches!(second, Err(StoreError::AlreadyLogged)))
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        tx.commit().unwrap();
        let (mut b, already) = waiting.join().unwrap();
        assert!(already, "the second instance's entry is refused");

        // Without one: the duplicate key held until commit, so B's check
        // runs after A's entry is there.
        let tx = a.transaction().unwrap();
        hold_duplicate_key(&tx, "alice@example.org", "h2").unwrap();
        assert_eq!(
            duplicate_of(&tx, "alice@example.org", None, "Printer", "h2", 1_000).unwrap(),
            None
        );
        let raw = insert_raw(&tx, 1_000, None, None, &[], b"raw").unwrap();
        let kept = insert_entry(
            &tx,
            &EntryRow {
                body_hash: Some("h2"),
                raw_id: Some(raw),
                raw: None,
                ..entry(None)
            },
        )
        .unwrap();
        let waiting = std::thread::spawn(move || {
            let tx = b.transaction().unwrap();
            hold_duplicate_key(&tx, "alice@example.org", "h2").unwrap();
            duplicate_of(&tx, "alice@example.org", None, "Printer", "h2", 1_000).unwrap()
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        tx.commit().unwrap();
        assert_eq!(waiting.join().unwrap(), Some(kept));
        assert_ne!(first, kept);
    }

    #[test]
    fn tickets_created_at_once_by_two_instances_get_two_numbers() {
        let Some(location) = crate::store::test_location() else {
            return;
        };
        let new = NewTicket {
            subject: "Printer".into(),
            requesters: vec![Mailbox::new(None, "alice@example.org")],
            watch_list: Vec::new(),
            work_notes_list: Vec::new(),
            owner: None,
        };
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let mut db =
                    crate::store::connect(&location, crate::store::Durability::Full).unwrap();
                let new = new.clone();
                std::thread::spawn(move || {
                    let mut numbers = Vec::new();
                    for _ in 0..20 {
                        let tx = db.transaction().unwrap();
                        numbers.push(create(&tx, &new, TicketState::New, "TKT", 7, 1).unwrap().1);
                        tx.commit().unwrap();
                    }
                    numbers
                })
            })
            .collect();
        let mut all: Vec<String> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 40, "{all:?}");
    }

    #[test]
    fn a_text_at_the_start_of_the_raw_body_is_found_and_read_back_exactly() {
        let raw =
            b"Subject: x\r\nFrom: a@x\r\n\r\nLine one\r\n\r\nLine two \xc3\xa9\r\n> quoted\r\n";
        let whole = "Line one\n\nLine two \u{e9}\n> quoted\n";
        let (at, len) = text_in_raw(raw, whole).unwrap();
        assert_eq!((at, len), (25, raw.len() - 25));
        assert_eq!(text_from_raw(&raw[at..at + len]).unwrap(), whole);
        // The words above a reply's marker: the first bytes of the body.
        let (at, len) = text_in_raw(raw, "Line one\n").unwrap();
        assert_eq!(text_from_raw(&raw[at..at + len]).unwrap(), "Line one\n");
        // Anything else is stored: another text, a CR of its own, a body
        // with bare LFs, a text longer than the body.
        assert_eq!(text_in_raw(raw, "Line two"), None);
        assert_eq!(text_in_raw(raw, "Line one\r\n"), None);
        assert_eq!(text_in_raw(b"Subject: x\n\nLine one\n", "Line one\n"), None);
        assert_eq!(text_in_raw(raw, &format!("{whole}more")), None);
        assert_eq!(text_in_raw(b"no header end", "no"), None);
    }

    #[test]
    fn an_entry_whose_text_is_its_raw_body_stores_it_once_and_shows_it_whole() {
        for db in Log::all() {
            let ticket = db.ticket("Imprimante");
            let raw = b"Subject: x\r\n\r\nElle ne marche plus.\r\nMerci\r\n";
            let raw_id = insert_raw(&db.conn, 1, None, Some("a@x"), &[], raw).unwrap();
            let alice = Mailbox::new(None, "a@x");
            let from_raw = |body| EntryRow {
                raw_id: Some(raw_id),
                raw: Some(&raw[..]),
                ..comment(&alice, body, 1)
            };
            let once = db.entry(ticket, from_raw("Elle ne marche plus.\nMerci\n"));
            let twice = db.entry(ticket, from_raw("Autre texte.\n"));
            let stored = |id: i64| -> (String, Option<i64>) {
                db.conn
                    .query_opt(
                        "SELECT body, raw_body_len FROM entries WHERE id = ?1",
                        args![id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .unwrap()
                    .unwrap()
            };
            assert_eq!(stored(once), (String::new(), Some(29)), "{}", db.engine);
            assert_eq!(
                stored(twice),
                ("Autre texte.\n".to_string(), None),
                "{}",
                db.engine
            );
            let shown = info(&db.conn, ticket).unwrap();
            let bodies: Vec<&str> = shown.entries.iter().map(|e| e.body.as_str()).collect();
            assert_eq!(
                bodies,
                ["Elle ne marche plus.\nMerci\n", "Autre texte.\n"],
                "{}",
                db.engine
            );
            assert_eq!(
                crate::store::outbox::entry_body(&db.conn, once).unwrap(),
                ("Elle ne marche plus.\nMerci\n".to_string(), None),
                "{}",
                db.engine
            );
        }
    }

    proptest::proptest! {
        /// Line ends turned in pieces, wherever the pieces end (a CRLF cut
        /// in two, a CR alone at the end), give what the bytes whole give.
        #[test]
        fn line_ends_turned_in_pieces_are_those_of_the_whole(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(b'\r'),
                    proptest::strategy::Just(b'\n'),
                    proptest::strategy::Just(b'a'),
                ],
                0..40,
            ),
            cuts in proptest::collection::vec(0usize..40, 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= bytes.len()).collect();
            cuts.sort_unstable();
            let mut pieces = LineEnds::with_capacity(bytes.len());
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                pieces.push(&bytes[from..cut]);
                from = cut;
            }
            let whole = String::from_utf8(bytes.clone()).unwrap().replace("\r\n", "\n");
            proptest::prop_assert_eq!(pieces.finish().unwrap(), whole);
        }
    }

    #[test]
    fn a_long_text_in_its_raw_message_is_read_back_whole_for_a_copy() {
        for db in Log::all() {
            let ticket = db.ticket("Imprimante");
            // Over the pieces it is read in, with a CRLF across each cut.
            let line = "Le journal de l'imprimante : bourrage papier, bac 2.\r\n";
            let body = line.repeat(3 * 64 * 1024 / line.len() + 1);
            let raw = format!("Subject: x\r\n\r\n{body}");
            let text = body.replace("\r\n", "\n");
            let raw_id = insert_raw(&db.conn, 1, None, Some("a@x"), &[], raw.as_bytes()).unwrap();
            let alice = Mailbox::new(None, "a@x");
            let entry = db.entry(
                ticket,
                EntryRow {
                    raw_id: Some(raw_id),
                    raw: Some(raw.as_bytes()),
                    ..comment(&alice, &text, 1)
                },
            );
            let in_raw: Option<i64> = db
                .conn
                .query_row(
                    "SELECT raw_body_len FROM entries WHERE id = ?1",
                    args![entry],
                    |r| r.get(0),
                )
                .unwrap();
            assert!(
                in_raw.is_some_and(|len| len > BLOB_IN_PLACE as i64),
                "{}: {in_raw:?}",
                db.engine
            );
            let (read, html) = crate::store::outbox::entry_body(&db.conn, entry).unwrap();
            assert!(
                read == text,
                "{}: {} bytes for {}",
                db.engine,
                read.len(),
                text.len()
            );
            assert_eq!(html, None, "{}", db.engine);
        }
    }

    #[test]
    fn long_bodies_attachments_and_raw_messages_come_back_whole() {
        for db in Log::all() {
            let id = db.ticket("Printer");
            let alice = Mailbox::new(Some("Alice"), "alice@example.org");
            let long = "a log line\n".repeat(2 * BLOB_IN_PLACE / 11);
            assert!(long.len() > BLOB_IN_PLACE);
            let short_id = db.entry(id, comment(&alice, "short", 100));
            let long_id = db.entry(id, comment(&alice, &long, 101));
            let big = Attachment {
                filename: "dump.bin".into(),
                content_type: "application/octet-stream".into(),
                data: (0..3 * BLOB_IN_PLACE).map(|i| (i % 251) as u8).collect(),
                inline: false,
            };
            let small = Attachment {
                filename: "note.txt".into(),
                content_type: "text/plain".into(),
                data: b"hi".to_vec(),
                inline: false,
            };
            insert_attachment(&db.conn, long_id, &big).unwrap();
            insert_attachment(&db.conn, long_id, &small).unwrap();

            let info = info(&db.conn, id).unwrap();
            let ids: Vec<i64> = info.entries.iter().map(|e| e.id).collect();
            assert_eq!(ids, [short_id, long_id]);
            assert_eq!(info.entries[0].body, "short");
            assert_eq!(info.entries[1].body, long);
            assert_eq!(info.entries[1].kind, "comment");
            assert_eq!(info.entries[1].from, "alice@example.org");
            let listed: Vec<(&str, &str, i64)> = info.entries[1]
                .attachments
                .iter()
                .map(|a| (a.filename.as_str(), a.content_type.as_str(), a.size))
                .collect();
            assert_eq!(
                listed,
                [
                    (
                        "dump.bin",
                        "application/octet-stream",
                        big.data.len() as i64
                    ),
                    ("note.txt", "text/plain", 2)
                ]
            );
            let stored: Vec<u8> = db
                .conn
                .query_row(
                    "SELECT content FROM attachments WHERE filename = 'dump.bin'",
                    &[],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(stored, big.data);

            let rcpt = ["support@crm.test".to_string()];
            let raw = big.data.clone();
            let raw_id =
                insert_raw(&db.conn, 5, Some("192.0.2.1"), Some("a@x"), &rcpt, &raw).unwrap();
            let (data, rcpt_to): (Vec<u8>, String) = db
                .conn
                .query_row(
                    "SELECT data, rcpt_to FROM raw_messages WHERE id = ?1",
                    args![raw_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!(data, raw);
            assert_eq!(rcpt_to, r#"["support@crm.test"]"#);
        }
    }

    #[test]
    fn a_system_entry_is_crmgates_own_note_on_the_ticket() {
        for db in Log::all() {
            let id = db.ticket("Printer");
            let system = Mailbox::new(Some("Support"), "support@crm.test");
            insert_system_entry(&db.conn, id, &system, "Printer", "cap reached", 300).unwrap();
            let info = info(&db.conn, id).unwrap();
            assert_eq!(info.entries.len(), 1);
            let e = &info.entries[0];
            assert_eq!(
                (e.kind.as_str(), e.from.as_str()),
                ("system", "support@crm.test")
            );
            assert_eq!(
                (e.subject.as_str(), e.body.as_str()),
                ("Printer", "cap reached")
            );
            assert_eq!(e.at, "1970-01-01T00:05:00Z");
        }
    }

    #[test]
    fn agents_no_longer_configured_leave_every_work_notes_list_and_ownership() {
        for db in Log::all() {
            let agent = |email: &str| crate::config::Agent {
                name: email.to_uppercase(),
                email: email.into(),
                default_notes_list: false,
            };
            let both = [agent("ann@crm.test"), agent("bert@crm.test")];
            assert!(sync_agents(&db.conn, &both, 10).unwrap().is_empty());
            let id = db.ticket("Printer");
            for a in &both {
                add_participant(&db.conn, id, Role::Notes, &Mailbox::new(None, &a.email), 20)
                    .unwrap();
            }
            set_owner(&db.conn, id, Some("bert@crm.test"), 20).unwrap();

            let removed = sync_agents(&db.conn, &both[..1], 30).unwrap();
            assert_eq!(removed, ["bert@crm.test"]);
            let ticket = view(&db.conn, id).unwrap();
            assert_eq!(ticket.work_notes_list, ["ann@crm.test"]);
            assert_eq!(ticket.owner, None);
            assert_eq!(
                former_agents(&db.conn).unwrap(),
                BTreeSet::from(["bert@crm.test".to_string()])
            );
            assert!(
                sync_agents(&db.conn, &both[..1], 40).unwrap().is_empty(),
                "removed once"
            );

            // Configured again: no longer a former agent.
            assert!(sync_agents(&db.conn, &both, 50).unwrap().is_empty());
            assert!(former_agents(&db.conn).unwrap().is_empty());
        }
    }

    #[test]
    fn quarantined_mail_is_listed_oldest_first() {
        for db in Log::all() {
            let raw = insert_raw(&db.conn, 60, None, None, &[], b"x").unwrap();
            let first = insert_quarantine(&db.conn, 60, "unparseable", None, None, None, Some(raw))
                .unwrap();
            let second = insert_quarantine(
                &db.conn,
                120,
                "no_ticket",
                Some("a@example.org"),
                Some("Hello"),
                Some("<q@x>"),
                None,
            )
            .unwrap();
            let rows = quarantine_list(&db.conn).unwrap();
            assert_eq!(
                rows.iter().map(|q| q.id).collect::<Vec<_>>(),
                [first, second]
            );
            assert_eq!(rows[0].reason, "unparseable");
            assert_eq!(rows[0].sender, None);
            assert_eq!(rows[1].at, "1970-01-01T00:02:00Z");
            assert_eq!(
                (
                    rows[1].sender.as_deref(),
                    rows[1].subject.as_deref(),
                    rows[1].message_id.as_deref()
                ),
                (Some("a@example.org"), Some("Hello"), Some("<q@x>"))
            );
        }
    }

    #[test]
    fn a_quarantined_message_comes_back_with_its_envelope_until_released() {
        for db in Log::all() {
            let rcpt = ["support@crm.test".to_string(), "other@crm.test".to_string()];
            let raw = insert_raw(
                &db.conn,
                60,
                Some("192.0.2.7"),
                Some("a@x"),
                &rcpt,
                b"raw\r\n",
            )
            .unwrap();
            let kept = insert_quarantine(
                &db.conn,
                60,
                "refused",
                Some("a@x"),
                Some("Hi"),
                None,
                Some(raw),
            )
            .unwrap();
            let bare =
                insert_quarantine(&db.conn, 61, "unparseable", None, None, None, None).unwrap();

            let m = quarantined(&db.conn, kept).unwrap().unwrap();
            assert_eq!((m.info.id, m.info.reason.as_str()), (kept, "refused"));
            assert_eq!(m.info.subject.as_deref(), Some("Hi"));
            assert_eq!(
                (m.peer.as_deref(), m.mail_from.as_deref()),
                (Some("192.0.2.7"), Some("a@x"))
            );
            assert_eq!(m.rcpt_to, rcpt);
            assert_eq!(m.data, b"raw\r\n");
            assert!(
                quarantined(&db.conn, bare).unwrap().is_none(),
                "no raw message kept"
            );
            assert!(quarantined(&db.conn, 999).unwrap().is_none());

            assert!(remove_quarantined(&db.conn, kept).unwrap());
            assert!(!remove_quarantined(&db.conn, kept).unwrap());
            assert!(quarantined(&db.conn, kept).unwrap().is_none());
            let left: Vec<i64> = quarantine_list(&db.conn)
                .unwrap()
                .iter()
                .map(|q| q.id)
                .collect();
            assert_eq!(left, [bare]);
        }
    }

    #[test]
    fn an_outbox_row_names_its_ticket_for_the_bounce_that_comes_back() {
        for db in Log::all() {
            let id = db.ticket("Printer");
            let recipients = ["alice@example.org".to_string()];
            let kind = OutboxKind::Send(crate::helpdesk::SendKind::PublicCopy);
            let row = insert_outbox(
                &db.conn,
                Some(id),
                None,
                kind,
                &recipients,
                "<o@x>",
                b"m",
                500,
            )
            .unwrap();
            let big = vec![b'x'; 2 * BLOB_IN_PLACE];
            let orphan = insert_outbox(
                &db.conn,
                None,
                None,
                OutboxKind::Postmaster,
                &recipients,
                "<p@x>",
                &big,
                500,
            )
            .unwrap();
            assert_eq!(find_by_outbox_id(&db.conn, row).unwrap(), Some(id));
            assert_eq!(
                find_by_outbox_id(&db.conn, orphan).unwrap(),
                None,
                "no ticket's"
            );
            assert_eq!(find_by_outbox_id(&db.conn, 999).unwrap(), None);

            let stored = crate::store::outbox::get(&db.conn, row).unwrap();
            assert_eq!(stored.kind, "public_copy");
            assert_eq!(stored.recipients, recipients);
            assert_eq!((stored.next_attempt_at, stored.created_at), (500, 500));
            let stored = crate::store::outbox::get(&db.conn, orphan).unwrap();
            assert_eq!(stored.kind, "postmaster");
            assert_eq!(stored.message, big, "written in place, whole");
        }
    }

    #[test]
    fn the_cap_counts_stop_at_the_cap_and_look_back_an_hour_or_a_day() {
        for db in Log::all() {
            let now = 100_000;
            let caps = crate::decide::SentCounts {
                automatic_last_hour: 3,
                automatic_last_day: 50,
                resends_on_ticket_last_hour: 2,
            };
            for i in 0..5 {
                record_send(&db.conn, "a@x", 1, true, None, now - 60 * i).unwrap();
            }
            record_send(&db.conn, "a@x", 1, true, None, now - 7_200).unwrap();
            record_send(&db.conn, "a@x", 1, true, None, now - 90_000).unwrap();
            record_send(&db.conn, "a@x", 1, false, None, now - 10).unwrap();
            record_send(&db.conn, "a@x", 2, false, None, now - 10).unwrap();
            record_send(&db.conn, "a@x", 2, false, None, now - 20).unwrap();
            record_send(&db.conn, "a@x", 2, false, None, now - 30).unwrap();
            record_send(&db.conn, "b@x", 1, true, None, now).unwrap();
            for (ticket, at) in [
                (1, now - 10),
                (2, now - 20),
                (3, now - 30),
                (3, now - 4_000),
            ] {
                record_send(&db.conn, "ann@crm.test", ticket, false, Some("s@x"), at).unwrap();
            }

            let (counts, copies) = sent_counts(&db.conn, "a@x", 1, caps, None, now).unwrap();
            assert_eq!(copies, 0, "no sender, nothing counted");
            assert_eq!(
                counts,
                crate::decide::SentCounts {
                    automatic_last_hour: 3,
                    automatic_last_day: 6,
                    resends_on_ticket_last_hour: 1,
                }
            );
            assert_eq!(
                sent_counts(&db.conn, "a@x", 2, caps, None, now)
                    .unwrap()
                    .0
                    .resends_on_ticket_last_hour,
                2
            );
            let other = sent_counts(&db.conn, "c@x", 1, caps, None, now).unwrap();
            assert_eq!(other, (crate::decide::SentCounts::default(), 0));
            // A sender's copies of the last hour, to anyone on any ticket,
            // stopped at their cap.
            let copies = |cap| sent_counts(&db.conn, "c@x", 1, caps, Some(("s@x", cap)), now);
            assert_eq!(copies(10).unwrap().1, 3);
            assert_eq!(copies(2).unwrap().1, 2);
            assert_eq!(
                sent_counts(&db.conn, "c@x", 1, caps, Some(("t@x", 10)), now)
                    .unwrap()
                    .1,
                0
            );
            // Counted under the sender's address, they are none of the
            // messages sent to that address.
            assert_eq!(
                sent_counts(&db.conn, "s@x", 3, caps, None, now).unwrap(),
                (crate::decide::SentCounts::default(), 0)
            );
        }
    }

    #[test]
    fn copies_a_sender_caused_before_the_upgrade_still_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crmgate.db");
        let now = 1_000_000;
        {
            // A log from before: the sender in the copy's row only.
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            crate::store::migrations()
                .to_version(&mut conn, 15)
                .unwrap();
            conn.execute(
                "INSERT INTO sends (address, ticket_id, automatic, at, sender)
                 VALUES ('ann@crm.test', 1, 0, ?1, 's@x')",
                [now - 10],
            )
            .unwrap();
        }
        let conn = Db::Sqlite(crate::store::open(&path).unwrap());
        let caps = crate::decide::SentCounts {
            automatic_last_hour: 10,
            automatic_last_day: 10,
            resends_on_ticket_last_hour: 10,
        };
        let count = || sent_counts(&conn, "c@x", 1, caps, Some(("s@x", 10)), now).unwrap();
        assert_eq!(count().1, 1);
        record_send(&conn, "bob@crm.test", 2, false, Some("s@x"), now).unwrap();
        assert_eq!(count().1, 2);
    }

    #[test]
    fn the_reply_all_notice_is_the_first_once_per_agent_ticket_and_day() {
        for db in Log::all() {
            assert!(first_reply_all_notice(&db.conn, 1, "ann@crm.test", 20_000).unwrap());
            assert!(!first_reply_all_notice(&db.conn, 1, "ann@crm.test", 20_000).unwrap());
            assert!(
                first_reply_all_notice(&db.conn, 1, "ann@crm.test", 20_001).unwrap(),
                "next day"
            );
            assert!(
                first_reply_all_notice(&db.conn, 2, "ann@crm.test", 20_000).unwrap(),
                "other ticket"
            );
            assert!(
                first_reply_all_notice(&db.conn, 1, "bert@crm.test", 20_000).unwrap(),
                "other agent"
            );
        }
    }

    #[test]
    fn times_are_shown_in_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
