//! The state directory: the account credentials (one JSON file per directory URL,
//! mode 0600, under `.account/`) and each issued certificate in the file-source layout
//! (`NAME/tls.crt` leaf + chain, `NAME/tls.key`, `NAME/ca.crt` issuer chain), written
//! with the kubelet's atomic `..data` symlink swap so that a reader (certwire's file
//! source on another replica, Envoy's own file watch, a backup tool) never sees a
//! half-written pair. The backoff after failed orders is kept under `.backoff/NAME.json`.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use zeroize::Zeroizing;

use crate::pki::KeyBytes;

pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
const DATA: &str = "..data";
const ACCOUNT_DIR: &str = ".account";
/// Hidden, so that `--files state_dir` does not take it for a certificate.
const BACKOFF_DIR: &str = ".backoff";

/// What is stored for one certificate.
pub struct Stored {
    /// Leaf first, then the intermediates (as the CA sent them).
    pub chain_pem: Vec<u8>,
    pub key_pem: KeyBytes,
    /// The issuer chain (everything after the leaf); may be empty.
    pub ca_pem: Vec<u8>,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored").field("chain_pem", &self.chain_pem.len()).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Creates the directory (mode 0700) if needed.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating acme state_dir {}", root.display()))?;
        let dir = Self { root: root.to_path_buf() };
        create_private_dir(&dir.root.join(ACCOUNT_DIR))?;
        create_private_dir(&dir.root.join(BACKOFF_DIR))?;
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `.account/<first 16 hex of SHA-256(directory URL)>.json`: switching CAs never
    /// reuses another CA's account.
    pub fn account_path(&self, directory: &str) -> PathBuf {
        self.root.join(ACCOUNT_DIR).join(account_file_name(directory))
    }

    /// The stored account JSON for `directory`, if any.
    pub fn load_account(&self, directory: &str) -> anyhow::Result<Option<Zeroizing<String>>> {
        let path = self.account_path(directory);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(Zeroizing::new(text))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading ACME account {}", path.display())),
        }
    }

    /// Writes the account JSON with mode 0600 (atomically: temp file + rename).
    pub fn save_account(&self, directory: &str, json: &[u8]) -> anyhow::Result<PathBuf> {
        let path = self.account_path(directory);
        let tmp = path.with_extension("json.tmp");
        write_private(&tmp, json)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} into place", tmp.display()))?;
        Ok(path)
    }

    pub fn cert_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The stored certificate of `name`; `None` when there is none (or only part).
    pub fn load_cert(&self, name: &str) -> anyhow::Result<Option<Stored>> {
        let dir = self.cert_dir(name);
        let read = |file: &str| match std::fs::read(dir.join(file)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", dir.join(file).display())),
        };
        let (Some(chain_pem), Some(key)) = (read(TLS_CRT)?, read(TLS_KEY)?) else { return Ok(None) };
        let ca_pem = read(CA_CRT)?.unwrap_or_default();
        Ok(Some(Stored { chain_pem, key_pem: KeyBytes::new(key), ca_pem }))
    }

    /// Writes `stored` for `name` as one atomic swap: a new hidden timestamped
    /// directory, then `..data` pointed at it by a rename, then the old one removed.
    pub fn save_cert(&self, name: &str, stored: &Stored) -> anyhow::Result<()> {
        let dir = self.cert_dir(name);
        create_private_dir(&dir)?;
        let stamp = format!("..{}_{}", time_stamp(), random_suffix());
        let data_dir = dir.join(&stamp);
        create_private_dir(&data_dir)?;
        let result = swap_in(&dir, &stamp, stored);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&data_dir);
        }
        result.with_context(|| format!("writing certificate {name} to {}", dir.display()))
    }
}

impl StateDir {
    fn backoff_path(&self, name: &str) -> PathBuf {
        self.root.join(BACKOFF_DIR).join(format!("{name}.json"))
    }

    /// The backoff record of certificate `name`, if any.
    pub fn load_backoff(&self, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.backoff_path(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the backoff record of `name` atomically (temp file + rename).
    pub fn save_backoff(&self, name: &str, json: &[u8]) -> anyhow::Result<()> {
        let path = self.backoff_path(name);
        let tmp = path.with_extension("json.tmp");
        write_file(&tmp, json)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} into place", tmp.display()))
    }

    pub fn remove_backoff(&self, name: &str) -> anyhow::Result<()> {
        let path = self.backoff_path(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

/// `<first 16 hex of SHA-256(directory URL)>.json`: the account's file name in the
/// state directory and its key in the Kubernetes account Secret.
pub fn account_file_name(directory: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, directory.as_bytes());
    format!("{}.json", hex::encode(&digest.as_ref()[..8]))
}

/// Fills `dir/stamp/`, points `..data` at it, links the files, drops the old data.
/// Without an issuer chain there is no `ca.crt` (an empty CA bundle is an error).
fn swap_in(dir: &Path, stamp: &str, stored: &Stored) -> anyhow::Result<()> {
    let data_dir = dir.join(stamp);
    write_private(&data_dir.join(TLS_KEY), stored.key_pem.as_slice())?;
    write_file(&data_dir.join(TLS_CRT), &stored.chain_pem)?;
    let with_ca = !stored.ca_pem.is_empty();
    if with_ca {
        write_file(&data_dir.join(CA_CRT), &stored.ca_pem)?;
    }
    // Everything on disk before the swap makes it visible.
    std::fs::File::open(&data_dir).and_then(|d| d.sync_all()).context("syncing the new data directory")?;
    let old = std::fs::read_link(dir.join(DATA)).ok();
    replace_symlink(dir, Path::new(stamp), DATA)?;
    for file in [TLS_CRT, TLS_KEY, CA_CRT] {
        let link = Path::new(DATA).join(file);
        if file == CA_CRT && !with_ca {
            let _ = std::fs::remove_file(dir.join(file));
        } else if std::fs::read_link(dir.join(file)).ok().as_deref() != Some(link.as_path()) {
            replace_symlink(dir, &link, file)?;
        }
    }
    if let Some(old) = old.filter(|o| o.as_path() != Path::new(stamp)) {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting mode 0700 on {}", dir.display()))
}

/// Creates (or truncates) `path` with mode 0600 before a byte is written.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", path.display()))
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", path.display()))
}

/// Points `dir/name` at `target` atomically (a temporary symlink renamed over it).
fn replace_symlink(dir: &Path, target: &Path, name: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{name}_tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("creating symlink {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming {} over {name}", tmp.display()))
}

fn time_stamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond()
    )
}

#[cfg(test)]
impl Stored {
    /// Recognizable content for tests of the stores (not a real certificate).
    pub(crate) fn sample(tag: &str) -> Self {
        Stored {
            chain_pem: format!("chain {tag}").into_bytes(),
            key_pem: KeyBytes::new(format!("key {tag}").into_bytes()),
            ca_pem: format!("ca {tag}").into_bytes(),
        }
    }
}

fn random_suffix() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn stored(tag: &str) -> Stored {
        Stored::sample(tag)
    }

    #[test]
    fn certificates_round_trip_through_data_swaps() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(&tmp.path().join("state")).unwrap();
        assert!(state.load_cert("web").unwrap().is_none());
        for tag in ["one", "two", "three"] {
            state.save_cert("web", &stored(tag)).unwrap();
            let back = state.load_cert("web").unwrap().unwrap();
            assert_eq!(back.chain_pem, format!("chain {tag}").as_bytes());
            assert_eq!(back.key_pem.as_slice(), format!("key {tag}").as_bytes());
            assert_eq!(back.ca_pem, format!("ca {tag}").as_bytes());
        }
        let dir = state.cert_dir("web");
        let hidden: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("..") && n != DATA)
            .collect();
        assert_eq!(hidden.len(), 1, "old data directories are removed: {hidden:?}");
        assert_eq!(std::fs::read_link(dir.join(TLS_KEY)).unwrap(), Path::new(DATA).join(TLS_KEY));
        let key_mode = std::fs::metadata(dir.join(TLS_KEY)).unwrap().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
    }

    #[test]
    fn plain_files_left_by_someone_else_are_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let dir = state.cert_dir("web");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(TLS_CRT), "old").unwrap();
        state.save_cert("web", &stored("new")).unwrap();
        assert_eq!(std::fs::read(dir.join(TLS_CRT)).unwrap(), b"chain new");
    }

    #[test]
    fn acme_backoff_file_round_trips_and_is_hidden_from_the_file_source() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        assert!(state.load_backoff("web").unwrap().is_none());
        state.save_backoff("web", b"{\"failures\":1}").unwrap();
        state.save_backoff("web", b"{\"failures\":2}").unwrap();
        assert_eq!(state.load_backoff("web").unwrap().unwrap(), b"{\"failures\":2}");
        assert!(state.load_backoff("api").unwrap().is_none());
        state.remove_backoff("web").unwrap();
        state.remove_backoff("web").unwrap();
        assert!(state.load_backoff("web").unwrap().is_none());
        assert!(BACKOFF_DIR.starts_with('.'));
    }

    #[test]
    fn account_file_is_private_and_per_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        assert!(state.load_account("https://a/dir").unwrap().is_none());
        let path = state.save_account("https://a/dir", b"{\"a\":1}").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(state.load_account("https://a/dir").unwrap().unwrap().as_str(), "{\"a\":1}");
        assert!(state.load_account("https://b/dir").unwrap().is_none());
        assert_eq!(std::fs::metadata(tmp.path().join(ACCOUNT_DIR)).unwrap().mode() & 0o777, 0o700);
    }
}
