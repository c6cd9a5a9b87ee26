//! `connect.init` and `connect.proof` payloads (Part B §3), parsed
//! strictly: an unknown key or a malformed field refuses the payload.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The role a connection claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Node,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Node => "node",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityDescriptor {
    pub id: String,
    #[serde(default = "default_version")]
    pub version: String,
}

fn default_version() -> String {
    "1.0.0".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    Phone,
    Tablet,
    Desktop,
    Browser,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DevicePlatform {
    Ios,
    Android,
    Macos,
    Windows,
    Linux,
    Web,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub device_id: String,
    pub pubkey: String,
    #[serde(default, deserialize_with = "crate::present")]
    pub label: Option<String>,
    #[serde(default, deserialize_with = "crate::present")]
    pub platform: Option<String>,
    #[serde(default, deserialize_with = "crate::present")]
    pub version: Option<String>,
    #[serde(default, deserialize_with = "crate::present")]
    pub mode: Option<String>,
    #[serde(default, deserialize_with = "crate::present")]
    pub device_model: Option<String>,
    #[serde(default, deserialize_with = "crate::present")]
    pub device_type: Option<DeviceType>,
    #[serde(default, deserialize_with = "crate::present")]
    pub device_platform: Option<DevicePlatform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectInit {
    #[serde(deserialize_with = "crate::whole")]
    pub protocol_rev: i64,
    pub role: Role,
    #[serde(default)]
    pub capabilities: Vec<CapabilityDescriptor>,
    pub device: Device,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectProof {
    pub connection_id: String,
    pub proof: String,
}

fn is_capability_id(id: &str) -> bool {
    // ^[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)+$
    let segments: Vec<&str> = id.split('.').collect();
    segments.len() >= 2
        && segments.iter().all(|s| {
            let mut chars = s.chars();
            chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// Tyrum's capability version pattern, `^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)`
/// `(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$`: three numbers without
/// leading zeros, then an optional pre-release and build, each a
/// non-empty run of letters, digits, `.` and `-`.
fn is_semver(version: &str) -> bool {
    fn number(part: &str) -> bool {
        !part.is_empty()
            && part.bytes().all(|b| b.is_ascii_digit())
            && (part == "0" || !part.starts_with('0'))
    }
    fn run(part: &str) -> bool {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    }
    let (rest, build) = match version.split_once('+') {
        Some((rest, build)) => (rest, Some(build)),
        None => (version, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (rest, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| number(p))
        && pre.is_none_or(run)
        && build.is_none_or(run)
}

fn non_empty(name: &str, value: &Option<String>) -> Result<(), String> {
    match value {
        Some(v) if v.trim().is_empty() => Err(format!("{name}: expected a non-empty string")),
        _ => Ok(()),
    }
}

impl ConnectInit {
    /// Parses and validates a `connect.init` payload.
    pub fn parse(payload: &Value) -> Result<ConnectInit, String> {
        let init: ConnectInit =
            serde_json::from_value(payload.clone()).map_err(|e| e.to_string())?;
        if init.protocol_rev < 1 {
            return Err("protocol_rev: expected an integer >= 1".into());
        }
        let d = &init.device;
        if d.device_id.trim().is_empty() || d.pubkey.trim().is_empty() {
            return Err("device: device_id and pubkey must be non-empty".into());
        }
        for (name, value) in [
            ("label", &d.label),
            ("platform", &d.platform),
            ("version", &d.version),
            ("mode", &d.mode),
            ("device_model", &d.device_model),
        ] {
            non_empty(name, value)?;
        }
        let mut init = init;
        check_descriptors(&mut init.capabilities)?;
        init.capabilities = normalize_capabilities(std::mem::take(&mut init.capabilities));
        Ok(init)
    }
}

/// Trims and checks descriptors as Tyrum's strict schema does (Part B
/// §3), wherever a peer sends them.
pub(crate) fn check_descriptors(descriptors: &mut [CapabilityDescriptor]) -> Result<(), String> {
    if descriptors.len() > MAX_CAPABILITIES {
        return Err(format!(
            "capabilities: more than {MAX_CAPABILITIES} descriptors"
        ));
    }
    for capability in descriptors {
        // Tyrum's schema trims both strings before it checks them.
        trim_in_place(&mut capability.id);
        trim_in_place(&mut capability.version);
        if !is_capability_id(&capability.id) {
            return Err(format!("capabilities: invalid id {:?}", capability.id));
        }
        if !is_semver(&capability.version) {
            return Err(format!(
                "capabilities: invalid version {:?}",
                capability.version
            ));
        }
    }
    Ok(())
}

/// The most descriptors one `connect.init` may advertise (Tyrum's catalog
/// has about fifty ids).
pub const MAX_CAPABILITIES: usize = 256;

fn trim_in_place(text: &mut String) {
    let trimmed = text.trim();
    if trimmed.len() != text.len() {
        *text = trimmed.to_owned();
    }
}

/// Browser automation: what the monolithic `tyrum.playwright` stood for.
const BROWSER_AUTOMATION: &[&str] = &[
    "tyrum.browser.navigate",
    "tyrum.browser.navigate-back",
    "tyrum.browser.snapshot",
    "tyrum.browser.click",
    "tyrum.browser.type",
    "tyrum.browser.fill-form",
    "tyrum.browser.select-option",
    "tyrum.browser.hover",
    "tyrum.browser.drag",
    "tyrum.browser.press-key",
    "tyrum.browser.screenshot",
    "tyrum.browser.evaluate",
    "tyrum.browser.wait-for",
    "tyrum.browser.tabs",
    "tyrum.browser.upload-file",
    "tyrum.browser.console-messages",
    "tyrum.browser.network-requests",
    "tyrum.browser.resize",
    "tyrum.browser.close",
    "tyrum.browser.handle-dialog",
    "tyrum.browser.run-code",
    "tyrum.browser.launch",
];

/// The sensors every mobile or browser umbrella id stood for.
const SENSORS: &[&str] = &[
    "tyrum.location.get",
    "tyrum.camera.capture-photo",
    "tyrum.audio.record",
];

const DESKTOP: &[&str] = &[
    "tyrum.desktop.screenshot",
    "tyrum.desktop.snapshot",
    "tyrum.desktop.query",
    "tyrum.desktop.act",
    "tyrum.desktop.mouse",
    "tyrum.desktop.keyboard",
    "tyrum.desktop.wait-for",
];

/// The canonical ids a legacy capability id stands for; `None` for an id
/// that is not legacy.
fn canonical_ids(id: &str) -> Option<&'static [&'static str]> {
    Some(match id {
        "tyrum.playwright" => BROWSER_AUTOMATION,
        "tyrum.ios" | "tyrum.android" | "tyrum.browser" => SENSORS,
        "tyrum.desktop" => DESKTOP,
        "tyrum.ios.location.get-current"
        | "tyrum.android.location.get-current"
        | "tyrum.browser.geolocation.get" => &SENSORS[0..1],
        "tyrum.ios.camera.capture-photo"
        | "tyrum.android.camera.capture-photo"
        | "tyrum.browser.camera.capture-photo" => &SENSORS[1..2],
        "tyrum.ios.audio.record-clip"
        | "tyrum.android.audio.record-clip"
        | "tyrum.browser.microphone.record" => &SENSORS[2..3],
        _ => return None,
    })
}

/// Part B §3: legacy ids expand to their canonical ids, then descriptors
/// dedupe by id. An id keeps the place it first appeared in and the
/// version it was last given.
pub fn normalize_capabilities(descriptors: Vec<CapabilityDescriptor>) -> Vec<CapabilityDescriptor> {
    let mut normalized: Vec<CapabilityDescriptor> = Vec::with_capacity(descriptors.len());
    let mut places: std::collections::HashMap<String, usize> =
        std::collections::HashMap::with_capacity(descriptors.len());
    let mut add = |id: String, version: &str| match places.get(&id) {
        Some(&place) => version.clone_into(&mut normalized[place].version),
        None => {
            places.insert(id.clone(), normalized.len());
            normalized.push(CapabilityDescriptor {
                id,
                version: version.to_owned(),
            });
        }
    };
    for descriptor in descriptors {
        match canonical_ids(&descriptor.id) {
            Some(ids) => ids
                .iter()
                .for_each(|id| add((*id).to_owned(), &descriptor.version)),
            None => add(descriptor.id, &descriptor.version),
        }
    }
    normalized
}

impl ConnectProof {
    pub fn parse(payload: &Value) -> Result<ConnectProof, String> {
        let proof: ConnectProof =
            serde_json::from_value(payload.clone()).map_err(|e| e.to_string())?;
        if proof.connection_id.trim().is_empty() || proof.proof.trim().is_empty() {
            return Err("connection_id and proof must be non-empty".into());
        }
        Ok(proof)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_beacons_optional_keys_are_omitted_never_null() {
        use crate::presence::Beacon;
        assert!(Beacon::parse(&json!({"host": "h"})).is_ok());
        assert!(Beacon::parse(&json!({})).is_ok());
        for key in [
            "host",
            "ip",
            "version",
            "mode",
            "last_input_seconds",
            "metadata",
        ] {
            assert!(Beacon::parse(&json!({ key: null })).is_err(), "{key}");
        }
    }

    #[test]
    fn init_payloads_are_strict() {
        let good = json!({"protocol_rev": 2, "role": "node",
            "device": {"device_id": "dev_x", "pubkey": "k", "label": "lab-box"},
            "capabilities": [{"id": "tyrum.desktop.screenshot", "version": "1.0.0"}, {"id": "tyrum.fs.read"}]});
        let init = ConnectInit::parse(&good).unwrap();
        assert_eq!(init.role, Role::Node);
        assert_eq!(init.capabilities[1].version, "1.0.0");
        for bad in [
            json!({"protocol_rev": 2, "role": "admin", "device": {"device_id": "d", "pubkey": "k"}}),
            json!({"protocol_rev": 0, "role": "node", "device": {"device_id": "d", "pubkey": "k"}}),
            json!({"protocol_rev": 2, "role": "node", "device": {"device_id": "d", "pubkey": "k", "extra": 1}}),
            json!({"protocol_rev": 2, "role": "node", "device": {"device_id": "", "pubkey": "k"}}),
            json!({"protocol_rev": 2, "role": "node", "device": {"device_id": "d", "pubkey": "k", "label": " "}}),
            // An optional key is omitted, never null.
            json!({"protocol_rev": 2, "role": "node", "device": {"device_id": "d", "pubkey": "k", "label": null}}),
            json!({"protocol_rev": 2, "role": "node", "device": {"device_id": "d", "pubkey": "k", "device_type": null}}),
            json!({"protocol_rev": 2, "role": "node", "device": {"device_id": "d", "pubkey": "k"}, "capabilities": [{"id": "Bad"}]}),
            json!({"protocol_rev": 2, "role": "node", "device": {"device_id": "d", "pubkey": "k"}, "capabilities": [{"id": "a.b", "version": "1.0"}]}),
            json!({"protocol_rev": 2, "role": "node"}),
        ] {
            assert!(ConnectInit::parse(&bad).is_err(), "{bad}");
        }
        // As Tyrum's pattern takes them: pre-release and build are runs of
        // letters, digits, dots and dashes, leading zeros and empty
        // dot-separated parts included.
        for good in [
            "1.2.3-rc.1+build.5",
            "0.0.0",
            "10.20.30",
            "1.0.0-alpha-a.b-c",
            "1.0.0-0.3.7",
            "1.0.0+001",
            "1.0.0-x-y-z.--",
            "1.0.0-01",
            "1.0.0-rc.01",
            "1.0.0-a..b",
            "1.0.0-rc.",
            "1.0.0+a..b",
        ] {
            assert!(is_semver(good), "{good}");
        }
        for bad in [
            "01.2.3",
            "1.02.3",
            "1.0.0-",
            "1.0.0+",
            "1.0.0-rc_1",
            "1.0.0+a+b",
            "1.0",
            "1.0.0.0",
            "v1.0.0",
            "",
        ] {
            assert!(!is_semver(bad), "{bad}");
        }
        let trimmed = json!({"protocol_rev": 2, "role": "node", "device": {"device_id": "d", "pubkey": "k"},
            "capabilities": [{"id": " tyrum.fs.read ", "version": " 2.0.0"}]});
        assert_eq!(
            ConnectInit::parse(&trimmed).unwrap().capabilities,
            [CapabilityDescriptor {
                id: "tyrum.fs.read".into(),
                version: "2.0.0".into()
            }]
        );
        assert!(!is_capability_id("tyrum"));
    }

    #[test]
    fn protocol_rev_is_read_as_javascript_reads_a_number() {
        let init = |rev: Value| {
            ConnectInit::parse(&json!({"protocol_rev": rev, "role": "node",
                "device": {"device_id": "d", "pubkey": "k"}}))
        };
        assert_eq!(init(json!(2.0)).unwrap().protocol_rev, 2);
        assert_eq!(init(json!(3)).unwrap().protocol_rev, 3);
        // An integer beyond i64 is still an integer >= 1; the handshake
        // then refuses it as any revision other than 2.
        assert_eq!(init(json!(1e30)).unwrap().protocol_rev, i64::MAX);
        assert_eq!(init(json!(u64::MAX)).unwrap().protocol_rev, i64::MAX);
        for bad in [json!(2.5), json!(-0.5), json!("2"), json!(null), json!(0.0)] {
            assert!(init(bad.clone()).is_err(), "{bad}");
        }
        let beacon = crate::presence::Beacon::parse(&json!({"last_input_seconds": 30.0})).unwrap();
        assert_eq!(beacon.last_input_seconds, Some(30));
        assert!(crate::presence::Beacon::parse(&json!({"last_input_seconds": 0.5})).is_err());
    }

    fn ids(init: &ConnectInit) -> Vec<(&str, &str)> {
        init.capabilities
            .iter()
            .map(|c| (c.id.as_str(), c.version.as_str()))
            .collect()
    }

    #[test]
    fn legacy_capability_ids_expand_and_dedupe() {
        let init = ConnectInit::parse(&json!({"protocol_rev": 2, "role": "node",
        "device": {"device_id": "d", "pubkey": "k"},
        "capabilities": [
            {"id": "tyrum.fs.read"},
            {"id": "tyrum.ios", "version": "1.1.0"},
            {"id": "tyrum.android.camera.capture-photo", "version": "2.0.0"},
            {"id": "tyrum.browser.geolocation.get"},
            {"id": "tyrum.fs.read", "version": "3.0.0"},
        ]}))
        .unwrap();
        assert_eq!(
            ids(&init),
            [
                ("tyrum.fs.read", "3.0.0"),
                ("tyrum.location.get", "1.0.0"),
                ("tyrum.camera.capture-photo", "2.0.0"),
                ("tyrum.audio.record", "1.1.0"),
            ]
        );
        let playwright = ConnectInit::parse(&json!({"protocol_rev": 2, "role": "node",
            "device": {"device_id": "d", "pubkey": "k"},
            "capabilities": [{"id": "tyrum.playwright"}, {"id": "tyrum.desktop"}]}))
        .unwrap();
        let expanded = ids(&playwright);
        assert_eq!(expanded.len(), 22 + 7);
        assert!(
            expanded[..22]
                .iter()
                .all(|(id, _)| id.starts_with("tyrum.browser."))
        );
        assert_eq!(expanded[22], ("tyrum.desktop.screenshot", "1.0.0"));
        // A canonical browser id is no umbrella.
        let canonical = ConnectInit::parse(&json!({"protocol_rev": 2, "role": "node",
            "device": {"device_id": "d", "pubkey": "k"},
            "capabilities": [{"id": "tyrum.browser.click"}]}))
        .unwrap();
        assert_eq!(ids(&canonical), [("tyrum.browser.click", "1.0.0")]);
        let too_many: Vec<Value> = (0..=MAX_CAPABILITIES)
            .map(|n| json!({"id": format!("x.c{n}")}))
            .collect();
        let refused = ConnectInit::parse(&json!({"protocol_rev": 2, "role": "node",
            "device": {"device_id": "d", "pubkey": "k"}, "capabilities": too_many}));
        assert!(refused.is_err());
    }
}
