//! A child process with its output in a log file, killed on drop, its log tail
//! printed when dropped during a panic: the shape both knotd and acme2certifier need.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::super::util;

/// A command for `program` that dies with the test: through util-linux's `setpriv
/// --pdeathsig KILL` (always in Debian) the kernel kills it when the test process
/// goes away without running destructors (nextest's timeout, SIGKILL). Otherwise a
/// stray knotd would keep port 53 and fail every later run. (The kernel watches
/// the spawning *thread*: spawn from the test's own thread or a runtime worker,
/// not from a short-lived blocking-pool thread.)
pub fn tied_command(program: &Path) -> Command {
    match ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().map(Path::new).find(|p| p.is_file()) {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "KILL", "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

pub struct LoggedChild {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl LoggedChild {
    /// Spawns `command` with stdin closed and stdout + stderr appended to `log`
    /// (appended, so a restarted process keeps its predecessor's story).
    pub fn spawn(name: &'static str, mut command: Command, log: &Path) -> LoggedChild {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({command:?}): {e}"));
        LoggedChild { name, child: Some(child), log: log.to_path_buf() }
    }

    /// Panics with the log tail when the process has already exited: a start that
    /// failed (port taken, bad config) says why instead of timing out.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            self.dump_log();
            panic!("{} exited at start ({status}); its log is above", self.name);
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// SIGKILL and reap. Both servers keep their state on disk (zone journal,
    /// SQLite), so nothing is lost that a restart needs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn dump_log(&self) {
        util::dump_log(self.name, &self.log, 60);
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            self.dump_log();
        }
    }
}
