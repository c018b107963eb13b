//! The object store: what etcd plus the API server's watch cache are upstream.
//!
//! One global resourceVersion counts every write; each write is kept in a bounded
//! history so that a watch can resume from an older version and a paginated list can
//! be served as of its first page. A version older than the history is expired (410),
//! as after an etcd compaction.
//!
//! Writers hold one mutex for the whole read-modify-write, so writes are atomic and
//! watchers see them in resourceVersion order. A writer never waits for a watcher:
//! each watcher has a bounded queue, and one that falls behind is cut off (its stream
//! then ends with a 410 ERROR, like upstream's cacher closing a slow watcher).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::mpsc;

use super::resources::ResourceDef;
use super::selectors::{FieldSelector, LabelSelector};

pub type Obj = Arc<Value>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// Ordered like etcd keys (`/registry/secrets/NAMESPACE/NAME`), which is the order
/// lists come back in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub storage: &'static str,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(def: &ResourceDef, namespace: &str, name: &str) -> Key {
        let namespace = if def.namespaced { namespace } else { "" };
        Key { storage: def.storage, namespace: namespace.to_string(), name: name.to_string() }
    }
}

/// One write. `object` is the state after it; for a delete, the last state carrying
/// the delete's resourceVersion, as upstream's DELETED events do.
struct Change {
    rv: u64,
    key: Key,
    object: Obj,
    prev: Option<Obj>,
    deleted: bool,
}

#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub kind: EventType,
    /// In the watched resource's form.
    pub object: Obj,
}

#[derive(Debug, Clone)]
pub struct Filter {
    pub def: &'static ResourceDef,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn all(def: &'static ResourceDef) -> Filter {
        Filter { def, namespace: None, labels: LabelSelector::default(), fields: FieldSelector::default() }
    }

    fn covers(&self, key: &Key) -> bool {
        key.storage == self.def.storage && self.namespace.as_ref().is_none_or(|ns| *ns == key.namespace)
    }

    pub fn matches(&self, served: &Value) -> bool {
        self.labels.matches(served) && self.fields.matches(served)
    }

    /// How a change looks through this filter: an object that starts or stops matching
    /// a selector is ADDED or DELETED for this watcher, as upstream does.
    fn classify(&self, change: &Change) -> Option<WatchEvent> {
        if !self.covers(&change.key) {
            return None;
        }
        let object = self.def.serve(&change.object);
        let now = self.matches(&object);
        let kind = if change.deleted {
            now.then_some(EventType::Deleted)?
        } else {
            let before = change.prev.as_ref().map(|p| self.matches(&self.def.serve(p)));
            match (before, now) {
                (None | Some(false), true) => EventType::Added,
                (Some(true), true) => EventType::Modified,
                (Some(true), false) => EventType::Deleted,
                (_, false) => return None,
            }
        };
        Some(WatchEvent { kind, object })
    }
}

struct Watcher {
    filter: Filter,
    tx: mpsc::Sender<WatchEvent>,
    too_slow: Arc<AtomicBool>,
}

/// A registered watch: the events to send first, then the live queue.
pub struct Subscription {
    pub initial: Vec<WatchEvent>,
    pub rx: mpsc::Receiver<WatchEvent>,
    /// Set when the store cut this watcher off for falling behind.
    pub too_slow: Arc<AtomicBool>,
    /// The resourceVersion the initial events are consistent with.
    pub rv: u64,
}

pub enum WatchFrom {
    /// No resourceVersion, or "0": synthetic ADDED events for the current state first.
    Now,
    /// Every change after this resourceVersion.
    After(u64),
}

/// Where a list reads from.
pub enum ListAt {
    Latest,
    /// Exactly this resourceVersion (pagination, `resourceVersionMatch=Exact`).
    Exact(u64),
}

pub enum ListError {
    Expired { asked: u64, oldest: u64 },
    TooLarge { asked: u64, current: u64 },
}

pub struct Page {
    pub items: Vec<Obj>,
    pub rv: u64,
    /// The key of the last item, when more matching items follow.
    pub last: Option<Key>,
    pub remaining: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Writes kept for watches to resume from and paginated lists to read at.
    pub history: usize,
    /// Events queued for one watcher before it is cut off.
    pub watch_queue: usize,
}

pub struct Store {
    inner: Mutex<Inner>,
    limits: Limits,
    cut_off: AtomicUsize,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Obj>,
    history: VecDeque<Change>,
    /// Watches and reads at any version from this one on can be served from history.
    oldest_rv: u64,
    watchers: Vec<Watcher>,
}

impl Store {
    pub fn new(limits: Limits) -> Store {
        let inner =
            Inner { rv: 0, objects: BTreeMap::new(), history: VecDeque::new(), oldest_rv: 0, watchers: Vec::new() };
        Store { inner: Mutex::new(inner), limits, cut_off: AtomicUsize::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not take every later request down with it.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` with exclusive access: a read-modify-write in `f` is atomic.
    pub fn write<R>(&self, f: impl FnOnce(&mut Txn<'_>) -> R) -> R {
        let mut inner = self.lock();
        let mut txn = Txn { inner: &mut inner, limits: self.limits, cut_off: &self.cut_off };
        f(&mut txn)
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// Forgets the history: every resourceVersion before the current one is expired.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.history.clear();
        inner.oldest_rv = inner.rv;
    }

    /// Watchers cut off so far for falling behind.
    pub fn cut_off_count(&self) -> usize {
        self.cut_off.load(Ordering::SeqCst)
    }

    pub fn list(
        &self,
        filter: &Filter,
        at: ListAt,
        after: Option<&Key>,
        limit: Option<usize>,
    ) -> Result<Page, ListError> {
        let inner = self.lock();
        let rv = match at {
            ListAt::Latest => inner.rv,
            ListAt::Exact(asked) if asked > inner.rv => return Err(ListError::TooLarge { asked, current: inner.rv }),
            ListAt::Exact(asked) if asked < inner.oldest_rv => {
                return Err(ListError::Expired { asked, oldest: inner.oldest_rv });
            }
            ListAt::Exact(asked) => asked,
        };
        let snapshot = inner.snapshot(filter, rv);
        drop(inner);
        let start = match after {
            Some(key) => Bound::Excluded(key.clone()),
            None => Bound::Unbounded,
        };
        let mut page = Page { items: Vec::new(), rv, last: None, remaining: 0 };
        for (key, stored) in snapshot.range((start, Bound::Unbounded)) {
            let served = filter.def.serve(stored);
            if !filter.matches(&served) {
                continue;
            }
            if limit.is_some_and(|limit| page.items.len() >= limit) {
                page.remaining += 1;
                continue;
            }
            page.items.push(served);
            page.last = Some(key.clone());
        }
        if page.remaining == 0 {
            page.last = None;
        }
        Ok(page)
    }

    pub fn subscribe(&self, filter: Filter, from: WatchFrom) -> Result<Subscription, ListError> {
        let mut inner = self.lock();
        let initial = match from {
            WatchFrom::Now => {
                let rv = inner.rv;
                let snapshot = inner.snapshot(&filter, rv);
                snapshot
                    .values()
                    .map(|stored| filter.def.serve(stored))
                    .filter(|served| filter.matches(served))
                    .map(|object| WatchEvent { kind: EventType::Added, object })
                    .collect()
            }
            WatchFrom::After(asked) if asked < inner.oldest_rv => {
                return Err(ListError::Expired { asked, oldest: inner.oldest_rv });
            }
            WatchFrom::After(asked) => {
                inner.history.iter().filter(|c| c.rv > asked).filter_map(|c| filter.classify(c)).collect()
            }
        };
        let (tx, rx) = mpsc::channel(self.limits.watch_queue.max(1));
        let too_slow = Arc::new(AtomicBool::new(false));
        inner.watchers.push(Watcher { filter, tx, too_slow: too_slow.clone() });
        Ok(Subscription { initial, rx, too_slow, rv: inner.rv })
    }

    /// Everything queued for `rx` plus the resourceVersion it is complete up to. Taken
    /// under the write lock, so no write is half-delivered: a BOOKMARK at this version
    /// never overtakes an event it covers.
    pub fn sync_point(&self, rx: &mut mpsc::Receiver<WatchEvent>) -> (Vec<WatchEvent>, u64) {
        let inner = self.lock();
        let mut queued = Vec::new();
        while let Ok(event) = rx.try_recv() {
            queued.push(event);
        }
        (queued, inner.rv)
    }
}

impl Inner {
    /// The objects `filter` covers as they were at `rv` (which history must cover).
    fn snapshot(&self, filter: &Filter, rv: u64) -> BTreeMap<Key, Obj> {
        let low = Key {
            storage: filter.def.storage,
            namespace: filter.namespace.clone().unwrap_or_default(),
            name: String::new(),
        };
        let mut objects: BTreeMap<Key, Obj> = self
            .objects
            .range(low..)
            .take_while(|(key, _)| filter.covers(key))
            .map(|(key, obj)| (key.clone(), obj.clone()))
            .collect();
        for change in self.history.iter().rev().take_while(|c| c.rv > rv) {
            if !filter.covers(&change.key) {
                continue;
            }
            match &change.prev {
                Some(prev) => objects.insert(change.key.clone(), prev.clone()),
                None => objects.remove(&change.key),
            };
        }
        objects
    }
}

/// Exclusive access to the store for one atomic operation.
pub struct Txn<'a> {
    inner: &'a mut Inner,
    limits: Limits,
    cut_off: &'a AtomicUsize,
}

impl Txn<'_> {
    /// The object in `def`'s form.
    pub fn get(&self, def: &ResourceDef, namespace: &str, name: &str) -> Option<Value> {
        self.inner.objects.get(&Key::new(def, namespace, name)).map(|stored| (*def.serve(stored)).clone())
    }

    /// Every current object `filter` covers (its selectors are not applied).
    pub fn list(&self, filter: &Filter) -> Vec<Value> {
        let rv = self.inner.rv;
        self.inner.snapshot(filter, rv).values().map(|s| (*filter.def.serve(s)).clone()).collect()
    }

    /// Stores `served` (in `def`'s form, with namespace and name set) at the next
    /// resourceVersion and returns it as stored.
    pub fn put(&mut self, def: &ResourceDef, mut served: Value) -> Value {
        let rv = self.inner.rv + 1;
        served["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let namespace = served.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
        let name = served.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
        let key = Key::new(def, namespace, name);
        let stored: Obj = Arc::new(def.store(served.clone()));
        let prev = self.inner.objects.insert(key.clone(), stored.clone());
        self.record(Change { rv, key, object: stored, prev, deleted: false });
        served
    }

    /// Removes the object; returns its last state in `def`'s form.
    pub fn delete(&mut self, def: &ResourceDef, namespace: &str, name: &str) -> Option<Value> {
        let removed = self.delete_key(&Key::new(def, namespace, name))?;
        Some((*def.serve(&removed)).clone())
    }

    /// Every key in `namespace`, whatever its resource.
    pub fn keys_in_namespace(&self, namespace: &str) -> Vec<Key> {
        self.inner.objects.keys().filter(|k| k.namespace == namespace).cloned().collect()
    }

    pub fn delete_key(&mut self, key: &Key) -> Option<Obj> {
        let prev = self.inner.objects.remove(key)?;
        let rv = self.inner.rv + 1;
        let mut last = (*prev).clone();
        last["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        self.record(Change { rv, key: key.clone(), object: Arc::new(last), prev: Some(prev.clone()), deleted: true });
        Some(prev)
    }

    fn record(&mut self, change: Change) {
        self.inner.rv = change.rv;
        let cut_off = self.cut_off;
        self.inner.watchers.retain(|watcher| {
            let Some(event) = watcher.filter.classify(&change) else { return !watcher.tx.is_closed() };
            match watcher.tx.try_send(event) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    watcher.too_slow.store(true, Ordering::SeqCst);
                    cut_off.fetch_add(1, Ordering::SeqCst);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        self.inner.history.push_back(change);
        while self.inner.history.len() > self.limits.history {
            if let Some(oldest) = self.inner.history.pop_front() {
                self.inner.oldest_rv = oldest.rv;
            }
        }
    }
}
