//! The connection directory: which edge holds which connection of which
//! device. Edges register connections as peers finish the handshake,
//! unregister them as they close, and heartbeat; the rows of an edge that
//! stops heartbeating expire. The backplane uses it to send a directed
//! item only to the edge that holds its target.

use std::collections::HashSet;
use std::sync::Arc;

use muster_store::group::GroupCommit;
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
            // The same on both stores: Postgres refuses a NUL, and an
            // indexed value of kilobytes, that SQLite would keep.
            muster_store::text::check_name(field, value, muster_store::text::MAX_NAME_BYTES)
                .map_err(|reason| StoreError::invalid(field, reason))?;
        }
        if self.role != "client" && self.role != "node" {
            return Err(StoreError::invalid("role", "client or node"));
        }
        Ok(())
    }
}

/// A change edges make to the directory as peers come and go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Register(Registration),
    Unregister {
        edge_id: String,
        connection_id: String,
    },
}

#[tonic::async_trait]
pub trait DirectoryStore: Send + Sync + 'static {
    /// Applies `changes` in one transaction; per change, whether it
    /// changed a row (a registration always does).
    async fn apply(&self, changes: &[Change]) -> Result<Vec<bool>, StoreError>;
    async fn register(&self, registration: &Registration) -> Result<(), StoreError> {
        self.apply(&[Change::Register(registration.clone())])
            .await
            .map(drop)
    }
    async fn unregister(&self, edge_id: &str, connection_id: &str) -> Result<bool, StoreError> {
        let change = Change::Unregister {
            edge_id: edge_id.to_owned(),
            connection_id: connection_id.to_owned(),
        };
        Ok(self.apply(&[change]).await?.first() == Some(&true))
    }
    /// Extends the edge's rows and returns the connection ids it still
    /// holds there.
    async fn heartbeat(&self, edge_id: &str) -> Result<Vec<String>, StoreError>;
    /// Removes the edge's rows at once (a clean stop).
    async fn forget_edge(&self, edge_id: &str) -> Result<u64, StoreError>;
    /// Removes rows whose edge stopped heartbeating.
    async fn expire(&self) -> Result<u64, StoreError>;
    /// For each directed item's tenant and target, whether `edge_id` holds
    /// the target. A row past its expiry still counts until it is removed:
    /// the edge learns of a removed row at its next heartbeat and closes
    /// that peer, so every peer an item was held back from is told so; an
    /// expired row its edge heartbeats again in time was never missing.
    /// Looked up together (a statement per up to 64 devices
    /// or connections), so that a burst of commands to many devices costs a
    /// few queries per batch, not one per item.
    async fn holding(
        &self,
        edge_id: &str,
        targets: &[(&str, &Target)],
    ) -> Result<Vec<bool>, StoreError>;
}

/// Rows that [`muster_store::in_statements`] always puts in one statement.
const ONE_STATEMENT: usize = 16;

/// Records connections (or moves them to another edge), many per
/// statement: inside `tx`, or each statement committed on its own.
async fn insert_registrations(
    store: &Store,
    mut tx: Option<&mut muster_store::Tx>,
    registrations: &[&Registration],
) -> Result<(), StoreError> {
    const COLUMNS: usize = 7;
    let registrations = muster_store::last_of_each(registrations, |r| r.connection_id.as_str());
    let now = now_ms();
    for chunk in muster_store::in_statements(&registrations, COLUMNS) {
        let sql = format!(
            "INSERT INTO connections (connection_id, tenant_id, device_id, edge_id, \
             role, connected_at_ms, expires_at_ms) VALUES {} \
             ON CONFLICT (connection_id) DO UPDATE SET tenant_id = excluded.tenant_id, \
             device_id = excluded.device_id, edge_id = excluded.edge_id, \
             role = excluded.role, expires_at_ms = excluded.expires_at_ms",
            muster_store::values_rows(chunk.len(), COLUMNS)
        );
        let mut query = sqlx::query(&sql);
        for r in chunk {
            query = query
                .bind(&r.connection_id)
                .bind(&r.tenant_id)
                .bind(&r.device_id)
                .bind(&r.edge_id)
                .bind(&r.role)
                .bind(now)
                .bind(now + DIRECTORY_TTL_MS);
        }
        match tx.as_deref_mut() {
            Some(tx) => query.execute(&mut **tx).await?,
            None => query.execute(store.writer()).await?,
        };
    }
    Ok(())
}

#[tonic::async_trait]
impl DirectoryStore for Store {
    async fn apply(&self, changes: &[Change]) -> Result<Vec<bool>, StoreError> {
        for change in changes {
            if let Change::Register(registration) = change {
                registration.validate()?;
            }
        }
        // A reconnect storm's batch: arrivals only, few enough for one
        // statement, which commits alone (no BEGIN and COMMIT round trips
        // while their handshakes wait for it).
        let arrivals: Vec<&Registration> = changes
            .iter()
            .filter_map(|change| match change {
                Change::Register(r) => Some(r),
                Change::Unregister { .. } => None,
            })
            .collect();
        if arrivals.len() == changes.len() && arrivals.len() <= ONE_STATEMENT {
            insert_registrations(self, None, &arrivals).await?;
            return Ok(vec![true; changes.len()]);
        }
        let mut tx = self.begin().await?;
        let mut changed = Vec::with_capacity(changes.len());
        let runs = muster_store::conflict_free_runs(changes, |change| match change {
            Change::Register(r) => (r.connection_id.as_str(), false),
            Change::Unregister { connection_id, .. } => (connection_id.as_str(), true),
        });
        for run in runs {
            let registrations: Vec<&Registration> = run
                .iter()
                .filter_map(|change| match change {
                    Change::Register(r) => Some(r),
                    Change::Unregister { .. } => None,
                })
                .collect();
            insert_registrations(self, Some(&mut tx), &registrations).await?;
            let removed = muster_store::remove_in_run(
                &mut tx,
                "connections",
                ["connection_id", "edge_id"],
                run,
                |change| match change {
                    Change::Register(_) => None,
                    Change::Unregister {
                        edge_id,
                        connection_id,
                    } => Some([connection_id.as_str(), edge_id.as_str()]),
                },
            )
            .await?;
            changed.extend(removed);
        }
        self.commit(tx).await?;
        Ok(changed)
    }

    async fn heartbeat(&self, edge_id: &str) -> Result<Vec<String>, StoreError> {
        if edge_id.trim().is_empty() {
            return Err(StoreError::invalid("edge_id", "required"));
        }
        sqlx::query("UPDATE connections SET expires_at_ms = $1 WHERE edge_id = $2")
            .bind(now_ms() + DIRECTORY_TTL_MS)
            .bind(edge_id)
            .execute(self.writer())
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
            .execute(self.writer())
            .await?
            .rows_affected())
    }

    async fn expire(&self) -> Result<u64, StoreError> {
        Ok(
            sqlx::query("DELETE FROM connections WHERE expires_at_ms < $1")
                .bind(now_ms())
                .execute(self.writer())
                .await?
                .rows_affected(),
        )
    }

    async fn holding(
        &self,
        edge_id: &str,
        targets: &[(&str, &Target)],
    ) -> Result<Vec<bool>, StoreError> {
        // Devices by (tenant, device) and connections by their id, so that
        // each lookup is an index probe, not a read of the edge's rows.
        let mut device_keys: Vec<(&str, &str)> = Vec::new();
        let mut connection_ids: Vec<&str> = Vec::new();
        for &(tenant_id, target) in targets {
            match target {
                Target::Device(id) => device_keys.push((tenant_id, id.as_str())),
                Target::Connection(id) => connection_ids.push(id.as_str()),
                Target::Edge(_) => {}
            }
        }
        device_keys.sort_unstable();
        device_keys.dedup();
        connection_ids.sort_unstable();
        connection_ids.dedup();
        let pair = |row: &sqlx::any::AnyRow| {
            Ok((row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?))
        };
        let mut devices = HashSet::new();
        for chunk in muster_store::in_statements(&device_keys, 2) {
            // The edge is checked on what comes back: in the statement,
            // SQLite may pick the index on edge_id and read every row of
            // the edge.
            let sql = format!(
                "SELECT tenant_id, device_id, edge_id FROM connections WHERE {}",
                muster_store::tuples_in(["tenant_id", "device_id"], chunk.len()),
            );
            let query = chunk.iter().fold(sqlx::query(&sql), |q, (tenant_id, id)| {
                q.bind(*tenant_id).bind(*id)
            });
            let rows = self
                .fetch_all(query, |row| {
                    let held = row.try_get::<String, _>(2)? == edge_id;
                    held.then(|| pair(row)).transpose()
                })
                .await?;
            devices.extend(rows.into_iter().flatten());
        }
        // A connection's tenant is checked on what comes back.
        let mut connections = HashSet::new();
        for chunk in muster_store::in_statements(&connection_ids, 1) {
            let n = chunk.len();
            let sql = format!(
                "SELECT tenant_id, connection_id FROM connections \
                 WHERE connection_id IN ({}) AND edge_id = ${}",
                muster_store::placeholders(1, n),
                n + 1,
            );
            let query = chunk.iter().fold(sqlx::query(&sql), |q, id| q.bind(*id));
            connections.extend(self.fetch_all(query.bind(edge_id), pair).await?);
        }
        Ok(targets
            .iter()
            .map(|&(tenant_id, target)| match target {
                Target::Edge(id) => id == edge_id,
                Target::Device(id) => devices.contains(&(tenant_id.to_owned(), id.clone())),
                Target::Connection(id) => connections.contains(&(tenant_id.to_owned(), id.clone())),
            })
            .collect())
    }
}

/// At most this many directory changes share one transaction.
const MAX_BATCH: usize = 256;

/// The directory as the backplane serves it: registrations and
/// unregistrations of connections arriving together share one commit.
#[derive(Clone)]
pub struct Directory {
    store: Arc<dyn DirectoryStore>,
    changes: GroupCommit<Change, bool>,
}

impl Directory {
    /// Must be called inside a tokio runtime: it starts the writer.
    pub fn new(store: Arc<dyn DirectoryStore>) -> Self {
        let writer = store.clone();
        let changes = GroupCommit::start(MAX_BATCH, move |batch: Arc<[Change]>| {
            let store = writer.clone();
            async move { store.apply(&batch).await }
        });
        Directory { store, changes }
    }

    pub async fn register(&self, registration: Registration) -> Result<(), StoreError> {
        self.changes
            .write(Change::Register(registration))
            .await
            .map(drop)
    }

    pub async fn unregister(
        &self,
        edge_id: String,
        connection_id: String,
    ) -> Result<bool, StoreError> {
        self.changes
            .write(Change::Unregister {
                edge_id,
                connection_id,
            })
            .await
    }

    /// Heartbeats, expiry and lookups, which need no batching.
    pub fn store(&self) -> &Arc<dyn DirectoryStore> {
        &self.store
    }
}
