//! End to end: Gateway API names. A real Envoy with a gateway's identity (a client
//! certificate with a SPIFFE ID) asks certwire for `kubernetes-gateway://NS/NAME`, the
//! name istiod gives a Gateway's certificateRef; certwire serves the Secret NS/NAME
//! from the API server emulator (driven by the real kubectl) where the Gateway API
//! allows it: same namespace, or a ReferenceGrant in NS. Grants come and go with
//! `kubectl apply` / `kubectl delete` while Envoy's stream stays open; without the
//! Gateway API CRDs certwire stays up and ready, says why, and picks them up once
//! installed. Checked where a user sees it: real TLS handshakes on Envoy's listeners,
//! certwire's /status/proxies, /metrics and /readyz.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::bootstrap::{SdsBootstrap, SdsTarget};
use common::certwire::Certwire;
use common::envoy::Envoy;
use common::files::SecretDir;
use common::kubeapi::{self, Config, KubeApi};
use common::pki::{Ca, Issued, LeafSpec};
use common::tls::{self, handshake, wait_served_serial};
use common::util::{self, WAIT};
use serde_json::Value;
use tempfile::TempDir;

/// The DNS name on certwire's server certificate, which Envoy checks.
const SERVER_NAME: &str = "certwire.test";
/// The gateway: its namespace and service account, and its SPIFFE ID.
const GW_NS: &str = "gw";
const GATEWAY: &str = "spiffe://cluster.local/ns/gw/sa/gateway";
/// The Secret in another namespace, and the name a Gateway of `gw` asks for it by.
const CERTS_NS: &str = "certs";
const WEB: &str = "kubernetes-gateway://certs/web";
/// A Secret of the gateway's own namespace.
const LOCAL: &str = "kubernetes-gateway://gw/local";
/// A listener whose name is denied waits this long before going live without it.
const WARMING: Duration = Duration::from_secs(2);
/// How long "not served" / "not pushed" is watched.
const HOLD: Duration = Duration::from_secs(2);

/// The ReferenceGrant of README.md ("Gateway API"), as a user copies it: Gateways of
/// `gw` may reference Secret `web` of `certs`.
fn readme_reference_grant() -> String {
    let readme = include_str!("../README.md");
    let block = readme
        .split("```yaml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or_default())
        .find(|block| block.contains("kind: ReferenceGrant"))
        .expect("README.md shows a ReferenceGrant");
    assert!(block.contains("namespace: certs") && block.contains("namespace: gw") && block.contains("name: web"));
    block.to_string()
}

/// An emulated cluster with namespaces `gw` and `certs`, the Secrets `certs/web` and
/// `gw/local`, and RBAC letting the gateway's service account list the Secrets of its
/// namespace (what `--authz kubernetes` asks with a SubjectAccessReview).
struct Cluster {
    api: KubeApi,
    kubeconfig: PathBuf,
    ca: Ca,
    dir: TempDir,
}

impl Cluster {
    async fn start(config: Config) -> Cluster {
        let api = KubeApi::start_with(config).await;
        let dir = util::tempdir();
        let kubeconfig = api.kubeconfig(dir.path());
        let cluster = Cluster { api, kubeconfig, ca: Ca::new("e2e gateway api CA"), dir };
        cluster.kubectl(&["create", "namespace", GW_NS]).await;
        cluster.kubectl(&["create", "namespace", CERTS_NS]).await;
        cluster.kubectl(&["create", "role", "read-secrets", "--verb=list", "--resource=secrets", "-n", GW_NS]).await;
        let binding = ["create", "rolebinding", "gateway-reads", "--role=read-secrets", "--serviceaccount=gw:gateway"];
        cluster.kubectl(&[&binding[..], &["-n", GW_NS]].concat()).await;
        cluster
    }

    async fn kubectl(&self, args: &[&str]) -> String {
        kubeapi::kubectl_ok(&self.kubeconfig, args).await
    }

    fn write(&self, file: &str, contents: &str) -> String {
        let path = self.dir.path().join(file);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.display().to_string()
    }

    /// `kubectl apply -f` of a `kubernetes.io/tls` Secret with a fresh certificate for
    /// `NAME.test`; returns it.
    async fn apply_tls(&self, ns: &str, name: &str) -> Issued {
        let leaf = self.ca.server(&format!("{name}.test"));
        let manifest = self.write(
            &format!("{ns}-{name}.json"),
            &kubeapi::tls_secret(ns, name, &leaf.cert_pem, &leaf.key_pem).to_string(),
        );
        self.kubectl(&["apply", "-f", &manifest]).await;
        leaf
    }

    /// `kubectl apply -f` of the README's ReferenceGrant.
    async fn grant(&self) {
        let manifest = self.write("grant.yaml", &readme_reference_grant());
        let out = self.kubectl(&["apply", "-f", &manifest]).await;
        assert!(out.contains("referencegrant.gateway.networking.k8s.io/gateways-in-gw"), "{out}");
    }

    async fn revoke(&self) {
        self.kubectl(&["delete", "referencegrant", "gateways-in-gw", "-n", CERTS_NS]).await;
    }
}

/// certwire over mutual TLS with `--authz kubernetes --gateway-api`, watching `gw` and
/// `certs`, and an Envoy with the gateway's client certificate asking for `names`
/// over Delta, one listener each.
struct Stack {
    certwire: Certwire,
    envoy: Envoy,
    _pki: TempDir,
}

impl Stack {
    async fn start(cluster: &Cluster, names: &[&str]) -> Stack {
        let pki = util::tempdir();
        let server_ca = Ca::new("e2e certwire server CA");
        let client_ca = Ca::new("e2e gateway client CA");
        let server = server_ca.server(SERVER_NAME);
        let own = SecretDir::create_tls(&pki.path().join("certwire"), "tls", &server, Some(client_ca.cert_pem()));
        let f = |n: &str| own.file(n).display().to_string();
        let kubeconfig = cluster.kubeconfig.display().to_string();
        let certwire = Certwire::serve([
            "--listen",
            "127.0.0.1:0",
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            GW_NS,
            "--namespace",
            CERTS_NS,
            "--gateway-api",
            "--authz",
            "kubernetes",
            "--tls-cert",
            &f("tls.crt"),
            "--tls-key",
            &f("tls.key"),
            "--tls-client-ca",
            &f("ca.crt"),
        ])
        .await;
        let leaf = client_ca.issue(&LeafSpec::spiffe(GATEWAY));
        let client = SecretDir::create_tls(&pki.path().join("clients"), "gateway", &leaf, Some(server_ca.cert_pem()));
        let mut bootstrap = SdsBootstrap::new(names[0], SdsTarget::Tcp(certwire.sds_addr()), 0)
            .delta()
            .node("gateway", "gw")
            .initial_fetch_timeout(WARMING)
            .upstream_tls(client.path(), SERVER_NAME);
        for name in &names[1..] {
            bootstrap = bootstrap.listener(name);
        }
        let envoy = Envoy::start(&bootstrap.to_yaml()).await;
        Stack { certwire, envoy, _pki: pki }
    }

    fn addr(&self, name: &str) -> SocketAddr {
        self.envoy.listener_addr(name)
    }

    /// The status of `name` on the gateway's streams.
    async fn name_status(&self, name: &str) -> Option<Value> {
        let all = self.certwire.get_json("/status/proxies").await;
        all.as_array()?
            .iter()
            .filter(|s| s["identity"] == GATEWAY)
            .flat_map(|s| s["secrets"].as_array().cloned().unwrap_or_default())
            .find(|n| n["name"] == name)
    }

    /// Waits until `name` is denied to the gateway with a reason containing `why`.
    async fn wait_denied(&self, name: &str, why: &str) -> Value {
        util::wait_for(&format!("{name} denied ({why})"), WAIT, || async {
            let status = self.name_status(name).await?;
            status["denied"].as_str().is_some_and(|d| d.contains(why)).then_some(status)
        })
        .await
    }

    async fn wait_metric(&self, metric: &str, labels: &[(&str, &str)]) {
        util::wait_for(&format!("{metric}{labels:?} >= 1"), WAIT, || async {
            (self.certwire.metric_sum(metric, labels).await >= 1.0).then_some(())
        })
        .await;
    }

    async fn readyz(&self) -> (u16, String) {
        let r = self.certwire.get("/readyz").await;
        (r.status, r.body)
    }
}

/// Holds for [`HOLD`] that `addr` completes no TLS handshake: its listener has nothing.
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

/// The gateway reads its own namespace's Secret without a grant, another namespace's
/// only while a ReferenceGrant allows it: denied, then served once `kubectl apply`
/// creates the grant (and its rotation pushed), then revoked by `kubectl delete`
/// (Delta: removed, nothing pushed since). kubernetes:// names keep Istio's rule.
#[tokio::test]
async fn a_reference_grant_lets_a_gateway_use_another_namespaces_secret_while_it_exists() {
    let cluster = Cluster::start(Config::default()).await;
    let local = cluster.apply_tls(GW_NS, "local").await;
    let web = cluster.apply_tls(CERTS_NS, "web").await;
    let stack = Stack::start(&cluster, &[WEB, LOCAL, "kubernetes://certs/web"]).await;
    let (web_addr, local_addr, plain_addr) = (stack.addr(WEB), stack.addr(LOCAL), stack.addr("kubernetes://certs/web"));

    // Same namespace: no grant needed.
    wait_served_serial(local_addr, "local.test", &local.serial_hex, WAIT).await;
    assert!(stack.name_status(LOCAL).await.unwrap()["denied"].is_null());
    // Another namespace, no ReferenceGrant: nothing, and status and metrics say why.
    let denied = stack.wait_denied(WEB, "no ReferenceGrant in namespace \"certs\"").await;
    assert!(denied["sent_version"].is_null(), "{denied}");
    never_served(web_addr, "web.test").await;
    stack.wait_metric("certwire_authz_denials_total", &[("reason", "reference_grant")]).await;

    // The README's ReferenceGrant: served at once on the open stream, with a real
    // handshake, under the name asked for; a rotation follows.
    cluster.grant().await;
    wait_served_serial(web_addr, "web.test", &web.serial_hex, WAIT).await;
    let served = stack.name_status(WEB).await.unwrap();
    assert!(served["denied"].is_null() && served["sent_version"].is_string(), "{served}");
    let rotated = cluster.apply_tls(CERTS_NS, "web").await;
    wait_served_serial(web_addr, "web.test", &rotated.serial_hex, WAIT).await;
    // The grant is for Gateway API names: kubernetes:// keeps Istio's own-namespace rule.
    never_served(plain_addr, "web.test").await;
    stack.wait_denied("kubernetes://certs/web", "namespace").await;

    // Deleted: denied again, Delta told of the removal, a new version not pushed.
    cluster.revoke().await;
    let revoked = stack.wait_denied(WEB, "no ReferenceGrant").await;
    util::wait_for("the removal sent to Envoy", WAIT, || async {
        stack.name_status(WEB).await.filter(|s| s["removed"] == true).map(|_| ())
    })
    .await;
    assert!(revoked["denied"].as_str().unwrap().contains("Gateways of namespace \"gw\""), "{revoked}");
    cluster.apply_tls(CERTS_NS, "web").await;
    tls::keeps_serving(web_addr, "web.test", None, &rotated.serial_hex, HOLD).await;
    // The gateway's own Secret was never disturbed.
    tls::keeps_serving(local_addr, "local.test", None, &local.serial_hex, Duration::from_millis(200)).await;

    // One SubjectAccessReview for the gateway's service account in its own namespace,
    // whatever namespace the Secret is in.
    let reviews = cluster.api.access_reviews();
    assert!(!reviews.is_empty());
    assert!(reviews.iter().all(|r| r["spec"]["user"] == "system:serviceaccount:gw:gateway"), "{reviews:?}");
    assert!(reviews.iter().all(|r| r["spec"]["resourceAttributes"]["namespace"] == GW_NS), "{reviews:?}");
    let (code, body) = stack.readyz().await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
}

/// Without the Gateway API CRDs, certwire runs and is ready, /readyz says why, the
/// same-namespace name is served and the other denied; once the CRDs are installed
/// and the grant applied, the other is served too, without a restart.
#[tokio::test]
async fn without_the_crds_certwire_is_ready_and_says_why_and_picks_them_up_later() {
    let cluster = Cluster::start(Config { crds_installed: false, ..Config::default() }).await;
    let local = cluster.apply_tls(GW_NS, "local").await;
    let web = cluster.apply_tls(CERTS_NS, "web").await;
    let mut stack = Stack::start(&cluster, &[WEB, LOCAL]).await;
    let (web_addr, local_addr) = (stack.addr(WEB), stack.addr(LOCAL));

    wait_served_serial(local_addr, "local.test", &local.serial_hex, WAIT).await;
    stack.wait_denied(WEB, "ReferenceGrants cannot be read").await;
    never_served(web_addr, "web.test").await;
    stack.wait_metric("certwire_authz_denials_total", &[("reason", "gateway_api")]).await;
    let (code, body) = stack.readyz().await;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ready, degraded:\n"), "{body}");
    for ns in [GW_NS, CERTS_NS] {
        let line = body.lines().find(|l| l.starts_with(&format!("kubernetes-referencegrants:{ns}: ")));
        let line = line.unwrap_or_else(|| panic!("no reason for {ns}: {body}"));
        assert!(line.contains("ReferenceGrant CRD") && line.contains("not installed"), "{line}");
    }
    assert!(stack.certwire.is_running(), "no crash");
    let log = std::fs::read_to_string(stack.certwire.log_path()).unwrap();
    assert!(log.contains("ReferenceGrants cannot be read"), "the log says why");

    // Installed later: kubectl learns the new kind (a fresh discovery cache), the
    // watch finds it on its next retry, and the grant takes effect.
    cluster.api.install_crds();
    std::fs::remove_dir_all(cluster.dir.path().join("kubectl-cache")).ok();
    cluster.grant().await;
    wait_served_serial(web_addr, "web.test", &web.serial_hex, WAIT).await;
    util::wait_for("/readyz without the reason", WAIT, || async {
        let (code, body) = stack.readyz().await;
        (code == 200 && body == "ready\n").then_some(())
    })
    .await;
    assert!(stack.certwire.is_running());
}
