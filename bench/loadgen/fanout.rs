//! Fan-out: one secret, N streams each on its own connection; rotate it (a kubelet
//! `..data` swap) a few times and measure how long until every stream has the new
//! version, what the server spent, and what it holds per idle stream.

use std::time::Duration;

use anyhow::Context as _;

use crate::Options;
use crate::client::Protocol;
use crate::files::SecretDir;
use crate::fleet::{Fleet, FleetSpec};
use crate::mtls::Security;
use crate::perf::Perf;
use crate::pki::{Ca, Issued};
use crate::proc::system_time_us;
use crate::secrets::{self, leaf};
use crate::server::{Kind, Launcher, Server};
use crate::stats::{Spread, median};

const SECRET: &str = "web";
/// Rotations before measuring, not counted (first allocations, caches).
const WARMUP: usize = 1;
/// After the last stream has the version: time for its ACK to reach the server
/// before the CPU figure is taken.
const SETTLE: Duration = Duration::from_millis(100);
/// Quiet time between rotations.
const PAUSE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
pub struct Row {
    pub kind: Kind,
    pub protocol: Protocol,
    /// The clients sent the node with every request (Envoy's default), else with the first.
    pub node_every_request: bool,
    /// Plaintext or mutual TLS, and the authorization mode.
    pub security: Security,
    pub streams: usize,
    /// Medians over rotations, µs.
    pub last_from_detect: f64,
    pub last_from_change: f64,
    pub p50: f64,
    pub p99: f64,
    pub cpu_per_stream: f64,
    /// Every client worker together, µs per stream per rotation.
    pub client_cpu_per_stream: f64,
    /// KiB, idle streams before the first rotation.
    pub rss_per_stream: f64,
    /// KiB, idle streams again after the rotations: buffers touched by traffic count.
    pub rss_after_per_stream: f64,
    pub connect_s: f64,
    /// Opening the N connections and streams up to every first response (s).
    pub setup_s: f64,
    /// Over that setup, per connection (µs): the server's CPU and every client's.
    pub setup_server_cpu_per_conn: f64,
    pub setup_client_cpu_per_conn: f64,
    /// What the TLS handshakes negotiated.
    pub tls: Option<String>,
    /// With `--authz policy`: what [`crate::mtls::check_authz`] found.
    pub authz_check: Option<String>,
    pub missing: usize,
}

/// The clients: their protocol, and whether each request carries the node.
#[derive(Debug, Clone, Copy)]
pub struct Clients {
    pub protocol: Protocol,
    pub node_every_request: bool,
}

impl Clients {
    /// As Envoy does by default.
    pub const fn envoy(protocol: Protocol) -> Self {
        Self { protocol, node_every_request: true }
    }

    pub fn label(self) -> String {
        let node = if self.node_every_request { "" } else { ", node once" };
        format!("{}{node}", self.protocol.label())
    }
}

pub async fn run(
    launcher: &Launcher,
    opts: &Options,
    kind: Kind,
    clients: Clients,
    security: Security,
    n: usize,
) -> anyhow::Result<Row> {
    let Clients { protocol, node_every_request } = clients;
    let listener = if security == Security::Default { String::new() } else { format!(" {}", security.label()) };
    eprintln!("== fan-out: {} {}{listener} N={n}", kind.label(), clients.label());
    let dir = crate::util::tempdir();
    let root = dir.path().join("secrets");
    std::fs::create_dir_all(&root)?;
    let ca = Ca::new("loadgen fan-out CA");
    SecretDir::create_tls(&root, SECRET, &leaf(&ca, SECRET), None);
    // Minted up front: key generation stays out of the measured loop.
    let leaves: Vec<Issued> = (0..WARMUP + opts.rotations).map(|_| leaf(&ca, SECRET)).collect();

    let (server_args, tls) = security.server_args(dir.path(), SECRET, opts.tls13())?;
    let mut server = match kind {
        Kind::Certwire { workers } => {
            let mut s = launcher.certwire_args(workers, &root, &server_args)?;
            s.wait_healthy().await?;
            s.poll_admin("/readyz", Duration::from_secs(30), Duration::from_millis(10)).await?;
            s
        }
        Kind::Naive => {
            anyhow::ensure!(security == Security::Default, "the baseline serves plaintext only");
            launcher.naive(&root).await?
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.rss_kib();
    let spec = FleetSpec {
        target: server.sds,
        protocol,
        conns: vec![vec![SECRET.to_owned()]; n],
        node_every_request,
        tls: tls.clone(),
        server_pid: server.pid,
        per_worker: opts.per_worker,
        min_workers: 2,
        pin: launcher.pin,
        reconnect: false,
    };
    let mut fleet = Fleet::start(spec).await?;
    let setup = fleet.setup;
    eprintln!(
        "   {} streams on {} connections ready in {:.1} s (setup {:.2} s, {:.0} conn/s, server {:.1} µs/conn, \
         clients {:.1} µs/conn{})",
        fleet.streams,
        fleet.conns,
        fleet.connect_time.as_secs_f64(),
        setup.wall.as_secs_f64(),
        n as f64 / setup.wall.as_secs_f64(),
        setup.server_cpu_us / n as f64,
        setup.client_cpu_us / n as f64,
        fleet.tls.as_deref().map(|t| format!(", {t}")).unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = server.rss_kib();

    let perf = match opts.perf_at {
        Some(at)
            if at == n
                && kind == Kind::CERTWIRE
                && protocol == Protocol::Sotw
                && node_every_request
                && security == Security::Default =>
        {
            Some(Perf::start(server.pid, &format!("fanout-{n}")).await?)
        }
        _ => None,
    };
    let mut samples = Vec::new();
    let secret_dir = root.join(SECRET);
    for (round, leaf) in leaves.iter().enumerate() {
        let sample = rotate(&mut server, &mut fleet, &secret_dir, round, leaf).await?;
        eprintln!(
            "   rotation {round}: last {:.1} ms from detected ({:.1} ms from rename), p50 {:.1} ms, p99 {:.1} ms, \
             CPU {:.1} µs/stream (clients {:.1}), missing {}",
            sample.spread.max / 1e3,
            sample.last_from_change / 1e3,
            sample.spread.p50 / 1e3,
            sample.spread.p99 / 1e3,
            sample.cpu_us / n as f64,
            sample.client_cpu_us / n as f64,
            sample.missing
        );
        if round >= WARMUP {
            samples.push(sample);
        }
        tokio::time::sleep(PAUSE).await;
    }
    if let Some(perf) = perf {
        perf.stop().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = server.rss_kib();
    let connect_s = fleet.connect_time.as_secs_f64();
    let authz_check = match (&tls, security) {
        (Some(side), Security::MtlsPolicy) => {
            let check = crate::mtls::check_authz(&server, side, SECRET).await?;
            eprintln!("   authorization: {check}");
            Some(check)
        }
        _ => None,
    };
    let negotiated = fleet.tls.clone();
    fleet.shutdown().await;
    server.stop().await;

    Ok(Row {
        kind,
        protocol,
        node_every_request,
        security,
        streams: n,
        last_from_detect: median(samples.iter().map(|s| s.spread.max)),
        last_from_change: median(samples.iter().map(|s| s.last_from_change)),
        p50: median(samples.iter().map(|s| s.spread.p50)),
        p99: median(samples.iter().map(|s| s.spread.p99)),
        cpu_per_stream: median(samples.iter().map(|s| s.cpu_us / n as f64)),
        client_cpu_per_stream: median(samples.iter().map(|s| s.client_cpu_us / n as f64)),
        rss_per_stream: rss_idle.saturating_sub(rss_before) as f64 / n as f64,
        rss_after_per_stream: rss_after.saturating_sub(rss_before) as f64 / n as f64,
        connect_s,
        setup_s: setup.wall.as_secs_f64(),
        setup_server_cpu_per_conn: setup.server_cpu_us / n as f64,
        setup_client_cpu_per_conn: setup.client_cpu_us / n as f64,
        tls: negotiated,
        authz_check,
        missing: samples.iter().map(|s| s.missing).sum(),
    })
}

struct Sample {
    /// Per stream, from the server noticing the change.
    spread: Spread,
    /// Last stream, from right before the rename.
    last_from_change: f64,
    cpu_us: f64,
    client_cpu_us: f64,
    missing: usize,
}

async fn rotate(
    server: &mut Server,
    fleet: &mut Fleet,
    secret_dir: &std::path::Path,
    round: usize,
    leaf: &Issued,
) -> anyhow::Result<Sample> {
    fleet.arm(round, &[SECRET.to_owned()]).await?;
    let cpu_before = server.cpu();
    let client_before = fleet.cpu();
    let swap = secrets::prepare(secret_dir, leaf)?;
    let changed_us = system_time_us(swap.commit()?);
    swap.cleanup();
    let reloaded = match server.kind {
        Kind::Naive => Some(server.reload().await?),
        Kind::Certwire { .. } => None,
    };
    let got = fleet.collect(round).await?;
    tokio::time::sleep(SETTLE).await;
    let cpu_us = cpu_before.used_us_until(&server.cpu());
    let client_cpu_us = crate::proc::used_us(&client_before, &fleet.cpu());
    let detected_us = match reloaded {
        Some(t) => t,
        None => detected_us(server, SECRET).await?,
    };
    let mut from_detect: Vec<f64> = got.arrivals.iter().map(|a| (a.at_us - detected_us) as f64).collect();
    let last_from_change = got.arrivals.iter().map(|a| a.at_us - changed_us).max().unwrap_or(0) as f64;
    let spread = Spread::of(&mut from_detect).context("no stream got the new version")?;
    Ok(Sample { spread, last_from_change, cpu_us, client_cpu_us, missing: got.missing })
}

/// certwire's `detected_unix_us` of the version it now serves for `name`.
pub async fn detected_us(server: &Server, name: &str) -> anyhow::Result<i64> {
    let all = server.secrets_status().await?;
    all.iter()
        .find(|s| s["name"].as_str() == Some(name))
        .and_then(|s| s["detected_unix_us"].as_i64())
        .with_context(|| format!("/status/secrets has no detected_unix_us for {name}"))
}
