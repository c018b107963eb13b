//! Cold start: from spawning certwire to every file secret being ready to serve, and
//! the memory it then holds per stored secret.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::Options;
use crate::pki::Ca;
use crate::secrets::{self, SecretSet};
use crate::server::{Launcher, Server};
use crate::stats::median;

/// Readiness is polled this often (a fresh TCP connection per poll).
const READY_POLL: Duration = Duration::from_millis(5);
const STATUS_POLL: Duration = Duration::from_millis(20);
const START_LIMIT: Duration = Duration::from_secs(120);
/// Time for the allocator and the runtime to settle before RSS is read.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Row {
    pub secrets: usize,
    /// Medians over runs, ms.
    pub ready_ms: f64,
    pub all_listed_ms: f64,
    pub runs: usize,
    pub rss_kib: u64,
    pub rss_empty_kib: u64,
    /// RSS with a tenth of the secrets: the code and tables that loading any secret
    /// brings in are then resident too, so the difference is what each secret adds.
    pub small_secrets: usize,
    pub rss_small_kib: u64,
    pub pem_bytes_per_secret: f64,
}

impl Row {
    /// Against certwire with no secret at all: includes once-only costs (code paged in
    /// by the first load) spread over the secrets.
    pub fn rss_per_secret_kib(&self) -> f64 {
        self.rss_kib.saturating_sub(self.rss_empty_kib) as f64 / self.secrets.max(1) as f64
    }

    /// What one more stored secret costs: the slope between a tenth of the secrets and
    /// all of them.
    pub fn marginal_per_secret_kib(&self) -> f64 {
        let added = self.secrets.saturating_sub(self.small_secrets).max(1);
        self.rss_kib.saturating_sub(self.rss_small_kib) as f64 / added as f64
    }
}

pub async fn run(launcher: &Launcher, opts: &Options, root: &Path, set: &SecretSet, ca: &Ca) -> anyhow::Result<Row> {
    let n = set.names.len();
    eprintln!("== cold start: {n} secrets");
    let empty = crate::util::tempdir();
    let rss_empty_kib = settled_rss(launcher, empty.path()).await?;
    let small_secrets = n / 10;
    let small = crate::util::tempdir();
    secrets::create_set(small.path(), ca, "t", small_secrets);
    let rss_small_kib = settled_rss(launcher, small.path()).await?;

    let mut ready = Vec::new();
    let mut listed = Vec::new();
    for run in 0..opts.cold_runs {
        let mut server = launcher.certwire(root)?;
        let at_ready = server.poll_admin("/readyz", START_LIMIT, READY_POLL).await?;
        let at_listed = wait_all_listed(&server, n).await?;
        let ready_ms = (at_ready - server.spawned).as_secs_f64() * 1e3;
        let listed_ms = (at_listed - server.spawned).as_secs_f64() * 1e3;
        eprintln!("   run {run}: /readyz 200 after {ready_ms:.0} ms, all {n} listed after {listed_ms:.0} ms");
        ready.push(ready_ms);
        listed.push(listed_ms);
        server.stop().await;
    }

    if opts.perf_cold {
        let mut server = launcher.certwire(root)?;
        let perf = crate::perf::Perf::attach(server.pid, "cold")?;
        server.poll_admin("/readyz", START_LIMIT, READY_POLL).await?;
        perf.stop().await;
        server.stop().await;
    }

    // Memory on a run of its own: the status polls above allocate large JSON bodies
    // that the allocator may keep.
    let mut server = launcher.certwire(root)?;
    server.poll_admin("/readyz", START_LIMIT, READY_POLL).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_kib = server.rss_kib();
    wait_all_listed(&server, n).await?;
    server.stop().await;

    Ok(Row {
        secrets: n,
        ready_ms: median(ready.iter().copied()),
        all_listed_ms: median(listed.iter().copied()),
        runs: ready.len(),
        rss_kib,
        rss_empty_kib,
        small_secrets,
        rss_small_kib,
        pem_bytes_per_secret: set.pem_bytes as f64 / n.max(1) as f64,
    })
}

/// RSS of certwire serving `root`, once ready and settled.
async fn settled_rss(launcher: &Launcher, root: &Path) -> anyhow::Result<u64> {
    let mut server = launcher.certwire(root)?;
    server.poll_admin("/readyz", START_LIMIT, READY_POLL).await?;
    tokio::time::sleep(SETTLE).await;
    let rss = server.rss_kib();
    server.stop().await;
    Ok(rss)
}

/// Polls `/status/secrets` until `n` secrets have a version; returns when one answer
/// showed them all (an upper bound of the moment it became true).
async fn wait_all_listed(server: &Server, n: usize) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if let Ok(all) = server.secrets_status().await {
            let with_version = all.iter().filter(|s| s["version"].is_string()).count();
            if with_version >= n {
                return Ok(Instant::now());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "fewer than {n} secrets listed after {START_LIMIT:?}");
        tokio::time::sleep(STATUS_POLL).await;
    }
}
