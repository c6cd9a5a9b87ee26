//! The outbox append primitive: a service appends the event that describes
//! a state change in the same transaction as the change, so both commit or
//! neither does. The backplane reads and delivers what committed.

use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Backend, Store, StoreError, Tx, now_ms};

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

/// Field names that must never carry a value into the outbox, compared
/// in lower case without separators (`apiKey`, `api-key` and `api_key`
/// alike).
const SECRET_KEYS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "privatekey",
    "apikey",
    "authorization",
    "cookie",
    "credential",
    "credentials",
];

/// Endings that make a field name a secret's (`scoped_token`,
/// `access_token`, `client_secret`, `db_password`, `signing_private_key`).
const SECRET_ENDINGS: &[&str] = &["token", "secret", "password", "privatekey", "apikey"];

fn names_a_secret(key: &str) -> bool {
    let key: String = key
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    SECRET_KEYS.contains(&key.as_str()) || SECRET_ENDINGS.iter().any(|end| key.ends_with(end))
}

/// The first key in `value`, at any depth, that names a secret: such a
/// payload is never appended.
pub fn find_secret_key(value: &Value) -> Option<String> {
    match value {
        Value::Object(map) => map.iter().find_map(|(key, v)| {
            if names_a_secret(key) {
                Some(key.clone())
            } else {
                find_secret_key(v)
            }
        }),
        Value::Array(items) => items.iter().find_map(find_secret_key),
        _ => None,
    }
}

/// The most an item's payload may take, as JSON. An item travels to every
/// edge as one gRPC message, which a client refuses past 4 MiB: one larger
/// item would stop every edge's stream at it until compaction took it.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Checks `item`; its payload as JSON when it may be appended.
fn validate(item: &NewItem) -> Result<String, StoreError> {
    let target = item.target.as_ref().map(|target| target.parts().1);
    for (field, value) in [
        ("tenant_id", item.tenant_id.as_str()),
        ("event_id", &item.event_id),
        ("type", &item.kind),
    ]
    .into_iter()
    .chain(target.map(|id| ("target_id", id)))
    {
        // The error names the field itself.
        crate::text::check_name(field, value, crate::text::MAX_NAME_BYTES).map_err(|reason| {
            let reason = reason.strip_prefix(field).unwrap_or(&reason).trim_start();
            StoreError::invalid(field, reason)
        })?;
    }
    if !item.payload.is_object() {
        return Err(StoreError::invalid("payload", "not a json object"));
    }
    if let Some(key) = find_secret_key(&item.payload) {
        return Err(StoreError::SecretInPayload { key });
    }
    let payload = item.payload.to_string();
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(StoreError::invalid(
            "payload",
            format!("larger than {MAX_PAYLOAD_BYTES} bytes"),
        ));
    }
    Ok(payload)
}

/// Appends `item` inside `tx`. Nothing is visible to readers until `tx`
/// commits; if it rolls back, the item never existed. The item's position
/// is known once it is readable: on SQLite at insert (one writer at a time
/// means insert order is commit order), on Postgres when [`sequence`] gives
/// it one after the commit.
pub async fn append(tx: &mut Tx, item: &NewItem) -> Result<(), StoreError> {
    append_all(tx, [item]).await
}

/// Appends `items` inside `tx` in order, as [`append`] does each, but
/// many items per statement (up to 64; see [`crate::in_statements`])
/// instead of one per item: a round trip per statement is most of an
/// append's cost. Every item is checked before anything is written, so a
/// bad one writes none.
///
/// Plain `INSERT`s only (no `OR IGNORE`, no upsert): positions must stay
/// dense, since a follower takes a jump in them for items compacted before
/// it read them (see [`head`]).
pub async fn append_all<'a>(
    tx: &mut Tx,
    items: impl IntoIterator<Item = &'a NewItem>,
) -> Result<(), StoreError> {
    let items = items
        .into_iter()
        .map(|item| Ok((item, validate(item)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let occurred_at_ms = now_ms();
    for chunk in crate::in_statements(&items, 9) {
        let mut sql = String::from(
            "INSERT INTO outbox (tenant_id, event_id, type, payload, target_kind, target_id, \
             audience_roles, audience_scopes, occurred_at_ms) VALUES ",
        );
        sql.push_str(&crate::values_rows(chunk.len(), 9));
        let mut query = sqlx::query(&sql);
        for (item, payload) in chunk {
            let (target_kind, target_id) = match &item.target {
                Some(target) => {
                    let (kind, id) = target.parts();
                    (Some(kind), Some(id.to_owned()))
                }
                None => (None, None),
            };
            query = query
                .bind(item.tenant_id.clone())
                .bind(item.event_id.clone())
                .bind(item.kind.clone())
                .bind(payload.clone())
                .bind(target_kind)
                .bind(target_id)
                .bind(serde_json::to_string(&item.audience_roles).unwrap_or_default())
                .bind(serde_json::to_string(&item.audience_scopes).unwrap_or_default())
                .bind(occurred_at_ms);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Runs `change`, one statement, and when it changed a row appends `event`
/// in the same transaction; false (and nothing written) when it changed
/// none. The shape of a conditional change: revoke a live token, decide a
/// pending approval.
pub async fn change_with_event<'q>(
    store: &Store,
    change: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    event: &NewItem,
) -> Result<bool, StoreError> {
    let mut tx = store.begin().await?;
    if change.execute(&mut *tx).await?.rows_affected() == 0 {
        return Ok(false);
    }
    append(&mut tx, event).await?;
    store.commit(tx).await?;
    Ok(true)
}

/// Postgres: gives committed items without a position the next positions,
/// in insertion order, at most `limit`; returns how many. One sequencer
/// runs at a time (an advisory lock) and its positions
/// become visible together at its commit, so positions appear in
/// increasing order: an item committed after a reader passed position `p`
/// gets a position above `p`. SQLite: nothing to do (positions are given
/// at insert, in commit order).
pub async fn sequence(store: &Store, limit: i64) -> Result<u64, StoreError> {
    if store.backend() == Backend::Sqlite {
        return Ok(0);
    }
    // One round trip: migrations/postgres/0011 holds the steps (and
    // docs/decisions/0004 why they are sound). Called outside any
    // transaction: the round's own transaction id must come after it looks.
    let sequenced: i64 = sqlx::query("SELECT muster_sequence_outbox($1)")
        .bind(limit)
        .fetch_one(store.pool())
        .await?
        .try_get(0)?;
    Ok(sequenced as u64)
}

const ITEM_COLUMNS: &str = "position, tenant_id, event_id, type, payload, target_kind, target_id, \
                            audience_roles, audience_scopes, occurred_at_ms";

/// The most payload one read of the outbox holds (the item that passes it
/// is the read's last): items may take up to [`MAX_PAYLOAD_BYTES`] each,
/// so a read bounded by count alone could hold a gigabyte.
pub const READ_BYTES: usize = 4 << 20;

/// Items read together, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub items: Vec<Item>,
    /// The read stopped at its count or at [`READ_BYTES`]: more may follow
    /// the last item.
    pub more: bool,
}

/// Reads the items `query` selects (with its `LIMIT` of `limit`) up to
/// [`READ_BYTES`] of payload, leaving the rest of its rows unread.
async fn read_page<'q>(
    store: &Store,
    query: crate::AnyQuery<'q>,
    limit: u32,
) -> Result<Page, StoreError> {
    use futures::TryStreamExt;
    let mut rows = query.fetch(store.pool());
    let mut page = Page::default();
    let mut bytes = 0;
    while let Some(row) = rows.try_next().await? {
        let (item, payload_bytes) = sized_item_from_row(&row)?;
        bytes += payload_bytes;
        page.items.push(item);
        if bytes >= READ_BYTES {
            page.more = true;
            return Ok(page);
        }
    }
    page.more = page.items.len() >= limit as usize;
    Ok(page)
}

/// A read of the items `filter` selects (its parameters from `$1`, `next`
/// the number of the first after them), oldest first, at most `$next`, and
/// none whose payloads before it take [`READ_BYTES`] already. The server
/// leaves those out itself: a read that stopped taking rows there would
/// still have them sent (the connection drains them before its next use),
/// so a backlog of large items would cross the network many times over.
/// (SQLite counts characters, no more than the bytes [`read_page`] counts,
/// so it cuts no earlier.)
fn page_query(store: &Store, filter: &str, next: usize, payload: &str) -> String {
    let size = match store.backend() {
        Backend::Postgres => format!("octet_length({payload})"),
        Backend::Sqlite => format!("length({payload})"),
    };
    let columns = ITEM_COLUMNS.replacen("payload", &format!("{payload} AS payload"), 1);
    format!(
        "SELECT {ITEM_COLUMNS} FROM (SELECT {columns}, \
         SUM({size}) OVER (ORDER BY position) - {size} AS bytes_before \
         FROM outbox WHERE {filter} ORDER BY position LIMIT ${next}) page \
         WHERE bytes_before < {READ_BYTES} ORDER BY position"
    )
}

/// Committed items of `tenant_id` after `after`, oldest first: at most
/// `limit`, and past [`READ_BYTES`] of payload no more.
pub async fn read_after(
    store: &Store,
    tenant_id: &str,
    after: i64,
    limit: u32,
) -> Result<Vec<Item>, StoreError> {
    let query = page_query(store, "tenant_id = $1 AND position > $2", 3, "payload");
    let query = sqlx::query(&query)
        .bind(tenant_id)
        .bind(after)
        .bind(i64::from(limit));
    Ok(read_page(store, query, limit).await?.items)
}

/// The event ids of the items at positions `from` through `through`, in
/// position order: what the backplane compares with what it read to find
/// where a rewound history parted from it.
pub async fn event_ids_between(
    store: &Store,
    from: i64,
    through: i64,
) -> Result<Vec<(i64, String)>, StoreError> {
    store
        .fetch_all(
            sqlx::query(
                "SELECT position, event_id FROM outbox \
                 WHERE position >= $1 AND position <= $2 ORDER BY position",
            )
            .bind(from)
            .bind(through),
            |row| Ok((row.try_get(0)?, row.try_get(1)?)),
        )
        .await
}

/// Committed items of every tenant after `after`, oldest first: what the
/// backplane streams to edges, which filter by tenant per connection. At
/// most `limit`, and past [`READ_BYTES`] of payload no more.
pub async fn read_all_after(store: &Store, after: i64, limit: u32) -> Result<Page, StoreError> {
    let query = page_query(store, "position > $1", 2, "payload");
    let query = sqlx::query(&query).bind(after).bind(i64::from(limit));
    read_page(store, query, limit).await
}

/// As [`read_all_after`] `from - 1`, with the item at `from` (if any)
/// first and without its payload (`{}`): a reader that read up to `from`
/// learns in the same statement whether the item there is still the one
/// it read, by its event id, without having it sent again.
pub async fn read_all_from(store: &Store, from: i64, limit: u32) -> Result<Page, StoreError> {
    let light = "CASE WHEN position = $1 THEN '{}' ELSE payload END";
    let query = page_query(store, "position >= $1", 2, light);
    let query = sqlx::query(&query).bind(from).bind(i64::from(limit));
    read_page(store, query, limit).await
}

/// The last position given to a readable item, whether or not the outbox
/// still holds it (compaction may have emptied it); 0 before the first.
/// Positions are dense, so a reader after `p` that finds its next item
/// above `p + 1`, or none while the head is above `p`, knows that
/// compaction took what lay between.
pub async fn head(store: &Store) -> Result<i64, StoreError> {
    let sql = format!("SELECT {}", head_expression(store.backend()));
    let row = sqlx::query(&sql).fetch_one(store.pool()).await?;
    Ok(row.try_get(0)?)
}

/// The head as a scalar subquery.
fn head_expression(backend: Backend) -> &'static str {
    match backend {
        // The sequencer's counter moves with its positions, in one commit.
        Backend::Postgres => "(SELECT last_position FROM outbox_sequence)",
        // AUTOINCREMENT's high-water mark outlives the rows it numbered.
        Backend::Sqlite => "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0)",
    }
}

/// The position of a readable item of `tenant_id`, if the outbox still
/// holds it.
pub async fn position_of(
    store: &Store,
    tenant_id: &str,
    event_id: &str,
) -> Result<Option<i64>, StoreError> {
    store
        .fetch_optional(
            sqlx::query(
                "SELECT position FROM outbox \
                 WHERE tenant_id = $1 AND event_id = $2 AND position IS NOT NULL",
            )
            .bind(tenant_id)
            .bind(event_id),
            |row| Ok(row.try_get::<i64, _>(0)?),
        )
        .await
}

/// Records that `consumer_id` has everything up to `position`; progress
/// never moves backwards, and never past the head. An acknowledgement
/// above the head is of a history the store no longer has (a failover
/// that lost commits, reached by an edge that read them before it): kept
/// as it is, it would say the consumer has the items given those
/// positions again, and a restarted edge would start after them.
pub async fn ack(store: &Store, consumer_id: &str, position: i64) -> Result<(), StoreError> {
    crate::text::check_name("consumer_id", consumer_id, crate::text::MAX_NAME_BYTES)
        .map_err(|reason| StoreError::invalid("consumer_id", reason))?;
    let (least, greatest) = match store.backend() {
        Backend::Postgres => ("LEAST", "GREATEST"),
        Backend::Sqlite => ("MIN", "MAX"),
    };
    let head = head_expression(store.backend());
    let sql = format!(
        "INSERT INTO outbox_consumers (consumer_id, position, updated_at_ms) \
         VALUES ($1, {least}($2, {head}), $3) \
         ON CONFLICT (consumer_id) DO UPDATE SET \
         position = {least}({greatest}(excluded.position, outbox_consumers.position), {head}), \
         updated_at_ms = excluded.updated_at_ms"
    );
    sqlx::query(&sql)
        .bind(consumer_id)
        .bind(position)
        .bind(now_ms())
        .execute(store.writer())
        .await?;
    Ok(())
}

/// A consumer's acknowledged position.
pub async fn progress(store: &Store, consumer_id: &str) -> Result<Option<i64>, StoreError> {
    store
        .fetch_optional(
            sqlx::query("SELECT position FROM outbox_consumers WHERE consumer_id = $1")
                .bind(consumer_id),
            |row| Ok(row.try_get::<i64, _>(0)?),
        )
        .await
}

/// One consumer's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub consumer_id: String,
    pub position: i64,
    pub updated_at_ms: i64,
}

/// Every consumer's progress.
pub async fn consumers(store: &Store) -> Result<Vec<Consumer>, StoreError> {
    store
        .fetch_all(
            sqlx::query(
                "SELECT consumer_id, position, updated_at_ms FROM outbox_consumers \
                 ORDER BY consumer_id",
            ),
            |row| {
                Ok(Consumer {
                    consumer_id: row.try_get(0)?,
                    position: row.try_get(1)?,
                    updated_at_ms: row.try_get(2)?,
                })
            },
        )
        .await
}

/// What retention keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Items older than this go, delivered or not.
    pub ttl_ms: i64,
    /// At most this many items stay (the newest).
    pub max_items: i64,
    /// A consumer that has not acknowledged for this long no longer holds
    /// items back (and its row is removed).
    pub consumer_idle_ms: i64,
    /// Items stay at least this long even when every consumer has them,
    /// so that reconnecting peers can resume.
    pub min_age_ms: i64,
}

/// Items one compaction statement deletes at most: on SQLite a statement
/// holds the one writer connection, and every other write waits behind
/// it, so a backlog goes in short statements rather than one long one.
const COMPACT_CHUNK: u64 = 2_000;

/// Deletes the oldest items, in position order, while `going` (an SQL
/// condition on an item, with `binds` as $1, $2, …) holds for each: a chunk
/// per statement, and never an item behind one that stays. What the outbox
/// holds is then always one run of positions, so a peer resuming from an
/// item that is still there gets everything after it. Positions follow
/// commits and an item's time is its producer's clock at the append, so an
/// expired item behind one that has not expired yet (their producers'
/// clocks differ, or the later commit appended first) waits for it; the
/// size cap still bounds the outbox meanwhile. Read this way, the TTL needs
/// no index of its own, which every append would pay for.
async fn delete_oldest_while(store: &Store, going: &str, binds: &[i64]) -> Result<u64, StoreError> {
    let sql = format!(
        "WITH chunk AS (SELECT position, CASE WHEN {going} THEN 1 ELSE 0 END AS going \
         FROM outbox WHERE position IS NOT NULL ORDER BY position LIMIT {COMPACT_CHUNK}) \
         DELETE FROM outbox WHERE position IN (SELECT position FROM chunk WHERE position < \
         COALESCE((SELECT MIN(position) FROM chunk WHERE going = 0), {}))",
        i64::MAX
    );
    let mut removed = 0;
    loop {
        let query = binds.iter().fold(sqlx::query(&sql), |q, b| q.bind(*b));
        let deleted = query.execute(store.writer()).await?.rows_affected();
        removed += deleted;
        if deleted < COMPACT_CHUNK {
            return Ok(removed);
        }
    }
}

/// Deletes what `retention` no longer keeps; returns how many items went.
/// An item goes when it is older than the TTL, or beyond the size cap, or
/// when it is older than `min_age_ms` and every active consumer has
/// acknowledged it. Run it under a lease: one replica compacts.
pub async fn compact(store: &Store, retention: &Retention) -> Result<u64, StoreError> {
    let now = now_ms();
    sqlx::query("DELETE FROM outbox_consumers WHERE updated_at_ms < $1")
        .bind(now - retention.consumer_idle_ms)
        .execute(store.writer())
        .await?;
    let acked: Option<i64> = sqlx::query("SELECT MIN(position) FROM outbox_consumers")
        .fetch_one(store.pool())
        .await?
        .try_get(0)?;
    let mut removed =
        delete_oldest_while(store, "occurred_at_ms < $1", &[now - retention.ttl_ms]).await?;
    removed += delete_oldest_while(
        store,
        "position <= (SELECT MAX(position) FROM outbox) - $1",
        &[retention.max_items],
    )
    .await?;
    if let Some(acked) = acked {
        removed += delete_oldest_while(
            store,
            "position <= $1 AND occurred_at_ms < $2",
            &[acked, now - retention.min_age_ms],
        )
        .await?;
    }
    Ok(removed)
}

/// Depth and age of the outbox, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    pub items: i64,
    pub head: i64,
    /// When the oldest item after the furthest-behind consumer's position
    /// occurred.
    pub oldest_unacked_ms: Option<i64>,
}

/// The outbox's size and age, from index lookups only: it runs on every
/// replica every few seconds, on an outbox that may hold a million items,
/// so it never counts rows. Items are the positioned window (positions
/// are dense: compaction removes the oldest) plus those not positioned
/// yet.
pub async fn depth(store: &Store) -> Result<Depth, StoreError> {
    let row = sqlx::query(
        "SELECT COALESCE((SELECT MAX(position) FROM outbox), 0), \
         COALESCE((SELECT MIN(position) FROM outbox), 0), \
         (SELECT COUNT(*) FROM outbox WHERE position IS NULL), \
         (SELECT occurred_at_ms FROM outbox WHERE position > \
            COALESCE((SELECT MIN(position) FROM outbox_consumers), 0) \
          ORDER BY position LIMIT 1)",
    )
    .fetch_one(store.pool())
    .await?;
    let newest: i64 = row.try_get(0)?;
    let oldest: i64 = row.try_get(1)?;
    let unpositioned: i64 = row.try_get(2)?;
    let window = if oldest > 0 { newest - oldest + 1 } else { 0 };
    Ok(Depth {
        items: window + unpositioned,
        // Consumers' lag counts from the last position given, which an
        // outbox compacted empty still knows.
        head: head(store).await?.max(newest),
        oldest_unacked_ms: row.try_get(3)?,
    })
}

/// What an audience that does not read back as a list of strings becomes:
/// a role and a scope no peer holds. An empty list means everyone, so a
/// damaged row must not be read as one.
pub const UNREADABLE_AUDIENCE: &str = "(unreadable)";

fn json_list(text: &str, column: &'static str, event_id: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|error| {
        tracing::error!(%error, column, event_id, "outbox item with an unreadable audience: it goes to no one");
        vec![UNREADABLE_AUDIENCE.to_owned()]
    })
}

/// The item of `row`, and how many bytes its payload took as stored.
fn sized_item_from_row(row: &AnyRow) -> Result<(Item, usize), StoreError> {
    let payload: String = row.try_get("payload")?;
    let event_id: String = row.try_get("event_id")?;
    let item = Item {
        position: row.try_get("position")?,
        tenant_id: row.try_get("tenant_id")?,
        kind: row.try_get("type")?,
        payload: serde_json::from_str(&payload).unwrap_or_else(|_| Value::Object(Map::new())),
        target: Target::from_parts(row.try_get("target_kind")?, row.try_get("target_id")?),
        event_id: event_id.clone(),
        audience_roles: json_list(
            &row.try_get::<String, _>("audience_roles")?,
            "audience_roles",
            &event_id,
        ),
        audience_scopes: json_list(
            &row.try_get::<String, _>("audience_scopes")?,
            "audience_scopes",
            &event_id,
        ),
        occurred_at_ms: row.try_get("occurred_at_ms")?,
    };
    Ok((item, payload.len()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    crate::backend_suite! {
        async fn the_server_sends_no_rows_past_a_reads_bytes(store: Store) {
            crate::testing::append_large(&store, 8).await.unwrap();
            let query = page_query(&store, "position > $1", 2, "payload");
            let sent = store
                .fetch_all(sqlx::query(&query).bind(0_i64).bind(1000_i64), |row| {
                    Ok(row.try_get::<i64, _>("position")?)
                })
                .await
                .unwrap();
            // 900 000 bytes each: four take less than 4 MiB, the fifth
            // passes it and is the read's last; three more were left out.
            assert_eq!(sent.len(), 5);

            // Read from a position: the item there comes without its
            // payload, and counts for nothing against the read's bytes.
            let Page { items, more } = read_all_from(&store, sent[0], 1000).await.unwrap();
            assert_eq!(items[0].position, sent[0]);
            assert_eq!(items[0].payload, json!({}));
            assert!(!items[0].event_id.is_empty());
            assert_eq!(items[1].payload["n"], 1);
            assert_eq!((items.len(), more), (6, true));
        }
    }

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
        for key in [
            "access_token",
            "refreshToken",
            "bearer-token",
            "apiKey",
            "privateKey",
            "signing_private_key",
            "passphrase",
            "credentials",
            "db_password",
            "Cookie",
        ] {
            assert_eq!(
                find_secret_key(&json!({ key: "x" })),
                Some(key.into()),
                "{key}"
            );
        }
        // Names that hold no secret, as muster's own events use them.
        for key in [
            "tokens",
            "pubkey",
            "idempotency_key",
            "conversation_key",
            "key_id",
        ] {
            assert_eq!(find_secret_key(&json!({ key: "x" })), None, "{key}");
        }
    }
}
