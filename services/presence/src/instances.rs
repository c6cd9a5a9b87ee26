use std::str::FromStr;
use std::sync::Arc;

use muster_mesh::{ErrorCode, ServiceError};
use muster_protocol::format_datetime;
use muster_protocol::presence::{PresenceEntry, REASONS, wire_mode};
use muster_store::group::GroupCommit;
use muster_store::lease::Tenure;
use muster_store::outbox::NewItem;
use muster_store::text::{MAX_NAME_BYTES, check_name, check_text};
use muster_store::{StoreError, now_ms};
use serde_json::json;

use crate::PresenceStore;
use crate::store::InstanceWrite;

pub use muster_protocol::presence::MAX_FIELD;
use muster_protocol::presence::MAX_METADATA;

/// How presence forgets: entries unseen for `ttl` go, and beyond `cap`
/// entries per tenant the oldest go.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub ttl: std::time::Duration,
    pub cap: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            ttl: std::time::Duration::from_secs(60),
            cap: 500,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceRole {
    Gateway,
    Client,
    Node,
}

impl InstanceRole {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceRole::Gateway => "gateway",
            InstanceRole::Client => "client",
            InstanceRole::Node => "node",
        }
    }
}

impl FromStr for InstanceRole {
    type Err = PresenceError;

    fn from_str(s: &str) -> Result<Self, PresenceError> {
        match s {
            "gateway" => Ok(InstanceRole::Gateway),
            "client" => Ok(InstanceRole::Client),
            "node" => Ok(InstanceRole::Node),
            other => Err(PresenceError::Invalid(format!(
                "role must be gateway, client or node, not {other:?}"
            ))),
        }
    }
}

/// One device instance as presence knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEntry {
    /// The device id.
    pub instance_id: String,
    pub role: InstanceRole,
    /// Self-reported: diagnostic only.
    pub reported_host: String,
    /// Self-reported: diagnostic only.
    pub reported_ip: String,
    /// The remote address the edge saw.
    pub observed_ip: String,
    pub version: String,
    pub mode: String,
    pub last_seen_at_ms: i64,
    pub last_input_seconds: Option<i64>,
    pub reason: String,
    /// A JSON object (capabilities, edge id, what the peer sent).
    pub metadata: serde_json::Value,
    /// The edge whose connection wrote the entry last ('' when none): only
    /// its removal takes the entry away. Not on the wire.
    pub edge_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError for PresenceError {
    fn code(&self) -> ErrorCode {
        match self {
            PresenceError::Invalid(_) => ErrorCode::InvalidArgument,
            PresenceError::Store(e) => e.code(),
        }
    }

    fn store_error(&self) -> Option<&StoreError> {
        match self {
            PresenceError::Store(error) => Some(error),
            _ => None,
        }
    }
}

impl InstanceEntry {
    fn validate(&self) -> Result<(), PresenceError> {
        if self.instance_id.trim().is_empty() {
            return Err(PresenceError::Invalid("instance_id is required".into()));
        }
        for (name, value) in [
            ("instance_id", &self.instance_id),
            ("host", &self.reported_host),
            ("ip", &self.reported_ip),
            ("observed_ip", &self.observed_ip),
            ("version", &self.version),
            ("mode", &self.mode),
            ("reason", &self.reason),
            ("edge_id", &self.edge_id),
        ] {
            if value.len() > MAX_FIELD {
                return Err(PresenceError::Invalid(format!(
                    "{name} longer than {MAX_FIELD} bytes"
                )));
            }
            // Postgres refuses NUL in text; SQLite would keep it. Refused
            // here, on both, before it fails a whole batch of writes.
            if value.contains('\0') {
                return Err(PresenceError::Invalid(format!(
                    "{name} contains a NUL character"
                )));
            }
        }
        if matches!(self.last_input_seconds, Some(s) if s < 0) {
            return Err(PresenceError::Invalid(
                "last_input_seconds is negative".into(),
            ));
        }
        if !self.metadata.is_object() {
            return Err(PresenceError::Invalid(
                "metadata must be a json object".into(),
            ));
        }
        if self.metadata.to_string().len() > MAX_METADATA {
            return Err(PresenceError::Invalid(format!(
                "metadata larger than {MAX_METADATA} bytes"
            )));
        }
        // The entry travels in `presence.upserted`, and the outbox takes no
        // payload that names a secret: refused as the caller's mistake,
        // not found failing at the append.
        if let Some(key) = muster_store::outbox::find_secret_key(&self.metadata) {
            return Err(PresenceError::Invalid(format!(
                "metadata key {key:?} names a secret; secrets are not kept in presence"
            )));
        }
        Ok(())
    }

    /// The entry as the client protocol carries it (Part B §4). The
    /// self-reported host and ip fill `host` and `ip` as Tyrum does: a
    /// beacon's entry has only the ip its client reported (§9), the entry
    /// of a connect the client's address; the edge's own observation is
    /// always in `metadata.observed_ip`, labelled as such.
    pub fn wire(&self) -> PresenceEntry {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let mut metadata = self.metadata.clone();
        if let Some(map) = metadata.as_object_mut() {
            map.insert("observed_ip".into(), json!(self.observed_ip));
        }
        PresenceEntry {
            instance_id: self.instance_id.clone(),
            role: self.role.as_str().into(),
            host: some(&self.reported_host),
            ip: some(&self.reported_ip)
                .or_else(|| (self.reason == "connect").then(|| some(&self.observed_ip))?),
            version: some(&self.version),
            mode: wire_mode(&self.mode),
            last_seen_at: format_datetime(self.last_seen_at_ms),
            last_input_seconds: self.last_input_seconds,
            reason: REASONS
                .contains(&self.reason.as_str())
                .then(|| self.reason.clone()),
            metadata: Some(metadata),
        }
    }
}

/// `presence.pruned`, for operators only.
fn pruned_event(tenant_id: &str, instance_id: &str) -> NewItem {
    NewItem {
        audience_roles: vec!["client".into()],
        ..NewItem::event(
            tenant_id,
            "presence.pruned",
            json!({ "instance_id": instance_id }),
        )
    }
}

/// The payload of `presence.upserted`.
fn upserted(entry: &InstanceEntry) -> serde_json::Value {
    json!({ "entry": entry.wire() })
}

/// At most this many writes share one transaction.
const MAX_BATCH: usize = 128;

/// The lease under which one presence replica prunes.
pub const PRUNE_LEASE: &str = "presence.prune";

/// Instance presence: upsert and list.
#[derive(Clone)]
pub struct Instances {
    store: Arc<dyn PresenceStore>,
    writes: GroupCommit<InstanceWrite, bool>,
    retention: Retention,
}

/// What a touch found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touched {
    pub touched: u64,
    /// Ids that were not there to touch, at most as many as the tenant has
    /// room for under the cap.
    pub missing: Vec<String>,
    /// Presence took the touching edge for gone and keeps its topic
    /// sessions aside for it to revive ([`crate::Topics::revive_edge_sessions`]).
    pub sessions_kept: bool,
}

impl Instances {
    /// Must be called inside a tokio runtime: it starts the writer that
    /// commits concurrent changes together.
    pub fn new(store: Arc<dyn PresenceStore>) -> Self {
        Self::with_retention(store, Retention::default())
    }

    /// As [`Instances::new`], pruning by `retention`.
    pub fn with_retention(store: Arc<dyn PresenceStore>, retention: Retention) -> Self {
        let writer = store.clone();
        let writes = GroupCommit::start(MAX_BATCH, move |batch: Arc<[InstanceWrite]>| {
            let store = writer.clone();
            async move { store.write_instances(&batch).await }
        });
        Instances {
            store,
            writes,
            retention,
        }
    }

    async fn write(&self, write: InstanceWrite) -> Result<bool, StoreError> {
        self.writes.write(write).await
    }

    /// Creates or refreshes an entry (stamped now) and emits
    /// `presence.upserted` for operators in the same transaction.
    pub async fn upsert(
        &self,
        tenant_id: &str,
        entry: InstanceEntry,
    ) -> Result<InstanceEntry, PresenceError> {
        check_name("tenant_id", tenant_id, MAX_NAME_BYTES).map_err(PresenceError::Invalid)?;
        let entry = InstanceEntry {
            last_seen_at_ms: now_ms(),
            ..entry
        };
        entry.validate()?;
        let event = NewItem {
            // Nodes never receive presence (PROTOCOL.md Part B §3).
            audience_roles: vec!["client".into()],
            ..NewItem::event(tenant_id, "presence.upserted", upserted(&entry))
        };
        self.write(InstanceWrite::Upsert {
            tenant_id: tenant_id.to_owned(),
            entry: Box::new(entry.clone()),
            event,
        })
        .await?;
        Ok(entry)
    }

    pub async fn list(&self, tenant_id: &str) -> Result<Vec<InstanceEntry>, PresenceError> {
        Ok(self.store.list_instances(tenant_id).await?)
    }

    /// Broadcasts a node's report of its ready capabilities (Part B §6) to
    /// its tenant's operators as `capability.ready`, scoped to the node.
    /// Nothing is kept: the report is the node's connection's, and the
    /// next connect starts over. `capabilities` and `states` are JSON
    /// arrays, as the edge checked and filtered them.
    pub async fn report_capabilities(
        &self,
        tenant_id: &str,
        node_id: &str,
        capabilities: &str,
        states: &str,
    ) -> Result<(), PresenceError> {
        check_name("tenant_id", tenant_id, MAX_NAME_BYTES).map_err(PresenceError::Invalid)?;
        check_name("node_id", node_id, MAX_NAME_BYTES).map_err(PresenceError::Invalid)?;
        let array = |name: &str, text: &str| {
            if text.len() > MAX_CAPABILITY_REPORT {
                return Err(PresenceError::Invalid(format!(
                    "{name} larger than {MAX_CAPABILITY_REPORT} bytes"
                )));
            }
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(value) if value.is_array() => Ok(value),
                _ => Err(PresenceError::Invalid(format!(
                    "{name} must be a json array"
                ))),
            }
        };
        let payload = json!({
            "node_id": node_id,
            "capabilities": array("capabilities", capabilities)?,
            "capability_states": array("capability_states", states)?,
        });
        self.store
            .append_event(&NewItem {
                audience_roles: vec!["client".into()],
                ..NewItem::event(tenant_id, CAPABILITY_READY, payload)
            })
            .await?;
        Ok(())
    }

    /// Marks live instances seen now, without an event. Unknown ids are
    /// not created: they come back as missing, as many as fit under the
    /// cap, for their edge to announce again (an entry pruned while its
    /// peer stayed connected, after an outage longer than the TTL).
    pub async fn touch(
        &self,
        tenant_id: &str,
        instance_ids: &[String],
        edge_id: Option<&str>,
    ) -> Result<Touched, PresenceError> {
        if instance_ids.len() > 10_000 {
            return Err(PresenceError::Invalid(
                "at most 10000 instances per touch".into(),
            ));
        }
        check_name("tenant_id", tenant_id, MAX_NAME_BYTES).map_err(PresenceError::Invalid)?;
        if let Some(edge_id) = edge_id {
            check_name("edge_id", edge_id, MAX_NAME_BYTES).map_err(PresenceError::Invalid)?;
        }
        let (touched, sessions_kept) = self
            .store
            .touch_instances(tenant_id, instance_ids, edge_id, now_ms())
            .await?;
        let mut missing = Vec::new();
        if touched.len() < instance_ids.len() {
            let present: std::collections::HashSet<&str> =
                touched.iter().map(String::as_str).collect();
            missing = instance_ids
                .iter()
                .filter(|id| !present.contains(id.as_str()))
                .cloned()
                .collect();
            let held = self.store.count_instances(tenant_id).await?;
            let room = (self.retention.cap as u64).saturating_sub(held) as usize;
            missing.truncate(room);
        }
        Ok(Touched {
            touched: touched.len() as u64,
            missing,
            sessions_kept,
        })
    }

    /// Removes an instance that left (its last connection to `edge_id`
    /// closed) and emits `presence.pruned`; false when it was not present,
    /// or another edge wrote it since (the device reconnected there).
    pub async fn remove(
        &self,
        tenant_id: &str,
        instance_id: &str,
        edge_id: &str,
    ) -> Result<bool, PresenceError> {
        // Checked before the write joins a batch, which one refused
        // statement would fail whole.
        check_name("tenant_id", tenant_id, MAX_NAME_BYTES).map_err(PresenceError::Invalid)?;
        check_name("instance_id", instance_id, MAX_NAME_BYTES).map_err(PresenceError::Invalid)?;
        check_text("edge_id", edge_id, MAX_NAME_BYTES).map_err(PresenceError::Invalid)?;
        Ok(self
            .write(InstanceWrite::Remove {
                tenant_id: tenant_id.to_owned(),
                instance_id: instance_id.to_owned(),
                edge_id: edge_id.to_owned(),
                event: pruned_event(tenant_id, instance_id),
            })
            .await?)
    }

    /// Removes what `retention` no longer keeps, each with a
    /// `presence.pruned` event in the same transaction. Returns the
    /// removed entries' (tenant, instance) pairs.
    pub async fn prune(
        &self,
        retention: Retention,
    ) -> Result<Vec<(String, String)>, PresenceError> {
        let cutoff = now_ms().saturating_sub(millis(retention.ttl));
        Ok(self
            .store
            .prune_instances(cutoff, retention.cap, pruned_event)
            .await?)
    }

    /// Prunes instances, expires topic statuses and the sessions of dead
    /// edges every `every` until `shutdown`, in one replica at a time (the
    /// `presence.prune` lease).
    pub async fn prune_loop(
        self,
        topics: crate::Topics,
        every: std::time::Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let holder = uuid::Uuid::new_v4().to_string();
        let lease_ms = every.as_millis() as i64 * 3;
        // After a store outage longer than the TTL every entry has run
        // out, since no edge could refresh any, and every topic session
        // looks like a dead edge's: judged at once, every live peer would
        // leave presence and its topics, and come back at its edge's next
        // refresh. So the TTL is judged only once this replica has held
        // the lease for long enough that every live edge has refreshed
        // what it holds, and again so after its rounds were apart for
        // longer than entries outlive a refresh. The cap is not held off.
        let ttl = self.retention.ttl;
        let mut tenure = Tenure::new(
            REFRESHED_WITHIN.min(ttl),
            ttl.saturating_sub(EDGE_REFRESH).max(2 * every),
        );
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    let release = self.store.release_lease(PRUNE_LEASE, &holder);
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), release).await;
                    return;
                }
                _ = tokio::time::sleep(every) => {}
            }
            match self.store.lease(PRUNE_LEASE, &holder, lease_ms).await {
                Ok(true) => {}
                Ok(false) => {
                    tenure.lost();
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "presence prune lease unavailable");
                    continue;
                }
            }
            let mut retention = self.retention;
            if tenure.held(now_ms()) {
                match topics.expire_edges(retention.ttl).await {
                    Ok(0) => {}
                    Ok(left) => tracing::info!(
                        left,
                        "sessions of edges that stopped refreshing left their topics"
                    ),
                    Err(error) => tracing::warn!(%error, "expiring dead edges' sessions failed"),
                }
            } else {
                retention.ttl = std::time::Duration::MAX;
            }
            match self.prune(retention).await {
                Ok(pruned) if !pruned.is_empty() => {
                    tracing::info!(count = pruned.len(), "pruned presence entries");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "presence pruning failed"),
            }
            if let Err(error) = topics.expire().await {
                tracing::warn!(%error, "topic status expiry failed");
            }
        }
    }
}

/// The event a node's report of its ready capabilities is broadcast as.
pub const CAPABILITY_READY: &str = "capability.ready";

/// The largest report of capabilities, or of their states, presence
/// broadcasts (JSON text).
const MAX_CAPABILITY_REPORT: usize = 64 * 1024;

/// How often a live edge refreshes its peers' entries and topic sessions.
const EDGE_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Within how long a live edge has surely refreshed them: three of its
/// refreshes.
const REFRESHED_WITHIN: std::time::Duration = std::time::Duration::from_secs(15);

/// A duration in milliseconds, saturated: a lifetime too long for an `i64`
/// must not wrap into the past.
pub(crate) fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// What a connect reports (a device label, a version) as presence keeps it:
/// without NUL, cut to [`MAX_FIELD`] bytes at a character boundary. Part B
/// bounds neither, and a device with a long label still belongs in
/// presence.
pub fn connect_field(value: &str) -> String {
    let mut kept = String::with_capacity(value.len().min(MAX_FIELD));
    for c in value.chars().filter(|&c| c != '\0') {
        if kept.len() + c.len_utf8() > MAX_FIELD {
            break;
        }
        kept.push(c);
    }
    kept
}

#[cfg(test)]
mod tests {
    #[test]
    fn connect_fields_are_cut_at_a_character_boundary() {
        assert_eq!(super::connect_field("lab\0box"), "labbox");
        let long = "é".repeat(200);
        let kept = super::connect_field(&long);
        assert_eq!(kept.len(), 256);
        assert!(long.starts_with(&kept));
        let odd = format!("a{long}");
        assert_eq!(super::connect_field(&odd).len(), 255);
    }
}
