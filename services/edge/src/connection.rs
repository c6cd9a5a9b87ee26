//! One WebSocket peer, from authentication through the handshake to the
//! request loop (PROTOCOL.md Part B §1–§3).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use muster_proto::v1 as pb;
use muster_protocol::PROTOCOL_REV;
use muster_protocol::close::{self, Close};
use muster_protocol::device::{self, ProofError, VerifyingKey};
use muster_protocol::envelope::{self, FrameError, Inbound, Request};
use muster_protocol::handshake::{ConnectInit, ConnectProof};
use muster_protocol::presence::{Beacon, wire_mode};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use crate::auth::{Claims, authorize};
use crate::client_ip::PeerAddress;
use crate::outbound::{self, Outgoing};
use crate::registry::{Peer, Reported};
use crate::{Edge, topics, wire_error};

/// Frames that may arrive before authentication resolves.
const EARLY_FRAMES: usize = 8;
const EARLY_BYTES: usize = 64 * 1024;

type Sink = SplitSink<WebSocket, Message>;
type Stream = SplitStream<WebSocket>;

/// Sends a close frame; a peer that does not read gets five seconds to take it
/// before the socket is dropped.
async fn send_close(sink: &mut Sink, close: Close) {
    let frame = Message::Close(Some(CloseFrame {
        code: close.code,
        reason: Utf8Bytes::from(close.reason),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = sink.send(frame).await;
        let _ = sink.close().await;
    })
    .await;
}

/// How long the edge waits for a peer to answer its close: Part B's 250 ms
/// before a shutdown terminates, for every close (`ws` waits up to 30 s
/// for the others; a peer that has not answered in 250 ms on a live
/// connection is not going to, and it would hold the socket meanwhile).
const CLOSE_LINGER: Duration = Duration::from_millis(250);

/// After the edge's own close, reads (and drops) what the peer still sends
/// until its answering close, for up to [`CLOSE_LINGER`]. A socket dropped
/// with unread bytes in it is reset rather than closed, and a reset may
/// discard the close frame before the peer's stack hands it over; waiting
/// for the peer's close also lets the close handshake end cleanly.
async fn linger(stream: &mut Stream) {
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// How many queued frames one write takes before it flushes.
const MAX_COALESCED: usize = 256;

/// Writes `first` and whatever else is queued already (up to
/// [`MAX_COALESCED`] frames), then flushes once: a burst of events costs a
/// write per burst, not per frame. Returns a close that was queued behind
/// them; `Err` when the socket failed.
async fn write_queued(
    sink: &mut Sink,
    first: Utf8Bytes,
    inbox: &mut outbound::Inbox,
) -> Result<Option<Close>, ()> {
    let mut bytes = first.len();
    sink.feed(Message::Text(first)).await.map_err(drop)?;
    let mut then = None;
    for _ in 1..MAX_COALESCED {
        match inbox.try_recv() {
            Some(Outgoing::Text(text)) => {
                bytes += text.len();
                sink.feed(Message::Text(text)).await.map_err(drop)?;
            }
            Some(Outgoing::Close(close)) => {
                then = Some(close);
                break;
            }
            None => break,
        }
    }
    let flushed = sink.flush().await;
    inbox.written(bytes);
    flushed.map_err(drop)?;
    Ok(then)
}

/// Sends one frame; a peer that has not taken it by `deadline` is as
/// gone as one whose socket failed.
async fn send_text(sink: &mut Sink, text: String, deadline: Instant) -> bool {
    matches!(
        tokio::time::timeout_at(deadline, sink.send(Message::Text(Utf8Bytes::from(text)))).await,
        Ok(Ok(()))
    )
}

/// A write this long may have kept a pong unread (see the write branch of
/// the connected loop).
const LONG_WRITE: Duration = Duration::from_secs(1);

fn now_ms() -> i64 {
    muster_store::now_ms()
}

/// What the handshake established.
struct Handshaken {
    connection_id: String,
    init: ConnectInit,
    device_id: String,
    /// The answer to `connect.proof`, sent once the connection is
    /// registered, so that a peer that sees it is reachable.
    reply: String,
    /// The edge's count of gaps (see [`Edge::gaps`]) before the peer's
    /// token was verified.
    gaps: u64,
}

/// Runs one peer to the end.
///
/// Not an `async fn`: the arguments of one stay in its future for as long
/// as it runs, and this future is held by every connection for the whole
/// of its life. The socket is split and the phase before the handshake is
/// boxed here, so what the future keeps while a peer idles is the two
/// halves, the edge and the boxed phase under way.
pub(crate) fn run(
    edge: Arc<Edge>,
    socket: WebSocket,
    token: Option<String>,
    remote: PeerAddress,
    cert: Option<CertificateDer<'static>>,
) -> impl Future<Output = ()> + Send {
    metrics::gauge!("muster_edge_sockets").increment(1.0);
    let (sink, stream) = socket.split();
    let before = Box::pin(before_connected(edge.clone(), sink, stream, token, cert));
    async move {
        let (mut sink, mut stream, before) = before.await;
        let outcome = match before {
            // Boxed: inline, this future would keep room for the connected
            // phase's state while the connection closes, and for the
            // handshake's while it is connected.
            Ok((claims, handshaken)) => {
                Box::pin(connected(
                    &edge,
                    &mut sink,
                    &mut stream,
                    claims,
                    handshaken,
                    remote,
                ))
                .await
            }
            Err(close) => Err(close),
        };
        if let Err(close) = outcome {
            Box::pin(send_close(&mut sink, close)).await;
            // Boxed: inline, its timer would make every connection's task
            // larger for the whole of its life (about 0.5 KB measured).
            Box::pin(linger(&mut stream)).await;
        }
        metrics::gauge!("muster_edge_sockets").decrement(1.0);
    }
}

/// Authentication and the handshake. It owns the socket's halves while it
/// runs and hands them back, so that nothing of it outlives it: the
/// token, the certificate and the handshake's data go with it.
async fn before_connected(
    edge: Arc<Edge>,
    mut sink: Sink,
    mut stream: Stream,
    token: Option<String>,
    cert: Option<CertificateDer<'static>>,
) -> (Sink, Stream, Result<(Arc<Claims>, Box<Handshaken>), Close>) {
    // Each step is boxed, and so is the handling of each frame: a future
    // holds the state of its largest await, and gRPC calls are large.
    let before = async {
        let gaps = edge.gaps();
        let (claims, early) = Box::pin(authenticate(&edge, &mut stream, token)).await?;
        let mut handshaken = Box::pin(handshake(
            &edge,
            &mut sink,
            &mut stream,
            &claims,
            early,
            cert.as_ref(),
        ))
        .await?;
        handshaken.gaps = gaps;
        Ok((claims, Box::new(handshaken)))
    };
    // A peer still authenticating or in its handshake is closed at shutdown
    // as a connected one is, rather than left to its handshake timeout.
    let outcome = tokio::select! {
        biased;
        () = edge.shutdown.cancelled() => Err(close::SERVER_SHUTDOWN),
        before = before => before,
    };
    (sink, stream, outcome)
}

/// The close for a frame the WebSocket layer refused, as `ws` 8.x sends
/// it: too large (1009) or a text frame that is not UTF-8 (1007). Other
/// read errors (a reset, a protocol violation) end the connection without
/// one.
fn refused(error: &axum::Error) -> Option<Close> {
    use std::error::Error as _;
    use tokio_tungstenite::tungstenite::Error;
    match error.source()?.downcast_ref::<Error>()? {
        Error::Capacity(_) => Some(close::MESSAGE_TOO_BIG),
        Error::Utf8(_) => Some(close::INVALID_PAYLOAD),
        _ => None,
    }
}

/// Resolves the token while queueing what the peer sends meanwhile.
async fn authenticate(
    edge: &Edge,
    stream: &mut Stream,
    token: Option<String>,
) -> Result<(Arc<Claims>, Vec<String>), Close> {
    let verify = edge.verify(token);
    tokio::pin!(verify);
    let mut early = Vec::new();
    let mut early_bytes = 0;
    loop {
        tokio::select! {
            claims = &mut verify => {
                return match claims {
                    Ok(claims) => Ok((claims, early)),
                    Err(crate::Unverified::Refused) => Err(close::UNAUTHORIZED),
                    Err(crate::Unverified::Unavailable) => Err(close::TRY_AGAIN_LATER),
                };
            }
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    early_bytes += text.len();
                    early.push(text.to_string());
                    if early.len() > EARLY_FRAMES || early_bytes > EARLY_BYTES {
                        return Err(close::HANDSHAKE_OVERFLOW);
                    }
                }
                Some(Ok(Message::Binary(bytes))) => {
                    early_bytes += bytes.len();
                    early.push(String::from_utf8_lossy(&bytes).into_owned());
                    if early.len() > EARLY_FRAMES || early_bytes > EARLY_BYTES {
                        return Err(close::HANDSHAKE_OVERFLOW);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(refused(&error).unwrap_or(close::UNAUTHORIZED)),
                None => return Err(close::UNAUTHORIZED),
            },
        }
    }
}

/// `connect.init` then `connect.proof`, within the handshake timeout.
async fn handshake(
    edge: &Edge,
    sink: &mut Sink,
    stream: &mut Stream,
    claims: &Claims,
    early: Vec<String>,
    cert: Option<&CertificateDer<'static>>,
) -> Result<Handshaken, Close> {
    let deadline = Instant::now() + edge.config.handshake_timeout;
    let mut pending: Option<(String, String, ConnectInit, String, Option<VerifyingKey>)> = None;
    let mut early = early.into_iter();
    loop {
        let text = match early.next() {
            Some(text) => text,
            None => match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => return Err(close::HANDSHAKE_TIMEOUT),
                Ok(Some(Err(error))) => {
                    return Err(refused(&error).unwrap_or(close::HANDSHAKE_TIMEOUT));
                }
                Ok(None) => return Err(close::HANDSHAKE_TIMEOUT),
                Ok(Some(Ok(Message::Text(text)))) => text.to_string(),
                Ok(Some(Ok(Message::Binary(bytes)))) => {
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                Ok(Some(Ok(Message::Close(_)))) => return Err(close::HANDSHAKE_TIMEOUT),
                Ok(Some(Ok(_))) => continue,
            },
        };
        let request = match envelope::parse(&text) {
            Err(FrameError::InvalidJson) => return Err(close::INVALID_JSON),
            // A legacy `connect` is told so whatever else its frame holds.
            Err(FrameError::Invalid(_)) => {
                let legacy = serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|frame| {
                    frame.get("type").and_then(|t| t.as_str()) == Some("connect")
                });
                return Err(if legacy {
                    close::LEGACY_CONNECT
                } else {
                    close::EXPECTED_CONNECT
                });
            }
            Ok(Inbound::Request(request)) => request,
            Ok(_) => return Err(close::EXPECTED_CONNECT),
        };
        match request.kind.as_str() {
            "connect" => return Err(close::LEGACY_CONNECT),
            "connect.init" => {
                let init =
                    ConnectInit::parse(&request.payload).map_err(|_| close::EXPECTED_CONNECT)?;
                if init.protocol_rev != PROTOCOL_REV {
                    return Err(close::PROTOCOL_REV_MISMATCH);
                }
                // Part B §3's checks in its order: a node's scoped token is
                // refused for another role before the device is looked at;
                // other tokens' role after it.
                let role_admitted = claims.admits_role(init.role.as_str());
                if claims.role == "node" && !role_admitted {
                    return Err(close::UNAUTHORIZED);
                }
                let expected = device::device_id_of_pubkey(&init.device.pubkey)
                    .filter(|expected| *expected == init.device.device_id)
                    .ok_or(close::DEVICE_ID_MISMATCH)?;
                if !role_admitted {
                    return Err(close::UNAUTHORIZED);
                }
                if claims
                    .device_id
                    .as_ref()
                    .is_some_and(|bound| *bound != expected)
                {
                    return Err(close::SCOPED_TOKEN_MISMATCH);
                }
                // Parsed once, here: decoding the key's curve point is the
                // costly part. A pubkey that is no key fails at the proof.
                let key = device::parse_pubkey(&init.device.pubkey)
                    .ok()
                    .map(|(key, _)| key);
                let connection_id = uuid::Uuid::new_v4().to_string();
                let challenge = device::new_challenge();
                let reply = envelope::ok(
                    &request.request_id,
                    &request.kind,
                    Some(json!({"connection_id": connection_id, "challenge": challenge})),
                );
                // The deadline bounds the writes too: a peer that sends
                // inits and never reads would otherwise block here.
                if !send_text(sink, reply, deadline).await {
                    return Err(close::HANDSHAKE_TIMEOUT);
                }
                // A second init replaces the first.
                pending = Some((connection_id, challenge, init, expected, key));
            }
            "connect.proof" => {
                // The proof's shape before its place, as Tyrum checks them.
                let proof =
                    ConnectProof::parse(&request.payload).map_err(|_| close::EXPECTED_CONNECT)?;
                let Some((connection_id, challenge, init, device_id, key)) = pending.take() else {
                    return Err(close::EXPECTED_INIT_FIRST);
                };
                if proof.connection_id != connection_id {
                    return Err(close::CONNECTION_ID_MISMATCH);
                }
                let transcript = device::transcript(
                    init.protocol_rev,
                    init.role.as_str(),
                    &device_id,
                    &connection_id,
                    &challenge,
                );
                let key = key.ok_or(close::INVALID_PROOF)?;
                device::verify_proof(&key, &transcript, &proof.proof).map_err(
                    |e: ProofError| {
                        tracing::debug!(?e, "proof refused");
                        close::INVALID_PROOF
                    },
                )?;
                if let Some(cert) = cert
                    && !cert_binds(
                        cert,
                        edge.config.tls.as_ref().map(|tls| tls.trust_domain()),
                        &claims.tenant_id,
                        &device_id,
                        &init.device.pubkey,
                    )
                {
                    tracing::info!(
                        device_id,
                        "client certificate not bound to the proved device"
                    );
                    return Err(close::UNAUTHORIZED);
                }
                let reply = envelope::ok(
                    &request.request_id,
                    &request.kind,
                    Some(
                        json!({"client_id": connection_id, "device_id": device_id, "role": init.role.as_str()}),
                    ),
                );
                return Ok(Handshaken {
                    connection_id,
                    init,
                    device_id,
                    reply,
                    gaps: 0,
                });
            }
            _ => return Err(close::EXPECTED_CONNECT),
        }
    }
}

/// Whether a presented client certificate is the proved device's own:
/// SPIFFE id `spiffe://<trust_domain>/tenant/<tenant>/device/<device_id>`
/// and the device's key.
fn cert_binds(
    cert: &CertificateDer<'_>,
    trust_domain: Option<&str>,
    tenant_id: &str,
    device_id: &str,
    pubkey: &str,
) -> bool {
    use base64::Engine;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let bound_id = muster_tls::peer_spiffe_id(cert).is_some_and(|id| {
        Some(id.trust_domain.as_str()) == trust_domain
            && id.path == format!("/tenant/{tenant_id}/device/{device_id}")
    });
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return false;
    };
    let spki = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(parsed.public_key().raw);
    bound_id && spki == pubkey.trim_end_matches('=')
}

/// A peer that has arrived: registered here and in the directory,
/// answered, announced to presence.
struct Arrived {
    peer: Arc<Peer>,
    outbound: outbound::Outbound,
    inbox: outbound::Inbox,
    /// Takes the peer out of the registry however the connection ends.
    _registered: Deregister,
}

/// The connected peer: requests in, responses and events out, pings.
///
/// The arrival is a future of its own, boxed and gone once the peer has
/// arrived, and every await of the loop but the idle one is boxed: this
/// future is held by every connection for as long as it lasts, and holds
/// room for the largest of its awaits.
async fn connected(
    edge: &Arc<Edge>,
    sink: &mut Sink,
    stream: &mut Stream,
    claims: Arc<Claims>,
    handshaken: Box<Handshaken>,
    remote: PeerAddress,
) -> Result<(), Close> {
    let Some(Arrived {
        peer,
        outbound,
        mut inbox,
        _registered,
    }) = Box::pin(arrive(edge, sink, claims, handshaken, remote)).await?
    else {
        return Ok(());
    };
    let mut ping = tokio::time::interval(edge.config.ping_interval);
    ping.reset();
    let mut last_pong = Instant::now();
    let slow = inbox.slow();
    // Made once, not per turn of the loop: the shutdown signal is shared by
    // every connection, and registering with it locks it.
    let shutdown = edge.shutdown.cancelled();
    let slow_consumer = slow.notified();
    tokio::pin!(shutdown, slow_consumer);
    // Every way out of the loop returns from this block, so that the peer
    // always leaves (registry, topics, presence) before the socket closes.
    let outcome = async {
        // Frames are handled one at a time in arrival order, beside the
        // loop: a request that waits on a slow service must not stop the
        // pings, the pongs or the events to this peer.
        let mut requests = Requests::new(|text| Box::pin(handle_frame(edge, &peer, &outbound, text)));
        loop {
            tokio::select! {
                () = requests.handled(), if requests.busy() => requests.start_next(),
                _ = &mut shutdown => {
                    Box::pin(async {
                        // Requests already read get a moment (Tyrum
                        // terminates 250 ms after its close), and their
                        // answers go out before the close.
                        let _ = tokio::time::timeout(SHUTDOWN_FINISH, requests.finish()).await;
                        // Everything queued goes, past any close queued
                        // meanwhile: the 1001 follows.
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            while let Some(out) = inbox.try_recv() {
                                if let Outgoing::Text(first) = out
                                    && write_queued(sink, first, &mut inbox).await.is_err()
                                {
                                    break;
                                }
                            }
                        })
                        .await;
                    })
                    .await;
                    return Err(close::SERVER_SHUTDOWN);
                }
                _ = &mut slow_consumer => return Err(close::SLOW_CONSUMER),
                out = inbox.recv() => match out {
                    Outgoing::Text(text) => {
                        // A peer that stops reading blocks the write: it
                        // gives way to the slow-consumer limit and to
                        // shutdown, and a write that takes as long as a
                        // pong may be missing ends the connection as a
                        // missing pong does (pings cannot go out
                        // meanwhile, nor a revocation's close).
                        let began = Instant::now();
                        let written = Box::pin(async {
                            tokio::select! {
                                written = tokio::time::timeout(edge.config.pong_timeout, write_queued(sink, text, &mut inbox)) => match written {
                                    Ok(written) => written.map_err(|()| None),
                                    Err(_) => {
                                        tracing::info!(connection_id = %peer.connection_id, "not reading: terminating");
                                        Err(None)
                                    }
                                },
                                _ = &mut slow_consumer => Err(Some(close::SLOW_CONSUMER)),
                                _ = &mut shutdown => Err(Some(close::SERVER_SHUTDOWN)),
                            }
                        })
                        .await;
                        match written {
                            Ok(None) => {
                                // The socket was not read while a long write
                                // went on: a pong may wait in it, so the
                                // peer is judged from the write's start.
                                if began.elapsed() >= LONG_WRITE {
                                    last_pong = last_pong.max(began);
                                }
                            }
                            Ok(Some(close)) | Err(Some(close)) => return Err(close),
                            Err(None) => return Ok(()),
                        }
                    }
                    Outgoing::Close(close) => return Err(close),
                },
                _ = ping.tick() => {
                    if peer.claims.expired(now_ms()) {
                        return Err(close::TOKEN_INVALIDATED);
                    }
                    if !requests.has_room() {
                        // The socket is not being read, so the peer's pongs
                        // wait in it: no judging it until reading resumes.
                        // A peer whose network died meanwhile does not
                        // acknowledge the pings: the kernel ends its socket
                        // (TCP_USER_TIMEOUT, see tune_accepted).
                        last_pong = Instant::now();
                    } else if last_pong.elapsed() > edge.config.pong_timeout {
                        // Dropped without a close frame: the peer sees 1006.
                        tracing::info!(connection_id = %peer.connection_id, "no pong: terminating");
                        return Ok(());
                    }
                    // A ping that cannot be written for as long as a pong
                    // may be missing means a peer that is not reading: as
                    // gone as one that does not answer.
                    let sent = tokio::select! {
                        // Boxed: its timer would otherwise be room in every
                        // idle connection's future.
                        sent = Box::pin(tokio::time::timeout(edge.config.pong_timeout, sink.send(Message::Ping(Default::default())))) => sent,
                        _ = &mut shutdown => return Err(close::SERVER_SHUTDOWN),
                    };
                    if !matches!(sent, Ok(Ok(()))) {
                        return Ok(());
                    }
                }
                frame = stream.next(), if requests.has_room() => match frame {
                    None => {
                        Box::pin(requests.finish_after_the_peer_left(&mut inbox, &edge.shutdown)).await;
                        return Ok(());
                    }
                    Some(Err(error)) => {
                        Box::pin(requests.finish_after_the_peer_left(&mut inbox, &edge.shutdown)).await;
                        return refused(&error).map_or(Ok(()), Err);
                    }
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite queued the answering close frame;
                        // it leaves with the flush, so the peer's close is
                        // clean (not 1006).
                        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), sink.flush())).await;
                        Box::pin(requests.finish_after_the_peer_left(&mut inbox, &edge.shutdown)).await;
                        return Ok(());
                    }
                    Some(Ok(Message::Pong(_))) => last_pong = Instant::now(),
                    Some(Ok(Message::Ping(_))) => {}
                    Some(Ok(Message::Text(_) | Message::Binary(_))) if peer.expired.load(Ordering::Relaxed) => {
                        return Err(close::CONVERSATION_EXPIRED);
                    }
                    Some(Ok(Message::Text(text))) => requests.push(text),
                    Some(Ok(Message::Binary(bytes))) => {
                        requests.push(Utf8Bytes::from(String::from_utf8_lossy(&bytes).into_owned()));
                    }
                },
            }
        }
    }
    .await;
    Box::pin(leave(edge, &peer)).await;
    outcome
}

/// The most bytes of capability ids a presence entry lists: with the
/// connect's other keys, well within what presence keeps of metadata
/// (8 KiB), which 256 descriptors with long ids would pass.
const LISTED_CAPABILITY_BYTES: usize = 6 * 1024;

/// The capability ids a connect's presence entry lists, in order, as many
/// as fit in [`LISTED_CAPABILITY_BYTES`], and how many were left out: an
/// entry presence refused would leave the device out of presence for as
/// long as it stays.
fn listed_capabilities(
    capabilities: &[muster_protocol::handshake::CapabilityDescriptor],
) -> (Vec<&str>, usize) {
    let mut bytes = 0;
    let listed: Vec<&str> = capabilities
        .iter()
        .map(|c| c.id.as_str())
        // A listed id costs its bytes, two quotes and a comma.
        .take_while(|id| {
            bytes += id.len() + 3;
            bytes <= LISTED_CAPABILITY_BYTES
        })
        .collect();
    let omitted = capabilities.len() - listed.len();
    (listed, omitted)
}

/// Registers the peer, answers its proof and announces it to presence.
/// `None` when the peer went away before the answer could be written.
async fn arrive(
    edge: &Arc<Edge>,
    sink: &mut Sink,
    claims: Arc<Claims>,
    handshaken: Box<Handshaken>,
    remote: PeerAddress,
) -> Result<Option<Arrived>, Close> {
    let role = match handshaken.init.role {
        muster_protocol::handshake::Role::Client => "client",
        muster_protocol::handshake::Role::Node => "node",
    };
    let (outbound, inbox) = outbound::channel();
    let mode = handshaken.init.device.mode.clone().unwrap_or_default();
    let in_presence = mode != "cli" || edge.config.presence_includes_cli;
    let reported = in_presence.then(|| {
        let (capabilities, omitted) = listed_capabilities(&handshaken.init.capabilities);
        let mut observed = json!({
            "capabilities": capabilities,
            "edge_id": edge.edge_id,
            "raw_remote_ip": remote.socket.ip().to_canonical().to_string(),
            "resolved_client_ip": remote.client.to_string(),
        });
        if omitted > 0 {
            observed["capabilities_omitted"] = json!(omitted);
        }
        Box::new(Reported {
            host: muster_presence::connect_field(
                handshaken.init.device.label.as_deref().unwrap_or_default(),
            ),
            ip: String::new(),
            version: muster_presence::connect_field(
                handshaken
                    .init
                    .device
                    .version
                    .as_deref()
                    .unwrap_or_default(),
            ),
            mode: wire_mode(&mode).unwrap_or_default(),
            last_input_seconds: -1,
            // Part B §4's keys: the socket's address, and the client's as
            // resolved through the trusted proxies (see client_ip).
            metadata_json: observed.to_string(),
            reason: "connect",
        })
    });
    let peer = Arc::new(Peer {
        connection_id: handshaken.connection_id.clone(),
        device_id: handshaken.device_id.clone(),
        role,
        claims: claims.clone(),
        in_presence: std::sync::atomic::AtomicBool::new(in_presence),
        reported: std::sync::Mutex::new(reported),
        announcing: Default::default(),
        presence_writes: Default::default(),
        observed_ip: remote.client.to_string(),
        outbound: outbound.clone(),
        topics: Default::default(),
        tracked: Default::default(),
        registered: Default::default(),
        expired: Default::default(),
        advertised: handshaken
            .init
            .capabilities
            .iter()
            .map(|capability| capability.id.as_str().into())
            .collect(),
    });
    edge.registry.insert(peer.clone());
    let registered = Deregister {
        edge: edge.clone(),
        peer: peer.clone(),
    };
    // `token.revoked` (`token.updated`) closes the registered peers of the
    // token; one that was still in its handshake then is closed here. The
    // change is noted before the registry is walked, and this peer is in
    // the registry before the note is read, so one of the two sees the
    // other. A gap closes every registered peer, since a revocation may
    // have been lost in it: one whose token was verified before it is
    // closed here, by the same order.
    if edge.gaps() != handshaken.gaps {
        return Err(close::EVENTS_MISSED);
    }
    if edge.is_revoked(&peer.claims.token_id) {
        return Err(close::TOKEN_REVOKED);
    }
    if edge.is_stale(&peer.claims) {
        return Err(close::TOKEN_UPDATED);
    }
    if peer.claims.expired(now_ms()) {
        return Err(close::TOKEN_INVALIDATED);
    }
    tracing::info!(connection_id = %peer.connection_id, device_id = %peer.device_id, role, tenant_id = %claims.tenant_id, "peer connected");
    // Shutdown does not wait for these: each may take a batched call's
    // deadline while the services stop too.
    let arrival = async {
        // A peer that is answered can be reached: one the directory could
        // not record would miss every item directed at it, unaware.
        if !Box::pin(register(edge, &peer)).await {
            return Err(close::TRY_AGAIN_LATER);
        }
        let within = Instant::now() + edge.config.pong_timeout;
        if !send_text(sink, handshaken.reply.clone(), within).await {
            return Ok(false);
        }
        if in_presence {
            // Beside the connection, not before it: a peer that was
            // answered sends requests and must get pings while presence
            // is slow (a storm of arrivals). A leave waits for it, and one
            // that comes first stops it (see Announcing). A refusal is not
            // final: the edge's refresh announces every peer presence has
            // not taken.
            let (edge, peer) = (edge.clone(), peer.clone());
            tokio::spawn(async move {
                if let Err(status) = announce(&edge, &peer).await {
                    tracing::warn!(code = ?status.code(), "presence upsert on connect failed; the next refresh tries again");
                }
            });
        }
        Ok(true)
    };
    let arrived = tokio::select! {
        biased;
        () = edge.shutdown.cancelled() => None,
        arrived = arrival => Some(arrived),
    };
    match arrived {
        Some(Ok(true)) => Ok(Some(Arrived {
            peer,
            outbound,
            inbox,
            _registered: registered,
        })),
        // Not answered (the socket failed), or turned away.
        Some(not_arrived) => {
            Box::pin(leave(edge, &peer)).await;
            not_arrived.map(|_| None)
        }
        None => {
            Box::pin(leave(edge, &peer)).await;
            Err(close::SERVER_SHUTDOWN)
        }
    }
}

/// Records the connection in the directory, for directed delivery;
/// whether it was recorded.
async fn register(edge: &Edge, peer: &Peer) -> bool {
    let registration = pb::RegisterConnection {
        connection_id: peer.connection_id.clone(),
        tenant_id: peer.claims.tenant_id.clone(),
        device_id: peer.device_id.clone(),
        edge_id: edge.edge_id.clone(),
        role: peer.role.into(),
    };
    match edge
        .change_connection(pb::connection_change::Change::Register(registration))
        .await
    {
        Ok(_) => {
            peer.registered.store(true, Ordering::Relaxed);
            true
        }
        Err(status) => {
            tracing::warn!(
                code = ?status.code(),
                connection_id = %peer.connection_id,
                "connection not recorded in the directory: the peer is turned away"
            );
            false
        }
    }
}

/// Takes a peer out of the registry even if its task ends by a panic.
struct Deregister {
    edge: Arc<Edge>,
    peer: Arc<Peer>,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        self.edge.registry.remove(&self.peer.connection_id);
    }
}

/// A closed connection leaves every topic it tracked sessions in; when it
/// was the device's last connection here, the device leaves instance
/// presence (`presence.pruned`) instead of lingering until the TTL. On
/// shutdown both are left to the TTL and to the next edge.
async fn leave(edge: &Edge, peer: &Peer) {
    edge.registry.remove(&peer.connection_id);
    tokio::select! {
        biased;
        () = edge.shutdown.cancelled() => {}
        () = Box::pin(tell_services_of_leaving(edge, peer)) => {}
    }
}

async fn tell_services_of_leaving(edge: &Edge, peer: &Peer) {
    if peer.registered.load(Ordering::Relaxed)
        && let Err(status) = edge.unregister(peer.connection_id.clone()).await
    {
        tracing::debug!(code = ?status.code(), "unregistering a closed connection failed; the next heartbeat removes it");
    }
    if peer.tracked.load(std::sync::atomic::Ordering::Relaxed) {
        let untrack = pb::UntrackConnectionRequest {
            tenant_id: peer.claims.tenant_id.clone(),
            connection_id: peer.connection_id.clone(),
        };
        if let Err(status) = edge.presence().untrack_connection(untrack).await {
            edge.untracks_failed.store(true, Ordering::Release);
            tracing::warn!(code = ?status.code(), "untracking a closed connection's topics failed; the next presence refresh tries again");
        }
    }
    // After any announcement of the peer in flight (a refresh's retry, a
    // beacon), so that the removal lands last; none starts after it, also
    // when another connection of the device stays (a refresh pass that
    // listed this peer before it left would otherwise announce it after
    // that other connection's removal).
    let _one_at_a_time = peer.presence_writes.lock().await;
    peer.announcing.leave();
    let still_here = edge
        .registry
        .tenant(&peer.claims.tenant_id)
        .iter()
        .any(|p| p.device_id == peer.device_id && p.in_presence.load(Ordering::Acquire));
    if still_here {
        return;
    }
    if !peer.in_presence.load(Ordering::Acquire) {
        return;
    }
    // Only if this edge wrote the entry last: a device that reconnected
    // through another edge before this one found its connection gone
    // keeps its entry there.
    let remove = pb::RemoveInstance {
        tenant_id: peer.claims.tenant_id.clone(),
        instance_id: peer.device_id.clone(),
        edge_id: edge.edge_id.clone(),
    };
    let change = pb::instance_change::Change::Remove(remove);
    if let Err(status) = edge.change_instance(change).await {
        tracing::debug!(code = ?status.code(), "presence removal failed; the TTL will prune it");
    }
}

/// Upserts the peer's presence entry as it last reported it, unless an
/// upsert of it is in flight or presence holds it already.
pub(crate) async fn announce(edge: &Edge, peer: &Peer) -> Result<(), tonic::Status> {
    let _one_at_a_time = peer.presence_writes.lock().await;
    if !peer.announcing.start() {
        return Ok(());
    }
    let entry = peer
        .reported
        .lock()
        .expect("reported lock")
        .as_deref()
        .map(|reported| peer.entry(reported));
    let round = || edge.refresh_round.load(Ordering::Acquire);
    let Some(entry) = entry else {
        peer.announcing.finish(false, round());
        return Ok(());
    };
    let upserted = upsert(edge, &peer.claims.tenant_id, entry).await;
    peer.announcing.finish(upserted.is_ok(), round());
    upserted.map(drop)
}

pub(crate) async fn upsert(
    edge: &Edge,
    tenant_id: &str,
    entry: pb::InstanceEntry,
) -> Result<pb::InstanceEntry, tonic::Status> {
    let upsert = pb::UpsertInstance {
        tenant_id: tenant_id.to_owned(),
        // Written by this edge: only this edge's removal takes it away.
        entry: Some(pb::InstanceEntry {
            edge_id: edge.edge_id.clone(),
            ..entry
        }),
    };
    edge.change_instance(pb::instance_change::Change::Upsert(upsert))
        .await?
        .1
        .ok_or_else(|| tonic::Status::internal("an upsert without its entry"))
}

/// Frames read beyond this many (or [`QUEUED_REQUEST_BYTES`]) waiting to be
/// handled stop the reading: the peer's writes then wait in the socket.
const QUEUED_REQUESTS: usize = 64;
const QUEUED_REQUEST_BYTES: usize = 1024 * 1024;

/// How long requests already read may take to finish at shutdown.
const SHUTDOWN_FINISH: Duration = Duration::from_millis(250);

/// How long requests already read may take to finish once their peer has
/// gone: as long as one call to a service may take.
const FINISH_AFTER_LEAVING: Duration = Duration::from_secs(10);

type Handling<'a> = futures::future::BoxFuture<'a, ()>;

/// A connected peer's frames: the one being handled and those waiting
/// behind it. Holds no allocation while the peer is idle.
struct Requests<'a, H> {
    handle: H,
    handling: Option<Handling<'a>>,
    queued: std::collections::VecDeque<Utf8Bytes>,
    queued_bytes: usize,
}

impl<'a, H: FnMut(Utf8Bytes) -> Handling<'a>> Requests<'a, H> {
    fn new(handle: H) -> Self {
        Requests {
            handle,
            handling: None,
            queued: Default::default(),
            queued_bytes: 0,
        }
    }

    fn busy(&self) -> bool {
        self.handling.is_some()
    }

    fn has_room(&self) -> bool {
        self.queued.len() < QUEUED_REQUESTS && self.queued_bytes < QUEUED_REQUEST_BYTES
    }

    /// Resolves when the frame being handled is done; pending while none is.
    async fn handled(&mut self) {
        match self.handling.as_mut() {
            Some(handling) => {
                handling.await;
                self.handling = None;
            }
            None => std::future::pending().await,
        }
    }

    fn push(&mut self, text: Utf8Bytes) {
        if self.handling.is_none() {
            self.handling = Some((self.handle)(text));
        } else {
            self.queued_bytes += text.len();
            self.queued.push_back(text);
        }
    }

    fn start_next(&mut self) {
        if let Some(text) = self.queued.pop_front() {
            self.queued_bytes -= text.len();
            self.handling = Some((self.handle)(text));
        }
        if self.queued.is_empty() && self.queued.capacity() > 0 {
            // A burst's room is not kept while the peer idles.
            self.queued = Default::default();
        }
    }

    /// Handles every frame read so far.
    async fn finish(&mut self) {
        while self.busy() {
            self.handled().await;
            self.start_next();
        }
    }

    /// What a peer asked for before it left still happens (a node's last
    /// result is applied), though the answers have nowhere to go: its
    /// queue takes nothing more meanwhile, events included.
    /// At shutdown, what is left of the wait shrinks to
    /// [`SHUTDOWN_FINISH`]. Callers box it: its timers would otherwise be
    /// room in every idle connection's future.
    async fn finish_after_the_peer_left(
        &mut self,
        inbox: &mut outbound::Inbox,
        shutdown: &tokio_util::sync::CancellationToken,
    ) {
        inbox.shut();
        let finish = tokio::time::timeout(FINISH_AFTER_LEAVING, self.finish());
        tokio::pin!(finish);
        tokio::select! {
            _ = &mut finish => {}
            () = shutdown.cancelled() => {
                let _ = tokio::time::timeout(SHUTDOWN_FINISH, finish).await;
            }
        }
    }
}

/// Handles one text frame of a connected peer (Part B §2.4, §3).
async fn handle_frame(edge: &Edge, peer: &Peer, out: &outbound::Outbound, text: Utf8Bytes) {
    // The connection is ending (its token revoked or changed, events
    // missed): nothing more it sends takes effect, though the frames
    // queued ahead of its close are still being written.
    if out.closing() {
        return;
    }
    if peer.claims.expired(now_ms()) {
        // Nothing more on an expired token, even before the next ping
        // closes the connection.
        out.close(close::TOKEN_INVALIDATED);
        return;
    }
    let error_event =
        |code: &str, message: &str| out.send(envelope::error_event(code, message, now_ms()));
    match envelope::parse(text.as_str()) {
        Err(FrameError::InvalidJson) => error_event("invalid_json", "message is not valid JSON"),
        Err(FrameError::Invalid(message)) => error_event("invalid_message", &message),
        Ok(Inbound::Event) => error_event("unexpected_event", "clients must not send events"),
        Ok(Inbound::Response(response)) => {
            if response.kind == "task.execute" {
                if peer.role != "node" {
                    error_event("unauthorized", "only nodes may respond to task.execute");
                } else {
                    error_event(
                        "unauthorized",
                        "task.execute result received from an unexpected connection",
                    );
                }
            }
        }
        Ok(Inbound::Request(request)) => {
            // Live events wait until the replay and its answer are queued.
            let held = (request.kind == "muster.stream.resume").then(|| out.hold());
            let reply = respond(edge, peer, &request).await;
            out.send(reply);
            drop(held);
        }
    }
}

fn invalid_request(request: &Request, message: &str) -> String {
    envelope::error(
        &request.request_id,
        &request.kind,
        "invalid_request",
        message,
        Some(json!({"issues": [{"message": message}]})),
    )
}

fn unsupported(request: &Request) -> String {
    envelope::error(
        &request.request_id,
        &request.kind,
        "unsupported_request",
        "request not supported",
        None,
    )
}

/// The response to one request.
async fn respond(edge: &Edge, peer: &Peer, request: &Request) -> String {
    if let Err(refusal) = authorize(&peer.claims, peer.role, &request.kind) {
        return envelope::error(
            &request.request_id,
            &request.kind,
            refusal.code,
            refusal.message,
            None,
        );
    }
    let result = match request.kind.as_str() {
        "ping" => {
            if request.payload != json!({}) {
                return invalid_request(request, "ping payload must be {}");
            }
            Ok(None)
        }
        // Checked, cut to what the node advertised at connect, and
        // broadcast to operators; answered with no result (Part B §6).
        "capability.ready" if peer.role == "node" => {
            match muster_protocol::capability::CapabilityReady::parse(&request.payload) {
                Err(message) => return invalid_request(request, &message),
                Ok(report) => report_capabilities(edge, peer, &report)
                    .await
                    .map(|()| None),
            }
        }
        "presence.beacon" => match Beacon::parse(&request.payload) {
            Err(message) => return invalid_request(request, &message),
            Ok(beacon) => beacon_upsert(edge, peer, beacon).await.map(Some),
        },
        "muster.presence.list" | "muster.status" if peer.role != "client" => {
            return envelope::error(
                &request.request_id,
                &request.kind,
                "unauthorized",
                "only operator clients may see presence",
                None,
            );
        }
        "muster.presence.list" => list_presence(edge, &peer.claims.tenant_id)
            .await
            .map(|entries| Some(json!({ "entries": entries }))),
        "muster.status" => Ok(Some(status(edge, &peer.claims.tenant_id).await)),
        "muster.stream.resume" => match crate::resume::resume(edge, peer, &request.payload).await {
            crate::resume::Outcome::Done(result) => Ok(Some(result)),
            crate::resume::Outcome::Invalid(message) => return invalid_request(request, message),
            crate::resume::Outcome::Failed(status) => Err(status),
        },
        kind if kind.starts_with("muster.topic.") => {
            match topics::handle(edge, peer, request).await {
                topics::Outcome::Done(result) => Ok(result),
                topics::Outcome::Invalid(message) => return invalid_request(request, &message),
                topics::Outcome::Failed(status) => Err(status),
                topics::Outcome::Unsupported => return unsupported(request),
            }
        }
        _ => return unsupported(request),
    };
    match result {
        Ok(result) => envelope::ok(&request.request_id, &request.kind, result),
        Err(status) => match wire_error(&status) {
            // A service's validation failure is a schema failure like the
            // edge's own, with the same details (Part B §2.4).
            ("invalid_request", message) => invalid_request(request, &message),
            (code, message) => {
                envelope::error(&request.request_id, &request.kind, code, &message, None)
            }
        },
    }
}

/// The keys of an entry's metadata under which the edge puts what it
/// observed itself (Part B §4's connect metadata, but `capabilities`).
const OBSERVED_KEYS: [&str; 3] = ["edge_id", "raw_remote_ip", "resolved_client_ip"];

/// `metadata` as a peer reported it, without the keys under which the edge
/// labels its own observations: a peer cannot pass its word off as the
/// edge's. (What the edge observed stays in `observed_ip`, which presence
/// sets on every entry.) One that is no object is left for presence to
/// refuse.
fn without_observed_keys(mut metadata: Value) -> Value {
    if let Some(reported) = metadata.as_object_mut() {
        for key in OBSERVED_KEYS {
            reported.remove(key);
        }
    }
    metadata
}

/// A node's ready capabilities, as far as it advertised them at connect,
/// broadcast by presence as `capability.ready`.
async fn report_capabilities(
    edge: &Edge,
    peer: &Peer,
    report: &muster_protocol::capability::CapabilityReady,
) -> Result<(), tonic::Status> {
    let advertised = |id: &str| peer.advertised.iter().any(|a| &**a == id);
    let capabilities: Vec<_> = report
        .capabilities
        .iter()
        .filter(|c| advertised(&c.id))
        .collect();
    let states: Vec<_> = report
        .capability_states
        .iter()
        .filter(|s| advertised(&s.capability))
        .collect();
    edge.presence()
        .report_capabilities(pb::ReportCapabilitiesRequest {
            tenant_id: peer.claims.tenant_id.clone(),
            node_id: peer.device_id.clone(),
            capabilities_json: json!(capabilities).to_string(),
            capability_states_json: json!(states).to_string(),
        })
        .await?;
    Ok(())
}

async fn beacon_upsert(edge: &Edge, peer: &Peer, beacon: Beacon) -> Result<Value, tonic::Status> {
    let reported = Reported {
        host: beacon.host.unwrap_or_default(),
        ip: beacon.ip.unwrap_or_default(),
        version: beacon.version.unwrap_or_default(),
        mode: beacon.mode.unwrap_or_default(),
        last_input_seconds: beacon.last_input_seconds.unwrap_or(-1),
        metadata_json: without_observed_keys(beacon.metadata.unwrap_or_else(|| json!({})))
            .to_string(),
        reason: "periodic",
    };
    let _one_at_a_time = peer.presence_writes.lock().await;
    // A peer left out of presence (a CLI) that beacons is in it from now
    // on: refreshed while it stays, removed when it leaves, rather than an
    // entry nobody keeps until the TTL prunes it. Set before the write, so
    // that a write that lands after its caller gave up is removed too.
    let was_in_presence = peer.in_presence.swap(true, Ordering::AcqRel);
    let stored = match upsert(edge, &peer.claims.tenant_id, peer.entry(&reported)).await {
        Ok(stored) => stored,
        Err(status) => {
            // A refusal wrote nothing: the peer stays as it was.
            if status.code() == tonic::Code::InvalidArgument && !was_in_presence {
                peer.in_presence.store(false, Ordering::Release);
            }
            return Err(status);
        }
    };
    // What the peer reported last (and presence took) is what it is
    // announced with again, should presence lose its entry while it stays
    // connected.
    *peer.reported.lock().expect("reported lock") = Some(Box::new(reported));
    peer.announcing
        .finish(true, edge.refresh_round.load(Ordering::Acquire));
    let entry = wire_entry(stored)?;
    Ok(json!({ "entry": entry }))
}

pub(crate) fn wire_entry(entry: pb::InstanceEntry) -> Result<Value, tonic::Status> {
    let entry = muster_presence::InstanceEntry::try_from(entry)
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    serde_json::to_value(entry.wire()).map_err(|e| tonic::Status::internal(e.to_string()))
}

/// What `/status` and `muster.status` report for one tenant.
/// The edge's own state, and presence's counts; `presence` is null when
/// presence cannot be reached (the edge still answers for itself).
pub(crate) async fn status(edge: &Edge, tenant_id: &str) -> Value {
    let presence = match list_presence(edge, tenant_id).await {
        Ok(entries) => {
            let count = |role: &str| entries.iter().filter(|e| e["role"] == role).count();
            json!({
                "total": entries.len(),
                "gateway": count("gateway"),
                "client": count("client"),
                "node": count("node"),
            })
        }
        Err(status) => {
            tracing::warn!(code = ?status.code(), "status without presence");
            Value::Null
        }
    };
    json!({
        "edge_id": edge.edge_id,
        "ws_url": edge.ws_url,
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": muster_protocol::format_datetime(edge.started_at_ms),
        // This tenant's: another tenant's traffic is not its to see.
        "connections": edge.tenant_connections(tenant_id),
        "presence": presence,
    })
}

pub(crate) async fn list_presence(
    edge: &Edge,
    tenant_id: &str,
) -> Result<Vec<Value>, tonic::Status> {
    let entries = edge
        .presence()
        .list_instances(pb::ListInstancesRequest {
            tenant_id: tenant_id.to_owned(),
        })
        .await?
        .into_inner()
        .entries;
    entries.into_iter().map(wire_entry).collect()
}
