//! A worker process: holds its share of the simulated proxies and answers the
//! coordinator over stdin/stdout, one line per message.
//!
//! ```text
//! coordinator -> worker                 worker -> coordinator
//! {WorkerConfig as JSON}                prepared ms=T
//! connect                               ready conns=C streams=S ms=T [tls=NEGOTIATED]
//! arm R NAME,NAME,... [reconnect] [drop] armed R COUNT [dropped_us=UNIX_US]
//!                                       [reconnected R EXPECTED MISSING SLOT:UNIX_US ...]
//!                                       done R EXPECTED MISSING SLOT:UNIX_US SLOT:UNIX_US ...
//! check NAME=VERSION,...                checked held=N stale=N withdrawn=N down=N responses=N ...
//! quit (or end of input)                error MESSAGE
//! ```
//!
//! `prepared` comes once the worker has what it needs to connect (with mutual TLS, a
//! key and certificate per proxy), so that the coordinator can time the connection
//! setup alone: from `connect` to `ready`, every connection open and every stream with
//! its first response.
//!
//! After `arm`, every stream of those names records the wall-clock time (µs since the
//! epoch, comparable with other processes) of the first response carrying a version
//! other than the one it held; `done` follows once all have one or the timeout passed.
//! `-` stands for no names. With `reconnect`, every stream also records the first
//! response on the next stream its proxy opens (after the server went away or the
//! connection was dropped), reported in `reconnected`; with `drop`, every proxy closes
//! its connection right after arming and connects again at once (`dropped_us` is when).
//! `check` counts the streams holding the versions given (see [`crate::client::Census`]).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{StreamExt as _, TryStreamExt as _};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::watch;

use crate::client::{self, Protocol, Tracker};
use crate::proxy::{Proxy, Session};
use crate::{mtls, node};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WorkerConfig {
    pub target: SocketAddr,
    /// Connection i of this worker comes from `fleet::source_addr(first_source + i)`.
    pub first_source: usize,
    pub protocol: Protocol,
    /// Index of the first proxy, for node ids unique across workers.
    pub first_proxy: usize,
    /// Per connection (proxy), the secret names it streams, one stream each.
    pub conns: Vec<Vec<String>>,
    /// The node with every request, as Envoy by default; else with the first only.
    pub node_every_request: bool,
    /// Mutual TLS (a certificate per proxy, minted by the worker), else plaintext.
    pub tls: Option<mtls::ClientSide>,
    pub connect_concurrency: usize,
    /// Connect again when the connection is lost, with Envoy's jittered backoff; else a
    /// stream the server ends stays ended.
    pub reconnect: bool,
    pub ready_timeout_ms: u64,
    pub done_timeout_ms: u64,
}

pub fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let code = match runtime.block_on(run()) {
        Ok(()) => 0,
        Err(err) => {
            say(&format!("error {err:#}"));
            1
        }
    };
    // Exiting at once closes every socket; dropping thousands of tasks one by one is slower.
    std::process::exit(code);
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn run() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines.next_line().await?.context("no configuration on stdin")?;
    let config: WorkerConfig = serde_json::from_str(&first).context("parsing worker configuration")?;
    let prepare_started = Instant::now();
    let tls = prepare_tls(&config)?;
    say(&format!("prepared ms={}", prepare_started.elapsed().as_millis()));
    let go = lines.next_line().await?.context("no connect command")?;
    anyhow::ensure!(go.trim() == "connect", "expected connect, got {go:?}");
    let started = Instant::now();
    let tracker = Tracker::new(config.conns.iter().flatten().cloned());
    // Every proxy watches it; `arm ... drop` bumps it.
    let (drops, _) = watch::channel(0u64);
    let negotiated = connect_all(&config, &tracker, tls, &drops).await?;
    wait_until(&tracker, Duration::from_millis(config.ready_timeout_ms), |t| t.initial_pending() == 0)
        .await
        .with_context(|| format!("{} streams got no first response", tracker.initial_pending()))?;
    let tls_note = negotiated.map(|n| format!(" tls={}", n.replace(' ', "/"))).unwrap_or_default();
    say(&format!(
        "ready conns={} streams={} ms={}{tls_note}",
        config.conns.len(),
        tracker.slots.len(),
        started.elapsed().as_millis()
    ));

    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("arm") => {
                let round = words.next().context("arm needs a round")?.to_owned();
                let names: HashSet<&str> = words.next().unwrap_or("-").split(',').filter(|n| *n != "-").collect();
                let flags: Vec<&str> = words.collect();
                measure(
                    &config,
                    &tracker,
                    &drops,
                    &round,
                    &names,
                    flags.contains(&"reconnect"),
                    flags.contains(&"drop"),
                )
                .await;
            }
            Some("check") => {
                let latest: HashMap<&str, &str> =
                    words.next().unwrap_or("").split(',').filter_map(|pair| pair.split_once('=')).collect();
                say(&format!("checked {}", tracker.census(&latest).to_words()));
            }
            Some("quit") => break,
            Some(other) => anyhow::bail!("unknown command {other:?}"),
            None => {}
        }
    }
    Ok(())
}

/// One `arm` command: arms, drops every connection if asked, waits until every armed
/// stream has what it waits for (or the timeout) and reports the arrivals.
async fn measure(
    config: &WorkerConfig,
    tracker: &Tracker,
    drops: &watch::Sender<u64>,
    round: &str,
    names: &HashSet<&str>,
    reconnect: bool,
    drop: bool,
) {
    let expected = tracker.arm(names);
    if reconnect {
        tracker.arm_rejoin();
    }
    let mut armed = format!("armed {round} {expected}");
    if drop {
        armed.push_str(&format!(" dropped_us={}", crate::proc::unix_us()));
        drops.send_modify(|n| *n += 1);
    }
    say(&armed);
    // A timeout is reported as missing streams, not as an error.
    let timeout = Duration::from_millis(config.done_timeout_ms);
    let _ = wait_until(tracker, timeout, |t| t.armed_pending() == 0 && t.rejoin_pending() == 0).await;
    if reconnect {
        say(&arrivals("reconnected", round, tracker.disarm_rejoin()));
    }
    say(&arrivals("done", round, tracker.disarm()));
}

/// `WORD R EXPECTED MISSING SLOT:UNIX_US ...`
fn arrivals(word: &str, round: &str, results: Vec<(usize, Option<i64>)>) -> String {
    let missing = results.iter().filter(|(_, t)| t.is_none()).count();
    let mut out = format!("{word} {round} {} {missing}", results.len());
    for (slot, at) in results {
        if let Some(at) = at {
            out.push_str(&format!(" {slot}:{at}"));
        }
    }
    out
}

/// With mutual TLS, each proxy's client configuration: its own key and certificate.
fn prepare_tls(config: &WorkerConfig) -> anyhow::Result<Option<Vec<Arc<rustls::ClientConfig>>>> {
    let Some(side) = &config.tls else { return Ok(None) };
    let issuer = mtls::ClientIssuer::new(side)?;
    let clients = (0..config.conns.len())
        .map(|i| issuer.client(&mtls::identity(config.first_proxy + i)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(clients))
}

/// Opens every connection and its streams, a bounded number at a time so the
/// server's accept backlog never overflows (an overflow costs a 1 s SYN retry), and
/// leaves each proxy running on its own. Returns what the first TLS handshake negotiated.
async fn connect_all(
    config: &WorkerConfig,
    tracker: &Arc<Tracker>,
    tls: Option<Vec<Arc<rustls::ClientConfig>>>,
    drops: &watch::Sender<u64>,
) -> anyhow::Result<Option<String>> {
    let mut first_slot = 0;
    let mut jobs = Vec::with_capacity(config.conns.len());
    for (i, names) in config.conns.iter().enumerate() {
        jobs.push((i, first_slot..first_slot + names.len()));
        first_slot += names.len();
    }
    let negotiated = std::sync::Mutex::new(None);
    futures_util::stream::iter(jobs)
        .map(|(i, slots)| {
            let negotiated = &negotiated;
            let tls = tls.as_ref().map(|t| t[i].clone());
            async move {
                // The node is built here, as the proxy connects, not for all proxies first.
                let proxy = Proxy {
                    source: crate::fleet::source_addr(config.first_source + i),
                    target: config.target,
                    tls,
                    protocol: config.protocol,
                    identity: client::Identity {
                        node: node::envoy_like(&format!("loadgen-proxy-{}", config.first_proxy + i)),
                        every_request: config.node_every_request,
                    },
                    slots,
                };
                let session = first_session(&proxy, tracker).await?;
                if let Some(seen) = &session.conn.negotiated {
                    negotiated.lock().expect("negotiated lock").get_or_insert_with(|| seen.clone());
                }
                tokio::spawn(proxy.live(session, tracker.clone(), drops.subscribe(), config.reconnect));
                anyhow::Ok(())
            }
        })
        .buffer_unordered(config.connect_concurrency.max(1))
        .try_collect::<()>()
        .await?;
    Ok(negotiated.into_inner().expect("negotiated lock"))
}

/// The proxy's first session, tried three times: a setup that keeps failing fails the
/// worker rather than waiting on backoff.
async fn first_session(proxy: &Proxy, tracker: &Arc<Tracker>) -> anyhow::Result<Session> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match proxy.session(tracker).await {
            Ok(session) => return Ok(session),
            Err(err) if attempt < 3 => {
                eprintln!("loadgen worker: {err:#}; retrying");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Waits until `done(tracker)` holds, or fails after `timeout`.
async fn wait_until(tracker: &Tracker, timeout: Duration, done: impl Fn(&Tracker) -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(tracker) {
        if tokio::time::timeout_at(deadline, tracker.changed()).await.is_err() {
            anyhow::bail!("timed out after {timeout:?}");
        }
    }
    Ok(())
}
