//! Strict envelopes (Part B §2): parsing what peers send, writing what the
//! server sends.

use serde_json::{Map, Value, json};

/// A request from a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub request_id: String,
    pub kind: String,
    pub payload: Value,
}

/// A response from a peer (to a server-sent request such as
/// `task.execute`).
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub request_id: String,
    pub kind: String,
    pub ok: bool,
    pub body: Value,
}

/// What a peer's text frame turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Request(Request),
    Response(Response),
    /// Peers must not send events.
    Event,
}

/// Why a frame is not an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    InvalidJson,
    /// The validator's text.
    Invalid(String),
}

fn non_empty(map: &Map<String, Value>, key: &str) -> Result<String, FrameError> {
    match map.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(_) => Err(FrameError::Invalid(format!(
            "{key}: expected a non-empty string"
        ))),
        None => Err(FrameError::Invalid(format!("{key}: required"))),
    }
}

fn only_keys(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), FrameError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(extra) => Err(FrameError::Invalid(format!("unrecognized key: {extra}"))),
        None => Ok(()),
    }
}

/// `dt` of Part B §2.3: ISO-8601 with `Z`, no offset, any fraction.
fn is_datetime(text: &str) -> bool {
    text.ends_with('Z') && crate::parse_datetime(text).is_some()
}

/// A `TyrumKey` of Part B §2.3: one of its forms, no segment empty.
fn is_tyrum_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split(':').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return false;
    }
    match parts.as_slice() {
        ["agent", _, "main"] | ["agent", _, "dm", _] | ["agent", _, _, "dm", _] => true,
        ["agent", _, _, _, "dm" | "group" | "channel", _] => true,
        ["cron", _] | ["node", _] => true,
        ["hook", id] => uuid::Uuid::parse_str(id).is_ok(),
        _ => false,
    }
}

/// An `EventScope` of Part B §2: strict, by `kind`.
fn event_scope(scope: &Value) -> Result<(), FrameError> {
    let invalid = |why: &str| Err(FrameError::Invalid(format!("scope: {why}")));
    let Value::Object(scope) = scope else {
        return invalid("expected an object");
    };
    let field = |key: &str| scope.get(key).and_then(Value::as_str).unwrap_or_default();
    let (key, valid) = match field("kind") {
        "global" => (None, true),
        "agent" => (
            Some("agent_id"),
            uuid::Uuid::parse_str(field("agent_id")).is_ok(),
        ),
        "conversation" => (
            Some("conversation_key"),
            is_tyrum_key(field("conversation_key")),
        ),
        "turn" => (
            Some("turn_id"),
            uuid::Uuid::parse_str(field("turn_id")).is_ok(),
        ),
        "node" => {
            let id = field("node_id");
            (Some("node_id"), !id.is_empty() && !id.contains(':'))
        }
        "client" => (Some("client_id"), !field("client_id").trim().is_empty()),
        _ => return invalid("unknown kind"),
    };
    let mut allowed = vec!["kind"];
    allowed.extend(key);
    only_keys(scope, &allowed)?;
    if valid {
        Ok(())
    } else {
        invalid(&format!("{}: invalid", key.unwrap_or("kind")))
    }
}

/// Classifies and validates a text frame.
pub fn parse(text: &str) -> Result<Inbound, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|_| FrameError::InvalidJson)?;
    let Value::Object(map) = value else {
        return Err(FrameError::Invalid("expected an object".into()));
    };
    if map.contains_key("event_id") {
        // Only a valid event is an event: anything else fails as a frame.
        only_keys(
            &map,
            &["event_id", "type", "occurred_at", "scope", "payload"],
        )?;
        non_empty(&map, "event_id")?;
        non_empty(&map, "type")?;
        let occurred_at = non_empty(&map, "occurred_at")?;
        if !is_datetime(&occurred_at) {
            return Err(FrameError::Invalid(
                "occurred_at: expected an ISO-8601 datetime in UTC (Z)".into(),
            ));
        }
        if let Some(scope) = map.get("scope") {
            event_scope(scope)?;
        }
        if !map.contains_key("payload") {
            return Err(FrameError::Invalid("payload: required".into()));
        }
        return Ok(Inbound::Event);
    }
    if let Some(ok) = map.get("ok") {
        let request_id = non_empty(&map, "request_id")?;
        let kind = non_empty(&map, "type")?;
        return match ok {
            Value::Bool(true) => {
                only_keys(&map, &["request_id", "type", "ok", "result"])?;
                Ok(Inbound::Response(Response {
                    request_id,
                    kind,
                    ok: true,
                    body: map.get("result").cloned().unwrap_or(Value::Null),
                }))
            }
            Value::Bool(false) => {
                only_keys(&map, &["request_id", "type", "ok", "error"])?;
                let error = match map.get("error") {
                    Some(Value::Object(e)) => e,
                    _ => return Err(FrameError::Invalid("error: required object".into())),
                };
                only_keys(error, &["code", "message", "details"])?;
                non_empty(error, "code")?;
                non_empty(error, "message")?;
                Ok(Inbound::Response(Response {
                    request_id,
                    kind,
                    ok: false,
                    body: Value::Object(error.clone()),
                }))
            }
            _ => Err(FrameError::Invalid("ok: expected a boolean".into())),
        };
    }
    only_keys(&map, &["request_id", "type", "payload", "trace"])?;
    let request_id = non_empty(&map, "request_id")?;
    let kind = non_empty(&map, "type")?;
    let payload = map
        .get("payload")
        .cloned()
        .ok_or_else(|| FrameError::Invalid("payload: required".into()))?;
    Ok(Inbound::Request(Request {
        request_id,
        kind,
        payload,
    }))
}

/// `{request_id, type, ok:true, result?}`.
pub fn ok(request_id: &str, kind: &str, result: Option<Value>) -> String {
    let mut frame = json!({"request_id": request_id, "type": kind, "ok": true});
    if let Some(result) = result {
        frame["result"] = result;
    }
    frame.to_string()
}

/// `{request_id, type, ok:false, error:{code, message, details?}}`.
pub fn error(
    request_id: &str,
    kind: &str,
    code: &str,
    message: &str,
    details: Option<Value>,
) -> String {
    let mut error = json!({"code": code, "message": message});
    if let Some(details) = details {
        error["details"] = details;
    }
    json!({"request_id": request_id, "type": kind, "ok": false, "error": error}).to_string()
}

/// `{event_id, type, occurred_at, scope?, payload}`.
pub fn event(
    event_id: &str,
    kind: &str,
    occurred_at_ms: i64,
    scope: Option<&Value>,
    payload: &Value,
) -> String {
    let mut frame = json!({
        "event_id": event_id,
        "type": kind,
        "occurred_at": crate::format_datetime(occurred_at_ms),
        "payload": payload,
    });
    if let Some(scope) = scope {
        frame["scope"] = scope.clone();
    }
    frame.to_string()
}

/// The frame-level `error` event (Part B §2.4), payload strict
/// `{code, message}`.
pub fn error_event(code: &str, message: &str, now_ms: i64) -> String {
    event(
        &uuid::Uuid::new_v4().to_string(),
        "error",
        now_ms,
        None,
        &json!({"code": code, "message": message}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_responses_and_events_are_told_apart_strictly() {
        let request = parse(r#"{"request_id":"r1","type":"ping","payload":{}}"#).unwrap();
        assert_eq!(
            request,
            Inbound::Request(Request {
                request_id: "r1".into(),
                kind: "ping".into(),
                payload: json!({})
            })
        );
        assert!(matches!(
            parse(r#"{"request_id":"t1","type":"task.execute","ok":true,"result":{}}"#),
            Ok(Inbound::Response(Response { ok: true, .. }))
        ));
        assert!(matches!(
            parse(
                r#"{"request_id":"t1","type":"task.execute","ok":false,"error":{"code":"task_failed","message":"x"}}"#
            ),
            Ok(Inbound::Response(Response { ok: false, .. }))
        ));
        for event in [
            r#"{"event_id":"e","type":"x","occurred_at":"2026-07-24T21:00:00Z","payload":{}}"#,
            r#"{"event_id":"e","type":"x","occurred_at":"2026-07-24T21:00:00.123456Z","payload":null,"scope":{"kind":"global"}}"#,
            r#"{"event_id":"e","type":"x","occurred_at":"2026-07-24T21:00:00.000Z","payload":1,"scope":{"kind":"node","node_id":"n1"}}"#,
            r#"{"event_id":"e","type":"x","occurred_at":"2026-07-24T21:00:00.000Z","payload":{},"scope":{"kind":"conversation","conversation_key":"agent:a:slack:acme:group:g1"}}"#,
        ] {
            assert_eq!(parse(event), Ok(Inbound::Event), "{event}");
        }
        // An event that is not a valid one is an invalid frame.
        for bad in [
            r#"{"event_id":"e","type":"x","occurred_at":"t","payload":{}}"#,
            r#"{"event_id":"e","type":"x","occurred_at":"2026-07-24T21:00:00+02:00","payload":{}}"#,
            r#"{"event_id":"e","type":"x","occurred_at":"2026-07-24T21:00:00Z"}"#,
            r#"{"event_id":"e","type":"x","occurred_at":"2026-07-24T21:00:00Z","payload":{},"scope":{"kind":"node","node_id":"a:b"}}"#,
            r#"{"event_id":"e","type":"x","occurred_at":"2026-07-24T21:00:00Z","payload":{},"scope":{"kind":"global","x":1}}"#,
            r#"{"event_id":"e","type":"x","occurred_at":"2026-07-24T21:00:00Z","payload":{},"scope":{"kind":"agent","agent_id":"nope"}}"#,
            r#"{"event_id":"e","type":"x","occurred_at":"2026-07-24T21:00:00Z","payload":{},"scope":{"kind":"conversation","conversation_key":"agent:a"}}"#,
            r#"{"event_id":"e","type":"x","occurred_at":"2026-07-24T21:00:00Z","payload":{},"scope":{"kind":"planet"}}"#,
        ] {
            assert!(matches!(parse(bad), Err(FrameError::Invalid(_))), "{bad}");
        }
        assert_eq!(parse("{nope"), Err(FrameError::InvalidJson));
        for bad in [
            r#"[1]"#,
            r#"{"request_id":"r1","type":"ping"}"#,
            r#"{"request_id":" ","type":"ping","payload":{}}"#,
            r#"{"request_id":"r1","type":"ping","payload":{},"extra":1}"#,
            r#"{"request_id":"r1","type":"x","ok":"yes"}"#,
            r#"{"request_id":"r1","type":"x","ok":false,"error":{"code":"c"}}"#,
        ] {
            assert!(matches!(parse(bad), Err(FrameError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn server_frames_have_exact_shapes() {
        assert_eq!(
            ok("r", "ping", None),
            r#"{"ok":true,"request_id":"r","type":"ping"}"#
        );
        let e: Value =
            serde_json::from_str(&error("r", "x", "forbidden", "insufficient scope", None))
                .unwrap();
        assert_eq!(
            e,
            json!({"request_id":"r","type":"x","ok":false,"error":{"code":"forbidden","message":"insufficient scope"}})
        );
        let ev: Value =
            serde_json::from_str(&error_event("invalid_json", "message is not valid JSON", 0))
                .unwrap();
        assert_eq!(ev["type"], "error");
        assert_eq!(ev["occurred_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(
            ev["payload"],
            json!({"code":"invalid_json","message":"message is not valid JSON"})
        );
        assert!(ev.get("scope").is_none());
    }
}
