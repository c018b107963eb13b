//! The ACME account: created once (with External Account Binding when configured),
//! its credentials kept in the state directory (mode 0600) and reused on every start;
//! the CA's ARI answers it fetches; and the HTTP client that talks to the CA (ring-backed rustls, HTTPS only unless the
//! config opts into a plain-HTTP test CA).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use base64::Engine;
use bytes::Bytes;
use http::Request;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, BodyWrapper, BytesResponse, CertificateIdentifier, ExternalAccountKey, HttpClient,
    NewAccount,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::config::{AcmeConfig, read_secret};
use super::kube_secrets::KubeSecrets;
use super::schedule::{AriAnswer, Window};
use super::state_dir::{StateDir, account_file_name};

/// One request to the CA may take this long (connect included) before it fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The account, loaded or created on first use and then shared by every certificate.
pub struct Accounts {
    directory: String,
    contact: Vec<String>,
    eab: Option<(String, Zeroizing<Vec<u8>>)>,
    state: StateDir,
    /// The Kubernetes account Secret, read before the state directory.
    kube: Option<KubeSecrets>,
    http: Http,
    account: Mutex<Option<Account>>,
}

impl Accounts {
    /// The CA's ARI answer for the certificate `leaf_der`; `None` when the CA offers no
    /// ARI or cannot be asked now (then 2/3 of the lifetime applies).
    pub async fn renewal_window(&self, certificate: &str, leaf_der: &[u8]) -> Option<AriAnswer> {
        let leaf = CertificateDer::from(leaf_der);
        let id = match CertificateIdentifier::try_from(&leaf) {
            Ok(id) => id,
            Err(e) => {
                tracing::debug!(certificate, error = %e, "no ARI identifier for the certificate");
                return None;
            }
        };
        let account = match self.get().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(
                    certificate,
                    error = format!("{e:#}"),
                    "cannot reach the CA for its ARI window; renewing at 2/3 of the lifetime"
                );
                return None;
            }
        };
        match account.renewal_info(&id).await {
            Ok((info, retry_after)) => {
                let w = info.suggested_window;
                Some(AriAnswer { window: Window { start: w.start.into(), end: w.end.into() }, retry_after })
            }
            Err(instant_acme::Error::Unsupported(_)) => None,
            Err(e) => {
                tracing::warn!(certificate, error = %e, "ARI request failed; renewing at 2/3 of the lifetime");
                None
            }
        }
    }

    pub fn new(config: &AcmeConfig, state: StateDir, kube: Option<KubeSecrets>) -> anyhow::Result<Self> {
        let eab = match &config.eab {
            Some(eab) => {
                let text = read_secret(eab.hmac_key.as_ref(), eab.hmac_key_file.as_deref()).context("acme.eab")?;
                Some((eab.kid.clone(), decode_eab_key(&text)?))
            }
            None => None,
        };
        let contact =
            config.contact.iter().map(|c| if c.contains(':') { c.clone() } else { format!("mailto:{c}") }).collect();
        Ok(Self {
            directory: config.directory.clone(),
            contact,
            eab,
            state,
            kube,
            http: Http::new(config.ca_file.clone(), config.insecure_http_directory)?,
            account: Mutex::new(None),
        })
    }

    pub fn directory(&self) -> &str {
        &self.directory
    }

    /// The account, from the state directory or newly registered (then saved).
    pub async fn get(&self) -> anyhow::Result<Account> {
        let mut slot = self.account.lock().await;
        if let Some(account) = slot.as_ref() {
            return Ok(account.clone());
        }
        let account = match self.load().await? {
            Some(json) => {
                let credentials: AccountCredentials = serde_json::from_str(&json)
                    .with_context(|| format!("the stored ACME account for {} is not valid JSON", self.directory))?;
                let account = Account::builder_with_http(self.http.boxed())
                    .from_credentials(credentials)
                    .await
                    .map_err(|e| anyhow!("loading the directory {}: {e}", self.directory))?;
                tracing::info!(directory = %self.directory, account = account.id(), "ACME account loaded");
                account
            }
            None => self.register().await?,
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    async fn register(&self) -> anyhow::Result<Account> {
        let contact: Vec<&str> = self.contact.iter().map(String::as_str).collect();
        let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
        let eab = self.eab.as_ref().map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key));
        let (account, credentials) = Account::builder_with_http(self.http.boxed())
            .create(&new, self.directory.clone(), eab.as_ref())
            .await
            .map_err(|e| anyhow!("registering an account at {}: {e}", self.directory))?;
        let json = Zeroizing::new(serde_json::to_vec(&credentials).context("serializing the account")?);
        let path = self.state.save_account(&self.directory, &json)?;
        if let Some(kube) = &self.kube {
            kube.save_account(&account_file_name(&self.directory), &json).await?;
        }
        tracing::info!(
            directory = %self.directory,
            account = account.id(),
            eab = self.eab.is_some(),
            file = %path.display(),
            "ACME account registered"
        );
        Ok(account)
    }
}

impl Accounts {
    /// The stored credentials: the Kubernetes Secret first (shared by the replicas),
    /// else the state directory (then copied into the Secret).
    async fn load(&self) -> anyhow::Result<Option<Zeroizing<String>>> {
        let key = account_file_name(&self.directory);
        if let Some(kube) = &self.kube
            && let Some(json) = kube.load_account(&key).await?
        {
            return Ok(Some(json));
        }
        let Some(json) = self.state.load_account(&self.directory)? else { return Ok(None) };
        if let Some(kube) = &self.kube {
            kube.save_account(&key, json.as_bytes()).await?;
            tracing::info!(directory = %self.directory, "ACME account copied from the state directory to the Kubernetes Secret");
        }
        Ok(Some(json))
    }
}

/// EAB keys are handed out base64url (RFC 8555 §7.3.4); accept standard base64 and
/// padding too, since CAs and docs mix them up.
fn decode_eab_key(text: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let trimmed = text.trim().trim_end_matches('=');
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let normalized = Zeroizing::new(trimmed.replace('+', "-").replace('/', "_"));
    let key = engine.decode(normalized.as_bytes()).context("acme.eab hmac_key is not base64url")?;
    anyhow::ensure!(!key.is_empty(), "acme.eab hmac_key is empty");
    Ok(Zeroizing::new(key))
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The HTTP client for the CA: rustls with ring, platform roots or `ca_file`,
/// HTTPS only unless `insecure_http_directory`, with a timeout on every request.
#[derive(Clone)]
pub struct Http {
    client: HyperClient<Connector, BodyWrapper<Bytes>>,
}

impl Http {
    pub fn new(ca_file: Option<PathBuf>, allow_http: bool) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match ca_file {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(&path)
                    .with_context(|| format!("reading acme.ca_file {}", path.display()))?
                {
                    let cert = cert.with_context(|| format!("parsing acme.ca_file {}", path.display()))?;
                    roots.add(cert).with_context(|| format!("adding a root from {}", path.display()))?;
                }
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .context("TLS versions")?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                builder.with_tls_config(config)
            }
            None => {
                builder.with_provider_and_native_roots(provider).context("loading the platform's root certificates")?
            }
        };
        let builder = if allow_http { builder.https_or_http() } else { builder.https_only() };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = builder.enable_http1().enable_http2().wrap_connector(http);
        Ok(Self { client: HyperClient::builder(TokioExecutor::new()).build(connector) })
    }

    fn boxed(&self) -> Box<dyn HttpClient> {
        Box::new(self.clone())
    }
}

impl HttpClient for Http {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let uri = req.uri().to_string();
        let fut = HttpClient::request(&self.client, req);
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Ok(result) => result.map_err(|e| instant_acme::Error::Other(format!("{uri}: {}", chain(&e)).into())),
                Err(_) => {
                    Err(instant_acme::Error::Other(format!("{uri}: no answer within {REQUEST_TIMEOUT:?}").into()))
                }
            }
        })
    }
}

/// An error with its sources, `a: b: c` (hyper's own message alone says little).
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eab_keys_decode_in_both_alphabets() {
        assert_eq!(decode_eab_key("AAECAw").unwrap().as_slice(), [0, 1, 2, 3]);
        assert_eq!(decode_eab_key("AAECAw==").unwrap().as_slice(), [0, 1, 2, 3]);
        assert_eq!(decode_eab_key("-_8").unwrap().as_slice(), [0xfb, 0xff]);
        assert_eq!(decode_eab_key("+/8").unwrap().as_slice(), [0xfb, 0xff]);
        assert!(decode_eab_key("not base64!").is_err());
    }

    #[tokio::test]
    async fn plain_http_is_refused_unless_allowed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/directory", listener.local_addr().unwrap());
        let http = Http::new(None, false).unwrap();
        let req = Request::get(&url).body(BodyWrapper::default()).unwrap();
        let err = HttpClient::request(&http, req).await.err().expect("https only");
        assert!(err.to_string().contains("http"), "{err}");
    }
}
