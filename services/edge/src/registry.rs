//! The edge's live connections, for event delivery and for closing the
//! connections of a revoked token.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use muster_protocol::close::Close;
use muster_store::outbox::Target;

use crate::auth::Claims;
use crate::outbound::Outbound;

/// One authenticated, handshaken connection.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) connection_id: String,
    pub(crate) device_id: String,
    /// `client` or `node`.
    pub(crate) role: &'static str,
    pub(crate) claims: Claims,
    /// Whether the peer is in instance presence (CLI connections are not).
    pub(crate) in_presence: bool,
    /// The remote address the edge saw.
    pub(crate) observed_ip: String,
    pub(crate) outbound: Outbound,
    /// Topics whose diffs this peer receives.
    pub(crate) topics: Arc<Mutex<HashSet<String>>>,
    /// Whether this peer ever tracked a topic session (only then is there
    /// anything to untrack when it closes).
    pub(crate) tracked: Arc<std::sync::atomic::AtomicBool>,
    /// Whether the connection directory has recorded this connection.
    pub(crate) registered: Arc<std::sync::atomic::AtomicBool>,
    /// Whether the directory dropped the record (the edge could not
    /// heartbeat in time): the peer's next frame closes it with 4004.
    pub(crate) expired: Arc<std::sync::atomic::AtomicBool>,
}

impl Peer {
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
    /// Shared: delivery takes a tenant's peers for every batch of items.
    peers: RwLock<HashMap<String, Arc<Peer>>>,
}

impl Registry {
    pub(crate) fn insert(&self, peer: Peer) {
        self.peers
            .write()
            .expect("registry lock")
            .insert(peer.connection_id.clone(), Arc::new(peer));
    }

    pub(crate) fn remove(&self, connection_id: &str) {
        self.peers
            .write()
            .expect("registry lock")
            .remove(connection_id);
    }

    pub(crate) fn contains(&self, connection_id: &str) -> bool {
        self.peers
            .read()
            .expect("registry lock")
            .contains_key(connection_id)
    }

    pub(crate) fn len(&self) -> usize {
        self.peers.read().expect("registry lock").len()
    }

    /// The peers of one tenant.
    pub(crate) fn tenant(&self, tenant_id: &str) -> Vec<Arc<Peer>> {
        self.peers
            .read()
            .expect("registry lock")
            .values()
            .filter(|p| p.claims.tenant_id == tenant_id)
            .cloned()
            .collect()
    }

    /// Every peer, for presence refresh.
    pub(crate) fn all(&self) -> Vec<Arc<Peer>> {
        self.peers
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Closes every connection made with `token_id`; returns how many.
    pub(crate) fn close_token(&self, tenant_id: &str, token_id: &str, close: Close) -> usize {
        let peers = self.peers.read().expect("registry lock");
        let mut closed = 0;
        for peer in peers
            .values()
            .filter(|p| p.claims.tenant_id == tenant_id && p.claims.token_id == token_id)
        {
            peer.outbound.close(close);
            closed += 1;
        }
        closed
    }

    /// Closes every connection (server shutdown).
    pub(crate) fn close_all(&self, close: Close) {
        for peer in self.peers.read().expect("registry lock").values() {
            peer.outbound.close(close);
        }
    }
}
