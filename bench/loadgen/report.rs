//! The coordinator: runs the chosen scenarios in order and prints the markdown report
//! (also written to bench/out/loadgen.md, or loadgen-pinned.md with `--pin`, faults.md
//! for the faults scenario alone, or the name given with `--out`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use crate::Options;
use crate::client::Protocol;
use crate::fanout::Clients;
use crate::mtls::Security;
use crate::pki::Ca;
use crate::server::{Kind, Launcher};
use crate::stats::{median, ms, num, ratio};
use crate::{cold_start, fanout, faults, many_secrets, proc, secrets};

pub fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/out")
}

pub fn main(opts: Options) {
    if opts.pin {
        if !proc::have_taskset() {
            eprintln!("--pin needs taskset (Debian package util-linux)");
            std::process::exit(2);
        }
        if let Err(err) = proc::pin_self(1) {
            eprintln!("{err:#}");
            std::process::exit(2);
        }
    }
    let certwire = opts.certwire.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_certwire")));
    if !certwire.is_file() {
        eprintln!("{} does not exist: run `cargo build --release` first", certwire.display());
        std::process::exit(2);
    }
    let release = certwire.components().any(|c| c.as_os_str() == "release");
    eprintln!("certwire binary: {}{}", certwire.display(), if release { "" } else { " (NOT a release build)" });
    if !release {
        eprintln!("warning: numbers of a debug build are not representative; use `cargo build --release`");
    }
    let logs = crate::util::tempdir();
    let launcher = Launcher { certwire: certwire.clone(), pin: opts.pin, logs: logs.path().to_owned() };

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let started = Instant::now();
    let load_before = proc::loadavg();
    let body = runtime.block_on(run(&launcher, &opts));
    drop(runtime);

    let mut report = String::new();
    let only_mtls = opts.scenarios.iter().all(|s| s.trim().starts_with("mtls"));
    let only_faults = opts.scenarios.iter().all(|s| s.trim() == "faults");
    let title = if only_mtls {
        "certwire over mutual TLS with authorization, against plaintext (bench/loadgen.rs)"
    } else if only_faults {
        "certwire under faults: recovery times (bench/loadgen.rs)"
    } else {
        "certwire load benchmarks (bench/loadgen.rs)"
    };
    let _ = writeln!(report, "# {title}\n");
    let _ = writeln!(report, "- machine: {}", proc::machine());
    let _ = writeln!(report, "- commit: {}", proc::git_commit());
    let _ = writeln!(report, "- command: `{}`", command_line());
    let _ = writeln!(report, "- certwire: {}{}", certwire.display(), if release { " (release)" } else { " (DEBUG)" });
    let _ = writeln!(
        report,
        "- CPUs: {}",
        if opts.pin { "server pinned to CPU 0, clients to CPU 1 (taskset)" } else { "shared, not pinned" }
    );
    let _ = writeln!(
        report,
        "- date: {} UTC, load average before {load_before}, after {}, took {:.0} s\n",
        now_utc(),
        proc::loadavg(),
        started.elapsed().as_secs_f64()
    );
    report.push_str(&body);

    println!("{report}");
    let name = match &opts.out {
        Some(name) => format!("{name}.md"),
        None if opts.pin => "loadgen-pinned.md".into(),
        None if only_faults => "faults.md".into(),
        None => "loadgen.md".into(),
    };
    let out = out_dir().join(name);
    match std::fs::create_dir_all(out_dir()).and_then(|()| std::fs::write(&out, &report)) {
        Ok(()) => eprintln!("wrote {}", out.display()),
        Err(err) => eprintln!("cannot write {}: {err}", out.display()),
    }
}

fn now_utc() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// How this run can be repeated: the cargo command with its arguments and any
/// LOADGEN_* settings from the environment.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let env: Vec<String> =
        std::env::vars().filter(|(k, _)| k.starts_with("LOADGEN_")).map(|(k, v)| format!("{k}={v} ")).collect();
    let mut line = format!("{}cargo bench --bench loadgen", env.concat());
    if !args.is_empty() {
        line.push_str(" -- ");
        line.push_str(&args.join(" "));
    }
    line
}

async fn run(launcher: &Launcher, opts: &Options) -> String {
    let mut out = String::new();
    let mut fanout_rows = Vec::new();
    let mut failures = Vec::new();
    let mut record = |what: String, result: anyhow::Result<fanout::Row>| match result {
        Ok(row) => fanout_rows.push(row),
        Err(err) => {
            eprintln!("{what} failed: {err:#}");
            failures.push(format!("{what}: {err:#}"));
        }
    };
    // Interleaved per size, so drift in the machine's load hits both servers alike.
    for &n in &opts.sizes {
        if opts.wants("fanout") {
            record(
                format!("fan-out certwire SotW N={n}"),
                fanout::run(launcher, opts, Kind::CERTWIRE, Clients::envoy(Protocol::Sotw), Security::Default, n).await,
            );
        }
        let variant = opts.variant_sizes.contains(&n);
        if variant && opts.wants("workers1") {
            record(
                format!("fan-out certwire --workers 1 SotW N={n}"),
                fanout::run(
                    launcher,
                    opts,
                    Kind::Certwire { workers: Some(1) },
                    Clients::envoy(Protocol::Sotw),
                    Security::Default,
                    n,
                )
                .await,
            );
        }
        if variant && opts.wants("nodeonce") {
            let clients = Clients { protocol: Protocol::Sotw, node_every_request: false };
            record(
                format!("fan-out certwire SotW node once N={n}"),
                fanout::run(launcher, opts, Kind::CERTWIRE, clients, Security::Default, n).await,
            );
        }
        if opts.wants("baseline") {
            record(
                format!("fan-out baseline SotW N={n}"),
                fanout::run(launcher, opts, Kind::Naive, Clients::envoy(Protocol::Sotw), Security::Default, n).await,
            );
        }
    }
    if opts.wants("delta") {
        for &n in &opts.delta_sizes {
            record(
                format!("fan-out certwire Delta N={n}"),
                fanout::run(launcher, opts, Kind::CERTWIRE, Clients::envoy(Protocol::Delta), Security::Default, n)
                    .await,
            );
        }
    }
    // Plaintext and mutual TLS back to back at each size, the order reversed every
    // other round, so that drift in the machine's load hits every setup alike.
    let mut mtls_rows = Vec::new();
    for node_every_request in [true, false] {
        if !opts.wants(if node_every_request { "mtls" } else { "mtlsnodeonce" }) {
            continue;
        }
        let clients = Clients { protocol: Protocol::Sotw, node_every_request };
        for &n in &opts.mtls_sizes {
            for round in 0..opts.mtls_rounds.max(1) {
                let mut order = [Security::Plain, Security::MtlsPolicy, Security::MtlsOpen];
                if round % 2 == 1 {
                    order.reverse();
                }
                for security in order {
                    let what = format!("fan-out {} {} N={n} round {round}", security.label(), clients.label());
                    match fanout::run(launcher, opts, Kind::CERTWIRE, clients, security, n).await {
                        Ok(row) => mtls_rows.push((round, row)),
                        Err(err) => {
                            eprintln!("{what} failed: {err:#}");
                            failures.push(format!("{what}: {err:#}"));
                        }
                    }
                }
            }
        }
    }
    if !fanout_rows.is_empty() {
        out.push_str(&fanout_table(&fanout_rows, opts.rotations));
        out.push_str(&ratio_table(&fanout_rows));
    }
    if !mtls_rows.is_empty() {
        out.push_str(&mtls_table(&mtls_rows, opts.rotations));
        out.push_str(&mtls_summary(&mtls_rows));
    }

    if opts.wants("cold") || opts.wants("many") {
        let dir = crate::util::tempdir();
        let root = dir.path().join("secrets");
        std::fs::create_dir_all(&root).expect("create secrets root");
        let ca = Ca::new("loadgen many-secrets CA");
        let set = secrets::create_set(&root, &ca, "s", opts.secrets);
        if opts.wants("cold") {
            match cold_start::run(launcher, opts, &root, &set, &ca).await {
                Ok(row) => out.push_str(&cold_table(&row)),
                Err(err) => {
                    eprintln!("cold start failed: {err:#}");
                    failures.push(format!("cold start: {err:#}"));
                }
            }
        }
        if opts.wants("many") {
            match many_secrets::run(launcher, opts, &root, &set, &ca).await {
                Ok(row) => out.push_str(&many_table(&row)),
                Err(err) => {
                    eprintln!("many secrets failed: {err:#}");
                    failures.push(format!("many secrets: {err:#}"));
                }
            }
        }
    }
    if opts.wants("faults") {
        out.push_str(&faults::run(launcher, opts, &mut failures).await);
    }
    if !failures.is_empty() {
        out.push_str("## Failures\n\n");
        for f in failures {
            // The first lines say what failed; the full log tail went to stderr.
            let short: String = f.lines().take(2).collect::<Vec<_>>().join(" ").chars().take(400).collect();
            let _ = writeln!(out, "- {short}");
        }
        out.push('\n');
    }
    out
}

fn fanout_table(rows: &[fanout::Row], rotations: usize) -> String {
    let rows: Vec<&fanout::Row> = rows.iter().filter(|r| r.security == Security::Default).collect();
    let mut t = String::from("## Fan-out: one rotated secret to N streams, one HTTP/2 connection each\n\n");
    let _ = writeln!(
        t,
        "Medians over {rotations} rotations (after one warm-up). Latencies are per stream, from the server \
         noticing the change (certwire: `detected_unix_us` in /status/secrets; baseline: start of its reload) \
         to the client decoding the response; \"from rename\" starts right before the `..data` rename. \
         CPU: server user+system time from before the swap to 100 ms after the last stream has it, divided \
         by N (the clients' CPU: all worker processes, same window). RSS: VmRSS with N idle streams minus \
         before connecting, divided by N, once connected and again 1 s after the last rotation (buffers \
         that traffic touched then count too).\n"
    );
    let _ = writeln!(
        t,
        "Every simulated proxy sends a node as big as Envoy 1.40's ({} extensions, {} bytes) and ACKs every \
         response with it, as Envoy does by default; \"node once\" sends it with the first request only, as \
         with `set_node_on_first_message_only: true` (what `certwire bootstrap` writes).\n",
        crate::node::ENVOY_EXTENSIONS,
        crate::node::envoy_like("loadgen-proxy-0").len()
    );
    t.push_str(
        "| server | protocol | streams | last, from detected (ms) | last, from rename (ms) | p50 (ms) | p99 (ms) \
         | server CPU per stream per rotation (µs) | clients' CPU per stream (µs) | server RSS per idle stream (KiB) \
         | same, after the rotations (KiB) | connect (s) | missing |\n",
    );
    t.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.kind.label(),
            Clients { protocol: r.protocol, node_every_request: r.node_every_request }.label(),
            r.streams,
            ms(r.last_from_detect),
            ms(r.last_from_change),
            ms(r.p50),
            ms(r.p99),
            num(r.cpu_per_stream, 1),
            num(r.client_cpu_per_stream, 1),
            num(r.rss_per_stream, 1),
            num(r.rss_after_per_stream, 1),
            num(r.connect_s, 1),
            r.missing
        );
    }
    t.push('\n');
    t
}

fn ratio_table(rows: &[fanout::Row]) -> String {
    let pairs: Vec<(&fanout::Row, &fanout::Row)> = rows
        .iter()
        .filter(|r| r.kind.is_certwire() && r.protocol == Protocol::Sotw && r.node_every_request)
        .filter_map(|c| {
            rows.iter()
                .find(|b| {
                    b.kind == Kind::Naive
                        && b.protocol == Protocol::Sotw
                        && b.node_every_request
                        && b.streams == c.streams
                })
                .map(|b| (c, b))
        })
        .collect();
    if pairs.is_empty() {
        return String::new();
    }
    let mut t = String::from("## certwire / plain tonic server (same run, SotW; below 1 means certwire is better)\n\n");
    t.push_str(
        "| server | streams | last stream, from rename | p99, from detected | CPU per stream | RSS per idle stream |\n",
    );
    t.push_str("|---|---:|---:|---:|---:|---:|\n");
    for (c, b) in pairs {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} |",
            c.kind.label(),
            c.streams,
            ratio(c.last_from_change, b.last_from_change),
            ratio(c.p99, b.p99),
            ratio(c.cpu_per_stream, b.cpu_per_stream),
            ratio(c.rss_per_stream, b.rss_per_stream)
        );
    }
    t.push('\n');
    t
}

fn mtls_table(rows: &[(usize, fanout::Row)], rotations: usize) -> String {
    let mut t =
        String::from("## Fan-out over mutual TLS with per-name authorization, against plaintext: every run\n\n");
    let _ = writeln!(
        t,
        "certwire three ways, one after the other at each size (the order reversed every other round), the \
         same clients and secret: plaintext with `--authz open`; mutual TLS (`--tls-cert --tls-key \
         --tls-client-ca`) with `--authz policy` and two `[[authz.rules]]` (a deny rule for another identity \
         first, then `spiffe://loadgen.bench/ns/loadgen/sa/proxy-*` may read `web`), so every subscription is \
         decided by the rules; and the same mutual TLS with `--authz open`, which tells TLS from \
         authorization. Every simulated proxy is its own TCP connection with a client certificate of its own \
         (ECDSA P-256, its only URI SAN `spiffe://loadgen.bench/ns/loadgen/sa/proxy-N`), a full handshake \
         (no session resumption), ALPN h2, offering what Envoy offers its SDS cluster by default (at most \
         TLS 1.2, ECDHE-ECDSA-AES128-GCM first, X25519) unless `--tls-version 1.3`: the negotiated \
         parameters are below the table. Fan-out columns as in the fan-out table (medians over {rotations} \
         rotations after one warm-up). Setup: from telling the workers (already holding their keys and \
         certificates) to connect until every stream has its first response: TCP connect, TLS handshake, \
         HTTP/2, the first request with the node, authorization, the first response; 64 connections in \
         flight per worker process. The clients run on the same two cores and their TLS costs CPU there \
         too: their columns are every worker process's CPU in the same windows.\n"
    );
    t.push_str(
        "| listener | node | streams | round | last, from detected (ms) | p50 (ms) | p99 (ms) | server CPU per \
         stream per rotation (µs) | clients' CPU per stream per rotation (µs) | server RSS per idle stream (KiB) | \
         same, after the rotations (KiB) | setup (s) | connections/s | server CPU per connection setup (µs) | \
         clients' CPU per connection setup (µs) | missing |\n",
    );
    t.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (round, r) in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.security.label(),
            if r.node_every_request { "every request" } else { "once" },
            r.streams,
            round + 1,
            ms(r.last_from_detect),
            ms(r.p50),
            ms(r.p99),
            num(r.cpu_per_stream, 1),
            num(r.client_cpu_per_stream, 1),
            num(r.rss_per_stream, 1),
            num(r.rss_after_per_stream, 1),
            num(r.setup_s, 2),
            num(r.streams as f64 / r.setup_s, 0),
            num(r.setup_server_cpu_per_conn, 0),
            num(r.setup_client_cpu_per_conn, 0),
            r.missing
        );
    }
    t.push('\n');
    let mut negotiated: Vec<&str> = rows.iter().filter_map(|(_, r)| r.tls.as_deref()).collect();
    negotiated.dedup();
    if !negotiated.is_empty() {
        let _ = writeln!(t, "- negotiated: {}", negotiated.join("; "));
    }
    for (round, r) in rows {
        if let Some(check) = &r.authz_check {
            let node = if r.node_every_request { "" } else { ", node once" };
            let _ = writeln!(t, "- authorization, N={}{node}, round {}: {check}", r.streams, round + 1);
        }
    }
    t.push('\n');
    t
}

/// One setup's figures at one (node, size): medians over its rounds.
struct MtlsMedians {
    last: f64,
    cpu: f64,
    client_cpu: f64,
    rss: f64,
    setup_s: f64,
    conns_per_s: f64,
    setup_cpu: f64,
    setup_client_cpu: f64,
    rounds: usize,
}

impl MtlsMedians {
    fn of(rows: &[&fanout::Row]) -> Option<MtlsMedians> {
        if rows.is_empty() {
            return None;
        }
        let m = |f: fn(&fanout::Row) -> f64| median(rows.iter().map(|r| f(r)));
        Some(MtlsMedians {
            last: m(|r| r.last_from_detect),
            cpu: m(|r| r.cpu_per_stream),
            client_cpu: m(|r| r.client_cpu_per_stream),
            rss: m(|r| r.rss_per_stream),
            setup_s: m(|r| r.setup_s),
            conns_per_s: m(|r| r.streams as f64 / r.setup_s),
            setup_cpu: m(|r| r.setup_server_cpu_per_conn),
            setup_client_cpu: m(|r| r.setup_client_cpu_per_conn),
            rounds: rows.len(),
        })
    }
}

/// Medians over the rounds per setup, then their ratios: the answer to "what do mTLS
/// and authorization cost".
fn mtls_summary(rows: &[(usize, fanout::Row)]) -> String {
    // Every (node, size) once, in the order they ran.
    let mut groups: Vec<(bool, usize)> = Vec::new();
    for (_, r) in rows {
        if !groups.contains(&(r.node_every_request, r.streams)) {
            groups.push((r.node_every_request, r.streams));
        }
    }
    let setups = [Security::Plain, Security::MtlsPolicy, Security::MtlsOpen];
    let node_label = |every: bool| if every { "every request" } else { "once" };
    let mut medians = String::new();
    let mut ratios = String::new();
    for (every, streams) in groups {
        let of = |security: Security| {
            let runs: Vec<&fanout::Row> = rows
                .iter()
                .map(|(_, r)| r)
                .filter(|r| r.security == security && r.node_every_request == every && r.streams == streams)
                .collect();
            MtlsMedians::of(&runs)
        };
        let found: Vec<(Security, Option<MtlsMedians>)> = setups.iter().map(|&s| (s, of(s))).collect();
        for (security, m) in &found {
            let Some(m) = m else { continue };
            let _ = writeln!(
                medians,
                "| {} | {} | {streams} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                security.label(),
                node_label(every),
                m.rounds,
                ms(m.last),
                num(m.cpu, 1),
                num(m.client_cpu, 1),
                num(m.rss, 1),
                num(m.setup_s, 2),
                num(m.conns_per_s, 0),
                num(m.setup_cpu, 0),
                num(m.setup_client_cpu, 0)
            );
        }
        let get = |s: Security| found.iter().find(|(x, _)| *x == s).and_then(|(_, m)| m.as_ref());
        let pairs = [
            (Security::MtlsPolicy, Security::Plain, "mTLS policy / plaintext"),
            (Security::MtlsOpen, Security::Plain, "mTLS open / plaintext"),
            (Security::MtlsPolicy, Security::MtlsOpen, "mTLS policy / mTLS open"),
        ];
        for (sa, sb, label) in pairs {
            let (Some(a), Some(b)) = (get(sa), get(sb)) else { continue };
            // The handshake's cost: only against plaintext.
            let diff = |x: f64, y: f64| if sb == Security::Plain { num(x - y, 0) } else { String::new() };
            let _ = writeln!(
                ratios,
                "| {label} | {} | {streams} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                node_label(every),
                ratio(a.last, b.last),
                ratio(a.cpu, b.cpu),
                ratio(a.client_cpu, b.client_cpu),
                ratio(a.rss, b.rss),
                ratio(a.setup_s, b.setup_s),
                ratio(a.conns_per_s, b.conns_per_s),
                ratio(a.setup_cpu, b.setup_cpu),
                diff(a.setup_cpu, b.setup_cpu),
                diff(a.setup_client_cpu, b.setup_client_cpu),
            );
        }
    }
    if medians.is_empty() {
        return String::new();
    }
    let mut t = String::from("## mTLS and authorization against plaintext: medians over the rounds\n\n");
    t.push_str(
        "| listener | node | streams | rounds | last, from detected (ms) | server CPU per stream per rotation (µs) \
         | clients' CPU per stream per rotation (µs) | server RSS per idle stream (KiB) | setup (s) | \
         connections/s | server CPU per connection setup (µs) | clients' CPU per connection setup (µs) |\n",
    );
    t.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    t.push_str(&medians);
    t.push('\n');
    if !ratios.is_empty() {
        t.push_str(
            "Ratios of those medians (below 1: the first is better). mTLS policy / mTLS open is what \
             authorization itself costs; mTLS open / plaintext is TLS. Handshake: server CPU per connection \
             setup, mTLS minus plaintext (µs), and the same for the clients: what a TLS handshake adds to a \
             connection, with the encryption of the setup's own traffic (the first request carries the 61 KB \
             node).\n\n",
        );
        t.push_str(
            "| ratio | node | streams | last, from detected | server CPU per stream per rotation | clients' CPU \
             per stream per rotation | server RSS per idle stream | setup time | connections/s | server CPU per \
             connection setup | handshake: server CPU (µs) | handshake: clients' CPU (µs) |\n",
        );
        t.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        t.push_str(&ratios);
        t.push('\n');
    }
    t
}

fn many_table(r: &many_secrets::Row) -> String {
    let mut t = String::from("## Many secrets: a batch of secrets rotated at once\n\n");
    let _ = writeln!(
        t,
        "certwire with {} file secrets; {} proxies (connections) × {} streams, one secret each; {} secrets \
         swapped back to back (`..data` renames, new generations written just before). Medians over {} rounds. \
         Latency per affected stream from the first rename, and from certwire noticing that stream's own \
         secret. RSS per idle stream as in the fan-out, here with the streams of a proxy on one connection, as \
         an Envoy opens them.\n",
        r.secrets,
        r.proxies,
        r.streams / r.proxies.max(1),
        r.rotated,
        r.rounds
    );
    t.push_str(
        "| secrets | streams | rotated | affected streams | last, from first rename (ms) | p50 / p99 from first \
         rename (ms) | p50 / p99 from own detected (ms) | last change noticed, from first rename (ms) | server CPU \
         per round (ms) | server RSS per idle stream (KiB) | missing |\n",
    );
    t.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let _ = writeln!(
        t,
        "| {} | {} | {} | {} | {} | {} / {} | {} / {} | {} | {} | {} | {} |\n",
        r.secrets,
        r.streams,
        r.rotated,
        r.affected,
        ms(r.last_from_first_change),
        ms(r.p50_from_first_change),
        ms(r.p99_from_first_change),
        ms(r.p50_from_detect),
        ms(r.p99_from_detect),
        ms(r.last_detected),
        num(r.cpu_ms_per_round, 1),
        num(r.rss_per_stream, 1),
        r.missing
    );
    t
}

fn cold_table(r: &cold_start::Row) -> String {
    let mut t = String::from("## Cold start\n\n");
    let _ = writeln!(
        t,
        "From spawning `certwire serve --files ROOT` ({} kubelet-layout secret directories, page cache warm) \
         until /readyz answers 200, and until /status/secrets lists every secret with a version (polled every \
         20 ms, so up to that much late); medians of {} runs. RSS on separate runs, 1 s after ready. \
         \"Per secret, marginal\" is the slope between {} and {} secrets (what one more secret costs); \
         \"vs none\" divides the difference to certwire with an empty files directory, so it also spreads \
         once-only costs (code paged in by the first load) over the secrets.\n",
        r.secrets, r.runs, r.small_secrets, r.secrets
    );
    t.push_str(
        "| secrets | spawn → /readyz 200 (ms) | spawn → all listed (ms) | RSS (MiB) | RSS, {small} secrets (MiB) | \
         RSS, no secrets (MiB) | per secret, marginal (KiB) | per secret vs none (KiB) | PEM per secret (KiB) | \
         marginal / PEM | vs none / PEM |\n"
            .replace("{small}", &r.small_secrets.to_string())
            .as_str(),
    );
    t.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let pem_kib = r.pem_bytes_per_secret / 1024.0;
    let _ = writeln!(
        t,
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        r.secrets,
        num(r.ready_ms, 0),
        num(r.all_listed_ms, 0),
        num(r.rss_kib as f64 / 1024.0, 1),
        num(r.rss_small_kib as f64 / 1024.0, 1),
        num(r.rss_empty_kib as f64 / 1024.0, 1),
        num(r.marginal_per_secret_kib(), 2),
        num(r.rss_per_secret_kib(), 2),
        num(pem_kib, 2),
        ratio(r.marginal_per_secret_kib(), pem_kib),
        ratio(r.rss_per_secret_kib(), pem_kib)
    );
    t
}
