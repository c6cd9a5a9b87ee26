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

/// Longest text a presence field may hold.
pub const MAX_FIELD: usize = 256;
/// Largest metadata object an entry may carry, as JSON text.
pub const MAX_METADATA: usize = 8 * 1024;

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
        // Presence's own bounds, checked here too: a beacon past them
        // would otherwise travel to presence in a batch with other peers'
        // changes, and one large enough would fail the whole batch.
        for (name, value) in [
            ("host", &beacon.host),
            ("ip", &beacon.ip),
            ("version", &beacon.version),
        ] {
            let Some(value) = value else { continue };
            if value.len() > MAX_FIELD {
                return Err(format!("{name}: longer than {MAX_FIELD} bytes"));
            }
            if value.contains('\0') {
                return Err(format!("{name}: contains a NUL character"));
            }
        }
        if let Some(metadata) = &beacon.metadata
            && metadata.to_string().len() > MAX_METADATA
        {
            return Err(format!("metadata: larger than {MAX_METADATA} bytes"));
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

    #[test]
    fn a_beacon_past_presences_bounds_is_refused_before_it_travels() {
        let long = "h".repeat(MAX_FIELD + 1);
        for bad in [
            json!({"host": long}),
            json!({"ip": long}),
            json!({"version": long}),
            json!({"host": "a\u{0}b"}),
            json!({"metadata": {"x": "m".repeat(MAX_METADATA)}}),
        ] {
            assert!(Beacon::parse(&bad).is_err(), "{bad}");
        }
        let fits = json!({
            "host": "h".repeat(MAX_FIELD),
            "metadata": {"x": "m".repeat(MAX_METADATA - 10)},
        });
        assert!(Beacon::parse(&fits).is_ok());
    }
}
