//! Helpers for the end-to-end suites: start a whole muster on loopback
//! (`:0` ports, a fresh data directory, certificates from its own CA) and
//! call it as its clients do.
#![forbid(unsafe_code)]

pub use muster_protocol::client as ws;

use std::sync::Arc;

use muster::{Config, Running};
use muster_mesh::MeshChannel;
use muster_tls::{MeshTls, ServiceName};

/// A running single host and the directory it lives in.
pub struct Host {
    pub running: Running,
    pub config: Config,
    pub dir: tempfile::TempDir,
}

/// A configuration for a host under `dir`, on loopback `:0` ports.
pub fn config_in(dir: &std::path::Path, store: Option<String>) -> Config {
    Config {
        data_dir: dir.join("data"),
        store,
        edge_listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        cert_reload_secs: 1,
        shutdown_grace_secs: 10,
        ..Config::default()
    }
}

impl Host {
    /// Starts every service on SQLite (`store: None`) or the given store.
    pub async fn start(store: Option<String>) -> Host {
        Host::start_configured(store, |_| {}).await
    }

    /// Starts every service with the test configuration as `configure`
    /// changes it.
    pub async fn start_configured(
        store: Option<String>,
        configure: impl FnOnce(&mut Config),
    ) -> Host {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config_in(dir.path(), store);
        configure(&mut config);
        Host::start_with(config, dir).await
    }

    pub async fn start_with(config: Config, dir: tempfile::TempDir) -> Host {
        let running = muster::start(&config).await.expect("muster starts");
        Host {
            running,
            config,
            dir,
        }
    }

    /// The TLS identity of a principal of this host.
    pub fn tls(&self, as_principal: ServiceName) -> Arc<MeshTls> {
        MeshTls::load(
            self.config.tls().files(as_principal),
            &self.config.trust_domain,
        )
        .expect("principal certificate")
    }

    pub fn address(&self, service: ServiceName) -> String {
        self.running.endpoints.services[service.as_str()].clone()
    }

    /// A channel to `service`, presenting `as_principal`'s certificate.
    pub fn channel(&self, service: ServiceName, as_principal: ServiceName) -> MeshChannel {
        muster_mesh::channel(self.tls(as_principal), service, &self.address(service))
            .expect("channel")
    }

    /// Stops the host, keeping its directory for a restart.
    pub async fn stop(self) -> (Config, tempfile::TempDir) {
        self.running.stop().await.expect("clean stop");
        (self.config, self.dir)
    }
}

/// gRPC service name of a muster service (`muster.v1.Identity`).
pub fn grpc_service(name: ServiceName) -> &'static str {
    match name {
        ServiceName::Edge => "muster.v1.Edge",
        ServiceName::Presence => "muster.v1.Presence",
        ServiceName::Backplane => "muster.v1.Backplane",
        ServiceName::Identity => "muster.v1.Identity",
        ServiceName::Approvals => "muster.v1.Approvals",
        ServiceName::Execution => "muster.v1.Execution",
        ServiceName::Ctl => "",
    }
}

impl Host {
    /// The edge's WebSocket URL.
    pub fn ws_url(&self) -> String {
        self.running
            .endpoints
            .edge_ws_url
            .clone()
            .expect("an edge runs")
    }

    /// The edge's HTTP base URL.
    pub fn http_base(&self) -> String {
        self.ws_url()
            .replace("ws://", "http://")
            .trim_end_matches("/ws")
            .to_owned()
    }

    /// The host's store, opened as a second client of the same database.
    pub async fn store(&self) -> muster_store::Store {
        muster_store::Store::connect(
            &self.config.store_url(),
            &muster_store::StoreOptions::default(),
        )
        .await
        .expect("the host's store")
    }

    /// The first start's admin token.
    pub fn admin_token(&self) -> String {
        self.running
            .admin_token
            .as_ref()
            .expect("first start")
            .expose()
            .to_owned()
    }

    /// Mints a client token with `scopes` through identity, as `ctl`.
    pub async fn client_token(&self, scopes: &[&str]) -> (String, String) {
        self.client_token_in(&self.config.default_tenant.clone(), scopes)
            .await
    }

    /// Mints a node token bound to `device_id` in the default tenant.
    pub async fn node_token(&self, device_id: &str) -> String {
        self.node_token_and_id(device_id).await.1
    }

    /// A node token's id, for a test that only names the token.
    pub async fn node_token_id(&self, device_id: &str) -> String {
        self.node_token_and_id(device_id).await.0
    }

    async fn node_token_and_id(&self, device_id: &str) -> (String, String) {
        let mut identity = muster_proto::v1::identity_client::IdentityClient::new(
            self.channel(ServiceName::Identity, ServiceName::Ctl),
        );
        let created = identity
            .create_token(muster_proto::v1::CreateTokenRequest {
                tenant_id: self.config.default_tenant.clone(),
                role: "node".into(),
                device_id: device_id.to_owned(),
                label: "test node".into(),
                ..Default::default()
            })
            .await
            .expect("node token minted")
            .into_inner();
        (created.info.unwrap().token_id, created.token)
    }

    /// Mints a client token of `tenant_id` with `scopes`.
    pub async fn client_token_in(&self, tenant_id: &str, scopes: &[&str]) -> (String, String) {
        let mut identity = muster_proto::v1::identity_client::IdentityClient::new(
            self.channel(ServiceName::Identity, ServiceName::Ctl),
        );
        let created = identity
            .create_token(muster_proto::v1::CreateTokenRequest {
                tenant_id: tenant_id.to_owned(),
                role: "client".into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                label: "test".into(),
                ..Default::default()
            })
            .await
            .expect("token minted")
            .into_inner();
        (created.info.unwrap().token_id, created.token)
    }
}

/// A plain HTTP/1.1 GET with an optional bearer token: the whole response.
pub fn http_get(url: &str, bearer: Option<&str>) -> String {
    http_request("GET", url, bearer, None)
}

/// A plain HTTP/1.1 POST of a JSON body with an optional bearer token:
/// the status code and the body as JSON (null when it is not JSON).
pub fn http_post(url: &str, bearer: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    http_send("POST", url, bearer, body)
}

/// A plain HTTP/1.1 request of `method` with a JSON body: the status code
/// and the body as JSON (null when it is not JSON).
pub fn http_send(
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let response = http_request(method, url, bearer, Some(body));
    (http_status(&response), http_json(&response))
}

/// The status code of a whole HTTP/1.1 response.
pub fn http_status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line")
}

/// The body of a whole HTTP/1.1 response as JSON; null when it is not.
pub fn http_json(response: &str) -> serde_json::Value {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

fn http_request(method: &str, url: &str, bearer: Option<&str>, body: Option<&str>) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http url");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = std::net::TcpStream::connect(authority).expect("connect");
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let content = body
        .map(|b| {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
        })
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}{content}Connection: close\r\n\r\n{}",
        body.unwrap_or_default()
    )
    .expect("write request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    response
}

/// A fresh Postgres database for one test (from `MUSTER_TEST_DATABASE_URL`;
/// without a server the test fails).
pub async fn postgres_store() -> String {
    muster_store::testing::create_postgres_database().await
}

/// Each test once on SQLite and once on a fresh Postgres database, named
/// `<test>::sqlite` and `<test>::postgres`; `store` is what to give
/// [`Host::start`].
#[macro_export]
macro_rules! on_both_stores {
    ($(async fn $name:ident($store:ident : Option<String>) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn run($store: Option<String>) $body

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    run(None).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    run(Some($crate::postgres_store().await)).await
                }
            }
        )*
    };
}

/// Reads `ws` until its connection ends, so that it answers the edge's
/// pings (a client answers only while it is read; the edge drops one that
/// has not answered for 10 s) while a test has no more use for what it
/// receives. Aborting the task drops the connection, as a client that
/// goes away does.
pub fn keep_answering(mut ws: ws::Ws) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !matches!(
            ws.next(std::time::Duration::from_secs(60)).await,
            ws::Next::Closed(..) | ws::Next::Dropped
        ) {}
    })
}
