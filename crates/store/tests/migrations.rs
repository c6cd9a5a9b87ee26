//! Migrations across releases and beside other sessions.

use std::time::{Duration, Instant};

use muster_store::Store;

muster_store::backend_suite! {
    async fn a_schema_migrated_by_a_newer_release_still_starts_this_one(store: Store) {
        // A newer release applied a migration this one does not know.
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (9999, 'from a newer release', TRUE, $1, 0)",
        )
        .bind(vec![0u8; 48])
        .execute(store.writer())
        .await
        .unwrap();
        store.migrate().await.unwrap();
    }
}

/// A migration waiting on a lock another session holds gives up, instead
/// of queueing every statement on that table behind it for as long as the
/// other session lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_waits_for_a_lock_only_so_long() {
    let store = muster_store::testing::postgres().await;
    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let started = Instant::now();
    let waited = tokio::time::timeout(
        Duration::from_secs(20),
        store.migrate_waiting_at_most(Duration::from_millis(500)),
    )
    .await
    .expect("the migration gave up waiting");
    let error = waited.expect_err("the lock was not granted");
    assert!(error.to_string().contains("lock timeout"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(20));
    holder.rollback().await.unwrap();
    store.migrate().await.unwrap();
}
