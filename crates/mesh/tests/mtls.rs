//! Real mTLS between real tonic clients and a mesh server, with
//! certificates minted for the test by the project's CA.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use muster_mesh::{Rule, RunningServer, ServiceSpec, channel, channel_with};
use muster_proto::v1::edge_client::EdgeClient;
use muster_proto::v1::edge_server::{Edge, EdgeServer};
use muster_proto::v1::{DescribeEdgeRequest, EdgeDescription};
use muster_tls::{CertificateAuthority, IssueOptions, MeshTls, ServiceName, TlsDir};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::service::Routes;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const TD: &str = "muster.test";
const DAY: Duration = Duration::from_secs(86_400);

/// A handler that counts how often it runs: a refused call must never
/// reach it.
#[derive(Default, Clone)]
struct CountingEdge {
    calls: Arc<AtomicUsize>,
    delay: Duration,
    /// Told when a call reaches the handler.
    entered: Arc<tokio::sync::Notify>,
}

#[tonic::async_trait]
impl Edge for CountingEdge {
    async fn describe_edge(
        &self,
        _: tonic::Request<DescribeEdgeRequest>,
    ) -> Result<tonic::Response<EdgeDescription>, tonic::Status> {
        self.entered.notify_one();
        tokio::time::sleep(self.delay).await;
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(EdgeDescription {
            edge_id: "e1".into(),
            ..Default::default()
        }))
    }
}

const RULES: &[Rule] = &[Rule::new(
    "/muster.v1.Edge/DescribeEdge",
    &[ServiceName::Ctl],
)];

struct Fixture {
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
    server: Option<RunningServer>,
    addr: String,
    shutdown: CancellationToken,
    edge: CountingEdge,
    server_tls: Arc<MeshTls>,
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture::start_with(Duration::ZERO).await
    }

    /// Each DescribeEdge call takes `delay`.
    async fn start_with(delay: Duration) -> Fixture {
        Fixture::serving_as(delay, ServiceName::Edge, &[]).await
    }

    /// The edge served with `server`'s certificate, issued with the extra
    /// DNS names `dns`.
    async fn serving_as(delay: Duration, server: ServiceName, dns: &[&str]) -> Fixture {
        muster_tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let certs = TlsDir::new(dir.path());
        let (ca, _) = certs.ensure_ca(DAY * 365).unwrap();
        for name in [ServiceName::Edge, ServiceName::Ctl, ServiceName::Presence] {
            let mut options = IssueOptions::valid_for(DAY);
            if name == server {
                options.extra_dns_names = dns.iter().map(|name| name.to_string()).collect();
            }
            certs
                .write_issued(name, &ca.issue(TD, name, &options).unwrap())
                .unwrap();
        }
        let server_tls = MeshTls::load(certs.files(server), TD).unwrap();
        let edge = CountingEdge {
            calls: Arc::default(),
            delay,
            entered: Arc::default(),
        };
        let shutdown = CancellationToken::new();
        let server = muster_mesh::serve(
            ServiceSpec {
                name: ServiceName::Edge,
                grpc_service: "muster.v1.Edge",
                routes: Routes::new(EdgeServer::new(edge.clone())),
                rules: RULES,
            },
            server_tls.clone(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        Fixture {
            addr: server.addr.to_string(),
            dir,
            ca,
            server: Some(server),
            shutdown,
            edge,
            server_tls,
        }
    }

    fn certs(&self) -> TlsDir {
        TlsDir::new(self.dir.path())
    }

    fn addr(&self) -> String {
        self.addr.clone()
    }

    fn tls(&self, name: ServiceName) -> Arc<MeshTls> {
        MeshTls::load(self.certs().files(name), TD).unwrap()
    }

    fn calls(&self) -> usize {
        self.edge.calls.load(Ordering::SeqCst)
    }

    async fn describe_as(&self, tls: Arc<MeshTls>) -> Result<EdgeDescription, tonic::Status> {
        let mut client = EdgeClient::new(channel(tls, ServiceName::Edge, &self.addr()).unwrap());
        client
            .describe_edge(DescribeEdgeRequest {})
            .await
            .map(|r| r.into_inner())
    }
}

/// A principal's files from another CA, written into `dir`, trusting our
/// CA so that only the server's check can refuse it. Returns the principal
/// and the other CA's certificate.
fn foreign_tls(f: &Fixture, dir: &std::path::Path, name: ServiceName) -> (Arc<MeshTls>, String) {
    let certs = TlsDir::new(dir);
    let (ca, _) = certs.ensure_ca(DAY).unwrap();
    certs
        .write_issued(
            name,
            &ca.issue(TD, name, &IssueOptions::valid_for(DAY)).unwrap(),
        )
        .unwrap();
    std::fs::copy(f.certs().ca_cert_path(), certs.ca_cert_path()).unwrap();
    (
        MeshTls::load(certs.files(name), TD).unwrap(),
        ca.cert_pem().to_owned(),
    )
}

/// A gRPC call the server refused at the TLS layer: the client sees a
/// transport failure (alert, broken pipe or closed connection, depending on
/// who writes first), never an answer.
fn assert_transport_failure(err: &tonic::Status) {
    assert!(
        matches!(
            err.code(),
            Code::Unknown | Code::Cancelled | Code::Unavailable
        ) && std::error::Error::source(err).is_some(),
        "expected a transport failure, got {err:?}"
    );
}

/// The alert the server sends a client presenting `config`'s certificate.
/// In TLS 1.3 the client's handshake completes first; the refusal arrives
/// on the first read.
async fn server_alert(f: &Fixture, config: Arc<rustls::ClientConfig>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(f.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("muster-edge").unwrap();
    let mut stream = match tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        Ok(stream) => stream,
        Err(error) => return error.to_string(),
    };
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    match stream.read(&mut buf).await {
        Ok(n) => panic!("the server answered {n} bytes instead of refusing"),
        Err(error) => error.to_string(),
    }
}

fn assert_refused_by_tls(alert: &str, expected: &[&str]) {
    assert!(
        expected
            .iter()
            .any(|e| alert.contains(&format!("received fatal alert: {e}"))),
        "expected one of {expected:?}, got {alert}"
    );
}

/// The serial of the certificate the server presents to a new connection.
async fn served_serial(f: &Fixture) -> String {
    let tcp = tokio::net::TcpStream::connect(f.addr()).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(f.tls(ServiceName::Ctl).client_config());
    let name = rustls::pki_types::ServerName::try_from("muster-edge").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let cert = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    muster_tls::CertSummary::of(&cert).unwrap().serial_hex
}

#[tokio::test]
async fn silent_connections_are_bounded_per_address_and_other_addresses_still_handshake() {
    use tokio::io::AsyncReadExt;
    let f = Fixture::start().await;
    // Sockets that never start TLS, each holding a handshake's place for
    // up to 10 s.
    let mut silent = Vec::new();
    for _ in 0..muster_mesh::HANDSHAKES_PER_ADDRESS {
        silent.push(tokio::net::TcpStream::connect(f.addr()).await.unwrap());
    }
    let mut over = tokio::net::TcpStream::connect(f.addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf))
        .await
        .expect("one socket over the bound is closed at once, not after the handshake timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "closed, got {read:?}");

    // Another address is not held back by this one's silent sockets.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = other.connect(f.addr().parse().unwrap()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("muster-edge").unwrap();
    tokio_rustls::TlsConnector::from(f.tls(ServiceName::Ctl).client_config())
        .connect(name, tcp)
        .await
        .expect("a handshake from another address");

    // Once the silent sockets go, their places are given back.
    drop(silent);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match f.describe_as(f.tls(ServiceName::Ctl)).await {
            Ok(description) => break assert_eq!(description.edge_id, "e1"),
            Err(error) if tokio::time::Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("no call after the silent sockets left: {error:?}"),
        }
    }
}

#[tokio::test]
async fn an_allowed_caller_reaches_the_handler_and_health() {
    let f = Fixture::start().await;
    let described = f.describe_as(f.tls(ServiceName::Ctl)).await.unwrap();
    assert_eq!(described.edge_id, "e1");
    assert_eq!(f.calls(), 1);

    // Health is open to every principal of the trust domain.
    let ch = channel(f.tls(ServiceName::Presence), ServiceName::Edge, &f.addr()).unwrap();
    let health = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: "muster.v1.Edge".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");
}

#[tokio::test]
async fn a_service_not_in_the_table_is_denied_before_the_handler() {
    let f = Fixture::start().await;
    let err = f
        .describe_as(f.tls(ServiceName::Presence))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("spiffe://muster.test/service/presence"),
        "{err:?}"
    );
    // Marked as the mesh's refusal, so that an edge does not pass its
    // text on to a client.
    assert!(
        err.metadata().contains_key(muster_mesh::REFUSED_BY_MESH),
        "{err:?}"
    );
    assert_eq!(f.calls(), 0);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let f = Fixture::start().await;
    let ca = f.ca.cert_der().clone();
    let config = move || {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(muster_tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    };
    assert_refused_by_tls(&server_alert(&f, config()).await, &["CertificateRequired"]);
    let mut client =
        EdgeClient::new(channel_with(config, ServiceName::Edge, TD, &f.addr()).unwrap());
    let err = client
        .describe_edge(DescribeEdgeRequest {})
        .await
        .unwrap_err();
    assert_transport_failure(&err);
    assert_eq!(f.calls(), 0);
}

#[tokio::test]
async fn a_server_with_another_principals_certificate_is_refused_by_its_client() {
    // Presence's certificate, naming `muster-edge` too, serves as the edge:
    // the name verifies, the identity does not.
    let f = Fixture::serving_as(Duration::ZERO, ServiceName::Presence, &["muster-edge"]).await;
    let err = f.describe_as(f.tls(ServiceName::Ctl)).await.unwrap_err();
    assert_transport_failure(&err);
    let chain = format!("{:?}", std::error::Error::source(&err));
    assert!(
        chain.contains(
            "spiffe://muster.test/service/presence, not spiffe://muster.test/service/edge"
        ),
        "{chain}"
    );
    assert_eq!(f.calls(), 0);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let f = Fixture::start().await;
    let other = tempfile::tempdir().unwrap();
    let (tls, _) = foreign_tls(&f, other.path(), ServiceName::Ctl);
    // Same CA name, other key: the signature check fails (DecryptError);
    // an unrelated name gives UnknownCA.
    let alert = server_alert(&f, tls.client_config()).await;
    assert_refused_by_tls(&alert, &["DecryptError", "UnknownCA", "BadCertificate"]);
    let err = f.describe_as(tls).await.unwrap_err();
    assert_transport_failure(&err);
    assert_eq!(f.calls(), 0);
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let f = Fixture::start().await;
    let now = time::OffsetDateTime::now_utc();
    let mut opts = IssueOptions::valid_for(DAY);
    opts.not_before = Some(now - time::Duration::days(2));
    opts.not_after = Some(now - time::Duration::days(1));
    let certs = f.certs();
    certs
        .write_issued(
            ServiceName::Ctl,
            &f.ca.issue(TD, ServiceName::Ctl, &opts).unwrap(),
        )
        .unwrap();
    let alert = server_alert(&f, f.tls(ServiceName::Ctl).client_config()).await;
    assert_refused_by_tls(&alert, &["CertificateExpired"]);
    let err = f.describe_as(f.tls(ServiceName::Ctl)).await.unwrap_err();
    assert_transport_failure(&err);
    assert_eq!(f.calls(), 0);
}

/// A connection outlives the handshake that checked its certificate: it
/// ends when that certificate expires. A principal that renewed its
/// certificate meanwhile goes on, over a new connection with the new one;
/// one that did not is refused.
#[tokio::test]
async fn a_connection_ends_when_its_certificate_expires_and_a_renewed_principal_goes_on() {
    let f = Fixture::start().await;
    let now = time::OffsetDateTime::now_utc();
    let mut short = IssueOptions::valid_for(DAY);
    // Long enough for the setup below on a loaded machine.
    short.not_after = Some(now + time::Duration::seconds(5));
    let issue = |name, opts: &IssueOptions| {
        f.certs()
            .write_issued(name, &f.ca.issue(TD, name, opts).unwrap())
            .unwrap();
    };
    issue(ServiceName::Ctl, &short);
    issue(ServiceName::Backplane, &short);
    let renewed = f.tls(ServiceName::Ctl);
    let stale = f.tls(ServiceName::Backplane);
    let mut renewed_client =
        EdgeClient::new(channel(renewed.clone(), ServiceName::Edge, &f.addr()).unwrap());
    let mut stale_client = EdgeClient::new(channel(stale, ServiceName::Edge, &f.addr()).unwrap());
    renewed_client
        .describe_edge(DescribeEdgeRequest {})
        .await
        .unwrap();
    let before = stale_client.describe_edge(DescribeEdgeRequest {}).await;
    // (Backplane may not call DescribeEdge: refused by rule, but over a
    // connection the handshake admitted.)
    assert_eq!(before.unwrap_err().code(), Code::PermissionDenied);

    issue(ServiceName::Ctl, &IssueOptions::valid_for(DAY));
    assert!(renewed.reload().unwrap());
    tokio::time::sleep(Duration::from_secs(7)).await;

    // The old connection is gone; the next goes with the renewed
    // certificate (a call that raced the close may fail once).
    let mut answered = false;
    for _ in 0..20 {
        if renewed_client
            .describe_edge(DescribeEdgeRequest {})
            .await
            .is_ok()
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "the renewed principal was not served again");
    // The expired one cannot even connect again.
    // (Refused at the handshake: a transport failure, not a refusal by a
    // rule over a connection still up.)
    let after = stale_client
        .describe_edge(DescribeEdgeRequest {})
        .await
        .unwrap_err();
    assert!(
        format!("{after:?}").contains("CertificateExpired"),
        "{after:?}"
    );
    assert!(
        !after.metadata().contains_key(muster_mesh::REFUSED_BY_MESH),
        "{after:?}"
    );
    assert_eq!(f.calls(), 2);
}

#[tokio::test]
async fn certificates_reload_without_a_restart() {
    let f = Fixture::start().await;
    let stop = CancellationToken::new();
    tokio::spawn(
        f.server_tls
            .clone()
            .watch(Duration::from_millis(50), stop.clone().cancelled_owned()),
    );

    // Trust: a client of a second CA is refused until the server's bundle
    // holds that CA too, as during a CA rotation.
    let other = tempfile::tempdir().unwrap();
    let (newcomer, other_ca) = foreign_tls(&f, other.path(), ServiceName::Ctl);
    assert!(f.describe_as(newcomer.clone()).await.is_err());
    let ours = std::fs::read_to_string(f.certs().ca_cert_path()).unwrap();
    std::fs::write(f.certs().ca_cert_path(), format!("{ours}{other_ca}")).unwrap();
    let mut accepted = false;
    for _ in 0..100 {
        if f.describe_as(newcomer.clone()).await.is_ok() {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted, "the rotated trust bundle was never picked up");

    // Identity: a re-issued server certificate is presented from the next
    // connection on.
    let before = served_serial(&f).await;
    f.certs()
        .write_issued(
            ServiceName::Edge,
            &f.ca
                .issue(TD, ServiceName::Edge, &IssueOptions::valid_for(DAY))
                .unwrap(),
        )
        .unwrap();
    let mut after = before.clone();
    for _ in 0..100 {
        after = served_serial(&f).await;
        if after != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(before, after, "the re-issued certificate was never served");
    stop.cancel();
}

#[tokio::test]
async fn shutdown_lets_in_flight_calls_finish_then_refuses_new_ones() {
    let mut f = Fixture::start_with(Duration::from_millis(500)).await;
    let in_flight = {
        let tls = f.tls(ServiceName::Ctl);
        let addr = f.addr();
        tokio::spawn(async move {
            let mut client = EdgeClient::new(channel(tls, ServiceName::Edge, &addr).unwrap());
            client.describe_edge(DescribeEdgeRequest {}).await
        })
    };
    tokio::time::timeout(Duration::from_secs(30), f.edge.entered.notified())
        .await
        .expect("the call reached the handler");
    f.shutdown.cancel();
    let server = f.server.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("server drained")
        .unwrap();
    let finished = in_flight
        .await
        .unwrap()
        .expect("the in-flight call completed");
    assert_eq!(finished.into_inner().edge_id, "e1");
    assert_eq!(f.calls(), 1);
    assert!(f.describe_as(f.tls(ServiceName::Ctl)).await.is_err());
}
