//! Stream resume (a muster extension): a peer names the last event it saw
//! and gets what the outbox still holds for it after that, or an explicit
//! gap when the outbox no longer holds that event (or the peer is too far
//! behind), so that it knows to re-read durable state.

use muster_proto::v1 as pb;
use serde_json::{Value, json};

use crate::Edge;
use crate::pump::{delivered, frame_for, target};
use crate::registry::Peer;

/// The most items one resume goes through; beyond it the peer is told
/// there is a gap.
pub const MAX_REPLAY: usize = 10_000;

/// What one resume request gets.
pub(crate) enum Outcome {
    Done(Value),
    Invalid(&'static str),
    Failed(tonic::Status),
}

pub(crate) async fn resume(edge: &Edge, peer: &Peer, payload: &Value) -> Outcome {
    let Some(object) = payload.as_object() else {
        return Outcome::Invalid("payload must be an object");
    };
    if object.keys().any(|k| k != "last_event_id") {
        return Outcome::Invalid("unknown field in muster.stream.resume");
    }
    let last = match object.get("last_event_id").and_then(Value::as_str) {
        Some(id) if !id.trim().is_empty() => id,
        _ => return Outcome::Invalid("last_event_id must be a non-empty string"),
    };
    let mut backplane = edge.backplane();
    let locate = pb::LocateRequest {
        tenant_id: peer.claims.tenant_id.clone(),
        event_id: last.to_owned(),
    };
    let located = match backplane.locate(locate.clone()).await {
        Ok(located) => located.into_inner(),
        Err(status) => return Outcome::Failed(status),
    };
    if !located.found {
        return Outcome::Done(json!({"gap": true, "replayed": 0}));
    }
    let mut after = located.position;
    let mut scanned = 0;
    let mut replayed = 0u64;
    loop {
        let page = backplane
            .read_outbox(pb::ReadOutboxRequest {
                tenant_id: peer.claims.tenant_id.clone(),
                after_position: after,
                limit: 0,
            })
            .await;
        let items = match page {
            Ok(page) => page.into_inner().items,
            Err(status) => return Outcome::Failed(status),
        };
        if items.is_empty() || scanned >= MAX_REPLAY {
            // Compaction takes the oldest items first, so while the named
            // event is still held, nothing after it was taken during the
            // replay; once it is gone, some of what followed may be too.
            let held = match backplane.locate(locate).await {
                Ok(held) => held.into_inner().found,
                Err(status) => return Outcome::Failed(status),
            };
            // More than MAX_REPLAY items follow the event: the rest is a
            // gap the peer fills from durable state.
            let gap = !items.is_empty() || !held;
            return Outcome::Done(json!({"gap": gap, "replayed": replayed}));
        }
        for item in items.iter().filter(|i| delivered(&i.r#type)) {
            let payload: Value = serde_json::from_str(&item.payload_json).unwrap_or_default();
            if let Some(text) = frame_for(peer, item, &payload, target(item).as_ref(), &mut None) {
                peer.outbound.send_paced(text).await;
                replayed += 1;
            }
        }
        scanned += items.len();
        after = items.last().map(|i| i.position).unwrap_or(after);
    }
}
