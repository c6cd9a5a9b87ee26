use std::net::SocketAddr;
use std::sync::Arc;

use muster_tls::{MeshTls, ServiceName};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::Rule;
use crate::layer::MeshLayer;
use crate::stream::incoming;

/// One service as the mesh serves it.
pub struct ServiceSpec {
    pub name: ServiceName,
    /// Fully qualified gRPC service name, for health (`muster.v1.Presence`).
    pub grpc_service: &'static str,
    /// The service's own gRPC handlers.
    pub routes: Routes,
    /// Who may call which method; everything else is denied.
    pub rules: &'static [Rule],
}

/// A server accepting connections; [`RunningServer::wait`] returns once it
/// has drained after shutdown.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub name: ServiceName,
    pub health: HealthReporter,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("addr", &self.addr)
            .field("name", &self.name)
            .finish()
    }
}

impl RunningServer {
    /// Waits until the server has stopped accepting and every in-flight
    /// request has finished.
    pub async fn wait(self) -> Result<(), tonic::transport::Error> {
        match self.task.await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
}

/// Serves `spec` on `listener` over mTLS with health and reflection, until
/// `shutdown` is cancelled: then health turns NOT_SERVING, new connections
/// are refused and open ones drain.
pub async fn serve(
    spec: ServiceSpec,
    tls: Arc<MeshTls>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<RunningServer> {
    let addr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(spec.grpc_service, ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(muster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(std::io::Error::other)?;
    let routes = spec
        .routes
        .add_service(health_service)
        .add_service(reflection);
    let layer = MeshLayer {
        service: spec.name,
        rules: spec.rules,
        trust_domain: tls.trust_domain().into(),
    };
    let stream = incoming(listener, tls, spec.name, shutdown.clone());
    let reporter = health.clone();
    let grpc_service = spec.grpc_service;
    let signal = async move {
        shutdown.cancelled().await;
        reporter
            .set_service_status(grpc_service, ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    };
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layer)
            .add_routes(routes)
            .serve_with_incoming_shutdown(stream, signal),
    );
    tracing::info!(service = %spec.name, %addr, "grpc server listening (mtls)");
    Ok(RunningServer {
        addr,
        name: spec.name,
        health,
        task,
    })
}
