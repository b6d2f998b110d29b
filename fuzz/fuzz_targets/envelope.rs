//! Stored-value envelopes must parse or be refused, and opening must never panic or return
//! plaintext for a value that does not authenticate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftkv::crypto::envelope::Envelope;
use raftkv::crypto::{DEFAULT_KEY_USAGE_LIMIT, Keyring, Sealer};
use std::sync::LazyLock;

static SEALER: LazyLock<Sealer> =
    LazyLock::new(|| Sealer::new(Keyring::generate(), None, DEFAULT_KEY_USAGE_LIMIT));

fuzz_target!(|data: &[u8]| {
    let _ = Envelope::parse(data);
    if let Ok(plain) = SEALER.open(b"key", data) {
        // Only plaintext envelopes open without a valid tag.
        assert!(matches!(Envelope::parse(data), Ok(Envelope::Plain(_))), "forged value opened: {plain:?}");
    }
});
