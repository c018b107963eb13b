//! The Kubernetes API server emulator (tests/common/kubeapi) against the real kubectl
//! and against raw HTTP, the way kube-rs' watcher talks to it: paginated list, watch
//! from the list's resourceVersion with bookmarks, 410 Expired, dropped connections.

mod common;

use std::path::Path;
use std::time::Duration;

use common::kubeapi::{self, Config, KubeApi};
use common::pki::Ca;
use common::util::{self, WAIT};
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
    assert_eq!(group_names, ["events.k8s.io", "coordination.k8s.io"]);
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
