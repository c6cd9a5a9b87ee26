//! Serving and calling muster's gRPC services over mutual TLS.
//!
//! A server accepts only peers with a certificate from the project's CA,
//! runs each TLS handshake in its own task with a deadline, and authorizes
//! every RPC by the caller's SPIFFE service identity against a table the
//! service declares: a method that is not listed is denied to everyone.
//! Health and reflection are open to every principal of the trust domain.
//! Trace context travels in the `traceparent` header both ways.
#![forbid(unsafe_code)]

mod authz;
mod client;
mod error;
mod layer;
mod server;
mod stream;
mod trace;

pub use authz::{REFUSED_BY_MESH, Rule, authorize};
pub use client::{MeshChannel, channel, channel_with};
pub use error::{ErrorCode, ServiceError, to_status};
pub use server::{RunningServer, ServiceSpec, serve};
pub use stream::{HANDSHAKES_PER_ADDRESS, PeerInfo};

/// The caller's identity inside a handler, as established by the mesh.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<muster_tls::ServiceName> {
    request.extensions().get::<PeerInfo>()?.service()
}
