//! Fanout: one stream of events delivered to many subscribers, next to a
//! bare broadcast loop over the same number of sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use muster_protocol::client::{TokenVia, open};
use muster_protocol::device::DeviceKey;
use muster_store::outbox::{self, NewItem, Target};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::scenarios::{Muster, bare_connect, report, start_muster};

const KIND: &str = "muster.bench.fanout";

/// Counts the frames `is_event` accepts on `stream` until it ends.
fn count<S>(
    mut stream: tokio_tungstenite::WebSocketStream<S>,
    delivered: Arc<AtomicU64>,
    is_event: impl Fn(&str) -> bool + Send + 'static,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        while let Some(Ok(frame)) = stream.next().await {
            if let Ok(text) = frame.to_text()
                && is_event(text)
            {
                delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
}

/// Waits until `delivered` reaches `expected` (or 120 s pass); returns
/// deliveries per second since `started`.
async fn rate(delivered: &AtomicU64, expected: u64, started: Instant) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) < expected {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {expected} deliveries",
            delivered.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(expected as f64 / started.elapsed().as_secs_f64())
}

pub async fn fanout(subscribers: usize, events: usize) -> anyhow::Result<()> {
    let gate = Arc::new(Semaphore::new(64));
    let expected = (subscribers * events) as u64;

    // Baseline: the bare relay broadcasts each published frame to every
    // subscribed socket. The frames are muster's own event frames (Part B
    // envelopes of the same items), so that both deliver the same bytes.
    let bare = format!("ws://{}/ws", crate::bare::start().await?);
    let delivered = Arc::new(AtomicU64::new(0));
    for _ in 0..subscribers {
        let _permit = gate.acquire().await?;
        let mut ws = bare_connect(&bare).await?;
        ws.send(Message::text("subscribe")).await?;
        count(ws, delivered.clone(), |text| text.contains(KIND));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The publisher does not wait for the relay's answers, as muster's
    // producer below does not wait for deliveries.
    let mut publisher = bare_connect(&bare).await?;
    let started = Instant::now();
    for n in 0..events {
        let frame = muster_protocol::envelope::event(
            &uuid::Uuid::new_v4().to_string(),
            KIND,
            muster_store::now_ms(),
            None,
            &json!({"n": n}),
        );
        publisher.feed(Message::text(frame)).await?;
    }
    publisher.flush().await?;
    let baseline = rate(&delivered, expected, started).await?;

    // muster: events appended to the outbox in one transaction (a burst,
    // as the bare publisher's; what is measured is delivery, not commits)
    // reach every operator connected to the edge.
    let muster = start_muster().await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let any_event = |text: &str, _, _| text.contains(KIND);
    connect(
        &muster,
        &gate,
        subscribers,
        "client",
        "cli",
        &delivered,
        any_event,
    )
    .await?;
    let items: Vec<NewItem> = (0..events)
        .map(|n| NewItem::event(muster::DEFAULT_TENANT, KIND, json!({"n": n})))
        .collect();
    println!("fanout: {events} events to {subscribers} subscribers");
    let measured = publish(muster, &items, &delivered, expected).await?;
    report("fanout deliveries", "per s", baseline, measured, true);
    Ok(())
}

/// Connects `peers` peers to muster as `role` in `mode`, each counting the
/// frames that `is_mine(frame, its index, peers)` accepts; returns their
/// device ids.
async fn connect(
    muster: &Muster,
    gate: &Semaphore,
    peers: usize,
    role: &str,
    mode: &str,
    delivered: &Arc<AtomicU64>,
    is_mine: fn(&str, usize, usize) -> bool,
) -> anyhow::Result<Vec<String>> {
    let mut devices = Vec::with_capacity(peers);
    for index in 0..peers {
        let _permit = gate.acquire().await?;
        let key = DeviceKey::generate();
        let mut ws = open(&muster.url, &muster.token, TokenVia::Bearer, None).await?;
        ws.try_handshake(&key, role, json!({"mode": mode}))
            .await
            .map_err(anyhow::Error::msg)?;
        devices.push(key.device_id());
        count(ws.stream, delivered.clone(), move |text| {
            is_mine(text, index, peers)
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(devices)
}

/// Commits `items` in one transaction (a burst, as the bare publisher's;
/// what is measured is delivery, not commits) and returns deliveries per
/// second until `expected` arrived. The items are published when they
/// commit, as the bare publisher's are when they are sent.
async fn publish(
    muster: Muster,
    items: &[NewItem],
    delivered: &AtomicU64,
    expected: u64,
) -> anyhow::Result<f64> {
    let store = muster
        .running
        .store
        .clone()
        .ok_or_else(|| anyhow::anyhow!("a single host has its store"))?;
    let mut tx = store.begin().await?;
    outbox::append_all(&mut tx, items).await?;
    let started = Instant::now();
    store.commit(tx).await?;
    let measured = rate(delivered, expected, started).await?;
    muster.running.stop().await?;
    Ok(measured)
}

/// Directed delivery: `items` items, each for one of `subscribers` nodes in
/// turn, next to the bare relay routing each frame to its one socket.
pub async fn directed(subscribers: usize, items: usize) -> anyhow::Result<()> {
    anyhow::ensure!(subscribers > 0, "directed needs subscribers");
    let gate = Arc::new(Semaphore::new(64));
    let expected = items as u64;

    let bare = format!("ws://{}/ws", crate::bare::start().await?);
    let delivered = Arc::new(AtomicU64::new(0));
    for n in 0..subscribers {
        let _permit = gate.acquire().await?;
        let mut ws = bare_connect(&bare).await?;
        ws.send(Message::text(format!("subscribe s{n}"))).await?;
        count(ws, delivered.clone(), move |text| {
            addressed_to(text, &["n"], n, subscribers)
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut publisher = bare_connect(&bare).await?;
    let started = Instant::now();
    for n in 0..items {
        let to = format!("s{}", n % subscribers);
        publisher
            .feed(Message::text(json!({"n": n, "to": to}).to_string()))
            .await?;
    }
    publisher.flush().await?;
    let baseline = rate(&delivered, expected, started).await?;
    exactly(&delivered, expected).await?;

    // muster: the items, committed in one transaction, go through the
    // backplane's directory lookups and the edge's routing by device.
    let muster = start_muster().await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let mine = |text: &str, index, peers| {
        text.contains(KIND) && addressed_to(text, &["payload", "n"], index, peers)
    };
    let devices = connect(
        &muster,
        &gate,
        subscribers,
        "node",
        "node",
        &delivered,
        mine,
    )
    .await?;
    let directed: Vec<NewItem> = (0..items)
        .map(|n| NewItem {
            target: Some(Target::Device(devices[n % subscribers].clone())),
            ..NewItem::event(muster::DEFAULT_TENANT, KIND, json!({"n": n}))
        })
        .collect();
    println!("directed: {items} items, each to one of {subscribers} nodes");
    let measured = publish(muster, &directed, &delivered, expected).await?;
    exactly(&delivered, expected).await?;
    report("directed deliveries", "per s", baseline, measured, true);
    Ok(())
}

/// Whether a frame's item number (at `path`) makes it the `index`th
/// subscriber's: item n goes to subscriber n mod `subscribers`. A frame
/// routed to the wrong socket is not counted, so the run cannot finish.
fn addressed_to(text: &str, path: &[&str], index: usize, subscribers: usize) -> bool {
    let Ok(frame) = serde_json::from_str::<serde_json::Value>(text) else {
        return false;
    };
    let n = path.iter().fold(&frame, |value, key| &value[*key]);
    n.as_u64()
        .is_some_and(|n| n as usize % subscribers == index)
}

/// Fails if more than `expected` deliveries arrive (duplicates) within a
/// moment after the last expected one.
async fn exactly(delivered: &AtomicU64, expected: u64) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = delivered.load(Ordering::Relaxed);
    anyhow::ensure!(seen == expected, "{seen} deliveries of {expected}");
    Ok(())
}
