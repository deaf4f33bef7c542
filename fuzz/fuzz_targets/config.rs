//! The launcher's TOML configuration: any text is either a config or an
//! error naming the file, key and problem, never a panic. The module is
//! the launcher's own `config.rs`, compiled into this target.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../bins/intervm/src/config.rs"]
mod config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::Config::parse(text, Path::new("fuzz.toml")) {
        Ok(_) => {}
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("fuzz.toml"),
                "an error that names no file: {msg}"
            );
        }
    }
});
