//! Serves SDS on every configured address at once: TCP and Unix domain sockets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Shutdown;
use anyhow::Context;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::server::TlsStream;
use tokio_util::task::TaskTracker;

use super::conn;
use crate::authz::Identity;
use crate::metrics::ReasonLabel;
use crate::tls::ServerTls;
use crate::xds::{Peer, ServerState};

/// `127.0.0.1:18000` or `unix:/run/certwire/sds.sock`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// Reachable only from this machine: a loopback address or a Unix socket (whose
    /// file permissions and peer credentials stand in for authentication).
    pub fn is_local(&self) -> bool {
        match self {
            Self::Tcp(a) => a.ip().is_loopback(),
            Self::Unix(_) => true,
        }
    }
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
    Unix(UnixListener, SocketFile),
}

/// The socket file a Unix listener bound, by path and by inode: at the end it is removed
/// only if it is still the one this process made (another certwire may have replaced it).
pub struct SocketFile {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn new(path: PathBuf) -> Self {
        let id = file_id(&path);
        Self { path, id }
    }

    fn remove(&self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Bound {
    /// Where it listens: with port 0 in the configuration, the port the kernel chose.
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Bound::Tcp(l) => l.local_addr().map(ListenAddr::Tcp).unwrap_or(ListenAddr::Tcp(([0, 0, 0, 0], 0).into())),
            Bound::Unix(_, file) => ListenAddr::Unix(file.path.clone()),
        }
    }
}

/// Who may connect to the Unix SDS sockets: connecting takes write permission on the
/// socket file. Unset, the socket gets the process umask's mode and certwire's group, so
/// only certwire's own user can connect (with the usual umask 022).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnixSocketAccess {
    /// Permission bits, e.g. 0o660 (`unix_socket_mode = "0660"`).
    pub mode: Option<u32>,
    /// Group id the socket is given (`unix_socket_group`): with mode 0660, the proxies
    /// running in that group may connect and nobody else.
    pub group: Option<u32>,
}

impl UnixSocketAccess {
    /// Whether any local user may connect.
    pub fn world_writable(&self) -> bool {
        self.mode.is_some_and(|m| m & 0o002 != 0)
    }
}

/// An octal mode such as `0660` or `660`, at most `0777`.
pub fn parse_socket_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!("unix socket mode {s:?}: expected octal permission bits such as \"0660\"")),
    }
}

pub async fn bind(addr: &ListenAddr, access: UnixSocketAccess) -> anyhow::Result<Bound> {
    match addr {
        ListenAddr::Tcp(a) => {
            Ok(Bound::Tcp(TcpListener::bind(a).await.with_context(|| format!("binding SDS on {a}"))?))
        }
        ListenAddr::Unix(path) => {
            // A socket file left by a previous run would make bind fail: it is removed
            // when nobody accepts on it. A live one belongs to another process (a second
            // certwire during a rollout) and is not taken over; anything else at that
            // path is not ours to delete.
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    match std::os::unix::net::UnixStream::connect(path) {
                        Ok(_) => anyhow::bail!(
                            "unix:{} is in use: another process accepts connections on it; certwire does not take \
                             a live socket over (stop the other one first)",
                            path.display()
                        ),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
                            .with_context(|| format!("removing stale socket {}", path.display()))?,
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("checking the socket already at {}", path.display()));
                        }
                    }
                }
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            // Bound with the umask's mode, then opened up as told: never wider in between.
            let l = UnixListener::bind(path).with_context(|| format!("binding SDS on unix:{}", path.display()))?;
            if let Some(gid) = access.group {
                std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
                    format!(
                        "giving unix:{} to group {gid} (certwire must be in that group or have CAP_CHOWN)",
                        path.display()
                    )
                })?;
            }
            if let Some(mode) = access.mode {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .with_context(|| format!("setting mode {mode:o} on unix:{}", path.display()))?;
            }
            Ok(Bound::Unix(l, SocketFile::new(path.clone())))
        }
    }
}

/// Open connections, counted against `[limits] max_connections` and
/// `max_connections_per_ip`. A slot is held by a [`Slot`] for the life of a connection.
#[derive(Default)]
pub struct Connections {
    total: std::sync::atomic::AtomicUsize,
    /// Connections closed since start; counted, not sampled, so that a wave that opens
    /// and closes between two looks is still seen (see `memory::trim_after_churn`).
    closed: std::sync::atomic::AtomicU64,
    per_ip: dashmap::DashMap<std::net::IpAddr, usize>,
}

/// One admitted connection; dropping it frees its place.
pub struct Slot {
    connections: Arc<Connections>,
    ip: Option<std::net::IpAddr>,
}

impl Connections {
    /// Admits a connection from `ip` (`None`: a Unix socket), or says which limit it
    /// would exceed.
    pub fn admit(
        self: &Arc<Self>,
        ip: Option<std::net::IpAddr>,
        limits: &super::limits::Limits,
    ) -> Result<Slot, &'static str> {
        use std::sync::atomic::Ordering;
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        if total > limits.max_connections {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err("max_connections");
        }
        if let Some(ip) = ip {
            let mut n = self.per_ip.entry(ip).or_insert(0);
            if *n >= limits.max_connections_per_ip {
                drop(n);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err("max_connections_per_ip");
            }
            *n += 1;
        }
        Ok(Slot { connections: self.clone(), ip })
    }

    pub fn open(&self) -> usize {
        self.total.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Admitted connections closed since start.
    pub fn closed(&self) -> u64 {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.total.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.connections.closed.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Some(ip) = self.ip {
            self.connections.per_ip.remove_if_mut(&ip, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
}

/// Admits a new connection or closes it at once, counting the limit it hit.
fn admit(shared: &ServerState, ip: Option<std::net::IpAddr>, peer: &dyn std::fmt::Display) -> Option<Slot> {
    match shared.connections.admit(ip, &shared.limits) {
        Ok(slot) => Some(slot),
        Err(limit) => {
            super::limits::hit(&shared.metrics, limit);
            tracing::debug!(%peer, limit, "connection refused: limit reached");
            None
        }
    }
}

/// Serves until `shutdown` is cancelled and the connections have ended. With `tls`,
/// TCP connections are TLS (and mTLS when it has a client CA); Unix sockets are always
/// plain, their peer named by the kernel.
pub async fn serve(
    bound: Bound,
    shared: ServerState,
    tls: Option<Arc<ServerTls>>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let connections = TaskTracker::new();
    match bound {
        Bound::Tcp(l) => {
            while let Some((sock, addr)) = accept(&shutdown, || l.accept()).await {
                if let Err(e) = tune(&sock) {
                    tracing::debug!(peer = %addr, error = %e, "could not set TCP options");
                }
                let Some(slot) = admit(&shared, Some(addr.ip()), &addr) else { continue };
                let address = addr.to_string();
                match &tls {
                    None => {
                        let peer = Arc::new(Peer { address, identity: Identity::Anonymous });
                        connections.spawn(conn::serve(sock, shared.clone(), peer).holding(slot));
                    }
                    Some(tls) => {
                        let (tls, shared, shutdown) = (tls.clone(), shared.clone(), shutdown.clone());
                        connections.spawn(async move {
                            if let Some((stream, peer)) = handshake(&tls, sock, address, &shared, &shutdown).await {
                                conn::serve(stream, shared, peer).holding(slot).await;
                            }
                        });
                    }
                }
            }
        }
        Bound::Unix(l, file) => {
            while let Some((sock, _)) = accept(&shutdown, || l.accept()).await {
                let peer = Arc::new(unix_peer(&sock));
                let Some(slot) = admit(&shared, None, &peer.identity) else { continue };
                connections.spawn(conn::serve(sock, shared.clone(), peer).holding(slot));
            }
            file.remove();
        }
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// The next connection, or `None` on shutdown. Errors are the process's (out of file
/// descriptors, memory) or a connection's that died in the queue; neither stops the
/// server, and a short pause keeps an exhausted process from spinning.
async fn accept<S, A, F, Fut>(shutdown: &Shutdown, mut next: F) -> Option<(S, A)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<(S, A)>>,
{
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = next() => match r {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an SDS connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Proxies keep streams for days: the kernel probes an idle peer after 30 s, every
/// 10 s, and drops it after 3 misses. (HTTP/2 PING timers would do the same in user
/// space, per connection; they showed up in profiles with 10,000 streams.)
fn tune(sock: &TcpStream) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let keepalive =
        TcpKeepalive::new().with_time(Duration::from_secs(30)).with_interval(Duration::from_secs(10)).with_retries(3);
    SockRef::from(sock).set_tcp_keepalive(&keepalive)
}

/// The TLS handshake of one connection, bounded in time like the HTTP/2 preface and
/// abandoned on shutdown. The identity is read from the verified client certificate.
async fn handshake(
    tls: &ServerTls,
    sock: TcpStream,
    address: String,
    shared: &ServerState,
    shutdown: &Shutdown,
) -> Option<(TlsStream<TcpStream>, Arc<Peer>)> {
    let failed = |reason: &'static str, detail: &dyn std::fmt::Display| {
        shared.metrics.tls_handshake_failures.get_or_create(&ReasonLabel { reason }).inc();
        tracing::debug!(peer = %address, reason, error = %detail, "TLS handshake failed");
    };
    let Some(config) = tls.config() else {
        failed("no_server_certificate", &"the SDS listener's certificate is not loaded yet");
        return None;
    };
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(sock);
    let stream = tokio::select! {
        _ = shutdown.cancelled() => return None,
        r = tokio::time::timeout(shared.limits.handshake_timeout, accept) => match r {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                failed(handshake_reason(&e), &e);
                return None;
            }
            Err(_) => {
                failed("timeout", &"no TLS handshake in time");
                return None;
            }
        },
    };
    let identity = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(leaf) => Identity::from_certificate(leaf),
        None => Identity::Anonymous,
    };
    tracing::debug!(peer = %address, %identity, "TLS established");
    Some((stream, Arc::new(Peer { address, identity })))
}

/// A stable label for why a handshake failed.
fn handshake_reason(e: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => "no_client_certificate",
        Some(E::InvalidCertificate(_)) => "bad_client_certificate",
        Some(E::AlertReceived(_)) => "alert_received",
        Some(E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. }) => {
            "not_tls"
        }
        Some(_) => "handshake",
        None => "io",
    }
}

/// Who is on the other end of a Unix socket: the peer's process credentials (the
/// kernel vouches for them; the proxy cannot fake them).
fn unix_peer(sock: &UnixStream) -> Peer {
    let identity = match sock.peer_cred() {
        Ok(cred) => Identity::Unix { uid: cred.uid(), gid: cred.gid(), pid: cred.pid() },
        Err(e) => Identity::Invalid(format!("no peer credentials: {e}")),
    };
    Peer { address: "unix".to_owned(), identity }
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
        assert!("127.0.0.1:1".parse::<ListenAddr>().unwrap().is_local());
        assert!("[::1]:1".parse::<ListenAddr>().unwrap().is_local());
        assert!("unix:/x".parse::<ListenAddr>().unwrap().is_local());
        assert!(!"0.0.0.0:1".parse::<ListenAddr>().unwrap().is_local());
        assert!(!"10.1.2.3:1".parse::<ListenAddr>().unwrap().is_local());
    }

    #[test]
    fn socket_modes_are_octal_permission_bits() {
        assert_eq!(parse_socket_mode("0660"), Ok(0o660));
        assert_eq!(parse_socket_mode("666"), Ok(0o666));
        assert_eq!(parse_socket_mode("0o600"), Ok(0o600));
        assert!(parse_socket_mode("1777").is_err(), "no sticky or set-id bits");
        assert!(parse_socket_mode("rw-rw----").is_err());
        assert!(UnixSocketAccess { mode: Some(0o666), group: None }.world_writable());
        assert!(!UnixSocketAccess { mode: Some(0o660), group: None }.world_writable());
    }

    #[tokio::test]
    async fn a_unix_socket_gets_the_mode_and_group_it_is_told() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds.sock");
        // As root, a group certwire is not in; otherwise its own.
        let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        let gid = if root { 65534 } else { std::fs::metadata(dir.path()).unwrap().gid() };
        let access = UnixSocketAccess { mode: Some(0o660), group: Some(gid) };
        let _bound = bind(&ListenAddr::Unix(path.clone()), access).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, gid));
    }

    #[tokio::test]
    async fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds.sock");
        let addr = ListenAddr::Unix(path.clone());
        let live = bind(&addr, UnixSocketAccess::default()).await.unwrap();
        let err = format!("{:#}", bind(&addr, UnixSocketAccess::default()).await.err().expect("refused"));
        assert!(err.contains("in use"), "{err}");
        // Closed without removing its file: a stale socket, replaced.
        drop(live);
        let second = bind(&addr, UnixSocketAccess::default()).await.unwrap();
        // The first one's end does not remove the second one's socket.
        let Bound::Unix(_, file) = &second else { unreachable!() };
        let old = SocketFile { path: path.clone(), id: Some((0, 0)) };
        old.remove();
        assert!(path.exists(), "another process's socket stays");
        file.remove();
        assert!(!path.exists());
    }
}
