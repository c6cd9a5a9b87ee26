//! muster's backplane: the outbox (durable events and directed commands
//! every service appends in the transaction of its state change) and its
//! delivery to edges. Reads are per tenant and never cross tenants.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use muster_mesh::{Rule, ServiceSpec, to_status};
use muster_proto::v1 as pb;
use muster_proto::v1::backplane_server::{Backplane, BackplaneServer};
use muster_store::outbox::{Item, Target};
use muster_store::{Store, StoreError};
use muster_tls::ServiceName::{Ctl, Edge};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The most items one read returns.
pub const MAX_READ: u32 = 1000;

/// How often a subscription looks for new items when nothing woke it: the
/// correctness fallback for commits made by other processes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Where the backplane reads the outbox from.
#[tonic::async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    async fn read_after(
        &self,
        tenant_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Item>, StoreError>;
    async fn read_all_after(&self, after: i64, limit: u32) -> Result<Vec<Item>, StoreError>;
    async fn head(&self) -> Result<i64, StoreError>;
    /// Changes when this process commits a transaction.
    fn commits(&self) -> watch::Receiver<u64>;
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

    async fn read_all_after(&self, after: i64, limit: u32) -> Result<Vec<Item>, StoreError> {
        muster_store::outbox::read_all_after(self, after, limit).await
    }

    async fn head(&self) -> Result<i64, StoreError> {
        muster_store::outbox::head(self).await
    }

    fn commits(&self) -> watch::Receiver<u64> {
        Store::commits(self)
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

    /// Streams every item after `after` (or after the current head) into
    /// `sink`, oldest first, waking on local commits and polling for the
    /// rest, until the receiver goes away.
    pub async fn follow(&self, after: Option<i64>, sink: mpsc::Sender<Result<Item, StoreError>>) {
        let mut commits = self.store.commits();
        let mut cursor = match after {
            Some(position) => position,
            None => match self.store.head().await {
                Ok(head) => head,
                Err(error) => {
                    let _ = sink.send(Err(error)).await;
                    return;
                }
            },
        };
        loop {
            match self.store.read_all_after(cursor, MAX_READ).await {
                Ok(items) if !items.is_empty() => {
                    for item in items {
                        cursor = item.position;
                        if sink.send(Ok(item)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "outbox read failed; retrying");
                }
            }
            tokio::select! {
                _ = sink.closed() => return,
                _ = commits.changed() => {}
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
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
pub const RULES: &[Rule] = &[
    Rule::new("/muster.v1.Backplane/ReadOutbox", &[Edge, Ctl]),
    Rule::new("/muster.v1.Backplane/Subscribe", &[Edge]),
];

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
    type SubscribeStream = ReceiverStream<Result<pb::OutboxItem, Status>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = request.into_inner();
        let after = (!r.from_head).then_some(r.after_position);
        let (items, mut rx) = mpsc::channel(256);
        let (out, stream) = mpsc::channel(256);
        let outbox = self.outbox.clone();
        tokio::spawn(async move { outbox.follow(after, items).await });
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                let item = item.map(to_pb).map_err(|e| to_status(&e));
                if out.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }

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
