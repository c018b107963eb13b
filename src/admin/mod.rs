//! Admin endpoint: health, Prometheus metrics and status as JSON over HTTP, and the
//! certwire status gRPC API on the same port (HTTP/1 and HTTP/2 are both accepted).
//! Reads the store and the streams; never key material.

mod status_api;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::shutdown::Shutdown;
use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::xds::proxies::Proxies;

#[derive(Clone)]
pub struct Admin {
    pub store: Arc<Store>,
    pub proxies: Arc<Proxies>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub shutdown: Shutdown,
}

impl Admin {
    /// Everything on one port.
    pub fn router(self) -> Router {
        self.clone().probes().merge(self.status())
    }

    /// What probes and scrapers need: no secret names, SANs or proxy identities.
    pub fn probes(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self)
    }

    /// Secret names, SANs, proxies and their identities: for operators.
    pub fn status(self) -> Router {
        let grpc = tonic::service::Routes::new(status_api::server(self.clone())).into_axum_router();
        Router::new()
            .route("/status/secrets", get(secrets))
            .route("/status/proxies", get(proxies))
            .with_state(self)
            .merge(grpc)
    }

    /// Serves on `addr`; with `status_addr`, the status endpoints there instead, so the
    /// probe port can be open to the cluster and the status port kept closer.
    /// Serves on `probes` (everything, or health and metrics only when `status` has a
    /// listener of its own) until shutdown.
    pub async fn serve(self, probes: TcpListener, status: Option<TcpListener>) -> anyhow::Result<()> {
        let Some(status) = status else { return serve_on(probes, self.clone().router(), &self.shutdown).await };
        let probes = serve_on(probes, self.clone().probes(), &self.shutdown);
        let status = serve_on(status, self.clone().status(), &self.shutdown);
        tokio::try_join!(probes, status).map(|_| ())
    }
}

/// Binds an admin listener (port 0: a free one), so that a taken port fails the start.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding admin on {addr}"))
}

async fn serve_on(listener: TcpListener, router: Router, shutdown: &Shutdown) -> anyhow::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin listening");
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .context("admin server")
}

async fn readyz(State(a): State<Admin>) -> Response {
    match a.health.check() {
        Ok(()) => match a.health.notes() {
            notes if notes.is_empty() => (StatusCode::OK, "ready\n").into_response(),
            notes => (StatusCode::OK, format!("ready, degraded:\n{}\n", notes.join("\n"))).into_response(),
        },
        Err(reasons) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready:\n{}\n", reasons.join("\n"))).into_response()
        }
    }
}

async fn metrics(State(a): State<Admin>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], a.metrics.encode())
        .into_response()
}

async fn secrets(State(a): State<Admin>) -> Response {
    axum::Json(a.secrets_status().await).into_response()
}

impl Admin {
    /// The store's status, off the threads that serve proxies: it reads every served
    /// certificate back (a few milliseconds per thousand secrets).
    async fn secrets_status(&self) -> Vec<crate::store::SecretStatus> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.status()).await.expect("status of the store")
    }
}

async fn proxies(State(a): State<Admin>) -> Response {
    axum::Json(a.proxies.status()).into_response()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Instant;

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::ingest::Intake;
    use crate::sources::dev::DevCa;

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let res = router.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// An admin over an empty store, for the tests of this module and of the status API.
    pub(crate) fn admin() -> Admin {
        let metrics = Arc::new(Metrics::new());
        Admin {
            store: Arc::new(Store::new()),
            proxies: Arc::new(Proxies::new(metrics.clone())),
            metrics,
            health: Arc::new(Health::default()),
            shutdown: Shutdown::new(),
        }
    }

    #[tokio::test]
    async fn the_probe_router_has_no_status() {
        let a = admin();
        assert_eq!(get(a.clone().probes(), "/metrics").await.0, StatusCode::OK);
        assert_eq!(get(a.clone().probes(), "/status/secrets").await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(a.clone().probes(), "/status/proxies").await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(a.status(), "/status/proxies").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn readyz_reports_why_not_ready() {
        let a = admin();
        a.health.not_ready("files:/etc/certs", "initial load");
        let (code, body) = get(a.clone().router(), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("files:/etc/certs: initial load"), "{body}");
        a.health.ready("files:/etc/certs");
        assert_eq!(get(a.clone().router(), "/readyz").await.0, StatusCode::OK);
        a.health.degraded("kubernetes-referencegrants:gw", "the CRD is not installed");
        let (code, body) = get(a.router(), "/readyz").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body, "ready, degraded:\nkubernetes-referencegrants:gw: the CRD is not installed\n");
    }

    #[tokio::test]
    async fn no_endpoint_shows_key_material() {
        let a = admin();
        let ca = DevCa::new(std::time::Duration::from_secs(600)).unwrap();
        let material = ca.material("web").unwrap();
        let crate::pki::Material::Tls { key_pem, .. } = &material else { panic!("tls material") };
        let key_b64_line = String::from_utf8(key_pem.as_slice().to_vec()).unwrap().lines().nth(1).unwrap().to_owned();
        let intake = Intake::new(a.store.clone(), a.metrics.clone(), "dev", crate::policy::AllowExpired::Never);
        intake.update("web", &material, Instant::now()).unwrap();
        // A rejected update too: its error text must not echo the key either.
        let mut bad = material.clone();
        if let crate::pki::Material::Tls { cert_chain_pem, .. } = &mut bad {
            cert_chain_pem.extend_from_slice(key_pem.as_slice());
        }
        let _ = intake.update("web", &bad, Instant::now());
        for path in ["/status/secrets", "/status/proxies", "/metrics", "/readyz"] {
            let (code, body) = get(a.clone().router(), path).await;
            assert_eq!(code, StatusCode::OK, "{path}");
            assert!(!body.contains("PRIVATE KEY"), "{path} shows a key: {body}");
            assert!(!body.contains(&key_b64_line), "{path} shows key bytes");
        }
        let (_, secrets) = get(a.router(), "/status/secrets").await;
        let json: serde_json::Value = serde_json::from_str(&secrets).unwrap();
        assert_eq!(json[0]["name"], "web");
        assert_eq!(json[0]["kind"], "tls_certificate");
        assert!(json[0]["fingerprint_sha256"].as_str().unwrap().len() == 64);
    }
}
