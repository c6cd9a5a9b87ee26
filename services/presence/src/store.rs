//! Presence's tables, on either backend.

use muster_store::outbox::{self, NewItem};
use muster_store::{Store, StoreError, Tx};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::InstanceEntry;
use crate::topics::{TopicSession, diff_event};

/// One change to instance presence, with the event that describes it.
#[derive(Debug, Clone)]
pub enum InstanceWrite {
    Upsert {
        tenant_id: String,
        entry: Box<InstanceEntry>,
        event: NewItem,
    },
    /// Removes the entry if `edge_id` wrote it last ('' for one written
    /// without an edge).
    Remove {
        tenant_id: String,
        instance_id: String,
        edge_id: String,
        event: NewItem,
    },
}

impl InstanceWrite {
    /// The row it touches, and whether it removes it.
    fn key(&self) -> ((&str, &str), bool) {
        match self {
            InstanceWrite::Upsert {
                tenant_id, entry, ..
            } => ((tenant_id.as_str(), entry.instance_id.as_str()), false),
            InstanceWrite::Remove {
                tenant_id,
                instance_id,
                ..
            } => ((tenant_id.as_str(), instance_id.as_str()), true),
        }
    }

    fn event(&self) -> &NewItem {
        match self {
            InstanceWrite::Upsert { event, .. } | InstanceWrite::Remove { event, .. } => event,
        }
    }
}

/// Where presence keeps its state. Each change commits with its event.
#[tonic::async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Applies instance upserts and removals in order, in one transaction
    /// (one commit for many connections arriving together). Returns, per
    /// write, whether it changed a row; an event is appended only then.
    async fn write_instances(&self, writes: &[InstanceWrite]) -> Result<Vec<bool>, StoreError>;
    /// Newest first.
    async fn list_instances(&self, tenant_id: &str) -> Result<Vec<InstanceEntry>, StoreError>;
    /// Returns the ids that were present (and so touched), and whether
    /// sessions of `edge_id` are kept aside for it to revive.
    async fn touch_instances(
        &self,
        tenant_id: &str,
        instance_ids: &[String],
        edge_id: Option<&str>,
        at_ms: i64,
    ) -> Result<(Vec<String>, bool), StoreError>;
    async fn count_instances(&self, tenant_id: &str) -> Result<u64, StoreError>;
    /// Appends an event that goes with no change of presence's own.
    async fn append_event(&self, event: &NewItem) -> Result<(), StoreError>;
    /// Takes or renews a singleton job's lease.
    async fn lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, StoreError>;
    /// Gives up a lease `holder` has.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
    /// Deletes entries last seen before `cutoff_ms` and, per tenant, all
    /// but the newest `cap`, appending `event(tenant, instance)` for each.
    /// Edges' `gateway` entries are the last the cap takes: an edge
    /// announces its own again at once, where a peer's waits for room.
    async fn prune_instances(
        &self,
        cutoff_ms: i64,
        cap: usize,
        event: for<'a> fn(&'a str, &'a str) -> NewItem,
    ) -> Result<Vec<(String, String)>, StoreError>;
}

/// Entries one transaction of a sweep prunes at most: enough to sweep
/// quickly, few enough that writers waiting behind it wait milliseconds.
const PRUNED_PER_TRANSACTION: usize = 500;

/// Ids one statement names at most (SQLite's oldest builds allow 999
/// parameters).
const IDS_PER_STATEMENT: usize = 500;

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
        edge_id: row.try_get("edge_id")?,
    })
}

/// Inserts or replaces entries, many per statement.
async fn upsert_entries(
    tx: &mut muster_store::Tx,
    upserts: &[(&str, &InstanceEntry)],
) -> Result<(), StoreError> {
    const COLUMNS: usize = 13;
    let upserts: Vec<&(&str, &InstanceEntry)> = upserts.iter().collect();
    let upserts = muster_store::last_of_each(&upserts, |(tenant_id, entry)| {
        (*tenant_id, entry.instance_id.as_str())
    });
    for chunk in muster_store::in_statements(&upserts, COLUMNS) {
        let sql = format!(
            "INSERT INTO instance_presence (tenant_id, instance_id, role, reported_host, reported_ip, \
             observed_ip, version, mode, last_seen_at_ms, last_input_seconds, reason, metadata, \
             edge_id) \
             VALUES {} \
             ON CONFLICT (tenant_id, instance_id) DO UPDATE SET role = excluded.role, \
             reported_host = excluded.reported_host, reported_ip = excluded.reported_ip, \
             observed_ip = excluded.observed_ip, version = excluded.version, mode = excluded.mode, \
             last_seen_at_ms = excluded.last_seen_at_ms, \
             last_input_seconds = excluded.last_input_seconds, reason = excluded.reason, \
             metadata = excluded.metadata, edge_id = excluded.edge_id",
            muster_store::values_rows(chunk.len(), COLUMNS)
        );
        let mut query = sqlx::query(&sql);
        for (tenant_id, entry) in chunk {
            query = query
                .bind(*tenant_id)
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
                .bind(&entry.edge_id);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

#[tonic::async_trait]
impl PresenceStore for Store {
    async fn append_event(&self, event: &NewItem) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        muster_store::outbox::append(&mut tx, event).await?;
        self.commit(tx).await
    }

    async fn write_instances(&self, writes: &[InstanceWrite]) -> Result<Vec<bool>, StoreError> {
        let mut tx = self.begin().await?;
        let mut changed = Vec::with_capacity(writes.len());
        for run in muster_store::conflict_free_runs(writes, InstanceWrite::key) {
            let upserts: Vec<(&str, &InstanceEntry)> = run
                .iter()
                .filter_map(|write| match write {
                    InstanceWrite::Upsert {
                        tenant_id, entry, ..
                    } => Some((tenant_id.as_str(), entry.as_ref())),
                    InstanceWrite::Remove { .. } => None,
                })
                .collect();
            upsert_entries(&mut tx, &upserts).await?;
            let removed = muster_store::remove_in_run(
                &mut tx,
                "instance_presence",
                ["tenant_id", "instance_id", "edge_id"],
                run,
                |write| match write {
                    InstanceWrite::Upsert { .. } => None,
                    InstanceWrite::Remove {
                        tenant_id,
                        instance_id,
                        edge_id,
                        ..
                    } => Some([tenant_id.as_str(), instance_id.as_str(), edge_id.as_str()]),
                },
            )
            .await?;
            changed.extend(removed);
        }
        // Each write that changed a row has its event, in the batch's order.
        let events = writes
            .iter()
            .zip(&changed)
            .filter(|(_, changed)| **changed)
            .map(|(write, _)| write.event());
        outbox::append_all(&mut tx, events).await?;
        self.commit(tx).await?;
        Ok(changed)
    }

    async fn list_instances(&self, tenant_id: &str) -> Result<Vec<InstanceEntry>, StoreError> {
        self.fetch_all(
            sqlx::query(
                "SELECT instance_id, role, reported_host, reported_ip, observed_ip, version, mode, \
             last_seen_at_ms, last_input_seconds, reason, metadata, edge_id FROM instance_presence \
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
        edge_id: Option<&str>,
        at_ms: i64,
    ) -> Result<(Vec<String>, bool), StoreError> {
        let mut touched = Vec::with_capacity(instance_ids.len());
        let mut tx = self.begin().await?;
        let mut sessions_kept = false;
        if let Some(edge_id) = edge_id {
            // The refresh first: on Postgres a sweep taking this edge for
            // gone holds its row until it commits, and the look after it
            // then sees what the sweep kept aside.
            sqlx::query(
                "INSERT INTO presence_edges (edge_id, refreshed_at_ms) VALUES ($1, $2) \
                 ON CONFLICT (edge_id) DO UPDATE SET refreshed_at_ms = excluded.refreshed_at_ms",
            )
            .bind(edge_id)
            .bind(at_ms)
            .execute(&mut *tx)
            .await?;
            // Until the edge revives them: an answer it did not get is
            // given again.
            sessions_kept =
                sqlx::query("SELECT 1 FROM topic_sessions_gone WHERE edge_id = $1 LIMIT 1")
                    .bind(edge_id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
        }
        // One statement per chunk of ids, not per id: an edge touches all
        // its peers every few seconds, in the store's one write lane.
        // An entry no edge owns (written before entries recorded their
        // edge, by a presence of an earlier release) becomes the refreshing
        // edge's, so that its removal takes it away when the peer leaves.
        for chunk in instance_ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE instance_presence SET last_seen_at_ms = $1, \
                 edge_id = CASE WHEN edge_id = '' THEN $3 ELSE edge_id END \
                 WHERE tenant_id = $2 AND instance_id IN ({}) RETURNING instance_id",
                muster_store::placeholders(4, chunk.len())
            );
            let query = chunk.iter().fold(
                sqlx::query(&sql)
                    .bind(at_ms)
                    .bind(tenant_id)
                    .bind(edge_id.unwrap_or_default()),
                |q, id| q.bind(id),
            );
            for row in query.fetch_all(&mut *tx).await? {
                touched.push(row.try_get::<String, _>(0)?);
            }
        }
        self.commit(tx).await?;
        Ok((touched, sessions_kept))
    }

    async fn count_instances(&self, tenant_id: &str) -> Result<u64, StoreError> {
        let counted = self
            .fetch_all(
                sqlx::query("SELECT COUNT(*) FROM instance_presence WHERE tenant_id = $1")
                    .bind(tenant_id),
                |row| Ok(row.try_get::<i64, _>(0)?),
            )
            .await?;
        Ok(counted.first().copied().unwrap_or(0).max(0) as u64)
    }

    async fn lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, StoreError> {
        muster_store::lease::acquire(self, name, holder, ttl_ms).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        muster_store::lease::release(self, name, holder).await
    }

    async fn prune_instances(
        &self,
        cutoff_ms: i64,
        cap: usize,
        event: for<'a> fn(&'a str, &'a str) -> NewItem,
    ) -> Result<Vec<(String, String)>, StoreError> {
        // Read first, then delete in short transactions: one transaction
        // for a whole sweep (a cap lowered, a mass disconnect past its
        // ttl) would hold SQLite's only writer, and every handshake behind
        // it, for as long as it takes. Each delete checks the entry is as
        // it was read, so what changed in between is not pruned.
        let candidates = self
            .fetch_all(
                sqlx::query(
                    "SELECT tenant_id, instance_id, last_seen_at_ms FROM (SELECT tenant_id, instance_id, last_seen_at_ms, \
             ROW_NUMBER() OVER (PARTITION BY tenant_id \
             ORDER BY CASE WHEN role = 'gateway' THEN 0 ELSE 1 END, last_seen_at_ms DESC, instance_id) AS rank \
             FROM instance_presence) ranked WHERE last_seen_at_ms < $1 OR rank > $2",
                )
                .bind(cutoff_ms)
                .bind(i64::try_from(cap).unwrap_or(i64::MAX)),
                |row| {
                    Ok((
                        row.try_get::<String, _>("tenant_id")?,
                        row.try_get::<String, _>("instance_id")?,
                        row.try_get::<i64, _>("last_seen_at_ms")?,
                    ))
                },
            )
            .await?;
        let mut pruned = Vec::with_capacity(candidates.len());
        for chunk in candidates.chunks(PRUNED_PER_TRANSACTION) {
            let mut tx = self.begin().await?;
            let mut events = Vec::with_capacity(chunk.len());
            let mut removed = Vec::with_capacity(chunk.len());
            for (tenant_id, instance_id, last_seen_at_ms) in chunk {
                // Only as it was read: an entry refreshed (or removed, or
                // pruned by an overlapping sweep) since is not this
                // sweep's to prune, nor to announce.
                let deleted = sqlx::query(
                    "DELETE FROM instance_presence \
                     WHERE tenant_id = $1 AND instance_id = $2 AND last_seen_at_ms = $3",
                )
                .bind(tenant_id)
                .bind(instance_id)
                .bind(last_seen_at_ms)
                .execute(&mut *tx)
                .await?;
                if deleted.rows_affected() == 0 {
                    continue;
                }
                events.push(event(tenant_id, instance_id));
                removed.push((tenant_id.clone(), instance_id.clone()));
            }
            outbox::append_all(&mut tx, &events).await?;
            self.commit(tx).await?;
            pruned.extend(removed);
        }
        Ok(pruned)
    }
}

/// Where topic presence lives. Each change commits with its diff event.
#[tonic::async_trait]
pub trait TopicStore: Send + Sync + 'static {
    /// Inserts the session with `join`, or, when (topic, session) exists
    /// and is the same device's (or no device's), moves it to the new
    /// connection without an event; refused when another device holds the
    /// session or the connection holds [`CONNECTION_SESSIONS`] already.
    async fn track(&self, session: &TopicSession, join: &NewItem) -> Result<Tracked, StoreError>;
    /// Removes `device_id`'s session (or one of no device) with `leave`.
    async fn untrack(
        &self,
        tenant_id: &str,
        topic: &str,
        session_id: &str,
        device_id: &str,
    ) -> Result<Option<TopicSession>, StoreError>;
    async fn untrack_connection(
        &self,
        tenant_id: &str,
        connection_id: &str,
    ) -> Result<Vec<TopicSession>, StoreError>;
    /// Sets the status of `device_id`'s session (or one of no device),
    /// with its `status` diff.
    #[allow(clippy::too_many_arguments)]
    async fn set_status(
        &self,
        tenant_id: &str,
        topic: &str,
        session_id: &str,
        device_id: &str,
        state: &str,
        note: &str,
        until_ms: Option<i64>,
    ) -> Result<Option<TopicSession>, StoreError>;
    /// Up to `limit` sessions after the session id `after`, in session
    /// order.
    async fn list(
        &self,
        tenant_id: &str,
        topic: &str,
        edge_id: Option<&str>,
        after: &str,
        limit: usize,
    ) -> Result<Vec<TopicSession>, StoreError>;
    /// All sessions and the humans among them.
    async fn count(
        &self,
        tenant_id: &str,
        topic: &str,
        edge_id: Option<&str>,
    ) -> Result<(u64, u64), StoreError>;
    async fn expire_statuses(&self, now_ms: i64) -> Result<Vec<TopicSession>, StoreError>;
    /// Removes, with `leave` diffs, the sessions of edges that have not
    /// refreshed since `cutoff_ms`, keeping them aside (as of `now_ms`) for
    /// [`TopicStore::revive_edge_sessions`], and forgets those edges and
    /// what was kept aside before `gone_cutoff_ms`.
    async fn expire_edges(
        &self,
        cutoff_ms: i64,
        now_ms: i64,
        gone_cutoff_ms: i64,
    ) -> Result<Vec<TopicSession>, StoreError>;
    /// Removes, with `leave` diffs, every session of `edge_id`, and what
    /// was kept aside of its earlier sessions.
    async fn forget_edge_sessions(&self, edge_id: &str) -> Result<Vec<TopicSession>, StoreError>;
    /// Tracks again, each with a `join` diff, the sessions of `edge_id`
    /// kept aside when it was taken for gone whose connection is one of
    /// `connection_ids` and whose (topic, session) nobody tracked since
    /// (a status whose `until` passed as available). With `last`, the
    /// edge named every connection it holds: the rest is forgotten.
    async fn revive_edge_sessions(
        &self,
        edge_id: &str,
        connection_ids: &[String],
        last: bool,
        now_ms: i64,
    ) -> Result<Vec<TopicSession>, StoreError>;
    /// Up to `limit` of the (tenant, connection) pairs that `edge_id`'s
    /// sessions belong to, after `after` in (tenant, connection) order.
    async fn edge_session_connections(
        &self,
        edge_id: &str,
        after: (&str, &str),
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError>;
}

/// What a track came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracked {
    /// The session as tracked.
    Session(Box<TopicSession>),
    /// Another device holds the (topic, session).
    Held,
    /// The device holds the (topic, session) as another principal, kind
    /// or agent.
    Differs,
    /// The connection holds [`CONNECTION_SESSIONS`] sessions already.
    Full,
}

/// Sessions one connection may hold at most: what one peer can put in
/// presence (and in a topic's listing) stays bounded.
pub const CONNECTION_SESSIONS: i64 = 1000;

/// Whether `connection_id` has room for one more session.
async fn has_room(tx: &mut Tx, tenant_id: &str, connection_id: &str) -> Result<bool, StoreError> {
    let held: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM topic_sessions WHERE tenant_id = $1 AND connection_id = $2",
    )
    .bind(tenant_id)
    .bind(connection_id)
    .fetch_one(&mut **tx)
    .await?;
    Ok(held < CONNECTION_SESSIONS)
}

const TOPIC_COLUMNS: &str = "tenant_id, topic, session_id, principal, kind, agent_id, since_ms, state, note, \
                             until_ms, edge_id, connection_id, device_id";

fn topic_session(row: &AnyRow) -> Result<TopicSession, StoreError> {
    Ok(TopicSession {
        tenant_id: row.try_get("tenant_id")?,
        topic: row.try_get("topic")?,
        session_id: row.try_get("session_id")?,
        principal: row.try_get("principal")?,
        kind: row.try_get("kind")?,
        agent_id: row.try_get("agent_id")?,
        since_ms: row.try_get("since_ms")?,
        state: row.try_get("state")?,
        note: row.try_get("note")?,
        until_ms: row.try_get("until_ms")?,
        edge_id: row.try_get("edge_id")?,
        connection_id: row.try_get("connection_id")?,
        device_id: row.try_get("device_id")?,
    })
}

async fn select_session(
    tx: &mut Tx,
    tenant_id: &str,
    topic: &str,
    session_id: &str,
) -> Result<Option<TopicSession>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {TOPIC_COLUMNS} FROM topic_sessions WHERE tenant_id = $1 AND topic = $2 AND session_id = $3"
    ))
    .bind(tenant_id)
    .bind(topic)
    .bind(session_id)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(topic_session).transpose()
}

/// Runs `delete` (a `DELETE … RETURNING` of whole sessions) and appends a
/// `leave` diff for each session it removed: only those, so that a session
/// taken over or removed meanwhile by another writer gets no diff here.
async fn leave_all(
    tx: &mut Tx,
    delete: muster_store::AnyQuery<'_>,
) -> Result<Vec<TopicSession>, StoreError> {
    let rows = delete.fetch_all(&mut **tx).await?;
    let sessions = rows
        .iter()
        .map(topic_session)
        .collect::<Result<Vec<_>, _>>()?;
    let leaves: Vec<_> = sessions.iter().map(|s| diff_event(s, "leave")).collect();
    outbox::append_all(tx, &leaves).await?;
    Ok(sessions)
}

/// The condition that a session is `$n`'s device's, or no device's.
fn held_by(n: usize) -> String {
    format!("(device_id = ${n} OR device_id = '')")
}

/// Binds `s`'s columns in [`TOPIC_COLUMNS`] order.
fn bind_session<'q>(
    query: muster_store::AnyQuery<'q>,
    s: &'q TopicSession,
) -> muster_store::AnyQuery<'q> {
    query
        .bind(&s.tenant_id)
        .bind(&s.topic)
        .bind(&s.session_id)
        .bind(&s.principal)
        .bind(&s.kind)
        .bind(&s.agent_id)
        .bind(s.since_ms)
        .bind(&s.state)
        .bind(&s.note)
        .bind(s.until_ms)
        .bind(&s.edge_id)
        .bind(&s.connection_id)
        .bind(&s.device_id)
}

/// Inserts `s` unless a session holds its (topic, session) key; whether
/// it did.
async fn insert_row(tx: &mut Tx, s: &TopicSession) -> Result<bool, StoreError> {
    let sql = format!(
        "INSERT INTO topic_sessions ({TOPIC_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (tenant_id, topic, session_id) DO NOTHING"
    );
    let inserted = bind_session(sqlx::query(&sql), s)
        .execute(&mut **tx)
        .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Forgets what was kept aside of `device_id`'s session (or of one of no
/// device) for an edge taken for gone: a peer that tracks or untracks it
/// has decided for it, and a revival must not bring back the old one.
async fn drop_kept(
    tx: &mut Tx,
    tenant_id: &str,
    topic: &str,
    session_id: &str,
    device_id: &str,
) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "DELETE FROM topic_sessions_gone WHERE tenant_id = $1 AND topic = $2 AND session_id = $3 \
         AND {}",
        held_by(4)
    ))
    .bind(tenant_id)
    .bind(topic)
    .bind(session_id)
    .bind(device_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Whether the (topic, session) of `s` is kept aside for another
/// device's peer to revive.
async fn kept_for_another(tx: &mut Tx, s: &TopicSession) -> Result<bool, StoreError> {
    Ok(sqlx::query(
        "SELECT 1 FROM topic_sessions_gone WHERE tenant_id = $1 AND topic = $2 \
         AND session_id = $3 AND device_id <> $4 AND device_id <> '' LIMIT 1",
    )
    .bind(&s.tenant_id)
    .bind(&s.topic)
    .bind(&s.session_id)
    .bind(&s.device_id)
    .fetch_optional(&mut **tx)
    .await?
    .is_some())
}

/// Keeps `session` aside, as of `now_ms`, for its edge to revive.
async fn keep(tx: &mut Tx, session: &TopicSession, now_ms: i64) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO topic_sessions_gone ({TOPIC_COLUMNS}, gone_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
         ON CONFLICT (edge_id, tenant_id, topic, session_id) DO UPDATE SET \
         principal = excluded.principal, kind = excluded.kind, agent_id = excluded.agent_id, \
         since_ms = excluded.since_ms, state = excluded.state, note = excluded.note, \
         until_ms = excluded.until_ms, connection_id = excluded.connection_id, \
         device_id = excluded.device_id, gone_at_ms = excluded.gone_at_ms"
    );
    bind_session(sqlx::query(&sql), session)
        .bind(now_ms)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[tonic::async_trait]
impl TopicStore for Store {
    async fn track(&self, s: &TopicSession, join: &NewItem) -> Result<Tracked, StoreError> {
        // On Postgres another track (or a revival) may insert the session
        // between this one's look and its insert: then it looks again.
        for _ in 0..2 {
            let mut tx = self.begin().await?;
            // The sweep finds sessions by their edge's refresh row: one
            // tracked before the edge's first refresh, or after a sweep
            // took the edge's row, would otherwise never expire. First, as
            // the sweep takes the edge's row before its sessions: the
            // other order could wait on each other on Postgres.
            sqlx::query(
                "INSERT INTO presence_edges (edge_id, refreshed_at_ms) VALUES ($1, $2) \
                 ON CONFLICT (edge_id) DO NOTHING",
            )
            .bind(&s.edge_id)
            .bind(muster_store::now_ms())
            .execute(&mut *tx)
            .await?;
            // On Postgres DO NOTHING locks nothing: a sweep taking the edge
            // for gone meanwhile would miss this uncommitted session and
            // leave it where no sweep finds it. A key-share lock makes the
            // sweep's delete wait for this commit (and then find the
            // session) without queueing the edge's other tracks or its
            // refresh behind one another. SQLite writes one at a time.
            if self.backend() == muster_store::Backend::Postgres {
                sqlx::query("SELECT 1 FROM presence_edges WHERE edge_id = $1 FOR KEY SHARE")
                    .bind(&s.edge_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            }
            // The kept row before the live one, the order a revival takes
            // them in: otherwise each could wait for the other. A session
            // kept aside for another device's peer is still that device's.
            drop_kept(&mut tx, &s.tenant_id, &s.topic, &s.session_id, &s.device_id).await?;
            if kept_for_another(&mut tx, s).await? {
                return Ok(Tracked::Held);
            }
            let mut tracked = None;
            let existing = select_session(&mut tx, &s.tenant_id, &s.topic, &s.session_id).await?;
            if let Some(existing) = &existing
                && (existing.device_id == s.device_id || existing.device_id.is_empty())
                && (existing.principal != s.principal
                    || existing.kind != s.kind
                    || existing.agent_id != s.agent_id)
            {
                return Ok(Tracked::Differs);
            }
            // Another device's session is refused as such whatever room
            // this connection has.
            if existing
                .as_ref()
                .is_some_and(|e| !e.device_id.is_empty() && e.device_id != s.device_id)
            {
                return Ok(Tracked::Held);
            }
            // A connection's requests come one at a time: its count cannot
            // race itself.
            let joins_connection = existing
                .as_ref()
                .is_none_or(|existing| existing.connection_id != s.connection_id);
            if joins_connection && !has_room(&mut tx, &s.tenant_id, &s.connection_id).await? {
                return Ok(Tracked::Full);
            }
            if let Some(existing) = existing {
                let moved = sqlx::query(&format!(
                    "UPDATE topic_sessions SET edge_id = $1, connection_id = $2, device_id = $3 \
                     WHERE tenant_id = $4 AND topic = $5 AND session_id = $6 AND {}",
                    held_by(3)
                ))
                .bind(&s.edge_id)
                .bind(&s.connection_id)
                .bind(&s.device_id)
                .bind(&s.tenant_id)
                .bind(&s.topic)
                .bind(&s.session_id)
                .execute(&mut *tx)
                .await?;
                if moved.rows_affected() > 0 {
                    tracked = Some(TopicSession {
                        edge_id: s.edge_id.clone(),
                        connection_id: s.connection_id.clone(),
                        device_id: s.device_id.clone(),
                        ..existing
                    });
                } else if select_session(&mut tx, &s.tenant_id, &s.topic, &s.session_id)
                    .await?
                    .is_some()
                {
                    return Ok(Tracked::Held);
                }
                // Otherwise gone since the look (another writer untracked
                // it): it is tracked anew.
            }
            let tracked = match tracked {
                Some(moved) => moved,
                None => {
                    if !insert_row(&mut tx, s).await? {
                        continue;
                    }
                    outbox::append(&mut tx, join).await?;
                    s.clone()
                }
            };
            // Again: a sweep may have kept it aside since.
            drop_kept(&mut tx, &s.tenant_id, &s.topic, &s.session_id, &s.device_id).await?;
            self.commit(tx).await?;
            return Ok(Tracked::Session(Box::new(tracked)));
        }
        Err(StoreError::Unavailable(
            "the session was tracked by another writer at the same time; try again".into(),
        ))
    }

    async fn untrack(
        &self,
        tenant_id: &str,
        topic: &str,
        session_id: &str,
        device_id: &str,
    ) -> Result<Option<TopicSession>, StoreError> {
        let mut tx = self.begin().await?;
        let delete = format!(
            "DELETE FROM topic_sessions WHERE tenant_id = $1 AND topic = $2 AND session_id = $3 \
             AND {} RETURNING {TOPIC_COLUMNS}",
            held_by(4)
        );
        let query = || {
            sqlx::query(&delete)
                .bind(tenant_id)
                .bind(topic)
                .bind(session_id)
                .bind(device_id)
        };
        let mut removed = leave_all(&mut tx, query()).await?;
        drop_kept(&mut tx, tenant_id, topic, session_id, device_id).await?;
        // On Postgres a revival may have put the session back meanwhile,
        // unseen by the first look: the kept row waited for it.
        removed.extend(leave_all(&mut tx, query()).await?);
        self.commit(tx).await?;
        Ok(removed.into_iter().next())
    }

    async fn untrack_connection(
        &self,
        tenant_id: &str,
        connection_id: &str,
    ) -> Result<Vec<TopicSession>, StoreError> {
        let mut tx = self.begin().await?;
        let delete = format!(
            "DELETE FROM topic_sessions WHERE tenant_id = $1 AND connection_id = $2 \
             RETURNING {TOPIC_COLUMNS}"
        );
        let query = || sqlx::query(&delete).bind(tenant_id).bind(connection_id);
        let mut sessions = leave_all(&mut tx, query()).await?;
        sqlx::query("DELETE FROM topic_sessions_gone WHERE tenant_id = $1 AND connection_id = $2")
            .bind(tenant_id)
            .bind(connection_id)
            .execute(&mut *tx)
            .await?;
        // As in `untrack`: what a revival put back meanwhile.
        sessions.extend(leave_all(&mut tx, query()).await?);
        self.commit(tx).await?;
        Ok(sessions)
    }

    async fn set_status(
        &self,
        tenant_id: &str,
        topic: &str,
        session_id: &str,
        device_id: &str,
        state: &str,
        note: &str,
        until_ms: Option<i64>,
    ) -> Result<Option<TopicSession>, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE topic_sessions SET state = $1, note = $2, until_ms = $3 \
             WHERE tenant_id = $4 AND topic = $5 AND session_id = $6 AND {} \
             RETURNING {TOPIC_COLUMNS}",
            held_by(7)
        ))
        .bind(state)
        .bind(note)
        .bind(until_ms)
        .bind(tenant_id)
        .bind(topic)
        .bind(session_id)
        .bind(device_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let updated = topic_session(&row)?;
        outbox::append(&mut tx, &diff_event(&updated, "status")).await?;
        self.commit(tx).await?;
        Ok(Some(updated))
    }

    async fn list(
        &self,
        tenant_id: &str,
        topic: &str,
        edge_id: Option<&str>,
        after: &str,
        limit: usize,
    ) -> Result<Vec<TopicSession>, StoreError> {
        self.fetch_all(
            sqlx::query(&format!(
                "SELECT {TOPIC_COLUMNS} FROM topic_sessions WHERE tenant_id = $1 AND topic = $2 \
                 AND ($3 = '' OR edge_id = $3) AND session_id > $4 ORDER BY session_id LIMIT $5"
            ))
            .bind(tenant_id)
            .bind(topic)
            .bind(edge_id.unwrap_or_default())
            .bind(after)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX)),
            topic_session,
        )
        .await
    }

    async fn count(
        &self,
        tenant_id: &str,
        topic: &str,
        edge_id: Option<&str>,
    ) -> Result<(u64, u64), StoreError> {
        let counted = self
            .fetch_optional(
                sqlx::query(
                    "SELECT COUNT(*) AS total, \
                     COALESCE(SUM(CASE WHEN kind = 'human' THEN 1 ELSE 0 END), 0) AS humans \
                     FROM topic_sessions WHERE tenant_id = $1 AND topic = $2 \
                     AND ($3 = '' OR edge_id = $3)",
                )
                .bind(tenant_id)
                .bind(topic)
                .bind(edge_id.unwrap_or_default()),
                |row| {
                    let total: i64 = row.try_get("total")?;
                    let humans: i64 = row.try_get("humans")?;
                    Ok((total.unsigned_abs(), humans.unsigned_abs()))
                },
            )
            .await?;
        Ok(counted.unwrap_or_default())
    }

    async fn expire_edges(
        &self,
        cutoff_ms: i64,
        now_ms: i64,
        gone_cutoff_ms: i64,
    ) -> Result<Vec<TopicSession>, StoreError> {
        let mut tx = self.begin().await?;
        // The edges first: a refresh that lands meanwhile either comes
        // before (and the edge is not stale) or waits for this commit and
        // records the edge anew.
        let edges: Vec<String> =
            sqlx::query("DELETE FROM presence_edges WHERE refreshed_at_ms < $1 RETURNING edge_id")
                .bind(cutoff_ms)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
        let mut sessions = Vec::new();
        for chunk in edges.chunks(IDS_PER_STATEMENT) {
            let delete = format!(
                "DELETE FROM topic_sessions WHERE edge_id IN ({}) RETURNING {TOPIC_COLUMNS}",
                muster_store::placeholders(1, chunk.len())
            );
            let query = chunk
                .iter()
                .fold(sqlx::query(&delete), |q, edge| q.bind(edge));
            sessions.extend(leave_all(&mut tx, query).await?);
        }
        for session in &sessions {
            keep(&mut tx, session, now_ms).await?;
        }
        sqlx::query("DELETE FROM topic_sessions_gone WHERE gone_at_ms < $1")
            .bind(gone_cutoff_ms)
            .execute(&mut *tx)
            .await?;
        self.commit(tx).await?;
        Ok(sessions)
    }

    async fn forget_edge_sessions(&self, edge_id: &str) -> Result<Vec<TopicSession>, StoreError> {
        let mut tx = self.begin().await?;
        let delete =
            format!("DELETE FROM topic_sessions WHERE edge_id = $1 RETURNING {TOPIC_COLUMNS}");
        let forgotten = leave_all(&mut tx, sqlx::query(&delete).bind(edge_id)).await?;
        sqlx::query("DELETE FROM topic_sessions_gone WHERE edge_id = $1")
            .bind(edge_id)
            .execute(&mut *tx)
            .await?;
        self.commit(tx).await?;
        Ok(forgotten)
    }

    async fn revive_edge_sessions(
        &self,
        edge_id: &str,
        connection_ids: &[String],
        last: bool,
        now_ms: i64,
    ) -> Result<Vec<TopicSession>, StoreError> {
        let mut tx = self.begin().await?;
        let mut gone = Vec::new();
        for chunk in connection_ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                "DELETE FROM topic_sessions_gone WHERE edge_id = $1 AND connection_id IN ({}) \
                 RETURNING {TOPIC_COLUMNS}",
                muster_store::placeholders(2, chunk.len())
            );
            let query = chunk
                .iter()
                .fold(sqlx::query(&sql).bind(edge_id), |q, id| q.bind(id));
            gone.extend(query.fetch_all(&mut *tx).await?);
        }
        if last {
            sqlx::query("DELETE FROM topic_sessions_gone WHERE edge_id = $1")
                .bind(edge_id)
                .execute(&mut *tx)
                .await?;
        }
        let mut revived = Vec::new();
        for row in &gone {
            let mut session = topic_session(row)?;
            // A status that expired while it was kept aside comes back as
            // the sweep would have left it.
            if session.until_ms.is_some_and(|until| until <= now_ms) {
                session = session.available();
            }
            // A connection that tracked others meanwhile keeps its bound:
            // what does not fit stays gone (its `leave` went out).
            if !has_room(&mut tx, &session.tenant_id, &session.connection_id).await? {
                continue;
            }
            // A session tracked again meanwhile (on another edge, or by a
            // reconnected peer) is newer than the one kept aside.
            if insert_row(&mut tx, &session).await? {
                outbox::append(&mut tx, &diff_event(&session, "join")).await?;
                revived.push(session);
            }
        }
        self.commit(tx).await?;
        Ok(revived)
    }

    async fn edge_session_connections(
        &self,
        edge_id: &str,
        after: (&str, &str),
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.fetch_all(
            sqlx::query(
                "SELECT DISTINCT tenant_id, connection_id FROM topic_sessions WHERE edge_id = $1 \
                 AND (tenant_id > $2 OR (tenant_id = $2 AND connection_id > $3)) \
                 ORDER BY tenant_id, connection_id LIMIT $4",
            )
            .bind(edge_id)
            .bind(after.0)
            .bind(after.1)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX)),
            |row| Ok((row.try_get(0)?, row.try_get(1)?)),
        )
        .await
    }

    async fn expire_statuses(&self, now_ms: i64) -> Result<Vec<TopicSession>, StoreError> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT {TOPIC_COLUMNS} FROM topic_sessions WHERE until_ms IS NOT NULL AND until_ms <= $1"
        ))
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        let mut expired = Vec::with_capacity(rows.len());
        for row in &rows {
            let session = topic_session(row)?.available();
            // Only if it is still due: a status set meanwhile stands.
            let reset = sqlx::query(
                "UPDATE topic_sessions SET state = 'available', note = '', until_ms = NULL \
                 WHERE tenant_id = $1 AND topic = $2 AND session_id = $3 \
                 AND until_ms IS NOT NULL AND until_ms <= $4",
            )
            .bind(&session.tenant_id)
            .bind(&session.topic)
            .bind(&session.session_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            if reset.rows_affected() == 0 {
                continue;
            }
            outbox::append(&mut tx, &diff_event(&session, "status")).await?;
            expired.push(session);
        }
        self.commit(tx).await?;
        Ok(expired)
    }
}
