//! The `muster` binary as an operator runs it: first start, health, certs,
//! cluster mode, and SIGTERM in the middle of writes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use muster::Endpoints;
use muster_proto::v1::EnqueueRunRequest;
use muster_proto::v1::execution_client::ExecutionClient;
use muster_tls::{MeshTls, ServiceName};
use sqlx::Row;

const BIN: &str = env!("CARGO_BIN_EXE_muster");

/// A `muster serve` process, killed if a test fails before it stops it,
/// with its stdout banner read to the end.
struct Served {
    child: Child,
    banner: Vec<String>,
}

/// `muster serve` of `data_dir` on ports of its own.
fn serve_command(data_dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .args([
            "serve",
            "--edge-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data_dir);
    command
}

impl Served {
    fn start(data_dir: &Path, extra_env: &[(&str, &str)]) -> Served {
        let mut command = serve_command(data_dir);
        command.envs(extra_env.iter().copied());
        Served::spawn(command)
    }

    fn spawn(mut command: Command) -> Served {
        let mut child = command
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn muster serve");
        let stdout = child.stdout.take().unwrap();
        let mut banner = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read banner");
            let done = line.starts_with("Check the services");
            banner.push(line);
            if done {
                break;
            }
        }
        assert!(
            banner.iter().any(|l| l.starts_with("Check the services")),
            "muster serve exited early: {banner:?}"
        );
        Served { child, banner }
    }

    fn token(&self) -> Option<String> {
        let at = self
            .banner
            .iter()
            .position(|l| l.starts_with("Admin token"))?;
        Some(self.banner[at + 1].trim().to_owned())
    }

    fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "muster did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET of `url` (`http://host:port/path`): the whole
/// response as text.
fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http url");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn muster(args: &[&str], data_dir: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run muster")
}

#[test]
fn first_start_prints_a_token_once_and_every_service_reports_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut served = Served::start(&data, &[]);
    // The store, the keys: for the owner's eyes only.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&data).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
    let token = served.token().expect("first start prints the admin token");
    assert!(token.starts_with("muster_") && token.len() >= 43, "{token}");
    assert!(
        served
            .banner
            .iter()
            .any(|l| l.trim_start().starts_with("clients") && l.contains("ws://127.0.0.1:"))
    );

    let health = muster(&["health", "--json"], &data);
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stdout)
    );
    let rows: serde_json::Value = serde_json::from_slice(&health.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 6);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "serving"),
        "{rows}"
    );

    // Prometheus metrics of the process, including the health checks just made.
    let endpoints: Endpoints =
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap();
    let metrics = http_get(&endpoints.metrics_url);
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("muster_grpc_server_duration_seconds"),
        "{metrics}"
    );

    // The token is stored hashed: its text is nowhere in the data directory.
    let db = std::fs::read(data.join("muster.db")).unwrap();
    let wal = std::fs::read(data.join("muster.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(!bytes.windows(token.len()).any(|w| w == token.as_bytes()));
    }

    served.terminate();
    assert!(served.wait(Duration::from_secs(20)).success());
    let health = muster(&["health"], &data);
    assert!(
        !health.status.success(),
        "health must fail once muster stopped"
    );

    let mut again = Served::start(&data, &[]);
    assert_eq!(again.token(), None, "a restart prints no token");
    again.terminate();
    assert!(again.wait(Duration::from_secs(20)).success());
}

#[test]
fn a_short_operator_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--edge-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("MUSTER_ADMIN_TOKEN", "short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("32 to 4096 characters"));
    assert!(
        !dir.path().join("muster.db").exists(),
        "nothing was written"
    );
}

#[test]
fn a_first_start_that_fails_leaves_the_admin_token_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--edge-listen", "127.0.0.1:0", "--metrics-listen"])
        .arg(taken.local_addr().unwrap().to_string())
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("binding metrics"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Admin token"));

    let mut served = Served::start(dir.path(), &[]);
    assert!(served.token().is_some(), "{:?}", served.banner);
    served.terminate();
    assert!(served.wait(Duration::from_secs(30)).success());
}

#[test]
fn a_chosen_admin_token_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let chosen = "chosen-admin-token-0123456789-abcdefghij";
    let mut served = Served::start(dir.path(), &[("MUSTER_ADMIN_TOKEN", chosen)]);
    assert!(
        served
            .banner
            .iter()
            .any(|l| l.contains("the one MUSTER_ADMIN_TOKEN set")),
        "{:?}",
        served.banner
    );
    assert!(
        !served.banner.iter().any(|l| l.contains(chosen)),
        "{:?}",
        served.banner
    );
    served.terminate();
    assert!(served.wait(Duration::from_secs(30)).success());
}

#[test]
fn a_token_lifetime_of_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["token", "create", "--ttl-seconds", "0"][..],
        &["token", "update", "some-id", "--ttl-seconds", "0"][..],
    ] {
        let out = muster(args, dir.path());
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("0 is not in 1..=31536000"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_writes_leaves_no_half_written_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut served = Served::start(&data, &[]);
    let endpoints: Endpoints =
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap();
    muster_tls::install_crypto_provider();
    let tls = MeshTls::load(
        muster_tls::TlsDir::new(data.join("tls")).files(ServiceName::Ctl),
        "muster.local",
    )
    .unwrap();
    let address = endpoints.services["execution"].clone();

    // Writers enqueue runs as fast as they can, each on its own
    // connection, recording every run the server acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..4 {
        let tls = tls.clone();
        let address = address.clone();
        let stop = stop.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            let mut client = ExecutionClient::new(
                muster_mesh::channel(tls, ServiceName::Execution, &address).unwrap(),
            );
            let mut acknowledged = Vec::new();
            let mut refused = 0;
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let request = EnqueueRunRequest {
                    tenant_id: muster::DEFAULT_TENANT.into(),
                    idempotency_key: format!("w{w}-{n}"),
                    spec_json: r#"{"tool":"echo"}"#.into(),
                };
                match client.enqueue_run(request).await {
                    Ok(run) => {
                        acknowledged.push(run.into_inner().run_id);
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (acknowledged, refused)
        }));
    }
    // Writes under way on every side of the signal.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < 20 {
        assert!(Instant::now() < deadline, "no writes were acknowledged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    served.terminate();
    let status = tokio::task::spawn_blocking(move || {
        let status = served.wait(Duration::from_secs(30));
        drop(served);
        status
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "muster exits cleanly on SIGTERM: {status:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for writer in writers {
        let (acked, failed) = writer.await.unwrap();
        acknowledged.extend(acked);
        refused += failed;
    }
    assert!(!acknowledged.is_empty(), "writes were under way");
    assert!(refused > 0, "writes after shutdown were refused");

    let store = muster_store::Store::open_sqlite(&data.join("muster.db"))
        .await
        .unwrap();
    let count = |sql: &'static str| {
        let store = store.clone();
        async move {
            sqlx::query(sql)
                .fetch_one(store.pool())
                .await
                .unwrap()
                .try_get::<i64, _>(0)
                .unwrap()
        }
    };
    let runs = count("SELECT COUNT(*) FROM runs").await;
    let events = count("SELECT COUNT(*) FROM outbox WHERE type = 'run.queued'").await;
    let orphans = count(
        "SELECT COUNT(*) FROM runs r WHERE NOT EXISTS (SELECT 1 FROM outbox o \
         WHERE o.type = 'run.queued' AND o.payload LIKE '%' || r.run_id || '%')",
    )
    .await;
    assert_eq!(
        runs, events,
        "every run has its event and no event lacks its run"
    );
    assert_eq!(orphans, 0);
    for run_id in &acknowledged {
        let found: i64 = sqlx::query("SELECT COUNT(*) FROM runs WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(store.pool())
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(found, 1, "acknowledged run {run_id} was lost");
    }
    store.close().await;
}

/// `muster serve` for the identity service alone, as a cluster runs it.
fn identity_alone(tls_dir: &Path, trust_domain: &str, data_dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--service", "identity"])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--trust-domain", trust_domain])
        .arg("--tls-dir")
        .arg(tls_dir)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--store")
        .arg(format!(
            "sqlite://{}",
            data_dir.join("identity.db").display()
        ));
    command
}

#[test]
fn a_cluster_service_runs_alone_on_certificates_from_muster_certs() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let data = dir.path().join("data");
    let init = Command::new(BIN)
        .args([
            "certs",
            "init",
            "--trust-domain",
            "prod.example",
            "--days",
            "30",
            "--tls-dir",
        ])
        .arg(&tls)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let inspect = Command::new(BIN)
        .args(["certs", "inspect"])
        .arg(tls.join("identity.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("spiffe://prod.example/service/identity"),
        "{text}"
    );

    // Without a CA, a cluster service refuses to start rather than make one.
    let empty = dir.path().join("empty");
    let refused = identity_alone(&empty, "prod.example", &data)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("muster certs init"));
    assert!(!empty.join("ca.pem").exists());

    let mut served = Served::spawn(identity_alone(&tls, "prod.example", &data));
    let line = served
        .banner
        .iter()
        .find(|l| l.trim_start().starts_with("identity"))
        .expect("identity listed");
    let address = line.split_whitespace().nth(1).unwrap().to_owned();
    assert!(
        !served
            .banner
            .iter()
            .any(|l| l.trim_start().starts_with("edge")),
        "{:?}",
        served.banner
    );

    let out = Command::new(BIN)
        .args([
            "token",
            "create",
            "--scopes",
            "operator.read",
            "--ttl-seconds",
            "3600",
            "--trust-domain",
            "prod.example",
            "--tls-dir",
        ])
        .arg(&tls)
        .env("MUSTER_PEERS__IDENTITY", &address)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("token     muster_"), "{printed}");
    assert!(printed.contains("expires   20"), "{printed}");
    let token_id = printed
        .lines()
        .find_map(|l| l.strip_prefix("token id  "))
        .expect("the token id is printed")
        .to_owned();

    let update = |args: &[&str]| {
        Command::new(BIN)
            .args(["token", "update", &token_id])
            .args(args)
            .args(["--trust-domain", "prod.example", "--tls-dir"])
            .arg(&tls)
            .env("MUSTER_PEERS__IDENTITY", &address)
            .output()
            .unwrap()
    };
    let out = update(&["--scopes", "operator.read,operator.write", "--no-expiry"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.starts_with("updated "), "{printed}");
    assert!(
        printed.contains("operator.read,operator.write"),
        "{printed}"
    );
    assert!(!printed.contains("expires"), "{printed}");
    // A bad change is refused and says why.
    let out = update(&["--scopes", "root"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scope"));

    served.terminate();
    assert!(served.wait(Duration::from_secs(20)).success());
}

/// Lines of a child's stdout, read on a thread so a test can wait for one
/// with a deadline.
fn line_reader(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if wanted(&line) => return line,
            Ok(_) => continue,
            Err(_) => panic!("the expected line never came"),
        }
    }
}

/// SIGTERM with peers connected: every peer gets 1001 `server shutdown`
/// before the process ends (ending the runtime would drop connections
/// whose close is still on its way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_peer_with_1001_before_muster_exits() {
    use muster_protocol::client::{Next, TokenVia, open};
    use muster_protocol::device::DeviceKey;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A drain that stalls would end only at the grace; a clean one well
    // before it.
    let mut served = Served::start(&data, &[("MUSTER_SHUTDOWN_GRACE_SECS", "20")]);
    let token = served.token().unwrap();
    let endpoints: Endpoints =
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap();
    let url = endpoints.edge_ws_url.unwrap();
    let mut peers = Vec::new();
    for n in 0..24 {
        let mut ws = open(&url, &token, TokenVia::Bearer, None).await.unwrap();
        let role = if n % 2 == 0 { "node" } else { "client" };
        ws.handshake(&DeviceKey::generate(), role, serde_json::json!({}))
            .await;
        peers.push(ws);
    }
    served.terminate();
    let terminated = Instant::now();
    let mut closes = Vec::new();
    for ws in &mut peers {
        // Events (presence) may come before the close.
        let close = loop {
            match ws.next(Duration::from_secs(10)).await {
                Next::Json(_) => continue,
                other => break other,
            }
        };
        closes.push(close);
    }
    let status = tokio::task::spawn_blocking(move || served.wait(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let took = terminated.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    for close in closes {
        assert_eq!(close, Next::Closed(1001, "server shutdown".into()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_watch_shows_a_node_connecting_and_leaving_live() {
    watch_a_node_come_and_go(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_watch_shows_the_same_as_lines_for_people() {
    watch_a_node_come_and_go(false).await;
}

/// `muster presence --watch` (with `--json` or as lines for people) while
/// a node connects and leaves.
async fn watch_a_node_come_and_go(json: bool) {
    use muster_protocol::client::{TokenVia, open};
    use muster_protocol::device::DeviceKey;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let served = Served::start(&data, &[]);
    let token = served.token().unwrap();
    let mut args = vec!["presence", "--watch"];
    if json {
        args.push("--json");
    }
    let mut watch = Command::new(BIN)
        .args(&args)
        .arg("--data-dir")
        .arg(&data)
        .env("MUSTER_TOKEN", &token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = line_reader(watch.stdout.take().unwrap());
    // The watch is live once the edge's own gateway entry shows: in the
    // listing, or as its upsert when the edge announced itself after the
    // listing was read.
    if json {
        wait_for_line(&lines, |l| l.contains("\"role\":\"gateway\""));
    } else {
        wait_for_line(&lines, |l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            match fields.as_slice() {
                ["+", _, role, ..] | [_, role, ..] => *role == "gateway",
                _ => false,
            }
        });
    }

    let endpoints: Endpoints =
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap();
    let url = endpoints.edge_ws_url.unwrap();
    let key = DeviceKey::generate();
    let mut node = open(&url, &token, TokenVia::Bearer, None).await.unwrap();
    node.handshake(&key, "node", serde_json::json!({"label": "lab-box"}))
        .await;
    let joined = wait_for_line(&lines, |l| l.contains(&key.device_id()));
    drop(node);
    let left = wait_for_line(&lines, |l| l.contains(&key.device_id()));
    if json {
        assert!(joined.contains("\"reason\":\"connect\""), "{joined}");
        assert!(
            joined.contains("\"type\":\"presence.upserted\""),
            "{joined}"
        );
        let left: serde_json::Value = serde_json::from_str(&left).unwrap();
        assert_eq!(
            left,
            serde_json::json!({"type": "presence.pruned", "instance_id": key.device_id()})
        );
    } else {
        let fields: Vec<&str> = joined.split_whitespace().collect();
        assert_eq!(
            fields[..4],
            ["+", key.device_id().as_str(), "node", "lab-box"],
            "{joined}"
        );
        assert_eq!(left, format!("- {}", key.device_id()));
    }

    // The watcher itself, a cli connection, never showed up in presence.
    let status = Command::new(BIN)
        .args(["status", "--json", "--data-dir"])
        .arg(&data)
        .env("MUSTER_TOKEN", &token)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["presence"]["client"], 0, "{status}");
    assert_eq!(status["presence"]["gateway"], 1, "{status}");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn operator_commands_reach_a_wss_edge_that_the_given_ca_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let init = muster(&["certs", "init"], &data);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let tls = data.join("tls");
    let (cert, key, ca) = (
        tls.join("edge.pem"),
        tls.join("edge.key"),
        tls.join("ca.pem"),
    );
    let served = Served::start(
        &data,
        &[
            ("MUSTER_EDGE_TLS_CERT", cert.to_str().unwrap()),
            ("MUSTER_EDGE_TLS_KEY", key.to_str().unwrap()),
        ],
    );
    let token = served.token().unwrap();
    let endpoints: Endpoints =
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap();
    let listed = endpoints.edge_ws_url.unwrap();
    assert!(listed.starts_with("wss://127.0.0.1:"), "{listed}");
    let by_name = listed.replace("127.0.0.1", "localhost");
    let status_at = |url: Option<&str>, ca_flag: Option<&Path>, ca_env: Option<&Path>| {
        let mut command = Command::new(BIN);
        command.args(["status", "--json"]);
        if let Some(url) = url {
            command.args(["--edge", url]);
        }
        command
            .arg("--data-dir")
            .arg(&data)
            .env("MUSTER_TOKEN", &token)
            .env_remove("MUSTER_EDGE_CA")
            .env("RUST_LOG", "warn");
        if let Some(ca) = ca_flag {
            command.arg("--edge-ca").arg(ca);
        }
        if let Some(ca) = ca_env {
            command.env("MUSTER_EDGE_CA", ca);
        }
        command.output().unwrap()
    };

    let status = |ca_flag: Option<&Path>, ca_env: Option<&Path>| status_at(None, ca_flag, ca_env);

    // At the address the single host lists, and by name.
    for answered in [
        status(Some(&ca), None),
        status(None, Some(&ca)),
        status_at(Some(&by_name), Some(&ca), None),
    ] {
        assert!(
            answered.status.success(),
            "{}",
            String::from_utf8_lossy(&answered.stderr)
        );
        let answered: serde_json::Value = serde_json::from_slice(&answered.stdout).unwrap();
        assert_eq!(answered["presence"]["gateway"], 1, "{answered}");
    }

    // Only the public web roots: the private CA's edge is not trusted.
    let refused = status(None, None);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("TLS with the edge failed"), "{said}");
    assert!(said.contains("--edge-ca"), "{said}");

    // A file that holds no certificate is named as such.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let refused = status(Some(&empty), None);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("holds no PEM certificate"), "{said}");
}

#[test]
fn text_settings_from_the_environment_stay_text_even_when_they_look_like_numbers() {
    let dir = tempfile::tempdir().unwrap();
    for domain in ["42", "007", "true"] {
        let tls = dir.path().join(domain);
        let init = Command::new(BIN)
            .args(["certs", "init", "--tls-dir"])
            .arg(&tls)
            .env("MUSTER_TRUST_DOMAIN", domain)
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "{domain}: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let inspect = Command::new(BIN)
            .args(["certs", "inspect"])
            .arg(tls.join("edge.pem"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&inspect.stdout);
        assert!(
            text.contains(&format!("spiffe://{domain}/service/edge")),
            "{text}"
        );
    }
    // A typed setting still reads its value as a number.
    let refused = Command::new(BIN)
        .args(["certs", "init", "--tls-dir"])
        .arg(dir.path().join("typed"))
        .env("MUSTER_PRESENCE_CAP", "lots")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("PRESENCE_CAP"));
}

#[test]
fn an_endpoints_file_other_users_could_have_written_is_ignored() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shared");
    std::fs::create_dir(&data).unwrap();
    // A stand-in for what another user would point the tools at: the
    // operator's token would go to it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let planted = serde_json::json!({
        "pid": 1,
        "edge_ws_url": format!("ws://{}/ws", listener.local_addr().unwrap()),
        "metrics_url": "http://127.0.0.1:9/metrics",
        "trust_domain": "muster.local",
        "tls_dir": dir.path().join("tls").display().to_string(),
        "services": {},
    });
    std::fs::write(data.join("endpoints.json"), planted.to_string()).unwrap();
    std::fs::set_permissions(
        data.join("endpoints.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let status = || {
        Command::new(BIN)
            .args(["status", "--data-dir"])
            .arg(&data)
            .env("MUSTER_TOKEN", "muster_not-a-real-token-but-long-enough-00")
            // Where nothing listens, so the command ends at once.
            .env("MUSTER_EDGE_LISTEN", "127.0.0.1:9")
            .output()
            .unwrap()
    };
    for (mode, why) in [
        (0o777, "may be written by other users"),
        (0o770, "may be written by other users"),
    ] {
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = status();
        assert!(!out.status.success());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("ignoring") && said.contains(why),
            "{mode:o}: {said}"
        );
        assert_eq!(said.matches("ignoring").count(), 1, "{said}");
        assert!(
            listener
                .accept()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "{mode:o}: the tools went where the file said"
        );
    }
    // The owner's own directory: the file is used.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let accepting = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match listener.accept() {
                // Dropped at once: the command fails instead of waiting.
                Ok(_) => return true,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        false
    });
    let out = status();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("ignoring"));
    assert!(accepting.join().unwrap(), "the file was not used");
}

#[test]
fn certificates_issued_again_keep_the_trust_domain_of_their_directory() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let certs = |args: &[&str], domain: Option<&str>| {
        let mut command = Command::new(BIN);
        command
            .arg("certs")
            .args(args)
            .arg("--tls-dir")
            .arg(&tls)
            .env_remove("MUSTER_TRUST_DOMAIN");
        if let Some(domain) = domain {
            command.env("MUSTER_TRUST_DOMAIN", domain);
        }
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    certs(&["init"], Some("prod.example"));
    // Neither names the domain: both keep the directory's.
    assert_eq!(
        certs(&["issue", "edge"], None).trim(),
        "issued spiffe://prod.example/service/edge"
    );
    let again = certs(&["init"], None);
    assert!(again.contains("using existing CA"), "{again}");
    assert!(
        again.contains("issued spiffe://prod.example/service/identity")
            && !again.contains("muster.local"),
        "{again}"
    );
    // Named, it is the one named.
    assert_eq!(
        certs(&["issue", "ctl"], Some("other.example")).trim(),
        "issued spiffe://other.example/service/ctl"
    );
    // Of two, neither is guessed.
    let mixed = Command::new(BIN)
        .args(["certs", "issue", "edge", "--tls-dir"])
        .arg(&tls)
        .env_remove("MUSTER_TRUST_DOMAIN")
        .output()
        .unwrap();
    assert!(!mixed.status.success());
    assert!(String::from_utf8_lossy(&mixed.stderr).contains("several trust domains"));

    // Options are checked before a CA is made.
    let fresh = dir.path().join("fresh");
    let refused = Command::new(BIN)
        .args(["certs", "init", "--days", "0", "--tls-dir"])
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--days"));
    assert!(!fresh.join("ca.pem").exists());
}

#[test]
fn the_tools_reach_a_host_of_its_own_trust_domain_with_the_data_dir_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut served = Served::start(&data, &[("MUSTER_TRUST_DOMAIN", "dev.example")]);
    let health = muster(&["health"], &data);
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    // A certificate issued again there is of the host's trust domain, and
    // the tools go on reaching it with it.
    let issued = muster(&["certs", "issue", "ctl"], &data);
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&issued.stdout).trim(),
        "issued spiffe://dev.example/service/ctl"
    );
    assert!(muster(&["health"], &data).status.success());
    served.terminate();
    assert!(served.wait(Duration::from_secs(20)).success());
}

#[test]
fn the_tools_reach_a_host_started_with_a_relative_data_dir_from_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = serve_command(Path::new("data"));
    command.current_dir(dir.path());
    let mut served = Served::spawn(command);
    // Run from another directory, naming the host's data directory.
    let health = muster(&["health"], &dir.path().join("data"));
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    served.terminate();
    assert!(served.wait(Duration::from_secs(20)).success());
}

#[test]
fn health_without_certificates_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let said = muster(&["health"], &dir.path().join("none"));
    assert!(!said.status.success());
    let said = String::from_utf8_lossy(&said.stderr);
    assert!(
        said.contains("is muster running with this --data-dir?"),
        "{said}"
    );
    assert_eq!(
        said.matches("No such file or directory").count(),
        1,
        "{said}"
    );
}

#[test]
fn diag_export_writes_a_bundle_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let served = Served::start(&data, &[]);
    let token = served.token().unwrap();
    let out = dir.path().join("bundle.json");
    let export = || {
        Command::new(BIN)
            .args(["diag", "export", "--data-dir"])
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .env("MUSTER_TOKEN", &token)
            .output()
            .unwrap()
    };
    let exported = export();
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(!text.contains(&token), "the bundle holds the token");
    let bundle: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(bundle["health"].as_array().unwrap().len(), 6);
    assert!(bundle["status"]["edge_id"].is_string(), "{bundle}");
    assert!(bundle["presence"]["entries"].is_array(), "{bundle}");
    // The owner's only (it names hosts and addresses), and never written
    // over an existing file.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        !export().status.success(),
        "an existing file was written over"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), text);
    let refused = Command::new(BIN)
        .args(["presence", "--data-dir"])
        .arg(&data)
        .env("MUSTER_TOKEN", "muster_not_a_token")
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

/// A start that waits (here a migration on a lock another session holds)
/// ends on SIGTERM, instead of holding on until the wait does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_a_start_that_waits() {
    let url = muster_store::testing::create_postgres_database().await;
    let store = muster_store::Store::connect(&url, &Default::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--edge-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--store",
        ])
        .arg(&url)
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Until its migration waits for the lock.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "muster's migration never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "muster went on waiting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success(), "a start cut short is not a clean run");
    holder.rollback().await.unwrap();
}

#[test]
fn migrate_logs_as_configured_and_says_when_rust_log_does_not_parse() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["migrate", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "muster=loudest")
        .env("MUSTER_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warning = stderr
        .lines()
        .find(|l| l.contains("RUST_LOG is not a valid filter"))
        .unwrap_or_else(|| panic!("no warning: {stderr}"));
    let line: serde_json::Value = serde_json::from_str(warning).expect("a json log line");
    assert_eq!(line["level"], "WARN");
}
