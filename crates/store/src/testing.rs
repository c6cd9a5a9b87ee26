//! Stores for tests: a fresh SQLite file, or a fresh database on the
//! Postgres server named by `MUSTER_TEST_DATABASE_URL`. A Postgres test
//! without that server fails; it never skips.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Store, StoreOptions};

/// The variable naming the Postgres server tests run against.
pub const DATABASE_URL_VAR: &str = "MUSTER_TEST_DATABASE_URL";

/// A migrated store on a new SQLite file; keep the directory alive.
pub async fn sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open_sqlite(&dir.path().join("muster.db"))
        .await
        .expect("open sqlite store");
    store.migrate().await.expect("migrate sqlite store");
    (store, dir)
}

/// The Postgres server URL, or a panic that says how to get one.
pub fn postgres_url() -> String {
    std::env::var(DATABASE_URL_VAR).unwrap_or_else(|_| {
        panic!(
            "{DATABASE_URL_VAR} is not set: run the suite with scripts/test, which starts a \
             throwaway Postgres, or point {DATABASE_URL_VAR} at a server"
        )
    })
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let server = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// How long a test database is kept: longer than any run of the suite.
const TEST_DATABASE_HOURS: u64 = 2;

/// Creates an empty database `muster_test_<unix time>_<pid>_<n>_<uuid>`
/// and returns its URL. Tests do not drop their databases (a test that
/// fails keeps its for a look); the first database a test process makes
/// drops those made more than [`TEST_DATABASE_HOURS`] ago, so a server of
/// a developer's own does not fill up run after run. (The suite's own
/// throwaway server goes whole.)
pub async fn create_postgres_database() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let url = postgres_url();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let first = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!(
        "muster_test_{now}_{}_{first}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let admin = Store::connect(
        &url,
        &StoreOptions {
            max_connections: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("cannot reach the test Postgres at {DATABASE_URL_VAR}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(admin.pool())
        .await
        .expect("create test database");
    if first == 0 {
        drop_old_test_databases(&admin, now.saturating_sub(TEST_DATABASE_HOURS * 3600)).await;
    }
    admin.close().await;
    with_database(&url, &name)
}

/// Drops the test databases made before `before` (unix seconds). One in
/// use, or dropped by another process first, is left to the next sweep.
async fn drop_old_test_databases(admin: &Store, before: u64) {
    let Ok(names) = admin
        .fetch_all(
            sqlx::query(
                "SELECT datname::text FROM pg_database WHERE datname LIKE 'muster\\_test\\_%'",
            ),
            |row| Ok(sqlx::Row::try_get::<String, _>(row, 0)?),
        )
        .await
    else {
        return;
    };
    for name in names {
        let made = name
            .strip_prefix("muster_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        // Names of earlier releases carried no time: the pid came first,
        // a number far below any time since 2001.
        let old = made.is_some_and(|made| made < before);
        let unnamed_time = made.is_some_and(|made| made < 1_000_000_000);
        if old || unnamed_time {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(admin.pool())
                .await;
        }
    }
}

/// A migrated store on a new Postgres database.
pub async fn postgres() -> Store {
    let url = create_postgres_database().await;
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .expect("connect to test database");
    store.migrate().await.expect("migrate postgres store");
    store
}

/// Runs each test body against SQLite and against Postgres:
///
/// ```ignore
/// muster_store::backend_suite! {
///     async fn appends(store: Store) { ... }
/// }
/// ```
#[macro_export]
macro_rules! backend_suite {
    ($(async fn $name:ident($store:ident : $ty:ty) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn run($store: $ty) $body

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let (store, _dir) = $crate::testing::sqlite().await;
                    run(store).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let store = $crate::testing::postgres().await;
                    run(store.clone()).await;
                    store.close().await;
                }
            }
        )*
    };
}

/// Every committed outbox item of `tenant_id`, positioned first (on
/// Postgres the backplane's sequencer would do that after the commit).
pub async fn outbox_items(
    store: &Store,
    tenant_id: &str,
) -> Result<Vec<crate::outbox::Item>, crate::StoreError> {
    crate::outbox::sequence(store, 100_000).await?;
    crate::outbox::read_after(store, tenant_id, 0, 100_000).await
}

/// Appends `count` items of tenant `t1`, each in its own transaction,
/// with a payload of 900 000 bytes and its number (`n`), and positions
/// them: five take a read of the outbox past its bytes.
pub async fn append_large(store: &Store, count: usize) -> Result<(), crate::StoreError> {
    for n in 0..count {
        let mut tx = store.begin().await?;
        let payload = serde_json::json!({"n": n, "blob": "x".repeat(900_000)});
        crate::outbox::append(
            &mut tx,
            &crate::outbox::NewItem::event("t1", "big", payload),
        )
        .await?;
        tx.commit().await?;
    }
    crate::outbox::sequence(store, 100).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_names_are_replaced_in_any_url_shape() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/postgres", "x"),
            "postgres://u@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@localhost?host=/tmp/pg&port=5", "x"),
            "postgres://u@localhost/x?host=/tmp/pg&port=5"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/db?sslmode=disable", "x"),
            "postgresql://u:p@h/x?sslmode=disable"
        );
    }
}
