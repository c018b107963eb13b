//! Faults (issue 12, part 7, the fault matrix): how certwire and a fleet of proxies
//! recover when certwire is killed and restarted under load, when every proxy drops
//! its connection and reconnects at the same instant, and when the files root becomes
//! unreadable for a while.
//!
//! The proxies reconnect on their own, with Envoy's jittered exponential backoff
//! (`proxy.rs`), and send the node with their first request only, as `certwire
//! bootstrap` configures Envoy. Every case ends with every stream checked against the
//! version certwire serves: the figures are reported, never judged, but a fleet that
//! did not converge is a failed run.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tempfile::TempDir;

use crate::Options;
use crate::client::{Census, Protocol};
use crate::fleet::{Arrival, Collected, Fleet, FleetSpec, Measure};
use crate::pki::{Ca, Issued};
use crate::proc::{self, system_time_us};
use crate::proxy::{BACKOFF_BASE, BACKOFF_MAX};
use crate::secrets::{self, leaf};
use crate::server::{CertwireSpec, Launcher, Server};
use crate::stats::{Spread, ms, num};

/// Secrets (streams) per proxy when certwire is killed: an Envoy with a few certificates.
const KILL_SECRETS: usize = 4;
/// Idle time before a resident-memory figure, and "a few seconds later" after recovery.
const SETTLE: Duration = Duration::from_secs(1);
const AFTER: Duration = Duration::from_secs(3);
/// How often /healthz and /readyz are polled after the restart.
const PROBE_EVERY: Duration = Duration::from_millis(5);
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long the files root stays unreadable, with a secret rotated in it meanwhile.
const UNREADABLE_FOR: Duration = Duration::from_secs(3);
/// certwire's periodic rescan of the files (`files_rescan_every`, 30 s by default).
const RESCAN: &str = "1s";
/// nobody:nogroup, for the case that needs certwire not to be root.
const NOBODY: (u32, u32) = (65534, 65534);
const REJECTED: &str = "certwire_updates_rejected_total";

/// The cases, in the order they run.
pub const CASES: [&str; 3] = ["kill", "herd", "unreadable"];

/// One case's figures: times in µs from the case's origin.
#[derive(Debug, Default)]
pub struct Row {
    pub fault: String,
    pub streams: usize,
    /// What the times count from.
    pub origin: &'static str,
    pub healthz_ms: Option<f64>,
    pub reconnected: Option<Spread>,
    pub latest: Option<Spread>,
    /// Where the latest-version times count from, when not from `origin`.
    pub latest_origin: Option<&'static str>,
    /// certwire's RSS in KiB: before the fault, its peak, after recovery.
    pub rss: [Option<u64>; 3],
    pub notes: Vec<String>,
    /// What makes the run a failure: streams that did not converge, served meanwhile...
    pub problems: Vec<String>,
}

/// Runs the cases `opts.faults` names; a case that fails outright is a failure line.
pub async fn run(launcher: &Launcher, opts: &Options, failures: &mut Vec<String>) -> String {
    let mut rows = Vec::new();
    for case in CASES.iter().filter(|c| opts.faults.iter().any(|f| f.trim() == **c)) {
        let result = match *case {
            "kill" => kill_restart(launcher, opts).await,
            "herd" => herd(launcher, opts).await,
            _ => unreadable_root(launcher, opts).await,
        };
        match result {
            Ok(row) => {
                for problem in &row.problems {
                    eprintln!("FAILED: faults, {}: {problem}", row.fault);
                    failures.push(format!("faults, {}: {problem}", row.fault));
                }
                rows.push(row);
            }
            Err(err) => {
                eprintln!("FAILED: faults, {case}: {err:#}");
                failures.push(format!("faults, {case}: {err:#}"));
            }
        }
    }
    if rows.is_empty() { String::new() } else { table(&rows, opts) }
}

/// certwire killed with SIGKILL under load, every secret rotated while it is down,
/// started again with the same arguments on the same ports.
async fn kill_restart(launcher: &Launcher, opts: &Options) -> anyhow::Result<Row> {
    let proxies = opts.faults_streams.div_ceil(KILL_SECRETS);
    eprintln!("== faults: SIGKILL under {} streams, restart", proxies * KILL_SECRETS);
    let mut bed = Bed::start(launcher, opts, KILL_SECRETS, proxies, None, None).await?;
    let rss_before = bed.server.rss_kib();
    let leaves = bed.mint();
    bed.fleet.arm_with(0, &bed.names, Measure { reconnect: true, drop: false }).await?;
    bed.server.kill().await?;
    let killed = Instant::now();
    bed.rotate(&leaves)?;
    tokio::time::sleep_until((killed + Duration::from_millis(opts.faults_downtime_ms)).into()).await;
    bed.server = launcher.restart(&bed.server)?;
    let down = bed.server.spawned - killed;
    let origin = bed.server.spawned_unix_us;
    let healthz = bed.server.poll_admin("/healthz", START_LIMIT, PROBE_EVERY).await? - bed.server.spawned;
    let readyz = bed.server.poll_admin("/readyz", START_LIMIT, PROBE_EVERY).await? - bed.server.spawned;
    let rejoined = bed.fleet.collect_reconnected(0).await?;
    let rotated = bed.fleet.collect(0).await?;
    eprintln!(
        "   restarted after {:.2} s down: /healthz {:.0} ms, /readyz {:.0} ms, last stream back {} ms, on the \
         rotated version {} ms",
        down.as_secs_f64(),
        healthz.as_secs_f64() * 1e3,
        readyz.as_secs_f64() * 1e3,
        last_ms(&rejoined, origin),
        last_ms(&rotated, origin)
    );
    tokio::time::sleep(AFTER).await;
    let rss_after = bed.server.rss_kib();
    let (census, mut problems) = bed.converged().await?;
    problems.extend(missing(&rejoined, "reconnected").into_iter().chain(missing(&rotated, "got the rotated version")));
    let notes = vec![
        format!(
            "{} proxies × {KILL_SECRETS} secrets; certwire down {:.2} s (SIGKILL, reaped, every secret rotated on disk, \
             then the same command on the same ports); /readyz 200 after {:.0} ms",
            proxies,
            down.as_secs_f64(),
            readyz.as_secs_f64() * 1e3
        ),
        format!(
            "connection attempts refused while it was down, all proxies: {}; certwire lists {} streams after \
             recovery (of {})",
            census.failed_connects,
            bed.listed().await?,
            bed.fleet.streams
        ),
    ];
    let streams = bed.fleet.streams;
    bed.finish().await;
    Ok(Row {
        fault: format!("SIGKILL under {streams} streams, secrets rotated while down, restart"),
        streams,
        origin: "restart (spawn)",
        healthz_ms: Some(healthz.as_secs_f64() * 1e3),
        reconnected: spread_from(&rejoined.arrivals, origin),
        latest: spread_from(&rotated.arrivals, origin),
        latest_origin: None,
        rss: [Some(rss_before), None, Some(rss_after)],
        notes,
        problems,
    })
}

/// Every proxy closes its connection at the same instant and reconnects at once (no
/// backoff): the thundering herd a network blip or a load balancer's reset brings.
async fn herd(launcher: &Launcher, opts: &Options) -> anyhow::Result<Row> {
    eprintln!("== faults: {} proxies reconnecting at once", opts.faults_proxies);
    let mut bed = Bed::start(launcher, opts, 1, opts.faults_proxies, None, None).await?;
    let pid = bed.server.pid;
    let rss_before = bed.server.rss_kib();
    let peak_known = proc::reset_peak_rss(pid).map_err(|err| eprintln!("   no peak RSS: {err}")).is_ok();
    let armed = bed.fleet.arm_with(0, &[], Measure { reconnect: true, drop: true }).await?;
    let origin = armed.dropped_us.context("the workers did not say when they dropped")?;
    let rejoined = bed.fleet.collect_reconnected(0).await?;
    bed.fleet.collect(0).await?;
    let peak = if peak_known { proc::peak_rss_kib(pid) } else { None };
    tokio::time::sleep(AFTER).await;
    let rss_after = bed.server.rss_kib();
    let listed = bed.listed().await?;

    let leaves = bed.mint();
    bed.fleet.arm(1, &bed.names).await?;
    let renamed = bed.rotate(&leaves)?;
    let rotated = bed.fleet.collect(1).await?;
    eprintln!(
        "   every stream back {} ms after the drop; the rotation after it reached the last stream {} ms after the rename",
        last_ms(&rejoined, origin),
        last_ms(&rotated, renamed)
    );
    let (census, mut problems) = bed.converged().await?;
    problems.extend(missing(&rejoined, "reconnected").into_iter().chain(missing(&rotated, "got the rotated version")));
    let notes = vec![format!(
        "{} proxies × 1 stream close their connections (shutdown(2) of each socket, both workers told at once) and \
         open new ones at once; certwire lists {listed} streams (of {}) {:.0} s later (connection attempts that \
         failed: {}); then one rotation, timed from the `..data` rename",
        opts.faults_proxies,
        bed.fleet.streams,
        AFTER.as_secs_f64(),
        census.failed_connects
    )];
    let streams = bed.fleet.streams;
    bed.finish().await;
    Ok(Row {
        fault: format!("{} proxies drop their connections at once and reconnect without backoff", opts.faults_proxies),
        streams,
        origin: "the drop",
        healthz_ms: None,
        reconnected: spread_from(&rejoined.arrivals, origin),
        latest: spread_from(&rotated.arrivals, renamed),
        latest_origin: Some("the rename of a rotation after recovery"),
        rss: [Some(rss_before), peak, Some(rss_after)],
        notes,
        problems,
    })
}

/// The files root loses its permissions (`chmod 000`) while certwire, not root, serves
/// it; a secret is rotated meanwhile; then the permissions come back.
async fn unreadable_root(launcher: &Launcher, opts: &Options) -> anyhow::Result<Row> {
    // SAFETY: geteuid(2) only reads the process's credentials.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "needs root: certwire runs as nobody and the bench writes into a root that user cannot read"
    );
    eprintln!(
        "== faults: files root unreadable for {:.0} s, {} streams",
        UNREADABLE_FOR.as_secs_f64(),
        opts.faults_proxies
    );
    // SAFETY: umask(2) cannot fail. Files the bench writes must stay readable by certwire.
    unsafe { libc::umask(0o022) };
    let config = format!("files_rescan_every = \"{RESCAN}\"\n");
    let mut bed = Bed::start(launcher, opts, 1, opts.faults_proxies, Some(NOBODY), Some(&config)).await?;
    let served = bed.served().await?;
    let before = bed.fleet.census(&served).await?;
    anyhow::ensure!(before.held == bed.fleet.streams, "before the fault, only {} streams held the secret", before.held);
    let rejected_before = bed.server.metric_sum(REJECTED).await?;
    let leaves = bed.mint();

    let unreadable = Unreadable::new(&bed.root)?;
    bed.rotate(&leaves)?;
    tokio::time::sleep(UNREADABLE_FOR).await;
    let during = bed.fleet.census(&served).await?;
    let served_during = bed.served().await?;
    let rejected = bed.server.metric_sum(REJECTED).await? - rejected_before;
    let last_error = bed.last_error().await?;
    let mut problems = Vec::new();
    if during.responses != before.responses || during.held != before.held {
        problems.push(format!(
            "while the root was unreadable the streams got {} responses ({} withdrawals); {} of {} still held the \
             last good version",
            during.responses - before.responses,
            during.withdrawals - before.withdrawals,
            during.held,
            bed.fleet.streams
        ));
    }
    if served_during != served {
        problems.push("certwire's /status/secrets changed the version served while the root was unreadable".into());
    }

    bed.fleet.arm(1, &bed.names).await?;
    let restored = proc::unix_us();
    drop(unreadable);
    let rotated = bed.fleet.collect(1).await?;
    let noticed_ms = (crate::fanout::detected_us(&bed.server, &bed.names[0]).await? - restored) as f64 / 1e3;
    eprintln!(
        "   nothing pushed while unreadable: {}; every stream on the rotated version {} ms after chmod 755 (certwire \
         noticed after {noticed_ms:.1} ms)",
        problems.is_empty(),
        last_ms(&rotated, restored)
    );
    let (_, mut converged) = bed.converged().await?;
    problems.append(&mut converged);
    problems.extend(missing(&rotated, "got the rotated version"));
    let notes = vec![
        format!(
            "{} proxies × 1 stream; certwire runs as uid {} with `files_rescan_every = \"{RESCAN}\"` (`--config`; \
             `certwire serve` has no flag for it); `chmod 000` of the root, the secret rotated (as root) right \
             after, {:.0} s later `chmod 755`",
            opts.faults_proxies,
            NOBODY.0,
            UNREADABLE_FOR.as_secs_f64()
        ),
        format!(
            "while unreadable: {} responses reached the streams ({} withdrawals), {} of {} held the last good \
             version; certwire counted {rejected:.0} rejected updates, status said: {}",
            during.responses - before.responses,
            during.withdrawals - before.withdrawals,
            during.held,
            bed.fleet.streams,
            last_error.as_deref().map(|e| format!("\"{e}\"")).unwrap_or_else(|| "no error".into())
        ),
        format!("certwire noticed the rotated secret {noticed_ms:.1} ms after `chmod 755` (`detected_unix_us`)"),
    ];
    let streams = bed.fleet.streams;
    bed.finish().await;
    Ok(Row {
        fault: format!(
            "files root unreadable (`chmod 000`) for {:.0} s, a secret rotated meanwhile",
            UNREADABLE_FOR.as_secs_f64()
        ),
        streams,
        origin: "`chmod 755`",
        healthz_ms: None,
        reconnected: None,
        latest: spread_from(&rotated.arrivals, restored),
        latest_origin: None,
        rss: [None, None, None],
        notes,
        problems,
    })
}

/// certwire serving fresh secrets from a files root, and a fleet of proxies streaming
/// every one of them.
struct Bed {
    _dir: TempDir,
    root: PathBuf,
    ca: Ca,
    names: Vec<String>,
    server: Server,
    fleet: Fleet,
}

impl Bed {
    /// `secrets` secrets, `proxies` proxies each streaming all of them; certwire as
    /// `user` with `config` as its config file when given. Returns once the streams
    /// have been idle a moment.
    async fn start(
        launcher: &Launcher,
        opts: &Options,
        secrets: usize,
        proxies: usize,
        user: Option<(u32, u32)>,
        config: Option<&str>,
    ) -> anyhow::Result<Bed> {
        let dir = crate::util::tempdir();
        // A temporary directory is the owner's alone; certwire may run as another user.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let root = dir.path().join("secrets");
        std::fs::create_dir_all(&root)?;
        if user.is_some() {
            reachable_by_others(&root)?;
        }
        let ca = Ca::new("loadgen faults CA");
        let names = secrets::create_set(&root, &ca, "f", secrets).names;
        let mut spec = CertwireSpec { user, ..CertwireSpec::files(&root) };
        if let Some(config) = config {
            let path = dir.path().join("certwire.toml");
            std::fs::write(&path, config)?;
            spec.extra = vec!["--config".into(), path.into()];
        }
        let mut server = launcher.certwire_spec(spec)?;
        server.wait_healthy().await?;
        server.poll_admin("/readyz", START_LIMIT, Duration::from_millis(10)).await?;
        let fleet = Fleet::start(FleetSpec {
            target: server.sds,
            protocol: Protocol::Sotw,
            conns: vec![names.clone(); proxies],
            node_every_request: false,
            tls: None,
            server_pid: server.pid,
            per_worker: opts.per_worker,
            min_workers: 2,
            pin: launcher.pin,
            reconnect: true,
        })
        .await?;
        eprintln!(
            "   {} streams on {} connections ready in {:.1} s",
            fleet.streams,
            fleet.conns,
            fleet.connect_time.as_secs_f64()
        );
        tokio::time::sleep(SETTLE).await;
        Ok(Bed { _dir: dir, root, ca, names, server, fleet })
    }

    /// A new certificate for every secret, minted before the clock matters.
    fn mint(&self) -> Vec<Issued> {
        self.names.iter().map(|name| leaf(&self.ca, name)).collect()
    }

    /// Swaps in `leaves` (one per secret, kubelet-style); returns the wall-clock µs
    /// right before the first rename.
    fn rotate(&self, leaves: &[Issued]) -> anyhow::Result<i64> {
        let swaps = self
            .names
            .iter()
            .zip(leaves)
            .map(|(name, leaf)| secrets::prepare(&self.root.join(name), leaf))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut first = None;
        for swap in &swaps {
            first.get_or_insert(swap.commit()?);
        }
        swaps.into_iter().for_each(secrets::Swap::cleanup);
        Ok(system_time_us(first.context("no secret to rotate")?))
    }

    /// The version certwire serves for each secret.
    async fn served(&self) -> anyhow::Result<Vec<(String, String)>> {
        let status = self.server.secrets_status().await?;
        let version = |name: &str| {
            status
                .iter()
                .find(|s| s["name"].as_str() == Some(name))
                .and_then(|s| s["version"].as_str().map(str::to_owned))
        };
        self.names
            .iter()
            .map(|name| Ok((name.clone(), version(name).with_context(|| format!("certwire serves no {name}"))?)))
            .collect()
    }

    /// The latest rejection status shows for the first secret.
    async fn last_error(&self) -> anyhow::Result<Option<String>> {
        let status = self.server.secrets_status().await?;
        Ok(status
            .iter()
            .find(|s| s["name"].as_str() == Some(self.names[0].as_str()))
            .and_then(|s| s["last_error"].as_str().map(str::to_owned)))
    }

    /// Every stream against what certwire serves now, and what is wrong if not all of
    /// them hold it on a live stream.
    async fn converged(&mut self) -> anyhow::Result<(Census, Vec<String>)> {
        let served = self.served().await?;
        let census = self.fleet.census(&served).await?;
        let streams = self.fleet.streams;
        let problems = if census.held == streams {
            Vec::new()
        } else {
            vec![format!(
                "did not converge: {} of {streams} streams hold the version certwire serves ({} another version, {} \
                 withdrawn, {} without a live stream)",
                census.held, census.stale, census.withdrawn, census.down
            )]
        };
        Ok((census, problems))
    }

    /// The streams certwire has open (`/status/proxies` lists one entry per stream).
    async fn listed(&self) -> anyhow::Result<usize> {
        Ok(self.server.proxies_status().await?.len())
    }

    async fn finish(self) {
        self.fleet.shutdown().await;
        self.server.stop().await;
    }
}

/// A directory at mode 000 until dropped, then 0755 again: restored even when the case
/// fails, so that the temporary directory can be removed.
struct Unreadable<'a>(&'a Path);

impl<'a> Unreadable<'a> {
    fn new(dir: &'a Path) -> anyhow::Result<Unreadable<'a>> {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o000))
            .with_context(|| format!("chmod 000 {}", dir.display()))?;
        Ok(Unreadable(dir))
    }
}

impl Drop for Unreadable<'_> {
    fn drop(&mut self) {
        if let Err(err) = std::fs::set_permissions(self.0, std::fs::Permissions::from_mode(0o755)) {
            eprintln!("chmod 755 {}: {err}", self.0.display());
        }
    }
}

/// Another user must be able to reach `dir`: every directory above it searchable by all.
fn reachable_by_others(dir: &Path) -> anyhow::Result<()> {
    for parent in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(parent)?.permissions().mode();
        anyhow::ensure!(
            mode & 0o001 != 0,
            "{} (mode {:o}) does not let other users through; set TMPDIR to a directory that does",
            parent.display(),
            mode & 0o7777
        );
    }
    Ok(())
}

/// Per-stream times from `origin_us`.
fn spread_from(arrivals: &[Arrival], origin_us: i64) -> Option<Spread> {
    let mut times: Vec<f64> = arrivals.iter().map(|a| (a.at_us - origin_us) as f64).collect();
    Spread::of(&mut times)
}

fn last_ms(got: &Collected, origin_us: i64) -> String {
    ms(spread_from(&got.arrivals, origin_us).map_or(f64::NAN, |s| s.max))
}

/// A problem when streams are missing from a measurement (they timed out).
fn missing(got: &Collected, what: &str) -> Option<String> {
    (got.missing > 0).then(|| format!("{} of {} streams never {what}", got.missing, got.expected))
}

fn table(rows: &[Row], opts: &Options) -> String {
    let mut t = String::from("## Faults: how certwire and its proxies recover\n\n");
    let _ = writeln!(
        t,
        "certwire (release, plaintext on loopback) serving secrets from a files root in the kubelet's layout; \
         every simulated proxy on an HTTP/2 connection of its own from a source address of its own, one SotW \
         stream per secret, the node with its first request only. A proxy whose connection is lost connects \
         again after Envoy's jittered exponential backoff (retry n waits a uniform time below {} ms × 2^n, \
         at most {} s; Envoy's own cap is 30 s), reset when a response arrives, and asks again with the \
         version it holds. Times per stream, p50 / p99 / last (ms), from the moment in the third column: \
         \"reconnected\" is the first response on the new connection, \"latest version\" the first response \
         with the version certwire serves after the fault. RSS: certwire's VmRSS before the fault, its peak \
         during the fault (VmHWM, reset just before), and {:.0} s after recovery. Converged: every stream, on a \
         live connection, holds the version certwire's /status/secrets says it serves (checked by the workers).\n",
        BACKOFF_BASE.as_millis(),
        BACKOFF_MAX.as_secs(),
        AFTER.as_secs_f64()
    );
    t.push_str(
        "| fault | streams | times from | /healthz OK (ms) | reconnected: p50 / p99 / last (ms) | latest version: \
         p50 / p99 / last (ms) | certwire RSS before / peak / after (MiB) | converged |\n",
    );
    t.push_str("|---|---:|---|---:|---:|---:|---:|---|\n");
    for r in rows {
        let origin = match r.latest_origin {
            Some(latest) => format!("{} (latest version: {latest})", r.origin),
            None => r.origin.to_owned(),
        };
        let converged =
            if r.problems.is_empty() { "yes".to_owned() } else { format!("**NO**: {}", r.problems.join("; ")) };
        let _ = writeln!(
            t,
            "| {} | {} | {origin} | {} | {} | {} | {} | {converged} |",
            r.fault,
            r.streams,
            r.healthz_ms.map_or("-".into(), |x| num(x, 0)),
            spread(r.reconnected),
            spread(r.latest),
            r.rss.map(|kib| kib.map_or("-".into(), |k| num(k as f64 / 1024.0, 1))).join(" / ")
        );
    }
    t.push('\n');
    for r in rows {
        let _ = writeln!(t, "- {}: {}.", r.fault, r.notes.join("; "));
    }
    let _ = writeln!(
        t,
        "- sizes: `--faults-streams {}` (the kill), `--faults-proxies {}` (the herd and the unreadable root), \
         `--faults-downtime-ms {}`.\n",
        opts.faults_streams, opts.faults_proxies, opts.faults_downtime_ms
    );
    t
}

fn spread(s: Option<Spread>) -> String {
    s.map_or("-".into(), |s| format!("{} / {} / {}", ms(s.p50), ms(s.p99), ms(s.max)))
}
