//! Rotation to served: a kubelet-style `..data` swap in a secret directory -> a real
//! Envoy presents the new certificate on a fresh TLS handshake.
//!
//! Two setups run side by side in one invocation, interleaved rotation by rotation
//! (the order alternates) so the noise of this shared machine hits both alike:
//!
//! - **certwire**: `certwire serve --files ROOT_A`, one Envoy taking secret `web` from
//!   it over SDS (gRPC, state of the world);
//! - **file watch** (baseline): another Envoy reading `ROOT_B/web` itself through
//!   `path_config_source` + `watched_directory`.
//!
//! The clock starts right before the `rename(2)` of `..data_tmp` over `..data` (the
//! step that completes the swap) and stops when a handshake returns the new serial.
//! Handshakes are polled back to back, each a full handshake on a new TCP connection. A rotation
//! not served within [`CAP`] counts as a timeout. certwire's own
//! `certwire_change_to_push_seconds` histogram is read before and after every
//! certwire rotation, which splits its latency into certwire's part (change noticed ->
//! response handed to the stream) and the rest (inotify delivery, Envoy applying the
//! secret, the probe).
//!
//! Run with `cargo bench --bench rotation` (`ROTATIONS=N`, default 30); see
//! bench/README.md. It reports numbers and asserts nothing about them.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use common::bootstrap::{SdsBootstrap, SdsTarget, file_watch_bootstrap};
use common::certwire::{Certwire, certwire_bin, sum_samples};
use common::envoy::{Envoy, envoy_bin};
use common::files::{SecretDir, tls_files};
use common::pki::{self, Ca, Issued};
use common::{tls, util};

/// Rotations per setup unless `ROTATIONS` says otherwise.
const DEFAULT_ROTATIONS: usize = 30;
/// Rotations per setup before measuring, not counted (first connections, caches).
const WARMUP: usize = 3;
/// Longest wait for one rotation to be served; longer is reported as a timeout.
const CAP: Duration = Duration::from_secs(10);
/// Quiet time between rotations (plus jitter up to the same again), so that ACKs,
/// old-directory cleanup and connection teardown of one rotation are over before the
/// next starts, and rotations do not phase-lock with periodic work in either process.
const PAUSE: Duration = Duration::from_millis(150);
const SECRET: &str = "web";
const SNI: &str = "rotation.bench.test";
const HISTOGRAM: &str = "certwire_change_to_push_seconds";

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` (or a test runner
    // listing tests) runs this binary without it, and must not start a benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("rotation: a benchmark; run it with `cargo bench --bench rotation`");
        return;
    }
    let rotations = match std::env::var("ROTATIONS") {
        Ok(text) => text.trim().parse::<usize>().ok().filter(|n| *n > 0).unwrap_or_else(|| {
            eprintln!("ROTATIONS must be a positive integer, got {text:?}");
            std::process::exit(2)
        }),
        Err(_) => DEFAULT_ROTATIONS,
    };
    // certwire as it runs in production (the harness would default to debug logs).
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: no other thread exists yet; the runtime is built below.
        unsafe { std::env::set_var("RUST_LOG", "info") };
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let report = runtime.block_on(run(rotations));

    println!("{report}");
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/out");
    let out = out_dir.join("rotation.md");
    std::fs::create_dir_all(&out_dir).unwrap_or_else(|e| panic!("create {}: {e}", out_dir.display()));
    std::fs::write(&out, &report).unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
    eprintln!("wrote {}", out.display());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Certwire,
    FileWatch,
}

/// One setup under test: a secret directory and the Envoy listener that serves it.
struct Target {
    setup: Setup,
    dir: PathBuf,
    listener: std::net::SocketAddr,
    generation: u64,
    samples: Vec<Sample>,
}

#[derive(Debug, Default)]
struct Sample {
    /// Rename -> first handshake with the new serial; `None` for a timeout.
    latency: Option<Duration>,
    /// Handshakes that completed with the old serial or failed, before the new one.
    stale_polls: u32,
    failed_polls: u32,
    /// Duration of every handshake of this rotation (probe cost).
    poll_costs: Vec<Duration>,
    /// certwire only: deltas of the histogram's (sum seconds, count) over the rotation.
    internal: Option<(f64, f64)>,
    last_seen: String,
}

async fn run(rotations: usize) -> String {
    let load_before = loadavg();
    let started = Instant::now();
    let bin = certwire_bin();
    let profile = if bin.components().any(|c| c.as_os_str() == "release") {
        "release"
    } else {
        eprintln!("warning: {} is not a release build; numbers are not representative", bin.display());
        "debug (NOT representative)"
    };
    eprintln!("certwire binary: {} ({profile})", bin.display());

    let ca = Ca::new("certwire bench CA");
    // Every certificate is minted up front: key generation stays out of the loop.
    let leaves: Vec<Issued> = (0..2 * (rotations + WARMUP + 1)).map(|_| ca.server(SNI)).collect();
    let mut leaves = leaves.into_iter();

    let work = util::tempdir();
    let root_a = work.path().join("certwire-root");
    let root_b = work.path().join("filewatch-root");
    for root in [&root_a, &root_b] {
        std::fs::create_dir_all(root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
    }
    let first_a = leaves.next().expect("leaf");
    let first_b = leaves.next().expect("leaf");
    let dir_a = SecretDir::create_tls(&root_a, SECRET, &first_a, None);
    let dir_b = SecretDir::create_tls(&root_b, SECRET, &first_b, None);

    // (a) certwire over SDS.
    let sds = SdsTarget::Tcp(util::free_addr());
    let certwire = Certwire::serve([
        "--listen".to_string(),
        sds.listen_arg(),
        "--files".to_string(),
        root_a.display().to_string(),
    ])
    .await;
    let port_a = util::free_port();
    let envoy_a = Envoy::start(&SdsBootstrap::new(SECRET, sds, port_a).node("bench-certwire", "bench").to_yaml()).await;
    let addr_a = std::net::SocketAddr::from(([127, 0, 0, 1], port_a));

    // (b) Envoy's own file watch on the same kind of directory.
    let port_b = util::free_port();
    let envoy_b = Envoy::start(&file_watch_bootstrap(work.path(), SECRET, dir_b.path(), port_b, false)).await;
    let addr_b = std::net::SocketAddr::from(([127, 0, 0, 1], port_b));

    tls::wait_served_serial(addr_a, SNI, &first_a.serial_hex, util::WAIT).await;
    tls::wait_served_serial(addr_b, SNI, &first_b.serial_hex, util::WAIT).await;
    eprintln!("both listeners serve their first certificate; {WARMUP} warm-up + {rotations} rotations each");

    let mut a = Target {
        setup: Setup::Certwire,
        dir: dir_a.path().to_owned(),
        listener: addr_a,
        generation: 0,
        samples: Vec::new(),
    };
    let mut b = Target {
        setup: Setup::FileWatch,
        dir: dir_b.path().to_owned(),
        listener: addr_b,
        generation: 0,
        samples: Vec::new(),
    };
    let mut jitter = Jitter::new();
    let probe = Probe::new(&ca);

    for round in 0..WARMUP + rotations {
        let order: [&mut Target; 2] = if round % 2 == 0 { [&mut a, &mut b] } else { [&mut b, &mut a] };
        for target in order {
            let leaf = leaves.next().expect("enough leaves were minted");
            let sample = rotate(target, &leaf, &certwire, &probe).await;
            if let Some(latency) = sample.latency {
                eprintln!("{:>3} {:<9} {:>8.3} ms", round, label(target.setup), ms(latency));
            } else {
                eprintln!("{:>3} {:<9} TIMEOUT (last: {})", round, label(target.setup), sample.last_seen);
            }
            if round >= WARMUP {
                target.samples.push(sample);
            }
            tokio::time::sleep(PAUSE + jitter.next(PAUSE)).await;
        }
    }

    let context = Context {
        rotations,
        profile,
        certwire_bin: bin,
        envoy_version: envoy_version(),
        load_before,
        load_after: loadavg(),
        wall: started.elapsed(),
    };
    // Keep every process alive until the last rotation is measured.
    drop((envoy_a, envoy_b, certwire, dir_a, dir_b));
    render(&context, &a, &b)
}

/// One rotation: swap the directory to `leaf`, then poll handshakes until it is served.
async fn rotate(target: &mut Target, leaf: &Issued, certwire: &Certwire, probe: &Probe) -> Sample {
    let before = match target.setup {
        Setup::Certwire => Some(histogram(certwire).await),
        Setup::FileWatch => None,
    };
    target.generation += 1;
    let t0 = kubelet_swap(&target.dir, target.generation, &tls_files(leaf, None));
    let deadline = t0 + CAP;

    let mut sample = Sample::default();
    loop {
        let poll_start = Instant::now();
        let result = probe.serial(target.listener).await;
        let now = Instant::now();
        sample.poll_costs.push(now - poll_start);
        match result {
            Ok(serial) if serial == leaf.serial_hex => {
                sample.latency = Some(now - t0);
                break;
            }
            Ok(serial) => {
                sample.stale_polls += 1;
                sample.last_seen = format!("serial {serial}");
            }
            Err(err) => {
                sample.failed_polls += 1;
                sample.last_seen = format!("{err:#}");
                // A refused connection returns at once: do not spin on a broken listener.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if now >= deadline {
            break;
        }
    }

    if let Some((sum0, count0)) = before {
        let (sum1, count1) = histogram(certwire).await;
        sample.internal = Some((sum1 - sum0, count1 - count0));
    }
    sample
}

/// The kubelet's atomic update of `dir` (a [`SecretDir`]): a new hidden directory with
/// `files`, a `..data_tmp` symlink to it renamed over `..data`, then the old directory
/// removed. Returns the instant taken right before the rename.
///
/// `SecretDir::swap` does the same but has no hook at the rename, so timing it would
/// include writing the new files.
fn kubelet_swap(dir: &Path, generation: u64, files: &[(&str, &[u8])]) -> Instant {
    let data = dir.join("..data");
    let old = std::fs::read_link(&data).unwrap_or_else(|e| panic!("read {}: {e}", data.display()));
    let new_name = format!("..bench_{generation:06}");
    let new_dir = dir.join(&new_name);
    std::fs::create_dir(&new_dir).unwrap_or_else(|e| panic!("create {}: {e}", new_dir.display()));
    for (name, contents) in files {
        let path = new_dir.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&new_name, &tmp).expect("symlink ..data_tmp");

    let t0 = Instant::now();
    std::fs::rename(&tmp, &data).expect("rename ..data_tmp over ..data");

    let old_dir = dir.join(old);
    std::fs::remove_dir_all(&old_dir).unwrap_or_else(|e| panic!("remove {}: {e}", old_dir.display()));
    t0
}

/// A handshake-only probe: a new TCP connection with `TCP_NODELAY`, a full TLS
/// handshake (no session resumption, so the server always presents its current
/// certificate, checked against the bench CA), the leaf's serial, close.
///
/// `common::tls::handshake` also sends a `GET /` and leaves Nagle on: its request
/// waits for the ACK of the client's Finished, which the server delays by ~40 ms, so
/// each of its handshakes costs ~44 ms and would quantize every latency here.
struct Probe {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl Probe {
    fn new(ca: &Ca) -> Probe {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(ca.cert.der.clone())).expect("the bench CA is a valid root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = Resumption::disabled();
        Probe {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: ServerName::try_from(SNI).expect("SNI is a DNS name"),
        }
    }

    /// The serial (lowercase hex) of the leaf `addr` presents on a fresh handshake.
    async fn serial(&self, addr: std::net::SocketAddr) -> anyhow::Result<String> {
        let attempt = async {
            let tcp = TcpStream::connect(addr).await.context("connect")?;
            tcp.set_nodelay(true).context("TCP_NODELAY")?;
            let tls = self.connector.connect(self.server_name.clone(), tcp).await.context("TLS handshake")?;
            let (_, conn) = tls.get_ref();
            let leaf = conn.peer_certificates().and_then(|c| c.first()).context("no server certificate")?;
            Ok(pki::serial_hex(leaf))
        };
        tokio::time::timeout(Duration::from_secs(5), attempt).await.context("probe timed out")?
    }
}

/// (sum in seconds, count) of certwire's change-to-push histogram.
async fn histogram(certwire: &Certwire) -> (f64, f64) {
    let text = certwire.metrics().await;
    (sum_samples(&text, &format!("{HISTOGRAM}_sum"), &[]), sum_samples(&text, &format!("{HISTOGRAM}_count"), &[]))
}

struct Context {
    rotations: usize,
    profile: &'static str,
    certwire_bin: PathBuf,
    envoy_version: String,
    load_before: String,
    load_after: String,
    wall: Duration,
}

/// Summary of a list of milliseconds.
struct Summary {
    n: usize,
    median: f64,
    p90: f64,
    min: f64,
    max: f64,
    mean: f64,
}

impl Summary {
    fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        // Nearest rank.
        let p90 = sorted[((0.9 * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Summary {
            n,
            median,
            p90,
            min: sorted[0],
            max: sorted[n - 1],
            mean: sorted.iter().sum::<f64>() / n as f64,
        })
    }

    fn row(&self) -> String {
        format!("{:.3} | {:.3} | {:.3} | {:.3} | {:.3}", self.median, self.p90, self.min, self.max, self.mean)
    }
}

fn render(context: &Context, a: &Target, b: &Target) -> String {
    let latencies = |t: &Target| -> Vec<f64> { t.samples.iter().filter_map(|s| s.latency).map(ms).collect() };
    let timeouts = |t: &Target| t.samples.iter().filter(|s| s.latency.is_none()).count();
    let (lat_a, lat_b) = (latencies(a), latencies(b));
    let (sum_a, sum_b) = (Summary::of(&lat_a), Summary::of(&lat_b));

    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "# Rotation to served: certwire vs Envoy's own file watch\n");
    let _ = writeln!(w, "| | |\n| --- | --- |");
    let _ = writeln!(w, "| machine | {} cores (nproc), {} |", nproc(), cpu_model());
    let _ = writeln!(w, "| load average before / after | {} / {} |", context.load_before, context.load_after);
    let _ = writeln!(w, "| commit | {} |", git_commit());
    let _ = writeln!(w, "| Envoy | {} |", context.envoy_version);
    let _ = writeln!(w, "| certwire binary | `{}` ({}) |", context.certwire_bin.display(), context.profile);
    let _ = writeln!(
        w,
        "| command | `ROTATIONS={} cargo bench --bench rotation` (process: `{}`) |",
        context.rotations,
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let _ = writeln!(
        w,
        "| method | {} warm-up + {} rotations per setup, interleaved (order alternates), {}-{} ms apart; \
         clock from the `..data` rename to the end of the first fresh handshake (new TCP connection, \
         TCP_NODELAY, full TLS handshake, no resumption) presenting the new serial; handshakes back to back; cap {} s = timeout |",
        WARMUP,
        context.rotations,
        PAUSE.as_millis(),
        2 * PAUSE.as_millis(),
        CAP.as_secs()
    );
    let _ = writeln!(w, "| wall time | {:.1} s |", context.wall.as_secs_f64());

    let _ = writeln!(w, "\n## Rotation -> served (ms)\n");
    let _ = writeln!(w, "| setup | served | timeouts | median | p90 | min | max | mean |");
    let _ = writeln!(w, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (target, summary) in [(a, &sum_a), (b, &sum_b)] {
        let row = summary.as_ref().map_or_else(|| "- | - | - | - | -".to_string(), Summary::row);
        let _ = writeln!(
            w,
            "| {} | {} | {} | {row} |",
            describe(target.setup),
            summary.as_ref().map_or(0, |s| s.n),
            timeouts(target)
        );
    }
    if let (Some(sa), Some(sb)) = (&sum_a, &sum_b) {
        let _ = writeln!(w);
        let _ = writeln!(w, "- ratio of medians certwire / baseline: **{:.2}x**", sa.median / sb.median);
        let _ = writeln!(w, "- difference of medians certwire - baseline: **{:+.3} ms**", sa.median - sb.median);
        // Rotation i of each setup ran back to back: their difference cancels slow drift.
        let paired: Vec<f64> =
            a.samples.iter().zip(&b.samples).filter_map(|(x, y)| Some(ms(x.latency?) - ms(y.latency?))).collect();
        if let Some(p) = Summary::of(&paired) {
            let _ =
                writeln!(w, "- median of paired differences (rotation i, certwire - baseline): {:+.3} ms", p.median);
        }
    }

    let _ = writeln!(w, "\n## Where certwire's time goes (ms)\n");
    let internal: Vec<(f64, f64, Option<f64>)> =
        a.samples.iter().filter_map(|s| s.internal.map(|(sum, count)| (sum, count, s.latency.map(ms)))).collect();
    let total_sum: f64 = internal.iter().map(|(s, _, _)| s).sum();
    let total_count: f64 = internal.iter().map(|(_, c, _)| c).sum();
    // Per rotation with exactly one push: that push's change-to-push, and the rest.
    let single: Vec<(f64, f64)> = internal
        .iter()
        .filter(|(_, c, _)| (*c - 1.0).abs() < f64::EPSILON)
        .filter_map(|(s, _, l)| l.map(|l| (s * 1000.0, l - s * 1000.0)))
        .collect();
    let _ = writeln!(
        w,
        "`{HISTOGRAM}` (source noticed the change -> response handed to the stream), \
         read from certwire's /metrics before and after every certwire rotation: \
         {total_count} pushes over {} rotations, mean **{}** ms.\n",
        internal.len(),
        if total_count > 0.0 { format!("{:.3}", total_sum * 1000.0 / total_count) } else { "-".into() }
    );
    let _ = writeln!(w, "| part | n | median | p90 | min | max | mean |");
    let _ = writeln!(w, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let parts = [
        ("certwire: change noticed -> push", single.iter().map(|(i, _)| *i).collect::<Vec<_>>()),
        (
            "rest: rename -> inotify, Envoy applies the secret, probe",
            single.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
        ),
    ];
    for (name, values) in parts {
        if let Some(s) = Summary::of(&values) {
            let _ = writeln!(w, "| {name} | {} | {} |", s.n, s.row());
        }
    }
    let odd = internal.iter().filter(|(_, c, _)| (*c - 1.0).abs() >= f64::EPSILON).count();
    if odd > 0 {
        let _ = writeln!(w, "\n{odd} certwire rotation(s) did not record exactly one push and are left out above.");
    }

    let _ = writeln!(w, "\n## Probe\n");
    let _ = writeln!(w, "| setup | handshakes per rotation (median) | handshake cost median ms | failed handshakes |");
    let _ = writeln!(w, "| --- | ---: | ---: | ---: |");
    for target in [a, b] {
        let per_rotation: Vec<f64> =
            target.samples.iter().map(|s| f64::from(s.stale_polls + s.failed_polls + 1)).collect();
        let costs: Vec<f64> = target.samples.iter().flat_map(|s| s.poll_costs.iter().copied().map(ms)).collect();
        let failed: u32 = target.samples.iter().map(|s| s.failed_polls).sum();
        let _ = writeln!(
            w,
            "| {} | {:.0} | {:.3} | {failed} |",
            label(target.setup),
            Summary::of(&per_rotation).map_or(0.0, |s| s.median),
            Summary::of(&costs).map_or(0.0, |s| s.median)
        );
    }
    let _ = writeln!(
        w,
        "\nThe end of the first handshake that shows the new serial bounds the served moment from \
         above by at most one handshake cost, in both setups alike."
    );
    out
}

fn label(setup: Setup) -> &'static str {
    match setup {
        Setup::Certwire => "certwire",
        Setup::FileWatch => "baseline",
    }
}

fn describe(setup: Setup) -> &'static str {
    match setup {
        Setup::Certwire => "(a) certwire `serve --files`, Envoy over SDS (SotW)",
        Setup::FileWatch => "(b) baseline: Envoy file watch (`watched_directory`)",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown (no git)".into();
    };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{head} + uncommitted changes"),
        _ => head,
    }
}

fn envoy_version() -> String {
    let output = Command::new(envoy_bin()).arg("--version").output();
    output
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .map(|v| v.split_once("version:").map_or(v.clone(), |(_, rest)| rest.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// Small deterministic jitter (xorshift), enough to keep rotations off any period.
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        Jitter(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()))
    }

    fn next(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        max.mul_f64((self.0 % 1000) as f64 / 1000.0)
    }
}
