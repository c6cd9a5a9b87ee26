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
    /// Live events that wait while a resume replays (see [`Hold`]).
    held: VecDeque<Outgoing>,
    /// Bytes of text in `held`.
    held_bytes: usize,
    /// Senders waiting for the queue to drain (see [`Outbound::send_paced`]).
    pacing: u32,
    /// Resumes under way.
    holding: u32,
    /// A close is queued: the connection is ending, whatever is still
    /// ahead of the close.
    closing: bool,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Frames are waiting.
    ready: Notify,
    /// The peer was found to be a slow consumer; wakes the connection even
    /// while it is stuck writing to a peer that does not read.
    slow: Notify,
    /// Bytes were written, or the connection is gone: wakes paced senders.
    drained: Notify,
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
        if queue.pacing > 0 {
            drop(queue);
            self.shared.drained.notify_waiters();
        }
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
        queue.held = VecDeque::new();
        queue.bytes = 0;
        queue.held_bytes = 0;
        drop(queue);
        self.shared.drained.notify_waiters();
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
        self.queue_text(frame.into(), Kind::Answer);
    }

    /// Queues a live event's frame: like [`Outbound::send`], except that
    /// while a resume replays it waits behind the replay.
    pub(crate) fn send_event(&self, frame: impl Into<Utf8Bytes>) {
        self.queue_text(frame.into(), Kind::LiveEvent);
    }

    /// Queues a frame once no more than half the slow-consumer limit is
    /// left to write ahead of it (live events held back for a resume not
    /// counted): a resume replays thousands of items, faster than a peer
    /// on a slow link reads them, and sent at once they would take it past
    /// the limit and cut it off before its answer. Returns at once when
    /// the connection is gone.
    pub(crate) async fn send_paced(&self, frame: impl Into<Utf8Bytes>) {
        loop {
            let drained = self.shared.drained.notified();
            tokio::pin!(drained);
            // Registered before the check: a write between the two still
            // wakes it.
            drained.as_mut().enable();
            {
                let mut queue = self.shared.queue();
                let ahead = queue.bytes.saturating_sub(queue.held_bytes);
                if queue.closed || ahead <= SLOW_CONSUMER_BYTES / 2 {
                    break;
                }
                queue.pacing += 1;
            }
            let _waiting = Pacing(&self.shared);
            drained.await;
        }
        self.queue_text(frame.into(), Kind::Paced);
    }

    fn queue_text(&self, frame: Utf8Bytes, kind: Kind) {
        let len = frame.len();
        {
            let mut queue = self.shared.queue();
            if queue.closed {
                return;
            }
            // As Tyrum checks `bufferedAmount` before a send: what is
            // already queued counts, the frame itself does not, so one
            // large frame still goes to a peer that keeps up.
            // A paced frame waited for the peer to read (live events held
            // back meanwhile may stand above the limit, and they cut the
            // peer off themselves if it does not catch up).
            if kind != Kind::Paced && queue.bytes > SLOW_CONSUMER_BYTES {
                drop(queue);
                metrics::counter!("muster_edge_slow_consumers_total").increment(1);
                self.shared.slow.notify_one();
                return;
            }
            queue.bytes += len;
            if kind == Kind::LiveEvent && queue.holding > 0 {
                queue.held_bytes += len;
                queue.held.push_back(Outgoing::Text(frame));
                return;
            }
            queue.frames.push_back(Outgoing::Text(frame));
        }
        self.shared.ready.notify_one();
    }

    /// Holds live events back until the guard drops, for a resume: a peer
    /// that names the last event it saw must not have seen a live event
    /// newer than replayed ones still to come, or a resume from it after
    /// a cut-off would skip those.
    pub(crate) fn hold(&self) -> Hold {
        self.shared.queue().holding += 1;
        Hold(self.shared.clone())
    }

    /// Whether a close is queued: the peer's requests are not handled
    /// any more (a revoked token's, say), though frames ahead of the close
    /// are still being written.
    pub(crate) fn closing(&self) -> bool {
        self.shared.queue().closing
    }

    pub(crate) fn close(&self, close: Close) {
        {
            let mut queue = self.shared.queue();
            if queue.closed {
                return;
            }
            queue.closing = true;
            queue.frames.push_back(Outgoing::Close(close));
        }
        self.shared.ready.notify_one();
    }
}

/// What a queued frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A request's answer, or a replayed event sent without pacing.
    Answer,
    /// A live event: waits behind a replay.
    LiveEvent,
    /// Sent once the peer had read enough of what was ahead of it.
    Paced,
}

/// A paced sender's wait, counted while it lasts (also when the sender is
/// dropped waiting): writes wake paced senders only while there are some.
struct Pacing<'a>(&'a Shared);

impl Drop for Pacing<'_> {
    fn drop(&mut self) {
        self.0.queue().pacing -= 1;
    }
}

/// Live events wait while this lives; then they go, after what was queued
/// meanwhile.
pub(crate) struct Hold(Arc<Shared>);

impl Drop for Hold {
    fn drop(&mut self) {
        {
            let mut queue = self.0.queue();
            queue.holding -= 1;
            if queue.holding > 0 || queue.held.is_empty() {
                return;
            }
            let held = std::mem::take(&mut queue.held);
            queue.held_bytes = 0;
            queue.frames.extend(held);
        }
        self.0.ready.notify_one();
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

    #[tokio::test]
    async fn a_paced_send_waits_for_the_peer_to_read_what_is_ahead_of_it() {
        let (outbound, mut inbox) = channel();
        let half = SLOW_CONSUMER_BYTES / 2;
        outbound.send("x".repeat(half + 2));
        // Held live events are not ahead of a replay.
        let hold = outbound.hold();
        outbound.send_event("e".repeat(half));
        let paced = outbound.send_paced("replayed");
        tokio::pin!(paced);
        assert!(paced.as_mut().now_or_never().is_none());
        assert_eq!(queued(&mut inbox), 1);
        // Some of it written: still more than half ahead.
        inbox.written(1);
        assert!(paced.as_mut().now_or_never().is_none());
        inbox.written(1);
        tokio::time::timeout(std::time::Duration::from_secs(5), &mut paced)
            .await
            .expect("sent once half the limit is left");
        assert_eq!(texts(&mut inbox), vec!["replayed".to_owned()]);
        // Held live events past the limit do not cut a paced replay off;
        // they are the peer's to catch up with.
        inbox.written(half + "replayed".len());
        outbound.send_event("e".repeat(SLOW_CONSUMER_BYTES));
        outbound.send_paced("replayed too").await;
        assert_eq!(texts(&mut inbox), vec!["replayed too".to_owned()]);
        drop(hold);
        assert_eq!(queued(&mut inbox), 2);
        inbox.written(SLOW_CONSUMER_BYTES * 2);
        // A paced sender dropped while it waits leaves nothing counted.
        outbound.send("x".repeat(half + 1));
        let mut waiting = Box::pin(outbound.send_paced("never"));
        assert!(waiting.as_mut().now_or_never().is_none());
        drop(waiting);
        assert_eq!(outbound.shared.queue().pacing, 0);
        // Nor does a connection that is gone keep one waiting.
        let mut late = Box::pin(outbound.send_paced("dropped"));
        assert!(late.as_mut().now_or_never().is_none());
        drop(inbox);
        tokio::time::timeout(std::time::Duration::from_secs(5), late)
            .await
            .expect("returns once the connection is gone");
    }

    fn texts(inbox: &mut Inbox) -> Vec<String> {
        std::iter::from_fn(|| inbox.try_recv())
            .map(|frame| match frame {
                Outgoing::Text(text) => text.to_string(),
                Outgoing::Close(close) => format!("close {}", close.code),
            })
            .collect()
    }

    #[test]
    fn live_events_wait_behind_a_replay_and_its_answer() {
        let (outbound, mut inbox) = channel();
        outbound.send_event("live 1");
        let first = outbound.hold();
        let second = outbound.hold();
        outbound.send("replayed 1");
        outbound.send_event("live 2");
        outbound.send("replayed 2");
        drop(first);
        outbound.send("answer");
        assert_eq!(
            texts(&mut inbox),
            ["live 1", "replayed 1", "replayed 2", "answer"]
        );
        outbound.send_event("live 3");
        drop(second);
        assert_eq!(texts(&mut inbox), ["live 2", "live 3"]);
        outbound.send_event("live 4");
        assert_eq!(texts(&mut inbox), ["live 4"]);
    }

    #[test]
    fn a_queued_close_marks_the_connection_closing() {
        let (outbound, mut inbox) = channel();
        outbound.send("backlog");
        assert!(!outbound.closing());
        outbound.close(muster_protocol::close::SLOW_CONSUMER);
        assert!(outbound.closing());
        assert_eq!(texts(&mut inbox), ["backlog", "close 1013"]);
    }

    #[test]
    fn held_events_count_towards_a_slow_consumer() {
        let (outbound, mut inbox) = channel();
        let slow = inbox.slow();
        let hold = outbound.hold();
        outbound.send_event("x".repeat(SLOW_CONSUMER_BYTES + 1));
        outbound.send("answer");
        assert_eq!(texts(&mut inbox), Vec::<String>::new());
        assert!(slow.notified().now_or_never().is_some());
        drop(hold);
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
