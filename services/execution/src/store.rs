//! Execution's tables, on either backend.

use muster_store::outbox::{self, NewItem};
use muster_store::{Store, StoreError};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::Run;

/// Where execution keeps its state. Each change commits with its event.
#[tonic::async_trait]
pub trait RunStore: Send + Sync + 'static {
    /// Inserts the run with its event, unless its idempotency key already
    /// names a run: then nothing is written and that run is returned, with
    /// its specification's text as stored.
    async fn insert_run(
        &self,
        run: &Run,
        event: &NewItem,
    ) -> Result<Option<(Run, String)>, StoreError>;
    async fn run(&self, tenant_id: &str, run_id: &str) -> Result<Option<Run>, StoreError>;
}

const COLUMNS: &str = "run_id, tenant_id, idempotency_key, spec, status, created_at_ms";

fn run(row: &AnyRow) -> Result<Run, StoreError> {
    let spec: String = row.try_get("spec")?;
    Ok(Run {
        run_id: row.try_get("run_id")?,
        tenant_id: row.try_get("tenant_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        spec: serde_json::from_str(&spec).unwrap_or_default(),
        status: row.try_get("status")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

#[tonic::async_trait]
impl RunStore for Store {
    async fn insert_run(
        &self,
        r: &Run,
        event: &NewItem,
    ) -> Result<Option<(Run, String)>, StoreError> {
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO runs (run_id, tenant_id, idempotency_key, spec, status, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
        )
        .bind(&r.run_id)
        .bind(&r.tenant_id)
        .bind(&r.idempotency_key)
        .bind(r.spec.to_string())
        .bind(&r.status)
        .bind(r.created_at_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            let existing = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM runs WHERE tenant_id = $1 AND idempotency_key = $2"
            ))
            .bind(&r.tenant_id)
            .bind(&r.idempotency_key)
            .fetch_one(&mut *tx)
            .await?;
            return Ok(Some((run(&existing)?, existing.try_get("spec")?)));
        }
        outbox::append(&mut tx, event).await?;
        self.commit(tx).await?;
        Ok(None)
    }

    async fn run(&self, tenant_id: &str, run_id: &str) -> Result<Option<Run>, StoreError> {
        self.fetch_optional(
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM runs WHERE tenant_id = $1 AND run_id = $2"
            ))
            .bind(tenant_id)
            .bind(run_id),
            run,
        )
        .await
    }
}
