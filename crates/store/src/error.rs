/// What the store can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
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
        matches!(
            self,
            StoreError::Invalid { .. }
                | StoreError::SecretInPayload { .. }
                | StoreError::Database(sqlx::Error::Database(_))
        )
    }

    /// A unique or check constraint refused the write.
    pub fn is_constraint_violation(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(db))
            if db.is_unique_violation() || db.is_check_violation())
    }
}
