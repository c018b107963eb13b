//! A stream, shared by SotW and Delta: one future reads the proxy's requests, watches
//! the secrets and writes responses. It runs inside its connection's task (see
//! [`super::conn`]), so a rotation wakes that task directly: no task or channel per
//! stream, which matters when one change fans out to ten thousand streams. The
//! protocols differ only in how they read a request and shape a response ([`Protocol`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prost::Message;
use tonic::Status;

use super::codec::Outgoing;
use super::requests::NodeOf;
use super::session::{Change, Session};
use super::transport::Call;
use super::transport::inbound;
use super::{Peer, ServerState};
use crate::shutdown::StopPoll;

pub trait Protocol: Send + 'static {
    type Request: Message + Default + Send + 'static;
    /// The request read for its node alone, until the stream knows its proxy.
    type Node: NodeOf;
    /// Label in metrics and status.
    const NAME: &'static str;
    /// Applies a request (subscriptions, ACK/NACK) to the session.
    fn on_request(session: &mut Session, req: Self::Request) -> Result<(), Status>;
    /// The response for a change, if the protocol can express it.
    fn response(session: &mut Session, change: Change) -> Option<Outgoing>;
}

/// The future of one StreamSecrets or DeltaSecrets call whose response headers are sent.
/// The future of one StreamSecrets or DeltaSecrets call. Past the call's
/// `grpc-timeout`, if it has one, it ends with DEADLINE_EXCEEDED.
pub fn run<P: Protocol>(shared: ServerState, peer: Arc<Peer>, call: Call) -> StreamTask<P> {
    let stopping = StopPoll::new(&shared.shutdown);
    let session = Session::open(shared, P::NAME, peer);
    StreamTask { session, call, held: None, stopping, _protocol: std::marker::PhantomData }
}

pub struct StreamTask<P: Protocol> {
    session: Session,
    call: Call,
    /// A change that came while the last response was still in h2. Later changes wait
    /// in the watches, where only the latest is kept.
    held: Option<Change>,
    /// SIGTERM: the stream ends cleanly so the proxy reconnects to another replica.
    stopping: StopPoll,
    _protocol: std::marker::PhantomData<fn() -> P>,
}

impl<P: Protocol> StreamTask<P> {
    /// Ends the call with `status` in the trailers.
    fn end(&mut self, why: &str, status: Status) -> Poll<()> {
        tracing::debug!(stream = self.session.id, protocol = P::NAME, why, "stream ended");
        self.call.end(&status);
        Poll::Ready(())
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
        if this.call.poll_deadline(cx) {
            return this.end("deadline", Status::deadline_exceeded("the call's grpc-timeout passed"));
        }
        // Requests first: an ACK or a new subscription changes what is due.
        loop {
            match this.call.poll_message(cx) {
                Poll::Ready(Some(Ok(message))) => {
                    if !this.session.identified() {
                        // Until a request names the proxy; a node that does not decode
                        // ends the stream, as any malformed request.
                        match inbound::decode::<P::Node>(message.clone()) {
                            Ok(node) => this.session.identify(node.node()),
                            Err(status) => return this.end("bad request", status),
                        }
                    }
                    let applied =
                        inbound::decode::<P::Request>(message).and_then(|req| P::on_request(&mut this.session, req));
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
            let change = match this.held.take() {
                Some(change) => change,
                None => match this.session.poll_change(cx) {
                    Poll::Ready(change) => change,
                    Poll::Pending => return Poll::Pending,
                },
            };
            // Only a due change waits for the last response to leave: checking on every
            // poll would wake the connection again each time a response is written.
            if !this.call.poll_departed(cx) {
                this.held = Some(change);
                return Poll::Pending;
            }
            if let Some(response) = P::response(&mut this.session, change)
                && let Err(e) = this.call.send(response.frame())
            {
                tracing::debug!(stream = this.session.id, error = %e, "stream broken");
                return Poll::Ready(());
            }
        }
    }
}
