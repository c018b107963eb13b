//! One simulated proxy: its own HTTP/2 connection (a tonic `Channel` of its own, from a
//! source address of its own in 127.0.0.0/8), plaintext or over mutual TLS with a client
//! certificate of its own, one SDS stream per secret, every response ACKed the way
//! Envoy does. Each stream writes what it received into a [`Slot`]. What a proxy does
//! when its connection goes away is in `proxy.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::node::{DeltaRequest, SotwRequest};
use crate::proc::unix_us;

pub const SECRET_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Sotw,
    Delta,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Sotw => "SotW",
            Protocol::Delta => "Delta",
        }
    }
}

/// What one stream has seen, and the state of the current measurements.
#[derive(Debug, Default)]
struct SlotState {
    version: Option<String>,
    /// The version held when the measurement was armed: the next different one counts.
    armed_base: Option<String>,
    arrival_us: Option<i64>,
    /// A stream is open for this slot (opened and not ended).
    open: bool,
    /// The open stream (or the last one) has had a response.
    heard: bool,
    /// The last response withdrew the secret (no resource).
    withdrawn: bool,
    rejoin: Rejoin,
}

/// A reconnection measurement of one slot: the first response on a stream opened after
/// the measurement was armed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Rejoin {
    #[default]
    Off,
    /// Waiting for the slot's next stream.
    Armed,
    /// That stream is open; its first response ends the measurement.
    Reopened,
    /// The response came at this time (µs since the epoch).
    At(i64),
}

#[derive(Debug)]
pub struct Slot {
    pub name: String,
    state: Mutex<SlotState>,
}

/// Every stream of a worker, and counters to wait on.
#[derive(Debug)]
pub struct Tracker {
    pub slots: Vec<Slot>,
    /// Streams still waiting for their first response.
    initial_pending: AtomicUsize,
    /// Armed streams still waiting for a new version.
    armed_pending: AtomicUsize,
    /// Streams still waiting for their first response after a reconnection.
    rejoin_pending: AtomicUsize,
    /// Streams that ended (error or closed by the server).
    pub broken: AtomicUsize,
    /// Responses received (withdrawals included) and withdrawals among them.
    responses: AtomicUsize,
    withdrawals: AtomicUsize,
    /// Reconnection attempts that failed (refused, reset, timed out).
    pub failed_connects: AtomicUsize,
    changed: Notify,
}

/// How a worker's streams stand against the versions the server says it serves.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    /// On a live stream with the version served.
    pub held: usize,
    /// On a live stream with another version.
    pub stale: usize,
    /// Whose last response withdrew the secret.
    pub withdrawn: usize,
    /// Without a stream that has had a response.
    pub down: usize,
    /// Every response so far, and the withdrawals among them.
    pub responses: usize,
    pub withdrawals: usize,
    pub failed_connects: usize,
}

impl Census {
    const KEYS: [&str; 7] = ["held", "stale", "withdrawn", "down", "responses", "withdrawals", "failed_connects"];

    fn values(&self) -> [usize; 7] {
        [self.held, self.stale, self.withdrawn, self.down, self.responses, self.withdrawals, self.failed_connects]
    }

    /// `held=N stale=N ...`, the worker's answer to `check`.
    pub fn to_words(self) -> String {
        Self::KEYS.iter().zip(self.values()).map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    }

    /// Adds the `key=N` words of a worker's answer.
    pub fn add_words(&mut self, line: &str) {
        for (key, value) in line.split_whitespace().filter_map(|w| w.split_once('=')) {
            let Ok(value) = value.parse::<usize>() else { continue };
            let field = match key {
                "held" => &mut self.held,
                "stale" => &mut self.stale,
                "withdrawn" => &mut self.withdrawn,
                "down" => &mut self.down,
                "responses" => &mut self.responses,
                "withdrawals" => &mut self.withdrawals,
                "failed_connects" => &mut self.failed_connects,
                _ => continue,
            };
            *field += value;
        }
    }
}

impl Tracker {
    pub fn new(names: impl IntoIterator<Item = String>) -> Arc<Tracker> {
        let slots: Vec<Slot> = names.into_iter().map(|name| Slot { name, state: Mutex::default() }).collect();
        Arc::new(Tracker {
            initial_pending: AtomicUsize::new(slots.len()),
            slots,
            armed_pending: AtomicUsize::new(0),
            rejoin_pending: AtomicUsize::new(0),
            broken: AtomicUsize::new(0),
            responses: AtomicUsize::new(0),
            withdrawals: AtomicUsize::new(0),
            failed_connects: AtomicUsize::new(0),
            changed: Notify::new(),
        })
    }

    fn state(&self, slot: usize) -> std::sync::MutexGuard<'_, SlotState> {
        self.slots[slot].state.lock().expect("slot lock")
    }

    /// A stream was opened for `slot`; returns the version it holds, which a reconnecting
    /// SotW client sends back as `version_info`.
    fn opened(&self, slot: usize) -> Option<String> {
        let mut st = self.state(slot);
        st.open = true;
        st.heard = false;
        if st.rejoin == Rejoin::Armed {
            st.rejoin = Rejoin::Reopened;
        }
        st.version.clone()
    }

    /// The stream of `slot` ended, or its connection was closed.
    pub fn closed(&self, slot: usize) {
        self.state(slot).open = false;
    }

    /// The stream of `slot` has had a response since it was opened.
    pub fn heard(&self, slot: usize) -> bool {
        self.state(slot).heard
    }

    fn record(&self, slot: usize, version: &str) {
        let now = unix_us();
        self.responses.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state(slot);
        if st.version.is_none() {
            self.initial_pending.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_one();
        }
        self.answered(&mut st, now);
        st.withdrawn = false;
        st.version = Some(version.to_owned());
        let fresh = st.armed_base.as_deref().is_some_and(|base| base != version);
        if fresh && st.arrival_us.is_none() {
            st.arrival_us = Some(now);
            self.armed_pending.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_one();
        }
    }

    /// A response without the secret: the server withdrew it.
    fn withdrawn(&self, slot: usize) {
        self.responses.fetch_add(1, Ordering::Relaxed);
        self.withdrawals.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state(slot);
        self.answered(&mut st, unix_us());
        st.withdrawn = true;
    }

    /// The first response of a stream ends a reconnection measurement.
    fn answered(&self, st: &mut SlotState, now: i64) {
        if st.heard {
            return;
        }
        st.heard = true;
        if st.rejoin == Rejoin::Reopened {
            st.rejoin = Rejoin::At(now);
            self.rejoin_pending.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_one();
        }
    }

    pub fn initial_pending(&self) -> usize {
        self.initial_pending.load(Ordering::Acquire)
    }

    pub fn armed_pending(&self) -> usize {
        self.armed_pending.load(Ordering::Acquire)
    }

    pub fn rejoin_pending(&self) -> usize {
        self.rejoin_pending.load(Ordering::Acquire)
    }

    /// Resolves after the next first-response or arrival (or spuriously).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Arms every stream of `names`: its next different version is recorded. Returns how
    /// many streams were armed.
    pub fn arm(&self, names: &std::collections::HashSet<&str>) -> usize {
        let armed: Vec<&Slot> = self.slots.iter().filter(|s| names.contains(s.name.as_str())).collect();
        // Count first: an arrival can only come after the rotation, which follows this.
        self.armed_pending.store(armed.len(), Ordering::Release);
        for slot in &armed {
            let mut st = slot.state.lock().expect("slot lock");
            st.armed_base = Some(st.version.clone().unwrap_or_default());
            st.arrival_us = None;
        }
        armed.len()
    }

    /// Ends the measurement: (slot index, arrival µs or None) of every armed stream.
    pub fn disarm(&self) -> Vec<(usize, Option<i64>)> {
        let mut out = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let mut st = slot.state.lock().expect("slot lock");
            if st.armed_base.take().is_some() {
                out.push((i, st.arrival_us.take()));
            }
        }
        self.armed_pending.store(0, Ordering::Release);
        out
    }

    /// Arms a reconnection measurement of every stream: the first response on the next
    /// stream each slot opens is recorded. Returns how many streams were armed.
    pub fn arm_rejoin(&self) -> usize {
        self.rejoin_pending.store(self.slots.len(), Ordering::Release);
        for slot in &self.slots {
            slot.state.lock().expect("slot lock").rejoin = Rejoin::Armed;
        }
        self.slots.len()
    }

    /// Ends the reconnection measurement: (slot index, µs or None) of every stream.
    pub fn disarm_rejoin(&self) -> Vec<(usize, Option<i64>)> {
        let mut out = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let mut st = slot.state.lock().expect("slot lock");
            match std::mem::take(&mut st.rejoin) {
                Rejoin::Off => {}
                Rejoin::At(at) => out.push((i, Some(at))),
                Rejoin::Armed | Rejoin::Reopened => out.push((i, None)),
            }
        }
        self.rejoin_pending.store(0, Ordering::Release);
        out
    }

    /// Every stream against `latest` (secret name -> the version served).
    pub fn census(&self, latest: &HashMap<&str, &str>) -> Census {
        let mut census = Census {
            responses: self.responses.load(Ordering::Relaxed),
            withdrawals: self.withdrawals.load(Ordering::Relaxed),
            failed_connects: self.failed_connects.load(Ordering::Relaxed),
            ..Census::default()
        };
        for slot in &self.slots {
            let st = slot.state.lock().expect("slot lock");
            let counter = if !(st.open && st.heard) {
                &mut census.down
            } else if st.withdrawn {
                &mut census.withdrawn
            } else if st.version.as_deref() == latest.get(slot.name.as_str()).copied() {
                &mut census.held
            } else {
                &mut census.stale
            };
            *counter += 1;
        }
        census
    }
}

/// An HTTP/2 connection of one proxy.
pub struct Connected {
    pub channel: Channel,
    /// What the TLS handshake negotiated, if any.
    pub negotiated: Option<String>,
    /// A second descriptor of the TCP socket: shutting it down closes the connection at
    /// once, whatever the HTTP/2 client still holds (a proxy dropping its connection).
    socket: std::net::TcpStream,
}

impl Connected {
    /// Closes the connection now (FIN both ways); its streams end with an error.
    pub fn sever(&self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

/// Opens one HTTP/2 connection from `source` (port chosen by the kernel) to `target`;
/// over TLS with `tls` (ALPN h2, the client certificate in its config).
pub async fn connect(
    source: IpAddr,
    target: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<Connected> {
    let negotiated = Arc::new(Mutex::new(None));
    let socket = Arc::new(Mutex::new(None));
    let (seen, twin) = (negotiated.clone(), socket.clone());
    let connector = tower::service_fn(move |_: Uri| {
        let (tls, seen, twin) = (tls.clone(), seen.clone(), twin.clone());
        async move {
            let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(source, 0))?;
            let stream = socket.connect(target).await?;
            stream.set_nodelay(true)?;
            let dup = std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?);
            *twin.lock().expect("socket lock") = Some(dup);
            let Some(config) = tls else { return Ok::<_, std::io::Error>(TokioIo::new(Either::Left(stream))) };
            let stream = TlsConnector::from(config).connect(crate::mtls::server_name(), stream).await?;
            *seen.lock().expect("negotiated lock") = Some(crate::mtls::negotiated(stream.get_ref().1));
            Ok(TokioIo::new(Either::Right(stream)))
        }
    });
    let endpoint = Endpoint::from_shared(format!("http://{target}"))?.connect_timeout(CONNECT_TIMEOUT);
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect_with_connector(connector))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect {source} -> {target}"))?;
    let negotiated = negotiated.lock().expect("negotiated lock").take();
    let socket = socket.lock().expect("socket lock").take().context("connected without a socket")?;
    Ok(Connected { channel, negotiated, socket })
}

/// What a proxy sends about itself: its encoded node, and whether every request carries
/// it (Envoy's default) or only the first (`set_node_on_first_message_only`).
#[derive(Clone)]
pub struct Identity {
    pub node: Bytes,
    pub every_request: bool,
}

impl Identity {
    /// The node for a request after the first.
    fn again(&self) -> Bytes {
        if self.every_request { self.node.clone() } else { Bytes::new() }
    }
}

const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";

/// Opens the stream of `slot` on `channel` and spawns the task that ACKs its responses
/// into `streams`. A SotW stream asks again for the version its slot holds, as Envoy
/// does on a new stream after a reconnection (`version_info`, the last one accepted).
/// Delta leaves out `initial_resource_versions`: the lean request has no such field.
pub async fn open_stream(
    streams: &mut JoinSet<()>,
    channel: Channel,
    protocol: Protocol,
    identity: Identity,
    tracker: Arc<Tracker>,
    slot: usize,
) -> anyhow::Result<()> {
    let name = tracker.slots[slot].name.clone();
    let held = tracker.opened(slot);
    match protocol {
        Protocol::Sotw => {
            let (tx, rx) = mpsc::channel(4);
            let first = SotwRequest {
                version_info: held.unwrap_or_default(),
                node: identity.node.clone(),
                resource_names: vec![name.clone()],
                type_url: SECRET_TYPE_URL.to_owned(),
                ..Default::default()
            };
            tx.send(first).await.ok().context("request channel closed")?;
            let inbound = call::<SotwRequest, DiscoveryResponse>(channel, STREAM_SECRETS, rx).await?;
            streams.spawn(ack_loop(inbound, tx, tracker, slot, move |tracker, resp: DiscoveryResponse| {
                // SotW: the response holds every subscribed resource; none is a withdrawal.
                if resp.resources.is_empty() {
                    tracker.withdrawn(slot);
                } else {
                    tracker.record(slot, &resp.version_info);
                }
                // ACK: the version and nonce just received, same names.
                SotwRequest {
                    version_info: resp.version_info,
                    node: identity.again(),
                    resource_names: vec![name.clone()],
                    type_url: SECRET_TYPE_URL.to_owned(),
                    response_nonce: resp.nonce,
                }
            }));
        }
        Protocol::Delta => {
            let (tx, rx) = mpsc::channel(4);
            let first = DeltaRequest {
                node: identity.node.clone(),
                type_url: SECRET_TYPE_URL.to_owned(),
                resource_names_subscribe: vec![name.clone()],
                ..Default::default()
            };
            tx.send(first).await.ok().context("request channel closed")?;
            let inbound = call::<DeltaRequest, DeltaDiscoveryResponse>(channel, DELTA_SECRETS, rx).await?;
            streams.spawn(ack_loop(inbound, tx, tracker, slot, move |tracker, resp: DeltaDiscoveryResponse| {
                if let Some(resource) = resp.resources.iter().find(|r| r.name == name) {
                    tracker.record(slot, &resource.version);
                } else if resp.removed_resources.contains(&name) {
                    tracker.withdrawn(slot);
                }
                DeltaRequest {
                    node: identity.again(),
                    type_url: SECRET_TYPE_URL.to_owned(),
                    response_nonce: resp.nonce,
                    ..Default::default()
                }
            }));
        }
    }
    Ok(())
}

/// Opens a bidirectional streaming call of `path`, sending what comes on `requests`.
async fn call<Req, Resp>(
    channel: Channel,
    path: &'static str,
    requests: mpsc::Receiver<Req>,
) -> anyhow::Result<tonic::Streaming<Resp>>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.context("channel not ready")?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let request = tonic::Request::new(ReceiverStream::new(requests));
    let path = http::uri::PathAndQuery::from_static(path);
    Ok(grpc.streaming(request, path, codec).await?.into_inner())
}

/// Reads responses until the stream ends, answering each with the request `ack` builds
/// (recording the arrival on the way), the way Envoy acknowledges every response.
async fn ack_loop<Resp, Req>(
    mut inbound: tonic::Streaming<Resp>,
    tx: mpsc::Sender<Req>,
    tracker: Arc<Tracker>,
    slot: usize,
    mut ack: impl FnMut(&Tracker, Resp) -> Req,
) {
    loop {
        match inbound.message().await {
            Ok(Some(resp)) => {
                if tx.send(ack(&tracker, resp)).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(status) => {
                stream_error(&tracker, &tracker.slots[slot].name, &status);
                break;
            }
        }
    }
    tracker.closed(slot);
    tracker.broken.fetch_add(1, Ordering::Relaxed);
}

/// Logs the first few stream errors of a worker; the rest only count.
fn stream_error(tracker: &Tracker, name: &str, status: &tonic::Status) {
    if tracker.broken.load(Ordering::Relaxed) < 3 {
        eprintln!("loadgen worker: stream for {name} ended: {status}");
    }
}
