//! The store's connection over either engine: SQLite (the embedded
//! default) or PostgreSQL (a database several instances share).
//!
//! Every query of the store is written once, in the SQL both engines
//! read (`?N` placeholders, `ON CONFLICT … DO NOTHING`, `RETURNING id`,
//! `COALESCE`, integers as BIGINT); [`Db`] rewrites the placeholders for
//! PostgreSQL once per statement and keeps every statement prepared, on
//! both engines. Rows are read by index through [`Row::get`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use postgres::types::{IsNull, ToSql, Type};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::CertificateDer;

use super::{Result, StoreError};

/// A value bound to a `?N` placeholder: borrowed, so a 25 MB body is not
/// copied to be stored.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    /// SQL NULL (typed by its column on PostgreSQL).
    Null,
    /// Every integer and flag (BIGINT on PostgreSQL; flags are 0 or 1).
    Int(i64),
    /// UTF-8 text.
    Text(&'a str),
    /// Bytes bound as they are.
    Blob(&'a [u8]),
    /// Bytes that SQLite writes in place after the insert when they are
    /// large ([`Db::fill_in_place`]): bound whole, SQLite copies a value
    /// twice more while it builds the row. PostgreSQL binds them.
    Large(&'a [u8]),
    /// Text that SQLite keeps as a blob written in place when it is large
    /// (an entry's `long_body`); PostgreSQL binds it as text.
    LargeText(&'a str),
    /// A `BIGINT[]`, for what PostgreSQL does to many rows in one
    /// statement (`id = ANY(?1)`); SQLite, which has no arrays, refuses it.
    Ints(&'a [i64]),
}

/// Above this size SQLite writes a blob in place ([`Value::Large`]).
pub const BLOB_IN_PLACE: usize = 64 * 1024;

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<u32> for Value<'_> {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(v)
    }
}
impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Text(v)
    }
}
impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(v: &'a [u8]) -> Self {
        Value::Blob(v)
    }
}
impl<'a, T: Into<Value<'a>>> From<Option<T>> for Value<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}
impl<'a> From<&'a Option<String>> for Value<'a> {
    fn from(v: &'a Option<String>) -> Self {
        v.as_deref().map_or(Value::Null, Value::Text)
    }
}

/// The parameters of one statement: `args![a, b, c]`.
#[macro_export]
#[doc(hidden)]
macro_rules! store_args {
    ($($x:expr),* $(,)?) => {
        &[$($crate::store::db::Value::from($x)),*][..]
    };
}
pub use store_args as args;

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match *self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(i)),
            Value::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            Value::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Value::Large(b) => room(b)?,
            Value::LargeText(t) => room(t.as_bytes())?,
            Value::Ints(_) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    "an array bound on SQLite".into(),
                ))
            }
        })
    }
}

/// The bytes themselves when small, else room for them.
fn room(data: &[u8]) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
    use rusqlite::types::{ToSqlOutput, ValueRef};
    if data.len() <= BLOB_IN_PLACE {
        return Ok(ToSqlOutput::Borrowed(ValueRef::Blob(data)));
    }
    let len = i32::try_from(data.len()).map_err(|_| {
        rusqlite::Error::ToSqlConversionFailure(format!("a blob of {} bytes", data.len()).into())
    })?;
    Ok(ToSqlOutput::ZeroBlob(len))
}

impl ToSql for Value<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(i)?.to_sql(ty, out),
                Type::BOOL => (i != 0).to_sql(ty, out),
                _ => Err(format!("an integer bound to a {ty} parameter").into()),
            },
            // PostgreSQL's text holds no NUL, which mail may carry (a
            // broken client, a message made to test us): the character
            // becomes U+FFFD there, or the message would be refused with
            // 451 at every attempt of its sender. The raw message keeps
            // the bytes as they came (bytea).
            Value::Text(t) | Value::LargeText(t) if t.contains('\0') => {
                t.replace('\0', "\u{fffd}").as_str().to_sql(ty, out)
            }
            Value::Text(t) | Value::LargeText(t) => t.to_sql(ty, out),
            Value::Blob(b) | Value::Large(b) => b.to_sql(ty, out),
            Value::Ints(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// One row of a result, read by index.
pub enum Row<'r> {
    /// A row SQLite is stepping through.
    Sqlite(&'r rusqlite::Row<'r>),
    /// A row PostgreSQL sent.
    Postgres(&'r postgres::Row),
}

/// A column type both engines read: integers are BIGINT, text TEXT, bytes
/// BLOB / BYTEA.
pub trait Column: Sized {
    /// From SQLite.
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self>;
    /// From PostgreSQL.
    fn postgres(row: &postgres::Row, i: usize) -> std::result::Result<Self, postgres::Error>;
}

macro_rules! column_as_is {
    ($($t:ty),*) => {$(
        impl Column for $t {
            fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self> {
                row.get(i)
            }
            fn postgres(row: &postgres::Row, i: usize) -> std::result::Result<Self, postgres::Error> {
                row.try_get(i)
            }
        }
    )*};
}
column_as_is!(
    i64,
    Option<i64>,
    String,
    Option<String>,
    Vec<u8>,
    Option<Vec<u8>>
);

/// A flag: 0 or 1 in a BIGINT column on both engines.
impl Column for bool {
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self> {
        row.get(i)
    }
    fn postgres(row: &postgres::Row, i: usize) -> std::result::Result<Self, postgres::Error> {
        row.try_get::<_, i64>(i).map(|v| v != 0)
    }
}

impl Row<'_> {
    /// Column `i`.
    ///
    /// # Errors
    /// `Invalid` when the column does not hold a `T`.
    pub fn get<T: Column>(&self, i: usize) -> Result<T> {
        match self {
            Row::Sqlite(r) => Ok(T::sqlite(r, i)?),
            Row::Postgres(r) => {
                T::postgres(r, i).map_err(|e| StoreError::Invalid(format!("column {i}: {e}")))
            }
        }
    }

    /// A bytes column (or NULL) lent to `f`, not copied: a 25 MB raw
    /// message's text is read from it without a second 25 MB.
    ///
    /// # Errors
    /// The column holds neither bytes nor NULL.
    pub fn with_bytes<T>(&self, i: usize, f: impl FnOnce(Option<&[u8]>) -> T) -> Result<T> {
        match self {
            Row::Sqlite(r) => match r.get_ref(i)? {
                rusqlite::types::ValueRef::Null => Ok(f(None)),
                rusqlite::types::ValueRef::Blob(bytes) => Ok(f(Some(bytes))),
                other => Err(StoreError::Invalid(format!(
                    "column {i}: {:?} where bytes were expected",
                    other.data_type()
                ))),
            },
            Row::Postgres(r) => {
                let bytes: Option<&[u8]> = r
                    .try_get(i)
                    .map_err(|e| StoreError::Invalid(format!("column {i}: {e}")))?;
                Ok(f(bytes))
            }
        }
    }

    /// A text column that SQLite may hold as a blob of UTF-8 (a long body
    /// written in place).
    ///
    /// # Errors
    /// `Invalid` for bytes that are not UTF-8.
    pub fn text(&self, i: usize) -> Result<String> {
        match self {
            Row::Sqlite(r) => match r.get_ref(i)? {
                rusqlite::types::ValueRef::Blob(bytes) => String::from_utf8(bytes.to_vec())
                    .map_err(|e| StoreError::Invalid(format!("column {i}: {e}"))),
                _ => Ok(r.get(i)?),
            },
            Row::Postgres(_) => self.get(i),
        }
    }
}

/// The PostgreSQL side: a client and its prepared statements.
pub struct Pg {
    /// Always there but while the client is dropped ([`Pg::drop`]).
    client: RefCell<Option<postgres::Client>>,
    statements: RefCell<HashMap<String, postgres::Statement>>,
    /// Round trips to the server so far ([`Db::round_trips`]).
    round_trips: Cell<u64>,
    /// How long each transaction waits for a lock at most, in ms
    /// ([`Db::wait_for_locks_at_most`]); 0 for the server's default (as
    /// `lock_timeout = 0`: no bound).
    lock_wait_ms: Cell<u16>,
    /// To connect again when the server closed the connection: its
    /// configuration and TLS connector, boxed (a `Db` is moved around).
    again: Box<(postgres::Config, tokio_postgres_rustls::MakeRustlsConnect)>,
}

/// The sync client holds a runtime of its own, which may not be dropped
/// on a tokio thread (a relay worker's connection when its task is
/// dropped, a test's): it is closed on a thread of its own then.
impl Drop for Pg {
    fn drop(&mut self) {
        let Some(client) = self.client.get_mut().take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            let statements = std::mem::take(self.statements.get_mut());
            let _ = std::thread::Builder::new()
                .name("crmgate-pg-close".into())
                .spawn(move || drop((statements, client)));
        }
    }
}

/// A connection to the store's database, on either engine.
pub enum Db {
    /// The embedded default.
    Sqlite(rusqlite::Connection),
    /// A database several instances may share.
    Postgres(Pg),
}

/// rustls with the ring provider named (tokio-rustls is built with it
/// alone, and no process-wide default is installed), the roots of the web
/// PKI and the operator's own.
fn tls_connector(
    ca_certificates: &[CertificateDer<'static>],
) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for certificate in ca_certificates {
        roots
            .add(certificate.clone())
            .map_err(|e| StoreError::Invalid(format!("store.ca_file: {e}")))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Invalid(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A certificate the client does not trust says what to do about it; any
/// other error is the server's or the network's, as it came.
fn explain_tls(e: postgres::Error) -> StoreError {
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let rustls_error = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::InvalidCertificate(why)) = rustls_error {
            return StoreError::Invalid(format!(
                "store.url: the PostgreSQL server's TLS certificate is not trusted ({why:?}): \
                 give its CA in store.ca_file (crmgate store copy: --ca-file), \
                 or connect over a Unix socket or with sslmode=disable on a trusted network"
            ));
        }
        source = cause.source();
    }
    StoreError::Postgres(e)
}

/// `?N` → `$N`, outside string literals and quoted names.
pub fn postgres_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut quote: Option<char> = None;
    for c in sql.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '?' => {
                out.push('$');
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    out
}

fn pg_params<'v>(params: &'v [Value<'_>]) -> Vec<&'v (dyn ToSql + Sync)> {
    params.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl Pg {
    /// Open a client on `config`, over TLS when its `sslmode` asks for it
    /// (`require`) or allows it (`prefer`, the default, and the server
    /// offers TLS): the server's certificate is always verified, against
    /// the web PKI's roots and `ca_certificates`, and its name against the
    /// URL's host. A Unix socket never carries TLS (the server declines).
    ///
    /// # Errors
    /// The server cannot be reached or refuses; its certificate is not
    /// trusted (`Invalid`, naming `store.ca_file`).
    pub fn connect(
        config: &postgres::Config,
        ca_certificates: &[CertificateDer<'static>],
    ) -> Result<Pg> {
        let tls = tls_connector(ca_certificates)?;
        let client = config.connect(tls.clone()).map_err(explain_tls)?;
        Ok(Pg {
            client: RefCell::new(Some(client)),
            statements: RefCell::new(HashMap::new()),
            round_trips: Cell::new(0),
            lock_wait_ms: Cell::new(0),
            again: Box::new((config.clone(), tls)),
        })
    }

    /// `BEGIN`. A connection the server closed (a restart, a failover,
    /// an administrator's `pg_terminate_backend`) is opened again first,
    /// its statements prepared anew; one that fails inside a transaction
    /// fails that transaction (its messages are answered 451 and sent
    /// again), and the next one connects again.
    fn begin(&self) -> Result<()> {
        if self.client().is_closed() {
            self.reconnect()?;
        }
        // The bound, if any, in the same round trip.
        let begin = match self.lock_wait_ms.get() {
            0 => "BEGIN".to_string(),
            ms => format!("BEGIN; SET LOCAL lock_timeout = {ms}"),
        };
        self.trip(&begin);
        let begun = self.client().batch_execute(&begin);
        match begun {
            // Not the server's answer, or its last (`FATAL: terminating
            // connection due to administrator command`, which a server
            // shutting down or `pg_terminate_backend` sends before it
            // closes): the connection is gone, which the client may learn
            // only now.
            Err(e) if e.as_db_error().is_none_or(|db| db.severity() == "FATAL") => {
                self.reconnect()?;
                Ok(self.client().batch_execute(&begin)?)
            }
            done => Ok(done?),
        }
    }

    fn reconnect(&self) -> Result<()> {
        tracing::warn!("the PostgreSQL connection was closed: connecting again");
        let (config, tls) = &*self.again;
        let fresh = config.connect(tls.clone()).map_err(explain_tls)?;
        let old = self.client.replace(Some(fresh));
        let statements = std::mem::take(&mut *self.statements.borrow_mut());
        drop((statements, old));
        Ok(())
    }

    /// One more round trip, for `sql`: counted, and logged at the trace
    /// level (`CRMGATE_LOG=info,crmgate::store::statements=trace` lists every
    /// statement a message costs).
    fn trip(&self, sql: &str) {
        self.round_trips.set(self.round_trips.get() + 1);
        tracing::trace!(target: "crmgate::store::statements", sql);
    }

    /// The prepared statement of `sql`, prepared on its first use (one
    /// round trip more, once per connection); its execution is counted.
    fn statement(&self, sql: &str) -> Result<postgres::Statement> {
        if let Some(s) = self.statements.borrow().get(sql) {
            self.trip(sql);
            return Ok(s.clone());
        }
        self.trip("-- prepare");
        self.trip(sql);
        let prepared = self.client().prepare(&postgres_placeholders(sql))?;
        self.statements
            .borrow_mut()
            .insert(sql.to_string(), prepared.clone());
        Ok(prepared)
    }

    /// The client itself, for what only PostgreSQL does (`COPY`, locks).
    pub fn client(&self) -> std::cell::RefMut<'_, postgres::Client> {
        std::cell::RefMut::map(self.client.borrow_mut(), |c| {
            c.as_mut()
                .unwrap_or_else(|| unreachable!("the client is only taken when dropped"))
        })
    }
}

impl Db {
    /// Run one statement; the rows it changed.
    ///
    /// # Errors
    /// A database error.
    pub fn exec(&self, sql: &str, params: &[Value<'_>]) -> Result<u64> {
        match self {
            Db::Sqlite(c) => {
                Ok(c.prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(params))? as u64)
            }
            Db::Postgres(pg) => {
                let stmt = pg.statement(sql)?;
                Ok(pg.client().execute(&stmt, &pg_params(params))?)
            }
        }
    }

    /// The first row, if any, read by `f`.
    ///
    /// # Errors
    /// A database error, or `f`'s.
    pub fn query_opt<T>(
        &self,
        sql: &str,
        params: &[Value<'_>],
        f: impl FnOnce(&Row<'_>) -> Result<T>,
    ) -> Result<Option<T>> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
                match rows.next()? {
                    Some(r) => Ok(Some(f(&Row::Sqlite(r))?)),
                    None => Ok(None),
                }
            }
            Db::Postgres(pg) => {
                let stmt = pg.statement(sql)?;
                let rows = pg.client().query(&stmt, &pg_params(params))?;
                rows.first().map(|r| f(&Row::Postgres(r))).transpose()
            }
        }
    }

    /// The one row the query answers (an aggregate, a row known to be
    /// there).
    ///
    /// # Errors
    /// `NotFound` when there is no row; a database error, or `f`'s.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: &[Value<'_>],
        f: impl FnOnce(&Row<'_>) -> Result<T>,
    ) -> Result<T> {
        self.query_opt(sql, params, f)?
            .ok_or_else(|| StoreError::NotFound("no such row".into()))
    }

    /// Every row, each read by `f`.
    ///
    /// # Errors
    /// A database error, or `f`'s.
    pub fn query_all<T>(
        &self,
        sql: &str,
        params: &[Value<'_>],
        mut f: impl FnMut(&Row<'_>) -> Result<T>,
    ) -> Result<Vec<T>> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    out.push(f(&Row::Sqlite(r))?);
                }
                Ok(out)
            }
            Db::Postgres(pg) => {
                let stmt = pg.statement(sql)?;
                let rows = pg.client().query(&stmt, &pg_params(params))?;
                rows.iter().map(|r| f(&Row::Postgres(r))).collect()
            }
        }
    }

    /// Statements without parameters, separated by `;` (schema, pragmas).
    ///
    /// # Errors
    /// A database error.
    pub fn batch(&self, sql: &str) -> Result<()> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Db::Postgres(pg) => {
                pg.trip(sql);
                Ok(pg.client().batch_execute(sql)?)
            }
        }
    }

    /// How many round trips this connection has made to the server through
    /// these functions (each statement is one; preparing one is one more,
    /// the first time); 0 on SQLite, where a statement is a function call.
    /// What a message costs on PostgreSQL is the difference around it.
    pub fn round_trips(&self) -> u64 {
        match self {
            Db::Sqlite(_) => 0,
            Db::Postgres(pg) => pg.round_trips.get(),
        }
    }

    /// PostgreSQL: every transaction begun from now on, on this connection
    /// and the ones it opens again, waits for a row or advisory lock at
    /// most `ms` (`lock_timeout`), then fails with `55P03`, which
    /// [`super::StoreError::is_transient_conflict`] counts as a conflict to
    /// write again. Two instances' batches that lock two tickets in
    /// opposite orders otherwise wait for the server's deadlock check
    /// (`deadlock_timeout`, 1 s by default, which only a superuser may
    /// change). Nothing on SQLite.
    pub fn wait_for_locks_at_most(&self, ms: u16) {
        if let Db::Postgres(pg) = self {
            pg.lock_wait_ms.set(ms);
        }
    }

    /// Write `data` into the room a [`Value::Large`] made in the row just
    /// inserted (SQLite's incremental blob I/O); nothing to do on
    /// PostgreSQL, which was given the bytes.
    ///
    /// # Errors
    /// A database error.
    pub fn fill_in_place(
        &self,
        table: &'static str,
        column: &'static str,
        rowid: i64,
        data: &[u8],
    ) -> Result<()> {
        if let Db::Sqlite(c) = self {
            if data.len() > BLOB_IN_PLACE {
                let mut blob = c.blob_open(rusqlite::MAIN_DB, table, column, rowid, false)?;
                blob.write_all_at(data, 0)?;
                blob.close()?;
            }
        }
        Ok(())
    }

    /// The SQLite connection, for what only SQLite does (the writer's WAL,
    /// checkpoints, page cache); `None` on PostgreSQL.
    pub fn sqlite(&self) -> Option<&rusqlite::Connection> {
        match self {
            Db::Sqlite(c) => Some(c),
            Db::Postgres(_) => None,
        }
    }

    /// Whether this is a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }

    /// Begin a transaction that writes: on SQLite `BEGIN IMMEDIATE` (the
    /// write lock now, not at the first write, so a busy database waits at
    /// the start rather than failing mid-way); on PostgreSQL `BEGIN`. It
    /// rolls back when dropped without [`Tx::commit`].
    ///
    /// # Errors
    /// A database error.
    pub fn transaction(&mut self) -> Result<Tx<'_>> {
        let begin = match self {
            Db::Sqlite(_) => "BEGIN IMMEDIATE",
            Db::Postgres(_) => "",
        };
        match self {
            Db::Sqlite(_) => {
                self.exec(begin, &[])?;
            }
            Db::Postgres(pg) => pg.begin()?,
        }
        Ok(Tx {
            db: self,
            open: true,
        })
    }
}

/// A transaction on a [`Db`]: derefs to it; rolled back when dropped.
pub struct Tx<'d> {
    db: &'d mut Db,
    open: bool,
}

impl Tx<'_> {
    /// Commit, or fail and roll back.
    ///
    /// # Errors
    /// A database error: nothing of the transaction is kept.
    pub fn commit(mut self) -> Result<()> {
        self.open = false;
        match self.db.exec("COMMIT", &[]) {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = self.db.exec("ROLLBACK", &[]);
                Err(e)
            }
        }
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.db
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.db.exec("ROLLBACK", &[]);
        }
    }
}

/// Run `f` in a savepoint: released when it succeeds, rolled back (and
/// released) when it fails, so nothing of a failed step is left in the
/// transaction (on PostgreSQL, a failed statement also leaves the
/// transaction usable again). The statements are prepared once.
///
/// # Errors
/// The outer error: the savepoint itself could not be opened, released or
/// rolled back, so the transaction cannot be trusted (the caller rolls it
/// all back). The inner one: `f` failed, and nothing of it is left.
pub fn in_savepoint<T, E>(
    db: &Db,
    f: impl FnOnce(&Db) -> std::result::Result<T, E>,
) -> Result<std::result::Result<T, E>> {
    db.exec("SAVEPOINT step", &[])?;
    let result = f(db);
    if result.is_err() {
        db.exec("ROLLBACK TO SAVEPOINT step", &[])?;
    }
    db.exec("RELEASE SAVEPOINT step", &[])?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_quotes() {
        assert_eq!(
            postgres_placeholders("SELECT a FROM t WHERE b = ?1 AND c = '?' AND \"d?\" = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = '?' AND \"d?\" = $12"
        );
        assert_eq!(
            postgres_placeholders("SELECT 'it''s ?' , ?2"),
            "SELECT 'it''s ?' , $2"
        );
    }
}
