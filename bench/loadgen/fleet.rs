//! The coordinator's side of the worker processes: spawn them, hand out the proxies
//! (each connection from a 127.x.y.z source address of its own), time the connection
//! setup, arm a measurement, collect it, count the streams holding given versions.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::client::{Census, Protocol};
use crate::mtls::ClientSide;
use crate::proc::{self, CpuSnapshot};
use crate::worker::WorkerConfig;

/// In-flight connection attempts per worker.
const CONNECT_CONCURRENCY: usize = 64;
/// How long a worker may take to get ready to connect (minting its proxies' certificates).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker may take to connect everything and get every first response.
const READY_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a worker waits for every armed stream before reporting the missing ones.
const DONE_TIMEOUT: Duration = Duration::from_secs(60);
/// Extra patience of the coordinator for a worker's answer.
const SLACK: Duration = Duration::from_secs(30);

/// Every connection gets a source address of its own, never used before in this run:
/// each simulated proxy is a host of its own, as far as certwire can tell (it limits
/// connections per IP address), and sockets in TIME_WAIT from an earlier fleet never
/// take ports from a new one.
static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);

/// `count` fresh source addresses: the index of the first, for [`source_addr`].
fn next_sources(count: usize) -> usize {
    NEXT_SOURCE.fetch_add(count, Ordering::Relaxed)
}

/// The `k`-th source address: 127.1.0.1 onwards in 127.0.0.0/8 (all of it is loopback
/// on Linux), skipping last octets 0 and 255.
pub fn source_addr(k: usize) -> IpAddr {
    let base = u32::from(Ipv4Addr::new(127, 1, 0, 0));
    let k = k as u32;
    IpAddr::V4(Ipv4Addr::from(base + (k / 254) * 256 + 1 + k % 254))
}

pub struct FleetSpec {
    pub target: SocketAddr,
    pub protocol: Protocol,
    /// Per proxy, the secret names it streams.
    pub conns: Vec<Vec<String>>,
    /// The node with every request (Envoy's default) or the first only
    /// (`set_node_on_first_message_only`, as `certwire bootstrap` writes).
    pub node_every_request: bool,
    /// Mutual TLS, each proxy with a certificate of its own; plaintext when `None`.
    pub tls: Option<ClientSide>,
    /// The server, whose CPU time is taken over the connection setup.
    pub server_pid: u32,
    pub per_worker: usize,
    /// At least this many workers (2 lets the clients use both cores when not pinned).
    pub min_workers: usize,
    pub pin: bool,
    /// Proxies connect again when their connection is lost (Envoy's jittered backoff),
    /// and `Measure::drop` can be used; else a stream the server ends stays ended.
    pub reconnect: bool,
}

/// What an `arm` measures besides the streams of the rotated names getting a new version.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measure {
    /// Every stream's first response on the next connection of its proxy.
    pub reconnect: bool,
    /// Every proxy closes its connection right after arming and connects again at once.
    pub drop: bool,
}

/// An armed measurement: streams armed for a new version, and when the workers dropped
/// their connections (the earliest, µs since the epoch) with `Measure::drop`.
#[derive(Debug, Clone, Copy)]
pub struct Armed {
    pub streams: usize,
    pub dropped_us: Option<i64>,
}

/// One stream got the new version at `at_us` (µs since the epoch).
#[derive(Debug, Clone)]
pub struct Arrival {
    pub name: String,
    pub at_us: i64,
}

#[derive(Debug, Default)]
pub struct Collected {
    pub arrivals: Vec<Arrival>,
    pub expected: usize,
    pub missing: usize,
}

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// Secret name of each of this worker's streams, by slot.
    names: Vec<String>,
    pid: u32,
}

pub struct Fleet {
    workers: Vec<WorkerProc>,
    pub streams: usize,
    pub conns: usize,
    /// From spawning the workers until every stream had its first response.
    pub connect_time: Duration,
    /// The connection setup alone, from `connect` until every stream had its first response.
    pub setup: Setup,
    /// What the TLS handshakes negotiated (version, cipher suite, key exchange), if any.
    pub tls: Option<String>,
}

/// Opening every connection and stream, up to every first response: wall time, and
/// the CPU the server and the clients spent in it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Setup {
    pub wall: Duration,
    pub server_cpu_us: f64,
    pub client_cpu_us: f64,
}

impl Fleet {
    /// Spawns the workers and waits until every stream has its first response.
    pub async fn start(spec: FleetSpec) -> anyhow::Result<Fleet> {
        let started = Instant::now();
        let conns = spec.conns.len();
        let count = conns.div_ceil(spec.per_worker.max(1)).max(spec.min_workers).min(conns.max(1));
        let per = conns.div_ceil(count);
        let exe = std::env::current_exe().context("locating the loadgen binary")?;
        let mut workers = Vec::with_capacity(count);
        for (i, chunk) in spec.conns.chunks(per.max(1)).enumerate() {
            let config = WorkerConfig {
                target: spec.target,
                first_source: next_sources(chunk.len()),
                protocol: spec.protocol,
                first_proxy: i * per,
                conns: chunk.to_vec(),
                node_every_request: spec.node_every_request,
                tls: spec.tls.clone(),
                connect_concurrency: CONNECT_CONCURRENCY,
                reconnect: spec.reconnect,
                ready_timeout_ms: READY_TIMEOUT.as_millis() as u64,
                done_timeout_ms: DONE_TIMEOUT.as_millis() as u64,
            };
            let mut command = if spec.pin {
                let mut c = Command::new("taskset");
                c.args(["-c", "1"]).arg(&exe);
                c
            } else {
                Command::new(&exe)
            };
            command.arg("worker").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
            let mut child = command.kill_on_drop(true).spawn().context("spawning a loadgen worker")?;
            let pid = child.id().context("worker pid")?;
            let mut stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let mut line = serde_json::to_string(&config)?;
            line.push('\n');
            stdin.write_all(line.as_bytes()).await.context("configuring a worker")?;
            stdin.flush().await?;
            let names = config.conns.into_iter().flatten().collect();
            workers.push(WorkerProc { child, stdin, lines: BufReader::new(stdout).lines(), names, pid });
        }
        let mut fleet =
            Fleet { workers, streams: 0, conns, connect_time: Duration::ZERO, setup: Setup::default(), tls: None };
        fleet.expect_all("prepared", PREPARE_TIMEOUT + SLACK).await?;
        let server_before = proc::cpu(spec.server_pid);
        let clients_before = fleet.cpu();
        let setup_started = Instant::now();
        fleet.tell_all("connect\n").await.context("starting a worker")?;
        let ready = fleet.expect_all("ready", READY_TIMEOUT + SLACK).await?;
        fleet.setup = Setup {
            wall: setup_started.elapsed(),
            server_cpu_us: server_before.used_us_until(&proc::cpu(spec.server_pid)),
            client_cpu_us: proc::used_us(&clients_before, &fleet.cpu()),
        };
        fleet.streams = ready.iter().map(|l| field(l, "streams=")).sum();
        fleet.tls = ready
            .iter()
            .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("tls=")))
            .map(|t| t.replace('/', " "));
        fleet.connect_time = started.elapsed();
        Ok(fleet)
    }

    /// Arms the streams of `names` in every worker; returns how many were armed.
    pub async fn arm(&mut self, round: usize, names: &[String]) -> anyhow::Result<usize> {
        Ok(self.arm_with(round, names, Measure::default()).await?.streams)
    }

    /// Arms the streams of `names` (none: `-`) and what `measure` asks in every worker.
    pub async fn arm_with(&mut self, round: usize, names: &[String], measure: Measure) -> anyhow::Result<Armed> {
        let names = if names.is_empty() { "-".to_owned() } else { names.join(",") };
        let flags = [(measure.reconnect, " reconnect"), (measure.drop, " drop")];
        let flags: String = flags.iter().filter(|(on, _)| *on).map(|(_, flag)| *flag).collect();
        self.tell_all(&format!("arm {round} {names}{flags}\n")).await.context("arming a worker")?;
        let armed = self.expect_all(&format!("armed {round} "), SLACK).await?;
        Ok(Armed {
            streams: armed
                .iter()
                .map(|l| l.split_whitespace().nth(2).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0))
                .sum(),
            dropped_us: armed
                .iter()
                .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("dropped_us=")))
                .filter_map(|t| t.parse::<i64>().ok())
                .min(),
        })
    }

    /// Waits for the arrivals of `round` from every worker.
    pub async fn collect(&mut self, round: usize) -> anyhow::Result<Collected> {
        self.collect_arrivals("done", round).await
    }

    /// Waits for the reconnections of `round` (armed with `Measure::reconnect`), which
    /// every worker reports before its arrivals.
    pub async fn collect_reconnected(&mut self, round: usize) -> anyhow::Result<Collected> {
        self.collect_arrivals("reconnected", round).await
    }

    async fn collect_arrivals(&mut self, word: &str, round: usize) -> anyhow::Result<Collected> {
        let prefix = format!("{word} {round} ");
        let lines = self.expect_all(&prefix, DONE_TIMEOUT + SLACK).await?;
        let mut out = Collected::default();
        for (w, line) in self.workers.iter().zip(lines) {
            let mut words = line.split_whitespace().skip(2);
            out.expected += words.next().and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
            out.missing += words.next().and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
            for word in words {
                let (slot, at) = word.split_once(':').context("bad arrival")?;
                let slot: usize = slot.parse()?;
                let name = w.names.get(slot).context("arrival for an unknown slot")?.clone();
                out.arrivals.push(Arrival { name, at_us: at.parse()? });
            }
        }
        Ok(out)
    }

    /// Every stream of every worker against `latest` (secret name, version served).
    pub async fn census(&mut self, latest: &[(String, String)]) -> anyhow::Result<Census> {
        let pairs: Vec<String> = latest.iter().map(|(name, version)| format!("{name}={version}")).collect();
        self.tell_all(&format!("check {}\n", pairs.join(","))).await.context("asking a worker")?;
        let mut census = Census::default();
        for line in self.expect_all("checked ", SLACK).await? {
            census.add_words(&line);
        }
        Ok(census)
    }

    /// Writes `line` to every worker.
    async fn tell_all(&mut self, line: &str) -> std::io::Result<()> {
        for w in &mut self.workers {
            w.stdin.write_all(line.as_bytes()).await?;
            w.stdin.flush().await?;
        }
        Ok(())
    }

    /// CPU time of every worker, to tell the clients' share from the server's.
    pub fn cpu(&self) -> Vec<CpuSnapshot> {
        self.workers.iter().map(|w| proc::cpu(w.pid)).collect()
    }

    /// Asks every worker to exit and reaps it (killed after a grace period).
    pub async fn shutdown(mut self) {
        for w in &mut self.workers {
            let _ = w.stdin.write_all(b"quit\n").await;
            let _ = w.stdin.flush().await;
        }
        for w in &mut self.workers {
            if tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await.is_err() {
                let _ = w.child.kill().await;
            }
        }
    }

    /// The next line of every worker starting with `prefix` (other lines are skipped);
    /// fails on an `error` line, an exited worker or the timeout.
    async fn expect_all(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<Vec<String>> {
        let reads = self.workers.iter_mut().enumerate().map(|(i, w)| async move {
            let read = async {
                loop {
                    let Some(line) = w.lines.next_line().await? else { bail!("worker {i} exited") };
                    if let Some(err) = line.strip_prefix("error ") {
                        bail!("worker {i}: {err}");
                    }
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
            };
            tokio::time::timeout(timeout, read)
                .await
                .with_context(|| format!("worker {i} did not say {prefix:?} within {timeout:?}"))?
        });
        futures_util::future::try_join_all(reads).await
    }
}

/// The number after `key` in a `ready` line.
fn field(line: &str, key: &str) -> usize {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|n| n.parse().ok()).unwrap_or(0)
}
