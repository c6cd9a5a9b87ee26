use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::any::{AnyArguments, AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyPool, Connection, Executor};
use tokio::sync::watch;

use crate::StoreError;

/// This release's migrations for `backend`. Migrations a newer release
/// applied are let be: they only add (see docs/operations.md, "Upgrades"),
/// so during a rolling upgrade, or after a rollback, an older process still
/// starts on the newer schema.
fn migrator(backend: Backend) -> Migrator {
    let mut migrator = match backend {
        Backend::Sqlite => sqlx::migrate!("../../migrations/sqlite"),
        Backend::Postgres => sqlx::migrate!("../../migrations/postgres"),
    };
    migrator.set_ignore_missing(true);
    migrator
}

/// How long a Postgres migration waits for a lock (another start's
/// migration, or a table a long transaction holds) before it fails. Every
/// statement on a table queues behind a DDL statement waiting for it, so a
/// migration must not wait long.
pub const MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a start waits between attempts at a Postgres that refused.
const FIRST_CONNECT_RETRY: Duration = Duration::from_millis(250);

/// A query with its arguments bound, ready to run on either backend.
pub type AnyQuery<'q> = sqlx::query::Query<'q, Any, AnyArguments<'q>>;

/// A write transaction; commit it or it rolls back when dropped.
pub type Tx = sqlx::Transaction<'static, Any>;

/// Which database a [`Store`] speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Postgres: how long a statement may run, waiting for locks included,
    /// before the server cancels it (`statement_timeout`); `None` keeps the
    /// server's setting. A caller that gave up (an edge's call deadline)
    /// does not stop its statement, and behind a table another session
    /// holds locked, statements that nobody waits for any more would keep
    /// every pooled connection until the lock goes. Migrations run without
    /// it.
    pub statement_timeout: Option<Duration>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Some(DEFAULT_STATEMENT_TIMEOUT),
        }
    }
}

/// Postgres's bound on a statement by default: longer than any call's
/// deadline (10 s), far longer than any statement muster runs.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection pool to the StateStore.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Where write transactions run. SQLite has one writer at a time, and
    /// writers that find the file locked sleep in its busy handler (for
    /// milliseconds, growing): one connection for every write transaction
    /// makes them queue in the pool instead, in order. Postgres: `pool`.
    writer: AnyPool,
    backend: Backend,
    /// Counts commits made through [`Store::commit`] in this process: the
    /// in-process wake-up for outbox readers (polling covers the rest).
    commits: Arc<watch::Sender<u64>>,
    /// Postgres: the URL, for LISTEN connections outside the pool.
    url: Option<Arc<str>>,
}

/// Creates the SQLite file of `url` readable by its owner only when it is
/// missing and the URL lets SQLite create it: SQLite would make it with
/// the process's umask (often readable by everyone), and its journal files
/// take the database file's mode. It holds token digests and what peers
/// reported.
fn create_private_file(url: &str) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
    let path = options.get_filename();
    // SQLite reads a name that starts with `file:` as a URI (sqlx's own
    // in-memory databases are named so): not a path to create.
    let uri = path.to_str().is_none_or(|name| name.starts_with("file:"));
    let creates = url
        .split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|pair| pair == "mode=rwc"));
    if uri || !creates || path.as_os_str().is_empty() || path.exists() {
        return Ok(());
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Unavailable(format!(
            "creating {}: {e}",
            path.display()
        ))),
    }
}

/// Without the URL, whose password would reach wherever a store is
/// printed.
impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

/// `count` numbered parameters from `$first`, comma-separated: the
/// placeholders of a statement that carries many values (both backends
/// read `$n`).
pub fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `VALUES` of a statement that inserts `rows` rows of `columns`
/// values each: `($1, $2), ($3, $4)`.
pub fn values_rows(rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|row| format!("({})", placeholders(row * columns + 1, columns)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The last of each run of items with the same key, in the order of those
/// last ones: one statement may not insert-or-update the same row twice on
/// Postgres, and the last of consecutive upserts of a row is what stays.
pub fn last_of_each<'a, T, K: Eq + std::hash::Hash>(
    items: &[&'a T],
    key: impl Fn(&'a T) -> K,
) -> Vec<&'a T> {
    let mut last = std::collections::HashMap::with_capacity(items.len());
    for (n, item) in items.iter().enumerate() {
        last.insert(key(item), n);
    }
    items
        .iter()
        .enumerate()
        .filter(|(n, item)| last.get(&key(item)) == Some(n))
        .map(|(_, item)| *item)
        .collect()
}

/// A condition that the `columns` match one of `rows` tuples of
/// parameters, numbered from `$1`: `(a, b) IN (SELECT column1, column2
/// FROM (VALUES ($1, $2), …))`. Written as a subquery rather than a list
/// of row values, which older SQLite scans the table for.
pub fn tuples_in<const N: usize>(columns: [&str; N], rows: usize) -> String {
    let values: Vec<String> = (1..=N).map(|n| format!("column{n}")).collect();
    format!(
        "({}) IN (SELECT {} FROM (VALUES {}) AS tuples)",
        columns.join(", "),
        values.join(", "),
        values_rows(rows, N)
    )
}

/// A batch of writes and removals, split into runs in which no key is both
/// written and removed. Within a run the writes and the removals touch
/// different rows, so each kind may go as one statement, in either order,
/// and leave what applying the batch item by item would: consecutive
/// arrivals and departures of a reconnect storm share two statements
/// instead of taking one each. `key` gives an item's key and whether it
/// is a removal.
pub fn conflict_free_runs<'a, T, K: Eq + std::hash::Hash>(
    items: &'a [T],
    key: impl Fn(&'a T) -> (K, bool),
) -> Vec<&'a [T]> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut written = std::collections::HashSet::new();
    let mut removed = std::collections::HashSet::new();
    for (n, item) in items.iter().enumerate() {
        let (key, removal) = key(item);
        let (own, other) = if removal {
            (&mut removed, &mut written)
        } else {
            (&mut written, &mut removed)
        };
        if other.contains(&key) {
            runs.push(&items[start..n]);
            start = n;
            written.clear();
            removed.clear();
            if removal {
                removed.insert(key);
            } else {
                written.insert(key);
            }
        } else {
            own.insert(key);
        }
    }
    if start < items.len() {
        runs.push(&items[start..]);
    }
    runs
}

/// Deletes the rows of `table` that the removals among `run` (a run of
/// [`conflict_free_runs`]) name by their key `columns` (a removal may
/// name more columns than the key, to delete only a row as it stands),
/// many per statement; `removal` gives a removal's values, `None` for a
/// write. Returns, per item of `run`, whether it changed a row: a write
/// always does, a removal if the row was there (of one removed twice, the
/// first).
pub async fn remove_in_run<'a, T, const N: usize>(
    tx: &mut crate::Tx,
    table: &str,
    columns: [&str; N],
    run: &'a [T],
    removal: impl Fn(&'a T) -> Option<[&'a str; N]>,
) -> Result<Vec<bool>, StoreError> {
    use sqlx::Row;
    let keys: Vec<[&str; N]> = run.iter().filter_map(&removal).collect();
    let mut deleted = std::collections::HashSet::with_capacity(keys.len());
    for chunk in in_statements(&keys, N) {
        let sql = format!(
            "DELETE FROM {table} WHERE {} RETURNING {}",
            tuples_in(columns, chunk.len()),
            columns.join(", ")
        );
        let query = chunk.iter().fold(sqlx::query(&sql), |q, key| {
            key.iter().fold(q, |q, value| q.bind(*value))
        });
        for row in query.fetch_all(&mut **tx).await? {
            let key = (0..N)
                .map(|n| row.try_get::<String, _>(n))
                .collect::<Result<Vec<_>, _>>()?;
            deleted.insert(key);
        }
    }
    Ok(run
        .iter()
        .map(|item| match removal(item) {
            None => true,
            Some(key) => deleted.remove(key.map(str::to_owned).as_slice()),
        })
        .collect())
}

/// `rows` split into the chunks of multi-row statements of `columns`
/// values per row: up to 16 rows go in one statement; more go in chunks of
/// 64, 32 or 16 and then one for the rest (50 rows: 32 + 16 + 2). So a
/// batch takes one to a few statements, and each kind of statement has at
/// most 19 shapes, which stay prepared in each connection's cache instead
/// of one per row count. A chunk's parameters stay within SQLite's oldest
/// limit of 999.
pub fn in_statements<T>(rows: &[T], columns: usize) -> Vec<&[T]> {
    const EXACT: usize = 16;
    let largest = [64, 32, 16, 8, 4, 2, 1]
        .into_iter()
        .find(|size| size * columns <= 999)
        .unwrap_or(1);
    let mut chunks = Vec::new();
    let mut rest = rows;
    while !rest.is_empty() {
        let size = if rest.len() <= EXACT.min(largest) {
            rest.len()
        } else {
            (1 << rest.len().ilog2()).min(largest)
        };
        let (chunk, tail) = rest.split_at(size);
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

/// The Postgres channel a commit through [`Store::commit`] wakes.
pub const COMMITS_CHANNEL: &str = "muster_commits";

/// Milliseconds since the Unix epoch: the one time format of the schema.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How long a pooled connection may sit idle before it is pinged on
/// acquire.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// After a statement fails because its connection broke, every acquire
/// pings for this long: a server restart breaks all pooled connections at
/// once, and without the ping each of them would fail one more caller.
const SUSPECT_FOR_MS: i64 = 10_000;

/// Until when (ms since the epoch) acquired connections are pinged. One
/// value for the process: a broken connection in one pool says little
/// about another pool's, but an extra ping is cheap and a failed caller is
/// not.
static SUSPECT_UNTIL_MS: AtomicI64 = AtomicI64::new(0);

/// Makes every acquire ping its connection for a while.
pub(crate) fn suspect_connections() {
    SUSPECT_UNTIL_MS.fetch_max(now_ms() + SUSPECT_FOR_MS, Ordering::Relaxed);
}

impl Store {
    /// Connects to `sqlite://PATH` (created when missing) or
    /// `postgres://…`.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_owned(),
        };
        if backend == Backend::Sqlite {
            create_private_file(&url)?;
        }
        let connect = AnyConnectOptions::from_str(&url)?;
        let mut pool = AnyPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // By default every acquire pings the connection first: a round
            // trip (a thread hop on SQLite) before every statement. Only a
            // connection that sat idle is checked, or any while connections
            // are suspect because one of them just broke.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for < IDLE_BEFORE_PING
                        && SUSPECT_UNTIL_MS.load(Ordering::Relaxed) < now_ms()
                    {
                        return Ok(true);
                    }
                    Ok(conn.ping().await.is_ok())
                })
            });
        if backend == Backend::Sqlite {
            pool = pool.after_connect(|conn, _| {
                Box::pin(async move {
                    for pragma in [
                        "PRAGMA journal_mode = WAL",
                        "PRAGMA synchronous = FULL",
                        "PRAGMA busy_timeout = 10000",
                        "PRAGMA foreign_keys = ON",
                    ] {
                        conn.execute(pragma).await?;
                    }
                    Ok(())
                })
            });
        }
        if backend == Backend::Postgres
            && let Some(timeout) = options.statement_timeout
        {
            // At least 1 ms: 0 would mean no limit.
            let set = format!(
                "SET statement_timeout = {}",
                timeout.as_millis().clamp(1, i32::MAX as u128)
            );
            pool = pool.after_connect(move |conn, _| {
                let set = set.clone();
                Box::pin(async move {
                    conn.execute(set.as_str()).await?;
                    Ok(())
                })
            });
        }
        let writer = match backend {
            Backend::Sqlite => Some(
                pool.clone()
                    .max_connections(1)
                    .connect_with(connect.clone())
                    .await?,
            ),
            Backend::Postgres => None,
        };
        if backend == Backend::Postgres {
            // One connection first, on its own: a pool whose connections
            // fail reports only that it timed out, and an operator needs
            // the reason (refused, no such host, password, TLS).
            // A server that is starting (or refusing until it listens, as
            // beside it in a pod) is waited for, as the pool would.
            let deadline = tokio::time::Instant::now() + options.acquire_timeout;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let error =
                    match tokio::time::timeout(left, sqlx::AnyConnection::connect_with(&connect))
                        .await
                    {
                        Ok(Ok(first)) => {
                            let _ = first.close().await;
                            break;
                        }
                        Ok(Err(error)) => error,
                        Err(_) => return Err(StoreError::Database(sqlx::Error::PoolTimedOut)),
                    };
                let transient = match &error {
                    sqlx::Error::Io(_) => true,
                    // cannot_connect_now (starting up), too_many_connections
                    sqlx::Error::Database(db) => db
                        .code()
                        .is_some_and(|code| matches!(&*code, "57P03" | "53300")),
                    _ => false,
                };
                if !transient || tokio::time::Instant::now() + FIRST_CONNECT_RETRY >= deadline {
                    return Err(error.into());
                }
                tokio::time::sleep(FIRST_CONNECT_RETRY).await;
            }
        }
        let pool = pool.connect_with(connect).await?;
        let writer = writer.unwrap_or_else(|| pool.clone());
        let commits = Arc::new(watch::channel(0).0);
        if backend == Backend::Postgres {
            tokio::spawn(notify_commits(pool.clone(), commits.subscribe()));
        }
        Ok(Store {
            pool,
            writer,
            backend,
            commits,
            url: (backend == Backend::Postgres).then(|| Arc::from(url.as_str())),
        })
    }

    /// The single-host store: a SQLite file.
    pub async fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        Store::connect(
            &format!("sqlite://{}", path.display()),
            &StoreOptions::default(),
        )
        .await
    }

    /// Applies every pending migration of this backend's dialect.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.migrate_waiting_at_most(MIGRATION_LOCK_TIMEOUT).await
    }

    /// [`Store::migrate`], a Postgres migration waiting at most
    /// `lock_timeout` for each lock.
    pub async fn migrate_waiting_at_most(&self, lock_timeout: Duration) -> Result<(), StoreError> {
        let migrator = migrator(self.backend);
        if self.backend == Backend::Sqlite {
            migrator.run(&self.pool).await?;
            return Ok(());
        }
        // A migration may rewrite a large table: no statement timeout. The
        // connection is closed after, not returned to the pool without it.
        let mut conn = self.pool.acquire().await?.detach();
        conn.execute("SET statement_timeout = 0").await?;
        conn.execute(
            format!(
                "SET lock_timeout = {}",
                lock_timeout.as_millis().clamp(1, i32::MAX as u128)
            )
            .as_str(),
        )
        .await?;
        let migrated = migrator.run(&mut conn).await;
        let _ = conn.close().await;
        migrated?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// For reads (and Postgres-only statements).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// For writes outside [`Store::begin`] (autocommitted statements). On
    /// SQLite this is the one writer connection, so such a write queues
    /// with the transactions in order; through the reader pool it would
    /// meet them in SQLite's busy handler, which sleeps in steps of up to
    /// 100 ms and stalled every writer behind it.
    pub fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// Starts a write transaction.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        let statement = match self.backend {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        };
        Ok(self.writer.begin_with(statement).await?)
    }

    /// Commits a write transaction and wakes this process's outbox readers.
    pub async fn commit(&self, tx: Tx) -> Result<(), StoreError> {
        tx.commit().await?;
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Changes whenever a transaction commits through [`Store::commit`].
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Postgres: a receiver that changes whenever `channel` is notified by
    /// any process, and after the listening connection was lost (anything
    /// may have happened meanwhile). `None` on SQLite, which is one
    /// process. The listener stops when every receiver is gone.
    pub fn listen(&self, channel: &'static str) -> Option<watch::Receiver<u64>> {
        let url = self.url.clone()?;
        let (wake, woken) = watch::channel(0u64);
        tokio::spawn(listen(url, channel, wake));
        Some(woken)
    }

    /// Runs `query` and maps the row it finds, if any.
    pub async fn fetch_optional<T>(
        &self,
        query: AnyQuery<'_>,
        map: impl Fn(&AnyRow) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        query
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(map)
            .transpose()
    }

    /// Runs `query` and maps every row.
    pub async fn fetch_all<T>(
        &self,
        query: AnyQuery<'_>,
        map: impl Fn(&AnyRow) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        query.fetch_all(&self.pool).await?.iter().map(map).collect()
    }

    /// Checks the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Waits for connections to be returned, then closes them.
    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }
}

/// Sends one `NOTIFY` for any number of commits that happened while the
/// previous one was in flight: a wake-up per batch, never per row and never
/// inside the appending transaction (a NOTIFY there serialises commits).
async fn notify_commits(pool: AnyPool, mut commits: watch::Receiver<u64>) {
    while commits.changed().await.is_ok() {
        commits.borrow_and_update();
        let sent = sqlx::query("SELECT pg_notify($1, '')")
            .bind(COMMITS_CHANNEL)
            .execute(&pool)
            .await;
        if let Err(error) = sent {
            if pool.is_closed() {
                return;
            }
            tracing::debug!(%error, "commit notify failed; readers fall back to polling");
        }
    }
}

async fn listen(url: Arc<str>, channel: &'static str, wake: watch::Sender<u64>) {
    let bump = |wake: &watch::Sender<u64>| wake.send_modify(|n| *n = n.wrapping_add(1));
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
            listener.listen(channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = wake.closed() => return,
            listener = listener => match listener {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::debug!(%error, channel, "listen failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        // Whatever was notified before this connection listened is covered
        // by one wake-up now.
        bump(&wake);
        loop {
            tokio::select! {
                _ = wake.closed() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => bump(&wake),
                    // The connection was lost and is re-established on the
                    // next call; notifications meanwhile are lost.
                    Ok(None) => bump(&wake),
                    Err(error) => {
                        tracing::debug!(%error, channel, "listener broke; reconnecting");
                        bump(&wake);
                        break;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_sqlite_file_and_its_journal_are_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // As a shared data directory would be.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("muster.db");
        let store = Store::open_sqlite(&path).await.unwrap();
        store.migrate().await.unwrap();
        for file in ["muster.db", "muster.db-wal"] {
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{file}: {mode:o}");
        }
        store.close().await;
        // A directory that is not there is the caller's to make.
        let missing = dir.path().join("no/such/dir/muster.db");
        assert!(Store::open_sqlite(&missing).await.is_err());
        assert!(!missing.exists());
    }

    #[tokio::test]
    async fn in_memory_and_uri_forms_leave_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let before: Vec<_> = std::fs::read_dir(".")
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        let store = Store::connect("sqlite::memory:", &StoreOptions::default())
            .await
            .unwrap();
        store.close().await;
        let uri = format!("sqlite:file:{}?mode=rwc", dir.path().join("u.db").display());
        let store = Store::connect(&uri, &StoreOptions::default())
            .await
            .unwrap();
        store.close().await;
        let after: Vec<_> = std::fs::read_dir(".")
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(before, after, "no file in the working directory");
        assert!(dir.path().join("u.db").exists());
    }

    #[test]
    fn statements_come_in_a_few_sizes_within_the_parameter_limit() {
        let rows: Vec<u32> = (0..157).collect();
        let sizes: Vec<usize> = in_statements(&rows, 9).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [64, 64, 16, 13]);
        let sizes: Vec<usize> = in_statements(&rows[..10], 9)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(sizes, [10]);
        let sizes: Vec<usize> = in_statements(&rows[..50], 12)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(sizes, [32, 16, 2]);
        let sizes: Vec<usize> = in_statements(&rows[..3], 500)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(sizes, [1, 1, 1]);
        assert!(in_statements::<u32>(&[], 9).is_empty());
        let flat: Vec<u32> = in_statements(&rows, 12).concat();
        assert_eq!(flat, rows);
    }

    #[test]
    fn runs_break_where_a_key_is_both_written_and_removed() {
        // (key, removal)
        let items = [
            ("a", false),
            ("b", true),
            ("c", false),
            ("a", false),
            ("d", true),
            ("d", true),
            ("c", true),
            ("e", false),
            ("c", false),
            ("a", true),
        ];
        let runs: Vec<usize> = conflict_free_runs(&items, |(k, r)| (*k, *r))
            .iter()
            .map(|run| run.len())
            .collect();
        // "c" is written, removed, then written again: each time a run
        // begins. "a" was written only in the first run, so its removal
        // joins the last.
        assert_eq!(runs, [6, 2, 2]);
        assert_eq!(runs.iter().sum::<usize>(), items.len());
        assert!(conflict_free_runs(&items[..0], |(k, r)| (*k, *r)).is_empty());
        let alone: Vec<usize> = conflict_free_runs(&items[..3], |(k, r)| (*k, *r))
            .iter()
            .map(|run| run.len())
            .collect();
        assert_eq!(alone, [3]);
    }

    #[test]
    fn values_number_every_row_and_the_last_upsert_of_a_key_stays() {
        assert_eq!(values_rows(2, 2), "($1, $2), ($3, $4)");
        assert_eq!(
            tuples_in(["a", "b"], 2),
            "(a, b) IN (SELECT column1, column2 FROM (VALUES ($1, $2), ($3, $4)) AS tuples)"
        );
        assert_eq!(
            tuples_in(["a", "b", "c"], 1),
            "(a, b, c) IN (SELECT column1, column2, column3 FROM (VALUES ($1, $2, $3)) AS tuples)"
        );
        let items = [(1, "a"), (2, "b"), (1, "c")];
        let refs: Vec<&(i32, &str)> = items.iter().collect();
        let kept: Vec<&str> = last_of_each(&refs, |(k, _)| *k)
            .iter()
            .map(|i| i.1)
            .collect();
        assert_eq!(kept, ["b", "c"]);
    }
}
