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

/// Whether a lease holder has held its lease long enough, with the store
/// answering, to judge others by their silence. Records that live while
/// their owners refresh them (an edge's connections, presence entries,
/// topic sessions) run out during a store outage, since no owner can
/// refresh them then; and a holder that just took the lease may have
/// taken it in one. Such records go only once the holder has held the
/// lease, each round answered by the store, for a whole lifetime of
/// theirs: every live owner has refreshed its own by then.
#[derive(Debug)]
pub struct Tenure {
    lifetime: std::time::Duration,
    since: Option<tokio::time::Instant>,
}

impl Tenure {
    /// For records that live `lifetime` without a refresh.
    pub fn new(lifetime: std::time::Duration) -> Self {
        Tenure {
            lifetime,
            since: None,
        }
    }

    /// A round, at `now`, with the lease held and the store answering:
    /// whether a whole lifetime has passed since such rounds began.
    pub fn served(&mut self, now: tokio::time::Instant) -> bool {
        now.duration_since(*self.since.get_or_insert(now)) >= self.lifetime
    }

    /// The lease was not held, or the store failed.
    pub fn interrupted(&mut self) {
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn records_are_judged_only_after_a_whole_lifetime_of_a_held_lease_and_an_answering_store() {
        let mut tenure = Tenure::new(Duration::from_secs(30));
        let start = tokio::time::Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        // Newly taken: owners may not have refreshed through this store.
        assert!(!tenure.served(at(0)));
        assert!(!tenure.served(at(29)));
        assert!(tenure.served(at(30)));
        assert!(tenure.served(at(40)));
        // The store failed (or the lease went elsewhere): a lifetime again.
        tenure.interrupted();
        assert!(!tenure.served(at(50)));
        assert!(!tenure.served(at(79)));
        assert!(tenure.served(at(80)));
    }
}
