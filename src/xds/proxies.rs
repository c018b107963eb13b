//! What every connected proxy has: node, address, and per secret the version sent, the
//! version acked and the last NACK. Read by admin status and the rollout watch.
//!
//! Each stream owns its entry ([`StreamHandle`]) and updates it under its own, in
//! practice uncontended, lock: a push to ten thousand streams touches no shared map or
//! counter. Only what a rollout watch counts (a name subscribed or let go, an ACK or a
//! NACK) also updates that name's counts in a shared index, once per event, so a watch
//! reads a rollout in O(1) instead of scanning every stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use dashmap::DashMap;

use crate::metrics::{Metrics, ProtocolLabel};
use crate::unix_time;
use crate::version::Version;

/// Default of the most rollout watches served at once (`certwire status --watch`, the
/// status API's WatchRollout); more are refused with RESOURCE_EXHAUSTED.
pub const MAX_ROLLOUT_WATCHERS: usize = 64;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NameStatus {
    pub name: Arc<str>,
    pub sent_version: Option<Version>,
    pub acked_version: Option<Version>,
    pub last_nack: Option<String>,
    /// The version the last NACK refused; it is never sent again on this stream.
    pub nacked_version: Option<Version>,
    /// Why this proxy may not read the name (authorization); nothing is sent while set.
    pub denied: Option<Arc<str>>,
    /// Delta: announced in `removed_resources` (its source withdrew it, or the grant was
    /// revoked) since it was last sent; the proxy holds no version of it.
    pub removed: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamStatus {
    pub stream_id: u64,
    pub node_id: String,
    pub cluster: String,
    pub address: String,
    /// Who the transport proved the proxy is (client certificate, Unix peer); what
    /// authorization decides on. The node id is what the proxy says of itself.
    pub identity: String,
    pub protocol: &'static str,
    pub connected_unix_ms: i64,
    pub secrets: Vec<NameStatus>,
}

/// Per connected stream: `Box<str>` rather than `String` (8 bytes less each, never
/// appended to).
struct StreamState {
    node_id: Box<str>,
    cluster: Box<str>,
    address: Box<str>,
    identity: Box<str>,
    connected: SystemTime,
    secrets: Names,
    /// Set by [`Proxies::close`]: the stream's names no longer count in rollouts.
    closed: bool,
}

/// The names of one stream, in the order subscribed (until one is let go past
/// [`Names::INDEX_ABOVE`]). A stream carries one name (Envoy) or a few: a Vec searched
/// in place is smaller than any map, and this is per connected proxy. A request may name
/// tens of thousands, though: past [`Names::INDEX_ABOVE`] names, a map from name to
/// position keeps every lookup O(1).
#[derive(Default)]
struct Names {
    list: Vec<NameStatus>,
    /// Boxed: 8 bytes on every stream instead of a map's 48, for the few that need one.
    #[allow(clippy::box_collection)]
    index: Option<Box<HashMap<Arc<str>, usize>>>,
}

impl Names {
    /// Linear search up to this many names; an index beyond.
    const INDEX_ABOVE: usize = 8;
    /// The index goes again at this many (not at once below `INDEX_ABOVE`, so a stream
    /// going up and down around it does not rebuild it each time).
    const INDEX_UNTIL: usize = Self::INDEX_ABOVE / 2;

    fn position(&self, name: &str) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(name).copied(),
            None => self.list.iter().position(|n| &*n.name == name),
        }
    }

    /// Appends a name not yet present; returns its position.
    fn push(&mut self, status: NameStatus) -> usize {
        let at = self.list.len();
        if let Some(index) = &mut self.index {
            index.insert(status.name.clone(), at);
        }
        self.list.push(status);
        if self.index.is_none() && self.list.len() > Self::INDEX_ABOVE {
            let index = self.list.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect();
            self.index = Some(Box::new(index));
        }
        at
    }

    fn remove(&mut self, name: &str) -> Option<NameStatus> {
        let Some(index) = &mut self.index else {
            let at = self.position(name)?;
            return Some(self.list.remove(at));
        };
        let at = index.remove(name)?;
        let removed = self.list.swap_remove(at);
        if let Some(moved) = self.list.get(at) {
            index.insert(moved.name.clone(), at);
        }
        if self.list.len() <= Self::INDEX_UNTIL {
            self.index = None;
        }
        if self.list.capacity() > 4 * self.list.len().max(1) {
            self.list.shrink_to(2 * self.list.len());
        }
        Some(removed)
    }
}

/// What one stream's entry for a name adds to that name's rollout counts: nothing while
/// the stream may not read it (it will never ack), else the versions it acked and refused.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Tally {
    acked: Option<Version>,
    nacked: Option<Version>,
}

fn tally(n: &NameStatus) -> Option<Tally> {
    n.denied.is_none().then_some(Tally { acked: n.acked_version, nacked: n.nacked_version })
}

/// Per name, over the open streams that may read it.
#[derive(Default)]
struct NameCounts {
    subscribed: u32,
    /// Per version: streams whose last ACK was that version, streams whose last NACK
    /// refused it. A stream counts at most once in each column.
    versions: HashMap<Version, (u32, u32)>,
}

impl NameCounts {
    fn add(&mut self, t: Tally, by: i32) {
        self.subscribed = self.subscribed.wrapping_add_signed(by);
        if let Some(v) = t.acked {
            self.bump(v, by, 0);
        }
        if let Some(v) = t.nacked {
            self.bump(v, 0, by);
        }
    }

    fn bump(&mut self, v: Version, acked: i32, nacked: i32) {
        let c = self.versions.entry(v).or_default();
        c.0 = c.0.wrapping_add_signed(acked);
        c.1 = c.1.wrapping_add_signed(nacked);
        if *c == (0, 0) {
            self.versions.remove(&v);
        }
    }
}

/// Rollout counts of every subscribed name, kept up to date by the streams.
#[derive(Default)]
struct Rollouts {
    names: DashMap<Arc<str>, NameCounts>,
}

impl Rollouts {
    /// One stream's entry for `name` went from `before` to `after` (None: absent or not
    /// counted). Called under that stream's lock, so a stream's changes apply in order.
    fn update(&self, name: &Arc<str>, before: Option<Tally>, after: Option<Tally>) {
        if before == after {
            return;
        }
        let mut counts = match self.names.get_mut(&**name) {
            Some(counts) => counts,
            None => self.names.entry(name.clone()).or_default(),
        };
        if let Some(t) = before {
            counts.add(t, -1);
        }
        if let Some(t) = after {
            counts.add(t, 1);
        }
        let empty = counts.subscribed == 0;
        debug_assert!(!empty || counts.versions.is_empty(), "versions counted for no stream");
        drop(counts);
        if empty {
            self.names.remove_if(&**name, |_, c| c.subscribed == 0);
        }
    }

    fn get(&self, name: &str, version: Option<Version>) -> (u32, u32, u32) {
        let Some(counts) = self.names.get(name) else { return (0, 0, 0) };
        let (acked, nacked) = version.and_then(|v| counts.versions.get(&v).copied()).unwrap_or((0, 0));
        (counts.subscribed, acked, nacked)
    }
}

/// One stream's entry, shared by its task (writer) and the registry (readers).
pub struct StreamHandle {
    pub id: u64,
    pub protocol: &'static str,
    rollouts: Arc<Rollouts>,
    state: Mutex<StreamState>,
}

impl StreamHandle {
    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().expect("stream status lock")
    }

    /// Applies `f` to the status of `name` on this stream (adding it if absent).
    pub fn with_name(&self, name: &str, f: impl FnOnce(&mut NameStatus)) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let (at, before) = match state.secrets.position(name) {
            Some(at) => (at, tally(&state.secrets.list[at])),
            None => (state.secrets.push(NameStatus { name: Arc::from(name), ..Default::default() }), None),
        };
        let n = &mut state.secrets.list[at];
        f(n);
        if !state.closed {
            self.rollouts.update(&n.name, before, tally(n));
        }
    }

    pub fn forget(&self, name: &str) {
        let mut state = self.lock();
        if let Some(n) = state.secrets.remove(name)
            && !state.closed
        {
            self.rollouts.update(&n.name, tally(&n), None);
        }
    }

    fn status(&self) -> StreamStatus {
        let s = self.lock();
        StreamStatus {
            stream_id: self.id,
            node_id: s.node_id.to_string(),
            cluster: s.cluster.to_string(),
            address: s.address.to_string(),
            identity: s.identity.to_string(),
            protocol: self.protocol,
            connected_unix_ms: unix_time::millis(s.connected),
            secrets: s.secrets.list.clone(),
        }
    }
}

/// A rollout watch admitted under the limit; its place is given back when dropped.
pub struct RolloutWatch {
    open: Arc<AtomicUsize>,
}

impl Drop for RolloutWatch {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A rollout watch refused: as many are open as allowed.
#[derive(Debug, thiserror::Error)]
#[error("{max} rollout watches are open, the most this certwire serves at once; try again when one ends")]
pub struct TooManyWatches {
    pub max: usize,
}

/// Registry of open streams.
pub struct Proxies {
    streams: DashMap<u64, Arc<StreamHandle>>,
    /// Open streams per node id, for the distinct-proxies gauge.
    nodes: DashMap<String, usize>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    rollouts: Arc<Rollouts>,
    watches: Arc<AtomicUsize>,
    max_watches: usize,
}

impl Proxies {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            streams: DashMap::new(),
            nodes: DashMap::new(),
            next_id: AtomicU64::new(1),
            metrics,
            rollouts: Arc::default(),
            watches: Arc::default(),
            max_watches: MAX_ROLLOUT_WATCHERS,
        }
    }

    /// At most `max` rollout watches at once (default [`MAX_ROLLOUT_WATCHERS`]).
    pub fn with_max_rollout_watchers(mut self, max: usize) -> Self {
        self.max_watches = max;
        self
    }

    /// Admits one more rollout watch, or refuses it (counted) when `max` are open.
    pub fn watch_rollout(&self) -> Result<RolloutWatch, TooManyWatches> {
        let max = self.max_watches;
        match self.watches.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)) {
            Ok(_) => Ok(RolloutWatch { open: self.watches.clone() }),
            Err(_) => {
                self.metrics.rollout_watchers_refused.inc();
                Err(TooManyWatches { max })
            }
        }
    }

    pub fn open(&self, protocol: &'static str, peer: &super::Peer) -> Arc<StreamHandle> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = StreamState {
            node_id: Box::default(),
            cluster: Box::default(),
            address: peer.address.as_str().into(),
            identity: peer.identity.to_string().into_boxed_str(),
            connected: SystemTime::now(),
            // Envoy asks for one name per stream; a Vec grows to four at once otherwise.
            secrets: Names { list: Vec::with_capacity(1), index: None },
            closed: false,
        };
        let handle = Arc::new(StreamHandle { id, protocol, rollouts: self.rollouts.clone(), state: Mutex::new(state) });
        self.streams.insert(id, handle.clone());
        self.metrics.streams_connected.get_or_create(&ProtocolLabel { protocol }).inc();
        handle
    }

    /// Records the node identity the first time a stream presents it.
    pub fn identify(&self, stream: &StreamHandle, node_id: &str, cluster: &str) {
        let mut s = stream.lock();
        if !s.node_id.is_empty() {
            return;
        }
        s.node_id = node_id.into();
        s.cluster = cluster.into();
        tracing::info!(stream = stream.id, node = node_id, cluster, identity = %s.identity, "proxy connected");
        drop(s);
        *self.nodes.entry(node_id.to_owned()).or_insert(0) += 1;
        self.metrics.proxies_connected.set(self.nodes.len() as i64);
    }

    pub fn close(&self, stream: &StreamHandle) {
        if self.streams.remove(&stream.id).is_none() {
            return;
        }
        self.metrics.streams_connected.get_or_create(&ProtocolLabel { protocol: stream.protocol }).dec();
        let mut s = stream.lock();
        if !s.closed {
            s.closed = true;
            for n in &s.secrets.list {
                self.rollouts.update(&n.name, tally(n), None);
            }
        }
        let node_id = std::mem::take(&mut s.node_id);
        drop(s);
        if !node_id.is_empty() {
            self.nodes.remove_if_mut(&*node_id, |_, n| {
                *n -= 1;
                *n == 0
            });
            self.metrics.proxies_connected.set(self.nodes.len() as i64);
        }
    }

    pub fn status(&self) -> Vec<StreamStatus> {
        let handles: Vec<Arc<StreamHandle>> = self.streams.iter().map(|s| s.value().clone()).collect();
        let mut out: Vec<StreamStatus> = handles.iter().map(|h| h.status()).collect();
        out.sort_by_key(|s| s.stream_id);
        out
    }

    /// (subscribed, acked `version`, nacked `version`) over the open streams that
    /// subscribe `name` and may read it (a denied stream will never ack). O(1): read from
    /// counts the streams keep, no stream is visited.
    pub fn rollout(&self, name: &str, version: Option<Version>) -> (u32, u32, u32) {
        self.rollouts.get(name, version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies() -> Proxies {
        Proxies::new(Arc::new(Metrics::new()))
    }

    fn peer() -> super::super::Peer {
        super::super::Peer { address: "test".into(), identity: crate::authz::Identity::Anonymous }
    }

    /// What `rollout` answered before it kept counts: a scan of every stream.
    fn scan(streams: &[StreamStatus], name: &str, version: Option<Version>) -> (u32, u32, u32) {
        let (mut subscribed, mut acked, mut nacked) = (0, 0, 0);
        for s in streams {
            for n in s.secrets.iter().filter(|n| &*n.name == name && n.denied.is_none()) {
                subscribed += 1;
                acked += u32::from(version.is_some() && n.acked_version == version);
                nacked += u32::from(version.is_some() && n.nacked_version == version);
            }
        }
        (subscribed, acked, nacked)
    }

    /// xorshift64*: reproducible without a dependency.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        }
    }

    #[test]
    fn rollout_counts_equal_a_full_scan_after_random_events() {
        // More names than a stream searches in place: both ways of finding them are used.
        let names: Vec<String> =
            (0..Names::INDEX_ABOVE + 3).map(|i| format!("kubernetes://ns/n{i}")).chain(["web".into()]).collect();
        let versions: Vec<Version> = (0u8..3).map(|i| Version::of(&[i])).collect();
        for seed in 1..=10u64 {
            let p = proxies();
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut open: Vec<Arc<StreamHandle>> = Vec::new();
            for step in 0..1_000 {
                if open.is_empty() || rng.below(20) == 0 {
                    open.push(p.open("sotw", &peer()));
                }
                let s = open[rng.below(open.len())].clone();
                let name = names[rng.below(names.len())].as_str();
                let v = versions[rng.below(versions.len())];
                match rng.below(9) {
                    0 | 1 => s.with_name(name, |_| {}),
                    2 => s.with_name(name, |n| n.sent_version = Some(v)),
                    3 | 4 => s.with_name(name, |n| n.acked_version = Some(v)),
                    5 => s.with_name(name, |n| {
                        n.last_nack = Some("bad".into());
                        n.nacked_version = Some(v);
                    }),
                    6 => s.with_name(name, |n| n.denied = (rng.below(2) == 0).then(|| Arc::from("no grant"))),
                    7 => s.forget(name),
                    _ => {
                        if rng.below(4) == 0 {
                            p.close(&s);
                            open.retain(|o| o.id != s.id);
                            // A closed stream's late updates count nowhere.
                            s.with_name(name, |n| n.acked_version = Some(v));
                        }
                    }
                }
                let streams = p.status();
                for name in &names {
                    for version in versions.iter().copied().map(Some).chain([None]) {
                        assert_eq!(
                            p.rollout(name, version),
                            scan(&streams, name, version),
                            "seed {seed}, step {step}, {name}"
                        );
                    }
                }
            }
            for s in open.drain(..) {
                p.close(&s);
            }
            assert!(p.rollouts.names.is_empty(), "no counts left once every stream closed");
        }
    }

    #[test]
    fn rollout_visits_no_stream() {
        let p = Arc::new(proxies());
        let s = p.open("sotw", &peer());
        s.with_name("a", |n| n.acked_version = Some(Version::of(b"v")));
        // A stream busy under its own lock does not hold up a rollout watch.
        let held = s.state.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = p.clone();
        std::thread::spawn(move || tx.send(reader.rollout("a", Some(Version::of(b"v")))).unwrap());
        let got = rx.recv_timeout(std::time::Duration::from_secs(5));
        drop(held);
        assert_eq!(got.expect("rollout answered without taking the stream's lock"), (1, 1, 0));
    }

    #[test]
    fn many_names_on_one_stream_are_found_in_constant_time() {
        // A guard against quadratic lookups, not a benchmark: adding 40,000 names took 24 s
        // (debug build) with a linear search per name; this whole test takes about 1 s.
        let p = proxies();
        let s = p.open("delta", &peer());
        let names: Vec<String> = (0..40_000).map(|i| format!("kubernetes://ns/name-{i}")).collect();
        let started = std::time::Instant::now();
        for name in &names {
            s.with_name(name, |_| {});
        }
        for name in &names {
            s.with_name(name, |n| n.acked_version = Some(Version::of(name.as_bytes())));
        }
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(10), "80,000 lookups took {took:?}");
        assert_eq!(p.rollout("kubernetes://ns/name-7", Some(Version::of(b"kubernetes://ns/name-7"))), (1, 1, 0));
    }

    #[test]
    fn names_stay_found_as_they_come_and_go() {
        let p = proxies();
        let s = p.open("delta", &peer());
        let mut expected: Vec<String> = Vec::new();
        let mut rng = Rng(7);
        for _ in 0..5_000 {
            let name = format!("n{}", rng.below(40));
            if rng.below(3) == 0 {
                s.forget(&name);
                expected.retain(|n| *n != name);
            } else {
                s.with_name(&name, |n| n.sent_version = Some(Version::of(name.as_bytes())));
                if !expected.contains(&name) {
                    expected.push(name);
                }
            }
            let state = s.lock();
            assert_eq!(state.secrets.list.len(), expected.len());
            for (i, n) in state.secrets.list.iter().enumerate() {
                assert_eq!(state.secrets.position(&n.name), Some(i), "{}", n.name);
                assert_eq!(n.sent_version, Some(Version::of(n.name.as_bytes())));
            }
            let (len, index) = (state.secrets.list.len(), state.secrets.index.as_ref());
            assert!(len <= Names::INDEX_ABOVE || index.is_some(), "indexed past {} names", Names::INDEX_ABOVE);
            assert!(index.is_none_or(|i| len > Names::INDEX_UNTIL && i.len() == len));
        }
    }

    #[test]
    fn an_idle_stream_with_one_name_costs_no_more_than_before() {
        // 168 bytes before per-stream name lookups were indexed and rollouts counted.
        assert!(std::mem::size_of::<StreamHandle>() <= 168, "{} bytes", std::mem::size_of::<StreamHandle>());
        let p = proxies();
        let s = p.open("sotw", &peer());
        s.with_name("kubernetes://ns/web", |_| {});
        let state = s.lock();
        assert!(state.secrets.index.is_none(), "no index for one name");
        assert_eq!(state.secrets.list.capacity(), 1);
    }

    #[test]
    fn rollout_watches_over_the_limit_are_refused_and_counted() {
        let metrics = Arc::new(Metrics::new());
        let p = Proxies::new(metrics.clone()).with_max_rollout_watchers(2);
        let first = p.watch_rollout().unwrap();
        let _second = p.watch_rollout().unwrap();
        let refused = p.watch_rollout().err().expect("a third is refused");
        assert_eq!(refused.max, 2);
        assert_eq!(metrics.rollout_watchers_refused.get(), 1);
        drop(first);
        assert!(p.watch_rollout().is_ok(), "a place given back is taken again");
    }
}
