//! Backplane scenarios on Postgres: outbox appends next to raw `pgbench`
//! single-row INSERTs on the same server, in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use muster_store::outbox::{self, NewItem};
use muster_store::{Store, StoreOptions};
use serde_json::json;

/// One row of the baseline table: the outbox's columns and sizes, without
/// muster's code in the way.
const BASELINE_TABLE: &str = "CREATE TABLE bench_rows (\
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tenant_id TEXT NOT NULL, \
    event_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL, payload TEXT NOT NULL, \
    audience_roles TEXT NOT NULL, audience_scopes TEXT NOT NULL, occurred_at_ms BIGINT NOT NULL)";

const BASELINE_INSERT: &str = "INSERT INTO bench_rows (tenant_id, event_id, type, payload, \
    audience_roles, audience_scopes, occurred_at_ms) VALUES ('t1', gen_random_uuid()::text, \
    'bench.appended', '{\"n\": 1}', '[]', '[]', 0);\n";

fn pgbench() -> anyhow::Result<std::path::PathBuf> {
    if let Ok(path) = std::env::var("PGBENCH") {
        return Ok(path.into());
    }
    let mut candidates: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(Result::ok)
                .map(|d| d.path().join("bin/pgbench"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates
        .pop()
        .filter(|p| p.exists())
        .or_else(|| Some("pgbench".into()))
        .ok_or_else(|| anyhow::anyhow!("no pgbench: set PGBENCH"))
}

/// Transactions per second of `script` from `clients` pgbench clients.
fn baseline(url: &str, clients: usize, seconds: u64, script_text: &str) -> anyhow::Result<f64> {
    let script = tempfile::NamedTempFile::new()?;
    std::fs::write(script.path(), script_text)?;
    let out = std::process::Command::new(pgbench()?)
        .args(["-n", "-c", &clients.to_string(), "-j", "2"])
        .args(["-T", &seconds.to_string(), "-f"])
        .arg(script.path())
        .arg(url)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench output: {text}"))
}

/// Items per second from `clients` tasks, each calling `op(client, n)`
/// for n = 1, 2, … until `seconds` are up; a call returns how many items it
/// wrote.
async fn per_second<F, Fut>(clients: usize, seconds: u64, op: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = u64> + Send,
{
    let op = Arc::new(op);
    let written = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (op, written) = (op.clone(), written.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < deadline {
                    n += 1;
                    written.fetch_add(op(client, n).await, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("bench task");
    }
    written.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Items appended per second by `clients` tasks, `batch` items per
/// transaction, while the backplane's sequencer (if running) positions them.
async fn appends(store: &Store, clients: usize, seconds: u64, batch: usize) -> f64 {
    let store = store.clone();
    per_second(clients, seconds, move |_, _| {
        let store = store.clone();
        async move {
            let items: Vec<NewItem> = (0..batch)
                .map(|n| NewItem::event("t1", "bench.appended", json!({"n": n})))
                .collect();
            let mut tx = store.begin().await.expect("begin");
            outbox::append_all(&mut tx, &items).await.expect("append");
            store.commit(tx).await.expect("commit");
            batch as u64
        }
    })
    .await
}

/// Calls per second from `clients` tasks, each call one presence upsert of
/// a new instance (its row and its `presence.upserted` item) through the
/// presence service's writer, as an edge's arrivals go: calls that arrive
/// while a transaction commits share the next one.
async fn presence_upserts(store: &Store, clients: usize, seconds: u64) -> f64 {
    let instances = muster_presence::Instances::new(Arc::new(store.clone()));
    per_second(clients, seconds, move |client, n| {
        let instances = instances.clone();
        async move {
            let entry = muster_presence::InstanceEntry {
                instance_id: format!("bench-{client}-{n}"),
                role: muster_presence::InstanceRole::Node,
                reported_host: "bench".into(),
                reported_ip: "127.0.0.1".into(),
                observed_ip: "127.0.0.1".into(),
                version: "bench".into(),
                mode: "node".into(),
                last_seen_at_ms: 0,
                last_input_seconds: None,
                reason: "connect".into(),
                metadata: json!({}),
                edge_id: "bench".into(),
            };
            instances.upsert("t1", entry).await.expect("upsert");
            1
        }
    })
    .await
}

pub async fn run(
    url: &str,
    clients: usize,
    seconds: u64,
    batch: usize,
    sequencer: bool,
) -> anyhow::Result<()> {
    let name = format!("muster_bench_{}", std::process::id());
    let admin = Store::connect(url, &StoreOptions::default()).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(admin.pool())
        .await?;
    let bench_url = muster_store::testing::with_database(url, &name);
    let store = Store::connect(
        &bench_url,
        &StoreOptions {
            max_connections: clients as u32 + 4,
            ..Default::default()
        },
    )
    .await?;
    store.migrate().await?;
    sqlx::query(BASELINE_TABLE).execute(store.pool()).await?;
    let sequencer = sequencer.then(|| muster_backplane::Outbox::new(Arc::new(store.clone())));

    let bare = baseline(&bench_url, clients, seconds, BASELINE_INSERT)?;
    // Not the goal's baseline: the most a transaction of BEGIN, one
    // INSERT and COMMIT (three round trips) gets, which bounds the first
    // ratio below whatever muster does.
    let bare_tx = baseline(
        &bench_url,
        clients,
        seconds,
        &format!("BEGIN;\n{BASELINE_INSERT}COMMIT;\n"),
    )?;
    let single = appends(&store, clients, seconds, 1).await;
    let batched = appends(&store, clients, seconds, batch).await;
    let shared = presence_upserts(&store, clients, seconds).await;
    println!(
        "appends: {clients} clients, {seconds} s each, Postgres at {url}{}",
        if sequencer.is_some() {
            ""
        } else {
            ", without the sequencer"
        }
    );
    println!(
        "pgbench BEGIN; INSERT; COMMIT: {bare_tx:.1} per s, {:.2} of the single-statement baseline",
        bare_tx / bare
    );
    crate::scenarios::report("appends, one per transaction", "per s", bare, single, true);
    crate::scenarios::report(
        &format!("appends, {batch} per transaction"),
        "items per s",
        bare,
        batched,
        true,
    );
    crate::scenarios::report(
        "appends, one per call through presence's writer (an instance row and its event each)",
        "per s",
        bare,
        shared,
        true,
    );
    store.close().await;
    drop(sequencer);
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(admin.pool())
        .await?;
    admin.close().await;
    Ok(())
}

/// A cluster started by deploy/local-cluster for the run, stopped after.
struct Cluster {
    dir: tempfile::TempDir,
    status: serde_json::Value,
}

const CLUSTER_TOKEN: &str = "muster_bench-cluster-admin-token-0123456789abcdef";

fn local_cluster(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster");
    let bin = std::env::var("MUSTER_BIN").unwrap_or_else(|_| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/release/muster")
            .display()
            .to_string()
    });
    let out = std::process::Command::new(script)
        .args(args)
        .env("MUSTER_CLUSTER_DIR", dir)
        .env("MUSTER_BIN", bin)
        .env("MUSTER_ADMIN_TOKEN", CLUSTER_TOKEN)
        .env("RUST_LOG", "warn")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "local-cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

impl Cluster {
    fn up() -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let state = dir.path().join("cluster");
        local_cluster(&state, &["up"])?;
        let status = serde_json::from_str(&local_cluster(&state, &["status", "--json"])?)?;
        Ok(Cluster { dir, status })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = local_cluster(&self.dir.path().join("cluster"), &["down"]);
    }
}

/// Produces `rate` items per second for `seconds` with `produce`, which
/// returns the moment each committed; returns them by id.
async fn produce<F, Fut>(
    rate: u64,
    seconds: u64,
    produce: F,
) -> std::collections::HashMap<String, u64>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = (String, u64)>,
{
    let mut committed = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..rate * seconds {
        tick.tick().await;
        let (id, at) = produce(n).await;
        committed.insert(id, at);
    }
    committed
}

fn histogram(
    committed: &std::collections::HashMap<String, u64>,
    received: &[(String, u64)],
) -> hdrhistogram::Histogram<u64> {
    let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for (id, at) in received {
        if let Some(sent) = committed.get(id) {
            let _ = h.record(at.saturating_sub(*sent));
        }
    }
    h
}

/// Commit-to-client latency across two edges of a local cluster on
/// Postgres, next to a bare INSERT + NOTIFY seen by a LISTEN connection.
pub async fn latency(rate: u64, seconds: u64) -> anyhow::Result<()> {
    use crate::scenarios::{micros, percentiles};
    use futures::StreamExt;
    use muster_protocol::client::{TokenVia, open};
    use muster_protocol::device::DeviceKey;

    let cluster = Cluster::up()?;
    let store_url = cluster.status["store"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let store = Store::connect(&store_url, &StoreOptions::default()).await?;

    // The baseline: the fastest way to learn about a commit elsewhere.
    sqlx::query(BASELINE_TABLE).execute(store.pool()).await?;
    let mut listener = sqlx::postgres::PgListener::connect(&store_url).await?;
    listener.listen("bench_committed").await?;
    let listening = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut stream = listener.into_stream();
        while let Ok(Some(Ok(n))) =
            tokio::time::timeout(Duration::from_secs(2), stream.next()).await
        {
            seen.push((n.payload().to_owned(), micros()));
        }
        seen
    });
    let bare_store = store.clone();
    let committed = produce(rate, seconds, |_| {
        let store = bare_store.clone();
        async move {
            let id = uuid::Uuid::new_v4().to_string();
            sqlx::query(
                "INSERT INTO bench_rows (tenant_id, event_id, type, payload, audience_roles, \
                 audience_scopes, occurred_at_ms) VALUES ('t1', $1, 'x', '{}', '[]', '[]', 0)",
            )
            .bind(&id)
            .execute(store.pool())
            .await
            .expect("insert");
            let at = micros();
            sqlx::query("SELECT pg_notify('bench_committed', $1)")
                .bind(&id)
                .execute(store.pool())
                .await
                .expect("notify");
            (id, at)
        }
    })
    .await;
    let bare = histogram(&committed, &listening.await?);

    // muster: an operator on each edge receives every event.
    let edges: Vec<String> = cluster.status["processes"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["ws_url"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(edges.len() >= 2, "two edges expected: {}", cluster.status);
    let mut clients = Vec::new();
    for url in &edges {
        let mut ws = open(url, CLUSTER_TOKEN, TokenVia::Bearer, None).await?;
        ws.try_handshake(&DeviceKey::generate(), "client", json!({"mode": "cli"}))
            .await
            .map_err(anyhow::Error::msg)?;
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Ok(Some(Ok(frame))) =
                tokio::time::timeout(Duration::from_secs(3), ws.stream.next()).await
            {
                let at = micros();
                let Ok(text) = frame.to_text() else { continue };
                let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
                    continue;
                };
                if value["type"] == "muster.bench.latency" {
                    seen.push((
                        value["event_id"].as_str().unwrap_or_default().to_owned(),
                        at,
                    ));
                }
            }
            seen
        }));
    }
    let committed = produce(rate, seconds, |n| {
        let store = store.clone();
        async move {
            let item = NewItem::event(
                muster::config::DEFAULT_TENANT,
                "muster.bench.latency",
                json!({"n": n}),
            );
            let mut tx = store.begin().await.expect("begin");
            outbox::append(&mut tx, &item).await.expect("append");
            store.commit(tx).await.expect("commit");
            (item.event_id, micros())
        }
    })
    .await;
    let mut received = Vec::new();
    for client in clients {
        received.extend(client.await?);
    }
    let measured = histogram(&committed, &received);
    println!("latency: {rate} events/s for {seconds} s, two edges of a local cluster on Postgres");
    println!(
        "bare INSERT + NOTIFY -> LISTEN: {} of {} seen, {}",
        bare.len(),
        rate * seconds,
        percentiles(&bare)
    );
    println!(
        "muster commit -> operator on either edge: {} of {} deliveries, {}",
        measured.len(),
        rate * seconds * 2,
        percentiles(&measured)
    );
    crate::scenarios::report(
        "commit-to-client p99",
        "us",
        bare.value_at_quantile(0.99) as f64,
        measured.value_at_quantile(0.99) as f64,
        false,
    );
    store.close().await;
    Ok(())
}
