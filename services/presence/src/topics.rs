//! Topic presence: which people and agents are in a topic, and their
//! status (available, busy, blocked, with a note and an optional expiry).
//! Every change is a `muster.topic.diff` event for the topic's subscribers.

use std::sync::Arc;

use muster_mesh::{ErrorCode, ServiceError};
use muster_protocol::{format_datetime, topics};
use muster_store::outbox::NewItem;
use muster_store::{StoreError, now_ms};
use serde_json::{Value, json};

use crate::store::{TopicStore, Tracked};

/// Notes are cut to this many characters (a soft limit).
pub const NOTE_CHARS: usize = 140;

/// The event type of every topic change.
pub const DIFF_EVENT: &str = "muster.topic.diff";

/// One session in one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSession {
    pub tenant_id: String,
    pub topic: String,
    pub session_id: String,
    pub principal: String,
    /// `human` or `agent_for`.
    pub kind: String,
    /// Set for `agent_for`.
    pub agent_id: Option<String>,
    pub since_ms: i64,
    /// `available`, `busy` or `blocked`.
    pub state: String,
    pub note: String,
    pub until_ms: Option<i64>,
    pub edge_id: String,
    pub connection_id: String,
    /// The device whose connection tracked it (not on the wire).
    pub device_id: String,
}

impl TopicSession {
    /// The session with no status: `available`, no note, no `until`.
    pub(crate) fn available(self) -> TopicSession {
        TopicSession {
            state: "available".into(),
            note: String::new(),
            until_ms: None,
            ..self
        }
    }

    /// The diff payload: `kind` is join, leave or status; the session's own
    /// kind travels as `ekind`.
    pub fn diff(&self, kind: &str) -> Value {
        let mut diff = self.wire();
        if let Some(map) = diff.as_object_mut() {
            map.remove("edge_id");
            let ekind = map.remove("kind").unwrap_or_default();
            map.insert("ekind".into(), ekind);
            map.insert("kind".into(), json!(kind));
        }
        diff
    }

    /// The session as listings carry it.
    pub fn wire(&self) -> Value {
        json!({
            "topic": self.topic,
            "principal": self.principal,
            "kind": self.kind,
            "agent_id": self.agent_id,
            "session": self.session_id,
            "since": format_datetime(self.since_ms),
            "state": self.state,
            "note": self.note,
            "until_ts": self.until_ms.map(format_datetime),
            "edge_id": self.edge_id,
        })
    }
}

/// The diff event for a change of `session`.
pub fn diff_event(session: &TopicSession, kind: &str) -> NewItem {
    NewItem::event(&session.tenant_id, DIFF_EVENT, session.diff(kind))
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("{0}")]
    Invalid(String),
    #[error("no session {session} in topic {topic}")]
    NotFound { topic: String, session: String },
    #[error("session {session} in topic {topic} is another device's")]
    Held { topic: String, session: String },
    #[error(
        "session {session} in topic {topic} is tracked as another principal, kind or agent; untrack it first"
    )]
    Differs { topic: String, session: String },
    #[error(
        "a connection holds at most {} topic sessions; untrack one first",
        crate::store::CONNECTION_SESSIONS
    )]
    Full,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError for TopicError {
    fn code(&self) -> ErrorCode {
        match self {
            TopicError::Invalid(_) => ErrorCode::InvalidArgument,
            TopicError::NotFound { .. } => ErrorCode::NotFound,
            TopicError::Held { .. } => ErrorCode::Forbidden,
            TopicError::Full | TopicError::Differs { .. } => ErrorCode::InvalidState,
            TopicError::Store(e) => e.code(),
        }
    }

    fn store_error(&self) -> Option<&StoreError> {
        match self {
            TopicError::Store(error) => Some(error),
            _ => None,
        }
    }
}

fn field(name: &str, value: &str) -> Result<(), TopicError> {
    topics::check_field(name, value).map_err(TopicError::Invalid)
}

/// The keys every call names, checked as `track` checks them: callers
/// other than an edge (the command line) reach these calls too.
fn key_fields(tenant_id: &str, topic: &str, session_id: Option<&str>) -> Result<(), TopicError> {
    field("tenant_id", tenant_id)?;
    field("topic", topic)?;
    session_id.map_or(Ok(()), |session| field("session", session))
}

/// How long the sessions of an edge taken for gone are kept for it to
/// revive: a partition longer than this loses them.
pub const GONE_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Connections one revival names at most.
pub const REVIVE_CONNECTIONS: usize = 5000;

/// Topic presence: track, untrack, status, list.
#[derive(Clone)]
pub struct Topics {
    store: Arc<dyn TopicStore>,
}

impl Topics {
    pub fn new(store: Arc<dyn TopicStore>) -> Self {
        Topics { store }
    }

    /// Puts a session in a topic (`join`). Tracking the same (topic,
    /// session) again from the same device changes nothing but which
    /// connection holds it (a peer that reconnected, perhaps to another
    /// edge), and is refused if it names another principal, kind or
    /// agent; from another device it is refused, also while the session
    /// is kept aside for that device's edge.
    pub async fn track(&self, session: TopicSession) -> Result<TopicSession, TopicError> {
        for (name, value) in [
            ("tenant_id", &session.tenant_id),
            ("topic", &session.topic),
            ("session", &session.session_id),
            ("principal", &session.principal),
            ("connection_id", &session.connection_id),
            ("edge_id", &session.edge_id),
        ] {
            field(name, value)?;
        }
        // No device is an empty one (a peer without a key).
        if !session.device_id.is_empty() {
            field("device_id", &session.device_id)?;
        }
        topics::check_kind(&session.kind, session.agent_id.as_deref())
            .map_err(TopicError::Invalid)?;
        let session = TopicSession {
            since_ms: now_ms(),
            ..session.available()
        };
        match self
            .store
            .track(&session, &diff_event(&session, "join"))
            .await?
        {
            Tracked::Session(tracked) => Ok(*tracked),
            Tracked::Held => Err(TopicError::Held {
                topic: session.topic,
                session: session.session_id,
            }),
            Tracked::Differs => Err(TopicError::Differs {
                topic: session.topic,
                session: session.session_id,
            }),
            Tracked::Full => Err(TopicError::Full),
        }
    }

    /// Takes `device_id`'s session out of a topic (`leave`); whether it
    /// was there.
    pub async fn untrack(
        &self,
        tenant_id: &str,
        topic: &str,
        session_id: &str,
        device_id: &str,
    ) -> Result<bool, TopicError> {
        key_fields(tenant_id, topic, Some(session_id))?;
        Ok(self
            .store
            .untrack(tenant_id, topic, session_id, device_id)
            .await?
            .is_some())
    }

    /// Untracks every session a closed connection held.
    pub async fn untrack_connection(
        &self,
        tenant_id: &str,
        connection_id: &str,
    ) -> Result<usize, TopicError> {
        Ok(self
            .store
            .untrack_connection(tenant_id, connection_id)
            .await?
            .len())
    }

    /// Up to `limit` of the (tenant, connection) pairs of `edge_id`'s
    /// sessions after `after`, in (tenant, connection) order, and whether
    /// more follow.
    pub async fn edge_session_connections(
        &self,
        edge_id: &str,
        after: (&str, &str),
        limit: usize,
    ) -> Result<(Vec<(String, String)>, bool), TopicError> {
        field("edge_id", edge_id)?;
        let mut pairs = self
            .store
            .edge_session_connections(edge_id, after, limit.saturating_add(1))
            .await?;
        let more = pairs.len() > limit;
        pairs.truncate(limit);
        Ok((pairs, more))
    }

    /// Sets the status of `device_id`'s session (`status`); `until_ms`
    /// makes it expire back to available.
    #[allow(clippy::too_many_arguments)]
    pub async fn set_status(
        &self,
        tenant_id: &str,
        topic: &str,
        session_id: &str,
        device_id: &str,
        state: &str,
        note: &str,
        until_ms: Option<i64>,
    ) -> Result<TopicSession, TopicError> {
        key_fields(tenant_id, topic, Some(session_id))?;
        if !matches!(state, "available" | "busy" | "blocked") {
            return Err(TopicError::Invalid(format!(
                "state must be available, busy or blocked, not {state:?}"
            )));
        }
        muster_store::text::check_text("note", note, 4096).map_err(TopicError::Invalid)?;
        let now = now_ms();
        if matches!(until_ms, Some(until) if until <= now) {
            return Err(TopicError::Invalid("until must be in the future".into()));
        }
        // It goes out as a `dt`, which has four digits for its year.
        if matches!(until_ms, Some(until) if until > muster_protocol::MAX_DATETIME_MS) {
            return Err(TopicError::Invalid(
                "until must be before the year 10000".into(),
            ));
        }
        let note: String = note.chars().take(NOTE_CHARS).collect();
        self.store
            .set_status(
                tenant_id, topic, session_id, device_id, state, &note, until_ms,
            )
            .await?
            .ok_or_else(|| TopicError::NotFound {
                topic: topic.to_owned(),
                session: session_id.to_owned(),
            })
    }

    /// Up to `limit` of a topic's sessions after the session id `after`
    /// (all or this edge's), in session order, and whether more follow.
    pub async fn list(
        &self,
        tenant_id: &str,
        topic: &str,
        edge_id: Option<&str>,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<TopicSession>, bool), TopicError> {
        key_fields(tenant_id, topic, None)?;
        if !after.is_empty() {
            field("after", after)?;
        }
        let mut sessions = self
            .store
            .list(tenant_id, topic, edge_id, after, limit.saturating_add(1))
            .await?;
        let more = sessions.len() > limit;
        sessions.truncate(limit);
        Ok((sessions, more))
    }

    /// How many sessions a topic has (all or this edge's), and how many of
    /// them are humans'.
    pub async fn count(
        &self,
        tenant_id: &str,
        topic: &str,
        edge_id: Option<&str>,
    ) -> Result<(u64, u64), TopicError> {
        key_fields(tenant_id, topic, None)?;
        Ok(self.store.count(tenant_id, topic, edge_id).await?)
    }

    /// Statuses past their `until` return to available, each with a
    /// `status` diff.
    pub async fn expire(&self) -> Result<usize, TopicError> {
        Ok(self.store.expire_statuses(now_ms()).await?.len())
    }

    /// Every session of `edge_id` leaves, each with a `leave` diff: at an
    /// edge's start, what an edge of that name held in an earlier run.
    pub async fn forget_edge_sessions(&self, edge_id: &str) -> Result<usize, TopicError> {
        field("edge_id", edge_id)?;
        Ok(self.store.forget_edge_sessions(edge_id).await?.len())
    }

    /// The sessions of edges that stopped refreshing for `ttl` leave, each
    /// with a `leave` diff: a dead edge leaves no ghosts. They are kept
    /// aside for [`GONE_KEPT`], in case the edge was only cut off and its
    /// peers are still connected (see [`Topics::revive_edge_sessions`]).
    pub async fn expire_edges(&self, ttl: std::time::Duration) -> Result<usize, TopicError> {
        let now = now_ms();
        let cutoff = now.saturating_sub(crate::instances::millis(ttl));
        let gone_cutoff = now - GONE_KEPT.as_millis() as i64;
        Ok(self
            .store
            .expire_edges(cutoff, now, gone_cutoff)
            .await?
            .len())
    }

    /// An edge presence had taken for gone refreshes again: the sessions
    /// it held of `connection_ids` (connections it still holds, at most
    /// [`REVIVE_CONNECTIONS`] a call) are tracked again with `join` diffs,
    /// as they were (since, status), unless a peer tracked or untracked
    /// them meanwhile. `last`: the edge has named every connection it
    /// holds, and the rest is forgotten. How many came back.
    pub async fn revive_edge_sessions(
        &self,
        edge_id: &str,
        connection_ids: &[String],
        last: bool,
    ) -> Result<usize, TopicError> {
        field("edge_id", edge_id)?;
        if connection_ids.len() > REVIVE_CONNECTIONS {
            return Err(TopicError::Invalid(format!(
                "at most {REVIVE_CONNECTIONS} connections per revival"
            )));
        }
        Ok(self
            .store
            .revive_edge_sessions(edge_id, connection_ids, last, now_ms())
            .await?
            .len())
    }
}
