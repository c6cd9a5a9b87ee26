//! Configuration, layered: built-in defaults, then a TOML file (`--config`
//! or `MUSTER_CONFIG`), then `MUSTER_*` environment variables, then
//! command-line flags. See docs/configuration.md.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use muster_tls::{ServiceName, TlsDir};
use serde::{Deserialize, Serialize};

/// The tenant of a single host, and of every request that names none.
pub const DEFAULT_TENANT: &str = "00000000-0000-4000-8000-000000000000";

/// No flags: the layers below the command line only.
#[derive(Debug, Serialize)]
pub struct NoFlags {}

/// The shortest presence lifetime: two of the edges' 5 s refreshes.
pub const MIN_PRESENCE_TTL_SECS: u64 = 10;
/// A day: entries are refreshed every 5 s, so a longer lifetime only keeps
/// the entries of peers that are gone.
pub const MAX_PRESENCE_TTL_SECS: u64 = 86_400;
pub const MAX_PRESENCE_CAP: usize = 1_000_000;

/// The edge's frame limit by default: Part B's (Tyrum nodes return
/// screenshots in `task.execute` results). Every byte of a frame is held
/// until it is whole, so an operator may lower it.
pub const DEFAULT_MAX_FRAME_BYTES: usize = muster_protocol::MAX_PAYLOAD_BYTES;
/// Below this, a `connect.init` with many capabilities might not fit.
const MIN_MAX_FRAME_BYTES: usize = 64 * 1024;
/// Tyrum's own limit (`ws` 8.x's default): no Tyrum client sends more.
const MAX_MAX_FRAME_BYTES: usize = muster_protocol::MAX_PAYLOAD_BYTES;

/// Every setting of a muster process.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where single-host muster keeps its SQLite file, CA and runtime files.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://…`; default: `<data_dir>/muster.db`.
    pub store: Option<String>,
    /// The SPIFFE trust domain of every certificate.
    pub trust_domain: String,
    /// Postgres: how long a statement may run (lock waits included)
    /// before the server cancels it; 0 keeps the server's setting.
    pub store_statement_timeout_secs: u64,
    /// CA and principal certificates; default: `<data_dir>/tls`.
    pub tls_dir: Option<PathBuf>,
    /// Where the edge listens for clients.
    pub edge_listen: SocketAddr,
    /// Where a single service listens for gRPC in cluster mode; a single
    /// host gives every service an ephemeral loopback port.
    pub grpc_listen: Option<SocketAddr>,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_listen: SocketAddr,
    /// Where the other services are (`identity = "muster-identity:7443"`),
    /// for cluster mode and the command-line tools.
    pub peers: BTreeMap<String, String>,
    /// The services this process runs; empty: all of them. A list, or one
    /// string of comma-separated names (as an environment variable gives it).
    #[serde(deserialize_with = "one_or_many")]
    pub services: Vec<String>,
    pub default_tenant: String,
    /// How often certificate files are re-read.
    pub cert_reload_secs: u64,
    /// How long in-flight work may take to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// `auto`, `text` or `json`.
    pub log_format: String,
    /// The initial admin token, when an operator chooses it (32+ chars).
    pub admin_token: Option<String>,
    /// Whether `cli` connections (the command line) appear in instance
    /// presence.
    pub presence_include_cli: bool,
    /// How long an instance presence entry lives without a refresh, and
    /// how long an edge's topic sessions outlive its last refresh.
    pub presence_ttl_secs: u64,
    /// The most instance presence entries per tenant (oldest pruned first).
    pub presence_cap: usize,
    /// The edge's name: the consumer its backplane progress is kept under
    /// and the owner of its connections in the directory. Unset: a new
    /// random id at every start.
    pub edge_id: Option<String>,
    /// Serve plain `ws://` on a non-loopback address (behind a proxy that
    /// terminates TLS). Off: such an edge refuses to start.
    pub edge_allow_plaintext: bool,
    /// The largest frame a peer may send; larger ones close 1009.
    pub edge_max_frame_bytes: usize,
    /// Upgrades one address may ask for per minute; 0: no limit.
    pub edge_upgrades_per_ip_per_minute: u32,
    /// Proxies in front of the edge (addresses or networks) whose
    /// forwarding header names the client: a list, or one string of
    /// comma-separated entries (as an environment variable gives it).
    #[serde(deserialize_with = "one_or_many")]
    pub edge_trusted_proxies: Vec<String>,
    /// The header those proxies write: `x-forwarded-for`, `forwarded` or
    /// `x-real-ip`.
    pub edge_forwarded_header: String,
    /// Connections from the trusted proxies start with a PROXY protocol
    /// header (version 1 or 2), as load balancers that pass TCP through
    /// send it; one without is dropped.
    pub edge_proxy_protocol: bool,
    /// The edge's own certificate and key (PEM): with both set it serves
    /// `wss://`, taking client certificates from the mesh CA optionally.
    pub edge_tls_cert: Option<PathBuf>,
    pub edge_tls_key: Option<PathBuf>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("store", &self.store.as_deref().map(redact_url))
            .field("trust_domain", &self.trust_domain)
            .field("tls_dir", &self.tls_dir)
            .field("edge_listen", &self.edge_listen)
            .field("grpc_listen", &self.grpc_listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("peers", &self.peers)
            .field("services", &self.services)
            .field("default_tenant", &self.default_tenant)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("muster-data"),
            store: None,
            trust_domain: "muster.local".into(),
            tls_dir: None,
            edge_listen: "127.0.0.1:8787".parse().expect("static address"),
            grpc_listen: None,
            metrics_listen: "127.0.0.1:9464".parse().expect("static address"),
            peers: BTreeMap::new(),
            services: Vec::new(),
            default_tenant: DEFAULT_TENANT.into(),
            cert_reload_secs: 10,
            shutdown_grace_secs: 30,
            store_statement_timeout_secs: muster_store::DEFAULT_STATEMENT_TIMEOUT.as_secs(),
            log_format: "auto".into(),
            admin_token: None,
            presence_include_cli: false,
            presence_ttl_secs: 60,
            presence_cap: 500,
            edge_id: None,
            edge_allow_plaintext: false,
            edge_max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            edge_upgrades_per_ip_per_minute: 0,
            edge_trusted_proxies: Vec::new(),
            edge_forwarded_header: "x-forwarded-for".into(),
            edge_proxy_protocol: false,
            edge_tls_cert: None,
            edge_tls_key: None,
        }
    }
}

/// Keys read from `MUSTER_*` variables as typed values (numbers, booleans,
/// lists, addresses); with [`ENV_TEXT_KEYS`], every key the environment
/// sets (`MUSTER_PEERS__IDENTITY` sets `peers.identity`). Other `MUSTER_*`
/// variables are not configuration.
const ENV_KEYS: &[&str] = &[
    "store_statement_timeout_secs",
    "edge_listen",
    "grpc_listen",
    "metrics_listen",
    "services",
    "cert_reload_secs",
    "shutdown_grace_secs",
    "presence_include_cli",
    "presence_ttl_secs",
    "presence_cap",
    "edge_allow_plaintext",
    "edge_max_frame_bytes",
    "edge_upgrades_per_ip_per_minute",
    "edge_trusted_proxies",
    "edge_proxy_protocol",
];

/// Keys whose `MUSTER_*` values are text as they stand: figment reads an
/// environment value that looks like a number or a boolean as one, which
/// a text setting refuses (`MUSTER_EDGE_ID=1`), or worse would take in
/// another spelling (`007`).
const ENV_TEXT_KEYS: &[&str] = &[
    "data_dir",
    "store",
    "trust_domain",
    "tls_dir",
    "peers",
    "default_tenant",
    "log_format",
    "admin_token",
    "edge_id",
    "edge_forwarded_header",
    "edge_tls_cert",
    "edge_tls_key",
];

/// `MUSTER_*` variables with their values kept as strings.
struct TextEnv(Env);

impl figment::Provider for TextEnv {
    fn metadata(&self) -> figment::Metadata {
        self.0.metadata()
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        use figment::value::{Dict, Value};
        fn insert(dict: &mut Dict, path: &[&str], value: String) {
            match path {
                [] => {}
                [last] => {
                    dict.insert((*last).to_owned(), Value::from(value));
                }
                [first, rest @ ..] => {
                    let entry = dict
                        .entry((*first).to_owned())
                        .or_insert_with(|| Value::from(Dict::new()));
                    if !matches!(entry, Value::Dict(..)) {
                        *entry = Value::from(Dict::new());
                    }
                    if let Value::Dict(_, inner) = entry {
                        insert(inner, rest, value);
                    }
                }
            }
        }
        let mut dict = Dict::new();
        for (key, value) in self.0.iter() {
            let path: Vec<&str> = key.as_str().split('.').collect();
            insert(&mut dict, &path, value);
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

/// A list, or a string of comma-separated entries.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(joined) => joined
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(str::to_owned)
            .collect(),
        OneOrMany::Many(entries) => entries,
    })
}

/// A URL with any password replaced, for logs: in the user part (read as
/// the store's driver reads it, up to the last `@`) and in the query
/// (`password`, `sslpassword`). One that does not parse is not shown.
pub fn redact_url(raw: &str) -> String {
    const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];
    // The user part is cut from the text itself, not from a parsed URL: a
    // parser ends it at the first `/`, `?` or `#`, so a password holding
    // one would be read as a host, path, query or fragment and shown.
    // Query secrets first, in the text: an `@` in one would otherwise be
    // taken for the end of the user part, and what follows it shown.
    let unqueried = mask_query_secrets(raw, &SECRET_KEYS);
    let raw = unqueried.as_str();
    let masked;
    let raw = match raw.split_once("://") {
        Some((scheme, rest)) => match rest.rfind('@') {
            Some(at) if rest[..at].contains(':') => {
                let user = rest[..at].split(':').next().unwrap_or_default();
                masked = format!("{scheme}://{user}:***@{}", &rest[at + 1..]);
                masked.as_str()
            }
            _ => raw,
        },
        None => raw,
    };
    let Ok(mut url) = url::Url::parse(raw) else {
        let scheme = raw.split_once(':').map_or("", |(scheme, _)| scheme);
        return format!("{scheme}:(a URL that does not parse, not shown)");
    };
    if url.password().is_some() {
        // Fails only for URLs without a host, which have no password.
        let _ = url.set_password(Some("***"));
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let secret = SECRET_KEYS.iter().any(|s| key.eq_ignore_ascii_case(s));
                let value = if secret {
                    "***".into()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// `raw` with the value of every `?key=` or `&key=` of `keys` (any case)
/// replaced by `***`, up to the next `&` or `#`.
fn mask_query_secrets(raw: &str, keys: &[&str]) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find(['?', '&']) {
        let (before, from) = rest.split_at(at + 1);
        out.push_str(before);
        rest = from;
        // The key as the driver reads it: percent-decoded.
        let secret = rest
            .find(['=', '&', '#'])
            .filter(|&end| rest.as_bytes()[end] == b'=')
            .filter(|&end| {
                let key = url::form_urlencoded::parse(&rest.as_bytes()[..end])
                    .next()
                    .map(|(key, _)| key.into_owned())
                    .unwrap_or_default();
                keys.iter().any(|k| key.eq_ignore_ascii_case(k))
            });
        if let Some(eq) = secret {
            out.push_str(&rest[..=eq]);
            out.push_str("***");
            let end = rest.find(['&', '#']).unwrap_or(rest.len());
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

impl Config {
    /// Defaults, then `file` (or `MUSTER_CONFIG`), then the environment,
    /// then `flags` (a serializable set of the flags that were given).
    pub fn load(file: Option<&Path>, flags: impl Serialize) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("MUSTER_CONFIG").map(PathBuf::from));
        if let Some(file) = file {
            if !file.exists() {
                bail!("config file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        let env = |keys: &'static [&'static str]| {
            Env::prefixed("MUSTER_")
                .filter(move |key| {
                    let key = key.as_str().to_ascii_lowercase();
                    keys.iter()
                        .any(|k| key == *k || key.starts_with(&format!("{k}__")))
                })
                .split("__")
        };
        figment = figment
            .merge(env(ENV_KEYS))
            .merge(TextEnv(env(ENV_TEXT_KEYS)))
            .merge(Serialized::defaults(flags));
        let config: Config = figment.extract().context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let td = &self.trust_domain;
        if td.is_empty()
            || !td
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
        {
            bail!("trust_domain {td:?} must be lowercase letters, digits, '.' and '-'");
        }
        if self.default_tenant.trim().is_empty()
            || self.default_tenant.len() > 256
            || self.default_tenant.contains('\0')
        {
            bail!("default_tenant must be 1 to 256 bytes without NUL");
        }
        // Its length only: the rest of its form matters at the first mint,
        // where identity checks it (see check_provided_admin_token).
        if let Some(token) = &self.admin_token
            && !(32..=4096).contains(&token.len())
        {
            bail!("MUSTER_ADMIN_TOKEN must be 32 to 4096 characters");
        }
        // Services in separate processes share one store, named: without
        // it each would keep its own SQLite file and none would see the
        // others' state. (An edge alone opens no store.)
        if !self.services.is_empty()
            && self.store.is_none()
            && self.service_names()? != [ServiceName::Edge]
        {
            bail!(
                "a cluster service needs `store` (--store postgres://…, or a sqlite:// file \
                 when one process runs every service that keeps state)"
            );
        }
        if !self.services.is_empty()
            && self.service_names()?.len() > 1
            && self.grpc_listen.is_some()
        {
            bail!(
                "grpc_listen is one service's address: run one process per service to serve \
                 each on its own, or leave grpc_listen out for several in one process"
            );
        }
        for name in self.peers.keys() {
            name.parse::<ServiceName>()
                .with_context(|| format!("peers.{name}"))?;
        }
        let runs_edge = self.services.is_empty() || self.services.iter().any(|s| s == "edge");
        if self.edge_tls_cert.is_some() != self.edge_tls_key.is_some() {
            bail!("edge_tls_cert and edge_tls_key go together");
        }
        let plaintext = self.edge_tls_cert.is_none();
        if runs_edge
            && plaintext
            && !self.edge_listen.ip().is_loopback()
            && !self.edge_allow_plaintext
        {
            bail!(
                "edge_listen {} is not loopback: plain ws:// is only served on loopback \
                 (set edge_allow_plaintext behind a proxy that terminates TLS)",
                self.edge_listen
            );
        }
        // Edges refresh presence every 5 s: a shorter lifetime would prune
        // live entries between two refreshes.
        if !(MIN_PRESENCE_TTL_SECS..=MAX_PRESENCE_TTL_SECS).contains(&self.presence_ttl_secs) {
            bail!(
                "presence_ttl_secs must be from {MIN_PRESENCE_TTL_SECS} to {MAX_PRESENCE_TTL_SECS}"
            );
        }
        if !(1..=MAX_PRESENCE_CAP).contains(&self.presence_cap) {
            bail!("presence_cap must be from 1 to {MAX_PRESENCE_CAP}");
        }
        // Every record, lease and acknowledgement of an edge carries its id.
        if let Some(edge_id) = &self.edge_id
            && (edge_id.trim().is_empty()
                || edge_id.len() > 128
                || edge_id.chars().any(|c| c.is_control() || c.is_whitespace()))
        {
            bail!("edge_id must be 1 to 128 bytes with no spaces or control characters");
        }
        if !(MIN_MAX_FRAME_BYTES..=MAX_MAX_FRAME_BYTES).contains(&self.edge_max_frame_bytes) {
            bail!(
                "edge_max_frame_bytes must be from {MIN_MAX_FRAME_BYTES} to {MAX_MAX_FRAME_BYTES}"
            );
        }
        if self.cert_reload_secs == 0 {
            bail!("cert_reload_secs must be at least 1");
        }
        if self.trusted_proxies()?.is_empty() && self.edge_proxy_protocol {
            bail!(
                "edge_proxy_protocol needs edge_trusted_proxies: the header is read only \
                 from the proxies named there"
            );
        }
        Ok(())
    }

    /// The edge's trusted proxies, parsed.
    pub fn trusted_proxies(&self) -> anyhow::Result<muster_edge::TrustedProxies> {
        let header = self
            .edge_forwarded_header
            .parse()
            .map_err(|why: String| anyhow::anyhow!("edge_forwarded_header: {why}"))?;
        muster_edge::TrustedProxies::parse(&self.edge_trusted_proxies, header)
            .map_err(|why| anyhow::anyhow!("edge_trusted_proxies: {why}"))
    }

    /// The services to run: all for a single host.
    pub fn service_names(&self) -> anyhow::Result<Vec<ServiceName>> {
        if self.services.is_empty() {
            return Ok(ServiceName::SERVICES.to_vec());
        }
        let mut names = Vec::new();
        for name in &self.services {
            let parsed: ServiceName = name.parse()?;
            if parsed == ServiceName::Ctl {
                bail!("ctl is the command line's identity, not a service");
            }
            if !names.contains(&parsed) {
                names.push(parsed);
            }
        }
        // The edge reaches the services beside it by the addresses they
        // bound, so it starts after them, however they were listed.
        names.sort_by_key(|name| ServiceName::SERVICES.iter().position(|s| s == name));
        Ok(names)
    }

    /// Whether this process is a whole single host (every service, and the
    /// right to make its own development CA).
    pub fn single_host(&self) -> bool {
        self.services.is_empty()
    }

    pub fn store_url(&self) -> String {
        self.store
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("muster.db").display()))
    }

    pub fn tls(&self) -> TlsDir {
        TlsDir::new(
            self.tls_dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("tls")),
        )
    }

    /// Where the runtime file listing this host's endpoints lives.
    pub fn endpoints_file(&self) -> PathBuf {
        self.data_dir.join("endpoints.json")
    }
}

/// Creates `dir` (and any missing parent) readable by its owner only: it
/// holds the SQLite store, keys and the device key. A directory that exists
/// keeps the mode its operator gave it.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Whether users other than the owner may write what `meta` describes
/// (group or others): a data directory or file the tools cannot trust.
pub fn others_may_write(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o022 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_store_urls() {
        assert_eq!(
            redact_url("postgres://muster:hunter2@db:5432/muster"),
            "postgres://muster:***@db:5432/muster"
        );
        assert_eq!(
            redact_url("postgres://muster@db/x"),
            "postgres://muster@db/x"
        );
        assert_eq!(
            redact_url("sqlite://data/muster.db"),
            "sqlite://data/muster.db"
        );
        // The driver takes the last `@` as the end of the user part.
        assert_eq!(
            redact_url("postgres://muster:p@ss@db/muster"),
            "postgres://muster:***@db/muster"
        );
        assert_eq!(
            redact_url(
                "postgres://muster@db/muster?sslmode=require&PASSWORD=hunter2&sslpassword=k"
            ),
            "postgres://muster@db/muster?sslmode=require&PASSWORD=***&sslpassword=***"
        );
        assert_eq!(
            redact_url("sqlite:muster-data/muster.db?mode=rwc"),
            "sqlite:muster-data/muster.db?mode=rwc"
        );
        let unparsable = redact_url("postgres://muster:hunter2@[db/muster");
        assert!(!unparsable.contains("hunter2"), "{unparsable}");
        // Passwords a parser would read as something else than a password.
        for raw in [
            "postgres://muster:#hunter2@db/muster",
            "postgres://muster:?hunter2@db/muster",
            "postgres://muster:hun/ter2@db/muster",
            "postgres://muster:123#hunter2@db/muster",
            "postgres://muster:@hunter2@db/muster",
        ] {
            let redacted = redact_url(raw);
            assert!(!redacted.contains("hunter2"), "{raw}: {redacted}");
            assert!(!redacted.contains("ter2"), "{raw}: {redacted}");
        }
        assert_eq!(
            redact_url("postgres://muster:#hunter2@db/muster"),
            "postgres://muster:***@db/muster"
        );
        // An `@` in a query's password is no end of a user part.
        for raw in [
            "postgres://muster@db:5432/muster?password=hun@ter2",
            "postgres://muster@db/muster?sslmode=require&Password=a@b@hunter2#x",
            "postgres://muster@db/muster?sslpassword=hunter2@x&password=y",
            "postgres://u@db:5432/m?pass%77ord=hun@ter2",
        ] {
            let redacted = redact_url(raw);
            assert!(!redacted.contains("ter2"), "{raw}: {redacted}");
            assert!(redacted.contains("@db"), "{raw}: {redacted}");
        }
        assert_eq!(
            redact_url("postgres://muster@db:5432/muster?password=hun@ter2"),
            "postgres://muster@db:5432/muster?password=***"
        );
    }

    #[test]
    fn out_of_range_values_are_refused_at_load() {
        for (key, value) in [
            ("presence_ttl_secs", "9223372036854775807"),
            ("presence_ttl_secs", "86401"),
            ("presence_ttl_secs", "9"),
            ("presence_cap", "9223372036854775807"),
            ("presence_cap", "0"),
            ("edge_id", "\"\""),
            ("edge_id", "\" \""),
            ("edge_id", "\"a b\""),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("muster.toml");
            std::fs::write(&file, format!("{key} = {value}\n")).unwrap();
            let loaded = Config::load(Some(&file), NoFlags {});
            assert!(loaded.is_err(), "{key} = {value}");
        }
    }

    #[test]
    fn services_start_in_dependency_order_however_listed() {
        let config = Config {
            services: ["edge", "identity", "presence", "backplane", "edge"]
                .map(String::from)
                .to_vec(),
            ..Config::default()
        };
        assert_eq!(
            config.service_names().unwrap(),
            [
                ServiceName::Backplane,
                ServiceName::Identity,
                ServiceName::Presence,
                ServiceName::Edge
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("muster.toml");
        std::fs::write(
            &file,
            "services = [\"identity\", \"presence\"]\ngrpc_listen = \"127.0.0.1:7443\"\n\
             store = \"sqlite://x.db\"\n",
        )
        .unwrap();
        let refused = Config::load(Some(&file), NoFlags {}).unwrap_err();
        assert!(
            format!("{refused:#}").contains("grpc_listen"),
            "{refused:#}"
        );
        // A single host (every service) ignores it, as the command line's
        // tools load the same configuration.
        std::fs::write(&file, "grpc_listen = \"127.0.0.1:7443\"\n").unwrap();
        Config::load(Some(&file), NoFlags {}).unwrap();
    }

    #[test]
    fn services_come_as_a_list_or_one_comma_separated_string() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("muster.toml");
        std::fs::write(
            &file,
            "services = \"identity, presence\"\nstore = \"sqlite://x.db\"\n",
        )
        .unwrap();
        let config = Config::load(Some(&file), NoFlags {}).unwrap();
        assert_eq!(config.services, ["identity", "presence"]);
    }

    #[test]
    fn a_misspelt_key_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("muster.toml");
        std::fs::write(&file, "presence_ttl_sec = 30\n").unwrap();
        let refused = Config::load(Some(&file), NoFlags {}).unwrap_err();
        assert!(
            format!("{refused:#}").contains("presence_ttl_sec"),
            "{refused:#}"
        );
        std::fs::write(&file, "presence_ttl_secs = 30\n").unwrap();
        assert_eq!(
            Config::load(Some(&file), NoFlags {})
                .unwrap()
                .presence_ttl_secs,
            30
        );
    }

    #[test]
    fn debug_output_never_shows_the_admin_token() {
        let config = Config {
            admin_token: Some("a-very-secret-admin-token-0123456789".into()),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("very-secret"));
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("muster.toml");
        std::fs::write(
            &file,
            "trust_domain = \"from.file\"\nedge_listen = \"127.0.0.1:1000\"\n[peers]\nidentity = \"id:7443\"\n",
        )
        .unwrap();
        #[derive(Serialize)]
        struct Flags {
            edge_listen: &'static str,
        }
        let config = Config::load(
            Some(&file),
            Flags {
                edge_listen: "127.0.0.1:2000",
            },
        )
        .unwrap();
        assert_eq!(config.trust_domain, "from.file");
        assert_eq!(config.edge_listen.port(), 2000);
        assert_eq!(config.peers["identity"], "id:7443");

        std::fs::write(&file, "trust_domain = \"Not Valid\"\n").unwrap();
        assert!(Config::load(Some(&file), NoFlags {}).is_err());
        std::fs::write(&file, "edge_listen = \"0.0.0.0:8787\"\n").unwrap();
        let refused = Config::load(Some(&file), NoFlags {}).unwrap_err();
        assert!(
            format!("{refused:#}").contains("not loopback"),
            "{refused:#}"
        );
        std::fs::write(
            &file,
            "edge_listen = \"0.0.0.0:8787\"\nedge_allow_plaintext = true\n",
        )
        .unwrap();
        assert!(Config::load(Some(&file), NoFlags {}).is_ok());
        for (limit, ok) in [
            (65_535, false),
            (65_536, true),
            (104_857_600, true),
            (104_857_601, false),
        ] {
            std::fs::write(&file, format!("edge_max_frame_bytes = {limit}\n")).unwrap();
            let loaded = Config::load(Some(&file), NoFlags {});
            assert_eq!(loaded.is_ok(), ok, "{limit}: {loaded:?}");
        }
        // Trusted proxies: a list, or one comma-separated string as an
        // environment variable gives it; never everything.
        for (text, ok) in [
            (
                "edge_trusted_proxies = [\"10.0.0.0/8\", \"fd00::1\"]\n",
                true,
            ),
            ("edge_trusted_proxies = \"10.0.0.0/8, 127.0.0.1\"\n", true),
            ("edge_trusted_proxies = \"0.0.0.0/0\"\n", false),
            ("edge_trusted_proxies = [\"proxy.internal\"]\n", false),
            ("edge_forwarded_header = \"Forwarded\"\n", true),
            ("edge_forwarded_header = \"x-client-ip\"\n", false),
            // The PROXY header is read from trusted proxies only.
            ("edge_proxy_protocol = true\n", false),
            (
                "edge_proxy_protocol = true\nedge_trusted_proxies = \"10.0.0.0/8\"\n",
                true,
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let loaded = Config::load(Some(&file), NoFlags {});
            assert_eq!(loaded.is_ok(), ok, "{text}: {loaded:?}");
        }
        std::fs::write(
            &file,
            "edge_trusted_proxies = \" 10.0.0.0/8 ,127.0.0.1,\"\n",
        )
        .unwrap();
        let loaded = Config::load(Some(&file), NoFlags {}).unwrap();
        assert_eq!(loaded.edge_trusted_proxies, ["10.0.0.0/8", "127.0.0.1"]);
        std::fs::write(&file, "services = [\"nosuch\"]\n").unwrap();
        assert!(Config::load(Some(&file), NoFlags {}).is_err());
        assert!(Config::load(Some(&dir.path().join("missing.toml")), NoFlags {}).is_err());
    }
}
