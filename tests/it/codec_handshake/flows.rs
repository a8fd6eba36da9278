//! Main flows: the option sequences real clients use.

use strata::proto::consts::transmission_flags as tf;
use strata::proto::{ProtocolError, TlsPolicy};

use crate::support::codec::*;
use crate::support::spec::*;
use crate::support::wire::*;

use super::{
    base_allocation, find_info, info_block_size, info_export, meta_reply, successful_info,
};

#[test]
fn full_go_flow() {
    let mut d = Driver::structured(C_FIXED_NO_ZEROES);
    let replies = d.set_meta("disk", &["base:allocation"]);
    assert_eq!(replies.len(), 2);
    assert_eq!(meta_reply(&replies[0]), (1, "base:allocation".into()));
    assert_eq!(replies[1].ty, REP_ACK);

    // A transmission request pipelined right behind GO must be left in the input.
    let mut bytes = opt(OPT_GO, &info_data("disk", &[INFO_BLOCK_SIZE]));
    bytes.extend_from_slice(&hex(
        "25609513 0000 0000 0000000000000001 0000000000000000 00000200",
    ));
    let n = done(d.feed(&bytes));
    assert_eq!(d.input.len(), 28, "pipelined request untouched");

    let infos = successful_info(&d.take_replies(), OPT_GO);
    let expected_flags = DISK_FLAGS | tf::SEND_DF;
    assert_eq!(
        info_export(find_info(&infos, INFO_EXPORT).unwrap()),
        (DISK_SIZE, expected_flags)
    );
    assert_eq!(
        info_block_size(find_info(&infos, INFO_BLOCK_SIZE).unwrap()),
        (1, 4096, 32 << 20)
    );
    assert_eq!(n.export.name, "disk");
    assert_eq!(n.flags, expected_flags);
    assert!(n.structured);
    assert!(!n.extended);
    assert_eq!(n.contexts, vec![base_allocation(1)]);

    // The handshake is over.
    assert_eq!(d.feed(&[]), Outcome::Err(ProtocolError::HandshakeFinished));
}

#[test]
fn go_with_extended_headers() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_EXTENDED_HEADERS, &[], REP_ACK);
    let replies = d.set_meta("disk", &["base:allocation"]);
    assert_eq!(meta_reply(&replies[0]).0, 1);
    let n = d.go("disk");
    assert!(n.extended && n.structured);
    assert_ne!(n.flags & tf::SEND_DF, 0);
    assert_eq!(n.contexts, vec![base_allocation(1)]);
}

#[test]
fn go_without_structured_replies() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let n = d.go("ro");
    let infos = successful_info(&d.take_replies(), OPT_GO);
    // SEND_DF must stay clear without structured replies.
    assert_eq!(
        info_export(find_info(&infos, INFO_EXPORT).unwrap()),
        (RO_SIZE, RO_FLAGS)
    );
    assert_eq!(n.flags, RO_FLAGS);
    assert!(!n.structured && !n.extended);
    assert!(n.contexts.is_empty());
}

/// The Apple Virtualization.framework client sends INFO (asking for BLOCK_SIZE) before GO.
#[test]
fn info_then_go_like_virtualization_framework() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED_NO_ZEROES);
    let info = d.option(OPT_INFO, &info_data("disk", &[INFO_BLOCK_SIZE]));
    let infos = successful_info(&info, OPT_INFO);
    let export = info_export(find_info(&infos, INFO_EXPORT).expect("INFO_EXPORT"));
    let sizes = info_block_size(find_info(&infos, INFO_BLOCK_SIZE).expect("INFO_BLOCK_SIZE"));
    assert_eq!(export, (DISK_SIZE, DISK_FLAGS));
    assert_eq!(sizes, (1, 4096, 32 << 20));

    // GO with the same parameters gets the same information and enters transmission.
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[INFO_BLOCK_SIZE]))));
    let go = d.take_replies();
    let go_infos = successful_info(&go, OPT_GO);
    let mut a: Vec<_> = infos.iter().map(|r| r.data.clone()).collect();
    let mut b: Vec<_> = go_infos.iter().map(|r| r.data.clone()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "GO repeats INFO's information");
    assert_eq!(n.export.name, "disk");
    assert_eq!(n.flags, DISK_FLAGS);
}

#[test]
fn info_name_and_description_on_request() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    // The default export "" has the canonical name "disk".
    let replies = d.option(
        OPT_INFO,
        &info_data("", &[INFO_NAME, INFO_DESCRIPTION, 0x7777]),
    );
    let infos = successful_info(&replies, OPT_INFO);
    assert_eq!(find_info(&infos, INFO_NAME).unwrap().data[2..], *b"disk");
    assert_eq!(
        find_info(&infos, INFO_DESCRIPTION).unwrap().data[2..],
        *b"Test disk"
    );
    assert!(
        find_info(&infos, 0x7777).is_none(),
        "unknown requests ignored"
    );
    // Not requested: no NAME.
    let replies = d.option(OPT_INFO, &info_data("disk", &[]));
    assert!(find_info(&successful_info(&replies, OPT_INFO), INFO_NAME).is_none());
}

#[test]
fn export_name_with_zeroes() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let n = done(d.feed(&opt(OPT_EXPORT_NAME, b"disk")));
    let sent = d.take_sent();
    assert_eq!(sent.len(), 8 + 2 + 124);
    assert_eq!(u64::from_be_bytes(sent[..8].try_into().unwrap()), DISK_SIZE);
    assert_eq!(
        u16::from_be_bytes(sent[8..10].try_into().unwrap()),
        DISK_FLAGS
    );
    assert!(sent[10..].iter().all(|&b| b == 0));
    assert_eq!(n.export.name, "disk");
    assert!(!n.structured);
}

#[test]
fn export_name_without_zeroes() {
    let mut d = Driver::structured(C_FIXED_NO_ZEROES);
    let n = done(d.feed(&opt(OPT_EXPORT_NAME, b"")));
    let sent = d.take_sent();
    assert_eq!(sent.len(), 10);
    assert_eq!(
        u16::from_be_bytes(sent[8..10].try_into().unwrap()),
        DISK_FLAGS | tf::SEND_DF
    );
    assert_eq!(n.export.name, "disk", "default export");
    assert!(n.structured);
}

#[test]
fn export_name_from_a_client_without_fixed_newstyle() {
    let mut d = Driver::started(TlsPolicy::Disabled, 0);
    let n = done(d.feed(&opt(OPT_EXPORT_NAME, b"ro")));
    assert_eq!(d.take_sent().len(), 134);
    assert_eq!(n.flags, RO_FLAGS);
}

#[test]
fn abort_is_acknowledged() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    assert_eq!(d.feed(&opt(OPT_ABORT, &[])), Outcome::Abort);
    let replies = d.take_replies();
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].option, replies[0].ty), (OPT_ABORT, REP_ACK));
    assert_eq!(
        d.feed(&opt(OPT_LIST, &[])),
        Outcome::Err(ProtocolError::HandshakeFinished)
    );
}
