//! The http-01 responder: `GET /.well-known/acme-challenge/TOKEN` answers the key
//! authorization while an order waits for it, 404 otherwise. Runs for the process's
//! life on the configured address so a gateway can route the path to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use crate::shutdown::Shutdown;
use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// Tokens currently published: token -> key authorization.
#[derive(Default)]
pub struct Http01 {
    tokens: RwLock<HashMap<String, String>>,
}

impl Http01 {
    pub fn publish(&self, token: &str, key_authorization: &str) {
        self.tokens.write().expect("http-01 lock").insert(token.to_owned(), key_authorization.to_owned());
    }

    pub fn withdraw(&self, token: &str) {
        self.tokens.write().expect("http-01 lock").remove(token);
    }

    fn answer(&self, token: &str) -> Option<String> {
        self.tokens.read().expect("http-01 lock").get(token).cloned()
    }

    /// Binds `addr` now (a taken port fails the start) and serves until `shutdown`.
    pub async fn serve(self: Arc<Self>, addr: SocketAddr, shutdown: Shutdown) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the ACME http-01 responder on {addr}"))?;
        tracing::info!(%addr, "ACME http-01 responder listening");
        let app = axum::Router::new().route("/.well-known/acme-challenge/{token}", get(challenge)).with_state(self);
        tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
            if let Err(e) = served {
                tracing::error!(%addr, error = %e, "ACME http-01 responder stopped");
            }
        });
        Ok(())
    }
}

async fn challenge(State(http01): State<Arc<Http01>>, Path(token): Path<String>) -> impl IntoResponse {
    match http01.answer(&token) {
        Some(key_authorization) => {
            tracing::info!(token = %token, "ACME http-01 challenge fetched");
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream")], key_authorization).into_response()
        }
        None => {
            tracing::debug!(token = %token, "ACME http-01 request for an unknown token");
            StatusCode::NOT_FOUND.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_published_tokens_only() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let http01 = Arc::new(Http01::default());
        let shutdown = Shutdown::new();
        http01.clone().serve(addr, shutdown.clone()).await.unwrap();
        http01.publish("tok", "tok.thumb");
        let answer = get(addr, "/.well-known/acme-challenge/tok").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("\r\n\r\ntok.thumb"), "{answer}");
        http01.withdraw("tok");
        assert!(get(addr, "/.well-known/acme-challenge/tok").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
        shutdown.trigger();
    }
}
