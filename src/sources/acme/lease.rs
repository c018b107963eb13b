//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does it: the holder renews `renewTime` every `duration / 5`; the
//! others take the Lease over once they have seen it unchanged for a whole
//! `duration` (measured on their own clock, so clock skew between nodes does not
//! matter), or when it has no holder. Every write carries the resourceVersion that
//! was read, so two candidates never both win: the second gets a conflict.
//!
//! A holder that cannot renew within 2/3 of `duration` steps down before anyone
//! else may take over. On shutdown the holder releases the Lease (no holder), so a
//! rolling update hands over at once instead of after `duration`; the task's handle
//! goes to the shutdown drain so that the release is awaited.
//!
//! Hand-written rather than kube-lease-manager (0.13, which does match kube 5 /
//! k8s-openapi 0.29): that crate decides expiry from the holder's `renewTime` against
//! the local wall clock (skew between nodes shifts the handover, which client-go's
//! rule above avoids), and reads `SystemTime`, so its loop cannot run under tokio's
//! paused clock like the tests below; it has no step-down at 2/3 of the duration
//! either. The election is ~200 lines, with its acquire, renew, lose and release tests.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;
// tokio's clock, so that tests drive the election under a paused clock.
use crate::shutdown::Shutdown;
use tokio::time::Instant;

/// Whether this replica holds the Lease, updated as it changes.
pub type Leadership = watch::Receiver<bool>;

pub struct Elector {
    api: Api<Lease>,
    name: String,
    namespace: String,
    identity: String,
    duration: Duration,
    tx: watch::Sender<bool>,
    /// The Lease as last read (resourceVersion, holder, renewTime) and when it was
    /// first seen so: a Lease unchanged for `duration` is expired.
    observed: Option<(String, Instant)>,
    /// The last successful renewal, while holding.
    renewed: Option<Instant>,
}

/// `hostname_random`: unique per process even when replicas share a hostname.
pub fn identity() -> String {
    use ring::rand::SecureRandom;
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "certwire".into());
    let mut bytes = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    format!("{host}_{}", hex::encode(bytes))
}

/// A running election: whether this replica holds the Lease, and the task, which
/// releases the Lease on shutdown: the drain must await it, or the release is lost.
pub struct Election {
    pub leadership: Leadership,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the election task under a random identity ([`identity`]).
pub fn start(client: kube::Client, namespace: &str, name: &str, duration: Duration, shutdown: Shutdown) -> Election {
    Elector::new(client, namespace, name, identity(), duration).spawn(shutdown)
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: String, duration: Duration) -> Self {
        let (tx, _) = watch::channel(false);
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            namespace: namespace.to_string(),
            identity,
            duration,
            tx,
            observed: None,
            renewed: None,
        }
    }

    pub fn spawn(self, shutdown: Shutdown) -> Election {
        let leadership = self.tx.subscribe();
        Election { leadership, task: tokio::spawn(self.run(shutdown)) }
    }

    async fn run(mut self, shutdown: Shutdown) {
        tracing::info!(
            lease = %format!("{}/{}", self.namespace, self.name),
            identity = %self.identity,
            duration = ?self.duration,
            "ACME leader election started"
        );
        let period = (self.duration / 5).max(Duration::from_millis(200));
        let renew_deadline = self.duration * 2 / 3;
        loop {
            // A request that hangs counts as a failed one: the deadline below still applies.
            let round = tokio::select! {
                _ = shutdown.cancelled() => break,
                round = tokio::time::timeout(period, self.try_acquire_or_renew()) => round,
            };
            let holding = match round {
                Ok(Ok(holding)) => holding,
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {period:?}"),
                    };
                    tracing::warn!(lease = %self.name, error = %error, "ACME lease request failed");
                    // Keep holding until the renew deadline passes without a renewal.
                    self.renewed.is_some_and(|t| t.elapsed() < renew_deadline)
                }
            };
            if !holding {
                self.renewed = None;
            }
            self.set(holding);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(period) => {}
            }
        }
        if *self.tx.borrow() {
            self.set(false);
            match tokio::time::timeout(Duration::from_secs(2), self.release()).await {
                Ok(Ok(())) => tracing::info!(lease = %self.name, "ACME lease released"),
                Ok(Err(e)) => tracing::warn!(lease = %self.name, error = %e, "could not release the ACME lease"),
                Err(_) => tracing::warn!(lease = %self.name, "could not release the ACME lease in time"),
            }
        }
    }

    fn set(&self, holding: bool) {
        let was = *self.tx.borrow();
        if was != holding {
            if holding {
                tracing::info!(lease = %self.name, identity = %self.identity, "ACME lease acquired: this replica orders");
            } else {
                tracing::warn!(lease = %self.name, identity = %self.identity, "ACME lease lost: this replica stops ordering");
            }
            self.tx.send_replace(holding);
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().try_into().unwrap_or(i32::MAX)),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: true when this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.renewed = Some(Instant::now());
                    Ok(true)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if !mine {
            // Expired once seen unchanged for a whole lease duration (ours or theirs).
            let their = spec.lease_duration_seconds.map(|s| Duration::from_secs(s.max(1) as u64));
            let now = Instant::now();
            let since = match &self.observed {
                Some((seen, at)) if *seen == rv => *at,
                _ => {
                    self.observed = Some((rv.clone(), now));
                    now
                }
            };
            let expired = holder.is_none() || now.duration_since(since) >= their.unwrap_or(self.duration);
            if !expired {
                return Ok(false);
            }
            tracing::info!(lease = %self.name, previous = holder.as_deref().unwrap_or("none"), "ACME lease expired or free; taking it over");
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time.clone() } else { None };
        lease.spec = Some(self.spec(transitions, acquired));
        // metadata.resourceVersion as read: whoever writes first wins, the other gets 409.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(written) => {
                self.observed = written.metadata.resource_version.map(|rv| (rv, Instant::now()));
                self.renewed = Some(Instant::now());
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// No holder, so a waiting replica takes over at its next round.
    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api.replace(&self.name, &PostParams::default(), &lease).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::json;

    use super::*;
    use crate::sources::acme::fake_kube::{Action, FakeApi, lease_path};

    const DURATION: Duration = Duration::from_secs(10);

    fn elector(api: &FakeApi, identity: &str, shutdown: &Shutdown) -> Election {
        Elector::new(api.client(), "acme", "lock", identity.to_string(), DURATION).spawn(shutdown.clone())
    }

    fn holder(api: &FakeApi) -> Option<String> {
        api.get(&lease_path("acme", "lock"))?["spec"]["holderIdentity"].as_str().map(str::to_string)
    }

    /// Someone else's Lease, as another replica writes it.
    fn held_by(api: &FakeApi, identity: &str) {
        let mut lease = api.get(&lease_path("acme", "lock")).unwrap_or_else(|| {
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "lock", "namespace": "acme"}, "spec": {}})
        });
        lease["spec"]["holderIdentity"] = json!(identity);
        lease["spec"]["leaseDurationSeconds"] = json!(10);
        api.put(&lease_path("acme", "lock"), lease);
    }

    #[tokio::test(start_paused = true)]
    async fn acme_lease_acquire_renew_release() {
        let api = FakeApi::default();
        let shutdown = Shutdown::new();
        let mut election = elector(&api, "a", &shutdown);
        election.leadership.wait_for(|holding| *holding).await.unwrap();
        assert_eq!(holder(&api).as_deref(), Some("a"), "created with this replica as holder");
        let first = api.get(&lease_path("acme", "lock")).unwrap();

        // Renewed every duration / 5.
        tokio::time::sleep(DURATION).await;
        let renewed = api.get(&lease_path("acme", "lock")).unwrap();
        assert_ne!(renewed["metadata"]["resourceVersion"], first["metadata"]["resourceVersion"]);
        assert_eq!(renewed["spec"]["acquireTime"], first["spec"]["acquireTime"], "acquireTime kept on renewal");
        assert!(*election.leadership.borrow());
        let puts = api.requests().iter().filter(|r| r.starts_with("PUT")).count();
        assert!((4..=6).contains(&puts), "{puts} renewals in one duration");

        // Released on shutdown: no holder, so a waiting replica takes over at once.
        shutdown.trigger();
        election.task.await.unwrap();
        assert_eq!(holder(&api), None);
        assert!(!*election.leadership.borrow());
    }

    #[tokio::test(start_paused = true)]
    async fn acme_lease_taken_over_only_after_a_whole_unchanged_duration() {
        let api = FakeApi::default();
        held_by(&api, "old");
        let shutdown = Shutdown::new();
        let started = Instant::now();
        let mut election = elector(&api, "b", &shutdown);
        // A holder that keeps renewing keeps it.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(!*election.leadership.borrow(), "taken while the holder renews");
            held_by(&api, "old");
        }
        // It stops: taken over once seen unchanged for a whole duration, by this clock.
        let stopped = Instant::now();
        election.leadership.wait_for(|holding| *holding).await.unwrap();
        assert!(
            stopped.elapsed() >= DURATION && stopped.elapsed() <= DURATION + DURATION / 5 * 2,
            "{:?}",
            stopped.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(60));
        let lease = api.get(&lease_path("acme", "lock")).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
        shutdown.trigger();
        election.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn acme_lease_lost_to_another_writer_and_not_released_then() {
        let api = FakeApi::default();
        let shutdown = Shutdown::new();
        let mut election = elector(&api, "a", &shutdown);
        election.leadership.wait_for(|holding| *holding).await.unwrap();
        // Another replica wrote itself in (say, after a partition): this one steps down.
        held_by(&api, "b");
        election.leadership.wait_for(|holding| !*holding).await.unwrap();
        shutdown.trigger();
        election.task.await.unwrap();
        assert_eq!(holder(&api).as_deref(), Some("b"), "a Lease held by another is never released");
    }

    #[tokio::test(start_paused = true)]
    async fn acme_lease_holder_steps_down_before_the_lease_can_expire() {
        for action in [Action::Status(500), Action::Hang] {
            let api = FakeApi::default();
            let shutdown = Shutdown::new();
            let mut election = elector(&api, "a", &shutdown);
            election.leadership.wait_for(|holding| *holding).await.unwrap();
            let last_renewal = Instant::now();
            api.fault(Method::GET, "/leases/lock", action, usize::MAX);
            election.leadership.wait_for(|holding| !*holding).await.unwrap();
            let held = last_renewal.elapsed();
            // Others take over after DURATION unchanged; this one is gone well before.
            assert!(held >= DURATION * 2 / 3 && held < DURATION, "{action:?}: held {held:?} without renewing");
            shutdown.trigger();
            tokio::time::timeout(Duration::from_secs(5), election.task).await.expect("ends").unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn acme_lease_two_candidates_one_holder() {
        let api = FakeApi::default();
        let shutdown = Shutdown::new();
        let a = elector(&api, "a", &shutdown);
        let b = elector(&api, "b", &shutdown);
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (ha, hb) = (*a.leadership.borrow(), *b.leadership.borrow());
            assert!(!(ha && hb), "both hold the Lease");
        }
        let winner = holder(&api).expect("one of them holds it");
        assert!(if winner == "a" { *a.leadership.borrow() } else { *b.leadership.borrow() });
        shutdown.trigger();
        a.task.await.unwrap();
        b.task.await.unwrap();
        assert_eq!(holder(&api), None, "the holder released it");
    }
}
