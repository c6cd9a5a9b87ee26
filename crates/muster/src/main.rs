//! `muster`: run the gateway, manage its certificates and tokens, check
//! its health.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use muster::config::Config;
use muster::ctl::Ctl;
use muster::operator;
use muster_proto::v1::identity_client::IdentityClient;
use muster_proto::v1::{
    CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, Scopes, TokenInfo,
    UpdateTokenRequest,
};
use muster_tls::{CertSummary, IssueOptions, ServiceName};
use serde::Serialize;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[derive(Parser)]
#[command(
    name = "muster",
    version,
    about = "A gateway for fleets of people, agents and devices"
)]
struct Cli {
    /// A TOML config file (also MUSTER_CONFIG).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Settings every command shares; each also reads MUSTER_<NAME>.
#[derive(Args, Serialize, Default)]
struct Common {
    /// Data directory of a single host [default: ./muster-data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// State store: sqlite://PATH or postgres://… [default: sqlite in the data directory].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<String>,
    /// SPIFFE trust domain of the mesh [default: muster.local].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    trust_domain: Option<String>,
    /// Directory of the CA and certificates [default: <data-dir>/tls].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_dir: Option<PathBuf>,
}

#[derive(Args, Serialize)]
struct ServeFlags {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// Run only this service (repeatable): cluster mode.
    #[arg(long = "service", value_name = "NAME")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    services: Vec<String>,
    /// Where the edge listens for clients [default: 127.0.0.1:8787].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    edge_listen: Option<String>,
    /// Where a cluster-mode service listens for gRPC (mTLS).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_listen: Option<String>,
    /// Where /metrics, /healthz and /readyz are served [default: 127.0.0.1:9464].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<String>,
    /// auto, text or json [default: auto].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run muster: every service in one process, or those named by --service.
    Serve(ServeFlags),
    /// Apply pending schema migrations to the store and exit.
    Migrate(Common),
    /// Create and inspect the CA and certificates of a cluster.
    #[command(subcommand)]
    Certs(Certs),
    /// Mint, list and revoke operator tokens.
    #[command(subcommand)]
    Token(Token),
    /// Check every service's gRPC health over mTLS.
    Health {
        #[command(flatten)]
        common: Common,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Instance presence as the edge sees it (operators only).
    Presence {
        #[command(flatten)]
        operator: OperatorArgs,
        /// Keep printing joins, updates and departures as they happen.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// The edge's status: connections and presence counts (operators only).
    Status {
        #[command(flatten)]
        operator: OperatorArgs,
        #[arg(long)]
        json: bool,
    },
    /// Support bundles.
    #[command(subcommand)]
    Diag(Diag),
}

/// How the command line reaches the edge as an operator.
#[derive(Args)]
struct OperatorArgs {
    #[command(flatten)]
    common: Common,
    /// Operator token; prefer MUSTER_TOKEN, since a command line is
    /// visible to every user of the machine (`ps`).
    #[arg(long)]
    token: Option<String>,
    /// The edge's WebSocket URL [default: the running single host's, else
    /// ws://<edge_listen>/ws, wss:// with edge_tls_cert].
    #[arg(long)]
    edge: Option<String>,
    /// PEM file of the CA that signed a `wss://` edge's certificate, when
    /// it is not a public one (also MUSTER_EDGE_CA).
    #[arg(long, env = "MUSTER_EDGE_CA", value_name = "FILE")]
    edge_ca: Option<PathBuf>,
}

impl OperatorArgs {
    fn target(&self) -> operator::EdgeTarget<'_> {
        operator::EdgeTarget {
            url: self.edge.clone(),
            ca: self.edge_ca.as_deref(),
        }
    }
}

#[derive(Subcommand)]
enum Diag {
    /// Write a redacted support bundle (no tokens, keys or passwords).
    Export {
        #[command(flatten)]
        operator: OperatorArgs,
        /// Output file [default: muster-diag-<time>.json].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Certs {
    /// Create a CA (unless one exists) and a certificate for every principal.
    Init {
        #[command(flatten)]
        common: Common,
        /// Lifetime of the principals' certificates in days.
        #[arg(long, default_value_t = 90)]
        days: u64,
        /// Extra DNS names or IP addresses for the edge's certificate,
        /// where its `wss://` listener is reached (repeatable). The other
        /// services are reached by their `muster-<name>` names only.
        #[arg(long = "dns")]
        dns: Vec<String>,
    },
    /// Issue (or re-issue) certificates for the named principals.
    Issue {
        #[command(flatten)]
        common: Common,
        /// edge, presence, backplane, identity, approvals, execution or ctl.
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long, default_value_t = 90)]
        days: u64,
        /// Extra DNS names or IP addresses for these certificates
        /// (repeatable; `ctl`'s, which serves nothing, takes none).
        #[arg(long = "dns")]
        dns: Vec<String>,
    },
    /// Print what certificate files say about themselves.
    Inspect {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Token {
    /// Mint a token; it is printed once and stored hashed.
    Create {
        #[command(flatten)]
        common: Common,
        /// operator.read, operator.write, operator.approvals, operator.pairing, operator.admin or * (repeatable, or comma-separated).
        #[arg(long = "scopes", alias = "scope", value_delimiter = ',')]
        scopes: Vec<String>,
        /// admin, client, or node (with --device).
        #[arg(long, default_value = "client")]
        role: String,
        /// For a node token: the device_id of the one node it admits.
        #[arg(long)]
        device: Option<String>,
        /// Tenant id [default: the configured default tenant].
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value = "")]
        label: String,
        /// The token expires this many seconds after it is minted (at most
        /// a year) [default: never].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=muster_identity::MAX_TTL_SECONDS))]
        ttl_seconds: Option<u64>,
    },
    /// List a tenant's tokens (never their secrets).
    List {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id.
    Revoke {
        #[command(flatten)]
        common: Common,
        token_id: String,
    },
    /// Change a live token; its connections whose claims change close with
    /// 4001 `token updated` and come back with the new ones.
    Update {
        #[command(flatten)]
        common: Common,
        token_id: String,
        #[arg(long)]
        label: Option<String>,
        /// The token's scopes from now on (repeatable, or comma-separated;
        /// `--scopes ''` for none).
        #[arg(long = "scopes", alias = "scope", value_delimiter = ',')]
        scopes: Option<Vec<String>>,
        #[arg(long)]
        role: Option<String>,
        /// The one node a node token admits.
        #[arg(long, conflicts_with = "no_device")]
        device: Option<String>,
        /// Bind the token to no device.
        #[arg(long)]
        no_device: bool,
        /// The token expires this many seconds from now (at most a year).
        #[arg(long, conflicts_with = "no_expiry", value_parser = clap::value_parser!(u64).range(1..=muster_identity::MAX_TTL_SECONDS))]
        ttl_seconds: Option<u64>,
        /// The token never expires.
        #[arg(long)]
        no_expiry: bool,
    },
}

fn load(file: Option<&std::path::Path>, flags: impl Serialize) -> anyhow::Result<Config> {
    Config::load(file, flags)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let file = cli.config.as_deref();
    match cli.command {
        Command::Serve(flags) => serve(load(file, &flags)?).await,
        Command::Migrate(common) => {
            let config = load(file, &common)?;
            let format = config.log_format.parse().map_err(anyhow::Error::msg)?;
            let _telemetry = muster_telemetry::init("muster", format)?;
            muster::serve::open_store(&config).await?.close().await;
            println!(
                "migrations applied to {}",
                muster::config::redact_url(&config.store_url())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(certs) => run_certs(file, certs),
        Command::Token(token) => run_token(file, token).await,
        Command::Health { common, json } => health(load(file, &common)?, json).await,
        Command::Presence {
            operator,
            watch,
            json,
        } => presence(file, operator, watch, json).await,
        Command::Status { operator, json } => status(file, operator, json).await,
        Command::Diag(Diag::Export { operator, out }) => diag_export(file, operator, out).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    // Listen for signals before anything starts, so a SIGTERM that arrives
    // during start-up still means a stop rather than the default kill.
    let mut signals = Signals::new()?;
    // Traces name the services a process runs, so that those of a
    // cluster's processes tell apart.
    let service_name = if config.services.is_empty() {
        "muster".to_owned()
    } else {
        let names: Vec<&str> = config.service_names()?.iter().map(|n| n.as_str()).collect();
        format!("muster-{}", names.join("+"))
    };
    let telemetry = muster_telemetry::init(
        &service_name,
        config.log_format.parse().map_err(anyhow::Error::msg)?,
    )?;
    // A start can wait (a migration on a lock, a store that does not
    // answer): a signal ends it there, unless it is minting the admin
    // token, which it finishes and prints before it stops.
    let abort = tokio_util::sync::CancellationToken::new();
    let start = muster::start_until(&config, abort.clone());
    tokio::pin!(start);
    let started = tokio::select! {
        started = &mut start => Some(started?),
        () = signals.next() => None,
    };
    let Some(running) = started else {
        abort.cancel();
        match start.await {
            Ok(running) => {
                print_banner(&config, &running);
                tracing::warn!(
                    "a signal came during start-up: stopping (a second signal stops at once)"
                );
                tokio::select! {
                    stopped = running.stop() => {
                        if let Err(error) = stopped {
                            tracing::warn!(%error, "stopping failed");
                        }
                    }
                    () = signals.next() => tracing::warn!("a second signal: stopping without waiting for in-flight work"),
                }
            }
            Err(error) => tracing::warn!(%error, "stopped before start-up finished"),
        }
        telemetry.shutdown().await;
        return Ok(ExitCode::FAILURE);
    };
    print_banner(&config, &running);
    signals.next().await;
    tracing::info!(
        "shutting down: no new connections, draining in-flight work (a second signal stops at once)"
    );
    let code = tokio::select! {
        stopped = running.stop() => match stopped {
            Ok(()) => ExitCode::SUCCESS,
            // Reported, with the traces flushed all the same.
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "stopping failed");
                ExitCode::FAILURE
            }
        },
        () = signals.next() => {
            tracing::warn!("a second signal: stopping without waiting for in-flight work");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    Ok(code)
}

fn print_banner(config: &Config, running: &muster::Running) {
    use std::io::Write;
    let e = &running.endpoints;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "muster is running ({} service(s), trust domain {})",
        e.services.len(),
        e.trust_domain
    );
    if let Some(url) = &e.edge_ws_url {
        let _ = writeln!(out, "  clients   {url} (subprotocol tyrum-v1)");
    }
    let _ = writeln!(out, "  metrics   {}", e.metrics_url);
    for (name, addr) in &e.services {
        let _ = writeln!(out, "  {name:<9} {addr} (gRPC, mTLS)");
    }
    let _ = writeln!(
        out,
        "  store     {}",
        muster::config::redact_url(&config.store_url())
    );
    if running.admin_token.is_some() && config.admin_token.is_some() {
        // Whoever chose it has it; this output may go to a shared log.
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Admin token: the one MUSTER_ADMIN_TOKEN set (stored hashed, not shown)."
        );
    } else if let Some(token) = &running.admin_token {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Admin token (shown once, stored hashed; keep it safe):"
        );
        let _ = writeln!(out, "  {}", token.expose());
        let _ = writeln!(
            out,
            "Clients send it as `Authorization: Bearer <token>`. More tokens: `muster token create --scopes operator.read{}`.",
            data_dir_hint(config)
        );
    }
    let _ = writeln!(
        out,
        "Check the services: `muster health{}`",
        data_dir_hint(config)
    );
    let _ = out.flush();
}

fn data_dir_hint(config: &Config) -> String {
    if config.data_dir == Config::default().data_dir {
        String::new()
    } else {
        let dir = config.data_dir.display().to_string();
        // Quoted for a shell when it would not pass as one word.
        if dir
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:@,=".contains(c))
        {
            format!(" --data-dir {dir}")
        } else {
            format!(" --data-dir '{}'", dir.replace('\'', r"'\''"))
        }
    }
}

/// Resolves on SIGTERM or SIGINT; both are hooked when this is called.
/// SIGTERM and SIGINT, as often as they come.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn issue_options(days: u64, dns: Vec<String>) -> anyhow::Result<IssueOptions> {
    if days == 0 || days > 3650 {
        bail!("--days must be between 1 and 3650");
    }
    let mut opts = IssueOptions::valid_for(Duration::from_secs(days * 86_400));
    opts.extra_dns_names = dns;
    Ok(opts)
}

/// A directory's certificates issued again keep their trust domain when
/// the command names none: the services that load them check it, so
/// certificates of the default domain in a cluster's directory would be
/// refused at their next reload and stop them at their next start.
fn keeping_trust_domain(mut config: Config) -> anyhow::Result<Config> {
    if config.trust_domain != Config::default().trust_domain {
        return Ok(config);
    }
    let mut domains = config.tls().trust_domains_in_use().into_iter();
    match (domains.next(), domains.next()) {
        (Some(domain), None) => config.trust_domain = domain,
        (Some(one), Some(other)) => bail!(
            "the certificates in {} are of several trust domains ({one}, {other}, …): \
             name the one to issue for with --trust-domain",
            config.tls().path().display()
        ),
        (None, _) => {}
    }
    Ok(config)
}

fn run_certs(file: Option<&std::path::Path>, certs: Certs) -> anyhow::Result<ExitCode> {
    match certs {
        Certs::Init { common, days, dns } => {
            let config = keeping_trust_domain(load(file, &common)?)?;
            let tls = config.tls();
            let edge_opts = issue_options(days, dns)?;
            let opts = issue_options(days, Vec::new())?;
            let (ca, created) = tls.ensure_ca(Duration::from_secs(10 * 365 * 86_400))?;
            println!(
                "{} CA {}",
                if created { "created" } else { "using existing" },
                tls.ca_cert_path().display()
            );
            for name in ServiceName::ALL {
                let opts = if name == ServiceName::Edge {
                    &edge_opts
                } else {
                    &opts
                };
                let issued = ca.issue(&config.trust_domain, name, opts)?;
                tls.write_issued(name, &issued)?;
                println!("issued {}", name.spiffe_id(&config.trust_domain));
            }
            Ok(ExitCode::SUCCESS)
        }
        Certs::Issue {
            common,
            names,
            days,
            dns,
        } => {
            // Into a running host's (or local cluster's) directory, for its
            // trust domain, when `--data-dir` names it.
            let (config, _) = muster::ctl::adopt_running(&load(file, &common)?);
            let config = keeping_trust_domain(config)?;
            let tls = config.tls();
            let ca = tls
                .load_ca()
                .context("loading the CA (run `muster certs init` first)")?;
            let opts = issue_options(days, dns)?;
            let names = names
                .iter()
                .map(|name| name.parse())
                .collect::<Result<Vec<ServiceName>, _>>()?;
            if names.contains(&ServiceName::Ctl) && !opts.extra_dns_names.is_empty() {
                bail!("ctl's certificate is a client's only: it takes no --dns names");
            }
            for name in names {
                tls.write_issued(name, &ca.issue(&config.trust_domain, name, &opts)?)?;
                println!("issued {}", name.spiffe_id(&config.trust_domain));
            }
            Ok(ExitCode::SUCCESS)
        }
        Certs::Inspect { files } => {
            for path in files {
                let pem =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let certs =
                    rustls_certs(&pem).with_context(|| format!("parsing {}", path.display()))?;
                for cert in certs {
                    let s = CertSummary::of(&cert)?;
                    println!("{}:", path.display());
                    println!("  subject    {}", s.subject);
                    println!("  issuer     {}", s.issuer);
                    println!("  serial     {}", s.serial_hex);
                    println!("  identity   {}", s.spiffe_id.as_deref().unwrap_or("-"));
                    println!("  valid      {} .. {}", s.not_before, s.not_after);
                    println!("  ca         {}", s.is_ca);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn rustls_certs(pem: &[u8]) -> anyhow::Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    let certs =
        rustls_pki_types::CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        bail!("no certificate");
    }
    Ok(certs)
}

fn print_token(info: &TokenInfo) {
    println!(
        "{}  {:<6} {:<40} {}{}{}",
        info.token_id,
        info.role,
        if info.device_id.is_empty() {
            info.scopes.join(",")
        } else {
            info.device_id.clone()
        },
        info.label,
        if info.revoked_at_ms != 0 {
            "  (revoked)".to_owned()
        } else if info.expires_at_ms != 0 {
            format!(
                "  ({} {})",
                if info.expires_at_ms <= muster_store::now_ms() {
                    "expired"
                } else {
                    "expires"
                },
                muster_protocol::format_datetime(info.expires_at_ms)
            )
        } else {
            String::new()
        },
        if info.issued_by.is_empty() {
            String::new()
        } else {
            format!("  (issued by {})", info.issued_by)
        }
    );
}

async fn run_token(file: Option<&std::path::Path>, token: Token) -> anyhow::Result<ExitCode> {
    match token {
        Token::Create {
            common,
            scopes,
            role,
            device,
            tenant,
            label,
            ttl_seconds,
        } => {
            let ctl = Ctl::new(&load(file, &common)?)?;
            let mut identity = IdentityClient::new(ctl.channel(ServiceName::Identity)?);
            let created = identity
                .create_token(CreateTokenRequest {
                    tenant_id: tenant.unwrap_or_else(|| ctl.default_tenant().to_owned()),
                    role,
                    scopes,
                    label,
                    device_id: device.unwrap_or_default(),
                    ttl_seconds: ttl_seconds.unwrap_or(0),
                    expires_by_ms: 0,
                    issued_by: String::new(),
                })
                .await?
                .into_inner();
            let info = created.info.context("identity returned no token info")?;
            println!("token id  {}", info.token_id);
            println!("token     {}", created.token);
            if info.expires_at_ms != 0 {
                println!(
                    "expires   {}",
                    muster_protocol::format_datetime(info.expires_at_ms)
                );
            }
            println!("(shown once; stored hashed)");
        }
        Token::List {
            common,
            tenant,
            json,
        } => {
            let ctl = Ctl::new(&load(file, &common)?)?;
            let mut identity = IdentityClient::new(ctl.channel(ServiceName::Identity)?);
            let tokens = identity
                .list_tokens(ListTokensRequest {
                    tenant_id: tenant.unwrap_or_else(|| ctl.default_tenant().to_owned()),
                    token_id: String::new(),
                })
                .await?
                .into_inner()
                .tokens;
            if json {
                let rows: Vec<_> = tokens
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "token_id": t.token_id, "tenant_id": t.tenant_id, "role": t.role,
                            "scopes": t.scopes, "label": t.label, "created_at_ms": t.created_at_ms,
                            "revoked_at_ms": (t.revoked_at_ms != 0).then_some(t.revoked_at_ms),
                            "expires_at_ms": (t.expires_at_ms != 0).then_some(t.expires_at_ms),
                            "updated_at_ms": (t.updated_at_ms != 0).then_some(t.updated_at_ms),
                            "device_id": (!t.device_id.is_empty()).then_some(&t.device_id),
                            "issued_by": (!t.issued_by.is_empty()).then_some(&t.issued_by),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                tokens.iter().for_each(print_token);
            }
        }
        Token::Update {
            common,
            token_id,
            label,
            scopes,
            role,
            device,
            no_device,
            ttl_seconds,
            no_expiry,
        } => {
            let ctl = Ctl::new(&load(file, &common)?)?;
            let mut identity = IdentityClient::new(ctl.channel(ServiceName::Identity)?);
            let expires_at_ms =
                match (ttl_seconds, no_expiry) {
                    (Some(ttl), _) => Some(muster_store::now_ms().saturating_add(
                        i64::try_from(ttl).unwrap_or(i64::MAX).saturating_mul(1000),
                    )),
                    (None, true) => Some(0),
                    (None, false) => None,
                };
            let info = identity
                .update_token(UpdateTokenRequest {
                    token_id,
                    label,
                    role,
                    device_id: device.or(no_device.then(String::new)),
                    scopes: scopes.map(|scopes| Scopes {
                        scopes: scopes.into_iter().filter(|s| !s.is_empty()).collect(),
                    }),
                    expires_at_ms,
                    ..Default::default()
                })
                .await?
                .into_inner();
            print!("updated ");
            print_token(&info);
        }
        Token::Revoke { common, token_id } => {
            let ctl = Ctl::new(&load(file, &common)?)?;
            let mut identity = IdentityClient::new(ctl.channel(ServiceName::Identity)?);
            let info = identity
                .revoke_token(RevokeTokenRequest {
                    token_id,
                    ..Default::default()
                })
                .await?
                .into_inner();
            print!("revoked ");
            print_token(&info);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn presence(
    file: Option<&std::path::Path>,
    args: OperatorArgs,
    watch: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let config = load(file, &args.common)?;
    let token = operator::token(args.token.clone())?;
    let mut ws = operator::connect(&config, args.target(), &token).await?;
    let (listed, early) =
        operator::call_with_events(&mut ws, "muster.presence.list", operator::CALL_WITHIN).await?;
    let entries = listed["entries"].as_array().cloned().unwrap_or_default();
    for entry in &entries {
        let line = if json {
            serde_json::json!({"type": "listed", "entry": entry}).to_string()
        } else {
            operator::entry_line(entry)
        };
        if !emit(&line) {
            return Ok(ExitCode::SUCCESS);
        }
    }
    if !watch {
        return Ok(ExitCode::SUCCESS);
    }
    // What changed while the listing was read: shown after it, so that
    // the last word on each entry is the newest.
    for frame in &early {
        if !show_presence_event(frame, json) {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let mut signals = Signals::new()?;
    loop {
        let next = tokio::select! {
            () = signals.next() => return Ok(ExitCode::SUCCESS),
            next = ws.next(WATCH_QUIET) => next,
        };
        let frames = match next {
            muster_protocol::client::Next::Json(frame) => vec![frame],
            // Quiet for a while: a connection that died without a word
            // (the edge's host gone, a network cut) would look the same,
            // so the edge is asked for an answer.
            muster_protocol::client::Next::Silent => {
                let asked = tokio::select! {
                    () = signals.next() => return Ok(ExitCode::SUCCESS),
                    asked = operator::call_with_events(&mut ws, "ping", PING_WITHIN) => asked,
                };
                asked
                    .map_err(|e| anyhow::anyhow!("the edge stopped answering: {e:#}"))?
                    .1
            }
            other => bail!("the edge closed the connection: {other:?}"),
        };
        for frame in &frames {
            if !show_presence_event(frame, json) {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}

/// How long the watch waits for the answer to its `ping`.
const PING_WITHIN: Duration = Duration::from_secs(10);

/// How long `presence --watch` waits in silence before it asks the edge
/// whether it is still there.
const WATCH_QUIET: Duration = Duration::from_secs(15);

/// Writes a line to standard output; false when it is closed (`| head`).
fn emit(line: &str) -> bool {
    use std::io::Write;
    writeln!(std::io::stdout(), "{line}").is_ok()
}

/// Shows a presence event of the watch; false when standard output is
/// closed.
fn show_presence_event(frame: &serde_json::Value, json: bool) -> bool {
    let kind = frame["type"].as_str().unwrap_or_default();
    let payload = &frame["payload"];
    let line = match kind {
        "presence.upserted" if json => {
            serde_json::json!({"type": kind, "entry": payload["entry"]}).to_string()
        }
        "presence.pruned" if json => {
            serde_json::json!({"type": kind, "instance_id": payload["instance_id"]}).to_string()
        }
        "presence.upserted" => format!("+ {}", operator::entry_line(&payload["entry"])),
        "presence.pruned" => format!(
            "- {}",
            operator::printable(payload["instance_id"].as_str().unwrap_or("-"))
        ),
        _ => return true,
    };
    emit(&line)
}

async fn status(
    file: Option<&std::path::Path>,
    args: OperatorArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let config = load(file, &args.common)?;
    let token = operator::token(args.token.clone())?;
    let mut ws = operator::connect(&config, args.target(), &token).await?;
    let status = operator::call(&mut ws, "muster.status").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!("edge         {}", status["edge_id"].as_str().unwrap_or("-"));
        println!("url          {}", status["ws_url"].as_str().unwrap_or("-"));
        println!("version      {}", status["version"].as_str().unwrap_or("-"));
        println!(
            "started      {}",
            status["started_at"].as_str().unwrap_or("-")
        );
        println!("connections  {}", status["connections"]);
        let p = &status["presence"];
        if p.is_null() {
            println!("presence     unavailable");
        } else {
            println!(
                "presence     {} ({} gateway, {} client, {} node)",
                p["total"], p["gateway"], p["client"], p["node"]
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn diag_export(
    file: Option<&std::path::Path>,
    args: OperatorArgs,
    out: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let config = load(file, &args.common)?;
    let endpoints: Option<serde_json::Value> = muster::ctl::running_endpoints(&config);
    let health = match Ctl::new(&config) {
        Ok(ctl) => serde_json::to_value(health_rows(&ctl).await)?,
        Err(error) => serde_json::json!({"error": format!("{error:#}")}),
    };
    let (status, presence) = match operator::token(args.token.clone()) {
        Err(_) => (
            serde_json::json!("no operator token given"),
            serde_json::json!(null),
        ),
        Ok(token) => match operator::connect(&config, args.target(), &token).await {
            Ok(mut ws) => (
                operator::call(&mut ws, "muster.status")
                    .await
                    .unwrap_or_else(|e| serde_json::json!(e.to_string())),
                operator::call(&mut ws, "muster.presence.list")
                    .await
                    .unwrap_or_else(|e| serde_json::json!(e.to_string())),
            ),
            Err(error) => (
                serde_json::json!(format!("{error:#}")),
                serde_json::json!(null),
            ),
        },
    };
    let bundle = serde_json::json!({
        "generated_at": muster_protocol::format_datetime(muster_store::now_ms()),
        "version": env!("CARGO_PKG_VERSION"),
        // Debug output of the configuration redacts the admin token and
        // store passwords.
        "config": format!("{config:?}"),
        "endpoints": endpoints,
        "health": health,
        "status": status,
        "presence": presence,
    });
    let path = out
        .unwrap_or_else(|| PathBuf::from(format!("muster-diag-{}.json", muster_store::now_ms())));
    write_private(&path, &serde_json::to_vec_pretty(&bundle)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// Writes `bytes` to a new file readable by its owner only: a support
/// bundle names hosts, addresses and what peers reported. An existing
/// file (or a link in its place) is left alone.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

/// Each service's gRPC health: (service, address, status).
async fn health_rows(ctl: &Ctl) -> Vec<(String, String, String)> {
    let mut rows = Vec::new();
    for name in ServiceName::SERVICES {
        let grpc_service = format!("muster.v1.{}", capitalized(name.as_str()));
        let (address, status) = match ctl.address(name) {
            Err(_) => ("-".to_owned(), "unknown (no address)".to_owned()),
            Ok(address) => {
                let status = match ctl.channel(name) {
                    Ok(channel) => {
                        let mut client = HealthClient::new(channel);
                        let check = client.check(HealthCheckRequest {
                            service: grpc_service,
                        });
                        match tokio::time::timeout(Duration::from_secs(5), check).await {
                            Ok(Ok(reply)) => match reply.into_inner().status {
                                1 => "serving".to_owned(),
                                other => format!("not serving ({other})"),
                            },
                            Ok(Err(status)) => format!("error: {}", status.message()),
                            Err(_) => "timed out".to_owned(),
                        }
                    }
                    Err(error) => format!("error: {error}"),
                };
                (address, status)
            }
        };
        rows.push((name.as_str().to_owned(), address, status));
    }
    rows
}

async fn health(config: Config, json: bool) -> anyhow::Result<ExitCode> {
    let ctl = Ctl::new(&config)?;
    let rows = health_rows(&ctl).await;
    let all_ok = rows.iter().all(|(_, _, status)| status == "serving");
    if json {
        let value: Vec<_> = rows
            .iter()
            .map(|(n, a, s)| serde_json::json!({"service": n, "address": a, "status": s}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        for (name, address, status) in &rows {
            println!("{name:<10} {address:<22} {status}");
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}
