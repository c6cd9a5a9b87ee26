//! The outbox append primitive: a service appends the event that describes
//! a state change in the same transaction as the change, so both commit or
//! neither does. The backplane reads and delivers what committed.

use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Store, StoreError, Tx, now_ms};

/// Who an item is addressed to, when it is directed rather than broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Device(String),
    Connection(String),
    Edge(String),
}

impl Target {
    fn parts(&self) -> (&'static str, &str) {
        match self {
            Target::Device(id) => ("device", id),
            Target::Connection(id) => ("connection", id),
            Target::Edge(id) => ("edge", id),
        }
    }

    fn from_parts(kind: Option<String>, id: Option<String>) -> Option<Target> {
        match (kind?.as_str(), id?) {
            ("device", id) => Some(Target::Device(id)),
            ("connection", id) => Some(Target::Connection(id)),
            ("edge", id) => Some(Target::Edge(id)),
            _ => None,
        }
    }
}

/// An item to append.
#[derive(Debug, Clone)]
pub struct NewItem {
    pub tenant_id: String,
    /// Stable id peers dedupe on; a UUID v4 unless the producer has one.
    pub event_id: String,
    pub kind: String,
    /// A JSON object. Keys that name secrets are refused.
    pub payload: Value,
    pub target: Option<Target>,
    /// Roles that may see the item; empty: every role.
    pub audience_roles: Vec<String>,
    /// Scopes of which a peer needs any; empty: none needed.
    pub audience_scopes: Vec<String>,
}

impl NewItem {
    /// A broadcast event for the whole tenant with a fresh event id.
    pub fn event(tenant_id: impl Into<String>, kind: impl Into<String>, payload: Value) -> Self {
        NewItem {
            tenant_id: tenant_id.into(),
            event_id: uuid::Uuid::new_v4().to_string(),
            kind: kind.into(),
            payload,
            target: None,
            audience_roles: Vec::new(),
            audience_scopes: Vec::new(),
        }
    }
}

/// A committed item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub position: i64,
    pub tenant_id: String,
    pub event_id: String,
    pub kind: String,
    pub payload: Value,
    pub target: Option<Target>,
    pub audience_roles: Vec<String>,
    pub audience_scopes: Vec<String>,
    pub occurred_at_ms: i64,
}

/// Field names that must never carry a value into the outbox.
const SECRET_KEYS: &[&str] = &[
    "token",
    "scoped_token",
    "secret",
    "password",
    "private_key",
    "api_key",
    "authorization",
];

fn find_secret_key(value: &Value) -> Option<String> {
    match value {
        Value::Object(map) => map.iter().find_map(|(key, v)| {
            let lower = key.to_ascii_lowercase();
            if SECRET_KEYS.contains(&lower.as_str()) || lower.ends_with("_secret") {
                Some(key.clone())
            } else {
                find_secret_key(v)
            }
        }),
        Value::Array(items) => items.iter().find_map(find_secret_key),
        _ => None,
    }
}

fn validate(item: &NewItem) -> Result<(), StoreError> {
    if item.tenant_id.trim().is_empty() {
        return Err(StoreError::invalid("tenant_id", "empty"));
    }
    if item.event_id.trim().is_empty() {
        return Err(StoreError::invalid("event_id", "empty"));
    }
    if item.kind.trim().is_empty() {
        return Err(StoreError::invalid("type", "empty"));
    }
    if !item.payload.is_object() {
        return Err(StoreError::invalid("payload", "not a json object"));
    }
    if let Some(key) = find_secret_key(&item.payload) {
        return Err(StoreError::SecretInPayload { key });
    }
    Ok(())
}

/// Appends `item` inside `tx` and returns its position. Nothing is visible
/// to readers until `tx` commits; if it rolls back, the item never existed.
pub async fn append(tx: &mut Tx, item: &NewItem) -> Result<i64, StoreError> {
    validate(item)?;
    let (target_kind, target_id) = match &item.target {
        Some(target) => {
            let (kind, id) = target.parts();
            (Some(kind), Some(id.to_owned()))
        }
        None => (None, None),
    };
    let row = sqlx::query(
        "INSERT INTO outbox (tenant_id, event_id, type, payload, target_kind, target_id, \
         audience_roles, audience_scopes, occurred_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING position",
    )
    .bind(&item.tenant_id)
    .bind(&item.event_id)
    .bind(&item.kind)
    .bind(item.payload.to_string())
    .bind(target_kind)
    .bind(target_id)
    .bind(serde_json::to_string(&item.audience_roles).unwrap_or_default())
    .bind(serde_json::to_string(&item.audience_scopes).unwrap_or_default())
    .bind(now_ms())
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.try_get(0)?)
}

const ITEM_COLUMNS: &str = "position, tenant_id, event_id, type, payload, target_kind, target_id, \
                            audience_roles, audience_scopes, occurred_at_ms";

/// Committed items of `tenant_id` after `after`, oldest first.
pub async fn read_after(
    store: &Store,
    tenant_id: &str,
    after: i64,
    limit: u32,
) -> Result<Vec<Item>, StoreError> {
    store
        .fetch_all(
            sqlx::query(&format!(
                "SELECT {ITEM_COLUMNS} FROM outbox \
         WHERE tenant_id = $1 AND position > $2 ORDER BY position LIMIT $3"
            ))
            .bind(tenant_id)
            .bind(after)
            .bind(i64::from(limit)),
            item_from_row,
        )
        .await
}

/// Committed items of every tenant after `after`, oldest first: what the
/// backplane streams to edges, which filter by tenant per connection.
pub async fn read_all_after(
    store: &Store,
    after: i64,
    limit: u32,
) -> Result<Vec<Item>, StoreError> {
    store
        .fetch_all(
            sqlx::query(&format!(
                "SELECT {ITEM_COLUMNS} FROM outbox WHERE position > $1 ORDER BY position LIMIT $2"
            ))
            .bind(after)
            .bind(i64::from(limit)),
            item_from_row,
        )
        .await
}

/// The position of the newest committed item, 0 when there is none.
pub async fn head(store: &Store) -> Result<i64, StoreError> {
    use sqlx::Row;
    let row = sqlx::query("SELECT COALESCE(MAX(position), 0) FROM outbox")
        .fetch_one(store.pool())
        .await?;
    Ok(row.try_get(0)?)
}

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn item_from_row(row: &AnyRow) -> Result<Item, StoreError> {
    let payload: String = row.try_get("payload")?;
    Ok(Item {
        position: row.try_get("position")?,
        tenant_id: row.try_get("tenant_id")?,
        event_id: row.try_get("event_id")?,
        kind: row.try_get("type")?,
        payload: serde_json::from_str(&payload).unwrap_or_else(|_| Value::Object(Map::new())),
        target: Target::from_parts(row.try_get("target_kind")?, row.try_get("target_id")?),
        audience_roles: json_list(&row.try_get::<String, _>("audience_roles")?),
        audience_scopes: json_list(&row.try_get::<String, _>("audience_scopes")?),
        occurred_at_ms: row.try_get("occurred_at_ms")?,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn secrets_are_found_at_any_depth() {
        assert_eq!(find_secret_key(&json!({"a": 1})), None);
        assert_eq!(
            find_secret_key(&json!({"pairing": {"Scoped_Token": "x"}})),
            Some("Scoped_Token".into())
        );
        assert_eq!(
            find_secret_key(&json!({"list": [{"client_secret": "x"}]})),
            Some("client_secret".into())
        );
        // A token's id is a handle, not a secret.
        assert_eq!(find_secret_key(&json!({"token_id": "t1"})), None);
    }
}
