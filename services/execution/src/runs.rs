use std::sync::Arc;

use muster_mesh::{ErrorCode, ServiceError};
use muster_store::outbox::NewItem;
use muster_store::text::{MAX_NAME_BYTES, check_name};
use muster_store::{StoreError, now_ms};
use serde_json::{Value, json};

use crate::RunStore;

/// Largest run specification accepted.
const MAX_SPEC_BYTES: usize = 64 * 1024;

/// A run as execution knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub run_id: String,
    pub tenant_id: String,
    pub idempotency_key: String,
    pub spec: Value,
    pub status: String,
    pub created_at_ms: i64,
}

/// Whether an enqueue made a new run or found the one its key names.
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    Created(Run),
    Existing(Run),
}

impl Enqueued {
    pub fn run(self) -> Run {
        match self {
            Enqueued::Created(run) | Enqueued::Existing(run) => run,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Invalid(String),
    #[error("no run {0}")]
    NotFound(String),
    #[error("idempotency key {0:?} already names a run with another spec")]
    KeyReused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError for RunError {
    fn code(&self) -> ErrorCode {
        match self {
            RunError::Invalid(_) => ErrorCode::InvalidArgument,
            RunError::NotFound(_) => ErrorCode::NotFound,
            RunError::KeyReused(_) => ErrorCode::InvalidState,
            RunError::Store(e) => e.code(),
        }
    }

    fn store_error(&self) -> Option<&StoreError> {
        match self {
            RunError::Store(error) => Some(error),
            _ => None,
        }
    }
}

/// Runs: enqueue and read.
#[derive(Clone)]
pub struct Runs {
    store: Arc<dyn RunStore>,
}

impl Runs {
    pub fn new(store: Arc<dyn RunStore>) -> Self {
        Runs { store }
    }

    /// Queues a run and emits `run.queued`; a repeated key returns the run
    /// it already names (and emits nothing), a reused key with another spec
    /// is refused.
    pub async fn enqueue(
        &self,
        tenant_id: &str,
        idempotency_key: &str,
        spec: Value,
    ) -> Result<Enqueued, RunError> {
        check_name("tenant_id", tenant_id, MAX_NAME_BYTES).map_err(RunError::Invalid)?;
        check_name("idempotency_key", idempotency_key, 200).map_err(RunError::Invalid)?;
        if !spec.is_object() {
            return Err(RunError::Invalid("spec must be a json object".into()));
        }
        if spec.to_string().len() > MAX_SPEC_BYTES {
            return Err(RunError::Invalid(format!(
                "spec larger than {MAX_SPEC_BYTES} bytes"
            )));
        }
        let run = Run {
            run_id: uuid::Uuid::new_v4().to_string(),
            tenant_id: tenant_id.to_owned(),
            idempotency_key: idempotency_key.to_owned(),
            spec,
            status: "queued".into(),
            created_at_ms: now_ms(),
        };
        let event = NewItem {
            audience_roles: vec!["client".into()],
            ..NewItem::event(
                tenant_id,
                "run.queued",
                json!({"run_id": run.run_id, "status": run.status, "idempotency_key": run.idempotency_key}),
            )
        };
        let spec_text = run.spec.to_string();
        match self.store.insert_run(&run, &event).await? {
            None => Ok(Enqueued::Created(run)),
            // The texts, not the values read back: a float's shortest text
            // does not always read back as the same float, and a retry of
            // the same request must find its run.
            // (The values too, for a run stored by a build that wrote
            // floats otherwise.)
            Some((existing, stored)) if stored == spec_text || existing.spec == run.spec => {
                Ok(Enqueued::Existing(existing))
            }
            Some(_) => Err(RunError::KeyReused(idempotency_key.to_owned())),
        }
    }

    pub async fn get(&self, tenant_id: &str, run_id: &str) -> Result<Run, RunError> {
        self.store
            .run(tenant_id, run_id)
            .await?
            .ok_or_else(|| RunError::NotFound(run_id.to_owned()))
    }
}
