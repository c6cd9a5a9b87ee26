//! The edge over `wss://`: operators without a client certificate, client
//! certificates verified against the mesh CA, a device with its own
//! certificate admitted, and a certificate that is not the proved device's
//! own refused.

use std::sync::Arc;
use std::time::Duration;

use muster_e2e::ws::{Next, TokenVia, open_over};
use muster_e2e::{Host, config_in};
use muster_protocol::device::DeviceKey;
use muster_tls::{IssueOptions, ServiceName, TlsDir};
use serde_json::json;
use tokio::net::TcpStream;

const DAY: Duration = Duration::from_secs(86_400);

async fn tls_host(store: Option<String>) -> Host {
    tls_host_configured(store, |_| {}).await
}

async fn tls_host_configured(
    store: Option<String>,
    change: impl FnOnce(&mut muster::Config),
) -> Host {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path(), store);
    change(&mut config);
    let tls = config.tls();
    muster_tls::install_crypto_provider();
    let (ca, _) = tls.ensure_ca(DAY * 3650).unwrap();
    tls.ensure_issued(
        &ca,
        &config.trust_domain,
        ServiceName::Edge,
        &IssueOptions::valid_for(DAY * 30),
    )
    .unwrap();
    config.edge_tls_cert = Some(tls.files(ServiceName::Edge).cert);
    config.edge_tls_key = Some(tls.files(ServiceName::Edge).key);
    Host::start_with(config, dir).await
}

/// A TLS connection to the edge, presenting `client`'s certificate if
/// given, trusting `ca_dir`'s CA.
async fn connect(
    host: &Host,
    ca_dir: &TlsDir,
    client: Option<&TlsDir>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let auth = client.map(|dir| {
        let files = dir.files(ServiceName::Ctl);
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(&files.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
        (chain, key)
    });
    connect_as(host, ca_dir, auth).await
}

type ClientAuth = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// A TLS connection to the edge, presenting `auth` if given.
async fn connect_as(
    host: &Host,
    ca_dir: &TlsDir,
    auth: Option<ClientAuth>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tcp_from(host, "127.0.0.1", b"").await?;
    tls_over(ca_dir, auth, tcp).await
}

/// A TCP connection to the edge from the loopback address `source`, with
/// `first` written (a PROXY protocol header).
async fn tcp_from(host: &Host, source: &str, first: &[u8]) -> std::io::Result<TcpStream> {
    use tokio::io::AsyncWriteExt;
    let address = host
        .ws_url()
        .trim_start_matches("wss://")
        .trim_end_matches("/ws")
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    let mut tcp = socket.connect(address).await?;
    tcp.write_all(first).await?;
    Ok(tcp)
}

/// TLS over `tcp`, trusting `ca_dir`'s CA and presenting `auth` if given.
async fn tls_over(
    ca_dir: &TlsDir,
    auth: Option<ClientAuth>,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(ca_dir.ca_cert_path()).unwrap();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(muster_tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match auth {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

fn wss_url(host: &Host) -> String {
    let port = host.ws_url().rsplit(':').next().unwrap().to_owned();
    format!("wss://localhost:{port}")
}

use rustls::pki_types::pem::PemObject;

muster_e2e::on_both_stores! {
    async fn operators_connect_over_wss_and_foreign_or_unbound_certificates_are_refused(store: Option<String>) {
        let host = tls_host(store).await;
        assert!(
            host.ws_url().starts_with("wss://127.0.0.1:"),
            "{}",
            host.ws_url()
        );
        let ours = host.config.tls();

        // No client certificate: an operator with a token.
        let stream = connect(&host, &ours, None).await.unwrap();
        let mut ws = admin_over(&host, stream).await.unwrap();
        ws.handshake(&DeviceKey::generate(), "client", json!({}))
            .await;
        assert_eq!(ws.call("ping", json!({})).await["ok"], true);

        // A certificate from another CA never gets past TLS.
        let other = tempfile::tempdir().unwrap();
        let foreign = TlsDir::new(other.path());
        let (foreign_ca, _) = foreign.ensure_ca(DAY).unwrap();
        foreign
            .ensure_issued(
                &foreign_ca,
                "muster.local",
                ServiceName::Ctl,
                &IssueOptions::valid_for(DAY),
            )
            .unwrap();
        let refused = match connect(&host, &ours, Some(&foreign)).await {
            Err(_) => true,
            Ok(stream) => admin_over(&host, stream).await.is_err(),
        };
        assert!(refused, "a foreign client certificate was accepted");

        // A certificate from our CA that is not the proved device's: closed
        // with 4001 once the device has proved its key.
        let stream = connect(&host, &ours, Some(&ours)).await.unwrap();
        let mut ws = admin_over(&host, stream).await.unwrap();
        let refused = ws
            .try_handshake(&DeviceKey::generate(), "node", json!({}))
            .await
            .unwrap_err();
        assert!(
            refused.contains("Closed(4001, \"unauthorized\")"),
            "{refused}"
        );
        assert!(matches!(
            ws.next(Duration::from_secs(1)).await,
            Next::Dropped | Next::Silent | Next::Closed(..)
        ));

        // A connection that never starts its TLS handshake does not hold
        // up a stop (its deadline is 10 s).
        let address = host.ws_url().trim_start_matches("wss://").trim_end_matches("/ws").to_owned();
        let _silent = tokio::net::TcpStream::connect(&address).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Well before the silent connection's 10 s deadline.
        tokio::time::timeout(Duration::from_secs(8), host.stop())
            .await
            .expect("the edge stops without waiting for the silent connection");
    }
}

/// A device's certificate for its own Ed25519 key, issued by the mesh CA
/// for `tenant_id`, with that key as the TLS client key.
fn device_auth(host: &Host, key: &DeviceKey, tenant_id: &str) -> ClientAuth {
    device_auth_in(host, &host.config.trust_domain, key, tenant_id)
}

/// [`device_auth`] naming `trust_domain`.
fn device_auth_in(host: &Host, trust_domain: &str, key: &DeviceKey, tenant_id: &str) -> ClientAuth {
    use base64::Engine;
    let ca = host.config.tls().load_ca().unwrap();
    let spki = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(key.pubkey())
        .unwrap();
    let pem = ca
        .issue_device(
            trust_domain,
            tenant_id,
            &key.device_id(),
            &spki,
            &IssueOptions::valid_for(DAY),
        )
        .unwrap();
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    // PKCS#8 v1 of an Ed25519 seed (RFC 8410).
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&key.seed());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8.into());
    (chain, key)
}

type TlsWs = muster_e2e::ws::Ws<tokio_rustls::client::TlsStream<TcpStream>>;

/// The WebSocket upgrade over `stream` with the admin token.
async fn admin_over(
    host: &Host,
    stream: tokio_rustls::client::TlsStream<TcpStream>,
) -> Result<TlsWs, tokio_tungstenite::tungstenite::Error> {
    open_over(
        stream,
        &wss_url(host),
        &host.admin_token(),
        TokenVia::Bearer,
    )
    .await
}

/// A WebSocket over TLS with the admin token, presenting `auth`.
async fn admin_as(host: &Host, auth: ClientAuth) -> TlsWs {
    let stream = connect_as(host, &host.config.tls(), Some(auth))
        .await
        .unwrap();
    admin_over(host, stream).await.unwrap()
}

muster_e2e::on_both_stores! {
    async fn a_device_with_its_own_certificate_is_admitted_and_one_of_another_tenant_or_trust_domain_is_not(store: Option<String>) {
        let host = tls_host(store).await;
        let key = DeviceKey::generate();
        let tenant = host.config.default_tenant.clone();

        let mut ws = admin_as(&host, device_auth(&host, &key, &tenant)).await;
        let result = ws.handshake(&key, "node", json!({})).await;
        assert_eq!(result["device_id"], key.device_id());
        assert_eq!(ws.call("ping", json!({})).await["ok"], true);

        // The same key, certified for another tenant than the token's, or
        // by the same CA for the same device of another trust domain.
        let elsewhere = format!("staging.{}", host.config.trust_domain);
        for auth in [
            device_auth(&host, &key, "other-tenant"),
            device_auth_in(&host, &elsewhere, &key, &tenant),
        ] {
            let mut ws = admin_as(&host, auth).await;
            let refused = ws.try_handshake(&key, "node", json!({})).await.unwrap_err();
            assert!(
                refused.contains("Closed(4001, \"unauthorized\")"),
                "{refused}"
            );
        }
        host.stop().await;
    }
}

// With TLS on the edge, a trusted proxy's PROXY protocol header comes
// before the TLS handshake and names the client; a connection from it that
// sends nothing does not hold up a stop.
muster_e2e::on_both_stores! {
    async fn a_proxy_protocol_header_precedes_tls_and_names_the_client(store: Option<String>) {
        let host = tls_host_configured(store, |config| {
            config.edge_trusted_proxies = vec!["127.0.0.2".into()];
            config.edge_proxy_protocol = true;
        })
        .await;
        let ours = host.config.tls();
        let stream = connect(&host, &ours, None).await.unwrap();
        let mut operator = admin_over(&host, stream).await.unwrap();
        operator
            .handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
            .await;

        let header = b"PROXY TCP4 198.51.100.4 127.0.0.1 40000 443\r\n";
        let tcp = tcp_from(&host, "127.0.0.2", header).await.unwrap();
        let stream = tls_over(&ours, None, tcp).await.unwrap();
        let mut node = admin_over(&host, stream).await.unwrap();
        let key = DeviceKey::generate();
        node.handshake(&key, "node", json!({"mode": "node"})).await;
        let entry = loop {
            let mut event = operator.event("presence.upserted").await;
            if event["payload"]["entry"]["instance_id"] == key.device_id() {
                break event["payload"]["entry"].take();
            }
        };
        assert_eq!(entry["ip"], "198.51.100.4", "{entry}");
        assert_eq!(entry["metadata"]["raw_remote_ip"], "198.51.100.4");

        // TLS first, where the header belongs: no session.
        let tcp = tcp_from(&host, "127.0.0.2", b"").await.unwrap();
        assert!(tls_over(&ours, None, tcp).await.is_err());

        let _silent = tcp_from(&host, "127.0.0.2", b"").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Well before the header's 10 s deadline.
        tokio::time::timeout(Duration::from_secs(8), host.stop())
            .await
            .expect("the edge stops without waiting for the header");
    }
}

/// The certificate the edge presents to a new connection.
async fn served_certificate(host: &Host) -> Vec<u8> {
    let stream = connect(host, &host.config.tls(), None).await.unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

// A renewed listener certificate is served from the next connection on,
// without a restart, as the mesh's certificates are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_listener_certificate_is_served_without_a_restart() {
    let host = tls_host_configured(None, |config| config.cert_reload_secs = 1).await;
    let before = served_certificate(&host).await;
    let tls = host.config.tls();
    let ca = tls.load_ca().unwrap();
    tls.write_issued(
        ServiceName::Edge,
        &ca.issue(
            &host.config.trust_domain,
            ServiceName::Edge,
            &IssueOptions::valid_for(DAY * 30),
        )
        .unwrap(),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while served_certificate(&host).await == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    host.stop().await;
}
