//! Protocol tests: a tonic client plays Envoy against the real service on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Streaming;
use tonic::transport::Channel;

use super::proxies::Proxies;
use super::{Sds, Shared};
use crate::ingest::Sink;
use crate::metrics::Metrics;
use crate::pki::{KeyBytes, Material, SECRET_TYPE_URL};
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Long enough for a push on a loaded machine; only used to wait for something that must come.
const ARRIVE: Duration = Duration::from_secs(10);
/// How long to listen for something that must NOT come. A correct server never sends it,
/// so a slow machine can only make this test pass more slowly, never fail wrongly.
const QUIET: Duration = Duration::from_millis(300);

struct Harness {
    sink: Sink,
    shared: Shared,
    client: SecretDiscoveryServiceClient<Channel>,
    shutdown: Shutdown,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn harness() -> Harness {
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(Store::new());
    let shutdown = Shutdown::new();
    let shared = Shared {
        store: store.clone(),
        proxies: Arc::new(Proxies::new(metrics.clone())),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = Sds::new(shared.clone());
    let stop = shutdown.token();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
            .await
            .unwrap();
    });
    let client = SecretDiscoveryServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let sink = Sink::new(store, metrics, "test", false);
    Harness { sink, shared, client, shutdown }
}

impl Harness {
    fn put(&self, name: &str, content: &str) {
        self.sink.update(name, &Material::Generic(KeyBytes::new(content.as_bytes().to_vec())), Instant::now()).unwrap();
    }
    fn version(&self, name: &str) -> String {
        self.shared.store.get(name).unwrap().version.to_string()
    }
    async fn sotw(&mut self) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
        let (tx, rx) = mpsc::channel(8);
        let stream = self.client.stream_secrets(ReceiverStream::new(rx)).await.unwrap().into_inner();
        (tx, stream)
    }
    async fn delta(&mut self) -> (mpsc::Sender<DeltaDiscoveryRequest>, Streaming<DeltaDiscoveryResponse>) {
        let (tx, rx) = mpsc::channel(8);
        let stream = self.client.delta_secrets(ReceiverStream::new(rx)).await.unwrap().into_inner();
        (tx, stream)
    }
    fn acked(&self, name: &str) -> Option<String> {
        let status = self.shared.proxies.status();
        let n = status.iter().flat_map(|p| p.secrets.iter()).find(|n| &*n.name == name)?;
        n.acked_version.as_deref().map(str::to_owned)
    }
}

fn node() -> Option<Node> {
    Some(Node { id: "envoy-1".into(), cluster: "edge".into(), ..Default::default() })
}

fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node: node(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: nonce.into(),
        error_detail: None,
        ..Default::default()
    }
}

async fn next<T>(s: &mut Streaming<T>) -> T {
    tokio::time::timeout(ARRIVE, s.message()).await.expect("a response in time").unwrap().expect("stream open")
}

async fn silent<T: std::fmt::Debug>(s: &mut Streaming<T>) {
    if let Ok(got) = tokio::time::timeout(QUIET, s.message()).await {
        panic!("expected no response, got {got:?}");
    }
}

async fn wait_until(mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < ARRIVE, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn secret_name(r: &DiscoveryResponse) -> String {
    use prost::Message;
    let any = &r.resources[0];
    assert_eq!(any.type_url, SECRET_TYPE_URL);
    envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret::decode(any.value.as_slice()).unwrap().name
}

#[tokio::test]
async fn sotw_push_ack_and_rotation() {
    let mut h = harness().await;
    h.put("a", "one");
    let (tx, mut rx) = h.sotw().await;
    tx.send(request(&["a"], "", "")).await.unwrap();
    let r = next(&mut rx).await;
    assert_eq!(secret_name(&r), "a");
    assert_eq!(r.version_info, h.version("a"));
    tx.send(request(&["a"], &r.version_info, &r.nonce)).await.unwrap();
    let v1 = r.version_info.clone();
    wait_until(|| h.acked("a").as_deref() == Some(v1.as_str())).await;

    h.put("a", "two");
    let r2 = next(&mut rx).await;
    assert_eq!(r2.version_info, h.version("a"));
    assert_ne!(r2.version_info, v1);
    assert_ne!(r2.nonce, r.nonce);
    // The same content again pushes nothing.
    h.put("a", "two");
    silent(&mut rx).await;
}

#[tokio::test]
async fn sotw_unknown_name_waits_then_is_pushed() {
    let mut h = harness().await;
    let (tx, mut rx) = h.sotw().await;
    tx.send(request(&["late"], "", "")).await.unwrap();
    silent(&mut rx).await;
    h.put("late", "now");
    assert_eq!(secret_name(&next(&mut rx).await), "late");
}

#[tokio::test]
async fn sotw_nack_is_recorded_and_not_resent() {
    let mut h = harness().await;
    h.put("a", "bad-for-envoy");
    let (tx, mut rx) = h.sotw().await;
    tx.send(request(&["a"], "", "")).await.unwrap();
    let r = next(&mut rx).await;
    let mut nack = request(&["a"], "", &r.nonce);
    nack.error_detail =
        Some(RpcStatus { code: 3, message: "Failed to load certificate chain".into(), details: vec![] });
    tx.send(nack).await.unwrap();
    silent(&mut rx).await;
    let status = h.shared.proxies.status();
    let n = &status[0].secrets[0];
    assert_eq!(n.last_nack.as_deref(), Some("Failed to load certificate chain"));
    assert_eq!(n.acked_version, None);
    // A new version is sent.
    h.put("a", "fixed");
    assert_eq!(next(&mut rx).await.version_info, h.version("a"));
}

#[tokio::test]
async fn sotw_reconnect_with_stale_or_unknown_version_gets_current() {
    let mut h = harness().await;
    h.put("a", "current");
    for claimed in ["0123456789abcdef0123456789abcdef", "from-a-future-server", ""] {
        let (tx, mut rx) = h.sotw().await;
        tx.send(request(&["a"], claimed, "")).await.unwrap();
        assert_eq!(next(&mut rx).await.version_info, h.version("a"), "claimed {claimed:?}");
    }
    // Even claiming the current version: a new stream always gets the content.
    let (tx, mut rx) = h.sotw().await;
    tx.send(request(&["a"], &h.version("a"), "")).await.unwrap();
    assert_eq!(next(&mut rx).await.version_info, h.version("a"));
}

#[tokio::test]
async fn sotw_new_names_on_a_live_stream_are_sent_and_dropped_names_are_not() {
    let mut h = harness().await;
    h.put("a", "1");
    h.put("b", "1");
    let (tx, mut rx) = h.sotw().await;
    tx.send(request(&["a"], "", "")).await.unwrap();
    let r = next(&mut rx).await;
    tx.send(request(&["a", "b"], &r.version_info, &r.nonce)).await.unwrap();
    let r = next(&mut rx).await;
    assert_eq!(secret_name(&r), "b");
    tx.send(request(&["b"], &r.version_info, &r.nonce)).await.unwrap();
    wait_until(|| h.shared.proxies.status()[0].secrets.len() == 1).await;
    h.put("a", "2");
    silent(&mut rx).await;
}

#[tokio::test]
async fn delta_subscribe_unsubscribe_and_removal() {
    let mut h = harness().await;
    h.put("a", "1");
    h.put("b", "1");
    let (tx, mut rx) = h.delta().await;
    tx.send(DeltaDiscoveryRequest {
        node: node(),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["a".into(), "b".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let r = next(&mut rx).await;
        assert_eq!(r.resources.len(), 1);
        assert_eq!(r.resources[0].version, h.version(&r.resources[0].name));
        tx.send(DeltaDiscoveryRequest { response_nonce: r.nonce.clone(), ..Default::default() }).await.unwrap();
        got.push(r.resources[0].name.clone());
    }
    got.sort();
    assert_eq!(got, ["a", "b"]);
    let va = h.version("a");
    wait_until(|| h.acked("a").as_deref() == Some(va.as_str())).await;

    tx.send(DeltaDiscoveryRequest { resource_names_unsubscribe: vec!["b".into()], ..Default::default() })
        .await
        .unwrap();
    wait_until(|| h.acked("b").is_none() && h.shared.proxies.status()[0].secrets.len() == 1).await;
    h.put("b", "2");
    silent(&mut rx).await;

    h.sink.remove("a");
    let r = next(&mut rx).await;
    assert_eq!(r.removed_resources, ["a"]);
    assert!(r.resources.is_empty());
}

#[tokio::test]
async fn delta_initial_versions_still_get_current_content() {
    let mut h = harness().await;
    h.put("a", "1");
    let (tx, mut rx) = h.delta().await;
    tx.send(DeltaDiscoveryRequest {
        node: node(),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["a".into()],
        initial_resource_versions: [("a".to_string(), h.version("a"))].into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(next(&mut rx).await.resources[0].version, h.version("a"));
}

#[tokio::test]
async fn fetch_returns_current_or_not_found() {
    let mut h = harness().await;
    h.put("a", "1");
    let r = h.client.fetch_secrets(request(&["a"], "", "")).await.unwrap().into_inner();
    assert_eq!(secret_name(&r), "a");
    assert_eq!(r.version_info, h.version("a"));
    let err = h.client.fetch_secrets(request(&["missing"], "", "")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn wrong_type_url_is_refused() {
    let mut h = harness().await;
    let (tx, mut rx) = h.sotw().await;
    let mut req = request(&["a"], "", "");
    req.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    tx.send(req).await.unwrap();
    let err = tokio::time::timeout(ARRIVE, rx.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn shutdown_ends_streams() {
    let mut h = harness().await;
    h.put("a", "1");
    let (tx, mut rx) = h.sotw().await;
    tx.send(request(&["a"], "", "")).await.unwrap();
    next(&mut rx).await;
    h.shutdown.trigger();
    let end = tokio::time::timeout(ARRIVE, rx.message()).await.expect("stream ends");
    assert!(matches!(end, Ok(None) | Err(_)));
}
