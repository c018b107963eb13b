//! Giving freed memory back to the kernel. glibc's allocator keeps freed pages for
//! reuse, so memory a burst needed (the initial load parsing every secret, thousands of
//! connections closing at once) stays resident for the life of the process unless it
//! is asked to return it.

// malloc_trim(3) is the one foreign call certwire makes; everything else is safe Rust.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Shutdown;

use crate::xds::listen::Connections;

/// Connections closed since the last trim that warrant another.
const CLOSED_PER_TRIM: u64 = 256;
/// How often the closed-connection count is looked at.
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

/// Whether enough connections closed since the last trim: a count of closes, never a
/// sample of open connections (a wave opened and closed between two looks would be
/// missed).
#[derive(Debug, Default)]
struct Churn {
    trimmed_at: u64,
}

impl Churn {
    fn due(&mut self, closed: u64) -> bool {
        let due = closed - self.trimmed_at >= CLOSED_PER_TRIM;
        if due {
            self.trimmed_at = closed;
        }
        due
    }
}

/// Connections that come and go (an attack, a fleet reconnecting) free their memory;
/// after many closed, hand the pages back so RSS returns to what the open ones need.
pub async fn trim_after_churn(connections: Arc<Connections>, shutdown: Shutdown) {
    let mut every = tokio::time::interval(EVERY);
    let mut churn = Churn::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if churn.due(connections.closed()) {
            release_free_pages();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_per_256_closed_connections_however_they_came() {
        let mut churn = Churn::default();
        assert!(!churn.due(255));
        assert!(churn.due(3_000), "a whole wave between two looks");
        assert!(!churn.due(3_255));
        assert!(churn.due(3_256));
    }
}
