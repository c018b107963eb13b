//! A Kubernetes API server emulator for tests: the real wire protocol over plain HTTP
//! on 127.0.0.1, enough for kube-rs (watcher, reflector, events, leases) and for the
//! real `kubectl` (discovery, server-side printing, create/apply/label/delete/watch).
//!
//! In memory: one global resourceVersion, a bounded write history (watch resumption,
//! paginated lists, 410 Expired after [`KubeApi::compact`]), bookmarks, selectors,
//! merge/strategic/JSON/apply patches, optimistic concurrency, protobuf request bodies
//! for the kinds kubectl's typed `create` commands send.
//!
//! One custom resource, the Gateway API's ReferenceGrant (v1beta1), served like the
//! built-in kinds while its CRD counts as installed: `Config::crds_installed` (the
//! default) or [`KubeApi::install_crds`]; before that its URLs answer 404 and
//! discovery leaves it out, as on a cluster without the Gateway API CRDs.
//!
//! RBAC as an authorizer, not as a gate: Roles, ClusterRoles, RoleBindings and
//! ClusterRoleBindings are stored (validated as upstream does) and
//! `POST /apis/authorization.k8s.io/v1/subjectaccessreviews` answers from them with
//! upstream's rules and reason text, reading them afresh for every review. The groups of
//! a review are those in its `spec.groups` only, as upstream: a service account's
//! implicit groups come from authentication, which is not emulated. Also not emulated:
//! authentication (every request is served, as if by cluster-admin), the escalation
//! check on RBAC writes, ClusterRole aggregation, the bootstrap roles and bindings of a
//! new cluster, the other authorization reviews (local, self, rules). Nor admission
//! webhooks, protobuf or YAML responses, YAML request bodies, subresources, field
//! ownership of server-side apply, graceful deletion and finalizers.
//!
//! ```ignore
//! let api = KubeApi::start().await;
//! let kubeconfig = api.kubeconfig(dir.path());
//! api.put_object(kubeapi::tls_secret("default", "app", &cert_pem, &key_pem));
//! // ... run certwire with --kubeconfig, kubectl with kubeapi::kubectl(&kubeconfig) ...
//! api.compact();        // the next resume from an older version gets 410 Expired
//! api.drop_watches();   // every watch connection is cut, as when the server restarts
//!
//! // Grant, then count what certwire asked:
//! kubeapi::kubectl_ok(&kubeconfig, &["create", "role", "read", "--verb=get", "--resource=secrets", "-n", "edge"]).await;
//! kubeapi::kubectl_ok(&kubeconfig, &["create", "rolebinding", "read", "--role=read",
//!     "--serviceaccount=edge:envoy", "-n", "edge"]).await;
//! let asked = api.requests_matching(|r| r.is_create_of("subjectaccessreviews"));
//! api.fail_reviews(true); // every review is answered 500 until set back
//! ```

mod authorizer;
mod b64;
mod control;
mod convert;
mod discovery;
mod media;
mod objects;
mod patch;
mod proto;
mod rbac;
mod resources;
mod review;
mod routes;
mod selectors;
mod server;
mod status;
mod store;
mod table;
mod verbs;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

pub use control::{Config, RequestRecord};

use control::Shared;
use server::Server;
use status::ApiError;
use store::Filter;
use verbs::{Target, WriteOptions};

/// A running emulator; it serves until dropped.
pub struct KubeApi {
    shared: Arc<Shared>,
    server: Server,
}

impl KubeApi {
    /// Starts on a free port of 127.0.0.1 with the default [`Config`].
    pub async fn start() -> KubeApi {
        KubeApi::start_with(Config::default()).await
    }

    pub async fn start_with(config: Config) -> KubeApi {
        let mut shared = None;
        let server = Server::start(|port| {
            let state = Arc::new(Shared::new(config, port));
            shared = Some(state.clone());
            routes::router(state)
        })
        .expect("start the API server emulator");
        let shared = shared.expect("start built the router");
        let api = KubeApi { shared, server };
        for namespace in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            api.create_namespace(namespace);
        }
        api
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.server.port()))
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Writes `DIR/kubeconfig` pointing at the emulator (context `emulator`, namespace
    /// `default`, no credentials) and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {url}\n\
             contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n\
             \x20   namespace: default\ncurrent-context: emulator\nusers:\n- name: emulator\n  user: {{}}\n\
             preferences: {{}}\n",
            url = self.url()
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Every resourceVersion before the current one becomes expired: a watch resuming
    /// from one gets an ERROR 410 event, a list continuing from one a 410 response.
    pub fn compact(&self) {
        self.shared.store.compact();
    }

    /// Aborts every open watch connection (no clean end of the chunked body), as when
    /// the API server restarts. Watches opened afterwards are unaffected.
    pub fn drop_watches(&self) {
        self.shared.drop_watches();
    }

    /// Installs the CRDs of the custom resources (see [`Config::crds_installed`]): from
    /// now on they are served and in discovery.
    pub fn install_crds(&self) {
        self.shared.install_crds();
    }

    /// While set, every request is answered 503 ServiceUnavailable (open watches go on).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.set_unavailable(unavailable);
    }

    /// Closes the listening socket and every connection: connections are refused until
    /// [`KubeApi::resume_listening`]. Models an API server that is down or unreachable.
    pub fn stop_listening(&self) {
        self.server.stop_listening();
    }

    /// Listens again on the same port.
    pub fn resume_listening(&self) {
        self.server.resume_listening().expect("listen again on the same port");
    }

    /// The next `count` requests are answered 500 InternalError.
    pub fn fail_next(&self, count: usize) {
        self.shared.fail_next(count, None);
    }

    /// The next `count` requests whose `METHOD path?query` contains `needle` are
    /// answered 500, e.g. `fail_next_matching(1, "watch=")` fails one watch.
    pub fn fail_next_matching(&self, count: usize, needle: &str) {
        self.shared.fail_next(count, Some(needle));
    }

    /// Every request so far, in arrival order.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.shared.request_log()
    }

    /// Empties the request log and the list of [`KubeApi::access_reviews`].
    pub fn clear_request_log(&self) {
        self.shared.clear_request_log();
    }

    /// How many logged requests `matches`, e.g. `api.requests_matching(|r|
    /// r.is_create_of("subjectaccessreviews"))` counts SubjectAccessReviews asked,
    /// failed ones included.
    pub fn requests_matching(&self, matches: impl Fn(&RequestRecord) -> bool) -> usize {
        self.shared.request_log().iter().filter(|r| matches(r)).count()
    }

    /// Every SubjectAccessReview answered so far (not those failed on purpose), in
    /// order: the review as sent plus `status.allowed` and `status.reason`.
    pub fn access_reviews(&self) -> Vec<Value> {
        self.shared.reviews()
    }

    /// While set, every SubjectAccessReview is answered 500 InternalError (the request is
    /// still logged). `fail_next_matching(n, "subjectaccessreviews")` fails just `n`.
    pub fn fail_reviews(&self, fail: bool) {
        self.shared.set_fail_reviews(fail);
    }

    /// Watch responses currently streaming.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches()
    }

    /// Watchers cut off so far for falling too far behind (each got a 410 ERROR).
    pub fn slow_watches_cut_off(&self) -> usize {
        self.shared.store.cut_off_count()
    }

    /// Waits until at least `count` watches are open; panics after `timeout`.
    pub async fn wait_for_watches(&self, count: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.open_watches() < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {count} open watches (have {}); requests: {:#?}",
                self.open_watches(),
                self.request_log().iter().map(ToString::to_string).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.current_rv()
    }

    fn def(api_version: &str, kind: &str) -> &'static resources::ResourceDef {
        resources::by_kind(api_version, kind)
            .unwrap_or_else(|| panic!("the emulator serves no {kind} in {api_version}"))
    }

    /// Creates or replaces an object (resource from its `apiVersion` and `kind`), as a
    /// write through the API would: watchers see ADDED or MODIFIED. A missing namespace
    /// is created first. Returns the stored object; panics when the API would refuse it.
    pub fn put_object(&self, object: Value) -> Value {
        let api_version = object.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
        let def = Self::def(&api_version, &kind);
        let namespace = objects::namespace_of(&object).to_string();
        let name = objects::name_of(&object).to_string();
        if def.namespaced && !namespace.is_empty() {
            self.create_namespace(&namespace);
        }
        let target = Target { def, namespace: &namespace };
        let mut object = object;
        objects::metadata_mut(&mut object).remove("resourceVersion");
        let written = match verbs::get(&self.shared.store, target, &name) {
            Ok(_) => verbs::update(&self.shared.store, target, &name, object, &WriteOptions::default()).map(|(o, _)| o),
            Err(_) => verbs::create(&self.shared.store, target, object, &WriteOptions::default()),
        };
        written.unwrap_or_else(|e: ApiError| panic!("put_object {kind} {namespace}/{name}: {}", e.message))
    }

    /// The object as the API would return it, if it exists. `namespace` is ignored for
    /// cluster-scoped kinds.
    pub fn get_object(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        verbs::get(&self.shared.store, Target { def: Self::def(api_version, kind), namespace }, name).ok()
    }

    /// Deletes the object (watchers see DELETED); returns whether it existed.
    pub fn delete_object(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let target = Target { def: Self::def(api_version, kind), namespace };
        verbs::delete(&self.shared.store, target, name, &verbs::DeleteOptions::default()).is_ok()
    }

    /// Every object of a kind, in all namespaces (`None`) or one.
    pub fn list_objects(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        let def = Self::def(api_version, kind);
        let filter = Filter { namespace: namespace.map(String::from), ..Filter::all(def) };
        let page = self.shared.store.list(&filter, store::ListAt::Latest, None, None);
        page.map(|p| p.items.iter().map(|o| (**o).clone()).collect()).unwrap_or_default()
    }

    /// Every Event, however it was written (core `v1` or `events.k8s.io/v1`), in the
    /// `events.k8s.io/v1` form kube-rs' recorder writes: `regarding`, `note`, `reason`.
    pub fn events(&self) -> Vec<Value> {
        self.list_objects("events.k8s.io/v1", "Event", None)
    }

    /// Creates a namespace unless it exists.
    pub fn create_namespace(&self, name: &str) {
        let def = resources::namespaces();
        let target = Target { def, namespace: "" };
        if verbs::get(&self.shared.store, target, name).is_ok() {
            return;
        }
        let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        verbs::create(&self.shared.store, target, body, &WriteOptions::default())
            .unwrap_or_else(|e| panic!("create namespace {name}: {}", e.message));
    }
}

/// A ReferenceGrant (gateway.networking.k8s.io/v1beta1) in `namespace` letting the
/// Gateways of `from_namespace` reference the Secret `secret` (every Secret when `None`).
pub fn reference_grant(namespace: &str, name: &str, from_namespace: &str, secret: Option<&str>) -> Value {
    let mut to = json!({"group": "", "kind": "Secret"});
    if let Some(secret) = secret {
        to["name"] = json!(secret);
    }
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": from_namespace}],
            "to": [to],
        },
    })
}

/// A `kubernetes.io/tls` Secret with `tls.crt` and `tls.key` (and `ca.crt` when given).
pub fn tls_secret(namespace: &str, name: &str, cert_pem: &str, key_pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64::encode(cert_pem.as_bytes()), "tls.key": b64::encode(key_pem.as_bytes())},
    })
}

/// Adds `key` (base64-encoded here) to a Secret built by [`tls_secret`] or by hand.
pub fn with_secret_data(mut secret: Value, key: &str, value: &[u8]) -> Value {
    secret["data"][key] = json!(b64::encode(value));
    secret
}

/// The decoded value of a Secret's `data[key]`.
pub fn secret_data(secret: &Value, key: &str) -> Option<Vec<u8>> {
    secret.get("data")?.get(key)?.as_str().and_then(|text| b64::decode(text).ok())
}

/// `kubectl --kubeconfig KUBECONFIG --cache-dir DIR/kubectl-cache`: the discovery
/// cache stays with the test instead of in `$HOME`.
pub fn kubectl(kubeconfig: &Path) -> tokio::process::Command {
    let cache = kubeconfig.parent().unwrap_or(Path::new(".")).join("kubectl-cache");
    let mut command = tokio::process::Command::new("kubectl");
    command.arg("--kubeconfig").arg(kubeconfig).arg("--cache-dir").arg(cache);
    command.kill_on_drop(true);
    command
}

/// Runs `kubectl ARGS` against `kubeconfig`; panics with its output unless it succeeds.
/// Returns stdout.
pub async fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> String {
    let output = kubectl(kubeconfig).args(args).output().await.expect("run kubectl");
    assert!(
        output.status.success(),
        "kubectl {} failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kubectl prints UTF-8")
}
