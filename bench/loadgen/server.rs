//! The servers under test as child processes: certwire (release build) and the naive
//! baseline (this binary's `naive-server`). Killed on drop, pinned to CPU 0 on request;
//! certwire can be killed and started again the same way, and run as another user.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::proc::{self, CpuSnapshot};
use crate::{http, util};

const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// certwire, with `--workers N` when set (one runtime thread per CPU otherwise).
    Certwire {
        workers: Option<u16>,
    },
    Naive,
}

impl Kind {
    /// certwire as it runs by default.
    pub const CERTWIRE: Kind = Kind::Certwire { workers: None };

    pub fn label(self) -> String {
        match self {
            Kind::Certwire { workers: None } => "certwire".into(),
            Kind::Certwire { workers: Some(n) } => format!("certwire --workers {n}"),
            Kind::Naive => "plain tonic".into(),
        }
    }

    pub fn is_certwire(self) -> bool {
        self != Kind::Naive
    }
}

/// Where servers come from and how they run, for the whole invocation.
pub struct Launcher {
    pub certwire: PathBuf,
    pub pin: bool,
    pub logs: PathBuf,
}

/// How certwire is started, kept so that a restart starts it the same way.
#[derive(Debug, Clone)]
pub struct CertwireSpec {
    /// `--workers N` when set (one runtime thread per CPU otherwise).
    pub workers: Option<u16>,
    pub files: PathBuf,
    /// More arguments (TLS, authorization, `--config`).
    pub extra: Vec<OsString>,
    /// Run as this uid and gid: root reads through permissions, so a fault such as an
    /// unreadable directory needs certwire to run as an ordinary user.
    pub user: Option<(u32, u32)>,
}

impl CertwireSpec {
    pub fn files(files: &Path) -> CertwireSpec {
        CertwireSpec { workers: None, files: files.to_owned(), extra: Vec::new(), user: None }
    }
}

pub struct Server {
    pub kind: Kind,
    child: Child,
    pub pid: u32,
    pub sds: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// Moment just before the spawn, and the same on the wall clock (µs since the epoch).
    pub spawned: Instant,
    pub spawned_unix_us: i64,
    /// certwire's: for [`Launcher::restart`].
    spec: Option<CertwireSpec>,
    stdin: Option<ChildStdin>,
    lines: Option<Lines<BufReader<ChildStdout>>>,
    log: PathBuf,
}

impl Launcher {
    fn command(&self, program: &Path) -> Command {
        if self.pin {
            let mut c = Command::new("taskset");
            c.args(["-c", "0"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn log_file(&self, label: &str) -> anyhow::Result<(PathBuf, std::fs::File)> {
        let path = self.logs.join(format!("{label}-{}.log", proc::unix_us()));
        let file = std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        Ok((path, file))
    }

    /// `certwire serve --listen 127.0.0.1:P --admin 127.0.0.1:A --files ROOT`, not waited for.
    pub fn certwire(&self, files: &Path) -> anyhow::Result<Server> {
        self.certwire_with(None, files)
    }

    /// Like [`Launcher::certwire`], with `--workers` when `workers` is set.
    pub fn certwire_with(&self, workers: Option<u16>, files: &Path) -> anyhow::Result<Server> {
        self.certwire_args(workers, files, &[])
    }

    /// Like [`Launcher::certwire_with`], with more arguments (TLS, authorization).
    pub fn certwire_args(&self, workers: Option<u16>, files: &Path, extra: &[OsString]) -> anyhow::Result<Server> {
        self.certwire_spec(CertwireSpec { workers, extra: extra.to_vec(), ..CertwireSpec::files(files) })
    }

    /// certwire as `spec` says, on free ports, not waited for.
    pub fn certwire_spec(&self, spec: CertwireSpec) -> anyhow::Result<Server> {
        let [sds, admin] = free_addrs()?;
        self.spawn_certwire(spec, sds, admin)
    }

    /// certwire again as `old` was started, same arguments and ports (`old` has exited).
    pub fn restart(&self, old: &Server) -> anyhow::Result<Server> {
        let spec = old.spec.clone().context("only certwire is restarted")?;
        self.spawn_certwire(spec, old.sds, old.admin.context("certwire without an admin port")?)
    }

    fn spawn_certwire(&self, spec: CertwireSpec, sds: SocketAddr, admin: SocketAddr) -> anyhow::Result<Server> {
        let (log, file) = self.log_file("certwire")?;
        let mut command = self.command(&self.certwire);
        command
            .arg("serve")
            .arg("--listen")
            .arg(sds.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .arg("--files")
            .arg(&spec.files)
            .args(spec.workers.map(|n| ["--workers".to_owned(), n.to_string()]).into_iter().flatten())
            .args(&spec.extra)
            .env("NO_COLOR", "1")
            .env_remove("CERTWIRE_CONFIG")
            .env_remove("CERTWIRE_WORKERS")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true);
        if let Some((uid, gid)) = spec.user {
            // std drops the supplementary groups too when root changes user.
            command.uid(uid).gid(gid);
        }
        // Production logging unless the caller asks for more.
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let (spawned, spawned_unix_us) = (Instant::now(), proc::unix_us());
        let child = command.spawn().with_context(|| format!("spawning {}", self.certwire.display()))?;
        let pid = child.id().context("certwire pid")?;
        let kind = Kind::Certwire { workers: spec.workers };
        Ok(Server {
            kind,
            child,
            pid,
            sds,
            admin: Some(admin),
            spawned,
            spawned_unix_us,
            spec: Some(spec),
            stdin: None,
            lines: None,
            log,
        })
    }

    /// The baseline on the secrets of `files`, waited for until it listens.
    pub async fn naive(&self, files: &Path) -> anyhow::Result<Server> {
        let [sds] = free_addrs()?;
        let (log, file) = self.log_file("naive")?;
        let exe = std::env::current_exe()?;
        let mut command = self.command(&exe);
        command
            .arg("naive-server")
            .arg("--listen")
            .arg(sds.to_string())
            .arg("--files")
            .arg(files)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(file)
            .kill_on_drop(true);
        let (spawned, spawned_unix_us) = (Instant::now(), proc::unix_us());
        let mut child = command.spawn().context("spawning the naive server")?;
        let pid = child.id().context("naive server pid")?;
        let stdin = child.stdin.take();
        let lines = child.stdout.take().map(|s| BufReader::new(s).lines());
        let mut server = Server {
            kind: Kind::Naive,
            child,
            pid,
            sds,
            admin: None,
            spawned,
            spawned_unix_us,
            spec: None,
            stdin,
            lines,
            log,
        };
        server.expect_line("listening").await?;
        Ok(server)
    }
}

/// `N` distinct free ports on 127.0.0.1: all held at once while they are picked, so
/// two of them can never be the same.
fn free_addrs<const N: usize>() -> anyhow::Result<[SocketAddr; N]> {
    let listeners = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("picking free ports")?;
    let addrs = listeners.iter().map(|l| l.local_addr()).collect::<std::io::Result<Vec<_>>>()?;
    addrs.try_into().map_err(|_| anyhow::anyhow!("port count"))
}

impl Server {
    /// Waits for `/healthz` (certwire) or nothing (the baseline listens when spawned).
    pub async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        if self.kind.is_certwire() {
            self.poll_admin("/healthz", START_TIMEOUT, Duration::from_millis(10)).await?;
        }
        Ok(())
    }

    /// Polls `path` on the admin port until it answers 200; returns when it did.
    pub async fn poll_admin(&mut self, path: &str, timeout: Duration, every: Duration) -> anyhow::Result<Instant> {
        let admin = self.admin.context("no admin port")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = http::get(admin, path).await
                && r.status == 200
            {
                return Ok(Instant::now());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("{} exited ({status}); log: {}\n{}", self.kind.label(), self.log.display(), self.log_tail());
            }
            if Instant::now() >= deadline {
                bail!("{} {path} did not answer 200 within {timeout:?}\n{}", self.kind.label(), self.log_tail());
            }
            tokio::time::sleep(every).await;
        }
    }

    /// certwire's `/status/secrets`.
    pub async fn secrets_status(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let admin = self.admin.context("no admin port")?;
        let r = http::get(admin, "/status/secrets").await?;
        anyhow::ensure!(r.status == 200, "/status/secrets answered {}", r.status);
        let json = r.json()?;
        json.as_array().cloned().context("/status/secrets is not an array")
    }

    /// certwire's `/status/proxies`: one entry per open stream.
    pub async fn proxies_status(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let admin = self.admin.context("no admin port")?;
        let r = http::get(admin, "/status/proxies").await?;
        anyhow::ensure!(r.status == 200, "/status/proxies answered {}", r.status);
        r.json()?.as_array().cloned().context("/status/proxies is not an array")
    }

    /// The sum of every sample of `metric` (all label sets) on certwire's `/metrics`.
    pub async fn metric_sum(&self, metric: &str) -> anyhow::Result<f64> {
        let admin = self.admin.context("no admin port")?;
        let r = http::get(admin, "/metrics").await?;
        anyhow::ensure!(r.status == 200, "/metrics answered {}", r.status);
        let sample = |line: &str| {
            let rest = line.strip_prefix(metric)?;
            let rest = if rest.starts_with('{') { &rest[rest.find('}')? + 1..] } else { rest };
            rest.split_whitespace().next()?.parse::<f64>().ok()
        };
        Ok(r.body.lines().filter_map(sample).sum())
    }

    /// The baseline's reload: returns when it began (µs since the epoch).
    pub async fn reload(&mut self) -> anyhow::Result<i64> {
        let stdin = self.stdin.as_mut().context("no stdin")?;
        stdin.write_all(b"reload\n").await?;
        stdin.flush().await?;
        let line = self.expect_line("reloaded ").await?;
        line.split_whitespace().nth(1).and_then(|t| t.parse().ok()).context("bad reloaded line")
    }

    async fn expect_line(&mut self, prefix: &str) -> anyhow::Result<String> {
        let label = self.kind.label();
        let lines = self.lines.as_mut().context("no stdout")?;
        let read = async {
            loop {
                match lines.next_line().await? {
                    Some(line) if line.starts_with(prefix) => return Ok(line),
                    Some(_) => continue,
                    None => bail!("{label} exited"),
                }
            }
        };
        match tokio::time::timeout(START_TIMEOUT, read).await {
            Ok(result) => result.with_context(|| format!("log: {}", self.log_tail())),
            Err(_) => bail!("{label} did not say {prefix:?} within {START_TIMEOUT:?}"),
        }
    }

    pub fn rss_kib(&self) -> u64 {
        proc::rss_kib(self.pid).unwrap_or(0)
    }

    pub fn cpu(&self) -> CpuSnapshot {
        proc::cpu(self.pid)
    }

    pub fn log_tail(&self) -> String {
        util::log_tail(&self.log, 20)
    }

    /// SIGKILL, as a crash or an OOM kill would, and waits until it is gone: the kernel
    /// then closes every connection at once.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.with_context(|| format!("killing {}", self.kind.label()))
    }

    /// SIGTERM, as in production (and so that a profiler wrapping the server writes its
    /// output), then SIGKILL if it has not exited within a few seconds.
    pub async fn stop(mut self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}
