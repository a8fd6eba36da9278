//! Feeds arbitrary bytes to the reader of client certificate names (subject CN, DNS and
//! URI alternative names), which access rules match against.
//!
//! Checks: no panic, whatever the input; every name read is non-empty and free of
//! control characters, and the identity prints.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strata::access::ClientIdentity;

fuzz_target!(|data: &[u8]| {
    if let Ok(identity) = ClientIdentity::from_der(data) {
        let names = identity
            .common_name
            .iter()
            .chain(&identity.dns_names)
            .chain(&identity.uris);
        for name in names {
            assert!(!name.is_empty());
            assert!(!name.chars().any(char::is_control), "{name:?}");
        }
        let _ = identity.to_string();
    }
});
