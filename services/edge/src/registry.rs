//! The edge's live connections, for event delivery and for closing the
//! connections of a revoked token.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use muster_protocol::close::Close;
use muster_store::outbox::Target;

use crate::auth::Claims;
use crate::outbound::Outbound;

/// One authenticated, handshaken connection: held once (behind an `Arc`)
/// by the registry and the connection's task, which matters at tens of
/// thousands of idle peers.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) connection_id: String,
    pub(crate) device_id: String,
    /// `client` or `node`.
    pub(crate) role: &'static str,
    pub(crate) claims: Arc<Claims>,
    /// Whether the peer is in instance presence (CLI connections are not).
    pub(crate) in_presence: bool,
    /// What it last reported for its presence entry (at connect, or by a
    /// beacon): announced again when presence lost the entry while the
    /// peer stayed. `None` for peers left out of presence.
    pub(crate) reported: Mutex<Option<Box<Reported>>>,
    /// Whether presence took the entry; if not, the next refresh tries
    /// again.
    pub(crate) announced: std::sync::atomic::AtomicBool,
    /// The remote address the edge saw.
    pub(crate) observed_ip: String,
    pub(crate) outbound: Outbound,
    /// Topics whose diffs this peer receives.
    pub(crate) topics: Mutex<HashSet<String>>,
    /// Whether this peer ever tracked a topic session (only then is there
    /// anything to untrack when it closes).
    pub(crate) tracked: std::sync::atomic::AtomicBool,
    /// Whether the connection directory has recorded this connection.
    pub(crate) registered: std::sync::atomic::AtomicBool,
    /// Whether the directory dropped the record (the edge could not
    /// heartbeat in time): the peer's next frame closes it with 4004.
    pub(crate) expired: std::sync::atomic::AtomicBool,
}

/// What a peer reported about itself for presence; the rest of its entry
/// (id, role, observed address) is the peer's own.
#[derive(Debug, Clone)]
pub(crate) struct Reported {
    pub(crate) host: String,
    pub(crate) ip: String,
    pub(crate) version: String,
    pub(crate) mode: String,
    /// -1 when not reported.
    pub(crate) last_input_seconds: i64,
    /// A JSON object.
    pub(crate) metadata_json: String,
    pub(crate) reason: &'static str,
}

impl Peer {
    /// The peer's presence entry, as it reported itself.
    pub(crate) fn entry(&self, reported: &Reported) -> muster_proto::v1::InstanceEntry {
        muster_proto::v1::InstanceEntry {
            instance_id: self.device_id.clone(),
            role: self.role.into(),
            reported_host: reported.host.clone(),
            reported_ip: reported.ip.clone(),
            observed_ip: self.observed_ip.clone(),
            version: reported.version.clone(),
            mode: reported.mode.clone(),
            last_seen_at_ms: 0,
            last_input_seconds: reported.last_input_seconds,
            reason: reported.reason.into(),
            metadata_json: reported.metadata_json.clone(),
        }
    }

    pub(crate) fn subscribe(&self, topic: &str) {
        self.topics
            .lock()
            .expect("topics lock")
            .insert(topic.to_owned());
    }

    pub(crate) fn unsubscribe(&self, topic: &str) {
        self.topics.lock().expect("topics lock").remove(topic);
    }

    pub(crate) fn subscribed(&self, topic: &str) -> bool {
        self.topics.lock().expect("topics lock").contains(topic)
    }

    /// Whether an item for this audience and target may reach this peer.
    pub(crate) fn admits(
        &self,
        roles: &[String],
        scopes: &[String],
        target: Option<&Target>,
    ) -> bool {
        let targeted = match target {
            None => true,
            Some(Target::Device(id)) => *id == self.device_id,
            Some(Target::Connection(id)) => *id == self.connection_id,
            Some(Target::Edge(_)) => false,
        };
        targeted
            && (roles.is_empty() || roles.iter().any(|r| r == self.role))
            && (scopes.is_empty()
                || self.claims.is_admin()
                || self.claims.has_any_scope(scopes.iter().map(String::as_str)))
    }
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// By tenant, then connection id: delivery takes one tenant's peers
    /// for every batch of items, without looking at any other tenant's.
    peers: RwLock<HashMap<String, HashMap<String, Arc<Peer>>>>,
}

impl Registry {
    pub(crate) fn insert(&self, peer: Arc<Peer>) {
        self.peers
            .write()
            .expect("registry lock")
            .entry(peer.claims.tenant_id.clone())
            .or_default()
            .insert(peer.connection_id.clone(), peer);
    }

    pub(crate) fn remove(&self, connection_id: &str) {
        let mut tenants = self.peers.write().expect("registry lock");
        // Tenants are few; a peer's tenant is found by looking.
        let emptied = tenants.iter_mut().find_map(|(tenant, peers)| {
            peers.remove(connection_id)?;
            peers.is_empty().then(|| tenant.clone())
        });
        if let Some(tenant) = emptied {
            tenants.remove(&tenant);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.peers
            .read()
            .expect("registry lock")
            .values()
            .map(HashMap::len)
            .sum()
    }

    /// The peers of one tenant.
    pub(crate) fn tenant(&self, tenant_id: &str) -> Vec<Arc<Peer>> {
        self.peers
            .read()
            .expect("registry lock")
            .get(tenant_id)
            .map(|peers| peers.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every peer, for presence refresh.
    pub(crate) fn all(&self) -> Vec<Arc<Peer>> {
        self.peers
            .read()
            .expect("registry lock")
            .values()
            .flat_map(|peers| peers.values().cloned())
            .collect()
    }

    /// Closes every connection made with `token_id`; returns how many.
    pub(crate) fn close_token(&self, tenant_id: &str, token_id: &str, close: Close) -> usize {
        let tenants = self.peers.read().expect("registry lock");
        let mut closed = 0;
        for peer in tenants
            .get(tenant_id)
            .into_iter()
            .flat_map(|peers| peers.values())
            .filter(|p| p.claims.token_id == token_id)
        {
            peer.outbound.close(close);
            closed += 1;
        }
        closed
    }

    /// Closes every connection (server shutdown).
    pub(crate) fn close_all(&self, close: Close) {
        for peers in self.peers.read().expect("registry lock").values() {
            for peer in peers.values() {
                peer.outbound.close(close);
            }
        }
    }
}
