//! Limits and framing: export names up to 4096 bytes, oversized options and names,
//! unknown client flags, bad option magic, and nothing done before a whole option arrived.

use strata::proto::{ProtocolError, TlsPolicy};

use crate::support::codec::*;
use crate::support::spec::*;
use crate::support::wire::*;

use super::{find_info, successful_info};

#[test]
fn export_names_up_to_4096_bytes() {
    let longest = "x".repeat(4096);
    let too_long = "x".repeat(4097);

    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let replies = d.option(OPT_INFO, &info_data(&longest, &[INFO_NAME]));
    let infos = successful_info(&replies, OPT_INFO);
    assert_eq!(find_info(&infos, INFO_NAME).unwrap().data.len(), 2 + 4096);
    for option in [OPT_INFO, OPT_GO] {
        d.expect_error(option, &info_data(&too_long, &[]), REP_ERR_INVALID);
    }
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    for option in [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT] {
        d.expect_single(option, &meta_data(&too_long, &[]), REP_ERR_INVALID);
    }
    let n = d.go(&longest);
    assert_eq!(n.export.name.len(), 4096);

    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let n = done(d.feed(&opt(OPT_EXPORT_NAME, longest.as_bytes())));
    assert_eq!(n.export.name, longest);

    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    assert!(matches!(
        d.feed(&opt(OPT_EXPORT_NAME, too_long.as_bytes())),
        Outcome::Err(ProtocolError::BadOption(_))
    ));
}

#[test]
fn oversized_option_is_skipped_and_refused() {
    let mut d = Driver::limited(TlsPolicy::Disabled, 64);

    // An INFO with 1000 bytes of data, arriving in pieces.
    let big = opt(OPT_INFO, &[0x55; 1000]);
    for piece in big.chunks(97) {
        assert_eq!(d.feed(piece), Outcome::NeedInput);
        if d.sent.len() > d.seen {
            break;
        }
    }
    let replies = d.take_replies();
    assert_eq!(replies.len(), 1);
    assert_error_reply(&replies[0], OPT_INFO, REP_ERR_TOO_BIG);
    assert!(d.input.is_empty(), "all 1000 bytes skipped");

    // Exactly max_option_len is fine, and negotiation goes on.
    let mut data = info_data("disk", &[]);
    data.resize(64, 0);
    d.expect_single(OPT_INFO, &data, REP_ERR_INVALID); // well-framed, but bad counts
    let n = d.go("disk");
    assert_eq!(n.export.name, "disk");
}

#[test]
fn oversized_option_refused_only_after_all_its_bytes() {
    let mut d = Driver::limited(TlsPolicy::Disabled, 8);
    let big = opt(0x42, &[0; 100]);
    assert_eq!(d.feed(&big[..big.len() - 1]), Outcome::NeedInput);
    assert!(
        d.take_sent().is_empty(),
        "no reply before the option is consumed"
    );
    // The last byte and the next option together.
    let mut rest = big[big.len() - 1..].to_vec();
    rest.extend_from_slice(&opt(OPT_LIST, &[]));
    assert_eq!(d.feed(&rest), Outcome::NeedInput);
    let replies = d.take_replies();
    assert_eq!(replies[0].ty, REP_ERR_TOO_BIG);
    assert_eq!(replies.last().unwrap().ty, REP_ACK);
    assert_eq!(replies.len(), 4);
}

#[test]
fn oversized_export_name_ends_the_session() {
    let mut d = Driver::limited(TlsPolicy::Disabled, 8);
    assert_eq!(
        d.feed(&opt(OPT_EXPORT_NAME, &[b'x'; 9])[..16]),
        Outcome::Err(ProtocolError::OptionTooLarge(9))
    );
}

#[test]
fn unknown_client_flags_are_an_error() {
    for flags in [4u32, 1 << 31, 0xffff_ffff, 7] {
        let mut d = Driver::with_tls(TlsPolicy::Disabled);
        assert_eq!(
            d.feed(&flags.to_be_bytes()),
            Outcome::Err(ProtocolError::BadClientFlags(flags))
        );
    }
}

#[test]
fn bad_option_magic_is_an_error() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let mut bytes = opt(OPT_LIST, &[]);
    bytes[0] = b'X';
    assert!(matches!(
        d.feed(&bytes),
        Outcome::Err(ProtocolError::BadOptionMagic(_))
    ));
}

#[test]
fn nothing_happens_until_a_whole_option_arrived() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let bytes = opt(OPT_GO, &info_data("disk", &[INFO_BLOCK_SIZE]));
    for b in &bytes[..bytes.len() - 1] {
        assert_eq!(d.feed(&[*b]), Outcome::NeedInput);
        assert!(d.take_sent().is_empty());
    }
    done(d.feed(&bytes[bytes.len() - 1..]));
}
