//! Operator tokens over HTTP, in the shapes of Tyrum's `/auth/tokens`
//! routes (PROTOCOL.md Part B §9: "an equivalent (CLI and HTTP)"): list,
//! issue, edit and revoke the tokens of the caller's tenant. Admin tokens
//! and tokens with `operator.admin` only.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use muster_proto::v1 as pb;
use muster_protocol::format_datetime;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::presented_token;
use crate::{Claims, Edge, Unverified, wire_error};

fn refusal(status: StatusCode, error: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": error, "message": message})),
    )
        .into_response()
}

/// The caller's claims, if they may manage tokens; else the refusal.
async fn admin(edge: &Edge, headers: &HeaderMap) -> Result<Arc<Claims>, Response> {
    let claims = edge
        .verify(presented_token(
            headers,
            std::iter::empty(),
            edge.config.tls.is_some(),
        ))
        .await
        .map_err(|why| match why {
            Unverified::Refused => {
                refusal(StatusCode::UNAUTHORIZED, "unauthorized", "unauthorized")
            }
            Unverified::Unavailable => refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "identity unavailable",
            ),
        })?;
    if !claims.is_admin() && !claims.has_any_scope(["operator.admin"]) {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "forbidden",
            "admin token required",
        ));
    }
    Ok(claims)
}

/// A failed call to identity: its validation as the request's fault, the
/// rest without detail.
fn failed(status: &tonic::Status) -> Response {
    match wire_error(status) {
        ("invalid_request", message) => bad_request(&message),
        ("forbidden", message) => refusal(StatusCode::FORBIDDEN, "forbidden", &message),
        _ => refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "identity unavailable",
        ),
    }
}

/// The body as `T`, or why not.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let value: Value = serde_json::from_slice(body).map_err(|_| "invalid json".to_owned())?;
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// An admin's request with its body as `T`, or the refusal.
async fn admin_request<T: serde::de::DeserializeOwned>(
    edge: &Edge,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Arc<Claims>, T), Response> {
    let claims = admin(edge, headers).await?;
    let request = parse(body).map_err(|message| bad_request(&message))?;
    Ok((claims, request))
}

fn bad_request(message: &str) -> Response {
    refusal(StatusCode::BAD_REQUEST, "invalid_request", message)
}

/// A label, or what an unlabelled token is called (Tyrum's display names
/// are never empty).
fn display_name(label: &str, role: &str) -> String {
    if label.trim().is_empty() {
        format!("{role} token")
    } else {
        label.to_owned()
    }
}

fn datetime_or_null(ms: i64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        Value::String(format_datetime(ms))
    }
}

fn list_item(info: &pb::TokenInfo) -> Value {
    let updated = info
        .revoked_at_ms
        .max(info.updated_at_ms)
        .max(info.created_at_ms);
    json!({
        "token_id": info.token_id,
        "tenant_id": info.tenant_id,
        "display_name": display_name(&info.label, &info.role),
        "role": info.role,
        "device_id": (!info.device_id.is_empty()).then_some(&info.device_id),
        "scopes": info.scopes,
        "issued_at": format_datetime(info.created_at_ms),
        "expires_at": datetime_or_null(info.expires_at_ms),
        "revoked_at": datetime_or_null(info.revoked_at_ms),
        "created_at": format_datetime(info.created_at_ms),
        "updated_at": format_datetime(updated),
    })
}

/// The tokens of `claims`' tenant (only `token_id`, when given), or the
/// answer for identity's failure.
async fn tenant_tokens(
    edge: &Edge,
    claims: &Claims,
    token_id: Option<&str>,
) -> Result<Vec<pb::TokenInfo>, Response> {
    if token_id.is_some_and(str::is_empty) {
        return Ok(Vec::new());
    }
    let request = pb::ListTokensRequest {
        tenant_id: claims.tenant_id.clone(),
        token_id: token_id.unwrap_or_default().to_owned(),
    };
    match edge.identity().list_tokens(request).await {
        Ok(reply) => Ok(reply.into_inner().tokens),
        Err(status) => Err(failed(&status)),
    }
}

/// `GET /auth/tokens`: the tenant's tokens, never their secrets.
pub(crate) async fn list(State(edge): State<Arc<Edge>>, headers: HeaderMap) -> Response {
    let listed = match admin(&edge, &headers).await {
        Ok(claims) => tenant_tokens(&edge, &claims, None).await,
        Err(refused) => return refused,
    };
    match listed {
        Ok(tokens) => {
            let tokens: Vec<Value> = tokens.iter().map(list_item).collect();
            axum::Json(json!({ "tokens": tokens })).into_response()
        }
        Err(failed) => failed,
    }
}

/// Tyrum's `TenantAuthTokenIssueRequest`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Issue {
    display_name: Option<String>,
    role: String,
    #[serde(default)]
    scopes: Vec<String>,
    device_id: Option<String>,
    ttl_seconds: Option<u64>,
}

/// `value` trimmed, unless nothing is left.
fn non_empty(value: String, name: &str) -> Result<String, String> {
    let value = value.trim().to_owned();
    if value.is_empty() {
        Err(format!("{name} must be a non-empty string"))
    } else {
        Ok(value)
    }
}

/// A display name as Tyrum bounds it: 1 to 120 characters once trimmed.
fn display_name_field(name: String) -> Result<String, String> {
    let name = non_empty(name, "display_name")?;
    if name.chars().count() > 120 {
        return Err("display_name must be 1 to 120 characters".into());
    }
    Ok(name)
}

impl Issue {
    /// The request with its strings trimmed, or why it is bad. Roles and
    /// scopes are identity's to check.
    fn check(self) -> Result<Issue, String> {
        // 0 would mean "never" to identity; its own check bounds the rest.
        if self.ttl_seconds == Some(0) {
            return Err("ttl_seconds must be a positive integer".into());
        }
        Ok(Issue {
            display_name: self.display_name.map(display_name_field).transpose()?,
            scopes: self
                .scopes
                .into_iter()
                .map(|scope| non_empty(scope, "scopes"))
                .collect::<Result<_, _>>()?,
            device_id: self
                .device_id
                .map(|device_id| non_empty(device_id, "device_id"))
                .transpose()?,
            ..self
        })
    }
}

/// An `operator.admin` token that is not an admin token issues no more
/// than it holds: no admin tokens, no scopes it lacks, and no token that
/// outlives it (`expires_at_ms`: when the resulting token expires, `None`
/// for never); else a time limit on a delegated token would not hold.
fn within_reach(
    claims: &Claims,
    role: &str,
    scopes: &[String],
    expires_at_ms: Option<i64>,
) -> Result<(), String> {
    if claims.is_admin() {
        return Ok(());
    }
    within_authority(claims, role, scopes)?;
    if let Some(limit) = claims.expires_at_ms
        && expires_at_ms.is_none_or(|at| at > limit)
    {
        return Err(format!(
            "a token may not outlive the caller's, which expires at {}",
            format_datetime(limit)
        ));
    }
    Ok(())
}

/// What an `operator.admin` token that is not an admin token may act on,
/// whether issuing, editing or revoking: tokens of a role and scopes it
/// could give.
/// Else a delegate could end every node's connections (a node token needs
/// `operator.pairing` to make) or a `*` token it could not have made.
fn within_authority(claims: &Claims, role: &str, scopes: &[String]) -> Result<(), String> {
    if claims.is_admin() {
        return Ok(());
    }
    if role == "admin" {
        return Err("only an admin token may make admin tokens".into());
    }
    // A node token admits a device as a node (presence, results of work
    // sent to it): admitting nodes is pairing's authority, which
    // `operator.admin` alone does not hold.
    if role == "node" && !claims.has_any_scope(["operator.pairing"]) {
        return Err("node tokens need operator.pairing".into());
    }
    match scopes
        .iter()
        .find(|scope| !claims.has_any_scope([scope.as_str()]))
    {
        Some(scope) => Err(format!("scope {scope} is not the caller's to give")),
        None => Ok(()),
    }
}

/// `POST /auth/tokens/issue`: mints a token in the caller's tenant; the
/// secret is in this response and nowhere else.
pub(crate) async fn issue(
    State(edge): State<Arc<Edge>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (claims, request) = match admin_request::<Issue>(&edge, &headers, &body).await {
        Ok((claims, request)) => match request.check() {
            Ok(request) => (claims, request),
            Err(message) => return bad_request(&message),
        },
        Err(refused) => return refused,
    };
    let expires_at_ms = request.ttl_seconds.map(|ttl| {
        let ttl_ms = i64::try_from(ttl).unwrap_or(i64::MAX).saturating_mul(1000);
        muster_store::now_ms().saturating_add(ttl_ms)
    });
    if let Err(message) = within_reach(&claims, &request.role, &request.scopes, expires_at_ms) {
        return refusal(StatusCode::FORBIDDEN, "forbidden", &message);
    }
    let label = request
        .display_name
        .unwrap_or_else(|| display_name("", &request.role));
    let created = edge
        .identity()
        .create_token(pb::CreateTokenRequest {
            tenant_id: claims.tenant_id.clone(),
            role: request.role,
            scopes: request.scopes,
            label,
            device_id: request.device_id.unwrap_or_default(),
            ttl_seconds: request.ttl_seconds.unwrap_or(0),
            // Checked above by this clock, and again by identity's, which
            // computes the expiry.
            expires_by_ms: if claims.is_admin() {
                0
            } else {
                claims.expires_at_ms.unwrap_or(0)
            },
            // A delegate's tokens are minted only while it is live, and
            // revoked with it: revoking a delegate takes back what it
            // issued. An admin token's are the tenant's, as the command
            // line's are: replacing the admin token takes nothing back.
            issued_by: if claims.is_admin() {
                String::new()
            } else {
                claims.token_id.clone()
            },
        })
        .await;
    let created = match created {
        Ok(reply) => reply.into_inner(),
        Err(status) => return failed(&status),
    };
    let Some(info) = created.info else {
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "identity unavailable",
        );
    };
    tracing::info!(token_id = %info.token_id, issued_by = %claims.token_id, "token issued over http");
    let mut issued = json!({
        "token": created.token,
        "token_id": info.token_id,
        "tenant_id": info.tenant_id,
        "display_name": display_name(&info.label, &info.role),
        "role": info.role,
        "scopes": info.scopes,
        "issued_at": format_datetime(info.created_at_ms),
        "updated_at": format_datetime(info.created_at_ms),
    });
    if !info.device_id.is_empty() {
        issued["device_id"] = json!(info.device_id);
    }
    if info.expires_at_ms != 0 {
        issued["expires_at"] = json!(format_datetime(info.expires_at_ms));
    }
    (StatusCode::CREATED, axum::Json(issued)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoke {
    token_id: String,
}

/// `POST /auth/tokens/revoke`: revokes a live token of the caller's
/// tenant; its connections on every edge close with 4001 `token
/// revoked`. `{"revoked": false}` for any other id.
pub(crate) async fn revoke(
    State(edge): State<Arc<Edge>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (claims, token_id) = match admin_request::<Revoke>(&edge, &headers, &body).await {
        Ok((claims, request)) if !request.token_id.trim().is_empty() => {
            (claims, request.token_id.trim().to_owned())
        }
        Ok(_) => return bad_request("token_id must be a non-empty string"),
        Err(refused) => return refused,
    };
    // Only the caller's tenant's live tokens: another tenant's id is
    // answered as an unknown one.
    let tokens = match tenant_tokens(&edge, &claims, Some(&token_id)).await {
        Ok(tokens) => tokens,
        Err(failed) => return failed,
    };
    let Some(target) = tokens
        .iter()
        .find(|t| t.token_id == token_id && t.revoked_at_ms == 0)
    else {
        return axum::Json(json!({"revoked": false})).into_response();
    };
    if target.role == "admin" && !claims.is_admin() {
        return refusal(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only an admin token may revoke admin tokens",
        );
    }
    if let Err(message) = within_authority(&claims, &target.role, &target.scopes) {
        return refusal(StatusCode::FORBIDDEN, "forbidden", &message);
    }
    match edge
        .identity()
        // Identity revokes only the token as checked here: this tenant's,
        // unchanged since (not promoted to admin meanwhile).
        .revoke_token(pb::RevokeTokenRequest {
            token_id: token_id.clone(),
            tenant_id: claims.tenant_id.clone(),
            if_updated_at_ms: Some(target.updated_at_ms),
        })
        .await
    {
        Ok(_) => axum::Json(json!({"revoked": true, "token_id": token_id})).into_response(),
        // Revoked by someone else meanwhile.
        Err(status) if status.code() == tonic::Code::NotFound => {
            axum::Json(json!({"revoked": false})).into_response()
        }
        Err(status) if status.code() == tonic::Code::FailedPrecondition => refusal(
            StatusCode::CONFLICT,
            "conflict",
            "the token changed meanwhile; try again",
        ),
        Err(status) => failed(&status),
    }
}

/// Tyrum's `AuthTokenUpdateRequest`: a field that is absent stays as it
/// is; `device_id` and `expires_at` may be null (none, never).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Edit {
    display_name: Option<String>,
    role: Option<String>,
    #[serde(default, deserialize_with = "present")]
    device_id: Option<Option<String>>,
    scopes: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<Option<String>>,
}

/// Tells a field given as null (`Some(None)`) from one left out (`None`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl Edit {
    /// The change for identity, or why the request is bad.
    fn change(self, token_id: String) -> Result<pb::UpdateTokenRequest, String> {
        if self.display_name.is_none()
            && self.role.is_none()
            && self.device_id.is_none()
            && self.scopes.is_none()
            && self.expires_at.is_none()
        {
            return Err("at least one field must be updated".into());
        }
        let label = self.display_name.map(display_name_field).transpose()?;
        let scopes = match self.scopes {
            Some(scopes) => Some(pb::Scopes {
                scopes: scopes
                    .into_iter()
                    .map(|scope| non_empty(scope, "scopes"))
                    .collect::<Result<_, _>>()?,
            }),
            None => None,
        };
        let device_id = match self.device_id {
            Some(Some(device_id)) => Some(non_empty(device_id, "device_id")?),
            Some(None) => Some(String::new()),
            None => None,
        };
        let expires_at_ms = match self.expires_at {
            Some(Some(at)) => Some(
                muster_protocol::parse_datetime(&at)
                    .filter(|at| *at > 0)
                    .ok_or("expires_at must be a date-time (RFC 3339) after 1970")?,
            ),
            Some(None) => Some(0),
            None => None,
        };
        Ok(pb::UpdateTokenRequest {
            token_id,
            label,
            role: self.role,
            device_id,
            scopes,
            expires_at_ms,
            ..Default::default()
        })
    }
}

/// `PATCH /auth/tokens/{token_id}`: edits a live token of the caller's
/// tenant; its connections on every edge close with 4001 `token updated`,
/// so that they come back with the new claims.
pub(crate) async fn edit(
    State(edge): State<Arc<Edge>>,
    Path(token_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (claims, mut change) = match admin_request::<Edit>(&edge, &headers, &body).await {
        Ok((claims, edit)) => match edit.change(token_id.trim().to_owned()) {
            Ok(change) => (claims, change),
            Err(message) => return bad_request(&message),
        },
        Err(refused) => return refused,
    };
    let tokens = match tenant_tokens(&edge, &claims, Some(&change.token_id)).await {
        Ok(tokens) => tokens,
        Err(failed) => return failed,
    };
    let Some(target) = tokens.iter().find(|t| t.token_id == change.token_id) else {
        return refusal(StatusCode::NOT_FOUND, "not_found", "token not found");
    };
    if target.revoked_at_ms != 0 {
        return refusal(
            StatusCode::CONFLICT,
            "conflict",
            "revoked tokens cannot be edited",
        );
    }
    if !claims.is_admin() {
        // What the token is now must be within reach too: an edit can end
        // a token's connections, or all but end the token, as a revoke
        // does.
        if let Err(message) = within_authority(&claims, &target.role, &target.scopes) {
            return refusal(StatusCode::FORBIDDEN, "forbidden", &message);
        }
        // What the token grants after the edit, fields left out included:
        // reviving an expired token with scopes the caller lacks gives
        // them as much as minting it would.
        let scopes = change.scopes.as_ref().map_or(&target.scopes, |s| &s.scopes);
        // 0: never.
        let expiry = change.expires_at_ms.unwrap_or(target.expires_at_ms);
        let expires_at_ms = (expiry != 0).then_some(expiry);
        let reach = within_reach(
            &claims,
            change.role.as_deref().unwrap_or(&target.role),
            scopes,
            expires_at_ms,
        )
        .and_then(|()| {
            if target.role == "admin" {
                Err("only an admin token may edit admin tokens".to_owned())
            } else {
                Ok(())
            }
        });
        if let Err(message) = reach {
            return refusal(StatusCode::FORBIDDEN, "forbidden", &message);
        }
    }
    // Identity applies the edit only to the token as checked here: this
    // tenant's, unchanged since.
    change.tenant_id = claims.tenant_id.clone();
    change.if_updated_at_ms = Some(target.updated_at_ms);
    match edge.identity().update_token(change).await {
        Ok(reply) => axum::Json(json!({ "token": list_item(&reply.into_inner()) })).into_response(),
        Err(status) if status.code() == tonic::Code::NotFound => refusal(
            StatusCode::CONFLICT,
            "conflict",
            "revoked tokens cannot be edited",
        ),
        Err(status) if status.code() == tonic::Code::FailedPrecondition => refusal(
            StatusCode::CONFLICT,
            "conflict",
            "the token changed meanwhile; try again",
        ),
        Err(status) => failed(&status),
    }
}
