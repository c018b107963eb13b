//! The config file: `FileConfig` from any TOML text must parse or be refused without a
//! panic, and `Settings::resolve` must resolve or refuse any file that parses (with a
//! few flags on top), without a panic either.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use certwire::config::{FileConfig, ServeFlags, Settings};
use libfuzzer_sys::fuzz_target;

/// One file per process, rewritten for each input that parses.
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        dir.join(format!("certwire-fuzz-config-{}.toml", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, text)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(text) else { return };
    let Ok(file) = toml::from_str::<FileConfig>(text) else { return };
    let _ = format!("{file:?}");
    std::fs::write(path(), text).expect("writing the config");
    let flags = ServeFlags {
        config: Some(path().clone()),
        kubernetes: flags & 1 != 0,
        dev: flags & 2 != 0,
        insecure_open_sds: flags & 4 != 0,
        all_namespaces: flags & 8 != 0,
        ..Default::default()
    };
    if let Ok(settings) = Settings::resolve(&flags, None) {
        let _ = format!("{settings:?}");
    }
    // Nothing left behind when the fuzzer stops.
    let _ = std::fs::remove_file(path());
});
