//! What the edge queues for one peer: frames in order, with the bytes
//! waiting counted so a peer that does not read is cut off (1013) instead
//! of growing the queue without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::ws::Utf8Bytes;
use muster_protocol::close::Close;
use tokio::sync::{Notify, mpsc};

/// A peer's queue may hold this many bytes before it is a slow consumer
/// (Tyrum's `bufferedAmount` limit).
pub const SLOW_CONSUMER_BYTES: usize = 5_242_880;

#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Shared: an event's frame is one allocation for all its peers.
    Text(Utf8Bytes),
    Close(Close),
}

/// The sending side of a peer's queue.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    tx: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<AtomicUsize>,
    /// Wakes the connection even while it is stuck writing to a peer that
    /// does not read.
    slow: Arc<Notify>,
}

/// The connection task's side: frames to write, and the byte count to
/// release as they are written.
pub(crate) struct Inbox {
    pub(crate) rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<AtomicUsize>,
    slow: Arc<Notify>,
}

impl Inbox {
    pub(crate) fn written(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Signalled once the peer has been found to be a slow consumer.
    pub(crate) fn slow(&self) -> Arc<Notify> {
        self.slow.clone()
    }
}

pub(crate) fn channel() -> (Outbound, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let slow = Arc::new(Notify::new());
    (
        Outbound {
            tx,
            queued: queued.clone(),
            slow: slow.clone(),
        },
        Inbox { rx, queued, slow },
    )
}

impl Outbound {
    /// Queues a frame; a peer already holding more than the limit is cut
    /// off with 1013 `slow consumer` instead.
    pub(crate) fn send(&self, frame: impl Into<Utf8Bytes>) {
        let frame = frame.into();
        let len = frame.len();
        let before = self.queued.fetch_add(len, Ordering::Relaxed);
        if before + len > SLOW_CONSUMER_BYTES {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            metrics::counter!("muster_edge_slow_consumers_total").increment(1);
            self.slow.notify_one();
            return;
        }
        if self.tx.send(Outgoing::Text(frame)).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
        }
    }

    pub(crate) fn close(&self, close: Close) {
        let _ = self.tx.send(Outgoing::Close(close));
    }
}
