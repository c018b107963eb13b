//! The process-wide stop signal (SIGTERM), the one type every part that must stop is
//! given: a cancellation token for async waits, and a flag that the per-stream hot path
//! reads without taking the token's lock.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture, WaitForCancellationFutureOwned};

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    flag: Arc<AtomicBool>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag before cancelling, so whoever the cancellation wakes sees it set.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Completes once the signal is given.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// [`Shutdown::cancelled`] for a `'static` future (e.g. axum's graceful shutdown).
    pub fn cancelled_owned(self) -> WaitForCancellationFutureOwned {
        self.token.cancelled_owned()
    }

    /// Gives the signal when the returned guard is dropped (tests stopping what they
    /// started, whichever way they end).
    pub fn trigger_on_drop(self) -> TriggerOnDrop {
        TriggerOnDrop(self)
    }
}

pub struct TriggerOnDrop(Shutdown);

impl Drop for TriggerOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

/// The stop signal for a hand-written future polled on every rotation (a connection, a
/// stream). Polling the token takes its lock, one lock for the whole process; here it is
/// polled only to register a new waker, and every other poll reads the flag.
pub struct StopPoll {
    shutdown: Shutdown,
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
    registered: Option<Waker>,
}

impl StopPoll {
    pub fn new(shutdown: &Shutdown) -> Self {
        Self { shutdown: shutdown.clone(), wait: Box::pin(shutdown.token().cancelled_owned()), registered: None }
    }

    /// Whether the signal was given; if not, the task of `cx` is woken when it is.
    pub fn stopped(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.registered = Some(cx.waker().clone());
            if self.wait.as_mut().poll(cx).is_ready() {
                return true;
            }
        }
        self.shutdown.is_triggered()
    }
}

/// After the signal: waits for the servers (`tasks`: listeners and their streams, admin)
/// to finish, then for the background tasks whose stop does cleanup (ACME releasing its
/// Lease, removing published challenge answers), all within `timeout`. Servers first:
/// a background task may still be needed by what they serve until then.
pub async fn drain(
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    background: Vec<tokio::task::JoinHandle<()>>,
    timeout: std::time::Duration,
) {
    let all = async {
        while tasks.join_next().await.is_some() {}
        for task in background {
            let _ = task.await;
        }
    };
    if tokio::time::timeout(timeout, all).await.is_err() {
        // Returning ends the process, and with it the connections still open.
        tracing::warn!("drain timeout reached; exiting with streams still open");
        tasks.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_servers_then_background_within_the_timeout() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        let log = order.clone();
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            log.lock().unwrap().push("server");
            Ok(())
        });
        let log = order.clone();
        let background = vec![tokio::spawn(async move {
            // Quicker than the server, but waited for after it.
            tokio::time::sleep(Duration::from_secs(1)).await;
            log.lock().unwrap().push("lease released");
        })];
        let started = tokio::time::Instant::now();
        drain(&mut tasks, background, Duration::from_secs(5)).await;
        assert_eq!(*order.lock().unwrap(), ["lease released", "server"]);
        assert_eq!(started.elapsed(), Duration::from_secs(2), "returns as soon as all are done");

        // A server that never ends is cut at the timeout, and the drain returns.
        tasks.spawn(std::future::pending());
        let started = tokio::time::Instant::now();
        drain(&mut tasks, Vec::new(), Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(tasks.join_next().await.unwrap().unwrap_err().is_cancelled());
    }

    #[tokio::test]
    async fn trigger_sets_the_flag_and_cancels() {
        let s = Shutdown::new();
        let waiter = s.token();
        assert!(!s.is_triggered());
        s.clone().trigger();
        assert!(s.is_triggered());
        waiter.cancelled().await;
    }

    #[tokio::test]
    async fn stop_poll_wakes_its_task_once_triggered() {
        let s = Shutdown::new();
        let mut watch = StopPoll::new(&s);
        let waiting =
            std::future::poll_fn(
                move |cx| if watch.stopped(cx) { std::task::Poll::Ready(()) } else { std::task::Poll::Pending },
            );
        let task = tokio::spawn(waiting);
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        s.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(10), task).await.expect("woken").unwrap();
    }
}
