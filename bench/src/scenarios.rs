//! The scenarios: muster and its baseline, same client code shape, same
//! run.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use muster_protocol::client::{Next, TokenVia, Ws, open};
use muster_protocol::device::{self, DeviceKey};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A single-host muster in this process, on loopback ports.
pub struct Muster {
    pub running: muster::Running,
    pub url: String,
    pub token: String,
    _dir: tempfile::TempDir,
}

pub async fn start_muster() -> anyhow::Result<Muster> {
    let dir = tempfile::tempdir()?;
    let config = muster::Config {
        data_dir: dir.path().join("data"),
        edge_listen: "127.0.0.1:0".parse()?,
        metrics_listen: "127.0.0.1:0".parse()?,
        ..muster::Config::default()
    };
    let running = muster::start(&config).await?;
    let url = running.endpoints.edge_ws_url.clone().expect("edge");
    let token = running
        .admin_token
        .as_ref()
        .expect("first start")
        .expose()
        .to_owned();
    Ok(Muster {
        running,
        url,
        token,
        _dir: dir,
    })
}

pub fn report(what: &str, unit: &str, baseline: f64, muster: f64, higher_is_better: bool) {
    let ratio = muster / baseline;
    println!(
        "{what}: baseline {baseline:.1} {unit}, muster {muster:.1} {unit}, ratio {ratio:.2}{}",
        if higher_is_better {
            " (muster / baseline, higher is better)"
        } else {
            " (muster / baseline, lower is better)"
        }
    );
}

pub async fn bare_connect(
    url: &str,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "tyrum-v1".parse()?);
    // Nagle off and the read buffer muster's own client uses.
    Ok(tokio_tungstenite::connect_async_with_config(
        request,
        Some(muster_protocol::client::config()),
        true,
    )
    .await?
    .0)
}

/// Runs `n` jobs, `concurrency` at a time; returns jobs per second.
async fn rate<F, Fut>(n: usize, concurrency: usize, job: F) -> anyhow::Result<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let job = Arc::new(job);
    let gate = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await?;
        let job = job.clone();
        tasks.push(tokio::spawn(async move {
            let result = job(i).await;
            drop(permit);
            result
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub async fn handshakes(
    n: usize,
    concurrency: usize,
    without_presence: bool,
    hold: bool,
    role: &str,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        role == "client" || role == "node",
        "--role is client or node"
    );
    let mode = match (without_presence, role) {
        (true, _) => "cli",
        (false, "node") => "node",
        (false, _) => "ui",
    };
    let role = role.to_owned();
    let muster = start_muster().await?;
    let bare = format!("ws://{}/ws", crate::bare::start().await?);
    let keys: Arc<Vec<DeviceKey>> = Arc::new((0..n).map(|_| DeviceKey::generate()).collect());
    // With `hold`, connections stay open until both runs are measured.
    let held: Arc<std::sync::Mutex<Vec<Box<dyn Send>>>> = Default::default();

    let (bare_keys, bare_held) = (keys.clone(), held.clone());
    let baseline = rate(n, concurrency, move |i| {
        let (url, keys, held) = (bare.clone(), bare_keys.clone(), bare_held.clone());
        async move {
            let key = &keys[i];
            let mut ws = bare_connect(&url).await?;
            let text =
                device::transcript(2, "client", &key.device_id(), "c", &device::new_challenge());
            let frame = json!({"pubkey": key.pubkey(), "proof": key.sign(&text), "text": text});
            ws.send(Message::text(frame.to_string())).await?;
            let reply = ws
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("no reply"))??;
            anyhow::ensure!(reply.to_text()? == "ok", "bare verify failed");
            if hold {
                held.lock().expect("held").push(Box::new(ws));
            } else {
                ws.close(None).await?;
            }
            Ok(())
        }
    })
    .await?;
    drop(std::mem::take(&mut *held.lock().expect("held")));

    let (url, token, muster_held, run_role) = (
        muster.url.clone(),
        muster.token.clone(),
        held.clone(),
        role.clone(),
    );
    let measured = rate(n, concurrency, move |i| {
        let (url, token, keys, held, role) = (
            url.clone(),
            token.clone(),
            keys.clone(),
            muster_held.clone(),
            run_role.clone(),
        );
        async move {
            let mut ws = open(&url, &token, TokenVia::Bearer, None).await?;
            ws.try_handshake(&keys[i], &role, json!({ "mode": mode }))
                .await
                .map_err(anyhow::Error::msg)?;
            if hold {
                held.lock().expect("held").push(Box::new(ws));
            } else {
                ws.stream.close(None).await?;
            }
            Ok(())
        }
    })
    .await?;
    drop(std::mem::take(&mut *held.lock().expect("held")));
    println!(
        "handshakes: {n} connections, {concurrency} at a time, role {role}, mode {mode}, {}",
        if hold {
            "held open"
        } else {
            "each closed after its handshake"
        }
    );
    report("handshakes", "per s", baseline, measured, true);
    muster.running.stop().await?;
    Ok(())
}

pub fn micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

pub fn percentiles(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms",
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0
    )
}

pub async fn beacons(seconds: u64, nodes: usize) -> anyhow::Result<()> {
    let run_for = Duration::from_secs(seconds);

    // Baseline: node frames relayed by the bare server to one subscriber.
    let bare = format!("ws://{}/ws", crate::bare::start().await?);
    let mut operator = bare_connect(&bare).await?;
    operator.send(Message::text("subscribe")).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let deadline = Instant::now() + run_for;
    let mut senders = Vec::new();
    for _ in 0..nodes {
        let url = bare.clone();
        senders.push(tokio::spawn(async move {
            let mut ws = bare_connect(&url).await?;
            while Instant::now() < deadline {
                ws.send(Message::text(json!({"sent_us": micros()}).to_string()))
                    .await?;
                ws.next().await;
            }
            anyhow::Ok(())
        }));
    }
    let mut bare_hist = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    while Instant::now() < deadline {
        let Ok(Some(Ok(frame))) =
            tokio::time::timeout(Duration::from_millis(200), operator.next()).await
        else {
            continue;
        };
        let value: serde_json::Value =
            serde_json::from_str(frame.to_text().unwrap_or("{}")).unwrap_or_default();
        if let Some(sent) = value["sent_us"].as_u64() {
            bare_hist.record(micros().saturating_sub(sent))?;
        }
    }
    let bare_rate = bare_hist.len() as f64 / started.elapsed().as_secs_f64();
    for s in senders {
        s.await??;
    }

    // muster: presence.beacon from nodes, presence.upserted at an operator.
    let muster = start_muster().await?;
    let mut operator = open(&muster.url, &muster.token, TokenVia::Bearer, None).await?;
    operator
        .try_handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
        .await
        .map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + run_for;
    let mut senders = Vec::new();
    for _ in 0..nodes {
        let (url, token) = (muster.url.clone(), muster.token.clone());
        senders.push(tokio::spawn(async move {
            let mut ws: Ws = open(&url, &token, TokenVia::Bearer, None).await?;
            ws.try_handshake(&DeviceKey::generate(), "node", json!({"mode": "node"}))
                .await
                .map_err(anyhow::Error::msg)?;
            while Instant::now() < deadline {
                ws.try_call(
                    "presence.beacon",
                    json!({"metadata": {"sent_us": micros()}}),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|e| anyhow::anyhow!("beacon: {e:?}"))?;
            }
            anyhow::Ok(())
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    while Instant::now() < deadline {
        let Next::Json(frame) = operator.next(Duration::from_millis(200)).await else {
            continue;
        };
        if frame["type"] == "presence.upserted"
            && let Some(sent) = frame["payload"]["entry"]["metadata"]["sent_us"].as_u64()
        {
            hist.record(micros().saturating_sub(sent))?;
        }
    }
    let muster_rate = hist.len() as f64 / started.elapsed().as_secs_f64();
    for s in senders {
        s.await??;
    }
    println!("beacons: {nodes} nodes for {seconds} s, each waiting for its answer");
    println!(
        "baseline relay: {bare_rate:.0} per s, {}",
        percentiles(&bare_hist)
    );
    println!(
        "muster beacon -> presence.upserted: {muster_rate:.0} per s, {}",
        percentiles(&hist)
    );
    report("beacons", "per s", bare_rate, muster_rate, true);
    muster.running.stop().await?;
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
}

/// Starts `muster-bench <args>` and returns it with the first line it
/// prints.
async fn child(args: &[&str]) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let first = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("{args:?} printed nothing"))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, first))
}

/// RSS growth of a server process while `n` idle connections are held.
async fn idle_growth(
    server: &tokio::process::Child,
    url: &str,
    token: &str,
    n: usize,
    bare: bool,
) -> anyhow::Result<f64> {
    let pid = server.id().expect("running");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid)?;
    let n_text = n.to_string();
    let mut args = vec!["hold-idle", url, token, n_text.as_str()];
    if bare {
        args.push("--bare");
    }
    let (_holder, ready) = child(&args).await?;
    anyhow::ensure!(ready == "ready", "holder: {ready}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    Ok((after.saturating_sub(before) as f64 * 1024.0) / n as f64)
}

pub async fn idle(n: usize) -> anyhow::Result<()> {
    let (bare, bare_url) = child(&["bare-server"]).await?;
    let baseline = idle_growth(&bare, &bare_url, "-", n, true).await?;
    drop(bare);
    let (server, line) = child(&["serve-muster"]).await?;
    let (url, token) = line
        .split_once(' ')
        .ok_or_else(|| anyhow::anyhow!("serve-muster: {line}"))?;
    let measured = idle_growth(&server, url, token, n, false).await?;
    println!("idle: {n} connections held open by a separate process");
    report(
        "idle RSS per connection",
        "bytes",
        baseline,
        measured,
        false,
    );
    Ok(())
}

/// Keeps reading a held connection, as a live idle client does: the
/// server's pings get their pongs, and whatever arrives is dropped.
fn keep_reading<S>(mut stream: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
}

/// Opens `n` connections (handshaken, for muster), prints `ready`, and
/// holds them until killed.
pub async fn hold_idle(url: &str, token: &str, n: usize, bare: bool) -> anyhow::Result<()> {
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = gate.clone().acquire_owned().await?;
        let (url, token) = (url.to_owned(), token.to_owned());
        tasks.push(tokio::spawn(async move {
            if bare {
                keep_reading(bare_connect(&url).await?);
            } else {
                let mut ws = open(&url, &token, TokenVia::Bearer, None).await?;
                // Idle fleets are devices: nodes, which (unlike operators)
                // receive no presence events for each other's arrivals.
                ws.try_handshake(&DeviceKey::generate(), "node", json!({"mode": "node"}))
                    .await
                    .map_err(anyhow::Error::msg)?;
                keep_reading(ws.stream);
            }
            drop(permit);
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    println!("ready");
    std::future::pending::<()>().await;
    Ok(())
}

/// A muster single host as its own process: prints `<ws url> <token>`.
pub async fn serve_muster() -> anyhow::Result<()> {
    let muster = start_muster().await?;
    println!("{} {}", muster.url, muster.token);
    std::future::pending::<()>().await;
    Ok(())
}
