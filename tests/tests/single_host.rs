//! A whole single host, in process, spoken to over real mTLS.

use std::sync::Arc;

use muster_e2e::{Host, config_in, grpc_service};
use muster_proto::v1::identity_client::IdentityClient;
use muster_proto::v1::{CreateTokenRequest, VerifyTokenRequest};
use muster_tls::ServiceName;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn every_service_is_healthy_over_mtls(host: &Host) {
    for name in ServiceName::SERVICES {
        let mut health = HealthClient::new(host.channel(name, ServiceName::Ctl));
        let reply = health
            .check(HealthCheckRequest {
                service: grpc_service(name).into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{name} health: {e:?}"));
        assert_eq!(reply.into_inner().status, 1, "{name} is SERVING");
    }
}

/// A client that trusts the CA but presents no certificate.
fn anonymous_channel(host: &Host, service: ServiceName) -> muster_mesh::MeshChannel {
    let ca = std::fs::read(host.config.tls().ca_cert_path()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let roots = Arc::new(roots);
    let config = move || {
        let mut config = rustls::ClientConfig::builder_with_provider(muster_tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    };
    muster_mesh::channel_with(
        config,
        service,
        &host.config.trust_domain,
        &host.address(service),
    )
    .unwrap()
}

/// How many refused handshakes `service` has counted in this process.
fn refused(service: ServiceName) -> u64 {
    let label = format!("service=\"{service}\"");
    muster_telemetry::metrics()
        .render()
        .lines()
        .filter(|line| line.starts_with("muster_mesh_handshake_failures_total"))
        .filter(|line| line.contains(&label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|count| count as u64)
        .sum()
}

async fn no_service_answers_without_a_certificate(host: &Host) {
    let before: Vec<u64> = ServiceName::SERVICES.iter().map(|s| refused(*s)).collect();
    for name in ServiceName::SERVICES {
        let mut health = HealthClient::new(anonymous_channel(host, name));
        let err = health
            .check(HealthCheckRequest::default())
            .await
            .expect_err("anonymous health check must fail");
        // The refusal reaches the client as its TLS alert, a broken pipe or
        // a closed connection, depending on who writes first: always a
        // transport failure, never an answer from the server.
        assert!(
            matches!(
                err.code(),
                Code::Unknown | Code::Cancelled | Code::Unavailable
            ) && std::error::Error::source(&err).is_some(),
            "{name}: {err:?}"
        );
    }
    // Every server saw and refused the handshake. A server counts the
    // refusal after it has sent it, so the count may trail the client's
    // error by a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for (name, before) in ServiceName::SERVICES.into_iter().zip(before) {
        while refused(name) <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "{name} did not count a refused handshake:\n{}",
                muster_telemetry::metrics().render()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_host_on_sqlite_is_healthy_and_refuses_anonymous_callers() {
    let host = Host::start(None).await;
    assert!(
        host.running.admin_token.is_some(),
        "first start mints a token"
    );
    every_service_is_healthy_over_mtls(&host).await;
    no_service_answers_without_a_certificate(&host).await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_host_on_postgres_is_healthy_and_refuses_anonymous_callers() {
    let url = muster_store::testing::create_postgres_database().await;
    let host = Host::start(Some(url)).await;
    every_service_is_healthy_over_mtls(&host).await;
    no_service_answers_without_a_certificate(&host).await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_reflection() {
    let host = Host::start(None).await;
    for name in ServiceName::SERVICES {
        let mut client = ServerReflectionClient::new(host.channel(name, ServiceName::Ctl));
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let reply = replies.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("{name}: unexpected reflection reply");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n == grpc_service(name)),
            "{name}: {names:?}"
        );
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{name}: {names:?}"
        );
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_authorized_per_rpc_by_service_identity() {
    let host = Host::start(None).await;
    let token = host.running.admin_token.clone().unwrap();
    // Only the edge verifies tokens: the command line may not, even with a
    // valid certificate.
    let mut as_ctl = IdentityClient::new(host.channel(ServiceName::Identity, ServiceName::Ctl));
    let denied = as_ctl
        .verify_token(VerifyTokenRequest {
            token: token.expose().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let mut as_presence =
        IdentityClient::new(host.channel(ServiceName::Identity, ServiceName::Presence));
    let denied = as_presence
        .create_token(CreateTokenRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let mut as_edge = IdentityClient::new(host.channel(ServiceName::Identity, ServiceName::Edge));
    let claims = as_edge
        .verify_token(VerifyTokenRequest {
            token: token.expose().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claims.role, "admin");
    assert_eq!(claims.tenant_id, muster::DEFAULT_TENANT);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_state_survives_a_restart_and_the_admin_token_is_minted_once() {
    let host = Host::start(None).await;
    let admin = host.running.admin_token.clone().unwrap();
    let mut ctl = IdentityClient::new(host.channel(ServiceName::Identity, ServiceName::Ctl));
    let created = ctl
        .create_token(CreateTokenRequest {
            tenant_id: muster::DEFAULT_TENANT.into(),
            role: "client".into(),
            scopes: vec!["operator.read".into()],
            label: "survivor".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (config, dir) = host.stop().await;

    let host = Host::start_with(config, dir).await;
    assert!(
        host.running.admin_token.is_none(),
        "a restart mints no token"
    );
    let mut edge = IdentityClient::new(host.channel(ServiceName::Identity, ServiceName::Edge));
    for secret in [admin.expose().to_owned(), created.token] {
        edge.verify_token(VerifyTokenRequest { token: secret })
            .await
            .expect("token still valid after restart");
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_chosen_admin_token_is_used_on_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let chosen = "operator-chosen-admin-token-for-kubernetes-secrets";
    let config = muster::Config {
        admin_token: Some(chosen.into()),
        ..config_in(dir.path(), None)
    };
    let host = Host::start_with(config, dir).await;
    assert_eq!(host.running.admin_token.as_ref().unwrap().expose(), chosen);
    let mut edge = IdentityClient::new(host.channel(ServiceName::Identity, ServiceName::Edge));
    let claims = edge
        .verify_token(VerifyTokenRequest {
            token: chosen.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claims.scopes, vec!["*".to_string()]);
    host.stop().await;
}

/// The status of `GET /readyz` on a host's metrics listener.
async fn readiness(metrics_url: &str) -> u16 {
    let url = metrics_url.replace("/metrics", "/readyz");
    tokio::task::spawn_blocking(move || muster_e2e::http_status(&muster_e2e::http_get(&url, None)))
        .await
        .unwrap()
}

/// An edge holds peers back until its stream from the backplane is
/// answered, for up to 5 s: its host is not ready meanwhile, so that a
/// balancer sends no peers to wait in its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_is_not_ready_while_its_edge_waits_for_the_backplane() {
    let host = Host::start(None).await;
    // A backplane that takes connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut peers: std::collections::BTreeMap<String, String> = host
        .running
        .endpoints
        .services
        .clone()
        .into_iter()
        .collect();
    peers.insert("backplane".into(), silent.local_addr().unwrap().to_string());
    let dir = tempfile::tempdir().unwrap();
    let config = muster::Config {
        services: vec!["edge".into()],
        peers,
        tls_dir: Some(host.config.tls().path().to_path_buf()),
        grpc_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..config_in(dir.path(), None)
    };
    let started = std::time::Instant::now();
    let edge = Host::start_with(config, dir).await;
    let metrics_url = edge.running.endpoints.metrics_url.clone();
    assert_eq!(
        readiness(&metrics_url).await,
        503,
        "ready before the edge accepts"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "the check came too late to mean anything"
    );
    let mut ready = false;
    for _ in 0..40 {
        if readiness(&metrics_url).await == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(
        ready,
        "the host is ready once its edge accepts without the backplane"
    );
    edge.stop().await;
    host.stop().await;
}

/// The admin token is a start's last step: until it is minted the host
/// says it is starting, so that no balancer or operator takes it for ready
/// before its token exists. The mint is held back by another transaction
/// holding the row it claims (Postgres waits on it; SQLite's writer would
/// give up instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_says_it_is_starting_until_its_admin_token_is_minted() {
    let url = muster_e2e::postgres_store().await;
    let store = muster_store::Store::connect(&url, &Default::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO identity_bootstrap (step, at_ms) VALUES ('admin', 1)")
        .execute(&mut *holder)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    drop(metrics);
    let config = muster::Config {
        metrics_listen: metrics_addr,
        ..config_in(dir.path(), Some(url))
    };
    let start_config = config.clone();
    let start = muster::start(&start_config);
    tokio::pin!(start);
    let metrics_url = format!("http://{metrics_addr}/metrics");
    let asked = async {
        for _ in 0..100 {
            let url = metrics_url.replace("/metrics", "/readyz");
            let answer = tokio::task::spawn_blocking(move || {
                std::net::TcpStream::connect(metrics_addr)
                    .ok()
                    .map(|_| muster_e2e::http_get(&url, None))
            })
            .await
            .unwrap();
            if answer.is_some() {
                return answer;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        None
    };
    let said = tokio::select! {
        started = &mut start => panic!("started while its mint was held back: {:?}", started.map(|_| ())),
        said = asked => said.expect("the metrics listener answers while the start waits"),
    };
    assert_eq!(muster_e2e::http_status(&said), 503, "{said}");
    assert!(said.ends_with("starting\n"), "{said}");

    holder.rollback().await.unwrap();
    let running = tokio::time::timeout(std::time::Duration::from_secs(30), start)
        .await
        .expect("the start finishes once the row is free")
        .expect("muster starts");
    assert!(running.admin_token.is_some(), "the token was minted");
    // Ready once its edge accepts, when its stream from the backplane is
    // answered (at once on a healthy host, at most 5 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while readiness(&metrics_url).await != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let host = muster_e2e::Host {
        running,
        config,
        dir,
    };
    host.stop().await;
}

/// A tenant's instance presence over gRPC's default 4 MiB answer (here 600
/// entries with 7 KB of metadata each) still lists, over HTTP and so over
/// WebSocket, which share the edge's call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_of_presence_past_four_mebibytes_still_answers() {
    let host = Host::start_configured(None, |config| config.presence_cap = 1000).await;
    let instances = muster_presence::Instances::new(Arc::new(host.store().await));
    let metadata = serde_json::json!({"notes": "x".repeat(7_000)});
    for n in 0..600 {
        instances
            .upsert(
                muster::DEFAULT_TENANT,
                muster_presence::InstanceEntry {
                    instance_id: format!("dev_{n:04}"),
                    role: muster_presence::InstanceRole::Node,
                    reported_host: "rack".into(),
                    reported_ip: String::new(),
                    observed_ip: "127.0.0.1".into(),
                    version: "1".into(),
                    mode: "node".into(),
                    last_seen_at_ms: 0,
                    last_input_seconds: None,
                    reason: "connect".into(),
                    metadata: metadata.clone(),
                    edge_id: String::new(),
                },
            )
            .await
            .unwrap();
    }
    let url = format!("{}/presence", host.http_base());
    let admin = host.admin_token();
    let listed = tokio::task::spawn_blocking(move || muster_e2e::http_get(&url, Some(&admin)))
        .await
        .unwrap();
    assert!(listed.len() > 4 * 1024 * 1024, "{} bytes", listed.len());
    assert_eq!(muster_e2e::http_status(&listed), 200);
    let entries = muster_e2e::http_json(&listed)["entries"]
        .as_array()
        .unwrap()
        .len();
    assert!(entries >= 600, "{entries} entries");
    host.stop().await;
}

/// A decision over gRPC is said, never assumed from a field left out; the
/// same decision again answers as the first did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_decided_only_by_a_verdict_said() {
    use muster_proto::v1::approvals_client::ApprovalsClient;
    use muster_proto::v1::{
        CreateApprovalRequest, DecideApprovalRequest, GetApprovalRequest, Verdict,
    };
    let host = Host::start(None).await;
    let mut approvals =
        ApprovalsClient::new(host.channel(ServiceName::Approvals, ServiceName::Edge));
    let created = approvals
        .create_approval(CreateApprovalRequest {
            tenant_id: "t1".into(),
            kind: "capability".into(),
            context_json: "{}".into(),
            ttl_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let decide = |verdict: Verdict| DecideApprovalRequest {
        tenant_id: "t1".into(),
        approval_id: created.approval_id.clone(),
        verdict: verdict.into(),
        decided_by: "alice".into(),
        reason: String::new(),
    };
    let unsaid = approvals
        .decide_approval(decide(Verdict::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(unsaid.code(), Code::InvalidArgument, "{unsaid:?}");
    let get = GetApprovalRequest {
        tenant_id: "t1".into(),
        approval_id: created.approval_id.clone(),
    };
    let stored = approvals
        .get_approval(get.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.status, "pending");

    let approved = approvals
        .decide_approval(decide(Verdict::Approve))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approved.status, "approved");
    let again = approvals
        .decide_approval(decide(Verdict::Approve))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again, approved,
        "the same decision answers as the first did"
    );
    let denied = approvals
        .decide_approval(decide(Verdict::Deny))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::FailedPrecondition, "{denied:?}");
    assert_eq!(
        approvals.get_approval(get).await.unwrap().into_inner(),
        approved
    );
    host.stop().await;
}
