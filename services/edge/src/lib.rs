//! muster's edge: the only component facing the outside. It speaks the
//! client protocol to operators and nodes over WebSocket and turns requests
//! into calls to the owning services; it keeps no durable state.
//!
//! This part serves the edge's HTTP listener (`/healthz`) and its gRPC
//! description; the WebSocket protocol is built on it.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::routing::get;
use muster_mesh::{Rule, ServiceSpec};
use muster_proto::v1 as pb;
use muster_proto::v1::edge_server::{Edge as EdgeRpc, EdgeServer};
use muster_tls::ServiceName::Ctl;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// What one edge is and holds.
#[derive(Debug)]
pub struct Edge {
    pub edge_id: String,
    pub ws_url: String,
    pub started_at_ms: i64,
    open_connections: AtomicU64,
}

impl Edge {
    /// An edge whose clients connect at `ws_addr`.
    pub fn new(ws_addr: SocketAddr) -> Arc<Edge> {
        Arc::new(Edge {
            edge_id: uuid::Uuid::new_v4().to_string(),
            ws_url: format!("ws://{ws_addr}/ws"),
            started_at_ms: muster_store::now_ms(),
            open_connections: AtomicU64::new(0),
        })
    }

    pub fn open_connections(&self) -> u64 {
        self.open_connections.load(Ordering::Relaxed)
    }
}

/// Who may call what on the edge; everything else is denied.
pub const RULES: &[Rule] = &[Rule::new("/muster.v1.Edge/DescribeEdge", &[Ctl])];

/// The gRPC face of an [`Edge`].
pub struct EdgeService {
    edge: Arc<Edge>,
}

/// The edge as the mesh serves it.
pub fn spec(edge: Arc<Edge>) -> ServiceSpec {
    ServiceSpec {
        name: muster_tls::ServiceName::Edge,
        grpc_service: "muster.v1.Edge",
        routes: tonic::service::Routes::new(EdgeServer::new(EdgeService { edge })),
        rules: RULES,
    }
}

#[tonic::async_trait]
impl EdgeRpc for EdgeService {
    async fn describe_edge(
        &self,
        _: Request<pb::DescribeEdgeRequest>,
    ) -> Result<Response<pb::EdgeDescription>, Status> {
        Ok(Response::new(pb::EdgeDescription {
            edge_id: self.edge.edge_id.clone(),
            ws_url: self.edge.ws_url.clone(),
            open_connections: self.edge.open_connections(),
            started_at_ms: self.edge.started_at_ms,
            version: env!("CARGO_PKG_VERSION").into(),
        }))
    }
}

/// Serves the edge's HTTP listener until `shutdown`, then lets open
/// requests finish.
pub async fn serve_http(
    edge: Arc<Edge>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(edge);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
