//! The process-wide stop signal (SIGTERM): a cancellation token for async waits, and a
//! flag that the per-stream hot path reads without taking the token's lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

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

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_sets_the_flag_and_cancels() {
        let s = Shutdown::new();
        let waiter = s.token();
        assert!(!s.is_triggered());
        s.clone().trigger();
        assert!(s.is_triggered());
        waiter.cancelled().await;
    }
}
