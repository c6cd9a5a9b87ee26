//! Approvals' tables, on either backend.

use muster_store::outbox::{self, NewItem};
use muster_store::{Store, StoreError};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Approval, Status};

/// Where approvals keep their state. Each change commits with its event.
#[tonic::async_trait]
pub trait ApprovalStore: Send + Sync + 'static {
    async fn insert_approval(&self, approval: &Approval, event: &NewItem)
    -> Result<(), StoreError>;
    async fn approval(
        &self,
        tenant_id: &str,
        approval_id: &str,
    ) -> Result<Option<Approval>, StoreError>;
    /// Newest first.
    async fn list_approvals(&self, tenant_id: &str) -> Result<Vec<Approval>, StoreError>;
    /// Records the decision if the request is still pending and unexpired at
    /// `decided.decided_at_ms`; false otherwise.
    async fn decide_approval(
        &self,
        decided: &Approval,
        event: &NewItem,
    ) -> Result<bool, StoreError>;
}

const COLUMNS: &str = "approval_id, tenant_id, kind, context, status, created_at_ms, expires_at_ms, \
                       decided_at_ms, decided_by, reason";

fn approval(row: &AnyRow) -> Result<Approval, StoreError> {
    let status: String = row.try_get("status")?;
    let context: String = row.try_get("context")?;
    Ok(Approval {
        approval_id: row.try_get("approval_id")?,
        tenant_id: row.try_get("tenant_id")?,
        kind: row.try_get("kind")?,
        context: serde_json::from_str(&context).unwrap_or_default(),
        status: Status::parse(&status)
            .ok_or_else(|| StoreError::invalid("status", format!("stored status {status:?}")))?,
        created_at_ms: row.try_get("created_at_ms")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        decided_at_ms: row.try_get("decided_at_ms")?,
        decided_by: row.try_get("decided_by")?,
        reason: row.try_get("reason")?,
    })
}

#[tonic::async_trait]
impl ApprovalStore for Store {
    async fn insert_approval(&self, a: &Approval, event: &NewItem) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO approvals (approval_id, tenant_id, kind, context, status, created_at_ms, expires_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&a.approval_id)
        .bind(&a.tenant_id)
        .bind(&a.kind)
        .bind(a.context.to_string())
        .bind(a.status.as_str())
        .bind(a.created_at_ms)
        .bind(a.expires_at_ms)
        .execute(&mut *tx)
        .await?;
        outbox::append(&mut tx, event).await?;
        self.commit(tx).await?;
        Ok(())
    }

    async fn approval(
        &self,
        tenant_id: &str,
        approval_id: &str,
    ) -> Result<Option<Approval>, StoreError> {
        self.fetch_optional(
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM approvals WHERE tenant_id = $1 AND approval_id = $2"
            ))
            .bind(tenant_id)
            .bind(approval_id),
            approval,
        )
        .await
    }

    async fn list_approvals(&self, tenant_id: &str) -> Result<Vec<Approval>, StoreError> {
        self.fetch_all(
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE tenant_id = $1 ORDER BY created_at_ms DESC, approval_id"
        ))
        .bind(tenant_id),
        approval,
    ).await
    }

    async fn decide_approval(&self, d: &Approval, event: &NewItem) -> Result<bool, StoreError> {
        let decided_at = d.decided_at_ms.unwrap_or_default();
        let decide = sqlx::query(
            "UPDATE approvals SET status = $1, decided_at_ms = $2, decided_by = $3, reason = $4 \
             WHERE tenant_id = $5 AND approval_id = $6 AND status = 'pending' AND expires_at_ms > $2",
        )
        .bind(d.status.as_str())
        .bind(decided_at)
        .bind(&d.decided_by)
        .bind(&d.reason)
        .bind(&d.tenant_id)
        .bind(&d.approval_id);
        outbox::change_with_event(self, decide, event).await
    }
}
