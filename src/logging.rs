//! Structured logs: one line per event, text or JSON, to stderr. `RUST_LOG` filters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

pub fn init(format: LogFormat) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // notify warns, with an absolute path, when it drops the watch of a directory that
    // was deleted, the normal end of a file secret; the file source logs what matters
    // (removals, watches it could not add) itself. Shown when RUST_LOG names notify.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("notify")) {
        filter = filter.add_directive("notify=error".parse().expect("a valid directive"));
    }
    use std::io::IsTerminal;
    // Colour codes only help a human at a terminal; in files and collectors they are noise.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let lines = match format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).boxed(),
        LogFormat::Json => {
            fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(std::io::stderr).boxed()
        }
    };
    let refused = RefusedByH2::default().with_filter(Targets::new().with_target("h2::server", tracing::Level::DEBUG));
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = tracing_subscriber::registry().with(lines.with_filter(filter)).with(refused).try_init();
}

/// h2 refuses a request whose headers it cannot parse with RST_STREAM(PROTOCOL_ERROR)
/// and says why only at debug level, in its own log. The gRPC clients other than Envoy
/// and grpc-go meet this over a Unix socket (they send a percent-encoded `:authority`,
/// hyperium/h2#487): said here at warn, with the way out, at most once a minute.
#[derive(Default)]
struct RefusedByH2 {
    last_unix_s: AtomicU64,
}

/// Seconds between two such warnings: a peer must not be able to flood the log.
const REFUSED_EVERY_S: u64 = 60;

impl<S: tracing::Subscriber> Layer<S> for RefusedByH2 {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        if !message.0.starts_with("malformed headers") {
            return;
        }
        let now = u64::try_from(crate::unix_time::secs(SystemTime::now())).unwrap_or(0);
        let last = self.last_unix_s.load(Ordering::Relaxed);
        if now < last + REFUSED_EVERY_S
            || self.last_unix_s.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let reason = crate::xds::limits::truncate(&message.0, 256);
        tracing::warn!(
            target: "certwire::xds",
            %reason,
            "an SDS request was refused by HTTP/2 before certwire saw it (stream reset, PROTOCOL_ERROR). \
             gRPC clients other than Envoy and grpc-go send a percent-encoded :authority over a Unix \
             socket, which HTTP/2 servers refuse: set the client's authority (gRPC C-core and grpcio: \
             channel option grpc.default_authority=localhost; grpc-java: overrideAuthority(\"localhost\")). \
             Said at most once a minute"
        );
    }
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }
}
