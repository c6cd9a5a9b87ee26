//! The edge's HTTP surface: the WebSocket upgrade, health, the operator
//! views `/presence` and `/status`, and token management (`/auth/tokens`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use futures::FutureExt;
use hyper::body::Incoming;
use muster_protocol::{MISSING_SUBPROTOCOL_BODY, SUBPROTOCOL};
use rustls::pki_types::CertificateDer;
use serde_json::json;
use tokio::net::TcpListener;

use crate::auth::presented_token;
use crate::client_ip::PeerAddress;
use crate::{Edge, connection, proxy_protocol};

pub(crate) fn router(edge: Arc<Edge>) -> Router {
    Router::new()
        .route("/ws", get(upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/presence", get(presence))
        .route("/status", get(status))
        .route("/auth/tokens", get(crate::tokens::list))
        .route("/auth/tokens/issue", post(crate::tokens::issue))
        .route("/auth/tokens/revoke", post(crate::tokens::revoke))
        .route("/auth/tokens/{token_id}", patch(crate::tokens::edit))
        .layer(axum::middleware::map_response(http_headers))
        .with_state(edge)
}

/// What every answer says beyond its body. Answers carry presence, token
/// listings and, once, a token's secret, so no cache keeps any of them
/// (authorization by cookie leaves a shared cache nothing to tell them
/// apart by); a refused bearer is told the scheme (RFC 6750).
async fn http_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers
        .entry(axum::http::header::CACHE_CONTROL)
        .or_insert(axum::http::HeaderValue::from_static("no-store"));
    if response.status() == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// The client certificate a `wss://` peer presented (already verified
/// against the CA by TLS).
#[derive(Debug, Clone)]
pub(crate) struct ClientCert(pub(crate) Option<CertificateDer<'static>>);

/// The connection came with a PROXY `LOCAL` header: its address is the
/// balancer's own, and no forwarding header on it is the balancer's.
#[derive(Clone, Copy)]
pub(crate) struct ProxyLocal;

/// Sets up an accepted socket. Without TCP_NODELAY a small frame written
/// behind another small one (an event after a ping) waits for the peer's
/// delayed ACK: 40 ms.
///
/// `unacknowledged` bounds how long what the edge wrote may stay
/// unacknowledged by the peer's TCP (or unsent into its closed window)
/// before the kernel ends the connection. It is the backstop for the
/// times the edge cannot judge pongs: a peer whose queue of requests is
/// full is not read, so its pongs wait unread, and one whose network died
/// then would otherwise be held until every queued request was handled.
pub(crate) fn tune_accepted(tcp: &tokio::net::TcpStream, unacknowledged: Duration) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%error, "TCP_NODELAY not set");
    }
    #[cfg(target_os = "linux")]
    if let Err(error) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(unacknowledged)) {
        tracing::debug!(%error, "TCP_USER_TIMEOUT not set");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = unacknowledged;
}

/// Serves the edge's listener until shutdown, `wss://` when `tls` is set
/// (each connection's PROXY header, when its proxy sends one, and TLS
/// handshake in its own task, each with a deadline), then
/// HTTP with upgrades. At shutdown every peer is closed with 1001 `server
/// shutdown`, and HTTP requests under way finish (the process bounds the
/// wait: `shutdown_grace_secs`).
pub(crate) async fn serve(
    edge: Arc<Edge>,
    listener: TcpListener,
    tls: Option<Arc<muster_tls::EdgeTls>>,
) -> std::io::Result<()> {
    let app = router(edge.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, remote) = tokio::select! {
            _ = edge.shutdown.cancelled() => {
                // Refused at once from here on, so that peers go to
                // another edge instead of waiting in the backlog.
                drop(listener);
                // Every connection sees the same signal, in every phase,
                // and closes itself with 1001.
                graceful.shutdown().await;
                // Each connection's end is bounded (its last requests,
                // the close, the linger), and so is the process's wait
                // for all of this (`shutdown_grace_secs`).
                edge.connections.close();
                edge.connections.wait().await;
                return Ok(());
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    // Twice the pong timeout: the edge's own judgement
                    // of a peer comes first whenever it can be made.
                    tune_accepted(&tcp, edge.config.pong_timeout * 2);
                    (tcp, remote)
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let watcher = graceful.watcher();
        let proxied = edge.config.proxy_protocol
            && edge
                .config
                .trusted_proxies
                .trusts(remote.ip().to_canonical());
        if !proxied && tls.is_none() {
            tokio::spawn(serve_connection(tcp, app, remote, None, false, watcher));
            continue;
        }
        let (tls, stopping) = (tls.clone(), edge.shutdown.clone());
        tokio::spawn(async move {
            let mut tcp = tcp;
            // A connection still in its PROXY header or TLS handshake at
            // shutdown is dropped: its watcher would hold the drain until
            // the deadline.
            // A `LOCAL` header: the balancer speaks for itself (a health
            // check), and a forwarding header on it was written by whoever
            // is on the other side, not by the balancer.
            let mut local = false;
            let remote = if proxied {
                let header = tokio::select! {
                    _ = stopping.cancelled() => return,
                    header = tokio::time::timeout(
                        proxy_protocol::HEADER_DEADLINE,
                        proxy_protocol::read_header(&mut tcp),
                    ) => header,
                };
                match header {
                    Ok(Ok(proxy_protocol::Header::Proxied(source))) => source,
                    Ok(Ok(proxy_protocol::Header::Local)) => {
                        local = true;
                        remote
                    }
                    // A TCP health check: connected, and closed again.
                    Ok(Err(proxy_protocol::HeaderError::Closed)) => return,
                    Ok(Err(error)) => {
                        metrics::counter!("muster_edge_proxy_headers_refused_total").increment(1);
                        tracing::info!(%remote, %error, "connection from a trusted proxy dropped");
                        return;
                    }
                    Err(_) => {
                        metrics::counter!("muster_edge_proxy_headers_refused_total").increment(1);
                        tracing::info!(%remote, "no PROXY header from a trusted proxy in time: dropped");
                        return;
                    }
                }
            } else {
                remote
            };
            let Some(tls) = tls else {
                serve_connection(tcp, app, remote, None, local, watcher).await;
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let accepted = tokio::select! {
                _ = stopping.cancelled() => return,
                accepted = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)) => accepted,
            };
            let Ok(Ok(stream)) = accepted else { return };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|c| c.clone().into_owned());
            serve_connection(stream, app, remote, cert, local, watcher).await;
        });
    }
}

/// How long a connection may take to send a request's head, counted from
/// its start (or from the end of its previous request), whatever
/// protocol: a client that sends nothing, or a head byte by byte, is
/// dropped then instead of holding a socket and a task.
const REQUEST_HEAD_DEADLINE: Duration = Duration::from_secs(10);

/// HTTP on one accepted connection. An upgrade request for any path but
/// `/ws` gets no response at all: the service fails, and the connection
/// is dropped, as Part B asks (other paths: socket destroyed). Plain
/// requests for other paths get their 404.
async fn serve_connection<S>(
    stream: S,
    app: Router,
    remote: SocketAddr,
    cert: Option<CertificateDer<'static>>,
    local: bool,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let refused =
            request.headers().contains_key(header::UPGRADE) && request.uri().path() != "/ws";
        request.extensions_mut().insert(ConnectInfo(remote));
        request.extensions_mut().insert(ClientCert(cert.clone()));
        if local {
            request.extensions_mut().insert(ProxyLocal);
        }
        let app = app.clone();
        async move {
            if refused {
                return Err(std::io::Error::other("upgrade refused: not /ws"));
            }
            match tower::ServiceExt::oneshot(app, request).await {
                Ok(response) => Ok(response),
                Err(never) => match never {},
            }
        }
    });
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // Each request's head, the first and every later one on a kept-alive
    // connection, within the deadline (hyper needs a timer for it).
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_DEADLINE);
    builder.http2().timer(hyper_util::rt::TokioTimer::new());
    let stream = crate::first_byte::FirstByte::new(stream, REQUEST_HEAD_DEADLINE);
    let connection =
        builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service);
    let _ = watcher.watch(connection).await;
}

async fn upgrade(
    State(edge): State<Arc<Edge>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    cert: Option<axum::Extension<ClientCert>>,
    local: Option<axum::Extension<ProxyLocal>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let client = match local {
        Some(_) => remote.ip().to_canonical(),
        None => edge.config.trusted_proxies.resolve(remote.ip(), &headers),
    };
    let remote = PeerAddress {
        socket: remote,
        client,
    };
    if let Err(retry_after) = edge
        .upgrade_limit
        .admit(remote.client, std::time::Instant::now())
    {
        metrics::counter!("muster_edge_upgrades_limited_total").increment(1);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::RETRY_AFTER, retry_after.to_string()),
                (header::CONTENT_TYPE, "text/plain; charset=utf-8".into()),
            ],
            "Too Many Requests\n",
        )
            .into_response();
    }
    // In the order the client offered them (axum's list is sorted): the
    // token is the first decodable `tyrum-auth.*` as offered.
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    if !offered.iter().any(|p| p == SUBPROTOCOL) {
        return (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            MISSING_SUBPROTOCOL_BODY,
        )
            .into_response();
    }
    let tls = edge.config.tls.is_some();
    let token = presented_token(&headers, offered.iter().map(String::as_str), tls);
    let max = edge.config.max_message_bytes;
    // Taken while the upgrade request is served (hyper's graceful shutdown
    // waits for that), so the connection counts before its task starts.
    let tracked = edge.connections.token();
    // Peers send small JSON frames; tungstenite's 128 KiB default read
    // buffer is allocated eagerly per connection and would dominate the
    // memory of an edge holding many idle peers. Larger frames still
    // arrive whole: the buffer grows for them.
    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(crate::READ_BUFFER_BYTES)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let cert = cert.and_then(|axum::Extension(ClientCert(cert))| cert);
            // Not wrapped in an `async` block: that would hold the
            // connection's future twice over (captured, and being awaited).
            connection::run(edge, socket, token, remote, cert).map(move |()| drop(tracked))
        })
}

/// An operator's bearer token with `operator.read` (or admin), or the HTTP
/// refusal.
async fn operator(
    edge: &Edge,
    headers: &HeaderMap,
) -> Result<std::sync::Arc<crate::Claims>, Response> {
    let token = presented_token(headers, std::iter::empty(), edge.config.tls.is_some());
    let claims = edge.verify(token).await.map_err(|why| match why {
        crate::Unverified::Refused => (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response(),
        crate::Unverified::Unavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "identity unavailable\n").into_response()
        }
    })?;
    if !claims.is_admin() && !claims.has_any_scope(["operator.read"]) {
        return Err((StatusCode::FORBIDDEN, "insufficient scope\n").into_response());
    }
    Ok(claims)
}

async fn presence(State(edge): State<Arc<Edge>>, headers: HeaderMap) -> Response {
    let claims = match operator(&edge, &headers).await {
        Ok(claims) => claims,
        Err(refusal) => return refusal,
    };
    match connection::list_presence(&edge, &claims.tenant_id).await {
        Ok(entries) => axum::Json(json!({ "entries": entries })).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "presence unavailable\n").into_response(),
    }
}

async fn status(State(edge): State<Arc<Edge>>, headers: HeaderMap) -> Response {
    let claims = match operator(&edge, &headers).await {
        Ok(claims) => claims,
        Err(refusal) => return refusal,
    };
    axum::Json(connection::status(&edge, &claims.tenant_id).await).into_response()
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn accepted_sockets_send_small_writes_at_once_and_give_up_on_a_dead_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr);
        let ((tcp, _), _client) = tokio::try_join!(listener.accept(), client).unwrap();
        assert!(!tcp.nodelay().unwrap(), "Nagle is on by default");
        #[cfg(target_os = "linux")]
        let socket = socket2::SockRef::from(&tcp);
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            None,
            "the system's default"
        );
        super::tune_accepted(&tcp, std::time::Duration::from_secs(20));
        assert!(tcp.nodelay().unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(std::time::Duration::from_secs(20))
        );
    }
}
