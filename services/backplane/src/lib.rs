//! muster's backplane: the outbox (durable events and directed commands
//! every service appends in the transaction of its state change) and its
//! delivery to edges. Reads are per tenant and never cross tenants.
#![forbid(unsafe_code)]

use std::sync::Arc;

use muster_mesh::{Rule, ServiceSpec, to_status};
use muster_proto::v1 as pb;
use muster_proto::v1::backplane_server::{Backplane, BackplaneServer};
use muster_store::outbox::{Item, Target};
use muster_store::{Store, StoreError};
use muster_tls::ServiceName::{Ctl, Edge};
use tonic::{Request, Response, Status};

/// The most items one read returns.
pub const MAX_READ: u32 = 1000;

/// Where the backplane reads the outbox from.
#[tonic::async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    async fn read_after(
        &self,
        tenant_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Item>, StoreError>;
}

#[tonic::async_trait]
impl OutboxStore for Store {
    async fn read_after(
        &self,
        tenant_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Item>, StoreError> {
        muster_store::outbox::read_after(self, tenant_id, after, limit).await
    }
}

/// Reading the outbox.
#[derive(Clone)]
pub struct Outbox {
    store: Arc<dyn OutboxStore>,
}

impl Outbox {
    pub fn new(store: Arc<dyn OutboxStore>) -> Self {
        Outbox { store }
    }

    /// Committed items of one tenant after `after`, at most `limit` (capped
    /// at [`MAX_READ`]; 0 means the cap).
    pub async fn read(
        &self,
        tenant_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Item>, StoreError> {
        if tenant_id.trim().is_empty() {
            return Err(StoreError::invalid("tenant_id", "required"));
        }
        let limit = if limit == 0 {
            MAX_READ
        } else {
            limit.min(MAX_READ)
        };
        self.store.read_after(tenant_id, after, limit).await
    }
}

/// Who may call what on the backplane; everything else is denied.
pub const RULES: &[Rule] = &[Rule::new("/muster.v1.Backplane/ReadOutbox", &[Edge, Ctl])];

/// The gRPC face of [`Outbox`].
pub struct BackplaneService {
    outbox: Outbox,
}

/// The backplane as the mesh serves it.
pub fn spec(outbox: Outbox) -> ServiceSpec {
    ServiceSpec {
        name: muster_tls::ServiceName::Backplane,
        grpc_service: "muster.v1.Backplane",
        routes: tonic::service::Routes::new(BackplaneServer::new(BackplaneService { outbox })),
        rules: RULES,
    }
}

fn to_pb(item: Item) -> pb::OutboxItem {
    let target = item.target.map(|t| pb::OutboxTarget {
        kind: Some(match t {
            Target::Device(id) => pb::outbox_target::Kind::DeviceId(id),
            Target::Connection(id) => pb::outbox_target::Kind::ConnectionId(id),
            Target::Edge(id) => pb::outbox_target::Kind::EdgeId(id),
        }),
    });
    pb::OutboxItem {
        position: item.position,
        tenant_id: item.tenant_id,
        event_id: item.event_id,
        r#type: item.kind,
        payload_json: item.payload.to_string(),
        target,
        audience: Some(pb::Audience {
            roles: item.audience_roles,
            scopes: item.audience_scopes,
        }),
        occurred_at_ms: item.occurred_at_ms,
    }
}

#[tonic::async_trait]
impl Backplane for BackplaneService {
    async fn read_outbox(
        &self,
        request: Request<pb::ReadOutboxRequest>,
    ) -> Result<Response<pb::ReadOutboxResponse>, Status> {
        let r = request.into_inner();
        let items = self
            .outbox
            .read(&r.tenant_id, r.after_position, r.limit)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ReadOutboxResponse {
            items: items.into_iter().map(to_pb).collect(),
        }))
    }
}
