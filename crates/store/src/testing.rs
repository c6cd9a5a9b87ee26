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

/// Creates an empty database `muster_test_<pid>_<n>` and returns its URL.
pub async fn create_postgres_database() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let url = postgres_url();
    let name = format!(
        "muster_test_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
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
    admin.close().await;
    with_database(&url, &name)
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
