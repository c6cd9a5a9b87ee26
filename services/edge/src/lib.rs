//! muster's edge: the only component facing the outside. It speaks the
//! Tyrum client protocol (`tyrum-v1`) to operators and nodes over
//! WebSocket, turns their requests into calls to the owning services, and
//! writes the events the backplane streams to it. It keeps no durable
//! state.
#![forbid(unsafe_code)]

pub mod auth;
mod batch;
mod client_ip;
mod connection;
mod first_byte;
mod http;
mod limit;
mod outbound;
mod proxy_protocol;
mod pump;
mod registry;
mod resume;
mod tokens;
mod topics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use muster_mesh::{MeshChannel, Rule, ServiceSpec};
use muster_proto::v1 as pb;
use muster_proto::v1::backplane_client::BackplaneClient;
use muster_proto::v1::edge_server::{Edge as EdgeRpc, EdgeServer};
use muster_proto::v1::identity_client::IdentityClient;
use muster_proto::v1::presence_client::PresenceClient;
use muster_tls::ServiceName::Ctl;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub use auth::Claims;
pub use client_ip::{ForwardedHeader, TrustedProxies};
pub use outbound::SLOW_CONSUMER_BYTES;

/// The initial read buffer of each peer's socket (tungstenite allocates it
/// eagerly; its default is 128 KiB).
pub const READ_BUFFER_BYTES: usize = 8 * 1024;

use crate::batch::Batcher;
use crate::registry::Registry;

/// A batcher whose calls go over `channel`.
fn batcher<I, O, F, Fut>(channel: &MeshChannel, call: F) -> Batcher<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(MeshChannel, Vec<I>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<O>, Status>> + Send + 'static,
{
    let channel = channel.clone();
    Batcher::start(MAX_BATCH, BATCH_DEADLINE, move |items| {
        call(channel.clone(), items)
    })
}

/// The largest answer the edge reads from identity or presence: a tenant's
/// token listing or instance presence comes whole (gRPC's default of
/// 4 MiB is about 400 entries of the largest size presence takes).
const LISTING_REPLY_BYTES: usize = 64 * 1024 * 1024;

/// How an edge treats its peers.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// From authentication to a valid proof (Part B: 10 s).
    pub handshake_timeout: Duration,
    /// WebSocket pings (Part B: every 5 s).
    pub ping_interval: Duration,
    /// Without a pong for this long, the socket is dropped (Part B: 10 s).
    pub pong_timeout: Duration,
    /// Largest frame a peer may send.
    pub max_message_bytes: usize,
    /// Whether short-lived `cli` connections appear in instance presence.
    pub presence_includes_cli: bool,
    /// The tenant of the edge's own `gateway` presence entry.
    pub gateway_tenant: String,
    /// How often connected peers' presence is refreshed.
    pub touch_interval: Duration,
    /// Serve `wss://` with this configuration (client certificates
    /// optional); `None`: plain `ws://`.
    pub tls: Option<Arc<muster_tls::EdgeTls>>,
    /// The edge's name (backplane consumer, directory owner); `None`: a
    /// random id.
    pub edge_id: Option<String>,
    /// Upgrades one address may ask for per minute (Part B's optional
    /// per-IP limit; over it, 429); 0: no limit.
    pub upgrades_per_ip_per_minute: u32,
    /// The proxies whose forwarding headers name a peer's address (for
    /// the per-IP limit and presence); none: the socket's address.
    pub trusted_proxies: TrustedProxies,
    /// Connections from the trusted proxies start with a PROXY protocol
    /// header (version 1 or 2), whose source address stands for the
    /// socket's.
    pub proxy_protocol: bool,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(5),
            pong_timeout: Duration::from_secs(10),
            max_message_bytes: muster_protocol::MAX_PAYLOAD_BYTES,
            presence_includes_cli: false,
            gateway_tenant: String::new(),
            touch_interval: Duration::from_secs(5),
            tls: None,
            edge_id: None,
            upgrades_per_ip_per_minute: 0,
            trusted_proxies: TrustedProxies::default(),
            proxy_protocol: false,
        }
    }
}

/// Channels to the services the edge calls.
#[derive(Debug, Clone)]
pub struct EdgePeers {
    pub identity: MeshChannel,
    pub presence: MeshChannel,
    pub backplane: MeshChannel,
}

/// One edge.
#[derive(Debug)]
pub struct Edge {
    pub edge_id: String,
    pub ws_url: String,
    pub started_at_ms: i64,
    config: EdgeConfig,
    peers: EdgePeers,
    registry: Registry,
    /// Recently verified tokens, by SHA-256 of the token: a burst of
    /// connections costs one identity call. `token.revoked` evicts.
    verified: std::sync::Mutex<std::collections::HashMap<[u8; 32], Verified>>,
    /// How many times the cache of verifications was emptied: a
    /// verification asked for before that is not cached after it. Changed
    /// under the cache's lock.
    verified_generation: std::sync::atomic::AtomicU64,
    /// How many gap markers closed this edge's peers (see pump): a peer
    /// whose token was verified before one is closed when it arrives after it.
    gaps: std::sync::atomic::AtomicU64,
    /// Tokens revoked lately, by id, and when the edge heard of it: a
    /// verification or a handshake already under way when `token.revoked`
    /// arrived must not outlive it. Taken after `verified` when both are.
    revoked: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Tokens changed lately (`token.updated`), by id: what each grants
    /// now, and when the edge heard of it. Claims that grant otherwise are
    /// stale.
    updated: std::sync::Mutex<std::collections::HashMap<String, (auth::Grant, std::time::Instant)>>,
    /// Presence changes (upserts, removals), batched into `UpdateInstances`.
    instance_changes: Batcher<pb::InstanceChange, pb::InstanceOutcome>,
    /// Directory changes (registrations, unregistrations), batched into
    /// `UpdateConnections`.
    connection_changes: Batcher<pb::ConnectionChange, pb::ItemOutcome>,
    /// The presence refresh's current round: a peer's entry found missing
    /// in a round is announced again only if it was written before that
    /// round began (see `registry::Announcing`).
    refresh_round: std::sync::atomic::AtomicU64,
    /// Set once the edge accepts peers: after its first stream from the
    /// backplane was answered, or [`STREAM_WAIT`] without one.
    accepting: std::sync::atomic::AtomicBool,
    /// Set once a stream from the backplane was answered.
    stream_answered: tokio::sync::watch::Sender<bool>,
    /// Set when untracking a departed connection's topic sessions failed:
    /// the next presence refresh looks for sessions of connections this
    /// edge no longer holds (see pump).
    untracks_failed: std::sync::atomic::AtomicBool,
    /// Set once presence has dropped the topic sessions of this edge's
    /// earlier run (under the same name): tracking waits for it, so that
    /// none of this run's sessions is dropped with them.
    topics_ready: tokio::sync::watch::Sender<bool>,
    upgrade_limit: limit::UpgradeLimit,
    shutdown: CancellationToken,
    /// Every upgraded connection's task. Once upgraded, a connection is no
    /// longer HTTP's to wait for at shutdown, and the process must not end
    /// before each has sent its 1001 and finished what its peer sent last.
    connections: tokio_util::task::TaskTracker,
}

/// At most this many changes share one batched call.
const MAX_BATCH: usize = 256;

/// How long a batched call to presence or the backplane may take before
/// its changes fail (and later ones go on without it).
const BATCH_DEADLINE: Duration = Duration::from_secs(10);

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unverified {
    /// Missing, unknown, revoked or otherwise refused by identity.
    Refused,
    /// Identity could not be asked (down, overloaded, timed out): the token
    /// may be good.
    Unavailable,
}

/// A token's claims, by the SHA-256 of the token, and when identity
/// confirmed them.
type Verified = (Arc<Claims>, std::time::Instant);

/// How long a verified token is trusted without asking identity again.
/// Revocation does not wait for it: `token.revoked` evicts at once.
const VERIFIED_TTL: Duration = Duration::from_secs(10);

/// How long one call to identity or presence may take (a token check, a
/// listing, a topic call; batched calls have [`BATCH_DEADLINE`]). A hung
/// service then fails the call as unavailable, as a stopped one does:
/// 1013 `try again later` for a token check, `internal_error` for a
/// request, instead of holding the peer's handshake or requests.
const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// A channel whose every call ends by [`CALL_DEADLINE`], for the calls
/// made for a peer. The edge's own calls to the backplane (the
/// subscription, acknowledgements, directory heartbeats) run one at a time
/// beside its other work, without one (see pump).
type Bounded = tower::timeout::Timeout<MeshChannel>;

/// How long the edge remembers a revoked token id.
const REVOKED_MEMORY: Duration = Duration::from_secs(600);

impl Edge {
    /// Whether the edge accepts peers yet (see [`serve_http`]): until it
    /// does, the host it runs in is not ready.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// An edge whose clients connect at `ws_addr`. Must be called inside a
    /// tokio runtime: it starts the tasks that batch calls to presence and
    /// the backplane.
    pub fn new(
        ws_addr: SocketAddr,
        config: EdgeConfig,
        peers: EdgePeers,
        shutdown: CancellationToken,
    ) -> Arc<Edge> {
        let instance_changes = batcher(&peers.presence, |channel, changes| async move {
            let request = pb::UpdateInstancesRequest { changes };
            let reply = PresenceClient::new(channel)
                .update_instances(request)
                .await?;
            Ok(reply.into_inner().outcomes)
        });
        let connection_changes = batcher(&peers.backplane, |channel, changes| async move {
            let request = pb::UpdateConnectionsRequest { changes };
            let reply = BackplaneClient::new(channel)
                .update_connections(request)
                .await?;
            Ok(reply.into_inner().outcomes)
        });
        Arc::new(Edge {
            edge_id: config
                .edge_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            ws_url: format!(
                "{}://{ws_addr}/ws",
                if config.tls.is_some() { "wss" } else { "ws" }
            ),
            started_at_ms: muster_store::now_ms(),
            upgrade_limit: limit::UpgradeLimit::new(config.upgrades_per_ip_per_minute),
            config,
            peers,
            registry: Registry::default(),
            verified: Default::default(),
            verified_generation: Default::default(),
            gaps: Default::default(),
            updated: Default::default(),
            revoked: Default::default(),
            instance_changes,
            connection_changes,
            refresh_round: Default::default(),
            untracks_failed: Default::default(),
            accepting: Default::default(),
            stream_answered: tokio::sync::watch::Sender::new(false),
            topics_ready: tokio::sync::watch::Sender::new(false),
            shutdown,
            connections: tokio_util::task::TaskTracker::new(),
        })
    }

    pub fn open_connections(&self) -> u64 {
        self.registry.len() as u64
    }

    /// The connections of one tenant's peers.
    pub(crate) fn tenant_connections(&self, tenant_id: &str) -> u64 {
        self.registry.tenant(tenant_id).len() as u64
    }

    fn identity(&self) -> IdentityClient<Bounded> {
        IdentityClient::new(tower::timeout::Timeout::new(
            self.peers.identity.clone(),
            CALL_DEADLINE,
        ))
        .max_decoding_message_size(LISTING_REPLY_BYTES)
    }

    fn presence(&self) -> PresenceClient<Bounded> {
        PresenceClient::new(tower::timeout::Timeout::new(
            self.peers.presence.clone(),
            CALL_DEADLINE,
        ))
        .max_decoding_message_size(LISTING_REPLY_BYTES)
    }

    fn backplane(&self) -> BackplaneClient<Bounded> {
        BackplaneClient::new(tower::timeout::Timeout::new(
            self.peers.backplane.clone(),
            CALL_DEADLINE,
        ))
    }

    /// Upserts (with `presence.upserted`) or removes (with
    /// `presence.pruned`) one instance, together with whatever other
    /// changes are waiting. An upsert returns the entry as stored; a
    /// removal, whether the instance was present.
    async fn change_instance(
        &self,
        change: pb::instance_change::Change,
    ) -> Result<(bool, Option<pb::InstanceEntry>), Status> {
        let change = pb::InstanceChange {
            change: Some(change),
        };
        let outcome = self.instance_changes.call(change).await?;
        let changed = outcome
            .outcome
            .ok_or_else(|| Status::internal("an outcome without a result"))?
            .into_result()?;
        Ok((changed, outcome.entry))
    }

    /// Registers or unregisters one connection in the directory, together
    /// with whatever other changes are waiting; whether it changed anything.
    async fn change_connection(
        &self,
        change: pb::connection_change::Change,
    ) -> Result<bool, Status> {
        let change = pb::ConnectionChange {
            change: Some(change),
        };
        self.connection_changes.call(change).await?.into_result()
    }

    /// Removes this edge's record of a connection from the directory;
    /// whether there was one.
    async fn unregister(&self, connection_id: String) -> Result<bool, Status> {
        let unregister = pb::UnregisterConnection {
            edge_id: self.edge_id.clone(),
            connection_id,
        };
        self.change_connection(pb::connection_change::Change::Unregister(unregister))
            .await
    }

    /// Resolves a presented token; `None` for anything identity does not
    /// recognize (the reason is never told to the peer).
    /// Connections made with one token share its claims.
    async fn verify(&self, token: Option<String>) -> Result<Arc<Claims>, Unverified> {
        use sha2::Digest;
        let token = token.ok_or(Unverified::Refused)?;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let generation = self.verified_generation.load(Ordering::Acquire);
        if let Some((claims, at)) = self.verified.lock().expect("cache lock").get(&digest)
            && at.elapsed() < VERIFIED_TTL
            && !claims.expired(muster_store::now_ms())
        {
            return Ok(claims.clone());
        }
        let mut claims = Arc::new(self.verify_remote(token.clone()).await?);
        if self.is_stale(&claims) {
            // Identity answered before a change this edge has heard of; it
            // answers with the change now.
            claims = Arc::new(self.verify_remote(token).await?);
        }
        let mut cache = self.verified.lock().expect("cache lock");
        // Revoked while identity was answering: the answer is stale.
        if self.is_revoked(&claims.token_id) {
            return Err(Unverified::Refused);
        }
        // Changed again while identity was answering: the peer tries again.
        if self.is_stale(&claims) {
            return Err(Unverified::Unavailable);
        }
        // Emptied while identity was answering (a gap, which may have
        // taken a revocation with it): the answer serves this peer, whose
        // arrival checks the gap, but is not kept for others.
        if self.verified_generation.load(Ordering::Acquire) != generation {
            return Ok(claims);
        }
        // Bounded: expired entries go whenever the cache grows large.
        if cache.len() > 10_000 {
            cache.retain(|_, (_, at)| at.elapsed() < VERIFIED_TTL);
        }
        cache.insert(digest, (claims.clone(), std::time::Instant::now()));
        Ok(claims)
    }

    /// Forgets every cached verification: the next presentation of any
    /// token asks identity.
    fn forget_verified(&self) {
        let mut cache = self.verified.lock().expect("cache lock");
        self.verified_generation.fetch_add(1, Ordering::AcqRel);
        cache.clear();
    }

    /// How many gap markers closed this edge's peers so far.
    fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::SeqCst)
    }

    /// Counts a gap marker, before this edge's peers are walked to close them:
    /// a peer joins the registry before it reads the count, so either the
    /// walk finds it or it sees the new count.
    fn count_gap(&self) {
        self.gaps.fetch_add(1, Ordering::SeqCst);
    }

    /// Remembers that `token_id` is revoked and forgets every cached
    /// verification of it.
    fn revoke_token(&self, token_id: &str) {
        let mut cache = self.verified.lock().expect("cache lock");
        let mut revoked = self.revoked.lock().expect("revoked lock");
        // Longer than any verification or handshake takes.
        revoked.retain(|_, at| at.elapsed() < REVOKED_MEMORY);
        revoked.insert(token_id.to_owned(), std::time::Instant::now());
        cache.retain(|_, (claims, _)| claims.token_id != token_id);
    }

    /// Notes what `token_id` grants since its latest change and forgets
    /// every cached verification of it that this makes stale.
    fn token_changed(&self, token_id: &str, grant: auth::Grant) {
        let mut cache = self.verified.lock().expect("cache lock");
        let mut updated = self.updated.lock().expect("updated lock");
        updated.retain(|_, (_, at)| at.elapsed() < REVOKED_MEMORY);
        // Identity orders a token's changes; only a later one replaces
        // what this edge knows.
        if updated
            .get(token_id)
            .is_some_and(|(known, _)| known.updated_at_ms >= grant.updated_at_ms)
        {
            return;
        }
        cache.retain(|_, (claims, _)| claims.token_id != token_id || !claims.stale_after(&grant));
        updated.insert(token_id.to_owned(), (grant, std::time::Instant::now()));
    }

    /// Whether the token changed lately, after these claims were given, to
    /// grant otherwise.
    fn is_stale(&self, claims: &Claims) -> bool {
        self.updated
            .lock()
            .expect("updated lock")
            .get(&claims.token_id)
            .is_some_and(|(grant, _)| claims.stale_after(grant))
    }

    /// Whether `token.revoked` named `token_id` lately.
    fn is_revoked(&self, token_id: &str) -> bool {
        self.revoked
            .lock()
            .expect("revoked lock")
            .contains_key(token_id)
    }

    async fn verify_remote(&self, token: String) -> Result<Claims, Unverified> {
        match self
            .identity()
            .verify_token(pb::VerifyTokenRequest { token })
            .await
        {
            Ok(reply) => {
                let c = reply.into_inner();
                Ok(Claims {
                    token_id: c.token_id,
                    tenant_id: c.tenant_id,
                    role: c.role,
                    scopes: c.scopes,
                    device_id: Some(c.device_id).filter(|d| !d.is_empty()),
                    expires_at_ms: Some(c.expires_at_ms).filter(|at| *at != 0),
                    updated_at_ms: c.updated_at_ms,
                })
            }
            // The mesh refused the edge's own call: the token was not
            // judged, so the peer may try again (4001 would tell a Tyrum
            // client its token is bad, and it would stop).
            Err(status) if status.metadata().contains_key(muster_mesh::REFUSED_BY_MESH) => {
                tracing::error!(code = ?status.code(), message = status.message(), "identity refused the edge's call");
                Err(Unverified::Unavailable)
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                        | tonic::Code::NotFound
                ) =>
            {
                Err(Unverified::Refused)
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "token verification failed");
                Err(Unverified::Unavailable)
            }
        }
    }
}

/// Who may call what on the edge; everything else is denied.
pub const RULES: &[Rule] = &[Rule::new("/muster.v1.Edge/DescribeEdge", &[Ctl])];

/// The gRPC face of an [`Edge`].
pub struct EdgeService {
    edge: Arc<Edge>,
}

/// The edge as the mesh serves it.
pub fn spec(edge: Arc<Edge>) -> ServiceSpec {
    ServiceSpec {
        name: muster_tls::ServiceName::Edge,
        grpc_service: "muster.v1.Edge",
        routes: tonic::service::Routes::new(EdgeServer::new(EdgeService { edge })),
        rules: RULES,
    }
}

#[tonic::async_trait]
impl EdgeRpc for EdgeService {
    async fn describe_edge(
        &self,
        _: Request<pb::DescribeEdgeRequest>,
    ) -> Result<Response<pb::EdgeDescription>, Status> {
        Ok(Response::new(pb::EdgeDescription {
            edge_id: self.edge.edge_id.clone(),
            ws_url: self.edge.ws_url.clone(),
            open_connections: self.edge.open_connections(),
            started_at_ms: self.edge.started_at_ms,
            version: env!("CARGO_PKG_VERSION").into(),
        }))
    }
}

/// Serves the edge's listener (`/ws`, `/healthz`, `/presence`, `/status`)
/// and its background work until shutdown; then every peer is closed with
/// 1001 `server shutdown`.
pub async fn serve_http(edge: Arc<Edge>, listener: TcpListener) -> std::io::Result<()> {
    let pump = tokio::spawn(pump::run(edge.clone()));
    let refresh = tokio::spawn(pump::refresh_presence(edge.clone()));
    tokio::spawn(pump::keep_directory(edge.clone()));
    // Peers are accepted once the stream is answered (the backplane has
    // read where it starts), so that none was verified before a start that
    // skips what came before it (see pump::missed). Not for longer than
    // STREAM_WAIT: without a backplane, the edge still serves what needs
    // none, and its later stream closes whom it accepted.
    let mut answered = edge.stream_answered.subscribe();
    tokio::select! {
        _ = answered.wait_for(|answered| *answered) => {}
        () = tokio::time::sleep(STREAM_WAIT) => {
            tracing::warn!(wait = ?STREAM_WAIT, "no stream from the backplane yet; accepting peers without it");
        }
        () = edge.shutdown.cancelled() => {}
    }
    edge.accepting.store(true, Ordering::Release);
    let tls = edge.config.tls.clone();
    let served = http::serve(edge, listener, tls).await;
    // The pump's last acknowledgement (at most 2 s) goes before it stops,
    // so that a restarted edge of this name resumes where this one ended.
    let mut pump = pump;
    if tokio::time::timeout(Duration::from_secs(3), &mut pump)
        .await
        .is_err()
    {
        pump.abort();
    }
    refresh.abort();
    served
}

/// How long a starting edge waits for its stream from the backplane
/// before it accepts peers anyway.
const STREAM_WAIT: Duration = Duration::from_secs(5);

/// Maps a failed call to another service onto the client protocol's error
/// code and message.
fn wire_error(status: &Status) -> (&'static str, String) {
    // A call the mesh refused is this deployment's fault (its rules, or
    // services of different versions), and its text names identities.
    if status.metadata().contains_key(muster_mesh::REFUSED_BY_MESH) {
        tracing::error!(code = ?status.code(), message = status.message(), "a service refused the edge's call");
        return ("internal_error", "internal error".to_owned());
    }
    let code = muster_mesh::ErrorCode::from_grpc(status.code());
    let message = match code {
        muster_mesh::ErrorCode::Internal | muster_mesh::ErrorCode::Unavailable => {
            "internal error".to_owned()
        }
        _ => status.message().to_owned(),
    };
    (code.wire(), message)
}
