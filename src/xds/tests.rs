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
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use super::ServerState;
use super::proxies::Proxies;
use crate::authz::Authorizer;
use crate::authz::Identity;
use crate::ingest::Intake;
use crate::metrics::Metrics;
use crate::pki::{KeyBytes, Material, SECRET_TYPE_URL, SecretKind};
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Long enough for a push on a loaded machine; only used to wait for something that must come.
const ARRIVE: Duration = Duration::from_secs(10);
/// How long to listen for something that must NOT come. A correct server never sends it,
/// so a slow machine can only make this test pass more slowly, never fail wrongly.
const QUIET: Duration = Duration::from_millis(300);

struct Harness {
    intake: Intake,
    shared: ServerState,
    client: SecretDiscoveryServiceClient<Channel>,
    addr: std::net::SocketAddr,
    shutdown: Shutdown,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn harness() -> Harness {
    harness_as(None).await
}

async fn harness_as(authorized: Option<(MakeAuthorizer, Identity)>) -> Harness {
    harness_with(authorized, Default::default(), Default::default()).await
}

type MakeAuthorizer = fn(Arc<Metrics>) -> Authorizer;

/// A harness whose connections have `identity` and are authorized by `authz`, as if
/// the transport had proved it: the listener's TLS is tested end to end with Envoy;
/// here the protocol's side of authorization.
async fn harness_with(
    authorized: Option<(MakeAuthorizer, Identity)>,
    limits: super::limits::Limits,
    policy: crate::policy::Policy,
) -> Harness {
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(Store::with_policy(policy));
    let shutdown = Shutdown::new();
    let authz = match &authorized {
        Some((make, _)) => make(metrics.clone()),
        None => Authorizer::open(metrics.clone()),
    };
    let shared = ServerState::new(
        store.clone(),
        Arc::new(Proxies::new(metrics.clone())),
        metrics.clone(),
        shutdown.clone(),
        Arc::new(authz),
        limits,
    )
    // An extension provider's name, as an `[aliases]` entry maps it.
    .with_names(
        super::names::Names::new(&std::collections::BTreeMap::from([("sds://provider".into(), "web".into())])).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = shutdown.clone();
    match authorized {
        None => {
            tokio::spawn(super::listen::serve(super::listen::Bound::Tcp(listener), shared.clone(), None, stop));
        }
        Some((_, identity)) => {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Ok((sock, addr)) = listener.accept().await {
                    let peer = Arc::new(super::Peer { address: addr.to_string(), identity: identity.clone() });
                    tokio::spawn(super::transport::conn::serve(sock, shared.clone(), peer));
                }
            });
        }
    }
    let client = SecretDiscoveryServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let intake = Intake::new(store, metrics, "test", crate::policy::AllowExpired::Never);
    Harness { intake, shared, client, addr, shutdown }
}

impl Harness {
    fn put(&self, name: &str, content: &str) {
        self.intake
            .update(name, &Material::Generic(KeyBytes::new(content.as_bytes().to_vec())), Instant::now())
            .unwrap();
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
        n.acked_version.map(|v| v.to_string())
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
    let r = next(&mut rx).await;
    assert_eq!(r.version_info, h.version("a"));
    tx.send(request(&["a"], &r.version_info, &r.nonce)).await.unwrap();
    // Going back to the refused content does not send it again.
    h.put("a", "bad-for-envoy");
    silent(&mut rx).await;
}

/// The node is read from the first request that carries one, and only then: later
/// requests (Envoy repeats its 61 KB node with every ACK by default) skip it.
#[tokio::test]
async fn the_proxy_is_known_from_the_first_request_with_a_node() {
    let mut h = harness().await;
    h.put("a", "1");
    let (tx, mut rx) = h.sotw().await;
    let mut first = request(&["a"], "", "");
    first.node = None;
    tx.send(first).await.unwrap();
    let r = next(&mut rx).await;
    assert_eq!(h.shared.proxies.status()[0].node_id, "", "no node yet");
    let mut ack = request(&["a"], &r.version_info, &r.nonce);
    let extensions = vec![envoy_types::pb::envoy::config::core::v3::Extension::default(); 600];
    ack.node = Some(Node { extensions, ..node().unwrap() });
    tx.send(ack).await.unwrap();
    wait_until(|| h.shared.proxies.status()[0].node_id == "envoy-1").await;
    assert_eq!(h.shared.proxies.status()[0].cluster, "edge");
    h.put("a", "2");
    let r = next(&mut rx).await;
    let mut ack = request(&["a"], &r.version_info, &r.nonce);
    ack.node = Some(Node { id: "someone-else".into(), ..Default::default() });
    tx.send(ack).await.unwrap();
    wait_until(|| h.shared.proxies.status()[0].secrets[0].acked_version.is_some_and(|v| v == *h.version("a"))).await;
    assert_eq!(h.shared.proxies.status()[0].node_id, "envoy-1", "read once");
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

/// A list naming one secret twice, as long as the watched set, is not that set.
#[tokio::test]
async fn sotw_a_name_repeated_drops_the_one_left_out() {
    let mut h = harness().await;
    h.put("a", "1");
    h.put("b", "1");
    let (tx, mut rx) = h.sotw().await;
    tx.send(request(&["a", "b"], "", "")).await.unwrap();
    next(&mut rx).await;
    let r2 = next(&mut rx).await;
    tx.send(request(&["a", "a"], &r2.version_info, &r2.nonce)).await.unwrap();
    let names = || h.shared.proxies.status()[0].secrets.iter().map(|n| n.name.to_string()).collect::<Vec<_>>();
    wait_until(|| names() == ["a"]).await;
    h.put("b", "2");
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

    h.intake.remove("a");
    let r = next(&mut rx).await;
    assert_eq!(r.removed_resources, ["a"]);
    assert!(r.resources.is_empty());
    // Status says the proxy holds nothing of it, also once the removal is ACKed.
    tx.send(DeltaDiscoveryRequest { response_nonce: r.nonce.clone(), ..Default::default() }).await.unwrap();
    let a = || h.shared.proxies.status()[0].secrets.iter().find(|n| &*n.name == "a").cloned().expect("a");
    wait_until(|| a().removed).await;
    assert_eq!((a().sent_version, a().acked_version), (None, None));
    // Back: sent again, no longer removed.
    h.put("a", "3");
    let r = next(&mut rx).await;
    assert_eq!(r.resources[0].name, "a");
    wait_until(|| !a().removed && a().sent_version.is_some()).await;
}

/// `on_delete = "withdraw"`: SotW streams get the placeholder in place of the deleted
/// secret, Delta streams the removal they always get.
#[tokio::test]
async fn withdraw_sends_sotw_the_placeholder_and_delta_the_removal() {
    use crate::policy::{OnDelete, Placeholder, PlaceholderCause, Policy};
    let policy = Policy { on_delete: OnDelete::Withdraw, ..Default::default() };
    let mut h = harness_with(None, Default::default(), policy).await;
    // Any good pair will do: another placeholder's is one.
    let pair = Placeholder::generate();
    h.intake.update("a", pair.material(SecretKind::TlsCertificate).unwrap(), Instant::now()).unwrap();
    let (sotw_tx, mut sotw) = h.sotw().await;
    sotw_tx.send(request(&["a"], "", "")).await.unwrap();
    let first = next(&mut sotw).await;
    let (delta_tx, mut delta) = h.delta().await;
    delta_tx
        .send(DeltaDiscoveryRequest {
            node: node(),
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec!["a".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(next(&mut delta).await.resources[0].name, "a");

    h.intake.remove("a");
    let withdrawn = next(&mut sotw).await;
    assert_eq!(secret_name(&withdrawn), "a");
    assert_ne!(withdrawn.version_info, first.version_info);
    assert_eq!(h.shared.store.get("a").unwrap().placeholder, Some(PlaceholderCause::Deleted));
    let r = next(&mut delta).await;
    assert_eq!((r.removed_resources.as_slice(), r.resources.len()), (["a".to_string()].as_slice(), 0));
    // Back: both get the secret again.
    h.intake.update("a", pair.material(SecretKind::TlsCertificate).unwrap(), Instant::now()).unwrap();
    assert_eq!(next(&mut sotw).await.version_info, first.version_info);
    assert_eq!(next(&mut delta).await.resources[0].name, "a");
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

/// Istio's external SDS names: `sds://NAME` is NAME's secret under the name asked for,
/// on SotW, Delta and Fetch, pushed when NAME changes; NAME's own subscribers are not
/// affected.
#[tokio::test]
async fn sds_names_are_the_named_secret_renamed() {
    let mut h = harness().await;
    h.put("web", "1");
    let (tx, mut rx) = h.sotw().await;
    tx.send(request(&["sds://web"], "", "")).await.unwrap();
    let r = next(&mut rx).await;
    assert_eq!(secret_name(&r), "sds://web");
    assert_eq!(r.version_info, h.version("web"));
    tx.send(request(&["sds://web"], &r.version_info, &r.nonce)).await.unwrap();
    h.put("web", "2");
    let r = next(&mut rx).await;
    assert_eq!((secret_name(&r), r.version_info.clone()), ("sds://web".to_string(), h.version("web")));

    let f = h.client.fetch_secrets(request(&["sds://web"], "", "")).await.unwrap().into_inner();
    assert_eq!(secret_name(&f), "sds://web");
    let plain = h.client.fetch_secrets(request(&["web"], "", "")).await.unwrap().into_inner();
    assert_eq!(secret_name(&plain), "web", "the stored name is untouched");
    let aliased = h.client.fetch_secrets(request(&["sds://provider"], "", "")).await.unwrap().into_inner();
    assert_eq!((secret_name(&aliased), aliased.version_info), ("sds://provider".to_string(), h.version("web")));

    let (dtx, mut drx) = h.delta().await;
    dtx.send(DeltaDiscoveryRequest {
        node: node(),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["sds://web".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let d = next(&mut drx).await;
    assert_eq!(d.resources[0].name, "sds://web");
    use prost::Message as _;
    let inner = envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret::decode(
        d.resources[0].resource.as_ref().unwrap().value.as_slice(),
    )
    .unwrap();
    assert_eq!(inner.name, "sds://web");
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

/// A raw HTTP/2 request to the SDS port on a connection of its own; returns the
/// response head and the stream to read the rest from. For what a gRPC client would
/// never send.
async fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (http::response::Parts, h2::RecvStream) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let (head, _, body) = send_raw(&mut client, addr, method, path, content_type, body, true).await;
    (head, body)
}

/// Sends a request on `client`, its body in one DATA frame, ending the request stream
/// when `end`.
async fn send_raw(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
    end: bool,
) -> (http::response::Parts, h2::SendStream<bytes::Bytes>, h2::RecvStream) {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", content_type)
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(req, end && body.is_empty()).unwrap();
    if !body.is_empty() {
        send.send_data(bytes::Bytes::copy_from_slice(body), end).unwrap();
    }
    let response = tokio::time::timeout(ARRIVE, response).await.expect("a response in time").unwrap();
    let (head, body) = response.into_parts();
    (head, send, body)
}

#[tokio::test]
async fn requests_that_are_not_sds_calls_get_a_clear_answer() {
    let h = harness().await;
    let (get, _) = raw(h.addr, "GET", "/", "text/plain", b"").await;
    assert_eq!(get.status, http::StatusCode::METHOD_NOT_ALLOWED);
    let (plain, _) = raw(h.addr, "POST", "/", "text/plain", b"x").await;
    assert_eq!(plain.status, http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (unknown, _) = raw(
        h.addr,
        "POST",
        "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters",
        "application/grpc",
        b"",
    )
    .await;
    assert_eq!(unknown.status, http::StatusCode::OK);
    assert_eq!(unknown.headers["grpc-status"], "12", "UNIMPLEMENTED");
    let message = unknown.headers["grpc-message"].to_str().unwrap();
    assert!(message.contains("ClusterDiscoveryService") && message.contains("SDS"), "{message}");
}

/// gRPC's compression rules: the compressed flag on a call without `grpc-encoding` is
/// INTERNAL; an encoding the server does not support is UNIMPLEMENTED, and the
/// response names the ones it accepts.
#[tokio::test]
async fn compressed_request_is_refused_with_the_reason() {
    let h = harness().await;
    let path = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
    let (head, body) = raw(h.addr, "POST", path, "application/grpc", &[1, 0, 0, 0, 1, 0]).await;
    assert_eq!(head.status, http::StatusCode::OK);
    let trailers = trailers_after(body).await;
    assert_eq!(trailers["grpc-status"], "13", "INTERNAL");
    assert!(trailers["grpc-message"].to_str().unwrap().contains("compressed"));

    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}{path}", h.addr))
        .header("content-type", "application/grpc")
        .header("grpc-encoding", "gzip")
        .body(())
        .unwrap();
    let (response, _send) = client.send_request(req, false).unwrap();
    let head = tokio::time::timeout(ARRIVE, response).await.unwrap().unwrap().into_parts().0;
    assert_eq!(head.headers["grpc-status"], "12", "UNIMPLEMENTED");
    assert_eq!(head.headers["grpc-accept-encoding"], "identity");
    assert!(head.headers["grpc-message"].to_str().unwrap().contains("gzip"));
}

/// A message that is not a DiscoveryRequest ends the call with INVALID_ARGUMENT, on
/// both the stream and the unary method.
#[tokio::test]
async fn a_request_that_does_not_decode_is_an_invalid_argument() {
    let h = harness().await;
    // Field 1 (version_info) announces five bytes and carries none; a node (field 2)
    // whose id is not UTF-8.
    let truncated: &[u8] = &[0, 0, 0, 0, 2, 0x0a, 0x05];
    let bad_node: &[u8] = &[0, 0, 0, 0, 5, 0x12, 0x03, 0x0a, 0x01, 0xff];
    for (method, garbage) in [
        ("StreamSecrets", truncated),
        ("FetchSecrets", truncated),
        ("StreamSecrets", bad_node),
        ("FetchSecrets", bad_node),
    ] {
        let path = format!("/envoy.service.secret.v3.SecretDiscoveryService/{method}");
        let (head, body) = raw(h.addr, "POST", &path, "application/grpc", garbage).await;
        // The stream answers in trailers, FetchSecrets in a trailers-only response.
        let trailers = if head.headers.contains_key("grpc-status") { head.headers } else { trailers_after(body).await };
        assert_eq!(trailers["grpc-status"], "3", "{method}: INVALID_ARGUMENT");
        // grpc-message is percent-encoded.
        let message = trailers["grpc-message"].to_str().unwrap().replace("%20", " ");
        assert!(message.contains("malformed request"), "{method}: {message}");
    }
}

/// Reads `body` to its end and returns the trailers.
async fn trailers_after(mut body: h2::RecvStream) -> http::HeaderMap {
    while let Some(chunk) = tokio::time::timeout(ARRIVE, body.data()).await.expect("data in time") {
        chunk.unwrap();
    }
    body.trailers().await.unwrap().expect("trailers")
}

/// Envoy opens one stream per secret, all on one connection: a gateway with hundreds of
/// certificates must get every one.
#[tokio::test]
async fn hundreds_of_streams_on_one_connection() {
    const N: usize = 300;
    let mut h = harness().await;
    let names: Vec<String> = (0..N).map(|i| format!("s{i}")).collect();
    for n in &names {
        h.put(n, n);
    }
    let mut streams = Vec::new();
    for n in &names {
        let (tx, rx) = h.sotw().await;
        tx.send(request(&[n], "", "")).await.unwrap();
        streams.push((n, tx, rx));
    }
    for (n, tx, rx) in &mut streams {
        let r = next(rx).await;
        assert_eq!(&secret_name(&r), *n);
        tx.send(request(&[n], &r.version_info, &r.nonce)).await.unwrap();
    }
    h.put("s7", "rotated");
    let (_, _, rx) = &mut streams[7];
    let r = next(rx).await;
    assert_eq!(r.version_info, h.version("s7"));
    let (_, _, other) = &mut streams[8];
    silent(other).await;
}

/// A connection's first call is run apart from the others: calls that end and start in
/// any order on one connection must all keep being served.
#[tokio::test]
async fn calls_on_one_connection_come_and_go() {
    let mut h = harness().await;
    for n in ["a", "b", "c"] {
        h.put(n, n);
    }
    let (tx_a, mut rx_a) = h.sotw().await;
    tx_a.send(request(&["a"], "", "")).await.unwrap();
    next(&mut rx_a).await;
    let (tx_b, mut rx_b) = h.sotw().await;
    tx_b.send(request(&["b"], "", "")).await.unwrap();
    next(&mut rx_b).await;
    // The first call ends; the next one takes its place.
    drop((tx_a, rx_a));
    wait_until(|| h.shared.proxies.status().len() == 1).await;
    let (tx_c, mut rx_c) = h.sotw().await;
    tx_c.send(request(&["c"], "", "")).await.unwrap();
    next(&mut rx_c).await;
    let r = h.client.fetch_secrets(request(&["a"], "", "")).await.unwrap().into_inner();
    assert_eq!(r.version_info, h.version("a"));
    h.put("b", "b2");
    assert_eq!(next(&mut rx_b).await.version_info, h.version("b"));
    h.put("c", "c2");
    assert_eq!(next(&mut rx_c).await.version_info, h.version("c"));
    silent(&mut rx_b).await;
}

/// A proxy whose flow-control window is full gets the response already under way, then
/// the latest version when it reads again: not every version it missed.
#[tokio::test]
async fn a_proxy_whose_window_is_full_gets_the_latest_version_not_a_backlog() {
    const ROTATIONS: usize = 20;
    let h = harness().await;
    h.put("a", "v0");
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    // A window smaller than one response: the first one stays stuck until it reads.
    let (mut client, conn) =
        h2::client::Builder::new().initial_window_size(64).handshake::<_, bytes::Bytes>(tcp).await.unwrap();
    tokio::spawn(conn);
    let (_send, mut body) = raw_sotw(&mut client, h.addr, "a").await;
    wait_until(|| h.shared.proxies.status().first().is_some_and(|s| s.secrets[0].sent_version.is_some())).await;
    for i in 1..=ROTATIONS {
        h.put("a", &format!("v{i}"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let versions = versions_until(&mut body, &h.version("a")).await;
    assert!(versions.len() <= 3, "{} responses for {ROTATIONS} rotations while not reading", versions.len());
}

/// A raw HTTP/2 SotW stream for `name` on `client`; returns the response body.
async fn raw_sotw(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    addr: std::net::SocketAddr,
    name: &str,
) -> (h2::SendStream<bytes::Bytes>, h2::RecvStream) {
    use prost::Message;
    let message = request(&[name], "", "").encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let path = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
    let (_, send, body) = send_raw(client, addr, "POST", path, "application/grpc", &framed, false).await;
    (send, body)
}

/// Reads SotW responses from `body` until one carries `until`; returns every version read.
async fn versions_until(body: &mut h2::RecvStream, until: &str) -> Vec<String> {
    use prost::Message;
    let mut buf = bytes::BytesMut::new();
    let mut versions = Vec::new();
    while versions.last().map(String::as_str) != Some(until) {
        let chunk = tokio::time::timeout(ARRIVE, body.data()).await.expect("data in time").unwrap().unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        buf.extend_from_slice(&chunk);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() < 5 + len {
                break;
            }
            let msg = buf.split_to(5 + len);
            versions.push(DiscoveryResponse::decode(&msg[5..]).unwrap().version_info);
        }
    }
    versions
}

/// A proxy that stops reading its socket, whatever its flow-control window: each
/// stream holds one response for it in certwire, and gets the latest version when it
/// reads again, not every version it missed.
#[tokio::test]
async fn a_proxy_that_stops_reading_its_socket_gets_the_latest_version_not_a_backlog() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    const ROTATIONS: usize = 30;
    let h = harness().await;
    h.put("big", &"x".repeat(8 << 20));
    h.put("b", "v0");
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let tcp = socket.connect(h.addr).await.unwrap();
    // Windows far larger than anything sent, as Envoy's (256 MiB): only the socket stops it.
    let (mut client, mut conn) = h2::client::Builder::new()
        .initial_window_size(1 << 30)
        .initial_connection_window_size(1 << 30)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    // The client's connection task reads the socket only while `reading` is set.
    let reading = Arc::new(AtomicBool::new(true));
    let resume = Arc::new(tokio::sync::Notify::new());
    let (r, n) = (reading.clone(), resume.clone());
    tokio::spawn(async move {
        loop {
            let notified = n.notified();
            if r.load(SeqCst) {
                tokio::select! {
                    _ = &mut conn => return,
                    _ = notified => {}
                }
            } else {
                notified.await;
            }
        }
    });
    let (_send_big, mut big) = raw_sotw(&mut client, h.addr, "big").await;
    let (_send_b, mut b) = raw_sotw(&mut client, h.addr, "b").await;
    versions_until(&mut big, &h.version("big")).await;
    versions_until(&mut b, &h.version("b")).await;

    reading.store(false, SeqCst);
    resume.notify_one();
    // More than the socket buffers hold: the rest stays in certwire, and so does
    // anything after it on this connection.
    h.put("big", &"y".repeat(8 << 20));
    let big_version = h.version("big");
    let sent_big = || {
        let status = h.shared.proxies.status();
        status
            .iter()
            .flat_map(|p| &p.secrets)
            .any(|n| &*n.name == "big" && n.sent_version.map(|v| v.to_string()) == Some(big_version.clone()))
    };
    wait_until(sent_big).await;
    // Time for the socket to fill: what is left of the 8 MiB then waits in h2.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 1..=ROTATIONS {
        h.put("b", &format!("v{i}"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let latest = h.version("b");
    reading.store(true, SeqCst);
    resume.notify_one();
    let versions = versions_until(&mut b, &latest).await;
    // One under way, one held, the latest; on a slow machine one or two more may have
    // gone out before the socket filled. Without the limit, every rotation arrives.
    assert!(versions.len() <= 5, "{} responses for {ROTATIONS} rotations while not reading", versions.len());
}

// ---- authorization on streams -------------------------------------------------------

fn gw_identity() -> Identity {
    Identity::Spiffe {
        id: "spiffe://cluster.local/ns/gw/sa/ingress".into(),
        workload: Some(crate::authz::identity::Workload { namespace: "gw".into(), service_account: "ingress".into() }),
    }
}

fn policy_a_not_b(metrics: Arc<Metrics>) -> Authorizer {
    let rules = vec![crate::authz::policy::Rule {
        identities: vec!["spiffe://cluster.local/ns/gw/*".into()],
        secrets: vec!["a".into(), "a-cacert".into()],
        action: crate::authz::policy::Action::Allow,
    }];
    Authorizer::new(crate::authz::Mode::Policy, rules, String::new(), None, metrics)
}

fn denied_in_status(h: &Harness, name: &str) -> Option<String> {
    let status = h.shared.proxies.status();
    status.iter().flat_map(|p| p.secrets.iter()).find(|n| &*n.name == name)?.denied.as_deref().map(str::to_owned)
}

/// A denied name is never sent and does not end the stream: the allowed name on the
/// same stream is served and rotated; status says why; the denial is counted once per
/// subscription, not per ACK.
#[tokio::test]
async fn a_denied_name_is_absent_and_the_others_are_served() {
    let mut h = harness_as(Some((policy_a_not_b, gw_identity()))).await;
    h.put("a", "1");
    h.put("b", "1");
    let (tx, mut rx) = h.sotw().await;
    tx.send(request(&["a", "b"], "", "")).await.unwrap();
    let r = next(&mut rx).await;
    assert_eq!(secret_name(&r), "a");
    tx.send(request(&["a", "b"], &r.version_info, &r.nonce)).await.unwrap();
    silent(&mut rx).await;
    let why = denied_in_status(&h, "b").expect("b is shown denied");
    assert!(why.contains("no authz rule"), "{why}");
    assert_eq!(denied_in_status(&h, "a"), None);
    assert_eq!(h.shared.proxies.status()[0].identity, "spiffe://cluster.local/ns/gw/sa/ingress");
    h.put("b", "2");
    silent(&mut rx).await;
    h.put("a", "2");
    let r = next(&mut rx).await;
    assert_eq!(secret_name(&r), "a");
    assert_eq!(r.version_info, h.version("a"));
    tx.send(request(&["a", "b"], &r.version_info, &r.nonce)).await.unwrap();
    let label = crate::metrics::ReasonLabel { reason: "policy" };
    wait_until(|| h.acked("a").as_deref() == Some(h.version("a").as_str())).await;
    assert_eq!(h.shared.metrics.authz_denials.get_or_create(&label).get(), 1, "not once per ACK");
}

#[tokio::test]
async fn fetch_treats_denied_names_as_absent() {
    let mut h = harness_as(Some((policy_a_not_b, gw_identity()))).await;
    h.put("a", "1");
    h.put("b", "1");
    let r = h.client.fetch_secrets(request(&["a", "b"], "", "")).await.unwrap().into_inner();
    assert_eq!(r.resources.len(), 1);
    assert_eq!(secret_name(&r), "a");
    let err = h.client.fetch_secrets(request(&["b"], "", "")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// The grant of a SubjectAccessReview decides; a revoked grant withdraws the name from
/// a Delta stream (removed_resources) and stops pushes; a new grant sends it again.
#[tokio::test]
async fn a_revoked_grant_is_removed_and_a_new_one_sends_again() {
    use crate::authz::review::{ReviewFuture, Reviewer, Reviews, Ttls};
    use std::sync::atomic::{AtomicBool, Ordering};

    static ALLOWED: AtomicBool = AtomicBool::new(true);
    struct Flag;
    impl Reviewer for Flag {
        fn review(&self, _: &str, _: &str) -> ReviewFuture {
            let allowed = ALLOWED.load(Ordering::SeqCst);
            Box::pin(async move { if allowed { Ok(None) } else { Ok(Some("no RoleBinding".into())) } })
        }
    }
    fn kubernetes(metrics: Arc<Metrics>) -> Authorizer {
        let ttls = Ttls { allow: Duration::from_millis(200), deny: Duration::from_millis(200) };
        let reviews = Reviews::new(Arc::new(Flag), ttls);
        tokio::spawn(reviews.clone().run(crate::shutdown::Shutdown::new()));
        Authorizer::new(crate::authz::Mode::Kubernetes, Vec::new(), "gw".into(), Some(reviews), metrics)
    }
    let mut h = harness_as(Some((kubernetes, gw_identity()))).await;
    h.put("kubernetes://gw/web", "1");
    h.put("kubernetes://apps/web", "1");
    let (tx, mut rx) = h.delta().await;
    tx.send(DeltaDiscoveryRequest {
        node: node(),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["kubernetes://gw/web".into(), "kubernetes://apps/web".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let r = next(&mut rx).await;
    assert_eq!(r.resources[0].name, "kubernetes://gw/web");
    tx.send(DeltaDiscoveryRequest { response_nonce: r.nonce.clone(), ..Default::default() }).await.unwrap();
    silent(&mut rx).await;
    assert!(denied_in_status(&h, "kubernetes://apps/web").unwrap().contains("namespace"));

    ALLOWED.store(false, Ordering::SeqCst);
    let r = next(&mut rx).await;
    assert_eq!(r.removed_resources, ["kubernetes://gw/web"], "revoked within the TTL");
    tx.send(DeltaDiscoveryRequest { response_nonce: r.nonce.clone(), ..Default::default() }).await.unwrap();
    assert!(denied_in_status(&h, "kubernetes://gw/web").unwrap().contains("no RoleBinding"));
    h.put("kubernetes://gw/web", "2");
    silent(&mut rx).await;

    ALLOWED.store(true, Ordering::SeqCst);
    let r = next(&mut rx).await;
    assert_eq!(r.resources[0].name, "kubernetes://gw/web");
    assert_eq!(r.resources[0].version, h.version("kubernetes://gw/web"), "the current version, sent again");
    assert_eq!(denied_in_status(&h, "kubernetes://gw/web"), None);
}

// ---- limits: what a peer can make certwire hold or compute --------------------------

fn small_limits() -> super::limits::Limits {
    super::limits::Limits {
        max_request_bytes: 32 * 1024,
        connection_window_bytes: 64 * 1024,
        max_buffered_request_bytes: 48 * 1024 + 1024,
        max_names_per_request: 100,
        max_names_per_stream: 150,
        max_fetch_response_bytes: 4 * 1024,
        max_connections_per_ip: 3,
        idle_timeout: Duration::from_millis(300),
        ..Default::default()
    }
}

fn hits(h: &Harness, limit: &'static str) -> u64 {
    h.shared.metrics.limits_hit.get_or_create(&crate::metrics::LimitLabel { limit }).get()
}

/// A raw h2 connection to the harness.
async fn h2_client(addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    client.ready().await.unwrap()
}

/// Unfinished messages hold at most the connection's window: capacity is given back
/// only as whole messages are consumed, so streams that each start a message and never
/// finish it cannot make certwire hold more.
#[tokio::test]
async fn unfinished_requests_are_bounded_by_the_connection_window() {
    let limits = super::limits::Limits { max_buffered_request_bytes: 1 << 30, ..small_limits() };
    let h = harness_with(None, limits, Default::default()).await;
    let mut client = h2_client(h.addr).await;
    let path = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
    let mut streams = Vec::new();
    for _ in 0..8 {
        // A message announced at 30 KiB, of which 30,000 bytes come: never whole.
        let mut body = vec![0, 0, 0, 0x78, 0];
        body.extend(std::iter::repeat_n(0u8, 30_000));
        let (head, send, recv) = send_raw(&mut client, h.addr, "POST", path, "application/grpc", &body, false).await;
        streams.push((head, send, recv));
    }
    tokio::time::sleep(QUIET).await;
    let held = h.shared.budget.used();
    assert!(held > 0, "the unfinished messages are held");
    assert!(held <= 64 * 1024, "held {held} bytes, more than the connection window");
}

/// The process-wide budget: a frame that would take it over ends its stream with
/// RESOURCE_EXHAUSTED; other streams are untouched, and the budget is given back.
#[tokio::test]
async fn the_request_budget_ends_the_stream_that_would_exceed_it() {
    let h = harness_with(None, small_limits(), Default::default()).await;
    let path = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
    let mut partial = vec![0, 0, 0, 0x78, 0];
    partial.extend(std::iter::repeat_n(0u8, 28_000));
    let mut a = h2_client(h.addr).await;
    let (_, _send_a, _recv_a) = send_raw(&mut a, h.addr, "POST", path, "application/grpc", &partial, false).await;
    wait_until(|| h.shared.budget.used() >= 28_000).await;
    let mut b = h2_client(h.addr).await;
    let (_, _send_b, recv_b) = send_raw(&mut b, h.addr, "POST", path, "application/grpc", &partial, false).await;
    let trailers = trailers_after(recv_b).await;
    assert_eq!(trailers["grpc-status"], "8", "RESOURCE_EXHAUSTED");
    assert!(trailers["grpc-message"].to_str().unwrap().contains("max_buffered_request_bytes"));
    assert_eq!(hits(&h, "max_buffered_request_bytes"), 1);
    assert!(h.shared.budget.used() < 30_000, "b's bytes were given back, a's are held");
}

#[tokio::test]
async fn connections_per_ip_are_capped_and_idle_ones_closed() {
    let h = harness_with(None, small_limits(), Default::default()).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        open.push(h2::client::handshake(tcp).await.unwrap());
    }
    wait_until(|| h.shared.connections.open() == 3).await;
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    assert!(h2::client::handshake(tcp).await.is_err() || hits(&h, "max_connections_per_ip") == 1);
    wait_until(|| hits(&h, "max_connections_per_ip") == 1).await;
    // With no stream, the three are closed after the idle timeout and their places freed.
    let (_, conn) = open.pop().unwrap();
    let _ = tokio::time::timeout(ARRIVE, conn).await.expect("an idle connection is closed");
    wait_until(|| h.shared.connections.open() == 0).await;
    assert!(hits(&h, "idle_timeout") >= 1);
    // Closes are counted, refused connections are not (they were never admitted).
    assert_eq!(h.shared.connections.closed(), 3);
}

#[tokio::test]
async fn names_per_request_and_per_stream_are_capped() {
    let mut h = harness_with(None, small_limits(), Default::default()).await;
    let many: Vec<String> = (0..101).map(|i| format!("n{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let (tx, mut rx) = h.sotw().await;
    tx.send(request(&refs, "", "")).await.unwrap();
    let status = tokio::time::timeout(ARRIVE, rx.message()).await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("101 names"), "{}", status.message());

    // Delta adds up: 100 and 100 again is over 150 on one stream.
    let (tx, mut rx) = h.delta().await;
    for batch in [0..100, 100..200] {
        tx.send(DeltaDiscoveryRequest {
            node: node(),
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: batch.map(|i| format!("d{i}")).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let status = tokio::time::timeout(ARRIVE, rx.message()).await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("max_names_per_stream"), "{}", status.message());
    assert_eq!(hits(&h, "max_names_per_request"), 1);
    assert_eq!(hits(&h, "max_names_per_stream"), 1);
}

/// A stream of many names (a set is kept past a few) still sees an ACK as the same set
/// and a changed list as a change.
#[tokio::test]
async fn a_stream_of_many_names_keeps_exact_sotw_semantics() {
    let mut h = harness().await;
    let names: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    for n in &names {
        h.put(n, "1");
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (tx, mut rx) = h.sotw().await;
    tx.send(request(&refs, "", "")).await.unwrap();
    let mut nonce = String::new();
    for _ in 0..50 {
        nonce = next(&mut rx).await.nonce;
    }
    // An ACK naming one of them twice and leaving one out drops the one left out.
    let mut ack = refs.clone();
    ack[49] = "m0";
    tx.send(request(&ack, "", &nonce)).await.unwrap();
    wait_until(|| h.shared.proxies.status()[0].secrets.iter().all(|n| &*n.name != "m49")).await;
    h.put("m49", "2");
    silent(&mut rx).await;
    h.put("m48", "2");
    assert_eq!(secret_name(&next(&mut rx).await), "m48");
}

#[tokio::test]
async fn fetch_refuses_duplicates_caps_the_response_and_bounds_its_errors() {
    let mut h = harness_with(None, small_limits(), Default::default()).await;
    h.put("a", "1");
    let err = h.client.fetch_secrets(request(&["a", "a"], "", "")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("twice"), "{}", err.message());

    h.put("big1", &"x".repeat(3000));
    h.put("big2", &"y".repeat(3000));
    assert!(h.client.fetch_secrets(request(&["big1"], "", "")).await.is_ok());
    let err = h.client.fetch_secrets(request(&["big1", "big2"], "", "")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(hits(&h, "max_fetch_response_bytes"), 1);

    let missing: Vec<String> = (0..100).map(|i| format!("missing-{i}-{}", "z".repeat(200))).collect();
    let refs: Vec<&str> = missing.iter().map(String::as_str).collect();
    let err = h.client.fetch_secrets(request(&refs, "", "")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().len() < 2048, "the error does not grow with the request: {} bytes", err.message().len());
    assert!(err.message().contains("96 other names"), "{}", err.message());
}

/// The xDS protocol: a Delta client that subscribes again to a name it has may have
/// dropped it, and gets it again.
#[tokio::test]
async fn delta_subscribing_again_sends_the_name_again() {
    let mut h = harness().await;
    h.put("a", "1");
    let (tx, mut rx) = h.delta().await;
    let subscribe = || DeltaDiscoveryRequest {
        node: node(),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["a".into()],
        ..Default::default()
    };
    tx.send(subscribe()).await.unwrap();
    let first = next(&mut rx).await;
    tx.send(DeltaDiscoveryRequest { response_nonce: first.nonce.clone(), ..Default::default() }).await.unwrap();
    silent(&mut rx).await;
    tx.send(DeltaDiscoveryRequest { response_nonce: first.nonce.clone(), ..subscribe() }).await.unwrap();
    let again = next(&mut rx).await;
    assert_eq!(again.resources[0].name, "a");
    assert_eq!(again.resources[0].version, h.version("a"));
    assert_ne!(again.nonce, first.nonce);
}

/// `grpc-timeout` is honoured: a stream ends with DEADLINE_EXCEEDED when it passes, and
/// a FetchSecrets still waiting (here for a review that never answers) answers so.
#[tokio::test]
async fn grpc_timeout_ends_calls_with_deadline_exceeded() {
    use crate::authz::review::{ReviewFuture, Reviewer, Reviews, Ttls};
    struct Never;
    impl Reviewer for Never {
        fn review(&self, _: &str, _: &str) -> ReviewFuture {
            Box::pin(std::future::pending())
        }
    }
    fn kubernetes(metrics: Arc<Metrics>) -> Authorizer {
        let ttls = Ttls { allow: Duration::from_secs(60), deny: Duration::from_secs(60) };
        let reviews = Reviews::new(Arc::new(Never), ttls);
        Authorizer::new(crate::authz::Mode::Kubernetes, Vec::new(), "gw".into(), Some(reviews), metrics)
    }
    // Raw HTTP/2: tonic's client gives up at the deadline itself, before the server speaks.
    let h = harness_as(Some((kubernetes, gw_identity()))).await;
    h.put("kubernetes://gw/web", "1");
    let mut client = h2_client(h.addr).await;
    for (method, body, end) in [
        ("FetchSecrets", prost::Message::encode_to_vec(&request(&["kubernetes://gw/web"], "", "")), true),
        ("StreamSecrets", Vec::new(), false),
    ] {
        let req =
            http::Request::post(format!("http://{}/envoy.service.secret.v3.SecretDiscoveryService/{method}", h.addr))
                .header("content-type", "application/grpc")
                .header("grpc-timeout", "200m")
                .body(())
                .unwrap();
        let (response, mut send) = client.send_request(req, false).unwrap();
        let mut framed = vec![0];
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&body);
        if end {
            send.send_data(framed.into(), true).unwrap();
        }
        let (head, recv) = tokio::time::timeout(ARRIVE, response).await.unwrap().unwrap().into_parts();
        let status = match head.headers.get("grpc-status") {
            Some(status) => status.clone(),
            None => trailers_after(recv).await["grpc-status"].clone(),
        };
        assert_eq!(status, "4", "{method}: DEADLINE_EXCEEDED");
    }
}
