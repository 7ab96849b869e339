//! `crmgate store copy --to URL`: the whole log, from the database the
//! configuration names into an empty one (PostgreSQL, or a SQLite file),
//! so that a helpdesk that outgrows one machine moves its history with it.
//!
//! Row ids are kept, so every reference between rows (an entry's ticket,
//! an attachment's entry, an outbox row's entry) stays right without being
//! rewritten; PostgreSQL's sequences are then moved past the copied ids,
//! so the next ticket is numbered after the last one copied. The source is
//! read in one snapshot (the daemon may keep running on it) in batches
//! bounded in rows and bytes, never whole; the target is written in one
//! transaction, so a copy that fails leaves it as empty as it was.

use std::path::PathBuf;

use postgres::types::{ToSql, Type};

use super::{Db, Location, Result, Row, StoreError, Value};

/// How a column is read from one engine and written to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// BIGINT on PostgreSQL, INTEGER on SQLite (flags too).
    Int,
    /// Text on both; also `entries.long_body`, which SQLite may keep as a
    /// blob of UTF-8 written in place.
    Text,
    /// BYTEA / BLOB.
    Bytes,
}

/// One table of the log, as the copy walks it.
struct Table {
    name: &'static str,
    /// The key the rows are walked along (keyset batches: each batch the
    /// rows after the last one copied); the first columns of `columns`.
    key: &'static [&'static str],
    /// Every column both engines have (PostgreSQL's outbox lease columns
    /// are left out: a copied row is held by no instance yet).
    columns: &'static [(&'static str, Kind)],
    /// The bytes a row holds, roughly, for tables whose rows may be large
    /// (a raw message of 25 MB): their batches stop at [`BATCH_BYTES`].
    size: Option<&'static str>,
    /// The column a PostgreSQL sequence fills.
    serial: Option<&'static str>,
}

use Kind::{Bytes, Int, Text};

/// Every table of the schema, each after those it refers to.
const TABLES: &[Table] = &[
    Table {
        name: "tickets",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("number", Text),
            ("subject", Text),
            ("state", Text),
            ("owner", Text),
            ("created_at", Int),
            ("updated_at", Int),
            ("resolved_at", Int),
        ],
        size: None,
        serial: Some("id"),
    },
    Table {
        name: "participants",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("ticket_id", Int),
            ("role", Text),
            ("address", Text),
            ("name", Text),
            ("added_at", Int),
        ],
        size: None,
        serial: Some("id"),
    },
    Table {
        name: "raw_messages",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("received_at", Int),
            ("peer", Text),
            ("mail_from", Text),
            ("rcpt_to", Text),
            ("data", Bytes),
        ],
        size: Some("length(data)"),
        serial: Some("id"),
    },
    Table {
        name: "entries",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("ticket_id", Int),
            ("kind", Text),
            ("from_addr", Text),
            ("from_name", Text),
            ("at", Int),
            ("subject", Text),
            ("body", Text),
            ("html", Text),
            ("message_id", Text),
            ("by_agent", Int),
            ("sender", Text),
            ("body_hash", Text),
            ("raw_id", Int),
            ("duplicates", Int),
            ("long_body", Text),
            ("raw_body_at", Int),
            ("raw_body_len", Int),
        ],
        size: Some("length(body) + COALESCE(length(html), 0) + COALESCE(length(long_body), 0)"),
        serial: Some("id"),
    },
    Table {
        name: "attachments",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("entry_id", Int),
            ("filename", Text),
            ("content_type", Text),
            ("size", Int),
            ("data", Bytes),
            ("sha256", Text),
            ("same_as", Int),
            ("content", Bytes),
        ],
        size: Some("length(data) + COALESCE(length(content), 0)"),
        serial: Some("id"),
    },
    Table {
        name: "thread_ids",
        key: &["seq"],
        columns: &[
            ("seq", Int),
            ("message_id", Text),
            ("ticket_id", Int),
            ("agent_inbound", Int),
            ("ours", Int),
            ("at", Int),
        ],
        size: None,
        serial: Some("seq"),
    },
    Table {
        name: "outbox",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("ticket_id", Int),
            ("entry_id", Int),
            ("kind", Text),
            ("recipients", Text),
            ("message_id", Text),
            ("status", Text),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("last_error", Text),
            ("created_at", Int),
            ("sent_at", Int),
            ("plan", Text),
        ],
        size: None,
        serial: Some("id"),
    },
    Table {
        name: "outbox_messages",
        key: &["outbox_id"],
        columns: &[("outbox_id", Int), ("message", Bytes), ("plan", Text)],
        size: Some("length(message) + COALESCE(length(plan), 0)"),
        serial: None,
    },
    Table {
        name: "sends",
        // SQLite's implicit key, a column of its own on PostgreSQL.
        key: &["rowid"],
        columns: &[
            ("rowid", Int),
            ("address", Text),
            ("ticket_id", Int),
            ("automatic", Int),
            ("at", Int),
            ("sender", Text),
        ],
        size: None,
        serial: Some("rowid"),
    },
    Table {
        name: "quarantine",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("at", Int),
            ("reason", Text),
            ("sender", Text),
            ("subject", Text),
            ("message_id", Text),
            ("raw_id", Int),
        ],
        size: None,
        serial: Some("id"),
    },
    Table {
        name: "known_agents",
        key: &["address"],
        columns: &[
            ("address", Text),
            ("name", Text),
            ("first_seen", Int),
            ("removed_at", Int),
        ],
        size: None,
        serial: None,
    },
    Table {
        name: "reply_all_notices",
        key: &["ticket_id", "agent", "day"],
        columns: &[("ticket_id", Int), ("agent", Text), ("day", Text)],
        size: None,
        serial: None,
    },
];

/// Rows a batch holds at most.
const BATCH_ROWS: i64 = 1000;
/// Bytes a batch holds at most (a single larger row is a batch of its own).
const BATCH_BYTES: i64 = 8 * 1024 * 1024;

/// One value read from the source, owned for the length of a batch.
#[derive(Debug, Clone, PartialEq)]
enum Owned {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl Owned {
    fn value(&self) -> Value<'_> {
        match self {
            Owned::Null => Value::Null,
            Owned::Int(i) => Value::Int(*i),
            Owned::Text(t) => Value::Text(t),
            Owned::Blob(b) => Value::Blob(b),
        }
    }
}

/// Where `--to` points: `postgres://…` (or `postgresql://…`), or
/// `sqlite://PATH` (`sqlite:///var/lib/crmgate/copy.db`). The URL holds
/// no password; `password` is read from `--password-file`.
///
/// # Errors
/// `Invalid`, naming what is wrong, for any other URL.
pub fn target(
    url: &str,
    password: Option<String>,
    ca_certificates: Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
) -> Result<Location> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let config: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| StoreError::Invalid(format!("--to: {e}")))?;
        if config.get_password().is_some() {
            return Err(StoreError::Invalid(
                "--to: the URL holds a password, which any user may read in the process \
                 list: put it in a file and give --password-file FILE"
                    .into(),
            ));
        }
        return Ok(Location::Postgres {
            url: url.to_string(),
            password,
            ca_certificates,
        });
    }
    if let Some(path) = url.strip_prefix("sqlite://").filter(|p| !p.is_empty()) {
        return Ok(Location::Sqlite(PathBuf::from(path)));
    }
    Err(StoreError::Invalid(format!(
        "--to {url}: give a postgres://user@host:5432/dbname URL, or sqlite://PATH"
    )))
}

/// Copy the log of `source` into the empty database at `target`; the rows
/// copied, table by table. `progress(table, done, total)` is told after
/// each batch.
///
/// # Errors
/// `Invalid` when the target holds rows already (nothing is written to it
/// then), or any database error (the target's transaction is rolled back).
pub fn copy(
    source: &Db,
    target: &Location,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Vec<(&'static str, u64)>> {
    match target {
        Location::Postgres { .. } => {
            let db = super::connect_postgres(target, false)?;
            refuse_rows(&db, target, true)?;
            super::postgres_migrate(&db)?;
            let Db::Postgres(pg) = &db else {
                unreachable!("connect_postgres gives a PostgreSQL client")
            };
            let mut client = pg.client();
            let mut tx = client.transaction()?;
            // Nobody writes to the target meanwhile (a daemon started on it
            // too early); readers may look.
            let names: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
            tx.batch_execute(&format!(
                "LOCK TABLE {} IN EXCLUSIVE MODE",
                names.join(", ")
            ))?;
            let counts = in_snapshot(source, |source| {
                let mut counts = Vec::new();
                for table in TABLES {
                    if exists_row(&mut tx, table.name)? {
                        return Err(not_empty(target, &[format!("rows in {}", table.name)]));
                    }
                    let total = count(source, table.name)?;
                    let copied = copy_to_postgres(source, &mut tx, table, total, progress)?;
                    counts.push((table.name, copied));
                }
                Ok(counts)
            })?;
            for table in TABLES {
                if let Some(col) = table.serial {
                    // The next id is the one after the last copied (1 when
                    // none was): `false`, it is not taken yet.
                    tx.execute(
                        &format!(
                            "SELECT setval(pg_get_serial_sequence('{t}', '{col}'), COALESCE(MAX({col}), 0) + 1, false) FROM {t}",
                            t = table.name
                        ),
                        &[],
                    )?;
                }
            }
            tx.commit()?;
            Ok(counts)
        }
        Location::Sqlite(path) => {
            if path.exists() {
                let existing = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )?;
                refuse_rows(&Db::Sqlite(existing), target, true)?;
            }
            let mut db = Db::Sqlite(super::open(path)?);
            let tx = db.transaction()?;
            // References are checked at the commit, when every row is in.
            tx.batch("PRAGMA defer_foreign_keys = ON")?;
            refuse_rows(&tx, target, false)?;
            let counts = in_snapshot(source, |source| {
                let mut counts = Vec::new();
                for table in TABLES {
                    let total = count(source, table.name)?;
                    let copied = copy_to_sqlite(source, &tx, table, total, progress)?;
                    counts.push((table.name, copied));
                }
                Ok(counts)
            })?;
            tx.commit()?;
            Ok(counts)
        }
    }
}

/// Run `f` in one read-only snapshot of the source, so that a daemon that
/// keeps writing meanwhile gives a copy as of one instant: every entry of a
/// ticket copied, or none of the ticket.
fn in_snapshot<T>(source: &Db, f: impl FnOnce(&Db) -> Result<T>) -> Result<T> {
    let begin = match source {
        // Deferred: a reader, which never holds the daemon's writer up.
        Db::Sqlite(_) => "BEGIN",
        Db::Postgres(_) => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    };
    source.exec(begin, &[])?;
    let result = f(source);
    // Read only: nothing to keep.
    let end = source.exec("ROLLBACK", &[]);
    let value = result?;
    end?;
    Ok(value)
}

fn not_empty(target: &Location, held: &[String]) -> StoreError {
    StoreError::Invalid(format!(
        "{target} is not empty ({}): nothing copied; store copy fills only an empty database",
        held.join(", ")
    ))
}

/// Refuse a target that holds any row of the log, naming what it holds.
/// `maybe_missing`: the tables may not be there yet (a database just
/// created).
fn refuse_rows(db: &Db, target: &Location, maybe_missing: bool) -> Result<()> {
    let mut held = Vec::new();
    for table in TABLES {
        if maybe_missing {
            let there = match db {
                Db::Postgres(_) => db.query_row(
                    "SELECT CAST(CASE WHEN to_regclass(?1) IS NULL THEN 0 ELSE 1 END AS BIGINT)",
                    super::args![table.name],
                    |r| r.get::<i64>(0),
                )? > 0,
                Db::Sqlite(_) => {
                    db.query_row(
                        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                        super::args![table.name],
                        |r| r.get::<i64>(0),
                    )? > 0
                }
            };
            if !there {
                continue;
            }
        }
        let n = count(db, table.name)?;
        if n > 0 {
            held.push(format!("{n} in {}", table.name));
        }
    }
    if held.is_empty() {
        Ok(())
    } else {
        Err(not_empty(target, &held))
    }
}

fn exists_row(tx: &mut postgres::Transaction<'_>, table: &str) -> Result<bool> {
    Ok(tx
        .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), &[])?
        .get(0))
}

fn count(source: &Db, table: &str) -> Result<u64> {
    let n: i64 = source.query_row(&format!("SELECT COUNT(*) FROM {table}"), &[], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

fn column_list(table: &Table) -> String {
    table
        .columns
        .iter()
        .map(|(c, _)| *c)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rows of `table` after `last` (the key of the last row copied; none
/// at the start), in key order: at most [`BATCH_ROWS`], and for tables of
/// large rows at most [`BATCH_BYTES`] (or one row). Empty at the end.
fn next_batch(source: &Db, table: &Table, last: Option<&[Owned]>) -> Result<Vec<Vec<Owned>>> {
    let key = table.key.join(", ");
    let after = match last {
        None => String::new(),
        Some(_) if table.key.len() == 1 => format!("WHERE {key} > ?1"),
        Some(_) => {
            let marks: Vec<String> = (1..=table.key.len()).map(|i| format!("?{i}")).collect();
            format!("WHERE ({key}) > ({})", marks.join(", "))
        }
    };
    let mut params: Vec<Value<'_>> =
        last.map_or(Vec::new(), |k| k.iter().map(Owned::value).collect());
    let mut bound = String::new();
    let mut upper = None;
    if let Some(size) = table.size {
        // Sized tables have one integer key: how many of the next rows fit.
        let sizes = source.query_all(
            &format!(
                "SELECT {key}, CAST({size} AS BIGINT) FROM {t} {after} ORDER BY {key} LIMIT {BATCH_ROWS}",
                t = table.name
            ),
            &params,
            |r| Ok((r.get::<i64>(0)?, r.get::<Option<i64>>(1)?.unwrap_or(0))),
        )?;
        let mut total = 0;
        for (id, bytes) in sizes {
            if upper.is_some() && total + bytes > BATCH_BYTES {
                break;
            }
            total += bytes;
            upper = Some(id);
        }
        let Some(_) = upper else {
            return Ok(Vec::new());
        };
        let mark = params.len() + 1;
        bound = if after.is_empty() {
            format!("WHERE {key} <= ?{mark}")
        } else {
            format!(" AND {key} <= ?{mark}")
        };
    }
    let upper_value = upper.map(Owned::Int);
    if let Some(u) = &upper_value {
        params.push(u.value());
    }
    let limit = if table.size.is_some() {
        String::new()
    } else {
        format!("LIMIT {BATCH_ROWS}")
    };
    let sql = format!(
        "SELECT {cols} FROM {t} {after}{bound} ORDER BY {key} {limit}",
        cols = column_list(table),
        t = table.name,
    );
    source.query_all(&sql, &params, |row| read_row(row, table))
}

/// A row's values, each as its column's kind.
fn read_row(row: &Row<'_>, table: &Table) -> Result<Vec<Owned>> {
    let mut out = Vec::with_capacity(table.columns.len());
    for (i, (name, kind)) in table.columns.iter().enumerate() {
        let bad = |what: &str| {
            StoreError::Invalid(format!(
                "{}.{name}: {what} in a {kind:?} column",
                table.name
            ))
        };
        let value = match row {
            Row::Sqlite(r) => {
                use rusqlite::types::ValueRef;
                match (r.get_ref(i)?, kind) {
                    (ValueRef::Null, _) => Owned::Null,
                    (ValueRef::Integer(v), Int) => Owned::Int(v),
                    (ValueRef::Text(t) | ValueRef::Blob(t), Text) => Owned::Text(
                        String::from_utf8(t.to_vec())
                            .map_err(|_| bad("bytes that are not UTF-8"))?,
                    ),
                    (ValueRef::Text(b) | ValueRef::Blob(b), Bytes) => Owned::Blob(b.to_vec()),
                    (other, _) => return Err(bad(&format!("{:?}", other.data_type()))),
                }
            }
            Row::Postgres(r) => {
                let got = match kind {
                    Int => r.try_get::<_, Option<i64>>(i).map(|v| v.map(Owned::Int)),
                    Text => r
                        .try_get::<_, Option<String>>(i)
                        .map(|v| v.map(Owned::Text)),
                    Bytes => r
                        .try_get::<_, Option<Vec<u8>>>(i)
                        .map(|v| v.map(Owned::Blob)),
                };
                got.map_err(|e| bad(&e.to_string()))?.unwrap_or(Owned::Null)
            }
        };
        out.push(value);
    }
    Ok(out)
}

/// The key of a row (its first columns).
fn key_of(table: &Table, row: &[Owned]) -> Vec<Owned> {
    row[..table.key.len()].to_vec()
}

/// Hand every row of `table` to `write`, batch after batch along its
/// key, telling `progress` after each batch; the rows handed on.
fn each_row(
    source: &Db,
    table: &Table,
    total: u64,
    progress: &mut dyn FnMut(&str, u64, u64),
    mut write: impl FnMut(&[Value<'_>]) -> Result<()>,
) -> Result<u64> {
    let mut done = 0;
    let mut last: Option<Vec<Owned>> = None;
    loop {
        let batch = next_batch(source, table, last.as_deref())?;
        let Some(end) = batch.last() else {
            return Ok(done);
        };
        last = Some(key_of(table, end));
        for row in &batch {
            let values: Vec<Value<'_>> = row.iter().map(Owned::value).collect();
            write(&values)?;
        }
        done += batch.len() as u64;
        progress(table.name, done, total);
    }
}

fn copy_to_postgres(
    source: &Db,
    tx: &mut postgres::Transaction<'_>,
    table: &Table,
    total: u64,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<u64> {
    let cols = column_list(table);
    // The columns' types, as the binary COPY needs them (CITEXT included).
    let marks: Vec<String> = (1..=table.columns.len()).map(|i| format!("${i}")).collect();
    let types: Vec<Type> = tx
        .prepare(&format!(
            "INSERT INTO {} ({cols}) VALUES ({})",
            table.name,
            marks.join(", ")
        ))?
        .params()
        .to_vec();
    let sink = tx.copy_in(&format!(
        "COPY {} ({cols}) FROM STDIN (FORMAT binary)",
        table.name
    ))?;
    let mut writer = postgres::binary_copy::BinaryCopyInWriter::new(sink, &types);
    let done = each_row(source, table, total, progress, |values| {
        let refs: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        Ok(writer.write(&refs)?)
    })?;
    let written = writer.finish()?;
    if written != done {
        return Err(StoreError::Invalid(format!(
            "{}: {done} rows read, {written} written",
            table.name
        )));
    }
    Ok(done)
}

fn copy_to_sqlite(
    source: &Db,
    target: &Db,
    table: &Table,
    total: u64,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<u64> {
    let marks: Vec<String> = (1..=table.columns.len()).map(|i| format!("?{i}")).collect();
    let insert = format!(
        "INSERT INTO {} ({}) VALUES ({})",
        table.name,
        column_list(table),
        marks.join(", ")
    );
    each_row(source, table, total, progress, |values| {
        target.exec(&insert, values).map(drop)
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::TestLog;
    use super::*;

    /// The columns of `table` in the engine's catalogue, but the outbox
    /// lease (PostgreSQL's, left out of a copy) and `rowid` (SQLite's
    /// implicit key).
    fn catalogue(db: &Db, table: &str) -> Vec<String> {
        let mut cols = match db {
            Db::Sqlite(_) => db
                .query_all(
                    "SELECT name FROM pragma_table_info(?1)",
                    super::super::args![table],
                    |r| r.get::<String>(0),
                )
                .unwrap(),
            Db::Postgres(_) => db
                .query_all(
                    "SELECT CAST(column_name AS TEXT) FROM information_schema.columns
                     WHERE table_schema = current_schema() AND table_name = ?1",
                    super::super::args![table],
                    |r| r.get::<String>(0),
                )
                .unwrap(),
        };
        cols.retain(|c| !matches!(c.as_str(), "rowid" | "leased_by" | "leased_until"));
        cols.sort();
        cols
    }

    #[test]
    fn the_copy_walks_every_table_and_column_of_both_schemas() {
        for log in TestLog::all() {
            let db = &log.conn;
            let mut tables = match db {
                Db::Sqlite(_) => db
                    .query_all(
                        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
                        &[],
                        |r| r.get::<String>(0),
                    )
                    .unwrap(),
                Db::Postgres(_) => db
                    .query_all(
                        "SELECT CAST(table_name AS TEXT) FROM information_schema.tables
                         WHERE table_schema = current_schema() AND table_name <> 'schema_version'",
                        &[],
                        |r| r.get::<String>(0),
                    )
                    .unwrap(),
            };
            tables.sort();
            let mut ours: Vec<String> = TABLES.iter().map(|t| t.name.to_string()).collect();
            ours.sort();
            assert_eq!(tables, ours, "{}", log.engine);
            for table in TABLES {
                let mut ours: Vec<String> = table
                    .columns
                    .iter()
                    .map(|(c, _)| c.to_string())
                    .filter(|c| c != "rowid")
                    .collect();
                ours.sort();
                assert_eq!(
                    catalogue(db, table.name),
                    ours,
                    "{}: {}",
                    log.engine,
                    table.name
                );
            }
        }
    }

    #[test]
    fn an_empty_log_copies_as_nothing_and_a_target_with_a_row_is_refused() {
        let Some(url) = crate::store::test_cluster::database() else {
            return;
        };
        let sqlite = TestLog::sqlite();
        let location = Location::Postgres {
            url,
            password: None,
            ca_certificates: Vec::new(),
        };
        let copied = copy(&sqlite.conn, &location, &mut |_, _, _| {}).unwrap();
        assert_eq!(copied.len(), TABLES.len());
        assert!(copied.iter().all(|(_, n)| *n == 0), "an empty log");
        let pg = crate::store::connect(&location, crate::store::Durability::Full).unwrap();
        crate::store::tickets::record_send(&pg, "a@x", 1, true, None, 10).unwrap();
        let refused = copy(&sqlite.conn, &location, &mut |_, _, _| {})
            .unwrap_err()
            .to_string();
        assert!(refused.contains("not empty (1 in sends)"), "{refused}");
    }

    /// Every row of `table`, walked as the copy walks it.
    fn dump(db: &Db, table: &Table) -> Vec<Vec<Owned>> {
        let mut rows = Vec::new();
        let mut last: Option<Vec<Owned>> = None;
        loop {
            let batch = next_batch(db, table, last.as_deref()).unwrap();
            let Some(end) = batch.last() else { break };
            last = Some(key_of(table, end));
            rows.extend(batch);
        }
        rows
    }

    #[test]
    fn a_postgres_log_copied_into_sqlite_and_back_keeps_every_value() {
        let Some(url) = crate::store::test_cluster::database() else {
            return;
        };
        let source = crate::store::connect(
            &Location::Postgres {
                url,
                password: None,
                ca_certificates: Vec::new(),
            },
            crate::store::Durability::Full,
        )
        .unwrap();
        let not_utf8: &[u8] = &[0xff, 0x00, 0xfe, b'\r', b'\n'];
        let long = "é".repeat(70_000);
        source
            .batch(
                "INSERT INTO tickets (id, number, subject, state, created_at, updated_at)
                 VALUES (7, 'TKT0000007', 'Écran', 'open', 1, 2);
                 INSERT INTO known_agents (address, name, first_seen) VALUES ('a@x', NULL, 3);",
            )
            .unwrap();
        source
            .exec(
                "INSERT INTO raw_messages (id, received_at, rcpt_to, data) VALUES (3, 4, '[]', ?1)",
                super::super::args![not_utf8],
            )
            .unwrap();
        source
            .exec(
                "INSERT INTO entries (id, ticket_id, kind, from_addr, at, subject, body, raw_id, long_body)
                 VALUES (9, 7, 'comment', 'b@x', 5, 'Écran', '', 3, ?1)",
                super::super::args![long.as_str()],
            )
            .unwrap();
        // More notices than a batch: the walk along a key of three columns.
        for i in 0..(BATCH_ROWS + 500) {
            source
                .exec(
                    "INSERT INTO reply_all_notices (ticket_id, agent, day) VALUES (7, ?1, ?2)",
                    super::super::args![
                        format!("agent{}@x", i % 7).as_str(),
                        format!("2026-{i:05}").as_str()
                    ],
                )
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let file = Location::Sqlite(dir.path().join("copy.db"));
        let copied = copy(&source, &file, &mut |_, _, _| {}).unwrap();
        let notices = copied
            .iter()
            .find(|(t, _)| *t == "reply_all_notices")
            .unwrap();
        assert_eq!(notices.1, (BATCH_ROWS + 500) as u64);
        let sqlite = crate::store::connect(&file, crate::store::Durability::Full).unwrap();
        let back = Location::Postgres {
            url: crate::store::test_cluster::database().unwrap(),
            password: None,
            ca_certificates: Vec::new(),
        };
        copy(&sqlite, &back, &mut |_, _, _| {}).unwrap();
        let again = crate::store::connect(&back, crate::store::Durability::Full).unwrap();
        for table in TABLES {
            let original = dump(&source, table);
            assert_eq!(dump(&sqlite, table), original, "{} on SQLite", table.name);
            assert_eq!(
                dump(&again, table),
                original,
                "{} back on PostgreSQL",
                table.name
            );
        }
        // The next ticket after the copied one, on PostgreSQL.
        let next: i64 = again
            .query_row(
                "INSERT INTO tickets (number, subject, state, created_at, updated_at)
                 VALUES ('x', 's', 'new', 1, 1) RETURNING id",
                &[],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(next, 8);
    }

    #[test]
    fn a_batch_stops_at_its_bytes_and_the_walk_at_the_end() {
        let log = TestLog::sqlite();
        let db = &log.conn;
        let big = vec![7u8; 3 * 1024 * 1024];
        for _ in 0..5 {
            db.exec(
                "INSERT INTO raw_messages (received_at, rcpt_to, data) VALUES (1, 'a@x', ?1)",
                super::super::args![big.as_slice()],
            )
            .unwrap();
        }
        let table = TABLES.iter().find(|t| t.name == "raw_messages").unwrap();
        let mut sizes = Vec::new();
        let mut last: Option<Vec<Owned>> = None;
        loop {
            let batch = next_batch(db, table, last.as_deref()).unwrap();
            let Some(end) = batch.last() else { break };
            last = Some(key_of(table, end));
            sizes.push(batch.len());
        }
        // 8 MiB: two rows of 3 MiB a batch.
        assert_eq!(sizes, [2, 2, 1]);
    }

    #[test]
    fn a_target_is_a_postgres_or_sqlite_url_without_a_password() {
        assert!(matches!(
            target("postgres://crm@db.example.org/crm", None, Vec::new()).unwrap(),
            Location::Postgres { .. }
        ));
        assert_eq!(
            target("sqlite:///var/lib/crmgate/copy.db", None, Vec::new()).unwrap(),
            Location::Sqlite(PathBuf::from("/var/lib/crmgate/copy.db"))
        );
        let inline =
            target("postgres://crm:secret@db.example.org/crm", None, Vec::new()).unwrap_err();
        assert!(inline.to_string().contains("--password-file"), "{inline}");
        let other = target("mysql://db/crm", None, Vec::new()).unwrap_err();
        assert!(other.to_string().contains("postgres://"), "{other}");
    }
}
