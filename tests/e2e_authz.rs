//! End to end: who gets which key. A real Envoy reaches certwire over mutual TLS (or a
//! Unix socket), certwire names it by its client certificate (or its uid), and serves
//! each name only where the authorization rules allow; everything is checked where a
//! user sees it: a fresh TLS handshake on Envoy's listeners, certwire's handshake
//! with its own port, and certwire's status and metrics. No key bytes may appear in
//! any of certwire's output.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::bootstrap::{SdsBootstrap, SdsTarget};
use common::certwire::{self, Certwire};
use common::envoy::Envoy;
use common::files::SecretDir;
use common::kubeapi::{self, KubeApi};
use common::pki::{Ca, Issued, LeafSpec};
use common::tls::{self, handshake, sds_handshake, wait_served_serial};
use common::util::{self, WAIT};
use serde_json::Value;

/// The DNS name on certwire's server certificate, which Envoy checks.
const SERVER_NAME: &str = "certwire.test";
const ID_A: &str = "spiffe://e2e.test/ns/a/sa/gateway";
const ID_B: &str = "spiffe://e2e.test/ns/b/sa/gateway";
/// Envoy starts once every listener has its secret or this passed: a listener whose
/// name is denied waits it out (Envoy's default is 15 s).
const WARMING: Duration = Duration::from_secs(2);
/// How long "never served" is watched.
const HOLD: Duration = Duration::from_secs(2);

/// The CAs and certwire's own TLS files.
struct Pki {
    /// Issues certwire's server certificate; Envoy trusts it.
    server_ca: Ca,
    /// Issues the proxies' client certificates; certwire trusts it.
    client_ca: Ca,
    /// certwire's `tls.crt`, `tls.key`, `ca.crt` (the client CA bundle).
    tls: SecretDir,
    server: Issued,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let server_ca = Ca::new("e2e certwire server CA");
        let client_ca = Ca::new("e2e proxy client CA");
        let server = server_ca.server(SERVER_NAME);
        let tls = SecretDir::create_tls(&dir.join("certwire-tls"), "server", &server, Some(client_ca.cert_pem()));
        Pki { server_ca, client_ca, tls, server }
    }

    /// `certwire serve` flags for mTLS with these files.
    fn serve_args(&self) -> Vec<String> {
        let f = |n: &str| self.tls.file(n).display().to_string();
        vec!["--tls-cert".into(), f("tls.crt"), "--tls-key".into(), f("tls.key"), "--tls-client-ca".into(), f("ca.crt")]
    }

    /// An Envoy's client directory: its certificate for `id` (from `ca`) and the CA it
    /// checks certwire with.
    fn client_dir(&self, root: &Path, label: &str, leaf: &Issued) -> SecretDir {
        SecretDir::create_tls(root, label, leaf, Some(self.server_ca.cert_pem()))
    }
}

/// Served secrets: one directory each, a server certificate for `NAME.test`.
struct Secrets {
    root: PathBuf,
    ca: Ca,
    dirs: Vec<(String, SecretDir, Issued)>,
}

impl Secrets {
    fn new(dir: &Path, names: &[&str]) -> Secrets {
        let root = dir.join("secrets");
        std::fs::create_dir_all(&root).unwrap();
        let ca = Ca::new("e2e served CA");
        let dirs = names
            .iter()
            .map(|n| {
                let leaf = ca.server(&format!("{n}.test"));
                (n.to_string(), SecretDir::create_tls(&root, n, &leaf, None), leaf)
            })
            .collect();
        Secrets { root, ca, dirs }
    }

    fn leaf(&self, name: &str) -> &Issued {
        &self.dirs.iter().find(|(n, _, _)| n == name).unwrap().2
    }

    fn rotate(&mut self, name: &str) -> Issued {
        let ca = &self.ca;
        let (_, dir, leaf) = self.dirs.iter_mut().find(|(n, _, _)| n == name).unwrap();
        let next = ca.server(&format!("{name}.test"));
        dir.swap_tls(&next, None);
        *leaf = next.clone();
        next
    }

    fn key_pems(&self) -> Vec<String> {
        self.dirs.iter().map(|(_, _, l)| l.key_pem.clone()).collect()
    }
}

fn write_config(dir: &Path, rules: &str) -> String {
    let path = dir.join("certwire.toml");
    std::fs::write(&path, format!("[authz]\nmode = \"policy\"\n{rules}")).unwrap();
    path.display().to_string()
}

/// Holds for [`HOLD`] that `addr` completes no TLS handshake: its listener has no
/// certificate.
async fn never_served(addr: SocketAddr, sni: &str) {
    let result = util::holds_for(HOLD, || async move {
        match handshake(addr, sni, None).await {
            Ok(served) => Err(format!("served serial {}", served.serial_hex)),
            Err(_) => Ok(()),
        }
    })
    .await;
    if let Err(what) = result {
        panic!("expected {addr} ({sni}) to have no certificate, but it {what}");
    }
}

async fn wait_metric(certwire: &Certwire, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let what = format!("{metric}{labels:?} >= 1");
    util::wait_for(&what, WAIT, || async {
        let n = certwire.metric_sum(metric, labels).await;
        (n >= 1.0).then_some(n)
    })
    .await
}

/// The streams of `/status/proxies` whose identity is `identity`.
async fn streams_of(certwire: &Certwire, identity: &str) -> Vec<Value> {
    let all = certwire.get_json("/status/proxies").await;
    all.as_array().unwrap().iter().filter(|s| s["identity"] == identity).cloned().collect()
}

/// The status of `name` on the streams of `identity`.
async fn name_status(certwire: &Certwire, identity: &str, name: &str) -> Option<Value> {
    streams_of(certwire, identity)
        .await
        .iter()
        .flat_map(|s| s["secrets"].as_array().cloned().unwrap_or_default())
        .find(|n| n["name"] == name)
}

/// No key's base64 body appears in `text`.
fn assert_no_key(text: &str, keys: &[String], what: &str) {
    for key in keys {
        for line in key.lines().filter(|l| !l.starts_with("-----") && l.len() >= 40) {
            assert!(!text.contains(line), "{what} contains private key bytes");
        }
    }
    assert!(!text.contains("PRIVATE KEY"), "{what} contains a PEM private key");
}

/// Everything certwire shows: its log, status, metrics.
async fn all_output(certwire: &Certwire) -> String {
    let mut out = std::fs::read_to_string(certwire.log_path()).unwrap_or_default();
    for path in ["/status/secrets", "/status/proxies", "/metrics", "/readyz"] {
        out.push_str(&certwire.get(path).await.body);
    }
    out
}

/// A stream for each identity, over mutual TLS: A is served its names and nothing of
/// B's, on the same connection as the names it may read; an Envoy whose certificate
/// comes from another CA, and a client with none, are refused at the handshake.
#[tokio::test]
async fn each_proxy_gets_only_what_its_identity_may_read() {
    let dir = util::tempdir();
    let pki = Pki::new(dir.path());
    let mut secrets = Secrets::new(dir.path(), &["app-a", "app-b", "shared"]);
    let config = write_config(
        dir.path(),
        &format!(
            "[[authz.rules]]\nidentities = [\"{ID_A}\"]\nsecrets = [\"app-a\", \"shared\"]\n\
             [[authz.rules]]\nidentities = [\"spiffe://e2e.test/ns/b/*\"]\nsecrets = [\"app-b\"]\n"
        ),
    );
    let mut args = vec!["--listen".into(), "127.0.0.1:0".into(), "--files".into(), secrets.root.display().to_string()];
    args.extend(["--config".into(), config]);
    args.extend(pki.serve_args());
    let certwire = Certwire::serve(args).await;
    let sds = certwire.sds_addr();

    let clients = dir.path().join("clients");
    let leaf_a = pki.client_ca.issue(&LeafSpec::spiffe(ID_A));
    let dir_a = pki.client_dir(&clients, "a", &leaf_a);
    let envoy_a = Envoy::start(
        &SdsBootstrap::new("app-a", SdsTarget::Tcp(sds), 0)
            .node("envoy-a", "e2e")
            .initial_fetch_timeout(WARMING)
            .listener("app-b")
            .listener("shared")
            .upstream_tls(dir_a.path(), SERVER_NAME)
            .to_yaml(),
    )
    .await;
    let [pa, pb, ps] = ["app-a", "app-b", "shared"].map(|secret| envoy_a.listener_addr(secret));
    wait_served_serial(pa, "app-a.test", &secrets.leaf("app-a").serial_hex, WAIT).await;
    wait_served_serial(ps, "shared.test", &secrets.leaf("shared").serial_hex, WAIT).await;
    never_served(pb, "app-b.test").await;

    let denied = name_status(&certwire, ID_A, "app-b").await.expect("A's app-b stream in /status/proxies");
    assert!(denied["denied"].as_str().is_some_and(|d| d.contains("no authz rule")), "{denied}");
    assert!(name_status(&certwire, ID_A, "app-a").await.unwrap()["denied"].is_null());
    let a_streams = streams_of(&certwire, ID_A).await;
    assert_eq!(a_streams.len(), 3, "one stream per secret, all with A's identity: {a_streams:?}");
    assert!(a_streams.iter().all(|s| s["node_id"] == "envoy-a"));
    wait_metric(&certwire, "certwire_authz_denials_total", &[("reason", "policy")]).await;

    // A's allowed names keep rotating beside the denied one.
    let next = secrets.rotate("app-a");
    wait_served_serial(pa, "app-a.test", &next.serial_hex, WAIT).await;
    let next_b = secrets.rotate("app-b");
    never_served(pb, "app-b.test").await;

    // B, with its own identity, gets app-b and not app-a.
    let leaf_b = pki.client_ca.issue(&LeafSpec::spiffe(ID_B));
    let dir_b = pki.client_dir(&clients, "b", &leaf_b);
    let envoy_b = Envoy::start(
        &SdsBootstrap::new("app-b", SdsTarget::Tcp(sds), 0)
            .node("envoy-b", "e2e")
            .initial_fetch_timeout(WARMING)
            .listener("app-a")
            .upstream_tls(dir_b.path(), SERVER_NAME)
            .to_yaml(),
    )
    .await;
    let [qb, qa] = ["app-b", "app-a"].map(|secret| envoy_b.listener_addr(secret));
    wait_served_serial(qb, "app-b.test", &next_b.serial_hex, WAIT).await;
    never_served(qa, "app-a.test").await;

    // An Envoy whose client certificate another CA issued: refused at the handshake.
    let rogue_ca = Ca::new("not the client CA");
    let rogue = rogue_ca.issue(&LeafSpec::spiffe(ID_A));
    let dir_rogue = pki.client_dir(&clients, "rogue", &rogue);
    let envoy_rogue = Envoy::start(
        &SdsBootstrap::new("app-a", SdsTarget::Tcp(sds), 0)
            .node("envoy-rogue", "e2e")
            .initial_fetch_timeout(WARMING)
            .upstream_tls(dir_rogue.path(), SERVER_NAME)
            .to_yaml(),
    )
    .await;
    let pr = envoy_rogue.listener_addr("app-a");
    wait_metric(&certwire, "certwire_tls_handshake_failures_total", &[("reason", "bad_client_certificate")]).await;
    never_served(pr, "app-a.test").await;
    assert!(
        !certwire.get_json("/status/proxies").await.to_string().contains("envoy-rogue"),
        "the rogue proxy never got a stream"
    );
    // A client without a certificate, and one speaking plaintext HTTP/2.
    let err = sds_handshake(sds, None).await.expect_err("no client certificate");
    assert!(format!("{err:#}").contains("refused") || format!("{err:#}").contains("alert"), "{err:#}");
    wait_metric(&certwire, "certwire_tls_handshake_failures_total", &[("reason", "no_client_certificate")]).await;
    let served = sds_handshake(sds, Some(&leaf_a)).await.expect("A's certificate is accepted");
    assert_eq!(served.serial_hex, pki.server.serial_hex);

    let mut keys = secrets.key_pems();
    keys.extend([pki.server.key_pem.clone(), leaf_a.key_pem.clone(), leaf_b.key_pem.clone(), rogue.key_pem.clone()]);
    assert_no_key(&all_output(&certwire).await, &keys, "certwire's log, status and metrics");
    drop(envoy_a);
}

/// certwire's server certificate and client CA rotate on disk while Envoy's streams
/// stay open: new handshakes see the new ones, the open stream keeps receiving pushes.
#[tokio::test]
async fn server_certificate_and_client_ca_rotate_under_open_streams() {
    let dir = util::tempdir();
    let mut pki = Pki::new(dir.path());
    let mut secrets = Secrets::new(dir.path(), &["app-a"]);
    // certwire re-reads its TLS files every second here (default 5 s).
    let config = dir.path().join("certwire.toml");
    std::fs::write(
        &config,
        format!(
            "[sds.tls]\nreload_every = \"1s\"\n[authz]\nmode = \"policy\"\n\
             [[authz.rules]]\nidentities = [\"{ID_A}\"]\nsecrets = [\"app-a\"]\n"
        ),
    )
    .unwrap();
    let mut args = vec!["--listen".into(), "127.0.0.1:0".into(), "--files".into(), secrets.root.display().to_string()];
    args.extend(["--config".into(), config.display().to_string()]);
    args.extend(pki.serve_args());
    let certwire = Certwire::serve(args).await;
    let sds = certwire.sds_addr();
    let leaf_a = pki.client_ca.issue(&LeafSpec::spiffe(ID_A));
    let dir_a = pki.client_dir(&dir.path().join("clients"), "a", &leaf_a);
    let envoy = Envoy::start(
        &SdsBootstrap::new("app-a", SdsTarget::Tcp(sds), 0).upstream_tls(dir_a.path(), SERVER_NAME).to_yaml(),
    )
    .await;
    let pa = envoy.listener_addr("app-a");
    wait_served_serial(pa, "app-a.test", &secrets.leaf("app-a").serial_hex, WAIT).await;
    let stream_ids = || async {
        let streams = streams_of(&certwire, ID_A).await;
        streams.iter().map(|s| s["stream_id"].as_u64().unwrap()).collect::<Vec<_>>()
    };
    let before = stream_ids().await;
    assert_eq!(before.len(), 1);

    // A new server certificate: the next handshake presents it.
    let server2 = pki.server_ca.server(SERVER_NAME);
    pki.tls.swap_tls(&server2, Some(pki.client_ca.cert_pem()));
    util::wait_for("a handshake with the new server certificate", WAIT, || async {
        sds_handshake(sds, Some(&leaf_a)).await.ok().filter(|s| s.serial_hex == server2.serial_hex)
    })
    .await;
    let next = secrets.rotate("app-a");
    wait_served_serial(pa, "app-a.test", &next.serial_hex, WAIT).await;
    assert_eq!(stream_ids().await, before, "the open stream was not dropped");

    // A new client CA: A's old certificate no longer opens a connection, one from the
    // new CA does, and A's open stream still gets pushes.
    let client_ca2 = Ca::new("e2e proxy client CA 2");
    pki.tls.swap_tls(&server2, Some(client_ca2.cert_pem()));
    util::wait_for("the old client CA to be refused", WAIT, || async {
        sds_handshake(sds, Some(&leaf_a)).await.err().map(|_| ())
    })
    .await;
    let new_client = client_ca2.issue(&LeafSpec::spiffe(ID_A));
    sds_handshake(sds, Some(&new_client)).await.expect("a certificate of the new client CA is accepted");
    let next = secrets.rotate("app-a");
    wait_served_serial(pa, "app-a.test", &next.serial_hex, WAIT).await;
    assert_eq!(stream_ids().await, before, "the open stream was not dropped");
    assert!(certwire.metric_sum("certwire_tls_reloads_total", &[("reason", "loaded")]).await >= 3.0);

    // A broken update (a key that does not match) is refused; the last good stays.
    let server3 = pki.server_ca.server(SERVER_NAME);
    let wrong_key = pki.server_ca.server(SERVER_NAME).key_pem;
    pki.tls.swap(&[
        ("tls.crt", server3.cert_pem.as_bytes()),
        ("tls.key", wrong_key.as_bytes()),
        ("ca.crt", client_ca2.cert_pem().as_bytes()),
    ]);
    wait_metric(&certwire, "certwire_tls_reloads_total", &[("reason", "refused")]).await;
    let served = sds_handshake(sds, Some(&new_client)).await.expect("still serving");
    assert_eq!(served.serial_hex, server2.serial_hex);
    let log = std::fs::read_to_string(certwire.log_path()).unwrap();
    assert!(log.contains("does not match"), "the log says why the reload was refused");
}

/// Over a Unix socket the kernel names the peer: a rule on its uid decides.
#[tokio::test]
async fn a_unix_socket_peer_is_authorized_by_its_uid() {
    let dir = util::tempdir();
    let secrets = Secrets::new(dir.path(), &["app-a", "app-b"]);
    // SAFETY: getuid(2) cannot fail.
    let uid = unsafe { libc::getuid() };
    let config =
        write_config(dir.path(), &format!("[[authz.rules]]\nidentities = [\"uid:{uid}\"]\nsecrets = [\"app-a\"]\n"));
    let socket = dir.path().join("sds.sock");
    let certwire = Certwire::serve([
        "--listen".to_string(),
        format!("unix:{}", socket.display()),
        "--files".into(),
        secrets.root.display().to_string(),
        "--config".into(),
        config,
    ])
    .await;
    let envoy = Envoy::start(
        &SdsBootstrap::new("app-a", SdsTarget::Unix(socket), 0)
            .initial_fetch_timeout(WARMING)
            .listener("app-b")
            .to_yaml(),
    )
    .await;
    let [pa, pb] = ["app-a", "app-b"].map(|secret| envoy.listener_addr(secret));
    wait_served_serial(pa, "app-a.test", &secrets.leaf("app-a").serial_hex, WAIT).await;
    never_served(pb, "app-b.test").await;
    let proxies = certwire.get_json("/status/proxies").await;
    let identity = proxies[0]["identity"].as_str().unwrap().to_owned();
    assert!(identity.starts_with(&format!("unix:uid={uid},")), "{identity}");
    assert!(name_status(&certwire, &identity, "app-b").await.unwrap()["denied"].is_string());
}

/// An address other machines can reach is refused without mTLS, with a message that
/// says how to set it up; the dev default on loopback needs nothing.
#[tokio::test]
async fn an_exposed_listener_without_mtls_is_refused() {
    let output = std::process::Command::new(certwire::certwire_bin())
        .args(["serve", "--listen", "0.0.0.0:0", "--admin", "127.0.0.1:0"])
        .env_remove("CERTWIRE_CONFIG")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for needle in ["refusing", "0.0.0.0", "--tls-client-ca", "certwire certgen", "--insecure-open-sds"] {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

/// `--insecure-open-sds` is the explicit way out, and it is said out loud.
#[tokio::test]
async fn insecure_open_sds_is_allowed_and_warned_about() {
    let certwire = Certwire::serve(["--listen", "0.0.0.0:0", "--insecure-open-sds"]).await;
    util::wait_for("the warning in certwire's log", WAIT, || async {
        let log = std::fs::read_to_string(certwire.log_path()).unwrap_or_default();
        log.lines().any(|l| l.contains("WARN") && l.contains("--insecure-open-sds")).then_some(())
    })
    .await;
}

/// `kubernetes` mode against an API server (the emulator, driven by the real kubectl):
/// a proxy reads the Secrets of its own namespace once a SubjectAccessReview says its
/// service account may list them, never another namespace's; a deleted RoleBinding
/// stops further pushes within the TTL; reviews are cached, not asked per stream.
#[tokio::test]
async fn kubernetes_mode_follows_rbac_through_subject_access_reviews() {
    const ID: &str = "spiffe://cluster.local/ns/edge/sa/envoy";
    let dir = util::tempdir();
    let api = KubeApi::start().await;
    let kubeconfig = api.kubeconfig(dir.path());
    let kubectl = |args: Vec<String>| {
        let kubeconfig = kubeconfig.clone();
        async move { kubeapi::kubectl_ok(&kubeconfig, &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let args = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    kubectl(args("create namespace edge")).await;
    kubectl(args("create namespace other")).await;
    let ca = Ca::new("e2e served CA");
    let apply = |ns: &'static str, name: &'static str, leaf: &Issued| {
        let path = dir.path().join(format!("{ns}-{name}.json"));
        std::fs::write(&path, kubeapi::tls_secret(ns, name, &leaf.cert_pem, &leaf.key_pem).to_string()).unwrap();
        kubectl(vec!["apply".into(), "-f".into(), path.display().to_string()])
    };
    let web = ca.server("web.test");
    apply("edge", "web", &web).await;
    apply("other", "web", &ca.server("other.test")).await;

    let pki = Pki::new(dir.path());
    let config = dir.path().join("certwire.toml");
    std::fs::write(&config, "[authz]\nmode = \"kubernetes\"\nallow_ttl = \"2s\"\ndeny_ttl = \"1s\"\n").unwrap();
    let mut serve =
        vec!["--listen".into(), "127.0.0.1:0".into(), "--kubeconfig".into(), kubeconfig.display().to_string()];
    serve.extend(args("--namespace edge --namespace other --default-namespace edge --config"));
    serve.push(config.display().to_string());
    serve.extend(pki.serve_args());
    let certwire = Certwire::serve(serve).await;

    let leaf = pki.client_ca.issue(&LeafSpec::spiffe(ID));
    let client = pki.client_dir(&dir.path().join("clients"), "envoy", &leaf);
    let envoy = Envoy::start(
        &SdsBootstrap::new("kubernetes://edge/web", SdsTarget::Tcp(certwire.sds_addr()), 0)
            .delta()
            .initial_fetch_timeout(WARMING)
            .listener("kubernetes://other/web")
            .upstream_tls(client.path(), SERVER_NAME)
            .to_yaml(),
    )
    .await;
    let [pa, pb] = ["kubernetes://edge/web", "kubernetes://other/web"].map(|secret| envoy.listener_addr(secret));

    // No RoleBinding yet: denied by the review.
    util::wait_for("a denial by SubjectAccessReview", WAIT, || async {
        let s = name_status(&certwire, ID, "kubernetes://edge/web").await?;
        s["denied"].as_str().filter(|d| d.contains("SubjectAccessReview")).map(|_| ())
    })
    .await;
    never_served(pa, "web.test").await;

    kubectl(args("create role read-secrets --verb=list --resource=secrets -n edge")).await;
    kubectl(args("create rolebinding envoy-reads --role=read-secrets --serviceaccount=edge:envoy -n edge")).await;
    wait_served_serial(pa, "web.test", &web.serial_hex, WAIT).await;
    let next = ca.server("web.test");
    apply("edge", "web", &next).await;
    wait_served_serial(pa, "web.test", &next.serial_hex, WAIT).await;

    // Another namespace: never, whatever RBAC says there.
    kubectl(args("create role read-secrets --verb=list --resource=secrets -n other")).await;
    kubectl(args("create rolebinding envoy-reads --role=read-secrets --serviceaccount=edge:envoy -n other")).await;
    never_served(pb, "other.test").await;
    let other = name_status(&certwire, ID, "kubernetes://other/web").await.unwrap();
    assert!(other["denied"].as_str().unwrap().contains("namespace"), "{other}");

    // Revoked: within the TTL the name is denied and a new version is not pushed.
    kubectl(args("delete rolebinding envoy-reads -n edge")).await;
    util::wait_for("the revocation", WAIT, || async {
        let s = name_status(&certwire, ID, "kubernetes://edge/web").await?;
        s["denied"].as_str().map(|_| ())
    })
    .await;
    let after = ca.server("web.test");
    apply("edge", "web", &after).await;
    tls::keeps_serving(pa, "web.test", None, &next.serial_hex, HOLD).await;
    wait_metric(&certwire, "certwire_authz_denials_total", &[("reason", "review")]).await;
    wait_metric(&certwire, "certwire_authz_denials_total", &[("reason", "namespace")]).await;

    // One service account, a few reviews: cached, asked again per TTL, not per stream.
    let reviews = api.requests_matching(|r| r.is_create_of("subjectaccessreviews"));
    assert!(reviews >= 3, "{reviews} reviews");
    let answered = api.access_reviews();
    assert!(answered.iter().all(|r| r["spec"]["user"] == "system:serviceaccount:edge:envoy"));
    assert!(answered.iter().all(|r| r["spec"]["resourceAttributes"]["namespace"] == "edge"));
    assert!(answered.iter().any(|r| r["status"]["allowed"] == true));
}

/// certwire's own certificate and client CA can come from its store like any secret
/// (here from the files source; from Kubernetes or ACME alike): a rotation there is
/// the next handshake's certificate.
#[tokio::test]
async fn the_listener_certificate_can_come_from_the_store() {
    let dir = util::tempdir();
    let server_ca = Ca::new("e2e certwire server CA");
    let client_ca = Ca::new("e2e proxy client CA");
    let root = dir.path().join("secrets");
    let first = server_ca.server(SERVER_NAME);
    let mut own = SecretDir::create_tls(&root, "certwire-tls", &first, Some(client_ca.cert_pem()));
    let config = write_config(dir.path(), "[[authz.rules]]\nidentities = [\"*\"]\nsecrets = [\"app-*\"]\n");
    let certwire = Certwire::serve([
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--files".into(),
        root.display().to_string(),
        "--config".into(),
        config,
        "--tls-cert-secret".into(),
        "certwire-tls".into(),
        "--tls-client-ca-secret".into(),
        "certwire-tls-cacert".into(),
    ])
    .await;
    let sds = certwire.sds_addr();
    let client = client_ca.issue(&LeafSpec::spiffe(ID_A));
    let served = sds_handshake(sds, Some(&client)).await.expect("TLS from the stored secret");
    assert_eq!(served.serial_hex, first.serial_hex);
    let second = server_ca.server(SERVER_NAME);
    own.swap_tls(&second, Some(client_ca.cert_pem()));
    util::wait_for("the rotated certificate on a new handshake", WAIT, || async {
        sds_handshake(sds, Some(&client)).await.ok().filter(|s| s.serial_hex == second.serial_hex)
    })
    .await;
    assert!(sds_handshake(sds, None).await.is_err(), "client certificates are required");
    let reloads = certwire.metric_sum("certwire_tls_reloads_total", &[("reason", "loaded")]).await;
    assert!(reloads >= 2.0, "{reloads}");
}

/// `certwire certgen` output used as is: certwire serves with its server directory,
/// Envoy runs `certwire bootstrap --sds-tls-dir` on its client directory; after a
/// re-run (every leaf rotated) and a restart of certwire, Envoy reconnects with its
/// new certificate to certwire's new one.
#[tokio::test]
async fn certgen_output_is_used_as_is_by_envoy_and_certwire() {
    const ID: &str = "spiffe://cluster.local/ns/edge/sa/envoy";
    let dir = util::tempdir();
    let pki = dir.path().join("pki");
    let certgen = || certwire::run(&["certgen", "--out", pki.to_str().unwrap(), "--client", ID]);
    certgen();
    let server = pki.join("server");
    let client = pki.join("clients").join("edge.envoy");
    let config = dir.path().join("certwire.toml");
    std::fs::write(
        &config,
        format!(
            "[sds.tls]\nreload_every = \"1s\"\n[authz]\nmode = \"policy\"\n\
             [[authz.rules]]\nidentities = [\"{ID}\"]\nsecrets = [\"localhost\"]\n"
        ),
    )
    .unwrap();
    let f = |d: &Path, n: &str| d.join(n).display().to_string();
    let mut certwire = Certwire::serve([
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--config".into(),
        config.display().to_string(),
        "--tls-cert".into(),
        f(&server, "tls.crt"),
        "--tls-key".into(),
        f(&server, "tls.key"),
        "--tls-client-ca".into(),
        f(&server, "ca.crt"),
    ])
    .await;
    // certwire's restart below binds the same port again (see `Certwire::start`): the
    // bootstrap names it.
    let yaml = certwire::run(&[
        "bootstrap",
        "--sds",
        &certwire.sds_addr().to_string(),
        "--sds-tls-dir",
        client.to_str().unwrap(),
        "--secret",
        "localhost",
        "--listen-address",
        "127.0.0.1",
        "--listen-port",
        "0",
        "--admin-port",
        "0",
    ]);
    let envoy = Envoy::start(&yaml).await;
    let tls_addr = envoy.listener_addr("https");
    let first = tls::wait_served(tls_addr, "localhost", None).await;
    assert_eq!(streams_of(&certwire, ID).await.len(), 1, "Envoy is known by its SPIFFE ID");

    certgen();
    util::wait_for("certwire to load its re-issued certificate", WAIT, || async {
        let n = certwire.metric_sum("certwire_tls_reloads_total", &[("reason", "loaded")]).await;
        (n >= 2.0).then_some(())
    })
    .await;
    // A new dev CA on restart: a new certificate once Envoy is back on a new connection.
    certwire.restart().await;
    util::wait_for("Envoy to reconnect with its new certificate", WAIT, || async {
        let served = handshake(tls_addr, "localhost", None).await.ok()?;
        (served.serial_hex != first.serial_hex).then_some(())
    })
    .await;
    assert_eq!(streams_of(&certwire, ID).await.len(), 1);
    drop(envoy);
}
