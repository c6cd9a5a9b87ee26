//! Generated gRPC contracts of muster's internal services (`proto/muster/v1`).
#![forbid(unsafe_code)]
#![allow(clippy::all, missing_docs)]

/// `muster.v1`: every service's messages, clients and servers.
pub mod v1 {
    tonic::include_proto!("muster.v1");
}

/// Encoded descriptors of every muster service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("muster_descriptor");
