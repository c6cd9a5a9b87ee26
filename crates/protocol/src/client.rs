//! A WebSocket client of a muster edge, behaving on the wire as Tyrum's SDK
//! does: the command line uses it, and so do the end-to-end tests (which
//! also use its raw frame access to misbehave on purpose).

use std::time::Duration;

use crate::device::{DeviceKey, transcript};
use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Response;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How the token travels.
#[derive(Debug, Clone, Copy)]
pub enum TokenVia {
    Bearer,
    Cookie,
    Subprotocol,
    Nowhere,
}

/// How long the client waits for each step of the handshake.
const HANDSHAKE_STEP: Duration = Duration::from_secs(10);

/// A handshake answered at `connect.init`, waiting for its proof.
#[derive(Debug, Clone)]
pub struct Challenged {
    pub role: String,
    pub connection_id: String,
    pub challenge: String,
}

impl Challenged {
    /// The `connect.proof` payload that `key` signs for this challenge.
    pub fn proof(&self, key: &DeviceKey) -> Value {
        let proof = key.sign(&transcript(
            2,
            &self.role,
            &key.device_id(),
            &self.connection_id,
            &self.challenge,
        ));
        json!({"connection_id": self.connection_id, "proof": proof})
    }
}

/// An open connection to `/ws`.
pub struct Ws<S = MaybeTlsStream<TcpStream>> {
    pub stream: WebSocketStream<S>,
    /// The upgrade response (headers such as the echoed subprotocol).
    pub response: Response<Option<Vec<u8>>>,
}

impl<S> std::fmt::Debug for Ws<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ws").finish_non_exhaustive()
    }
}

/// The client's WebSocket settings. tungstenite zero-fills its read buffer
/// up to `read_buffer_size` before every read of the socket (128 KiB by
/// default: most of a short-lived client's CPU); the edge's frames are
/// small JSON, and a larger one still arrives whole, the buffer growing
/// for it.
pub fn config() -> WebSocketConfig {
    // A listing (presence) may come as one frame of up to 64 MiB, as large
    // as the edge reads it from its services.
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// Opens `/ws` offering `tyrum-v1` (unless `protocols` says otherwise).
pub async fn open(
    url: &str,
    token: &str,
    via: TokenVia,
    protocols: Option<&str>,
) -> Result<Ws, Error> {
    // Nagle off: a request written behind another small frame would
    // otherwise wait for the server's delayed ACK.
    let (stream, response) = tokio_tungstenite::connect_async_with_config(
        request(url, token, via, protocols)?,
        Some(config()),
        true,
    )
    .await?;
    Ok(Ws { stream, response })
}

/// Opens `/ws` over a stream the caller connected (a TLS stream, say).
pub async fn open_over<S>(stream: S, url: &str, token: &str, via: TokenVia) -> Result<Ws<S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    open_request_over(stream, request(url, token, via, None)?).await
}

/// Opens `/ws` with `request` (one from [`request`], with headers added)
/// over a stream the caller connected.
pub async fn open_request_over<S>(
    stream: S,
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<Ws<S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (stream, response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config())).await?;
    Ok(Ws { stream, response })
}

/// The upgrade request: `tyrum-v1` (unless `protocols` says otherwise)
/// and the token where `via` puts it.
pub fn request(
    url: &str,
    token: &str,
    via: TokenVia,
    protocols: Option<&str>,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, Error> {
    let mut request = url.into_client_request()?;
    let mut offered = protocols.unwrap_or("tyrum-v1").to_owned();
    match via {
        TokenVia::Bearer => {
            request
                .headers_mut()
                .insert("authorization", header(format!("Bearer {token}"))?);
        }
        TokenVia::Cookie => {
            // As a browser sends it, from a page of the server's own
            // origin: the cookie counts only then.
            let scheme = match request.uri().scheme_str() {
                Some("wss") => "https",
                _ => "http",
            };
            let authority = request
                .uri()
                .authority()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default();
            let origin = header(format!("{scheme}://{authority}"))?;
            let headers = request.headers_mut();
            headers.insert("origin", origin);
            headers.insert("cookie", header(format!("tyrum_admin_token={token}"))?);
        }
        TokenVia::Subprotocol => {
            let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
            offered = format!("{offered}, tyrum-auth.{encoded}");
        }
        TokenVia::Nowhere => {}
    }
    if !offered.is_empty() {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", header(offered)?);
    }
    Ok(request)
}

/// A header value; a token with characters no header may hold is the
/// caller's error, not a panic.
fn header(value: String) -> Result<tokio_tungstenite::tungstenite::http::HeaderValue, Error> {
    value.try_into().map_err(
        |e: tokio_tungstenite::tungstenite::http::header::InvalidHeaderValue| {
            Error::HttpFormat(e.into())
        },
    )
}

/// What the server did next.
#[derive(Debug, PartialEq)]
pub enum Next {
    Json(Value),
    /// A text frame that is not JSON (not a muster edge, say).
    NotJson(String),
    Closed(u16, String),
    /// The connection ended without a close frame.
    Dropped,
    /// Nothing arrived in time.
    Silent,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Ws<S> {
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends a text frame; a closed connection shows on the next read.
    pub async fn send_text(&mut self, text: &str) {
        let _ = self.stream.send(Message::text(text)).await;
    }

    /// The next text frame or close, skipping control frames.
    pub async fn next(&mut self, within: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let Ok(frame) = tokio::time::timeout_at(deadline, self.stream.next()).await else {
                return Next::Silent;
            };
            match frame {
                Some(Ok(Message::Text(text))) => {
                    return match serde_json::from_str(&text) {
                        Ok(frame) => Next::Json(frame),
                        Err(_) => Next::NotJson(text.to_string()),
                    };
                }
                Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => {
                    return Next::Closed(code.into(), reason.to_string());
                }
                Some(Ok(Message::Close(None))) => return Next::Closed(1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Next::Dropped,
            }
        }
    }

    /// The next frame; panics when there is none within 5 s (for tests).
    pub async fn json(&mut self) -> Value {
        match self.next(Duration::from_secs(5)).await {
            Next::Json(v) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Waits for a close and returns its code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            match self.next(Duration::from_secs(15)).await {
                Next::Closed(code, reason) => return (code, reason),
                Next::Json(_) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Sends a request and returns its response, skipping events; panics
    /// when none comes (for tests).
    pub async fn call(&mut self, kind: &str, payload: Value) -> Value {
        self.try_call(kind, payload, Duration::from_secs(30))
            .await
            .unwrap_or_else(|next| panic!("no response to {kind}: {next:?}"))
    }

    /// Sends a request and waits up to `within` for its response (events on
    /// the way are skipped); otherwise what came instead.
    pub async fn try_call(
        &mut self,
        kind: &str,
        payload: Value,
        within: Duration,
    ) -> Result<Value, Next> {
        self.try_call_with_events(kind, payload, within)
            .await
            .map(|(response, _)| response)
    }

    /// Like [`Ws::call`], and also returns the events that arrived before
    /// the response.
    pub async fn call_with_events(&mut self, kind: &str, payload: Value) -> (Value, Vec<Value>) {
        self.try_call_with_events(kind, payload, Duration::from_secs(30))
            .await
            .unwrap_or_else(|next| panic!("no response to {kind}: {next:?}"))
    }

    /// Sends a request and waits up to `within` for its response; also
    /// returns the events that arrived before it.
    pub async fn try_call_with_events(
        &mut self,
        kind: &str,
        payload: Value,
        within: Duration,
    ) -> Result<(Value, Vec<Value>), Next> {
        let request_id = format!("req-{}", uuid::Uuid::new_v4());
        self.send(json!({"request_id": request_id, "type": kind, "payload": payload}))
            .await;
        let deadline = tokio::time::Instant::now() + within;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Json(frame) if frame.get("request_id") == Some(&json!(request_id)) => {
                    return Ok((frame, events));
                }
                Next::Json(frame) => {
                    if frame.get("event_id").is_some() {
                        events.push(frame);
                    }
                }
                other => return Err(other),
            }
        }
    }

    /// The next event of `kind`, skipping others.
    pub async fn event(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.json().await;
            if frame.get("event_id").is_some() && frame["type"] == kind {
                return frame;
            }
        }
    }

    /// `connect.init` + `connect.proof` with `extra_device` fields (label,
    /// mode, ...); returns the proof's result, panicking on refusal.
    pub async fn handshake(&mut self, key: &DeviceKey, role: &str, extra_device: Value) -> Value {
        self.try_handshake(key, role, extra_device)
            .await
            .unwrap_or_else(|e| panic!("handshake: {e}"))
    }

    /// The handshake, reporting a refusal instead of panicking.
    pub async fn try_handshake(
        &mut self,
        key: &DeviceKey,
        role: &str,
        extra_device: Value,
    ) -> Result<Value, String> {
        self.try_handshake_advertising(key, role, extra_device, Value::Null)
            .await
    }

    /// The handshake of a peer that advertises `capabilities` (a JSON
    /// array of descriptors; null: none sent).
    pub async fn try_handshake_advertising(
        &mut self,
        key: &DeviceKey,
        role: &str,
        extra_device: Value,
        capabilities: Value,
    ) -> Result<Value, String> {
        let challenged = self.init(key, role, extra_device, capabilities).await?;
        let proved = self
            .try_call("connect.proof", challenged.proof(key), HANDSHAKE_STEP)
            .await
            .map_err(|next| format!("connect.proof: {next:?}"))?;
        if proved["ok"] != true {
            return Err(format!("connect.proof refused: {proved}"));
        }
        Ok(proved["result"].clone())
    }

    /// The handshake's first step alone, for a peer held between
    /// `connect.init` and `connect.proof` (tests of what happens meanwhile).
    pub async fn init(
        &mut self,
        key: &DeviceKey,
        role: &str,
        extra_device: Value,
        capabilities: Value,
    ) -> Result<Challenged, String> {
        let mut device = json!({"device_id": key.device_id(), "pubkey": key.pubkey()});
        if let (Some(d), Some(extra)) = (device.as_object_mut(), extra_device.as_object()) {
            d.extend(extra.clone());
        }
        let mut init = json!({"protocol_rev": 2, "role": role, "device": device});
        if !capabilities.is_null() {
            init["capabilities"] = capabilities;
        }
        let init = self
            .try_call("connect.init", init, HANDSHAKE_STEP)
            .await
            .map_err(|next| format!("connect.init: {next:?}"))?;
        if init["ok"] != true {
            return Err(format!("connect.init refused: {init}"));
        }
        let field = |name: &str| init["result"][name].as_str().unwrap_or_default().to_owned();
        Ok(Challenged {
            role: role.to_owned(),
            connection_id: field("connection_id"),
            challenge: field("challenge"),
        })
    }
}
