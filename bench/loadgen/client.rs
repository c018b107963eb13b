//! One simulated proxy: its own HTTP/2 connection (a tonic `Channel` of its own, from a
//! source address of its own in 127.0.0.0/8), plaintext or over mutual TLS with a client
//! certificate of its own, one SDS stream per secret, every response ACKed the way
//! Envoy does. Each stream writes what it received into a [`Slot`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio::sync::{Notify, mpsc};
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

/// What one stream has seen, and the state of the current measurement.
#[derive(Debug, Default)]
struct SlotState {
    version: Option<String>,
    /// The version held when the measurement was armed: the next different one counts.
    armed_base: Option<String>,
    arrival_us: Option<i64>,
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
    /// Streams that ended (error or closed by the server).
    pub broken: AtomicUsize,
    changed: Notify,
}

impl Tracker {
    pub fn new(names: impl IntoIterator<Item = String>) -> Arc<Tracker> {
        let slots: Vec<Slot> = names.into_iter().map(|name| Slot { name, state: Mutex::default() }).collect();
        Arc::new(Tracker {
            initial_pending: AtomicUsize::new(slots.len()),
            slots,
            armed_pending: AtomicUsize::new(0),
            broken: AtomicUsize::new(0),
            changed: Notify::new(),
        })
    }

    fn record(&self, slot: usize, version: &str) {
        let now = unix_us();
        let mut st = self.slots[slot].state.lock().expect("slot lock");
        if st.version.is_none() {
            self.initial_pending.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_one();
        }
        st.version = Some(version.to_owned());
        let fresh = st.armed_base.as_deref().is_some_and(|base| base != version);
        if fresh && st.arrival_us.is_none() {
            st.arrival_us = Some(now);
            self.armed_pending.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_one();
        }
    }

    pub fn initial_pending(&self) -> usize {
        self.initial_pending.load(Ordering::Acquire)
    }

    pub fn armed_pending(&self) -> usize {
        self.armed_pending.load(Ordering::Acquire)
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
}

/// Opens one HTTP/2 connection from `source` (port chosen by the kernel) to `target`;
/// over TLS with `tls` (ALPN h2, the client certificate in its config). Returns what the
/// TLS handshake negotiated, if any.
pub async fn connect(
    source: IpAddr,
    target: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<(Channel, Option<String>)> {
    let negotiated = Arc::new(Mutex::new(None));
    let seen = negotiated.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let (tls, seen) = (tls.clone(), seen.clone());
        async move {
            let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(source, 0))?;
            let stream = socket.connect(target).await?;
            stream.set_nodelay(true)?;
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
    Ok((channel, negotiated))
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

/// Opens the stream of `slot` on `channel` and spawns the task that ACKs its responses.
pub async fn open_stream(
    channel: Channel,
    protocol: Protocol,
    identity: Identity,
    tracker: Arc<Tracker>,
    slot: usize,
) -> anyhow::Result<()> {
    let name = tracker.slots[slot].name.clone();
    match protocol {
        Protocol::Sotw => {
            let (tx, rx) = mpsc::channel(4);
            let first = SotwRequest {
                node: identity.node.clone(),
                resource_names: vec![name.clone()],
                type_url: SECRET_TYPE_URL.to_owned(),
                ..Default::default()
            };
            tx.send(first).await.ok().context("request channel closed")?;
            let inbound = call::<SotwRequest, DiscoveryResponse>(channel, STREAM_SECRETS, rx).await?;
            tokio::spawn(ack_loop(inbound, tx, tracker, name.clone(), move |tracker, resp: DiscoveryResponse| {
                tracker.record(slot, &resp.version_info);
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
            let watched = name.clone();
            tokio::spawn(ack_loop(inbound, tx, tracker, name, move |tracker, resp: DeltaDiscoveryResponse| {
                if let Some(resource) = resp.resources.iter().find(|r| r.name == watched) {
                    tracker.record(slot, &resource.version);
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
    name: String,
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
                stream_error(&tracker, &name, &status);
                break;
            }
        }
    }
    tracker.broken.fetch_add(1, Ordering::Relaxed);
}

/// Logs the first few stream errors of a worker; the rest only count.
fn stream_error(tracker: &Tracker, name: &str, status: &tonic::Status) {
    if tracker.broken.load(Ordering::Relaxed) < 3 {
        eprintln!("loadgen worker: stream for {name} ended: {status}");
    }
}
