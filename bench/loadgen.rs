//! Load generator and the fan-out, many-secrets and cold-start scenarios of issue 3, the
//! fan-out over mutual TLS with per-name authorization against plaintext, and the
//! recovery from faults of issue 12 (certwire killed and restarted, a reconnection
//! herd, an unreadable files root).
//!
//! One binary, three roles (see `Role`):
//! - the **coordinator** (`cargo bench --bench loadgen [-- OPTIONS]`) starts the servers
//!   under test as child processes, spawns worker processes, rotates secrets on disk and
//!   prints markdown tables (also written to `bench/out/loadgen.md`);
//! - **workers** (`loadgen worker`, re-executed by the coordinator) each hold up to a few
//!   thousand simulated proxies, one HTTP/2 connection per proxy, one SDS stream per
//!   secret, and report when each stream got a new version;
//! - the **baseline** (`loadgen naive-server`): a plain tonic SDS server with default
//!   settings that encodes a response per stream, the way a first implementation would.
//!
//! Build certwire first (`cargo build --release`); `cargo bench` also builds it. The
//! benchmark reports numbers and asserts nothing about them.

// The parts of the test harness (tests/common) this benchmark uses, included file by
// file so that the rest of the harness (Envoy, ACME, Kubernetes fixtures) stays out of
// this build. `files` refers to `super::pki`, hence the names at the crate root.
#[allow(dead_code)]
#[path = "../tests/common/files.rs"]
mod files;
#[allow(dead_code)]
#[path = "../tests/common/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "../tests/common/pki.rs"]
mod pki;
#[allow(dead_code)]
#[path = "../tests/common/util.rs"]
mod util;

#[path = "loadgen/client.rs"]
mod client;
#[path = "loadgen/cold_start.rs"]
mod cold_start;
#[path = "loadgen/fanout.rs"]
mod fanout;
#[path = "loadgen/faults.rs"]
mod faults;
#[path = "loadgen/fleet.rs"]
mod fleet;
#[path = "loadgen/many_secrets.rs"]
mod many_secrets;
#[path = "loadgen/mtls.rs"]
mod mtls;
#[path = "loadgen/naive_server.rs"]
mod naive_server;
#[path = "loadgen/node.rs"]
mod node;
#[path = "loadgen/perf.rs"]
mod perf;
#[path = "loadgen/proc.rs"]
mod proc;
#[path = "loadgen/proxy.rs"]
mod proxy;
#[path = "loadgen/report.rs"]
mod report;
#[path = "loadgen/secrets.rs"]
mod secrets;
#[path = "loadgen/server.rs"]
mod server;
#[path = "loadgen/stats.rs"]
mod stats;
#[path = "loadgen/worker.rs"]
mod worker;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "certwire fan-out, many-secrets and cold-start benchmarks")]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// Set by `cargo bench`; without it (e.g. `cargo test --all-targets`) nothing runs.
    #[arg(long, hide = true, global = true)]
    bench: bool,
    #[command(flatten)]
    options: Options,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// Internal: a worker process holding simulated proxies (config on stdin).
    Worker,
    /// Internal: the baseline, a plain tonic SDS server with default settings.
    NaiveServer {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        files: std::path::PathBuf,
    },
}

/// What to run and how big. Every option also reads an environment variable.
#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Scenarios, comma separated: fanout (certwire SotW), nodeonce (the same, the node
    /// with the first request only), workers1 (certwire --workers 1 SotW), baseline (naive
    /// server SotW), delta (certwire Delta), many, cold; not by default: mtls (certwire
    /// plaintext --authz open, mTLS --authz policy and mTLS --authz open back to back,
    /// SotW, node with every request), mtlsnodeonce (the same, node once), faults (the
    /// cases of --faults).
    #[arg(
        long,
        env = "LOADGEN_SCENARIOS",
        value_delimiter = ',',
        default_value = "fanout,nodeonce,workers1,baseline,delta,many,cold"
    )]
    pub scenarios: Vec<String>,
    /// Stream counts of the SotW fan-out (certwire and baseline).
    #[arg(long, env = "LOADGEN_SIZES", value_delimiter = ',', default_value = "1000,5000,10000,19000")]
    pub sizes: Vec<usize>,
    /// Of those, the stream counts at which the variants (workers1, nodeonce) run too:
    /// all four sizes for each would take the whole run past ten minutes.
    #[arg(long, env = "LOADGEN_VARIANT_SIZES", value_delimiter = ',', default_value = "1000,10000")]
    pub variant_sizes: Vec<usize>,
    /// Stream counts of the Delta fan-out.
    #[arg(long, env = "LOADGEN_DELTA_SIZES", value_delimiter = ',', default_value = "10000")]
    pub delta_sizes: Vec<usize>,
    /// Stream counts of the mtls and mtlsnodeonce scenarios (one connection each).
    #[arg(long, env = "LOADGEN_MTLS_SIZES", value_delimiter = ',', default_value = "1000,10000")]
    pub mtls_sizes: Vec<usize>,
    /// Cases of the faults scenario: kill (certwire killed with SIGKILL under load and
    /// restarted), herd (every proxy drops its connection and reconnects at once),
    /// unreadable (the files root chmod 000 for a while; needs root).
    #[arg(
        long,
        env = "LOADGEN_FAULTS",
        value_delimiter = ',',
        default_value = "kill,herd,unreadable",
        value_parser = faults::CASES
    )]
    pub faults: Vec<String>,
    /// Streams when certwire is killed: proxies with four secrets each.
    #[arg(long, env = "LOADGEN_FAULTS_STREAMS", default_value_t = 10_000)]
    pub faults_streams: usize,
    /// Proxies (one stream each) of the herd and of the unreadable files root.
    #[arg(long, env = "LOADGEN_FAULTS_PROXIES", default_value_t = 1_000)]
    pub faults_proxies: usize,
    /// How long certwire stays down between the SIGKILL and the restart (ms).
    #[arg(long, env = "LOADGEN_FAULTS_DOWNTIME_MS", default_value_t = 2_000)]
    pub faults_downtime_ms: u64,
    /// Rounds of the mtls scenarios: each runs the three setups once per size, in
    /// reverse order every other round.
    #[arg(long, env = "LOADGEN_MTLS_ROUNDS", default_value_t = 1)]
    pub mtls_rounds: usize,
    /// TLS version the mtls scenarios' clients offer: 1.2 (at most 1.2, what Envoy offers
    /// an upstream by default, e.g. its SDS cluster) or 1.3.
    #[arg(long, env = "LOADGEN_TLS_VERSION", default_value = "1.2", value_parser = ["1.2", "1.3"])]
    pub tls_version: String,
    /// Measured rotations per fan-out size (after one warm-up rotation).
    #[arg(long, env = "LOADGEN_ROTATIONS", default_value_t = 5)]
    pub rotations: usize,
    /// Secrets on disk for the many-secrets and cold-start scenarios.
    #[arg(long, env = "LOADGEN_SECRETS", default_value_t = 10_000)]
    pub secrets: usize,
    /// Proxies (connections) of the many-secrets scenario.
    #[arg(long, env = "LOADGEN_PROXIES", default_value_t = 1_000)]
    pub proxies: usize,
    /// Secrets (streams) per proxy in the many-secrets scenario.
    #[arg(long, env = "LOADGEN_PER_PROXY", default_value_t = 10)]
    pub per_proxy: usize,
    /// Secrets rotated at once per many-secrets round.
    #[arg(long, env = "LOADGEN_ROTATE", default_value_t = 100)]
    pub rotate: usize,
    /// Measured many-secrets rounds (after one warm-up round).
    #[arg(long, env = "LOADGEN_ROUNDS", default_value_t = 3)]
    pub rounds: usize,
    /// Cold starts timed (plus one more for the memory figure).
    #[arg(long, env = "LOADGEN_COLD_RUNS", default_value_t = 3)]
    pub cold_runs: usize,
    /// Most connections per worker process (each process may hold 20,000 files).
    #[arg(long, env = "LOADGEN_PER_WORKER", default_value_t = 5_000)]
    pub per_worker: usize,
    /// Pin the servers to CPU 0 and the clients (workers and coordinator) to CPU 1.
    #[arg(long, env = "LOADGEN_PIN")]
    pub pin: bool,
    /// `perf record --call-graph dwarf` certwire during the SotW fan-out rotations of this
    /// size; the profile goes to bench/out/perf-fanout-N.data.
    #[arg(long, env = "LOADGEN_PERF_AT")]
    pub perf_at: Option<usize>,
    /// `perf record` certwire during the many-secrets rounds (bench/out/perf-many.data).
    #[arg(long, env = "LOADGEN_PERF_MANY")]
    pub perf_many: bool,
    /// One extra cold start under `perf record` (bench/out/perf-cold.data), not measured.
    #[arg(long, env = "LOADGEN_PERF_COLD")]
    pub perf_cold: bool,
    /// The report's file in bench/out, without `.md` [default: loadgen, or loadgen-pinned
    /// with --pin, or faults when faults is the only scenario].
    #[arg(long, env = "LOADGEN_OUT", value_name = "NAME")]
    pub out: Option<String>,
    /// The certwire binary (default: the one cargo built for this bench, i.e.
    /// target/release/certwire under `cargo bench`).
    #[arg(long, env = "CERTWIRE_BIN")]
    pub certwire: Option<std::path::PathBuf>,
}

impl Options {
    pub fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s.trim() == scenario)
    }

    pub fn tls13(&self) -> bool {
        self.tls_version == "1.3"
    }
}

fn main() {
    let cli = Cli::parse();
    match cli.role {
        Some(Role::Worker) => worker::main(),
        Some(Role::NaiveServer { listen, files }) => naive_server::main(listen, &files),
        None if cli.bench => report::main(cli.options),
        None => println!("loadgen: a benchmark; run it with `cargo bench --bench loadgen` (`-- --help` for options)"),
    }
}
