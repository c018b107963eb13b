//! What every connected proxy has: node, address, and per secret the version sent, the
//! version acked and the last NACK. Read by admin status and the rollout watch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use tokio::sync::watch;

use crate::metrics::{Metrics, ProtocolLabel};
use crate::store::unix_ms;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NameStatus {
    pub name: String,
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub last_nack: Option<String>,
    /// The version the last NACK refused; it is never sent again on this stream.
    pub nacked_version: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamStatus {
    pub stream_id: u64,
    pub node_id: String,
    pub cluster: String,
    pub address: String,
    pub protocol: &'static str,
    pub connected_unix_ms: i64,
    pub secrets: Vec<NameStatus>,
}

struct StreamState {
    node_id: String,
    cluster: String,
    address: String,
    protocol: &'static str,
    connected: SystemTime,
    secrets: BTreeMap<String, NameStatus>,
}

/// Registry of open streams. Each mutation bumps a generation so rollout watchers wake.
pub struct Proxies {
    streams: DashMap<u64, StreamState>,
    /// Open streams per node id, for the distinct-proxies gauge.
    nodes: DashMap<String, usize>,
    generation: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Proxies {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { streams: DashMap::new(), nodes: DashMap::new(), generation: watch::channel(0).0, metrics }
    }

    pub fn open(&self, id: u64, protocol: &'static str, address: String) {
        self.streams.insert(
            id,
            StreamState {
                node_id: String::new(),
                cluster: String::new(),
                address,
                protocol,
                connected: SystemTime::now(),
                secrets: BTreeMap::new(),
            },
        );
        self.metrics.streams_connected.get_or_create(&ProtocolLabel { protocol }).inc();
        self.bump();
    }

    /// Records the node identity the first time a stream presents it.
    pub fn identify(&self, id: u64, node_id: &str, cluster: &str) {
        let Some(mut s) = self.streams.get_mut(&id) else { return };
        if !s.node_id.is_empty() {
            return;
        }
        s.node_id = node_id.to_owned();
        s.cluster = cluster.to_owned();
        drop(s);
        let mut count = self.nodes.entry(node_id.to_owned()).or_insert(0);
        *count += 1;
        drop(count);
        self.metrics.proxies_connected.set(self.nodes.len() as i64);
        tracing::info!(stream = id, node = node_id, cluster, "proxy connected");
    }

    pub fn close(&self, id: u64) {
        let Some((_, s)) = self.streams.remove(&id) else { return };
        self.metrics.streams_connected.get_or_create(&ProtocolLabel { protocol: s.protocol }).dec();
        if !s.node_id.is_empty() {
            self.nodes.remove_if_mut(&s.node_id, |_, n| {
                *n -= 1;
                *n == 0
            });
            self.metrics.proxies_connected.set(self.nodes.len() as i64);
        }
        self.bump();
    }

    /// Applies `f` to the per-name status of a stream.
    pub fn with_name(&self, id: u64, name: &str, f: impl FnOnce(&mut NameStatus)) {
        if let Some(mut s) = self.streams.get_mut(&id) {
            let entry = s
                .secrets
                .entry(name.to_owned())
                .or_insert_with(|| NameStatus { name: name.to_owned(), ..Default::default() });
            f(entry);
        }
        self.bump();
    }

    pub fn forget_name(&self, id: u64, name: &str) {
        if let Some(mut s) = self.streams.get_mut(&id) {
            s.secrets.remove(name);
        }
        self.bump();
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn status(&self) -> Vec<StreamStatus> {
        let mut out: Vec<StreamStatus> = self
            .streams
            .iter()
            .map(|s| StreamStatus {
                stream_id: *s.key(),
                node_id: s.node_id.clone(),
                cluster: s.cluster.clone(),
                address: s.address.clone(),
                protocol: s.protocol,
                connected_unix_ms: unix_ms(s.connected),
                secrets: s.secrets.values().cloned().collect(),
            })
            .collect();
        out.sort_by_key(|s| s.stream_id);
        out
    }

    /// (subscribed, acked `version`, nacked `version`) over all streams for `name`.
    pub fn rollout(&self, name: &str, version: Option<&str>) -> (u32, u32, u32) {
        let (mut subscribed, mut acked, mut nacked) = (0, 0, 0);
        for s in self.streams.iter() {
            if let Some(n) = s.secrets.get(name) {
                subscribed += 1;
                if version.is_some() && n.acked_version.as_deref() == version {
                    acked += 1;
                }
                if version.is_some() && n.nacked_version.as_deref() == version {
                    nacked += 1;
                }
            }
        }
        (subscribed, acked, nacked)
    }
}
