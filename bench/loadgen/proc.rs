//! What /proc says about a process (CPU time, resident memory) and about the machine.

use std::collections::HashMap;
use std::process::Command;

/// CPU time of every thread of a process, in ns, from `/proc/PID/task/TID/schedstat`
/// (nanosecond resolution, where `/proc/PID/stat` counts 10 ms ticks).
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    threads: HashMap<u32, u64>,
    /// utime + stime of the whole process in clock ticks: the fallback without schedstat.
    ticks: u64,
}

pub fn cpu(pid: u32) -> CpuSnapshot {
    let mut threads = HashMap::new();
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for entry in entries.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else { continue };
            if let Some(ns) = text.split_whitespace().next().and_then(|s| s.parse::<u64>().ok()) {
                threads.insert(tid, ns);
            }
        }
    }
    CpuSnapshot { threads, ticks: stat_ticks(pid).unwrap_or(0) }
}

impl CpuSnapshot {
    /// CPU time spent between `self` and `later`, in µs. Threads born in between count
    /// in full; threads that ended in between are lost (tokio's blocking pool is the
    /// only source of those, and it keeps idle threads for 10 s).
    pub fn used_us_until(&self, later: &CpuSnapshot) -> f64 {
        if later.threads.is_empty() {
            let hz = 100.0; // USER_HZ on Linux
            return later.ticks.saturating_sub(self.ticks) as f64 * 1e6 / hz;
        }
        let ns: u64 = later
            .threads
            .iter()
            .map(|(tid, after)| after.saturating_sub(self.threads.get(tid).copied().unwrap_or(0)))
            .sum();
        ns as f64 / 1e3
    }
}

/// CPU µs used by a set of processes between two snapshots of each.
pub fn used_us(before: &[CpuSnapshot], after: &[CpuSnapshot]) -> f64 {
    before.iter().zip(after).map(|(b, a)| b.used_us_until(a)).sum()
}

fn stat_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after it start at ") ".
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the state field.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// VmRSS in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// VmHWM in KiB: the peak RSS since the process started or since [`reset_peak_rss`].
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Sets the peak RSS of a process back to its current RSS (`clear_refs` 5, Linux 4.0+;
/// needs to be root or the process's user), so that a peak over one episode can be read.
pub fn reset_peak_rss(pid: u32) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `2 × AMD EPYC` style: logical CPUs and the model name.
pub fn machine() -> String {
    // Counted from /proc/cpuinfo: with --pin this process may use only one of them.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':').map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kib| format!(", {} GiB RAM", kib / (1024 * 1024)))
        .unwrap_or_default();
    format!("{cpus} CPUs ({model}){mem}, kernel {}", kernel())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// The 1-minute load average, a hint of how busy the shared machine was.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Short commit of the working tree, noting uncommitted changes.
pub fn git_commit() -> String {
    let git = |args: &[&str]| {
        let dir = env!("CARGO_MANIFEST_DIR");
        let out = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else { return "unknown (no git)".into() };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{head} + uncommitted changes"),
        _ => head,
    }
}

/// True when `taskset` (util-linux) can be run.
pub fn have_taskset() -> bool {
    Command::new("taskset").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Pins every thread of this process to `cpu`.
pub fn pin_self(cpu: usize) -> anyhow::Result<()> {
    let pid = std::process::id().to_string();
    let out = Command::new("taskset").args(["-a", "-p", "-c", &cpu.to_string(), &pid]).output()?;
    anyhow::ensure!(out.status.success(), "taskset -a -p -c {cpu} {pid}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Wall clock in µs since the epoch: comparable across processes on this machine.
pub fn unix_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

pub fn system_time_us(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}
