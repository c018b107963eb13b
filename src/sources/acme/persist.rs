//! What a certificate task keeps across restarts: its issued certificate and the
//! backoff after failed orders, in the state directory and, when configured, in the
//! Kubernetes Secrets. Kubernetes is read first (another replica may have written it
//! since); both are written. A failure here never stops a task: it is logged, and
//! what is served stays.

use std::time::Duration;

use crate::shutdown::Shutdown;

use super::backoff::Backoff;
use super::kube_secrets::KubeSecrets;
use super::state_dir::{StateDir, Stored};

/// How long one write to the API server may take.
const KUBE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one read from the API server may take.
const KUBE_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Persist {
    pub state: StateDir,
    /// The Kubernetes Secrets store, when configured.
    pub kube: Option<KubeSecrets>,
}

impl Persist {
    /// The certificate's Kubernetes Secret, when configured and readable in time.
    pub async fn cert_from_kube(&self, name: &str, shutdown: &Shutdown) -> Option<Stored> {
        let kube = self.kube.as_ref()?;
        let loaded = tokio::select! {
            _ = shutdown.cancelled() => return None,
            loaded = timed(KUBE_READ_TIMEOUT, kube.load_cert(name)) => loaded,
        };
        match loaded {
            Ok(Some(stored)) => Some(stored),
            Ok(None) => {
                tracing::info!(certificate = %name, secret = %kube.describe(name), "no stored certificate in Kubernetes");
                None
            }
            Err(e) => {
                tracing::warn!(certificate = %name, error = format!("{e:#}"), "stored certificate unreadable from Kubernetes; trying the state directory");
                None
            }
        }
    }

    /// The certificate in the state directory, if any and readable.
    pub fn cert_from_dir(&self, name: &str) -> Option<Stored> {
        match self.state.load_cert(name) {
            Ok(Some(stored)) => Some(stored),
            Ok(None) => {
                tracing::info!(certificate = %name, dir = %self.state.cert_dir(name).display(), "no stored certificate");
                None
            }
            Err(e) => {
                tracing::warn!(certificate = %name, error = format!("{e:#}"), "stored certificate unreadable");
                None
            }
        }
    }

    /// Writes `stored` to the state directory (a failure is logged: the certificate is
    /// served all the same and a restart orders again), then to the Kubernetes Secret;
    /// the latter's error is returned, for status: other replicas miss this certificate.
    pub async fn save_cert(&self, name: &str, stored: &Stored, domains: &[String]) -> anyhow::Result<()> {
        if let Err(e) = self.state.save_cert(name, stored) {
            tracing::error!(certificate = %name, error = format!("{e:#}"), "could not store the issued certificate");
        }
        match &self.kube {
            Some(kube) => timed(KUBE_WRITE_TIMEOUT, kube.save_cert(name, stored, domains)).await,
            None => Ok(()),
        }
    }

    /// The backoff record of `name` for `spec`: of the state directory's and the
    /// Kubernetes one, the later next attempt (a Kubernetes write may have failed, or
    /// another replica held the Lease). Records of another spec are ignored.
    pub async fn load_backoff(&self, name: &str, spec: &str) -> Option<Backoff> {
        let local = decode(name, "state directory", self.state.load_backoff(name));
        let remote = match &self.kube {
            Some(kube) => decode(name, "Kubernetes", timed(KUBE_READ_TIMEOUT, kube.load_backoff(name)).await),
            None => None,
        };
        [local, remote].into_iter().flatten().filter(|b| b.spec == spec).max_by_key(|b| b.next_attempt)
    }

    /// Keeps `backoff` in both places; failures are logged.
    pub async fn save_backoff(&self, name: &str, backoff: &Backoff) {
        let json = backoff.to_json();
        if let Err(e) = self.state.save_backoff(name, &json) {
            tracing::warn!(certificate = %name, error = format!("{e:#}"), "could not keep the backoff in the state directory");
        }
        if let Some(kube) = &self.kube
            && let Err(e) = timed(KUBE_WRITE_TIMEOUT, kube.save_backoff(name, &json)).await
        {
            tracing::warn!(certificate = %name, error = format!("{e:#}"), "could not keep the backoff in Kubernetes");
        }
    }

    /// Drops the backoff record after a success; failures are logged.
    pub async fn clear_backoff(&self, name: &str) {
        if let Err(e) = self.state.remove_backoff(name) {
            tracing::warn!(certificate = %name, error = format!("{e:#}"), "could not drop the backoff in the state directory");
        }
        if let Some(kube) = &self.kube
            && let Err(e) = timed(KUBE_WRITE_TIMEOUT, kube.remove_backoff(name)).await
        {
            tracing::warn!(certificate = %name, error = format!("{e:#}"), "could not drop the backoff in Kubernetes");
        }
    }
}

/// `what` within `limit`, else an error saying the API server did not answer.
async fn timed<T>(limit: Duration, what: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(limit, what)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer from the API server within {limit:?}")))
}

/// A stored record, or `None` (logged) when missing, unreadable or garbled.
fn decode(name: &str, place: &str, read: anyhow::Result<Option<Vec<u8>>>) -> Option<Backoff> {
    let bytes = match read {
        Ok(bytes) => bytes?,
        Err(e) => {
            tracing::warn!(certificate = %name, place, error = format!("{e:#}"), "backoff record unreadable; ignored");
            return None;
        }
    };
    match Backoff::from_json(&bytes) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!(certificate = %name, place, error = format!("{e:#}"), "backoff record garbled; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::sources::acme::backoff::RetryPolicy;
    use crate::sources::acme::fake_kube::FakeApi;

    const POLICY: RetryPolicy = RetryPolicy { base: Duration::from_secs(60), max: Duration::from_secs(3600) };

    fn persist(dir: &std::path::Path, api: Option<&FakeApi>) -> Persist {
        Persist {
            state: StateDir::open(dir).unwrap(),
            kube: api.map(|api| KubeSecrets::new(api.client(), "acme", "certwire-acme-account")),
        }
    }

    fn failed(previous: Option<&Backoff>, spec: &str) -> Backoff {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Backoff::after_failure(previous, now, POLICY, 1.0, "new-order: refused".into(), spec)
    }

    /// The issue 13 case: a restart used to start the backoff over.
    #[tokio::test(start_paused = true)]
    async fn acme_backoff_persisted_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let api = FakeApi::default();
        let first = persist(tmp.path(), Some(&api));
        assert_eq!(first.load_backoff("web", "spec").await, None);
        let one = failed(None, "spec");
        first.save_backoff("web", &one).await;
        let two = failed(Some(&one), "spec");
        first.save_backoff("web", &two).await;

        // A new process: same state directory, same API server.
        let restarted = persist(tmp.path(), Some(&api));
        assert_eq!(restarted.load_backoff("web", "spec").await, Some(two.clone()));
        // Only the state directory (no Kubernetes store configured, or a new replica
        // with an empty state directory): either copy is enough.
        assert_eq!(persist(tmp.path(), None).load_backoff("web", "spec").await, Some(two.clone()));
        let elsewhere = tempfile::tempdir().unwrap();
        assert_eq!(persist(elsewhere.path(), Some(&api)).load_backoff("web", "spec").await, Some(two.clone()));
        // A changed certificate config is tried at once.
        assert_eq!(restarted.load_backoff("web", "other spec").await, None);

        restarted.clear_backoff("web").await;
        assert_eq!(persist(tmp.path(), Some(&api)).load_backoff("web", "spec").await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn acme_backoff_later_copy_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let api = FakeApi::default();
        let local_only = persist(tmp.path(), None);
        let older = failed(None, "spec");
        let newer = failed(Some(&older), "spec");
        // Kubernetes has the later record (another replica held the Lease).
        local_only.save_backoff("web", &older).await;
        persist(tempfile::tempdir().unwrap().path(), Some(&api)).save_backoff("web", &newer).await;
        assert_eq!(persist(tmp.path(), Some(&api)).load_backoff("web", "spec").await, Some(newer));
        // A garbled record is ignored, not fatal.
        std::fs::write(tmp.path().join(".backoff/web.json"), b"not json").unwrap();
        assert_eq!(persist(tmp.path(), None).load_backoff("web", "spec").await, None);
    }
}
