use std::str::FromStr;
use std::sync::Arc;

use muster_mesh::{ErrorCode, ServiceError};
use muster_store::outbox::NewItem;
use muster_store::{StoreError, now_ms};
use serde_json::json;

use crate::PresenceStore;

/// Longest text a presence field may hold.
const MAX_FIELD: usize = 256;

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
        ] {
            if value.len() > MAX_FIELD {
                return Err(PresenceError::Invalid(format!(
                    "{name} longer than {MAX_FIELD} bytes"
                )));
            }
        }
        if matches!(self.last_input_seconds, Some(s) if s < 0) {
            return Err(PresenceError::Invalid(
                "last_input_seconds is negative".into(),
            ));
        }
        Ok(())
    }

    fn payload(&self) -> serde_json::Value {
        json!({
            "instance_id": self.instance_id,
            "role": self.role.as_str(),
            "reported": {"host": self.reported_host, "ip": self.reported_ip},
            "observed_ip": self.observed_ip,
            "version": self.version,
            "mode": self.mode,
            "last_seen_at_ms": self.last_seen_at_ms,
            "last_input_seconds": self.last_input_seconds,
            "reason": self.reason,
        })
    }
}

/// Instance presence: upsert and list.
#[derive(Clone)]
pub struct Instances {
    store: Arc<dyn PresenceStore>,
}

impl Instances {
    pub fn new(store: Arc<dyn PresenceStore>) -> Self {
        Instances { store }
    }

    /// Creates or refreshes an entry (stamped now) and emits
    /// `presence.upserted` for operators in the same transaction.
    pub async fn upsert(
        &self,
        tenant_id: &str,
        entry: InstanceEntry,
    ) -> Result<InstanceEntry, PresenceError> {
        if tenant_id.trim().is_empty() {
            return Err(PresenceError::Invalid("tenant_id is required".into()));
        }
        let entry = InstanceEntry {
            last_seen_at_ms: now_ms(),
            ..entry
        };
        entry.validate()?;
        let event = NewItem {
            // Nodes never receive presence (PROTOCOL.md Part B §3).
            audience_roles: vec!["client".into()],
            ..NewItem::event(tenant_id, "presence.upserted", entry.payload())
        };
        self.store
            .upsert_instance(tenant_id, &entry, &event)
            .await?;
        Ok(entry)
    }

    pub async fn list(&self, tenant_id: &str) -> Result<Vec<InstanceEntry>, PresenceError> {
        Ok(self.store.list_instances(tenant_id).await?)
    }
}
