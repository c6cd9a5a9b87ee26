//! muster's approvals service: requests for a human decision (pairing,
//! capability calls) and their outcome. A request is decided once; an
//! expired one can no longer be decided.
#![forbid(unsafe_code)]

mod approvals;
mod grpc;
pub mod store;

pub use approvals::{
    Approval, ApprovalError, Approvals, DEFAULT_TTL_MS, Decision, LIST_DEFAULT, LIST_MAX,
    MAX_TTL_MS, Status,
};
pub use grpc::{ApprovalsService, RULES, spec};
pub use store::{ApprovalStore, Listing};
