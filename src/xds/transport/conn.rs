//! One proxy connection: the HTTP/2 connection and every call on it, driven by a single
//! task. Calls write into h2's buffers; the same poll then flushes them, so a push costs
//! one wake-up and one write per connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use futures_util::task::{ArcWake, AtomicWaker, waker_ref};
use h2::server::{Connection, Handshake};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use super::call::CallFuture as Call;
use super::grpc::{self, Frame};
use crate::shutdown::StopPoll;
use crate::xds::{Peer, ServerState, service};

/// How long an idle connection closed with GOAWAY gets to close its side.
const GOAWAY_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// Headers of a request, at most: gRPC's own default is 8 KiB.
const MAX_HEADERS: u32 = 64 * 1024;

/// h2's settings from `[limits]`. Flow control bounds what a peer can make certwire
/// hold: capacity is given back only as whole messages are consumed
/// ([`super::inbound`]), so a stream holds at most its window (the largest request and
/// a frame) and a connection at most its connection window of unread requests.
/// Envoy's node (61 KB for Envoy 1.40) comes with every ACK: windows this large also
/// spare nearly every ACK a WINDOW_UPDATE. h2 holds no memory for a window, only for
/// data received and not yet consumed.
fn builder(limits: &super::limits::Limits) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    // No send buffer limit is set: a stream hands h2 one response at a time (see
    // `grpc::Departed`), whatever the proxy's flow-control window.
    b.max_concurrent_streams(limits.max_streams_per_connection)
        .max_header_list_size(MAX_HEADERS)
        .initial_window_size(limits.stream_window())
        .initial_connection_window_size(limits.connection_window_bytes as u32);
    b
}

/// Serves one connection until the peer leaves, or after SIGTERM until its calls ended.
/// A client that does not send the HTTP/2 preface within `handshake_timeout`, or keeps
/// a connection with no stream for `idle_timeout`, is dropped: otherwise idle sockets
/// would pile up until the process runs out of file descriptors.
pub fn serve<IO>(io: IO, shared: ServerState, peer: Arc<Peer>) -> ConnTask<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let stopping = StopPoll::new(&shared.shutdown);
    let handshake = builder(&shared.limits).handshake(io);
    ConnTask {
        phase: Phase::Handshake(handshake),
        timer: Some(Box::pin(tokio::time::sleep(shared.limits.handshake_timeout))),
        calls: Calls::default(),
        shared,
        peer,
        stopping,
        draining: false,
        _slot: None,
    }
}

/// The task of a connection. A hand-written state machine rather than an `async fn`,
/// whose layout kept the handshake and the connection side by side: this is allocated
/// once per proxy, and every byte of it is touched.
pub struct ConnTask<IO> {
    phase: Phase<IO>,
    /// The handshake's deadline, then the idle deadline while the connection has no call.
    timer: Option<Pin<Box<Sleep>>>,
    calls: Calls,
    shared: ServerState,
    peer: Arc<Peer>,
    stopping: StopPoll,
    draining: bool,
    /// This connection's place under `[limits] max_connections`.
    _slot: Option<Box<super::listen::Slot>>,
}

impl<IO> ConnTask<IO> {
    /// Holds `slot` until the connection ends.
    pub fn holding(mut self, slot: super::listen::Slot) -> Self {
        self._slot = Some(Box::new(slot));
        self
    }
}

enum Phase<IO> {
    Handshake(Handshake<IO, Frame>),
    Serving(Connection<IO, Frame>),
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Future for ConnTask<IO> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let conn = match &mut this.phase {
            Phase::Serving(conn) => conn,
            Phase::Handshake(handshake) => match Pin::new(handshake).poll(cx) {
                Poll::Ready(Ok(conn)) => {
                    this.phase = Phase::Serving(conn);
                    this.timer = None;
                    let Phase::Serving(conn) = &mut this.phase else { unreachable!("just set") };
                    conn
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(peer = %this.peer.address, error = %e, "HTTP/2 handshake failed");
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    // Shutdown reaches a connection still in its handshake too.
                    if this.stopping.stopped(cx) {
                        return Poll::Ready(());
                    }
                    if this.timer.as_mut().is_some_and(|t| t.as_mut().poll(cx).is_ready()) {
                        tracing::debug!(peer = %this.peer.address, "no HTTP/2 preface in time; closing");
                        super::limits::hit(&this.shared.metrics, "handshake_timeout");
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
            },
        };
        if !this.draining && this.stopping.stopped(cx) {
            // GOAWAY: no new calls; the open ones end themselves on the same signal.
            conn.graceful_shutdown();
            this.draining = true;
        }
        loop {
            // Calls first, so that what they write is flushed by the connection below.
            this.calls.poll(cx);
            if this.draining {
                // A peer that does not answer the GOAWAY (an idle one, say) is not
                // waited for beyond the timer.
                if this.timer.as_mut().is_some_and(|t| t.as_mut().poll(cx).is_ready()) {
                    return Poll::Ready(());
                }
                return match conn.poll_closed(cx) {
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(peer = %this.peer.address, error = %e, "connection closed");
                        Poll::Ready(())
                    }
                    other => other.map(|_| ()),
                };
            }
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, mut respond)))) => {
                    // Not a gRPC call this server takes: answered without a stream.
                    if let Some(refusal) = grpc::refuse(&req) {
                        let _ = respond.send_response(refusal, true);
                        continue;
                    }
                    let incoming = super::Incoming::new(req, respond, this.shared.budget.clone());
                    if let Some(call) = service::route(&this.shared, &this.peer, incoming) {
                        this.calls.push(call);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(peer = %this.peer.address, error = %e, "connection failed");
                    return Poll::Ready(());
                }
                // The peer closed the connection (or sent GOAWAY): finish what runs.
                Poll::Ready(None) => this.draining = true,
                Poll::Pending => {
                    if this.calls.is_empty() {
                        let idle = this.shared.limits.idle_timeout;
                        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                        if timer.as_mut().poll(cx).is_ready() {
                            tracing::debug!(peer = %this.peer.address, "no stream for {idle:?}; closing");
                            super::limits::hit(&this.shared.metrics, "idle_timeout");
                            conn.graceful_shutdown();
                            this.draining = true;
                            this.timer = Some(Box::pin(tokio::time::sleep(GOAWAY_GRACE)));
                            continue;
                        }
                    } else {
                        this.timer = None;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// The calls of a connection. Envoy opens one stream per secret, each on its own
/// connection unless it shares one for several: most connections carry a single call.
/// That one gets a waker of its own that only marks it due and wakes the connection,
/// and is polled when due: a wake-up for the connection alone (an ACK being read, h2's
/// own frames) does not poll it. Further calls go through `FuturesUnordered`, whose
/// queue and per-call nodes cost memory and a few percent of a fan-out's CPU.
#[derive(Default)]
struct Calls {
    first: Option<First>,
    more: Option<FuturesUnordered<Call>>,
}

struct First {
    call: Call,
    wake: Arc<FirstWake>,
}

/// The first call's waker.
struct FirstWake {
    due: AtomicBool,
    connection: AtomicWaker,
}

impl ArcWake for FirstWake {
    fn wake_by_ref(this: &Arc<Self>) {
        this.due.store(true, Ordering::Release);
        this.connection.wake();
    }
}

impl Calls {
    fn is_empty(&self) -> bool {
        self.first.is_none() && self.more.is_none()
    }

    fn push(&mut self, call: Call) {
        match &mut self.first {
            None => {
                // Due at once: a call is polled first when it starts.
                let wake = Arc::new(FirstWake { due: AtomicBool::new(true), connection: AtomicWaker::new() });
                self.first = Some(First { call, wake });
            }
            Some(_) => self.more.get_or_insert_with(FuturesUnordered::new).push(call),
        }
    }

    /// Polls every call that may progress; finished calls are dropped.
    fn poll(&mut self, cx: &mut Context<'_>) {
        if let Some(first) = &mut self.first {
            // Registered before the check: a wake-up in between is seen by one or the other.
            first.wake.connection.register(cx.waker());
            if first.wake.due.swap(false, Ordering::AcqRel)
                && first.call.as_mut().poll(&mut Context::from_waker(&waker_ref(&first.wake))).is_ready()
            {
                self.first = None;
            }
        }
        if let Some(more) = &mut self.more {
            while let Poll::Ready(Some(())) = more.poll_next_unpin(cx) {}
            if more.is_empty() {
                self.more = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::net::TcpStream;

    fn shared() -> super::ServerState {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        super::ServerState::new(
            Arc::new(crate::store::Store::new()),
            Arc::new(crate::xds::proxies::Proxies::new(metrics.clone())),
            metrics.clone(),
            crate::shutdown::Shutdown::new(),
            Arc::new(crate::authz::Authorizer::open(metrics)),
            Default::default(),
        )
    }

    fn peer() -> Arc<super::Peer> {
        Arc::new(super::Peer { address: "test".into(), identity: crate::authz::Identity::Anonymous })
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_speaks_http2_is_dropped() {
        let (_client, server) = tokio::io::duplex(1024);
        let timeout = crate::xds::limits::Limits::default().handshake_timeout;
        let task = tokio::spawn(super::serve(server, shared(), peer()));
        tokio::time::sleep(timeout / 2).await;
        assert!(!task.is_finished(), "still waiting for the preface");
        tokio::time::timeout(timeout, task).await.expect("dropped after the timeout").unwrap();
    }

    /// A wake-up of the connection alone (an ACK read, h2's own frames) does not poll the
    /// first call; its own wake-up does, and wakes the connection.
    #[test]
    fn the_first_call_is_polled_only_when_due() {
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use std::task::{Context, Poll, Waker};

        struct Count(AtomicUsize);
        impl futures_util::task::ArcWake for Count {
            fn wake_by_ref(this: &Arc<Self>) {
                this.0.fetch_add(1, SeqCst);
            }
        }
        let polls = Arc::new(AtomicUsize::new(0));
        let its_waker: Arc<Mutex<Option<Waker>>> = Arc::default();
        let (p, w) = (polls.clone(), its_waker.clone());
        let call: super::Call = Box::pin(std::future::poll_fn(move |cx| {
            p.fetch_add(1, SeqCst);
            *w.lock().unwrap() = Some(cx.waker().clone());
            Poll::<()>::Pending
        }));
        let connection = Arc::new(Count(AtomicUsize::new(0)));
        let waker = futures_util::task::waker(connection.clone());
        let mut cx = Context::from_waker(&waker);
        let mut calls = super::Calls::default();
        calls.push(call);
        calls.poll(&mut cx);
        calls.poll(&mut cx);
        assert_eq!(polls.load(SeqCst), 1, "polled when it started, not on the connection's wake-ups");
        its_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(connection.0.load(SeqCst), 1, "its wake-up wakes the connection");
        calls.poll(&mut cx);
        assert_eq!(polls.load(SeqCst), 2, "polled again once it woke");
    }

    /// Every connection allocates its task once; an `async fn` here laid the handshake
    /// and the connection side by side and doubled it.
    #[tokio::test]
    async fn connection_task_is_little_more_than_the_h2_connection() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let io = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let task = super::serve(io, shared(), peer());
        let h2 = std::mem::size_of::<h2::server::Connection<TcpStream, super::super::grpc::Frame>>();
        // certwire's part: shared handles, the call slots, a timer, the connection slot.
        assert!(std::mem::size_of_val(&task) <= h2 + 200, "{} bytes for {h2} of h2", std::mem::size_of_val(&task));
    }
}
