//! Topic presence requests of a connected peer: each becomes a call to
//! presence; diffs come back through the backplane to the topic's
//! subscribers.

use muster_proto::v1 as pb;
use muster_protocol::envelope::Request;
use muster_protocol::parse_datetime;
use muster_protocol::topics::{Status, Topic, Track, Untrack};
use serde_json::{Value, json};

use crate::Edge;
use crate::registry::Peer;

/// A request's outcome: a result, a refusal of the payload, or a failed
/// call.
pub(crate) enum Outcome {
    Done(Option<Value>),
    Invalid(String),
    Failed(tonic::Status),
    /// Not a `muster.topic.*` type muster has.
    Unsupported,
}

fn wire(s: &pb::TopicSession) -> Value {
    muster_presence::TopicSession::from(s.clone()).wire()
}

/// The sessions a `scope` names: the whole cluster's, or this edge's.
fn scoped_edge(edge: &Edge, topic: &Topic) -> String {
    match topic.scope.as_deref() {
        Some("edge") => edge.edge_id.clone(),
        _ => String::new(),
    }
}

/// A page of a topic's sessions, with the cursor of the next page when
/// there is one.
async fn list(edge: &Edge, peer: &Peer, topic: &Topic) -> Result<Value, tonic::Status> {
    let page = edge
        .presence()
        .list_topic(pb::ListTopicRequest {
            tenant_id: peer.claims.tenant_id.clone(),
            topic: topic.topic.clone(),
            edge_id: scoped_edge(edge, topic),
            after: topic.after.clone().unwrap_or_default(),
            limit: topic.limit.unwrap_or(0),
        })
        .await?
        .into_inner();
    let mut result = json!({ "sessions": page.sessions.iter().map(wire).collect::<Vec<_>>() });
    if page.more
        && let Some(last) = page.sessions.last()
    {
        result["next"] = json!(last.session_id);
    }
    Ok(result)
}

async fn count(edge: &Edge, peer: &Peer, topic: &Topic) -> Result<Value, tonic::Status> {
    let counted = edge
        .presence()
        .count_topic(pb::CountTopicRequest {
            tenant_id: peer.claims.tenant_id.clone(),
            topic: topic.topic.clone(),
            edge_id: scoped_edge(edge, topic),
        })
        .await?
        .into_inner();
    Ok(json!({
        "total": counted.total,
        "humans": counted.humans,
        "agents": counted.total.saturating_sub(counted.humans),
    }))
}

fn too_many_topics() -> tonic::Status {
    tonic::Status::failed_precondition(format!(
        "a connection subscribes to at most {} topics; unsubscribe from one first",
        crate::registry::PEER_TOPICS
    ))
}

/// Handles a `muster.topic.*` request.
pub(crate) async fn handle(edge: &Edge, peer: &Peer, request: &Request) -> Outcome {
    let tenant_id = peer.claims.tenant_id.clone();
    let mut presence = edge.presence();
    let outcome = match request.kind.as_str() {
        "muster.topic.track" => {
            let track = match Track::parse(&request.payload) {
                Ok(track) => track,
                Err(message) => return Outcome::Invalid(message),
            };
            // Not before presence has dropped this edge's earlier run's
            // sessions (at its first refresh), which would take this one
            // with them.
            let mut ready = edge.topics_ready.subscribe();
            let waited = tokio::time::timeout(crate::CALL_DEADLINE, ready.wait_for(|ready| *ready));
            if !matches!(waited.await, Ok(Ok(_))) {
                return Outcome::Failed(tonic::Status::unavailable(
                    "topic presence is not ready on this edge",
                ));
            }
            let session = pb::TopicSession {
                tenant_id,
                topic: track.topic.clone(),
                session_id: track.session.unwrap_or_else(|| peer.connection_id.clone()),
                principal: track.principal,
                kind: track.kind,
                agent_id: track.agent_id.unwrap_or_default(),
                edge_id: edge.edge_id.clone(),
                connection_id: peer.connection_id.clone(),
                device_id: peer.device_id.clone(),
                ..Default::default()
            };
            // Subscribed before the track, so that the peer's own join
            // reaches it; taken back if the track is refused. Not if the
            // call's outcome is unknown (a deadline, a lost connection):
            // presence may have tracked it, and the peer would then miss
            // its topic's diffs.
            let Some(added) = peer.subscribe(&track.topic) else {
                return Outcome::Failed(too_many_topics());
            };
            peer.tracked
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let tracked = presence
                .track_topic(pb::TrackTopicRequest {
                    session: Some(session),
                })
                .await;
            if let Err(status) = &tracked
                && added
                && matches!(
                    status.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::PermissionDenied
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::NotFound
                )
            {
                peer.unsubscribe(&track.topic);
            }
            tracked.map(|s| Some(json!({ "session": wire(&s.into_inner()) })))
        }
        "muster.topic.untrack" => {
            let untrack = match Untrack::parse(&request.payload) {
                Ok(untrack) => untrack,
                Err(message) => return Outcome::Invalid(message),
            };
            presence
                .untrack_topic(pb::UntrackTopicRequest {
                    tenant_id,
                    topic: untrack.topic,
                    session_id: untrack
                        .session
                        .unwrap_or_else(|| peer.connection_id.clone()),
                    device_id: peer.device_id.clone(),
                })
                .await
                .map(|r| Some(json!({ "removed": r.into_inner().removed > 0 })))
        }
        "muster.topic.status" => {
            let status = match Status::parse(&request.payload) {
                Ok(status) => status,
                Err(message) => return Outcome::Invalid(message),
            };
            // 0 on the wire is "no until": a time at or before the epoch
            // is refused here rather than taken for none.
            let until_ms = match status.until.as_deref().map(parse_datetime) {
                None => 0,
                Some(Some(ms)) if ms > 0 => ms,
                Some(Some(_)) => return Outcome::Invalid("until must be in the future".into()),
                Some(None) => return Outcome::Invalid("until: expected a datetime".into()),
            };
            presence
                .set_topic_status(pb::SetTopicStatusRequest {
                    tenant_id,
                    topic: status.topic,
                    session_id: status.session.unwrap_or_else(|| peer.connection_id.clone()),
                    state: status.state,
                    note: status.note,
                    until_ms,
                    device_id: peer.device_id.clone(),
                })
                .await
                .map(|s| Some(json!({ "session": wire(&s.into_inner()) })))
        }
        kind => {
            let known = matches!(
                kind,
                "muster.topic.subscribe"
                    | "muster.topic.unsubscribe"
                    | "muster.topic.list"
                    | "muster.topic.count"
            );
            if !known {
                return Outcome::Unsupported;
            }
            let topic = match Topic::parse(&request.payload) {
                Ok(topic) => topic,
                Err(message) => return Outcome::Invalid(message),
            };
            if (topic.after.is_some() || topic.limit.is_some()) && kind != "muster.topic.list" {
                return Outcome::Invalid(
                    "after and limit are keys of muster.topic.list only".into(),
                );
            }
            // A subscription is to the whole cluster's diffs: a peer that
            // asked for one edge's would believe it had them.
            if topic.scope.as_deref() == Some("edge")
                && matches!(kind, "muster.topic.subscribe" | "muster.topic.unsubscribe")
            {
                return Outcome::Invalid(
                    "a subscription is to the whole cluster's diffs: scope edge is for \
                     muster.topic.list and muster.topic.count only"
                        .into(),
                );
            }
            match kind {
                "muster.topic.subscribe" => match peer.subscribe(&topic.topic) {
                    Some(_) => Ok(Some(json!({ "topic": topic.topic }))),
                    None => Err(too_many_topics()),
                },
                "muster.topic.unsubscribe" => {
                    peer.unsubscribe(&topic.topic);
                    Ok(Some(json!({ "topic": topic.topic })))
                }
                "muster.topic.list" => list(edge, peer, &topic).await.map(Some),
                _count => count(edge, peer, &topic).await.map(Some),
            }
        }
    };
    match outcome {
        Ok(result) => Outcome::Done(result),
        Err(status) => Outcome::Failed(status),
    }
}
