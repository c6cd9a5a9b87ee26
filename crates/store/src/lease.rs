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

/// Whether a lease holder may judge records that live while their owners
/// refresh them (an edge's connections, presence entries, topic sessions)
/// by their silence. While the store cannot be reached no owner can
/// refresh anything, and after an outage longer than such a record lives
/// every one has run out, live owners' too; a holder that just took the
/// lease may have taken it just after one. So the holder judges only once
/// it has held the lease for `wait` (long enough for every live owner to
/// refresh) without a gap between its rounds longer than `outage`
/// (longer than a record outlives its owner's last refresh by). A round
/// that failed alone is no gap; a process that was stopped (a paused VM)
/// is, since gaps are read on the wall clock.
#[derive(Debug)]
pub struct Tenure {
    wait: i64,
    outage: i64,
    /// Since when, and until when, rounds held the lease without a gap
    /// (unix ms).
    since: Option<i64>,
    last: Option<i64>,
}

impl Tenure {
    pub fn new(wait: std::time::Duration, outage: std::time::Duration) -> Self {
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Tenure {
            wait: ms(wait),
            outage: ms(outage),
            since: None,
            last: None,
        }
    }

    /// A round at `now_ms` that holds the lease: whether records may be
    /// judged in it.
    pub fn held(&mut self, now_ms: i64) -> bool {
        if self
            .last
            .is_some_and(|last| now_ms.saturating_sub(last) > self.outage)
        {
            self.since = None;
        }
        self.last = Some(now_ms);
        now_ms.saturating_sub(*self.since.get_or_insert(now_ms)) >= self.wait
    }

    /// Another replica holds the lease: taking it again starts over.
    pub fn lost(&mut self) {
        self.since = None;
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn records_are_judged_after_the_wait_and_again_after_a_gap_longer_than_an_outage() {
        let mut tenure = Tenure::new(Duration::from_secs(15), Duration::from_secs(25));
        let at = |secs: i64| 1_000_000 + secs * 1000;
        // Newly taken: owners may not have refreshed through this store.
        assert!(!tenure.held(at(0)));
        assert!(!tenure.held(at(10)));
        assert!(tenure.held(at(15)));
        // A round that failed alone (no held round at 25) is no gap.
        assert!(tenure.held(at(35)));
        // Nothing held for longer than the outage (the store away, or the
        // process stopped): the wait again.
        assert!(!tenure.held(at(61)));
        assert!(!tenure.held(at(70)));
        assert!(tenure.held(at(76)));
        // Another replica took the lease: taking it back starts over.
        tenure.lost();
        assert!(!tenure.held(at(80)));
        assert!(tenure.held(at(95)));
    }
}
