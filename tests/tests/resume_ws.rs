//! Stream resume over the WebSocket protocol (`muster.stream.resume`): a
//! peer that comes back names the last event it saw and gets the rest
//! from the outbox, or an explicit gap; never another tenant's events. On
//! SQLite and on Postgres. Also the edge's own resumption of its
//! subscription to the backplane.

use std::collections::HashSet;

use muster_e2e::Host;
use muster_e2e::ws::{TokenVia, Ws, open};
use muster_proto::v1 as pb;
use muster_proto::v1::backplane_client::BackplaneClient;
use muster_protocol::device::DeviceKey;
use muster_store::outbox::{self, NewItem};
use muster_tls::ServiceName;
use serde_json::{Value, json};

async fn peer(host: &Host, token: &str, role: &str, mode: &str) -> Ws {
    peer_with(host, token, role, mode, &DeviceKey::generate()).await
}

async fn peer_with(host: &Host, token: &str, role: &str, mode: &str, key: &DeviceKey) -> Ws {
    let mut ws = open(&host.ws_url(), token, TokenVia::Bearer, None)
        .await
        .unwrap();
    ws.handshake(key, role, json!({"mode": mode})).await;
    ws
}

/// The next `kind` event about `instance_id`.
async fn presence_event(ws: &mut Ws, kind: &str, instance_id: &str) -> Value {
    loop {
        let event = ws.event(kind).await;
        let about = match kind {
            "presence.upserted" => &event["payload"]["entry"]["instance_id"],
            _ => &event["payload"]["instance_id"],
        };
        if about == instance_id {
            return event;
        }
    }
}

fn ids(events: &[Value]) -> HashSet<String> {
    events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn resume_flow(host: &Host) {
    let (_, operator_token) = host.client_token(&["operator.read"]).await;
    let mut operator = peer(host, &operator_token, "client", "cli").await;
    let node_one = peer(host, &host.admin_token(), "node", "node").await;
    let seen = operator.event("presence.upserted").await;
    let last_seen = seen["event_id"].as_str().unwrap().to_owned();
    drop(operator);

    // While the operator is away, a node arrives and leaves.
    let mut watcher = peer(host, &host.admin_token(), "client", "cli").await;
    let two = DeviceKey::generate();
    let node_two = peer_with(host, &host.admin_token(), "node", "node", &two).await;
    let arrived = presence_event(&mut watcher, "presence.upserted", &two.device_id()).await;
    drop(node_two);
    let left = presence_event(&mut watcher, "presence.pruned", &two.device_id()).await;

    let mut back = peer(host, &operator_token, "client", "cli").await;
    let (response, replayed) = back
        .call_with_events("muster.stream.resume", json!({"last_event_id": last_seen}))
        .await;
    assert_eq!(response["ok"], true, "{response}");
    assert_eq!(response["result"]["gap"], false, "{response}");
    let replayed_ids = ids(&replayed);
    assert!(
        !replayed_ids.contains(&last_seen),
        "the named event is not replayed"
    );
    for missed in [&arrived, &left] {
        assert!(
            replayed_ids.contains(missed["event_id"].as_str().unwrap()),
            "{missed} not replayed: {replayed:?}"
        );
    }
    assert_eq!(
        response["result"]["replayed"].as_u64().unwrap() as usize,
        replayed.len()
    );
    // Replayed events are the events as first delivered.
    let again = replayed
        .iter()
        .find(|e| e["event_id"] == arrived["event_id"])
        .unwrap();
    assert_eq!(again, &arrived);

    // An event the outbox no longer holds (or never held): a gap.
    let (gap, replayed) = back
        .call_with_events(
            "muster.stream.resume",
            json!({"last_event_id": "00000000-0000-4000-8000-00000000dead"}),
        )
        .await;
    assert_eq!(gap["result"], json!({"gap": true, "replayed": 0}), "{gap}");
    assert!(replayed.is_empty());

    // Bad payloads are refused and change nothing.
    for bad in [
        json!({}),
        json!({"last_event_id": ""}),
        json!({"last_event_id": 7}),
        json!({"last_event_id": "x", "more": 1}),
    ] {
        let refused = back.call("muster.stream.resume", bad.clone()).await;
        assert_eq!(refused["ok"], false, "{bad}: {refused}");
        assert_eq!(
            refused["error"]["code"], "invalid_request",
            "{bad}: {refused}"
        );
    }

    // Another tenant cannot resume from this tenant's events, and gets
    // none of them.
    let (_, other_token) = host
        .client_token_in("11111111-1111-4111-8111-111111111111", &["operator.read"])
        .await;
    let mut stranger = peer(host, &other_token, "client", "cli").await;
    let (response, replayed) = stranger
        .call_with_events("muster.stream.resume", json!({"last_event_id": last_seen}))
        .await;
    assert_eq!(
        response["result"],
        json!({"gap": true, "replayed": 0}),
        "{response}"
    );
    assert!(replayed.is_empty(), "{replayed:?}");
    drop(node_one);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_sqlite() {
    let host = Host::start(None).await;
    resume_flow(&host).await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_postgres() {
    let url = muster_store::testing::create_postgres_database().await;
    let host = Host::start(Some(url)).await;
    resume_flow(&host).await;
    host.stop().await;
}

/// A resume goes through at most `MAX_REPLAY` (10 000) items after the
/// named event: exactly that many are replayed in full, without a gap; one
/// more, and what is left is a gap.
async fn replay_limit(host: &Host) {
    use muster_store::outbox::{self, NewItem};
    let tenant = host.config.default_tenant.clone();
    let mut live = peer(host, &host.admin_token(), "client", "cli").await;
    let store = host.store().await;
    let items: Vec<NewItem> = (0..10_050)
        .map(|n| NewItem::event(&tenant, "muster.test.filler", json!({ "n": n })))
        .collect();
    let mut tx = store.begin().await.unwrap();
    outbox::append_all(&mut tx, &items).await.unwrap();
    store.commit(tx).await.unwrap();
    // Delivered live, so positioned (on Postgres, after the commit).
    let last = items.last().unwrap().event_id.clone();
    while live.event("muster.test.filler").await["event_id"] != json!(last) {}

    let held = outbox::read_after(&store, &tenant, 0, 100_000)
        .await
        .unwrap();
    store.close().await;
    let exact = &held[held.len() - 10_001].event_id;
    let one_more = &held[held.len() - 10_002].event_id;
    let mut back = peer(host, &host.admin_token(), "client", "cli").await;
    let (response, replayed) = back
        .call_with_events("muster.stream.resume", json!({ "last_event_id": exact }))
        .await;
    assert_eq!(response["result"]["gap"], false, "{response}");
    assert_eq!(replayed.len(), 10_000);
    let (response, replayed) = back
        .call_with_events("muster.stream.resume", json!({ "last_event_id": one_more }))
        .await;
    assert_eq!(response["result"]["gap"], true, "{response}");
    assert!(replayed.len() >= 10_000, "{}", replayed.len());
}

muster_e2e::on_both_stores! {
    async fn replay_limit_on_both_stores(store: Option<String>) {
        let host = Host::start(store).await;
        replay_limit(&host).await;
        host.stop().await;
    }
}

// Pages of large events stay under what a gRPC client decodes: a resume
// over 6 MB of them replays them all.
muster_e2e::on_both_stores! {
    async fn a_resume_replays_events_larger_than_a_grpc_message(store: Option<String>) {
        use muster_store::outbox::{self, NewItem};
        let host = Host::start(store).await;
        let tenant = host.config.default_tenant.clone();
        let mut live = peer(&host, &host.admin_token(), "client", "cli").await;
        let blob = "x".repeat(16_000);
        let items: Vec<NewItem> = (0..400)
            .map(|n| NewItem::event(&tenant, "muster.test.filler", json!({ "n": n, "blob": blob })))
            .collect();
        let store_handle = host.store().await;
        let mut tx = store_handle.begin().await.unwrap();
        outbox::append_all(&mut tx, &items).await.unwrap();
        store_handle.commit(tx).await.unwrap();
        store_handle.close().await;
        let last = items.last().unwrap().event_id.clone();
        while live.event("muster.test.filler").await["event_id"] != json!(last) {}

        let mut back = peer(&host, &host.admin_token(), "client", "cli").await;
        let (response, replayed) = back
            .call_with_events("muster.stream.resume", json!({ "last_event_id": items[0].event_id }))
            .await;
        assert_eq!(response["result"], json!({"gap": false, "replayed": 399}), "{response}");
        assert_eq!(replayed.len(), 399);
        host.stop().await;
    }
}

/// The next item of an edge's subscription, within 10 s.
async fn next_item(stream: &mut tonic::Streaming<pb::OutboxItem>) -> pb::OutboxItem {
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
        .await
        .expect("an item within 10 s")
        .unwrap()
        .expect("the stream goes on")
}

/// Reads the subscription until `event_id` arrives; panics at a gap marker
/// on the way.
async fn until_item(stream: &mut tonic::Streaming<pb::OutboxItem>, event_id: &str) -> i64 {
    loop {
        let item = next_item(stream).await;
        assert!(!item.gap, "an unexpected gap marker at {}", item.position);
        if item.event_id == event_id {
            return item.position;
        }
    }
}

async fn append(store: &muster_store::Store, tenant_id: &str) -> String {
    let item = NewItem::event(tenant_id, "muster.test.tick", json!({}));
    let mut tx = store.begin().await.unwrap();
    outbox::append(&mut tx, &item).await.unwrap();
    store.commit(tx).await.unwrap();
    item.event_id
}

muster_e2e::on_both_stores! {
    // An edge's subscription to the backplane (gRPC over mTLS) that asks
    // to resume: from the head, after a gap marker at the head, when the
    // backplane keeps no progress of its consumer; from its acknowledged
    // position, with no marker, when it does.
    async fn a_resumed_subscription_without_progress_starts_with_a_gap(store: Option<String>) {
        let host = Host::start(store).await;
        let store = host.store().await;
        append(&store, "t-sub").await;
        // On Postgres the backplane positions it after its commit.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let head = loop {
            let head = outbox::head(&store).await.unwrap();
            if head > 0 {
                break head;
            }
            assert!(tokio::time::Instant::now() < deadline, "the item was never positioned");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let mut backplane =
            BackplaneClient::new(host.channel(ServiceName::Backplane, ServiceName::Edge));
        let subscribe = |consumer_id: &str| pb::SubscribeRequest {
            consumer_id: consumer_id.into(),
            resume: true,
            ..Default::default()
        };
        let refused = backplane.subscribe(subscribe(" ")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);

        let mut stream = backplane
            .subscribe(subscribe("edge-fresh"))
            .await
            .unwrap()
            .into_inner();
        let marker = next_item(&mut stream).await;
        assert!(marker.gap, "{marker:?}");
        assert!(marker.position >= head, "{} against {head}", marker.position);
        assert!(marker.event_id.is_empty() && marker.payload_json.is_empty());
        let live = append(&store, "t-sub").await;
        let position = until_item(&mut stream, &live).await;
        drop(stream);

        backplane
            .ack(pb::AckRequest { consumer_id: "edge-fresh".into(), position })
            .await
            .unwrap();
        let after_ack = append(&store, "t-sub").await;
        let mut stream = backplane
            .subscribe(subscribe("edge-fresh"))
            .await
            .unwrap()
            .into_inner();
        // With progress kept, the stream starts with a mark of where it
        // starts and of the head then (what came up to it predates it).
        let start = next_item(&mut stream).await;
        assert!(start.mark && !start.gap, "{start:?}");
        assert_eq!(start.position, position);
        assert!(start.head >= position, "{start:?}");
        assert!(start.event_id.is_empty() && start.payload_json.is_empty());
        assert!(until_item(&mut stream, &after_ack).await > position);
        // An item held back from this subscriber (directed at a device no
        // connection of it holds) is marked, so that its progress passes
        // it; the item itself does not come.
        let mut directed = NewItem::event("t-sub", "muster.test.tick", json!({}));
        directed.target = Some(muster_store::outbox::Target::Device("dev_elsewhere".into()));
        let mut tx = store.begin().await.unwrap();
        outbox::append(&mut tx, &directed).await.unwrap();
        store.commit(tx).await.unwrap();
        let held_back = next_item(&mut stream).await;
        assert!(held_back.mark && held_back.event_id.is_empty(), "{held_back:?}");
        assert!(held_back.position > position, "{held_back:?}");
        let later = append(&store, "t-sub").await;
        assert!(until_item(&mut stream, &later).await > held_back.position);
        // Stopping ends the subscription (which would otherwise hold the
        // shutdown for its whole grace period), telling the edge why.
        host.stop().await;
        let ended = loop {
            match stream.message().await {
                Ok(Some(item)) => assert!(!item.gap && item.event_id != directed.event_id),
                Ok(None) => panic!("the stream ended without saying why"),
                Err(status) => break status,
            }
        };
        assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
        assert_eq!(ended.message(), "the backplane is stopping");
    }
}

muster_e2e::on_both_stores! {
    // Which items are news to an edge's peers is decided by position, not
    // by the producers' clocks: an event whose producer's clock lags the
    // edge's (or that was appended before the edge started and committed
    // after a peer connected) still reaches the peers connected when it
    // commits.
    async fn an_event_stamped_before_the_edge_started_reaches_peers_connected_when_it_commits(store: Option<String>) {
        let host = Host::start(store).await;
        let store = host.store().await;
        let mut operator = peer(&host, &host.admin_token(), "client", "ui").await;
        let item = NewItem::event(&host.config.default_tenant, "muster.test.tick", json!({"clock": "behind"}));
        let mut tx = store.begin().await.unwrap();
        outbox::append(&mut tx, &item).await.unwrap();
        sqlx::query("UPDATE outbox SET occurred_at_ms = occurred_at_ms - 3600000 WHERE event_id = $1")
            .bind(&item.event_id)
            .execute(&mut *tx)
            .await
            .unwrap();
        store.commit(tx).await.unwrap();
        let event = operator.event("muster.test.tick").await;
        assert_eq!(event["event_id"], item.event_id.as_str(), "{event}");
        host.stop().await;
    }
}
