//! The one place where errors become codes: gRPC status codes inside the
//! mesh, and the client protocol's error codes at the edge.

use tonic::{Code, Status};

/// The kinds of failure every service reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is malformed or names something impossible.
    InvalidArgument,
    /// What the request names does not exist (in this tenant).
    NotFound,
    /// The request conflicts with the current state (already decided,
    /// duplicate, expired).
    InvalidState,
    /// No valid credentials.
    Unauthenticated,
    /// Valid credentials, not allowed.
    Forbidden,
    /// Try again later.
    Unavailable,
    /// A fault of ours; details go to the log, never to the caller.
    Internal,
}

impl ErrorCode {
    pub fn grpc(self) -> Code {
        match self {
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::InvalidState => Code::FailedPrecondition,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::Forbidden => Code::PermissionDenied,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::Internal => Code::Internal,
        }
    }

    pub fn from_grpc(code: Code) -> ErrorCode {
        match code {
            Code::InvalidArgument | Code::OutOfRange => ErrorCode::InvalidArgument,
            Code::NotFound => ErrorCode::NotFound,
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => {
                ErrorCode::InvalidState
            }
            Code::Unauthenticated => ErrorCode::Unauthenticated,
            Code::PermissionDenied => ErrorCode::Forbidden,
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
                ErrorCode::Unavailable
            }
            _ => ErrorCode::Internal,
        }
    }

    /// The client protocol's error-response code (PROTOCOL.md Part B §2.4).
    pub fn wire(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::Unauthenticated => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unavailable | ErrorCode::Internal => "internal_error",
        }
    }
}

/// A domain error that knows its code. Its Display text is what the caller
/// sees, so it must never hold a secret.
pub trait ServiceError: std::error::Error {
    fn code(&self) -> ErrorCode;

    /// The store's error this one is, if any.
    fn store_error(&self) -> Option<&muster_store::StoreError> {
        None
    }
}

/// Turns a domain error into a status: the message for the caller, except
/// for internal faults, which are logged and reported without detail, and
/// the database's own refusals, whose text (SQLSTATEs, constraint and
/// column names, the driver's words) is logged and replaced by a fixed
/// message for their code.
pub fn to_status(error: &impl ServiceError) -> Status {
    let code = error.code();
    if code == ErrorCode::Internal {
        tracing::error!(%error, "internal error");
        return Status::new(code.grpc(), "internal error");
    }
    // Unavailable: a batch of writes that failed for the store's reasons
    // carries the database's text too.
    if let Some(muster_store::StoreError::Database(_) | muster_store::StoreError::Unavailable(_)) =
        error.store_error()
    {
        tracing::warn!(%error, ?code, "the store refused a call");
        let message = match code {
            ErrorCode::InvalidArgument => {
                "the store cannot hold a value of the request (a NUL character, or too long)"
            }
            ErrorCode::InvalidState => "the request conflicts with what is stored",
            _ => "the store is unavailable; try again",
        };
        return Status::new(code.grpc(), message);
    }
    Status::new(code.grpc(), error.to_string())
}

impl ServiceError for muster_store::StoreError {
    fn code(&self) -> ErrorCode {
        use muster_store::StoreError;
        match self {
            StoreError::Invalid { .. } | StoreError::SecretInPayload { .. } => {
                ErrorCode::InvalidArgument
            }
            e if e.is_constraint_violation() => ErrorCode::InvalidState,
            // A value the database cannot take as text: a NUL or a byte
            // sequence its encoding refuses (character_not_in_repertoire,
            // untranslatable_character), or one too long for its column,
            // or for an index entry (program_limit_exceeded, 54000: a
            // value of a few kilobytes in an indexed column). Only these:
            // the rest of SQLSTATE class 22 may be a fault of the
            // service's own (an overflow in a computed value).
            StoreError::Database(sqlx::Error::Database(db))
                if db.code().is_some_and(|code| {
                    matches!(&*code, "22021" | "22P05" | "22001" | "54000")
                }) =>
            {
                ErrorCode::InvalidArgument
            }
            StoreError::Database(sqlx_error) if is_unavailable(sqlx_error) => {
                ErrorCode::Unavailable
            }
            // Lost to another transaction (a serialization failure, a
            // deadlock the server broke): the same call again succeeds.
            StoreError::Database(sqlx::Error::Database(db))
                if db
                    .code()
                    .is_some_and(|code| matches!(&*code, "40001" | "40P01")) =>
            {
                ErrorCode::Unavailable
            }
            // The server failed the statement (cancelled at its timeout,
            // shutting down, out of connections), not the write's content.
            StoreError::Database(sqlx::Error::Database(_)) if !self.is_about_the_write() => {
                ErrorCode::Unavailable
            }
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }

    fn store_error(&self) -> Option<&muster_store::StoreError> {
        Some(self)
    }
}

fn is_unavailable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_grpc() {
        for code in [
            ErrorCode::InvalidArgument,
            ErrorCode::NotFound,
            ErrorCode::InvalidState,
            ErrorCode::Unauthenticated,
            ErrorCode::Forbidden,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            assert_eq!(ErrorCode::from_grpc(code.grpc()), code);
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("disk on fire at /secret/path")]
    struct Fault;

    impl ServiceError for Fault {
        fn code(&self) -> ErrorCode {
            ErrorCode::Internal
        }
    }

    #[test]
    fn internal_details_never_reach_the_caller() {
        let status = to_status(&Fault);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
