//! Generated gRPC contracts of muster's internal services (`proto/muster/v1`).
#![forbid(unsafe_code)]
#![allow(clippy::all, missing_docs)]

/// `muster.v1`: every service's messages, clients and servers.
pub mod v1 {
    tonic::include_proto!("muster.v1");
}

/// Encoded descriptors of every muster service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("muster_descriptor");

impl v1::ItemOutcome {
    /// The outcome of one item of a batched call, as its own call would
    /// have returned it.
    pub fn of(result: Result<bool, tonic::Status>) -> Self {
        match result {
            Ok(changed) => v1::ItemOutcome {
                code: 0,
                message: String::new(),
                changed,
            },
            Err(status) => v1::ItemOutcome {
                code: status.code() as i32,
                message: status.message().to_owned(),
                changed: false,
            },
        }
    }

    /// Back into the result of a call of its own: whether it changed
    /// anything, or why it failed.
    pub fn into_result(self) -> Result<bool, tonic::Status> {
        match tonic::Code::from_i32(self.code) {
            tonic::Code::Ok => Ok(self.changed),
            code => Err(tonic::Status::new(code, self.message)),
        }
    }
}

/// At most this many items travel in one batched call (`UpdateInstances`,
/// `UpdateConnections`); a larger batch is refused whole.
pub const MAX_BATCH_ITEMS: usize = 1000;

/// Refuses a batched call that carries more than [`MAX_BATCH_ITEMS`].
pub fn check_batch_len(len: usize) -> Result<(), tonic::Status> {
    if len > MAX_BATCH_ITEMS {
        return Err(tonic::Status::invalid_argument(format!(
            "at most {MAX_BATCH_ITEMS} changes per call"
        )));
    }
    Ok(())
}
