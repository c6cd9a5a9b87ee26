//! Leases for singleton jobs: in a cluster, compaction and pruning run in
//! one replica at a time, the one holding the job's lease.

use crate::{Store, StoreError, now_ms};

/// Takes or renews the lease `name` for `holder` for `ttl_ms`; true when
/// `holder` has it now. A lease whose holder stopped renewing passes to
/// the next one that asks after it expired.
pub async fn acquire(
    store: &Store,
    name: &str,
    holder: &str,
    ttl_ms: i64,
) -> Result<bool, StoreError> {
    let now = now_ms();
    let taken = sqlx::query(
        "INSERT INTO leases (name, holder, expires_at_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
         expires_at_ms = excluded.expires_at_ms \
         WHERE leases.holder = excluded.holder OR leases.expires_at_ms < $4",
    )
    .bind(name)
    .bind(holder)
    .bind(now + ttl_ms)
    .bind(now)
    .execute(store.writer())
    .await?
    .rows_affected();
    Ok(taken == 1)
}

/// Gives up the lease `name` if `holder` has it, so that another replica
/// takes the job at once instead of after the lease's time (a stopping
/// holder; a restarted one is a new holder).
pub async fn release(store: &Store, name: &str, holder: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
        .bind(name)
        .bind(holder)
        .execute(store.writer())
        .await?;
    Ok(())
}
