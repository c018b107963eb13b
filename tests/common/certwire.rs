//! The certwire binary as a child process: `certwire serve ...` with its admin API on
//! a free port, output captured to a file, killed on drop, restartable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::http::{self, Response};
use super::util::{self, WAIT};

/// The certwire binary cargo built for this test target.
pub fn certwire_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_certwire"))
}

/// Runs `certwire ARGS` to completion and returns its stdout; panics with its
/// stderr if it fails. For one-shot commands such as `certwire bootstrap`.
pub fn run(args: &[&str]) -> String {
    let output = Command::new(certwire_bin()).args(args).stdin(Stdio::null()).output().expect("run certwire");
    assert!(
        output.status.success(),
        "certwire {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("certwire output is UTF-8")
}

pub struct Certwire {
    child: Option<Child>,
    /// Learned from the ready file at the first start, kept across restarts.
    admin: Option<SocketAddr>,
    /// Where `/status/*` is served when `--status-addr` (or `status_addr`) moves it off
    /// the admin port: from the ready file, at every start.
    status: Option<SocketAddr>,
    /// The SDS addresses bound, in `--listen` order (idem).
    sds: Vec<String>,
    args: Vec<String>,
    log: PathBuf,
    /// Run as this uid and gid (see [`Certwire::serve_unprivileged`]).
    user: Option<u32>,
    /// The binary run: cargo's, or a copy that `user` may execute.
    bin: PathBuf,
    _dir: TempDir,
}

impl Certwire {
    /// Starts `certwire serve ARGS --admin 127.0.0.1:<free>` and waits until
    /// `/healthz` answers 200.
    pub async fn serve<I, S>(args: I) -> Certwire
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::serve_as(args, None).await
    }

    /// Like [`Certwire::serve`], but as user and group `nobody` (65534) when the tests
    /// run as root: permissions then apply to certwire (root reads anything). Whatever
    /// it must read has to be readable by that user.
    pub async fn serve_unprivileged<I, S>(args: I) -> Certwire
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        Self::serve_as(args, root.then_some(65534)).await
    }

    /// Like [`Certwire::serve`], but as user and group `uid`: the uid a deployment runs
    /// certwire as, which owns the Unix socket it creates. Needs root.
    pub async fn serve_as_user<I, S>(args: I, uid: u32) -> Certwire
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        // SAFETY: geteuid(2) has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "running certwire as uid {uid} needs root");
        Self::serve_as(args, Some(uid)).await
    }

    async fn serve_as<I, S>(args: I, user: Option<u32>) -> Certwire
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let dir = util::tempdir();
        if let Some(id) = user {
            // certwire writes its ready file there.
            std::os::unix::fs::chown(dir.path(), Some(id), Some(id)).expect("chown the certwire directory");
        }
        let log = dir.path().join("certwire.log");
        let bin = match user {
            // A checkout in a private directory (mode 0700, as `mktemp -d` makes) is not
            // enterable by another user: run a copy from this test's own directory.
            Some(_) if !runnable_by_others(&certwire_bin()) => {
                let copy = dir.path().join("certwire");
                std::fs::copy(certwire_bin(), &copy).expect("copy the certwire binary");
                copy
            }
            _ => certwire_bin(),
        };
        let mut certwire = Certwire {
            child: None,
            admin: None,
            status: None,
            sds: Vec::new(),
            args: args.into_iter().map(Into::into).collect(),
            log,
            user,
            bin,
            _dir: dir,
        };
        certwire.start().await;
        certwire
    }

    /// Spawns the process (again, after [`Certwire::kill`]) and waits until it is
    /// ready. At the first start the admin API (and any `--listen` on port 0) takes a
    /// free port the kernel picks, learned from `--ready-file`; a restart binds the
    /// same addresses again, so proxies reconnect where they were. Same log file.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "certwire is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open certwire log");
        let ready_file = self.log.with_file_name("ready.json");
        let mut command = Command::new(&self.bin);
        command
            .arg("serve")
            .args(self.args_to_start())
            .arg("--admin")
            .arg(self.admin.map_or("127.0.0.1:0".to_string(), |a| a.to_string()))
            .arg("--ready-file")
            .arg(&ready_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        // Debug logs make a failed test explain itself; an explicit RUST_LOG wins.
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info,certwire=debug");
        }
        // A log file, not a terminal: no colour codes. And a config file from the
        // environment of whoever runs the tests must not change what is tested.
        command.env("NO_COLOR", "1").env_remove("CERTWIRE_CONFIG");
        if let Some(id) = self.user {
            use std::os::unix::process::CommandExt as _;
            // std drops the supplementary groups too when root sets a uid.
            command.uid(id).gid(id);
        }
        self.child = Some(command.spawn().expect("spawn certwire"));

        let deadline = std::time::Instant::now() + WAIT;
        let ready = loop {
            // certwire removes an old file at start and writes the new one whole.
            if let Ok(text) = std::fs::read(&ready_file)
                && let Ok(ready) = serde_json::from_slice::<serde_json::Value>(&text)
                && ready["pid"].as_u64() == self.pid().map(u64::from)
            {
                break ready;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("certwire exited at start ({status}); its log follows");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "certwire did not write {} within {WAIT:?}",
                ready_file.display()
            );
            tokio::time::sleep(util::POLL).await;
        };
        let admin: SocketAddr =
            ready["admin"].as_str().and_then(|a| a.parse().ok()).expect("admin address in the ready file");
        self.admin = Some(admin);
        self.status = ready["status"].as_str().and_then(|a| a.parse().ok());
        self.sds =
            ready["sds"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(str::to_owned)).collect();
        let response = http::get(admin, "/healthz").await;
        assert!(matches!(&response, Ok(r) if r.status == 200), "certwire /healthz on {admin} once ready: {response:?}");
    }

    /// The arguments, with each `--listen` on port 0 replaced by what it bound the first
    /// time, if it ran before.
    fn args_to_start(&self) -> Vec<String> {
        let mut listens = self.sds.iter();
        let mut after_listen = false;
        let mut args = Vec::with_capacity(self.args.len());
        for arg in &self.args {
            let bound = if after_listen { listens.next() } else { None };
            args.push(match bound {
                Some(bound) if arg.ends_with(":0") => bound.clone(),
                _ => arg.clone(),
            });
            after_listen = arg == "--listen";
        }
        args
    }

    /// The first TCP SDS address certwire bound (`--listen 127.0.0.1:0` picks a free port).
    pub fn sds_addr(&self) -> SocketAddr {
        self.sds.iter().find_map(|a| a.parse().ok()).expect("certwire listens on TCP")
    }

    /// Sends SIGKILL (a crash, no graceful shutdown) and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the process to exit on its own;
    /// returns its exit status, or `None` if it was still running (it is then killed).
    pub async fn terminate(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) with the pid of our own, not yet reaped, child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(util::POLL).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.start().await;
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The running process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("certwire started once")
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `GET path` on the admin API, any status.
    /// `/status/*` goes to the status address when certwire serves it on its own.
    pub async fn get(&self, path: &str) -> Response {
        let addr = match self.status {
            Some(status) if path.starts_with("/status") => status,
            _ => self.admin_addr(),
        };
        http::get(addr, path).await.unwrap_or_else(|e| panic!("certwire admin {path}: {e:#}"))
    }

    /// `GET path`, asserting 200 and a JSON body.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.get(path).await;
        assert_eq!(response.status, 200, "certwire {path}: {}", response.body);
        response.json().unwrap_or_else(|e| panic!("certwire {path}: {e:#}"))
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let response = self.get("/metrics").await;
        assert_eq!(response.status, 200, "certwire /metrics: {}", response.body);
        response.body
    }

    /// The sum of all samples of `metric` whose labels include every `labels`
    /// pair, e.g. `("reason", "key_mismatch")`. Zero when there is none.
    pub async fn metric_sum(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        sum_samples(&self.metrics().await, metric, labels)
    }

    /// The entry of `/status/secrets` for `name`.
    pub async fn secret_status(&self, name: &str) -> Option<serde_json::Value> {
        let all = self.get_json("/status/secrets").await;
        all.as_array()?.iter().find(|s| s["name"].as_str() == Some(name)).cloned()
    }

    /// Prints the tail of certwire's log to stderr.
    pub fn dump_log(&self) {
        util::dump_log("certwire", &self.log, 120);
    }
}

impl Drop for Certwire {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            self.dump_log();
        }
    }
}

/// Whether any user may execute `path`: it and every directory above it have the
/// "others" execute bit.
fn runnable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .all(|p| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// Sums the samples of `metric` in Prometheus text whose labels contain all of
/// `labels`. Counters may carry a `_total` suffix: pass the full sample name.
pub fn sum_samples(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, label_text) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if name != metric {
                return None;
            }
            let all_match = labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            if all_match { value.parse::<f64>().ok() } else { None }
        })
        .sum()
}
