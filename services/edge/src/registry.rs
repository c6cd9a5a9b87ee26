//! The edge's live connections, for event delivery and for closing the
//! connections of a revoked token.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
use std::sync::{Arc, Mutex, RwLock};

use muster_protocol::close::Close;
use muster_store::outbox::Target;

use crate::auth::Claims;
use crate::outbound::Outbound;

/// Topics one peer may subscribe to at most: what one peer holds in the
/// edge's memory stays bounded.
pub(crate) const PEER_TOPICS: usize = 1000;

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
    /// Whether the peer is in instance presence: CLI connections are not,
    /// unless the configuration includes them or they send a beacon.
    /// Changed under `presence_writes`.
    pub(crate) in_presence: std::sync::atomic::AtomicBool,
    /// What it last reported for its presence entry (at connect, or by a
    /// beacon): announced again when presence lost the entry while the
    /// peer stayed. `None` for peers left out of presence.
    pub(crate) reported: Mutex<Option<Box<Reported>>>,
    /// Where its presence entry stands: [`Announcing`] guards against a
    /// second upsert while one is in flight (a refresh that runs meanwhile
    /// would otherwise send the entry again, and its event twice).
    pub(crate) announcing: Announcing,
    /// The peer's presence writes (an announcement, a beacon) go one at a
    /// time, so that an announcement made with what the peer reported
    /// before never lands after, and undoes, a newer beacon.
    pub(crate) presence_writes: tokio::sync::Mutex<()>,
    /// The client's address as the edge resolved it (its socket's, or the
    /// one trusted proxies named).
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
    /// heartbeat in time): the peer is closed with 4004, by its next frame
    /// if that comes before the close is written.
    pub(crate) expired: std::sync::atomic::AtomicBool,
    /// The capability ids a node advertised at connect: only those count
    /// in its reports of ready capabilities (Part B §6).
    pub(crate) advertised: Box<[Box<str>]>,
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

/// Whether presence holds a peer's entry, as far as the edge knows, and
/// since which refresh round: the state in the low two bits, the round
/// above them.
#[derive(Debug, Default)]
pub(crate) struct Announcing(std::sync::atomic::AtomicU64);

impl Announcing {
    /// Not held (new, refused, or lost): the next refresh announces it.
    const PENDING: u64 = 0;
    const IN_FLIGHT: u64 = 1;
    const HELD: u64 = 2;
    /// Its connection closed: never announced again.
    const LEFT: u64 = 3;
    const STATE: u64 = 0b11;

    /// Claims the announcement; false when one is in flight or presence
    /// holds the entry already.
    pub(crate) fn start(&self) -> bool {
        self.0
            .fetch_update(AcqRel, Acquire, |v| {
                (v & Self::STATE == Self::PENDING).then_some(Self::IN_FLIGHT)
            })
            .is_ok()
    }

    /// Presence took the entry (an announcement or a beacon) during
    /// refresh round `round`, or refused an announcement.
    pub(crate) fn finish(&self, held: bool, round: u64) {
        let state = if held { Self::HELD } else { Self::PENDING };
        let _ = self.0.fetch_update(AcqRel, Acquire, |v| {
            (v & Self::STATE != Self::LEFT).then_some(round << 2 | state)
        });
    }

    /// The peer's connection closed: whatever is announcing it now or
    /// later does not write its entry again.
    pub(crate) fn leave(&self) {
        self.0.store(Self::LEFT, Release);
    }

    /// Presence did not have the entry when refresh round `round` looked:
    /// an entry held since before that round was lost (pruned, or the TTL
    /// after an outage). One written since, or in flight, may have landed
    /// after the look, so it is left alone.
    pub(crate) fn lost(&self, round: u64) {
        let _ = self.0.fetch_update(AcqRel, Acquire, |v| {
            (v & Self::STATE == Self::HELD && v >> 2 < round).then_some(Self::PENDING)
        });
    }

    pub(crate) fn is_pending(&self) -> bool {
        self.0.load(Acquire) & Self::STATE == Self::PENDING
    }
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
            edge_id: String::new(),
        }
    }

    /// Adds `topic` to the peer's subscriptions: `Some(true)` when it is
    /// new, `Some(false)` when it was there, `None` when the peer has
    /// [`PEER_TOPICS`] already.
    pub(crate) fn subscribe(&self, topic: &str) -> Option<bool> {
        let mut topics = self.topics.lock().expect("topics lock");
        if topics.contains(topic) {
            return Some(false);
        }
        if topics.len() >= PEER_TOPICS {
            return None;
        }
        Some(topics.insert(topic.to_owned()))
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
    pub(crate) fn close_token(
        &self,
        tenant_id: &str,
        token_id: &str,
        which: impl Fn(&crate::Claims) -> bool,
        close: Close,
    ) -> usize {
        let tenants = self.peers.read().expect("registry lock");
        let mut closed = 0;
        for peer in tenants
            .get(tenant_id)
            .into_iter()
            .flat_map(|peers| peers.values())
            .filter(|p| p.claims.token_id == token_id && which(&p.claims))
        {
            peer.outbound.close(close);
            closed += 1;
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::Announcing;

    #[test]
    fn an_entry_is_announced_once_at_a_time_and_again_only_once_lost() {
        let state = Announcing::default();
        assert!(state.is_pending());
        assert!(state.start());
        assert!(!state.start(), "one announcement in flight at a time");
        // A refresh that finds the entry missing while it is being written
        // leaves it to the write in flight.
        state.lost(1);
        assert!(!state.is_pending());
        state.finish(true, 1);
        assert!(!state.start(), "held: nothing to announce");
        // Written during round 1: round 1's look may predate the write.
        state.lost(1);
        assert!(!state.is_pending());
        // Round 2 looked after the write: the entry is gone.
        state.lost(2);
        assert!(state.is_pending());
        assert!(state.start());
        // Refused: the next refresh tries again.
        state.finish(false, 2);
        assert!(state.is_pending());
    }

    #[test]
    fn a_peer_that_left_is_never_announced_again() {
        let state = Announcing::default();
        assert!(state.start());
        state.leave();
        // The announcement in flight when the peer left ends…
        state.finish(false, 1);
        assert!(
            !state.is_pending(),
            "a refused write does not make it pending"
        );
        state.finish(true, 1);
        state.lost(2);
        // …and nothing starts another.
        assert!(!state.is_pending());
        assert!(!state.start());
    }
}
