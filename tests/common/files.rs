//! Secret directories in the layout the kubelet gives a mounted Secret:
//!
//! ```text
//! ROOT/NAME/..2026_01_02_03_04_05.000000001/{tls.crt,tls.key,ca.crt}
//! ROOT/NAME/..data -> ..2026_01_02_03_04_05.000000001
//! ROOT/NAME/tls.crt -> ..data/tls.crt          (one per file)
//! ```
//!
//! An update is the kubelet's atomic swap: a new timestamped directory, a `..data_tmp`
//! symlink to it renamed over `..data`, then the old directory removed. Readers that
//! open `NAME/tls.crt` therefore see either the old pair or the new pair, never a mix.
//! [`SecretDir::write_in_place`] is the opposite, for tests of torn updates.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::pki::Issued;

pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";

/// One secret directory `ROOT/NAME` in kubelet layout.
#[derive(Debug)]
pub struct SecretDir {
    dir: PathBuf,
    generation: u64,
    current: String,
    files: Vec<String>,
}

impl SecretDir {
    /// Creates `root/name` with a first generation holding `files` (name, contents).
    pub fn create(root: &Path, name: &str, files: &[(&str, &[u8])]) -> SecretDir {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut secret = SecretDir { dir, generation: 0, current: String::new(), files: Vec::new() };
        secret.swap(files);
        secret
    }

    /// `tls.crt` + `tls.key` (+ `ca.crt`) from issued certificates.
    pub fn create_tls(root: &Path, name: &str, leaf: &Issued, ca_pem: Option<&str>) -> SecretDir {
        SecretDir::create(root, name, &tls_files(leaf, ca_pem))
    }

    /// The directory `ROOT/NAME`.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The path of a user-visible file, e.g. `ROOT/NAME/tls.crt` (a symlink).
    pub fn file(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The kubelet's atomic update: the secret's content becomes exactly `files`.
    pub fn swap(&mut self, files: &[(&str, &[u8])]) {
        self.generation += 1;
        let new_name = format!("..{}.{:09}", timestamp(), self.generation);
        let new_dir = self.dir.join(&new_name);
        std::fs::create_dir(&new_dir).unwrap_or_else(|e| panic!("create {}: {e}", new_dir.display()));
        for (name, contents) in files {
            write(&new_dir.join(name), contents);
        }

        let tmp_link = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp_link);
        symlink(&new_name, &tmp_link).expect("symlink ..data_tmp");
        // rename(2) over the old symlink is the single atomic step readers observe.
        std::fs::rename(&tmp_link, self.dir.join("..data")).expect("rename ..data_tmp over ..data");

        let new_files: Vec<String> = files.iter().map(|(n, _)| n.to_string()).collect();
        for name in &new_files {
            let link = self.dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(name), &link).expect("symlink user-visible file");
            }
        }
        for gone in self.files.iter().filter(|f| !new_files.contains(f)) {
            let _ = std::fs::remove_file(self.dir.join(gone));
        }
        if !self.current.is_empty() {
            let old = self.dir.join(&self.current);
            std::fs::remove_dir_all(&old).unwrap_or_else(|e| panic!("remove {}: {e}", old.display()));
        }
        self.current = new_name;
        self.files = new_files;
    }

    pub fn swap_tls(&mut self, leaf: &Issued, ca_pem: Option<&str>) {
        self.swap(&tls_files(leaf, ca_pem));
    }

    /// Writes one user-visible file directly, non-atomically (the symlink, if any, is
    /// replaced by a regular file), the way a tool that knows nothing of `..data` would.
    /// No swap happens: until its partner is written too, the pair on disk is torn.
    /// (Writing *through* the symlink into the generation directory is what no writer of
    /// this layout does; certwire sees that only at its periodic rescan.)
    pub fn write_in_place(&self, file: &str, contents: &[u8]) {
        let path = self.dir.join(file);
        if path.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
        }
        write(&path, contents);
    }

    /// The classic torn rotation: the new certificate lands, and only after `pause`
    /// its key does. In between, the files on disk do not match.
    pub async fn write_pair_in_place(&self, leaf: &Issued, pause: Duration) {
        self.write_in_place(TLS_CRT, leaf.cert_pem.as_bytes());
        tokio::time::sleep(pause).await;
        self.write_in_place(TLS_KEY, leaf.key_pem.as_bytes());
    }
}

/// The file list of a TLS secret.
pub fn tls_files<'a>(leaf: &'a Issued, ca_pem: Option<&'a str>) -> Vec<(&'static str, &'a [u8])> {
    let mut files = vec![(TLS_CRT, leaf.cert_pem.as_bytes()), (TLS_KEY, leaf.key_pem.as_bytes())];
    if let Some(ca) = ca_pem {
        files.push((CA_CRT, ca.as_bytes()));
    }
    files
}

fn write(path: &Path, contents: &[u8]) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `YYYY_MM_DD_HH_MM_SS`, the kubelet's directory stamp (UTC).
fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}_{:02}_{:02}_{:02}_{:02}_{:02}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}
