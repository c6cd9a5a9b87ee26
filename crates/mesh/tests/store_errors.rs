//! How the store's failures reach callers, with a real Postgres.

use muster_mesh::{ErrorCode, ServiceError};
use muster_store::{Store, StoreError};

/// Two transactions locking two rows in opposite orders: the server breaks
/// the deadlock by failing one, and that call is worth making again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_the_server_broke_is_unavailable_not_internal() {
    let url = muster_store::testing::create_postgres_database().await;
    let store = Store::connect(&url, &Default::default()).await.unwrap();
    sqlx::query("CREATE TABLE pair (id INT PRIMARY KEY, n INT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query("INSERT INTO pair (id, n) VALUES (1, 0), (2, 0)")
        .execute(store.pool())
        .await
        .unwrap();
    let bump = |id: i32| sqlx::query("UPDATE pair SET n = n + 1 WHERE id = $1").bind(id);
    let mut a = store.pool().begin().await.unwrap();
    let mut b = store.pool().begin().await.unwrap();
    bump(1).execute(&mut *a).await.unwrap();
    bump(2).execute(&mut *b).await.unwrap();
    let (by_a, by_b) = tokio::join!(bump(2).execute(&mut *a), bump(1).execute(&mut *b));
    let failed = match (by_a, by_b) {
        (Err(error), Ok(_)) | (Ok(_), Err(error)) => StoreError::from(error),
        other => panic!("one of the two should have been failed: {other:?}"),
    };
    assert!(failed.to_string().contains("deadlock"), "{failed}");
    assert_eq!(failed.code(), ErrorCode::Unavailable, "{failed}");
}

/// What the database says of a refused statement (its SQLSTATE, the
/// constraint's name, the driver's words) goes to the log; the caller gets
/// the code and a fixed message.
#[tokio::test]
async fn a_refused_statement_reaches_the_caller_without_the_databases_words() {
    let url = muster_store::testing::create_postgres_database().await;
    let store = Store::connect(&url, &Default::default()).await.unwrap();
    sqlx::query("CREATE TABLE named (name TEXT CONSTRAINT named_secret_shape_key UNIQUE)")
        .execute(store.pool())
        .await
        .unwrap();
    let insert = |name: &'static str| {
        let store = store.clone();
        async move {
            sqlx::query("INSERT INTO named (name) VALUES ($1)")
                .bind(name)
                .execute(store.pool())
                .await
                .map_err(StoreError::from)
        }
    };
    insert("a").await.unwrap();
    for (refused, code, message) in [
        (
            insert("nul\0").await.unwrap_err(),
            tonic::Code::InvalidArgument,
            "the store cannot hold a value of the request (a NUL character, or too long)",
        ),
        (
            insert("a").await.unwrap_err(),
            tonic::Code::FailedPrecondition,
            "the request conflicts with what is stored",
        ),
    ] {
        assert!(refused.to_string().contains("database"), "{refused}");
        let status = muster_mesh::to_status(&refused);
        assert_eq!(
            (status.code(), status.message()),
            (code, message),
            "{refused}"
        );
    }
    // A batch of writes the store failed passes its error on to every
    // caller of the batch as unavailable, text and all.
    let batch = StoreError::Unavailable(
        "database: error returned from database: canceling statement".into(),
    );
    let status = muster_mesh::to_status(&batch);
    assert_eq!(
        (status.code(), status.message()),
        (
            tonic::Code::Unavailable,
            "the store is unavailable; try again"
        )
    );
}
