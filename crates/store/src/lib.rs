//! muster's StateStore: one schema in two dialects (`migrations/sqlite`,
//! `migrations/postgres`), reached through sqlx's `Any` driver so that every
//! service's store is written once and runs on both.
//!
//! SQLite is the single-host default (a file in the data directory, WAL,
//! `synchronous=FULL` so an acknowledged write survives a crash); Postgres
//! is the cluster store. Write transactions on SQLite start with
//! `BEGIN IMMEDIATE` on one writer connection, so writers queue for it in
//! order instead of failing when a read lock cannot be upgraded (or
//! sleeping in SQLite's busy handler).
#![forbid(unsafe_code)]

mod error;
pub mod group;
pub mod lease;
pub mod outbox;
mod store;
pub mod testing;
pub mod text;

pub use error::StoreError;
pub use store::{
    AnyQuery, Backend, COMMITS_CHANNEL, DEFAULT_STATEMENT_TIMEOUT, MIGRATION_LOCK_TIMEOUT, Store,
    StoreOptions, Tx, conflict_free_runs, in_statements, last_of_each, now_ms, placeholders,
    remove_in_run, tuples_in, values_rows,
};
