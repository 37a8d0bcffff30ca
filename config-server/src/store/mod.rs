//! The configuration server's embedded database (SQLite, WAL): the lab CA, the passphrase,
//! and the inventory (components, hosts and their machines, disks, datastores), policies,
//! replicated items, recovery points, recovery plans and jobs. ASR keeps the same in its CS
//! MySQL database, and failback needs the machine to be there, so this file is what
//! `config-server backup` copies: a CS restored from it keeps the CA, the passphrase and
//! every registration.
//!
//! # Threading and durability
//! One thread ("cs-db") owns the connection; async code hands it closures through
//! [`Store::call`] and awaits the answer, so no runtime worker ever waits on SQLite or an
//! fsync. The thread commits group-wise: it takes every closure queued meanwhile, runs each in
//! its own savepoint (a failing one rolls back alone) inside one transaction, commits once
//! (`synchronous=FULL`: one fsync for the group) and only then answers the callers. A caller
//! that got `Ok` knows its change is durable.
//!
//! # Layout
//! - [`schema`]: the versioned schema and its migrations (`PRAGMA user_version`).
//! - [`components`], [`items`], [`jobs`], [`plans`]: the SQL of each table group, as methods
//!   of [`Db`], the view of the connection a closure gets.

mod components;
mod items;
mod jobs;
mod plans;
mod schema;

use std::path::Path;
use std::sync::mpsc as std_mpsc;

use rusqlite::Connection;
use tokio::sync::oneshot;

pub use components::{ComponentRow, DiskRow};
pub use items::StateError;
pub use jobs::JobRow;
pub use schema::SCHEMA_VERSION;

/// A database failure; shown to callers as an internal error.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("configuration server database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("configuration server database: the database thread is gone")]
    Gone,
    #[error(
        "configuration server database: schema version {found} is newer than this configuration server's ({supported}); run a newer config-server"
    )]
    TooNew { found: i64, supported: i64 },
}

impl From<DbError> for tonic::Status {
    fn from(e: DbError) -> Self {
        tracing::error!("{e}");
        tonic::Status::internal(e.to_string())
    }
}

/// The connection as a closure sees it: inside a transaction (a savepoint of its own).
pub struct Db<'c> {
    c: &'c Connection,
}

/// What the database thread runs: the closure, then (after the group's commit) the answer.
type Op = Box<dyn FnOnce(&Connection) -> Box<dyn FnOnce(Result<(), String>) + Send> + Send>;

/// Most closures committed in one transaction.
const MAX_GROUP: usize = 256;

/// The handle to the database thread. Cheap to share behind the CS state.
pub struct Store {
    tx: std_mpsc::Sender<Op>,
}

impl Store {
    /// Opens (or creates) the database, brings its schema to [`SCHEMA_VERSION`] and starts
    /// the database thread.
    pub fn open(path: &Path) -> Result<Store, DbError> {
        private_file(path).map_err(io)?;
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(64);
        schema::migrate(&mut conn)?;
        let (tx, rx) = std_mpsc::channel::<Op>();
        std::thread::Builder::new()
            .name("cs-db".into())
            .spawn(move || run(conn, rx))
            .map_err(|e| DbError::Sql(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Store { tx })
    }

    /// Runs `f` on the database thread; its changes are committed before this returns `Ok`.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T, DbError> + Send + 'static,
    {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(op(f, move |r| {
                let _ = done.send(r);
            }))
            .map_err(|_| DbError::Gone)?;
        wait.await.map_err(|_| DbError::Gone)?
    }

    /// [`Store::call`] for synchronous code (opening the CS): blocks the calling thread.
    pub fn call_blocking<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T, DbError> + Send + 'static,
    {
        let (done, wait) = std_mpsc::sync_channel(1);
        self.tx
            .send(op(f, move |r| {
                let _ = done.send(r);
            }))
            .map_err(|_| DbError::Gone)?;
        wait.recv().map_err(|_| DbError::Gone)?
    }
}

fn op<T, F, D>(f: F, done: D) -> Op
where
    T: Send + 'static,
    F: FnOnce(&Db<'_>) -> Result<T, DbError> + Send + 'static,
    D: FnOnce(Result<T, DbError>) + Send + 'static,
{
    Box::new(move |conn: &Connection| {
        let result = savepoint(conn, f);
        Box::new(move |committed: Result<(), String>| {
            let answer = match (result, committed) {
                (Ok(v), Ok(())) => Ok(v),
                (Ok(_), Err(e)) => Err(DbError::Sql(rusqlite::Error::ToSqlConversionFailure(
                    e.into(),
                ))),
                (Err(e), _) => Err(e),
            };
            done(answer);
        })
    })
}

/// Runs `f` in a savepoint: released if it succeeds, rolled back alone if it fails.
fn savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Db<'_>) -> Result<T, DbError>,
) -> Result<T, DbError> {
    // Cached statements: a group runs one savepoint per closure, thousands a second at scale,
    // and `execute_batch` would parse each anew.
    conn.prepare_cached("SAVEPOINT op")?.execute([])?;
    match f(&Db { c: conn }) {
        Ok(v) => {
            conn.prepare_cached("RELEASE op")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO op; RELEASE op");
            Err(e)
        }
    }
}

/// The database thread: group commit of whatever is queued.
fn run(conn: Connection, rx: std_mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = e.to_string();
            tracing::error!("configuration server database: cannot begin: {msg}");
            for op in group {
                // Nothing can be committed: every caller gets the error.
                (op(&conn))(Err(msg.clone()));
            }
            continue;
        }
        let answers: Vec<_> = group.into_iter().map(|op| op(&conn)).collect();
        let committed = conn.execute_batch("COMMIT").map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            tracing::error!("configuration server database: commit failed: {e}");
            e.to_string()
        });
        for answer in answers {
            answer(committed.clone());
        }
    }
}

/// Collects `(key, value)` rows into each key's values, in row order (one query read for many
/// items instead of a query per item).
fn grouped<V>(
    rows: impl Iterator<Item = rusqlite::Result<(String, V)>>,
) -> Result<std::collections::HashMap<String, Vec<V>>, DbError> {
    let mut all: std::collections::HashMap<String, Vec<V>> = Default::default();
    for row in rows {
        let (key, value) = row?;
        all.entry(key).or_default().push(value);
    }
    Ok(all)
}

/// Makes the database file the owner's only (0600) before SQLite opens it: it holds the CA
/// key and the passphrase. SQLite gives its `-wal` and `-shm` files the database file's mode;
/// those left by an older run are fixed too.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

fn io(e: std::io::Error) -> DbError {
    DbError::Sql(rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Copies the database at `db` to `to` while a CS may be writing it (SQLite online backup:
/// a consistent snapshot, the server keeps running). The copy is the owner's only.
pub fn backup(db: &Path, to: &Path) -> Result<(), DbError> {
    let src = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.busy_timeout(std::time::Duration::from_secs(5))?;
    private_file(to).map_err(io)?;
    let mut dst = Connection::open(to)?;
    let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
    backup.run_to_completion(256, std::time::Duration::from_millis(5), None)?;
    Ok(())
}
