//! What every connected proxy has: node, address, and per secret the version sent, the
//! version acked and the last NACK. Read by admin status and the rollout watch.
//!
//! Each stream owns its entry ([`StreamHandle`]) and updates it under its own, in
//! practice uncontended, lock: a push to ten thousand streams touches no shared map or
//! counter. Readers (status, rollout watch) poll.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;

use crate::metrics::{Metrics, ProtocolLabel};
use crate::store::unix_ms;
use crate::version::Version;

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

struct StreamState {
    node_id: String,
    cluster: String,
    address: String,
    identity: String,
    connected: SystemTime,
    /// A stream carries one name (Envoy) or a few: a Vec is smaller than any map, and
    /// this is per connected proxy.
    secrets: Vec<NameStatus>,
}

/// One stream's entry, shared by its task (writer) and the registry (readers).
pub struct StreamHandle {
    pub id: u64,
    pub protocol: &'static str,
    state: Mutex<StreamState>,
}

impl StreamHandle {
    /// Applies `f` to the status of `name` on this stream.
    pub fn with_name(&self, name: &str, f: impl FnOnce(&mut NameStatus)) {
        let mut state = self.state.lock().expect("stream status lock");
        match state.secrets.iter_mut().find(|n| &*n.name == name) {
            Some(n) => f(n),
            None => {
                let mut n = NameStatus { name: Arc::from(name), ..Default::default() };
                f(&mut n);
                state.secrets.push(n);
            }
        }
    }

    pub fn forget(&self, name: &str) {
        self.state.lock().expect("stream status lock").secrets.retain(|n| &*n.name != name);
    }

    fn status(&self) -> StreamStatus {
        let s = self.state.lock().expect("stream status lock");
        StreamStatus {
            stream_id: self.id,
            node_id: s.node_id.clone(),
            cluster: s.cluster.clone(),
            address: s.address.clone(),
            identity: s.identity.clone(),
            protocol: self.protocol,
            connected_unix_ms: unix_ms(s.connected),
            secrets: s.secrets.clone(),
        }
    }
}

/// Registry of open streams.
pub struct Proxies {
    streams: DashMap<u64, Arc<StreamHandle>>,
    /// Open streams per node id, for the distinct-proxies gauge.
    nodes: DashMap<String, usize>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Proxies {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { streams: DashMap::new(), nodes: DashMap::new(), next_id: AtomicU64::new(1), metrics }
    }

    pub fn open(&self, protocol: &'static str, peer: &super::Peer) -> Arc<StreamHandle> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = StreamState {
            node_id: String::new(),
            cluster: String::new(),
            address: peer.address.clone(),
            identity: peer.identity.to_string(),
            connected: SystemTime::now(),
            // Envoy asks for one name per stream; a Vec grows to four at once otherwise.
            secrets: Vec::with_capacity(1),
        };
        let handle = Arc::new(StreamHandle { id, protocol, state: Mutex::new(state) });
        self.streams.insert(id, handle.clone());
        self.metrics.streams_connected.get_or_create(&ProtocolLabel { protocol }).inc();
        handle
    }

    /// Records the node identity the first time a stream presents it.
    pub fn identify(&self, stream: &StreamHandle, node_id: &str, cluster: &str) {
        let mut s = stream.state.lock().expect("stream status lock");
        if !s.node_id.is_empty() {
            return;
        }
        s.node_id = node_id.to_owned();
        s.cluster = cluster.to_owned();
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
        let node_id = std::mem::take(&mut stream.state.lock().expect("stream status lock").node_id);
        if !node_id.is_empty() {
            self.nodes.remove_if_mut(&node_id, |_, n| {
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

    /// (subscribed, acked `version`, nacked `version`) over all streams for `name`.
    pub fn rollout(&self, name: &str, version: Option<Version>) -> (u32, u32, u32) {
        let (mut subscribed, mut acked, mut nacked) = (0, 0, 0);
        let handles: Vec<Arc<StreamHandle>> = self.streams.iter().map(|s| s.value().clone()).collect();
        for h in handles {
            let s = h.state.lock().expect("stream status lock");
            if let Some(n) = s.secrets.iter().find(|n| &*n.name == name) {
                subscribed += 1;
                if version.is_some() && n.acked_version == version {
                    acked += 1;
                }
                if version.is_some() && n.nacked_version == version {
                    nacked += 1;
                }
            }
        }
        (subscribed, acked, nacked)
    }
}
