//! A real cluster as separate processes (deploy/local-cluster: Postgres,
//! a backplane, the other services, two edges, mTLS between them), driven
//! by real WebSocket clients: events reach peers on every edge, a directed
//! item reaches its device on the edge that holds it, a client and a node
//! whose edge is killed mid-stream resume on the other edge without losing
//! anything (the node's commands follow its device to the other edge), the
//! killed edge's peers leave presence and their topics, and the cluster
//! survives a backplane restart and a Postgres restart with nothing
//! committed around them lost; an edge that could not read what was
//! compacted closes its peers, which learn of the gap when they resume.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use muster_protocol::client::{Next, TokenVia, Ws, open};
use muster_protocol::device::DeviceKey;
use muster_store::outbox::{self, NewItem, Target};
use muster_store::{Store, StoreOptions};
use serde_json::{Value, json};

const TOKEN: &str = "muster_cluster-test-admin-token-0123456789abcdef";
const TENANT: &str = "00000000-0000-4000-8000-000000000000";
const TICK: &str = "muster.test.tick";
const DIRECTED: &str = "muster.test.directed";
const GHOST_TTL_SECS: u64 = 15;

struct Cluster {
    dir: PathBuf,
    status: Value,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/local-cluster")
}

fn run(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(script())
        .args(args)
        .env("MUSTER_CLUSTER_DIR", dir)
        .env("MUSTER_BIN", env!("CARGO_BIN_EXE_muster"))
        .env("MUSTER_ADMIN_TOKEN", TOKEN)
        // Short enough that a killed edge's peers are seen to go within the
        // test, long enough that live ones never are.
        .env("MUSTER_PRESENCE_TTL_SECS", GHOST_TTL_SECS.to_string())
        .output()
        .expect("deploy/local-cluster runs");
    assert!(
        out.status.success(),
        "local-cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Cluster {
    fn up(dir: &Path) -> Cluster {
        run(dir, &["up"]);
        let status = serde_json::from_str(&run(dir, &["status", "--json"])).unwrap();
        Cluster {
            dir: dir.to_owned(),
            status,
        }
    }

    fn edges(&self) -> Vec<String> {
        self.status["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["role"] == "edge")
            .map(|p| p["ws_url"].as_str().unwrap().to_owned())
            .collect()
    }

    fn store_url(&self) -> String {
        self.status["store"].as_str().unwrap().to_owned()
    }

    fn ctl(&self, args: &[&str]) {
        run(&self.dir, args);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failed run shows what each process said last.
        if std::thread::panicking()
            && let Ok(logs) = std::fs::read_dir(self.dir.join("logs"))
        {
            for log in logs.flatten() {
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- {} (last lines)", log.path().display());
                for line in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{line}");
                }
            }
        }
        let _ = Command::new(script())
            .arg("down")
            .env("MUSTER_CLUSTER_DIR", &self.dir)
            .output();
    }
}

async fn peer(url: &str, role: &str, mode: &str) -> (Ws, String) {
    let key = DeviceKey::generate();
    let mut ws = open(url, TOKEN, TokenVia::Bearer, None).await.unwrap();
    ws.handshake(&key, role, json!({"mode": mode})).await;
    (ws, key.device_id())
}

async fn append(store: &Store, item: &NewItem) {
    let mut tx = store.begin().await.unwrap();
    outbox::append(&mut tx, item).await.unwrap();
    store.commit(tx).await.unwrap();
}

/// Appends with retries: the store may be restarting.
async fn append_retrying(store: &Store, item: &NewItem) {
    for _ in 0..100 {
        let attempt = async {
            let mut tx = store.begin().await?;
            outbox::append(&mut tx, item).await?;
            store.commit(tx).await
        };
        if attempt.await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not append after retries");
}

/// Reads `ws` until each of `wanted` has matched a frame, or `within`
/// passes; says which matched. The connection must stay open.
async fn seen_all(ws: &mut Ws, within: Duration, wanted: &[&dyn Fn(&Value) -> bool]) -> Vec<bool> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = vec![false; wanted.len()];
    while seen.contains(&false) && tokio::time::Instant::now() < deadline {
        match ws.next(Duration::from_secs(1)).await {
            Next::Json(frame) => {
                for (seen, wanted) in seen.iter_mut().zip(wanted) {
                    *seen |= wanted(&frame);
                }
            }
            Next::Silent => {}
            ended => panic!("the connection ended: {ended:?}"),
        }
    }
    seen
}

/// Resumes after `last` (which the outbox still holds: no gap); returns
/// the ids of the replayed events of `kind`.
async fn resume(ws: &mut Ws, last: &str, kind: &str) -> Vec<String> {
    let (response, replayed) = ws
        .call_with_events("muster.stream.resume", json!({"last_event_id": last}))
        .await;
    assert_eq!(response["result"]["gap"], false, "{response}");
    replayed
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// A peer's side of an edge kill: reads events of `kind` until `done`
/// says all arrived, or a minute passes, calling `seen` with the count
/// after each; when its edge goes, `reconnect` gives it a connection to
/// the other edge, where it resumes from the last event it saw. Returns
/// the connection it ends with, the ids received and whether it resumed.
async fn follow_across_a_kill<R, Fut>(
    mut ws: Ws,
    kind: &str,
    reconnect: R,
    done: impl Fn(&HashSet<String>) -> bool,
    mut seen: impl FnMut(usize),
) -> (Ws, HashSet<String>, bool)
where
    R: Fn() -> Fut,
    Fut: std::future::Future<Output = Ws>,
{
    let mut received = HashSet::new();
    let mut resumed = false;
    let mut last: Option<String> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(&received) && tokio::time::Instant::now() < deadline {
        match ws.next(Duration::from_secs(1)).await {
            Next::Json(frame) if frame["type"] == kind => {
                let id = frame["event_id"].as_str().unwrap().to_owned();
                last = Some(id.clone());
                received.insert(id);
                seen(received.len());
            }
            Next::Json(_) | Next::Silent => {}
            Next::NotJson(text) => panic!("not JSON from the edge: {text}"),
            Next::Closed(..) | Next::Dropped => {
                ws = reconnect().await;
                let last = last
                    .as_deref()
                    .expect("events arrived before the edge went");
                received.extend(resume(&mut ws, last, kind).await);
                resumed = true;
            }
        }
    }
    (ws, received, resumed)
}

/// Reads `ws` until an event with each of `event_ids` has arrived; fails
/// with the ones missing after `within`.
async fn assert_all_arrive(ws: &mut Ws, event_ids: &[String], within: Duration) {
    let mut missing: HashSet<&str> = event_ids.iter().map(String::as_str).collect();
    let deadline = tokio::time::Instant::now() + within;
    while !missing.is_empty() && tokio::time::Instant::now() < deadline {
        match ws.next(Duration::from_secs(1)).await {
            Next::Json(frame) => {
                if let Some(id) = frame["event_id"].as_str() {
                    missing.remove(id);
                }
            }
            Next::Silent => {}
            ended => panic!("the connection ended: {ended:?}"),
        }
    }
    assert!(missing.is_empty(), "never arrived: {missing:?}");
}

/// The next event of `kind`, if one comes within `within`.
async fn event_of(ws: &mut Ws, kind: &str, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next(left).await {
            Next::Json(frame) if frame["type"] == kind && frame.get("event_id").is_some() => {
                return Some(frame);
            }
            Next::Json(_) => {}
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_processes_delivers_to_every_edge_and_survives_failures() {
    let dir = tempfile::tempdir().unwrap();
    // The postgres user runs the database inside it when tests run as root.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cluster = Cluster::up(&dir.path().join("cluster"));
    let edges = cluster.edges();
    assert_eq!(edges.len(), 2, "{}", cluster.status);
    // Its operator reaches every service by the cluster's directory alone.
    let health = std::process::Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["health", "--json", "--data-dir"])
        .arg(&cluster.dir)
        .env_remove("MUSTER_TLS_DIR")
        .env_remove("MUSTER_TRUST_DOMAIN")
        .output()
        .unwrap();
    let rows: Value = serde_json::from_slice(&health.stdout).unwrap();
    assert!(health.status.success(), "{rows}");
    assert_eq!(rows.as_array().map(Vec::len), Some(6), "{rows}");
    let store = Store::connect(&cluster.store_url(), &StoreOptions::default())
        .await
        .unwrap();

    // An event produced on one edge reaches operators on both.
    let (mut watcher_1, _) = peer(&edges[0], "client", "cli").await;
    let (mut watcher_2, _) = peer(&edges[1], "client", "cli").await;
    let (mut node, node_device) = peer(&edges[1], "node", "node").await;
    let long = Duration::from_secs(10);
    for watcher in [&mut watcher_1, &mut watcher_2] {
        let upserted = event_of(watcher, "presence.upserted", long)
            .await
            .expect("presence.upserted on every edge");
        assert_eq!(upserted["payload"]["entry"]["instance_id"], node_device);
    }

    // A directed item reaches the device on the edge that holds it, and
    // nobody else.
    let mut directed = NewItem::event(TENANT, DIRECTED, json!({"n": 1}));
    directed.target = Some(Target::Device(node_device.clone()));
    append(&store, &directed).await;
    let got = event_of(&mut node, DIRECTED, long)
        .await
        .expect("directed item delivered");
    assert_eq!(got["event_id"], directed.event_id.as_str());
    // Neither the operator on the other edge nor the one on the same edge:
    // each gets a broadcast committed after it, and nothing directed
    // before that (a peer's items arrive in commit order).
    let sentinel = NewItem::event(TENANT, "muster.test.sentinel", json!({}));
    append(&store, &sentinel).await;
    for watcher in [&mut watcher_1, &mut watcher_2] {
        loop {
            match watcher.next(long).await {
                Next::Json(frame) if frame["type"] == "muster.test.sentinel" => break,
                Next::Json(frame) => assert_ne!(frame["type"], DIRECTED, "{frame}"),
                other => panic!("the broadcast never came: {other:?}"),
            }
        }
    }

    // A client on edge 1 follows a stream of events; edge 1 is killed in
    // the middle; the client reconnects to edge 2, resumes from the last
    // event it saw, and ends up with every event committed.
    // The client connects before the first event is produced: items
    // committed before a peer connects are not its to receive.
    let (client, _) = peer(&edges[0], "client", "cli").await;
    // A node on the same edge gets every tenth tick's command, directed at
    // its device; it too reconnects to edge 2 and resumes.
    let mover_key = DeviceKey::generate();
    let mut mover = open(&edges[0], TOKEN, TokenVia::Bearer, None)
        .await
        .unwrap();
    mover
        .handshake(&mover_key, "node", json!({"mode": "node"}))
        .await;
    let producer_store = store.clone();
    let committed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let producing = committed.clone();
    let commands = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let commanding = commands.clone();
    let mover_device = mover_key.device_id();
    let producer = tokio::spawn(async move {
        for n in 0..300 {
            let item = NewItem::event(TENANT, TICK, json!({"n": n}));
            append_retrying(&producer_store, &item).await;
            producing.lock().unwrap().push((n, item.event_id));
            if n % 10 == 0 {
                let mut command = NewItem::event(TENANT, DIRECTED, json!({"n": n}));
                command.target = Some(Target::Device(mover_device.clone()));
                append_retrying(&producer_store, &command).await;
                commanding.lock().unwrap().push(command.event_id);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    // Read until the producer is done and everything it committed arrived,
    // or until a generous deadline (a loaded machine is slow, not lossy).
    let all_arrived = |received: &HashSet<String>| {
        producer.is_finished()
            && committed
                .lock()
                .unwrap()
                .iter()
                .all(|(_, id)| received.contains(id))
    };
    let all_commands = |received: &HashSet<String>| {
        let commands = commands.lock().unwrap();
        commands.len() == 30 && commands.iter().all(|id| received.contains(id))
    };
    let killed = std::cell::Cell::new(false);
    let client_follows = follow_across_a_kill(
        client,
        TICK,
        || async {
            assert!(
                killed.get(),
                "the connection ended before its edge was killed"
            );
            peer(&edges[1], "client", "cli").await.0
        },
        all_arrived,
        |count| {
            if count == 50 && !killed.get() {
                cluster.ctl(&["kill", "edge-1"]);
                killed.set(true);
            }
        },
    );
    let mover_follows = follow_across_a_kill(
        mover,
        DIRECTED,
        || async {
            let mut ws = open(&edges[1], TOKEN, TokenVia::Bearer, None)
                .await
                .unwrap();
            ws.handshake(&mover_key, "node", json!({"mode": "node"}))
                .await;
            ws
        },
        all_commands,
        |_| {},
    );
    let ((mut client, received, resumed), (_mover, commands_received, mover_resumed)) =
        tokio::join!(client_follows, mover_follows);
    assert!(killed.get() && resumed);
    producer.await.unwrap();
    assert!(
        mover_resumed,
        "the node's edge went, so it resumed on the other"
    );
    let commands = commands.lock().unwrap().clone();
    assert_eq!(commands.len(), 30);
    let commands_missing: Vec<_> = commands
        .iter()
        .filter(|id| !commands_received.contains(*id))
        .collect();
    assert!(
        commands_missing.is_empty(),
        "{} of 30 commands never reached the node: {commands_missing:?}",
        commands_missing.len()
    );
    let committed = committed.lock().unwrap().clone();
    let missing: Vec<_> = committed
        .iter()
        .filter(|(_, id)| !received.contains(id))
        .map(|(n, _)| n)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} committed events never reached the client: numbers {missing:?}",
        missing.len(),
        committed.len()
    );

    // A restarted backplane: the edge resubscribes where it stopped, so
    // what was committed while the backplane was down arrives too.
    // A node that connects meanwhile cannot be recorded in the directory:
    // it is turned away (1013 `try again later`) rather than answered and
    // then missing what is directed at it. Once the backplane is back it
    // connects, and an item directed at it finds it.
    cluster.ctl(&["kill", "backplane"]);
    let mut while_down = Vec::new();
    for n in 0..5 {
        let item = NewItem::event(TENANT, TICK, json!({"while": "backplane down", "n": n}));
        append_retrying(&store, &item).await;
        while_down.push(item.event_id);
    }
    let mut turned_away = open(&edges[1], TOKEN, TokenVia::Bearer, None)
        .await
        .unwrap();
    let refused = turned_away
        .try_handshake(&DeviceKey::generate(), "node", json!({"mode": "node"}))
        .await
        .unwrap_err();
    assert!(refused.contains("try again later"), "{refused}");
    cluster.ctl(&["start", "backplane"]);
    // Turned away until the edge reaches the backplane again.
    let (mut unrecorded, unrecorded_device) =
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let key = DeviceKey::generate();
                let mut ws = open(&edges[1], TOKEN, TokenVia::Bearer, None)
                    .await
                    .unwrap();
                if ws
                    .try_handshake(&key, "node", json!({"mode": "node"}))
                    .await
                    .is_ok()
                {
                    return (ws, key.device_id());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await
        .expect("a node connects once the backplane is back");
    let after_restart = NewItem::event(TENANT, TICK, json!({"after": "backplane restart"}));
    append_retrying(&store, &after_restart).await;
    while_down.push(after_restart.event_id);
    assert_all_arrive(&mut client, &while_down, Duration::from_secs(15)).await;
    // Directed items go only where the directory says their device is:
    // one per second until one arrives.
    let mut sent = HashSet::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let mut command = NewItem::event(TENANT, DIRECTED, json!({"to": "unrecorded"}));
            command.target = Some(Target::Device(unrecorded_device.clone()));
            append_retrying(&store, &command).await;
            sent.insert(command.event_id);
            if let Some(got) = event_of(&mut unrecorded, DIRECTED, Duration::from_secs(1)).await {
                return got;
            }
        }
    })
    .await
    .expect("a node connected while the backplane was down gets directed items once it is back");
    assert!(
        sent.contains(found["event_id"].as_str().unwrap()),
        "{found}"
    );

    // A restarted Postgres: the services reconnect and delivery goes on,
    // with nothing committed around the restart lost.
    let mut around = Vec::new();
    for n in 0..5 {
        let item = NewItem::event(TENANT, TICK, json!({"before": "postgres restart", "n": n}));
        append_retrying(&store, &item).await;
        around.push(item.event_id);
    }
    cluster.ctl(&["pg-restart"]);
    let after_pg = NewItem::event(TENANT, TICK, json!({"after": "postgres restart"}));
    append_retrying(&store, &after_pg).await;
    around.push(after_pg.event_id);
    assert_all_arrive(&mut client, &around, Duration::from_secs(20)).await;
    let pong = client.call("ping", json!({})).await;
    assert_eq!(pong["ok"], true);

    // An edge cut off from the backplane for longer than the outbox kept
    // what it had not read: its peers may lack events (a revocation among
    // them would leave connections open), so they are closed to reconnect,
    // and a peer that resumes from before the loss is told of the gap.
    let last_seen = around.last().unwrap().clone();
    cluster.ctl(&["kill", "backplane"]);
    for n in 0..3 {
        let item = NewItem::event(TENANT, TICK, json!({"lost": n}));
        append_retrying(&store, &item).await;
    }
    // What the stopped backplane would have done, then compaction of
    // everything (an outbox at its cap).
    outbox::sequence(&store, 1000).await.unwrap();
    let nothing_kept = outbox::Retention {
        max_items: 0,
        ..muster_backplane::default_retention()
    };
    assert!(outbox::compact(&store, &nothing_kept).await.unwrap() >= 3);
    // A peer whose token was checked before the loss and which arrives
    // after it is closed as well: the loss may have held its revocation.
    let late_key = DeviceKey::generate();
    let mut late = open(&edges[1], TOKEN, TokenVia::Bearer, None)
        .await
        .unwrap();
    let challenged = late
        .init(&late_key, "node", json!({}), Value::Null)
        .await
        .unwrap();
    cluster.ctl(&["start", "backplane"]);
    assert_eq!(client.closed().await, (1013, "events missed".to_owned()));
    let proved = late
        .try_call(
            "connect.proof",
            challenged.proof(&late_key),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        proved,
        Err(Next::Closed(1013, "events missed".to_owned())),
        "a handshake verified before the loss and ending after it"
    );
    let mut client = peer(&edges[1], "client", "cli").await.0;
    let resumed = client
        .call("muster.stream.resume", json!({"last_event_id": last_seen}))
        .await;
    assert_eq!(resumed["result"]["gap"], true, "{resumed}");
    let after_gap = NewItem::event(TENANT, TICK, json!({"after": "gap"}));
    append_retrying(&store, &after_gap).await;
    assert_all_arrive(&mut client, &[after_gap.event_id], long).await;
    drop(client);

    // No ghosts: a peer on edge 1, in instance presence and in a topic that
    // a peer on edge 2 follows, leaves both when edge 1 is killed (the edge
    // stopped refreshing), with `presence.pruned` and a `leave` diff.
    cluster.ctl(&["start", "edge-1"]);
    let mut follower = peer(&edges[1], "client", "cli").await.0;
    let sub = follower
        .call("muster.topic.subscribe", json!({"topic": "ghost-room"}))
        .await;
    assert_eq!(sub["ok"], true, "{sub}");
    let (mut ghost, ghost_device) = peer(&edges[0], "client", "ui").await;
    let tracked = ghost
        .call(
            "muster.topic.track",
            json!({"topic": "ghost-room", "principal": "ghost", "kind": "human"}),
        )
        .await;
    assert_eq!(tracked["ok"], true, "{tracked}");
    // The ghost is in presence and in the topic, as edge 2 sees it (either
    // may come first).
    let seen = seen_all(
        &mut follower,
        long,
        &[
            &|f: &Value| {
                f["type"] == "presence.upserted"
                    && f["payload"]["entry"]["instance_id"] == ghost_device.as_str()
            },
            &|f: &Value| {
                f["type"] == "muster.topic.diff"
                    && f["payload"]["kind"] == "join"
                    && f["payload"]["principal"] == "ghost"
            },
        ],
    )
    .await;
    let (upserted, joined) = (seen[0], seen[1]);
    assert!(
        upserted && joined,
        "the ghost reaches edge 2: upserted {upserted}, joined {joined}"
    );
    cluster.ctl(&["kill", "edge-1"]);
    // Either may come first.
    let seen = seen_all(
        &mut follower,
        Duration::from_secs(GHOST_TTL_SECS * 4),
        &[
            &|f: &Value| {
                f["type"] == "presence.pruned"
                    && f["payload"]["instance_id"] == ghost_device.as_str()
            },
            &|f: &Value| {
                f["type"] == "muster.topic.diff"
                    && f["payload"]["kind"] == "leave"
                    && f["payload"]["principal"] == "ghost"
            },
        ],
    )
    .await;
    let (pruned, left) = (seen[0], seen[1]);
    assert!(pruned, "the killed edge's peer is pruned (left: {left})");
    assert!(left, "the killed edge's topic session leaves");

    // A peer that leaves while presence is down (for less than the TTL,
    // so that nothing expires its edge's sessions) has its session
    // untracked once presence is back: the edge looks for sessions of
    // connections it no longer holds.
    let (mut leaver, _) = peer(&edges[1], "client", "ui").await;
    let tracked = leaver
        .call(
            "muster.topic.track",
            json!({"topic": "ghost-room", "principal": "leaver", "kind": "human"}),
        )
        .await;
    assert_eq!(tracked["ok"], true, "{tracked}");
    let is_diff = |kind: &'static str| {
        move |f: &Value| {
            f["type"] == "muster.topic.diff"
                && f["payload"]["kind"] == kind
                && f["payload"]["principal"] == "leaver"
        }
    };
    assert_eq!(
        seen_all(&mut follower, long, &[&is_diff("join")]).await,
        [true]
    );

    // Without presence, an edge still reports itself, and says presence is
    // what it cannot count.
    cluster.ctl(&["kill", "presence"]);
    let status = follower.call("muster.status", json!({})).await;
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["result"]["presence"], Value::Null, "{status}");
    assert!(
        status["result"]["connections"].as_u64().unwrap() >= 1,
        "{status}"
    );
    let listed = follower.call("muster.presence.list", json!({})).await;
    assert_eq!(listed["ok"], false, "{listed}");
    leaver.stream.close(None).await.unwrap();
    leaver.closed().await;
    cluster.ctl(&["start", "presence"]);
    assert_eq!(
        seen_all(&mut follower, Duration::from_secs(30), &[&is_diff("leave")]).await,
        [true],
        "the session of a peer that left while presence was down leaves"
    );

    // Without identity, a token the edge has not verified lately cannot be
    // checked: 1013, which clients retry, not the final 4001. Once identity
    // is back, the same unknown token is refused with 4001.
    const UNKNOWN: &str = "muster_cluster-test-unknown-token-0123456789abcdef";
    cluster.ctl(&["kill", "identity"]);
    let mut ws = open(&edges[1], UNKNOWN, TokenVia::Bearer, None)
        .await
        .unwrap();
    assert_eq!(ws.closed().await, (1013, "try again later".to_owned()));
    cluster.ctl(&["start", "identity"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut ws = open(&edges[1], UNKNOWN, TokenVia::Bearer, None)
            .await
            .unwrap();
        let closed = ws.closed().await;
        if closed == (4001, "unauthorized".to_owned()) {
            break;
        }
        assert_eq!(closed, (1013, "try again later".to_owned()));
        assert!(
            std::time::Instant::now() < deadline,
            "identity did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    store.close().await;
}
