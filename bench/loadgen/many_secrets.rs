//! Many secrets: certwire serves a large set of file secrets; every proxy streams a
//! few distinct ones (one stream each, like Envoy); a batch of secrets is rotated as
//! fast as the swaps can be done, and we measure until every affected stream has its
//! new version.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use crate::Options;
use crate::client::Protocol;
use crate::fleet::{Fleet, FleetSpec};
use crate::perf::Perf;
use crate::pki::Ca;
use crate::proc::system_time_us;
use crate::secrets::{self, SecretSet, leaf};
use crate::server::Launcher;
use crate::stats::{Spread, median};

const WARMUP: usize = 1;
const SETTLE: Duration = Duration::from_millis(100);
const PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct Row {
    pub secrets: usize,
    pub proxies: usize,
    pub streams: usize,
    pub rotated: usize,
    pub affected: usize,
    /// Medians over rounds, µs.
    pub last_from_first_change: f64,
    pub p50_from_first_change: f64,
    pub p99_from_first_change: f64,
    pub p50_from_detect: f64,
    pub p99_from_detect: f64,
    /// The last of the rotated secrets noticed by certwire, from the first rename.
    pub last_detected: f64,
    pub cpu_ms_per_round: f64,
    /// KiB per idle stream, streams sharing connections as an Envoy's do.
    pub rss_per_stream: f64,
    pub rounds: usize,
    pub missing: usize,
}

pub async fn run(launcher: &Launcher, opts: &Options, root: &Path, set: &SecretSet, ca: &Ca) -> anyhow::Result<Row> {
    let total = set.names.len();
    anyhow::ensure!(total > 0 && opts.proxies > 0, "many-secrets needs secrets and proxies");
    eprintln!("== many secrets: {total} secrets, {} proxies × {} streams", opts.proxies, opts.per_proxy);
    let mut server = launcher.certwire(root)?;
    server.wait_healthy().await?;
    server.poll_admin("/readyz", Duration::from_secs(120), Duration::from_millis(20)).await?;

    // Proxy p streams secrets p, p + P, p + 2P, ...: distinct per proxy, spread evenly.
    let conns: Vec<Vec<String>> = (0..opts.proxies)
        .map(|p| (0..opts.per_proxy).map(|k| set.names[(p + k * opts.proxies) % total].clone()).collect())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.rss_kib();
    let spec = FleetSpec {
        target: server.sds,
        protocol: Protocol::Sotw,
        conns,
        node_every_request: true,
        tls: None,
        server_pid: server.pid,
        per_worker: opts.per_worker,
        min_workers: 2,
        pin: launcher.pin,
        reconnect: false,
    };
    let mut fleet = Fleet::start(spec).await?;
    eprintln!("   {} streams ready in {:.1} s", fleet.streams, fleet.connect_time.as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_per_stream = server.rss_kib().saturating_sub(rss_before) as f64 / fleet.streams.max(1) as f64;

    let perf = if opts.perf_many { Some(Perf::start(server.pid, "many").await?) } else { None };
    let mut samples = Vec::new();
    for round in 0..WARMUP + opts.rounds {
        // A stride coprime with the usual sizes picks secrets of distinct proxies.
        let chosen: Vec<usize> = {
            let mut seen = HashSet::new();
            (0..opts.rotate.min(total)).map(|j| (round * 7 + 101 * j) % total).filter(|i| seen.insert(*i)).collect()
        };
        let names: Vec<String> = chosen.iter().map(|i| set.names[*i].clone()).collect();
        let leaves: Vec<_> = names.iter().map(|n| leaf(ca, n)).collect();

        let affected = fleet.arm(round, &names).await?;
        let cpu_before = server.cpu();
        let swaps = names
            .iter()
            .zip(&leaves)
            .map(|(name, leaf)| secrets::prepare(&root.join(name), leaf))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut first_change = None;
        for swap in &swaps {
            let at = swap.commit()?;
            first_change.get_or_insert(at);
        }
        let first_us = system_time_us(first_change.context("nothing rotated")?);
        swaps.into_iter().for_each(secrets::Swap::cleanup);
        let got = fleet.collect(round).await?;
        tokio::time::sleep(SETTLE).await;
        let cpu_us = cpu_before.used_us_until(&server.cpu());

        let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
        let detected: HashMap<String, i64> = server
            .secrets_status()
            .await?
            .iter()
            .filter(|s| s["name"].as_str().is_some_and(|n| wanted.contains(n)))
            .filter_map(|s| Some((s["name"].as_str()?.to_owned(), s["detected_unix_us"].as_i64()?)))
            .collect();
        let mut from_first: Vec<f64> = got.arrivals.iter().map(|a| (a.at_us - first_us) as f64).collect();
        let mut from_detect: Vec<f64> =
            got.arrivals.iter().filter_map(|a| detected.get(&a.name).map(|d| (a.at_us - d) as f64)).collect();
        let last_detected = detected.values().max().map(|d| (d - first_us) as f64).unwrap_or(f64::NAN);
        let first = Spread::of(&mut from_first).context("no stream got a new version")?;
        let own = Spread::of(&mut from_detect).unwrap_or_default();
        eprintln!(
            "   round {round}: {affected} streams, last {:.1} ms from the first rename (p50 {:.1}, p99 {:.1}), \
             last change noticed at {:.1} ms, CPU {:.1} ms, missing {}",
            first.max / 1e3,
            first.p50 / 1e3,
            first.p99 / 1e3,
            last_detected / 1e3,
            cpu_us / 1e3,
            got.missing
        );
        if round >= WARMUP {
            samples.push((affected, first, own, last_detected, cpu_us, got.missing));
        }
        tokio::time::sleep(PAUSE).await;
    }
    if let Some(perf) = perf {
        perf.stop().await;
    }
    let streams = fleet.streams;
    fleet.shutdown().await;
    server.stop().await;

    Ok(Row {
        secrets: total,
        proxies: opts.proxies,
        streams,
        rotated: opts.rotate.min(total),
        affected: samples.first().map(|s| s.0).unwrap_or(0),
        last_from_first_change: median(samples.iter().map(|s| s.1.max)),
        p50_from_first_change: median(samples.iter().map(|s| s.1.p50)),
        p99_from_first_change: median(samples.iter().map(|s| s.1.p99)),
        p50_from_detect: median(samples.iter().map(|s| s.2.p50)),
        p99_from_detect: median(samples.iter().map(|s| s.2.p99)),
        last_detected: median(samples.iter().map(|s| s.3)),
        cpu_ms_per_round: median(samples.iter().map(|s| s.4 / 1e3)),
        rss_per_stream,
        rounds: samples.len(),
        missing: samples.iter().map(|s| s.5).sum(),
    })
}
