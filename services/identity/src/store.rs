//! Identity's tables, on either backend.

use muster_store::outbox::{self, NewItem};
use muster_store::{Store, StoreError};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::Role;

/// An operator token as stored: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub token_id: String,
    pub tenant_id: String,
    pub role: Role,
    pub scopes: Vec<String>,
    pub label: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    /// The device a node token admits.
    pub device_id: Option<String>,
    /// From this moment on the token is refused; `None`: never.
    pub expires_at_ms: Option<i64>,
    /// When the token was last changed (0: never); strictly increasing per
    /// token, so that edges can order what they hear.
    pub updated_at_ms: i64,
    /// The token it was issued on behalf of, whose revocation revokes it.
    pub issued_by: Option<String>,
}

impl TokenRecord {
    /// Neither revoked nor expired at `now_ms`.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|at| now_ms < at)
    }
}

/// Where identity keeps its state. Each change commits with its event.
#[tonic::async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Stores a new token under the digest of its secret; false (and
    /// nothing stored) when the token it is issued by is no longer live at
    /// `now_ms`.
    async fn insert_token(
        &self,
        record: &TokenRecord,
        digest: &str,
        event: &NewItem,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
    async fn token_by_digest(&self, digest: &str) -> Result<Option<TokenRecord>, StoreError>;
    async fn token_by_id(&self, token_id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Marks a live token revoked if its version is still `previous`, and
    /// with it every live token issued on its behalf, and on theirs, each
    /// with its event from `revoked`; `None` when there was no such token,
    /// else the tokens revoked with it.
    async fn revoke_token(
        &self,
        token_id: &str,
        previous: i64,
        at_ms: i64,
        event: &NewItem,
        revoked: &(dyn for<'r> Fn(&'r TokenRecord) -> NewItem + Sync),
    ) -> Result<Option<Vec<TokenRecord>>, StoreError>;
    /// Replaces a live token's label, role, scopes, device, expiry and
    /// version with `record`'s if its version is still `previous`; false
    /// when there was no such token.
    async fn update_token(
        &self,
        record: &TokenRecord,
        previous: i64,
        event: &NewItem,
    ) -> Result<bool, StoreError>;
    async fn list_tokens(&self, tenant_id: &str) -> Result<Vec<TokenRecord>, StoreError>;
    /// Whether the database's first admin token was minted.
    async fn first_admin_minted(&self) -> Result<bool, StoreError>;
    /// Stores the first admin token, in one transaction with the claim
    /// that the database's admin token was minted; false (and nothing
    /// stored) when that claim was made before, by this process or another.
    async fn insert_first_admin(
        &self,
        record: &TokenRecord,
        digest: &str,
        event: &NewItem,
    ) -> Result<bool, StoreError>;
}

const COLUMNS: &str = "token_id, tenant_id, role, scopes, label, created_at_ms, revoked_at_ms, \
                       device_id, expires_at_ms, updated_at_ms, issued_by";

fn record(row: &AnyRow) -> Result<TokenRecord, StoreError> {
    let role: String = row.try_get("role")?;
    let scopes: String = row.try_get("scopes")?;
    Ok(TokenRecord {
        token_id: row.try_get("token_id")?,
        tenant_id: row.try_get("tenant_id")?,
        role: role
            .parse()
            .map_err(|_| StoreError::invalid("role", format!("stored role {role:?}")))?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        label: row.try_get("label")?,
        created_at_ms: row.try_get("created_at_ms")?,
        revoked_at_ms: row.try_get("revoked_at_ms")?,
        device_id: row.try_get("device_id")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        issued_by: row.try_get("issued_by")?,
    })
}

#[tonic::async_trait]
impl TokenStore for Store {
    async fn insert_token(
        &self,
        record: &TokenRecord,
        digest: &str,
        event: &NewItem,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        if let Some(issuer) = &record.issued_by {
            // Written, not read: the row's lock orders this insert and the
            // issuer's revocation, so that either the revocation finds this
            // token to revoke with it, or this finds the issuer revoked.
            let live = sqlx::query(
                "UPDATE operator_tokens SET revoked_at_ms = revoked_at_ms \
                 WHERE token_id = $1 AND tenant_id = $2 AND revoked_at_ms IS NULL \
                 AND (expires_at_ms IS NULL OR expires_at_ms > $3)",
            )
            .bind(issuer)
            .bind(&record.tenant_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !live {
                return Ok(false);
            }
        }
        insert(&mut tx, record, digest, event).await?;
        self.commit(tx).await?;
        Ok(true)
    }

    async fn insert_first_admin(
        &self,
        record: &TokenRecord,
        digest: &str,
        event: &NewItem,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO identity_bootstrap (step, at_ms) VALUES ('admin', $1) \
             ON CONFLICT (step) DO NOTHING",
        )
        .bind(record.created_at_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !claimed {
            return Ok(false);
        }
        insert(&mut tx, record, digest, event).await?;
        self.commit(tx).await?;
        Ok(true)
    }

    async fn first_admin_minted(&self) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM identity_bootstrap WHERE step = 'admin'")
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    async fn token_by_digest(&self, digest: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.fetch_optional(
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM operator_tokens WHERE digest = $1"
            ))
            .bind(digest),
            record,
        )
        .await
    }

    async fn token_by_id(&self, token_id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.fetch_optional(
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM operator_tokens WHERE token_id = $1"
            ))
            .bind(token_id),
            record,
        )
        .await
    }

    async fn revoke_token(
        &self,
        token_id: &str,
        previous: i64,
        at_ms: i64,
        event: &NewItem,
        revoked: &(dyn for<'r> Fn(&'r TokenRecord) -> NewItem + Sync),
    ) -> Result<Option<Vec<TokenRecord>>, StoreError> {
        let mut tx = self.begin().await?;
        let changed = sqlx::query(
            "UPDATE operator_tokens SET revoked_at_ms = $1 \
             WHERE token_id = $2 AND revoked_at_ms IS NULL AND updated_at_ms = $3",
        )
        .bind(at_ms)
        .bind(token_id)
        .bind(previous)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed != 1 {
            return Ok(None);
        }
        outbox::append(&mut tx, event).await?;
        // Down through tokens revoked before too. Again until a pass finds
        // nothing: on Postgres a pass reads the tokens committed when it
        // began, and one minted meanwhile under a token this pass revokes
        // held that token's row (`insert_token`), so the pass waited for
        // its commit and the next pass finds it; a mint after that finds
        // its issuer revoked.
        let mut issued = Vec::new();
        loop {
            let rows = sqlx::query(&format!(
                "WITH RECURSIVE issued (token_id) AS ( \
               SELECT token_id FROM operator_tokens WHERE issued_by = $1 \
               UNION SELECT t.token_id FROM operator_tokens t \
                 JOIN issued i ON t.issued_by = i.token_id) \
             UPDATE operator_tokens SET revoked_at_ms = $2 \
             WHERE token_id IN (SELECT token_id FROM issued) AND revoked_at_ms IS NULL \
             RETURNING {COLUMNS}"
            ))
            .bind(token_id)
            .bind(at_ms)
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                issued.push(record(row)?);
            }
        }
        let events: Vec<NewItem> = issued.iter().map(revoked).collect();
        outbox::append_all(&mut tx, &events).await?;
        self.commit(tx).await?;
        Ok(Some(issued))
    }

    async fn update_token(
        &self,
        record: &TokenRecord,
        previous: i64,
        event: &NewItem,
    ) -> Result<bool, StoreError> {
        let update = sqlx::query(
            "UPDATE operator_tokens SET label = $1, role = $2, scopes = $3, device_id = $4, \
             expires_at_ms = $5, updated_at_ms = $6 \
             WHERE token_id = $7 AND revoked_at_ms IS NULL AND updated_at_ms = $8",
        )
        .bind(&record.label)
        .bind(record.role.as_str())
        .bind(serde_json::to_string(&record.scopes).unwrap_or_default())
        .bind(record.device_id.as_deref())
        .bind(record.expires_at_ms)
        .bind(record.updated_at_ms)
        .bind(&record.token_id)
        .bind(previous);
        outbox::change_with_event(self, update, event).await
    }

    async fn list_tokens(&self, tenant_id: &str) -> Result<Vec<TokenRecord>, StoreError> {
        self.fetch_all(
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM operator_tokens WHERE tenant_id = $1 ORDER BY created_at_ms, token_id"
        ))
        .bind(tenant_id),
        record,
    ).await
    }
}

async fn insert(
    tx: &mut muster_store::Tx,
    record: &TokenRecord,
    digest: &str,
    event: &NewItem,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO operator_tokens (token_id, tenant_id, digest, role, scopes, label, \
         created_at_ms, device_id, expires_at_ms, issued_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&record.token_id)
    .bind(&record.tenant_id)
    .bind(digest)
    .bind(record.role.as_str())
    .bind(serde_json::to_string(&record.scopes).unwrap_or_default())
    .bind(&record.label)
    .bind(record.created_at_ms)
    .bind(record.device_id.as_deref())
    .bind(record.expires_at_ms)
    .bind(record.issued_by.as_deref())
    .execute(&mut **tx)
    .await?;
    outbox::append(tx, event).await?;
    Ok(())
}
