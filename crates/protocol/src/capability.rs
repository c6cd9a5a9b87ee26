//! The `capability.ready` payload a node sends after every connect
//! (Part B §6).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::handshake::CapabilityDescriptor;

/// A node's report of which of its capabilities are ready.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityReady {
    #[serde(default)]
    pub capabilities: Vec<CapabilityDescriptor>,
    #[serde(default)]
    pub capability_states: Vec<CapabilityState>,
}

/// How one capability's actions stand; written back as it was read in
/// the `capability.ready` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityState {
    pub capability: String,
    #[serde(default)]
    pub actions: Vec<ActionState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionState {
    pub name: String,
    pub enabled: bool,
    pub availability_status: Availability,
    #[serde(
        default,
        deserialize_with = "crate::present",
        skip_serializing_if = "Option::is_none"
    )]
    pub unavailable_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Unknown,
    Available,
    Unavailable,
}

impl CapabilityReady {
    pub fn parse(payload: &Value) -> Result<CapabilityReady, String> {
        let mut report: CapabilityReady = crate::from_object(payload)?;
        crate::handshake::check_descriptors(&mut report.capabilities)?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_parse_as_the_node_sdk_sends_them_and_others_do_not() {
        let report = CapabilityReady::parse(&json!({
            "capabilities": [{"id": "tyrum.desktop.screenshot", "version": "1.0.0"}],
            "capability_states": [{"capability": "tyrum.desktop.screenshot", "actions": [
                {"name": "screenshot", "enabled": true, "availability_status": "available"},
                {"name": "act", "enabled": false, "availability_status": "unavailable",
                 "unavailable_reason": "no display"}
            ]}]
        }))
        .unwrap();
        assert_eq!(report.capabilities[0].id, "tyrum.desktop.screenshot");
        let trimmed = CapabilityReady::parse(&json!({
            "capabilities": [{"id": " tyrum.fs.read ", "version": "2.0.0 "}, {"id": "tyrum.fs.write"}]
        }))
        .unwrap();
        assert_eq!(
            (
                trimmed.capabilities[0].id.as_str(),
                trimmed.capabilities[0].version.as_str()
            ),
            ("tyrum.fs.read", "2.0.0")
        );
        assert_eq!(trimmed.capabilities[1].version, "1.0.0");
        assert_eq!(
            report.capability_states[0].actions[1].availability_status,
            Availability::Unavailable
        );
        assert_eq!(
            CapabilityReady::parse(&json!({})).unwrap(),
            CapabilityReady::default()
        );
        for bad in [
            json!({"capabilities": "tyrum.fs.read"}),
            json!({"capabilities": [{"id": "x", "extra": 1}]}),
            json!({"capability_states": [{"capability": "x", "actions": [
                {"name": "a", "enabled": true, "availability_status": "maybe"}]}]}),
            json!({"surprise": true}),
            json!([]),
            // The descriptors are Part B §3's strict ones, as at connect.
            json!({"capabilities": [{"id": "Bad", "version": "1.0.0"}]}),
            json!({"capabilities": [{"id": "tyrum.fs.read", "version": "1"}]}),
            // `?` keys are omitted, never null.
            json!({"capability_states": [{"capability": "x", "actions": [
                {"name": "a", "enabled": false, "availability_status": "unavailable",
                 "unavailable_reason": null}]}]}),
        ] {
            assert!(CapabilityReady::parse(&bad).is_err(), "{bad}");
        }
    }
}
