use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine;
use muster_mesh::{ErrorCode, ServiceError};
use muster_store::outbox::NewItem;
use muster_store::{StoreError, now_ms};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{TokenRecord, TokenStore};

/// The scopes an operator token may carry (PROTOCOL.md Part B §3).
pub const SCOPES: &[&str] = &[
    "operator.read",
    "operator.write",
    "operator.approvals",
    "operator.pairing",
    "operator.admin",
    "*",
];

/// The longest lifetime a token may be minted with (Tyrum's bound too).
pub const MAX_TTL_SECONDS: u64 = 365 * 24 * 60 * 60;

/// Operators choose their own admin token only if it is at least this long.
pub const MIN_PROVIDED_TOKEN_LEN: usize = 32;

/// Whether an operator's own admin token (`MUSTER_ADMIN_TOKEN`) can be
/// used: 32 to 4 096 bytes of visible ASCII, as a bearer header carries it
/// and as verification takes it. A value that could never be presented
/// (a file's trailing newline, a space) would use up the one first mint.
pub fn check_provided_admin_token(value: &str) -> Result<(), String> {
    if !(MIN_PROVIDED_TOKEN_LEN..=MAX_PRESENTED_LEN).contains(&value.len()) {
        return Err(format!(
            "MUSTER_ADMIN_TOKEN must be {MIN_PROVIDED_TOKEN_LEN} to {MAX_PRESENTED_LEN} characters"
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "MUSTER_ADMIN_TOKEN must be visible ASCII only (no spaces or line ends)".into(),
        );
    }
    Ok(())
}

/// The longest token [`Tokens::verify`] looks up.
const MAX_PRESENTED_LEN: usize = 4096;

/// What a token lets its holder be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Passes every scope check.
    Admin,
    /// Limited to its scopes.
    Client,
    /// One node, bound to its device_id: Part B's scoped token. It admits
    /// only `role: "node"` connections of that device and carries no
    /// operator scopes.
    Node,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Client => "client",
            Role::Node => "node",
        }
    }
}

impl FromStr for Role {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        match s {
            "admin" => Ok(Role::Admin),
            "client" => Ok(Role::Client),
            "node" => Ok(Role::Node),
            other => Err(TokenError::Invalid(format!(
                "role must be admin, client or node, not {other:?}"
            ))),
        }
    }
}

/// A token's secret. It leaves the process once, to whoever minted it, and
/// never appears in Debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The longest label a token keeps: room for the edge's display names of
/// up to 120 characters (Tyrum's bound) of up to four bytes each.
pub const MAX_LABEL_BYTES: usize = 480;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    /// Beyond what the caller may ask for.
    #[error("{0}")]
    Forbidden(String),
    /// Unknown and revoked tokens are reported alike.
    #[error("token not recognized")]
    Unrecognized,
    #[error("no live token {0}")]
    NotFound(String),
    /// The token changed since the caller looked at it.
    #[error("token {0} changed meanwhile; look again")]
    Changed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError for TokenError {
    fn code(&self) -> ErrorCode {
        match self {
            TokenError::Invalid(_) => ErrorCode::InvalidArgument,
            TokenError::Forbidden(_) => ErrorCode::Forbidden,
            TokenError::Unrecognized => ErrorCode::Unauthenticated,
            TokenError::NotFound(_) => ErrorCode::NotFound,
            TokenError::Changed(_) => ErrorCode::InvalidState,
            TokenError::Store(e) => e.code(),
        }
    }

    fn store_error(&self) -> Option<&StoreError> {
        match self {
            TokenError::Store(error) => Some(error),
            _ => None,
        }
    }
}

/// Tokens are random 256-bit values, so a plain SHA-256 digest is as good
/// as a slow hash here and costs nothing per handshake; lookups go by
/// digest, so no comparison ever touches the secret itself.
fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn new_secret(role: Role) -> Secret {
    let bytes: [u8; 32] = rand::random();
    match role {
        // The shape of Tyrum's scoped tokens: 64 hex characters.
        Role::Node => Secret(hex::encode(bytes)),
        Role::Admin | Role::Client => Secret(format!(
            "muster_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )),
    }
}

/// `dev_` and 52 characters of lowercase base32 (PROTOCOL.md Part B §3).
fn is_device_id(value: &str) -> bool {
    value.strip_prefix("dev_").is_some_and(|rest| {
        rest.len() == 52
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
    })
}

/// What a token may be: a node token names its device and holds no
/// scopes, other tokens name no device, scopes are Part B's, labels are
/// short. Returns the scopes sorted and deduplicated.
fn checked(
    role: Role,
    scopes: Vec<String>,
    label: &str,
    device_id: Option<&str>,
) -> Result<Vec<String>, TokenError> {
    match (role, device_id) {
        (Role::Node, None) => {
            return Err(TokenError::Invalid(
                "a node token needs the device_id it admits".into(),
            ));
        }
        (Role::Node, Some(id)) if !is_device_id(id) => {
            return Err(TokenError::Invalid(format!(
                "device_id must be dev_ and 52 base32 characters, not {id:?}"
            )));
        }
        (Role::Node, Some(_)) if !scopes.is_empty() => {
            return Err(TokenError::Invalid(
                "a node token carries no operator scopes".into(),
            ));
        }
        (Role::Admin | Role::Client, Some(_)) => {
            return Err(TokenError::Invalid(
                "only node tokens are bound to a device".into(),
            ));
        }
        _ => {}
    }
    if let Some(bad) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
        return Err(TokenError::Invalid(format!("unknown scope {bad:?}")));
    }
    if label.len() > MAX_LABEL_BYTES {
        return Err(TokenError::Invalid(format!(
            "label longer than {MAX_LABEL_BYTES} bytes"
        )));
    }
    let mut scopes = scopes;
    scopes.sort();
    scopes.dedup();
    Ok(scopes)
}

/// Changes to a live token: each field that is `Some` replaces the
/// token's (`device_id: Some(None)` unbinds it, `expires_at_ms: Some(None)`
/// makes it never expire). The `only_*` fields are conditions on the token
/// as it is: its tenant, and when it was last changed.
#[derive(Debug, Clone, Default)]
pub struct TokenChange {
    pub label: Option<String>,
    pub role: Option<Role>,
    pub device_id: Option<Option<String>>,
    pub scopes: Option<Vec<String>>,
    pub expires_at_ms: Option<Option<i64>>,
    pub only_in_tenant: Option<String>,
    pub only_if_updated_at_ms: Option<i64>,
}

impl TokenChange {
    fn is_empty(&self) -> bool {
        self.label.is_none()
            && self.role.is_none()
            && self.device_id.is_none()
            && self.scopes.is_none()
            && self.expires_at_ms.is_none()
    }
}

/// Edits that race are tried again this many times.
const UPDATE_ATTEMPTS: usize = 3;

/// The operator tokens: mint, verify, revoke, list.
#[derive(Clone)]
pub struct Tokens {
    store: Arc<dyn TokenStore>,
}

impl Tokens {
    pub fn new(store: Arc<dyn TokenStore>) -> Self {
        Tokens { store }
    }

    /// Mints a token; the secret is returned here and nowhere else. A
    /// `node` token names the device it admits; other roles name none. With
    /// `ttl_seconds` (1 to [`MAX_TTL_SECONDS`]) the token expires that long
    /// after now.
    pub async fn create(
        &self,
        tenant_id: &str,
        role: Role,
        scopes: Vec<String>,
        label: &str,
        device_id: Option<&str>,
        ttl_seconds: Option<u64>,
    ) -> Result<(TokenRecord, Secret), TokenError> {
        self.create_expiring_by(
            tenant_id,
            role,
            scopes,
            label,
            device_id,
            ttl_seconds,
            None,
            None,
        )
        .await
    }

    /// As [`Tokens::create`], for a token that must expire by
    /// `expires_by_ms` (the expiry of the token it is issued for). The
    /// bound is checked by this clock, the one its expiry is computed by,
    /// so that no skew between the caller's clock and this one lets it
    /// outlive the other. A token `issued_by` another (its token id) is
    /// minted only while that one is live, in its tenant, and is revoked
    /// with it.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_expiring_by(
        &self,
        tenant_id: &str,
        role: Role,
        scopes: Vec<String>,
        label: &str,
        device_id: Option<&str>,
        ttl_seconds: Option<u64>,
        expires_by_ms: Option<i64>,
        issued_by: Option<&str>,
    ) -> Result<(TokenRecord, Secret), TokenError> {
        let secret = new_secret(role);
        let mut record = new_record(tenant_id, role, scopes, label, device_id, ttl_seconds)?;
        record.issued_by = issued_by.map(str::to_owned);
        if let Some(limit) = expires_by_ms
            && record.expires_at_ms.is_none_or(|at| at > limit)
        {
            return Err(TokenError::Forbidden(
                "a token may not outlive the token it is issued for".into(),
            ));
        }
        let event = token_event("token.created", &record);
        if !self
            .store
            .insert_token(&record, &digest(secret.expose()), &event, now_ms())
            .await?
        {
            return Err(TokenError::Forbidden(
                "the token it is issued by is no longer live".into(),
            ));
        }
        minted(&record);
        Ok((record, secret))
    }

    /// The claims of a live token; unknown, revoked and expired tokens
    /// alike are [`TokenError::Unrecognized`].
    pub async fn verify(&self, presented: &str) -> Result<TokenRecord, TokenError> {
        if presented.is_empty() || presented.len() > MAX_PRESENTED_LEN {
            return Err(TokenError::Unrecognized);
        }
        match self.store.token_by_digest(&digest(presented)).await? {
            Some(record) if record.is_live(now_ms()) => Ok(record),
            _ => Err(TokenError::Unrecognized),
        }
    }

    /// The token `token_id`, revoked or not. Ids are UUIDs: anything else
    /// names no token, and is not asked of the store, which would refuse
    /// some (a NUL on Postgres) and look others up (on SQLite).
    async fn by_id(&self, token_id: &str) -> Result<Option<TokenRecord>, TokenError> {
        if uuid::Uuid::try_parse(token_id).is_err() {
            return Ok(None);
        }
        Ok(self.store.token_by_id(token_id).await?)
    }

    /// The token `token_id` while it is not revoked.
    async fn live(&self, token_id: &str) -> Result<TokenRecord, TokenError> {
        self.by_id(token_id)
            .await?
            .filter(|r| r.revoked_at_ms.is_none())
            .ok_or_else(|| TokenError::NotFound(token_id.to_owned()))
    }

    /// Revokes a live token and emits `token.revoked`, which edges act on
    /// by closing that token's connections; the tokens issued on its
    /// behalf (and on theirs) are revoked with it, each with its own
    /// `token.revoked`. With conditions, only a token
    /// of `only_in_tenant` (else `NotFound`) last changed at
    /// `only_if_updated_at_ms` (else `Changed`): the token as the caller
    /// checked it.
    pub async fn revoke(
        &self,
        token_id: &str,
        only_in_tenant: Option<&str>,
        only_if_updated_at_ms: Option<i64>,
    ) -> Result<TokenRecord, TokenError> {
        for _ in 0..UPDATE_ATTEMPTS {
            let record = self.live(token_id).await?;
            expected(&record, only_in_tenant, only_if_updated_at_ms)?;
            let previous = record.updated_at_ms;
            let at = now_ms();
            let revoked = TokenRecord {
                revoked_at_ms: Some(at),
                ..record
            };
            // The event describes the token as revoked, so the revoke
            // applies only to that version of it.
            let event = token_event("token.revoked", &revoked);
            let issued_event = |record: &TokenRecord| token_event("token.revoked", record);
            if let Some(issued) = self
                .store
                .revoke_token(token_id, previous, at, &event, &issued_event)
                .await?
            {
                tracing::info!(
                    token_id,
                    issued_by_it = issued.len(),
                    "operator token revoked"
                );
                return Ok(revoked);
            }
        }
        Err(TokenError::Changed(token_id.to_owned()))
    }

    /// Changes a live token and emits `token.updated`, which edges act on
    /// by closing that token's connections (their claims are stale).
    pub async fn update(
        &self,
        token_id: &str,
        change: TokenChange,
    ) -> Result<TokenRecord, TokenError> {
        if change.is_empty() {
            return Err(TokenError::Invalid(
                "at least one field must be updated".into(),
            ));
        }
        if let Some(Some(at)) = change.expires_at_ms
            && !(1..=now_ms() + MAX_TTL_SECONDS as i64 * 1000).contains(&at)
        {
            return Err(TokenError::Invalid(
                "expires_at must be after 1970 and at most a year from now".into(),
            ));
        }
        for _ in 0..UPDATE_ATTEMPTS {
            let record = self.live(token_id).await?;
            expected(
                &record,
                change.only_in_tenant.as_deref(),
                change.only_if_updated_at_ms,
            )?;
            let previous = record.updated_at_ms;
            let role = change.role.unwrap_or(record.role);
            let device_id = change.device_id.clone().unwrap_or(record.device_id.clone());
            if let Some(label) = &change.label {
                check_new_label(label)?;
            }
            let label = change.label.clone().unwrap_or(record.label.clone());
            let scopes = checked(
                role,
                change.scopes.clone().unwrap_or(record.scopes.clone()),
                &label,
                device_id.as_deref(),
            )?;
            let updated = TokenRecord {
                role,
                scopes,
                label,
                device_id,
                expires_at_ms: change.expires_at_ms.unwrap_or(record.expires_at_ms),
                updated_at_ms: now_ms().max(previous + 1),
                ..record
            };
            let event = token_event("token.updated", &updated);
            // Written only over the version read, so that edits that race
            // do not lose one another and versions only grow.
            if self.store.update_token(&updated, previous, &event).await? {
                tracing::info!(token_id, "operator token updated");
                return Ok(updated);
            }
            if change.only_if_updated_at_ms.is_some() {
                return Err(TokenError::Changed(token_id.to_owned()));
            }
        }
        Err(TokenError::Changed(token_id.to_owned()))
    }

    pub async fn list(&self, tenant_id: &str) -> Result<Vec<TokenRecord>, TokenError> {
        Ok(self.store.list_tokens(tenant_id).await?)
    }

    /// The token `token_id` as [`Tokens::list`] would list it: revoked
    /// ones included, none of another tenant. One token's check needs no
    /// listing of a tenant's every token (of which there may be many).
    pub async fn list_one(
        &self,
        tenant_id: &str,
        token_id: &str,
    ) -> Result<Vec<TokenRecord>, TokenError> {
        let record = self.by_id(token_id).await?;
        Ok(record
            .into_iter()
            .filter(|record| record.tenant_id == tenant_id)
            .collect())
    }

    /// On a first start, mints the admin token: `provided` (an operator's
    /// own, 32+ characters) or a fresh one. Returns the secret when it
    /// minted one now, `None` when an admin token already exists.
    pub async fn bootstrap_admin(
        &self,
        tenant_id: &str,
        provided: Option<&str>,
    ) -> Result<Option<Secret>, TokenError> {
        if let Some(value) = provided
            && let Err(message) = check_provided_admin_token(value)
        {
            // Refused while the one first mint is still to come; after it
            // the variable is not used, and a deployment bootstrapped
            // before this rule (a value with a line end) still starts.
            if self.store.first_admin_minted().await? {
                tracing::warn!("{message} (ignored: the admin token was minted before)");
                return Ok(None);
            }
            return Err(TokenError::Invalid(message));
        }
        let secret = provided
            .map(|v| Secret(v.to_owned()))
            .unwrap_or_else(|| new_secret(Role::Admin));
        let record = new_record(
            tenant_id,
            Role::Admin,
            vec!["*".into()],
            "initial admin",
            None,
            None,
        )?;
        let event = token_event("token.created", &record);
        if !self
            .store
            .insert_first_admin(&record, &digest(secret.expose()), &event)
            .await?
        {
            return Ok(None);
        }
        minted(&record);
        Ok(Some(secret))
    }
}

/// Whether `record` meets a caller's conditions: `NotFound` for another
/// tenant's token, `Changed` for a version other than the one it checked.
fn expected(
    record: &TokenRecord,
    only_in_tenant: Option<&str>,
    only_if_updated_at_ms: Option<i64>,
) -> Result<(), TokenError> {
    if only_in_tenant.is_some_and(|tenant| tenant != record.tenant_id) {
        return Err(TokenError::NotFound(record.token_id.clone()));
    }
    if only_if_updated_at_ms.is_some_and(|at| at != record.updated_at_ms) {
        return Err(TokenError::Changed(record.token_id.clone()));
    }
    Ok(())
}

/// A label given now (not one stored before this rule, which an edit of
/// other fields keeps): no control characters, refused alike on both
/// stores (Postgres would refuse a NUL, SQLite keep it) and kept out of
/// listings and terminals.
fn check_new_label(label: &str) -> Result<(), TokenError> {
    if label.chars().any(char::is_control) {
        return Err(TokenError::Invalid(
            "label must not hold control characters".into(),
        ));
    }
    Ok(())
}

/// A new token's record, its arguments checked.
fn new_record(
    tenant_id: &str,
    role: Role,
    scopes: Vec<String>,
    label: &str,
    device_id: Option<&str>,
    ttl_seconds: Option<u64>,
) -> Result<TokenRecord, TokenError> {
    if let Some(ttl) = ttl_seconds
        && !(1..=MAX_TTL_SECONDS).contains(&ttl)
    {
        return Err(TokenError::Invalid(format!(
            "ttl_seconds must be between 1 and {MAX_TTL_SECONDS}"
        )));
    }
    // As the outbox takes a tenant (every token's events carry it).
    muster_store::text::check_name("tenant_id", tenant_id, muster_store::text::MAX_NAME_BYTES)
        .map_err(TokenError::Invalid)?;
    check_new_label(label)?;
    let scopes = checked(role, scopes, label, device_id)?;
    let created_at_ms = now_ms();
    let record = TokenRecord {
        token_id: uuid::Uuid::new_v4().to_string(),
        tenant_id: tenant_id.to_owned(),
        role,
        scopes,
        label: label.to_owned(),
        created_at_ms,
        revoked_at_ms: None,
        device_id: device_id.map(str::to_owned),
        expires_at_ms: ttl_seconds.map(|ttl| created_at_ms + ttl as i64 * 1000),
        updated_at_ms: 0,
        issued_by: None,
    };
    Ok(record)
}

fn minted(record: &TokenRecord) {
    tracing::info!(token_id = %record.token_id, tenant_id = %record.tenant_id, role = record.role.as_str(), "operator token minted");
}

/// A token's change, for operators with `operator.admin` (and the edges,
/// which act on `token.revoked` and `token.updated`).
fn token_event(kind: &str, record: &TokenRecord) -> NewItem {
    NewItem {
        audience_roles: vec!["client".into()],
        audience_scopes: vec!["operator.admin".into()],
        ..NewItem::event(&record.tenant_id, kind, token_payload(record))
    }
}

fn token_payload(record: &TokenRecord) -> serde_json::Value {
    json!({
        "token_id": record.token_id,
        "tenant_id": record.tenant_id,
        "role": record.role.as_str(),
        "scopes": record.scopes,
        "label": record.label,
        "revoked_at_ms": record.revoked_at_ms,
        "device_id": record.device_id,
        "expires_at_ms": record.expires_at_ms,
        "updated_at_ms": record.updated_at_ms,
        "issued_by": record.issued_by,
    })
}
