//! A WebSocket client of the edge, as Tyrum's SDK behaves on the wire.

use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use muster_protocol::device::{DeviceKey, transcript};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Response;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
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

pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub response: Response<Option<Vec<u8>>>,
}

/// Opens `/ws` offering `tyrum-v1` (unless `protocols` says otherwise).
pub async fn open(
    url: &str,
    token: &str,
    via: TokenVia,
    protocols: Option<&str>,
) -> Result<Ws, Error> {
    let mut request = url.into_client_request().unwrap();
    let mut offered = protocols.unwrap_or("tyrum-v1").to_owned();
    match via {
        TokenVia::Bearer => {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        TokenVia::Cookie => {
            request.headers_mut().insert(
                "cookie",
                format!("tyrum_admin_token={token}").parse().unwrap(),
            );
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
            .insert("sec-websocket-protocol", offered.parse().unwrap());
    }
    let (stream, response) = tokio_tungstenite::connect_async(request).await?;
    Ok(Ws { stream, response })
}

/// What the server did next.
#[derive(Debug, PartialEq)]
pub enum Next {
    Json(Value),
    Closed(u16, String),
    /// The connection ended without a close frame.
    Dropped,
    /// Nothing arrived in time.
    Silent,
}

impl Ws {
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.unwrap();
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
                    return Next::Json(serde_json::from_str(&text).unwrap());
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

    /// Sends a request and returns its response, skipping events.
    pub async fn call(&mut self, kind: &str, payload: Value) -> Value {
        let request_id = uuid_like();
        self.send(json!({"request_id": request_id, "type": kind, "payload": payload}))
            .await;
        loop {
            let frame = self.json().await;
            if frame.get("request_id") == Some(&json!(request_id)) {
                assert_eq!(frame["type"], kind, "responses echo the type");
                return frame;
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

    /// `connect.init` + `connect.proof`; returns the proof's result.
    pub async fn handshake(&mut self, key: &DeviceKey, role: &str, extra_device: Value) -> Value {
        let mut device = json!({"device_id": key.device_id(), "pubkey": key.pubkey()});
        if let (Some(d), Some(extra)) = (device.as_object_mut(), extra_device.as_object()) {
            d.extend(extra.clone());
        }
        let init = self
            .call(
                "connect.init",
                json!({"protocol_rev": 2, "role": role, "device": device}),
            )
            .await;
        assert_eq!(init["ok"], true, "{init}");
        let connection_id = init["result"]["connection_id"].as_str().unwrap().to_owned();
        let challenge = init["result"]["challenge"].as_str().unwrap().to_owned();
        let proof = key.sign(&transcript(
            2,
            role,
            &key.device_id(),
            &connection_id,
            &challenge,
        ));
        let proved = self
            .call(
                "connect.proof",
                json!({"connection_id": connection_id, "proof": proof}),
            )
            .await;
        assert_eq!(proved["ok"], true, "{proved}");
        proved["result"].clone()
    }
}

fn uuid_like() -> String {
    format!("r-{}", rand_suffix())
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
