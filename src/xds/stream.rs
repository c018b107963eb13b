//! A stream, shared by SotW and Delta: the response body itself reads the proxy's
//! requests, watches the secrets and yields responses. There is no task or channel per
//! stream: a rotation wakes the body's own task directly, which matters when one change
//! fans out to ten thousand streams. The protocols differ only in how they read a
//! request and shape a response ([`Protocol`]).

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures_util::{Stream, StreamExt};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Status, Streaming};

use super::codec::Outgoing;
use super::session::{Change, Session};
use super::{ResponseStream, Shared};
use crate::shutdown::Shutdown;

pub trait Protocol: Send + 'static {
    type Request: Send + 'static;
    /// Label in metrics and status.
    const NAME: &'static str;
    /// Applies a request (subscriptions, ACK/NACK) to the session.
    fn on_request(session: &mut Session, req: Self::Request) -> Result<(), Status>;
    /// The response for a change, if the protocol can express it.
    fn response(session: &mut Session, change: Change) -> Option<Outgoing>;
}

pub fn spawn<P: Protocol>(shared: Shared, peer: String, inbound: Streaming<P::Request>) -> ResponseStream<Outgoing>
where
    Streaming<P::Request>: Send,
{
    let stopping = shared.shutdown.clone();
    let wake_on_stop = Box::pin(stopping.token().cancelled_owned());
    let session = Session::open(shared, P::NAME, peer);
    Box::pin(SessionStream::<P> { session, inbound, stopping, wake_on_stop, registered: None, done: false })
}

struct SessionStream<P: Protocol> {
    session: Session,
    inbound: Streaming<P::Request>,
    /// SIGTERM: the stream ends cleanly so the proxy reconnects to another replica.
    stopping: Shutdown,
    /// Polled only to register the waker that SIGTERM wakes (again when the waker
    /// changes); the flag in `stopping` is what is checked on every poll, lock-free.
    wake_on_stop: Pin<Box<WaitForCancellationFutureOwned>>,
    registered: Option<Waker>,
    done: bool,
}

impl<P: Protocol> SessionStream<P> {
    fn end(&mut self, why: &str) -> Poll<Option<Result<Outgoing, Status>>> {
        self.done = true;
        tracing::debug!(stream = self.session.id, protocol = P::NAME, why, "stream ended");
        Poll::Ready(None)
    }
}

impl<P: Protocol> Stream for SessionStream<P> {
    type Item = Result<Outgoing, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is Unpin.
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            this.registered = Some(cx.waker().clone());
            if this.wake_on_stop.as_mut().poll(cx).is_ready() {
                return this.end("shutting down");
            }
        }
        if this.stopping.is_triggered() {
            return this.end("shutting down");
        }
        // Requests first: an ACK or a new subscription changes what is due.
        loop {
            match this.inbound.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(req))) => {
                    if let Err(status) = P::on_request(&mut this.session, req) {
                        this.done = true;
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                Poll::Ready(Some(Err(status))) => {
                    tracing::debug!(stream = this.session.id, error = %status, "stream closed by peer");
                    return this.end("peer error");
                }
                Poll::Ready(None) => return this.end("peer closed"),
                Poll::Pending => break,
            }
        }
        loop {
            match this.session.poll_change(cx) {
                Poll::Ready(change) => {
                    if let Some(response) = P::response(&mut this.session, change) {
                        return Poll::Ready(Some(Ok(response)));
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
