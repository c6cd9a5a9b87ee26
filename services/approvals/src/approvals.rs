use std::sync::Arc;

use muster_mesh::{ErrorCode, ServiceError};
use muster_store::outbox::NewItem;
use muster_store::text::{MAX_NAME_BYTES, check_name, check_text};
use muster_store::{StoreError, now_ms};
use serde_json::{Value, json};

use crate::ApprovalStore;
use crate::store::Listing;

/// A request nobody decides expires after this long by default.
pub const DEFAULT_TTL_MS: i64 = 10 * 60 * 1000;
/// No request waits longer than a week.
pub const MAX_TTL_MS: i64 = 7 * 24 * 60 * 60 * 1000;
/// Largest context a request may carry.
const MAX_CONTEXT_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Approved,
    Denied,
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Denied => "denied",
            Status::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::Pending,
            Status::Approved,
            Status::Denied,
            Status::Expired,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// An approval request and, once decided, its outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Approval {
    pub approval_id: String,
    pub tenant_id: String,
    pub kind: String,
    pub context: Value,
    pub status: Status,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub decided_at_ms: Option<i64>,
    pub decided_by: Option<String>,
    pub reason: Option<String>,
}

impl Approval {
    /// The status as of `now`: a pending request past its expiry reads as
    /// expired even before anything wrote that down.
    pub fn status_at(&self, now: i64) -> Status {
        if self.status == Status::Pending && now >= self.expires_at_ms {
            Status::Expired
        } else {
            self.status
        }
    }

    fn payload(&self) -> Value {
        json!({
            "approval_id": self.approval_id,
            "kind": self.kind,
            "context": self.context,
            "status": self.status.as_str(),
            "created_at_ms": self.created_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "decided_at_ms": self.decided_at_ms,
            "decided_by": self.decided_by,
            "reason": self.reason,
        })
    }
}

/// An approver's answer.
#[derive(Debug, Clone)]
pub struct Decision {
    pub approve: bool,
    pub decided_by: String,
    pub reason: String,
}

/// Requests a listing gives when it does not say how many.
pub const LIST_DEFAULT: u32 = 100;
/// The most requests one listing gives (Part B's `approval.list`).
pub const LIST_MAX: u32 = 500;

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("{0}")]
    Invalid(String),
    #[error("no approval {0}")]
    NotFound(String),
    #[error("approval {id} is {status}, not pending")]
    NotPending { id: String, status: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError for ApprovalError {
    fn code(&self) -> ErrorCode {
        match self {
            ApprovalError::Invalid(_) => ErrorCode::InvalidArgument,
            ApprovalError::NotFound(_) => ErrorCode::NotFound,
            ApprovalError::NotPending { .. } => ErrorCode::InvalidState,
            ApprovalError::Store(e) => e.code(),
        }
    }

    fn store_error(&self) -> Option<&StoreError> {
        match self {
            ApprovalError::Store(error) => Some(error),
            _ => None,
        }
    }
}

fn audience(item: NewItem) -> NewItem {
    NewItem {
        audience_roles: vec!["client".into()],
        audience_scopes: vec!["operator.read".into(), "operator.approvals".into()],
        ..item
    }
}

/// Approval requests: create, read, decide.
#[derive(Clone)]
pub struct Approvals {
    store: Arc<dyn ApprovalStore>,
}

impl Approvals {
    pub fn new(store: Arc<dyn ApprovalStore>) -> Self {
        Approvals { store }
    }

    /// Opens a pending request and emits `approval.requested`.
    pub async fn create(
        &self,
        tenant_id: &str,
        kind: &str,
        context: Value,
        ttl_ms: Option<i64>,
    ) -> Result<Approval, ApprovalError> {
        check_name("tenant_id", tenant_id, MAX_NAME_BYTES).map_err(ApprovalError::Invalid)?;
        check_name("kind", kind, 64).map_err(ApprovalError::Invalid)?;
        if !context.is_object() {
            return Err(ApprovalError::Invalid(
                "context must be a json object".into(),
            ));
        }
        if context.to_string().len() > MAX_CONTEXT_BYTES {
            return Err(ApprovalError::Invalid(format!(
                "context larger than {MAX_CONTEXT_BYTES} bytes"
            )));
        }
        let ttl = ttl_ms.unwrap_or(DEFAULT_TTL_MS);
        if !(1..=MAX_TTL_MS).contains(&ttl) {
            return Err(ApprovalError::Invalid(format!(
                "ttl must be between 1 and {MAX_TTL_MS} ms"
            )));
        }
        let now = now_ms();
        let approval = Approval {
            approval_id: uuid::Uuid::new_v4().to_string(),
            tenant_id: tenant_id.to_owned(),
            kind: kind.to_owned(),
            context,
            status: Status::Pending,
            created_at_ms: now,
            expires_at_ms: now + ttl,
            decided_at_ms: None,
            decided_by: None,
            reason: None,
        };
        let event = audience(NewItem::event(
            tenant_id,
            "approval.requested",
            approval.payload(),
        ));
        self.store.insert_approval(&approval, &event).await?;
        Ok(approval)
    }

    pub async fn get(&self, tenant_id: &str, approval_id: &str) -> Result<Approval, ApprovalError> {
        let now = now_ms();
        self.store
            .approval(tenant_id, approval_id)
            .await?
            .map(|a| Approval {
                status: a.status_at(now),
                ..a
            })
            .ok_or_else(|| ApprovalError::NotFound(approval_id.to_owned()))
    }

    /// A page of `tenant_id`'s requests, newest first, of `status` when
    /// given: at most `limit` (0: [`LIST_DEFAULT`]; at most [`LIST_MAX`]),
    /// after `cursor` (what the previous page gave, empty for the first),
    /// and the cursor of the next page while there may be one.
    pub async fn list(
        &self,
        tenant_id: &str,
        status: Option<Status>,
        cursor: &str,
        limit: u32,
    ) -> Result<(Vec<Approval>, Option<String>), ApprovalError> {
        let limit = match limit {
            0 => LIST_DEFAULT,
            n if n > LIST_MAX => {
                return Err(ApprovalError::Invalid(format!(
                    "limit is at most {LIST_MAX}"
                )));
            }
            n => n,
        };
        let after =
            if cursor.is_empty() {
                None
            } else {
                let parsed = cursor
                    .split_once(':')
                    .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id.to_owned())));
                Some(parsed.ok_or_else(|| {
                    ApprovalError::Invalid("cursor is not one of a listing".into())
                })?)
            };
        let now = now_ms();
        let listing = Listing {
            status,
            now_ms: now,
            after,
            limit: limit + 1,
        };
        let mut found = self.store.list_approvals(tenant_id, &listing).await?;
        let next = (found.len() > limit as usize).then(|| {
            found.truncate(limit as usize);
            let last = found.last().expect("a full page");
            format!("{}:{}", last.created_at_ms, last.approval_id)
        });
        let page = found
            .into_iter()
            .map(|a| Approval {
                status: a.status_at(now),
                ..a
            })
            .collect();
        Ok((page, next))
    }

    /// Approves or denies a pending, unexpired request and emits
    /// `approval.resolved`. Deciding twice, or too late, is refused and
    /// changes nothing, except that the same decision again (verdict,
    /// decider and reason) answers with the request as it was decided: a
    /// caller whose reply was lost after the commit may ask again and
    /// learn that its decision stands.
    pub async fn decide(
        &self,
        tenant_id: &str,
        approval_id: &str,
        decision: Decision,
    ) -> Result<Approval, ApprovalError> {
        check_name("decided_by", &decision.decided_by, MAX_NAME_BYTES)
            .map_err(ApprovalError::Invalid)?;
        check_text("reason", &decision.reason, 1024).map_err(ApprovalError::Invalid)?;
        let verdict = if decision.approve {
            Status::Approved
        } else {
            Status::Denied
        };
        let reason = (!decision.reason.is_empty()).then_some(decision.reason);
        // The request as decided, if this very decision is what decided it.
        let made = |stored: Approval| {
            (stored.status == verdict
                && stored.decided_by.as_deref() == Some(decision.decided_by.as_str())
                && stored.reason == reason)
                .then_some(stored)
        };
        let current = self.get(tenant_id, approval_id).await?;
        if current.status != Status::Pending {
            let status = current.status.as_str();
            return made(current).ok_or_else(|| ApprovalError::NotPending {
                id: approval_id.to_owned(),
                status,
            });
        }
        let decided = Approval {
            status: verdict,
            decided_at_ms: Some(now_ms()),
            decided_by: Some(decision.decided_by.clone()),
            reason: reason.clone(),
            ..current
        };
        let event = audience(NewItem::event(
            tenant_id,
            "approval.resolved",
            decided.payload(),
        ));
        // The store re-checks that the request is still pending and
        // unexpired inside its transaction: two approvers racing cannot both
        // win.
        if !self.store.decide_approval(&decided, &event).await? {
            let stored = self.get(tenant_id, approval_id).await?;
            let status = stored.status.as_str();
            return made(stored).ok_or_else(|| ApprovalError::NotPending {
                id: approval_id.to_owned(),
                status,
            });
        }
        Ok(decided)
    }
}
