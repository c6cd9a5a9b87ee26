//! muster's identity service: the device registry and trust. This first
//! part holds the operator tokens that admit clients at the edge: minted
//! with a secret shown once, stored as a SHA-256 digest, revocable.
#![forbid(unsafe_code)]

mod grpc;
pub mod store;
mod tokens;

pub use grpc::{IdentityService, RULES, spec};
pub use store::{TokenRecord, TokenStore};
pub use tokens::{
    MAX_TTL_SECONDS, Role, SCOPES, Secret, TokenChange, TokenError, Tokens,
    check_provided_admin_token,
};
