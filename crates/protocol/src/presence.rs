//! Presence shapes on the wire (Part B §4).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Values of `mode` Tyrum's SDK accepts; any other value makes it drop the
/// event, so only these are ever sent.
pub const MODES: [&str; 9] = [
    "ui",
    "web",
    "cli",
    "node",
    "backend",
    "probe",
    "test",
    "desktop",
    "browser-node",
];

/// Values of `reason`.
pub const REASONS: [&str; 5] = ["self", "connect", "periodic", "node-connected", "prune"];

/// A presence entry as events and listings carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceEntry {
    pub instance_id: String,
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    pub last_seen_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_input_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// A `presence.beacon` payload.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Beacon {
    #[serde(default, deserialize_with = "crate::present")]
    pub host: Option<String>,
    #[serde(default, deserialize_with = "crate::present")]
    pub ip: Option<String>,
    #[serde(default, deserialize_with = "crate::present")]
    pub version: Option<String>,
    #[serde(default, deserialize_with = "crate::present")]
    pub mode: Option<String>,
    #[serde(default, deserialize_with = "crate::present_whole")]
    pub last_input_seconds: Option<i64>,
    #[serde(default, deserialize_with = "crate::present")]
    pub metadata: Option<Value>,
}

impl Beacon {
    pub fn parse(payload: &Value) -> Result<Beacon, String> {
        let beacon: Beacon = crate::from_object(payload)?;
        if let Some(mode) = &beacon.mode
            && !MODES.contains(&mode.as_str())
        {
            return Err(format!("mode: expected one of {}", MODES.join("|")));
        }
        if matches!(beacon.last_input_seconds, Some(s) if s < 0) {
            return Err("last_input_seconds: expected an integer >= 0".into());
        }
        if matches!(&beacon.metadata, Some(m) if !m.is_object()) {
            return Err("metadata: expected an object".into());
        }
        Ok(beacon)
    }
}

/// `mode` as it may be sent: a known value, or nothing.
pub fn wire_mode(mode: &str) -> Option<String> {
    MODES.contains(&mode).then(|| mode.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_beacon_is_an_object() {
        assert_eq!(Beacon::parse(&json!({})).unwrap(), Beacon::default());
        // serde alone builds a struct whose fields all have defaults from `[]`.
        for bad in [json!([]), json!(null), json!("host")] {
            assert!(Beacon::parse(&bad).is_err(), "{bad}");
        }
    }
}
