//! Real ACME test components: knot as the authoritative DNS of a test zone on
//! 127.0.0.1:53 (RFC 2136 updates signed with TSIG) and acme2certifier as the CA,
//! plus a reference ACME client (certbot's `acme` library) that is not certwire.
//!
//! `tests/run.sh` (`install_acme_deps`) installs them: Debian `knot` and
//! `bind9-dnsutils`, and acme2certifier into `.tools/acme-venv`.
//!
//! How acme2certifier validates, for the responders certwire will run:
//! - it resolves every name through `dns_server_list` = knot, whose zone has
//!   `* A 127.0.0.1`, so any name under [`dns::ZONE`] points at loopback;
//! - http-01: `GET http://NAME:80/.well-known/acme-challenge/TOKEN` (the port is
//!   fixed in acme2certifier);
//! - tls-alpn-01: a TLS handshake to NAME:443 (fixed too) with ALPN `acme-tls/1`;
//! - dns-01: TXT `_acme-challenge.NAME` asked of knot directly (no cache), and for
//!   a wildcard `*.NAME` it offers dns-01 only.
//!
//! Ports 53 (and 80/443 for the responders) need root and are machine-wide: every
//! test using these fixtures belongs to nextest's `acme` group (one at a time).

pub mod ca;
pub mod client;
pub mod dns;
pub mod process;

use std::path::{Path, PathBuf};

/// The Python of acme2certifier's venv: `$CERTWIRE_ACME_PYTHON`, else the one
/// `tests/run.sh` installs into `.tools/acme-venv`.
pub fn venv_python() -> PathBuf {
    let path = match std::env::var_os("CERTWIRE_ACME_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/acme-venv/bin/python"),
    };
    assert!(
        path.is_file(),
        "no acme2certifier venv at {}: run `bash tests/run.sh` once (install_acme_deps), \
         or set CERTWIRE_ACME_PYTHON to a Python with acme2certifier installed",
        path.display()
    );
    path
}

/// A file shipped beside this module (the Python helpers).
pub fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/acme").join(name)
}

/// The path of a Debian tool (`knotd`, `dig`, ...): from PATH, else the sbin/bin
/// folders where Debian puts them (a CI environment may leave sbin off PATH).
/// Panics with the install hint when it is missing, instead of a bare "No such
/// file or directory" from spawn.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: run `bash tests/run.sh` once (install_acme_deps \
                 installs knot and bind9-dnsutils)"
            )
        })
}
