use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use muster_tls::ServiceName;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::trace::HeaderExtractor;
use crate::{PeerInfo, Rule, authorize};

/// Authorization, tracing and metrics around every RPC of one service.
#[derive(Clone)]
pub(crate) struct MeshLayer {
    pub(crate) service: ServiceName,
    pub(crate) rules: &'static [Rule],
    pub(crate) trust_domain: Arc<str>,
}

impl<S> Layer<S> for MeshLayer {
    type Service = MeshService<S>;

    fn layer(&self, inner: S) -> MeshService<S> {
        MeshService {
            layer: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub(crate) struct MeshService<S> {
    layer: MeshLayer,
    inner: S,
}

type Response = http::Response<tonic::body::Body>;

impl<S, B> Service<http::Request<B>> for MeshService<S>
where
    S: Service<http::Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let service = self.layer.service.as_str();
        let path = req.uri().path().to_owned();
        let peer = req.extensions().get::<PeerInfo>();
        let caller = match authorize(self.layer.rules, &self.layer.trust_domain, &path, peer) {
            Ok(caller) => caller,
            Err(status) => {
                metrics::counter!("muster_grpc_server_denied_total", "service" => service)
                    .increment(1);
                tracing::warn!(
                    service,
                    method = %path,
                    peer = ?peer.and_then(|p| p.spiffe_id.as_ref()).map(|id| id.to_string()),
                    reason = status.message(),
                    "rpc refused"
                );
                let mut status = status;
                status.metadata_mut().insert(
                    crate::authz::REFUSED_BY_MESH,
                    "true".parse().expect("ascii"),
                );
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(req.headers()))
        });
        let span = tracing::info_span!(
            "grpc.server",
            otel.kind = "server",
            rpc.service = service,
            rpc.method = %path,
            caller = caller.as_str(),
        );
        let _ = span.set_parent(parent);
        // The clone that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let started = Instant::now();
                let response = inner.call(req).await;
                metrics::histogram!(
                    "muster_grpc_server_duration_seconds",
                    "service" => service,
                    "method" => path,
                )
                .record(started.elapsed().as_secs_f64());
                response
            }
            .instrument(span),
        )
    }
}
