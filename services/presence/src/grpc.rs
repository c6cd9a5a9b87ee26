use muster_mesh::{Rule, ServiceSpec, to_status};
use muster_proto::v1 as pb;
use muster_proto::v1::presence_server::{Presence, PresenceServer};
use muster_tls::ServiceName::{Ctl, Edge};
use tonic::{Request, Response, Status};

use crate::{InstanceEntry, Instances, PresenceError, TopicSession, Topics};

fn none_if_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<pb::TopicSession> for TopicSession {
    fn from(s: pb::TopicSession) -> Self {
        TopicSession {
            tenant_id: s.tenant_id,
            topic: s.topic,
            session_id: s.session_id,
            principal: s.principal,
            kind: s.kind,
            agent_id: none_if_empty(s.agent_id),
            since_ms: s.since_ms,
            state: s.state,
            note: s.note,
            until_ms: (s.until_ms != 0).then_some(s.until_ms),
            edge_id: s.edge_id,
            connection_id: s.connection_id,
            device_id: s.device_id,
        }
    }
}

impl From<TopicSession> for pb::TopicSession {
    fn from(s: TopicSession) -> Self {
        pb::TopicSession {
            tenant_id: s.tenant_id,
            topic: s.topic,
            session_id: s.session_id,
            principal: s.principal,
            kind: s.kind,
            agent_id: s.agent_id.unwrap_or_default(),
            since_ms: s.since_ms,
            state: s.state,
            note: s.note,
            until_ms: s.until_ms.unwrap_or(0),
            edge_id: s.edge_id,
            connection_id: s.connection_id,
            device_id: s.device_id,
        }
    }
}

/// The most sessions one `ListTopic` reply carries: a page stays far
/// below a gRPC message's 4 MiB whatever a topic holds.
pub const LIST_PAGE: usize = muster_protocol::topics::LIST_PAGE as usize;

/// The most (tenant, connection) pairs one `EdgeSessionConnections`
/// reply carries.
pub const CONNECTIONS_PAGE: usize = 5000;

/// The size of a page a caller asked for: at most `most`, and `most`
/// when it named none (0).
fn page(limit: u32, most: usize) -> usize {
    match limit {
        0 => most,
        n => (n as usize).min(most),
    }
}

/// Who may call what on presence; everything else is denied.
pub const RULES: &[Rule] = &[
    Rule::new("/muster.v1.Presence/UpdateInstances", &[Edge]),
    Rule::new("/muster.v1.Presence/ListInstances", &[Edge, Ctl]),
    Rule::new("/muster.v1.Presence/TouchInstances", &[Edge]),
    Rule::new("/muster.v1.Presence/ReportCapabilities", &[Edge]),
    Rule::new("/muster.v1.Presence/TrackTopic", &[Edge]),
    Rule::new("/muster.v1.Presence/UntrackTopic", &[Edge]),
    Rule::new("/muster.v1.Presence/UntrackConnection", &[Edge]),
    Rule::new("/muster.v1.Presence/ForgetEdgeSessions", &[Edge]),
    Rule::new("/muster.v1.Presence/EdgeSessionConnections", &[Edge]),
    Rule::new("/muster.v1.Presence/ReviveEdgeSessions", &[Edge]),
    Rule::new("/muster.v1.Presence/SetTopicStatus", &[Edge]),
    Rule::new("/muster.v1.Presence/ListTopic", &[Edge, Ctl]),
    Rule::new("/muster.v1.Presence/CountTopic", &[Edge, Ctl]),
];

/// The gRPC face of [`Instances`].
pub struct PresenceService {
    instances: Instances,
    topics: Topics,
}

impl PresenceService {
    async fn apply(&self, change: pb::InstanceChange) -> pb::InstanceOutcome {
        let applied = match change.change {
            Some(pb::instance_change::Change::Upsert(upsert)) => {
                let stored = async {
                    let entry = upsert
                        .entry
                        .ok_or_else(|| PresenceError::Invalid("entry is required".into()))
                        .and_then(InstanceEntry::try_from)?;
                    self.instances.upsert(&upsert.tenant_id, entry).await
                }
                .await;
                match stored {
                    Ok(entry) => (Ok(true), Some(entry.into())),
                    Err(e) => (Err(to_status(&e)), None),
                }
            }
            Some(pb::instance_change::Change::Remove(remove)) => {
                let removed = self
                    .instances
                    .remove(&remove.tenant_id, &remove.instance_id, &remove.edge_id)
                    .await;
                (removed.map_err(|e| to_status(&e)), None)
            }
            None => (Err(Status::invalid_argument("change is required")), None),
        };
        pb::InstanceOutcome {
            outcome: Some(pb::ItemOutcome::of(applied.0)),
            entry: applied.1,
        }
    }
}

/// Presence as the mesh serves it.
pub fn spec(instances: Instances, topics: Topics) -> ServiceSpec {
    ServiceSpec {
        name: muster_tls::ServiceName::Presence,
        grpc_service: "muster.v1.Presence",
        routes: tonic::service::Routes::new(PresenceServer::new(PresenceService {
            instances,
            topics,
        })),
        rules: RULES,
    }
}

impl TryFrom<pb::InstanceEntry> for InstanceEntry {
    type Error = PresenceError;

    fn try_from(e: pb::InstanceEntry) -> Result<Self, PresenceError> {
        Ok(InstanceEntry {
            role: e.role.parse()?,
            instance_id: e.instance_id,
            reported_host: e.reported_host,
            reported_ip: e.reported_ip,
            observed_ip: e.observed_ip,
            version: e.version,
            mode: e.mode,
            last_seen_at_ms: e.last_seen_at_ms,
            last_input_seconds: (e.last_input_seconds >= 0).then_some(e.last_input_seconds),
            reason: e.reason,
            metadata: if e.metadata_json.is_empty() {
                serde_json::json!({})
            } else {
                serde_json::from_str(&e.metadata_json)
                    .map_err(|err| PresenceError::Invalid(format!("metadata_json: {err}")))?
            },
            edge_id: e.edge_id,
        })
    }
}

impl From<InstanceEntry> for pb::InstanceEntry {
    fn from(e: InstanceEntry) -> Self {
        pb::InstanceEntry {
            instance_id: e.instance_id,
            role: e.role.as_str().into(),
            reported_host: e.reported_host,
            reported_ip: e.reported_ip,
            observed_ip: e.observed_ip,
            version: e.version,
            mode: e.mode,
            last_seen_at_ms: e.last_seen_at_ms,
            last_input_seconds: e.last_input_seconds.unwrap_or(-1),
            reason: e.reason,
            metadata_json: e.metadata.to_string(),
            edge_id: e.edge_id,
        }
    }
}

#[tonic::async_trait]
impl Presence for PresenceService {
    async fn update_instances(
        &self,
        request: Request<pb::UpdateInstancesRequest>,
    ) -> Result<Response<pb::UpdateInstancesResponse>, Status> {
        let changes = request.into_inner().changes;
        muster_proto::check_batch_len(changes.len())?;
        // Submitted together and in order, the changes share the group
        // commit's transactions; each still succeeds or fails alone.
        let outcomes = futures::future::join_all(changes.into_iter().map(|c| self.apply(c))).await;
        Ok(Response::new(pb::UpdateInstancesResponse { outcomes }))
    }

    async fn track_topic(
        &self,
        request: Request<pb::TrackTopicRequest>,
    ) -> Result<Response<pb::TopicSession>, Status> {
        let session = request
            .into_inner()
            .session
            .ok_or_else(|| Status::invalid_argument("session is required"))?;
        let tracked = self
            .topics
            .track(session.into())
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(tracked.into()))
    }

    async fn untrack_topic(
        &self,
        request: Request<pb::UntrackTopicRequest>,
    ) -> Result<Response<pb::UntrackTopicResponse>, Status> {
        let r = request.into_inner();
        let removed = self
            .topics
            .untrack(&r.tenant_id, &r.topic, &r.session_id, &r.device_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::UntrackTopicResponse {
            removed: u32::from(removed),
        }))
    }

    async fn untrack_connection(
        &self,
        request: Request<pb::UntrackConnectionRequest>,
    ) -> Result<Response<pb::UntrackTopicResponse>, Status> {
        let r = request.into_inner();
        let removed = self
            .topics
            .untrack_connection(&r.tenant_id, &r.connection_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::UntrackTopicResponse {
            removed: removed as u32,
        }))
    }

    async fn edge_session_connections(
        &self,
        request: Request<pb::EdgeSessionConnectionsRequest>,
    ) -> Result<Response<pb::EdgeSessionConnectionsResponse>, Status> {
        let r = request.into_inner();
        let after = r.after.unwrap_or_default();
        let limit = page(r.limit, CONNECTIONS_PAGE);
        let (pairs, more) = self
            .topics
            .edge_session_connections(&r.edge_id, (&after.tenant_id, &after.connection_id), limit)
            .await
            .map_err(|e| to_status(&e))?;
        let connections = pairs
            .into_iter()
            .map(|(tenant_id, connection_id)| pb::UntrackConnectionRequest {
                tenant_id,
                connection_id,
            })
            .collect();
        Ok(Response::new(pb::EdgeSessionConnectionsResponse {
            connections,
            more,
        }))
    }

    async fn revive_edge_sessions(
        &self,
        request: Request<pb::ReviveEdgeSessionsRequest>,
    ) -> Result<Response<pb::ReviveEdgeSessionsResponse>, Status> {
        let r = request.into_inner();
        let revived = self
            .topics
            .revive_edge_sessions(&r.edge_id, &r.connection_ids, r.last)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ReviveEdgeSessionsResponse {
            revived: revived as u32,
        }))
    }

    async fn forget_edge_sessions(
        &self,
        request: Request<pb::ForgetEdgeSessionsRequest>,
    ) -> Result<Response<pb::UntrackTopicResponse>, Status> {
        let r = request.into_inner();
        let removed = self
            .topics
            .forget_edge_sessions(&r.edge_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::UntrackTopicResponse {
            removed: removed as u32,
        }))
    }

    async fn set_topic_status(
        &self,
        request: Request<pb::SetTopicStatusRequest>,
    ) -> Result<Response<pb::TopicSession>, Status> {
        let r = request.into_inner();
        let until = (r.until_ms != 0).then_some(r.until_ms);
        let updated = self
            .topics
            .set_status(
                &r.tenant_id,
                &r.topic,
                &r.session_id,
                &r.device_id,
                &r.state,
                &r.note,
                until,
            )
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(updated.into()))
    }

    async fn list_topic(
        &self,
        request: Request<pb::ListTopicRequest>,
    ) -> Result<Response<pb::ListTopicResponse>, Status> {
        let r = request.into_inner();
        let edge = (!r.edge_id.is_empty()).then_some(r.edge_id.as_str());
        let limit = page(r.limit, LIST_PAGE);
        let (sessions, more) = self
            .topics
            .list(&r.tenant_id, &r.topic, edge, &r.after, limit)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListTopicResponse {
            sessions: sessions.into_iter().map(Into::into).collect(),
            more,
        }))
    }

    async fn count_topic(
        &self,
        request: Request<pb::CountTopicRequest>,
    ) -> Result<Response<pb::CountTopicResponse>, Status> {
        let r = request.into_inner();
        let edge = (!r.edge_id.is_empty()).then_some(r.edge_id.as_str());
        let (total, humans) = self
            .topics
            .count(&r.tenant_id, &r.topic, edge)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::CountTopicResponse { total, humans }))
    }

    async fn touch_instances(
        &self,
        request: Request<pb::TouchInstancesRequest>,
    ) -> Result<Response<pb::TouchInstancesResponse>, Status> {
        let r = request.into_inner();
        let touched = self
            .instances
            .touch(
                &r.tenant_id,
                &r.instance_ids,
                Some(r.edge_id.as_str()).filter(|e| !e.is_empty()),
            )
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::TouchInstancesResponse {
            touched: touched.touched as u32,
            missing_ids: touched.missing,
            sessions_kept: touched.sessions_kept,
        }))
    }

    async fn report_capabilities(
        &self,
        request: Request<pb::ReportCapabilitiesRequest>,
    ) -> Result<Response<pb::ReportCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        self.instances
            .report_capabilities(
                &r.tenant_id,
                &r.node_id,
                &r.capabilities_json,
                &r.capability_states_json,
            )
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ReportCapabilitiesResponse {}))
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let entries = self
            .instances
            .list(&request.into_inner().tenant_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListInstancesResponse {
            entries: entries.into_iter().map(Into::into).collect(),
        }))
    }
}
