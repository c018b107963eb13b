//! One proxy connection: the HTTP/2 connection and every call on it, driven by a single
//! task. Calls write into h2's buffers; the same poll then flushes them, so a push costs
//! one wake-up and one write per connection.

use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::poll_fn;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncWrite};

use super::Shared;
use super::service::{self, Call};

/// Bytes a call may have waiting in h2 for a slow proxy before it stops taking new
/// responses (the latest version then waits in the store, not in memory per stream).
const SEND_BUFFER: usize = 64 * 1024;
/// Calls per connection. Envoy opens one stream per secret on one connection; a gateway
/// with thousands of certificates stays well below this.
const MAX_STREAMS: u32 = 16 * 1024;

fn builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(MAX_STREAMS).max_send_buffer_size(SEND_BUFFER);
    b
}

/// Serves one connection until the peer leaves, or after SIGTERM until its calls ended.
pub async fn serve<IO>(io: IO, shared: Shared, peer: String)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = match builder().handshake::<_, Bytes>(io).await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    let mut calls: FuturesUnordered<Call> = FuturesUnordered::new();
    let stop = shared.shutdown.token();
    let mut stopping = std::pin::pin!(stop.cancelled());
    let mut draining = false;
    poll_fn(|cx: &mut Context<'_>| {
        if !draining && stopping.as_mut().poll(cx).is_ready() {
            // GOAWAY: no new calls; the open ones end themselves on the same signal.
            conn.graceful_shutdown();
            draining = true;
        }
        loop {
            // Calls first, so that what they write is flushed by the connection below.
            while let Poll::Ready(Some(())) = calls.poll_next_unpin(cx) {}
            if draining {
                return match conn.poll_closed(cx) {
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "connection closed");
                        Poll::Ready(())
                    }
                    other => other.map(|_| ()),
                };
            }
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    if let Some(call) = service::route(&shared, &peer, req, respond) {
                        calls.push(call);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(%peer, error = %e, "connection failed");
                    return Poll::Ready(());
                }
                // The peer closed the connection (or sent GOAWAY): finish what runs.
                Poll::Ready(None) => draining = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
}
