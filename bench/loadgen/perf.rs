//! `perf record` of a server process during the measured part of a scenario, for
//! finding what to optimise (`--perf-at N`, `--perf-many`, `--perf-cold`).

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::Command;

/// `perf record` (with call graphs) of the server while it runs; stopped with SIGINT so
/// that it writes its file.
pub struct Perf {
    child: tokio::process::Child,
    out: std::path::PathBuf,
}

impl Perf {
    pub async fn start(pid: u32, label: &str) -> anyhow::Result<Perf> {
        let perf = Perf::attach(pid, label)?;
        // perf needs a moment to attach.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(perf)
    }

    /// Attaches without waiting (for a process that was just spawned): the first
    /// milliseconds may be missed.
    pub fn attach(pid: u32, label: &str) -> anyhow::Result<Perf> {
        let dir = crate::report::out_dir();
        std::fs::create_dir_all(&dir)?;
        let out = dir.join(format!("perf-{label}.data"));
        let log = std::fs::File::create(dir.join(format!("perf-{label}.log")))?;
        // DWARF unwinding: release builds have no frame pointers, but they have .eh_frame.
        let child = Command::new("perf")
            .args(["record", "--call-graph", "dwarf", "-F", "999", "-p", &pid.to_string(), "-o"])
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawning perf (apt-get install linux-perf)")?;
        eprintln!("   perf recording pid {pid} into {}", out.display());
        Ok(Perf { child, out })
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
        }
        if tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        eprintln!("   perf profile: {} (perf report -i {} --no-children)", self.out.display(), self.out.display());
    }
}
