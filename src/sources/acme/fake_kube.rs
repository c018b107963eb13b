//! An in-memory Kubernetes API server for unit tests, behind a real `kube::Client`, so
//! the code under test makes its real requests: objects by path; GET (404 when
//! missing; a collection is a list, a watch an error the watcher retries); POST (409
//! AlreadyExists); PUT (409 Conflict unless the resourceVersion read is the stored
//! one); every write bumps the resourceVersion as the API server does. Faults and
//! delays are scripted per request; delays run on tokio's (paused) clock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// Item path (`/api/v1/namespaces/NS/secrets/NAME`) -> object.
    objects: BTreeMap<String, Value>,
    version: u64,
    faults: Vec<Fault>,
    /// `METHOD path` of every request, in order.
    requests: Vec<String>,
}

/// A scripted answer for the next `times` requests with `method` whose path contains `path`.
struct Fault {
    method: Method,
    path: String,
    action: Action,
    times: usize,
}

#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// Answer with this HTTP status (an API `Status` object).
    Status(u16),
    /// Another writer updates the object just before this request (a PUT then conflicts).
    ConcurrentWrite,
    /// Answer after this long.
    Delay(Duration),
    /// Never answer.
    Hang,
}

pub fn secret_path(namespace: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/secrets/{name}")
}

pub fn lease_path(namespace: &str, name: &str) -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}")
}

impl FakeApi {
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let api = api.clone();
            async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    pub fn fault(&self, method: Method, path: &str, action: Action, times: usize) {
        self.lock().faults.push(Fault { method, path: path.to_string(), action, times });
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.lock().objects.get(path).cloned()
    }

    /// Stores `object` at `path` as another writer would: a new resourceVersion.
    pub fn put(&self, path: &str, mut object: Value) -> Value {
        let mut state = self.lock();
        state.version += 1;
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.objects.insert(path.to_string(), object.clone());
        object
    }

    /// The requests so far, as `METHOD path`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake API lock")
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let body = req.into_body().collect_bytes().await.unwrap_or_default();
        let action = {
            let mut state = self.lock();
            state.requests.push(format!("{method} {path}"));
            let found = state.faults.iter_mut().position(|f| f.method == method && path.contains(&f.path));
            found.map(|i| {
                let fault = &mut state.faults[i];
                fault.times -= 1;
                let action = fault.action;
                if fault.times == 0 {
                    state.faults.remove(i);
                }
                action
            })
        };
        match action {
            Some(Action::Status(code)) => return status(code, "Scripted", "scripted failure"),
            Some(Action::Delay(d)) => tokio::time::sleep(d).await,
            Some(Action::Hang) => std::future::pending::<()>().await,
            Some(Action::ConcurrentWrite) => {
                if let Some(object) = self.get(&path) {
                    self.put(&path, object);
                }
            }
            None => {}
        }
        let mut state = self.lock();
        match method {
            Method::GET if query.contains("watch=") => status(500, "InternalError", "no watches here"),
            Method::GET => match state.objects.get(&path) {
                Some(object) => ok(200, object),
                None if path.ends_with('s') && !path.contains("/secrets/") && !path.contains("/leases/") => {
                    let prefix = format!("{path}/");
                    let items: Vec<&Value> =
                        state.objects.iter().filter(|(p, _)| p.starts_with(&prefix)).map(|(_, o)| o).collect();
                    let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": state.version.to_string()}, "items": items});
                    ok(200, &list)
                }
                None => status(404, "NotFound", "not found"),
            },
            Method::POST => {
                let mut object: Value = serde_json::from_slice(&body).expect("a JSON object");
                let item = format!("{path}/{}", object["metadata"]["name"].as_str().expect("a name"));
                if state.objects.contains_key(&item) {
                    return status(409, "AlreadyExists", "already exists");
                }
                state.version += 1;
                object["metadata"]["resourceVersion"] = json!(state.version.to_string());
                state.objects.insert(item, object.clone());
                ok(201, &object)
            }
            Method::PUT => {
                let mut object: Value = serde_json::from_slice(&body).expect("a JSON object");
                let Some(stored) = state.objects.get(&path) else { return status(404, "NotFound", "not found") };
                if object["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified");
                }
                state.version += 1;
                object["metadata"]["resourceVersion"] = json!(state.version.to_string());
                state.objects.insert(path, object.clone());
                ok(200, &object)
            }
            _ => status(405, "MethodNotAllowed", "not here"),
        }
    }
}

fn ok(code: u16, object: &Value) -> Response<Body> {
    respond(code, object)
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let status = json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    respond(code, &status)
}

fn respond(code: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(value).expect("JSON")))
        .expect("a response")
}
