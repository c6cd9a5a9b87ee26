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
