//! `muster-bench`: each scenario runs against muster and against its bare
//! baseline in the same run, and prints both with their ratio.
//!
//! - `handshakes`: full `tyrum-v1` handshakes per second (token check,
//!   `connect.init`, Ed25519 proof, presence upsert) next to a bare
//!   WebSocket accept plus one Ed25519 verify.
//! - `idle`: server RSS per idle authenticated connection next to a bare
//!   tokio-tungstenite server holding the same number of sockets.
//! - `beacons`: `presence.beacon` to `presence.upserted` at an operator,
//!   end to end, with p50/p99, next to a bare WebSocket relay.
//! - `latency`: commit to client across two edges of a local cluster on
//!   Postgres at a fixed rate, next to INSERT + NOTIFY seen by LISTEN.
//! - `fanout`: outbox events delivered to many operators, next to a bare
//!   broadcast over the same number of sockets.
//! - `appends`: outbox appends on Postgres, one and many per transaction,
//!   and presence's callers (a state change and its item per call), next
//!   to raw `pgbench` single-row INSERTs on the same server.
#![forbid(unsafe_code)]

mod backplane;
mod bare;
mod fanout;
mod scenarios;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "muster-bench",
    about = "muster benchmarks, each next to its baseline"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Handshakes per second.
    Handshakes {
        #[arg(long, default_value_t = 2000)]
        connections: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Connect as `mode: "cli"`, which instance presence leaves out:
        /// the protocol path alone, without the presence writes.
        #[arg(long)]
        without_presence: bool,
        /// Keep every connection open until the run ends (a reconnect
        /// storm: peers come back and stay) instead of closing each after
        /// its handshake (churn: each connection's close is paid in the run).
        #[arg(long)]
        hold: bool,
        /// `client` (an operator: it receives every presence event) or
        /// `node` (receives none).
        #[arg(long, default_value = "client")]
        role: String,
    },
    /// Server memory per idle connection (server and clients in separate
    /// processes).
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
    /// Presence beacons end to end.
    Beacons {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        nodes: usize,
    },
    /// Outbox appends on Postgres next to raw pgbench INSERTs.
    Appends {
        /// A Postgres server (a database is created and dropped on it).
        #[arg(long, env = "MUSTER_BENCH_DATABASE_URL")]
        database_url: String,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 10)]
        batch: usize,
        /// Append without the sequencer running: what giving each item its
        /// position after the commit (a second write of every row) costs.
        /// Items stay unreadable; for measuring only.
        #[arg(long)]
        without_sequencer: bool,
    },
    /// Commit-to-client latency across two edges of a local cluster
    /// (deploy/local-cluster, MUSTER_BIN or target/release/muster).
    Latency {
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Deliveries per second to many subscribers.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 200)]
        events: usize,
        /// Each item directed at one subscriber's device (subscribers are
        /// nodes), in turn, instead of broadcast: directory lookups and
        /// routing by device. The bare relay routes each frame to its one
        /// socket by name.
        #[arg(long)]
        directed: bool,
    },
    /// The bare baseline server of `idle`, run as its own process.
    #[command(hide = true)]
    BareServer,
    /// muster as its own process for `idle`.
    #[command(hide = true)]
    ServeMuster,
    /// Holds `connections` idle sockets to `url` until killed.
    #[command(hide = true)]
    HoldIdle {
        url: String,
        token: String,
        connections: usize,
        #[arg(long)]
        bare: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Handshakes {
            connections,
            concurrency,
            without_presence,
            hold,
            role,
        } => scenarios::handshakes(connections, concurrency, without_presence, hold, &role).await,
        Scenario::Idle { connections } => scenarios::idle(connections).await,
        Scenario::Beacons { seconds, nodes } => scenarios::beacons(seconds, nodes).await,
        Scenario::Appends {
            database_url,
            clients,
            seconds,
            batch,
            without_sequencer,
        } => backplane::run(&database_url, clients, seconds, batch, !without_sequencer).await,
        Scenario::Latency { rate, seconds } => backplane::latency(rate, seconds).await,
        Scenario::Fanout {
            subscribers,
            events,
            directed: false,
        } => fanout::fanout(subscribers, events).await,
        Scenario::Fanout {
            subscribers,
            events,
            directed: true,
        } => fanout::directed(subscribers, events).await,
        Scenario::BareServer => bare::serve_forever().await,
        Scenario::ServeMuster => scenarios::serve_muster().await,
        Scenario::HoldIdle {
            url,
            token,
            connections,
            bare,
        } => scenarios::hold_idle(&url, &token, connections, bare).await,
    }
}
