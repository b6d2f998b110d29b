//! Token parsing and verification must refuse, never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftkv::auth::jwt::{JwtConfig, TokenVerifier, header_alg};
use std::sync::LazyLock;

static VERIFIER: LazyLock<TokenVerifier> = LazyLock::new(|| {
    let path = std::env::temp_dir().join("raftkv-fuzz-secret");
    std::fs::write(&path, "fuzz-secret-0123456789abcdef0123456789").expect("write secret");
    TokenVerifier::new(&JwtConfig {
        hs256_secret_file: Some(path),
        leeway_seconds: 5,
        ..Default::default()
    })
    .expect("verifier")
});

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = header_alg(s);
        let _ = VERIFIER.verify(s);
    }
});
