//! Events from the backplane to peers, and the presence the edge keeps
//! fresh for its peers and itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures::FutureExt;
use muster_proto::v1 as pb;
use muster_proto::v1::backplane_client::BackplaneClient;
use muster_protocol::{close, envelope};
use muster_store::outbox::Target;
use tokio_stream::StreamExt;

use crate::Edge;

/// How many instances one presence refresh touches per transaction.
const TOUCH_CHUNK: usize = 256;

/// Event types peers receive: the Tyrum subset (Part B §8) and muster's
/// own (docs/protocol-extensions.md). Other outbox items are internal.
const DELIVERED: &[&str] = &[
    "presence.upserted",
    "presence.pruned",
    "pairing.updated",
    "approval.updated",
    "capability.ready",
    "attempt.evidence",
    "plan.update",
];

pub(crate) fn delivered(kind: &str) -> bool {
    DELIVERED.contains(&kind) || kind.starts_with("turn.") || kind.starts_with("muster.")
}

pub(crate) fn target(item: &pb::OutboxItem) -> Option<Target> {
    use pb::outbox_target::Kind;
    Some(match item.target.as_ref()?.kind.as_ref()? {
        Kind::DeviceId(id) => Target::Device(id.clone()),
        Kind::ConnectionId(id) => Target::Connection(id.clone()),
        Kind::EdgeId(id) => Target::Edge(id.clone()),
    })
}

/// At most this many items are dispatched together.
const MAX_DISPATCH: usize = 256;

/// An item to deliver, decoded once for all peers.
struct Prepared<'a> {
    item: &'a pb::OutboxItem,
    payload: serde_json::Value,
    target: Option<Target>,
    /// The frame, once a peer needed it: the same text for every peer.
    frame: Option<Utf8Bytes>,
}

/// Acts on committed items in order: internal commands, and delivery to
/// every peer of an item's tenant that its audience and target admit.
/// Deliveries between two commands go out together, so that a peer gets
/// the frames of a burst in one queueing (and its connection writes them
/// in one flush) instead of one wake-up per item.
///
/// `at_start`: the batch begins the stream of an edge that accepted no
/// peer before the stream was answered; a gap before its first item then
/// concerns no peer (each was verified after the stream's start was read).
/// `before`: the position the stream stood at before the batch.
fn dispatch(
    edge: &Edge,
    items: &[pb::OutboxItem],
    at_start: bool,
    before: Option<i64>,
    fresh: &mut Fresh,
) {
    let mut pending = Vec::new();
    let mut previous = before;
    for (n, item) in items.iter().enumerate() {
        let rewound = previous.is_some_and(|previous| item.position < previous);
        previous = Some(item.position);
        if item.mark {
            if n == 0 && !at_start {
                // Peers were accepted before this stream was answered: of
                // what it carries up to its head, what committed after the
                // edge started may be theirs.
                fresh.started_late(item.position, item.head);
            } else {
                fresh.started(item.head);
            }
            continue;
        }
        if item.gap {
            deliver(edge, &mut pending);
            // What compaction took up to the head the stream started at
            // was committed before any peer was accepted, wherever the gap
            // falls in the stream (it often follows the start's mark in a
            // later batch). What a rewind took is another matter: the
            // items after where the histories parted.
            let before_any_peer = !rewound && fresh.before_any_peer(item.position);
            fresh.started(item.position);
            if rewound {
                fresh.rewound(item.position);
            }
            let first_word = at_start && n == 0;
            missed(edge, item.position, !(first_word || before_any_peer));
            continue;
        }
        let payload: serde_json::Value =
            serde_json::from_str(&item.payload_json).unwrap_or_default();
        if item.r#type == "token.revoked" || item.r#type == "token.updated" {
            deliver(edge, &mut pending);
            invalidate(edge, item, &payload);
        }
        // Items from before this edge started cannot be for its peers
        // (they connected later); a peer that wants them asks to resume.
        // The type is checked here, once, not for every peer.
        if fresh.admits(edge.started_at_ms, item) && delivered(&item.r#type) {
            pending.push(Prepared {
                item,
                target: target(item),
                payload,
                frame: None,
            });
        }
    }
    deliver(edge, &mut pending);
}

/// Which items are news to this edge's peers: those after the head as it
/// stood when the edge's first stream was answered. Everything up to it
/// committed before any peer was accepted (peers are accepted once that
/// stream is answered), and positions are given in commit order, so no
/// clock decides it.
///
/// When peers were accepted before the first stream was answered (the
/// backplane was slow, see `serve_http`), items up to that head may be
/// theirs too: those are judged by the producers' clocks, as before any
/// stream.
#[derive(Debug, Default)]
struct Fresh {
    after: Option<i64>,
    by_clock_through: Option<i64>,
}

impl Fresh {
    /// The first stream's first word: a mark with the head, or a gap at
    /// the head.
    fn started(&mut self, head: i64) {
        self.after.get_or_insert(head);
    }

    /// The first stream's mark, answered after peers were accepted: the
    /// stream starts after `from` and the head stood at `head`.
    fn started_late(&mut self, from: i64, head: i64) {
        if self.after.is_none() {
            self.after = Some(from);
            self.by_clock_through = Some(head);
        }
    }

    /// The outbox went back (a restored store): positions from `head` on
    /// are given again, to items that are new.
    fn rewound(&mut self, head: i64) {
        self.after = self.after.map(|after| after.min(head));
        self.by_clock_through = self.by_clock_through.map(|through| through.min(head));
    }

    /// Whether every item up to `through` committed before any peer of
    /// this edge was accepted: at or below the head its first stream
    /// started at, when no peer was accepted before that stream was
    /// answered.
    fn before_any_peer(&self, through: i64) -> bool {
        self.by_clock_through.is_none() && self.after.is_some_and(|after| through <= after)
    }

    /// `started_at_ms`: when this edge started.
    fn admits(&self, started_at_ms: i64, item: &pb::OutboxItem) -> bool {
        match self.after {
            Some(after) => {
                item.position > after
                    && self.by_clock_through.is_none_or(|through| {
                        item.position > through || item.occurred_at_ms >= started_at_ms
                    })
            }
            // Not told yet where the stream started: the producers' clocks
            // are all there is.
            None => item.occurred_at_ms >= started_at_ms,
        }
    }
}

/// Items up to `through` were compacted before this edge read them (it
/// was cut off from the backplane for longer than the outbox keeps items
/// for a silent consumer), or the backplane kept no progress for it and
/// its stream starts at the head. A revocation among them would leave its
/// token's connections open, and peers would lack events without knowing
/// it. So cached verifications go, and when peers may have been accepted
/// while the lost items committed, every connected peer is closed with
/// 1013 `events missed`: it reconnects, its token is checked again, and a
/// peer that resumes is told of the gap. So is a peer still in its
/// handshake whose token was checked before this (see `arrive`).
fn missed(edge: &Edge, through: i64, peers_affected: bool) {
    edge.forget_verified();
    if !peers_affected {
        tracing::info!(
            through,
            "the stream starts after items no peer of this edge can have been owed"
        );
        return;
    }
    // Counted after the cache is emptied: a peer that reads the new count
    // cannot have been given a verification from before the gap.
    edge.count_gap();
    let peers = edge.registry.all();
    if peers.is_empty() {
        return;
    }
    metrics::counter!("muster_edge_outbox_gaps_total").increment(1);
    for peer in &peers {
        peer.outbound.close(close::EVENTS_MISSED);
    }
    tracing::warn!(
        through,
        closed = peers.len(),
        "this edge may have missed items its peers were owed; they were closed to reconnect"
    );
}

/// `token.revoked` and `token.updated`: the token's cached claims go, and
/// its connections close.
fn invalidate(edge: &Edge, item: &pb::OutboxItem, payload: &serde_json::Value) {
    let Some(token_id) = payload.get("token_id").and_then(|v| v.as_str()) else {
        return;
    };
    let closed = if item.r#type == "token.updated" {
        let Some(grant) = crate::auth::Grant::from_payload(payload) else {
            return;
        };
        // Only connections whose claims changed: a new label, or a
        // connection made after the change, keeps its connection.
        let stale = |claims: &crate::Claims| claims.stale_after(&grant);
        edge.token_changed(token_id, grant.clone());
        edge.registry
            .close_token(&item.tenant_id, token_id, stale, close::TOKEN_UPDATED)
    } else {
        edge.revoke_token(token_id);
        edge.registry
            .close_token(&item.tenant_id, token_id, |_| true, close::TOKEN_REVOKED)
    };
    if closed > 0 {
        tracing::info!(
            token_id,
            closed,
            kind = %item.r#type,
            "closed the connections of a changed token"
        );
    }
}

/// Queues the frames of `pending` for the peers they are for, peer by
/// peer, in item order; empties `pending`. Peers are taken by role, and
/// each only looks at the items for its role: in a fleet of nodes, an
/// operator-only event (each arrival's `presence.upserted`) would
/// otherwise be checked against every node, and a reconnect storm would
/// cost the square of its size. Likewise an item directed at one device or
/// connection is looked up by that id, not checked against every peer.
fn deliver(edge: &Edge, pending: &mut Vec<Prepared<'_>>) {
    let mut tenants: Vec<String> = pending.iter().map(|p| p.item.tenant_id.clone()).collect();
    tenants.sort_unstable();
    tenants.dedup();
    for tenant in tenants {
        let peers = edge.registry.tenant(&tenant);
        for role in ["client", "node"] {
            let mut broadcast = Vec::new();
            let mut directed: HashMap<String, Vec<usize>> = HashMap::new();
            for (i, prepared) in pending.iter().enumerate() {
                let item = prepared.item;
                let roles = item
                    .audience
                    .as_ref()
                    .map(|a| &a.roles[..])
                    .unwrap_or_default();
                if item.tenant_id != tenant
                    || !(roles.is_empty() || roles.iter().any(|r| r == role))
                {
                    continue;
                }
                match &prepared.target {
                    None => broadcast.push(i),
                    Some(Target::Device(id) | Target::Connection(id)) => {
                        directed.entry(id.clone()).or_default().push(i)
                    }
                    // For the edge itself, never for its peers.
                    Some(Target::Edge(_)) => {}
                }
            }
            if broadcast.is_empty() && directed.is_empty() {
                continue;
            }
            for peer in peers.iter().filter(|p| p.role == role) {
                // Nothing directed (the usual batch): no lookups per peer.
                let (by_device, by_connection) = if directed.is_empty() {
                    (None, None)
                } else {
                    (
                        directed.get(peer.device_id.as_str()),
                        directed.get(peer.connection_id.as_str()),
                    )
                };
                let mine: Vec<usize>;
                let items = if by_device.is_none() && by_connection.is_none() {
                    &broadcast
                } else {
                    let mut merged: Vec<usize> = broadcast
                        .iter()
                        .chain(by_device.into_iter().flatten())
                        .chain(by_connection.into_iter().flatten())
                        .copied()
                        .collect();
                    merged.sort_unstable();
                    mine = merged;
                    &mine
                };
                for &i in items {
                    let prepared = &mut pending[i];
                    if let Some(text) = frame_for(
                        peer,
                        prepared.item,
                        &prepared.payload,
                        prepared.target.as_ref(),
                        &mut prepared.frame,
                    ) {
                        peer.outbound.send_event(text);
                    }
                }
            }
        }
    }
    pending.clear();
}

/// The frame of `item` for `peer`, if the peer may and wants to see it:
/// the peer's tenant, audience and target, and for topic diffs a
/// subscription to the topic. Callers check once per item that its type
/// is [`delivered`] at all. `frame` caches the text, which is the same for
/// every peer.
pub(crate) fn frame_for(
    peer: &crate::registry::Peer,
    item: &pb::OutboxItem,
    payload: &serde_json::Value,
    target: Option<&Target>,
    frame: &mut Option<Utf8Bytes>,
) -> Option<Utf8Bytes> {
    if item.tenant_id != peer.claims.tenant_id {
        return None;
    }
    if item.r#type == muster_presence::DIFF_EVENT
        && !peer.subscribed(payload["topic"].as_str().unwrap_or_default())
    {
        return None;
    }
    let (roles, scopes) = match &item.audience {
        Some(audience) => (&audience.roles[..], &audience.scopes[..]),
        None => (&[][..], &[][..]),
    };
    if !peer.admits(roles, scopes, target) {
        return None;
    }
    Some(
        frame
            .get_or_insert_with(|| {
                // Part B §6: a node's report is scoped to the node.
                let scope = (item.r#type == "capability.ready")
                    .then(|| serde_json::json!({"kind": "node", "node_id": payload["node_id"]}));
                envelope::event(
                    &item.event_id,
                    &item.r#type,
                    item.occurred_at_ms,
                    scope.as_ref(),
                    payload,
                )
                .into()
            })
            .clone(),
    )
}

/// How often the edge acknowledges its progress to the backplane.
const ACK_EVERY: Duration = Duration::from_secs(1);

/// Follows the backplane for as long as the edge runs: at start from
/// where this edge (by its id) last acknowledged, or from the head when it
/// never did; after a broken stream, from the last position seen.
/// Progress is acknowledged every [`ACK_EVERY`], beside the stream: an
/// acknowledgement that waits on a slow store must not stop deliveries.
pub(crate) async fn run(edge: Arc<Edge>) {
    let mut after: Option<i64> = None;
    let mut seen = Seen::default();
    let mut fresh = Fresh::default();
    let mut acked: Option<(i64, tokio::time::Instant)> = None;
    let mut acking: Option<Acking<'_>> = None;
    let mut ack_tick = tokio::time::interval(ACK_EVERY);
    ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let request = pb::SubscribeRequest {
            after_position: after.unwrap_or(0),
            from_head: false,
            consumer_id: edge.edge_id.clone(),
            resume: after.is_none(),
            seen: seen.request(),
        };
        // The subscription's answer (not its stream, which lasts as long as
        // the edge) has the call deadline, and gives way to shutdown.
        let mut backplane = BackplaneClient::new(edge.peers.backplane.clone());
        let subscribed = tokio::select! {
            subscribed = tokio::time::timeout(crate::CALL_DEADLINE, backplane.subscribe(request)) => {
                subscribed.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer to the subscription")))
            }
            _ = edge.shutdown.cancelled() => return,
        };
        match subscribed {
            Ok(stream) => {
                // The backplane read where the stream starts before it
                // answered: a peer accepted after this was verified after
                // that, and a gap before the first item concerns no peer
                // unless the edge was accepting already.
                let mut at_start = !edge.accepting.load(Acquire);
                edge.stream_answered.send_replace(true);
                let mut stream = stream.into_inner();
                loop {
                    tokio::select! {
                        item = stream.next() => match item {
                            Some(Ok(item)) => {
                                // What else has arrived goes with it.
                                let mut batch = vec![item];
                                let mut broke = None;
                                while batch.len() < MAX_DISPATCH {
                                    match stream.next().now_or_never() {
                                        Some(Some(Ok(item))) => batch.push(item),
                                        Some(end) => {
                                            broke = Some(end);
                                            break;
                                        }
                                        None => break,
                                    }
                                }
                                let before = after;
                                after = batch.last().map(|item| item.position);
                                seen.push(&batch);
                                dispatch(&edge, &batch, at_start, before, &mut fresh);
                                at_start = false;
                                match broke {
                                    Some(Some(Err(status))) => {
                                        tracing::warn!(code = ?status.code(), message = status.message(), "backplane stream broke");
                                        break;
                                    }
                                    Some(_) => break,
                                    None => {}
                                }
                            }
                            Some(Err(status)) => {
                                tracing::warn!(code = ?status.code(), message = status.message(), "backplane stream broke");
                                break;
                            }
                            None => break,
                        },
                        done = async { acking.as_mut().expect("an acknowledgement in flight").await }, if acking.is_some() => {
                            acking = None;
                            if let Some(position) = done {
                                acked = Some((position, tokio::time::Instant::now()));
                            }
                        }
                        _ = ack_tick.tick(), if acking.is_none() => acking = ack(&edge, after, acked),
                        _ = edge.shutdown.cancelled() => {
                            return last_ack(&edge, after, acked).await;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "backplane subscription failed")
            }
        }
        if edge.shutdown.is_cancelled() {
            // The stream ended as the edge began to stop (a backplane in
            // the same process ends its streams at shutdown).
            return last_ack(&edge, after, acked).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many items [`Seen`] keeps: as many as the backplane compares.
const SEEN: usize = 64;

/// The items the stream sent last, by position and event id: named when
/// the edge subscribes again, so that a backplane that did not follow the
/// outbox when its history was rewound (a restored store) finds out.
#[derive(Default)]
struct Seen(std::collections::VecDeque<pb::SeenItem>);

impl Seen {
    fn push(&mut self, batch: &[pb::OutboxItem]) {
        for item in batch {
            if item.gap {
                // A gap below what was sent is a rewind: the items above
                // it are of a history the store no longer has.
                while self
                    .0
                    .back()
                    .is_some_and(|seen| seen.position > item.position)
                {
                    self.0.pop_back();
                }
            } else if !item.mark {
                self.0.push_back(pb::SeenItem {
                    position: item.position,
                    event_id: item.event_id.clone(),
                });
                if self.0.len() > SEEN {
                    self.0.pop_front();
                }
            }
        }
    }

    fn request(&self) -> Vec<pb::SeenItem> {
        self.0.iter().cloned().collect()
    }
}

/// At shutdown: the last position seen, whether or not an earlier
/// acknowledgement is still on its way (the backplane keeps the larger);
/// as the directory's farewell, given 2 s.
async fn last_ack(edge: &Edge, after: Option<i64>, acked: Option<(i64, tokio::time::Instant)>) {
    if let Some(last) = ack(edge, after, acked) {
        let _ = tokio::time::timeout(Duration::from_secs(2), last).await;
    }
}

/// An acknowledgement in flight: the position it acknowledged, once the
/// backplane has it.
type Acking<'a> = std::pin::Pin<Box<dyn Future<Output = Option<i64>> + Send + 'a>>;

/// How often an edge acknowledges a position it acknowledged already: the
/// backplane drops the progress of a consumer silent for ten minutes, and
/// a quiet edge's is not to be taken for gone.
const ACK_REFRESH: Duration = Duration::from_secs(60);

/// Acknowledges `seen` unless it is what was acknowledged last, less than
/// [`ACK_REFRESH`] ago. It runs beside the stream, so a hung backplane
/// delays the next acknowledgement, never a delivery. No deadline: the
/// backplane would go on writing a timed-out acknowledgement, and with one
/// sent after each deadline the writes of a stalled store would pile up on
/// its pool.
fn ack(
    edge: &Edge,
    seen: Option<i64>,
    acked: Option<(i64, tokio::time::Instant)>,
) -> Option<Acking<'_>> {
    let position = seen.filter(|&seen| {
        acked.is_none_or(|(acked, at)| acked != seen || at.elapsed() >= ACK_REFRESH)
    })?;
    let request = pb::AckRequest {
        consumer_id: edge.edge_id.clone(),
        position,
    };
    Some(Box::pin(async move {
        let mut backplane = BackplaneClient::new(edge.peers.backplane.clone());
        match backplane.ack(request).await {
            Ok(_) => Some(position),
            Err(status) => {
                tracing::debug!(code = ?status.code(), "acknowledging progress failed");
                None
            }
        }
    }))
}

/// How often the edge heartbeats its connection records.
const DIRECTORY_HEARTBEAT: Duration = Duration::from_secs(5);

/// The largest heartbeat answer the edge reads: the connection ids of
/// more than a million connections.
const HEARTBEAT_REPLY_BYTES: usize = 64 * 1024 * 1024;

/// Keeps this edge's connection records alive in the directory. A peer
/// whose record is gone (the edge could not heartbeat within the
/// directory's TTL, and the record was removed) is closed with 4004
/// `conversation expired`, as is one whose frame arrives meanwhile. At
/// shutdown the edge's records are dropped at once.
pub(crate) async fn keep_directory(edge: Arc<Edge>) {
    let mut tick = tokio::time::interval(DIRECTORY_HEARTBEAT);
    // A heartbeat that waited on a slow store is not followed by the
    // missed ones at once.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The answer lists every connection the directory holds for this
    // edge, about 40 bytes each: past gRPC's default 4 MiB (some 100 000
    // connections) it would be refused, and records dropped would never
    // be noticed.
    let mut backplane = BackplaneClient::new(edge.peers.backplane.clone())
        .max_decoding_message_size(HEARTBEAT_REPLY_BYTES);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = edge.shutdown.cancelled() => return forget_edge(&edge).await,
        }
        // Only peers recorded before the heartbeat asked can be missing
        // from its answer.
        let recorded: Vec<_> = edge
            .registry
            .all()
            .into_iter()
            .filter(|p| p.registered.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        // No deadline, as for acknowledgements: one heartbeat at a time
        // waits on a slow store. Shutdown does not wait for it.
        let heartbeat = backplane.heartbeat_edge(pb::HeartbeatEdgeRequest {
            edge_id: edge.edge_id.clone(),
        });
        let heartbeat = tokio::select! {
            heartbeat = heartbeat => heartbeat,
            _ = edge.shutdown.cancelled() => return forget_edge(&edge).await,
        };
        let held: std::collections::HashSet<String> = match heartbeat {
            Ok(held) => held.into_inner().connection_ids.into_iter().collect(),
            Err(status) => {
                tracing::warn!(code = ?status.code(), "directory heartbeat failed");
                continue;
            }
        };
        for peer in recorded {
            if !held.contains(&peer.connection_id)
                && !peer
                    .expired
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                // Items directed at it may have been held back from this
                // edge since the record went: the peer is told at once,
                // not at its next frame, which a node waiting for commands
                // may never send.
                tracing::info!(connection_id = %peer.connection_id, "connection record dropped: closing the peer");
                peer.outbound.close(close::CONVERSATION_EXPIRED);
            }
        }
        remove_orphans(&edge, held).await;
    }
}

/// At shutdown the edge's records go at once, rather than at their expiry.
async fn forget_edge(edge: &Edge) {
    let mut backplane = BackplaneClient::new(edge.peers.backplane.clone());
    let forget = backplane.forget_edge(pb::ForgetEdgeRequest {
        edge_id: edge.edge_id.clone(),
    });
    let _ = tokio::time::timeout(Duration::from_secs(2), forget).await;
}

/// The ids of the connections this edge holds now.
fn live_connections(edge: &Edge) -> HashSet<String> {
    edge.registry
        .all()
        .into_iter()
        .map(|p| p.connection_id.clone())
        .collect()
}

/// Removes the directory's records of connections this edge no longer
/// holds: a departure whose removal failed, or an arrival recorded after
/// the edge stopped waiting for it. Without this, the edge's heartbeats
/// would keep such a record alive for as long as the edge runs. The
/// registry is read after the heartbeat answered: a connection joins it
/// before it is recorded, so a record missing from it is of a connection
/// that left (removing it twice is harmless).
async fn remove_orphans(edge: &Edge, held: HashSet<String>) {
    let live = live_connections(edge);
    let orphans = held.into_iter().filter(|id| !live.contains(id));
    let remove = |connection_id: String| async move {
        match edge.unregister(connection_id).await {
            Ok(true) => tracing::debug!("removed the record of a connection that left"),
            Ok(false) => {}
            Err(status) => tracing::debug!(code = ?status.code(), "removing a stale record failed"),
        }
    };
    upkeep(orphans, remove).await;
}

/// Upserts again the entries presence does not hold for connected peers:
/// refused when their peers connected, or pruned while they stayed (after
/// an outage longer than the TTL). A peer that leaves waits for its
/// announcement in flight before its entry is removed, and is not
/// announced after.
async fn announce_pending(edge: &Edge) {
    let pending = edge
        .registry
        .all()
        .into_iter()
        .filter(|p| p.in_presence.load(Acquire) && p.announcing.is_pending());
    // Concurrently, so that the edge's batching sends them a few hundred
    // per call: after an outage, every peer may be pending at once.
    let announce = |peer: Arc<crate::registry::Peer>| async move {
        if let Err(status) = crate::connection::announce(edge, &peer).await {
            tracing::warn!(code = ?status.code(), "presence upsert retry failed");
        }
    };
    upkeep(pending, announce).await;
}

/// How many presence entries or directory records the edge's upkeep sends
/// at a time (its batching groups them into calls).
const UPKEEP_CONCURRENCY: usize = 512;

/// Runs `each` on every item, [`UPKEEP_CONCURRENCY`] at a time: the edge's
/// batching then sends them a few hundred per call.
async fn upkeep<T, F, Fut>(items: impl Iterator<Item = T>, each: F)
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = ()>,
{
    futures::StreamExt::for_each_concurrent(futures::stream::iter(items), UPKEEP_CONCURRENCY, each)
        .await;
}

/// Keeps the edge's own `gateway` entry and its peers' entries fresh: the
/// gateway entry is upserted at start, then everything is touched every
/// `touch_interval` (no event: only changes are broadcast).
pub(crate) async fn refresh_presence(edge: Arc<Edge>) {
    let gateway = || pb::InstanceEntry {
        instance_id: format!("edge-{}", edge.edge_id),
        role: "gateway".into(),
        reported_host: String::new(),
        reported_ip: String::new(),
        observed_ip: String::new(),
        version: env!("CARGO_PKG_VERSION").into(),
        mode: "backend".into(),
        last_seen_at_ms: 0,
        last_input_seconds: -1,
        reason: "self".into(),
        metadata_json: serde_json::json!({"edge_id": edge.edge_id, "ws_url": edge.ws_url})
            .to_string(),
        edge_id: String::new(),
    };
    let mut announced = false;
    let mut forgotten = false;
    let mut revival_owed = false;
    let mut tick = tokio::time::interval(edge.config.touch_interval);
    let gateway_id = format!("edge-{}", edge.edge_id);
    loop {
        tick.tick().await;
        // An edge that comes back under its name before presence expired
        // it (its refreshes kept coming) would otherwise keep the topic
        // sessions of its previous run for ever: their connections are
        // gone, and nothing would untrack them. Once per run, before this
        // run tracks any (tracking waits for it).
        if !forgotten {
            let forget = edge
                .presence()
                .forget_edge_sessions(pb::ForgetEdgeSessionsRequest {
                    edge_id: edge.edge_id.clone(),
                })
                .await;
            match forget {
                Ok(reply) => {
                    forgotten = true;
                    edge.topics_ready.send_replace(true);
                    let removed = reply.into_inner().removed;
                    if removed > 0 {
                        tracing::info!(removed, "topic sessions of this edge's previous run left");
                    }
                }
                Err(status) => {
                    tracing::debug!(code = ?status.code(), "forgetting the previous run's topic sessions failed; the next refresh tries again")
                }
            }
        }
        // The gateway's own entry is touched on its own. The touch also
        // tells presence this edge is alive, which keeps its topic
        // sessions; and when the entry was not there to touch (the cap
        // pruned it, or the TTL after an outage), it is announced again.
        let touched = edge
            .presence()
            .touch_instances(pb::TouchInstancesRequest {
                tenant_id: edge.config.gateway_tenant.clone(),
                instance_ids: vec![gateway_id.clone()],
                edge_id: edge.edge_id.clone(),
            })
            .await;
        match touched {
            Ok(reply) => {
                revival_owed |= reply.get_ref().sessions_kept;
                if reply.get_ref().touched == 0 && announced {
                    tracing::info!("the gateway presence entry was pruned; announcing it again");
                    announced = false;
                }
            }
            Err(status) => tracing::debug!(code = ?status.code(), "presence refresh failed"),
        }
        if !announced {
            let upsert =
                crate::connection::upsert(&edge, &edge.config.gateway_tenant, gateway()).await;
            match upsert {
                Ok(_) => announced = true,
                Err(status) => {
                    tracing::warn!(code = ?status.code(), "gateway presence not announced yet")
                }
            }
        }
        // Entries written from here on may land after this round's looks.
        let round = edge.refresh_round.fetch_add(1, AcqRel) + 1;
        let mut by_tenant: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for peer in edge
            .registry
            .all()
            .into_iter()
            .filter(|p| p.in_presence.load(Acquire))
        {
            by_tenant
                .entry(peer.claims.tenant_id.clone())
                .or_default()
                .push(peer.device_id.clone());
        }
        // In chunks, so that no single transaction holds the store's write
        // lock for long while new connections wait to be recorded.
        for (tenant_id, instance_ids) in by_tenant {
            for chunk in instance_ids.chunks(TOUCH_CHUNK) {
                let touched = edge
                    .presence()
                    .touch_instances(pb::TouchInstancesRequest {
                        tenant_id: tenant_id.clone(),
                        instance_ids: chunk.to_vec(),
                        edge_id: edge.edge_id.clone(),
                    })
                    .await;
                if let Ok(reply) = &touched {
                    revival_owed |= reply.get_ref().sessions_kept;
                }
                match touched {
                    Ok(reply) if !reply.get_ref().missing_ids.is_empty() => {
                        let missing: HashSet<&str> = reply
                            .get_ref()
                            .missing_ids
                            .iter()
                            .map(String::as_str)
                            .collect();
                        tracing::info!(
                            count = missing.len(),
                            "presence lost entries of connected peers; announcing them again"
                        );
                        // One connection per device: the entry is the
                        // device's, and each would bring its own
                        // `presence.upserted`. (Should that one leave or
                        // fail, the next refresh finds the entry missing
                        // again and announces it then.)
                        let mut picked = HashSet::new();
                        for peer in edge.registry.tenant(&tenant_id) {
                            if missing.contains(peer.device_id.as_str())
                                && peer.in_presence.load(Acquire)
                                && picked.insert(peer.device_id.clone())
                            {
                                peer.announcing.lost(round);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), "presence refresh failed")
                    }
                }
            }
        }
        announce_pending(&edge).await;
        if forgotten {
            if revival_owed && revive_sessions(&edge).await {
                revival_owed = false;
                // A peer that left while its sessions were revived was not
                // among them when it untracked.
                edge.untracks_failed.store(true, Release);
            }
            let owed = edge.untracks_failed.swap(false, AcqRel);
            if (owed || round.is_multiple_of(SESSION_AUDIT_ROUNDS))
                && !untrack_departed(&edge).await
            {
                edge.untracks_failed.store(true, Release);
            }
        }
    }
}

/// Presence took this edge for gone (it could not refresh for longer than
/// the TTL: a partition, a stalled process), and its peers' topic sessions
/// left with `leave` diffs while the peers stayed connected. Those of the
/// connections it still holds come back, as they were, with `join` diffs.
/// False when presence could not be asked; the next refresh asks again.
async fn revive_sessions(edge: &Edge) -> bool {
    let live: Vec<String> = live_connections(edge).into_iter().collect();
    let chunks: Vec<&[String]> = if live.is_empty() {
        // Still one call: the last one forgets what presence kept.
        vec![&[]]
    } else {
        live.chunks(muster_presence::REVIVE_CONNECTIONS).collect()
    };
    let mut revived = 0;
    for (n, chunk) in chunks.iter().enumerate() {
        let request = pb::ReviveEdgeSessionsRequest {
            edge_id: edge.edge_id.clone(),
            connection_ids: chunk.to_vec(),
            last: n + 1 == chunks.len(),
        };
        match edge.presence().revive_edge_sessions(request).await {
            Ok(reply) => revived += reply.into_inner().revived,
            Err(status) => {
                tracing::debug!(code = ?status.code(), "reviving this edge's topic sessions failed");
                return false;
            }
        }
    }
    if revived > 0 {
        tracing::info!(
            revived,
            "presence had taken this edge for gone; its peers' topic sessions are back"
        );
    }
    true
}

/// Every how many presence refreshes the edge looks for topic sessions of
/// connections it no longer holds, when no untrack failed meanwhile (about
/// a minute at the default interval).
const SESSION_AUDIT_ROUNDS: u64 = 12;

/// Untracks the topic sessions presence holds for this edge's connections
/// that are gone: an untrack that failed when its peer left (presence was
/// unreachable), or a track that landed after its connection closed.
/// Without this, the edge's refreshes would keep such sessions for as long
/// as it runs. The registry is read after presence answered: a connection
/// joins it before it tracks anything, so a session of a connection missing
/// from it is of one that left (untracking twice is harmless). Not while
/// the edge stops: its peers leave the registry then without untracking,
/// since a stopped edge's sessions stay for the TTL. False when presence
/// could not be asked or an untrack failed.
async fn untrack_departed(edge: &Edge) -> bool {
    if edge.shutdown.is_cancelled() {
        return true;
    }
    // In pages: an edge may hold more connections with sessions than one
    // reply carries.
    let mut connections = Vec::new();
    loop {
        let listed = edge
            .presence()
            .edge_session_connections(pb::EdgeSessionConnectionsRequest {
                edge_id: edge.edge_id.clone(),
                after: connections.last().cloned(),
                limit: 0,
            })
            .await;
        match listed {
            Ok(reply) => {
                let page = reply.into_inner();
                connections.extend(page.connections);
                if !page.more {
                    break;
                }
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), "listing this edge's topic sessions failed");
                return false;
            }
        }
    }
    let live = live_connections(edge);
    let departed = connections
        .into_iter()
        .filter(|c| !live.contains(&c.connection_id));
    let all_untracked = std::sync::atomic::AtomicBool::new(true);
    let untrack = |request: pb::UntrackConnectionRequest| {
        let all_untracked = &all_untracked;
        async move {
            if edge.shutdown.is_cancelled() {
                return;
            }
            match edge.presence().untrack_connection(request).await {
                Ok(reply) if reply.get_ref().removed > 0 => {
                    tracing::info!(
                        removed = reply.get_ref().removed,
                        "untracked the topic sessions of a connection that left"
                    );
                }
                Ok(_) => {}
                Err(status) => {
                    tracing::debug!(code = ?status.code(), "untracking a departed connection's sessions failed");
                    all_untracked.store(false, Relaxed);
                }
            }
        }
    };
    upkeep(departed, untrack).await;
    all_untracked.load(Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(position: i64, occurred_at_ms: i64) -> pb::OutboxItem {
        pb::OutboxItem {
            position,
            occurred_at_ms,
            ..Default::default()
        }
    }

    #[test]
    fn items_before_the_first_head_are_no_peers_when_none_was_accepted_before_it() {
        let mut fresh = Fresh::default();
        fresh.started(20);
        fresh.started_late(10, 30);
        assert!(!fresh.admits(1_000, &item(20, 5_000)));
        assert!(fresh.admits(1_000, &item(21, 0)));
    }

    #[test]
    fn a_stream_answered_after_peers_were_accepted_gives_them_what_came_after_the_start() {
        let mut fresh = Fresh::default();
        fresh.started_late(10, 20);
        // Later stream starts change nothing.
        fresh.started(40);
        fresh.started_late(40, 50);
        // Up to the head: by the producers' clocks against the edge's start.
        assert!(
            !fresh.admits(1_000, &item(10, 5_000)),
            "acknowledged already"
        );
        assert!(!fresh.admits(1_000, &item(15, 999)));
        assert!(fresh.admits(1_000, &item(16, 1_000)));
        // After it: everything.
        assert!(fresh.admits(1_000, &item(21, 0)));
        // A restored outbox gives positions again from its head.
        fresh.rewound(5);
        assert!(fresh.admits(1_000, &item(6, 0)));
    }

    #[test]
    fn losses_up_to_the_first_head_concern_no_peer_only_when_none_was_accepted_before_it() {
        let mut fresh = Fresh::default();
        // Not told yet where the stream starts.
        assert!(!fresh.before_any_peer(1));
        fresh.started(20);
        assert!(fresh.before_any_peer(20));
        assert!(!fresh.before_any_peer(21));
        // Peers were accepted before the stream was answered: what came
        // up to its head may have been theirs.
        let mut late = Fresh::default();
        late.started_late(10, 20);
        assert!(!late.before_any_peer(15));
    }

    #[test]
    fn what_the_stream_sent_is_named_without_marks_and_without_what_a_rewind_took_back() {
        let sent = |position: i64| pb::OutboxItem {
            position,
            event_id: format!("e{position}"),
            ..Default::default()
        };
        let mark = pb::OutboxItem {
            position: 9,
            mark: true,
            ..Default::default()
        };
        let gap = |position| pb::OutboxItem {
            position,
            gap: true,
            ..Default::default()
        };
        let mut seen = Seen::default();
        seen.push(&[sent(3), sent(5), mark, sent(10)]);
        let named = |seen: &Seen| -> Vec<(i64, String)> {
            seen.request()
                .into_iter()
                .map(|s| (s.position, s.event_id))
                .collect()
        };
        assert_eq!(
            named(&seen),
            vec![(3, "e3".into()), (5, "e5".into()), (10, "e10".into())]
        );
        // A gap past what was sent (compaction) changes nothing; one below
        // it (a rewind) drops what stood above it.
        seen.push(&[gap(20), sent(21)]);
        assert_eq!(named(&seen).len(), 4);
        seen.push(&[gap(4), sent(5)]);
        assert_eq!(named(&seen), vec![(3, "e3".into()), (5, "e5".into())]);
        seen.push(&(100..200).map(sent).collect::<Vec<_>>());
        assert_eq!(seen.request().len(), SEEN);
        assert_eq!(seen.request().last().unwrap().position, 199);
    }
}
