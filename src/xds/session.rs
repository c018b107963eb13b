//! State shared by SotW and Delta streams: the watched names, what was sent, the nonces
//! awaiting an ACK, and NACK bookkeeping. Protocol files only shape messages.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::WatchStream;

use super::Shared;
use crate::metrics::ProtocolLabel;
use crate::store::{Current, Served};

static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// Responses kept for ACK matching; Envoy answers in order, so a few suffice.
const PENDING_NONCES: usize = 16;

/// What happened to a watched name.
pub enum Change {
    /// A version to send (never one already sent or refused on this stream).
    Send(Arc<Served>),
    /// The name is no longer served (deleted at every source).
    Gone(String),
}

pub struct Session {
    pub id: u64,
    pub protocol: &'static str,
    shared: Shared,
    watches: StreamMap<String, WatchStream<Current>>,
    sent: HashMap<String, String>,
    nacked: HashMap<String, String>,
    pending: VecDeque<(String, Vec<(String, String)>)>,
    next_nonce: u64,
    identified: bool,
}

impl Session {
    pub fn open(shared: Shared, protocol: &'static str, peer: String) -> Self {
        let id = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        shared.proxies.open(id, protocol, peer);
        Self {
            id,
            protocol,
            shared,
            watches: StreamMap::new(),
            sent: HashMap::new(),
            nacked: HashMap::new(),
            pending: VecDeque::new(),
            next_nonce: 0,
            identified: false,
        }
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    pub fn identify(&mut self, node: Option<&Node>) {
        if self.identified {
            return;
        }
        if let Some(node) = node {
            self.shared.proxies.identify(self.id, &node.id, &node.cluster);
            self.identified = true;
        }
    }

    pub fn subscribed(&self) -> impl Iterator<Item = &String> {
        self.watches.keys()
    }

    /// Watches `name`. The current content (if any) is yielded by `next_change` at once,
    /// whatever version the proxy claims to have: a reconnecting proxy always gets it.
    pub fn subscribe(&mut self, name: &str) {
        if self.watches.contains_key(name) {
            return;
        }
        let rx = self.shared.store.subscribe(name);
        self.watches.insert(name.to_owned(), WatchStream::new(rx));
        self.shared.proxies.with_name(self.id, name, |_| {});
        tracing::debug!(stream = self.id, secret = name, "subscribed");
    }

    pub fn unsubscribe(&mut self, name: &str) {
        if self.watches.remove(name).is_none() {
            return;
        }
        self.sent.remove(name);
        self.nacked.remove(name);
        self.shared.proxies.forget_name(self.id, name);
        self.shared.store.release(name);
        tracing::debug!(stream = self.id, secret = name, "unsubscribed");
    }

    /// Waits for the next watched name whose content must be sent or announced gone.
    /// Pending forever when nothing is watched (the caller selects on other events).
    pub async fn next_change(&mut self) -> Change {
        loop {
            let Some((name, current)) = futures_util::StreamExt::next(&mut self.watches).await else {
                std::future::pending::<()>().await;
                unreachable!()
            };
            match current {
                Some(served) => {
                    let already = self.sent.get(&name) == Some(&served.version);
                    let refused = self.nacked.get(&name) == Some(&served.version);
                    if !already && !refused {
                        return Change::Send(served);
                    }
                }
                None => {
                    if self.sent.remove(&name).is_some() {
                        return Change::Gone(name);
                    }
                }
            }
        }
    }

    /// Records that `resources` go out under a fresh nonce; returns the nonce.
    pub fn record_sent(&mut self, resources: &[Arc<Served>]) -> String {
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        let mut names = Vec::with_capacity(resources.len());
        for served in resources {
            self.sent.insert(served.name.clone(), served.version.clone());
            names.push((served.name.clone(), served.version.clone()));
            let version = served.version.clone();
            self.shared.proxies.with_name(self.id, &served.name, |n| n.sent_version = Some(version));
            self.shared.metrics.change_to_push.observe(served.detected_at.elapsed().as_secs_f64());
        }
        self.shared.metrics.pushes.get_or_create(&ProtocolLabel { protocol: self.protocol }).inc();
        if self.pending.len() == PENDING_NONCES {
            self.pending.pop_front();
        }
        self.pending.push_back((nonce.clone(), names));
        nonce
    }

    /// Nonce for a response that carries no resource (only removals).
    pub fn next_nonce(&mut self) -> String {
        self.next_nonce += 1;
        self.next_nonce.to_string()
    }

    /// Handles the ACK or NACK part of a request. Unknown or stale nonces are ignored.
    pub fn acknowledge(&mut self, nonce: &str, error: Option<&RpcStatus>) {
        if nonce.is_empty() {
            return;
        }
        let Some(pos) = self.pending.iter().position(|(n, _)| n == nonce) else { return };
        // Envoy answers in order: older outstanding nonces are superseded.
        let (_, names) = self.pending.drain(..=pos).next_back().expect("position is in range");
        let label = ProtocolLabel { protocol: self.protocol };
        match error {
            None => {
                self.shared.metrics.acks.get_or_create(&label).inc();
                for (name, version) in names {
                    self.shared.proxies.with_name(self.id, &name, |n| {
                        n.acked_version = Some(version);
                    });
                }
            }
            Some(err) => {
                self.shared.metrics.nacks.get_or_create(&label).inc();
                for (name, version) in names {
                    tracing::warn!(
                        stream = self.id,
                        secret = %name,
                        version = %version,
                        error = %err.message,
                        "proxy rejected secret (NACK); not resending this version"
                    );
                    self.nacked.insert(name.clone(), version.clone());
                    let message = err.message.clone();
                    self.shared.proxies.with_name(self.id, &name, |n| {
                        n.last_nack = Some(message);
                        n.nacked_version = Some(version);
                    });
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.proxies.close(self.id);
        let names: Vec<String> = self.watches.keys().cloned().collect();
        self.watches = StreamMap::new();
        for name in names {
            self.shared.store.release(&name);
        }
    }
}
