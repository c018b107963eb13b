//! Envoy Gateway's external SDS, end to end: a Gateway listener whose `certificateRefs`
//! name a Secret of type `gateway.envoyproxy.io/sds` (Envoy Gateway v1.9), served by
//! certwire on a Unix socket to a real Envoy configured the way Envoy Gateway configures
//! it (README "Envoy Gateway", deploy/examples/envoy-gateway).
//!
//! What Envoy Gateway v1.9.0 generates for such a Secret (read in its code at
//! 39763b1c07ec, tag v1.9.0; unchanged on main at d32f28294245):
//! - `internal/ir/xds.go` `NewSDSConfig`: the Secret's `data.url` and `data.secretName`,
//!   both required; `internal/utils/net/url.go` `ParseURL`: `unix:///ABS/PATH` only
//!   (http and https are refused, and so is a host).
//! - `internal/xds/translator/sds.go`: one cluster per URL, sent to Envoy over ADS like
//!   every other cluster: `STATIC`, one `pipe` endpoint at the path, `connect_timeout:
//!   10s`, `http2_protocol_options: {}` (the deprecated field on the Cluster itself), no
//!   transport socket; named `sds_`, the path with `/` as `_` (trimmed, at most 48
//!   bytes), `_` and the first 16 bytes of the path's SHA-256 in hex. Each certificate is an
//!   `SdsSecretConfig` named `secretName` verbatim, with `api_config_source: {api_type:
//!   GRPC, grpc_services: [{envoy_grpc: {cluster_name}}]}` and nothing else: no
//!   `transport_api_version`, no `set_node_on_first_message_only`, the default
//!   `initial_fetch_timeout` (15 s).
//! - `internal/xds/translator/listener.go` `buildXdsDownstreamTLSSocket`: the listener's
//!   `DownstreamTlsContext` lists them in `tls_certificate_sds_secret_configs`.
//!
//! Here the cluster and the listener reach Envoy as dynamic resources too (CDS and LDS,
//! from files instead of Envoy Gateway's ADS stream), so the SDS cluster is one Envoy
//! learnt at run time, as in a gateway. The HTTP routes are inline instead of Envoy
//! Gateway's RDS. Everything of the example is read from
//! deploy/examples/envoy-gateway as written: the `gateway.envoyproxy.io/sds` Secret (applied
//! with kubectl to the Kubernetes API emulator, where certwire skips it), the Gateway's
//! hostname, certwire.toml (certwire runs with it, its socket moved to a temporary
//! directory) and the uid the DaemonSet runs certwire as. Envoy runs as Envoy Gateway's
//! proxy uid, so the socket's permissions and certwire's `uid:` rule are the real ones.
//! A BackendTLSPolicy whose CA is such a Secret (README's, read from README.md) gets the
//! upstream cluster Envoy Gateway builds for it (`translator.go`
//! `buildXdsUpstreamTLSSocketWthCert`, `buildValidationContext`).
//!
//! Not covered: Envoy Gateway itself (no Kubernetes cluster here), the kubelet's hostPath
//! volumes, and upstream client certificates from the same Secret type.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use serde_json::{Value, json};

use common::attack;
use common::certwire::Certwire;
use common::envoy::Envoy;
use common::kubeapi::{self, KubeApi};
use common::pki::{self, Ca, Issued};
use common::tls::{self, wait_served_serial};
use common::util::{self, WAIT};

const EXAMPLE: &str = "deploy/examples/envoy-gateway";
const SDS_SECRET_TYPE: &str = "gateway.envoyproxy.io/sds";
/// The uid and gid Envoy Gateway runs its Envoy containers as, unless an EnvoyProxy sets
/// a securityContext (v1.9 `internal/infrastructure/kubernetes/proxy/resource.go`,
/// `expectedEnvoySecurityContext`).
const ENVOY_GATEWAY_PROXY_UID: u32 = 65532;
/// Envoy Gateway names a Gateway listener's Envoy listener NAMESPACE/GATEWAY/LISTENER.
const LISTENER: &str = "web/web/https";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_documents(rel: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// What the example says, read from its files.
struct Example {
    /// sds-secret.yaml, as kubectl applies it.
    sds_secret_file: PathBuf,
    /// The Secret's `url` and `secretName`.
    url: String,
    secret_name: String,
    /// The Gateway listener's hostname (the SNI and the certificate's name).
    hostname: String,
    certwire_config: PathBuf,
    /// The one `listen` address of certwire.toml: the socket the `url` names.
    certwire_socket: PathBuf,
    /// The DaemonSet's certwire container: runAsUser (= runAsGroup).
    certwire_uid: u32,
}

fn example() -> Example {
    let sds_rel = format!("{EXAMPLE}/sds-secret.yaml");
    let secrets = yaml_documents(&sds_rel);
    let [secret] = secrets.as_slice() else { panic!("{sds_rel}: expected one Secret") };
    assert_eq!(secret["type"], SDS_SECRET_TYPE, "{sds_rel}");
    let field = |key: &str| secret["stringData"][key].as_str().unwrap_or_else(|| panic!("{sds_rel}: no {key}"));
    let (url, secret_name) = (field("url").to_owned(), field("secretName").to_owned());

    let gateway_rel = format!("{EXAMPLE}/gateway.yaml");
    let gateways = yaml_documents(&gateway_rel);
    let [gateway] = gateways.as_slice() else { panic!("{gateway_rel}: expected one Gateway") };
    let listener = &gateway["spec"]["listeners"][0];
    assert_eq!(listener["tls"]["certificateRefs"][0]["name"], secret["metadata"]["name"], "{gateway_rel}");
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let listener_name =
        [&gateway["metadata"]["namespace"], &gateway["metadata"]["name"], &listener["name"]].map(text).join("/");
    assert_eq!(listener_name, LISTENER, "{gateway_rel}: Envoy Gateway's name for the listener");
    let hostname = listener["hostname"].as_str().expect("a listener hostname").to_owned();

    let certwire_config = repo().join(EXAMPLE).join("certwire.toml");
    let config: toml::Table = toml::from_str(&std::fs::read_to_string(&certwire_config).unwrap()).unwrap();
    let listen = config["listen"].as_array().expect("listen");
    let [listen] = listen.as_slice() else { panic!("certwire.toml: one listen address expected") };
    let socket = listen.as_str().and_then(|l| l.strip_prefix("unix:")).expect("listen = [\"unix:...\"]");

    let daemonset_rel = format!("{EXAMPLE}/daemonset.yaml");
    let daemonsets = yaml_documents(&daemonset_rel);
    let containers = daemonsets[0]["spec"]["template"]["spec"]["containers"].as_array().unwrap().clone();
    let certwire = containers.iter().find(|c| c["name"] == "certwire").expect("a certwire container");
    let security = &certwire["securityContext"];
    let uid = security["runAsUser"].as_u64().expect("runAsUser");
    assert_eq!(security["runAsGroup"].as_u64(), Some(uid), "{daemonset_rel}: runAsGroup");

    Example {
        sds_secret_file: repo().join(sds_rel),
        url,
        secret_name,
        hostname,
        certwire_config,
        certwire_socket: PathBuf::from(socket),
        certwire_uid: u32::try_from(uid).unwrap(),
    }
}

// ---------------------------------------------------------------------------------------
// What Envoy Gateway v1.9 generates (see the top of this file)

/// `ParseURL` + `GetURL` + `TrimPrefix("unix://")`: the socket path of an SDS `url`.
fn eg_socket_path(url: &str) -> &str {
    let path = url.strip_prefix("unix://").unwrap_or_else(|| panic!("Envoy Gateway accepts unix:// URLs only: {url}"));
    assert!(path.starts_with('/'), "Envoy Gateway refuses a host in unix URLs (unix:///ABS/PATH): {url}");
    path
}

/// `sdsClusterNameFromURL`.
fn eg_cluster_name(socket_path: &str) -> String {
    let hash = &pki::sha256_hex(socket_path.as_bytes())[..32];
    let mut readable = socket_path.replace('/', "_").trim_matches('_').to_owned();
    while readable.len() > 48 {
        readable.pop();
    }
    if readable.is_empty() { format!("sds_{hash}") } else { format!("sds_{readable}_{hash}") }
}

/// `buildSDSCluster`.
fn eg_sds_cluster(socket_path: &str) -> Value {
    let name = eg_cluster_name(socket_path);
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "http2_protocol_options": {},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket_path}}}}]}],
        },
    })
}

/// `sdsSecretConfig`.
fn eg_sds_secret_config(secret_name: &str, socket_path: &str) -> Value {
    json!({
        "name": secret_name,
        "sds_config": {"api_config_source": {
            "api_type": "GRPC",
            "grpc_services": [{"envoy_grpc": {"cluster_name": eg_cluster_name(socket_path)}}],
        }},
    })
}

/// What README "Envoy Gateway" shows: the cluster and the certificate's SDS config.
fn eg_generated(url: &str, secret_name: &str) -> Value {
    let path = eg_socket_path(url);
    json!({
        "clusters": [eg_sds_cluster(path)],
        "tls_certificate_sds_secret_configs": [eg_sds_secret_config(secret_name, path)],
    })
}

/// An HTTPS listener as `buildXdsDownstreamTLSSocket` and the listener translation build
/// it for one Gateway listener with a hostname (TLS inspector, a filter chain per server
/// name, HTTP/1.1 ALPN, session resumption off), its one route inline instead of Envoy
/// Gateway's RDS: to `cluster`, or a direct 200. Port 0: the test asks Envoy which port
/// it bound.
fn eg_https_listener(hostname: &str, secret_config: Value, cluster: Option<&str>) -> Value {
    let filter = match cluster {
        None => direct_response_filter("https-443"),
        Some(cluster) => http_filter("https-443", json!({"match": {"prefix": "/"}, "route": {"cluster": cluster}})),
    };
    json!({
        "name": LISTENER,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
        }],
        "filter_chains": [{
            "filter_chain_match": {"server_names": [hostname]},
            "filters": [filter],
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "common_tls_context": {
                        "alpn_protocols": ["http/1.1"],
                        "tls_certificate_sds_secret_configs": [secret_config],
                    },
                    "disable_stateful_session_resumption": true,
                    "disable_stateless_session_resumption": true,
                },
            },
        }],
    })
}

/// An HTTP connection manager with one route. Its clusters may come later (CDS), as
/// with Envoy Gateway's RDS.
fn http_filter(stat_prefix: &str, route: Value) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {
                "validate_clusters": false,
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}],
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        },
    })
}

/// [`http_filter`] answering every request with 200.
fn direct_response_filter(stat_prefix: &str) -> Value {
    let route =
        json!({"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}});
    http_filter(stat_prefix, route)
}

/// A bootstrap with Envoy Gateway's node naming (`--service-node` the pod's name,
/// `--service-cluster` the infrastructure's) whose clusters and listeners come from the
/// xDS files in `xds` (`cds.json`, `lds.json`) instead of Envoy Gateway's ADS stream;
/// `listeners` are static (the test's own, not Envoy Gateway's).
fn eg_bootstrap(xds: &Path, listeners: Vec<Value>) -> String {
    let source = |file: &str| json!({"path_config_source": {"path": xds.join(file)}, "resource_api_version": "V3"});
    let bootstrap = json!({
        "node": {"id": "envoy-web-web-5f7c9d6b8-x2x7k", "cluster": "web/web"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners},
        "dynamic_resources": {"cds_config": source("cds.json"), "lds_config": source("lds.json")},
    });
    serde_json::to_string_pretty(&bootstrap).unwrap()
}

/// Writes `resources` as an xDS file Envoy's `path_config_source` reads.
fn write_xds(path: &Path, type_url: &str, resources: Vec<Value>) {
    let resources: Vec<Value> = resources
        .into_iter()
        .map(|mut r| {
            r["@type"] = json!(type_url);
            r
        })
        .collect();
    std::fs::write(path, serde_json::to_vec_pretty(&json!({"resources": resources})).unwrap()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// The README section `## Envoy Gateway`.
fn readme_section() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme.find("\n## Envoy Gateway\n").expect("README has a section \"Envoy Gateway\"");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    rest[..end].to_owned()
}

/// The ```yaml blocks of `text`.
fn yaml_blocks(text: &str) -> Vec<&str> {
    text.split("```yaml\n").skip(1).map(|rest| rest.split("```").next().unwrap_or_default()).collect()
}

/// README shows, for the example's Secret, exactly what Envoy Gateway generates (the
/// function the end-to-end test below runs Envoy with), and the Secret as the example
/// has it.
#[test]
fn readme_shows_the_example_and_what_envoy_gateway_generates_from_it() {
    let ex = example();
    assert_eq!(eg_socket_path(&ex.url), ex.certwire_socket.to_str().unwrap(), "the url names certwire's socket");
    let section = readme_section();
    let blocks = yaml_blocks(&section);
    let generated = blocks
        .iter()
        .find(|b| b.contains("tls_certificate_sds_secret_configs"))
        .expect("README \"Envoy Gateway\" shows the generated cluster and SDS config");
    let shown: Value = serde_saphyr::from_str(generated).expect("README's block is YAML");
    assert_eq!(shown, eg_generated(&ex.url, &ex.secret_name), "README shows what Envoy Gateway v1.9 generates");
    // And the cluster name it quotes in prose is that one.
    assert!(section.contains(&eg_cluster_name(eg_socket_path(&ex.url))), "README names the SDS cluster");

    let secret_file = std::fs::read_to_string(&ex.sds_secret_file).unwrap();
    let secret_yaml = secret_file.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
    assert!(
        blocks.iter().any(|b| b.trim_end() == secret_yaml.trim_end()),
        "README \"Envoy Gateway\" shows sds-secret.yaml as it is (without its comments)"
    );
}

/// The naming rule, on Envoy Gateway's own test data
/// (internal/xds/translator/testdata/out/xds-ir/sds-listener.clusters.yaml).
#[test]
fn cluster_names_follow_envoy_gateway() {
    assert_eq!(
        eg_cluster_name("/var/run/secrets/workload-spiffe-uds/socket"),
        "sds_var_run_secrets_workload-spiffe-uds_socket_2465711674b623c4f815575b37404800"
    );
    assert_eq!(
        eg_cluster_name("/var/run/sds/two/socket"),
        "sds_var_run_sds_two_socket_bf395108472af10505ea7b43dde5a5e9"
    );
}

/// `kubernetes://NS/NAME` -> (NS, NAME).
fn kubernetes_name(name: &str) -> (&str, &str) {
    let rest = name.strip_prefix("kubernetes://").unwrap_or_else(|| panic!("not a kubernetes:// name: {name}"));
    rest.split_once('/').unwrap_or_else(|| panic!("kubernetes://NS/NAME expected: {name}"))
}

/// A directory other users may enter (a temporary directory is 0700).
fn open_dir(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Connects to `socket` with the file permissions of `uid` (this thread's fsuid: what
/// the kernel checks a Unix socket's mode against), as a process of that user would.
fn connect_as(uid: u32, socket: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    let socket = socket.to_owned();
    std::thread::spawn(move || {
        // SAFETY: setfsuid(2) and setfsgid(2) change this thread's file-system ids only;
        // the thread ends right after.
        unsafe {
            libc::setfsgid(uid);
            libc::setfsuid(uid);
        }
        std::os::unix::net::UnixStream::connect(&socket)
    })
    .join()
    .unwrap()
}

/// FetchSecrets for `name` over the Unix socket, as this process (root).
async fn fetch_over(socket: &Path, name: &str) -> Result<(), tonic::Status> {
    let socket = socket.to_owned();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let socket = socket.clone();
        async move { tokio::net::UnixStream::connect(socket).await.map(hyper_util::rt::TokioIo::new) }
    });
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .expect("connect over the socket");
    let mut client = SecretDiscoveryServiceClient::new(channel);
    client.fetch_secrets(attack::request(&[name.to_owned()])).await.map(|_| ())
}

/// certwire as the DaemonSet runs it, on a node of its own (a temporary directory): the
/// example's certwire.toml and uid, the socket directory as the init container leaves it,
/// the Kubernetes API emulator with the namespace of `secretName` and the example's SDS
/// Secret applied by kubectl (certwire skips it: no certificate in it).
struct Node {
    ex: Example,
    api: KubeApi,
    certwire: Certwire,
    /// certwire's socket, and Envoy Gateway's `url` for it.
    socket: PathBuf,
    url: String,
    dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Node {
        let ex = example();
        assert_eq!(ex.certwire_uid, ENVOY_GATEWAY_PROXY_UID, "the socket must belong to Envoy Gateway's proxy uid");
        let dir = util::tempdir();
        open_dir(dir.path());
        // Owned by certwire's uid, mode 0755 as the kubelet makes it; the socket keeps its name.
        let socket_dir = dir.path().join("certwire");
        std::fs::create_dir(&socket_dir).unwrap();
        open_dir(&socket_dir);
        std::os::unix::fs::chown(&socket_dir, Some(ex.certwire_uid), Some(ex.certwire_uid)).unwrap();
        let socket = socket_dir.join(ex.certwire_socket.file_name().unwrap());

        let api = KubeApi::start().await;
        let kubeconfig = api.kubeconfig(dir.path());
        std::fs::set_permissions(&kubeconfig, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (namespace, _) = kubernetes_name(&ex.secret_name);
        kubeapi::kubectl_ok(&kubeconfig, &["create", "namespace", namespace]).await;
        kubeapi::kubectl_ok(&kubeconfig, &["apply", "-f", ex.sds_secret_file.to_str().unwrap()]).await;

        // The example's file, copied where certwire's uid may read it (a checkout in a
        // 0700 directory is not).
        let config = dir.path().join("certwire.toml");
        std::fs::copy(&ex.certwire_config, &config).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Only the socket (a temporary directory), the status port (tests run in
        // parallel) and the API server differ from the example.
        let certwire = Certwire::serve_as_user(
            [
                "--config".to_owned(),
                config.display().to_string(),
                "--listen".into(),
                format!("unix:{}", socket.display()),
                "--status-addr".into(),
                "127.0.0.1:0".into(),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
            ],
            ex.certwire_uid,
        )
        .await;
        let url = format!("unix://{}", socket.display());
        Node { ex, api, certwire, socket, url, dir }
    }

    /// A directory of the node that Envoy (Envoy Gateway's uid) may read and write.
    fn envoy_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        open_dir(&dir);
        std::os::unix::fs::chown(&dir, Some(ENVOY_GATEWAY_PROXY_UID), Some(ENVOY_GATEWAY_PROXY_UID)).unwrap();
        dir
    }

    /// Starts Envoy as Envoy Gateway's uid with `clusters` and `listeners` as CDS and LDS,
    /// and `static_listeners` in its bootstrap.
    async fn envoy(&self, clusters: Vec<Value>, listeners: Vec<Value>, static_listeners: Vec<Value>) -> Envoy {
        let xds = self.dir.path().join("xds");
        std::fs::create_dir(&xds).unwrap();
        open_dir(&xds);
        write_xds(&xds.join("cds.json"), "type.googleapis.com/envoy.config.cluster.v3.Cluster", clusters);
        write_xds(&xds.join("lds.json"), "type.googleapis.com/envoy.config.listener.v3.Listener", listeners);
        Envoy::start_as(&eg_bootstrap(&xds, static_listeners), ENVOY_GATEWAY_PROXY_UID).await
    }

    /// Writes the kubernetes.io/tls Secret `kubernetes://NS/NAME` names.
    fn put_tls(&self, secret_name: &str, leaf: &Issued) {
        let (namespace, name) = kubernetes_name(secret_name);
        self.api.put_object(kubeapi::tls_secret(namespace, name, &leaf.cert_pem, &leaf.key_pem));
    }
}

/// The value of `sds.<secret_name>.SUFFIX` (Envoy writes `://` in a stat name as `_`).
async fn sds_stat(envoy: &Envoy, secret_name: &str, suffix: &str) -> Option<u64> {
    let wanted = format!("sds.{}.{suffix}", secret_name.replace("://", "_"));
    let body = envoy.admin_get("/stats?filter=%5Esds%5C.").await;
    body.lines().find_map(|line| {
        let (key, value) = line.split_once(": ")?;
        (key == wanted).then(|| value.trim().parse().ok()).flatten()
    })
}

/// The example end to end: certwire as the DaemonSet runs it, Envoy as Envoy Gateway
/// runs it (its uid, its cluster and SDS config for the example's
/// `gateway.envoyproxy.io/sds` Secret). A real TLS handshake gets the certificate of the
/// Secret `secretName` names, a renewal of that Secret is served on the next handshake
/// over the same SDS connection, and nobody else gets the key: another uid cannot
/// connect, root (which can) is refused by the policy.
#[tokio::test]
async fn an_envoy_gateway_sds_secret_is_served_from_the_node_socket_and_rotated_live() {
    let node = Node::start().await;
    let ex = &node.ex;
    let ca = Ca::new("e2e Envoy Gateway CA");
    let first = ca.server(&ex.hostname);
    node.put_tls(&ex.secret_name, &first);

    let path = eg_socket_path(&node.url);
    let cluster_name = eg_cluster_name(path);
    let listener = eg_https_listener(&ex.hostname, eg_sds_secret_config(&ex.secret_name, path), None);
    let envoy = node.envoy(vec![eg_sds_cluster(path)], vec![listener], vec![]).await;
    let addr = envoy.wait_listener_addr(LISTENER).await;

    let served = wait_served_serial(addr, &ex.hostname, &first.serial_hex, WAIT).await;
    assert_eq!(served.sha256_hex, first.sha256_hex, "Envoy serves the Secret's certificate");
    assert_eq!(served.http_status, 200);
    let clusters = envoy.admin_get("/config_dump?resource=dynamic_active_clusters").await;
    assert!(clusters.contains(&cluster_name), "the SDS cluster is a dynamic one, as Envoy Gateway's: {clusters}");

    // certwire saw Envoy as the kernel names it, asking for secretName verbatim.
    let proxies = node.certwire.get_json("/status/proxies").await;
    let proxy = proxies
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["secrets"].as_array().is_some_and(|s| s.iter().any(|s| s["name"] == ex.secret_name)))
        .unwrap_or_else(|| panic!("no proxy asking for {} in {proxies}", ex.secret_name));
    let identity = proxy["identity"].as_str().unwrap_or_default();
    assert!(identity.starts_with(&format!("unix:uid={ENVOY_GATEWAY_PROXY_UID},")), "{identity}");
    let secret = &proxy["secrets"][0];
    assert!(secret["denied"].is_null() && secret["acked_version"] == secret["sent_version"], "{proxy}");

    // A renewal (what cert-manager does to the Secret) is served on the next handshake,
    // pushed over the SDS stream Envoy already has: one connection to certwire, the
    // listener untouched.
    let next = ca.server(&ex.hostname);
    node.put_tls(&ex.secret_name, &next);
    let served = wait_served_serial(addr, &ex.hostname, &next.serial_hex, WAIT).await;
    assert_eq!(served.sha256_hex, next.sha256_hex);
    util::wait_for("sds update_success >= 2", WAIT, || async {
        sds_stat(&envoy, &ex.secret_name, "update_success").await.filter(|n| *n >= 2)
    })
    .await;
    assert_eq!(sds_stat(&envoy, &ex.secret_name, "update_rejected").await, Some(0), "Envoy refused an update");
    let connections = envoy.stat(&format!("cluster.{cluster_name}.upstream_cx_total")).await;
    assert_eq!(connections, Some(1), "one SDS connection for both versions");
    assert_eq!(envoy.stat("listener_manager.listener_modified").await, Some(0), "the listener was replaced");

    // Nobody else: another uid is kept out by the socket's mode, and root, whom the mode
    // does not stop, is refused by certwire's rule (a denied name is NOT_FOUND).
    let refused = connect_as(1000, &node.socket).expect_err("uid 1000 connected to certwire's socket");
    assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied, "{refused}");
    let status = fetch_over(&node.socket, &ex.secret_name).await.expect_err("root got the key");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let denials = node.certwire.metric_sum("certwire_authz_denials_total", &[("reason", "policy")]).await;
    assert!(denials >= 1.0, "the refusal is counted as a policy denial");
}

/// README's BackendTLSPolicy: its `gateway.envoyproxy.io/sds` Secret (url, secretName)
/// and the policy's hostname, as README shows them.
struct BackendPolicy {
    url: String,
    ca_secret_name: String,
    hostname: String,
}

fn readme_backend_policy() -> BackendPolicy {
    let section = readme_section();
    let block = yaml_blocks(&section)
        .into_iter()
        .find(|b| b.contains("kind: BackendTLSPolicy"))
        .expect("README \"Envoy Gateway\" shows a BackendTLSPolicy");
    let docs: Vec<Value> = serde_saphyr::from_multiple(block).expect("README's BackendTLSPolicy block is YAML");
    let secret = docs.iter().find(|d| d["type"] == SDS_SECRET_TYPE).expect("an SDS Secret beside the policy");
    let policy = docs.iter().find(|d| d["kind"] == "BackendTLSPolicy").unwrap();
    let reference = &policy["spec"]["validation"]["caCertificateRefs"][0];
    assert_eq!((&reference["kind"], &reference["name"]), (&json!("Secret"), &secret["metadata"]["name"]));
    let text = |v: &Value| v.as_str().unwrap_or_else(|| panic!("README: {v} is not a string")).to_owned();
    BackendPolicy {
        url: text(&secret["stringData"]["url"]),
        ca_secret_name: text(&secret["stringData"]["secretName"]),
        hostname: text(&policy["spec"]["validation"]["hostname"]),
    }
}

/// Envoy Gateway's upstream cluster for a route to a backend with a BackendTLSPolicy whose
/// CA is a `gateway.envoyproxy.io/sds` Secret (`buildXdsUpstreamTLSSocketWthCert`,
/// `buildValidationContext`): the policy's hostname as SNI and as the one DNS SAN to
/// match, the CA from SDS in a combined validation context. The endpoint is `backend`'s
/// Unix socket here (Envoy Gateway's is EDS).
fn eg_backend_cluster(hostname: &str, ca_config: Value, backend: &Path) -> Value {
    json!({
        "name": BACKEND_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {
            "cluster_name": BACKEND_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": backend}}}}]}],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": hostname,
                "common_tls_context": {"combined_validation_context": {
                    "default_validation_context": {"match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": hostname}},
                    ]},
                    "validation_context_sds_secret_config": ca_config,
                }},
            },
        },
    })
}

/// Envoy Gateway's name for the cluster of the first rule of HTTPRoute web/backend.
const BACKEND_CLUSTER: &str = "httproute/web/backend/rule/0";

/// The backend itself, not Envoy Gateway's: a TLS server on a Unix socket presenting
/// `leaf` and answering 200.
fn backend_listener(socket: &Path, leaf: &Issued) -> Value {
    json!({
        "name": "backend",
        "address": {"pipe": {"path": socket}},
        "filter_chains": [{
            "filters": [direct_response_filter("backend")],
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "common_tls_context": {"tls_certificates": [{
                        "certificate_chain": {"inline_string": leaf.cert_pem},
                        "private_key": {"inline_string": leaf.key_pem},
                    }]},
                },
            },
        }],
    })
}

/// The CA of a backend, from certwire: a BackendTLSPolicy whose `caCertificateRefs` name
/// a `gateway.envoyproxy.io/sds` Secret (README's), on the Gateway of the example. Envoy
/// asks certwire for `kubernetes://NS/NAME-cacert`, the `ca.crt` of Secret NAME: with
/// the wrong CA there, the backend's certificate fails verification; once the Secret
/// holds the backend's CA, the change is pushed and requests go through, with no
/// restart and over the same SDS connection as the listener's certificate.
#[tokio::test]
async fn a_backend_tls_policy_ca_from_certwire_is_pushed_to_the_upstream_cluster() {
    let node = Node::start().await;
    let ex = &node.ex;
    let policy = readme_backend_policy();
    assert_eq!(policy.url, ex.url, "README's CA Secret points at the example's socket");
    let ca_secret = policy.ca_secret_name.strip_suffix("-cacert").expect("a NAME-cacert name: the CA of Secret NAME");
    let (namespace, ca_secret_name) = kubernetes_name(ca_secret);

    let listener_ca = Ca::new("e2e Envoy Gateway CA");
    let leaf = listener_ca.server(&ex.hostname);
    node.put_tls(&ex.secret_name, &leaf);
    let backend_ca = Ca::new("e2e backend CA");
    let wrong_ca = Ca::new("e2e some other CA");
    let ca_object = |ca: &Ca| {
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": ca_secret_name, "namespace": namespace},
            "stringData": {"ca.crt": ca.cert_pem()},
        })
    };
    node.api.put_object(ca_object(&wrong_ca));

    let backend_socket = node.envoy_dir("backend").join("backend.sock");
    let path = eg_socket_path(&node.url);
    let cluster_name = eg_cluster_name(path);
    let backend =
        eg_backend_cluster(&policy.hostname, eg_sds_secret_config(&policy.ca_secret_name, path), &backend_socket);
    let listener = eg_https_listener(&ex.hostname, eg_sds_secret_config(&ex.secret_name, path), Some(BACKEND_CLUSTER));
    let backend_leaf = backend_ca.server(&policy.hostname);
    let envoy = node
        .envoy(
            vec![eg_sds_cluster(path), backend],
            vec![listener],
            vec![backend_listener(&backend_socket, &backend_leaf)],
        )
        .await;
    let addr = envoy.wait_listener_addr(LISTENER).await;

    // The wrong CA: the gateway presents its certificate, the backend's fails verification.
    let verify_failed = format!("cluster.{BACKEND_CLUSTER}.ssl.fail_verify_error");
    util::wait_for("the backend's certificate to fail verification", WAIT, || async {
        let served = tls::handshake(addr, &ex.hostname, None).await.ok()?;
        assert_eq!(served.serial_hex, leaf.serial_hex, "the listener's certificate");
        let failed = envoy.stat(&verify_failed).await.unwrap_or(0);
        (served.http_status == 503 && failed >= 1).then_some(())
    })
    .await;

    // The backend's CA in the Secret: pushed, and the backend is trusted.
    node.api.put_object(ca_object(&backend_ca));
    let through = tls::poll_handshakes(addr, &ex.hostname, None, WAIT, |s| s.http_status == 200).await;
    through.unwrap_or_else(|last| panic!("the backend is not reached with its CA from certwire: {last}"));
    assert_eq!(sds_stat(&envoy, &policy.ca_secret_name, "update_rejected").await, Some(0));
    assert!(sds_stat(&envoy, &policy.ca_secret_name, "update_success").await >= Some(2), "two CA versions");
    let connections = envoy.stat(&format!("cluster.{cluster_name}.upstream_cx_total")).await;
    assert_eq!(connections, Some(1), "the certificate and the CA share one SDS connection");
}
