//! The connection directory: which edge holds which connection of which
//! device. Edges register connections as peers finish the handshake,
//! unregister them as they close, and heartbeat; the rows of an edge that
//! stops heartbeating expire. The backplane uses it to send a directed
//! item only to the edge that holds its target.

use muster_store::outbox::Target;
use muster_store::{Store, StoreError, now_ms};
use sqlx::Row;

/// How long a row lives without its edge's heartbeat.
pub const DIRECTORY_TTL_MS: i64 = 30_000;

/// One connection as its edge registers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub connection_id: String,
    pub tenant_id: String,
    pub device_id: String,
    pub edge_id: String,
    /// `client` or `node`.
    pub role: String,
}

impl Registration {
    fn validate(&self) -> Result<(), StoreError> {
        for (field, value) in [
            ("connection_id", &self.connection_id),
            ("tenant_id", &self.tenant_id),
            ("device_id", &self.device_id),
            ("edge_id", &self.edge_id),
        ] {
            if value.trim().is_empty() {
                return Err(StoreError::invalid(field, "required"));
            }
        }
        if self.role != "client" && self.role != "node" {
            return Err(StoreError::invalid("role", "client or node"));
        }
        Ok(())
    }
}

#[tonic::async_trait]
pub trait DirectoryStore: Send + Sync + 'static {
    async fn register(&self, registration: &Registration) -> Result<(), StoreError>;
    async fn unregister(&self, edge_id: &str, connection_id: &str) -> Result<bool, StoreError>;
    /// Extends the edge's rows and returns the connection ids it still
    /// holds there.
    async fn heartbeat(&self, edge_id: &str) -> Result<Vec<String>, StoreError>;
    /// Removes the edge's rows at once (a clean stop).
    async fn forget_edge(&self, edge_id: &str) -> Result<u64, StoreError>;
    /// Removes rows whose edge stopped heartbeating.
    async fn expire(&self) -> Result<u64, StoreError>;
    /// Whether `edge_id` holds the target of a directed item of
    /// `tenant_id`.
    async fn holds(
        &self,
        edge_id: &str,
        tenant_id: &str,
        target: &Target,
    ) -> Result<bool, StoreError>;
}

#[tonic::async_trait]
impl DirectoryStore for Store {
    async fn register(&self, r: &Registration) -> Result<(), StoreError> {
        r.validate()?;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO connections (connection_id, tenant_id, device_id, edge_id, role, \
             connected_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (connection_id) DO UPDATE SET tenant_id = excluded.tenant_id, \
             device_id = excluded.device_id, edge_id = excluded.edge_id, role = excluded.role, \
             expires_at_ms = excluded.expires_at_ms",
        )
        .bind(&r.connection_id)
        .bind(&r.tenant_id)
        .bind(&r.device_id)
        .bind(&r.edge_id)
        .bind(&r.role)
        .bind(now)
        .bind(now + DIRECTORY_TTL_MS)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn unregister(&self, edge_id: &str, connection_id: &str) -> Result<bool, StoreError> {
        let removed =
            sqlx::query("DELETE FROM connections WHERE connection_id = $1 AND edge_id = $2")
                .bind(connection_id)
                .bind(edge_id)
                .execute(self.pool())
                .await?
                .rows_affected();
        Ok(removed == 1)
    }

    async fn heartbeat(&self, edge_id: &str) -> Result<Vec<String>, StoreError> {
        if edge_id.trim().is_empty() {
            return Err(StoreError::invalid("edge_id", "required"));
        }
        sqlx::query("UPDATE connections SET expires_at_ms = $1 WHERE edge_id = $2")
            .bind(now_ms() + DIRECTORY_TTL_MS)
            .bind(edge_id)
            .execute(self.pool())
            .await?;
        self.fetch_all(
            sqlx::query("SELECT connection_id FROM connections WHERE edge_id = $1").bind(edge_id),
            |row| Ok(row.try_get::<String, _>(0)?),
        )
        .await
    }

    async fn forget_edge(&self, edge_id: &str) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM connections WHERE edge_id = $1")
            .bind(edge_id)
            .execute(self.pool())
            .await?
            .rows_affected())
    }

    async fn expire(&self) -> Result<u64, StoreError> {
        Ok(
            sqlx::query("DELETE FROM connections WHERE expires_at_ms < $1")
                .bind(now_ms())
                .execute(self.pool())
                .await?
                .rows_affected(),
        )
    }

    async fn holds(
        &self,
        edge_id: &str,
        tenant_id: &str,
        target: &Target,
    ) -> Result<bool, StoreError> {
        let query = match target {
            Target::Edge(id) => return Ok(id == edge_id),
            Target::Connection(id) => sqlx::query(
                "SELECT 1 FROM connections WHERE edge_id = $1 AND tenant_id = $2 \
                 AND connection_id = $3 AND expires_at_ms >= $4",
            )
            .bind(edge_id)
            .bind(tenant_id)
            .bind(id.as_str()),
            Target::Device(id) => sqlx::query(
                "SELECT 1 FROM connections WHERE edge_id = $1 AND tenant_id = $2 \
                 AND device_id = $3 AND expires_at_ms >= $4 LIMIT 1",
            )
            .bind(edge_id)
            .bind(tenant_id)
            .bind(id.as_str()),
        };
        Ok(self
            .fetch_optional(query.bind(now_ms()), |_| Ok(()))
            .await?
            .is_some())
    }
}
