//! `firma.toml` section parsing and validation (`SidecarConfig::parse`,
//! `AuthorityConfig::parse`: the same strict readers the `firma` binary assembles) on arbitrary
//! text; errors must render (they are printed to operators).
#![no_main]

use firma_authority::config::AuthorityConfig;
use firma_sidecar::config::SidecarConfig;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/firma/firma.toml");
    match AuthorityConfig::parse(text, path) {
        Ok(a) => {
            let _ = (a.socket_addr(), a.public_key_file());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match SidecarConfig::parse(text, path) {
        Ok(s) => {
            let _ = s.mapping.all_paths();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
