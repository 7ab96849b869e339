//! Store: the ticket log, in SQLite (the embedded default) or PostgreSQL
//! (`[store] url`: a database several instances share). One set of
//! functions over [`Db`], each query written once for both engines.
//!
//! On SQLite, one database file holds tickets, their entries and lists, the raw
//! messages, the outbox and the quarantine. WAL mode lets the CLI write while
//! the daemon runs; `synchronous=FULL` makes a commit durable, which is what
//! the SMTP `250` promises. In the daemon, one writer thread owns the
//! connection that writes inbound mail and the relay's outcomes, and
//! commits in batches ([`crate::writer::Writer`]), syncing the WAL itself
//! on another thread before it answers; the relay worker reads the outbox,
//! and the CLI writes, on connections of their own.

#![warn(missing_docs)]

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use rusqlite::Connection;
use rusqlite_migration::{Migrations, M};
use tokio_rustls::rustls;

pub mod copy;
pub mod db;
pub mod outbox;
pub mod tickets;

pub use db::{args, in_savepoint, Db, Row, Tx, Value};

/// Why the store could not do what was asked. The callers tell a missing
/// row (`NotFound`: a user's typo, or a row someone else changed first)
/// from a database they cannot trust, which rolls the transaction back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused: the file is locked, full, or corrupt.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused, or cannot be reached.
    #[error("database: {0}")]
    Postgres(#[from] postgres::Error),
    /// The schema could not be brought up to date (or is from a newer
    /// crmgate): nothing may be written to it.
    #[error("database schema: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// The directory of the database file cannot be made.
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        /// The directory, as the operator configured it.
        path: String,
        /// What the file system said.
        source: std::io::Error,
    },
    /// No such ticket or row, or a row no longer in the state an update
    /// expects; the sentence names it, for the user or the log.
    #[error("{0}")]
    NotFound(String),
    /// Another instance logged the same message (same Message-ID, sender
    /// and body) first, in a transaction that has committed since: the
    /// caller processes the message again, as the duplicate it now is.
    #[error("the message was logged by another instance meanwhile")]
    AlreadyLogged,
    /// A value that cannot be stored or was not stored by us (a corrupt
    /// column, a blob larger than SQLite takes).
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// PostgreSQL undid the statement for another transaction's sake: a
    /// deadlock between two instances' batches (40P01), a serialization
    /// failure (40001), or a lock waited for longer than the connection's
    /// bound (55P03, [`Db::wait_for_locks_at_most`]). Nothing is wrong with
    /// the work itself: done again in a new transaction, once the other has
    /// committed, it succeeds.
    pub fn is_transient_conflict(&self) -> bool {
        use postgres::error::SqlState;
        match self {
            StoreError::Postgres(e) => e.code().is_some_and(|code| {
                *code == SqlState::T_R_DEADLOCK_DETECTED
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::LOCK_NOT_AVAILABLE
            }),
            _ => false,
        }
    }
}

/// Every store function answers with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How long a connection waits for another writer before giving up: the CLI
/// and the daemon share the file.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Prepared statements each connection keeps. rusqlite's default (16) is
/// fewer than the writer uses for one message, so the least recently used
/// ones were compiled again for every message.
const STATEMENT_CACHE: usize = 128;

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("schema.sql")),
        // A long entry body (over 64 KiB) is kept here, the row's last
        // column, and `body` left empty: SQLite writes a blob that ends the
        // row in place, where a value in the middle of a row is copied twice
        // while the row is built (50 MB more for a 25 MB text).
        M::up("ALTER TABLE entries ADD COLUMN long_body BLOB;"),
        // The relay reads queued rows in id order: along this index, rather
        // than sorting every queued row at each batch (a backlog of 20,000
        // rows was sorted 80 times to be sent).
        M::up("CREATE INDEX outbox_queued ON outbox (id) WHERE status = 'queued';"),
        // An attachment's bytes are kept once per ticket: later copies (a
        // signature's logo, a file sent back) name the row that holds them.
        // Rows from before have no hash and are not matched.
        M::up(
            "ALTER TABLE attachments ADD COLUMN sha256 TEXT;
             ALTER TABLE attachments ADD COLUMN same_as INTEGER REFERENCES attachments (id);
             CREATE INDEX attachments_sha256 ON attachments (sha256) WHERE sha256 IS NOT NULL;",
        ),
        // Whose non-agent mail a re-sent copy came from: `[auto]
        // max_resends_per_sender_hour` counts them across all tickets.
        M::up(
            "ALTER TABLE sends ADD COLUMN sender TEXT;
             CREATE INDEX sends_sender ON sends (sender, at) WHERE sender IS NOT NULL;",
        ),
        // An outgoing message's bytes, written once when it is queued and
        // never again: its outbox row changes at every attempt (status,
        // attempts, schedule), and SQLite writes a changed row whole, so a
        // 5.6 KB row was written anew, overflow page included, with each
        // outcome.
        M::up(
            "CREATE TABLE outbox_messages (
                 outbox_id INTEGER PRIMARY KEY REFERENCES outbox (id),
                 message   BLOB NOT NULL
             );
             INSERT INTO outbox_messages (outbox_id, message) SELECT id, message FROM outbox;
             ALTER TABLE outbox DROP COLUMN message;",
        ),
        // Indexes nothing reads, each written at a random place for every
        // message (a 4 KiB page in the WAL, and again at the checkpoint,
        // for a few bytes): participants by address (only the removal of
        // an agent from the configuration, at start or reload, looks
        // there: one scan), entries by Message-ID (the duplicate check
        // knows the sender and the body's hash too, and finds the entry
        // along `entries_sender_hash`), tickets by state (`ticket list`
        // reads the tickets in id order).
        M::up(
            "DROP INDEX participants_address;
             DROP INDEX entries_message_id;
             DROP INDEX tickets_state;",
        ),
        // When a ticket was set resolved: SPEC rule 9's `[ticket]
        // reopen_within_days` counts from it; cleared when it reopens.
        // Tickets resolved before the column existed take `updated_at`,
        // the nearest time the store kept (later than the resolution when
        // mail came on the resolved ticket since, so the window errs
        // towards reopening).
        M::up(
            "ALTER TABLE tickets ADD COLUMN resolved_at INTEGER;
             UPDATE tickets SET resolved_at = updated_at WHERE state = 'resolved';",
        ),
        // An outgoing copy is kept as its plan (`compose::plan`), a few
        // hundred bytes composed by the relay when it sends the copy,
        // rather than as the copy's bytes composed at ingest: the message
        // is written once, as its raw bytes and its entry. Rows queued
        // before keep their bytes and are sent from them; a planned row
        // leaves `message` empty.
        M::up("ALTER TABLE outbox_messages ADD COLUMN plan TEXT;"),
        // The text of a plain-text message is the beginning of its raw
        // message's body, which is kept anyway: the entry names those
        // bytes (`tickets::text_in_raw`) rather than holding them a second
        // time. Entries from before keep their text. (PostgreSQL: 002.)
        M::up(
            "ALTER TABLE entries ADD COLUMN raw_body_at INTEGER;
             ALTER TABLE entries ADD COLUMN raw_body_len INTEGER;",
        ),
        // Entries by sender and body are searched only for mail without a
        // Message-ID: mail with one is found along `thread_ids`
        // (`tickets::DUPLICATE_BY_MESSAGE_ID`), so its entry no longer
        // writes this index, at a random place, for every message.
        // (PostgreSQL: 003.)
        M::up(
            "DROP INDEX entries_sender_hash;
             CREATE INDEX entries_sender_hash ON entries (sender, body_hash, at)
                 WHERE message_id IS NULL;",
        ),
        // crmgate's own Message-IDs name their ticket
        // (`thread::own_message_id`): they are found through the ticket's
        // number, unique and sequential, and that ticket's rows, so they
        // leave the index of Message-IDs, where each of these random keys
        // wrote a page of its own for every copy; an outgoing row's
        // Message-ID likewise, through `outbox_ticket`, which grows at its
        // end. Rows from before keep `ours` = 0 and stay in the index.
        // (PostgreSQL: 004.)
        M::up(
            "ALTER TABLE thread_ids ADD COLUMN ours INTEGER NOT NULL DEFAULT 0;
             DROP INDEX thread_ids_message_id;
             CREATE INDEX thread_ids_message_id ON thread_ids (message_id) WHERE ours = 0;
             DROP INDEX outbox_message_id;
             CREATE INDEX outbox_ticket ON outbox (ticket_id, id);",
        ),
        // Fewer B-trees written for each outgoing copy (issue 16: each
        // commit writes whole the last page of every B-tree it touches).
        // A copy's plan, a few hundred bytes, goes in its outbox row, not
        // in a row of `outbox_messages` of its own; rows from before keep
        // theirs. The queued rows have one index, which the relay reads in
        // id order and the worker's wake-up along `next_attempt_at`: a sent
        // row leaves it, where `outbox_due` kept every row, sent ones too,
        // and moved each at its every change of status. Failed rows, which
        // `outbox retry` and `/metrics` look for, have an index of their
        // own that holds only them. (PostgreSQL: 005.)
        M::up(
            "ALTER TABLE outbox ADD COLUMN plan TEXT;
             DROP INDEX outbox_due;
             DROP INDEX outbox_queued;
             CREATE INDEX outbox_queued ON outbox (id, next_attempt_at) WHERE status = 'queued';
             CREATE INDEX outbox_failed ON outbox (id) WHERE status = 'failed';",
        ),
        // The entries that the duplicate check of mail without a
        // Message-ID reads have a sender: a receipt or a system entry,
        // which has none, no longer writes the index. (PostgreSQL: 006.)
        M::up(
            "DROP INDEX entries_sender_hash;
             CREATE INDEX entries_sender_hash ON entries (sender, body_hash, at)
                 WHERE message_id IS NULL AND sender IS NOT NULL;",
        ),
        // One index of `sends` by address serves both counts by address:
        // an address's automatic messages (at most the day's cap of them
        // are kept: only those sent are counted, and a day's rows are
        // pruned), and its re-sends on one ticket, the ticket before the
        // time; where two indexes were written for every copy.
        // (PostgreSQL: 007.)
        M::up(
            "DROP INDEX sends_automatic;
             DROP INDEX sends_ticket;
             CREATE INDEX sends_address ON sends (address, automatic, ticket_id, at);",
        ),
        // The copies one sender's mail caused are counted along
        // `sends_address` too, from a row of their own under the sender's
        // address (`automatic` = 2, `tickets::record_send`), next to that
        // address's other rows, rather than along an index by sender, at
        // a random place for every copy. The rows from before are counted
        // so once more. (PostgreSQL: 008.)
        M::up(
            "INSERT INTO sends (address, ticket_id, automatic, at)
                 SELECT sender, ticket_id, 2, at FROM sends WHERE sender IS NOT NULL;
             DROP INDEX sends_sender;",
        ),
        // An attachment's bytes go in a column of their own at the end of
        // the row: SQLite writes a large value in place from a zeroblob
        // only when nothing follows it in the record, and `sha256`, added
        // after `data`, made it build a record the size of the attachment
        // twice in memory (a 25 MB message's peak). Rows from before keep
        // their bytes in `data`; new ones leave it empty. (PostgreSQL:
        // 009.)
        M::up("ALTER TABLE attachments ADD COLUMN content BLOB;"),
    ])
}

/// Where the ticket log is: `[store] url`.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (the embedded default: `state_dir/crmgate.db`).
    Sqlite(PathBuf),
    /// A PostgreSQL database: the URL as configured, and its password.
    Postgres {
        /// `postgres://user@host:5432/dbname`.
        url: String,
        /// From `[store] password_file`.
        password: Option<String>,
        /// From `[store] ca_file`: trusted for the server's TLS.
        ca_certificates: Vec<rustls::pki_types::CertificateDer<'static>>,
    },
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "{}", path.display()),
            Location::Postgres { url, .. } => f.write_str(url),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl Location {
    /// Where the configuration puts the log.
    pub fn of(config: &crate::config::Config) -> Location {
        match &config.store {
            crate::config::Store::Sqlite => Location::Sqlite(config.database_path()),
            crate::config::Store::Postgres {
                url,
                password,
                ca_certificates,
            } => Location::Postgres {
                url: url.clone(),
                password: password.clone(),
                ca_certificates: ca_certificates.clone(),
            },
        }
    }
}

/// Connect to the log at `location`, creating it and bringing its schema
/// up to date as [`open`] does.
///
/// # Errors
/// The database cannot be reached or created, or its schema is from a
/// newer crmgate.
pub fn connect(location: &Location, durability: Durability) -> Result<Db> {
    match location {
        Location::Sqlite(path) => Ok(Db::Sqlite(open_with(path, durability)?)),
        Location::Postgres { .. } => connect_postgres(location, true),
    }
}

/// A client on the PostgreSQL database at `location`; `migrate`: create or
/// update its schema first (every connection but the health check's).
///
/// # Errors
/// The URL does not parse, the server cannot be reached, or the schema is
/// from a newer crmgate.
pub fn connect_postgres(location: &Location, migrate: bool) -> Result<Db> {
    let Location::Postgres {
        url,
        password,
        ca_certificates,
    } = location
    else {
        return Err(StoreError::Invalid(format!(
            "{location} is not a PostgreSQL URL"
        )));
    };
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e: postgres::Error| StoreError::Invalid(format!("store.url: {e}")))?;
    if let Some(password) = password {
        config.password(password);
    }
    if config.get_application_name().is_none() {
        config.application_name("crmgate");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(BUSY_TIMEOUT);
    }
    let db = Db::Postgres(db::Pg::connect(&config, ca_certificates)?);
    if migrate {
        postgres_migrate(&db)?;
    }
    Ok(db)
}

/// The PostgreSQL schema, one migration a step; `schema_version` counts
/// those applied. A step is only ever appended.
const POSTGRES_MIGRATIONS: &[&str] = &[
    include_str!("postgres/001_schema.sql"),
    include_str!("postgres/002_entry_text_in_raw.sql"),
    include_str!("postgres/003_entries_sender_hash_partial.sql"),
    include_str!("postgres/004_own_message_ids_by_ticket.sql"),
    include_str!("postgres/005_outbox_plan_in_row.sql"),
    include_str!("postgres/006_entries_sender_hash_with_sender.sql"),
    include_str!("postgres/007_sends_one_index_by_address.sql"),
    include_str!("postgres/008_sends_copies_by_sender_address.sql"),
    include_str!("postgres/009_attachment_content_last.sql"),
    include_str!("postgres/010_no_foreign_keys.sql"),
    include_str!("postgres/011_outbox_room_for_the_lease.sql"),
];

/// Bring a PostgreSQL schema up to date, in one transaction under an
/// advisory lock, so that instances starting together migrate once.
fn postgres_migrate(db: &Db) -> Result<()> {
    let Db::Postgres(pg) = db else {
        return Ok(());
    };
    let mut client = pg.client();
    let mut tx = client.transaction()?;
    // Any constant: the key of crmgate's migrations among the database's
    // advisory locks.
    tx.execute("SELECT pg_advisory_xact_lock(7210012)", &[])?;
    // Looked up rather than `CREATE … IF NOT EXISTS`, whose notice every
    // command would print.
    let made: Option<String> = tx
        .query_one("SELECT CAST(to_regclass('schema_version') AS TEXT)", &[])?
        .get(0);
    if made.is_none() {
        tx.batch_execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")?;
    }
    let version: i64 = tx
        .query_opt("SELECT version FROM schema_version", &[])?
        .map_or(0, |r| r.get(0));
    let known = POSTGRES_MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Invalid(format!(
            "database schema: version {version} is from a newer crmgate (this one knows {known})"
        )));
    }
    for step in &POSTGRES_MIGRATIONS[version as usize..] {
        tx.batch_execute(step)?;
    }
    if version < known {
        tx.execute("DELETE FROM schema_version", &[])?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&known],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// Open (creating if needed) the SQLite database, bring its schema up to
/// date, and set the pragmas every connection needs.
///
/// # Errors
/// The directory cannot be created, the file cannot be opened, or the
/// schema is from a newer crmgate.
pub fn open(path: &Path) -> Result<Connection> {
    open_with(path, Durability::Full)
}

/// How a connection commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is on disk when it returns: what the SMTP `250` and the
    /// commands promise. (The daemon's writer connection is opened so,
    /// then commits at `NORMAL` while a thread of its own syncs the WAL
    /// before any answer: [`crate::writer::Writer::spawn`].)
    Full,
    /// The relay worker's own connection (its marks when it runs without
    /// the daemon's writer, the relay-down deferral): a crash may lose the
    /// last ones, which only means the message is sent again — at least
    /// once, as promised — and saves an fsync per delivery. In the daemon
    /// the marks go through the writer thread, in its synced batches.
    Relaxed,
}

/// [`open`], with the durability this connection needs.
///
/// # Errors
/// As [`open`].
pub fn open_with(path: &Path, durability: Durability) -> Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::StateDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Without the query planner stability guarantee, SQLite compiles a
    // statement again each time a parameter it planned with is bound anew
    // (`LIMIT ?`, as in the cap counts: 8 % of the writer's time).
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let synchronous = match durability {
        Durability::Full => "FULL",
        Durability::Relaxed => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Two processes that open a new database at once (the daemon starting,
    // `crmgate deliver` from the MTA) both see version 0; the loser's
    // transaction fails and rolls back. Trying again finds the schema made.
    let mut attempt = 0;
    loop {
        match migrations().to_latest(&mut conn) {
            Ok(()) => return Ok(conn),
            Err(_) if attempt < 5 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(50 * attempt));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The writer's page cache: the hot pages of a big log's indexes, so a log
/// of a million entries ingests about as fast as an empty one.
const WRITER_CACHE_KIB: i64 = 64 * 1024;
/// The writer's page cache while it writes a large message: a 25 MB
/// message would otherwise fill the whole cache with its own pages, and
/// the daemon's memory with them.
const WRITER_CACHE_LARGE_KIB: i64 = 4 * 1024;

/// The daemon's writer connection: a page cache for the hot pages of the
/// indexes, savepoint journals in memory, and a WAL that starts over.
///
/// Each message is written in a savepoint; with SQLite's default
/// `temp_store`, the first change to each page inside one copies that page
/// to a temporary file first, two `pwrite`s per page: in memory, they
/// cost nothing on disk.
///
/// The checkpointer thread ([`checkpoint`]) copies most of the WAL back,
/// but under a steady load it never catches the last frames, and a WAL is
/// only started over once a checkpoint has caught them all: it grew
/// without end, every frame extending the file (and the kernel zeroing
/// each new block). So the writer catches the last frames itself
/// ([`finish_checkpoint`]), and the next transaction starts the WAL over.
/// That is SQLite's own checkpoint after a commit, done by hand so that it
/// can skip a large message: copied on the writer's thread, a 25 MB
/// message would hold its own `250` and every other session's.
///
/// # Errors
/// A database error.
pub fn tune_for_writer(conn: &Connection) -> Result<()> {
    writer_cache(conn, false)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.wal_hook(Some(note_wal_frames));
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

/// The WAL file of `conn`'s database, when it has one: the daemon's sync
/// thread fdatasyncs it before answering. `None` for a database in memory,
/// and where SQLite kept its rollback journal because WAL cannot be had (a
/// file system without shared memory): there is no WAL to sync then.
///
/// # Errors
/// A database error.
pub fn wal_path(conn: &Connection) -> Result<Option<PathBuf>> {
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    Ok(conn
        .path()
        .filter(|p| !p.is_empty() && mode.eq_ignore_ascii_case("wal"))
        .map(|p| PathBuf::from(format!("{p}-wal"))))
}

/// Commits on `conn` no longer wait for the disk (`synchronous=NORMAL`; in
/// WAL mode still consistent after a crash): for the daemon's writer, whose
/// WAL ([`wal_path`]) a thread of its own syncs before any answer.
///
/// # Errors
/// A database error.
pub fn commit_without_sync(conn: &Connection) -> Result<()> {
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(())
}

thread_local! {
    /// The WAL's size in frames after this thread's last commit on a
    /// writer connection (the hook runs on the committing thread).
    static WAL_FRAMES: Cell<i64> = const { Cell::new(0) };
    /// The size [`finish_checkpoint`] saw last time, and the size after a
    /// large commit that the checkpointer is to copy first (0: none).
    static SEEN_FRAMES: Cell<i64> = const { Cell::new(0) };
    static LEFT_TO_CHECKPOINTER: Cell<i64> = const { Cell::new(0) };
}

fn note_wal_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.with(|f| f.set(i64::from(frames)));
    Ok(())
}

/// How far the checkpointer thread had copied the WAL back, the last time
/// it looked: what it shares with the writer.
#[derive(Debug, Default)]
pub struct CheckpointProgress {
    copied: AtomicI64,
}

/// From this many frames on (about 4 MB, SQLite's default), the writer
/// copies the WAL back itself after a commit.
const WRITER_CHECKPOINT_FRAMES: i64 = 1000;
/// One commit that adds more frames than this (16 MB: a large message) is
/// the checkpointer's to copy.
const LARGE_COMMIT_FRAMES: i64 = 4 * WRITER_CHECKPOINT_FRAMES;

/// After a commit on the writer thread: once the WAL holds 1,000 frames,
/// copy them back (`PASSIVE`: nobody waits; the checkpointer has usually
/// copied most already), so the next transaction starts the WAL over, as
/// SQLite's own checkpoint after a commit would. Except after a commit of
/// a large message: copying it here would hold the writer, and every
/// session waiting for it; the writer waits until the checkpointer has
/// copied past it. (Leaving every long WAL to the checkpointer instead let
/// the WAL grow long and the replies' tail latency with it.) A failed
/// checkpoint is only a WAL that stays long a while: logged by the
/// caller, never an error for the batch.
///
/// # Errors
/// A database error.
pub fn finish_checkpoint(conn: &Connection, progress: &CheckpointProgress) -> Result<bool> {
    let frames = WAL_FRAMES.with(Cell::get);
    let seen = SEEN_FRAMES.with(|s| s.replace(frames));
    if frames > seen && frames - seen > LARGE_COMMIT_FRAMES {
        LEFT_TO_CHECKPOINTER.with(|l| l.set(frames));
    }
    let left = LEFT_TO_CHECKPOINTER.with(Cell::get);
    if left > 0 {
        // Until the checkpointer is past it, or the WAL started over.
        if progress.copied.load(Ordering::Relaxed) < left && frames >= left {
            return Ok(false);
        }
        LEFT_TO_CHECKPOINTER.with(|l| l.set(0));
    }
    if frames < WRITER_CHECKPOINT_FRAMES {
        return Ok(false);
    }
    checkpoint(conn, None)?;
    WAL_FRAMES.with(|f| f.set(0));
    SEEN_FRAMES.with(|s| s.set(0));
    Ok(true)
}

/// Size the writer's page cache for what comes: `large` before a batch
/// that holds a large message, then back. A smaller cache only spills the
/// transaction's pages to the WAL sooner; nothing is committed early.
///
/// # Errors
/// A database error.
pub fn writer_cache(conn: &Connection, large: bool) -> Result<()> {
    let kib = if large {
        WRITER_CACHE_LARGE_KIB
    } else {
        WRITER_CACHE_KIB
    };
    conn.pragma_update(None, "cache_size", -kib)?;
    Ok(())
}

/// Copy what the WAL holds back into the database file, without waiting
/// for readers or writers (`PASSIVE`), and tell `progress` how far that
/// got. Returns the WAL's size in pages.
///
/// # Errors
/// A database error.
pub fn checkpoint(conn: &Connection, progress: Option<&CheckpointProgress>) -> Result<i64> {
    let (size, copied): (i64, i64) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })?;
    if let Some(progress) = progress {
        progress.copied.store(copied, Ordering::Relaxed);
    }
    Ok(size)
}

/// Unix seconds now. The store is the only place that reads the clock for
/// the log; `decide` receives the time as a value.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod test_cluster;

/// The test cluster's fresh database, as the location a store test
/// connects to (no password: the cluster trusts its socket). `None` when
/// `CRMGATE_TEST_NO_PG=1`.
#[cfg(test)]
pub(crate) fn test_location() -> Option<Location> {
    test_cluster::database().map(|url| Location::Postgres {
        url,
        password: None,
        ca_certificates: Vec::new(),
    })
}

/// The store's tests run on both engines: a fresh log on each.
#[cfg(test)]
pub(crate) mod testing {
    use super::{connect, Db, Durability, Location};

    /// A fresh, empty log with the real schema, on one engine.
    pub(crate) struct TestLog {
        /// `"sqlite"` or `"postgres"`, for the assertion messages.
        pub engine: &'static str,
        pub conn: Db,
        pub(crate) _dir: Option<tempfile::TempDir>,
    }

    impl TestLog {
        /// A SQLite file, and a PostgreSQL database on the tests' cluster
        /// (unless `CRMGATE_TEST_NO_PG=1`).
        pub(crate) fn all() -> Vec<TestLog> {
            let mut logs = vec![TestLog::sqlite()];
            logs.extend(TestLog::postgres());
            logs
        }

        /// A PostgreSQL database on the tests' cluster; `None` when
        /// `CRMGATE_TEST_NO_PG=1`.
        pub(crate) fn postgres() -> Option<TestLog> {
            let location = super::test_location()?;
            Some(TestLog {
                engine: "postgres",
                conn: connect(&location, Durability::Full).unwrap(),
                _dir: None,
            })
        }

        pub(crate) fn sqlite() -> TestLog {
            let dir = tempfile::tempdir().unwrap();
            let location = Location::Sqlite(dir.path().join("crmgate.db"));
            TestLog {
                engine: "sqlite",
                conn: connect(&location, Durability::Full).unwrap(),
                _dir: Some(dir),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_over_tcp_speaks_tls_verified_against_the_ca_file() {
        use rustls::pki_types::pem::PemObject as _;
        let Some((name, tls)) = test_cluster::tls_database() else {
            return;
        };
        let ca: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(tls.ca_pem.as_bytes())
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        let at = |host: &str, params: &str, ca_certificates: &[_]| Location::Postgres {
            url: format!("postgres://crmgate@{host}:{}/{name}{params}", tls.port),
            password: None,
            ca_certificates: ca_certificates.to_vec(),
        };
        let transport = |db: &Db| -> String {
            db.query_row(
                "SELECT CASE WHEN ssl THEN version ELSE 'plain' END \
                 FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
                |r| r.get(0),
            )
            .unwrap()
        };

        // Required or preferred (the default), with the CA: TLS, whose
        // certificate names the host (a name or an address).
        for (host, params) in [
            ("localhost", "?sslmode=require"),
            ("localhost", ""),
            ("127.0.0.1", "?sslmode=prefer"),
        ] {
            let db = connect(&at(host, params, &ca), Durability::Full).unwrap();
            assert!(
                transport(&db).starts_with("TLS"),
                "{host}{params}: {}",
                transport(&db)
            );
        }
        // Without the CA, refused, and the reason says what to do.
        for params in ["?sslmode=require", ""] {
            let Err(refused) = connect(&at("localhost", params, &[]), Durability::Full) else {
                panic!("{params}: connected without the CA");
            };
            let said = refused.to_string();
            assert!(
                said.contains("not trusted") && said.contains("store.ca_file"),
                "{params}: {said}"
            );
        }
        // A name the certificate does not hold (the server reached at its
        // address all the same): refused too.
        let wrong = Location::Postgres {
            url: format!(
                "postgres://crmgate@db.example.org:{}/{name}?hostaddr=127.0.0.1",
                tls.port
            ),
            password: None,
            ca_certificates: ca.clone(),
        };
        let Err(refused) = connect(&wrong, Durability::Full) else {
            panic!("connected to a server whose certificate names another host");
        };
        assert!(refused.to_string().contains("NotValidForName"), "{refused}");
        // sslmode=disable: the operator's choice, on a trusted network.
        let plain = connect(&at("localhost", "?sslmode=disable", &[]), Durability::Full).unwrap();
        assert_eq!(transport(&plain), "plain");
    }

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
    }

    #[test]
    fn the_writer_starts_the_wal_over_but_leaves_a_large_message_to_the_checkpointer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let writer = open(&path).unwrap();
        tune_for_writer(&writer).unwrap();
        let checkpointer = open(&path).unwrap();
        let progress = CheckpointProgress::default();
        let frames = || WAL_FRAMES.with(Cell::get);
        writer
            .execute_batch("CREATE TABLE big (data BLOB)")
            .unwrap();

        // Commits of ~100 frames: once the WAL holds 1,000, the writer
        // copies it back though the checkpointer did nothing.
        let mut copied_at = None;
        for i in 0..15 {
            writer
                .execute("INSERT INTO big VALUES (zeroblob(400000))", [])
                .unwrap();
            let before = frames();
            if finish_checkpoint(&writer, &progress).unwrap() {
                copied_at = Some((i, before));
                break;
            }
        }
        let (_, at) = copied_at.expect("the writer checkpointed");
        assert!((1000..1200).contains(&at), "{at} frames");
        writer.execute("INSERT INTO big VALUES (1)", []).unwrap();
        assert!(frames() < 10, "the WAL started over: {} frames", frames());

        // A large message in one commit is the checkpointer's, also while
        // more small commits come, until it has copied past it.
        writer
            .execute("INSERT INTO big VALUES (zeroblob(20000000))", [])
            .unwrap();
        let large = frames();
        assert!(large > 4000, "{large}");
        assert!(!finish_checkpoint(&writer, &progress).unwrap());
        writer.execute("INSERT INTO big VALUES (2)", []).unwrap();
        assert!(!finish_checkpoint(&writer, &progress).unwrap());
        assert!(checkpoint(&checkpointer, Some(&progress)).unwrap() >= large);
        assert!(progress.copied.load(Ordering::Relaxed) >= large);
        writer.execute("INSERT INTO big VALUES (3)", []).unwrap();
        // Copied whole by the checkpointer: the WAL started over by itself.
        assert!(frames() < 10, "{} frames", frames());
        assert!(!finish_checkpoint(&writer, &progress).unwrap());
    }

    #[test]
    fn sends_older_than_a_day_are_pruned_in_bounded_steps() {
        for log in testing::TestLog::all() {
            let conn = &log.conn;
            let now = 1_000_000;
            for i in 0..25 {
                // 20 rows a day and more old, then 5 recent ones.
                let at = if i < 20 { now - 90_000 + i } else { now - 60 };
                tickets::record_send(conn, "a@x", 1, true, None, at).unwrap();
            }
            let count = |c: &Db| -> i64 {
                c.query_row("SELECT COUNT(*) FROM sends", &[], |r| r.get(0))
                    .unwrap()
            };
            assert_eq!(
                tickets::prune_sends(conn, now, 8).unwrap(),
                8,
                "{}",
                log.engine
            );
            assert_eq!(count(conn), 17);
            assert_eq!(tickets::prune_sends(conn, now, 100).unwrap(), 12);
            assert_eq!(count(conn), 5, "the recent rows stay: the caps count them");
            assert_eq!(tickets::prune_sends(conn, now, 100).unwrap(), 0);
        }
    }

    #[test]
    fn a_transaction_commits_or_rolls_back_and_a_savepoint_undoes_only_its_step() {
        for mut log in testing::TestLog::all() {
            let engine = log.engine;
            let count = |c: &Db| -> i64 {
                c.query_row("SELECT COUNT(*) FROM sends", &[], |r| r.get(0))
                    .unwrap()
            };
            {
                let tx = log.conn.transaction().unwrap();
                tickets::record_send(&tx, "a@x", 1, true, None, 10).unwrap();
                let failed = in_savepoint(&tx, |sp| -> Result<()> {
                    tickets::record_send(sp, "b@x", 1, true, None, 10)?;
                    // A statement the database refuses: on PostgreSQL it
                    // aborts the transaction unless the savepoint undoes it.
                    sp.exec("INSERT INTO no_such_table VALUES (1)", &[])?;
                    Ok(())
                })
                .unwrap();
                assert!(failed.is_err(), "{engine}");
                tickets::record_send(&tx, "c@x", 1, true, None, 10).unwrap();
                tx.commit().unwrap();
            }
            assert_eq!(count(&log.conn), 2, "{engine}: a and c, not b");
            {
                let tx = log.conn.transaction().unwrap();
                tickets::record_send(&tx, "d@x", 1, true, None, 10).unwrap();
                // Dropped without a commit.
            }
            assert_eq!(count(&log.conn), 2, "{engine}: rolled back");
            let addresses = log
                .conn
                .query_all("SELECT address FROM sends ORDER BY rowid", &[], |r| {
                    r.get::<String>(0)
                })
                .unwrap();
            assert_eq!(addresses, ["a@x", "c@x"], "{engine}");
        }
    }

    #[test]
    fn a_postgres_connection_the_server_closed_is_opened_again_at_the_next_transaction() {
        let Some(location) = test_location() else {
            return;
        };
        let mut db = connect(&location, Durability::Full).unwrap();
        let admin = connect(&location, Durability::Full).unwrap();
        let pid: i64 = db
            .query_row("SELECT CAST(pg_backend_pid() AS BIGINT)", &[], |r| r.get(0))
            .unwrap();
        admin
            .query_row(
                "SELECT CAST(pg_terminate_backend(CAST(?1 AS INTEGER)) AS TEXT)",
                args![pid],
                |_| Ok(()),
            )
            .unwrap();
        // The client learns of it at its next statement: that one fails.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while db.query_row("SELECT 1", &[], |_| Ok(())).is_ok() {
            assert!(std::time::Instant::now() < deadline, "never closed");
            std::thread::sleep(Duration::from_millis(50));
        }
        let tx = db.transaction().unwrap();
        tickets::record_send(&tx, "a@x", 1, true, None, 10).unwrap();
        tx.commit().unwrap();
        let n: i64 = db
            .query_row("SELECT COUNT(*) FROM sends", &[], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn postgres_migrates_once_and_refuses_a_newer_schema() {
        let Some(location) = test_location() else {
            return;
        };
        let db = connect(&location, Durability::Full).unwrap();
        let version = |db: &Db| -> i64 {
            db.query_row("SELECT version FROM schema_version", &[], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(version(&db), POSTGRES_MIGRATIONS.len() as i64);
        drop(connect(&location, Durability::Full).unwrap());
        assert_eq!(version(&db), POSTGRES_MIGRATIONS.len() as i64, "once");
        db.exec("UPDATE schema_version SET version = version + 1", &[])
            .unwrap();
        let newer = connect(&location, Durability::Full).err().unwrap();
        assert!(newer.to_string().contains("newer crmgate"), "{newer}");
    }

    /// SQLite's plan for `sql`, its steps joined by "; ".
    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        // Its parameters unbound (NULL): the plan does not depend on them.
        let mut rows = stmt.raw_query();
        let mut steps = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            steps.push(row.get::<_, String>(3).unwrap());
        }
        steps.join("; ")
    }

    #[test]
    fn the_duplicate_checks_search_one_index_and_the_unread_ones_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("crmgate.db")).unwrap();
        let sql = tickets::DUPLICATE_WITHOUT_MESSAGE_ID;
        let without = plan(&conn, sql);
        assert!(
            without.contains("SEARCH e USING INDEX entries_sender_hash"),
            "{sql}: {without}"
        );
        let sql = tickets::DUPLICATE_BY_MESSAGE_ID;
        let by_id = plan(&conn, sql);
        assert!(
            by_id.contains("SEARCH t USING INDEX thread_ids_message_id")
                && by_id.contains("SEARCH e USING INDEX entries_ticket"),
            "{sql}: {by_id}"
        );
        // Our own Message-IDs through their ticket, the others along the
        // partial index, a delivery report's row through its ticket.
        for (sql, index) in [
            (tickets::OWN_MESSAGE_ID, "thread_ids_ticket"),
            (tickets::BY_MESSAGE_ID, "thread_ids_message_id"),
            (outbox::FIRST_WITH_MESSAGE_ID, "outbox_ticket"),
        ] {
            let steps = plan(&conn, sql);
            assert!(
                steps.contains(&format!("USING INDEX {index}")),
                "{sql}: {steps}"
            );
        }
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        for gone in [
            "participants_address",
            "entries_message_id",
            "tickets_state",
            "outbox_message_id",
        ] {
            assert!(!indexes.iter().any(|i| i == gone), "{gone} in {indexes:?}");
        }
    }

    #[test]
    fn a_file_in_wal_mode_has_a_wal_to_sync_and_a_journal_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let conn = open(&path).unwrap();
        let wal = wal_path(&conn).unwrap().unwrap();
        assert_eq!(wal, dir.path().join("log.db-wal"));
        let synchronous = |c: &Connection| -> i64 {
            c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap()
        };
        assert_eq!(synchronous(&conn), 2, "FULL");
        commit_without_sync(&conn).unwrap();
        assert_eq!(synchronous(&conn), 1, "NORMAL");

        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        assert_eq!(wal_path(&conn).unwrap(), None);
        let memory = Connection::open_in_memory().unwrap();
        assert_eq!(wal_path(&memory).unwrap(), None);
    }

    #[test]
    fn open_twice_keeps_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/crmgate.db");
        drop(open(&path).unwrap());
        let conn = open(&path).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
