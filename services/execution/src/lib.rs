//! muster's execution service: runs and their steps, queued, leased and
//! retried. This first part queues runs idempotently: the same key in the
//! same tenant always names the same run.
#![forbid(unsafe_code)]

mod grpc;
mod runs;
pub mod store;

pub use grpc::{ExecutionService, RULES, spec};
pub use runs::{Enqueued, Run, RunError, Runs};
pub use store::RunStore;
