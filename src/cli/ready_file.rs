//! `certwire serve --ready-file FILE`: once certwire is ready, the addresses it really
//! bound. With port 0 the kernel picks a free port, so whoever started certwire (a
//! script, a test) learns it here instead of guessing a free port beforehand, which
//! races with every other process picking ports.

use std::path::Path;

use anyhow::Context as _;

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Ready {
    pub pid: u32,
    /// In the order of `--listen`: `HOST:PORT` or `unix:/path`.
    pub sds: Vec<String>,
    pub admin: String,
    /// `--status-addr`, when status has a listener of its own.
    pub status: Option<String>,
}

/// A file left by an earlier run must not pass for this one's.
pub fn clear(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the old ready file {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Writes `ready` to `path` whole or not at all (a temporary file renamed over it), so a
/// reader polling for the file never reads half of it.
pub fn write(path: &Path, ready: &Ready) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let json = serde_json::to_vec_pretty(ready).expect("plain strings and numbers serialize");
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", Path::new(&tmp).display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing the ready file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_whole_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        clear(&path).unwrap();
        let ready = Ready { pid: 7, sds: vec!["127.0.0.1:4000".into()], admin: "127.0.0.1:4001".into(), status: None };
        write(&path, &ready).unwrap();
        let read: Ready = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(read, ready);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        clear(&path).unwrap();
        assert!(!path.exists());
    }
}
