//! Every bound on what a peer can make certwire hold or compute, in one settings struct
//! with named defaults (`[limits]` in the config file), and the process-wide budget of
//! request bytes received but not yet whole messages. A limit that is hit is counted in
//! `certwire_limits_hit_total{limit}`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;

use prometheus_client::metrics::counter::Counter;

use crate::metrics::{LimitLabel, Metrics};

/// Defaults fit a fleet of Envoys (one stream per secret, a 61 KB node in each request)
/// with room to spare; README "Limits" explains each.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open SDS connections, all listeners together.
    pub max_connections: usize,
    /// Open SDS connections from one IP address (TCP listeners).
    pub max_connections_per_ip: usize,
    /// Concurrent streams per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// Largest request message. A stream's flow-control window is this (plus a frame),
    /// and capacity is given back only as messages are consumed: a stream holds at most
    /// this much unread.
    pub max_request_bytes: usize,
    /// Request bytes a connection may have received and not yet seen consumed: its
    /// flow-control window. Bounds one connection's unread requests.
    pub connection_window_bytes: usize,
    /// Request bytes the whole process holds in unfinished messages; a frame that would
    /// go over ends its stream with RESOURCE_EXHAUSTED.
    pub max_buffered_request_bytes: usize,
    /// Names in one request (SotW list, Delta subscribe list, FetchSecrets).
    pub max_names_per_request: usize,
    /// Names one stream watches at once.
    pub max_names_per_stream: usize,
    /// Response size of one FetchSecrets.
    pub max_fetch_response_bytes: usize,
    /// A connection with no stream is closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// TLS handshake and HTTP/2 preface, each, must complete within this.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            max_connections_per_ip: 2_048,
            max_streams_per_connection: 4_096,
            max_request_bytes: 1024 * 1024,
            connection_window_bytes: 16 * 1024 * 1024,
            max_buffered_request_bytes: 256 * 1024 * 1024,
            max_names_per_request: 4_096,
            max_names_per_stream: 4_096,
            max_fetch_response_bytes: 16 * 1024 * 1024,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// A stream's window: the largest request and one more frame, so that a message of
    /// the largest size can always complete.
    pub fn stream_window(&self) -> u32 {
        u32::try_from(self.max_request_bytes + 16 * 1024).unwrap_or(u32::MAX >> 1).min((1 << 31) - 1)
    }

    pub fn validate(&self) -> Result<(), String> {
        let zero = [
            ("max_connections", self.max_connections),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("max_streams_per_connection", self.max_streams_per_connection as usize),
            ("max_request_bytes", self.max_request_bytes),
            ("max_names_per_request", self.max_names_per_request),
            ("max_names_per_stream", self.max_names_per_stream),
            ("max_fetch_response_bytes", self.max_fetch_response_bytes),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("[limits] {name} must be at least 1"));
        }
        if self.max_request_bytes > (1 << 30) {
            return Err("[limits] max_request_bytes: at most 1 GiB (an HTTP/2 window is under 2 GiB)".into());
        }
        if self.connection_window_bytes < self.stream_window() as usize || self.connection_window_bytes >= (1 << 31) {
            return Err(format!(
                "[limits] connection_window_bytes must be at least max_request_bytes + 16 KiB ({}) and under 2 GiB",
                self.stream_window()
            ));
        }
        if self.max_buffered_request_bytes < self.max_request_bytes {
            return Err("[limits] max_buffered_request_bytes must be at least max_request_bytes".into());
        }
        Ok(())
    }
}

/// What request reassembly may hold: the process-wide budget of request bytes in
/// unfinished messages, and the largest message. Each stream's reader keeps a handle.
pub struct Budget {
    used: AtomicUsize,
    /// Bytes given back since start: counted, so that memory freed in a burst is seen
    /// (see `memory::trim_after_churn`).
    given_back: std::sync::atomic::AtomicU64,
    limit: usize,
    pub max_request: usize,
    /// `limits_hit{limit="max_buffered_request_bytes"}` and `{limit="max_request_bytes"}`.
    pub buffered_hits: Counter,
    pub size_hits: Counter,
}

impl Budget {
    pub fn new(limits: &Limits, metrics: &Metrics) -> Self {
        let counter = |limit| metrics.limits_hit.get_or_create(&LimitLabel { limit }).clone();
        Self {
            used: AtomicUsize::new(0),
            given_back: std::sync::atomic::AtomicU64::new(0),
            limit: limits.max_buffered_request_bytes,
            max_request: limits.max_request_bytes,
            buffered_hits: counter("max_buffered_request_bytes"),
            size_hits: counter("max_request_bytes"),
        }
    }

    /// Takes `n` bytes, or nothing if that would go over the limit.
    pub fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(n).filter(|t| *t <= self.limit))
            .is_ok()
    }

    pub fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.given_back.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Request bytes given back since start.
    pub fn given_back(&self) -> u64 {
        self.given_back.load(Ordering::Relaxed)
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Counts a limit that was hit.
pub fn hit(metrics: &Metrics, limit: &'static str) {
    metrics.limits_hit.get_or_create(&LimitLabel { limit }).inc();
}

/// Cuts a text a peer influenced (names, type URLs) for an error message or a log line:
/// an error must not grow with the request.
pub fn truncate(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_never_goes_over() {
        let limits = Limits { max_buffered_request_bytes: 100, ..Default::default() };
        let b = Budget::new(&limits, &Metrics::new());
        assert!(b.take(60));
        assert!(!b.take(41), "over the limit: nothing taken");
        assert_eq!(b.used(), 60);
        assert!(b.take(40));
        b.give(100);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn defaults_are_valid_and_nonsense_is_not() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let l = Limits { connection_window_bytes: 1024, ..Default::default() };
        assert!(l.validate().unwrap_err().contains("connection_window_bytes"));
        let l = Limits { max_names_per_request: 0, ..Default::default() };
        assert!(l.validate().unwrap_err().contains("max_names_per_request"));
    }

    #[test]
    fn truncation_keeps_a_prefix_and_says_how_long() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(100);
        let t = truncate(&long, 11);
        assert!(t.starts_with("ééééé...") && t.ends_with("(200 bytes)"), "{t}");
    }
}
