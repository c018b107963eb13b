//! State shared by SotW and Delta streams: the watched names, what was sent, the nonces
//! awaiting an ACK, and NACK bookkeeping. Protocol files only shape messages.
//!
//! This runs once per stream per rotation, ten thousand times for one secret change:
//! names are shared `Arc<str>`, versions 16 bytes copied inline, nonces integers, and
//! metric handles are looked up once per stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures_util::{Stream, StreamExt};
use prometheus_client::metrics::counter::Counter;
use smallvec::SmallVec;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::WatchStream;

use super::codec::Resources;
use super::proxies::StreamHandle;
use super::requests::{self, NodeIdentity};
use super::{Peer, ServerState};
use crate::authz::{Decision, Decisions, Reason, Verdict};
use crate::metrics::ProtocolLabel;
use crate::store::{Current, Served};
use crate::version::Version;

/// A NACK's message is kept (status) and logged up to this many bytes.
const NACK_MESSAGE_MAX: usize = 1024;

/// Past this many names a stream keeps a set of them for lookups.
const INDEX_FROM: usize = 8;

/// Responses kept for ACK matching; Envoy answers in order, so a few suffice.
const PENDING_NONCES: usize = 16;

/// What happened to a watched name.
pub enum Change {
    /// A version to send (never one already sent or refused on this stream).
    Send(Arc<Served>),
    /// The name is no longer served (deleted at every source).
    Gone(Arc<str>),
}

struct Counters {
    pushes: Counter,
    acks: Counter,
    nacks: Counter,
}

pub struct Session {
    pub id: u64,
    shared: ServerState,
    peer: Arc<Peer>,
    status: Arc<StreamHandle>,
    counters: Counters,
    /// Keyed by the stream's own copy of each name: the map hands out a key clone per
    /// change, and a name shared with other streams would be a contended refcount.
    watches: StreamMap<Arc<str>, Watched>,
    /// The watched names as a set, once there are more than a few: `StreamMap` finds a
    /// key by scanning, and a stream of thousands of names would make every request
    /// quadratic. Envoy's streams carry one name and never build it; boxed so that the
    /// absent set costs one word per stream, not a whole empty set.
    #[allow(clippy::box_collection)]
    index: Option<Box<std::collections::HashSet<Arc<str>>>>,
    /// Responses awaiting an ACK, oldest first. Envoy acks each before the next push, so
    /// one is held inline: no allocation per stream or per push.
    pending: SmallVec<[(u64, Resources); 1]>,
    next_nonce: u64,
    identified: bool,
}

impl Session {
    pub fn open(shared: ServerState, protocol: &'static str, peer: Arc<Peer>) -> Self {
        let status = shared.proxies.open(protocol, &peer);
        let label = ProtocolLabel { protocol };
        let m = &shared.metrics;
        let counters = Counters {
            pushes: m.pushes.get_or_create(&label).clone(),
            acks: m.acks.get_or_create(&label).clone(),
            nacks: m.nacks.get_or_create(&label).clone(),
        };
        Self {
            id: status.id,
            shared,
            peer,
            status,
            counters,
            // Envoy asks for one name per stream.
            watches: StreamMap::with_capacity(1),
            index: None,
            pending: SmallVec::new(),
            next_nonce: 0,
            identified: false,
        }
    }

    /// The part of a request both protocols handle alike: its type and the ACK or NACK
    /// it carries.
    pub fn receive(&mut self, type_url: &[u8], nonce: &[u8], error: Option<&RpcStatus>) -> Result<(), tonic::Status> {
        super::check_type_url(type_url)?;
        self.acknowledge(nonce, error);
        Ok(())
    }

    /// Whether the proxy's node is known: only until then are requests read for it.
    pub fn identified(&self) -> bool {
        self.identified
    }

    /// Records the proxy's node, from the first request that carries one.
    pub fn identify(&mut self, node: Option<NodeIdentity>) {
        if let Some(node) = node {
            self.shared.proxies.identify(&self.status, &node.id, &node.cluster);
            self.identified = true;
        }
    }

    pub fn subscribed(&self) -> impl Iterator<Item = &Arc<str>> {
        self.watches.keys()
    }

    pub fn watches(&self, name: &str) -> bool {
        match &self.index {
            Some(index) => index.contains(name),
            None => self.watches.contains_key(name),
        }
    }

    /// How many names the stream watches.
    pub fn watched(&self) -> usize {
        self.watches.len()
    }

    /// `[limits] max_names_per_stream` and `max_names_per_request`.
    pub fn limits(&self) -> &crate::xds::limits::Limits {
        &self.shared.limits
    }

    /// Counts a limit hit by this stream's peer.
    pub fn hit(&self, limit: &'static str) {
        crate::xds::limits::hit(&self.shared.metrics, limit);
    }

    /// Watches `name`. The current content (if any) is yielded by `next_change` at once,
    /// whatever version the proxy claims to have: a reconnecting proxy always gets it.
    ///
    /// Authorization is asked here, once per name: a denied name is watched but never
    /// sent (the proxy sees it absent, its other names unaffected), and a name whose
    /// grant can change follows that grant.
    /// A stream may watch `[limits] max_names_per_stream` names; one more is an error
    /// for the peer.
    pub fn subscribe(&mut self, name: &str) -> Result<(), tonic::Status> {
        if self.watches(name) {
            return Ok(());
        }
        let max = self.shared.limits.max_names_per_stream;
        if self.watches.len() >= max {
            self.hit("max_names_per_stream");
            return Err(tonic::Status::resource_exhausted(format!(
                "a stream may watch at most {max} names ([limits] max_names_per_stream)"
            )));
        }
        // `sds://NAME` is NAME's secret: authorized and followed as NAME. A Gateway API
        // name is followed as its `kubernetes://` name and authorized as itself.
        let names = self.shared.names.clone();
        let stored = names.stored(name);
        let feed = match self.shared.authz.decide(&self.peer.identity, names.subject(name)) {
            Verdict::Allow => Feed::Open(WatchStream::new(self.shared.store.subscribe(&stored))),
            Verdict::Deny(reason) => {
                self.deny(name, &reason);
                Feed::Denied
            }
            Verdict::Grant(grant) => Feed::Gated(Box::new(Gate {
                grant,
                store: self.shared.store.subscribe(&stored),
                changes: None,
                denied: false,
            })),
        };
        if !matches!(feed, Feed::Denied) {
            self.status.with_name(name, |_| {});
        }
        let name: Arc<str> = Arc::from(name);
        self.watches.insert(name.clone(), Watched { feed, sent: None, nacked: None });
        match &mut self.index {
            Some(index) => {
                index.insert(name.clone());
            }
            None if self.watches.len() > INDEX_FROM => {
                self.index = Some(Box::new(self.watches.keys().cloned().collect()));
            }
            None => {}
        }
        tracing::debug!(stream = self.id, secret = %name, "subscribed");
        Ok(())
    }

    /// A Delta client subscribing again to a name it watches: it may have dropped what
    /// it had, so the current content is sent again (xDS protocol).
    pub fn resubscribe(&mut self, name: &str) {
        let Some((_, watched)) = self.watches.iter_mut().find(|(n, _)| &**n == name) else { return };
        watched.sent = None;
        match &mut watched.feed {
            // A fresh receiver yields the current content first; the old one is dropped
            // after the new one exists, so the store's subscription never lapses.
            Feed::Open(changes) => {
                *changes = WatchStream::new(self.shared.store.subscribe(&self.shared.names.stored(name)))
            }
            Feed::Gated(gate) => {
                if gate.changes.is_some() {
                    gate.changes = Some(WatchStream::new(gate.store.clone()));
                }
            }
            Feed::Denied => {}
        }
    }

    fn deny(&self, name: &str, reason: &Reason) {
        self.shared.authz.denied(&self.peer.identity, name, reason);
        self.status.with_name(name, |n| n.denied = Some(reason.detail.clone()));
    }

    pub fn unsubscribe(&mut self, name: &str) {
        let Some(watched) = self.watches.remove(name) else { return };
        if let Some(index) = &mut self.index {
            index.remove(name);
        }
        self.status.forget(name);
        if watched.feed.holds_store() {
            drop(watched);
            self.shared.store.release(&self.shared.names.stored(name));
        }
        tracing::debug!(stream = self.id, secret = name, "unsubscribed");
    }

    /// The next watched name whose content must be sent or announced gone; the caller
    /// sends it (the name counts as sent from here). Pending when nothing is due (also
    /// when nothing is watched: a new subscription comes with a request, which wakes the
    /// stream).
    pub fn poll_change(&mut self, cx: &mut Context<'_>) -> Poll<Change> {
        loop {
            match ready!(self.watches.poll_next_unpin(cx)) {
                Some((name, Due::Send(served))) if served.name == name => return Poll::Ready(Change::Send(served)),
                Some((name, Due::Send(served))) => {
                    // An `sds://` name: the stored secret under the name asked for.
                    match self.shared.names.serve_as(&name, served) {
                        Some(renamed) => return Poll::Ready(Change::Send(renamed)),
                        None => {
                            tracing::error!(stream = self.id, secret = %name, "cannot rename the stored secret; not sent")
                        }
                    }
                }
                Some((name, Due::Gone)) => {
                    self.shared.names.forget(&name);
                    return Poll::Ready(Change::Gone(name));
                }
                Some((name, Due::Denied { reason, was_sent })) => {
                    self.deny(&name, &reason);
                    tracing::info!(stream = self.id, secret = %name, reason = reason.code, "grant revoked: no longer pushed");
                    if was_sent {
                        return Poll::Ready(Change::Gone(name));
                    }
                }
                Some((name, Due::Allowed)) => self.status.with_name(&name, |n| n.denied = None),
                // Nothing watched.
                None => return Poll::Pending,
            }
        }
    }

    /// Records that `resources` go out under a fresh nonce; returns the nonce.
    pub fn record_sent(&mut self, resources: &[Arc<Served>]) -> u64 {
        let nonce = self.next_nonce();
        for served in resources {
            self.status.with_name(&served.name, |n| {
                n.sent_version = Some(served.version);
                n.removed = false;
            });
            self.shared.metrics.change_to_push.observe(served.detected_at.elapsed().as_secs_f64());
        }
        self.counters.pushes.inc();
        if self.pending.len() == PENDING_NONCES {
            self.pending.remove(0);
        }
        self.pending.push((nonce, resources.iter().cloned().collect()));
        nonce
    }

    /// Delta: `name` goes out in `removed_resources` with the returned nonce. The proxy
    /// then holds nothing of it: status says so, and a late ACK of an earlier response
    /// does not bring its version back.
    pub fn record_removed(&mut self, name: &str) -> u64 {
        for (_, sent) in &mut self.pending {
            sent.retain(|served| &*served.name != name);
        }
        self.status.with_name(name, |n| {
            n.sent_version = None;
            n.acked_version = None;
            n.removed = true;
        });
        self.next_nonce()
    }

    /// A fresh nonce (also for a response that carries only removals). Never 0.
    pub fn next_nonce(&mut self) -> u64 {
        self.next_nonce += 1;
        self.next_nonce
    }

    /// Handles the ACK or NACK part of a request. Unknown or stale nonces are ignored.
    fn acknowledge(&mut self, nonce: &[u8], error: Option<&RpcStatus>) {
        let Some(nonce) = requests::nonce(nonce) else { return };
        let Some(pos) = self.pending.iter().position(|(n, _)| *n == nonce) else { return };
        // Envoy answers in order: older outstanding nonces are superseded.
        let (_, resources) = self.pending.drain(..=pos).next_back().expect("position is in range");
        match error {
            None => {
                self.counters.acks.inc();
                // A name unsubscribed since it was sent is no longer this stream's.
                for served in resources.iter().filter(|s| self.watches(&s.name)) {
                    self.status.with_name(&served.name, |n| n.acked_version = Some(served.version));
                }
            }
            Some(err) => {
                self.counters.nacks.inc();
                // The proxy's words, kept and logged at a bounded length.
                let message = crate::xds::limits::truncate(&err.message, NACK_MESSAGE_MAX).into_owned();
                for served in resources {
                    if !self.watches(&served.name) {
                        continue;
                    }
                    tracing::warn!(
                        stream = self.id,
                        secret = %served.name,
                        version = %served.version,
                        error = %message,
                        "proxy rejected secret (NACK); not resending this version"
                    );
                    if let Some((_, watched)) = self.watches.iter_mut().find(|(name, _)| *name == served.name) {
                        watched.nacked = Some(served.version);
                    }
                    self.status.with_name(&served.name, |n| {
                        n.last_nack = Some(message.clone());
                        n.nacked_version = Some(served.version);
                    });
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.proxies.close(&self.status);
        let names: Vec<Arc<str>> =
            self.watches.iter().filter(|(_, w)| w.feed.holds_store()).map(|(n, _)| n.clone()).collect();
        self.watches = StreamMap::new();
        for name in names {
            self.shared.store.release(&self.shared.names.stored(&name));
        }
    }
}

/// What a watched name needs on this stream.
enum Due {
    Send(Arc<Served>),
    Gone,
    /// The grant was refused or revoked; `was_sent`: the proxy has a version to drop.
    Denied {
        reason: Reason,
        was_sent: bool,
    },
    /// The grant was given (again): the current content follows.
    Allowed,
}

/// One watched name: the store's changes to it, less those this stream needs not send,
/// a version it already sent or that the proxy refused (NACK), which is never resent.
struct Watched {
    feed: Feed,
    sent: Option<Version>,
    nacked: Option<Version>,
}

/// Where a watched name's changes come from, by what authorization said.
enum Feed {
    /// Allowed for good (open mode, a rule, a CA bundle): the store's changes alone,
    /// nothing more per push than without authorization.
    Open(WatchStream<Current>),
    /// Refused for good (a rule, another namespace): nothing, ever.
    Denied,
    /// Decided by a grant that can change.
    Gated(Box<Gate>),
}

impl Feed {
    /// Whether the name is subscribed in the store (to be released).
    fn holds_store(&self) -> bool {
        !matches!(self, Feed::Denied)
    }
}

struct Gate {
    grant: Decisions,
    /// Kept to start the changes over, with the current content, when allowed again.
    store: tokio::sync::watch::Receiver<Current>,
    /// The store's changes while allowed.
    changes: Option<WatchStream<Current>>,
    /// A denial was reported: a repeated one is not.
    denied: bool,
}

impl Stream for Watched {
    type Item = Due;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Due>> {
        let this = &mut *self;
        let changes = match &mut this.feed {
            Feed::Open(changes) => changes,
            Feed::Denied => return Poll::Pending,
            Feed::Gated(gate) => {
                // The latest decision first: content waits for it.
                let mut decided = None;
                while let Poll::Ready(Some(d)) = gate.grant.poll_next_unpin(cx) {
                    decided = Some(d);
                }
                match decided {
                    Some(Decision::Allow) if gate.changes.is_none() => {
                        gate.denied = false;
                        gate.changes = Some(WatchStream::new(gate.store.clone()));
                        return Poll::Ready(Some(Due::Allowed));
                    }
                    Some(Decision::Deny(reason)) if gate.changes.is_some() || !gate.denied => {
                        gate.denied = true;
                        gate.changes = None;
                        // Sent again, with the current content, if allowed later.
                        let was_sent = this.sent.take().is_some();
                        return Poll::Ready(Some(Due::Denied { reason, was_sent }));
                    }
                    _ => {}
                }
                match &mut gate.changes {
                    Some(changes) => changes,
                    None => return Poll::Pending,
                }
            }
        };
        loop {
            match ready!(changes.poll_next_unpin(cx)) {
                Some(Some(served)) => {
                    let version = Some(served.version);
                    if this.sent != version && this.nacked != version {
                        this.sent = version;
                        return Poll::Ready(Some(Due::Send(served)));
                    }
                }
                Some(None) => {
                    if this.sent.take().is_some() {
                        return Poll::Ready(Some(Due::Gone));
                    }
                }
                None => return Poll::Ready(None),
            }
        }
    }
}
