//! muster's presence service: who is connected and healthy, per device
//! instance. Self-reported host and ip are kept beside what the edge
//! observed, labelled as such, and never decide anything.
#![forbid(unsafe_code)]

mod grpc;
mod instances;
pub mod store;
mod topics;

pub use grpc::{PresenceService, RULES, spec};
pub use instances::{
    InstanceEntry, InstanceRole, Instances, MAX_FIELD, PresenceError, Retention, Touched,
    connect_field,
};
pub use store::{InstanceWrite, PresenceStore, TopicStore};
pub use topics::{
    DIFF_EVENT, GONE_KEPT, NOTE_CHARS, REVIVE_CONNECTIONS, TopicError, TopicSession, Topics,
};
