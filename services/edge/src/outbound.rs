//! What the edge queues for one peer: frames in order, with the bytes
//! waiting counted so a peer that does not read is cut off (1013) instead
//! of growing the queue without bound.
//!
//! A queue that holds nothing holds no buffer: an idle connection pays for
//! one small shared allocation, where a channel would allocate its first
//! block of slots (and cache-padded counters) at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use muster_protocol::close::Close;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// A peer's queue may hold this many bytes before it is a slow consumer
/// (Tyrum's `bufferedAmount` limit).
pub const SLOW_CONSUMER_BYTES: usize = 5_242_880;

/// A queue that drained to empty gives back a buffer larger than this.
const KEEP_CAPACITY: usize = 64;

#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Shared: an event's frame is one allocation for all its peers.
    Text(Utf8Bytes),
    Close(Close),
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Outgoing>,
    /// Bytes of text queued and not yet written.
    bytes: usize,
    /// The connection is gone: nothing more is queued.
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Frames are waiting.
    ready: Notify,
    /// The peer was found to be a slow consumer; wakes the connection even
    /// while it is stuck writing to a peer that does not read.
    slow: Notify,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("outbound queue lock")
    }
}

/// The sending side of a peer's queue.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    shared: Arc<Shared>,
}

/// The connection task's side: frames to write, and the byte count to
/// release as they are written. Dropping it closes the queue.
pub(crate) struct Inbox {
    shared: Arc<Shared>,
}

/// The slow-consumer signal of one queue.
pub(crate) struct Slow(Arc<Shared>);

impl Slow {
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.0.slow.notified()
    }
}

pub(crate) fn channel() -> (Outbound, Inbox) {
    let shared = Arc::new(Shared::default());
    (
        Outbound {
            shared: shared.clone(),
        },
        Inbox { shared },
    )
}

impl Inbox {
    /// The next frame, once there is one.
    pub(crate) async fn recv(&mut self) -> Outgoing {
        loop {
            if let Some(next) = self.try_recv() {
                return next;
            }
            // A frame queued since the check left a permit: no wake-up is
            // lost between the two.
            self.shared.ready.notified().await;
        }
    }

    /// The next frame, if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<Outgoing> {
        let mut queue = self.shared.queue();
        let next = queue.frames.pop_front();
        if queue.frames.is_empty() && queue.frames.capacity() > KEEP_CAPACITY {
            queue.frames = VecDeque::new();
        }
        next
    }

    pub(crate) fn written(&self, bytes: usize) {
        let mut queue = self.shared.queue();
        queue.bytes = queue.bytes.saturating_sub(bytes);
    }

    pub(crate) fn slow(&self) -> Slow {
        Slow(self.shared.clone())
    }
}

impl Inbox {
    /// Takes nothing more: what is queued goes, and later sends are
    /// dropped (the peer is gone).
    pub(crate) fn shut(&mut self) {
        let mut queue = self.shared.queue();
        queue.closed = true;
        queue.frames = VecDeque::new();
        queue.bytes = 0;
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.shut();
    }
}

impl Outbound {
    /// Queues a frame; a peer already holding more than the limit is cut
    /// off with 1013 `slow consumer` instead.
    pub(crate) fn send(&self, frame: impl Into<Utf8Bytes>) {
        let frame = frame.into();
        let len = frame.len();
        {
            let mut queue = self.shared.queue();
            if queue.closed {
                return;
            }
            // As Tyrum checks `bufferedAmount` before a send: what is
            // already queued counts, the frame itself does not, so one
            // large frame still goes to a peer that keeps up.
            if queue.bytes > SLOW_CONSUMER_BYTES {
                drop(queue);
                metrics::counter!("muster_edge_slow_consumers_total").increment(1);
                self.shared.slow.notify_one();
                return;
            }
            queue.bytes += len;
            queue.frames.push_back(Outgoing::Text(frame));
        }
        self.shared.ready.notify_one();
    }

    pub(crate) fn close(&self, close: Close) {
        {
            let mut queue = self.shared.queue();
            if queue.closed {
                return;
            }
            queue.frames.push_back(Outgoing::Close(close));
        }
        self.shared.ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn queued(inbox: &mut Inbox) -> usize {
        std::iter::from_fn(|| inbox.try_recv()).count()
    }

    #[test]
    fn a_peer_is_slow_once_more_than_the_limit_waits_before_a_send() {
        let (outbound, mut inbox) = channel();
        let slow = inbox.slow();
        // One frame above the limit goes to a peer with nothing queued.
        outbound.send("x".repeat(SLOW_CONSUMER_BYTES + 1));
        assert_eq!(queued(&mut inbox), 1);
        // Unwritten, it makes the next send the one that cuts the peer off.
        outbound.send("y");
        assert_eq!(queued(&mut inbox), 0);
        assert!(slow.notified().now_or_never().is_some());
        // Written, it counts no more.
        inbox.written(SLOW_CONSUMER_BYTES + 1);
        outbound.send("z");
        assert_eq!(queued(&mut inbox), 1);
    }

    #[test]
    fn a_shut_queue_takes_nothing() {
        let (outbound, mut inbox) = channel();
        outbound.send("queued before");
        inbox.shut();
        assert_eq!(queued(&mut inbox), 0);
        outbound.send("x".repeat(SLOW_CONSUMER_BYTES + 1));
        outbound.send("y");
        outbound.close(muster_protocol::close::SLOW_CONSUMER);
        assert_eq!(queued(&mut inbox), 0);
        assert!(inbox.slow().notified().now_or_never().is_none());
    }
}
