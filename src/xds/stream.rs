//! A stream, shared by SotW and Delta: one future reads the proxy's requests, watches
//! the secrets and writes responses. It runs inside its connection's task (see
//! [`super::conn`]), so a rotation wakes that task directly: no task or channel per
//! stream, which matters when one change fans out to ten thousand streams. The
//! protocols differ only in how they read a request and shape a response ([`Protocol`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use h2::{RecvStream, SendStream};
use prost::Message;
use tonic::Status;

use super::Shared;
use super::codec::Outgoing;
use super::grpc::{self, Frame, Inbound};
use super::session::{Change, Session};
use crate::shutdown::StopWatch;

pub trait Protocol: Send + 'static {
    type Request: Message + Default + Send + 'static;
    /// Label in metrics and status.
    const NAME: &'static str;
    /// Applies a request (subscriptions, ACK/NACK) to the session.
    fn on_request(session: &mut Session, req: Self::Request) -> Result<(), Status>;
    /// The response for a change, if the protocol can express it.
    fn response(session: &mut Session, change: Change) -> Option<Outgoing>;
}

/// The future of one StreamSecrets or DeltaSecrets call whose response headers are sent.
pub fn run<P: Protocol>(shared: Shared, peer: String, body: RecvStream, send: SendStream<Frame>) -> StreamTask<P> {
    let stopping = StopWatch::new(&shared.shutdown);
    let session = Session::open(shared, P::NAME, peer);
    StreamTask { session, inbound: Inbound::new(body), send, stopping, _protocol: std::marker::PhantomData }
}

pub struct StreamTask<P: Protocol> {
    session: Session,
    inbound: Inbound,
    send: SendStream<Frame>,
    /// SIGTERM: the stream ends cleanly so the proxy reconnects to another replica.
    stopping: StopWatch,
    _protocol: std::marker::PhantomData<fn() -> P>,
}

impl<P: Protocol> StreamTask<P> {
    /// Ends the call with `status` in the trailers.
    fn end(&mut self, why: &str, status: Status) -> Poll<()> {
        tracing::debug!(stream = self.session.id, protocol = P::NAME, why, "stream ended");
        // Fails only when the peer is already gone.
        let _ = self.send.send_trailers(grpc::trailers(&status));
        Poll::Ready(())
    }

    /// Whether another response may be handed to h2 now: h2 must have room for this
    /// stream within the proxy's flow-control window and the stream's send buffer
    /// (`SEND_BUFFER` in conn.rs). A proxy that stops reading so holds at most that much
    /// here; changes meanwhile wait in the watches, where only the latest is kept.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        // Polled on every wake-up of the connection: asking h2 to reserve again when the
        // window still holds a byte for this stream costs a lock, a lookup and a span.
        if self.send.capacity() > 0 {
            return Poll::Ready(Ok(()));
        }
        self.send.reserve_capacity(1);
        while self.send.capacity() == 0 {
            match self.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Err(h2::Error::from(h2::Reason::CANCEL))),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<P: Protocol> Future for StreamTask<P> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Every field is Unpin.
        let this = self.get_mut();
        if this.stopping.stopped(cx) {
            return this.end("shutting down", Status::ok(""));
        }
        // Requests first: an ACK or a new subscription changes what is due.
        loop {
            match this.inbound.poll_message(cx) {
                Poll::Ready(Some(Ok(message))) => {
                    let applied = P::Request::decode(message)
                        .map_err(|e| Status::invalid_argument(format!("malformed request: {e}")))
                        .and_then(|req| P::on_request(&mut this.session, req));
                    if let Err(status) = applied {
                        return this.end("bad request", status);
                    }
                }
                Poll::Ready(Some(Err(status))) => return this.end("bad request", status),
                Poll::Ready(None) => return this.end("peer closed", Status::ok("")),
                Poll::Pending => break,
            }
        }
        loop {
            match this.poll_room(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    tracing::debug!(stream = this.session.id, error = %e, "stream broken");
                    return Poll::Ready(());
                }
                Poll::Pending => return Poll::Pending,
            }
            let Poll::Ready(change) = this.session.poll_change(cx) else { return Poll::Pending };
            if let Some(response) = P::response(&mut this.session, change)
                && let Err(e) = this.send.send_data(response.frame(), false)
            {
                tracing::debug!(stream = this.session.id, error = %e, "stream broken");
                return Poll::Ready(());
            }
        }
    }
}
