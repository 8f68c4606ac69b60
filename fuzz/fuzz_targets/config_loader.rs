//! Fuzz target: the config loader (`Config::from_toml`, what `--config`, `--check-config`
//! and every reload go through).
//!
//! Properties checked, beyond "no panic":
//! - whatever loads is valid;
//! - what `--check-config` prints (`to_toml`) loads back to the same config;
//! - applying it as a live reload over the defaults gives a valid running config.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use stormwall::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    let Ok(config) = Config::from_toml(text, path) else {
        return;
    };
    config.validate().expect("a loaded config is valid");
    let rendered = config.to_toml();
    let back = Config::from_toml(&rendered, path)
        .unwrap_or_else(|e| panic!("rendered config does not load: {e}\n{rendered}"));
    // The deprecated key is accepted but not written back.
    let mut expected = config.clone();
    expected.limits.max_reply_depth = None;
    assert_eq!(
        back, expected,
        "rendered config loads differently:\n{rendered}"
    );
    let running = Config::default();
    let _ = running.restart_only_changes(&config);
    running
        .with_live_changes_from(&config)
        .validate()
        .expect("a reload leaves a valid running config");
});
