//! Who a connection is: the token it presented, resolved by identity, and
//! what that token may do (PROTOCOL.md Part B §3, "Per-request
//! authorization").

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use muster_protocol::scopes::{NODE_TYPES, required_scopes};
use muster_protocol::{AUTH_SUBPROTOCOL_PREFIX, TOKEN_COOKIE};

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub token_id: String,
    pub tenant_id: String,
    /// `admin`, `client` or `node`.
    pub role: String,
    pub scopes: Vec<String>,
    /// A node token's device: the only one it admits.
    pub device_id: Option<String>,
    /// When the token stops being accepted (ms since the epoch).
    pub expires_at_ms: Option<i64>,
    /// When the token was last changed, as identity orders its changes
    /// (0: never).
    pub updated_at_ms: i64,
}

/// What a token lets a connection do, as `token.updated` states it, and
/// when it changed: claims from before the change that grant otherwise
/// are stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub role: String,
    pub scopes: Vec<String>,
    pub device_id: Option<String>,
    pub expires_at_ms: Option<i64>,
    pub updated_at_ms: i64,
}

impl Grant {
    /// The grant a `token.updated` payload states; `None` when it is not one.
    pub fn from_payload(payload: &serde_json::Value) -> Option<Grant> {
        Some(Grant {
            role: payload.get("role")?.as_str()?.to_owned(),
            scopes: payload
                .get("scopes")?
                .as_array()?
                .iter()
                .map(|s| s.as_str().map(str::to_owned))
                .collect::<Option<_>>()?,
            device_id: payload
                .get("device_id")
                .and_then(|d| d.as_str())
                .map(str::to_owned),
            expires_at_ms: payload.get("expires_at_ms").and_then(|at| at.as_i64()),
            updated_at_ms: payload.get("updated_at_ms")?.as_i64()?,
        })
    }
}

impl Claims {
    /// Whether these claims were given before the change `grant` states
    /// and grant otherwise. A new label changes no claims; claims given
    /// after the change (identity answered with it before the edge heard
    /// of it) are not stale.
    pub fn stale_after(&self, grant: &Grant) -> bool {
        self.updated_at_ms < grant.updated_at_ms
            && (self.role != grant.role
                || self.scopes != grant.scopes
                || self.device_id != grant.device_id
                || self.expires_at_ms != grant.expires_at_ms)
    }

    /// Whether the token has expired by `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }

    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }

    pub fn has_any_scope<'a>(&self, wanted: impl IntoIterator<Item = &'a str>) -> bool {
        let held = &self.scopes;
        held.iter().any(|s| s == "*") || wanted.into_iter().any(|w| held.iter().any(|s| s == w))
    }

    /// May a connection in `role` hold these claims? Admin tokens may be a
    /// client or a node; operator tokens are for clients only, node tokens
    /// for nodes only.
    pub fn admits_role(&self, role: &str) -> bool {
        match self.role.as_str() {
            "admin" => true,
            "node" => role == "node",
            _ => role == "client",
        }
    }
}

/// A refused request: error code and message (Part B §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: &'static str,
}

/// Whether a connection in `role` with `claims` may send a `kind` request.
/// Unknown types pass only for admins, who are then told the type is not
/// supported.
pub fn authorize(claims: &Claims, role: &str, kind: &str) -> Result<(), Refusal> {
    if !claims.is_admin() {
        match required_scopes(kind) {
            None => {
                let node_type =
                    role == "node" && claims.role == "node" && NODE_TYPES.contains(&kind);
                if !node_type {
                    return Err(Refusal {
                        code: "forbidden",
                        message: "request is not scope-authorized for scoped tokens",
                    });
                }
            }
            Some([]) => {}
            Some(needed) => {
                if !claims.has_any_scope(needed.iter().copied()) {
                    return Err(Refusal {
                        code: "forbidden",
                        message: "insufficient scope",
                    });
                }
            }
        }
    }
    if claims.tenant_id.is_empty() {
        return Err(Refusal {
            code: "unauthorized",
            message: "tenant token required",
        });
    }
    Ok(())
}

/// The token of an upgrade request, first hit wins: `Authorization:
/// Bearer`, the same-origin cookie, the first decodable `tyrum-auth.*`
/// subprotocol. `tls`: the request came over the edge's own TLS.
pub fn presented_token<'a>(
    headers: &HeaderMap,
    subprotocols: impl IntoIterator<Item = &'a str>,
    tls: bool,
) -> Option<String> {
    if let Some(value) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let parts: Vec<&str> = value.split(' ').collect();
        if let [scheme, token] = parts.as_slice()
            && scheme.eq_ignore_ascii_case("bearer")
            && !token.is_empty()
        {
            return Some((*token).to_owned());
        }
    }
    if same_origin(headers, tls)
        && let Some(token) = cookie(headers, TOKEN_COOKIE)
    {
        return Some(token);
    }
    subprotocols.into_iter().find_map(|p| {
        let encoded = p.trim().strip_prefix(AUTH_SUBPROTOCOL_PREFIX)?;
        let bytes = URL_SAFE_NO_PAD.decode(encoded).ok()?;
        String::from_utf8(bytes).ok().filter(|t| !t.is_empty())
    })
}

/// A request is same-origin when its Origin names the Host it was sent
/// to: hosts compared without case, a missing port as its scheme's
/// default. Without an Origin or a Host it is not (Tyrum's rule): the
/// cookie is a browser's, and a browser sends an Origin. Over the edge's
/// own TLS an `http://` page is another origin (a page that anyone on the
/// path can write); a plain listener may sit behind a proxy that ends
/// TLS, so there either scheme is taken.
fn same_origin(headers: &HeaderMap, tls: bool) -> bool {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(origin), Some(host)) = (header("origin"), header("host")) else {
        return false;
    };
    let (default_port, origin_host) = if let Some(rest) = origin.strip_prefix("https://") {
        (443, rest)
    } else if let Some(rest) = origin.strip_prefix("http://")
        && !tls
    {
        (80, rest)
    } else {
        return false;
    };
    match (
        host_and_port(origin_host, default_port),
        host_and_port(host, default_port),
    ) {
        (Some(origin), Some(host)) => origin == host,
        _ => false,
    }
}

/// `host[:port]` (a bracketed IPv6 literal too) as a lowercase host and a
/// port, `default_port` when none is given.
fn host_and_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port.parse().ok()?)),
        _ => (authority, None),
    };
    if host.is_empty() {
        return None;
    }
    Some((host.to_ascii_lowercase(), port.unwrap_or(default_port)))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name && !value.is_empty()).then(|| value.to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(origin: Option<&str>, host: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("cookie", "tyrum_admin_token=from-cookie".parse().unwrap());
        if let Some(origin) = origin {
            headers.insert("origin", origin.parse().unwrap());
        }
        if let Some(host) = host {
            headers.insert("host", host.parse().unwrap());
        }
        headers
    }

    #[test]
    fn the_cookie_counts_from_the_same_origin_only() {
        let from = |origin, host| presented_token(&upgrade(origin, host), ["tyrum-v1"], false);
        let cookie = Some("from-cookie".to_owned());
        for (origin, host) in [
            ("http://gw.example:8080", "gw.example:8080"),
            ("https://GW.example", "gw.example:443"),
            ("http://gw.example:80", "gw.example"),
            ("http://[::1]:9000", "[::1]:9000"),
        ] {
            assert_eq!(from(Some(origin), Some(host)), cookie, "{origin} / {host}");
        }
        for (origin, host) in [
            (None, Some("gw.example")),
            (Some("http://gw.example"), None),
            (Some("http://evil.example"), Some("gw.example")),
            (Some("https://gw.example"), Some("gw.example:80")),
            (Some("http://gw.example:1"), Some("gw.example:8080")),
            (Some("null"), Some("gw.example")),
        ] {
            assert_eq!(from(origin, host), None, "{origin:?} / {host:?}");
        }
        // Over the edge's own TLS, only an https page is the same origin.
        let over_tls = |origin| {
            presented_token(
                &upgrade(Some(origin), Some("gw.example")),
                ["tyrum-v1"],
                true,
            )
        };
        assert_eq!(over_tls("https://gw.example"), cookie);
        assert_eq!(over_tls("http://gw.example"), None);
        assert_eq!(over_tls("http://gw.example:443"), None);
        // Without an Origin, a subprotocol's token is the one presented.
        let encoded = URL_SAFE_NO_PAD.encode("from-subprotocol");
        let offered = format!("tyrum-auth.{encoded}");
        let token = presented_token(
            &upgrade(None, Some("gw.example")),
            ["tyrum-v1", offered.as_str()],
            false,
        );
        assert_eq!(token.as_deref(), Some("from-subprotocol"));
    }

    fn claims(role: &str, scopes: &[&str]) -> Claims {
        Claims {
            token_id: "t".into(),
            tenant_id: "tenant".into(),
            role: role.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            device_id: None,
            expires_at_ms: None,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn scopes_decide_as_part_b_says() {
        let reader = claims("client", &["operator.read"]);
        assert!(authorize(&reader, "client", "ping").is_ok());
        assert!(authorize(&reader, "client", "approval.list").is_ok());
        let refused = authorize(&reader, "client", "approval.resolve").unwrap_err();
        assert_eq!(
            (refused.code, refused.message),
            ("forbidden", "insufficient scope")
        );
        let null = authorize(&reader, "client", "task.execute").unwrap_err();
        assert_eq!(
            null.message,
            "request is not scope-authorized for scoped tokens"
        );
        assert!(authorize(&reader, "client", "no.such.type").is_err());
        assert!(authorize(&claims("client", &["*"]), "client", "approval.resolve").is_ok());
        // Admins pass every scope check; unknown types are then unsupported.
        assert!(authorize(&claims("admin", &[]), "client", "no.such.type").is_ok());
        let tenantless = Claims {
            tenant_id: String::new(),
            ..claims("admin", &[])
        };
        assert_eq!(
            authorize(&tenantless, "client", "ping")
                .unwrap_err()
                .message,
            "tenant token required"
        );
    }

    #[test]
    fn tokens_are_found_in_the_documented_order() {
        let mut headers = HeaderMap::new();
        assert_eq!(presented_token(&headers, ["tyrum-v1"], false), None);
        let encoded = format!("tyrum-auth.{}", URL_SAFE_NO_PAD.encode("from-protocol"));
        assert_eq!(
            presented_token(
                &headers,
                ["tyrum-v1", "tyrum-auth.!!", encoded.as_str()],
                false
            )
            .as_deref(),
            Some("from-protocol")
        );
        headers.insert(
            "cookie",
            "a=b; tyrum_admin_token=from-cookie".parse().unwrap(),
        );
        headers.insert("host", "127.0.0.1:1".parse().unwrap());
        headers.insert("origin", "http://127.0.0.1:1".parse().unwrap());
        assert_eq!(
            presented_token(&headers, [encoded.as_str()], false).as_deref(),
            Some("from-cookie")
        );
        headers.insert("origin", "http://evil.example".parse().unwrap());
        assert_eq!(
            presented_token(&headers, [encoded.as_str()], false).as_deref(),
            Some("from-protocol")
        );
        headers.insert("authorization", "Bearer from-header".parse().unwrap());
        assert_eq!(
            presented_token(&headers, [], false).as_deref(),
            Some("from-header")
        );
        headers.insert("authorization", "Bearer two parts".parse().unwrap());
        assert_eq!(presented_token(&headers, [], false), None);
    }
}
