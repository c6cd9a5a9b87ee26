/// What the store can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported store url (expected sqlite://… or postgres://…)")]
    UnsupportedUrl,
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("outbox payload field {key:?} looks like a secret; pass a handle instead")]
    SecretInPayload { key: String },
    /// The store could not take the write (it shared a transaction that
    /// failed for a reason of the store's, not of the write's).
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if breaks_connections(&error) {
            crate::store::suspect_connections();
        }
        StoreError::Database(error)
    }
}

/// SQLSTATE classes that say the server or the connection failed, not the
/// statement: connection exceptions, insufficient resources, operator
/// intervention (a shutdown or restart), system errors. Only Postgres
/// reports SQLSTATEs (five characters); SQLite's codes are numbers of up to
/// four digits (an extended code: its primary code in the low byte), some
/// of which start with the same digits. For SQLite the file failed: locked
/// by another process past the busy timeout, out of memory, read-only, an
/// I/O error, corrupt, full, or not openable.
fn is_server_trouble(code: &str) -> bool {
    if code.len() == 5 {
        // 25006, read_only_sql_transaction: a write reached a server that
        // takes none (a standby, or the primary fenced after a failover),
        // and the pool's connections to it are no use for writes.
        return code == "25006"
            || ["08", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class));
    }
    code.parse::<u32>()
        .is_ok_and(|extended| matches!(extended & 0xff, 5..=8 | 10 | 11 | 13 | 14))
}

/// The error means the connection it came from (and likely its pool
/// siblings, as after a server restart) no longer works.
fn breaks_connections(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::Tls(_) => true,
        // Not a cancelled statement (57014, the statement timeout): the
        // store failed to serve it, but its connection is sound.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| is_server_trouble(&code) && code != QUERY_CANCELED),
        _ => false,
    }
}

/// SQLSTATE of a statement cancelled by the server (its timeout).
const QUERY_CANCELED: &str = "57014";

impl StoreError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        StoreError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// The write itself was refused (bad input, a constraint, a statement
    /// the database rejected), as opposed to the store failing.
    pub fn is_about_the_write(&self) -> bool {
        match self {
            StoreError::Invalid { .. } | StoreError::SecretInPayload { .. } => true,
            StoreError::Database(sqlx::Error::Database(db)) => {
                !db.code().is_some_and(|code| is_server_trouble(&code))
            }
            _ => false,
        }
    }

    /// A unique or check constraint refused the write.
    pub fn is_constraint_violation(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(db))
            if db.is_unique_violation() || db.is_check_violation())
    }
}

#[cfg(test)]
mod tests {
    use super::is_server_trouble;

    #[test]
    fn server_trouble_is_told_from_a_refused_statement() {
        // admin_shutdown (a restart), connection_failure, too_many_connections,
        // io_error: the store failed.
        for code in ["57P01", "08006", "53300", "58030", "25006"] {
            assert!(is_server_trouble(code), "{code}");
        }
        // unique_violation, check_violation, syntax_error, serialization_failure
        // (retrying the write alone is the cure): the write was refused.
        for code in ["23505", "23514", "42601", "40001"] {
            assert!(!is_server_trouble(code), "{code}");
        }
        // SQLite's: SQLITE_CONSTRAINT_COMMITHOOK (531), _UNIQUE (2067),
        // SQLITE_ERROR: the write was refused.
        for code in ["531", "2067", "1"] {
            assert!(!is_server_trouble(code), "{code}");
        }
        // SQLITE_BUSY (another process holds the file past the busy
        // timeout), _BUSY_SNAPSHOT, _LOCKED, _READONLY, _IOERR_SHORT_READ,
        // _FULL: the store failed, and retrying each write alone would
        // only wait it out once per write.
        for code in ["5", "517", "6", "8", "522", "13"] {
            assert!(is_server_trouble(code), "{code}");
        }
    }
}
