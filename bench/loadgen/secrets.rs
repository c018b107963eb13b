//! Secret directories in the kubelet's layout (made by tests/common/files.rs) and the
//! kubelet's `..data` swap split in two, so the clock can start right before the
//! `rename(2)` that readers observe: [`prepare`] writes the new generation and the
//! `..data_tmp` link, [`Swap::commit`] renames it over `..data`, [`Swap::cleanup`]
//! removes the old generation (the kubelet does that right after the rename).

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use anyhow::Context as _;

use crate::files::{SecretDir, TLS_CRT, TLS_KEY};
use crate::pki::{Ca, Issued};

/// `count` secrets `PREFIX00000`... under `root`, each with its own key and certificate.
pub struct SecretSet {
    pub names: Vec<String>,
    /// Sum of tls.crt + tls.key sizes over every secret.
    pub pem_bytes: u64,
}

pub fn create_set(root: &Path, ca: &Ca, prefix: &str, count: usize) -> SecretSet {
    let started = Instant::now();
    let mut names = Vec::with_capacity(count);
    let mut pem_bytes = 0;
    for i in 0..count {
        let name = format!("{prefix}{i:05}");
        let leaf = leaf(ca, &name);
        pem_bytes += (leaf.cert_pem.len() + leaf.key_pem.len()) as u64;
        SecretDir::create_tls(root, &name, &leaf, None);
        names.push(name);
    }
    eprintln!("wrote {count} secrets under {} in {:.1} s", root.display(), started.elapsed().as_secs_f64());
    SecretSet { names, pem_bytes }
}

/// A server certificate for secret `name` (SAN `NAME.bench.test`).
pub fn leaf(ca: &Ca, name: &str) -> Issued {
    ca.server(&format!("{name}.bench.test"))
}

/// A new generation written and linked as `..data_tmp`, not yet visible.
pub struct Swap {
    dir: PathBuf,
    old: Option<PathBuf>,
}

pub fn prepare(dir: &Path, leaf: &Issued) -> anyhow::Result<Swap> {
    static GENERATION: AtomicU64 = AtomicU64::new(1 << 20);
    let old = std::fs::read_link(dir.join("..data")).ok().map(|target| dir.join(target));
    let now = time::OffsetDateTime::now_utc();
    let new_name = format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        GENERATION.fetch_add(1, Ordering::Relaxed)
    );
    let new_dir = dir.join(&new_name);
    std::fs::create_dir(&new_dir).with_context(|| format!("create {}", new_dir.display()))?;
    std::fs::write(new_dir.join(TLS_CRT), &leaf.cert_pem)?;
    std::fs::write(new_dir.join(TLS_KEY), &leaf.key_pem)?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&new_name, &tmp).with_context(|| format!("symlink {}", tmp.display()))?;
    Ok(Swap { dir: dir.to_owned(), old })
}

impl Swap {
    /// The atomic step; returns the wall-clock time taken right before it.
    pub fn commit(&self) -> anyhow::Result<SystemTime> {
        let at = SystemTime::now();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data"))
            .with_context(|| format!("rename ..data_tmp over ..data in {}", self.dir.display()))?;
        Ok(at)
    }

    pub fn cleanup(self) {
        if let Some(old) = self.old {
            let _ = std::fs::remove_dir_all(old);
        }
    }
}
