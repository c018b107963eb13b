//! Ports, temporary directories, polling and log tails.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How often the polling helpers look again: fast enough to keep tests quick, slow
/// enough not to steal the shared machine's two cores from Envoy and certwire.
pub const POLL: Duration = Duration::from_millis(25);

/// The default patience of a wait. The machine is shared and noisy, so waits are
/// generous: a correct system answers in milliseconds, a broken one never does.
pub const WAIT: Duration = Duration::from_secs(30);

/// A port that was free a moment ago on 127.0.0.1. Racy: another process may bind it
/// before ours does. Prefer port 0 and asking the process what it bound
/// ([`super::certwire::Certwire::sds_addr`], [`super::envoy::Envoy::listener_addr`]);
/// this is for servers that cannot say (acme2certifier) and tests not converted yet.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A fresh temporary directory. Set `CERTWIRE_KEEP_TMP=1` to keep it (and the logs in
/// it) after the test, to look at by hand.
pub fn tempdir() -> TempDir {
    let mut dir = tempfile::Builder::new().prefix("certwire-e2e-").tempdir().expect("create temp dir");
    if std::env::var_os("CERTWIRE_KEEP_TMP").is_some_and(|v| v == "1") {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    dir
}

/// Polls `probe` every [`POLL`] until it returns `Some`, or gives up after `timeout`
/// and returns `None`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`poll_until`] but panics with `what` when the time is up, so a test reads
/// as a list of expectations.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(timeout, probe).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for: {what}"),
    }
}

/// Holds for `duration` that `probe` keeps returning true, polling all the while.
/// Returns the first moment it did not as an error message. Used to show something
/// does NOT happen (a half-written pair is never served) without timing assertions.
pub async fn holds_for<F, Fut>(duration: Duration, mut probe: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + duration;
    loop {
        probe().await?;
        if Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The last `lines` lines of a log file, or a note that it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// Prints a log tail to stderr under a header; the test runner shows stderr of a
/// failed test, so this is how a failure explains itself.
pub fn dump_log(title: &str, path: &Path, lines: usize) {
    eprintln!(
        "----- {title}: last {lines} lines of {} -----\n{}\n----- end of {title} -----",
        path.display(),
        log_tail(path, lines)
    );
}
