//! The inotify watches of one files root: the root itself and each secret directory, each
//! watched on its own (not recursively).
//!
//! inotify is used directly rather than through `notify`: the file source needs a small
//! part of it, and owning that part settles what `notify` could not.
//! - Watches are kept by descriptor, not by path: a directory deleted and created again
//!   under the same name is a new watch, and the kernel's `IN_IGNORED` says exactly
//!   which one is gone. `notify` keeps them by path; deleting a watched directory made it
//!   remove the watch twice and log a WARN with the directory's absolute path.
//! - The mask has no open or read events, so certwire's own reads (every file, at every
//!   rescan) raise none; `notify` asks for them all, and they were dropped one by one.
//! - The bookkeeping is one map entry per directory, where `notify` held two paths: it is
//!   much of what a stored secret costs in memory.
//! - The kernel queue (`fs.inotify.max_queued_events`) bounds what waits while the
//!   source is busy; an overflow is reported and the source rescans. `notify` moved
//!   events into an unbounded channel.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Descriptor of one watch, as inotify numbers them.
pub(super) type Wd = i32;

/// Changes of the root's entries: secret directories appearing, going, replaced; and
/// the root itself going.
const ROOT_MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// Changes inside a secret directory: the kubelet's `..data` swap (a rename), files
/// written (each write, and the close that ends it), replaced, removed, their mode.
const DIR_MASK: u32 = ROOT_MASK | libc::IN_CLOSE_WRITE | libc::IN_MODIFY;

/// Adds and removes watches. Used from the blocking pool, while [`Events`] reads the same
/// inotify instance on the runtime.
pub(super) struct Watcher {
    fd: OwnedFd,
}

/// One event. `name` is the entry of the watched directory it is about, if any.
#[derive(Debug)]
pub(super) struct Event {
    pub wd: Wd,
    pub mask: u32,
    pub name: Option<Box<OsStr>>,
}

impl Event {
    /// The kernel dropped events: its queue was full.
    pub fn overflowed(&self) -> bool {
        self.mask & libc::IN_Q_OVERFLOW != 0
    }

    /// The watch is gone: its directory was deleted (or unmounted), or it was removed.
    pub fn watch_gone(&self) -> bool {
        self.mask & libc::IN_IGNORED != 0
    }

    /// The watched directory itself was deleted or moved.
    pub fn about_itself(&self) -> bool {
        self.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0
    }

    /// An entry was created or renamed, to or from this name.
    pub fn entry_appeared(&self) -> bool {
        self.mask & (libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_MOVED_FROM) != 0
    }
}

/// A new inotify instance: what adds watches, and what reads their events.
pub(super) fn new() -> io::Result<(Watcher, Events)> {
    // SAFETY: inotify_init1 takes no pointers; it returns a new descriptor or -1.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel, is open, and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let reader = File::from(fd.try_clone()?);
    Ok((Watcher { fd }, Events { reader: Some(reader), fd: None, buf: vec![0; 64 << 10].into_boxed_slice() }))
}

impl Watcher {
    pub fn watch_root(&self, path: &Path) -> io::Result<Wd> {
        self.add(path, ROOT_MASK)
    }

    /// Watches a secret directory (through links). Watching a directory already watched
    /// (another name for it) returns the same descriptor.
    pub fn watch_dir(&self, path: &Path) -> io::Result<Wd> {
        self.add(path, DIR_MASK)
    }

    fn add(&self, path: &Path, mask: u32) -> io::Result<Wd> {
        let path = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: the descriptor is open while `self` lives; `path` is a NUL-terminated
        // string that outlives the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 { Err(io::Error::last_os_error()) } else { Ok(wd) }
    }

    /// Removes a watch. The kernel has already removed that of a deleted directory
    /// (`EINVAL` then), which is fine: either way it is gone.
    pub fn unwatch(&self, wd: Wd) {
        // SAFETY: plain integers; the descriptor is open while `self` lives.
        unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
    }
}

/// Reads the events of a [`Watcher`]'s instance.
pub(super) struct Events {
    /// Until the first read, which registers it with the runtime.
    reader: Option<File>,
    fd: Option<AsyncFd<File>>,
    buf: Box<[u8]>,
}

impl Events {
    /// Waits for events and appends every one queued to `out`.
    pub async fn read(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        if let Some(reader) = self.reader.take() {
            // SAFETY: the `File` owns its descriptor, open until the `AsyncFd` that owns
            // the `File` drops it; `as_raw_fd` always returns that one.
            self.fd = Some(unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) }?);
        }
        let fd = self.fd.as_ref().expect("registered above");
        let before = out.len();
        while out.len() == before {
            let mut guard = fd.readable().await?;
            loop {
                match guard.get_inner().read(&mut self.buf) {
                    Ok(n) => parse(&self.buf[..n], out),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// `struct inotify_event`: wd (i32), mask, cookie, len (u32), then `len` bytes of name,
/// NUL-padded.
fn parse(mut buf: &[u8], out: &mut Vec<Event>) {
    const HEADER: usize = 16;
    while buf.len() >= HEADER {
        let field = |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        let (wd, mask, len) = (field(0) as i32, field(4), field(12) as usize);
        let Some(name) = buf.get(HEADER..HEADER + len) else { break };
        let name = name.split(|b| *b == 0).next().filter(|n| !n.is_empty());
        out.push(Event { wd, mask, name: name.map(|n| OsStr::from_bytes(n).into()) });
        buf = &buf[HEADER + len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn next(events: &mut Events) -> Vec<Event> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), events.read(&mut out)).await.expect("events").unwrap();
        out
    }

    #[tokio::test]
    async fn reports_entries_by_watch_and_a_deleted_directory_once() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("web");
        std::fs::create_dir(&dir).unwrap();
        let (watcher, mut events) = new().unwrap();
        let root_wd = watcher.watch_root(root.path()).unwrap();
        let dir_wd = watcher.watch_dir(&dir).unwrap();
        assert_ne!(root_wd, dir_wd);
        assert_eq!(watcher.watch_dir(&dir).unwrap(), dir_wd, "same directory, same watch");

        std::fs::write(dir.join("tls.crt"), "x").unwrap();
        let mut seen = next(&mut events).await;
        // Reading a file raises nothing: read it, then make an event to wait for.
        std::fs::read(dir.join("tls.crt")).unwrap();
        std::fs::write(dir.join("tls.key"), "y").unwrap();
        seen.extend(next(&mut events).await);
        assert!(seen.iter().all(|e| e.wd == dir_wd), "{seen:?}");
        assert!(seen.iter().any(|e| e.name.as_deref() == Some(OsStr::new("tls.crt")) && e.entry_appeared()));
        assert!(!seen.iter().any(|e| e.mask & (libc::IN_OPEN | libc::IN_ACCESS | libc::IN_CLOSE_NOWRITE) != 0));

        std::fs::remove_dir_all(&dir).unwrap();
        let mut seen = Vec::new();
        while !seen.iter().any(Event::watch_gone) {
            seen.extend(next(&mut events).await);
        }
        assert!(seen.iter().any(|e| e.wd == root_wd && e.name.as_deref() == Some(OsStr::new("web"))));
        assert!(seen.iter().any(|e| e.wd == dir_wd && e.about_itself()));
        assert!(seen.iter().any(|e| e.wd == dir_wd && e.watch_gone()));
        watcher.unwatch(dir_wd); // already gone: harmless
        assert!(matches!(watcher.watch_dir(&dir), Err(e) if e.kind() == io::ErrorKind::NotFound));
    }

    #[test]
    fn parses_records_with_and_without_names() {
        let mut buf = Vec::new();
        for (wd, mask, name) in [(1i32, libc::IN_CREATE, &b"tls.crt\0\0\0\0\0\0\0\0\0"[..]), (2, libc::IN_IGNORED, b"")]
        {
            buf.extend(wd.to_ne_bytes());
            buf.extend(mask.to_ne_bytes());
            buf.extend(0u32.to_ne_bytes());
            buf.extend((name.len() as u32).to_ne_bytes());
            buf.extend(name);
        }
        let mut out = Vec::new();
        parse(&buf, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].wd, out[0].name.as_deref()), (1, Some(OsStr::new("tls.crt"))));
        assert!(out[1].watch_gone() && out[1].name.is_none());
    }
}
