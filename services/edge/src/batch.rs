//! Calls to another service that arrive together travel together: while
//! one batched call is in flight, what arrives meanwhile waits and goes in
//! the next. A lone call is sent at once, so batching adds no delay; under
//! a reconnect storm, one call (one mTLS round trip) carries many peers.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

type Reply<O> = oneshot::Sender<Result<O, Status>>;

/// The sending side of one batching task.
pub(crate) struct Batcher<I, O> {
    pending: mpsc::Sender<(I, Reply<O>)>,
}

impl<I, O> std::fmt::Debug for Batcher<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field(
                "waiting",
                &(self.pending.max_capacity() - self.pending.capacity()),
            )
            .finish()
    }
}

impl<I, O> Batcher<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    /// Starts the task (inside a tokio runtime). `call` sends a batch of at
    /// most `max_batch` items and returns one outcome per item, in order
    /// (each item's own success or failure is inside its outcome); an error
    /// of the whole call is every item's. A call that takes longer than
    /// `deadline` fails its items, so that one stuck call does not hold
    /// every later item behind it.
    pub(crate) fn start<F, Fut>(max_batch: usize, deadline: Duration, call: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, Status>> + Send + 'static,
    {
        let (pending, mut receiver) = mpsc::channel::<(I, Reply<O>)>(4 * max_batch);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max_batch);
            while receiver.recv_many(&mut batch, max_batch).await > 0 {
                let (items, replies): (Vec<I>, Vec<Reply<O>>) = batch.drain(..).unzip();
                let sent = items.len();
                let outcomes = tokio::time::timeout(deadline, call(items))
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time")));
                match outcomes {
                    Ok(outcomes) if outcomes.len() == sent => {
                        for (reply, outcome) in replies.into_iter().zip(outcomes) {
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                    Ok(outcomes) => {
                        let status = Status::internal(format!(
                            "{} outcomes for {sent} items",
                            outcomes.len()
                        ));
                        for reply in replies {
                            let _ = reply.send(Err(status.clone()));
                        }
                    }
                    Err(status) => {
                        for reply in replies {
                            let _ = reply.send(Err(status.clone()));
                        }
                    }
                }
            }
        });
        Batcher { pending }
    }

    /// Sends `item` with whatever else is waiting; returns its outcome.
    pub(crate) async fn call(&self, item: I) -> Result<O, Status> {
        let stopped = || Status::unavailable("the edge is stopping");
        let (reply, outcome) = oneshot::channel();
        self.pending
            .send((item, reply))
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn items_waiting_together_share_a_call_and_get_their_own_outcomes() {
        let calls: Arc<Mutex<Vec<Vec<u32>>>> = Default::default();
        let seen = calls.clone();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let opened = gate.clone();
        let batcher = Batcher::start(3, Duration::from_secs(10), move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.clone());
            let gate = opened.clone();
            async move {
                // The first call waits, so that the rest queue behind it.
                if items == [0] {
                    gate.acquire().await.unwrap().forget();
                }
                Ok(items.into_iter().map(|i| i * 10).collect())
            }
        });
        let batcher = Arc::new(batcher);
        let mut tasks = Vec::new();
        for i in 0..5u32 {
            let batcher = batcher.clone();
            tasks.push(tokio::spawn(async move { batcher.call(i).await }));
            tokio::task::yield_now().await;
            while i == 0 && calls.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
        }
        gate.add_permits(1);
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap().unwrap());
        }
        assert_eq!(outcomes, [0, 10, 20, 30, 40]);
        assert_eq!(*calls.lock().unwrap(), [vec![0], vec![1, 2, 3], vec![4]]);
    }

    #[tokio::test]
    async fn a_failed_call_fails_each_of_its_items() {
        let batcher = Batcher::start(8, Duration::from_secs(10), |_: Vec<u32>| async {
            Err::<Vec<u32>, _>(Status::unavailable("down"))
        });
        let outcome = batcher.call(1).await;
        assert_eq!(outcome.unwrap_err().code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn a_stuck_call_fails_at_its_deadline_and_later_items_go_on() {
        let batcher = Batcher::start(8, Duration::from_millis(50), |items: Vec<u32>| async move {
            if items.contains(&0) {
                std::future::pending::<()>().await;
            }
            Ok(items)
        });
        let outcome = batcher.call(0).await;
        assert_eq!(outcome.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        assert_eq!(batcher.call(7).await.unwrap(), 7);
    }
}
