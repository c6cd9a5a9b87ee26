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
    // Until the backends are gone, a statement could still reach one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = admin
            .fetch_all(
                sqlx::query("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1")
                    .bind(database.as_str()),
                |row| Ok(sqlx::Row::get::<i64, _>(row, 0)),
            )
            .await
            .expect("count backends");
        if left == [0] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left:?} backends outlived their termination"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

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

/// A statement that waits on a lock another session holds is cancelled at
/// the store's statement timeout, with an error that says the store (not
/// the write) failed, and leaves its connection sound; migrations run
/// without the timeout, and the pool's connections keep it after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_stuck_behind_a_lock_is_cancelled_at_the_timeout() {
    let url = create_postgres_database().await;
    let options = StoreOptions {
        max_connections: 2,
        statement_timeout: Some(std::time::Duration::from_millis(300)),
        ..Default::default()
    };
    let store = Store::connect(&url, &options).await.expect("connect");
    store.migrate().await.expect("migrate");
    let setting: Vec<String> = store
        .fetch_all(sqlx::query("SHOW statement_timeout"), |row| {
            Ok(sqlx::Row::get::<String, _>(row, 0))
        })
        .await
        .expect("show");
    assert_eq!(setting, vec!["300ms".to_owned()]);

    // An item to acknowledge: progress stops at the head.
    let mut tx = store.begin().await.expect("begin");
    muster_store::outbox::append(
        &mut tx,
        &muster_store::outbox::NewItem::event("t1", "x", serde_json::json!({})),
    )
    .await
    .expect("append");
    tx.commit().await.expect("commit");
    muster_store::outbox::sequence(&store, 10)
        .await
        .expect("sequence");

    let holder = Store::connect(&url, &StoreOptions::default())
        .await
        .expect("connect holder");
    let mut held = holder.begin().await.expect("begin");
    sqlx::query("LOCK TABLE outbox_consumers IN EXCLUSIVE MODE")
        .execute(&mut *held)
        .await
        .expect("lock");
    // Without the timeout this waits for as long as the lock is held.
    let stuck = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        muster_store::outbox::ack(&store, "edge-a", 1),
    )
    .await
    .expect("the statement ends while the lock is still held");
    let error = stuck.expect_err("the statement was cancelled");
    assert!(!error.is_about_the_write(), "{error}");
    assert!(error.to_string().contains("statement timeout"), "{error}");

    drop(held);
    muster_store::outbox::ack(&store, "edge-a", 1)
        .await
        .expect("the same pool writes once the lock is gone");
    assert_eq!(
        muster_store::outbox::progress(&store, "edge-a")
            .await
            .unwrap(),
        Some(1)
    );
}

/// A store that cannot be reached says why, not that a pool timed out;
/// it is waited for up to the acquire timeout (a server starting beside
/// muster refuses until it listens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_is_reported_with_its_reason() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::time::Instant::now();
    let connected = Store::connect(
        &format!("postgres://muster@127.0.0.1:{port}/muster"),
        &StoreOptions {
            acquire_timeout: std::time::Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    let Err(refused) = connected else {
        panic!("nothing listens there");
    };
    let message = refused.to_string();
    assert!(message.to_lowercase().contains("refused"), "{message}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// A Postgres that starts listening only after muster began to connect
/// (started beside it) is waited for instead of failing the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_that_starts_listening_late_is_waited_for() {
    let url = create_postgres_database().await;
    let parsed = url::Url::parse(&url).unwrap();
    let server = format!(
        "{}:{}",
        parsed.host_str().unwrap(),
        parsed.port().unwrap_or(5432)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Nothing listens on `port` for a second; then a relay to the server.
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let server = server.clone();
            tokio::spawn(async move {
                let mut upstream = tokio::net::TcpStream::connect(server).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    let mut relayed = parsed.clone();
    relayed.set_port(Some(port)).unwrap();
    let store = Store::connect(relayed.as_str(), &StoreOptions::default())
        .await
        .unwrap_or_else(|e| panic!("not waited for: {e}"));
    store.ping().await.unwrap();
}

/// A store printed for debugging names no URL, whose password would go
/// with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_printed_store_names_no_url() {
    let url = create_postgres_database().await;
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .expect("connect");
    let printed = format!("{store:?}");
    assert!(!printed.contains("postgres://"), "{printed}");
    assert!(printed.contains("Postgres"), "{printed}");
    store.close().await;
}
