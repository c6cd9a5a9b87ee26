//! The edge's HTTP surface: the WebSocket upgrade, health, and the
//! operator views `/presence` and `/status`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use muster_protocol::{MISSING_SUBPROTOCOL_BODY, SUBPROTOCOL};
use serde_json::json;

use crate::auth::presented_token;
use crate::{Edge, connection};

pub(crate) fn router(edge: Arc<Edge>) -> Router {
    Router::new()
        .route("/ws", get(upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/presence", get(presence))
        .route("/status", get(status))
        .with_state(edge)
}

async fn upgrade(
    State(edge): State<Arc<Edge>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let offered: Vec<String> = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .map(|p| p.trim().to_owned())
        .collect();
    if !offered.iter().any(|p| p == SUBPROTOCOL) {
        return (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            MISSING_SUBPROTOCOL_BODY,
        )
            .into_response();
    }
    let token = presented_token(&headers, offered.iter().map(String::as_str));
    let max = edge.config.max_message_bytes;
    ws.protocols([SUBPROTOCOL])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| connection::run(edge, socket, token, remote))
}

/// An operator's bearer token with `operator.read` (or admin), or the HTTP
/// refusal.
async fn operator(edge: &Edge, headers: &HeaderMap) -> Result<crate::Claims, Response> {
    let token = presented_token(headers, std::iter::empty());
    let claims = edge
        .verify(token)
        .await
        .ok_or_else(|| (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response())?;
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
