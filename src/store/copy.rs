//! `crmgate store copy --to URL`: the whole SQLite log into an empty
//! PostgreSQL database, ids kept, so that ticket numbers, outbox ids and
//! threading stay what they were.
//!
//! The source is read in one transaction (a consistent snapshot while a
//! daemon may still write), the target written in one: a copy that fails
//! half-way leaves the target as empty as it was.

use super::db::{Db, Value};
use super::{Result, StoreError};

/// How a column is bound on the target.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
    Blob,
}
use Kind::{Blob, Int, Text};

/// A table in the order foreign keys allow, its columns, and the integer
/// key its rows are read along (in chunks: raw messages are large), if it
/// has one.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    key: Option<&'static str>,
}

const TABLES: &[Table] = &[
    Table {
        name: "tickets",
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
        key: Some("id"),
    },
    Table {
        name: "participants",
        columns: &[
            ("id", Int),
            ("ticket_id", Int),
            ("role", Text),
            ("address", Text),
            ("name", Text),
            ("added_at", Int),
        ],
        key: Some("id"),
    },
    Table {
        name: "raw_messages",
        columns: &[
            ("id", Int),
            ("received_at", Int),
            ("peer", Text),
            ("mail_from", Text),
            ("rcpt_to", Text),
            ("data", Blob),
        ],
        key: Some("id"),
    },
    Table {
        name: "entries",
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
        key: Some("id"),
    },
    Table {
        name: "attachments",
        columns: &[
            ("id", Int),
            ("entry_id", Int),
            ("filename", Text),
            ("content_type", Text),
            ("size", Int),
            ("data", Blob),
            ("sha256", Text),
            ("same_as", Int),
        ],
        key: Some("id"),
    },
    Table {
        name: "thread_ids",
        columns: &[
            ("message_id", Text),
            ("ticket_id", Int),
            ("agent_inbound", Int),
            ("at", Int),
            ("seq", Int),
        ],
        key: Some("seq"),
    },
    Table {
        name: "outbox",
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
        ],
        key: Some("id"),
    },
    Table {
        name: "outbox_messages",
        columns: &[("outbox_id", Int), ("message", Blob), ("plan", Text)],
        key: Some("outbox_id"),
    },
    Table {
        name: "sends",
        columns: &[
            ("rowid", Int),
            ("address", Text),
            ("ticket_id", Int),
            ("automatic", Int),
            ("at", Int),
            ("sender", Text),
        ],
        key: Some("rowid"),
    },
    Table {
        name: "quarantine",
        columns: &[
            ("id", Int),
            ("at", Int),
            ("reason", Text),
            ("sender", Text),
            ("subject", Text),
            ("message_id", Text),
            ("raw_id", Int),
        ],
        key: Some("id"),
    },
    Table {
        name: "known_agents",
        columns: &[
            ("address", Text),
            ("name", Text),
            ("first_seen", Int),
            ("removed_at", Int),
        ],
        key: None,
    },
    Table {
        name: "reply_all_notices",
        columns: &[("ticket_id", Int), ("agent", Text), ("day", Text)],
        key: None,
    },
];

/// The sequences of the target's generated keys, set past the copied ids.
const SEQUENCES: &[(&str, &str)] = &[
    ("tickets", "id"),
    ("participants", "id"),
    ("raw_messages", "id"),
    ("entries", "id"),
    ("attachments", "id"),
    ("thread_ids", "seq"),
    ("outbox", "id"),
    ("sends", "rowid"),
    ("quarantine", "id"),
];

/// Rows read at a time along a table's key.
const CHUNK: i64 = 500;

/// A value as read from SQLite, to be bound on the target.
enum Cell {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl Cell {
    fn value(&self) -> Value<'_> {
        match self {
            Cell::Null => Value::Null,
            Cell::Int(i) => Value::Int(*i),
            Cell::Text(t) => Value::Text(t),
            Cell::Blob(b) => Value::Blob(b),
        }
    }
}

/// What was copied: each table and its rows, in the order copied.
pub type Copied = Vec<(&'static str, u64)>;

/// Copy the SQLite log `from` into the empty PostgreSQL database `to`.
///
/// # Errors
/// `Invalid` when the source is not SQLite, the target not PostgreSQL, or
/// the target holds rows already (it names them); a database error (the
/// target is then left as it was).
pub fn copy(from: &Db, to: &mut Db) -> Result<Copied> {
    let Some(source) = from.sqlite() else {
        return Err(StoreError::Invalid(
            "store copy reads a SQLite log; for a PostgreSQL one, use pg_dump".into(),
        ));
    };
    if !to.is_postgres() {
        return Err(StoreError::Invalid(
            "store copy writes into a PostgreSQL database (--to postgres://…)".into(),
        ));
    }
    let mut held = Vec::new();
    for table in TABLES {
        let n: i64 = to.query_row(&format!("SELECT COUNT(*) FROM {}", table.name), &[], |r| {
            r.get(0)
        })?;
        if n > 0 {
            held.push(format!("{n} in {}", table.name));
        }
    }
    if !held.is_empty() {
        return Err(StoreError::Invalid(format!(
            "the target database is not empty ({}): nothing copied",
            held.join(", ")
        )));
    }
    // A deferred transaction: a snapshot, without the write lock.
    source.execute_batch("BEGIN")?;
    let copied = (|| {
        let tx = to.transaction()?;
        let mut copied = Vec::new();
        for table in TABLES {
            copied.push((table.name, copy_table(source, &tx, table)?));
        }
        for (table, column) in SEQUENCES {
            tx.batch(&format!(
                "SELECT setval(pg_get_serial_sequence('{table}', '{column}'), \
                 COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)"
            ))?;
        }
        tx.commit()?;
        Ok(copied)
    })();
    let _ = source.execute_batch("COMMIT");
    copied
}

fn copy_table(source: &rusqlite::Connection, to: &Db, table: &Table) -> Result<u64> {
    let names: Vec<&str> = table.columns.iter().map(|(n, _)| *n).collect();
    let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("?{i}")).collect();
    let insert = format!(
        "INSERT INTO {} ({}) VALUES ({})",
        table.name,
        names.join(", "),
        placeholders.join(", ")
    );
    let select = match table.key {
        Some(key) => format!(
            "SELECT {} FROM {} WHERE {key} > ?1 ORDER BY {key} LIMIT {CHUNK}",
            names.join(", "),
            table.name
        ),
        None => format!("SELECT {} FROM {}", names.join(", "), table.name),
    };
    let key_index = table.key.and_then(|k| names.iter().position(|n| *n == k));
    let mut after = i64::MIN;
    let mut count = 0;
    loop {
        let mut stmt = source.prepare_cached(&select)?;
        let mut rows = match table.key {
            Some(_) => stmt.query([after])?,
            None => stmt.query([])?,
        };
        let mut chunk = Vec::new();
        while let Some(row) = rows.next()? {
            let mut cells = Vec::with_capacity(names.len());
            for (i, (name, kind)) in table.columns.iter().enumerate() {
                cells.push(
                    cell(row, i, *kind).map_err(|why| {
                        StoreError::Invalid(format!("{}.{name}: {why}", table.name))
                    })?,
                );
            }
            chunk.push(cells);
        }
        drop(rows);
        drop(stmt);
        let full = i64::try_from(chunk.len()).unwrap_or(0) == CHUNK;
        for cells in &chunk {
            let values: Vec<Value<'_>> = cells.iter().map(Cell::value).collect();
            to.exec(&insert, &values)?;
            count += 1;
        }
        match (key_index, chunk.last()) {
            (Some(i), Some(last)) if full => match last[i] {
                Cell::Int(k) => after = k,
                _ => break,
            },
            _ => break,
        }
    }
    Ok(count)
}

/// Column `i` of a SQLite row as the target binds it: a long body, kept
/// by SQLite as a blob of UTF-8, becomes text.
fn cell(row: &rusqlite::Row<'_>, i: usize, kind: Kind) -> std::result::Result<Cell, String> {
    use rusqlite::types::ValueRef;
    let value = row.get_ref(i).map_err(|e| e.to_string())?;
    Ok(match (value, kind) {
        (ValueRef::Null, _) => Cell::Null,
        (ValueRef::Integer(v), Int) => Cell::Int(v),
        (ValueRef::Text(t) | ValueRef::Blob(t), Text) => {
            Cell::Text(String::from_utf8(t.to_vec()).map_err(|e| e.to_string())?)
        }
        (ValueRef::Blob(b) | ValueRef::Text(b), Blob) => Cell::Blob(b.to_vec()),
        (other, _) => return Err(format!("unexpected {:?}", other.data_type())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TestLog;

    #[test]
    fn every_table_of_both_schemas_is_copied_column_for_column() {
        let Some(url) = crate::store::test_cluster::database() else {
            return;
        };
        let sqlite = TestLog::sqlite();
        let columns = |table: &str| -> Vec<String> {
            sqlite
                .conn
                .query_all(
                    &format!("SELECT name FROM pragma_table_info('{table}') ORDER BY cid"),
                    &[],
                    |r| r.get(0),
                )
                .unwrap()
        };
        let tables: Vec<String> = sqlite
            .conn
            .query_all(
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite_%' ORDER BY name",
                &[],
                |r| r.get(0),
            )
            .unwrap();
        let mut listed: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
        listed.sort_unstable();
        assert_eq!(tables, listed, "a table the copy does not know");
        for table in TABLES {
            let mut known: Vec<String> = table
                .columns
                .iter()
                .filter(|(n, _)| *n != "rowid")
                .map(|(n, _)| n.to_string())
                .collect();
            known.sort();
            let mut there = columns(table.name);
            there.sort();
            assert_eq!(known, there, "{}", table.name);
        }

        let location = crate::store::Location::Postgres {
            url,
            password: None,
        };
        let mut pg = crate::store::connect(&location, crate::store::Durability::Full).unwrap();
        let copied = copy(&sqlite.conn, &mut pg).unwrap();
        assert!(copied.iter().all(|(_, n)| *n == 0), "an empty log");
        crate::store::tickets::record_send(&pg, "a@x", 1, true, None, 10).unwrap();
        let refused = copy(&sqlite.conn, &mut pg).unwrap_err().to_string();
        assert!(refused.contains("not empty (1 in sends)"), "{refused}");
    }
}
