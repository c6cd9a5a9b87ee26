//! Topic presence over the WebSocket protocol: track, status, expiry,
//! counts and diffs to subscribers, on SQLite and on Postgres.

use std::time::Duration;

use muster_e2e::Host;
use muster_e2e::ws::{TokenVia, Ws, open};
use muster_protocol::device::DeviceKey;
use serde_json::{Value, json};

async fn client(host: &Host) -> Ws {
    let mut ws = open(&host.ws_url(), &host.admin_token(), TokenVia::Bearer, None)
        .await
        .unwrap();
    ws.handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
        .await;
    ws
}

async fn diff(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let event = ws.event("muster.topic.diff").await;
        if event["payload"]["kind"] == kind {
            return event["payload"].clone();
        }
    }
}

/// The next diff of `kind` within `within`, or none.
async fn diff_within(ws: &mut Ws, kind: &str, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next(left).await {
            muster_e2e::ws::Next::Json(frame)
                if frame["type"] == "muster.topic.diff" && frame["payload"]["kind"] == kind =>
            {
                return Some(frame["payload"].clone());
            }
            muster_e2e::ws::Next::Json(_) => {}
            muster_e2e::ws::Next::Silent => return None,
            other => panic!("the connection ended: {other:?}"),
        }
    }
}

async fn topics_flow(host: &Host) {
    let mut watcher = client(host).await;
    let sub = watcher
        .call("muster.topic.subscribe", json!({"topic": "room-1"}))
        .await;
    assert_eq!(sub["ok"], true, "{sub}");

    let mut alice = client(host).await;
    let tracked = alice
        .call(
            "muster.topic.track",
            json!({"topic": "room-1", "principal": "alice", "kind": "human"}),
        )
        .await;
    assert_eq!(
        tracked["result"]["session"]["state"], "available",
        "{tracked}"
    );
    let join = diff(&mut watcher, "join").await;
    assert_eq!(
        (join["principal"].as_str(), join["ekind"].as_str()),
        (Some("alice"), Some("human"))
    );
    // Tracking again is idempotent: no second join.
    let again = alice
        .call(
            "muster.topic.track",
            json!({"topic": "room-1", "principal": "alice", "kind": "human"}),
        )
        .await;
    assert_eq!(
        again["result"]["session"]["since"], tracked["result"]["session"]["since"],
        "{again}"
    );

    let mut bot = client(host).await;
    let tracked = bot.call(
        "muster.topic.track",
        json!({"topic": "room-1", "session": "bot-s", "principal": "bot", "kind": "agent_for", "agent_id": "agent-7"}),
    )
    .await;
    assert_eq!(tracked["ok"], true, "{tracked}");
    let join = diff(&mut watcher, "join").await;
    assert_eq!(
        (join["principal"].as_str(), join["agent_id"].as_str()),
        (Some("bot"), Some("agent-7"))
    );
    // Connected, and answering the edge's pings, until it leaves below.
    let bot = muster_e2e::keep_answering(bot);

    // A session is its device's: another peer that names it can neither
    // take it over, nor set its status, nor untrack it.
    let taken = watcher
        .call(
            "muster.topic.track",
            json!({"topic": "room-1", "session": "bot-s", "principal": "mallory", "kind": "human"}),
        )
        .await;
    assert_eq!(taken["error"]["code"], "forbidden", "{taken}");
    let status = watcher
        .call(
            "muster.topic.status",
            json!({"topic": "room-1", "session": "bot-s", "state": "blocked"}),
        )
        .await;
    assert_eq!(status["error"]["code"], "not_found", "{status}");
    let removed = watcher
        .call(
            "muster.topic.untrack",
            json!({"topic": "room-1", "session": "bot-s"}),
        )
        .await;
    assert_eq!(removed["result"], json!({"removed": false}), "{removed}");
    let listed = watcher
        .call("muster.topic.list", json!({"topic": "room-1"}))
        .await;
    let bot_session = listed["result"]["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session"] == "bot-s")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (
            bot_session["principal"].as_str(),
            bot_session["state"].as_str()
        ),
        (Some("bot"), Some("available")),
        "{listed}"
    );

    let count = watcher
        .call("muster.topic.count", json!({"topic": "room-1"}))
        .await;
    assert_eq!(
        count["result"],
        json!({"total": 2, "humans": 1, "agents": 1})
    );
    let local = watcher
        .call(
            "muster.topic.list",
            json!({"topic": "room-1", "scope": "edge"}),
        )
        .await;
    assert_eq!(local["result"]["sessions"].as_array().unwrap().len(), 2);
    // Pages in session order: "alice"'s session is her connection id,
    // which sorts before "bot-s" only by chance, so both orders are read.
    let first = watcher
        .call("muster.topic.list", json!({"topic": "room-1", "limit": 1}))
        .await;
    let first_page = first["result"]["sessions"].as_array().unwrap().clone();
    assert_eq!(first_page.len(), 1, "{first}");
    assert_eq!(first["result"]["next"], first_page[0]["session"], "{first}");
    let second = watcher
        .call(
            "muster.topic.list",
            json!({"topic": "room-1", "limit": 1, "after": first["result"]["next"]}),
        )
        .await;
    let second_page = second["result"]["sessions"].as_array().unwrap().clone();
    assert_eq!(second_page.len(), 1, "{second}");
    assert!(second["result"].get("next").is_none(), "{second}");
    let mut paged = [&first_page[0]["session"], &second_page[0]["session"]].map(|s| s.as_str());
    paged.sort();
    let mut whole: Vec<_> = listed["result"]["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session"].as_str())
        .collect();
    whole.sort();
    assert_eq!(paged.to_vec(), whole);
    for (kind, payload) in [
        ("muster.topic.list", json!({"topic": "room-1", "limit": 0})),
        (
            "muster.topic.list",
            json!({"topic": "room-1", "limit": 1001}),
        ),
        ("muster.topic.list", json!({"topic": "room-1", "after": ""})),
        (
            "muster.topic.count",
            json!({"topic": "room-1", "after": "a"}),
        ),
        (
            "muster.topic.subscribe",
            json!({"topic": "room-1", "limit": 5}),
        ),
    ] {
        let refused = watcher.call(kind, payload.clone()).await;
        assert_eq!(
            refused["error"]["code"], "invalid_request",
            "{kind} {payload}: {refused}"
        );
    }

    // A status with an expiry, seen as a diff, then returning to available.
    // An hour ahead, so that no delay of a loaded machine makes it past;
    // the test then moves it into the past in the store.
    let until = muster_protocol::format_datetime(muster_store::now_ms() + 3_600_000);
    let busy = alice
        .call(
            "muster.topic.status",
            json!({"topic": "room-1", "state": "busy", "note": "in a call", "until": until}),
        )
        .await;
    assert_eq!(busy["result"]["session"]["state"], "busy", "{busy}");
    let status = diff(&mut watcher, "status").await;
    assert_eq!(
        (status["state"].as_str(), status["note"].as_str()),
        (Some("busy"), Some("in a call"))
    );
    assert_eq!(status["until_ts"], until);
    let store = host.store().await;
    let moved = sqlx::query(
        "UPDATE topic_sessions SET until_ms = $1 WHERE topic = 'room-1' AND until_ms IS NOT NULL",
    )
    .bind(muster_store::now_ms() - 1)
    .execute(store.pool())
    .await
    .unwrap();
    assert_eq!(moved.rows_affected(), 1);
    store.close().await;
    // At presence's next prune round (every 5 s), plus a commit and the
    // way to the edge.
    let expired = diff_within(&mut watcher, "status", Duration::from_secs(20))
        .await
        .expect("the expired status's diff");
    assert_eq!(
        (expired["state"].as_str(), expired["principal"].as_str()),
        (Some("available"), Some("alice"))
    );

    let bad = alice
        .call(
            "muster.topic.status",
            json!({"topic": "room-1", "state": "asleep"}),
        )
        .await;
    assert_eq!(bad["error"]["code"], "invalid_request", "{bad}");
    let bad = alice
        .call(
            "muster.topic.track",
            json!({"topic": "room-1", "principal": "x", "kind": "human", "extra": 1}),
        )
        .await;
    assert_eq!(bad["error"]["code"], "invalid_request", "{bad}");
    let missing = alice
        .call(
            "muster.topic.status",
            json!({"topic": "room-1", "session": "nobody", "state": "busy"}),
        )
        .await;
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");

    // A closed connection leaves: the bot goes, with a leave diff.
    bot.abort();
    let leave = diff(&mut watcher, "leave").await;
    assert_eq!(leave["principal"], "bot");
    let count = watcher
        .call("muster.topic.count", json!({"topic": "room-1"}))
        .await;
    assert_eq!(
        count["result"],
        json!({"total": 1, "humans": 1, "agents": 0})
    );
    // A type of the topic family muster does not have is not a count.
    for payload in [json!({"topic": "room-1"}), json!({})] {
        let unknown = watcher.call("muster.topic.counts", payload).await;
        assert_eq!(
            unknown["error"],
            json!({"code": "unsupported_request", "message": "request not supported"}),
            "{unknown}"
        );
    }

    // Unsubscribed peers get no diffs. A peer's items arrive in commit
    // order, so a diff of a topic it still follows, committed after,
    // arrives after any diff of room-1 would have.
    let sub = watcher
        .call("muster.topic.subscribe", json!({"topic": "room-2"}))
        .await;
    assert_eq!(sub["ok"], true, "{sub}");
    let unsubscribed = watcher
        .call("muster.topic.unsubscribe", json!({"topic": "room-1"}))
        .await;
    assert_eq!(unsubscribed["ok"], true, "{unsubscribed}");
    let untracked = alice
        .call("muster.topic.untrack", json!({"topic": "room-1"}))
        .await;
    assert_eq!(untracked["result"], json!({"removed": true}), "{untracked}");
    let tracked = alice
        .call(
            "muster.topic.track",
            json!({"topic": "room-2", "principal": "alice", "kind": "human"}),
        )
        .await;
    assert_eq!(tracked["ok"], true, "{tracked}");
    loop {
        let diff = watcher.event("muster.topic.diff").await;
        assert_eq!(
            diff["payload"]["topic"], "room-2",
            "a diff of room-1: {diff}"
        );
        if diff["payload"]["kind"] == "join" {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_presence_on_sqlite() {
    let host = Host::start(None).await;
    topics_flow(&host).await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_presence_on_postgres() {
    let url = muster_store::testing::create_postgres_database().await;
    let host = Host::start(Some(url)).await;
    topics_flow(&host).await;
    host.stop().await;
}

// An edge that comes back under its name before presence expired it (its
// refreshes kept coming) leaves no ghosts: the topic sessions of its
// previous run, whose connections are gone, leave at its first refresh.
muster_e2e::on_both_stores! {
    async fn an_edge_back_under_its_name_leaves_no_ghost_sessions(store: Option<String>) {
        let host = Host::start_configured(store, |config| config.edge_id = Some("edge-fixed".into())).await;
        let token = host.admin_token();
        let mut alice = client(&host).await;
        let tracked = alice
            .call(
                "muster.topic.track",
                json!({"topic": "room-9", "principal": "alice", "kind": "human"}),
            )
            .await;
        assert_eq!(tracked["ok"], true, "{tracked}");
        // At shutdown sessions are left to the TTL, for peers that track
        // them again on another edge.
        let (config, dir) = host.stop().await;
        drop(alice);

        let host = Host::start_with(config, dir).await;
        let mut watcher = open(&host.ws_url(), &token, TokenVia::Bearer, None).await.unwrap();
        watcher
            .handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
            .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let count = watcher
                .call("muster.topic.count", json!({"topic": "room-9"}))
                .await;
            if count["result"]["total"] == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the previous run's session is still there: {count}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        host.stop().await;
    }
}

// An edge that presence took for gone (it could not refresh for longer
// than the TTL: a partition, a stalled process) while its peers stayed
// connected: their sessions leave, and come back as they were when the
// edge refreshes again.
muster_e2e::on_both_stores! {
    async fn sessions_come_back_when_an_edge_taken_for_gone_refreshes_again(store: Option<String>) {
        let host = Host::start(store).await;
        let mut watcher = client(&host).await;
        let sub = watcher.call("muster.topic.subscribe", json!({"topic": "room-5"})).await;
        assert_eq!(sub["ok"], true, "{sub}");
        let mut alice = client(&host).await;
        let tracked = alice
            .call("muster.topic.track", json!({"topic": "room-5", "session": "alice-s", "principal": "alice", "kind": "human"}))
            .await;
        assert_eq!(tracked["ok"], true, "{tracked}");
        let busy = alice
            .call("muster.topic.status", json!({"topic": "room-5", "session": "alice-s", "state": "busy", "note": "on a call"}))
            .await;
        assert_eq!(busy["ok"], true, "{busy}");
        // Connected, and answering the edge's pings, while her session
        // goes and comes back.
        let alice = muster_e2e::keep_answering(alice);
        let joined = diff(&mut watcher, "join").await;
        diff(&mut watcher, "status").await;

        // What presence's sweep does to an edge that has not refreshed for
        // the TTL, at once.
        // (A refresh in the same millisecond keeps the edge: once more.)
        let topics = muster_presence::Topics::new(std::sync::Arc::new(host.store().await));
        let mut left = 0;
        for _ in 0..3 {
            left = topics.expire_edges(Duration::ZERO).await.unwrap();
            if left > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(left, 1);
        let left = diff_within(&mut watcher, "leave", Duration::from_secs(5)).await.expect("a leave diff");
        assert_eq!(left["session"], "alice-s");

        let back = diff_within(&mut watcher, "join", Duration::from_secs(15))
            .await
            .expect("the session comes back at the edge's next refresh");
        assert_eq!(
            (back["session"].as_str(), back["since"].clone(), back["state"].as_str(), back["note"].as_str()),
            (Some("alice-s"), joined["since"].clone(), Some("busy"), Some("on a call"))
        );
        let count = watcher.call("muster.topic.count", json!({"topic": "room-5"})).await;
        assert_eq!(count["result"]["total"], 1, "{count}");
        alice.abort();
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn bad_topic_requests_are_refused_and_change_nothing(store: Option<String>) {
        let host = Host::start(store).await;
        let mut peer = client(&host).await;
        let sentinel = peer.call("muster.topic.subscribe", json!({"topic": "sentinel"})).await;
        assert_eq!(sentinel["ok"], true, "{sentinel}");
        let long = "t".repeat(257);
        for (kind, payload) in [
            ("muster.topic.subscribe", json!({"topic": long})),
            ("muster.topic.subscribe", json!({"topic": " "})),
            ("muster.topic.list", json!({"topic": ""})),
            ("muster.topic.track", json!({"topic": "room", "principal": "p", "kind": "robot"})),
            ("muster.topic.track", json!({"topic": "room", "principal": "p", "kind": "human", "session": long})),
            ("muster.topic.untrack", json!({"topic": long})),
            ("muster.topic.status", json!({"topic": "room", "session": "", "state": "busy"})),
            ("muster.topic.status", json!({"topic": "room", "state": "busy", "until": "1970-01-01T00:00:00Z"})),
            ("muster.topic.track", json!({"topic": "ro\0om", "principal": "p", "kind": "human"})),
            // Optional keys are left out, never null.
            ("muster.topic.track", json!({"topic": "room", "principal": "p", "kind": "human", "session": null})),
            ("muster.topic.track", json!({"topic": "room", "principal": "p", "kind": "human", "agent_id": null})),
            ("muster.topic.status", json!({"topic": "room", "state": "busy", "until": null})),
            ("muster.topic.list", json!({"topic": "room", "limit": null})),
            ("muster.topic.count", json!({"topic": "room", "scope": null})),
            // A subscription is to the cluster's diffs, not one edge's.
            ("muster.topic.subscribe", json!({"topic": "room", "scope": "edge"})),
        ] {
            let refused = peer.call(kind, payload).await;
            assert_eq!(refused["error"]["code"], "invalid_request", "{kind}: {refused}");
        }
        // The refused track left the peer unsubscribed: another's join in
        // the topic does not reach it.
        let mut other = client(&host).await;
        let joined = other
            .call("muster.topic.track", json!({"topic": "room", "principal": "q", "kind": "human"}))
            .await;
        assert_eq!(joined["ok"], true, "{joined}");
        no_room_diff_before_sentinel(&mut peer, &mut other, 1).await;
        // A track another device's session refuses is taken back too.
        let held = peer
            .call(
                "muster.topic.track",
                json!({"topic": "room", "principal": "p", "kind": "human", "session": other_session(&mut other).await}),
            )
            .await;
        assert_eq!(held["error"]["code"], "forbidden", "{held}");
        let joined = other
            .call("muster.topic.track", json!({"topic": "room", "session": "second", "principal": "q", "kind": "human"}))
            .await;
        assert_eq!(joined["ok"], true, "{joined}");
        no_room_diff_before_sentinel(&mut peer, &mut other, 2).await;
        host.stop().await;
    }
}

/// `other` joins the topic `sentinel` (which `peer` follows) after what it
/// did in `room`: `peer`'s items arrive in commit order, so a diff of
/// `room` meant for it would come before that join.
async fn no_room_diff_before_sentinel(peer: &mut Ws, other: &mut Ws, n: usize) {
    let session = format!("sentinel-{n}");
    let joined = other
        .call(
            "muster.topic.track",
            json!({"topic": "sentinel", "session": session, "principal": "s", "kind": "human"}),
        )
        .await;
    assert_eq!(joined["ok"], true, "{joined}");
    loop {
        let diff = peer.event("muster.topic.diff").await;
        assert_ne!(diff["payload"]["topic"], "room", "{diff}");
        if diff["payload"]["session"] == session.as_str() {
            return;
        }
    }
}

/// The session id `ws` tracked in `room` (its connection id).
async fn other_session(ws: &mut Ws) -> String {
    let listed = ws.call("muster.topic.list", json!({"topic": "room"})).await;
    listed["result"]["sessions"][0]["session"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_peer_subscribes_to_a_bounded_number_of_topics() {
    let host = Host::start(None).await;
    let mut peer = client(&host).await;
    for n in 0..1000 {
        let ok = peer
            .call("muster.topic.subscribe", json!({"topic": format!("t{n}")}))
            .await;
        assert_eq!(ok["ok"], true, "{ok}");
    }
    // Subscribing again to one it has is no new subscription.
    let again = peer
        .call("muster.topic.subscribe", json!({"topic": "t7"}))
        .await;
    assert_eq!(again["ok"], true, "{again}");
    let full = peer
        .call("muster.topic.subscribe", json!({"topic": "t1000"}))
        .await;
    assert_eq!(full["error"]["code"], "invalid_state", "{full}");
    let track = peer
        .call(
            "muster.topic.track",
            json!({"topic": "t1000", "principal": "p", "kind": "human"}),
        )
        .await;
    assert_eq!(track["error"]["code"], "invalid_state", "{track}");
    // One given back makes room.
    peer.call("muster.topic.unsubscribe", json!({"topic": "t0"}))
        .await;
    let ok = peer
        .call("muster.topic.subscribe", json!({"topic": "t1000"}))
        .await;
    assert_eq!(ok["ok"], true, "{ok}");
    host.stop().await;
}
