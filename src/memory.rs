//! Giving freed memory back to the kernel. glibc's allocator keeps freed pages for
//! reuse, so memory a burst needed (the initial load parsing every secret, thousands of
//! connections closing at once) stays resident for the life of the process unless it
//! is asked to return it.

// malloc_trim(3) is the one foreign call certwire makes; everything else is safe Rust.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Shutdown;

use crate::xds::limits::Budget;
use crate::xds::listen::Connections;

/// Connections closed since the last trim that warrant another.
const CLOSED_PER_TRIM: u64 = 256;
/// Request bytes freed since the last trim that warrant another: what unfinished
/// requests held (up to a connection's window each) goes back once they end.
const FREED_PER_TRIM: u64 = 8 << 20;
/// How often the counts are looked at.
const EVERY: Duration = Duration::from_secs(5);

/// Returns free heap pages of every arena to the kernel (glibc only; elsewhere the
/// allocator does its own thing and this does nothing).
pub fn release_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it touches no
    // memory in use and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether enough connections closed, or enough buffered request bytes were freed,
/// since the last trim: counts of what happened, never samples of what is open (a wave
/// opened and closed between two looks would be missed).
#[derive(Debug, Default)]
struct Churn {
    closed_at_trim: u64,
    freed_at_trim: u64,
}

impl Churn {
    fn due(&mut self, closed: u64, freed: u64) -> bool {
        let due = closed - self.closed_at_trim >= CLOSED_PER_TRIM || freed - self.freed_at_trim >= FREED_PER_TRIM;
        if due {
            (self.closed_at_trim, self.freed_at_trim) = (closed, freed);
        }
        due
    }
}

/// Connections that come and go (an attack, a fleet reconnecting) and large requests
/// free their memory; after much of it, hand the pages back so RSS returns to what is
/// in use.
pub async fn trim_after_churn(connections: Arc<Connections>, budget: Arc<Budget>, shutdown: Shutdown) {
    let mut every = tokio::time::interval(EVERY);
    let mut churn = Churn::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if churn.due(connections.closed(), budget.given_back()) {
            release_free_pages();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_per_256_closed_connections_or_8_mib_of_requests_freed() {
        let mut churn = Churn::default();
        assert!(!churn.due(255, 0));
        assert!(churn.due(3_000, 0), "a whole wave between two looks");
        assert!(!churn.due(3_255, 0));
        assert!(churn.due(3_256, 0));
        assert!(!churn.due(3_256, FREED_PER_TRIM - 1));
        assert!(churn.due(3_256, 48 << 20), "three connections' windows given back");
        assert!(!churn.due(3_300, 50 << 20));
    }
}
