//! Reading one secret file without trusting what is at its path.
//!
//! Whoever can write in a files root decides what `tls.crt` is: a FIFO that blocks a
//! reader in open(2) until a writer comes, a device (`/dev/zero` never ends, some
//! devices act on open), a file of any size, or a link to a file certwire may read and
//! the writer may not (another secret's key, certwire's own TLS key). So a file is read
//! only when it is a regular file inside the root and at most the cap in size, and these
//! are checked on the file that is then read, not on a path that may change meanwhile:
//!
//! 1. The path is opened with `O_PATH`: the kernel follows the links, but the file itself
//!    is not opened (no FIFO wait, no device open routine) and nothing is read.
//! 2. Where the links led is read back from `/proc/self/fd` and must lie inside the root
//!    (canonical, so a root given through a link works), the type must be a regular
//!    file and the size at most the cap.
//! 3. That same inode is opened for reading through `/proc/self/fd` (non-blocking, no
//!    controlling terminal), so a link swapped after step 2 changes nothing; and it is
//!    read through a limit of cap + 1 bytes, so a file that grows meanwhile is refused
//!    too, without ever holding more than the cap.
//!
//! Without `/proc` (never in a container), step 2 canonicalizes the path instead and
//! step 3 opens the result and checks it is the inode of step 1.
//!
//! The kubelet's layout (`tls.crt -> ..data/tls.crt`, `..data -> ..2026_01_02...`) is
//! links inside the secret directory, so it is followed as always.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::FilesError;

/// Default cap on the size of one secret file (certificate chain, key, CA bundle, CRL).
/// A Kubernetes Secret holds at most 1 MiB in all, so no file of a mounted Secret is
/// larger; a chain of ten 4096-bit RSA certificates is about 20 KiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 20;

/// Where a secret's files may come from, and how much of each is read.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits<'a> {
    /// Canonical: no links, absolute.
    pub root: &'a Path,
    pub max_file_bytes: u64,
}

/// Reads `path` within `limits`. `Ok(None)`: nothing is there (or a link leads nowhere).
/// The buffer is zeroized on drop: it may hold a key.
pub(super) fn read_file(limits: Limits<'_>, path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, FilesError> {
    let read_error = |source| FilesError::Read { path: path.to_owned(), source };
    let handle = match OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(path) {
        Ok(handle) => handle,
        Err(e) if is_absent(&e) => return Ok(None),
        Err(e) => return Err(read_error(e)),
    };
    let meta = handle.metadata().map_err(read_error)?;
    let proc_path = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let (target, through_proc) = match std::fs::read_link(&proc_path) {
        Ok(target) => (target, true),
        Err(_) => match std::fs::canonicalize(path) {
            Ok(target) => (target, false),
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(read_error(e)),
        },
    };
    if !target.starts_with(limits.root) {
        return Err(FilesError::OutsideRoot { path: path.to_owned(), target, root: limits.root.to_owned() });
    }
    check_meta(limits, path, &meta)?;

    let open = |at: &Path| {
        OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(at).map_err(read_error)
    };
    let file = if through_proc { open(&proc_path)? } else { open(&target)? };
    let opened = file.metadata().map_err(read_error)?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
        return Err(read_error(io::Error::other("replaced while being opened")));
    }
    check_meta(limits, path, &opened)?;
    read_capped(file, opened.len(), limits.max_file_bytes)
        .map_err(|e| match e {
            Capped::Over => FilesError::TooLarge { path: path.to_owned(), size: None, max: limits.max_file_bytes },
            Capped::Io(source) => read_error(source),
        })
        .map(Some)
}

fn is_absent(e: &io::Error) -> bool {
    // NotADirectory: NAME is a plain file, or a path component was swapped mid-read.
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

fn check_meta(limits: Limits<'_>, path: &Path, meta: &Metadata) -> Result<(), FilesError> {
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = match () {
            _ if kind.is_dir() => "a directory",
            _ if kind.is_fifo() => "a FIFO",
            _ if kind.is_socket() => "a socket",
            _ if kind.is_char_device() => "a character device",
            _ if kind.is_block_device() => "a block device",
            _ => "of an unknown type",
        };
        return Err(FilesError::NotAFile { path: path.to_owned(), kind });
    }
    if meta.len() > limits.max_file_bytes {
        return Err(FilesError::TooLarge { path: path.to_owned(), size: Some(meta.len()), max: limits.max_file_bytes });
    }
    Ok(())
}

pub(crate) enum Capped {
    Over,
    Io(io::Error),
}

/// Reads at most `max + 1` bytes into one zeroizing buffer sized from `size_hint`; a
/// file that turns out larger than `max` is `Over`. When the file grew since its size
/// was taken, the buffer is replaced by a larger one and the old one zeroized, so no
/// reallocation leaves key bytes behind. Also the ticket state's reader
/// (src/sources/tickets/dir.rs).
pub(crate) fn read_capped(file: File, size_hint: u64, max: u64) -> Result<Zeroizing<Vec<u8>>, Capped> {
    let limit = max.saturating_add(1);
    let mut reader = file.take(limit);
    let mut buf = Zeroizing::new(vec![0u8; size_hint.min(max).saturating_add(1) as usize]);
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if filled as u64 >= limit {
                return Err(Capped::Over);
            }
            let mut bigger = Zeroizing::new(vec![0u8; (filled as u64).saturating_mul(2).min(limit) as usize]);
            bigger[..filled].copy_from_slice(&buf[..filled]);
            buf = bigger;
        }
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Capped::Io(e)),
        }
    }
    if filled as u64 >= limit {
        return Err(Capped::Over);
    }
    buf.truncate(filled);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(root: &Path, max: u64) -> (PathBuf, u64) {
        (root.canonicalize().unwrap(), max)
    }

    #[test]
    fn reads_a_regular_file_up_to_the_cap_and_refuses_one_byte_more() {
        let dir = tempfile::tempdir().unwrap();
        let (root, max) = limits(dir.path(), 16);
        let limits = Limits { root: &root, max_file_bytes: max };
        std::fs::write(dir.path().join("exact"), [7u8; 16]).unwrap();
        std::fs::write(dir.path().join("over"), [7u8; 17]).unwrap();
        std::fs::write(dir.path().join("empty"), []).unwrap();

        assert_eq!(read_file(limits, &dir.path().join("exact")).unwrap().unwrap().as_slice(), &[7u8; 16]);
        assert!(read_file(limits, &dir.path().join("empty")).unwrap().unwrap().is_empty());
        let err = read_file(limits, &dir.path().join("over")).unwrap_err();
        assert!(matches!(err, FilesError::TooLarge { size: Some(17), max: 16, .. }), "{err}");
        assert!(read_file(limits, &dir.path().join("missing")).unwrap().is_none());
    }

    #[test]
    fn a_file_larger_than_its_size_said_is_cut_at_the_cap() {
        // A file that reports no size while it has content, like those of procfs.
        let file = File::open("/proc/self/status").unwrap();
        assert!(matches!(read_capped(file, 0, 8), Err(Capped::Over)));
        let file = File::open("/proc/self/status").unwrap();
        let all = read_capped(file, 0, 1 << 20).unwrap_or_else(|_| panic!("status fits"));
        assert!(all.starts_with(b"Name:"));
    }

    #[test]
    fn links_are_followed_inside_the_root_only() {
        let (dir, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (root, max) = limits(dir.path(), 1024);
        let limits = Limits { root: &root, max_file_bytes: max };
        std::fs::write(outside.path().join("secret"), "outside").unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        std::fs::write(dir.path().join("..data/inside"), "inside").unwrap();
        std::os::unix::fs::symlink("..data/inside", dir.path().join("relative")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("..data/inside"), dir.path().join("absolute")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero")).unwrap();

        for name in ["relative", "absolute"] {
            assert_eq!(read_file(limits, &dir.path().join(name)).unwrap().unwrap().as_slice(), b"inside");
        }
        for name in ["escape", "zero"] {
            let err = read_file(limits, &dir.path().join(name)).unwrap_err();
            assert!(matches!(err, FilesError::OutsideRoot { .. }), "{name}: {err}");
            assert!(err.to_string().contains(name), "names the file: {err}");
        }
    }
}
