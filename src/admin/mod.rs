//! Admin endpoint: health, Prometheus metrics and status as JSON over HTTP, and the
//! certwire status gRPC API on the same port (HTTP/1 and HTTP/2 are both accepted).
//! Reads the store and the streams; never key material.

mod status_api;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

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
    pub shutdown: CancellationToken,
}

impl Admin {
    pub fn router(self) -> Router {
        let grpc = tonic::service::Routes::new(status_api::server(self.clone())).into_axum_router();
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/status/secrets", get(secrets))
            .route("/status/proxies", get(proxies))
            .with_state(self)
            .merge(grpc)
    }

    pub async fn serve(self, addr: SocketAddr) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding admin on {addr}"))?;
        let shutdown = self.shutdown.clone();
        tracing::info!(%addr, "admin listening");
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("admin server")
    }
}

async fn readyz(State(a): State<Admin>) -> Response {
    match a.health.check() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
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
    axum::Json(a.store.status()).into_response()
}

async fn proxies(State(a): State<Admin>) -> Response {
    axum::Json(a.proxies.status()).into_response()
}
