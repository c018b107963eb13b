//! A simulated proxy over time: a session (its connection and one stream per secret)
//! and, once the connection is lost, a new session after a jittered exponential
//! backoff, as Envoy reconnects to its xDS server; or at once when the coordinator has
//! every proxy drop its connection (a thundering herd).
//!
//! A proxy's streams share its connection, so a stream that ends is taken as the
//! connection lost and the proxy starts over with all of them. The faults measured here
//! are connection faults; Envoy would retry a stream that ended alone on its own.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::client::{self, Connected, Identity, Protocol, Tracker};

/// The first retry waits up to this long, Envoy's default for xDS streams
/// (`SubscriptionFactory::RetryInitialDelayMs`)...
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// ...and the ceiling doubles with every retry up to this (Envoy's default is 30 s, which
/// would have a benchmark mostly wait; the fault tests' fleet caps it at 4 s too).
pub const BACKOFF_MAX: Duration = Duration::from_secs(4);

pub struct Proxy {
    pub source: IpAddr,
    pub target: SocketAddr,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub protocol: Protocol,
    pub identity: Identity,
    /// The tracker's slots of this proxy's streams, one per secret.
    pub slots: Range<usize>,
}

/// One connection of a proxy and the tasks of its streams (aborted when dropped).
pub struct Session {
    pub conn: Connected,
    streams: JoinSet<()>,
}

impl Proxy {
    /// Connects and opens every stream of the proxy.
    pub async fn session(&self, tracker: &Arc<Tracker>) -> anyhow::Result<Session> {
        let conn = client::connect(self.source, self.target, self.tls.clone()).await?;
        let mut streams = JoinSet::new();
        for slot in self.slots.clone() {
            let (channel, identity) = (conn.channel.clone(), self.identity.clone());
            let opened =
                client::open_stream(&mut streams, channel, self.protocol, identity, tracker.clone(), slot).await;
            if let Err(err) = opened {
                self.end(Session { conn, streams }, tracker);
                return Err(err.context(format!("opening the stream of slot {slot}")));
            }
        }
        Ok(Session { conn, streams })
    }

    /// Runs the proxy from its first session on. Without `reconnect`, its streams live
    /// and end on their own: a stream the server ends stays ended and shows as missing
    /// in the figures instead of being healed. With it, a lost connection is
    /// opened again after the backoff, and a signal on `drops` closes the connection and
    /// opens a new one at once.
    pub async fn live(
        self,
        mut session: Session,
        tracker: Arc<Tracker>,
        mut drops: watch::Receiver<u64>,
        reconnect: bool,
    ) {
        if !reconnect {
            session.streams.join_all().await;
            return;
        }
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
        loop {
            let dropped = tokio::select! {
                _ = session.streams.join_next() => false,
                Ok(()) = drops.changed() => true,
            };
            if dropped {
                session.conn.sever();
            }
            // Envoy resets its backoff whenever a response arrives.
            if self.slots.clone().any(|slot| tracker.heard(slot)) {
                backoff.reset();
            }
            self.end(session, &tracker);
            let wait = if dropped { Duration::ZERO } else { backoff.next() };
            session = self.reconnect(wait, &mut backoff, &tracker).await;
        }
    }

    /// Opens a new session after `wait`, retrying with `backoff` until one opens.
    async fn reconnect(&self, mut wait: Duration, backoff: &mut Backoff, tracker: &Arc<Tracker>) -> Session {
        loop {
            tokio::time::sleep(wait).await;
            match self.session(tracker).await {
                Ok(session) => return session,
                Err(_) => {
                    tracker.failed_connects.fetch_add(1, Ordering::Relaxed);
                    wait = backoff.next();
                }
            }
        }
    }

    /// Drops a session: its streams are aborted and its slots have no stream any more.
    fn end(&self, session: Session, tracker: &Tracker) {
        drop(session);
        self.slots.clone().for_each(|slot| tracker.closed(slot));
    }
}

/// Envoy's `JitteredExponentialBackOffStrategy`: retry n waits a uniformly random time
/// below `base × 2^n`, that ceiling capped at `max` ("full jitter": proxies that lost
/// their server at the same moment do not all come back at the same moment).
pub struct Backoff {
    base: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, ceiling: base }
    }

    pub fn next(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (ceiling * 2).min(self.max);
        ceiling.mul_f64(unit_random())
    }

    pub fn reset(&mut self) {
        self.ceiling = self.base;
    }
}

/// Uniform in [0, 1).
fn unit_random() -> f64 {
    // The top 53 bits: every value a f64 in [0, 1) can hold at that spacing.
    getrandom::u64().map(|r| (r >> 11) as f64 / (1u64 << 53) as f64).unwrap_or(0.5)
}
