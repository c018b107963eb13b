//! The openssl CLI as the tests' independent TLS and OCSP tool: a command run to
//! completion in a directory, and one `s_client -status` handshake.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Runs `openssl ARGS` in `dir`; panics with its output unless it succeeds.
pub fn run(dir: &Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What `openssl s_client -status` prints for one handshake with `addr` (the OCSP
/// response the server stapled, if any), or why there is nothing.
pub async fn s_client_status(addr: SocketAddr, sni: &str) -> String {
    let child = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-servername", sni, "-status"])
        // End of input: s_client closes once the handshake is done.
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run openssl s_client");
    match tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await {
        Ok(Ok(output)) => String::from_utf8_lossy(&output.stdout).into_owned(),
        Ok(Err(err)) => format!("(s_client failed: {err})"),
        Err(_) => "(s_client timed out)".into(),
    }
}
