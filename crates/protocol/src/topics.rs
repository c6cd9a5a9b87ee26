//! Payloads of muster's topic-presence requests
//! (docs/protocol-extensions.md), parsed strictly.

use serde::Deserialize;
use serde_json::Value;

fn parse<T: serde::de::DeserializeOwned>(payload: &Value) -> Result<T, String> {
    serde_json::from_value(payload.clone()).map_err(|e| e.to_string())
}

/// `muster.topic.track`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Track {
    pub topic: String,
    /// Defaults to the connection id.
    pub session: Option<String>,
    pub principal: String,
    /// `human` or `agent_for`.
    pub kind: String,
    pub agent_id: Option<String>,
}

/// `muster.topic.untrack`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Untrack {
    pub topic: String,
    pub session: Option<String>,
}

/// `muster.topic.status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub topic: String,
    pub session: Option<String>,
    /// `available`, `busy` or `blocked`.
    pub state: String,
    #[serde(default)]
    pub note: String,
    /// A `dt`; the status returns to available then.
    pub until: Option<String>,
}

/// `muster.topic.list`, `muster.topic.count`, `muster.topic.subscribe`,
/// `muster.topic.unsubscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topic {
    pub topic: String,
    /// `cluster` (default) or `edge` (list and count only).
    pub scope: Option<String>,
}

impl Track {
    pub fn parse(payload: &Value) -> Result<Track, String> {
        parse(payload)
    }
}

impl Untrack {
    pub fn parse(payload: &Value) -> Result<Untrack, String> {
        parse(payload)
    }
}

impl Status {
    pub fn parse(payload: &Value) -> Result<Status, String> {
        parse(payload)
    }
}

impl Topic {
    pub fn parse(payload: &Value) -> Result<Topic, String> {
        let topic: Topic = parse(payload)?;
        match topic.scope.as_deref() {
            None | Some("cluster") | Some("edge") => Ok(topic),
            Some(other) => Err(format!("scope must be cluster or edge, not {other:?}")),
        }
    }
}
