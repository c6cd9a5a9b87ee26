//! The muster binary's library: configuration, serving the mesh, and the
//! command line's client side. `muster serve` runs every service in one
//! process on a single host; `muster serve --service <name>` runs one in a
//! cluster.
#![forbid(unsafe_code)]

pub mod config;
pub mod ctl;
pub mod operator;
pub mod serve;

pub use config::{Config, DEFAULT_MAX_FRAME_BYTES, DEFAULT_TENANT, NoFlags};
pub use serve::{Endpoints, Running, start, start_until};
