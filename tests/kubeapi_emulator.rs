//! The Kubernetes API server emulator (tests/common/kubeapi) against the real kubectl
//! and against raw HTTP, the way kube-rs' watcher talks to it: paginated list, watch
//! from the list's resourceVersion with bookmarks, 410 Expired, dropped connections.

mod common;

use std::path::Path;
use std::time::Duration;

use common::kubeapi::{self, Config, KubeApi};
use common::pki::Ca;
use common::util::{self, WAIT};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec, SubjectAccessReviewStatus,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

/// Raw HTTP/1.1 against the emulator: requests, and watch streams read chunk by chunk.
mod wire {
    use std::net::SocketAddr;

    use serde_json::Value;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;

    pub struct Reply {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Reply {
        pub fn json(&self) -> Value {
            serde_json::from_slice(&self.body)
                .unwrap_or_else(|e| panic!("status {}: body is not JSON ({e}): {}", self.status, self.text()))
        }

        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }

        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    async fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, BufReader<TcpStream>) {
        let mut stream = TcpStream::connect(addr).await.expect("connect to the emulator");
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n", body.len());
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.expect("send request head");
        stream.write_all(body).await.expect("send request body");
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("status line");
        let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status code");
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).await.expect("header line");
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            let (name, value) = trimmed.split_once(':').expect("a header");
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        (status, headers, reader)
    }

    pub async fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let (status, headers, mut reader) = open(addr, method, path, headers, body).await;
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse().expect("numeric content-length"))
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await.expect("read body");
        Reply { status, headers, body }
    }

    pub async fn get(addr: SocketAddr, path: &str) -> Reply {
        call(addr, "GET", path, &[], b"").await
    }

    pub async fn send_json(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &Value) -> Reply {
        call(addr, method, path, &[("Content-Type", content_type)], body.to_string().as_bytes()).await
    }

    #[derive(Debug)]
    pub enum Next {
        Event(Value),
        /// The terminating chunk: the server ended the watch on purpose.
        End,
        /// The connection closed mid-body, as when the server goes away.
        Aborted,
    }

    pub struct Watch {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        reader: BufReader<TcpStream>,
        pending: Vec<u8>,
        ended: bool,
    }

    impl Watch {
        pub async fn open(addr: SocketAddr, path: &str) -> Watch {
            let (status, headers, reader) = open(addr, "GET", path, &[], b"").await;
            Watch { status, headers, reader, pending: Vec::new(), ended: false }
        }

        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }

        pub async fn next(&mut self) -> Next {
            loop {
                if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.pending.drain(..=end).collect();
                    return Next::Event(serde_json::from_slice(&line).expect("a JSON watch event"));
                }
                if self.ended {
                    return Next::End;
                }
                let mut size_line = String::new();
                match self.reader.read_line(&mut size_line).await {
                    Ok(0) | Err(_) => return Next::Aborted,
                    Ok(_) => {}
                }
                let size = usize::from_str_radix(size_line.trim(), 16).expect("a chunk size");
                let mut chunk = vec![0; size + 2];
                if self.reader.read_exact(&mut chunk).await.is_err() {
                    return Next::Aborted;
                }
                chunk.truncate(size);
                if size == 0 {
                    self.ended = true;
                }
                self.pending.extend_from_slice(&chunk);
            }
        }

        /// The next event, panicking on anything else or after `WAIT`.
        pub async fn event(&mut self) -> Value {
            match tokio::time::timeout(super::WAIT, self.next()).await {
                Ok(Next::Event(event)) => event,
                Ok(other) => panic!("expected a watch event, got {other:?}"),
                Err(_) => panic!("no watch event within {:?}", super::WAIT),
            }
        }

        /// The next event that is not a BOOKMARK.
        pub async fn change(&mut self) -> Value {
            loop {
                let event = self.event().await;
                if event["type"] != "BOOKMARK" {
                    return event;
                }
            }
        }

        pub async fn finish(&mut self) -> Next {
            tokio::time::timeout(super::WAIT, self.next()).await.expect("the watch to finish")
        }
    }
}

use wire::{Next, Watch};

fn secret(namespace: &str, name: &str, labels: Value, data: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "stringData": {"value": data},
    })
}

fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"].as_str().and_then(|rv| rv.parse().ok()).expect("a numeric resourceVersion")
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

async fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    kubeapi::kubectl_ok(kubeconfig, args).await
}

/// Words of each output line, to compare tables without caring about alignment.
fn table(text: &str) -> Vec<Vec<String>> {
    text.lines().map(|l| l.split_whitespace().map(String::from).collect()).collect()
}

#[tokio::test]
async fn kubectl_creates_reads_labels_and_deletes_a_tls_secret() {
    let api = KubeApi::start().await;
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    let ca = Ca::new("kubeapi test CA");
    let leaf = ca.server("app.test");
    std::fs::write(dir.path().join("tls.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &leaf.key_pem).unwrap();
    let (crt, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));

    let out = kubectl(
        &kubeconfig,
        &["create", "secret", "tls", "app", "--cert", crt.to_str().unwrap(), "--key", key.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.trim(), "secret/app created");

    let got: Value =
        serde_json::from_str(&kubectl(&kubeconfig, &["get", "secret", "app", "-o", "json"]).await).unwrap();
    assert_eq!(got["type"], "kubernetes.io/tls");
    assert_eq!(kubeapi::secret_data(&got, "tls.crt").unwrap(), leaf.cert_pem.as_bytes());
    assert_eq!(kubeapi::secret_data(&got, "tls.key").unwrap(), leaf.key_pem.as_bytes());
    assert!(!got["metadata"]["uid"].as_str().unwrap().is_empty());

    let rows = table(&kubectl(&kubeconfig, &["get", "secrets"]).await);
    assert_eq!(rows[0], ["NAME", "TYPE", "DATA", "AGE"]);
    assert_eq!(rows[1][..3], ["app", "kubernetes.io/tls", "2"]);

    kubectl(&kubeconfig, &["label", "secret", "app", "tier=edge"]).await;
    kubectl(&kubeconfig, &["annotate", "secret", "app", "owner=certwire"]).await;
    let stored = api.get_object("v1", "Secret", "default", "app").expect("the secret is stored");
    assert_eq!(stored["metadata"]["labels"]["tier"], "edge");
    assert_eq!(stored["metadata"]["annotations"]["owner"], "certwire");
    assert!(rv_of(&stored) > rv_of(&got), "each change is a new resourceVersion");
    let selected = table(&kubectl(&kubeconfig, &["get", "secrets", "-l", "tier=edge", "-o", "name"]).await);
    assert_eq!(selected, [["secret/app"]]);

    let out = kubectl(&kubeconfig, &["delete", "secret", "app"]).await;
    assert_eq!(out.trim(), "secret \"app\" deleted");
    assert!(api.get_object("v1", "Secret", "default", "app").is_none());

    let refused = kubeapi::kubectl(&kubeconfig).args(["get", "secret", "app"]).output().await.unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Error from server (NotFound): secrets \"app\" not found")
    );
}

#[tokio::test]
async fn kubectl_apply_creates_then_patches_and_skips_no_ops() {
    let api = KubeApi::start().await;
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    let manifest = dir.path().join("secret.yaml");
    let write = |cert: &str| {
        let text = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: applied\n  labels:\n    app: web\n\
             type: Opaque\nstringData:\n  cert: {cert}\n  key: k\n"
        );
        std::fs::write(&manifest, text).unwrap();
    };
    let path = manifest.to_str().unwrap();

    write("first");
    assert_eq!(kubectl(&kubeconfig, &["apply", "-f", path]).await.trim(), "secret/applied created");
    let created = api.get_object("v1", "Secret", "default", "applied").unwrap();
    assert_eq!(kubeapi::secret_data(&created, "cert").unwrap(), b"first");
    assert!(created["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"].is_string());

    write("second");
    assert_eq!(kubectl(&kubeconfig, &["apply", "-f", path]).await.trim(), "secret/applied configured");
    let patched = api.get_object("v1", "Secret", "default", "applied").unwrap();
    assert_eq!(kubeapi::secret_data(&patched, "cert").unwrap(), b"second");
    assert_eq!(patched["metadata"]["uid"], created["metadata"]["uid"]);
    assert!(rv_of(&patched) > rv_of(&created));
    // kubectl's client-side apply sent a strategic merge patch, validated server side.
    let log = api.request_log();
    let patch = log.iter().find(|r| r.method == "PATCH").expect("apply patched");
    assert_eq!(patch.param("fieldValidation").as_deref(), Some("Strict"));

    // As against a real server, kubectl re-sends write-only stringData on every apply;
    // the server sees the same data and writes nothing.
    let before = api.resource_version();
    assert_eq!(kubectl(&kubeconfig, &["apply", "-f", path]).await.trim(), "secret/applied configured");
    assert_eq!(api.resource_version(), before, "a patch that changes nothing is not a write");

    write("third");
    let out = kubectl(&kubeconfig, &["apply", "--server-side", "-f", path]).await;
    assert_eq!(out.trim(), "secret/applied serverside-applied");
    let applied = api.get_object("v1", "Secret", "default", "applied").unwrap();
    assert_eq!(kubeapi::secret_data(&applied, "cert").unwrap(), b"third");
}

/// A custom resource (the Gateway API's ReferenceGrant) is served only once its CRD is
/// installed: before, its URLs answer 404 as upstream's do, discovery leaves it out and
/// kubectl does not know the kind; after, kubectl applies, lists and deletes it.
#[tokio::test]
async fn custom_resources_are_served_once_their_crds_are_installed() {
    let api = KubeApi::start_with(Config { crds_installed: false, ..Config::default() }).await;
    let addr = api.addr();
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    let path = "/apis/gateway.networking.k8s.io/v1beta1/namespaces/certs/referencegrants";
    let missing = wire::get(addr, path).await;
    assert_eq!((missing.status, missing.json()["reason"].clone()), (404, json!("NotFound")));
    assert_eq!(wire::get(addr, "/apis/gateway.networking.k8s.io").await.status, 404);
    let groups = wire::get(addr, "/apis").await.json();
    assert!(!groups.to_string().contains("gateway.networking.k8s.io"), "{groups}");
    let unknown = kubeapi::kubectl(&kubeconfig).args(["get", "referencegrants", "-A"]).output().await.unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("the server doesn't have a resource type"));

    api.install_crds();
    kubectl(&kubeconfig, &["create", "namespace", "certs"]).await;
    let manifest = dir.path().join("grant.json");
    std::fs::write(&manifest, kubeapi::reference_grant("certs", "gw-to-web", "gw", Some("web")).to_string()).unwrap();
    // A fresh discovery cache: kubectl caches the resource list it saw before.
    std::fs::remove_dir_all(dir.path().join("kubectl-cache")).ok();
    let out = kubectl(&kubeconfig, &["apply", "-f", manifest.to_str().unwrap()]).await;
    assert_eq!(out.trim(), "referencegrant.gateway.networking.k8s.io/gw-to-web created");
    let stored = api.get_object("gateway.networking.k8s.io/v1beta1", "ReferenceGrant", "certs", "gw-to-web").unwrap();
    assert_eq!(stored["spec"]["to"][0]["name"], "web");
    assert_eq!(stored["metadata"]["generation"], 1);
    let rows = table(&kubectl(&kubeconfig, &["get", "refgrant", "-n", "certs"]).await);
    assert_eq!(
        (rows[0][..2].to_vec(), rows[1][0].clone()),
        (vec!["NAME".to_string(), "AGE".into()], "gw-to-web".into())
    );
    let listed = wire::get(addr, path).await.json();
    assert_eq!(listed["kind"], "ReferenceGrantList");
    assert_eq!(listed["items"][0]["metadata"]["name"], "gw-to-web");
    // Changed by apply (a JSON merge patch: kubectl has no strategic merge for CRDs).
    std::fs::write(&manifest, kubeapi::reference_grant("certs", "gw-to-web", "gw", None).to_string()).unwrap();
    let out = kubectl(&kubeconfig, &["apply", "-f", manifest.to_str().unwrap()]).await;
    assert_eq!(out.trim(), "referencegrant.gateway.networking.k8s.io/gw-to-web configured");
    let changed = api.get_object("gateway.networking.k8s.io/v1beta1", "ReferenceGrant", "certs", "gw-to-web").unwrap();
    assert!(changed["spec"]["to"][0].get("name").is_none(), "{changed}");
    assert_eq!(changed["metadata"]["generation"], 2);
    let out = kubectl(&kubeconfig, &["delete", "referencegrant", "gw-to-web", "-n", "certs"]).await;
    assert_eq!(out.trim(), "referencegrant.gateway.networking.k8s.io \"gw-to-web\" deleted");
    assert!(api.list_objects("gateway.networking.k8s.io/v1beta1", "ReferenceGrant", None).is_empty());
}

#[tokio::test]
async fn kubectl_namespaces_and_all_namespaces_listing() {
    let api = KubeApi::start().await;
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    assert_eq!(kubectl(&kubeconfig, &["create", "namespace", "edge"]).await.trim(), "namespace/edge created");
    let ns = api.get_object("v1", "Namespace", "", "edge").expect("namespace stored");
    assert_eq!(ns["status"]["phase"], "Active");

    api.put_object(secret("default", "a", json!({}), "1"));
    api.put_object(secret("edge", "b", json!({}), "2"));
    let rows = table(&kubectl(&kubeconfig, &["get", "secrets", "-A"]).await);
    assert_eq!(rows[0], ["NAMESPACE", "NAME", "TYPE", "DATA", "AGE"]);
    let listed: Vec<(&str, &str)> = rows[1..].iter().map(|r| (r[0].as_str(), r[1].as_str())).collect();
    assert_eq!(listed, [("default", "a"), ("edge", "b")]);
    assert!(api.request_log().iter().any(|r| r.path == "/api/v1/secrets"), "one all-namespaces list");

    let rows = table(&kubectl(&kubeconfig, &["get", "ns"]).await);
    assert!(rows.iter().any(|r| r[..2] == ["edge", "Active"]));

    kubectl(&kubeconfig, &["delete", "namespace", "edge"]).await;
    assert!(api.get_object("v1", "Secret", "edge", "b").is_none(), "a namespace takes its objects with it");
    let refused =
        kubeapi::kubectl(&kubeconfig).args(["create", "secret", "generic", "x", "-n", "gone"]).output().await.unwrap();
    assert!(String::from_utf8_lossy(&refused.stderr).contains("namespaces \"gone\" not found"));
}

#[tokio::test]
async fn kubectl_watch_sees_a_change() {
    let api = KubeApi::start().await;
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    api.put_object(secret("default", "watched", json!({}), "v1"));

    let mut child = kubeapi::kubectl(&kubeconfig)
        .args(["get", "secrets", "--watch", "-o", "json", "--request-timeout", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kubectl --watch");
    api.wait_for_watches(1, WAIT).await;
    api.put_object(secret("default", "watched", json!({"rotated": "yes"}), "v2"));

    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let found = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 8192];
        loop {
            let n = stdout.read(&mut buf).await.expect("read kubectl output");
            assert!(n > 0, "kubectl --watch exited early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if seen.contains("\"rotated\": \"yes\"") {
                return;
            }
        }
    })
    .await;
    let _ = child.kill().await;
    assert!(found.is_ok(), "kubectl --watch never printed the change; it printed: {seen}");
    let watch = api.request_log().into_iter().find(|r| r.is_watch_of("secrets")).expect("kubectl watched");
    assert!(watch.param("resourceVersion").is_some(), "kubectl watched from its list's version: {watch}");
}

#[tokio::test]
async fn discovery_documents() {
    let api = KubeApi::start().await;
    let addr = api.addr();
    let version = wire::get(addr, "/version").await.json();
    assert_eq!((version["major"].as_str(), version["minor"].as_str()), (Some("1"), Some("32")));

    let core = wire::get(addr, "/api/v1").await.json();
    assert_eq!(core["kind"], "APIResourceList");
    let secrets = core["resources"].as_array().unwrap().iter().find(|r| r["name"] == "secrets").unwrap();
    assert_eq!(secrets["kind"], "Secret");
    assert_eq!(secrets["namespaced"], true);
    assert!(secrets["verbs"].as_array().unwrap().contains(&json!("watch")));
    let namespaces = core["resources"].as_array().unwrap().iter().find(|r| r["name"] == "namespaces").unwrap();
    assert_eq!((namespaces["namespaced"].clone(), namespaces["shortNames"].clone()), (json!(false), json!(["ns"])));

    assert_eq!(wire::get(addr, "/api").await.json()["versions"], json!(["v1"]));
    let groups = wire::get(addr, "/apis").await.json();
    let group_names: Vec<&str> =
        groups["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(
        group_names,
        [
            "events.k8s.io",
            "coordination.k8s.io",
            "rbac.authorization.k8s.io",
            "authorization.k8s.io",
            "gateway.networking.k8s.io"
        ]
    );
    let rbac = wire::get(addr, "/apis/rbac.authorization.k8s.io/v1").await.json();
    let rbac: Vec<(&str, bool)> = rbac["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["namespaced"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        rbac,
        [("roles", true), ("rolebindings", true), ("clusterroles", false), ("clusterrolebindings", false)]
    );
    let reviews = wire::get(addr, "/apis/authorization.k8s.io/v1").await.json();
    assert_eq!(
        (reviews["resources"][0]["name"].clone(), reviews["resources"][0]["verbs"].clone()),
        (json!("subjectaccessreviews"), json!(["create"]))
    );
    let leases = wire::get(addr, "/apis/coordination.k8s.io/v1").await.json();
    assert_eq!(leases["resources"][0]["kind"], "Lease");

    let accept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";
    let aggregated = wire::call(addr, "GET", "/apis", &[("Accept", accept)], b"").await;
    assert_eq!(
        aggregated.header("content-type"),
        Some("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList")
    );
    assert_eq!(aggregated.json()["items"][1]["versions"][0]["resources"][0]["resource"], "leases");

    let missing = wire::get(addr, "/apis/apps/v1/deployments").await;
    assert_eq!(missing.status, 404);
    assert_eq!(
        (missing.json()["kind"].clone(), missing.json()["reason"].clone()),
        (json!("Status"), json!("NotFound"))
    );
}

#[tokio::test]
async fn list_pages_are_served_at_the_first_page_version() {
    let api = KubeApi::start().await;
    let addr = api.addr();
    for i in 0..5 {
        api.put_object(secret("default", &format!("s{i}"), json!({}), "x"));
    }
    let first = wire::get(addr, "/api/v1/namespaces/default/secrets?limit=2").await.json();
    assert_eq!(names(&first), ["s0", "s1"]);
    assert_eq!(first["metadata"]["remainingItemCount"], 3);
    assert!(first["items"][0].get("kind").is_none(), "list items carry no kind, like upstream's");
    let list_rv = first["metadata"]["resourceVersion"].as_str().unwrap().to_string();

    // Writes between pages do not show: pages continue the first page's snapshot.
    api.put_object(secret("default", "s2", json!({"changed": "yes"}), "y"));
    api.put_object(secret("default", "s9", json!({}), "new"));
    api.delete_object("v1", "Secret", "default", "s3");
    let token = first["metadata"]["continue"].as_str().unwrap();
    let second = wire::get(addr, &format!("/api/v1/namespaces/default/secrets?limit=2&continue={token}")).await.json();
    assert_eq!(names(&second), ["s2", "s3"]);
    assert!(second["items"][0]["metadata"]["labels"].get("changed").is_none());
    assert_eq!(second["metadata"]["resourceVersion"], list_rv);
    let token = second["metadata"]["continue"].as_str().unwrap();
    let third = wire::get(addr, &format!("/api/v1/namespaces/default/secrets?limit=2&continue={token}")).await.json();
    assert_eq!(names(&third), ["s4"]);
    assert!(third["metadata"].get("continue").is_none());

    let latest = wire::get(addr, "/api/v1/namespaces/default/secrets").await.json();
    assert_eq!(names(&latest), ["s0", "s1", "s2", "s4", "s9"]);
    assert_eq!(latest["metadata"]["resourceVersion"], api.resource_version().to_string());

    let exact = wire::get(
        addr,
        &format!("/api/v1/namespaces/default/secrets?resourceVersion={list_rv}&resourceVersionMatch=Exact"),
    )
    .await;
    assert_eq!(names(&exact.json()), ["s0", "s1", "s2", "s3", "s4"]);
    // kube-rs' `ListSemantic::Any`.
    let any = "/api/v1/namespaces/default/secrets?resourceVersion=0&resourceVersionMatch=NotOlderThan&limit=500";
    assert_eq!(names(&wire::get(addr, any).await.json()), ["s0", "s1", "s2", "s4", "s9"]);
    let too_new =
        wire::get(addr, "/api/v1/namespaces/default/secrets?resourceVersion=99999&resourceVersionMatch=NotOlderThan")
            .await;
    assert_eq!((too_new.status, too_new.json()["reason"].clone()), (504, json!("Timeout")));

    // After a compaction the old snapshot is gone: 410, and clients relist.
    api.compact();
    let expired = wire::get(addr, &format!("/api/v1/namespaces/default/secrets?limit=2&continue={token}")).await;
    assert_eq!((expired.status, expired.json()["reason"].clone()), (410, json!("Expired")));
}

#[tokio::test]
async fn list_selectors_and_all_namespaces() {
    let api = KubeApi::start().await;
    let addr = api.addr();
    api.put_object(secret("default", "a", json!({"app": "web", "tier": "edge"}), "1"));
    api.put_object(secret("default", "b", json!({"app": "api"}), "2"));
    api.put_object(secret("other", "c", json!({"app": "web"}), "3"));
    let list = |query: &str| {
        let path = format!("/api/v1/secrets?{query}");
        async move { names(&wire::get(addr, &path).await.json()) }
    };
    assert_eq!(list("").await, ["a", "b", "c"]);
    assert_eq!(list("labelSelector=app%3Dweb").await, ["a", "c"]);
    assert_eq!(list("labelSelector=app!%3Dweb").await, ["b"]);
    assert_eq!(list("labelSelector=app%20in%20(api,db)").await, ["b"]);
    assert_eq!(list("labelSelector=app%20notin%20(api)").await, ["a", "c"]);
    assert_eq!(list("labelSelector=tier").await, ["a"]);
    assert_eq!(list("labelSelector=!tier,app%3Dweb").await, ["c"]);
    assert_eq!(list("fieldSelector=metadata.name%3Db").await, ["b"]);
    assert_eq!(list("fieldSelector=metadata.namespace%3Dother").await, ["c"]);
    assert_eq!(list("fieldSelector=metadata.namespace!%3Dother,type%3DOpaque").await, ["a", "b"]);
    let namespaced = wire::get(addr, "/api/v1/namespaces/other/secrets").await.json();
    assert_eq!(names(&namespaced), ["c"]);
}

#[tokio::test]
async fn watch_resumes_from_a_list_version_with_bookmarks() {
    let config = Config { bookmark_interval: Duration::from_millis(200), ..Config::default() };
    let api = KubeApi::start_with(config).await;
    let addr = api.addr();
    api.put_object(secret("default", "a", json!({}), "1"));
    // What kube-rs' watcher does: list, then watch from the list's version.
    let list = wire::get(addr, "/api/v1/namespaces/default/secrets?limit=500").await.json();
    let list_rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    api.put_object(secret("default", "b", json!({}), "missed while not watching"));

    let path = format!(
        "/api/v1/namespaces/default/secrets?watch=true&timeoutSeconds=290&allowWatchBookmarks=true\
         &resourceVersion={list_rv}"
    );
    let mut watch = Watch::open(addr, &path).await;
    assert_eq!(watch.status, 200);
    assert_eq!(watch.header("transfer-encoding"), Some("chunked"));
    assert_eq!(watch.header("content-type"), Some("application/json"));
    let added = watch.change().await;
    assert_eq!((added["type"].clone(), added["object"]["metadata"]["name"].clone()), (json!("ADDED"), json!("b")));
    assert_eq!(added["object"]["kind"], "Secret", "watch events carry kind and apiVersion");

    api.put_object(secret("default", "a", json!({"v": "2"}), "2"));
    let modified = watch.change().await;
    assert_eq!(
        (modified["type"].clone(), modified["object"]["metadata"]["name"].clone()),
        (json!("MODIFIED"), json!("a"))
    );
    api.delete_object("v1", "Secret", "default", "a");
    let deleted = watch.change().await;
    assert_eq!(deleted["type"], "DELETED");
    assert!(rv_of(&deleted["object"]) > rv_of(&modified["object"]), "a delete has its own resourceVersion");

    let bookmark = loop {
        let event = watch.event().await;
        if event["type"] == "BOOKMARK" {
            break event;
        }
    };
    assert_eq!(bookmark["object"]["kind"], "Secret");
    assert_eq!(rv_of(&bookmark["object"]), api.resource_version());

    // Without a resourceVersion a watch starts with the current state as ADDED events.
    api.put_object(secret("default", "c", json!({}), "3"));
    let mut fresh = Watch::open(addr, "/api/v1/namespaces/default/secrets?watch=1").await;
    let initial: Vec<Value> = vec![fresh.change().await, fresh.change().await];
    let initial: Vec<&str> = initial.iter().map(|e| e["object"]["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(initial, ["b", "c"]);
}

#[tokio::test]
async fn streaming_list_ends_initial_events_with_an_annotated_bookmark() {
    let api = KubeApi::start().await;
    api.put_object(secret("default", "a", json!({}), "1"));
    let path = "/api/v1/namespaces/default/secrets?watch=true&sendInitialEvents=true\
                &resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true";
    let mut watch = Watch::open(api.addr(), path).await;
    assert_eq!(watch.event().await["type"], "ADDED");
    let end = watch.event().await;
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
}

#[tokio::test]
async fn watch_selector_transitions_are_added_and_deleted() {
    let api = KubeApi::start().await;
    let mut watch =
        Watch::open(api.addr(), "/api/v1/namespaces/default/secrets?watch=1&labelSelector=served%3Dyes").await;
    api.wait_for_watches(1, WAIT).await;
    api.put_object(secret("default", "x", json!({"served": "no"}), "1"));
    api.put_object(secret("default", "x", json!({"served": "yes"}), "2"));
    assert_eq!(watch.change().await["type"], "ADDED", "an object entering the selector is ADDED");
    api.put_object(secret("default", "x", json!({"served": "no"}), "3"));
    let left = watch.change().await;
    assert_eq!(left["type"], "DELETED", "an object leaving the selector is DELETED");
    assert_eq!(left["object"]["metadata"]["labels"]["served"], "no");
}

#[tokio::test]
async fn expired_resource_version_gets_a_410_error_event() {
    let api = KubeApi::start().await;
    let addr = api.addr();
    api.put_object(secret("default", "a", json!({}), "1"));
    let old = api.resource_version();
    api.put_object(secret("default", "a", json!({}), "2"));
    api.compact();

    let mut watch =
        Watch::open(addr, &format!("/api/v1/namespaces/default/secrets?watch=1&resourceVersion={old}")).await;
    assert_eq!(watch.status, 200, "upstream reports an expired watch inside the stream");
    let error = watch.event().await;
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["kind"], "Status");
    assert_eq!((error["object"]["code"].clone(), error["object"]["reason"].clone()), (json!(410), json!("Expired")));
    assert!(matches!(watch.finish().await, Next::End));

    // From the current version it is fine.
    let now = api.resource_version();
    let mut watch =
        Watch::open(addr, &format!("/api/v1/namespaces/default/secrets?watch=1&resourceVersion={now}")).await;
    api.wait_for_watches(1, WAIT).await;
    api.put_object(secret("default", "a", json!({}), "3"));
    assert_eq!(watch.change().await["type"], "MODIFIED");
}

#[tokio::test]
async fn history_window_expires_old_versions_by_itself() {
    let api = KubeApi::start_with(Config { history: 3, ..Config::default() }).await;
    let old = api.resource_version();
    for i in 0..5 {
        api.put_object(secret("default", "a", json!({}), &i.to_string()));
    }
    let mut watch = Watch::open(api.addr(), &format!("/api/v1/secrets?watch=1&resourceVersion={old}")).await;
    assert_eq!(watch.event().await["object"]["code"], 410);
    let recent = api.resource_version() - 2;
    let mut watch = Watch::open(api.addr(), &format!("/api/v1/secrets?watch=1&resourceVersion={recent}")).await;
    assert_eq!(watch.change().await["type"], "MODIFIED");
    assert_eq!(watch.change().await["type"], "MODIFIED");
}

#[tokio::test]
async fn drop_watches_aborts_streams_and_timeouts_end_them() {
    let api = KubeApi::start().await;
    let addr = api.addr();
    let mut first = Watch::open(addr, "/api/v1/secrets?watch=1").await;
    let mut second = Watch::open(addr, "/api/v1/namespaces/default/secrets?watch=1&allowWatchBookmarks=true").await;
    api.wait_for_watches(2, WAIT).await;
    api.drop_watches();
    assert!(matches!(first.finish().await, Next::Aborted), "a dropped watch is cut, not ended");
    assert!(matches!(second.finish().await, Next::Aborted));
    util::wait_for("watches closed", WAIT, || async { (api.open_watches() == 0).then_some(()) }).await;

    let mut after = Watch::open(addr, "/api/v1/secrets?watch=1").await;
    api.wait_for_watches(1, WAIT).await;
    api.put_object(secret("default", "a", json!({}), "1"));
    assert_eq!(after.change().await["type"], "ADDED", "watches opened after the drop work");

    let mut timed = Watch::open(addr, "/api/v1/secrets?watch=1&timeoutSeconds=1&resourceVersion=1").await;
    loop {
        match timed.finish().await {
            Next::Event(_) => continue,
            Next::End => break,
            Next::Aborted => panic!("a watch timeout ends the body cleanly"),
        }
    }

    // A client that hangs up is noticed without any event to send.
    drop(after);
    util::wait_for("the abandoned watch to close", WAIT, || async { (api.open_watches() == 0).then_some(()) }).await;
}

#[tokio::test]
async fn a_slow_watcher_is_cut_off_without_blocking_writers() {
    let api = KubeApi::start_with(Config { watch_queue: 4, ..Config::default() }).await;
    let mut watch = Watch::open(api.addr(), "/api/v1/namespaces/default/secrets?watch=1").await;
    api.wait_for_watches(1, WAIT).await;
    // The client reads nothing: the connection fills, then the watcher's queue.
    let big = "x".repeat(64 * 1024);
    let mut writes = 0;
    while api.slow_watches_cut_off() == 0 {
        assert!(writes < 2000, "the silent watcher was never cut off");
        // Each write changes the content: an identical write is a no-op with no event.
        api.put_object(secret("default", &format!("s{}", writes % 50), json!({}), &format!("{writes}{big}")));
        writes += 1;
    }
    // Now it reads: what was queued, then the 410, then a clean end.
    let mut last = Value::Null;
    loop {
        match watch.finish().await {
            Next::Event(event) => last = event,
            Next::End => break,
            Next::Aborted => panic!("a cut-off watcher's stream ends cleanly"),
        }
    }
    assert_eq!(last["type"], "ERROR");
    assert_eq!((last["object"]["code"].clone(), last["object"]["reason"].clone()), (json!(410), json!("Expired")));
    util::wait_for("the cut-off watch to close", WAIT, || async { (api.open_watches() == 0).then_some(()) }).await;
}

#[tokio::test]
async fn failures_unavailability_and_unreachability() {
    let api = KubeApi::start().await;
    let addr = api.addr();
    api.fail_next(2);
    for _ in 0..2 {
        let failed = wire::get(addr, "/api/v1/namespaces/default/secrets").await;
        assert_eq!((failed.status, failed.json()["reason"].clone()), (500, json!("InternalError")));
    }
    assert_eq!(wire::get(addr, "/api/v1/namespaces/default/secrets").await.status, 200);

    api.fail_next_matching(1, "watch=");
    assert_eq!(wire::get(addr, "/api/v1/secrets").await.status, 200, "only matching requests fail");
    assert_eq!(wire::get(addr, "/api/v1/secrets?watch=1&timeoutSeconds=1").await.status, 500);

    api.set_unavailable(true);
    let unavailable = wire::get(addr, "/version").await;
    assert_eq!((unavailable.status, unavailable.json()["reason"].clone()), (503, json!("ServiceUnavailable")));
    api.set_unavailable(false);

    let mut watch = Watch::open(addr, "/api/v1/secrets?watch=1").await;
    api.wait_for_watches(1, WAIT).await;
    api.stop_listening();
    assert!(matches!(watch.finish().await, Next::Aborted), "stopping closes open connections");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "and refuses new ones");
    api.resume_listening();
    assert_eq!(wire::get(addr, "/version").await.status, 200, "same port again");

    let log: Vec<String> = api.request_log().iter().map(ToString::to_string).collect();
    assert_eq!(log[0], "GET /api/v1/namespaces/default/secrets");
    assert!(log.contains(&"GET /api/v1/secrets?watch=1&timeoutSeconds=1".to_string()));
    assert!(api.request_log().iter().filter(|r| r.is_list_of("secrets")).count() >= 4);
}

#[tokio::test]
async fn writes_conflicts_and_status_errors() {
    let api = KubeApi::start().await;
    let addr = api.addr();
    let base = "/api/v1/namespaces/default/secrets";
    let created = wire::send_json(addr, "POST", base, "application/json", &secret("", "a", json!({}), "1")).await;
    assert_eq!(created.status, 201);
    let created = created.json();
    assert_eq!(created["metadata"]["namespace"], "default");
    assert_eq!(created["type"], "Opaque", "type defaults to Opaque");
    assert!(created.get("stringData").is_none(), "stringData is folded into data");
    assert_eq!(kubeapi::secret_data(&created, "value").unwrap(), b"1");

    let duplicate = wire::send_json(addr, "POST", base, "application/json", &secret("", "a", json!({}), "1")).await;
    assert_eq!((duplicate.status, duplicate.json()["reason"].clone()), (409, json!("AlreadyExists")));
    assert_eq!(duplicate.json()["details"], json!({"name": "a", "kind": "secrets"}));

    let mut update = created.clone();
    update["metadata"]["labels"] = json!({"v": "2"});
    let updated = wire::send_json(addr, "PUT", &format!("{base}/a"), "application/json", &update).await;
    assert_eq!(updated.status, 200);
    assert!(rv_of(&updated.json()) > rv_of(&created));
    let stale = wire::send_json(addr, "PUT", &format!("{base}/a"), "application/json", &update).await;
    assert_eq!(
        (stale.status, stale.json()["reason"].clone()),
        (409, json!("Conflict")),
        "a stale resourceVersion conflicts"
    );

    let generated = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"generateName": "gen-"}});
    let generated = wire::send_json(addr, "POST", base, "application/json", &generated).await.json();
    let name = generated["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "generateName gets 5 characters: {name}");

    let tls = json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "t"},
        "type": "kubernetes.io/tls", "data": {"tls.crt": "eA=="},
    });
    let invalid = wire::send_json(addr, "POST", base, "application/json", &tls).await;
    assert_eq!((invalid.status, invalid.json()["reason"].clone()), (422, json!("Invalid")));
    assert_eq!(invalid.json()["details"]["causes"][0]["field"], "data[tls.key]");
    let garbage =
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "g"}, "data": {"k": "not base64!"}});
    assert_eq!(wire::send_json(addr, "POST", base, "application/json", &garbage).await.status, 400);

    let missing = wire::get(addr, &format!("{base}/nope")).await;
    assert_eq!(missing.status, 404);
    assert_eq!(
        missing.json(),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "secrets \"nope\" not found", "reason": "NotFound",
            "details": {"name": "nope", "kind": "secrets"}, "code": 404,
        })
    );

    let deleted = wire::call(addr, "DELETE", &format!("{base}/a"), &[], b"").await.json();
    assert_eq!((deleted["status"].clone(), deleted["details"]["name"].clone()), (json!("Success"), json!("a")));
    assert_eq!(wire::call(addr, "DELETE", &format!("{base}/a"), &[], b"").await.status, 404);
}

#[tokio::test]
async fn patch_formats() {
    let api = KubeApi::start().await;
    let addr = api.addr();
    let path = "/api/v1/namespaces/default/configmaps/cm";
    api.put_object(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cm", "namespace": "default"}, "data": {"a": "1", "b": "2"},
    }));

    let merge =
        wire::send_json(addr, "PATCH", path, "application/merge-patch+json", &json!({"data": {"a": null, "c": "3"}}))
            .await;
    assert_eq!(merge.json()["data"], json!({"b": "2", "c": "3"}));

    let strategic = json!({"metadata": {"labels": {"x": "y"}}, "$setElementOrder/data": [], "data": {"b": "two"}});
    let strategic = wire::send_json(addr, "PATCH", path, "application/strategic-merge-patch+json", &strategic).await;
    assert_eq!(strategic.json()["data"], json!({"b": "two", "c": "3"}));
    assert_eq!(strategic.json()["metadata"]["labels"], json!({"x": "y"}));

    let ops = json!([
        {"op": "test", "path": "/data/b", "value": "two"},
        {"op": "add", "path": "/data/d", "value": "4"},
        {"op": "remove", "path": "/data/c"},
    ]);
    let json_patch = wire::send_json(addr, "PATCH", path, "application/json-patch+json", &ops).await;
    assert_eq!(json_patch.json()["data"], json!({"b": "two", "d": "4"}));
    let failing = json!([{"op": "test", "path": "/data/b", "value": "nope"}]);
    assert_eq!(wire::send_json(addr, "PATCH", path, "application/json-patch+json", &failing).await.status, 422);

    let stale = json!({"metadata": {"resourceVersion": "1"}, "data": {"e": "5"}});
    let stale = wire::send_json(addr, "PATCH", path, "application/merge-patch+json", &stale).await;
    assert_eq!(stale.status, 409, "a resourceVersion in a patch is a precondition");

    let apply = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"k": "v"}});
    let apply_path = "/api/v1/namespaces/default/configmaps/applied?fieldManager=certwire";
    let created = wire::send_json(addr, "PATCH", apply_path, "application/apply-patch+yaml", &apply).await;
    assert_eq!(created.status, 201, "server-side apply creates");
    let apply = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"k": "w"}});
    let merged = wire::send_json(addr, "PATCH", apply_path, "application/apply-patch+yaml", &apply).await;
    assert_eq!((merged.status, merged.json()["data"]["k"].clone()), (200, json!("w")));
    let no_manager = wire::send_json(
        addr,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/applied",
        "application/apply-patch+yaml",
        &apply,
    )
    .await;
    assert_eq!(no_manager.status, 422, "apply needs a fieldManager");

    let missing = wire::send_json(
        addr,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/none",
        "application/merge-patch+json",
        &json!({}),
    )
    .await;
    assert_eq!(missing.status, 404);
}

#[tokio::test]
async fn events_leases_and_representations() {
    let api = KubeApi::start().await;
    let addr = api.addr();
    // kube-rs' recorder: events.k8s.io/v1 with generateName.
    let event = json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"generateName": "certwire-", "namespace": "default"},
        "eventTime": "2025-01-01T00:00:00.000000Z", "action": "Reject", "reason": "InvalidSecret",
        "note": "key does not match certificate", "type": "Warning",
        "reportingController": "certwire", "reportingInstance": "certwire-0",
        "regarding": {"apiVersion": "v1", "kind": "Secret", "namespace": "default", "name": "app"},
    });
    let created =
        wire::send_json(addr, "POST", "/apis/events.k8s.io/v1/namespaces/default/events", "application/json", &event)
            .await;
    assert_eq!(created.status, 201);
    let name = created.json()["metadata"]["name"].as_str().unwrap().to_string();
    let core = wire::get(addr, &format!("/api/v1/namespaces/default/events/{name}")).await.json();
    assert_eq!(
        (core["message"].clone(), core["involvedObject"]["name"].clone()),
        (json!("key does not match certificate"), json!("app"))
    );
    assert_eq!(core["reportingComponent"], "certwire");
    let events = api.events();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0]["reason"].clone(), events[0]["regarding"]["kind"].clone()),
        (json!("InvalidSecret"), json!("Secret"))
    );
    let by_field =
        wire::get(addr, "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dapp").await.json();
    assert_eq!(by_field["items"].as_array().unwrap().len(), 1);

    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "certwire"}, "spec": {"holderIdentity": "a"},
    });
    let path = "/apis/coordination.k8s.io/v1/namespaces/default/leases/certwire";
    assert_eq!(wire::send_json(addr, "PUT", path, "application/json", &lease).await.status, 201, "PUT creates a lease");

    let accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
    let table =
        wire::call(addr, "GET", "/apis/coordination.k8s.io/v1/namespaces/default/leases", &[("Accept", accept)], b"")
            .await;
    assert_eq!(table.header("content-type"), Some("application/json;as=Table;g=meta.k8s.io;v=v1"));
    let table = table.json();
    assert_eq!(table["kind"], "Table");
    let columns: Vec<&str> =
        table["columnDefinitions"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(columns, ["Name", "Holder", "Age"]);
    assert_eq!(table["rows"][0]["cells"].as_array().unwrap()[..2], [json!("certwire"), json!("a")]);
    assert_eq!(table["rows"][0]["object"]["kind"], "PartialObjectMetadata");

    let accept = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json";
    let meta =
        wire::call(addr, "GET", "/apis/coordination.k8s.io/v1/namespaces/default/leases", &[("Accept", accept)], b"")
            .await
            .json();
    assert_eq!(meta["kind"], "PartialObjectMetadataList");
    assert!(meta["items"][0].get("spec").is_none());
}

#[tokio::test]
async fn emulator_keeps_serving_a_blocked_test_thread() {
    let api = KubeApi::start().await;
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    // A blocking kubectl run on the test's own (single) thread still gets answers.
    let output = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .args(["get", "namespaces", "-o", "name"])
        .output()
        .expect("run kubectl");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("namespace/default"));
}

// RBAC and SubjectAccessReviews: grants made with the real kubectl, reviews asked with
// kube-rs and k8s-openapi's types, as certwire asks them.

fn kube_client(api: &KubeApi) -> kube::Client {
    let config = kube::Config::new(api.url().parse().expect("the emulator's URL is a URI"));
    kube::Client::try_from(config).expect("a kube client for the emulator")
}

/// `verb` on the core-group `resource` named `name` (empty: none, as for list) in
/// `namespace` (empty: cluster-wide).
fn on(namespace: &str, verb: &str, resource: &str, name: &str) -> ResourceAttributes {
    let some = |text: &str| Some(text.to_string()).filter(|t| !t.is_empty());
    ResourceAttributes {
        namespace: some(namespace),
        verb: some(verb),
        resource: some(resource),
        name: some(name),
        ..Default::default()
    }
}

fn access_review(user: &str, groups: &[&str], what: ResourceAttributes) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()).filter(|u| !u.is_empty()),
            groups: Some(groups.iter().map(ToString::to_string).collect()),
            resource_attributes: Some(what),
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn review(
    client: &kube::Client,
    user: &str,
    groups: &[&str],
    what: ResourceAttributes,
) -> SubjectAccessReviewStatus {
    let api: kube::Api<SubjectAccessReview> = kube::Api::all(client.clone());
    let answer = api.create(&Default::default(), &access_review(user, groups, what)).await.expect("a review answer");
    answer.status.expect("an answered review has a status")
}

async fn allowed(client: &kube::Client, user: &str, what: ResourceAttributes) -> bool {
    review(client, user, &[], what).await.allowed
}

const SA_ENVOY: &str = "system:serviceaccount:edge:envoy";

#[tokio::test]
async fn kubectl_role_and_rolebinding_grant_a_service_account_until_deleted() {
    let api = KubeApi::start().await;
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    let client = kube_client(&api);
    kubectl(&kubeconfig, &["create", "namespace", "edge"]).await;
    let out = kubectl(
        &kubeconfig,
        &["create", "role", "read-secrets", "--verb=get,list", "--resource=secrets", "-n", "edge"],
    )
    .await;
    assert_eq!(out.trim(), "role.rbac.authorization.k8s.io/read-secrets created");
    let out = kubectl(
        &kubeconfig,
        &["create", "rolebinding", "envoy-reads", "--role=read-secrets", "--serviceaccount=edge:envoy", "-n", "edge"],
    )
    .await;
    assert_eq!(out.trim(), "rolebinding.rbac.authorization.k8s.io/envoy-reads created");

    // kubectl sent both as protobuf; they read back as k8s-openapi's typed objects.
    let role = kube::Api::<Role>::namespaced(client.clone(), "edge").get("read-secrets").await.expect("the role");
    let rules = role.rules.expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].verbs, ["get", "list"]);
    assert_eq!(
        (rules[0].api_groups.as_deref(), rules[0].resources.as_deref()),
        (Some(&[String::new()][..]), Some(&["secrets".to_string()][..]))
    );
    let binding =
        kube::Api::<RoleBinding>::namespaced(client.clone(), "edge").get("envoy-reads").await.expect("the binding");
    assert_eq!(
        (binding.role_ref.api_group.as_str(), binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()),
        ("rbac.authorization.k8s.io", "Role", "read-secrets")
    );
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str(), subject.namespace.as_deref()),
        ("ServiceAccount", "envoy", Some("edge"))
    );
    let rows = table(&kubectl(&kubeconfig, &["get", "rolebindings", "-n", "edge", "-o", "wide"]).await);
    assert_eq!(rows[0], ["NAME", "ROLE", "AGE", "USERS", "GROUPS", "SERVICEACCOUNTS"]);
    assert_eq!(
        (rows[1][0].as_str(), rows[1][1].as_str(), rows[1][3].as_str()),
        ("envoy-reads", "Role/read-secrets", "edge/envoy")
    );

    let granted = review(&client, SA_ENVOY, &[], on("edge", "get", "secrets", "app")).await;
    assert!(granted.allowed);
    assert_eq!(
        granted.reason.as_deref(),
        Some(
            r#"RBAC: allowed by RoleBinding "envoy-reads/edge" of Role "read-secrets" to ServiceAccount "envoy/edge""#
        )
    );
    assert!(allowed(&client, SA_ENVOY, on("edge", "list", "secrets", "")).await);
    // A User subject naming the same service account is the same user.
    // Bindings are tried in name order: "as-user" comes before "envoy-reads".
    kubectl(
        &kubeconfig,
        &["create", "rolebinding", "as-user", "--role=read-secrets", "--user", SA_ENVOY, "-n", "edge"],
    )
    .await;
    let as_user = review(&client, SA_ENVOY, &[], on("edge", "get", "secrets", "app")).await;
    assert_eq!(
        as_user.reason.as_deref(),
        Some(
            r#"RBAC: allowed by RoleBinding "as-user/edge" of Role "read-secrets" to User "system:serviceaccount:edge:envoy""#
        )
    );
    kubectl(&kubeconfig, &["delete", "rolebinding", "as-user", "-n", "edge"]).await;

    let others = [
        ("system:serviceaccount:edge:other", on("edge", "get", "secrets", "app")),
        ("system:serviceaccount:default:envoy", on("edge", "get", "secrets", "app")),
        ("envoy", on("edge", "get", "secrets", "app")),
        (SA_ENVOY, on("default", "get", "secrets", "app")),
        (SA_ENVOY, on("edge", "delete", "secrets", "app")),
        (SA_ENVOY, on("edge", "get", "configmaps", "app")),
        (SA_ENVOY, ResourceAttributes { group: Some("apps".into()), ..on("edge", "get", "secrets", "app") }),
        // Cluster-wide: RoleBindings grant only in their namespace.
        (SA_ENVOY, on("", "list", "secrets", "")),
    ];
    for (user, what) in others {
        let denied = review(&client, user, &[], what.clone()).await;
        assert!(!denied.allowed, "{user} must not {what:?}");
        assert_eq!(denied.reason, None, "RBAC gives no reason for a plain denial");
    }

    // No caching: a changed role counts at the next review.
    let patch = r#"[{"op": "replace", "path": "/rules/0/verbs", "value": ["list"]}]"#;
    kubectl(&kubeconfig, &["patch", "role", "read-secrets", "-n", "edge", "--type=json", "-p", patch]).await;
    assert!(!allowed(&client, SA_ENVOY, on("edge", "get", "secrets", "app")).await);
    assert!(allowed(&client, SA_ENVOY, on("edge", "list", "secrets", "")).await);

    let out = kubectl(&kubeconfig, &["delete", "rolebinding", "envoy-reads", "-n", "edge"]).await;
    assert_eq!(out.trim(), "rolebinding.rbac.authorization.k8s.io \"envoy-reads\" deleted");
    assert!(!allowed(&client, SA_ENVOY, on("edge", "list", "secrets", "")).await);

    // Every review is logged and counted, in order.
    let asked = api.requests_matching(|r| r.is_create_of("subjectaccessreviews"));
    assert_eq!(asked, 14);
    let reviews = api.access_reviews();
    assert_eq!(reviews.len(), 14);
    assert_eq!(
        (reviews[0]["spec"]["user"].as_str(), reviews[0]["status"]["allowed"].as_bool()),
        (Some(SA_ENVOY), Some(true))
    );
    assert_eq!(reviews[0]["spec"]["resourceAttributes"]["name"], "app");
    assert_eq!(reviews[13]["status"]["allowed"], false);
    api.clear_request_log();
    assert!(api.access_reviews().is_empty());
}

#[tokio::test]
async fn cluster_roles_grant_per_namespace_or_cluster_wide_and_groups_come_from_the_review() {
    let api = KubeApi::start().await;
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    let client = kube_client(&api);
    kubectl(&kubeconfig, &["create", "namespace", "edge"]).await;
    let out = kubectl(
        &kubeconfig,
        &["create", "clusterrole", "secret-reader", "--verb=get", "--resource=secrets", "--resource-name=app"],
    )
    .await;
    assert_eq!(out.trim(), "clusterrole.rbac.authorization.k8s.io/secret-reader created");

    // A ClusterRole bound by a RoleBinding grants in that namespace only.
    kubectl(
        &kubeconfig,
        &[
            "create",
            "rolebinding",
            "edge-reader",
            "--clusterrole=secret-reader",
            "--serviceaccount=edge:envoy",
            "-n",
            "edge",
        ],
    )
    .await;
    let granted = review(&client, SA_ENVOY, &[], on("edge", "get", "secrets", "app")).await;
    assert_eq!(
        (granted.allowed, granted.reason.as_deref()),
        (
            true,
            Some(
                r#"RBAC: allowed by RoleBinding "edge-reader/edge" of ClusterRole "secret-reader" to ServiceAccount "envoy/edge""#
            )
        )
    );
    assert!(!allowed(&client, SA_ENVOY, on("default", "get", "secrets", "app")).await, "other namespace");
    assert!(!allowed(&client, SA_ENVOY, on("edge", "get", "secrets", "other")).await, "not a listed resource name");
    assert!(!allowed(&client, SA_ENVOY, on("edge", "get", "secrets", "")).await, "resource names need a name");

    // A ClusterRoleBinding grants in every namespace and cluster-wide.
    let proxy = "system:serviceaccount:default:proxy";
    let out = kubectl(
        &kubeconfig,
        &[
            "create",
            "clusterrolebinding",
            "proxy-reads",
            "--clusterrole=secret-reader",
            "--serviceaccount=default:proxy",
        ],
    )
    .await;
    assert_eq!(out.trim(), "clusterrolebinding.rbac.authorization.k8s.io/proxy-reads created");
    for namespace in ["default", "edge", "kube-system", ""] {
        let granted = review(&client, proxy, &[], on(namespace, "get", "secrets", "app")).await;
        assert!(granted.allowed, "in {namespace:?}");
        assert_eq!(
            granted.reason.as_deref(),
            Some(
                r#"RBAC: allowed by ClusterRoleBinding "proxy-reads" of ClusterRole "secret-reader" to ServiceAccount "proxy/default""#
            )
        );
    }
    assert!(!allowed(&client, proxy, on("edge", "list", "secrets", "")).await, "the role has no list");
    assert!(!allowed(&client, SA_ENVOY, on("default", "get", "secrets", "app")).await, "another account");

    // Group subjects match the review's own groups: upstream adds no implicit groups
    // to a SubjectAccessReview, so a caller lists a service account's groups itself.
    kubectl(&kubeconfig, &["create", "clusterrole", "list-secrets", "--verb=list", "--resource=secrets"]).await;
    kubectl(
        &kubeconfig,
        &[
            "create",
            "rolebinding",
            "edge-accounts",
            "--clusterrole=list-secrets",
            "--group=system:serviceaccounts:edge",
            "-n",
            "edge",
        ],
    )
    .await;
    let sa_groups = |namespace: &str| {
        [
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".into(),
        ]
    };
    let edge_groups = sa_groups("edge");
    let edge_groups: Vec<&str> = edge_groups.iter().map(String::as_str).collect();
    let by_group =
        review(&client, "system:serviceaccount:edge:any", &edge_groups, on("edge", "list", "secrets", "")).await;
    assert_eq!(
        (by_group.allowed, by_group.reason.as_deref()),
        (
            true,
            Some(
                r#"RBAC: allowed by RoleBinding "edge-accounts/edge" of ClusterRole "list-secrets" to Group "system:serviceaccounts:edge""#
            )
        )
    );
    assert!(
        !allowed(&client, "system:serviceaccount:edge:any", on("edge", "list", "secrets", "")).await,
        "no groups asked"
    );
    let default_groups = sa_groups("default");
    let default_groups: Vec<&str> = default_groups.iter().map(String::as_str).collect();
    let other =
        review(&client, "system:serviceaccount:default:any", &default_groups, on("edge", "list", "secrets", "")).await;
    assert!(!other.allowed, "a group of another namespace");
    let elsewhere =
        review(&client, "system:serviceaccount:edge:any", &edge_groups, on("default", "list", "secrets", "")).await;
    assert!(!elsewhere.allowed, "the binding is in edge only");

    // A group bound cluster-wide; a review may name groups without a user.
    kubectl(
        &kubeconfig,
        &[
            "create",
            "clusterrolebinding",
            "all-accounts",
            "--clusterrole=list-secrets",
            "--group=system:serviceaccounts",
        ],
    )
    .await;
    assert!(
        review(&client, "system:serviceaccount:default:any", &default_groups, on("default", "list", "secrets", ""))
            .await
            .allowed
    );
    assert!(review(&client, "", &["system:serviceaccounts"], on("kube-system", "list", "secrets", "")).await.allowed);
    kubectl(&kubeconfig, &["delete", "clusterrolebinding", "all-accounts"]).await;
    assert!(!review(&client, "", &["system:serviceaccounts"], on("kube-system", "list", "secrets", "")).await.allowed);
    assert_eq!(api.requests_matching(|r| r.is_create_of("subjectaccessreviews")), api.access_reviews().len());
}

#[tokio::test]
async fn applied_rules_wildcards_subresources_urls_and_dangling_bindings() {
    let api = KubeApi::start().await;
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    let client = kube_client(&api);
    let manifest = dir.path().join("rbac.yaml");
    std::fs::write(
        &manifest,
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: everything}
rules:
- {apiGroups: ["*"], resources: ["*"], verbs: ["*"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: status-and-health}
rules:
- {apiGroups: [""], resources: ["*/status"], verbs: [get]}
- {nonResourceURLs: [/healthz, "/metrics/*"], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: admins}
roleRef: {kind: ClusterRole, name: everything}
subjects: [{kind: Group, name: admins}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: bob}
roleRef: {kind: ClusterRole, name: status-and-health}
subjects: [{kind: User, name: bob}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: dangling, namespace: default}
roleRef: {kind: Role, name: missing}
subjects: [{kind: User, name: alice}]
"#,
    )
    .unwrap();
    let out = kubectl(&kubeconfig, &["apply", "-f", manifest.to_str().unwrap()]).await;
    assert_eq!(
        table(&out),
        [
            ["clusterrole.rbac.authorization.k8s.io/everything", "created"],
            ["clusterrole.rbac.authorization.k8s.io/status-and-health", "created"],
            ["clusterrolebinding.rbac.authorization.k8s.io/admins", "created"],
            ["clusterrolebinding.rbac.authorization.k8s.io/bob", "created"],
            ["rolebinding.rbac.authorization.k8s.io/dangling", "created"],
        ]
    );
    // The server filled in the API groups the manifest left out, as upstream defaults them.
    let admins = api.get_object("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "", "admins").unwrap();
    assert_eq!(admins["roleRef"]["apiGroup"], "rbac.authorization.k8s.io");
    assert_eq!(admins["subjects"][0]["apiGroup"], "rbac.authorization.k8s.io");

    let deployments = ResourceAttributes { group: Some("apps".into()), ..on("edge", "delete", "deployments", "web") };
    assert!(review(&client, "carol", &["admins"], deployments.clone()).await.allowed, "* matches everything");
    assert!(!allowed(&client, "carol", deployments).await);

    let pod_status = ResourceAttributes { subresource: Some("status".into()), ..on("default", "get", "pods", "p") };
    assert!(allowed(&client, "bob", pod_status.clone()).await, "*/status matches any resource's status");
    assert!(!allowed(&client, "bob", on("default", "get", "pods", "p")).await);
    assert!(!allowed(&client, "bob", ResourceAttributes { verb: Some("update".into()), ..pod_status }).await);
    let url = |path: &str, verb: &str| {
        let mut review = access_review("bob", &[], ResourceAttributes::default());
        review.spec.resource_attributes = None;
        review.spec.non_resource_attributes =
            Some(NonResourceAttributes { path: Some(path.into()), verb: Some(verb.into()) });
        review
    };
    let reviews: kube::Api<SubjectAccessReview> = kube::Api::all(client.clone());
    for (path, verb, expected) in [
        ("/healthz", "get", true),
        ("/metrics/x", "get", true),
        ("/metricsx", "get", false),
        ("/healthz", "post", false),
    ] {
        let answer = reviews.create(&Default::default(), &url(path, verb)).await.unwrap().status.unwrap();
        assert_eq!(answer.allowed, expected, "{verb} {path}");
    }

    // A binding whose role is missing grants nothing and says why.
    let dangling = review(&client, "alice", &[], on("default", "get", "secrets", "x")).await;
    assert_eq!(
        (dangling.allowed, dangling.reason.as_deref()),
        (false, Some(r#"RBAC: role.rbac.authorization.k8s.io "missing" not found"#))
    );
    kubectl(&kubeconfig, &["create", "role", "missing", "--verb=get", "--resource=secrets"]).await;
    assert!(allowed(&client, "alice", on("default", "get", "secrets", "x")).await, "the role, once there, counts");

    // Upstream's superusers are allowed before RBAC is asked.
    let master = review(&client, "root", &["system:masters"], on("", "delete", "namespaces", "default")).await;
    assert_eq!((master.allowed, master.reason), (true, None));

    // kubectl posts a review too and prints the answer.
    let sar = dir.path().join("sar.json");
    let body = serde_json::to_string(&access_review("alice", &[], on("default", "get", "secrets", "x"))).unwrap();
    std::fs::write(&sar, body).unwrap();
    let printed: Value =
        serde_json::from_str(&kubectl(&kubeconfig, &["create", "-f", sar.to_str().unwrap(), "-o", "json"]).await)
            .unwrap();
    assert_eq!(printed["kind"], "SubjectAccessReview");
    assert_eq!(printed["spec"]["user"], "alice");
    assert_eq!(printed["status"]["allowed"], true);
    assert_eq!(
        printed["status"]["reason"],
        r#"RBAC: allowed by RoleBinding "dangling/default" of Role "missing" to User "alice""#
    );
}

#[tokio::test]
async fn rbac_validation_and_review_errors() {
    let api = KubeApi::start().await;
    let addr = api.addr();
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    let client = kube_client(&api);
    let post = |path: &'static str, body: Value| async move {
        wire::send_json(addr, "POST", path, "application/json", &body).await
    };
    let invalid_fields = |reply: &wire::Reply| -> Vec<String> {
        assert_eq!((reply.status, reply.json()["reason"].clone()), (422, json!("Invalid")), "{}", reply.text());
        reply.json()["details"]["causes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["field"].as_str().unwrap().to_string())
            .collect()
    };

    let reply = post(
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles",
        json!({"metadata": {"name": "r"}, "rules": [{"verbs": [], "resources": ["secrets"]}, {"verbs": ["get"], "nonResourceURLs": ["/healthz"]}]}),
    )
    .await;
    assert_eq!(invalid_fields(&reply), ["rules[0].verbs", "rules[0].apiGroups", "rules[1].nonResourceURLs"]);
    let reply = post(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        json!({"metadata": {"name": "b"}, "roleRef": {"kind": "Role", "name": "r"}, "subjects": [{"kind": "ServiceAccount", "name": "sa"}, {"kind": "Robot", "name": "x"}]}),
    )
    .await;
    assert_eq!(invalid_fields(&reply), ["roleRef.kind", "subjects[0].namespace", "subjects[1].kind"]);

    // A binding's roleRef never changes.
    kubectl(&kubeconfig, &["create", "rolebinding", "fixed", "--role=a", "--user=u"]).await;
    let refused = kubeapi::kubectl(&kubeconfig)
        .args(["patch", "rolebinding", "fixed", "--type=merge", "-p", r#"{"roleRef": {"name": "b"}}"#])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot change roleRef"), "{refused:?}");

    // Reviews are create-only and must ask something of someone.
    let reviews = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
    assert_eq!(wire::get(addr, reviews).await.status, 405);
    let reply =
        post(reviews, json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {}}))
            .await;
    assert_eq!(invalid_fields(&reply), ["spec.resourceAttributes", "spec.user"]);

    // Failures on demand, counted like any review request but not answered.
    let api_reviews: kube::Api<SubjectAccessReview> = kube::Api::all(client.clone());
    let ask = access_review("u", &[], on("default", "get", "secrets", "x"));
    api.fail_reviews(true);
    for _ in 0..2 {
        match api_reviews.create(&Default::default(), &ask).await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 500),
            other => panic!("expected a 500, got {other:?}"),
        }
    }
    assert_eq!(wire::get(addr, "/api/v1/namespaces/default/secrets").await.status, 200, "only reviews fail");
    api.fail_reviews(false);
    assert!(!api_reviews.create(&Default::default(), &ask).await.unwrap().status.unwrap().allowed);
    api.fail_next_matching(1, "subjectaccessreviews");
    assert!(api_reviews.create(&Default::default(), &ask).await.is_err());
    assert!(api_reviews.create(&Default::default(), &ask).await.is_ok());
    // The invalid review above, two failed on purpose, one injected failure, two answered.
    assert_eq!(api.requests_matching(|r| r.is_create_of("subjectaccessreviews")), 6);
    assert_eq!(api.access_reviews().len(), 2);
}
