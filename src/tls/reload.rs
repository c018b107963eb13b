//! The reloader: reads the listener's PEM from files (every `reload_every`) or from the
//! store (on every change), and swaps in a new configuration when the content changed.
//! A bad update is refused with its reason and the last good configuration stays.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use crate::shutdown::Shutdown;
use anyhow::Context;
use tokio::sync::watch;

use super::{CaFrom, CertFrom, Pems, ServerTls, Settings, build};
use crate::health::Health;
use crate::metrics::{Metrics, ReasonLabel};
use crate::pki::KeyBytes;
use crate::store::{Current, Store};
use crate::version::Version;

/// Certificates, keys, CA bundles and CRLs are small; a file above this is refused
/// before it is read whole (a path pointing at /dev/zero must not exhaust memory).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

const COMPONENT: &str = "sds-tls";

/// Loads the configuration and keeps it current until shutdown. Files must load at
/// start (a wrong path is a configuration error); a secret from the store may come
/// later, and until then certwire is not ready and TLS handshakes are refused.
pub async fn start(
    settings: Settings,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Shutdown,
) -> anyhow::Result<Arc<ServerTls>> {
    let tls = Arc::new(ServerTls::new(settings.client_ca.is_some()));
    let mut reloader = Reloader { settings, store, tls: tls.clone(), metrics, health, last: None };
    let from_files = matches!(reloader.settings.cert, CertFrom::Files { .. });
    match reloader.reload().await {
        Ok(_) => {}
        Err(e) if from_files => return Err(anyhow::anyhow!(e)).context("loading the SDS listener's TLS files"),
        Err(e) => reloader.refused(&e),
    }
    tokio::spawn(reloader.run(shutdown));
    Ok(tls)
}

struct Reloader {
    settings: Settings,
    store: Arc<Store>,
    tls: Arc<ServerTls>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Digest of the PEM last loaded: unchanged content is not rebuilt.
    last: Option<Version>,
}

impl Reloader {
    async fn run(mut self, shutdown: Shutdown) {
        let mut cert_rx = match &self.settings.cert {
            CertFrom::Secret(name) => Some(self.store.subscribe(name)),
            CertFrom::Files { .. } => None,
        };
        let mut ca_rx = match &self.settings.client_ca {
            Some(CaFrom::Secret(name)) => Some(self.store.subscribe(name)),
            _ => None,
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.settings.reload_every) => {}
                _ = changed(&mut cert_rx) => {}
                _ = changed(&mut ca_rx) => {}
            }
            if let Err(e) = self.reload().await {
                self.refused(&e);
            }
        }
        // Receivers first: release drops a name's channel only when nobody holds it.
        drop((cert_rx, ca_rx));
        if let CertFrom::Secret(name) = &self.settings.cert {
            self.store.release(name);
        }
        if let Some(CaFrom::Secret(name)) = &self.settings.client_ca {
            self.store.release(name);
        }
    }

    /// Reads and, when the content changed, builds and swaps. `Ok(true)`: swapped.
    async fn reload(&mut self) -> Result<bool, String> {
        let pems = self.read().await?;
        let digest = digest(&pems);
        if self.last == Some(digest) {
            return Ok(false);
        }
        let config = build(&pems).map_err(|e| e.to_string())?;
        self.tls.set(config);
        self.last = Some(digest);
        self.health.ready(COMPONENT);
        self.metrics.tls_reloads.get_or_create(&ReasonLabel { reason: "loaded" }).inc();
        tracing::info!(client_auth = self.tls.client_auth, version = %digest, "SDS listener TLS loaded");
        Ok(true)
    }

    fn refused(&self, error: &str) {
        self.metrics.tls_reloads.get_or_create(&ReasonLabel { reason: "refused" }).inc();
        if self.tls.config().is_none() {
            self.health.not_ready(COMPONENT, format!("no usable TLS certificate for the SDS listener: {error}"));
        }
        tracing::warn!(error, kept_previous = self.tls.config().is_some(), "SDS listener TLS not reloaded");
    }

    async fn read(&self) -> Result<Pems, String> {
        let (chain, key) = match &self.settings.cert {
            CertFrom::Files { cert, key } => {
                let (cert, key) = (cert.clone(), key.clone());
                blocking(move || Ok((read_capped(&cert)?, KeyBytes::new(read_capped(&key)?)))).await?
            }
            CertFrom::Secret(name) => {
                let served = self.store.get(name).ok_or_else(|| format!("secret {name:?} is not served (yet)"))?;
                crate::pki::tls_pems(&served.resource)
                    .ok_or_else(|| format!("secret {name:?} is a {}, not a tls_certificate", served.kind.as_str()))?
            }
        };
        let (client_ca, client_crl) = match &self.settings.client_ca {
            None => (None, None),
            Some(CaFrom::File { ca, crl }) => {
                let (ca, crl) = (ca.clone(), crl.clone());
                let (ca, crl) =
                    blocking(move || Ok((read_capped(&ca)?, crl.as_deref().map(read_capped).transpose()?))).await?;
                (Some(ca), crl)
            }
            Some(CaFrom::Secret(name)) => {
                let served = self.store.get(name).ok_or_else(|| format!("secret {name:?} is not served (yet)"))?;
                let (ca, crl) = crate::pki::ca_pems(&served.resource).ok_or_else(|| {
                    format!("secret {name:?} is a {}, not a validation_context", served.kind.as_str())
                })?;
                (Some(ca), crl)
            }
        };
        Ok(Pems { chain, key, client_ca, client_crl })
    }
}

async fn changed(rx: &mut Option<watch::Receiver<Current>>) {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// File reads block: off the threads that serve proxies.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("reading TLS files: {e}"))?
}

/// Reads a regular file of at most [`MAX_PEM_BYTES`].
fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    let mut out = Vec::new();
    file.take(MAX_PEM_BYTES + 1).read_to_end(&mut out).map_err(|e| format!("{}: {e}", path.display()))?;
    if out.len() as u64 > MAX_PEM_BYTES {
        return Err(format!("{}: larger than {MAX_PEM_BYTES} bytes", path.display()));
    }
    Ok(out)
}

fn digest(p: &Pems) -> Version {
    let mut all = zeroize::Zeroizing::new(Vec::with_capacity(p.chain.len() + p.key.len() + 64));
    for part in [Some(&p.chain[..]), Some(p.key.as_slice()), p.client_ca.as_deref(), p.client_crl.as_deref()] {
        let part = part.unwrap_or_default();
        all.extend_from_slice(&(part.len() as u64).to_le_bytes());
        all.extend_from_slice(part);
    }
    Version::of(&all)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn write_pair(dir: &Path, cn: &str) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![cn.to_owned()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    }

    fn settings(dir: &Path) -> Settings {
        Settings {
            cert: CertFrom::Files { cert: dir.join("tls.crt"), key: dir.join("tls.key") },
            client_ca: None,
            reload_every: Duration::from_secs(5),
        }
    }

    fn reloader(settings: Settings) -> Reloader {
        let metrics = Arc::new(Metrics::new());
        Reloader {
            settings,
            store: Arc::new(Store::new()),
            tls: Arc::new(ServerTls::new(false)),
            metrics,
            health: Arc::new(Health::default()),
            last: None,
        }
    }

    #[tokio::test]
    async fn reloads_changed_files_and_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a");
        let mut r = reloader(settings(dir.path()));
        assert_eq!(r.reload().await, Ok(true));
        let first = r.tls.config().unwrap();
        assert_eq!(r.reload().await, Ok(false), "same content: not rebuilt");
        write_pair(dir.path(), "b");
        assert_eq!(r.reload().await, Ok(true));
        assert!(!Arc::ptr_eq(&first, &r.tls.config().unwrap()));
        let good = r.tls.config().unwrap();
        // A key that does not match: refused, the last good stays.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("tls.key"), other.serialize_pem()).unwrap();
        let err = r.reload().await.unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        assert!(Arc::ptr_eq(&good, &r.tls.config().unwrap()));
    }

    #[tokio::test]
    async fn files_are_capped_and_must_be_regular() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a");
        std::fs::write(dir.path().join("tls.crt"), vec![b'A'; MAX_PEM_BYTES as usize + 1]).unwrap();
        let mut r = reloader(settings(dir.path()));
        let err = r.reload().await.unwrap_err();
        assert!(err.contains("tls.crt") && err.contains("larger than"), "{err}");
        let mut s = settings(dir.path());
        s.cert = CertFrom::Files { cert: "/dev/zero".into(), key: dir.path().join("tls.key") };
        let err = reloader(s).reload().await.unwrap_err();
        assert!(err.contains("/dev/zero") && err.contains("not a regular file"), "{err}");
        let err = read_capped(&dir.path().join("missing")).unwrap_err();
        assert!(err.contains("missing"), "{err}");
    }

    #[tokio::test]
    async fn a_secret_from_the_store_loads_when_it_arrives() {
        let s = Settings {
            cert: CertFrom::Secret("certwire-tls".into()),
            client_ca: None,
            reload_every: Duration::from_secs(5),
        };
        let mut r = reloader(s);
        let err = r.reload().await.unwrap_err();
        assert!(err.contains("certwire-tls") && err.contains("not served"), "{err}");
        r.refused(&err);
        assert!(r.health.check().is_err(), "not ready without a certificate");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["certwire".to_owned()]).unwrap().self_signed(&key).unwrap();
        let material = crate::pki::Material::Tls {
            cert_chain_pem: cert.pem().into_bytes(),
            key_pem: KeyBytes::new(key.serialize_pem().into_bytes()),
            ocsp_staple: None,
        };
        let intake =
            crate::ingest::Intake::new(r.store.clone(), r.metrics.clone(), "test", crate::policy::AllowExpired::Never);
        intake.update("certwire-tls", &material, std::time::Instant::now()).unwrap();
        assert_eq!(r.reload().await, Ok(true));
        assert!(r.health.check().is_ok());
    }
}
