//! The command line as an operator client of the edge: a WebSocket peer
//! with its own device key, speaking the client protocol like any other.

use std::path::Path;

use anyhow::{Context, bail};
use muster_protocol::client::{TokenVia, Ws, open_request_over, request};
use muster_protocol::device::DeviceKey;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use crate::config::Config;
use crate::serve::Endpoints;

/// The command line's device key, kept in the data directory so that it
/// is one device across runs; made on first use.
pub fn device_key(data_dir: &Path) -> anyhow::Result<DeviceKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("cli-device.key");
    let read = |path: &Path| -> anyhow::Result<Option<DeviceKey>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let seed: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("{} is not a device key", path.display()))?;
        Ok(Some(DeviceKey::from_seed(seed)))
    };
    if let Some(key) = read(&path)? {
        return Ok(key);
    }
    let key = DeviceKey::generate();
    crate::config::create_private_dir(data_dir)?;
    // Written whole under a name of its own, then linked into place: a
    // command starting meanwhile sees no key or the whole key, and of two
    // first runs at once one keeps the other's key.
    // Named by the new key's own id: processes of two machines sharing the
    // directory may have the same pid.
    let tmp = data_dir.join(format!("cli-device.key.{}.tmp", &key.device_id()[..24]));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    writeln!(file, "{}", hex::encode(key.seed()))?;
    file.sync_all()?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read(&path)?.with_context(|| format!("reading {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Where the edge is: `--edge`, else the running single host's endpoints,
/// else the configured listen address.
pub fn edge_url(config: &Config, edge: Option<String>) -> String {
    edge.or_else(|| crate::ctl::running_endpoints::<Endpoints>(config)?.edge_ws_url)
        .unwrap_or_else(|| {
            let scheme = if config.edge_tls_cert.is_some() {
                "wss"
            } else {
                "ws"
            };
            format!("{scheme}://{}/ws", config.edge_listen)
        })
}

/// The operator token: `--token`, else `MUSTER_TOKEN`.
pub fn token(token: Option<String>) -> anyhow::Result<String> {
    match token.or_else(|| std::env::var("MUSTER_TOKEN").ok()) {
        Some(token) if !token.is_empty() => Ok(token),
        _ => bail!("an operator token is needed: --token or MUSTER_TOKEN"),
    }
}

/// How long a call waits for its answer (a listing may be large).
pub const CALL_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// How long opening the edge's `/ws` may take.
const OPEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The socket under an operator connection: plain for `ws://`, TLS for
/// `wss://`.
pub type EdgeStream = Either<TcpStream, TlsStream<TcpStream>>;

/// An operator connection to the edge.
pub type EdgeWs = Ws<EdgeStream>;

/// Where the command line looks for the edge and what it trusts.
pub struct EdgeTarget<'a> {
    /// `--edge`: the edge's WebSocket URL.
    pub url: Option<String>,
    /// `--edge-ca`: PEM certificates that may sign a `wss://` edge's
    /// certificate, besides the public web roots.
    pub ca: Option<&'a Path>,
}

/// The TLS client settings for a `wss://` edge: the public web roots
/// (an edge behind a certificate from a public CA needs nothing more) and
/// the certificates of `ca`, for an edge whose certificate a private CA
/// signed (`muster certs`, say).
fn edge_tls(ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading {}", ca.display()))?;
        if certs.is_empty() {
            bail!("{} holds no PEM certificate", ca.display());
        }
        for cert in certs {
            roots.add(cert).with_context(|| {
                format!("{} holds a certificate that cannot be used", ca.display())
            })?;
        }
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(muster_tls::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // The upgrade is HTTP/1.1; an edge offering h2 as well must not pick it.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// Opens the edge's `/ws` at `url` with `token` as bearer, over TLS when
/// the URL says `wss://`.
pub async fn open_edge(url: &str, token: &str, ca: Option<&Path>) -> anyhow::Result<EdgeWs> {
    let upgrade = request(url, token, TokenVia::Bearer, None)?;
    let uri = upgrade.uri();
    let secure = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => bail!("the edge's URL must start with ws:// or wss://"),
    };
    let host = uri
        .host()
        .context("the edge's URL names no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    // Nagle off: a request written behind another small frame would
    // otherwise wait for the server's delayed ACK.
    tcp.set_nodelay(true)?;
    let stream = if secure {
        let name = rustls_pki_types::ServerName::try_from(host)
            .context("the edge's URL names no valid host for TLS")?;
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(edge_tls(ca)?));
        Either::Right(connector.connect(name, tcp).await.map_err(|e| {
            let hint = if ca.is_none() {
                " (an edge whose certificate a private CA signed needs --edge-ca)"
            } else {
                ""
            };
            anyhow::anyhow!("TLS with the edge failed: {e}{hint}")
        })?)
    } else {
        Either::Left(tcp)
    };
    Ok(open_request_over(stream, upgrade).await?)
}

/// A handshaken operator connection.
pub async fn connect(config: &Config, edge: EdgeTarget<'_>, token: &str) -> anyhow::Result<EdgeWs> {
    let url = edge_url(config, edge.url);
    // The upgrade has no deadline of its own: an edge that takes the
    // connection and never answers (stopped, or a black hole on the way)
    // would hold the command for ever.
    let mut ws = tokio::time::timeout(OPEN_WITHIN, open_edge(&url, token, edge.ca))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {}s", OPEN_WITHIN.as_secs()))
        .and_then(|opened| opened)
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
pub async fn call(ws: &mut EdgeWs, kind: &str) -> anyhow::Result<Value> {
    Ok(call_with_events(ws, kind, CALL_WITHIN).await?.0)
}

/// Calls `kind` and returns its result and the events that arrived before
/// it, or the error it answered.
pub async fn call_with_events(
    ws: &mut EdgeWs,
    kind: &str,
    within: std::time::Duration,
) -> anyhow::Result<(Value, Vec<Value>)> {
    let (reply, events) = ws
        .try_call_with_events(kind, json!({}), within)
        .await
        .map_err(|next| anyhow::anyhow!("no answer to {kind}: {next:?}"))?;
    if reply["ok"] != true {
        bail!(
            "{kind}: {} ({})",
            reply["error"]["message"],
            reply["error"]["code"]
        );
    }
    Ok((reply["result"].clone(), events))
}

/// One presence entry as a line of text. Host, version and address are
/// what peers reported: their control characters are shown escaped, so
/// that none reaches the operator's terminal as a command (clearing it,
/// writing to its clipboard).
pub fn entry_line(entry: &Value) -> String {
    let text = |key: &str| {
        entry[key]
            .as_str()
            .map_or_else(|| "-".to_owned(), printable)
    };
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

/// `text` with its control characters escaped (`\u{1b}`).
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_peers_reported_reaches_the_terminal_escaped() {
        let entry = json!({
            "instance_id": "dev_1",
            "role": "node",
            "host": "lab\u{1b}]52;c;aGk=\u{7}\u{1b}[2J",
            "ip": "10.0.0.1",
        });
        let line = entry_line(&entry);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(
            line.contains("lab\\u{1b}]52;c;aGk=\\u{7}\\u{1b}[2J"),
            "{line}"
        );
        assert_eq!(printable("lab-box"), "lab-box");
    }
}
