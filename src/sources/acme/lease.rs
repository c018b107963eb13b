//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does it: the holder renews `renewTime` every `duration / 5`; the
//! others take the Lease over once they have seen it unchanged for a whole
//! `duration` (measured on their own clock, so clock skew between nodes does not
//! matter), or when it has no holder. Every write carries the resourceVersion that
//! was read, so two candidates never both win: the second gets a conflict.
//!
//! A holder that cannot renew within 2/3 of `duration` steps down before anyone
//! else may take over. On shutdown the holder releases the Lease (no holder), so a
//! rolling update hands over at once instead of after `duration`.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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

/// Starts the election task; the receiver says whether this replica holds the Lease.
pub fn start(
    client: kube::Client,
    namespace: &str,
    name: &str,
    duration: Duration,
    shutdown: CancellationToken,
) -> (Leadership, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let elector = Elector {
        api: Api::namespaced(client, namespace),
        name: name.to_string(),
        namespace: namespace.to_string(),
        identity: identity(),
        duration,
        tx,
        observed: None,
        renewed: None,
    };
    (rx, tokio::spawn(elector.run(shutdown)))
}

impl Elector {
    async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(
            lease = %format!("{}/{}", self.namespace, self.name),
            identity = %self.identity,
            duration = ?self.duration,
            "ACME leader election started"
        );
        let period = (self.duration / 5).max(Duration::from_millis(200));
        let renew_deadline = self.duration * 2 / 3;
        loop {
            let holding = match self.try_acquire_or_renew().await {
                Ok(holding) => holding,
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "ACME lease request failed");
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
