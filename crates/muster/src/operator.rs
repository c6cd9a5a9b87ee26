//! The command line as an operator client of the edge: a WebSocket peer
//! with its own device key, speaking the client protocol like any other.

use std::path::Path;

use anyhow::{Context, bail};
use muster_protocol::client::{TokenVia, Ws, open};
use muster_protocol::device::DeviceKey;
use serde_json::{Value, json};

use crate::config::Config;
use crate::serve::Endpoints;

/// The command line's device key, kept in the data directory so that it
/// is one device across runs; made on first use.
pub fn device_key(data_dir: &Path) -> anyhow::Result<DeviceKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("cli-device.key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let seed: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("{} is not a device key", path.display()))?;
        return Ok(DeviceKey::from_seed(seed));
    }
    let key = DeviceKey::generate();
    crate::config::create_private_dir(data_dir)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{}", hex::encode(key.seed()))?;
    Ok(key)
}

/// Where the edge is: `--edge`, else the running single host's endpoints,
/// else the configured listen address.
pub fn edge_url(config: &Config, edge: Option<String>) -> String {
    edge.or_else(|| {
        let bytes = std::fs::read(config.endpoints_file()).ok()?;
        serde_json::from_slice::<Endpoints>(&bytes)
            .ok()?
            .edge_ws_url
    })
    .unwrap_or_else(|| format!("ws://{}/ws", config.edge_listen))
}

/// The operator token: `--token`, else `MUSTER_TOKEN`.
pub fn token(token: Option<String>) -> anyhow::Result<String> {
    match token.or_else(|| std::env::var("MUSTER_TOKEN").ok()) {
        Some(token) if !token.is_empty() => Ok(token),
        _ => bail!("an operator token is needed: --token or MUSTER_TOKEN"),
    }
}

/// A handshaken operator connection.
pub async fn connect(config: &Config, edge: Option<String>, token: &str) -> anyhow::Result<Ws> {
    let url = edge_url(config, edge);
    let mut ws = open(&url, token, TokenVia::Bearer, None)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let key = device_key(&config.data_dir)?;
    ws.try_handshake(
        &key,
        "client",
        json!({"label": "muster-cli", "mode": "cli"}),
    )
    .await
    .map_err(|e| anyhow::anyhow!("the edge refused the connection ({e}); is the token valid?"))?;
    Ok(ws)
}

/// Calls `kind` and returns its result, or the error it answered.
pub async fn call(ws: &mut Ws, kind: &str) -> anyhow::Result<Value> {
    let reply = ws
        .try_call(kind, json!({}), std::time::Duration::from_secs(30))
        .await
        .map_err(|next| anyhow::anyhow!("no answer to {kind}: {next:?}"))?;
    if reply["ok"] != true {
        bail!(
            "{kind}: {} ({})",
            reply["error"]["message"],
            reply["error"]["code"]
        );
    }
    Ok(reply["result"].clone())
}

/// One presence entry as a line of text.
pub fn entry_line(entry: &Value) -> String {
    let text = |key: &str| entry[key].as_str().unwrap_or("-").to_owned();
    format!(
        "{:<58} {:<8} {:<20} {:<16} {:<8} {}",
        text("instance_id"),
        text("role"),
        text("host"),
        text("ip"),
        text("mode"),
        text("last_seen_at"),
    )
}
