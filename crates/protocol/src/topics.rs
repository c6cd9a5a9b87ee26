//! Payloads of muster's topic-presence requests
//! (docs/protocol-extensions.md), parsed strictly.

use serde::Deserialize;
use serde_json::Value;

use crate::from_object as parse;

/// The longest topic, session, principal or agent id, in bytes.
pub const MAX_FIELD: usize = 256;

/// A topic, session, principal or agent id: not blank, at most
/// [`MAX_FIELD`] bytes.
pub fn check_field(name: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() || value.len() > MAX_FIELD {
        return Err(format!("{name} must be 1 to {MAX_FIELD} bytes"));
    }
    if value.contains('\0') {
        return Err(format!("{name} contains a NUL character"));
    }
    Ok(())
}

/// A session's kind: `human`, or `agent_for` with the agent's id.
pub fn check_kind(kind: &str, agent_id: Option<&str>) -> Result<(), String> {
    match (kind, agent_id) {
        ("human", None) => Ok(()),
        ("agent_for", Some(agent)) => check_field("agent_id", agent),
        ("human", Some(_)) => Err("agent_id is for agent_for only".into()),
        ("agent_for", None) => Err("agent_for needs an agent_id".into()),
        (other, _) => Err(format!("kind must be human or agent_for, not {other:?}")),
    }
}

fn check_topic(topic: &str, session: Option<&str>) -> Result<(), String> {
    check_field("topic", topic)?;
    session.map_or(Ok(()), |session| check_field("session", session))
}

/// `muster.topic.track`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Track {
    pub topic: String,
    /// Defaults to the connection id.
    #[serde(default, deserialize_with = "crate::present")]
    pub session: Option<String>,
    pub principal: String,
    /// `human` or `agent_for`.
    pub kind: String,
    #[serde(default, deserialize_with = "crate::present")]
    pub agent_id: Option<String>,
}

/// `muster.topic.untrack`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Untrack {
    pub topic: String,
    #[serde(default, deserialize_with = "crate::present")]
    pub session: Option<String>,
}

/// `muster.topic.status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub topic: String,
    #[serde(default, deserialize_with = "crate::present")]
    pub session: Option<String>,
    /// `available`, `busy` or `blocked`.
    pub state: String,
    #[serde(default)]
    pub note: String,
    /// A `dt`; the status returns to available then.
    #[serde(default, deserialize_with = "crate::present")]
    pub until: Option<String>,
}

/// `muster.topic.list`, `muster.topic.count`, `muster.topic.subscribe`,
/// `muster.topic.unsubscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topic {
    pub topic: String,
    /// `cluster` (default) or `edge` (list and count only).
    #[serde(default, deserialize_with = "crate::present")]
    pub scope: Option<String>,
    /// List only: the sessions after this session id (the `next` of the
    /// page before).
    #[serde(default, deserialize_with = "crate::present")]
    pub after: Option<String>,
    /// List only: at most this many sessions, 1 to [`LIST_PAGE`].
    #[serde(default, deserialize_with = "crate::present")]
    pub limit: Option<u32>,
}

/// The most sessions one page of `muster.topic.list` holds.
pub const LIST_PAGE: u32 = 1000;

impl Track {
    pub fn parse(payload: &Value) -> Result<Track, String> {
        let track: Track = parse(payload)?;
        check_topic(&track.topic, track.session.as_deref())?;
        check_field("principal", &track.principal)?;
        check_kind(&track.kind, track.agent_id.as_deref())?;
        Ok(track)
    }
}

impl Untrack {
    pub fn parse(payload: &Value) -> Result<Untrack, String> {
        let untrack: Untrack = parse(payload)?;
        check_topic(&untrack.topic, untrack.session.as_deref())?;
        Ok(untrack)
    }
}

impl Status {
    pub fn parse(payload: &Value) -> Result<Status, String> {
        let status: Status = parse(payload)?;
        check_topic(&status.topic, status.session.as_deref())?;
        Ok(status)
    }
}

impl Topic {
    pub fn parse(payload: &Value) -> Result<Topic, String> {
        let topic: Topic = parse(payload)?;
        check_topic(&topic.topic, None)?;
        if let Some(after) = &topic.after {
            check_field("after", after)?;
        }
        if matches!(topic.limit, Some(n) if n == 0 || n > LIST_PAGE) {
            return Err(format!("limit: expected 1 to {LIST_PAGE}"));
        }
        match topic.scope.as_deref() {
            None | Some("cluster") | Some("edge") => Ok(topic),
            Some(other) => Err(format!("scope must be cluster or edge, not {other:?}")),
        }
    }
}
