//! The bare limit: a WebSocket server that does only what the protocol
//! cannot avoid (accept, echo the subprotocol, verify one Ed25519
//! signature), and a relay for round trips.

use std::net::SocketAddr;

use futures::{SinkExt, StreamExt};
use muster_protocol::device;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The bare server's listener. A frame is a proof to verify
/// (`{"pubkey", "proof", "text"}`, answered `ok`), `subscribe` (the
/// connection then receives relayed frames), or anything else: answered
/// `ok` and relayed to every subscriber.
pub async fn start() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (relay, _) = broadcast::channel::<String>(4096);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let relay = relay.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                // tungstenite's callback signature fixes the error type.
                #[allow(clippy::result_large_err)]
                let echo = |_: &Request, mut response: Response| {
                    response
                        .headers_mut()
                        .insert("sec-websocket-protocol", "tyrum-v1".parse().unwrap());
                    Ok(response)
                };
                // The same socket configuration as the edge's, so that the
                // comparison shows what muster adds per connection.
                let config =
                    WebSocketConfig::default().read_buffer_size(muster_edge::READ_BUFFER_BYTES);
                let Ok(ws) =
                    tokio_tungstenite::accept_hdr_async_with_config(tcp, echo, Some(config)).await
                else {
                    return;
                };
                let (mut sink, mut stream) = ws.split();
                let mut relayed = relay.subscribe();
                let mut subscriber = false;
                loop {
                    tokio::select! {
                        frame = stream.next() => match frame {
                            Some(Ok(Message::Text(text))) => {
                                let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                                if let Some(pubkey) = value["pubkey"].as_str() {
                                    let ok = device::parse_pubkey(pubkey)
                                        .ok()
                                        .map(|(key, _)| device::verify_proof(&key, value["text"].as_str().unwrap_or_default(), value["proof"].as_str().unwrap_or_default()).is_ok())
                                        .unwrap_or(false);
                                    let _ = sink.send(Message::text(if ok { "ok" } else { "no" })).await;
                                } else if text.as_str() == "subscribe" {
                                    subscriber = true;
                                } else {
                                    let _ = relay.send(text.to_string());
                                    let _ = sink.send(Message::text("ok")).await;
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => return,
                        },
                        message = relayed.recv() => match message {
                            Ok(text) if subscriber => {
                                // Like the edge: what is queued already goes
                                // out in one write.
                                let _ = sink.feed(Message::text(text)).await;
                                for _ in 1..64 {
                                    match relayed.try_recv() {
                                        Ok(text) => { let _ = sink.feed(Message::text(text)).await; }
                                        Err(_) => break,
                                    }
                                }
                                let _ = sink.flush().await;
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => return,
                        },
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Runs the bare server until killed, printing its address first.
pub async fn serve_forever() -> anyhow::Result<()> {
    let addr = start().await?;
    println!("ws://{addr}/ws");
    std::future::pending::<()>().await;
    Ok(())
}
