//! Properties: however the input is split, the machine sends the same bytes and ends the
//! same way; plaintext pipelined behind `STARTTLS` is refused.

use proptest::prelude::*;
use strata::proto::consts::transmission_flags as tf;
use strata::proto::{HandshakeConfig, ProtocolError, TlsPolicy};

use crate::support::codec::*;
use crate::support::spec::*;
use crate::support::wire::*;

/// A menu of client messages: valid options, refused options and malformed ones.
fn message(i: usize) -> Vec<u8> {
    match i % 20 {
        0 => opt(OPT_LIST, &[]),
        1 => opt(OPT_LIST, b"junk"),
        2 => opt(OPT_INFO, &info_data("disk", &[INFO_BLOCK_SIZE, INFO_NAME])),
        3 => opt(OPT_INFO, &info_data("nope", &[])),
        4 => opt(OPT_STRUCTURED_REPLY, &[]),
        5 => opt(OPT_EXTENDED_HEADERS, &[]),
        6 => opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[])),
        7 => opt(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        ),
        8 => opt(OPT_SET_META_CONTEXT, &meta_data("ro", &["base:"])),
        9 => opt(OPT_STARTTLS, &[]),
        10 => opt(0x77, &[1, 2, 3]),
        11 => opt(OPT_INFO, &[0xaa; 200]), // over the 128-byte limit used below
        12 => opt(OPT_INFO, &hex("00000010 00")),
        13 => opt(OPT_GO, &info_data("nope", &[])),
        14 => opt(OPT_GO, &info_data("disk", &[INFO_BLOCK_SIZE])),
        15 => opt(OPT_GO, &info_data("ro", &[])),
        16 => opt(OPT_EXPORT_NAME, b"disk"),
        17 => opt(OPT_EXPORT_NAME, b"nope"),
        18 => opt(OPT_ABORT, &[]),
        _ => b"IHAVEOPX\0\0\0\x03\0\0\0\0".to_vec(),
    }
}

fn policy(i: u8) -> TlsPolicy {
    match i % 3 {
        0 => TlsPolicy::Disabled,
        1 => TlsPolicy::Allowed,
        _ => TlsPolicy::Required,
    }
}

/// Feeds `bytes` in the given pieces; returns everything sent, the final outcome, and the
/// input left unconsumed (in the machine's buffer or never fed).
fn run_pieces(tls: TlsPolicy, bytes: &[u8], cuts: &[usize]) -> (Vec<u8>, Outcome, Vec<u8>) {
    let mut d = Driver::new(HandshakeConfig {
        tls,
        max_option_len: 128,
    });
    d.auto_tls = true;
    let mut start = 0;
    let mut outcome = Outcome::NeedInput;
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
    bounds.sort_unstable();
    bounds.push(bytes.len());
    for end in bounds {
        if end < start {
            continue;
        }
        outcome = d.feed(&bytes[start..end]);
        start = end;
        if outcome != Outcome::NeedInput {
            break;
        }
    }
    let mut left = d.input.to_vec();
    left.extend_from_slice(&bytes[start..]);
    (d.sent, outcome, left)
}

proptest! {
    #![proptest_config(crate::support::proptest_cases(256))]

    /// However the input is split, the machine sends the same bytes and ends the same way.
    #[test]
    fn split_input_gives_the_same_result(
        tls in any::<u8>(),
        client_flags in prop_oneof![Just(0u32), Just(1), Just(3)],
        script in prop::collection::vec(0usize..20, 0..10),
        cuts in prop::collection::vec(0usize..2000, 0..12),
    ) {
        let tls = policy(tls);
        let mut bytes = client_flags.to_be_bytes().to_vec();
        for i in script {
            bytes.extend_from_slice(&message(i));
        }
        let singles: Vec<usize> = (1..bytes.len()).collect();
        let one_by_one = run_pieces(tls, &bytes, &singles);
        for run in [run_pieces(tls, &bytes, &[]), run_pieces(tls, &bytes, &cuts)] {
            if run.1 == Outcome::Err(ProtocolError::DataAfterStartTls) {
                // Data that arrived in the same piece as an accepted STARTTLS is refused;
                // up to that point the conversation is the same.
                prop_assert!(one_by_one.0.starts_with(&run.0));
            } else {
                prop_assert_eq!(&run, &one_by_one);
            }
        }
    }

    /// Arbitrary input never panics, and a session that ends in transmission under
    /// `TlsPolicy::Required` has always upgraded first.
    #[test]
    fn garbage_never_panics(
        tls in any::<u8>(),
        max_option_len in prop_oneof![Just(0u32), 0u32..64, Just(65536)],
        prefix in any::<bool>(),
        options in prop::collection::vec((0u32..14, prop::collection::vec(any::<u8>(), 0..48), any::<Option<u32>>()), 0..8),
        raw in prop::collection::vec(any::<u8>(), 0..64),
        cuts in prop::collection::vec(0usize..600, 0..8),
    ) {
        let tls = policy(tls);
        let mut bytes = Vec::new();
        if prefix {
            bytes.extend_from_slice(&1u32.to_be_bytes());
        }
        for (option, data, bad_len) in options {
            let mut m = opt(option, &data);
            if let Some(len) = bad_len {
                m[12..16].copy_from_slice(&(len % 64).to_be_bytes());
            }
            bytes.extend_from_slice(&m);
        }
        bytes.extend_from_slice(&raw);

        let mut d = Driver::new(HandshakeConfig { tls, max_option_len });
        d.auto_tls = true;
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
        bounds.sort_unstable();
        bounds.push(bytes.len());
        let mut start = 0;
        for end in bounds {
            match d.feed(&bytes[start..end]) {
                Outcome::NeedInput => start = end,
                Outcome::Done(n) => {
                    prop_assert!(tls != TlsPolicy::Required || d.hs.tls_active());
                    prop_assert_ne!(n.flags & tf::HAS_FLAGS, 0);
                    prop_assert!(!n.extended || n.structured);
                    prop_assert!(n.contexts.is_empty() || n.structured);
                    prop_assert_eq!(n.flags & tf::SEND_DF != 0, n.structured);
                    break;
                }
                _ => break,
            }
        }
    }
}

#[test]
fn plaintext_pipelined_behind_starttls_is_refused() {
    let mut d = Driver::started(TlsPolicy::Allowed, C_FIXED);
    let mut both = opt(OPT_STARTTLS, &[]);
    both.extend_from_slice(&opt(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(
        d.feed(&both),
        Outcome::Err(ProtocolError::DataAfterStartTls),
        "options sent in plaintext must not be replayed inside TLS"
    );
}
