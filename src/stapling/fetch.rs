//! Asking a responder: one HTTP POST (RFC 6960 appendix A), bounded in time and size.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Why a fetch failed; the limit ones are counted in `certwire_limits_hit`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("the response is larger than max_response_bytes ({0} bytes)")]
    TooLarge(usize),
    #[error("no complete response within the timeout ({0:?})")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(String),
}

impl FetchError {
    /// The `certwire_limits_hit` label, for failures that are a bound being reached.
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            FetchError::TooLarge(_) => Some("ocsp_max_response_bytes"),
            FetchError::Timeout(_) => Some("ocsp_timeout"),
            FetchError::Failed(_) => None,
        }
    }

    pub fn result(&self) -> &'static str {
        match self {
            FetchError::TooLarge(_) => "too_large",
            FetchError::Timeout(_) => "timeout",
            FetchError::Failed(_) => "error",
        }
    }
}

pub type FetchFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, FetchError>> + Send>>;

/// Something that answers OCSP requests: HTTP in production, canned answers in tests.
pub trait Fetch: Send + Sync + 'static {
    fn fetch(&self, url: &str, request: Vec<u8>) -> FetchFuture;
}

/// The HTTP client: http:// and https:// (rustls with ring, platform roots).
#[derive(Clone)]
pub struct Http {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    max_bytes: usize,
}

impl Http {
    pub fn new(timeout: Duration, max_bytes: usize) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone())
        {
            Ok(builder) => builder,
            Err(err) => {
                // Most responders are http:// (the response is signed); without platform
                // roots only https:// ones fail, each with a clear TLS error.
                tracing::warn!(error = %err, "no platform root certificates: https:// OCSP responders will fail");
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = builder.https_or_http().enable_http1().wrap_connector(http);
        // No pooled connections: a fetch every few hours per responder gains nothing
        // from them, and an idle socket per responder is held for nothing.
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector);
        Self { client, timeout, max_bytes }
    }

    async fn post(&self, url: String, request: Vec<u8>) -> Result<Vec<u8>, FetchError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| FetchError::Failed(format!("{what} {url}: {e}"));
        let req = http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, "application/ocsp-request")
            .header(http::header::ACCEPT, "application/ocsp-response")
            .body(Full::new(Bytes::from(request)))
            .map_err(|e| failed("building the request to", &e))?;
        let response = self.client.request(req).await.map_err(|e| failed("requesting", &ErrorChain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Failed(format!("the responder {url} answered HTTP {status}")));
        }
        if let Some(len) = response.headers().get(http::header::CONTENT_LENGTH)
            && len.to_str().ok().and_then(|l| l.parse::<u64>().ok()).is_some_and(|l| l > self.max_bytes as u64)
        {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        match Limited::new(response.into_body(), self.max_bytes).collect().await {
            Ok(body) => Ok(body.to_bytes().to_vec()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(FetchError::TooLarge(self.max_bytes)),
            Err(e) => Err(failed("reading the response of", &e)),
        }
    }
}

impl Fetch for Http {
    fn fetch(&self, url: &str, request: Vec<u8>) -> FetchFuture {
        let this = self.clone();
        let url = url.to_owned();
        Box::pin(async move {
            let timeout = this.timeout;
            // One deadline over connect, request and the whole body: a responder that
            // drips a byte a second is cut off like one that never answers.
            tokio::time::timeout(timeout, this.post(url, request)).await.unwrap_or(Err(FetchError::Timeout(timeout)))
        })
    }
}

/// An error with its sources, as hyper's "client error (Connect)" says little alone.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// A responder on loopback that reads the request and then runs `answer`.
    async fn responder<F, Fut>(answer: F) -> String
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    answer(stream).await;
                });
            }
        });
        format!("http://{addr}/ocsp")
    }

    #[tokio::test]
    async fn a_good_answer_is_read_whole() {
        let url = responder(|mut s| async move {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
        })
        .await;
        let http = Http::new(Duration::from_secs(5), 64);
        assert_eq!(http.fetch(&url, vec![1, 2, 3]).await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn a_huge_body_is_cut_off_at_the_cap_with_or_without_content_length() {
        let declared = responder(|mut s| async move {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 100000000\r\n\r\n").await;
            let _ = s.write_all(&vec![0u8; 1 << 20]).await;
        })
        .await;
        let undeclared = responder(|mut s| async move {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await;
            // Endless: only the cap ends the read.
            let chunk = vec![0u8; 64 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
        })
        .await;
        let http = Http::new(Duration::from_secs(20), 1024);
        for url in [declared, undeclared] {
            let err = http.fetch(&url, vec![1]).await.unwrap_err();
            assert_eq!(err, FetchError::TooLarge(1024), "{url}");
            assert_eq!(err.limit(), Some("ocsp_max_response_bytes"));
        }
    }

    #[tokio::test]
    async fn a_slow_drip_is_cut_off_by_the_timeout() {
        let url = responder(|mut s| async move {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n").await;
            for _ in 0..1000 {
                if s.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        let http = Http::new(Duration::from_millis(500), 64 * 1024);
        let err = http.fetch(&url, vec![1]).await.unwrap_err();
        assert_eq!(err, FetchError::Timeout(Duration::from_millis(500)));
        assert_eq!(err.limit(), Some("ocsp_timeout"));
    }

    #[tokio::test]
    async fn http_errors_and_garbage_are_failures_naming_the_responder() {
        let url = responder(|mut s| async move {
            let _ = s.write_all(b"HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n").await;
        })
        .await;
        let http = Http::new(Duration::from_secs(5), 1024);
        let err = http.fetch(&url, vec![1]).await.unwrap_err().to_string();
        assert!(err.contains("500") && err.contains(&url), "{err}");
        let garbage = responder(|mut s| async move {
            let _ = s.write_all(b"\x00\x01garbage\r\n\r\n").await;
        })
        .await;
        let err = http.fetch(&garbage, vec![1]).await.unwrap_err();
        assert!(matches!(err, FetchError::Failed(ref m) if m.contains(&garbage)), "{err}");
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let err = http.fetch(&format!("http://{closed}/"), vec![1]).await.unwrap_err();
        assert!(matches!(err, FetchError::Failed(_)), "{err}");
    }
}
