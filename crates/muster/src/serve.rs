//! `muster serve`: every service in one process (single host), or the
//! services named by `--service` (cluster mode).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use muster_identity::{Secret, Tokens};
use muster_mesh::{RunningServer, ServiceSpec};
use muster_store::{Store, StoreOptions};
use muster_tls::{IssueOptions, MeshTls, ServiceName};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, redact_url};

/// How long the development CA of a single host lives.
const DEV_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a single host's service certificates live; they are renewed
/// with a third of that left.
const DEV_CERT_VALIDITY: Duration = Duration::from_secs(30 * 86_400);
/// How often the outbox is compacted (under a lease) and measured.
const COMPACT_EVERY: Duration = Duration::from_secs(10);
/// How often presence forgets stale entries.
const PRUNE_EVERY: Duration = Duration::from_secs(5);
/// How often a single host checks whether its certificates need renewal.
const RENEW_CHECK: Duration = Duration::from_secs(3600);

/// What a running host tells its operator and its command-line tools;
/// written to `<data_dir>/endpoints.json` while it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    pub pid: u32,
    pub edge_ws_url: Option<String>,
    pub metrics_url: String,
    pub trust_domain: String,
    pub tls_dir: String,
    /// gRPC (mTLS) address of each service.
    pub services: BTreeMap<String, String>,
}

/// A started muster: [`Running::stop`] drains and stops it.
pub struct Running {
    pub endpoints: Endpoints,
    /// The admin token, when this start minted it.
    pub admin_token: Option<Secret>,
    /// `None` for an edge alone: it reaches the store only through its peers.
    pub store: Option<Store>,
    shutdown: CancellationToken,
    /// Cancelled once the edge of this process (if any) has stopped: the
    /// requests its peers have in flight still reach the services it
    /// calls, which would otherwise refuse them as they stop.
    services_shutdown: CancellationToken,
    servers: Vec<RunningServer>,
    background: Vec<JoinHandle<std::io::Result<()>>>,
    /// The edge's own tasks (its WebSocket listener), awaited before the
    /// services stop.
    edge_background: Vec<JoinHandle<std::io::Result<()>>>,
    endpoints_file: Option<std::path::PathBuf>,
    grace: Duration,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Cancelled when the process should stop.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, lets in-flight work finish (up to the grace
    /// period), closes the store.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let services_shutdown = self.services_shutdown.clone();
        let drain = async {
            let (edge, services): (Vec<_>, Vec<_>) = self
                .servers
                .into_iter()
                .partition(|server| server.name == ServiceName::Edge);
            for server in edge {
                server.wait().await.context("edge server")?;
            }
            for task in self.edge_background {
                task.await??;
            }
            self.services_shutdown.cancel();
            for server in services {
                let name = server.name;
                server
                    .wait()
                    .await
                    .with_context(|| format!("{name} server"))?;
            }
            for task in self.background {
                task.await??;
            }
            anyhow::Ok(())
        };
        // A part that failed as it drained is reported, after the rest is
        // put away all the same: the store closed, and the endpoints file
        // gone, so that the command line does not dial what stopped.
        let drained = match tokio::time::timeout(self.grace, drain).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "in-flight work did not finish in time");
                Ok(())
            }
        };
        services_shutdown.cancel();
        if let Some(store) = self.store {
            store.close().await;
        }
        if let Some(file) = self.endpoints_file {
            let _ = std::fs::remove_file(file);
        }
        drained?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Opens the configured store and applies pending migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let url = config.store_url();
    if url.starts_with("sqlite:") {
        crate::config::create_private_dir(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
    }
    let options = StoreOptions {
        statement_timeout: Some(Duration::from_secs(config.store_statement_timeout_secs))
            .filter(|timeout| !timeout.is_zero()),
        ..Default::default()
    };
    let store = Store::connect(&url, &options)
        .await
        .with_context(|| format!("opening store {}", redact_url(&url)))?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// A single host makes its development CA on first start and keeps every
/// principal's certificate current; a cluster process only reads what
/// `muster certs` made.
fn prepare_certificates(config: &Config) -> anyhow::Result<()> {
    let tls = config.tls();
    if !config.single_host() {
        if !tls.ca_cert_path().exists() {
            bail!(
                "no CA at {}: make the cluster's certificates with `muster certs init`",
                tls.ca_cert_path().display()
            );
        }
        return Ok(());
    }
    crate::config::create_private_dir(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    // One made before (say with `mkdir` under a umask of 002) keeps its
    // mode; the operator hears of it here, not only from the tools.
    if std::fs::metadata(&config.data_dir).is_ok_and(|meta| crate::config::others_may_write(&meta))
    {
        tracing::warn!(
            data_dir = %config.data_dir.display(),
            "the data directory may be written by other users: it holds the CA's key, \
             and the command-line tools will not trust its endpoints.json (chmod 700 it)"
        );
    }
    let (ca, created) = tls.ensure_ca(DEV_CA_VALIDITY)?;
    if created {
        tracing::info!(path = %tls.ca_cert_path().display(), "created a development CA");
    }
    for name in ServiceName::ALL {
        if tls.ensure_issued(
            &ca,
            &config.trust_domain,
            name,
            &IssueOptions::valid_for(DEV_CERT_VALIDITY),
        )? {
            tracing::info!(principal = %name, "issued certificate");
        }
    }
    Ok(())
}

fn renew_loop(config: Config, shutdown: CancellationToken) -> JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(RENEW_CHECK) => {}
            }
            if let Err(error) = prepare_certificates(&config) {
                tracing::error!(%error, "certificate renewal failed");
            }
        }
    })
}

#[derive(Clone)]
struct Health {
    /// Set once the start finished (the admin token minted): before, a
    /// caller could not use what it would expect of a ready process.
    started: Arc<std::sync::atomic::AtomicBool>,
    store: Option<Store>,
    shutdown: CancellationToken,
    /// This host's edge, if it runs one.
    edge: Option<Arc<muster_edge::Edge>>,
}

async fn metrics_endpoint() -> String {
    muster_telemetry::metrics().render()
}

async fn ready(State(health): State<Health>) -> (StatusCode, &'static str) {
    if health.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if !health.started.load(std::sync::atomic::Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n");
    }
    // An edge waits for its backplane stream before it accepts peers (up
    // to 5 s): a balancer sending peers meanwhile would leave them queued.
    if health.edge.as_ref().is_some_and(|edge| !edge.accepting()) {
        return (StatusCode::SERVICE_UNAVAILABLE, "edge not accepting yet\n");
    }
    let Some(store) = &health.store else {
        return (StatusCode::OK, "ready\n");
    };
    match store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n"),
    }
}

/// Starts the configured services and returns once they accept
/// connections.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    start_until(config, CancellationToken::new()).await
}

/// [`start`], given up when `abort` is cancelled, except while it mints the
/// admin token, its last step, which it finishes: the token's only copy is
/// in the answer.
pub async fn start_until(config: &Config, abort: CancellationToken) -> anyhow::Result<Running> {
    let (mut running, identity, started) = tokio::select! {
        prepared = prepare(config) => prepared?,
        () = abort.cancelled() => bail!("stopped before start-up finished"),
    };
    // Last, once nothing else can fail: a start that fails after minting
    // would lose the only copy of the admin token.
    running.admin_token = match identity {
        Some(tokens) => tokens
            .bootstrap_admin(&config.default_tenant, config.admin_token.as_deref())
            .await
            .map_err(|e| anyhow::anyhow!("minting the admin token: {e}"))?,
        None => None,
    };
    started.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(store = %redact_url(&config.store_url()), services = ?running.endpoints.services, "muster started");
    Ok(running)
}

/// Everything of a start but the admin token: the running services, the
/// identity service's tokens if this process runs it, and the flag that
/// tells readiness the start finished.
async fn prepare(
    config: &Config,
) -> anyhow::Result<(Running, Option<Tokens>, Arc<std::sync::atomic::AtomicBool>)> {
    muster_tls::install_crypto_provider();
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let names = config.service_names()?;
    let single_host = config.single_host();
    if single_host && config.grpc_listen.is_some() {
        tracing::warn!(
            "grpc_listen is ignored on a single host: its services reach each other on loopback ports of their own"
        );
    }
    if !single_host && names.len() == 1 && config.grpc_listen.is_none() {
        bail!(
            "a single service needs --grpc-listen (or MUSTER_GRPC_LISTEN) for its peers to reach it"
        );
    }
    // An edge alone keeps no state: it opens no store, and needs no
    // credentials for one.
    let store = if names == [ServiceName::Edge] {
        None
    } else {
        Some(open_store(config).await?)
    };
    let stored = || {
        store
            .clone()
            .expect("every service but the edge has the store")
    };
    prepare_certificates(config)?;
    let shutdown = CancellationToken::new();
    // The services stop after the edge (see Running::stop); cancelled with
    // the rest when the process stops without an edge.
    let services_shutdown = CancellationToken::new();
    let tls_dir = config.tls();
    let reload = Duration::from_secs(config.cert_reload_secs);

    let mut identity = None;
    let mut servers = Vec::new();
    let mut background = Vec::new();
    let mut edge_background = Vec::new();
    let mut addresses = BTreeMap::new();
    let mut edge_ws_url = None;
    let mut this_edge = None;
    for name in names {
        let tls = MeshTls::load(tls_dir.files(name), &config.trust_domain)
            .with_context(|| format!("loading the {name} certificate"))?;
        tokio::spawn(
            tls.clone()
                .watch(reload, shutdown.clone().cancelled_owned()),
        );
        let spec: ServiceSpec = match name {
            ServiceName::Backplane => {
                let outbox = muster_backplane::Outbox::new(Arc::new(stored()));
                let directory: Arc<dyn muster_backplane::directory::DirectoryStore> =
                    Arc::new(stored());
                // Awaited at stop, so that its lease is given up before
                // the store closes.
                let maintain = outbox.clone().maintain(
                    directory.clone(),
                    muster_backplane::default_retention(),
                    COMPACT_EVERY,
                    services_shutdown.clone().cancelled_owned(),
                );
                background.push(tokio::spawn(async move {
                    maintain.await;
                    Ok(())
                }));
                muster_backplane::spec(outbox, directory, services_shutdown.clone())
            }
            ServiceName::Identity => {
                let tokens = Tokens::new(Arc::new(stored()));
                identity = Some(tokens.clone());
                muster_identity::spec(tokens)
            }
            ServiceName::Approvals => {
                muster_approvals::spec(muster_approvals::Approvals::new(Arc::new(stored())))
            }
            ServiceName::Presence => {
                let retention = muster_presence::Retention {
                    ttl: Duration::from_secs(config.presence_ttl_secs),
                    cap: config.presence_cap,
                };
                let instances =
                    muster_presence::Instances::with_retention(Arc::new(stored()), retention);
                let topics = muster_presence::Topics::new(Arc::new(stored()));
                let prune = instances.clone().prune_loop(
                    topics.clone(),
                    PRUNE_EVERY,
                    services_shutdown.clone().cancelled_owned(),
                );
                background.push(tokio::spawn(async move {
                    prune.await;
                    Ok(())
                }));
                muster_presence::spec(instances, topics)
            }
            ServiceName::Execution => {
                muster_execution::spec(muster_execution::Runs::new(Arc::new(stored())))
            }
            ServiceName::Edge => {
                let http = TcpListener::bind(config.edge_listen)
                    .await
                    .with_context(|| format!("binding the edge to {}", config.edge_listen))?;
                let peer = |name: ServiceName| -> anyhow::Result<muster_mesh::MeshChannel> {
                    let address = addresses
                        .get(name.as_str())
                        .or_else(|| config.peers.get(name.as_str()))
                        .with_context(|| format!("the edge needs peers.{name}"))?;
                    Ok(muster_mesh::channel(tls.clone(), name, address)?)
                };
                let peers = muster_edge::EdgePeers {
                    identity: peer(ServiceName::Identity)?,
                    presence: peer(ServiceName::Presence)?,
                    backplane: peer(ServiceName::Backplane)?,
                };
                let edge_tls = match (&config.edge_tls_cert, &config.edge_tls_key) {
                    (Some(cert), Some(key)) => {
                        let edge_tls = muster_tls::EdgeTls::load(
                            muster_tls::TlsFiles {
                                cert: cert.clone(),
                                key: key.clone(),
                                ca: tls_dir.ca_cert_path(),
                            },
                            &config.trust_domain,
                        )
                        .context("loading the edge's tls certificate")?;
                        tokio::spawn(
                            edge_tls
                                .clone()
                                .watch(reload, shutdown.clone().cancelled_owned()),
                        );
                        Some(edge_tls)
                    }
                    _ => None,
                };
                let trusted_proxies = config.trusted_proxies()?;
                if !trusted_proxies.is_empty() {
                    tracing::info!(proxies = %trusted_proxies, "the edge believes forwarding headers from these proxies");
                }
                if config.edge_proxy_protocol {
                    tracing::info!(proxies = %trusted_proxies, "connections from these proxies start with a PROXY protocol header");
                }
                let edge_config = muster_edge::EdgeConfig {
                    tls: edge_tls,
                    gateway_tenant: config.default_tenant.clone(),
                    presence_includes_cli: config.presence_include_cli,
                    edge_id: config.edge_id.clone(),
                    max_message_bytes: config.edge_max_frame_bytes,
                    upgrades_per_ip_per_minute: config.edge_upgrades_per_ip_per_minute,
                    trusted_proxies,
                    proxy_protocol: config.edge_proxy_protocol,
                    ..muster_edge::EdgeConfig::default()
                };
                let edge = muster_edge::Edge::new(
                    http.local_addr()?,
                    edge_config,
                    peers,
                    shutdown.clone(),
                );
                edge_ws_url = Some(edge.ws_url.clone());
                this_edge = Some(edge.clone());
                edge_background.push(tokio::spawn(muster_edge::serve_http(edge.clone(), http)));
                muster_edge::spec(edge)
            }
            ServiceName::Ctl => unreachable!("service_names never yields ctl"),
        };
        let listen = match config.grpc_listen {
            Some(addr) if !single_host => addr,
            _ => SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {name} to {listen}"))?;
        let stops = if name == ServiceName::Edge {
            &shutdown
        } else {
            &services_shutdown
        };
        let server = muster_mesh::serve(spec, tls, listener, stops.clone()).await?;
        addresses.insert(name.to_string(), server.addr.to_string());
        servers.push(server);
    }
    if single_host {
        background.push(renew_loop(config.clone(), shutdown.clone()));
    }

    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding metrics to {}", config.metrics_listen))?;
    let metrics_addr = metrics_listener.local_addr()?;
    muster_telemetry::metrics();
    let app = Router::new()
        .route("/metrics", get(metrics_endpoint))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Health {
            started: started.clone(),
            store: store.clone(),
            shutdown: shutdown.clone(),
            edge: this_edge,
        });
    let stop = shutdown.clone();
    background.push(tokio::spawn(async move {
        axum::serve(metrics_listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    }));

    let endpoints = Endpoints {
        pid: std::process::id(),
        edge_ws_url,
        metrics_url: format!("http://{metrics_addr}/metrics"),
        trust_domain: config.trust_domain.clone(),
        // Absolute: the command line reads it from wherever it runs.
        tls_dir: std::path::absolute(tls_dir.path())
            .unwrap_or_else(|_| tls_dir.path().to_owned())
            .display()
            .to_string(),
        services: addresses,
    };
    let endpoints_file = if single_host {
        let file = config.endpoints_file();
        // The tools trust what it names only if no other user could have
        // written it (see `ctl::running_endpoints`), whatever the umask.
        muster_tls::write_atomic(&file, &serde_json::to_vec_pretty(&endpoints)?, false)
            .with_context(|| format!("writing {}", file.display()))?;
        Some(file)
    } else {
        None
    };
    let running = Running {
        endpoints,
        admin_token: None,
        store,
        shutdown,
        services_shutdown,
        servers,
        background,
        edge_background,
        endpoints_file,
        grace: Duration::from_secs(config.shutdown_grace_secs),
    };
    Ok((running, identity, started))
}
