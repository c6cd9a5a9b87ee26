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
    async fn touch_instances(
        &self,
        tenant_id: &str,
        instance_ids: &[String],
        at_ms: i64,
    ) -> Result<u64, StoreError>;
    /// Deletes one entry with its event; false when there was none.
    async fn remove_instance(
        &self,
        tenant_id: &str,
        instance_id: &str,
        event: &NewItem,
    ) -> Result<bool, StoreError>;
    /// Deletes entries last seen before `cutoff_ms` and, per tenant, all
    /// but the newest `cap`, appending `event(tenant, instance)` for each.
    async fn prune_instances(
        &self,
        cutoff_ms: i64,
        cap: usize,
        event: for<'a> fn(&'a str, &'a str) -> NewItem,
    ) -> Result<Vec<(String, String)>, StoreError>;
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
        metadata: serde_json::from_str(&row.try_get::<String, _>("metadata")?).unwrap_or_default(),
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
             observed_ip, version, mode, last_seen_at_ms, last_input_seconds, reason, metadata) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (tenant_id, instance_id) DO UPDATE SET role = excluded.role, \
             reported_host = excluded.reported_host, reported_ip = excluded.reported_ip, \
             observed_ip = excluded.observed_ip, version = excluded.version, mode = excluded.mode, \
             last_seen_at_ms = excluded.last_seen_at_ms, \
             last_input_seconds = excluded.last_input_seconds, reason = excluded.reason, \
             metadata = excluded.metadata",
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
        .bind(entry.metadata.to_string())
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
             last_seen_at_ms, last_input_seconds, reason, metadata FROM instance_presence \
             WHERE tenant_id = $1 ORDER BY last_seen_at_ms DESC, instance_id",
            )
            .bind(tenant_id),
            entry,
        )
        .await
    }

    async fn touch_instances(
        &self,
        tenant_id: &str,
        instance_ids: &[String],
        at_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut touched = 0;
        let mut tx = self.begin().await?;
        for instance_id in instance_ids {
            touched += sqlx::query(
                "UPDATE instance_presence SET last_seen_at_ms = $1 \
                 WHERE tenant_id = $2 AND instance_id = $3",
            )
            .bind(at_ms)
            .bind(tenant_id)
            .bind(instance_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        self.commit(tx).await?;
        Ok(touched)
    }

    async fn prune_instances(
        &self,
        cutoff_ms: i64,
        cap: usize,
        event: for<'a> fn(&'a str, &'a str) -> NewItem,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "SELECT tenant_id, instance_id FROM (SELECT tenant_id, instance_id, last_seen_at_ms, \
             ROW_NUMBER() OVER (PARTITION BY tenant_id ORDER BY last_seen_at_ms DESC, instance_id) AS rank \
             FROM instance_presence) ranked WHERE last_seen_at_ms < $1 OR rank > $2",
        )
        .bind(cutoff_ms)
        .bind(cap as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut pruned = Vec::with_capacity(rows.len());
        for row in &rows {
            let tenant_id: String = row.try_get("tenant_id")?;
            let instance_id: String = row.try_get("instance_id")?;
            sqlx::query("DELETE FROM instance_presence WHERE tenant_id = $1 AND instance_id = $2")
                .bind(&tenant_id)
                .bind(&instance_id)
                .execute(&mut *tx)
                .await?;
            outbox::append(&mut tx, &event(&tenant_id, &instance_id)).await?;
            pruned.push((tenant_id, instance_id));
        }
        self.commit(tx).await?;
        Ok(pruned)
    }

    async fn remove_instance(
        &self,
        tenant_id: &str,
        instance_id: &str,
        event: &NewItem,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let removed =
            sqlx::query("DELETE FROM instance_presence WHERE tenant_id = $1 AND instance_id = $2")
                .bind(tenant_id)
                .bind(instance_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if removed == 0 {
            return Ok(false);
        }
        outbox::append(&mut tx, event).await?;
        self.commit(tx).await?;
        Ok(true)
    }
}
