use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use muster_tls::{MeshTls, ServiceName, SpiffeId, peer_spiffe_id};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::trace::MetadataInjector;

/// A channel to one mesh service: mTLS with this principal's current
/// certificate, trace context on every call. Connects lazily and reconnects
/// by itself.
pub type MeshChannel = InterceptedService<Channel, TraceContext>;

/// Adds the current span's W3C trace context to each outgoing request.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContext;

impl tonic::service::Interceptor for TraceContext {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut MetadataInjector(request.metadata_mut()))
        });
        Ok(request)
    }
}

/// A channel to `target` at `addr` (`host:port`). The server must present a
/// certificate from the trusted CA for `muster-<target>` that is `target`'s
/// own (its SPIFFE id in this principal's trust domain), whatever the
/// address: every principal's certificate comes from the one CA, and a
/// name alone would let any of them serve as any other.
pub fn channel(
    tls: Arc<MeshTls>,
    target: ServiceName,
    addr: &str,
) -> Result<MeshChannel, tonic::transport::Error> {
    let trust_domain = tls.trust_domain().to_owned();
    channel_with(move || tls.client_config(), target, &trust_domain, addr)
}

/// Like [`channel`], with the client configuration from `config` at each
/// connection.
pub fn channel_with(
    config: impl Fn() -> Arc<ClientConfig> + Send + Sync + 'static,
    target: ServiceName,
    trust_domain: &str,
    addr: &str,
) -> Result<MeshChannel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let connector = MeshConnector {
        config: Arc::new(config),
        server_name: ServerName::try_from(target.server_name())
            .expect("service server names are valid dns names"),
        server_id: Arc::new(target.spiffe_id(trust_domain)),
    };
    Ok(InterceptedService::new(
        endpoint.connect_with_connector_lazy(connector),
        TraceContext,
    ))
}

type ConfigSource = Arc<dyn Fn() -> Arc<ClientConfig> + Send + Sync>;

#[derive(Clone)]
struct MeshConnector {
    config: ConfigSource,
    server_name: ServerName<'static>,
    server_id: Arc<SpiffeId>,
}

impl tower_service::Service<Uri> for MeshConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // The configuration is read per connection, so a reloaded
        // certificate is used from the next connection on.
        let connector = TlsConnector::from((self.config)());
        let server_name = self.server_name.clone();
        let server_id = self.server_id.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| std::io::Error::other("mesh address has no host:port"))?
                .as_str()
                .to_owned();
            let tcp = TcpStream::connect(authority.as_str()).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            let presented = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(peer_spiffe_id);
            if presented.as_ref() != Some(&*server_id) {
                let presented =
                    presented.map_or_else(|| "no SPIFFE id".to_owned(), |id| id.to_string());
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("the server at {authority} is {presented}, not {server_id}"),
                ));
            }
            Ok(TokioIo::new(tls))
        })
    }
}
