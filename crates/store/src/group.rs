//! Group commit: writes that arrive while the previous transaction is
//! committing share the next one, so that many concurrent callers pay for
//! one commit (one fsync on SQLite) instead of one each.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::StoreError;

type Reply<R> = oneshot::Sender<Result<R, StoreError>>;

/// A writer task that commits what is waiting in one transaction. If a
/// batch fails because of a write in it (bad input, a constraint), each of
/// its writes is retried alone, so that one bad write fails only its own
/// caller; if the store failed, every caller gets that failure.
pub struct GroupCommit<W, R> {
    pending: mpsc::Sender<(W, Reply<R>)>,
}

impl<W, R> Clone for GroupCommit<W, R> {
    fn clone(&self) -> Self {
        GroupCommit {
            pending: self.pending.clone(),
        }
    }
}

impl<W, R> GroupCommit<W, R>
where
    W: Clone + Send + Sync + 'static,
    R: Send + 'static,
{
    /// Starts the writer (inside a tokio runtime). `commit` writes a batch
    /// in one transaction and returns one outcome per write, in order; at
    /// most `max_batch` writes share it.
    pub fn start<F, Fut>(max_batch: usize, commit: F) -> Self
    where
        F: Fn(Arc<[W]>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>, StoreError>> + Send + 'static,
    {
        let (pending, receiver) = mpsc::channel(4 * max_batch);
        tokio::spawn(write_batches(max_batch, Arc::new(commit), receiver));
        GroupCommit { pending }
    }

    /// Writes `write` with whatever else is waiting; returns its outcome
    /// once its transaction committed.
    pub async fn write(&self, write: W) -> Result<R, StoreError> {
        // The store's failing, not the caller's request. The writer ends
        // only by a panic, for good: said loudly, as retries will not cure
        // it.
        let stopped = || {
            tracing::error!(
                "the group-commit writer stopped; this replica's writes fail until it restarts"
            );
            StoreError::Unavailable("writer stopped".into())
        };
        let (reply, outcome) = oneshot::channel();
        self.pending
            .send((write, reply))
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

async fn write_batches<W, R, F, Fut>(
    max_batch: usize,
    commit: Arc<F>,
    mut pending: mpsc::Receiver<(W, Reply<R>)>,
) where
    W: Clone,
    F: Fn(Arc<[W]>) -> Fut,
    Fut: Future<Output = Result<Vec<R>, StoreError>>,
{
    while let Some(first) = pending.recv().await {
        // The callers of the last batch were woken by its replies and are
        // about to write again: letting them run first makes this batch
        // theirs too, where taking only what is queued now commits one or
        // two at a time while the rest wait for the next round.
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (writes, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        // Shared, not copied: the writes are needed again only if the batch
        // fails because of one of them.
        let writes: Arc<[W]> = writes.into();
        if writes.len() == 1 {
            let outcome = commit(writes).await.and_then(one);
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(outcome);
            }
            continue;
        }
        match commit(writes.clone()).await {
            Ok(outcomes) if outcomes.len() == replies.len() => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            // The store failed (unreachable, pool exhausted, a commit whose
            // outcome is unknown): retrying each write alone would wait out
            // the failure once per write, and could apply a write twice.
            Err(error) if !error.is_about_the_write() => {
                let message = error.to_string();
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
                }
            }
            _ => {
                for (write, reply) in writes.iter().zip(replies) {
                    let alone: Arc<[W]> = Arc::new([write.clone()]);
                    let _ = reply.send(commit(alone).await.and_then(one));
                }
            }
        }
    }
}

fn one<R>(outcomes: Vec<R>) -> Result<R, StoreError> {
    outcomes
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::Unavailable("a write without an outcome".into()))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[tokio::test]
    async fn concurrent_writes_share_commits_and_a_bad_one_fails_alone() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let group = GroupCommit::start(16, move |batch: Arc<[i32]>| {
            seen.lock().unwrap().push(batch.len());
            async move {
                if batch.iter().any(|n| *n < 0) {
                    return Err(StoreError::invalid("n", "negative"));
                }
                // A commit takes a while, so that writes queue behind it.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Ok(batch.iter().map(|n| n * 2).collect())
            }
        });
        let writes: Vec<_> = (0..40)
            .map(|n| {
                let group = group.clone();
                let n = if n == 17 { -1 } else { n };
                tokio::spawn(async move { (n, group.write(n).await) })
            })
            .collect();
        for write in writes {
            let (n, outcome) = write.await.unwrap();
            match outcome {
                Ok(doubled) => {
                    assert!(n >= 0, "the bad write must fail");
                    assert_eq!(doubled, n * 2);
                }
                Err(error) => {
                    assert_eq!(n, -1, "only the bad write fails: {error}");
                }
            }
        }
        let batches = batches.lock().unwrap();
        assert!(batches.iter().any(|len| *len > 1), "{batches:?}");
        assert!(batches.iter().all(|len| *len <= 16), "{batches:?}");
    }

    #[tokio::test]
    async fn a_store_failure_fails_the_batch_without_retrying_each_write() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let group = GroupCommit::start(16, move |batch: Arc<[i32]>| {
            seen.lock().unwrap().push(batch.len());
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Err::<Vec<i32>, _>(StoreError::Database(sqlx::Error::PoolTimedOut))
            }
        });
        let writes: Vec<_> = (0..20)
            .map(|n| {
                let group = group.clone();
                tokio::spawn(async move { group.write(n).await })
            })
            .collect();
        for write in writes {
            let outcome = write.await.unwrap();
            assert!(
                matches!(
                    outcome,
                    Err(StoreError::Database(_) | StoreError::Unavailable(_))
                ),
                "{outcome:?}"
            );
        }
        // One call per batch: 20 writes, fewer calls, none of them a retry.
        let calls = calls.lock().unwrap();
        assert_eq!(calls.iter().sum::<usize>(), 20, "{calls:?}");
        assert!(calls.len() < 20, "{calls:?}");
    }
}
