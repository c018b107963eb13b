//! HTTP: turns a request into a discovery document or a verb on a resource, and the
//! verb's outcome into a response. Every request passes the test knobs first (log,
//! unavailability, injected failures).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::control::{RequestRecord, Shared};
use super::discovery;
use super::media::{self, Render};
use super::patch::PatchType;
use super::proto;
use super::resources::{self, ResourceDef};
use super::review;
use super::selectors::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{Filter, ListError, WatchFrom};
use super::verbs::{self, DeleteOptions, ListOptions, Target, WriteOptions};
use super::watch::{self, WatchOptions};

/// Upstream refuses bodies over 3 MiB; the emulator is laxer so a test can go beyond.
const MAX_BODY: usize = 16 * 1024 * 1024;

pub fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(shared)
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let record = RequestRecord {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
        query: request.uri().query().unwrap_or("").to_string(),
    };
    shared.record(record.clone());
    if shared.is_unavailable() {
        return error(&ApiError::unavailable());
    }
    if shared.take_failure(&record) {
        return error(&ApiError::internal(format!("injected failure for {record}")));
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(e) => return error(&ApiError::bad_request(format!("reading the request body: {e}"))),
    };
    let query = parse_query(&record.query);
    let call = Call { shared: &shared, method: &parts.method, headers: &parts.headers, query: &query, body };
    match call.route(&record.path) {
        Ok(response) => response,
        Err(e) => error(&e),
    }
}

fn parse_query(raw: &str) -> HashMap<String, String> {
    raw.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes[i] {
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1]).zip(hex(bytes[i + 2])).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: StatusCode, content_type: &str, value: &Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from(serde_json::to_vec(value).expect("JSON values serialize")))
        .expect("static headers are valid")
}

fn ok(value: &Value) -> Response {
    json_response(StatusCode::OK, "application/json", value)
}

fn error(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, "application/json", &e.to_status())
}

struct Call<'a> {
    shared: &'a Arc<Shared>,
    method: &'a Method,
    headers: &'a HeaderMap,
    query: &'a HashMap<String, String>,
    body: Bytes,
}

/// A resource URL, split.
struct ResourcePath<'p> {
    def: &'static ResourceDef,
    /// From `/namespaces/NS/...`; `None` for cluster-scoped and all-namespaces paths.
    namespace: Option<&'p str>,
    name: Option<&'p str>,
}

impl Call<'_> {
    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.param(name), Some("1" | "true"))
    }

    fn render(&self) -> Render {
        media::negotiate(self.header(header::ACCEPT), self.param("includeObject"))
    }

    fn respond(&self, status: StatusCode, value: &Value) -> Response {
        json_response(status, self.render().content_type(), value)
    }

    fn route(&self, path: &str) -> Result<Response, ApiError> {
        let crds = self.shared.crds_installed();
        let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
        let get_only = || {
            if self.method == Method::GET { Ok(()) } else { Err(ApiError::method_not_allowed(self.method.as_str())) }
        };
        match segments.as_slice() {
            ["version"] => get_only().map(|()| ok(&discovery::version())),
            ["healthz" | "readyz" | "livez"] => Ok(Response::new(Body::from("ok"))),
            ["api"] => get_only().map(|()| self.discovery_root(true)),
            ["apis"] => get_only().map(|()| self.discovery_root(false)),
            ["api", version] => {
                get_only()?;
                discovery::resource_list("", version, crds).map(|d| ok(&d)).ok_or_else(ApiError::not_found_path)
            }
            ["apis", group] => {
                get_only()?;
                discovery::group(group, crds).map(|d| ok(&d)).ok_or_else(ApiError::not_found_path)
            }
            ["apis", group, version] => {
                get_only()?;
                discovery::resource_list(group, version, crds).map(|d| ok(&d)).ok_or_else(ApiError::not_found_path)
            }
            ["openapi", "v2"] => get_only().map(|()| {
                // kubectl validates a kind without a PATCH operation in v3 (a review) against
                // this document, fetched as protobuf; zero bytes is a document with no
                // schemas, which kubectl takes as "nothing to check here".
                Response::builder()
                    .header(header::CONTENT_TYPE, "application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
                    .body(Body::empty())
                    .expect("static headers are valid")
            }),
            ["openapi", "v3"] => get_only().map(|()| ok(&discovery::openapi_v3_index(crds))),
            ["openapi", "v3", rest @ ..] => {
                get_only()?;
                discovery::openapi_v3_group_version(&rest.join("/"), crds)
                    .map(|d| ok(&d))
                    .ok_or_else(ApiError::not_found_path)
            }
            ["api", version, rest @ ..] => self.resource("", version, rest),
            ["apis", group, version, rest @ ..] => self.resource(group, version, rest),
            _ => Err(ApiError::not_found_path()),
        }
    }

    fn discovery_root(&self, legacy: bool) -> Response {
        let crds = self.shared.crds_installed();
        match discovery::aggregated_version(self.header(header::ACCEPT)) {
            Some(version) => json_response(
                StatusCode::OK,
                &discovery::aggregated_content_type(version),
                &discovery::aggregated(legacy, version, crds),
            ),
            None if legacy => ok(&discovery::api_versions(self.shared.port)),
            None => ok(&discovery::group_list(crds)),
        }
    }

    fn resource(&self, group: &str, version: &str, rest: &[&str]) -> Result<Response, ApiError> {
        let crds = self.shared.crds_installed();
        let find = |plural: &str| resources::find(group, version, plural, crds).ok_or_else(ApiError::not_found_path);
        let path = match rest {
            [plural] => ResourcePath { def: find(plural)?, namespace: None, name: None },
            ["namespaces", namespace, plural] => {
                let def = find(plural)?;
                if !def.namespaced {
                    return Err(ApiError::not_found_path());
                }
                ResourcePath { def, namespace: Some(namespace), name: None }
            }
            ["namespaces", namespace, plural, name] => {
                let def = find(plural)?;
                if !def.namespaced {
                    return Err(ApiError::not_found_path());
                }
                ResourcePath { def, namespace: Some(namespace), name: Some(name) }
            }
            [plural, name] => {
                let def = find(plural)?;
                // `/api/v1/secrets/x` has no meaning: namespaced objects live under a namespace.
                if def.namespaced {
                    return Err(ApiError::not_found_path());
                }
                ResourcePath { def, namespace: None, name: Some(name) }
            }
            _ => return Err(ApiError::not_found_path()),
        };
        if path.def.review {
            return self.review(&path);
        }
        match path.name {
            Some(name) => self.object(&path, name),
            None => self.collection(&path),
        }
    }

    /// A review is only ever created: POST on the collection, answered and not stored.
    fn review(&self, path: &ResourcePath<'_>) -> Result<Response, ApiError> {
        if *self.method != Method::POST || path.name.is_some() {
            return Err(ApiError::method_not_allowed(self.method.as_str()));
        }
        let answer = review::create(self.shared, path.def, self.json_body()?)?;
        Ok(json_response(StatusCode::CREATED, "application/json", &answer))
    }

    fn target<'p>(&self, path: &'p ResourcePath<'p>) -> Target<'p> {
        Target { def: path.def, namespace: path.namespace.unwrap_or("") }
    }

    fn write_options(&self) -> WriteOptions {
        WriteOptions {
            dry_run: self.param("dryRun") == Some("All"),
            field_manager: self.param("fieldManager").map(String::from),
        }
    }

    /// The request's object: JSON, or protobuf for the kinds kubectl's typed clients send.
    fn object_body(&self, def: &ResourceDef) -> Result<Value, ApiError> {
        let content_type = self.header(header::CONTENT_TYPE).unwrap_or("application/json");
        if content_type.starts_with("application/vnd.kubernetes.protobuf") {
            return proto::decode(def, &self.body);
        }
        self.json_body()
    }

    fn json_body(&self) -> Result<Value, ApiError> {
        let content_type = self.header(header::CONTENT_TYPE).unwrap_or("application/json");
        if content_type.contains("protobuf") {
            return Err(ApiError::unsupported_media_type(content_type));
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            ApiError::bad_request(format!("the emulator reads JSON request bodies only ({content_type}): {e}"))
        })
    }

    fn object(&self, path: &ResourcePath<'_>, name: &str) -> Result<Response, ApiError> {
        let target = self.target(path);
        let def = path.def;
        let render = self.render();
        match *self.method {
            Method::GET => {
                let obj = verbs::get(&self.shared.store, target, name)?;
                Ok(self.respond(StatusCode::OK, &render.object(def, &obj)))
            }
            Method::PUT => {
                let (obj, created) =
                    verbs::update(&self.shared.store, target, name, self.object_body(def)?, &self.write_options())?;
                let status = if created { StatusCode::CREATED } else { StatusCode::OK };
                Ok(self.respond(status, &render.object(def, &obj)))
            }
            Method::PATCH => {
                let content_type = self.header(header::CONTENT_TYPE).unwrap_or("");
                let patch_type = PatchType::from_content_type(content_type)
                    .ok_or_else(|| ApiError::unsupported_media_type(content_type))?;
                let (obj, created) =
                    verbs::patch(&self.shared.store, target, name, patch_type, &self.body, &self.write_options())?;
                let status = if created { StatusCode::CREATED } else { StatusCode::OK };
                Ok(self.respond(status, &render.object(def, &obj)))
            }
            Method::DELETE => {
                let body = if self.body.is_empty() { json!({}) } else { self.json_body()? };
                let opts = DeleteOptions::from_body(&body, self.param("dryRun") == Some("All"));
                Ok(ok(&verbs::delete(&self.shared.store, target, name, &opts)?))
            }
            _ => Err(ApiError::method_not_allowed(self.method.as_str())),
        }
    }

    fn filter(&self, path: &ResourcePath<'_>) -> Result<Filter, ApiError> {
        let labels = LabelSelector::parse(self.param("labelSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("invalid labelSelector: {e}")))?;
        let fields = FieldSelector::parse(self.param("fieldSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("invalid fieldSelector: {e}")))?;
        let namespace = if path.def.namespaced { path.namespace.map(String::from) } else { None };
        Ok(Filter { def: path.def, namespace, labels, fields })
    }

    fn collection(&self, path: &ResourcePath<'_>) -> Result<Response, ApiError> {
        let def = path.def;
        match *self.method {
            Method::GET if self.flag("watch") => self.watch(path),
            Method::GET => self.list(path),
            Method::POST => {
                if def.namespaced && path.namespace.is_none() {
                    return Err(ApiError::method_not_allowed("POST"));
                }
                let obj = verbs::create(
                    &self.shared.store,
                    self.target(path),
                    self.object_body(def)?,
                    &self.write_options(),
                )?;
                Ok(self.respond(StatusCode::CREATED, &self.render().object(def, &obj)))
            }
            Method::DELETE if def.verbs().contains(&"deletecollection") => {
                let filter = self.filter(path)?;
                let deleted: Vec<Arc<Value>> =
                    verbs::delete_collection(&self.shared.store, &filter, self.param("dryRun") == Some("All"))
                        .into_iter()
                        .map(Arc::new)
                        .collect();
                let meta = json!({"resourceVersion": self.shared.store.current_rv().to_string()});
                Ok(ok(&Render::Plain.list(def, &deleted, meta)))
            }
            _ => Err(ApiError::method_not_allowed(self.method.as_str())),
        }
    }

    fn list(&self, path: &ResourcePath<'_>) -> Result<Response, ApiError> {
        let filter = self.filter(path)?;
        let limit = match self.param("limit").filter(|l| !l.is_empty()) {
            Some(text) => {
                Some(text.parse::<usize>().map_err(|_| ApiError::bad_request(format!("invalid limit {text:?}")))?)
            }
            None => None,
        };
        let opts = ListOptions {
            limit,
            continue_token: self.param("continue").filter(|c| !c.is_empty()).map(String::from),
            resource_version: self.param("resourceVersion").map(String::from),
            resource_version_match: self.param("resourceVersionMatch").map(String::from),
        };
        let result = verbs::list(&self.shared.store, &filter, &opts)?;
        let mut meta = json!({"resourceVersion": result.resource_version.to_string()});
        if let Some(token) = result.continue_token {
            meta["continue"] = json!(token);
            meta["remainingItemCount"] = json!(result.remaining.unwrap_or(0));
        }
        Ok(self.respond(StatusCode::OK, &self.render().list(path.def, &result.items, meta)))
    }

    fn watch(&self, path: &ResourcePath<'_>) -> Result<Response, ApiError> {
        let filter = self.filter(path)?;
        let from = match self.param("resourceVersion").filter(|rv| !rv.is_empty() && *rv != "0") {
            None => WatchFrom::Now,
            Some(rv) => WatchFrom::After(
                rv.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?,
            ),
        };
        let timeout = match self.param("timeoutSeconds").filter(|t| !t.is_empty()) {
            Some(text) => Some(Duration::from_secs(
                text.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {text:?}")))?,
            )),
            None => None,
        };
        let render = self.render();
        let body = match self.shared.store.subscribe(filter, from) {
            Ok(sub) => {
                let opts = WatchOptions {
                    def: path.def,
                    render,
                    bookmarks: self.flag("allowWatchBookmarks"),
                    initial_events_end: self.flag("sendInitialEvents"),
                    timeout,
                };
                watch::spawn(self.shared.clone(), sub, opts)
            }
            // Upstream answers 200 and reports the expiry as the stream's only event.
            Err(ListError::Expired { asked, oldest }) => {
                watch::expired_body(format!("too old resource version: {asked} ({oldest})"))
            }
            Err(ListError::TooLarge { asked, current }) => {
                return Err(ApiError::too_large_resource_version(asked, current));
            }
        };
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, render.content_type())
            .header(header::CACHE_CONTROL, "no-cache, private")
            .body(body)
            .expect("static headers are valid"))
    }
}
