//! The bare limit: a WebSocket server that does only what the protocol
//! cannot avoid (accept, echo the subprotocol, verify one Ed25519
//! signature), and a relay for round trips.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use muster_protocol::device;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The bare server's listener. A frame is a proof to verify
/// (`{"pubkey", "proof", "text"}`, answered `ok`), `subscribe` (the
/// connection then receives relayed frames), `subscribe <name>` (it
/// receives the frames sent to that name), a frame with `"to": <name>`
/// (sent to that subscriber alone, unanswered), or anything else: answered
/// `ok` and relayed to every subscriber.
pub async fn start() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (relay, _) = broadcast::channel::<String>(4096);
    let routes: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<String>>>> = Default::default();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let relay = relay.clone();
            let routes = routes.clone();
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
                // Made when the connection subscribes by name: an idle
                // connection of the baseline holds no channel.
                let mut sent_to_me: Option<mpsc::UnboundedReceiver<String>> = None;
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
                                } else if let Some(name) = text.strip_prefix("subscribe ") {
                                    let (to_me, receiver) = mpsc::unbounded_channel();
                                    routes.lock().unwrap().insert(name.to_owned(), to_me);
                                    sent_to_me = Some(receiver);
                                } else if let Some(name) = value["to"].as_str() {
                                    let route = routes.lock().unwrap().get(name).cloned();
                                    if let Some(route) = route {
                                        let _ = route.send(text.to_string());
                                    }
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
                                write_queued(&mut sink, text, || relayed.try_recv().ok()).await;
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => return,
                        },
                        Some(text) = next_sent(&mut sent_to_me) => {
                            if let Some(receiver) = sent_to_me.as_mut() {
                                write_queued(&mut sink, text, || receiver.try_recv().ok()).await;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// The next frame sent to this connection by name; never, before it
/// subscribed by name.
async fn next_sent(receiver: &mut Option<mpsc::UnboundedReceiver<String>>) -> Option<String> {
    match receiver {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Like the edge: `first` and what is queued behind it (up to 64 frames)
/// go out with one flush.
async fn write_queued<S>(sink: &mut S, first: String, mut next: impl FnMut() -> Option<String>)
where
    S: futures::Sink<Message> + Unpin,
{
    let _ = sink.feed(Message::text(first)).await;
    for _ in 1..64 {
        let Some(text) = next() else { break };
        let _ = sink.feed(Message::text(text)).await;
    }
    let _ = sink.flush().await;
}

/// Runs the bare server until killed, printing its address first.
pub async fn serve_forever() -> anyhow::Result<()> {
    let addr = start().await?;
    println!("ws://{addr}/ws");
    std::future::pending::<()>().await;
    Ok(())
}
