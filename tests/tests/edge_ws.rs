//! The edge with real WebSocket clients: every close code, envelope error,
//! token path and scope check of PROTOCOL.md Part B, and instance presence
//! flowing from producers through the outbox to operators.

use std::time::Duration;

use muster_e2e::Host;
use muster_e2e::ws::{Next, TokenVia, Ws, open};
use muster_protocol::device::{DeviceKey, transcript};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Error;

async fn admin(host: &Host) -> Ws {
    open(&host.ws_url(), &host.admin_token(), TokenVia::Bearer, None)
        .await
        .unwrap()
}

fn init(key: &DeviceKey, role: &str) -> Value {
    json!({"request_id": "i1", "type": "connect.init", "payload": {
        "protocol_rev": 2, "role": role,
        "device": {"device_id": key.device_id(), "pubkey": key.pubkey()}}})
}

async fn assert_closed(ws: &mut Ws, code: u16, reason: &str) {
    assert_eq!(ws.closed().await, (code, reason.to_owned()));
}

muster_e2e::on_both_stores! {
    async fn the_upgrade_needs_tyrum_v1_and_echoes_only_it(store: Option<String>) {
        let host = Host::start(store).await;
        let Err(Error::Http(response)) = open(&host.ws_url(), "x", TokenVia::Nowhere, Some("")).await
        else {
            panic!("an upgrade without tyrum-v1 must fail");
        };
        assert_eq!(response.status(), 400);
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; charset=utf-8"
        );
        let body = String::from_utf8(response.body().clone().unwrap()).unwrap();
        assert_eq!(body, "Missing required WebSocket subprotocol: tyrum-v1\n");

        let ws = open(
            &host.ws_url(),
            &host.admin_token(),
            TokenVia::Subprotocol,
            None,
        )
        .await
        .unwrap();
        assert_eq!(ws.response.headers()["sec-websocket-protocol"], "tyrum-v1");
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn an_address_over_its_upgrade_limit_gets_429_before_the_subprotocol_check(store: Option<String>) {
        let host = Host::start_configured(store, |config| config.edge_upgrades_per_ip_per_minute = 3).await;
        let token = host.admin_token();
        // Every upgrade counts, refused ones too.
        let Err(Error::Http(refused)) = open(&host.ws_url(), &token, TokenVia::Bearer, Some("")).await
        else {
            panic!("an upgrade without tyrum-v1 must fail");
        };
        assert_eq!(refused.status(), 400);
        for _ in 0..2 {
            let ws = open(&host.ws_url(), &token, TokenVia::Bearer, None).await.unwrap();
            drop(ws);
        }
        for protocols in [None, Some("")] {
            let Err(Error::Http(limited)) = open(&host.ws_url(), &token, TokenVia::Bearer, protocols).await
            else {
                panic!("the fourth upgrade in a minute must be refused");
            };
            assert_eq!(limited.status(), 429);
            let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=60).contains(&retry_after), "{retry_after}");
        }
        // Plain requests are not counted or limited.
        let health = muster_e2e::http_get(&format!("{}/healthz", host.http_base()), None);
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        host.stop().await;
    }
}

/// The next `presence.upserted` entry for `device_id` that `operator`
/// receives (other entries, such as the edge's own, may come first).
async fn upserted_entry<S>(operator: &mut Ws<S>, device_id: &str) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let mut event = operator.event("presence.upserted").await;
        if event["payload"]["entry"]["instance_id"] == device_id {
            return event["payload"]["entry"].take();
        }
    }
}

/// Opens `/ws` from the loopback address `source` (the edge listens on
/// 127.0.0.1; Linux routes all of 127/8 to it), with `headers` added to
/// the upgrade request.
async fn open_from_address(
    host: &Host,
    source: &str,
    headers: &[(&str, &str)],
) -> Result<Ws<tokio::net::TcpStream>, Error> {
    open_from_address_after(host, source, b"", headers).await
}

/// [`open_from_address`], with `first` written before the upgrade request
/// (a PROXY protocol header).
async fn open_from_address_after(
    host: &Host,
    source: &str,
    first: &[u8],
    headers: &[(&str, &str)],
) -> Result<Ws<tokio::net::TcpStream>, Error> {
    use tokio::io::AsyncWriteExt;
    let url = host.ws_url();
    let address: std::net::SocketAddr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(address).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(first).await.unwrap();
    let mut request =
        muster_e2e::ws::request(&url, &host.admin_token(), TokenVia::Bearer, None).unwrap();
    for (name, value) in headers {
        request.headers_mut().append(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    muster_e2e::ws::open_request_over(tcp, request).await
}

muster_e2e::on_both_stores! {
    async fn a_trusted_proxy_names_the_client_for_the_upgrade_limit_and_presence(store: Option<String>) {
        let host = Host::start_configured(store, |config| {
            config.edge_upgrades_per_ip_per_minute = 2;
            config.edge_trusted_proxies = vec!["127.0.0.2".into()];
        })
        .await;
        let mut operator = admin(&host).await;
        operator
            .handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
            .await;

        // Through the proxy: the hop it saw (the left one was written by
        // the client and is not believed).
        let forwarded = [("x-forwarded-for", "192.0.2.1, 203.0.113.7")];
        let node_key = DeviceKey::generate();
        let mut node = open_from_address(&host, "127.0.0.2", &forwarded).await.unwrap();
        node.handshake(&node_key, "node", json!({"mode": "node"})).await;
        let entry = upserted_entry(&mut operator, &node_key.device_id()).await;
        assert_eq!(entry["ip"], "203.0.113.7", "{entry}");
        assert_eq!(entry["metadata"]["raw_remote_ip"], "127.0.0.2");
        assert_eq!(entry["metadata"]["resolved_client_ip"], "203.0.113.7");
        assert_eq!(entry["metadata"]["observed_ip"], "203.0.113.7");

        // The limit counts the client, not the proxy every client shares:
        // 203.0.113.7 has had one upgrade and gets one more.
        let second = open_from_address(&host, "127.0.0.2", &forwarded).await.unwrap();
        drop(second);
        let Err(Error::Http(limited)) = open_from_address(&host, "127.0.0.2", &forwarded).await else {
            panic!("the third upgrade of 203.0.113.7 in a minute must be refused");
        };
        assert_eq!(limited.status(), 429);
        let other = [("x-forwarded-for", "203.0.113.8")];
        let through_proxy = open_from_address(&host, "127.0.0.2", &other).await.unwrap();
        drop(through_proxy);

        // From a socket that is no trusted proxy the header means nothing:
        // the peer is its own address, and 127.0.0.3 has its own count.
        let spoofed_key = DeviceKey::generate();
        let mut spoofed = open_from_address(&host, "127.0.0.3", &[("x-forwarded-for", "203.0.113.8")])
            .await
            .unwrap();
        spoofed.handshake(&spoofed_key, "node", json!({"mode": "node"})).await;
        let entry = upserted_entry(&mut operator, &spoofed_key.device_id()).await;
        assert_eq!(entry["ip"], "127.0.0.3", "{entry}");
        assert_eq!(entry["metadata"]["resolved_client_ip"], "127.0.0.3");
        host.stop().await;
    }
}

// Behind a load balancer that passes TCP through, a trusted proxy's PROXY
// protocol header (version 1 or 2) names the client, which presence then
// shows as the peer's address. A connection from that proxy without a
// header is dropped; from any other socket no header is read.
muster_e2e::on_both_stores! {
    async fn a_trusted_proxys_proxy_protocol_header_names_the_client(store: Option<String>) {
        let host = Host::start_configured(store, |config| {
            config.edge_trusted_proxies = vec!["127.0.0.2".into()];
            config.edge_proxy_protocol = true;
        })
        .await;
        let mut operator = admin(&host).await;
        operator
            .handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
            .await;

        let key = DeviceKey::generate();
        let v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 8787\r\n";
        let mut node = open_from_address_after(&host, "127.0.0.2", v1, &[]).await.unwrap();
        node.handshake(&key, "node", json!({"mode": "node"})).await;
        let entry = upserted_entry(&mut operator, &key.device_id()).await;
        assert_eq!(entry["ip"], "203.0.113.7", "{entry}");
        assert_eq!(entry["metadata"]["raw_remote_ip"], "203.0.113.7");
        assert_eq!(entry["metadata"]["resolved_client_ip"], "203.0.113.7");

        // Version 2, an IPv6 client, and a TLV after the addresses.
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x2a".to_vec();
        v2.extend_from_slice(&"2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v2.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        // Ports 51000 and 8787, then the TLV.
        v2.extend_from_slice(&[0xc7, 0x38, 0x22, 0x53, 0xea, 0x00, 0x03, b'v', b'p', b'c']);
        let key = DeviceKey::generate();
        let mut node = open_from_address_after(&host, "127.0.0.2", &v2, &[]).await.unwrap();
        node.handshake(&key, "node", json!({"mode": "node"})).await;
        let entry = upserted_entry(&mut operator, &key.device_id()).await;
        assert_eq!(entry["ip"], "2001:db8::7", "{entry}");
        assert_eq!(entry["metadata"]["raw_remote_ip"], "2001:db8::7");
        assert_eq!(entry["metadata"]["resolved_client_ip"], "2001:db8::7");

        // Version 2's LOCAL (the proxy speaking for itself): the socket's
        // address stands, and a forwarding header on it, which the
        // balancer did not write, is not read.
        let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
        let key = DeviceKey::generate();
        let mut node = open_from_address_after(&host, "127.0.0.2", local, &[("x-forwarded-for", "203.0.113.10")])
            .await
            .unwrap();
        node.handshake(&key, "node", json!({"mode": "node"})).await;
        let entry = upserted_entry(&mut operator, &key.device_id()).await;
        assert_eq!(entry["ip"], "127.0.0.2", "{entry}");

        // A source that is itself a trusted proxy has its forwarding
        // header read, as its socket would.
        let chained = b"PROXY TCP4 127.0.0.2 127.0.0.1 51000 8787\r\n";
        let key = DeviceKey::generate();
        let mut node = open_from_address_after(
            &host,
            "127.0.0.2",
            chained,
            &[("x-forwarded-for", "203.0.113.9")],
        )
        .await
        .unwrap();
        node.handshake(&key, "node", json!({"mode": "node"})).await;
        let entry = upserted_entry(&mut operator, &key.device_id()).await;
        assert_eq!(entry["ip"], "203.0.113.9", "{entry}");
        assert_eq!(entry["metadata"]["raw_remote_ip"], "127.0.0.2");

        // From the proxy, without a header: dropped with no HTTP answer
        // (an empty read, or a reset for the request left unread).
        let address = host.ws_url().trim_start_matches("ws://").trim_end_matches("/ws").to_owned();
        let upgrade = upgrade_request("/ws");
        match raw_exchange_from("127.0.0.2", &address, upgrade.as_bytes()).await {
            Ok(answer) => assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer)),
            Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
        }

        // Not a trusted proxy: its own address, and no header is read.
        let key = DeviceKey::generate();
        let mut direct = open_from_address(&host, "127.0.0.3", &[]).await.unwrap();
        direct.handshake(&key, "node", json!({"mode": "node"})).await;
        let entry = upserted_entry(&mut operator, &key.device_id()).await;
        assert_eq!(entry["ip"], "127.0.0.3", "{entry}");
        // Read as HTTP, it is a bad request; the 400 may be lost to a reset
        // for the part of the request left unread.
        let proxied = [&v1[..], upgrade.as_bytes()].concat();
        match raw_exchange_from("127.0.0.3", &address, &proxied).await {
            Ok(answer) => assert!(answer.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&answer)),
            Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
        }
        host.stop().await;
    }
}

/// What the edge sends back for `request`, read until it closes the
/// connection.
async fn raw_exchange(address: &str, request: &str) -> std::io::Result<Vec<u8>> {
    raw_exchange_from("127.0.0.1", address, request.as_bytes()).await
}

/// [`raw_exchange`] from the loopback address `source`.
async fn raw_exchange_from(
    source: &str,
    address: &str,
    request: &[u8],
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    let mut tcp = socket.connect(address.parse().unwrap()).await?;
    tcp.write_all(request).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("the edge ends the exchange")?;
    Ok(answer)
}

muster_e2e::on_both_stores! {
    async fn after_its_close_the_edge_waits_for_the_peers_close_up_to_250_ms(store: Option<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = Host::start(store).await;
        let address = host.ws_url().trim_start_matches("ws://").trim_end_matches("/ws").to_owned();
        let mut tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
        let upgrade = upgrade_request("/ws").replace(
            "\r\n\r\n",
            &format!("\r\nAuthorization: Bearer {}\r\n\r\n", host.admin_token()),
        );
        tcp.write_all(upgrade.as_bytes()).await.unwrap();
        // A masked text frame (mask key 0, so the payload reads as sent).
        let frame = |text: &str| [&[0x81, 0x80 | text.len() as u8, 0, 0, 0, 0], text.as_bytes()].concat();
        // Not JSON: the handshake ends with 4003 `invalid json`. The
        // linger starts after this frame is read, so it is timed from here
        // (timing from the close's arrival would lose the delivery delay).
        let sent_at = std::time::Instant::now();
        tcp.write_all(&frame("x")).await.unwrap();
        let mut read = Vec::new();
        let close = loop {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
                .await
                .expect("the edge answers")
                .unwrap();
            assert!(n > 0, "ended before a close: {}", String::from_utf8_lossy(&read));
            read.extend_from_slice(&chunk[..n]);
            let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let frames = &read[end + 4..];
            if frames.len() >= 2 && frames.len() >= 2 + usize::from(frames[1]) {
                break frames[..2 + usize::from(frames[1])].to_vec();
            }
        };
        assert_eq!(close[0], 0x88, "{close:?}");
        assert_eq!(u16::from_be_bytes([close[2], close[3]]), 4003);
        assert_eq!(&close[4..], b"invalid json");
        // The peer goes on sending and never answers the close: the edge
        // reads what comes, and ends the connection when 250 ms are up
        // (with a FIN, unless the frame came later than that on a loaded
        // machine), where it used to drop the socket at once.
        tcp.write_all(&frame("{}")).await.unwrap();
        let mut rest = [0u8; 64];
        let end = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut rest))
            .await
            .expect("the edge ends the connection");
        assert!(
            matches!(&end, Ok(0)) || matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{end:?}"
        );
        let waited = sent_at.elapsed();
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        host.stop().await;
    }
}

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tyrum-v1\r\n\r\n"
    )
}

muster_e2e::on_both_stores! {
    async fn an_upgrade_for_another_path_gets_its_socket_closed(store: Option<String>) {
        let host = Host::start(store).await;
        let url = host.ws_url();
        let address = url.trim_start_matches("ws://").trim_end_matches("/ws").to_owned();
        for path in ["/", "/other", "/healthz", "/ws/", "/wss"] {
            // Not a response of any kind: the connection just ends (or
            // is reset).
            let answer = raw_exchange(&address, &upgrade_request(path)).await.unwrap_or_default();
            assert!(answer.is_empty(), "{path}: {}", String::from_utf8_lossy(&answer));
            let refused = open(&url.replace("/ws", path), &host.admin_token(), TokenVia::Bearer, None).await;
            assert!(
                matches!(refused, Err(Error::Io(_) | Error::ConnectionClosed | Error::Protocol(_))),
                "{path}: {refused:?}"
            );
        }
        // The same request for /ws is answered with the upgrade, and a
        // plain request for another path with its 404.
        let answer = raw_exchange(&address, &upgrade_request("/ws?x=1")).await;
        let answer = String::from_utf8_lossy(answer.as_deref().unwrap_or_default()).into_owned();
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        let answer = raw_exchange(&address, "GET /other HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 404"));
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn every_token_path_admits_and_a_bad_token_is_closed_4001(store: Option<String>) {
        let host = Host::start(store).await;
        for via in [TokenVia::Bearer, TokenVia::Cookie, TokenVia::Subprotocol] {
            let mut ws = open(&host.ws_url(), &host.admin_token(), via, None)
                .await
                .unwrap();
            let key = DeviceKey::generate();
            let result = ws.handshake(&key, "client", json!({})).await;
            assert_eq!(result["device_id"], key.device_id(), "{via:?}");
            assert_eq!(result["role"], "client");
        }
        // The first decodable `tyrum-auth.*` in the order offered, though
        // a later one ("A") sorts first.
        use base64::Engine;
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(host.admin_token());
        let offered = format!("tyrum-v1, tyrum-auth.{encoded}, tyrum-auth.QQ");
        let mut ws = open(&host.ws_url(), "", TokenVia::Nowhere, Some(&offered)).await.unwrap();
        let key = DeviceKey::generate();
        assert_eq!(ws.handshake(&key, "client", json!({})).await["device_id"], key.device_id());
        for (token, via) in [("muster_wrong", TokenVia::Bearer), ("", TokenVia::Nowhere)] {
            let mut ws = open(&host.ws_url(), token, via, None).await.unwrap();
            assert_closed(&mut ws, 4001, "unauthorized").await;
        }
        // An operator token is for clients; a node needs an admin (or scoped
        // node) token.
        let (_, reader) = host.client_token(&["operator.read"]).await;
        let mut ws = open(&host.ws_url(), &reader, TokenVia::Bearer, None)
            .await
            .unwrap();
        ws.send(init(&DeviceKey::generate(), "node")).await;
        assert_closed(&mut ws, 4001, "unauthorized").await;
        // Its role is checked after the device id (Part B §3, checks 3 and
        // 4): a wrong id is 4006 first.
        let mut ws = open(&host.ws_url(), &reader, TokenVia::Bearer, None)
            .await
            .unwrap();
        let mut wrong_id = init(&DeviceKey::generate(), "node");
        wrong_id["payload"]["device"]["device_id"] = json!(DeviceKey::generate().device_id());
        ws.send(wrong_id).await;
        assert_closed(&mut ws, 4006, "device_id mismatch").await;
        host.stop().await;
    }
}

/// Opens `/ws` with the admin token where `via` puts it, from a page at
/// `origin` (as a browser sends it).
async fn open_from(host: &Host, origin: &str, via: TokenVia) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = host.ws_url().into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("origin", origin.parse().unwrap());
    headers.insert("sec-websocket-protocol", "tyrum-v1".parse().unwrap());
    let token = host.admin_token();
    match via {
        TokenVia::Cookie => headers.insert(
            "cookie",
            format!("theme=dark; tyrum_admin_token={token}")
                .parse()
                .unwrap(),
        ),
        TokenVia::Bearer => {
            headers.insert("authorization", format!("Bearer {token}").parse().unwrap())
        }
        other => panic!("{other:?} carries no header"),
    };
    let (stream, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    Ws { stream, response }
}

muster_e2e::on_both_stores! {
    async fn the_cookie_counts_only_from_the_same_origin(store: Option<String>) {
        let host = Host::start(store).await;
        let own = host.http_base();
        let mut ws = open_from(&host, &own, TokenVia::Cookie).await;
        let key = DeviceKey::generate();
        assert_eq!(ws.handshake(&key, "client", json!({})).await["device_id"], key.device_id());
        // A cookie without an Origin is no browser's: it does not count.
        let mut request = muster_e2e::ws::request(&host.ws_url(), "", TokenVia::Nowhere, None).unwrap();
        let cookie = format!("tyrum_admin_token={}", host.admin_token());
        request.headers_mut().insert("cookie", cookie.parse().unwrap());
        let (stream, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut ws = Ws { stream, response };
        assert_closed(&mut ws, 4001, "unauthorized").await;
        // A page elsewhere cannot ride the operator's cookie...
        let mut ws = open_from(&host, "http://evil.example", TokenVia::Cookie).await;
        assert_closed(&mut ws, 4001, "unauthorized").await;
        // ...nor one on another port of the same host.
        let other_port = own.rsplit_once(':').map(|(base, _)| format!("{base}:1")).unwrap();
        let mut ws = open_from(&host, &other_port, TokenVia::Cookie).await;
        assert_closed(&mut ws, 4001, "unauthorized").await;
        // A token the page holds itself is its own to present.
        let mut ws = open_from(&host, "http://evil.example", TokenVia::Bearer).await;
        let key = DeviceKey::generate();
        assert_eq!(ws.handshake(&key, "client", json!({})).await["device_id"], key.device_id());
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn a_node_token_admits_its_own_device_as_a_node_only(store: Option<String>) {
        let host = Host::start(store).await;
        let key = DeviceKey::generate();
        let token = host.node_token(&key.device_id()).await;

        let mut node = open(&host.ws_url(), &token, TokenVia::Bearer, None)
            .await
            .unwrap();
        let result = node.handshake(&key, "node", json!({})).await;
        assert_eq!(result["device_id"], key.device_id());
        assert_eq!(result["role"], "node");
        // It carries no operator scopes.
        assert_eq!(
            node.call("muster.presence.list", json!({})).await["error"]["code"],
            "forbidden"
        );

        // Another key: 4008 right after connect.init (Part B §3, check 5).
        let mut ws = open(&host.ws_url(), &token, TokenVia::Bearer, None)
            .await
            .unwrap();
        ws.send(init(&DeviceKey::generate(), "node")).await;
        assert_closed(&mut ws, 4008, "scoped token mismatch").await;

        // Its own key as a client: 4001, before the device is looked at.
        let mut ws = open(&host.ws_url(), &token, TokenVia::Bearer, None)
            .await
            .unwrap();
        ws.send(init(&key, "client")).await;
        assert_closed(&mut ws, 4001, "unauthorized").await;
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn handshake_violations_close_with_their_exact_codes(store: Option<String>) {
        let host = Host::start(store).await;
        let key = DeviceKey::generate();
        let other = DeviceKey::generate();
        let cases: Vec<(Vec<String>, u16, &str)> = vec![
            (vec!["{not json".into()], 4003, "invalid json"),
            (vec![json!({"request_id": "r", "type": "connect", "payload": {}}).to_string()], 4003,
                "legacy connect is deprecated; use connect.init/connect.proof"),
            (vec![json!({"request_id": "r", "type": "ping", "payload": {}}).to_string()], 4003,
                "expected connect.init/connect.proof"),
            (vec![json!({"request_id": "r", "type": "connect.init", "payload": {"protocol_rev": 2}}).to_string()], 4003,
                "expected connect.init/connect.proof"),
            (vec![json!({"request_id": "r", "type": "connect.proof", "payload": {"connection_id": "c", "proof": "p"}}).to_string()], 4003,
                "expected connect.init first"),
            // A legacy connect that is no strict envelope is still told so;
            // a malformed proof before any init is a malformed frame first.
            (vec![json!({"type": "connect"}).to_string()], 4003,
                "legacy connect is deprecated; use connect.init/connect.proof"),
            (vec![json!({"request_id": "r", "type": "connect.proof", "payload": {}}).to_string()], 4003,
                "expected connect.init/connect.proof"),
            // A device's optional key is omitted, never null.
            (vec![json!({"request_id": "r", "type": "connect.init", "payload": {"protocol_rev": 2, "role": "client",
                "device": {"device_id": key.device_id(), "pubkey": key.pubkey(), "label": null}}}).to_string()], 4003,
                "expected connect.init/connect.proof"),
            (vec![json!({"request_id": "r", "type": "connect.init", "payload": {"protocol_rev": 1, "role": "client",
                "device": {"device_id": key.device_id(), "pubkey": key.pubkey()}}}).to_string()], 4005, "protocol_rev mismatch"),
            (vec![json!({"request_id": "r", "type": "connect.init", "payload": {"protocol_rev": 2, "role": "client",
                "device": {"device_id": other.device_id(), "pubkey": key.pubkey()}}}).to_string()], 4006, "device_id mismatch"),
            // A pubkey that is no key, with an id it does not imply: the id
            // is checked first.
            (vec![json!({"request_id": "r", "type": "connect.init", "payload": {"protocol_rev": 2, "role": "client",
                "device": {"device_id": key.device_id(), "pubkey": "AAAA"}}}).to_string()], 4006, "device_id mismatch"),
        ];
        for (frames, code, reason) in cases {
            let mut ws = admin(&host).await;
            for frame in &frames {
                ws.send_text(frame).await;
            }
            assert_eq!(ws.closed().await, (code, reason.to_owned()), "{frames:?}");
        }

        // After a good init: a proof for another connection, or a bad proof.
        for (mangle, code, reason) in [
            ("connection", 4003, "connection_id mismatch"),
            ("signature", 4007, "invalid proof"),
            ("garbage", 4007, "invalid proof"),
        ] {
            let mut ws = admin(&host).await;
            let reply = ws
                .call("connect.init", init(&key, "client")["payload"].clone())
                .await;
            let connection_id = reply["result"]["connection_id"]
                .as_str()
                .unwrap()
                .to_owned();
            let challenge = reply["result"]["challenge"].as_str().unwrap().to_owned();
            assert_eq!(challenge.len(), 43);
            let (cid, proof) = match mangle {
                "connection" => (
                    "3f1c2a9e-7b4d-4c1e-9a2f-5d6e7f8a9b0c".to_owned(),
                    "x".to_owned(),
                ),
                "signature" => (
                    connection_id.clone(),
                    other.sign(&transcript(
                        2,
                        "client",
                        &key.device_id(),
                        &connection_id,
                        &challenge,
                    )),
                ),
                _ => (connection_id.clone(), "%%%".to_owned()),
            };
            ws.send(json!({"request_id": "p", "type": "connect.proof", "payload": {"connection_id": cid, "proof": proof}})).await;
            assert_closed(&mut ws, code, reason).await;
        }

        // A pubkey that is no key but implies the id it is sent with passes
        // the init (Part B §3 hashes what it decodes to) and fails the
        // proof, whatever the signature.
        let mut ws = admin(&host).await;
        let not_a_key = "AAAA";
        let reply = ws
            .call("connect.init", json!({"protocol_rev": 2, "role": "client", "device": {
                "device_id": muster_protocol::device::device_id_of_pubkey(not_a_key).unwrap(),
                "pubkey": not_a_key}}))
            .await;
        assert_eq!(reply["ok"], true, "{reply}");
        let connection_id = reply["result"]["connection_id"].as_str().unwrap().to_owned();
        ws.send(json!({"request_id": "p", "type": "connect.proof", "payload": {
            "connection_id": connection_id, "proof": key.sign("anything")}})).await;
        assert_closed(&mut ws, 4007, "invalid proof").await;
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn a_silent_peer_is_closed_4002_after_ten_seconds(store: Option<String>) {
        let host = Host::start(store).await;
        let mut ws = admin(&host).await;
        let started = std::time::Instant::now();
        assert_closed(&mut ws, 4002, "handshake timeout").await;
        let waited = started.elapsed();
        // Not before the 10 s; the upper bound only says it came at all.
        assert!(
            waited >= Duration::from_secs(9) && waited < Duration::from_secs(40),
            "{waited:?}"
        );
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn after_the_handshake_envelopes_are_strict(store: Option<String>) {
        let host = Host::start(store).await;
        let mut ws = admin(&host).await;
        ws.handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
            .await;

        let pong = ws.call("ping", json!({})).await;
        assert_eq!(
            pong,
            json!({"request_id": pong["request_id"], "type": "ping", "ok": true})
        );
        let bad_ping = ws.call("ping", json!({"x": 1})).await;
        assert_eq!(bad_ping["error"]["code"], "invalid_request");

        for (frame, code, message) in [
            (
                "{oops".to_owned(),
                "invalid_json",
                Some("message is not valid JSON"),
            ),
            (
                json!({"request_id": "r", "type": "ping"}).to_string(),
                "invalid_message",
                None,
            ),
            (
                json!({"event_id": "e", "type": "x", "occurred_at": "2026-07-24T21:00:00.000Z",
                       "payload": {}})
                .to_string(),
                "unexpected_event",
                Some("clients must not send events"),
            ),
            (
                json!({"event_id": "e", "type": "x", "occurred_at": "yesterday", "payload": {}})
                    .to_string(),
                "invalid_message",
                None,
            ),
            (
                json!({"request_id": "t", "type": "task.execute", "ok": true}).to_string(),
                "unauthorized",
                Some("only nodes may respond to task.execute"),
            ),
            ("[1]".to_owned(), "invalid_message", None),
            ("\"ping\"".to_owned(), "invalid_message", None),
            (
                json!({"request_id": " ", "type": "ping", "payload": {}}).to_string(),
                "invalid_message",
                None,
            ),
            (
                json!({"request_id": 7, "type": "ping", "payload": {}}).to_string(),
                "invalid_message",
                None,
            ),
            (
                json!({"request_id": "r", "payload": {}}).to_string(),
                "invalid_message",
                None,
            ),
            (
                json!({"request_id": "r", "type": "ping", "payload": {}, "extra": 1}).to_string(),
                "invalid_message",
                None,
            ),
        ] {
            ws.send_text(&frame).await;
            let event = ws.event("error").await;
            assert_eq!(event["payload"]["code"], code, "{frame}");
            if let Some(message) = message {
                assert_eq!(event["payload"]["message"], message);
            }
            let keys: Vec<_> = event["payload"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            assert_eq!(keys, vec!["code", "message"]);
            assert!(event["occurred_at"].as_str().unwrap().ends_with('Z'));
        }
        // A frame sent as binary is read as the same text.
        {
            use futures::SinkExt;
            let frame = json!({"request_id": "b", "type": "ping", "payload": {}}).to_string();
            ws.stream
                .send(tokio_tungstenite::tungstenite::Message::binary(frame.into_bytes()))
                .await
                .unwrap();
            // Events (presence, say) may come first.
            let pong = loop {
                match ws.next(Duration::from_secs(5)).await {
                    Next::Json(frame) if frame.get("event_id").is_some() => continue,
                    other => break other,
                }
            };
            assert_eq!(
                pong,
                Next::Json(json!({"request_id": "b", "type": "ping", "ok": true}))
            );
        }
        // A response to anything but task.execute is ignored: ping still works.
        ws.send(json!({"request_id": "x", "type": "ping", "ok": true}))
            .await;
        assert_eq!(ws.call("ping", json!({})).await["ok"], true);

        // A node's task.execute result for a task it was never sent.
        let mut node = admin(&host).await;
        node.handshake(&DeviceKey::generate(), "node", json!({"mode": "node"}))
            .await;
        node.send(json!({"request_id": "t", "type": "task.execute", "ok": true}))
            .await;
        let event = node.event("error").await;
        assert_eq!(
            event["payload"],
            json!({"code": "unauthorized",
                "message": "task.execute result received from an unexpected connection"})
        );

        // The readiness report a Tyrum node sends after every connect is
        // answered ok, with no result (a void call, Part B §2.3).
        let ready = node
            .call(
                "capability.ready",
                json!({
                    "capabilities": [{"id": "tyrum.desktop.screenshot", "version": "1.0.0"}],
                    "capability_states": [{"capability": "tyrum.desktop.screenshot",
                        "actions": [{"name": "screenshot", "enabled": true,
                            "availability_status": "available"}]}]
                }),
            )
            .await;
        assert_eq!(ready["ok"], true, "{ready}");
        assert!(ready.get("result").is_none(), "{ready}");
        assert_eq!(node.call("capability.ready", json!({})).await["ok"], true);
        let malformed = node
            .call("capability.ready", json!({"capabilities": "tyrum.fs.read"}))
            .await;
        assert_eq!(malformed["error"]["code"], "invalid_request", "{malformed}");
        // From an operator it is no request muster takes.
        assert_eq!(
            ws.call("capability.ready", json!({})).await["error"]["code"],
            "unsupported_request"
        );

        for kind in [
            "conversation.list",
            "workflow.start",
            "no.such.type",
            "connect.init",
        ] {
            let reply = ws.call(kind, json!({})).await;
            assert_eq!(
                reply["error"],
                json!({"code": "unsupported_request", "message": "request not supported"}),
                "{kind}"
            );
        }
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn scoped_tokens_get_what_their_scopes_allow(store: Option<String>) {
        let host = Host::start(store).await;
        let (_, reader) = host.client_token(&["operator.read"]).await;
        let mut ws = open(&host.ws_url(), &reader, TokenVia::Subprotocol, None)
            .await
            .unwrap();
        ws.handshake(&DeviceKey::generate(), "client", json!({}))
            .await;
        assert_eq!(ws.call("ping", json!({})).await["ok"], true);
        let listed = ws.call("muster.presence.list", json!({})).await;
        assert_eq!(listed["ok"], true, "{listed}");
        let refused = ws.call("approval.resolve", json!({})).await;
        assert_eq!(
            refused["error"],
            json!({"code": "forbidden", "message": "insufficient scope"})
        );
        for kind in ["task.execute", "connect.init", "no.such.type"] {
            let refused = ws.call(kind, json!({})).await;
            assert_eq!(
                refused["error"],
                json!({"code": "forbidden", "message": "request is not scope-authorized for scoped tokens"}),
                "{kind}"
            );
        }
        // Within its scope but not implemented yet.
        assert_eq!(
            ws.call("approval.list", json!({})).await["error"]["code"],
            "unsupported_request"
        );
        // `*` holds every scope; types outside the scope table stay refused.
        let (_, every) = host.client_token(&["*"]).await;
        let mut ws = open(&host.ws_url(), &every, TokenVia::Bearer, None)
            .await
            .unwrap();
        ws.handshake(&DeviceKey::generate(), "client", json!({}))
            .await;
        let resolved = ws.call("approval.resolve", json!({})).await;
        assert_eq!(resolved["error"]["code"], "unsupported_request", "{resolved}");
        let refused = ws.call("task.execute", json!({})).await;
        assert_eq!(
            refused["error"],
            json!({"code": "forbidden", "message": "request is not scope-authorized for scoped tokens"})
        );
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn a_revoked_token_closes_its_live_connections(store: Option<String>) {
        let host = Host::start(store).await;
        let (token_id, token) = host.client_token(&["operator.read"]).await;
        let mut ws = open(&host.ws_url(), &token, TokenVia::Bearer, None)
            .await
            .unwrap();
        ws.handshake(&DeviceKey::generate(), "client", json!({}))
            .await;
        let mut bystander = admin(&host).await;
        bystander
            .handshake(&DeviceKey::generate(), "client", json!({}))
            .await;
        // A connection of the token that is between connect.init and
        // connect.proof when the revocation arrives.
        let key = DeviceKey::generate();
        let mut pending = open(&host.ws_url(), &token, TokenVia::Bearer, None)
            .await
            .unwrap();
        let challenged = pending
            .init(&key, "client", json!({}), Value::Null)
            .await
            .unwrap();

        let mut identity = muster_proto::v1::identity_client::IdentityClient::new(host.channel(
            muster_tls::ServiceName::Identity,
            muster_tls::ServiceName::Ctl,
        ));
        let revoked_at = std::time::Instant::now();
        identity
            .revoke_token(muster_proto::v1::RevokeTokenRequest {
                token_id,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_closed(&mut ws, 4001, "token revoked").await;
        // At once, not at the next 5 s heartbeat.
        assert!(
            revoked_at.elapsed() < Duration::from_secs(4),
            "closed before the next heartbeat"
        );
        assert_eq!(bystander.call("ping", json!({})).await["ok"], true);
        // Its proof is good, but the token is gone.
        pending
            .send(json!({"request_id": "p", "type": "connect.proof",
                         "payload": challenged.proof(&key)}))
            .await;
        assert_closed(&mut pending, 4001, "token revoked").await;
        let mut again = open(&host.ws_url(), &token, TokenVia::Bearer, None)
            .await
            .unwrap();
        assert_closed(&mut again, 4001, "unauthorized").await;
        host.stop().await;
    }
}

async fn presence_flows_to_operators(host: &Host) {
    let mut operator = admin(host).await;
    operator
        .handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
        .await;

    let node_key = DeviceKey::generate();
    let mut node = admin(host).await;
    // Legacy capability ids arrive expanded and deduplicated (Part B §3).
    node.try_handshake_advertising(
        &node_key,
        "node",
        json!({"label": "lab-box", "version": "1.2.3", "mode": "node"}),
        json!([{"id": "tyrum.ios"}, {"id": "tyrum.browser.geolocation.get", "version": "2.0.0"},
               {"id": "tyrum.fs.read"}]),
    )
    .await
    .unwrap();
    let entry = &upserted_entry(&mut operator, &node_key.device_id()).await;
    assert_eq!(entry["role"], "node");
    assert_eq!(entry["host"], "lab-box");
    assert_eq!(entry["reason"], "connect");
    assert_eq!(entry["mode"], "node");
    assert_eq!(entry["ip"], "127.0.0.1");
    let metadata = entry["metadata"].as_object().unwrap();
    let mut keys: Vec<&str> = metadata.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "capabilities",
            "edge_id",
            "observed_ip",
            "raw_remote_ip",
            "resolved_client_ip"
        ]
    );
    assert_eq!(
        metadata["capabilities"],
        json!([
            "tyrum.location.get",
            "tyrum.camera.capture-photo",
            "tyrum.audio.record",
            "tyrum.fs.read"
        ])
    );
    for key in ["observed_ip", "raw_remote_ip", "resolved_client_ip"] {
        assert_eq!(metadata[key], "127.0.0.1", "{key}");
    }
    let parsed: muster_protocol::presence::PresenceEntry =
        serde_json::from_value(entry.clone()).unwrap();
    assert_eq!(parsed.instance_id, node_key.device_id());

    let beacon = node
        .call(
            "presence.beacon",
            json!({"host": "lab-box-2", "ip": "10.1.2.3", "last_input_seconds": 7}),
        )
        .await;
    assert_eq!(beacon["result"]["entry"]["reason"], "periodic", "{beacon}");
    assert_eq!(beacon["result"]["entry"]["ip"], "10.1.2.3");
    // The next upsert of the node's entry is the beacon's (other entries,
    // such as the edge's own, may be upserted meanwhile).
    let update = upserted_entry(&mut operator, &node_key.device_id()).await;
    assert_eq!(update["host"], "lab-box-2");
    assert_eq!(update["metadata"]["observed_ip"], "127.0.0.1");
    // A beacon's entry has the ip the client reported, or none: the
    // socket's address stays in metadata (Part B §9).
    let unreported = node.call("presence.beacon", json!({})).await;
    let entry = &unreported["result"]["entry"];
    assert!(entry.get("ip").is_none(), "{unreported}");
    assert_eq!(entry["metadata"]["observed_ip"], "127.0.0.1");
    let update = upserted_entry(&mut operator, &node_key.device_id()).await;
    assert!(update.get("ip").is_none(), "{update}");
    // A node cannot report under the keys with which the edge labels what
    // it observed: they are left out, and the observed address stays.
    let claimed = node
        .call(
            "presence.beacon",
            json!({"metadata": {"raw_remote_ip": "10.9.9.9", "resolved_client_ip": "10.9.9.9",
                                "edge_id": "edge-x", "observed_ip": "10.9.9.9", "rack": 7}}),
        )
        .await;
    let claimed = &claimed["result"]["entry"]["metadata"];
    assert_eq!(claimed, &json!({"observed_ip": "127.0.0.1", "rack": 7}));
    upserted_entry(&mut operator, &node_key.device_id()).await;
    for payload in [json!({"mode": "spaceship"}), json!([]), json!(null)] {
        let bad = node.call("presence.beacon", payload.clone()).await;
        assert_eq!(bad["error"]["code"], "invalid_request", "{payload}: {bad}");
    }
    // Presence's bounds are the edge's too, so a beacon past them never
    // shares a batch with other peers' changes.
    let long_host = node
        .call("presence.beacon", json!({"host": "h".repeat(300)}))
        .await;
    assert_eq!(
        long_host["error"],
        json!({"code": "invalid_request", "message": "host: longer than 256 bytes",
               "details": {"issues": [{"message": "host: longer than 256 bytes"}]}}),
        "{long_host}"
    );
    // Presence's own checks fail the same way, with their details.
    let secret = node
        .call("presence.beacon", json!({"metadata": {"password": "x"}}))
        .await;
    let refused = "metadata key \"password\" names a secret; secrets are not kept in presence";
    assert_eq!(
        secret["error"],
        json!({"code": "invalid_request", "message": refused,
               "details": {"issues": [{"message": refused}]}}),
        "{secret}"
    );
    // So are capabilities past what an entry lists: 256 descriptors of
    // long ids would take the entry past what presence keeps.
    let many_key = DeviceKey::generate();
    let mut many = admin(host).await;
    let advertised: Vec<Value> = (0..256)
        .map(|n| json!({"id": format!("tyrum.{}.n{n}", "long-capability-name".repeat(3))}))
        .collect();
    many.try_handshake_advertising(
        &many_key,
        "node",
        json!({"mode": "node"}),
        json!(advertised),
    )
    .await
    .unwrap();
    let listed = upserted_entry(&mut operator, &many_key.device_id()).await;
    let listed = &listed["metadata"];
    let kept = listed["capabilities"].as_array().unwrap().len();
    assert!((64..256).contains(&kept), "{kept}");
    assert_eq!(listed["capabilities_omitted"], 256 - kept);
    assert_eq!(listed["capabilities"][0], advertised[0]["id"]);
    // A device label longer than presence keeps is cut, not a reason to
    // leave the device out of presence.
    let long_key = DeviceKey::generate();
    let mut long = admin(host).await;
    long.handshake(&long_key, "node", json!({"label": "l".repeat(300)}))
        .await;
    let entry = upserted_entry(&mut operator, &long_key.device_id()).await;
    assert_eq!(entry["host"], "l".repeat(256));

    // Nodes never receive presence events: a second node's arrival reaches
    // the operator, and an item directed at the first node, committed
    // after it, reaches that node with no presence event before it (a
    // peer's items arrive in commit order).
    let second_key = DeviceKey::generate();
    let mut second = admin(host).await;
    second.handshake(&second_key, "node", json!({})).await;
    upserted_entry(&mut operator, &second_key.device_id()).await;
    let store = host.store().await;
    let mut sentinel = muster_store::outbox::NewItem::event(
        &host.config.default_tenant,
        "muster.test.sentinel",
        json!({}),
    );
    sentinel.target = Some(muster_store::outbox::Target::Device(node_key.device_id()));
    let mut tx = store.begin().await.unwrap();
    muster_store::outbox::append(&mut tx, &sentinel)
        .await
        .unwrap();
    store.commit(tx).await.unwrap();
    store.close().await;
    loop {
        match node.next(Duration::from_secs(10)).await {
            Next::Json(frame) if frame["type"] == "muster.test.sentinel" => break,
            Next::Json(frame) => assert_ne!(frame["type"], "presence.upserted", "{frame}"),
            other => panic!("the directed item never came: {other:?}"),
        }
    }

    let listed = operator.call("muster.presence.list", json!({})).await;
    let entries = listed["result"]["entries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["instance_id"] == node_key.device_id())
    );
    assert!(entries.iter().any(|e| e["role"] == "client"));
}

muster_e2e::on_both_stores! {
    async fn presence_flows_to_operators_on_each_store(store: Option<String>) {
        let host = Host::start(store).await;
        presence_flows_to_operators(&host).await;
        host.stop().await;
    }
}

/// The next `kind` event, waiting longer than one prune or refresh period
/// (5 s each) takes even on a loaded machine.
async fn event_within(ws: &mut Ws, kind: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match ws.next(left).await {
            Next::Json(frame) if frame["type"] == kind && frame.get("event_id").is_some() => {
                return frame;
            }
            Next::Json(_) => {}
            other => panic!("no {kind} within 30 s: {other:?}"),
        }
    }
}

// With a cap of two entries, three nodes connecting one after another:
// the prune (every 5 s) removes what is over the cap, each with
// `presence.pruned`. Which nodes go is the store's order (oldest
// `last_seen_at` first, covered by the presence store's tests); here the
// edge's periodic touch may give every live entry the same time.
muster_e2e::on_both_stores! {
    async fn the_cap_prunes_entries_beyond_it(store: Option<String>) {
        let host = Host::start_configured(store, |config| config.presence_cap = 2).await;
        // Left out of presence itself (`cli`), so that it counts nothing.
        let mut operator = admin(&host).await;
        operator
            .handshake(&DeviceKey::generate(), "client", json!({"mode": "cli"}))
            .await;
        let mut nodes = Vec::new();
        let mut connected = Vec::new();
        for _ in 0..3 {
            let key = DeviceKey::generate();
            let mut node = admin(&host).await;
            node.handshake(&key, "node", json!({"mode": "node"})).await;
            nodes.push(node);
            connected.push(key.device_id());
        }
        // Four entries (the edge's own gateway entry and three nodes) over a
        // cap of two: two go.
        let mut pruned = Vec::new();
        while pruned.len() < 2 {
            let event = event_within(&mut operator, "presence.pruned").await;
            pruned.push(event["payload"]["instance_id"].as_str().unwrap().to_owned());
        }
        let listed = operator.call("muster.presence.list", json!({})).await;
        let entries: Vec<String> = listed["result"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["instance_id"].as_str().unwrap().to_owned())
            .collect();
        let nodes_left = connected.iter().filter(|id| entries.contains(id)).count();
        let nodes_pruned = connected.iter().filter(|id| pruned.contains(id)).count();
        assert_eq!(nodes_left + nodes_pruned, 3, "{pruned:?} {entries:?}");
        // Pruned nodes are not announced again while the tenant is at the
        // cap (only the edge's own entry is), so at most two nodes stay.
        assert!(nodes_left <= 2, "{pruned:?} {entries:?}");
        assert!(
            pruned
                .iter()
                .filter(|id| connected.contains(id))
                .all(|id| !entries.contains(id)),
            "{pruned:?} {entries:?}"
        );
        host.stop().await;
    }
}

// A CLI connection is left out of presence, but one that sends a beacon
// asked to be in it: its entry is then kept like any peer's, and removed
// (with `presence.pruned`) when it leaves, not left for the TTL.
muster_e2e::on_both_stores! {
    async fn a_cli_that_beacons_is_in_presence_until_it_leaves(store: Option<String>) {
        let host = Host::start(store).await;
        let mut operator = admin(&host).await;
        operator
            .handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
            .await;
        let cli_key = DeviceKey::generate();
        let cli_device = cli_key.device_id();
        let mut cli = admin(&host).await;
        cli.handshake(&cli_key, "client", json!({"mode": "cli"})).await;
        let listed = operator.call("muster.presence.list", json!({})).await;
        let listed = listed["result"]["entries"].as_array().unwrap().clone();
        assert!(listed.iter().all(|e| e["instance_id"] != cli_device.as_str()), "{listed:?}");
        let beacon = cli.call("presence.beacon", json!({"host": "laptop"})).await;
        assert_eq!(beacon["ok"], true, "{beacon}");
        assert_eq!(upserted_entry(&mut operator, &cli_device).await["host"], "laptop");
        cli.stream.close(None).await.unwrap();
        pruned_within(&mut operator, &cli_device, "the CLI's entry was not removed when it left").await;
        // A device's entry goes when its last connection in presence
        // leaves, whatever CLI of it (not in presence) stays.
        let key = DeviceKey::generate();
        let mut ui = admin(&host).await;
        ui.handshake(&key, "client", json!({"mode": "ui"})).await;
        upserted_entry(&mut operator, &key.device_id()).await;
        let mut quiet_cli = admin(&host).await;
        quiet_cli.handshake(&key, "client", json!({"mode": "cli"})).await;
        ui.stream.close(None).await.unwrap();
        pruned_within(&mut operator, &key.device_id(), "a CLI of the device held its entry").await;
        assert_eq!(quiet_cli.call("ping", json!({})).await["ok"], true);
        host.stop().await;
    }
}

/// Waits up to 10 s for `presence.pruned` naming `device_id`.
async fn pruned_within(operator: &mut Ws, device_id: &str, otherwise: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match operator.next(left).await {
            Next::Json(f)
                if f["type"] == "presence.pruned" && f["payload"]["instance_id"] == device_id =>
            {
                return;
            }
            Next::Json(_) => {}
            other => panic!("{otherwise}: {other:?}"),
        }
    }
}

/// An operator (left out of presence), a node connected with `device`
/// fields, and the host's store.
async fn operator_and_node(host: &Host, device: Value) -> (Ws, DeviceKey, Ws, muster_store::Store) {
    let mut operator = admin(host).await;
    operator
        .handshake(&DeviceKey::generate(), "client", json!({"mode": "cli"}))
        .await;
    let node_key = DeviceKey::generate();
    let mut node = admin(host).await;
    node.handshake(&node_key, "node", device).await;
    let store = host.store().await;
    (operator, node_key, node, store)
}

// An entry no edge refreshes any more (its edge died, or it vanished in
// an outage) goes once it is older than the TTL, with `presence.pruned`
// to operators; the entries of connected peers, refreshed by their edge,
// stay.
muster_e2e::on_both_stores! {
    async fn entries_nobody_refreshes_go_after_the_ttl(store: Option<String>) {
        let started = std::time::Instant::now();
        let host = Host::start(store).await;
        let (mut operator, node_key, node, store) =
            operator_and_node(&host, json!({"mode": "node"})).await;
        // The node answers the edge's pings for as long as the test runs
        // (it reads), or the edge would drop it after 10 s.
        let reading = muster_e2e::keep_answering(node);
        // As a dead edge's peer leaves it: last seen longer ago than the TTL
        // (60 s), and no edge holds it to refresh it.
        let stale = DeviceKey::generate().device_id();
        let long_ago = muster_store::now_ms() - 61_000;
        sqlx::query(
            "INSERT INTO instance_presence (tenant_id, instance_id, role, reported_host, \
             reported_ip, observed_ip, version, mode, last_seen_at_ms, last_input_seconds, \
             reason, metadata) VALUES ($1, $2, 'node', '', '', '', '1.0.0', 'node', $3, -1, \
             'connect', '{}')",
        )
        .bind(&host.config.default_tenant)
        .bind(&stale)
        .bind(long_ago)
        .execute(store.writer())
        .await
        .unwrap();
        // Not at once: a presence that just took its lease (at its first
        // round, 5 s after its start) waits 15 s for live edges to refresh
        // their entries before it judges any by the TTL.
        let deadline = (std::time::Instant::now() + Duration::from_secs(6))
            .min(started + Duration::from_secs(19));
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match operator.next(left).await {
                Next::Json(frame) => assert_ne!(frame["type"], "presence.pruned", "{frame}"),
                Next::Silent => break,
                other => panic!("{other:?}"),
            }
        }
        // Then the next prune (every 5 s) takes it, and only it.
        let pruned = event_within(&mut operator, "presence.pruned").await;
        assert_eq!(pruned["payload"]["instance_id"], stale.as_str(), "{pruned}");
        let listed = operator.call("muster.presence.list", json!({})).await;
        let ids: Vec<&str> = listed["result"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["instance_id"].as_str().unwrap())
            .collect();
        assert!(!ids.contains(&stale.as_str()), "{ids:?}");
        assert!(ids.contains(&node_key.device_id().as_str()), "{ids:?}");
        reading.abort();
        store.close().await;
        host.stop().await;
    }
}

// The edge's own gateway entry and a connected node's entry, removed
// behind the edge's back (as the TTL after an outage would), are
// announced again at the edge's next refresh, the node's as it reported
// itself.
muster_e2e::on_both_stores! {
    async fn lost_presence_entries_return(store: Option<String>) {
        let host = Host::start(store).await;
        let (mut operator, node_key, node, store) =
            operator_and_node(&host, json!({"mode": "node", "label": "lab-7"})).await;
        let node_id = node_key.device_id();
        // The node's second connection: one entry, the device's.
        let mut twin = admin(&host).await;
        twin.handshake(&node_key, "node", json!({"mode": "node", "label": "lab-7"})).await;
        // Both stay connected, answering the edge's pings, to the end.
        let (node, twin) = (muster_e2e::keep_answering(node), muster_e2e::keep_answering(twin));
        for _ in 0..2 {
            upserted_entry(&mut operator, &node_id).await;
        }
        // Announced at start and at connect.
        let gateway = loop {
            let listed = operator.call("muster.presence.list", json!({})).await;
            let entries = listed["result"]["entries"].as_array().unwrap().clone();
            let gateway = entries
                .iter()
                .find(|e| e["role"] == "gateway")
                .map(|e| e["instance_id"].as_str().unwrap().to_owned());
            let node_listed = entries.iter().any(|e| e["instance_id"] == node_id.as_str());
            if let (Some(gateway), true) = (gateway, node_listed) {
                break gateway;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let removed = sqlx::query("DELETE FROM instance_presence WHERE instance_id IN ($1, $2)")
            .bind(&gateway)
            .bind(&node_id)
            .execute(store.writer())
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(removed, 2);
        let (mut gateway_back, mut node_back) = (false, false);
        while !(gateway_back && node_back) {
            let event = event_within(&mut operator, "presence.upserted").await;
            let entry = &event["payload"]["entry"];
            if entry["instance_id"] == gateway.as_str() {
                // The edge's own entry, as it announces itself.
                assert_eq!(entry["role"], "gateway");
                assert_eq!(entry["reason"], "self");
                assert_eq!(entry["mode"], "backend");
                assert_eq!(entry["metadata"]["edge_id"], gateway.trim_start_matches("edge-"));
                assert!(entry["metadata"]["ws_url"].as_str().unwrap().starts_with("ws://"));
                gateway_back = true;
            }
            if entry["instance_id"] == node_id.as_str() {
                assert!(!node_back, "the device's entry is announced again once, not per connection");
                assert_eq!(entry["role"], "node");
                assert_eq!(entry["host"], "lab-7");
                node_back = true;
            }
        }
        // Nor once more just after.
        loop {
            match operator.next(Duration::from_millis(1500)).await {
                Next::Json(frame) if frame["type"] == "presence.upserted" => {
                    assert_ne!(frame["payload"]["entry"]["instance_id"], node_id.as_str(), "announced twice");
                }
                Next::Json(_) => {}
                _ => break,
            }
        }
        node.abort();
        twin.abort();
        store.close().await;
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn http_presence_and_status_are_for_operators_only(store: Option<String>) {
        let host = Host::start(store).await;
        let mut node = admin(&host).await;
        node.handshake(&DeviceKey::generate(), "node", json!({}))
            .await;
        // Another tenant's peer: not counted in this tenant's status.
        let (_, elsewhere) = host.client_token_in("tenant-b", &["operator.read"]).await;
        let mut other = open(&host.ws_url(), &elsewhere, TokenVia::Bearer, None).await.unwrap();
        other.handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"})).await;
        let base = host.http_base();
        let (_, reader) = host.client_token(&["operator.read"]).await;
        let (_, writer) = host.client_token(&["operator.write"]).await;
        let get =
            |path: &str, token: Option<&str>| muster_e2e::http_get(&format!("{base}{path}"), token);
        assert!(get("/presence", None).starts_with("HTTP/1.1 401"));
        assert!(get("/presence", Some("muster_nope")).starts_with("HTTP/1.1 401"));
        assert!(get("/presence", Some(&writer)).starts_with("HTTP/1.1 403"));
        let listed = get("/presence", Some(&reader));
        assert!(listed.starts_with("HTTP/1.1 200"), "{listed}");
        assert!(listed.contains("\"role\":\"node\""), "{listed}");
        let status = get("/status", Some(&host.admin_token()));
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(status.contains("\"connections\":1"), "{status}");
        assert!(!status.contains(&host.admin_token()));
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn a_peer_that_closes_gets_the_closing_handshake_answered(store: Option<String>) {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

        let host = Host::start(store).await;
        let mut ws = admin(&host).await;
        ws.handshake(&DeviceKey::generate(), "client", json!({}))
            .await;
        let frame = CloseFrame { code: CloseCode::Normal, reason: "client disconnect".into() };
        ws.stream.send(Message::Close(Some(frame))).await.unwrap();
        // Events sent before the edge read the close may come first.
        let answer = loop {
            let next = tokio::time::timeout(Duration::from_secs(5), ws.stream.next())
                .await
                .expect("the edge answers");
            if !matches!(next, Some(Ok(Message::Text(_)))) {
                break next;
            }
        };
        assert!(
            matches!(&answer, Some(Ok(Message::Close(Some(frame)))) if frame.code == CloseCode::Normal),
            "{answer:?}"
        );
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn shutdown_closes_peers_with_1001_and_idle_http_connections(store: Option<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = Host::start(store).await;
        let mut ws = admin(&host).await;
        ws.handshake(&DeviceKey::generate(), "client", json!({}))
            .await;
        // Peers still in their handshake: one that has sent nothing, one
        // waiting to send its proof.
        let mut silent = admin(&host).await;
        let mut proving = admin(&host).await;
        let key = DeviceKey::generate();
        let initialized = proving.call("connect.init", init(&key, "client")["payload"].clone()).await;
        assert_eq!(initialized["ok"], true);
        // A kept-alive HTTP connection, idle after its answer.
        let address = host.http_base().trim_start_matches("http://").to_owned();
        let mut http = tokio::net::TcpStream::connect(&address).await.unwrap();
        http.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut answer = [0u8; 512];
        let n = http.read(&mut answer).await.unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"));

        let stopping = tokio::spawn(host.stop());
        assert_closed(&mut ws, 1001, "server shutdown").await;
        assert_closed(&mut silent, 1001, "server shutdown").await;
        assert_closed(&mut proving, 1001, "server shutdown").await;
        tokio::time::timeout(Duration::from_secs(5), stopping).await.expect("the edge stops").unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), http.read(&mut answer))
            .await
            .expect("the idle connection is closed");
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    }
}

muster_e2e::on_both_stores! {
    async fn a_peer_that_never_answers_pings_is_dropped_without_a_close_frame(store: Option<String>) {
        let host = Host::start(store).await;
        let mut ws = admin(&host).await;
        let key = DeviceKey::generate();
        ws.handshake(&key, "client", json!({}))
            .await;
        // Not reading means not answering the server's pings. Its presence
        // entry goes when the edge drops it (after about 15 s); reading
        // before that would answer the pings.
        let store = host.store().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut seen = false;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let present: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM instance_presence WHERE instance_id = $1")
                .bind(key.device_id())
                .fetch_one(store.pool())
                .await
                .unwrap();
            if seen && present == 0 {
                break;
            }
            seen |= present > 0;
            assert!(tokio::time::Instant::now() < deadline, "the silent peer was never dropped");
        }
        store.close().await;
        loop {
            match ws.next(Duration::from_secs(5)).await {
                Next::Json(_) => continue,
                Next::Dropped => break,
                other => panic!("expected the socket to be dropped, got {other:?}"),
            }
        }
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn a_peer_that_does_not_read_is_cut_off_with_1013(store: Option<String>) {
        let host = Host::start(store).await;
        let mut operator = admin(&host).await;
        operator
            .handshake(&DeviceKey::generate(), "client", json!({}))
            .await;
        // Nodes beacon large entries; every one is a presence.upserted frame
        // queued for the operator, who does not read.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut nodes = Vec::new();
        for _ in 0..4 {
            let mut node = admin(&host).await;
            node.handshake(&DeviceKey::generate(), "node", json!({}))
                .await;
            let stop = stop.clone();
            nodes.push(tokio::spawn(async move {
                let blob = "x".repeat(7_000);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = node
                        .try_call(
                            "presence.beacon",
                            json!({"metadata": {"blob": blob}}),
                            Duration::from_secs(5),
                        )
                        .await;
                }
            }));
        }
        // Flood until the edge gives up on the operator (the kernel's socket
        // buffers absorb a varying amount first).
        let started = std::time::Instant::now();
        while !muster_telemetry::metrics()
            .render()
            .lines()
            .any(|l| l.starts_with("muster_edge_slow_consumers_total") && !l.ends_with(" 0"))
        {
            assert!(started.elapsed() < Duration::from_secs(60), "never cut off");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let closed = loop {
            match operator.next(Duration::from_secs(10)).await {
                Next::Json(_) => continue,
                other => break other,
            }
        };
        assert_eq!(closed, Next::Closed(1013, "slow consumer".into()));
        for node in nodes {
            node.await.unwrap();
        }
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn a_peer_whose_socket_takes_nothing_more_is_dropped_as_one_without_pongs(store: Option<String>) {
        let host = Host::start(store).await;
        let mut observer = admin(&host).await;
        observer.handshake(&DeviceKey::generate(), "client", json!({})).await;
        // An operator whose receive buffer is a few KiB and who reads
        // nothing: the edge's writes to it block long before its queue
        // reaches the slow-consumer limit.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let address = host.ws_url().trim_start_matches("ws://").trim_end_matches("/ws").parse().unwrap();
        let tcp = socket.connect(address).await.unwrap();
        let mut stuck = muster_e2e::ws::open_over(tcp, &host.ws_url(), &host.admin_token(), TokenVia::Bearer)
            .await
            .unwrap();
        let stuck_key = DeviceKey::generate();
        // In presence, so that its leaving shows at the observer.
        stuck.handshake(&stuck_key, "client", json!({"mode": "ui"})).await;
        // About 4 MiB of presence.upserted for it: more than loopback's
        // socket buffers take, less than the 5 MiB of the 1013 limit.
        let mut node = admin(&host).await;
        node.handshake(&DeviceKey::generate(), "node", json!({})).await;
        let blob = "x".repeat(7_000);
        for _ in 0..560 {
            node.call("presence.beacon", json!({"metadata": {"blob": blob}})).await;
        }
        // Ten seconds of a blocked write, as of a missing pong, and the
        // peer is gone; the observer sees it leave.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match observer.next(left).await {
                Next::Json(f)
                    if f["type"] == "presence.pruned" && f["payload"]["instance_id"] == stuck_key.device_id() =>
                {
                    break;
                }
                Next::Json(_) => {}
                other => panic!("the stuck peer never left: {other:?}"),
            }
        }
        let render = muster_telemetry::metrics().render();
        assert!(
            !render.lines().any(|l| l.starts_with("muster_edge_slow_consumers_total") && !l.ends_with(" 0")),
            "dropped for not reading, not as a slow consumer"
        );
        drop(stuck);
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn refused_frames_close_1009_or_1007_in_every_phase(store: Option<String>) {
        use futures::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

        // An operator's lower limit, so that refusals need no 100 MiB
        // frames.
        let host = Host::start_configured(store, |config| config.edge_max_frame_bytes = 1024 * 1024).await;
        let too_big = 1024 * 1024 + 1;
        let not_utf8 = [b'{', 0xff, 0xfe, b'}'];
        // While the token is being resolved. A frame's header is enough to
        // refuse it: the edge reads no further.
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(too_big as u64).to_be_bytes());
        header.extend_from_slice(&[0x5a, 0x17, 0xc3, 0x08]);
        let (_, token) = host.client_token(&["operator.read"]).await;
        assert_eq!(pipelined(&host, &token, &[header]).await, (1009, String::new()));
        let (_, token) = host.client_token(&["operator.read"]).await;
        let closed = pipelined(&host, &token, &[client_frame(&not_utf8)]).await;
        assert_eq!(closed, (1007, String::new()));
        // During the handshake and after it.
        for handshaken in [false, true] {
            let mut ws = admin(&host).await;
            if handshaken {
                ws.handshake(&DeviceKey::generate(), "client", json!({})).await;
            }
            ws.send_text(&" ".repeat(too_big)).await;
            assert_closed(&mut ws, 1009, "").await;
            let mut ws = admin(&host).await;
            if handshaken {
                ws.handshake(&DeviceKey::generate(), "client", json!({})).await;
            }
            let frame = Frame::message(not_utf8.to_vec(), OpCode::Data(Data::Text), true);
            ws.stream.send(Message::Frame(frame)).await.unwrap();
            assert_closed(&mut ws, 1007, "").await;
        }
        // A frame at the limit is read (and answered as the JSON it is not).
        let mut ws = admin(&host).await;
        ws.handshake(&DeviceKey::generate(), "client", json!({})).await;
        ws.send_text(&" ".repeat(too_big - 1)).await;
        let error = ws.event("error").await;
        assert_eq!(error["payload"]["code"], "invalid_json", "{error}");
        let (mut config, dir) = host.stop().await;

        // By default the limit is Part B's 100 MiB: a larger frame (a
        // screenshot in a node's result, say) is read, one above it is
        // refused from its header.
        config.edge_max_frame_bytes = muster::DEFAULT_MAX_FRAME_BYTES;
        let host = Host::start_with(config, dir).await;
        let (_, token) = host.client_token(&["operator.read"]).await;
        let mut ws = open(&host.ws_url(), &token, TokenVia::Bearer, None)
            .await
            .unwrap();
        ws.handshake(&DeviceKey::generate(), "client", json!({})).await;
        ws.send_text(&" ".repeat(4 * too_big)).await;
        let error = ws.event("error").await;
        assert_eq!(error["payload"]["code"], "invalid_json", "{error}");
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(100 * 1024 * 1024 + 1_u64).to_be_bytes());
        header.extend_from_slice(&[0x5a, 0x17, 0xc3, 0x08]);
        let (_, token) = host.client_token(&["operator.read"]).await;
        assert_eq!(pipelined(&host, &token, &[header]).await, (1009, String::new()));
        host.stop().await;
    }
}

/// A client frame (masked, as clients must) carrying `text`.
fn client_frame(text: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x81];
    match text.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x5a, 0x17, 0xc3, 0x08];
    frame.extend_from_slice(&mask);
    frame.extend(text.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Sends the upgrade request and `frames` in one write, so that the frames
/// are there before the token is resolved; returns how the edge closes.
async fn pipelined(host: &Host, token: &str, frames: &[Vec<u8>]) -> (u16, String) {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    let url = host.ws_url();
    let address = url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut bytes = format!(
        "GET /ws HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: tyrum-v1\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes();
    for frame in frames {
        bytes.extend_from_slice(frame);
    }
    tcp.write_all(&bytes).await.unwrap();
    // The response head, byte by byte: what follows it is WebSocket.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    let within = Duration::from_secs(10);
    loop {
        match tokio::time::timeout(within, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(close))))) => {
                return (close.code.into(), close.reason.to_string());
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

muster_e2e::on_both_stores! {
    async fn frames_beyond_the_early_queue_close_4003_handshake_overflow(store: Option<String>) {
        let host = Host::start(store).await;
        let ping = json!({"request_id": "r", "type": "ping", "payload": {}}).to_string();
        // A token minted for each case is not in the edge's cache of verified
        // tokens, so resolving it takes a call to identity, and every frame
        // written with the upgrade arrives while it is in flight.
        let cases = [
            (vec![client_frame(ping.as_bytes()); 9], "nine frames"),
            (vec![client_frame(&vec![b' '; 65 * 1024])], "65 KiB"),
        ];
        for (frames, case) in cases {
            let (_, token) = host.client_token(&["operator.read"]).await;
            let closed = pipelined(&host, &token, &frames).await;
            assert_eq!(closed, (4003, "handshake overflow".to_owned()), "{case}");
        }
        // Within the limits the queued frames are replayed once the token is
        // resolved: eight of them get the answer a frame before connect.init
        // gets.
        let (_, token) = host.client_token(&["operator.read"]).await;
        let closed = pipelined(&host, &token, &vec![client_frame(ping.as_bytes()); 8]).await;
        assert_eq!(
            closed,
            (4003, "expected connect.init/connect.proof".to_owned())
        );
        host.stop().await;
    }
}

/// A store that has stalled: writes to one table (on SQLite, every write)
/// wait until it is released or dropped.
enum Stall {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Stall {
    /// Ends the stall at once (dropping it ends it when the connection's
    /// close is processed).
    async fn release(self) {
        match self {
            Stall::Sqlite(mut c) => sqlx::query("ROLLBACK").execute(&mut c).await.map(drop),
            Stall::Postgres(mut c) => sqlx::query("ROLLBACK").execute(&mut c).await.map(drop),
        }
        .unwrap();
    }
}

/// Stalls writes to `table` once `peer` has arrived. A `ping` is answered
/// only after the arrival (the presence entry included) is done, so the
/// stall holds up what follows, not the arrival.
async fn stall_after_arrival(host: &Host, peer: &mut Ws, table: &str) -> Stall {
    assert_eq!(peer.call("ping", json!({})).await["ok"], true);
    stall_writes(&host.config.store_url(), table).await
}

async fn stall_writes(store_url: &str, table: &str) -> Stall {
    use sqlx::Connection;
    if store_url.starts_with("sqlite:") {
        let mut connection = sqlx::SqliteConnection::connect(store_url).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut connection)
            .await
            .unwrap();
        Stall::Sqlite(connection)
    } else {
        let mut connection = sqlx::PgConnection::connect(store_url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut connection).await.unwrap();
        sqlx::query(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))
            .execute(&mut connection)
            .await
            .unwrap();
        Stall::Postgres(connection)
    }
}

// A request in flight when the edge stops is answered before the 1001
// (Part B: the close, then termination after 250 ms), also when the
// answer is produced after the shutdown began.
muster_e2e::on_both_stores! {
    async fn a_request_in_flight_at_shutdown_is_answered_before_the_1001(store: Option<String>) {
        let host = Host::start(store).await;
        let mut node = admin(&host).await;
        node.handshake(&DeviceKey::generate(), "node", json!({}))
            .await;
        let stalled = stall_after_arrival(&host, &mut node, "instance_presence").await;
        node.send(json!({"request_id": "b1", "type": "presence.beacon", "payload": {}}))
            .await;
        // The beacon reaches the stalled store, the edge begins to stop,
        // and only then can the beacon finish: within the edge's 250 ms
        // for requests in flight (this test runs alone, see
        // .config/nextest.toml). Not much later: SQLite's busy handler,
        // where the beacon's write waits, sleeps longer the longer it
        // waits (up to 100 ms between tries).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopping = tokio::spawn(host.stop());
        tokio::task::yield_now().await;
        stalled.release().await;
        let mut seen = Vec::new();
        loop {
            match node.next(Duration::from_secs(10)).await {
                Next::Json(frame) if frame["request_id"] == "b1" => {
                    assert_eq!(frame["ok"], true, "{frame}");
                    seen.push("answer".to_owned());
                }
                Next::Json(_) => {}
                Next::Closed(code, reason) => {
                    seen.push(format!("{code} {reason}"));
                    break;
                }
                other => panic!("{other:?} after {seen:?}"),
            }
        }
        assert_eq!(seen, ["answer", "1001 server shutdown"]);
        tokio::time::timeout(Duration::from_secs(10), stopping).await.unwrap().unwrap();
    }
}

// A service that does not answer fails the request at the edge's call
// deadline (10 s) with `internal_error`, where the request used to wait for
// as long as the service did; the peer stays connected.
muster_e2e::on_both_stores! {
    async fn a_request_to_a_hung_service_fails_at_the_call_deadline(store: Option<String>) {
        let host = Host::start(store).await;
        let mut operator = admin(&host).await;
        operator
            .handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
            .await;
        // Tracking a topic writes its session.
        let stalled = stall_after_arrival(&host, &mut operator, "topic_sessions").await;
        let asked = std::time::Instant::now();
        operator
            .send(json!({"request_id": "t1", "type": "muster.topic.track",
                         "payload": {"topic": "room-1", "principal": "alice", "kind": "human"}}))
            .await;
        let answer = loop {
            match operator.next(Duration::from_secs(20)).await {
                Next::Json(frame) if frame["request_id"] == "t1" => break frame,
                Next::Json(_) => {}
                other => panic!("{other:?}"),
            }
        };
        let took = asked.elapsed();
        assert_eq!(answer["ok"], false, "{answer}");
        assert_eq!(answer["error"]["code"], "internal_error", "{answer}");
        assert!(took >= Duration::from_secs(9), "{took:?}");
        drop(stalled);
        let pong = operator.call("ping", json!({})).await;
        assert_eq!(pong["ok"], true, "{pong}");
        host.stop().await;
    }
}

// The edge acknowledges its progress beside the backplane stream: an
// acknowledgement waiting on a stalled store does not stop deliveries
// (it used to hold the stream until the store answered). On Postgres,
// where the consumers' table alone can be stalled; on SQLite a stalled
// write stalls every write, the presence entries that make events too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_acknowledgement_does_not_stop_deliveries() {
    use sqlx::Connection;
    let host = Host::start(Some(muster_e2e::postgres_store().await)).await;
    let mut operator = admin(&host).await;
    operator
        .handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
        .await;
    let stalled = stall_writes(&host.config.store_url(), "outbox_consumers").await;
    // Delivered after the stall began, so that its acknowledgement (within
    // a second) waits on the lock.
    let first = DeviceKey::generate();
    let mut first_node = admin(&host).await;
    first_node.handshake(&first, "node", json!({})).await;
    upserted_entry(&mut operator, &first.device_id()).await;
    let mut watcher = sqlx::PgConnection::connect(&host.config.store_url())
        .await
        .unwrap();
    let waited_for = std::time::Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO outbox_consumers%'",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            waited_for.elapsed() < Duration::from_secs(10),
            "no acknowledgement came to wait on the stall"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let second = DeviceKey::generate();
    let mut second_node = admin(&host).await;
    second_node.handshake(&second, "node", json!({})).await;
    // Less than the 5 s a frame is waited for, so that a miss fails here.
    let delivered = tokio::time::timeout(
        Duration::from_secs(4),
        upserted_entry(&mut operator, &second.device_id()),
    )
    .await;
    stalled.release().await;
    assert!(
        delivered.is_ok(),
        "the second node's presence.upserted waited for the stalled acknowledgement"
    );
    host.stop().await;
}

// A request that waits on a stalled store (until the edge's 10 s deadline)
// does not stop the heartbeat: the peer keeps answering pings meanwhile and
// stays connected, also while its later frames wait unread, and its
// frames are still answered in the order sent.
muster_e2e::on_both_stores! {
    async fn a_slow_request_does_not_stop_the_heartbeat(store: Option<String>) {
        let host = Host::start(store).await;
        let mut node = admin(&host).await;
        node.handshake(&DeviceKey::generate(), "node", json!({}))
            .await;
        let stalled = stall_after_arrival(&host, &mut node, "instance_presence").await;
        // More than the edge reads ahead while one waits (64): reading
        // pauses, so the pongs wait unread in the socket too.
        let mut sent: Vec<String> = (0..70).map(|n| format!("b{n}")).collect();
        for id in &sent {
            node.send(json!({"request_id": id, "type": "presence.beacon", "payload": {}}))
                .await;
        }
        node.send(json!({"request_id": "p1", "type": "ping", "payload": {}}))
            .await;
        sent.push("p1".into());
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(12)).await;
            drop(stalled);
        });
        // Reading answers the edge's pings while the beacon waits.
        let mut answered = Vec::new();
        while answered.len() < sent.len() {
            match node.next(Duration::from_secs(20)).await {
                Next::Json(frame) if frame.get("request_id").is_some() => {
                    answered.push(frame["request_id"].as_str().unwrap().to_owned());
                }
                Next::Json(_) => {}
                other => panic!("the node lost its connection: {other:?}"),
            }
        }
        assert_eq!(answered, sent);
        release.await.unwrap();
        // Past the stall and another ping interval, still connected.
        assert_eq!(node.next(Duration::from_secs(6)).await, Next::Silent);
        node.call("ping", json!({})).await;
        host.stop().await;
    }
}

// Frames a peer sent before it closed are still handled: the last beacon
// of a node that leaves while an earlier one waits on a stalled store
// lands, and then the node leaves presence.
muster_e2e::on_both_stores! {
    async fn what_a_peer_sent_before_closing_still_happens(store: Option<String>) {
        let host = Host::start(store).await;
        let mut operator = admin(&host).await;
        operator
            .handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
            .await;
        let key = DeviceKey::generate();
        let mut node = admin(&host).await;
        node.handshake(&key, "node", json!({})).await;
        let stalled = stall_after_arrival(&host, &mut node, "instance_presence").await;
        node.send(json!({"request_id": "b1", "type": "presence.beacon", "payload": {"host": "first"}}))
            .await;
        node.send(json!({"request_id": "b2", "type": "presence.beacon", "payload": {"host": "last words"}}))
            .await;
        node.stream.close(None).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(stalled);
        let mut hosts = Vec::new();
        loop {
            let event = operator.next(Duration::from_secs(20)).await;
            let Next::Json(event) = event else { panic!("{event:?}") };
            let entry = &event["payload"]["entry"];
            match event["type"].as_str() {
                Some("presence.upserted") if entry["instance_id"] == key.device_id() => {
                    hosts.push(entry["host"].as_str().unwrap_or_default().to_owned());
                }
                Some("presence.pruned") if event["payload"]["instance_id"] == key.device_id() => break,
                _ => {}
            }
        }
        assert_eq!(hosts.last().map(String::as_str), Some("last words"), "{hosts:?}");
        host.stop().await;
    }
}

/// Reads until the server ends the connection; what it read meanwhile.
async fn read_to_end(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut read = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf))
            .await
            .expect("the edge ended the connection")
            .unwrap_or(0);
        if n == 0 {
            return read;
        }
        read.extend_from_slice(&buf[..n]);
    }
}

// A connection that sends nothing, or a request's head that never ends,
// is dropped at the 10 s deadline instead of holding a socket and a task
// for as long as the client likes; so is a kept-alive connection idle
// after its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_send_a_request_in_time_is_dropped() {
    use tokio::io::AsyncWriteExt;
    let host = Host::start(None).await;
    let address = host.http_base().trim_start_matches("http://").to_owned();
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(&address).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: muster\r\n")
        .await
        .unwrap();
    let mut kept = tokio::net::TcpStream::connect(&address).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: muster\r\n\r\n")
        .await
        .unwrap();
    // The first byte of HTTP/2's preface, which leaves HTTP/1 undecided;
    // and the whole preface, with a SETTINGS frame: the edge serves no
    // HTTP/2, so it ends that one at once.
    let mut undecided = tokio::net::TcpStream::connect(&address).await.unwrap();
    undecided.write_all(b"P").await.unwrap();
    let mut h2 = tokio::net::TcpStream::connect(&address).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let h2_ended = async {
        read_to_end(&mut h2).await;
        started.elapsed()
    };
    let (silent, partial, kept, undecided, h2_ended) = tokio::join!(
        read_to_end(&mut silent),
        read_to_end(&mut partial),
        read_to_end(&mut kept),
        read_to_end(&mut undecided),
        h2_ended
    );
    assert!(
        undecided.is_empty(),
        "{}",
        String::from_utf8_lossy(&undecided)
    );
    assert!(h2_ended < Duration::from_secs(5), "{h2_ended:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "dropped before the deadline: {:?}",
        started.elapsed()
    );
    assert!(silent.is_empty(), "{}", String::from_utf8_lossy(&silent));
    assert!(
        !String::from_utf8_lossy(&partial).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&partial)
    );
    assert!(
        String::from_utf8_lossy(&kept).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&kept)
    );
    host.stop().await;
}

// A node's report of its ready capabilities (Part B §6) reaches its
// tenant's operators as `capability.ready`, scoped to the node and cut to
// what the node advertised at connect; nodes get none.
muster_e2e::on_both_stores! {
    async fn a_nodes_ready_capabilities_reach_operators_scoped_to_the_node(store: Option<String>) {
        let host = Host::start(store).await;
        let mut operator = admin(&host).await;
        operator
            .handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
            .await;
        let mut other_node = admin(&host).await;
        other_node
            .handshake(&DeviceKey::generate(), "node", json!({"mode": "node"}))
            .await;
        let node_key = DeviceKey::generate();
        let mut node = admin(&host).await;
        node.try_handshake_advertising(
            &node_key,
            "node",
            json!({"mode": "node"}),
            json!([{"id": "tyrum.fs.read", "version": "1.2.0"}, {"id": "tyrum.desktop.screenshot"}]),
        )
        .await
        .unwrap();
        let ready = node
            .call(
                "capability.ready",
                json!({
                    "capabilities": [
                        {"id": "tyrum.fs.read", "version": "1.2.0"},
                        {"id": "tyrum.fs.write", "version": "1.0.0"}
                    ],
                    "capability_states": [
                        {"capability": "tyrum.fs.read", "actions": [
                            {"name": "read", "enabled": false, "availability_status": "unavailable",
                             "unavailable_reason": "no disk"}]},
                        {"capability": "tyrum.fs.write", "actions": []}
                    ]
                }),
            )
            .await;
        assert_eq!(ready["ok"], true, "{ready}");
        assert!(ready.get("result").is_none(), "{ready}");
        let event = event_within(&mut operator, "capability.ready").await;
        assert_eq!(
            event["scope"],
            json!({"kind": "node", "node_id": node_key.device_id()}),
            "{event}"
        );
        // Only what the node advertised at connect counts.
        assert_eq!(
            event["payload"],
            json!({
                "node_id": node_key.device_id(),
                "capabilities": [{"id": "tyrum.fs.read", "version": "1.2.0"}],
                "capability_states": [{"capability": "tyrum.fs.read", "actions": [
                    {"name": "read", "enabled": false, "availability_status": "unavailable",
                     "unavailable_reason": "no disk"}]}]
            }),
            "{event}"
        );
        // Nodes are not its audience.
        assert_eq!(other_node.call("ping", json!({})).await["ok"], true);
        loop {
            match other_node.next(Duration::from_millis(500)).await {
                Next::Json(frame) => assert_ne!(frame["type"], "capability.ready", "{frame}"),
                Next::Silent => break,
                other => panic!("{other:?}"),
            }
        }
        host.stop().await;
    }
}
