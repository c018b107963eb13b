//! End to end with Kubernetes Secrets: an API server emulator speaking the real wire
//! protocol (tests/common/kubeapi), the real `kubectl` writing Secrets into it, certwire
//! watching it, and a real Envoy terminating TLS with what certwire serves.
//!
//! Each test starts its own emulator, certwire and Envoy on ports the kernel picks. As in
//! e2e_envoy.rs nothing asserts on durations: waits poll with generous timeouts, and
//! "never happens" (a flap, a rejected certificate served) is shown by holding an
//! expectation over a window.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::bootstrap::{SdsBootstrap, SdsTarget};
use common::certwire::{Certwire, sum_samples};
use common::envoy::Envoy;
use common::files::SecretDir;
use common::http;
use common::kubeapi::{self, Config, KubeApi, RequestRecord};
use common::pki::{self, Ca, Issued, LeafSpec};
use common::tls::{handshake, wait_served_serial, wait_served_serial_with};
use common::util::{self, WAIT};
use envoy_types::pb::envoy::config::core::v3::{Node, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret::Type};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;
use serde_json::Value;
use tempfile::TempDir;

/// The namespace the gateway's Secrets live in.
const NS: &str = "ingress";
const NAME: &str = "web";
const SNI: &str = "web.test";
const SECRET_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// How long a state is watched to show that something does NOT happen (a flap, a
/// rejected certificate served, a withdrawn name coming back).
const HOLD: Duration = Duration::from_secs(2);

/// For waits that include the kube-rs watcher's retry backoff (exponential from
/// 0.8 s, with jitter) after an outage: longer than [`WAIT`], still only an upper bound.
const WAIT_BACKOFF: Duration = Duration::from_secs(60);

/// `kubernetes://NS/NAME`.
fn kube_name(ns: &str, name: &str) -> String {
    format!("kubernetes://{ns}/{name}")
}

// ---------------------------------------------------------------------------------
// The stack: an emulated cluster, certwire watching it, Envoys using certwire.
// ---------------------------------------------------------------------------------

/// An emulated API server with a kubeconfig for it, a CA for the Secrets, and a
/// directory for the files a test hands to kubectl.
struct Cluster {
    api: KubeApi,
    kubeconfig: PathBuf,
    ca: Ca,
    dir: TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        Cluster::start_with(Config::default()).await
    }

    async fn start_with(config: Config) -> Cluster {
        let api = KubeApi::start_with(config).await;
        let dir = util::tempdir();
        let kubeconfig = api.kubeconfig(dir.path());
        Cluster { api, kubeconfig, ca: Ca::new("e2e kubernetes CA"), dir }
    }

    /// Runs `kubectl ARGS` against the emulator; panics with its output unless it
    /// succeeds. Returns stdout.
    async fn kubectl(&self, args: &[&str]) -> String {
        kubeapi::kubectl_ok(&self.kubeconfig, args).await
    }

    /// Writes `contents` to `DIR/file` and returns the path as a string for kubectl.
    fn write(&self, file: &str, contents: &str) -> String {
        let path = self.dir.path().join(file);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.to_str().expect("temp paths are UTF-8").to_string()
    }

    /// `kubectl create secret tls NAME -n NS --cert --key` from PEM files.
    async fn create_tls(&self, ns: &str, name: &str, leaf: &Issued) {
        let cert = self.write(&format!("{ns}-{name}.crt"), &leaf.cert_pem);
        let key = self.write(&format!("{ns}-{name}.key"), &leaf.key_pem);
        let out = self.kubectl(&["create", "secret", "tls", name, "-n", ns, "--cert", &cert, "--key", &key]).await;
        assert_eq!(out.trim(), format!("secret/{name} created"));
    }

    /// `kubectl apply -f` of a `kubernetes.io/tls` Secret manifest holding exactly
    /// `cert_pem` and `key_pem` (valid or not: the API server does not check PEM).
    async fn apply_tls(&self, ns: &str, name: &str, cert_pem: &str, key_pem: &str) {
        let manifest = self.write(&format!("{ns}-{name}.yaml"), &tls_manifest(ns, name, cert_pem, key_pem));
        let out = self.kubectl(&["apply", "-f", &manifest]).await;
        assert!(out.trim().starts_with(&format!("secret/{name} ")), "kubectl apply: {out}");
    }

    /// Starts certwire watching this cluster: `certwire serve --listen 127.0.0.1:0
    /// --kubeconfig KUBECONFIG ARGS`.
    async fn certwire(&self, args: &[&str]) -> Served {
        let mut all =
            vec!["--listen".to_string(), "127.0.0.1:0".into(), "--kubeconfig".to_string(), self.kubeconfig_arg()];
        all.extend(args.iter().map(|a| a.to_string()));
        let certwire = Certwire::serve(all).await;
        let sds = certwire.sds_addr();
        Served { certwire, sds }
    }

    fn kubeconfig_arg(&self) -> String {
        self.kubeconfig.to_str().expect("temp paths are UTF-8").to_string()
    }

    /// Makes the API server unreachable and waits until it refuses connections: the
    /// emulator closes its socket on its own runtime, so a `resume_listening` right
    /// after `stop_listening` could otherwise find the port still bound.
    async fn stop_api(&self) {
        self.api.stop_listening();
        let addr = self.api.addr();
        util::wait_for("the API server to refuse connections", WAIT, move || async move {
            tokio::net::TcpStream::connect(addr).await.is_err().then_some(())
        })
        .await;
    }

    /// Requests the emulator received since `from` (an index into the request log).
    fn requests_since(&self, from: usize) -> Vec<RequestRecord> {
        self.api.request_log().into_iter().skip(from).collect()
    }
}

/// A Secret manifest as a user writes it: YAML, PEM as block scalars in `stringData`.
fn tls_manifest(ns: &str, name: &str, cert_pem: &str, key_pem: &str) -> String {
    let block = |pem: &str| pem.lines().map(|line| format!("    {line}\n")).collect::<String>();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        block(cert_pem),
        block(key_pem)
    )
}

/// A running certwire and its SDS address.
struct Served {
    certwire: Certwire,
    sds: SocketAddr,
}

/// A real Envoy whose TLS listener takes `secret` from certwire.
struct Proxy {
    envoy: Envoy,
    addr: SocketAddr,
}

/// Starts an Envoy asking certwire for `secret` (and `secret-cacert` with `mtls`).
/// Its listener waits for the secret however long it takes (`initial_fetch_timeout`
/// 0), so a Secret created after Envoy asked is pushed, not missed.
async fn envoy(sds: SocketAddr, secret: &str, mtls: bool) -> Proxy {
    let mut bootstrap = SdsBootstrap::new(secret, SdsTarget::Tcp(sds), 0).initial_fetch_timeout(Duration::ZERO);
    if mtls {
        bootstrap = bootstrap.mtls();
    }
    let envoy = Envoy::start(&bootstrap.to_yaml()).await;
    let addr = envoy.listener_addr(secret);
    Proxy { envoy, addr }
}

// ---------------------------------------------------------------------------------
// Observations.
// ---------------------------------------------------------------------------------

/// Holds for [`HOLD`] that fresh handshakes (with `client`, if given) keep showing
/// `serial_hex`.
async fn keeps_serving(addr: SocketAddr, client: Option<&Issued>, serial_hex: &str) {
    common::tls::keeps_serving(addr, SNI, client, serial_hex, HOLD).await
}

/// Holds for [`HOLD`] that no handshake succeeds: the listener has no certificate.
async fn serves_nothing(addr: SocketAddr, why: &str) {
    let result = util::holds_for(HOLD, move || async move {
        match handshake(addr, SNI, None).await {
            Ok(served) => Err(format!("served serial {}", served.serial_hex)),
            Err(_) => Ok(()),
        }
    })
    .await;
    if let Err(what) = result {
        panic!("{why}, yet {addr} {what}");
    }
}

/// Lowercase hex without separators, whatever style certwire prints.
fn normalize_hex(text: &str) -> String {
    text.chars().filter(char::is_ascii_hexdigit).collect::<String>().to_lowercase()
}

fn str_field<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field].as_str().unwrap_or_else(|| panic!("no string field {field:?} in {value}"))
}

/// Waits until `/status/secrets` has `name` and `check` accepts its entry.
async fn wait_status(certwire: &Certwire, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let check = &check;
    util::wait_for(&format!("/status/secrets {name}: {what}"), WAIT, move || async move {
        certwire.secret_status(name).await.filter(check)
    })
    .await
}

/// Waits until `/status/secrets` shows `name` served (not deleted) with serial `serial_hex`.
async fn wait_status_serial(certwire: &Certwire, name: &str, serial_hex: &str) -> Value {
    wait_status(certwire, name, &format!("serving serial {serial_hex}"), |s| {
        s["deleted"] == Value::Bool(false) && s["serial"].as_str().map(normalize_hex).as_deref() == Some(serial_hex)
    })
    .await
}

/// Waits until `/status/secrets` marks `name` deleted.
async fn wait_deleted(certwire: &Certwire, name: &str) -> Value {
    wait_status(certwire, name, "deleted", |s| s["deleted"] == Value::Bool(true)).await
}

/// Sum of Envoy's `sds.<secret>.<stat>` counters over every secret it has. Envoy
/// rewrites `://` in stat names, so they are matched by suffix; each test's Envoy
/// asks for one secret (two with mutual TLS).
async fn envoy_sds_stat(envoy: &Envoy, stat: &str) -> u64 {
    let body = envoy.admin_get(&format!("/stats?filter={}", http::encode_query_value(r"^sds\."))).await;
    let suffix = format!(".{stat}");
    body.lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(key, _)| key.ends_with(&suffix))
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum()
}

/// The counters that grow when anything is pushed to Envoy or accepted by it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PushCounters {
    certwire_pushes: f64,
    certwire_applied: f64,
    envoy_updates: u64,
}

async fn push_counters(certwire: &Certwire, envoy: &Envoy) -> PushCounters {
    let metrics = certwire.metrics().await;
    PushCounters {
        certwire_pushes: sum_samples(&metrics, "certwire_pushes_total", &[]),
        certwire_applied: sum_samples(&metrics, "certwire_updates_applied_total", &[("source", "kubernetes")]),
        envoy_updates: envoy_sds_stat(envoy, "update_success").await,
    }
}

/// Holds for [`HOLD`] that nothing is applied or pushed: no flap.
async fn nothing_pushed(certwire: &Certwire, envoy: &Envoy, baseline: PushCounters, when: &str) {
    let result = util::holds_for(HOLD, move || async move {
        let now = push_counters(certwire, envoy).await;
        if now == baseline { Ok(()) } else { Err(format!("{now:?} (was {baseline:?})")) }
    })
    .await;
    if let Err(what) = result {
        panic!("{when}: unchanged Secrets must push nothing, but the counters moved: {what}");
    }
}

/// Waits until certwire counts at least `min` rejected updates with `reason`.
async fn wait_rejected(certwire: &Certwire, reason: &str, min: f64) {
    let what = format!("certwire_updates_rejected_total{{source=\"kubernetes\",reason=\"{reason}\"}} >= {min}");
    util::wait_for(&what, WAIT, move || async move {
        let labels = [("source", "kubernetes"), ("reason", reason)];
        let n = certwire.metric_sum("certwire_updates_rejected_total", &labels).await;
        (n >= min).then_some(())
    })
    .await;
}

/// `FetchSecrets` for one name over certwire's SDS, as a proxy without a stream would.
async fn fetch(sds: SocketAddr, name: &str) -> Result<Secret, tonic::Status> {
    let mut client = SecretDiscoveryServiceClient::connect(format!("http://{sds}")).await.expect("connect to SDS");
    let request = DiscoveryRequest {
        type_url: SECRET_TYPE_URL.to_string(),
        resource_names: vec![name.to_string()],
        node: Some(Node { id: "e2e-kube-fetch".into(), cluster: "e2e".into(), ..Default::default() }),
        ..Default::default()
    };
    let response = client.fetch_secrets(request).await?.into_inner();
    assert_eq!(response.resources.len(), 1, "one resource for one name");
    let secret = Secret::decode(response.resources[0].value.as_slice()).expect("a Secret resource");
    assert_eq!(secret.name, name, "Secret.name is the requested name");
    Ok(secret)
}

/// The leaf serial of a fetched `tls_certificate` secret.
fn leaf_serial(secret: &Secret) -> String {
    let Some(Type::TlsCertificate(tls)) = &secret.r#type else { panic!("{} is not a tls_certificate", secret.name) };
    let pem = match tls.certificate_chain.as_ref().and_then(|c| c.specifier.as_ref()) {
        Some(Specifier::InlineBytes(bytes)) => String::from_utf8(bytes.clone()).expect("PEM is UTF-8"),
        Some(Specifier::InlineString(text)) => text.clone(),
        other => panic!("{}: certificate chain not inline: {other:?}", secret.name),
    };
    pki::serial_hex_of_pem(&pem)
}

/// Holds for [`HOLD`] that certwire offers nothing under `name`: FetchSecrets says
/// NotFound and `/status/secrets` does not list it as served.
async fn never_offered(served: &Served, name: &str) {
    let result = util::holds_for(HOLD, move || async move {
        match fetch(served.sds, name).await {
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => return Err(format!("FetchSecrets failed oddly: {status}")),
            Ok(secret) => return Err(format!("FetchSecrets returned serial {}", leaf_serial(&secret))),
        }
        match served.certwire.secret_status(name).await {
            Some(s) if s["deleted"] != Value::Bool(true) => Err(format!("/status/secrets serves it: {s}")),
            _ => Ok(()),
        }
    })
    .await;
    if let Err(what) = result {
        panic!("certwire must not offer {name:?}, but: {what}");
    }
}

/// Index of the first request after `from` matching `wanted`, waiting for it.
async fn wait_request(cluster: &Cluster, from: usize, what: &str, wanted: impl Fn(&RequestRecord) -> bool) -> usize {
    let wanted = &wanted;
    util::wait_for(what, WAIT_BACKOFF, move || async move {
        cluster.requests_since(from).iter().position(wanted).map(|i| from + i)
    })
    .await
}

// ---------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------

/// kubectl create -> served; kubectl apply of a new certificate -> rotated in the
/// running Envoy; kubectl delete -> status says deleted and Envoy keeps the last one.
#[tokio::test]
async fn kubectl_create_apply_delete_reach_envoy() {
    let cluster = Cluster::start().await;
    cluster.kubectl(&["create", "namespace", NS]).await;
    let s = cluster.certwire(&["--namespace", NS]).await;
    let name = kube_name(NS, NAME);
    // Envoy asks before the Secret exists: certwire pushes it the moment it appears.
    let proxy = envoy(s.sds, &name, false).await;

    let first = cluster.ca.server(SNI);
    cluster.create_tls(NS, NAME, &first).await;
    let served = wait_served_serial(proxy.addr, SNI, &first.serial_hex, WAIT).await;
    assert_eq!(served.sha256_hex, first.sha256_hex, "Envoy serves exactly the Secret's certificate");
    let status = wait_status_serial(&s.certwire, &name, &first.serial_hex).await;
    assert_eq!(str_field(&status, "source"), "kubernetes", "{status}");
    let updates = envoy_sds_stat(&proxy.envoy, "update_success").await;

    // A modified manifest, applied: the running Envoy serves it on a fresh handshake.
    let second = cluster.ca.server(SNI);
    cluster.apply_tls(NS, NAME, &second.cert_pem, &second.key_pem).await;
    let served = wait_served_serial(proxy.addr, SNI, &second.serial_hex, WAIT).await;
    assert_eq!(served.sha256_hex, second.sha256_hex);
    assert!(envoy_sds_stat(&proxy.envoy, "update_success").await > updates, "the rotation came over SDS");
    assert_eq!(envoy_sds_stat(&proxy.envoy, "update_rejected").await, 0, "Envoy refused nothing");
    assert!(
        proxy.envoy.served_serials().await.contains(&second.serial_hex),
        "Envoy /certs shows the rotated certificate"
    );

    let out = cluster.kubectl(&["delete", "secret", NAME, "-n", NS]).await;
    assert_eq!(out.trim(), format!("secret \"{NAME}\" deleted"));
    let status = wait_deleted(&s.certwire, &name).await;
    assert!(status["last_error"].is_null(), "a deletion is not an error: {status}");
    keeps_serving(proxy.addr, None, &second.serial_hex).await;
    // Not offered to new subscribers any more.
    never_offered(&s, &name).await;
}

/// In the default namespace a Secret is also `kubernetes://NAME` and bare `NAME`; in
/// another watched namespace only `kubernetes://NS/NAME`.
#[tokio::test]
async fn default_namespace_names_and_other_namespaces() {
    const OTHER: &str = "apps";
    let cluster = Cluster::start().await;
    cluster.kubectl(&["create", "namespace", NS]).await;
    cluster.kubectl(&["create", "namespace", OTHER]).await;
    let web = cluster.ca.server(SNI);
    let api = cluster.ca.server(SNI);
    cluster.create_tls(NS, NAME, &web).await;
    cluster.create_tls(OTHER, "api", &api).await;
    // The first watched namespace is the default one.
    let s = cluster.certwire(&["--namespace", NS, "--namespace", OTHER]).await;

    let bare = envoy(s.sds, NAME, false).await;
    let short = envoy(s.sds, &format!("kubernetes://{NAME}"), false).await;
    let other = envoy(s.sds, &kube_name(OTHER, "api"), false).await;
    wait_served_serial(bare.addr, SNI, &web.serial_hex, WAIT).await;
    wait_served_serial(short.addr, SNI, &web.serial_hex, WAIT).await;
    wait_served_serial(other.addr, SNI, &api.serial_hex, WAIT).await;
    let full = fetch(s.sds, &kube_name(NS, NAME)).await.expect("kubernetes://ingress/web is served");
    assert_eq!(leaf_serial(&full), web.serial_hex);

    // apps/api is no default-namespace Secret: neither short form names it.
    never_offered(&s, "api").await;
    never_offered(&s, "kubernetes://api").await;
    let all = s.certwire.get_json("/status/secrets").await;
    let listed: Vec<String> = all
        .as_array()
        .expect("/status/secrets is an array")
        .iter()
        .filter(|e| e["deleted"] != Value::Bool(true))
        .filter_map(|e| e["name"].as_str().map(String::from))
        .collect();
    for expected in [NAME.to_string(), format!("kubernetes://{NAME}"), kube_name(NS, NAME), kube_name(OTHER, "api")] {
        assert!(listed.contains(&expected), "/status/secrets serves {expected}: {listed:?}");
    }
}

/// `--all-namespaces`: every namespace is watched with one watch; the kubeconfig's
/// namespace (`default`) is the default one for short names.
#[tokio::test]
async fn all_namespaces_are_watched_with_the_kubeconfig_namespace_as_default() {
    let cluster = Cluster::start().await;
    let in_default = cluster.ca.server(SNI);
    let in_ingress = cluster.ca.server(SNI);
    cluster.api.put_object(kubeapi::tls_secret("default", "home", &in_default.cert_pem, &in_default.key_pem));
    cluster.api.put_object(kubeapi::tls_secret(NS, NAME, &in_ingress.cert_pem, &in_ingress.key_pem));
    let s = cluster.certwire(&["--all-namespaces"]).await;

    for name in ["home", "kubernetes://home", "kubernetes://default/home"] {
        wait_status_serial(&s.certwire, name, &in_default.serial_hex).await;
    }
    wait_status_serial(&s.certwire, &kube_name(NS, NAME), &in_ingress.serial_hex).await;
    // A Secret created later in a namespace that did not exist at start.
    let later = cluster.ca.server(SNI);
    cluster.api.put_object(kubeapi::tls_secret("late", "api", &later.cert_pem, &later.key_pem));
    let fetched = util::wait_for("kubernetes://late/api to be served", WAIT, || async {
        fetch(s.sds, &kube_name("late", "api")).await.ok()
    })
    .await;
    assert_eq!(leaf_serial(&fetched), later.serial_hex);
    never_offered(&s, NAME).await;
    let watches: Vec<RequestRecord> =
        cluster.api.request_log().into_iter().filter(|r| r.is_watch_of("secrets")).collect();
    assert!(
        watches.iter().all(|w| w.path == "/api/v1/secrets"),
        "one cluster-wide watch: {:?}",
        watches.iter().map(ToString::to_string).collect::<Vec<_>>()
    );
}

/// A generic Secret (`cert`, `key`, `cacert`) that also carries `tls.*` and `ca.crt`
/// entries: the generic keys win, and `NAME-cacert` drives MUTUAL TLS.
#[tokio::test]
async fn generic_secret_keys_win_and_drive_mutual_tls() {
    let cluster = Cluster::start().await;
    cluster.kubectl(&["create", "namespace", NS]).await;
    let clients_a = Ca::new("client CA A");
    let clients_b = Ca::new("client CA B");
    let client_a = clients_a.client("client-a");
    let client_b = clients_b.client("client-b");
    let generic = cluster.ca.server(SNI);
    let tls_keys = cluster.ca.server(SNI);
    let from_file =
        |key: &str, file: &str, contents: &str| format!("--from-file={key}={}", cluster.write(file, contents));
    let args = [
        from_file("cert", "generic.crt", &generic.cert_pem),
        from_file("key", "generic.key", &generic.key_pem),
        from_file("cacert", "clients-a.crt", clients_a.cert_pem()),
        // The same Secret in the kubernetes.io/tls spelling, with other content: ignored.
        from_file("tls.crt", "tls.crt", &tls_keys.cert_pem),
        from_file("tls.key", "tls.key", &tls_keys.key_pem),
        from_file("ca.crt", "clients-b.crt", clients_b.cert_pem()),
    ];
    let mut create = vec!["create", "secret", "generic", NAME, "-n", NS];
    create.extend(args.iter().map(String::as_str));
    cluster.kubectl(&create).await;

    let s = cluster.certwire(&["--namespace", NS]).await;
    let name = kube_name(NS, NAME);
    let proxy = envoy(s.sds, &name, true).await;

    let served = wait_served_serial_with(proxy.addr, SNI, Some(&client_a), &generic.serial_hex, WAIT).await;
    assert_eq!(served.http_status, 200);
    let refused = handshake(proxy.addr, SNI, Some(&client_b)).await;
    assert!(refused.is_err(), "a client of CA B (the ignored ca.crt) is refused: {refused:?}");
    assert!(handshake(proxy.addr, SNI, None).await.is_err(), "no client certificate is refused");

    let ca_status = wait_status(&s.certwire, &format!("{name}-cacert"), "served", |s| s["version"].is_string()).await;
    assert_eq!(normalize_hex(str_field(&ca_status, "fingerprint_sha256")), clients_a.cert.sha256_hex, "{ca_status}");
    let status = wait_status_serial(&s.certwire, &name, &generic.serial_hex).await;
    assert_eq!(normalize_hex(str_field(&status, "fingerprint_sha256")), generic.sha256_hex);
}

/// Istio's key rules, through kubectl and a real Envoy: `cert`+`key` only when both are
/// non-empty, else the whole `tls.crt`+`tls.key` pair, never one key of each; a pair
/// whose keys are there but empty is refused with Istio's message (status, metric,
/// Event) and the last good certificate stays.
#[tokio::test]
async fn key_pairs_are_never_mixed_and_empty_keys_are_refused() {
    let cluster = Cluster::start().await;
    cluster.kubectl(&["create", "namespace", NS]).await;
    let good = cluster.ca.server(SNI);
    let other = cluster.ca.server(SNI);
    let manifest = |data: &[(&str, &str)]| {
        let entries: String = data
            .iter()
            .map(|(k, v)| {
                let block: String = v.lines().map(|line| format!("    {line}\n")).collect();
                if v.is_empty() { format!("  {k}: \"\"\n") } else { format!("  {k}: |\n{block}") }
            })
            .collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {NAME}\n  namespace: {NS}\ntype: Opaque\nstringData:\n{entries}"
        );
        cluster.write(&format!("{NAME}-{}.yaml", data.len()), &yaml)
    };
    // `cert` empty, `key` another certificate's key: the tls.* pair is served whole.
    let mixed =
        manifest(&[("cert", ""), ("key", &other.key_pem), ("tls.crt", &good.cert_pem), ("tls.key", &good.key_pem)]);
    cluster.kubectl(&["apply", "-f", &mixed]).await;
    let s = cluster.certwire(&["--namespace", NS]).await;
    let name = kube_name(NS, NAME);
    let proxy = envoy(s.sds, &name, false).await;
    wait_served_serial(proxy.addr, SNI, &good.serial_hex, WAIT).await;

    // Both pairs now there and empty: refused, said, and the good certificate stays.
    let empty = manifest(&[("tls.crt", ""), ("tls.key", ""), ("cert", "")]);
    // replace, not apply: exactly these keys, none merged from before.
    cluster.kubectl(&["replace", "-f", &empty]).await;
    wait_rejected(&s.certwire, "empty_keys", 1.0).await;
    let status = wait_status(&s.certwire, &name, "last_error about empty keys", |st| {
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("found keys \"tls.crt\" and \"tls.key\", but they were empty"))
    })
    .await;
    assert_eq!(normalize_hex(str_field(&status, "serial")), good.serial_hex);
    keeps_serving(proxy.addr, None, &good.serial_hex).await;
    let events = cluster.kubectl(&["events", "-n", NS, "--for", &format!("secret/{NAME}")]).await;
    assert!(events.contains("empty_keys"), "kubectl events --for secret/{NAME}:\n{events}");
}

/// Istio's GetCaCert: a Secret named `NAME-cacert` is the CA of `NAME-cacert`, over
/// `NAME`'s own `ca.crt`, and a change to it reaches a real Envoy's mutual TLS.
#[tokio::test]
async fn a_separate_cacert_secret_wins_and_its_update_is_pushed() {
    let cluster = Cluster::start().await;
    cluster.kubectl(&["create", "namespace", NS]).await;
    let (clients_a, clients_b) = (Ca::new("client CA A"), Ca::new("client CA B"));
    let (client_a, client_b) = (clients_a.client("client-a"), clients_b.client("client-b"));
    let server = cluster.ca.server(SNI);
    let file = |name: &str, contents: &str| cluster.write(name, contents);
    let from_file = |key: &str, path: &str| format!("--from-file={key}={path}");
    let (crt, key, own_ca) =
        (file("s.crt", &server.cert_pem), file("s.key", &server.key_pem), file("b.crt", clients_b.cert_pem()));
    let web = ["create", "secret", "generic", NAME, "-n", NS];
    let web_args = [from_file("tls.crt", &crt), from_file("tls.key", &key), from_file("ca.crt", &own_ca)];
    cluster.kubectl(&web.iter().copied().chain(web_args.iter().map(String::as_str)).collect::<Vec<_>>()).await;
    let separate_a = file("a.crt", clients_a.cert_pem());
    let cacert = format!("{NAME}-cacert");
    cluster.kubectl(&["create", "secret", "generic", &cacert, "-n", NS, &from_file("ca.crt", &separate_a)]).await;

    let s = cluster.certwire(&["--namespace", NS]).await;
    let proxy = envoy(s.sds, &kube_name(NS, NAME), true).await;
    wait_served_serial_with(proxy.addr, SNI, Some(&client_a), &server.serial_hex, WAIT).await;
    assert!(handshake(proxy.addr, SNI, Some(&client_b)).await.is_err(), "web's own ca.crt (CA B) is not used");

    // The separate Secret now holds CA B: pushed, A refused, B accepted.
    let yaml = cluster
        .kubectl(&[
            "create",
            "secret",
            "generic",
            &cacert,
            "-n",
            NS,
            &from_file("ca.crt", &own_ca),
            "--dry-run=client",
            "-o",
            "yaml",
        ])
        .await;
    let manifest = file("cacert-b.yaml", &yaml);
    cluster.kubectl(&["apply", "-f", &manifest]).await;
    wait_served_serial_with(proxy.addr, SNI, Some(&client_b), &server.serial_hex, WAIT).await;
    assert!(handshake(proxy.addr, SNI, Some(&client_a)).await.is_err(), "CA A is gone");
}

/// `configmap://NS/NAME` (Istio 1.28): a CA bundle from a ConfigMap, with `--configmaps`,
/// checks Envoy's client certificates; `kubectl apply` of another CA is pushed.
#[tokio::test]
async fn a_configmap_ca_bundle_checks_client_certificates() {
    let cluster = Cluster::start().await;
    cluster.kubectl(&["create", "namespace", NS]).await;
    let (clients_a, clients_b) = (Ca::new("client CA A"), Ca::new("client CA B"));
    let (client_a, client_b) = (clients_a.client("client-a"), clients_b.client("client-b"));
    let server = cluster.ca.server(SNI);
    cluster.create_tls(NS, NAME, &server).await;
    let ca_a = cluster.write("a.crt", clients_a.cert_pem());
    cluster.kubectl(&["create", "configmap", "trust", "-n", NS, &format!("--from-file=ca.crt={ca_a}")]).await;

    let s = cluster.certwire(&["--namespace", NS, "--configmaps"]).await;
    let trust = format!("configmap://{NS}/trust");
    let bootstrap = SdsBootstrap::new(&kube_name(NS, NAME), SdsTarget::Tcp(s.sds), 0)
        .initial_fetch_timeout(Duration::ZERO)
        .ca_secret(&trust);
    let envoy = Envoy::start(&bootstrap.to_yaml()).await;
    let addr = envoy.listener_addr(&kube_name(NS, NAME));
    wait_served_serial_with(addr, SNI, Some(&client_a), &server.serial_hex, WAIT).await;
    assert!(handshake(addr, SNI, Some(&client_b)).await.is_err(), "CA B is not trusted yet");
    let status =
        wait_status(&s.certwire, &trust, "the ConfigMap's bundle", |st| st["kind"] == "validation_context").await;
    assert_eq!(status["source"], "kubernetes", "{status}");

    let ca_b = cluster.write("b.crt", clients_b.cert_pem());
    let yaml = cluster
        .kubectl(&[
            "create",
            "configmap",
            "trust",
            "-n",
            NS,
            &format!("--from-file=ca.crt={ca_b}"),
            "--dry-run=client",
            "-o",
            "yaml",
        ])
        .await;
    let manifest = cluster.write("trust-b.yaml", &yaml);
    cluster.kubectl(&["apply", "-f", &manifest]).await;
    wait_served_serial_with(addr, SNI, Some(&client_b), &server.serial_hex, WAIT).await;
    assert!(handshake(addr, SNI, Some(&client_a)).await.is_err(), "CA A is gone");

    // A ConfigMap that is not a bundle is not served; a deleted bundle leaves Envoy
    // with what it has.
    cluster.kubectl(&["create", "configmap", "settings", "-n", NS, "--from-literal=mode=fast"]).await;
    cluster.kubectl(&["delete", "configmap", "trust", "-n", NS]).await;
    wait_deleted(&s.certwire, &trust).await;
    assert!(s.certwire.secret_status(&format!("configmap://{NS}/settings")).await.is_none());
    keeps_serving(addr, Some(&client_b), &server.serial_hex).await;
}

/// A dropped watch resumes from its resourceVersion; a `410 Gone` on resumption
/// relists. Neither pushes anything for unchanged Secrets, and a change made after
/// the relist is served.
#[tokio::test]
async fn dropped_watch_and_410_gone_relist_without_flapping() {
    // No bookmarks: they would move the watcher's resourceVersion to the newest one,
    // and the 410 below would depend on which came first, a bookmark or the drop.
    let cluster =
        Cluster::start_with(Config { bookmark_interval: Duration::from_secs(3600), ..Config::default() }).await;
    let first = cluster.ca.server(SNI);
    let other = cluster.ca.server(SNI);
    cluster.api.put_object(kubeapi::tls_secret(NS, NAME, &first.cert_pem, &first.key_pem));
    cluster.api.put_object(kubeapi::tls_secret(NS, "other", &other.cert_pem, &other.key_pem));
    let s = cluster.certwire(&["--namespace", NS]).await;
    let name = kube_name(NS, NAME);
    let proxy = envoy(s.sds, &name, false).await;
    wait_served_serial(proxy.addr, SNI, &first.serial_hex, WAIT).await;
    wait_status_serial(&s.certwire, &kube_name(NS, "other"), &other.serial_hex).await;
    cluster.api.wait_for_watches(1, WAIT).await;
    let baseline = push_counters(&s.certwire, &proxy.envoy).await;
    assert!(baseline.envoy_updates >= 1 && baseline.certwire_pushes >= 1.0, "{baseline:?}");

    // 1. A plain drop (as when the API server restarts): the watch is resumed.
    let mark = cluster.api.request_log().len();
    cluster.api.drop_watches();
    let resumed = wait_request(&cluster, mark, "certwire to watch Secrets again", |r| r.is_watch_of("secrets")).await;
    let watch = &cluster.api.request_log()[resumed];
    assert!(watch.param("resourceVersion").is_some(), "the watch resumed from a version: {watch}");
    cluster.api.wait_for_watches(1, WAIT).await;
    nothing_pushed(&s.certwire, &proxy.envoy, baseline, "after a dropped watch").await;

    // 2. A write certwire does not watch moves the version on; compaction expires
    // every older version; the drop makes certwire resume from one: 410, relist.
    cluster.api.put_object(kubeapi::tls_secret("elsewhere", "unrelated", &other.cert_pem, &other.key_pem));
    cluster.api.compact();
    let mark = cluster.api.request_log().len();
    cluster.api.drop_watches();
    let relist =
        wait_request(&cluster, mark, "certwire to relist Secrets after 410 Gone", |r| r.is_list_of("secrets")).await;
    wait_request(&cluster, relist, "certwire to watch again after the relist", |r| r.is_watch_of("secrets")).await;
    cluster.api.wait_for_watches(1, WAIT).await;
    keeps_serving(proxy.addr, None, &first.serial_hex).await;
    nothing_pushed(&s.certwire, &proxy.envoy, baseline, "after a 410 relist").await;
    assert!(s.certwire.get("/readyz").await.status == 200, "certwire stays ready through the relist");

    // 3. The resumed watch delivers: a rotation after the relist is served.
    let next = cluster.ca.server(SNI);
    cluster.api.put_object(kubeapi::tls_secret(NS, NAME, &next.cert_pem, &next.key_pem));
    wait_served_serial(proxy.addr, SNI, &next.serial_hex, WAIT).await;
    let after = push_counters(&s.certwire, &proxy.envoy).await;
    assert_eq!(after.envoy_updates, baseline.envoy_updates + 1, "exactly one update reached Envoy: {after:?}");
    assert_eq!(envoy_sds_stat(&proxy.envoy, "update_rejected").await, 0);
}

/// A Secret deleted while certwire's watch was down is only seen by the relist: it is
/// withdrawn then, and the Secrets that are still there are kept.
#[tokio::test]
async fn secret_deleted_during_an_outage_is_withdrawn_by_the_relist() {
    let cluster =
        Cluster::start_with(Config { bookmark_interval: Duration::from_secs(3600), ..Config::default() }).await;
    let web = cluster.ca.server(SNI);
    let gone = cluster.ca.server(SNI);
    cluster.api.put_object(kubeapi::tls_secret(NS, NAME, &web.cert_pem, &web.key_pem));
    cluster.api.put_object(kubeapi::tls_secret(NS, "gone", &gone.cert_pem, &gone.key_pem));
    let s = cluster.certwire(&["--namespace", NS]).await;
    wait_status_serial(&s.certwire, &kube_name(NS, NAME), &web.serial_hex).await;
    wait_status_serial(&s.certwire, &kube_name(NS, "gone"), &gone.serial_hex).await;
    cluster.api.wait_for_watches(1, WAIT).await;

    cluster.stop_api().await;
    assert!(cluster.api.delete_object("v1", "Secret", NS, "gone"));
    // The DELETED event is in no history any more: only a relist can tell.
    cluster.api.compact();
    let mark = cluster.api.request_log().len();
    cluster.api.resume_listening();

    wait_request(&cluster, mark, "certwire to relist Secrets", |r| r.is_list_of("secrets")).await;
    let status = wait_deleted(&s.certwire, &kube_name(NS, "gone")).await;
    assert!(status["last_error"].is_null(), "{status}");
    let kept = s.certwire.secret_status(&kube_name(NS, NAME)).await.expect("web is listed");
    assert_eq!(kept["deleted"], Value::Bool(false), "a Secret still there is kept: {kept}");
    assert_eq!(normalize_hex(str_field(&kept, "serial")), web.serial_hex);
}

/// Bad Secrets applied over a good one are refused, each with the Secret's
/// namespace/name and the reason in the log, the metrics, /status/secrets and a
/// Kubernetes Event on the Secret, while Envoy keeps the good certificate.
#[tokio::test]
async fn bad_secrets_are_rejected_everywhere_and_the_old_certificate_stays() {
    let cluster = Cluster::start().await;
    cluster.kubectl(&["create", "namespace", NS]).await;
    let good = cluster.ca.server(SNI);
    cluster.create_tls(NS, NAME, &good).await;
    let s = cluster.certwire(&["--namespace", NS]).await;
    let name = kube_name(NS, NAME);
    let proxy = envoy(s.sds, &name, false).await;
    wait_served_serial(proxy.addr, SNI, &good.serial_hex, WAIT).await;

    let other = cluster.ca.server(SNI);
    let expired = cluster.ca.issue(&LeafSpec::server(SNI).expired());
    let garbage = "-----BEGIN CERTIFICATE-----\nthis is not base64!\n-----END CERTIFICATE-----\n";
    let cases: [(&str, &str, &str, &str); 3] = [
        // (reason, what last_error says, certificate, key)
        ("key_mismatch", "does not match", &other.cert_pem, &good.key_pem),
        ("bad_pem", "invalid pem", garbage, &good.key_pem),
        ("expired", "expired", &expired.cert_pem, &expired.key_pem),
    ];
    for (reason, says, cert_pem, key_pem) in cases {
        cluster.apply_tls(NS, NAME, cert_pem, key_pem).await;
        wait_rejected(&s.certwire, reason, 1.0).await;

        let status = wait_status(&s.certwire, &name, &format!("last_error naming {says:?}"), |st| {
            st["last_error"].as_str().is_some_and(|e| e.to_lowercase().contains(says))
        })
        .await;
        assert_eq!(normalize_hex(str_field(&status, "serial")), good.serial_hex, "status keeps the good version");
        assert_eq!(status["deleted"], Value::Bool(false));

        let log = std::fs::read_to_string(s.certwire.log_path()).expect("read certwire log");
        assert!(
            log.lines().any(|l| l.contains(&format!("{NS}/{NAME}")) && l.contains(reason) && l.contains("ERROR")),
            "certwire's log has an error line naming {NS}/{NAME} and {reason}:\n{}",
            util::log_tail(s.certwire.log_path(), 20)
        );

        keeps_serving(proxy.addr, None, &good.serial_hex).await;
    }
    assert_eq!(envoy_sds_stat(&proxy.envoy, "update_rejected").await, 0, "certwire never pushed a bad Secret");

    // Each rejection is a Warning Event on the Secret whose note gives the reason, so
    // `kubectl describe secret` tells the user why the old certificate is still served.
    let api = &cluster.api;
    let events_for_reasons = || async {
        let events = api.events();
        let on_web: Vec<Value> = events
            .into_iter()
            .filter(|e| {
                e["regarding"]["kind"] == "Secret"
                    && e["regarding"]["namespace"] == NS
                    && e["regarding"]["name"] == NAME
            })
            .collect();
        let all = cases.iter().all(|(reason, ..)| {
            on_web.iter().any(|e| e["type"] == "Warning" && e["note"].as_str().is_some_and(|n| n.contains(reason)))
        });
        all.then_some(on_web)
    };
    let Some(events) = util::poll_until(WAIT, events_for_reasons).await else {
        let seen: Vec<String> = api
            .events()
            .iter()
            .map(|e| format!("{} {} x{}: {}", e["type"], e["reason"], e["series"]["count"], e["note"]))
            .collect();
        panic!(
            "expected a Warning Event on Secret {NS}/{NAME} naming each reason {:?}; the API server has:\n{}",
            cases.iter().map(|c| c.0).collect::<Vec<_>>(),
            seen.join("\n")
        );
    };
    for event in &events {
        assert_eq!(
            (event["reason"].as_str(), event["reportingController"].as_str()),
            (Some("Rejected"), Some("certwire"))
        );
    }

    // What a user sees: `kubectl get events` on the namespace lists the rejections.
    let events: Value = serde_json::from_str(&cluster.kubectl(&["get", "events", "-n", NS, "-o", "json"]).await)
        .expect("kubectl prints JSON");
    let rejected = events["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["involvedObject"]["name"] == NAME && e["reason"] == "Rejected")
        .count();
    assert!(rejected >= 3, "kubectl get events shows the three rejections: {events}");

    // An error over the API server's 1024-byte note limit (a long subject) still gets
    // its Event, the note cut with " ...".
    let long = cluster.ca.issue(&LeafSpec::server(SNI).common_name(&"x".repeat(1_000)));
    cluster.apply_tls(NS, NAME, &long.cert_pem, &good.key_pem).await;
    wait_rejected(&s.certwire, "key_mismatch", 2.0).await;
    let cut = util::wait_for("an Event for the rejection with a long subject", WAIT, || async {
        api.events().into_iter().find_map(|e| {
            let note = e["note"].as_str()?;
            (e["regarding"]["name"] == NAME && note.contains("xxxxxxxx")).then(|| note.to_owned())
        })
    })
    .await;
    assert!(cut.len() <= 1024 && cut.ends_with(" ..."), "a {}-byte note: {cut}", cut.len());

    // What the README tells users to run: `kubectl describe secret` does not look up
    // Events for Secrets, `kubectl events --for` does.
    let listed = cluster.kubectl(&["events", "-n", NS, "--for", &format!("secret/{NAME}")]).await;
    for (reason, ..) in cases {
        assert!(listed.contains(reason), "kubectl events --for secret/{NAME} shows {reason}:\n{listed}");
    }

    // A good Secret afterwards clears the error and is served.
    let next = cluster.ca.server(SNI);
    cluster.apply_tls(NS, NAME, &next.cert_pem, &next.key_pem).await;
    wait_served_serial(proxy.addr, SNI, &next.serial_hex, WAIT).await;
    let status = wait_status_serial(&s.certwire, &name, &next.serial_hex).await;
    assert!(status["last_error"].is_null(), "a good version clears last_error: {status}");
}

/// With the API server unreachable at start certwire still starts, serves its file
/// source, and says why it is not ready; once the API server answers it becomes
/// ready and serves the Kubernetes Secrets, also to an Envoy that asked meanwhile.
#[tokio::test]
async fn unreachable_api_server_at_start_does_not_stop_other_sources() {
    let cluster = Cluster::start().await;
    cluster.stop_api().await;
    let root = cluster.dir.path().join("secrets");
    std::fs::create_dir(&root).expect("create secrets root");
    let from_files = cluster.ca.server(SNI);
    let _dir = SecretDir::create_tls(&root, "edge", &from_files, None);
    let root_arg = root.to_str().expect("temp paths are UTF-8");
    let s = cluster.certwire(&["--files", root_arg, "--namespace", NS]).await;

    let files_proxy = envoy(s.sds, "edge", false).await;
    wait_served_serial(files_proxy.addr, SNI, &from_files.serial_hex, WAIT).await;
    let name = kube_name(NS, NAME);
    let kube_proxy = envoy(s.sds, &name, false).await;

    let certwire = &s.certwire;
    let body = util::wait_for("/readyz 503 naming kubernetes and the API server error", WAIT, || async {
        let response = certwire.get("/readyz").await;
        (response.status == 503 && response.body.contains(&format!("kubernetes:{NS}: API server")))
            .then_some(response.body)
    })
    .await;
    assert!(body.to_lowercase().contains("connect"), "/readyz says what failed: {body}");
    assert!(!body.contains("files:"), "the file source is ready: {body}");
    serves_nothing(kube_proxy.addr, "no Kubernetes Secret can be served yet").await;

    let secret = cluster.ca.server(SNI);
    cluster.api.put_object(kubeapi::tls_secret(NS, NAME, &secret.cert_pem, &secret.key_pem));
    cluster.api.resume_listening();
    util::wait_for("/readyz 200 once the API server answers", WAIT_BACKOFF, || async {
        (certwire.get("/readyz").await.status == 200).then_some(())
    })
    .await;
    wait_served_serial(kube_proxy.addr, SNI, &secret.serial_hex, WAIT).await;
    keeps_serving(files_proxy.addr, None, &from_files.serial_hex).await;
}

/// 1,000 Secrets listed at start (two list pages) are all served.
#[tokio::test]
async fn a_thousand_secrets_listed_at_start_are_all_served() {
    const BULK: &str = "bulk";
    const COUNT: usize = 1000;
    let cluster = Cluster::start().await;
    let leaves: Vec<Issued> = (0..COUNT).map(|i| cluster.ca.server(&format!("s{i}.bulk.test"))).collect();
    for (i, leaf) in leaves.iter().enumerate() {
        cluster.api.put_object(kubeapi::tls_secret(BULK, &format!("s{i:04}"), &leaf.cert_pem, &leaf.key_pem));
    }
    // The default namespace is another one, so each Secret has exactly one name.
    let s = cluster.certwire(&["--namespace", BULK, "--default-namespace", "default"]).await;

    let certwire = &s.certwire;
    let served = util::wait_for("/status/secrets to list 1,000 served Secrets", WAIT_BACKOFF, || async {
        let all = certwire.get_json("/status/secrets").await;
        let served: Vec<Value> = all
            .as_array()?
            .iter()
            .filter(|e| e["version"].is_string() && e["deleted"] == Value::Bool(false))
            .cloned()
            .collect();
        (served.len() >= COUNT).then_some(served)
    })
    .await;
    assert_eq!(served.len(), COUNT, "exactly the 1,000 Secrets, one name each");
    for (i, leaf) in leaves.iter().enumerate() {
        let name = kube_name(BULK, &format!("s{i:04}"));
        let entry = served.iter().find(|e| e["name"] == name.as_str()).unwrap_or_else(|| panic!("{name} listed"));
        assert_eq!(normalize_hex(str_field(entry, "serial")), leaf.serial_hex, "{name}");
    }
    assert_eq!(certwire.get("/readyz").await.status, 200, "listed, so ready");
    let pages =
        cluster.api.request_log().iter().filter(|r| r.is_list_of("secrets") && r.param("continue").is_some()).count();
    assert!(pages >= 1, "the initial list was paginated");

    // First, last, and both sides of the page boundary, fetched as a proxy would.
    for i in [0, 499, 500, 999] {
        let name = kube_name(BULK, &format!("s{i:04}"));
        let secret = fetch(s.sds, &name).await.unwrap_or_else(|e| panic!("FetchSecrets {name}: {e}"));
        assert_eq!(leaf_serial(&secret), leaves[i].serial_hex, "{name}");
    }
    // And one through a real Envoy.
    let proxy = envoy(s.sds, &kube_name(BULK, "s0777"), false).await;
    wait_served_serial(proxy.addr, SNI, &leaves[777].serial_hex, WAIT).await;
}

/// `--label-selector`: an unlabelled Secret is not served; `kubectl label` makes it
/// served; removing the label withdraws it (Envoy keeps what it has).
#[tokio::test]
async fn label_selector_follows_kubectl_label() {
    const LABEL: &str = "certwire.io/serve";
    let cluster = Cluster::start().await;
    cluster.kubectl(&["create", "namespace", NS]).await;
    let web = cluster.ca.server(SNI);
    let labelled = cluster.ca.server(SNI);
    cluster.create_tls(NS, NAME, &web).await;
    cluster.create_tls(NS, "labelled", &labelled).await;
    cluster.kubectl(&["label", "secret", "labelled", "-n", NS, &format!("{LABEL}=true")]).await;
    let s = cluster.certwire(&["--namespace", NS, "--label-selector", &format!("{LABEL}=true")]).await;
    let name = kube_name(NS, NAME);

    // The watch works (the labelled Secret is served), yet the unlabelled one is not.
    wait_status_serial(&s.certwire, &kube_name(NS, "labelled"), &labelled.serial_hex).await;
    let proxy = envoy(s.sds, &name, false).await;
    never_offered(&s, &name).await;
    serves_nothing(proxy.addr, "the Secret has no label").await;
    let watch = cluster.api.request_log().into_iter().find(|r| r.is_watch_of("secrets")).expect("certwire watched");
    assert!(watch.param("labelSelector").is_some(), "the selector is applied by the API server: {watch}");

    cluster.kubectl(&["label", "secret", NAME, "-n", NS, &format!("{LABEL}=true")]).await;
    wait_served_serial(proxy.addr, SNI, &web.serial_hex, WAIT).await;
    wait_status_serial(&s.certwire, &name, &web.serial_hex).await;

    cluster.kubectl(&["label", "secret", NAME, "-n", NS, &format!("{LABEL}-")]).await;
    wait_deleted(&s.certwire, &name).await;
    never_offered(&s, &name).await;
    keeps_serving(proxy.addr, None, &web.serial_hex).await;
    // The labelled one was never touched.
    wait_status_serial(&s.certwire, &kube_name(NS, "labelled"), &labelled.serial_hex).await;
}
