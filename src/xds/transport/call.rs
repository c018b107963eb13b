//! The three faces of a gRPC call the protocols see: an [`Incoming`] request to route,
//! a streaming [`Call`], a [`Unary`] one. They wrap h2's types, which stay here.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::Request;
use tonic::Status;

use super::grpc::{self, Departed, Frame};
use super::inbound::{Inbound, Message};
use super::limits::Budget;

/// The future of one call, run by its connection's task.
pub type CallFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A gRPC request accepted by the connection, not yet answered.
pub struct Incoming {
    req: Request<RecvStream>,
    respond: SendResponse<Frame>,
    budget: Arc<Budget>,
}

impl Incoming {
    pub(super) fn new(req: Request<RecvStream>, respond: SendResponse<Frame>, budget: Arc<Budget>) -> Self {
        Self { req, respond, budget }
    }

    /// The method, e.g. `/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets`.
    pub fn path(&self) -> &str {
        self.req.uri().path()
    }

    /// Answers with `status` alone (trailers-only).
    pub fn refuse(mut self, status: &Status) {
        let _ = self.respond.send_response(grpc::trailers_only(status), true);
    }

    /// Opens the response of a streaming call; `None` when the peer is already gone.
    pub fn stream(mut self) -> Option<Call> {
        let deadline = grpc::timeout(&self.req);
        let send = self.respond.send_response(grpc::response_headers(), false).ok()?;
        Some(Call {
            inbound: Inbound::new(self.req.into_body(), self.budget),
            send,
            departed: Departed::new(),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep(d))),
        })
    }

    /// A unary call: one request, one answer.
    pub fn unary(self) -> Unary {
        let deadline = grpc::timeout(&self.req);
        Unary { inbound: Inbound::new(self.req.into_body(), self.budget), respond: self.respond, deadline }
    }
}

/// A streaming call: request messages in, response messages out, a status to end it.
pub struct Call {
    inbound: Inbound,
    send: SendStream<Frame>,
    /// Whether the last response has left h2: the next one is handed over only then.
    departed: Arc<Departed>,
    /// The call's `grpc-timeout`, when it has one (Envoy's SDS streams do not).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Call {
    /// The next whole request message; `Ready(None)` when the peer ended the stream or
    /// went away.
    pub fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Status>>> {
        self.inbound.poll_message(cx)
    }

    /// Whether the call's deadline passed.
    pub fn poll_deadline(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }

    /// Whether the last response has left; if not, `cx` is woken when it has. A proxy
    /// that does not read thus holds one response per stream, whatever its window.
    pub fn poll_departed(&self, cx: &mut Context<'_>) -> bool {
        self.departed.poll_gone(cx)
    }

    /// Hands a response to the connection. An error means the stream is broken.
    pub fn send(&mut self, frame: Frame) -> Result<(), h2::Error> {
        self.send.send_data(frame.departing(&self.departed), false)
    }

    /// Ends the call with `status` in the trailers.
    pub fn end(&mut self, status: &Status) {
        // Fails only when the peer is already gone.
        let _ = self.send.send_trailers(grpc::trailers(status));
    }
}

/// A unary call.
pub struct Unary {
    inbound: Inbound,
    respond: SendResponse<Frame>,
    deadline: Option<Duration>,
}

impl Unary {
    /// Runs `handle` on the request and sends its answer; past the call's
    /// `grpc-timeout` the answer is DEADLINE_EXCEEDED.
    pub async fn answer<M, F, Fut>(mut self, handle: F)
    where
        M: prost::Message + Default,
        F: FnOnce(M) -> Fut,
        Fut: Future<Output = Result<Frame, Status>>,
    {
        let inbound = &mut self.inbound;
        let work = async move {
            match poll_fn(|cx| inbound.poll_request::<M>(cx)).await {
                Some(Ok(req)) => handle(req).await,
                Some(Err(status)) => Err(status),
                None => Err(Status::invalid_argument("a unary call needs a request message")),
            }
        };
        let outcome = match self.deadline {
            None => work.await,
            Some(deadline) => tokio::time::timeout(deadline, work)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("the call's grpc-timeout passed"))),
        };
        match outcome {
            Ok(frame) => {
                let Ok(mut send) = self.respond.send_response(grpc::response_headers(), false) else { return };
                if send.send_data(frame, false).is_ok() {
                    let _ = send.send_trailers(grpc::trailers(&Status::ok("")));
                }
            }
            Err(status) => {
                let _ = self.respond.send_response(grpc::trailers_only(&status), true);
            }
        }
    }
}
