//! The connection directory seen from peers: a directed item reaches only
//! the device it is for; a connection whose record was dropped is closed
//! with 4004 `conversation expired` at the edge's next heartbeat. On
//! SQLite and on Postgres.

use std::time::Duration;

use muster_e2e::Host;
use muster_e2e::ws::{Next, TokenVia, Ws, open};
use muster_protocol::device::DeviceKey;
use muster_store::Store;
use muster_store::outbox::{self, NewItem, Target};
use serde_json::json;

/// A connected node, its device id and its connection id.
async fn node(host: &Host) -> (Ws, String, String) {
    let key = DeviceKey::generate();
    let mut ws = open(&host.ws_url(), &host.admin_token(), TokenVia::Bearer, None)
        .await
        .unwrap();
    let proved = ws.handshake(&key, "node", json!({"mode": "node"})).await;
    let connection_id = proved["client_id"].as_str().unwrap().to_owned();
    (ws, key.device_id(), connection_id)
}

/// The `n` of the next `count` frames of type `kind`, in arrival order.
async fn numbers(ws: &mut Ws, kind: &str, count: usize) -> Vec<i64> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let event = ws.event(kind).await;
        seen.push(event["payload"]["n"].as_i64().unwrap());
    }
    seen
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

/// Drops `device`'s record, as when its edge missed heartbeats for longer
/// than the TTL; the edge's next heartbeat closes its connection `ws` with
/// 4004 `conversation expired` (within `within`), though it sends nothing.
async fn drop_record_then_closed(store: &Store, ws: &mut Ws, device: &str, within: Duration) {
    sqlx::query("DELETE FROM connections WHERE device_id = $1")
        .bind(device)
        .execute(store.writer())
        .await
        .unwrap();
    let closed = loop {
        match ws.next(within).await {
            Next::Json(_) => continue,
            other => break other,
        }
    };
    assert_eq!(closed, Next::Closed(4004, "conversation expired".into()));
}

async fn directory_flow(host: &Host) {
    let store = host.store().await;
    let (mut a, device_a, _) = node(host).await;
    let (mut b, device_b, connection_b) = node(host).await;
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

    // Directed and broadcast items committed together reach each peer in
    // commit order: A gets what is for everyone and for its device, B what
    // is for everyone and for its connection.
    let item = |n: i64, target: Option<Target>| NewItem {
        target,
        ..NewItem::event(
            host.config.default_tenant.clone(),
            "muster.test.mixed",
            json!({"n": n}),
        )
    };
    let items = [
        item(0, None),
        item(1, Some(Target::Device(device_a.clone()))),
        item(2, Some(Target::Connection(connection_b.clone()))),
        item(3, Some(Target::Device("dev_elsewhere".into()))),
        item(4, None),
    ];
    let mut tx = store.begin().await.unwrap();
    outbox::append_all(&mut tx, &items).await.unwrap();
    store.commit(tx).await.unwrap();
    assert_eq!(numbers(&mut a, "muster.test.mixed", 3).await, [0, 1, 4]);
    assert_eq!(numbers(&mut b, "muster.test.mixed", 3).await, [0, 2, 4]);

    // A closed connection leaves the directory.
    drop(b);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while rows_for(&store, &device_b).await != 0 {
        assert!(tokio::time::Instant::now() < deadline, "record not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A record of a connection the edge does not hold (its removal was
    // lost, or it was recorded after the edge stopped waiting): the
    // edge's next heartbeat removes it instead of keeping it alive.
    let edge_id: String = sqlx::Row::try_get(
        &sqlx::query("SELECT edge_id FROM connections WHERE device_id = $1")
            .bind(&device_a)
            .fetch_one(store.pool())
            .await
            .unwrap(),
        0,
    )
    .unwrap();
    sqlx::query(
        "INSERT INTO connections (connection_id, tenant_id, device_id, edge_id, role, \
         connected_at_ms, expires_at_ms) VALUES ('gone', $1, 'dev_gone', $2, 'node', 0, $3)",
    )
    .bind(&host.config.default_tenant)
    .bind(&edge_id)
    .bind(i64::MAX / 2)
    .execute(store.pool())
    .await
    .unwrap();

    // The record of A is dropped (as when its edge missed heartbeats for
    // longer than the TTL, and items directed at A stopped finding it):
    // the edge's next heartbeat closes A with 4004, though A sends nothing.
    // (Heartbeats come every 5 s; a loaded machine may take a while more.)
    drop_record_then_closed(&store, &mut a, &device_a, Duration::from_secs(15)).await;
    // The same heartbeat removes the stale record.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rows_for(&store, "dev_gone").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "stale record kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// The heartbeat's answer lists every record the directory holds for the
/// edge; past gRPC's default 4 MiB (here 120 000 records of 36-byte ids)
/// it is still read, so a dropped record still closes its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_answer_larger_than_a_grpc_message_is_read() {
    let host = Host::start(None).await;
    let store = host.store().await;
    let (mut a, device_a, _) = node(&host).await;
    let edge_id: String = sqlx::Row::try_get(
        &sqlx::query("SELECT edge_id FROM connections WHERE device_id = $1")
            .bind(&device_a)
            .fetch_one(store.pool())
            .await
            .unwrap(),
        0,
    )
    .unwrap();
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 120000) \
         INSERT INTO connections (connection_id, tenant_id, device_id, edge_id, role, connected_at_ms, expires_at_ms) \
         SELECT printf('c-%034d', i), 't', 'dev_bulk', $1, 'node', 0, $2 FROM n",
    )
    .bind(&edge_id)
    .bind(i64::MAX / 2)
    .execute(store.writer())
    .await
    .unwrap();
    drop_record_then_closed(&store, &mut a, &device_a, Duration::from_secs(15)).await;
    store.close().await;
    host.stop().await;
}
