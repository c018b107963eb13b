//! Tools to attack certwire's SDS port the way a hostile peer would, over plaintext
//! HTTP/2 on loopback: a certwire with a `[limits]` table of the test's choosing, its
//! resident memory sampled from `/proc`, a legitimate gRPC client (tonic, as Envoy's
//! stand-in) to show service goes on, and a hand-written HTTP/2 client that keeps to
//! flow control exactly (so what it gets in is what certwire's windows let in) and
//! stops one byte short of every message it announces.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message as _;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use super::certwire::Certwire;
use super::files::SecretDir;
use super::pki::Ca;
use super::util::{self, WAIT};

pub const SECRET_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
pub const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const MIB: u64 = 1024 * 1024;

/// The secret every target serves, fetched by the legitimate client.
pub const WEB: &str = "web";

/// A certwire under attack: `certwire serve --config FILE --files ROOT --listen SDS`,
/// the config file holding `[limits]` as the test wrote it, ROOT a TLS secret `web`
/// and whatever else the test put there.
pub struct Target {
    pub certwire: Certwire,
    pub sds: SocketAddr,
    pub pid: u32,
    pub root: PathBuf,
    _dir: TempDir,
}

impl Target {
    /// `limits` is the body of the `[limits]` table (TOML lines); `setup` adds secret
    /// directories to the root before certwire starts. Returns once `web` is served.
    pub async fn start(limits: &str, args: &[&str], setup: impl FnOnce(&Path)) -> Target {
        let dir = util::tempdir();
        let root = dir.path().join("secrets");
        std::fs::create_dir(&root).unwrap();
        let ca = Ca::new("attack CA");
        SecretDir::create_tls(&root, WEB, &ca.server("web.example.com"), None);
        setup(&root);
        let config = dir.path().join("certwire.toml");
        std::fs::write(&config, format!("[limits]\n{limits}\n")).unwrap();
        let mut all: Vec<String> =
            ["--config", path_str(&config), "--files", path_str(&root), "--listen", "127.0.0.1:0"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        all.extend(args.iter().map(|a| a.to_string()));
        let certwire = Certwire::serve(all).await;
        let sds = certwire.sds_addr();
        let pid = certwire.pid().expect("certwire is running");
        let target = Target { certwire, sds, pid, root, _dir: dir };
        target.wait_served(WEB).await;
        target
    }

    /// Waits until `/status/secrets` shows `name` with a version.
    pub async fn wait_served(&self, name: &str) {
        util::wait_for(&format!("{name} served"), WAIT, || async {
            self.certwire.secret_status(name).await?["version"].as_str().map(|_| ())
        })
        .await;
    }

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    /// File descriptors certwire has open: its listeners, files and every connection.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid)).expect("certwire is running").count()
    }

    /// Waits until certwire has at most `fds` descriptors open: the connections of an
    /// attack are gone from its side too.
    pub async fn wait_fds_at_most(&self, fds: usize) {
        util::wait_for(&format!("certwire down to {fds} open descriptors"), WAIT, || async {
            (self.open_fds() <= fds).then_some(())
        })
        .await;
    }

    /// `certwire_limits_hit_total{limit}`.
    pub async fn limit_hits(&self, limit: &str) -> f64 {
        self.certwire.metric_sum("certwire_limits_hit_total", &[("limit", limit)]).await
    }

    /// `/healthz` answers 200 within `limit`.
    pub async fn healthz(&self, limit: Duration) -> bool {
        let get = super::http::get(self.certwire.admin_addr(), "/healthz");
        matches!(tokio::time::timeout(limit, get).await, Ok(Ok(response)) if response.status == 200)
    }

    /// Service goes on: `/healthz` answers and a new client fetches `web`, each within
    /// a generous 10 s (a healthy certwire answers in milliseconds; a starved one, as
    /// before the limits, took 9 s and more).
    pub async fn assert_serving(&self, during: &str) {
        assert!(self.healthz(Duration::from_secs(10)).await, "{during}: /healthz did not answer 200 within 10 s");
        let fetched = tokio::time::timeout(Duration::from_secs(10), fetch(self.sds, &[WEB.to_owned()])).await;
        let response = match fetched {
            Ok(Ok(response)) => response,
            Ok(Err(status)) => panic!("{during}: a legitimate FetchSecrets of {WEB} failed: {status}"),
            Err(_) => panic!("{during}: a legitimate FetchSecrets of {WEB} got no answer within 10 s"),
        };
        assert_eq!(response.resources.len(), 1, "{during}: one resource for {WEB}");
        let secret = Secret::decode(response.resources[0].value.as_slice()).expect("a Secret");
        assert_eq!(secret.name, WEB, "{during}");
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("certwire is running");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("VmRSS in kB")
}

/// The highest VmRSS of a process seen by a thread sampling it every 10 ms, so a peak
/// between two looks of the test is not missed.
pub struct RssPeak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssPeak {
    pub fn start(pid: u32) -> RssPeak {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return };
                if let Some(kib) = status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kib| kib.parse::<u64>().ok())
                {
                    p.fetch_max(kib, Ordering::AcqRel);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssPeak { peak, stop, thread: Some(thread) }
    }

    pub fn peak_kib(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A tonic client on a fresh connection to `sds`, with no limit on what it decodes.
pub async fn client(sds: SocketAddr) -> SecretDiscoveryServiceClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{sds}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to SDS {sds}: {e}"));
    SecretDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX)
}

/// A FetchSecrets request for `names`, with a node as Envoy sends it.
pub fn request(names: &[String]) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: SECRET_TYPE_URL.to_owned(),
        resource_names: names.to_vec(),
        node: Some(Node { id: "attacks".into(), cluster: "attacks".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// FetchSecrets of `names` on a fresh connection.
pub async fn fetch(sds: SocketAddr, names: &[String]) -> Result<DiscoveryResponse, tonic::Status> {
    client(sds).await.fetch_secrets(request(names)).await.map(tonic::Response::into_inner)
}

/// A TCP connection to `sds` from source address `from` (any port), so that a test can
/// be a peer of its own for `max_connections_per_ip`: all of 127.0.0.0/8 is loopback.
pub async fn connect_from(sds: SocketAddr, from: IpAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(sds).await
}

/// An HPACK literal header field without indexing, new name, no Huffman coding.
pub fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    for s in [name, value] {
        assert!(s.len() < 127, "a one-byte length");
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
}

/// An HTTP/2 frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// What the server told one raw connection.
struct State {
    settings_seen: bool,
    /// SETTINGS_INITIAL_WINDOW_SIZE and SETTINGS_MAX_FRAME_SIZE of the server.
    initial_window: i64,
    max_frame: usize,
    /// Flow-control windows the server granted: the connection's and each stream's.
    conn_window: i64,
    windows: HashMap<u32, i64>,
    /// Streams the server ended (RST_STREAM, or HEADERS with END_STREAM).
    ended: HashSet<u32>,
    /// The highest PING payload acknowledged.
    ping_ack: u64,
    goaway: bool,
    closed: bool,
}

/// An HTTP/2 connection written by hand: the client preface, its SETTINGS acknowledged,
/// PINGs answered, and every window the server grants counted, so that DATA is sent
/// exactly as far as the server's flow control allows (a peer that breaks flow control
/// is a protocol error certwire's HTTP/2 library ends at once; one that keeps to it is
/// the attack worth measuring).
pub struct RawConn {
    state: Arc<Mutex<State>>,
    changed: tokio::sync::watch::Receiver<u64>,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    reader: JoinHandle<()>,
    next_stream: u32,
    next_ping: u64,
}

impl RawConn {
    /// Connects, sends the preface and an empty SETTINGS, and waits for the server's
    /// SETTINGS (acknowledged before anything else is sent).
    pub async fn open(sds: SocketAddr) -> RawConn {
        let sock = TcpStream::connect(sds).await.unwrap_or_else(|e| panic!("connect to {sds}: {e}"));
        sock.set_nodelay(true).unwrap();
        let (mut read, mut write) = sock.into_split();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        write.write_all(&hello).await.unwrap();
        let state = Arc::new(Mutex::new(State {
            settings_seen: false,
            initial_window: 65_535,
            max_frame: 16_384,
            conn_window: 65_535,
            windows: HashMap::new(),
            ended: HashSet::new(),
            ping_ack: 0,
            goaway: false,
            closed: false,
        }));
        let writer = Arc::new(tokio::sync::Mutex::new(write));
        let (tx, changed) = tokio::sync::watch::channel(0u64);
        let (st, wr) = (state.clone(), writer.clone());
        let reader = tokio::spawn(async move {
            loop {
                let mut head = [0u8; 9];
                if read.read_exact(&mut head).await.is_err() {
                    break;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let (kind, flags) = (head[3], head[4]);
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                if read.read_exact(&mut payload).await.is_err() {
                    break;
                }
                let mut reply = None;
                let mut settings = false;
                {
                    let mut s = st.lock().unwrap();
                    match kind {
                        HEADERS if flags & END_STREAM != 0 => {
                            s.ended.insert(stream);
                        }
                        RST_STREAM => {
                            s.ended.insert(stream);
                        }
                        SETTINGS if flags & ACK == 0 => {
                            for setting in payload.chunks_exact(6) {
                                let id = u16::from_be_bytes([setting[0], setting[1]]);
                                let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                                match id {
                                    0x4 => {
                                        let delta = i64::from(value) - s.initial_window;
                                        s.initial_window = i64::from(value);
                                        s.windows.values_mut().for_each(|w| *w += delta);
                                    }
                                    0x5 => s.max_frame = value as usize,
                                    _ => {}
                                }
                            }
                            reply = Some(frame(SETTINGS, ACK, 0, &[]));
                            settings = true;
                        }
                        PING if flags & ACK == 0 => reply = Some(frame(PING, ACK, 0, &payload)),
                        PING => {
                            let id = u64::from_be_bytes(payload[..8].try_into().unwrap());
                            s.ping_ack = s.ping_ack.max(id);
                        }
                        GOAWAY => s.goaway = true,
                        WINDOW_UPDATE => {
                            let n = i64::from(u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff);
                            if stream == 0 {
                                s.conn_window += n;
                            } else if let Some(w) = s.windows.get_mut(&stream) {
                                *w += n;
                            }
                        }
                        _ => {}
                    }
                }
                if let Some(reply) = reply {
                    if wr.lock().await.write_all(&reply).await.is_err() {
                        break;
                    }
                    // The first SETTINGS is acknowledged before the writer may go on.
                    st.lock().unwrap().settings_seen |= settings;
                }
                tx.send_modify(|n| *n += 1);
            }
            st.lock().unwrap().closed = true;
            tx.send_modify(|n| *n += 1);
        });
        let mut conn = RawConn { state, changed, writer, reader, next_stream: 1, next_ping: 0 };
        conn.wait("the server's SETTINGS", |s| s.settings_seen || s.closed).await;
        assert!(!conn.state.lock().unwrap().closed, "the server closed the connection before its SETTINGS");
        conn
    }

    /// Waits (up to [`WAIT`]) until `done` holds for the state.
    async fn wait(&mut self, what: &str, done: impl Fn(&State) -> bool) {
        let wait = async {
            loop {
                if done(&self.state.lock().unwrap()) {
                    return;
                }
                if self.changed.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(WAIT, wait).await.unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"));
    }

    /// One PING round trip: every frame sent before it has been read and handled by the
    /// server when the acknowledgement comes. False if the connection closed.
    pub async fn ping(&mut self) -> bool {
        self.next_ping += 1;
        let id = self.next_ping;
        if self.writer.lock().await.write_all(&frame(PING, 0, 0, &id.to_be_bytes())).await.is_err() {
            return false;
        }
        self.wait("a PING acknowledged", |s| s.ping_ack >= id || s.closed).await;
        !self.state.lock().unwrap().closed
    }

    /// Opens a gRPC call to `path` (HEADERS, no END_STREAM) and returns its stream id.
    pub async fn open_call(&mut self, path: &str) -> u32 {
        let id = self.next_stream;
        self.next_stream += 2;
        let mut block = Vec::new();
        literal(&mut block, ":method", "POST");
        literal(&mut block, ":scheme", "http");
        literal(&mut block, ":path", path);
        literal(&mut block, ":authority", "127.0.0.1");
        literal(&mut block, "content-type", "application/grpc");
        literal(&mut block, "te", "trailers");
        {
            let mut s = self.state.lock().unwrap();
            let window = s.initial_window;
            s.windows.insert(id, window);
        }
        self.writer.lock().await.write_all(&frame(HEADERS, END_HEADERS, id, &block)).await.unwrap();
        id
    }

    /// On each of `streams`, a gRPC message announced as `announced` bytes long of
    /// which all but the last byte is sent, round robin, one frame per stream at a
    /// time, as far as the server's windows allow. Returns once nothing more can be
    /// sent and the server has read everything (two PING round trips find nothing new:
    /// the first shows the server's connection read every frame, the second that its
    /// calls had their turn). Returns the DATA bytes sent.
    pub async fn send_partial_messages(&mut self, streams: &[u32], announced: u32) -> u64 {
        let total = 5 + announced as usize - 1;
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&announced.to_be_bytes());
        let mut remaining: HashMap<u32, usize> = streams.iter().map(|s| (*s, total)).collect();
        let mut sent = 0u64;
        let zeros = vec![0u8; 1 << 20];
        let mut quiet_rounds = 0;
        while quiet_rounds < 2 {
            let mut batch = Vec::new();
            let mut progress = false;
            for &id in streams {
                let left = remaining[&id];
                let n = {
                    let mut s = self.state.lock().unwrap();
                    if s.closed || s.goaway || s.ended.contains(&id) || left == 0 {
                        continue;
                    }
                    let window = s.windows[&id].min(s.conn_window).max(0) as usize;
                    let n = left.min(window).min(s.max_frame).min(zeros.len());
                    if n == 0 {
                        continue;
                    }
                    *s.windows.get_mut(&id).unwrap() -= n as i64;
                    s.conn_window -= n as i64;
                    n
                };
                let offset = total - left;
                let mut payload = Vec::with_capacity(n);
                if offset < 5 {
                    payload.extend_from_slice(&prefix[offset..5.min(offset + n)]);
                }
                let zeros_needed = n - payload.len();
                payload.extend_from_slice(&zeros[..zeros_needed]);
                batch.extend(frame(DATA, 0, id, &payload));
                remaining.insert(id, left - n);
                sent += n as u64;
                progress = true;
                if batch.len() >= 256 * 1024 {
                    if self.writer.lock().await.write_all(&batch).await.is_err() {
                        return sent;
                    }
                    batch.clear();
                }
            }
            if !batch.is_empty() && self.writer.lock().await.write_all(&batch).await.is_err() {
                return sent;
            }
            if progress {
                quiet_rounds = 0;
                continue;
            }
            if !self.ping().await {
                return sent;
            }
            quiet_rounds += 1;
        }
        sent
    }

    /// Streams the server has ended so far.
    pub fn ended(&self) -> usize {
        self.state.lock().unwrap().ended.len()
    }

    pub fn closed(&self) -> bool {
        let s = self.state.lock().unwrap();
        s.closed || s.goaway
    }
}

impl Drop for RawConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// What a client that opened a TCP connection and then stays silent (or sends the
/// preface and then nothing) sees of it.
#[derive(Default)]
pub struct Watch {
    /// Connections on which the server sent something (its SETTINGS).
    pub greeted: AtomicUsize,
    /// Connections the server closed after sending something.
    pub closed_after_greeting: AtomicUsize,
    /// Connections the server closed without sending a byte: refused at accept.
    pub refused: AtomicUsize,
}

impl Watch {
    pub fn closed(&self) -> usize {
        self.closed_after_greeting.load(Ordering::Acquire) + self.refused.load(Ordering::Acquire)
    }
}

/// Connections held open by tasks that read each until the server closes it. Dropping
/// this closes the ones still open.
pub struct Held {
    pub watch: Arc<Watch>,
    tasks: Vec<JoinHandle<()>>,
}

impl Held {
    /// How many connections were opened.
    pub fn count(&self) -> usize {
        self.tasks.len()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How a held connection greets the server.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// Nothing at all.
    Silence,
    /// The first half of the HTTP/2 client preface, then nothing.
    HalfPreface,
    /// The preface and an empty SETTINGS: an HTTP/2 connection without a stream.
    Preface,
}

/// Opens `n` connections to `sds`, one after the other, from the source addresses
/// `from` in turn, each greeting the server as `greeting` says and then silent; each is
/// read by a task of its own until the server closes it.
pub async fn hold(sds: SocketAddr, from: &[IpAddr], n: usize, greeting: Greeting) -> Held {
    let watch = Arc::new(Watch::default());
    let mut tasks = Vec::with_capacity(n);
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    let hello: &[u8] = match greeting {
        Greeting::Silence => &[],
        Greeting::HalfPreface => &PREFACE[..PREFACE.len() / 2],
        Greeting::Preface => &hello,
    };
    for i in 0..n {
        let mut sock = connect_from(sds, from[i % from.len()]).await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
        if !hello.is_empty() {
            sock.write_all(hello).await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
        }
        let watch = watch.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut greeted = false;
            loop {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) if !greeted => {
                        greeted = true;
                        watch.greeted.fetch_add(1, Ordering::AcqRel);
                    }
                    Ok(_) => {}
                }
            }
            let counter = if greeted { &watch.closed_after_greeting } else { &watch.refused };
            counter.fetch_add(1, Ordering::AcqRel);
            // Held until aborted, like an attacker who does not close its side.
            std::future::pending::<()>().await;
        }));
    }
    Held { watch, tasks }
}

/// Source addresses 127.0.N.1 for N in 1..=count: peers of their own for
/// `max_connections_per_ip`, all loopback.
pub fn loopback_peers(count: u8) -> Vec<IpAddr> {
    (1..=count).map(|n| IpAddr::from([127, 0, n, 1])).collect()
}

/// `n` names of `len` bytes each, all different, none served.
pub fn made_up_names(n: usize, len: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut name = format!("n{i}-");
            name.extend(std::iter::repeat_n('x', len.saturating_sub(name.len())));
            name
        })
        .collect()
}

/// KiB to MiB for messages.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
