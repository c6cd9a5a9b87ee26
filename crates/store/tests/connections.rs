//! Pooled connections after the server dropped them (as a Postgres restart
//! does): the failure reaches one caller, not one caller per connection.

use muster_store::testing::{create_postgres_database, postgres_url};
use muster_store::{Store, StoreOptions};

const POOLED: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_fail_one_statement_not_one_per_connection() {
    let url = create_postgres_database().await;
    let database = url.rsplit('/').next().expect("database name").to_owned();
    let store = Store::connect(
        &url,
        &StoreOptions {
            max_connections: POOLED,
            ..Default::default()
        },
    )
    .await
    .expect("connect");
    // Every pooled connection in use at once, so the pool holds them all,
    // each used less than a second ago (no ping on acquire).
    let busy: Vec<_> = (0..POOLED)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .fetch_all(sqlx::query("SELECT pg_sleep(0.2)"), |_| Ok(()))
                    .await
            })
        })
        .collect();
    for task in busy {
        task.await.expect("task").expect("query");
    }

    let admin = Store::connect(
        &postgres_url(),
        &StoreOptions {
            max_connections: 1,
            ..Default::default()
        },
    )
    .await
    .expect("connect admin");
    let dropped: Vec<bool> = admin
        .fetch_all(
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(database.as_str()),
            |row| Ok(sqlx::Row::get::<bool, _>(row, 0)),
        )
        .await
        .expect("terminate backends");
    assert!(
        dropped.len() >= POOLED as usize,
        "the server dropped every pooled connection: {dropped:?}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let mut failures = 0;
    for _ in 0..2 * POOLED {
        if store.ping().await.is_err() {
            failures += 1;
        }
    }
    assert!(
        failures <= 1,
        "{failures} statements failed on dropped connections; at most the first may"
    );
    store.ping().await.expect("the pool works again");
}
