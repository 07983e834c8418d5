//! `firma.toml` parsing and validation (`firma_common::config::FirmaConfig::parse`) on
//! arbitrary text; errors must render (they are printed to operators).
#![no_main]

use firma_common::config::FirmaConfig;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match FirmaConfig::parse(text, Path::new("/etc/firma/firma.toml")) {
        Ok(cfg) => {
            let _ = cfg
                .authority()
                .map(|a| (a.socket_addr(), a.public_key_file()));
            let _ = cfg.sidecar().map(|s| s.mapping.all_paths());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
