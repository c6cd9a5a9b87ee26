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
    /// Newest first (then by id), a page as `listing` says.
    async fn list_approvals(
        &self,
        tenant_id: &str,
        listing: &Listing,
    ) -> Result<Vec<Approval>, StoreError>;
    /// Records the decision if the request is still pending and unexpired at
    /// `decided.decided_at_ms`; false otherwise.
    async fn decide_approval(
        &self,
        decided: &Approval,
        event: &NewItem,
    ) -> Result<bool, StoreError>;
}

/// A page of a tenant's approvals.
#[derive(Debug, Clone)]
pub struct Listing {
    /// Only those of this status at `now_ms` (a pending request past its
    /// expiry is expired).
    pub status: Option<Status>,
    pub now_ms: i64,
    /// After this (created_at_ms, approval_id), in listing order.
    pub after: Option<(i64, String)>,
    pub limit: u32,
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

    async fn list_approvals(
        &self,
        tenant_id: &str,
        listing: &Listing,
    ) -> Result<Vec<Approval>, StoreError> {
        // Expiry is a matter of time, not of a stored status: a pending
        // request past it lists as expired.
        let (status, by_time) = match listing.status {
            None => ("", false),
            Some(Status::Pending) => (" AND status = 'pending' AND expires_at_ms > $2", true),
            Some(Status::Expired) => (" AND status = 'pending' AND expires_at_ms <= $2", true),
            Some(Status::Approved) => (" AND status = 'approved'", false),
            Some(Status::Denied) => (" AND status = 'denied'", false),
        };
        // Parameters numbered in the order they are bound.
        let mut next = if by_time { 3 } else { 2 };
        let mut sql = format!("SELECT {COLUMNS} FROM approvals WHERE tenant_id = $1{status}");
        if listing.after.is_some() {
            sql += &format!(
                // The first condition lets the index seek; the rest orders
                // within a millisecond.
                " AND created_at_ms <= ${next} \
                 AND (created_at_ms < ${next} OR (created_at_ms = ${next} AND approval_id > ${}))",
                next + 1
            );
            next += 2;
        }
        sql += &format!(" ORDER BY created_at_ms DESC, approval_id LIMIT ${next}");
        let mut query = sqlx::query(&sql).bind(tenant_id);
        if by_time {
            query = query.bind(listing.now_ms);
        }
        if let Some((created_at_ms, approval_id)) = &listing.after {
            query = query.bind(*created_at_ms).bind(approval_id.clone());
        }
        self.fetch_all(query.bind(i64::from(listing.limit)), approval)
            .await
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
