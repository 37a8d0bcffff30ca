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
//! Components' reports (progress, recovery points) are [`Store::submit`]ted: nobody waits for
//! them (their sender gets no answer either, and a report lost in a crash is as lost as one
//! still in flight), so a group of only such writes waits up to [`LINGER`] for company before
//! it commits. At 1,000 items that is a few commits a second instead of hundreds, each with
//! its fsync and its thread handoffs. A [`Store::call`] arriving meanwhile commits at once,
//! and goes ahead of submitted closures not yet run (after a CS restart the targets re-report
//! every recovery point; registrations and operator reads must not queue behind them). So a
//! call may not see a report submitted just before it; submitted closures keep their order.
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
type Run = Box<dyn FnOnce(&Connection) -> Box<dyn FnOnce(Result<(), String>) + Send> + Send>;

/// One closure queued for the database thread.
struct Op {
    run: Run,
    /// Nobody waits for it ([`Store::submit`]): its group may wait for more.
    lazy: bool,
}

/// Most closures committed in one transaction.
const MAX_GROUP: usize = 256;

/// How long a group of only submitted writes waits for more before it commits.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(50);

/// Most submitted closures queued at once: a submitter past it waits (the control stream it
/// reads from then stops being read, and its sender slows down), memory stays bounded.
pub const MAX_QUEUED: usize = 4096;

/// The handle to the database thread. Cheap to share behind the CS state.
pub struct Store {
    tx: std_mpsc::Sender<Op>,
    queued: std::sync::Arc<Queued>,
}

/// Submitted closures not yet done, and a wakeup for submitters waiting for room.
#[derive(Default)]
struct Queued {
    count: std::sync::atomic::AtomicUsize,
    room: tokio::sync::Notify,
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
        let queued = std::sync::Arc::new(Queued::default());
        let room = queued.clone();
        std::thread::Builder::new()
            .name("cs-db".into())
            .spawn(move || run(conn, rx, &room))
            .map_err(|e| DbError::Sql(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Store { tx, queued })
    }

    /// Runs `f` on the database thread; its changes are committed before this returns `Ok`.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T, DbError> + Send + 'static,
    {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Op {
                run: op(f, move |r| {
                    let _ = done.send(r);
                }),
                lazy: false,
            })
            .map_err(|_| DbError::Gone)?;
        wait.await.map_err(|_| DbError::Gone)?
    }

    /// Queues `f` without waiting for it to run: committed within [`LINGER`], in order with
    /// every other closure, and then `done` runs with the outcome (on the database thread: it
    /// must be quick and must not wait for the store). For writes whose sender expects no
    /// answer (components' reports). Waits only while [`MAX_QUEUED`] are queued.
    pub async fn submit<T, F, D>(&self, f: F, done: D) -> Result<(), DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T, DbError> + Send + 'static,
        D: FnOnce(Result<T, DbError>) + Send + 'static,
    {
        use std::sync::atomic::Ordering;
        loop {
            let room = self.queued.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.queued.count.load(Ordering::SeqCst) < MAX_QUEUED {
                break;
            }
            room.await;
        }
        self.queued.count.fetch_add(1, Ordering::SeqCst);
        self.tx
            .send(Op {
                run: op(f, done),
                lazy: true,
            })
            .map_err(|_| DbError::Gone)
    }

    /// [`Store::call`] for synchronous code (opening the CS): blocks the calling thread.
    pub fn call_blocking<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T, DbError> + Send + 'static,
    {
        let (done, wait) = std_mpsc::sync_channel(1);
        self.tx
            .send(Op {
                run: op(f, move |r| {
                    let _ = done.send(r);
                }),
                lazy: false,
            })
            .map_err(|_| DbError::Gone)?;
        wait.recv().map_err(|_| DbError::Gone)?
    }
}

fn op<T, F, D>(f: F, done: D) -> Run
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

/// What the database thread has taken off its channel and not yet run: calls (someone
/// waits) and submitted closures, each in arrival order.
#[derive(Default)]
struct Pending {
    calls: std::collections::VecDeque<Op>,
    submitted: std::collections::VecDeque<Op>,
}

impl Pending {
    fn push(&mut self, op: Op) {
        if op.lazy {
            self.submitted.push_back(op);
        } else {
            self.calls.push_back(op);
        }
    }

    fn is_empty(&self) -> bool {
        self.calls.is_empty() && self.submitted.is_empty()
    }

    /// Waits for work, then takes everything queued. While there are only submitted
    /// closures, fewer than a group, it waits up to [`LINGER`] for more (or for a call).
    /// `false`: the channel is closed and nothing is left.
    fn fill(&mut self, rx: &std_mpsc::Receiver<Op>) -> bool {
        if self.is_empty() {
            match rx.recv() {
                Ok(op) => self.push(op),
                Err(_) => return false,
            }
        }
        while let Ok(op) = rx.try_recv() {
            self.push(op);
        }
        let deadline = std::time::Instant::now() + LINGER;
        while self.calls.is_empty() && self.submitted.len() < MAX_GROUP {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(op) => self.push(op),
                Err(_) => break,
            }
        }
        true
    }

    /// The next group: every waiting call first (someone waits for each; a call never queues
    /// behind a backlog of reports), then submitted closures in order, at most [`MAX_GROUP`].
    fn group(&mut self) -> Vec<Op> {
        let mut group = Vec::new();
        while group.len() < MAX_GROUP {
            match self
                .calls
                .pop_front()
                .or_else(|| self.submitted.pop_front())
            {
                Some(op) => group.push(op),
                None => break,
            }
        }
        group
    }
}

/// The database thread: group commit of whatever is queued.
fn run(conn: Connection, rx: std_mpsc::Receiver<Op>, queued: &Queued) {
    let mut pending = Pending::default();
    while pending.fill(&rx) {
        let group = pending.group();
        let submitted = group.iter().filter(|op| op.lazy).count();
        commit(&conn, group);
        if submitted > 0 {
            queued
                .count
                .fetch_sub(submitted, std::sync::atomic::Ordering::SeqCst);
            queued.room.notify_waiters();
        }
    }
}

/// Runs `group` in one transaction, commits once, then answers each closure's caller.
fn commit(conn: &Connection, group: Vec<Op>) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let msg = e.to_string();
        tracing::error!("configuration server database: cannot begin: {msg}");
        for op in group {
            // Nothing can be committed: every caller gets the error.
            ((op.run)(conn))(Err(msg.clone()));
        }
        return;
    }
    let answers: Vec<_> = group.into_iter().map(|op| (op.run)(conn)).collect();
    let committed = conn.execute_batch("COMMIT").map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        tracing::error!("configuration server database: commit failed: {e}");
        e.to_string()
    });
    for answer in answers {
        answer(committed.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn store_with_table() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("cs.db")).expect("open");
        store
            .call(|db| Ok(db.c.execute_batch("CREATE TABLE t(n INTEGER NOT NULL)")?))
            .await
            .expect("create");
        (dir, store)
    }

    fn numbers(db: &Db<'_>) -> Result<Vec<i64>, DbError> {
        let mut stmt = db.c.prepare("SELECT n FROM t ORDER BY rowid")?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Submits an insert of `n`; the receiver answers once it is committed.
    async fn insert(store: &Store, n: Option<i64>) -> oneshot::Receiver<Result<usize, DbError>> {
        let (done, wait) = oneshot::channel();
        store
            .submit(
                move |db| Ok(db.c.execute("INSERT INTO t VALUES (?1)", [n])?),
                move |r| {
                    let _ = done.send(r);
                },
            )
            .await
            .expect("submit");
        wait
    }

    /// Holds the database thread until the returned sender is used (or dropped).
    async fn hold(store: &Store) -> (std_mpsc::Sender<()>, impl std::future::Future<Output = ()>) {
        let (release, held) = std_mpsc::channel::<()>();
        let (busy, is_busy) = std_mpsc::channel::<()>();
        let blocker = store.call(move |_| {
            let _ = busy.send(());
            let _ = held.recv();
            Ok(())
        });
        let mut blocker = Box::pin(blocker);
        tokio::select! {
            biased;
            _ = &mut blocker => panic!("the blocker returned while held"),
            _ = std::future::ready(()) => {}
        }
        is_busy
            .recv()
            .expect("the database thread runs the blocker");
        (release, async move { blocker.await.expect("blocker") })
    }

    #[tokio::test]
    async fn submitted_writes_commit_in_order() {
        let (dir, store) = store_with_table().await;
        let mut last = None;
        for n in 0..100i64 {
            last = Some(insert(&store, Some(n)).await);
        }
        last.expect("submitted")
            .await
            .expect("answered")
            .expect("inserted");
        let seen = store.call(numbers).await.expect("read");
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        drop(store);
        // Committed, not only visible: a fresh connection reads them all.
        let again = Store::open(&dir.path().join("cs.db")).expect("reopen");
        assert_eq!(again.call(numbers).await.expect("read").len(), 100);
    }

    #[tokio::test]
    async fn a_call_goes_ahead_of_a_backlog_of_submitted_writes() {
        let (_dir, store) = store_with_table().await;
        let (release, released) = hold(&store).await;
        let mut last = None;
        for n in 0..1000i64 {
            last = Some(insert(&store, Some(n)).await);
        }
        let read = store.call(numbers);
        tokio::pin!(read);
        tokio::select! {
            biased;
            _ = &mut read => panic!("the read ran while the database thread was held"),
            _ = std::future::ready(()) => {}
        }
        release.send(()).expect("release");
        released.await;
        assert!(
            read.await.expect("read").is_empty(),
            "the call ran before the 1,000 writes queued ahead of it"
        );
        last.expect("submitted")
            .await
            .expect("answered")
            .expect("inserted");
        assert_eq!(store.call(numbers).await.expect("read").len(), 1000);
    }

    #[tokio::test]
    async fn a_failing_submitted_write_rolls_back_alone() {
        let (_dir, store) = store_with_table().await;
        let failed = insert(&store, None).await;
        let ok = insert(&store, Some(2)).await;
        assert!(
            failed.await.expect("answered").is_err(),
            "NOT NULL violated"
        );
        ok.await.expect("answered").expect("inserted");
        assert_eq!(store.call(numbers).await.expect("read"), vec![2]);
    }

    #[tokio::test]
    async fn a_submitter_waits_while_the_queue_is_full_and_goes_on_when_it_drains() {
        let (_dir, store) = store_with_table().await;
        let (release, released) = hold(&store).await;
        for n in 0..MAX_QUEUED as i64 {
            drop(insert(&store, Some(n)).await);
        }
        let one_more = insert(&store, Some(-1));
        tokio::pin!(one_more);
        tokio::select! {
            biased;
            _ = &mut one_more => panic!("a submit past MAX_QUEUED did not wait"),
            _ = std::future::ready(()) => {}
        }
        release.send(()).expect("release");
        released.await;
        one_more
            .await
            .await
            .expect("answered")
            .expect("submitted once there was room");
        let seen = store.call(numbers).await.expect("read");
        assert_eq!(seen.len(), MAX_QUEUED + 1);
        assert_eq!(seen.last(), Some(&-1), "in order, last");
    }
}
