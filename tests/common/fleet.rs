//! A fleet of simulated proxies for the fault tests: each proxy is one HTTP/2
//! connection (tonic) from a loopback address of its own choosing, with one SotW
//! stream per secret name, as Envoy opens them. Every response is ACKed and its
//! `version_info` recorded per stream. A broken connection is reconnected the way
//! Envoy does it (backoff with jitter, 500 ms base, 4 s cap), or all at once on
//! [`Fleet::reconnect_all`] (a thundering herd).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use super::attack::{SECRET_TYPE_URL, connect_from};

/// What the fleet knows of one stream.
#[derive(Default)]
struct StreamState {
    /// `version_info` of the last response.
    version: Option<String>,
    /// The connection the last response came on (see [`Fleet::connections`]).
    connection: usize,
}

struct Shared {
    streams: Vec<Mutex<StreamState>>,
    /// Connections established, over the fleet's life; numbers them.
    connections: AtomicUsize,
}

pub struct Fleet {
    shared: Arc<Shared>,
    names: Vec<String>,
    herd: watch::Sender<u64>,
    _tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts `proxies` proxies, proxy `i` connecting from `from[i % from.len()]`, each
    /// streaming every one of `names`. Returns at once; see [`Fleet::wait_all_on`].
    pub fn start(sds: SocketAddr, from: &[IpAddr], proxies: usize, names: &[&str]) -> Fleet {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let shared = Arc::new(Shared {
            streams: (0..proxies * names.len()).map(|_| Mutex::default()).collect(),
            connections: AtomicUsize::new(0),
        });
        let (herd, _) = watch::channel(0);
        let mut tasks = JoinSet::new();
        for proxy in 0..proxies {
            let proxy = Proxy {
                index: proxy,
                sds,
                from: from[proxy % from.len()],
                names: names.clone(),
                shared: shared.clone(),
                herd: herd.subscribe(),
            };
            tasks.spawn(proxy.run());
        }
        Fleet { shared, names, herd, _tasks: tasks }
    }

    /// Streams whose last response carried `version`, per name in the order given.
    pub fn on_version(&self, versions: &[&str]) -> usize {
        self.shared
            .streams
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                let want = versions[i % self.names.len()];
                s.lock().unwrap().version.as_deref() == Some(want)
            })
            .count()
    }

    pub fn streams(&self) -> usize {
        self.shared.streams.len()
    }

    /// Connections established so far (first ones included).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Streams whose last response came on a connection numbered `after` or later.
    pub fn answered_since(&self, after: usize) -> usize {
        self.shared.streams.iter().filter(|s| s.lock().unwrap().connection >= after).count()
    }

    /// Every proxy drops its connection at the same moment and reconnects at once,
    /// without backoff.
    pub fn reconnect_all(&self) {
        self.herd.send_modify(|epoch| *epoch += 1);
    }
}

struct Proxy {
    index: usize,
    sds: SocketAddr,
    from: IpAddr,
    names: Vec<String>,
    shared: Arc<Shared>,
    herd: watch::Receiver<u64>,
}

/// Why a connection ended.
enum Ended {
    Broken,
    Herd,
}

impl Proxy {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            let ended = match self.connect().await {
                Ok(channel) => {
                    failures = 0;
                    let connection = self.shared.connections.fetch_add(1, Ordering::AcqRel) + 1;
                    self.serve(channel, connection).await
                }
                Err(_) => Ended::Broken,
            };
            match ended {
                Ended::Herd => continue,
                Ended::Broken => {
                    failures += 1;
                    tokio::time::sleep(backoff(failures, self.index)).await;
                }
            }
        }
    }

    async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        let (sds, from) = (self.sds, self.from);
        Endpoint::from_shared(format!("http://{sds}"))
            .expect("an SDS address is a URI")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_| async move {
                connect_from(sds, from).await.map(hyper_util::rt::TokioIo::new)
            }))
            .await
    }

    /// Runs one stream per name on `channel` until one breaks or the herd is called.
    async fn serve(&mut self, channel: Channel, connection: usize) -> Ended {
        let mut streams = JoinSet::new();
        for (j, name) in self.names.iter().enumerate() {
            let slot = self.index * self.names.len() + j;
            let client = SecretDiscoveryServiceClient::new(channel.clone());
            streams.spawn(stream(client, name.clone(), self.shared.clone(), slot, connection));
        }
        self.herd.borrow_and_update();
        let ended = tokio::select! {
            _ = streams.join_next() => Ended::Broken,
            _ = self.herd.changed() => Ended::Herd,
        };
        streams.abort_all();
        ended
    }
}

/// One SotW stream of `name`: every response recorded in `slot` and ACKed. Returns
/// when the stream ends or fails.
async fn stream(
    mut client: SecretDiscoveryServiceClient<Channel>,
    name: String,
    shared: Arc<Shared>,
    slot: usize,
    connection: usize,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let request = |version: String, nonce: String| DiscoveryRequest {
        version_info: version,
        response_nonce: nonce,
        resource_names: vec![name.clone()],
        type_url: SECRET_TYPE_URL.to_owned(),
        node: Some(Node { id: format!("fleet-{slot}"), cluster: "fleet".into(), ..Default::default() }),
        ..Default::default()
    };
    let _ = tx.send(request(String::new(), String::new()));
    let Ok(response) = client.stream_secrets(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await else {
        return;
    };
    let mut responses = response.into_inner();
    while let Some(Ok(response)) = responses.next().await {
        {
            let mut state = shared.streams[slot].lock().unwrap();
            state.version = Some(response.version_info.clone());
            state.connection = connection;
        }
        if tx.send(request(response.version_info, response.nonce)).is_err() {
            return;
        }
    }
}

/// Envoy's reconnect backoff: exponential from 500 ms, capped at 4 s, with full jitter
/// (spread deterministically by proxy so that the fleet does not come back in step).
fn backoff(failures: u32, proxy: usize) -> Duration {
    let ceiling = 500u64.saturating_mul(1 << failures.min(3)).min(4_000);
    let jitter = (proxy as u64).wrapping_mul(2_654_435_761) % ceiling.max(1);
    Duration::from_millis(jitter.max(50))
}
