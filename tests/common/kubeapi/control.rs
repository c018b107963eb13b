//! The state every request handler shares: the store, the configuration, and the knobs
//! a test turns (unavailability, injected failures, the request log, open watches).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::store::{Limits, Store};

/// Emulator settings; `Config::default()` suits most tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK. Upstream sends
    /// one about every minute; tests want to see them sooner.
    pub bookmark_interval: Duration,
    /// Writes kept for watch resumption and paginated lists; older versions are expired.
    pub history: usize,
    /// Events queued per watcher before the watcher is cut off with a 410.
    pub watch_queue: usize,
    /// Whether the CRDs of the custom resources (the Gateway API's ReferenceGrant) are
    /// installed at start; without them their URLs answer 404 and discovery omits them,
    /// as on a cluster without the CRDs. [`super::KubeApi::install_crds`] installs them.
    pub crds_installed: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config { bookmark_interval: Duration::from_secs(1), history: 10_000, watch_queue: 1024, crds_installed: true }
    }
}

impl Config {
    pub fn limits(&self) -> Limits {
        Limits { history: self.history, watch_queue: self.watch_queue }
    }
}

/// One request as the server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string, empty when there was none.
    pub query: String,
}

impl RequestRecord {
    pub fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    pub fn is_watch(&self) -> bool {
        self.method == "GET" && matches!(self.param("watch").as_deref(), Some("1" | "true"))
    }

    /// A GET of a collection that is not a watch.
    pub fn is_list_of(&self, plural: &str) -> bool {
        self.method == "GET" && !self.is_watch() && self.path.ends_with(&format!("/{plural}"))
    }

    pub fn is_watch_of(&self, plural: &str) -> bool {
        self.is_watch() && self.path.ends_with(&format!("/{plural}"))
    }

    /// A POST to a collection: a create, or a review such as `subjectaccessreviews`.
    pub fn is_create_of(&self, plural: &str) -> bool {
        self.method == "POST" && self.path.ends_with(&format!("/{plural}"))
    }
}

impl std::fmt::Display for RequestRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.query.is_empty() {
            write!(f, "{} {}", self.method, self.path)
        } else {
            write!(f, "{} {}?{}", self.method, self.path, self.query)
        }
    }
}

struct FailRule {
    remaining: usize,
    /// Only requests whose `METHOD path?query` contains this fail.
    needle: Option<String>,
}

pub struct Shared {
    pub store: Store,
    pub config: Config,
    pub port: u16,
    unavailable: AtomicBool,
    failures: Mutex<Vec<FailRule>>,
    log: Mutex<Vec<RequestRecord>>,
    /// Cancelled (and replaced) to end every open watch at once.
    watch_cut: Mutex<CancellationToken>,
    open_watches: AtomicUsize,
    /// While set, every SubjectAccessReview is answered 500.
    fail_reviews: AtomicBool,
    /// Every SubjectAccessReview answered, with its status, in order.
    reviews: Mutex<Vec<serde_json::Value>>,
    /// The custom resources are served ([`Config::crds_installed`]).
    crds: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub fn new(config: Config, port: u16) -> Shared {
        Shared {
            store: Store::new(config.limits()),
            port,
            unavailable: AtomicBool::new(false),
            failures: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            watch_cut: Mutex::new(CancellationToken::new()),
            open_watches: AtomicUsize::new(0),
            fail_reviews: AtomicBool::new(false),
            reviews: Mutex::new(Vec::new()),
            crds: AtomicBool::new(config.crds_installed),
            config,
        }
    }

    pub fn crds_installed(&self) -> bool {
        self.crds.load(Ordering::SeqCst)
    }

    pub fn install_crds(&self) {
        self.crds.store(true, Ordering::SeqCst);
    }

    pub fn record(&self, record: RequestRecord) {
        lock(&self.log).push(record);
    }

    pub fn request_log(&self) -> Vec<RequestRecord> {
        lock(&self.log).clone()
    }

    pub fn clear_request_log(&self) {
        lock(&self.log).clear();
        lock(&self.reviews).clear();
    }

    pub fn set_fail_reviews(&self, fail: bool) {
        self.fail_reviews.store(fail, Ordering::SeqCst);
    }

    pub fn reviews_fail(&self) -> bool {
        self.fail_reviews.load(Ordering::SeqCst)
    }

    pub fn record_review(&self, review: serde_json::Value) {
        lock(&self.reviews).push(review);
    }

    pub fn reviews(&self) -> Vec<serde_json::Value> {
        lock(&self.reviews).clone()
    }

    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    pub fn is_unavailable(&self) -> bool {
        self.unavailable.load(Ordering::SeqCst)
    }

    pub fn fail_next(&self, count: usize, needle: Option<&str>) {
        lock(&self.failures).push(FailRule { remaining: count, needle: needle.map(String::from) });
    }

    /// Whether this request is one of the injected failures (and counts it).
    pub fn take_failure(&self, request: &RequestRecord) -> bool {
        let line = request.to_string();
        let mut rules = lock(&self.failures);
        let hit =
            rules.iter_mut().find(|r| r.remaining > 0 && r.needle.as_ref().is_none_or(|n| line.contains(n.as_str())));
        let failed = hit.map(|rule| rule.remaining -= 1).is_some();
        rules.retain(|r| r.remaining > 0);
        failed
    }

    pub fn watch_cut_token(&self) -> CancellationToken {
        lock(&self.watch_cut).clone()
    }

    pub fn drop_watches(&self) {
        let old = std::mem::replace(&mut *lock(&self.watch_cut), CancellationToken::new());
        old.cancel();
    }

    pub fn open_watches(&self) -> usize {
        self.open_watches.load(Ordering::SeqCst)
    }

    /// Counts a watch as open until the guard drops.
    pub fn watch_opened(self: &Arc<Self>) -> WatchGuard {
        self.open_watches.fetch_add(1, Ordering::SeqCst);
        WatchGuard(self.clone())
    }
}

pub struct WatchGuard(Arc<Shared>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}
