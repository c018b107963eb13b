//! Serves SDS on every configured address at once: TCP and Unix domain sockets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use super::Sds;

/// `127.0.0.1:18000` or `unix:/run/certwire/sds.sock`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/certwire/sds.sock".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(Self::Tcp).map_err(|e| format!("{s:?} is neither HOST:PORT nor unix:/path ({e})"))
    }
}

impl TryFrom<String> for ListenAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listener, ready to serve. Binding first lets startup fail early and clearly.
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

pub async fn bind(addr: &ListenAddr) -> anyhow::Result<Bound> {
    match addr {
        ListenAddr::Tcp(a) => {
            Ok(Bound::Tcp(TcpListener::bind(a).await.with_context(|| format!("binding SDS on {a}"))?))
        }
        ListenAddr::Unix(path) => {
            // A socket file left by a previous run would make bind fail; anything else
            // at that path is not ours to delete.
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
                }
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let l = UnixListener::bind(path).with_context(|| format!("binding SDS on unix:{}", path.display()))?;
            Ok(Bound::Unix(l, path.clone()))
        }
    }
}

fn server() -> Server {
    // Dead peers are found by TCP keepalive (below), which costs nothing per connection
    // in user space; HTTP/2 PING timers showed up in profiles with 10,000 streams.
    Server::builder()
}

/// Serves until `shutdown` is cancelled and the streams have ended.
pub async fn serve(bound: Bound, svc: Sds, shutdown: CancellationToken) -> anyhow::Result<()> {
    let signal = shutdown.clone().cancelled_owned();
    match bound {
        Bound::Tcp(l) => {
            // Proxies keep streams for days: the kernel probes an idle peer after 30 s,
            // every 10 s, and drops it after 3 misses.
            let incoming = TcpIncoming::from(l)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(30)))
                .with_keepalive_interval(Some(Duration::from_secs(10)))
                .with_keepalive_retries(Some(3));
            server().add_service(svc).serve_with_incoming_shutdown(incoming, signal).await?;
        }
        Bound::Unix(l, path) => {
            let incoming = UnixListenerStream::new(l);
            let result = server().add_service(svc).serve_with_incoming_shutdown(incoming, signal).await;
            let _ = std::fs::remove_file(&path);
            result?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "127.0.0.1:18000".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:18000".parse().unwrap())
        );
        assert_eq!("unix:/tmp/x.sock".parse::<ListenAddr>().unwrap(), ListenAddr::Unix("/tmp/x.sock".into()));
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("nonsense".parse::<ListenAddr>().unwrap_err().contains("nonsense"));
    }
}
