//! Presence's tables, on either backend.

use muster_store::outbox::{self, NewItem};
use muster_store::{Store, StoreError};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::InstanceEntry;

/// Where presence keeps its state. Each change commits with its event.
#[tonic::async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    async fn upsert_instance(
        &self,
        tenant_id: &str,
        entry: &InstanceEntry,
        event: &NewItem,
    ) -> Result<(), StoreError>;
    /// Newest first.
    async fn list_instances(&self, tenant_id: &str) -> Result<Vec<InstanceEntry>, StoreError>;
}

fn entry(row: &AnyRow) -> Result<InstanceEntry, StoreError> {
    let role: String = row.try_get("role")?;
    let last_input: i64 = row.try_get("last_input_seconds")?;
    Ok(InstanceEntry {
        instance_id: row.try_get("instance_id")?,
        role: role
            .parse()
            .map_err(|_| StoreError::invalid("role", format!("stored role {role:?}")))?,
        reported_host: row.try_get("reported_host")?,
        reported_ip: row.try_get("reported_ip")?,
        observed_ip: row.try_get("observed_ip")?,
        version: row.try_get("version")?,
        mode: row.try_get("mode")?,
        last_seen_at_ms: row.try_get("last_seen_at_ms")?,
        last_input_seconds: (last_input >= 0).then_some(last_input),
        reason: row.try_get("reason")?,
    })
}

#[tonic::async_trait]
impl PresenceStore for Store {
    async fn upsert_instance(
        &self,
        tenant_id: &str,
        entry: &InstanceEntry,
        event: &NewItem,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO instance_presence (tenant_id, instance_id, role, reported_host, reported_ip, \
             observed_ip, version, mode, last_seen_at_ms, last_input_seconds, reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (tenant_id, instance_id) DO UPDATE SET role = excluded.role, \
             reported_host = excluded.reported_host, reported_ip = excluded.reported_ip, \
             observed_ip = excluded.observed_ip, version = excluded.version, mode = excluded.mode, \
             last_seen_at_ms = excluded.last_seen_at_ms, \
             last_input_seconds = excluded.last_input_seconds, reason = excluded.reason",
        )
        .bind(tenant_id)
        .bind(&entry.instance_id)
        .bind(entry.role.as_str())
        .bind(&entry.reported_host)
        .bind(&entry.reported_ip)
        .bind(&entry.observed_ip)
        .bind(&entry.version)
        .bind(&entry.mode)
        .bind(entry.last_seen_at_ms)
        .bind(entry.last_input_seconds.unwrap_or(-1))
        .bind(&entry.reason)
        .execute(&mut *tx)
        .await?;
        outbox::append(&mut tx, event).await?;
        self.commit(tx).await?;
        Ok(())
    }

    async fn list_instances(&self, tenant_id: &str) -> Result<Vec<InstanceEntry>, StoreError> {
        self.fetch_all(
            sqlx::query(
                "SELECT instance_id, role, reported_host, reported_ip, observed_ip, version, mode, \
             last_seen_at_ms, last_input_seconds, reason FROM instance_presence \
             WHERE tenant_id = $1 ORDER BY last_seen_at_ms DESC, instance_id",
            )
            .bind(tenant_id),
            entry,
        )
        .await
    }
}
