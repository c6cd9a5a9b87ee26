//! The connection directory seen from peers: a directed item reaches only
//! the device it is for; a connection whose record was dropped is closed
//! with 4004 `conversation expired` at its next frame. On SQLite and on
//! Postgres.

use std::time::Duration;

use muster_e2e::Host;
use muster_e2e::ws::{Next, TokenVia, Ws, open};
use muster_protocol::device::DeviceKey;
use muster_store::outbox::{self, NewItem, Target};
use muster_store::{Store, StoreOptions};
use serde_json::json;

async fn node(host: &Host) -> (Ws, String) {
    let key = DeviceKey::generate();
    let mut ws = open(&host.ws_url(), &host.admin_token(), TokenVia::Bearer, None)
        .await
        .unwrap();
    ws.handshake(&key, "node", json!({"mode": "node"})).await;
    (ws, key.device_id())
}

/// The host's store, opened as a second client of the same database.
async fn store_of(host: &Host) -> Store {
    Store::connect(&host.config.store_url(), &StoreOptions::default())
        .await
        .unwrap()
}

async fn rows_for(store: &Store, device_id: &str) -> i64 {
    sqlx::Row::try_get(
        &sqlx::query("SELECT COUNT(*) FROM connections WHERE device_id = $1")
            .bind(device_id)
            .fetch_one(store.pool())
            .await
            .unwrap(),
        0,
    )
    .unwrap()
}

async fn directory_flow(host: &Host) {
    let store = store_of(host).await;
    let (mut a, device_a) = node(host).await;
    let (mut b, device_b) = node(host).await;
    assert_eq!(rows_for(&store, &device_a).await, 1);
    assert_eq!(rows_for(&store, &device_b).await, 1);

    let mut directed = NewItem::event(
        host.config.default_tenant.clone(),
        "muster.test.directed",
        json!({"n": 1}),
    );
    directed.target = Some(Target::Device(device_a.clone()));
    let mut tx = store.begin().await.unwrap();
    outbox::append(&mut tx, &directed).await.unwrap();
    store.commit(tx).await.unwrap();
    let got = a.event("muster.test.directed").await;
    assert_eq!(got["event_id"], directed.event_id.as_str());
    // B never sees it: after a round trip and a pause, nothing came.
    assert_eq!(b.call("ping", json!({})).await["ok"], true);
    loop {
        match b.next(Duration::from_millis(600)).await {
            Next::Json(frame) => assert_ne!(frame["type"], "muster.test.directed", "{frame}"),
            Next::Silent => break,
            other => panic!("{other:?}"),
        }
    }

    // A closed connection leaves the directory.
    drop(b);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while rows_for(&store, &device_b).await != 0 {
        assert!(tokio::time::Instant::now() < deadline, "record not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The record of A is dropped (as when its edge missed heartbeats for
    // longer than the TTL): after the edge's next heartbeat, A's next
    // frame closes it with 4004.
    sqlx::query("DELETE FROM connections WHERE device_id = $1")
        .bind(&device_a)
        .execute(store.pool())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    a.send(json!({"request_id": "r1", "type": "ping", "payload": {}}))
        .await;
    assert_eq!(a.closed().await, (4004, "conversation expired".to_owned()));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_on_sqlite() {
    let host = Host::start(None).await;
    directory_flow(&host).await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_on_postgres() {
    let url = muster_store::testing::create_postgres_database().await;
    let host = Host::start(Some(url)).await;
    directory_flow(&host).await;
    host.stop().await;
}
