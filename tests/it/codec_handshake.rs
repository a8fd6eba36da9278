//! The handshake state machine against a tiny in-test catalog: the option flows real
//! clients use, every refusal the specification asks for, TLS policies, metadata
//! contexts, size limits, and robustness to how the input is split.

use crate::support::codec::*;
use crate::support::spec::*;
use crate::support::wire::*;
use proptest::prelude::*;
use strata::proto::consts::transmission_flags as tf;
use strata::proto::{HandshakeConfig, MetaContext, Negotiated, ProtocolError, TlsPolicy};

#[track_caller]
fn done(outcome: Outcome) -> Box<Negotiated> {
    match outcome {
        Outcome::Done(n) => n,
        other => panic!("expected Done, got {other:?}"),
    }
}

/// (size, flags) from an `INFO_EXPORT` reply.
fn info_export(r: &OptReply) -> (u64, u16) {
    assert_eq!(r.info_type(), Some(INFO_EXPORT));
    assert_eq!(r.data.len(), 12, "INFO_EXPORT is 12 bytes");
    (
        u64::from_be_bytes(r.data[2..10].try_into().unwrap()),
        u16::from_be_bytes(r.data[10..12].try_into().unwrap()),
    )
}

/// (minimum, preferred, maximum) from an `INFO_BLOCK_SIZE` reply.
fn info_block_size(r: &OptReply) -> (u32, u32, u32) {
    assert_eq!(r.info_type(), Some(INFO_BLOCK_SIZE));
    assert_eq!(r.data.len(), 14, "INFO_BLOCK_SIZE is 14 bytes");
    let word = |i: usize| u32::from_be_bytes(r.data[i..i + 4].try_into().unwrap());
    (word(2), word(6), word(10))
}

/// Checks the replies to a successful INFO/GO: only `REP_INFO`s, then one `ACK`; returns
/// the `REP_INFO`s.
#[track_caller]
fn successful_info(replies: &[OptReply], option: u32) -> Vec<OptReply> {
    let (ack, infos) = replies.split_last().expect("some replies");
    assert_eq!(
        (ack.option, ack.ty),
        (option, REP_ACK),
        "ends with ACK: {replies:?}"
    );
    assert!(ack.data.is_empty());
    for r in infos {
        assert_eq!((r.option, r.ty), (option, REP_INFO), "{r:?}");
    }
    let exports = infos.iter().filter(|r| r.info_type() == Some(INFO_EXPORT));
    assert_eq!(exports.count(), 1, "exactly one INFO_EXPORT");
    infos.to_vec()
}

fn find_info(infos: &[OptReply], ty: u16) -> Option<&OptReply> {
    infos.iter().find(|r| r.info_type() == Some(ty))
}

fn base_allocation(id: u32) -> MetaContext {
    MetaContext {
        id,
        name: "base:allocation".into(),
    }
}

fn allocation_depth(id: u32) -> MetaContext {
    MetaContext {
        id,
        name: "qemu:allocation-depth".into(),
    }
}

/// (id, name) of a `REP_META_CONTEXT`.
fn meta_reply(r: &OptReply) -> (u32, String) {
    assert_eq!(r.ty, REP_META_CONTEXT);
    (
        u32::from_be_bytes(r.data[..4].try_into().unwrap()),
        String::from_utf8(r.data[4..].to_vec()).unwrap(),
    )
}

// ---------------------------------------------------------------------------------------
// Main flows
// ---------------------------------------------------------------------------------------

#[test]
fn full_go_flow() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED_NO_ZEROES);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let replies = d.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
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
    let replies = d.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    assert_eq!(meta_reply(&replies[0]).0, 1);
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(n.extended && n.structured);
    assert_ne!(n.flags & tf::SEND_DF, 0);
    assert_eq!(n.contexts, vec![base_allocation(1)]);
}

#[test]
fn go_without_structured_replies() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let n = done(d.feed(&opt(OPT_GO, &info_data("ro", &[]))));
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
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED_NO_ZEROES);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
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

// ---------------------------------------------------------------------------------------
// Refusals that keep negotiation going
// ---------------------------------------------------------------------------------------

#[test]
fn unknown_option_is_unsupported_and_negotiation_continues() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    for option in [0u32, 4, 12, 0x1234, u32::MAX] {
        let r = d.expect_single(option, b"some data", REP_ERR_UNSUP);
        assert_error_reply(&r, option, REP_ERR_UNSUP);
    }
    done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
}

#[test]
fn list_with_data_is_invalid() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let r = d.expect_single(OPT_LIST, b"x", REP_ERR_INVALID);
    assert_error_reply(&r, OPT_LIST, REP_ERR_INVALID);
    assert_eq!(
        d.option(OPT_LIST, &[]).len(),
        3,
        "a correct LIST still works"
    );
}

#[test]
fn list_lists_exports() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let replies = d.option(OPT_LIST, &[]);
    let (ack, servers) = replies.split_last().unwrap();
    assert_eq!(ack.ty, REP_ACK);
    let listed: Vec<(String, String)> = servers
        .iter()
        .map(|r| {
            assert_eq!((r.option, r.ty), (OPT_LIST, REP_SERVER));
            let len = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
            assert!(len <= r.data.len() - 4);
            (
                String::from_utf8(r.data[4..4 + len].to_vec()).unwrap(),
                String::from_utf8(r.data[4 + len..].to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("disk".into(), "Test disk".into()),
            ("ro".into(), String::new())
        ]
    );
}

#[test]
fn unknown_export_in_info_and_go() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    for option in [OPT_INFO, OPT_GO] {
        // No REP_INFO before the error.
        let r = d.expect_single(option, &info_data("nope", &[INFO_NAME]), REP_ERR_UNKNOWN);
        assert_error_reply(&r, option, REP_ERR_UNKNOWN);
    }
    done(d.feed(&opt(OPT_GO, &info_data("ro", &[]))));
}

#[test]
fn unknown_export_in_export_name_ends_the_session() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    assert_eq!(
        d.feed(&opt(OPT_EXPORT_NAME, b"nope")),
        Outcome::Err(ProtocolError::UnknownExport("nope".into()))
    );
    assert!(d.take_sent().is_empty(), "nothing can be sent");
}

#[test]
fn malformed_info_is_invalid() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let cases: Vec<Vec<u8>> = vec![
        vec![],                             // no name length
        hex("00000010 6469736b 0000"),      // name runs past the end
        hex("00000004 6469736b"),           // no request count
        hex("00000004 6469736b 0002 0001"), // fewer requests than counted
        hex("00000004 6469736b 0000 0001"), // more data than counted
        hex("00000004 64690073 0000"),      // NUL in the name
        hex("00000004 6469ff6b 0000"),      // not UTF-8
    ];
    for data in cases {
        for option in [OPT_INFO, OPT_GO] {
            let r = d.expect_single(option, &data, REP_ERR_INVALID);
            assert_error_reply(&r, option, REP_ERR_INVALID);
        }
    }
    done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
}

#[test]
fn malformed_export_name_ends_the_session() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    assert!(matches!(
        d.feed(&opt(OPT_EXPORT_NAME, &hex("64ff"))),
        Outcome::Err(ProtocolError::BadOption(_))
    ));
}

#[test]
fn structured_reply_twice_is_invalid() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let r = d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ERR_INVALID);
    assert_error_reply(&r, OPT_STRUCTURED_REPLY, REP_ERR_INVALID);
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(n.structured);
}

#[test]
fn structured_reply_with_data_is_invalid() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID);
    d.expect_single(OPT_EXTENDED_HEADERS, b"x", REP_ERR_INVALID);
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(!n.structured && !n.extended);
}

#[test]
fn structured_reply_after_extended_headers() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_EXTENDED_HEADERS, &[], REP_ACK);
    let r = d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ERR_EXT_HEADER_REQD);
    assert_error_reply(&r, OPT_STRUCTURED_REPLY, REP_ERR_EXT_HEADER_REQD);
    d.expect_single(OPT_EXTENDED_HEADERS, &[], REP_ERR_INVALID);
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(n.extended && n.structured, "still extended");
}

#[test]
fn extended_headers_after_structured_reply() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    d.expect_single(OPT_EXTENDED_HEADERS, &[], REP_ACK);
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(n.extended && n.structured);
}

// ---------------------------------------------------------------------------------------
// Metadata contexts
// ---------------------------------------------------------------------------------------

#[test]
fn set_meta_context_needs_structured_replies() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let r = d.expect_single(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
        REP_ERR_INVALID,
    );
    assert_error_reply(&r, OPT_SET_META_CONTEXT, REP_ERR_INVALID);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(n.contexts.is_empty());
}

/// The names a `LIST_META_CONTEXT` returns for `queries` on `export`, checking that the
/// listing is well formed: one `REP_META_CONTEXT` per context, each with the reserved id
/// zero, then an `ACK`.
#[track_caller]
fn listed(d: &mut Driver, export: &str, queries: &[&str]) -> Vec<String> {
    let replies = d.option(OPT_LIST_META_CONTEXT, &meta_data(export, queries));
    let (ack, contexts) = replies.split_last().expect("some replies");
    assert_eq!(ack.ty, REP_ACK, "{queries:?}: {replies:?}");
    contexts
        .iter()
        .map(|r| {
            assert_eq!(r.option, OPT_LIST_META_CONTEXT);
            let (id, name) = meta_reply(r);
            assert_eq!(id, 0, "the id in a listing is reserved: zero");
            name
        })
        .collect()
}

#[test]
fn list_meta_context_without_query_and_with_namespace() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let both = ["base:allocation", "qemu:allocation-depth"];
    for (queries, expected) in [
        // No query lists everything.
        (&[][..], &both[..]),
        (&["base:"][..], &both[..1]),
        (&["base:allocation"][..], &both[..1]),
        (&["qemu:"][..], &both[1..]),
        (&["qemu:allocation-depth"][..], &both[1..]),
        (&["qemu:", "base:"][..], &both[..]),
        (&["qemu:allocation-depth", "base:allocation"][..], &both[..]),
        // Unknown namespaces and leaf names are ignored, not errors.
        (&["x-unknown:"][..], &[][..]),
        (&["base:nope"][..], &[][..]),
        (&["qemu:dirty-bitmap:"][..], &[][..]),
        // A namespace is matched whole, never as a prefix of a name.
        (&["qemu:allocation"][..], &[][..]),
        (&["qemu"][..], &[][..]),
    ] {
        assert_eq!(listed(&mut d, "disk", queries), expected, "{queries:?}");
    }
    // An export offering only base:allocation lists nothing in qemu's namespace.
    assert_eq!(listed(&mut d, "ro", &[]), ["base:allocation"]);
    assert!(listed(&mut d, "ro", &["qemu:"]).is_empty());
    // Listing selects nothing.
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(n.contexts.is_empty());
}

#[test]
fn every_export_offers_base_allocation_then_allocation_depth() {
    assert_eq!(
        strata::proto::handshake::default_meta_contexts(),
        ["base:allocation", "qemu:allocation-depth"],
        "ids are positions: base:allocation must stay 1 and qemu:allocation-depth 2"
    );
    assert_eq!(
        strata::proto::consts::QEMU_ALLOCATION_DEPTH,
        QEMU_ALLOCATION_DEPTH
    );
}

#[test]
fn set_meta_context_selects_both_contexts_with_fixed_ids() {
    for extended in [false, true] {
        for queries in [
            &["base:allocation", "qemu:allocation-depth"][..],
            &["qemu:allocation-depth", "base:allocation"][..],
            &[
                "qemu:allocation-depth",
                "base:allocation",
                "qemu:allocation-depth",
            ][..],
        ] {
            let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
            let option = if extended {
                OPT_EXTENDED_HEADERS
            } else {
                OPT_STRUCTURED_REPLY
            };
            d.expect_single(option, &[], REP_ACK);
            let replies = d.option(OPT_SET_META_CONTEXT, &meta_data("disk", queries));
            assert_eq!(replies.len(), 3, "{queries:?}: {replies:?}");
            let mut selected: Vec<(u32, String)> = replies[..2].iter().map(meta_reply).collect();
            selected.sort();
            assert_eq!(
                selected,
                [
                    (1, "base:allocation".into()),
                    (2, "qemu:allocation-depth".into())
                ],
                "{queries:?}"
            );
            assert_eq!(replies[2].ty, REP_ACK);
            let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
            let mut contexts = n.contexts.clone();
            contexts.sort_by_key(|c| c.id);
            assert_eq!(contexts, vec![base_allocation(1), allocation_depth(2)]);
        }
    }
}

#[test]
fn set_meta_context_allocation_depth_alone_keeps_its_id() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let replies = d.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["qemu:allocation-depth"]),
    );
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(meta_reply(&replies[0]), (2, "qemu:allocation-depth".into()));
    assert_eq!(replies[1].ty, REP_ACK);
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert_eq!(n.contexts, vec![allocation_depth(2)]);
}

#[test]
fn set_meta_context_allocation_depth_on_an_export_without_it() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let replies = d.option(
        OPT_SET_META_CONTEXT,
        &meta_data("ro", &["qemu:allocation-depth", "base:allocation"]),
    );
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(meta_reply(&replies[0]), (1, "base:allocation".into()));
    let n = done(d.feed(&opt(OPT_GO, &info_data("ro", &[]))));
    assert_eq!(n.contexts, vec![base_allocation(1)]);
}

#[test]
fn meta_context_errors() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        d.expect_single(option, &meta_data("nope", &[]), REP_ERR_UNKNOWN);
        // A query length running past the end of the option.
        let mut bad = meta_data("disk", &["base:allocation"]);
        bad.truncate(bad.len() - 1);
        d.expect_single(option, &bad, REP_ERR_INVALID);
        // Trailing garbage after the queries.
        let mut bad = meta_data("disk", &[]);
        bad.push(0);
        d.expect_single(option, &bad, REP_ERR_INVALID);
    }
}

#[test]
fn set_meta_context_namespace_or_no_query_selects_nothing() {
    for queries in [
        &[][..],
        &["base:"][..],
        &["qemu:"][..],
        &["x-unknown:thing"][..],
    ] {
        let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
        d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
        d.expect_single(OPT_SET_META_CONTEXT, &meta_data("disk", queries), REP_ACK);
        let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
        assert!(n.contexts.is_empty(), "{queries:?}");
    }
}

#[test]
fn selected_contexts_survive_only_for_the_same_export() {
    for (set_on, go_to, survives) in [
        ("disk", "disk", true),
        ("disk", "ro", false),
        ("ro", "ro", true),
    ] {
        let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
        d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
        let replies = d.option(
            OPT_SET_META_CONTEXT,
            &meta_data(set_on, &["base:allocation"]),
        );
        assert_eq!(meta_reply(&replies[0]), (1, "base:allocation".into()));
        let n = done(d.feed(&opt(OPT_GO, &info_data(go_to, &[]))));
        let expected = if survives {
            vec![base_allocation(1)]
        } else {
            vec![]
        };
        assert_eq!(n.contexts, expected, "SET on {set_on}, GO to {go_to}");
    }
}

#[test]
fn later_set_meta_context_replaces_the_selection() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    d.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    d.expect_single(OPT_SET_META_CONTEXT, &meta_data("disk", &[]), REP_ACK);
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(n.contexts.is_empty());
}

/// "Issuing this command replaces all previously-set metadata contexts (including when
/// this command fails)".
#[test]
fn failed_set_meta_context_clears_the_selection() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    d.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    d.expect_single(
        OPT_SET_META_CONTEXT,
        &meta_data("nope", &["base:allocation"]),
        REP_ERR_UNKNOWN,
    );
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(n.contexts.is_empty(), "{:?}", n.contexts);
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

#[test]
fn starttls_when_disabled_is_unsupported() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let r = d.expect_single(OPT_STARTTLS, &[], REP_ERR_UNSUP);
    assert_error_reply(&r, OPT_STARTTLS, REP_ERR_UNSUP);
    done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(!d.hs.tls_active());
}

#[test]
fn starttls_allowed_forgets_earlier_negotiation() {
    let mut d = Driver::started(TlsPolicy::Allowed, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    d.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    d.expect_single(OPT_EXTENDED_HEADERS, &[], REP_ACK);

    assert_eq!(d.feed(&opt(OPT_STARTTLS, &[])), Outcome::StartTls);
    let replies = d.take_replies();
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].option, replies[0].ty), (OPT_STARTTLS, REP_ACK));
    assert!(replies[0].data.is_empty());
    assert!(!d.hs.tls_active());
    d.hs.tls_established();
    assert!(d.hs.tls_active());

    // A second STARTTLS is invalid.
    d.expect_single(OPT_STARTTLS, &[], REP_ERR_INVALID);
    // SET_META_CONTEXT now needs structured replies again.
    d.expect_single(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
        REP_ERR_INVALID,
    );
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(!n.structured && !n.extended);
    assert!(n.contexts.is_empty());
    assert_eq!(n.flags & tf::SEND_DF, 0);
}

#[test]
fn starttls_allowed_then_renegotiate() {
    let mut d = Driver::started(TlsPolicy::Allowed, C_FIXED);
    // Options work without TLS in this mode.
    assert_eq!(d.option(OPT_LIST, &[]).len(), 3);
    d.expect_single(OPT_STARTTLS, b"x", REP_ERR_INVALID);
    assert_eq!(d.feed(&opt(OPT_STARTTLS, &[])), Outcome::StartTls);
    d.take_replies();
    d.hs.tls_established();
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    d.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(n.structured);
    assert_eq!(n.contexts, vec![base_allocation(1)]);
}

#[test]
fn tls_required_refuses_everything_before_tls() {
    let mut d = Driver::started(TlsPolicy::Required, C_FIXED);
    let attempts: Vec<(u32, Vec<u8>)> = vec![
        (OPT_LIST, vec![]),
        (OPT_INFO, info_data("disk", &[INFO_NAME, INFO_DESCRIPTION])),
        (OPT_GO, info_data("disk", &[])),
        (OPT_INFO, info_data("nope", &[])),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_EXTENDED_HEADERS, vec![]),
        (OPT_LIST_META_CONTEXT, meta_data("disk", &[])),
        (OPT_SET_META_CONTEXT, meta_data("disk", &[])),
        (0x99, vec![]),
    ];
    for (option, data) in &attempts {
        // Exactly one reply, the refusal: no REP_SERVER, REP_INFO or META_CONTEXT.
        let r = d.expect_single(*option, data, REP_ERR_TLS_REQD);
        assert_error_reply(&r, *option, REP_ERR_TLS_REQD);
        let msg = String::from_utf8_lossy(&r.data);
        assert!(!msg.contains("disk") && !msg.contains("Test"), "{msg}");
    }
    // EXPORT_NAME cannot be refused politely: the session ends.
    let mut d2 = Driver::started(TlsPolicy::Required, C_FIXED);
    assert_eq!(
        d2.feed(&opt(OPT_EXPORT_NAME, b"disk")),
        Outcome::Err(ProtocolError::TlsRequired)
    );
    assert!(d2.take_sent().is_empty());

    // After the upgrade everything works.
    assert_eq!(d.feed(&opt(OPT_STARTTLS, &[])), Outcome::StartTls);
    d.take_replies();
    d.hs.tls_established();
    assert_eq!(d.option(OPT_LIST, &[]).len(), 3);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert!(n.structured);
}

/// FORCEDTLS: "any other option" gets ERR_TLS_REQD before the upgrade, even one too big
/// to read; after the upgrade the same option is simply too big.
#[test]
fn tls_required_oversized_option_before_tls() {
    let mut d = Driver::new(HandshakeConfig {
        tls: TlsPolicy::Required,
        max_option_len: 16,
    });
    d.feed(&C_FIXED.to_be_bytes());
    d.take_sent();
    let big = opt(OPT_INFO, &[0; 100]);
    assert_eq!(d.feed(&big), Outcome::NeedInput);
    let replies = d.take_replies();
    assert_eq!(replies.len(), 1);
    assert_error_reply(&replies[0], OPT_INFO, REP_ERR_TLS_REQD);

    assert_eq!(d.feed(&opt(OPT_STARTTLS, &[])), Outcome::StartTls);
    d.take_replies();
    d.hs.tls_established();
    assert_eq!(d.feed(&big), Outcome::NeedInput);
    assert_error_reply(&d.take_replies()[0], OPT_INFO, REP_ERR_TOO_BIG);
}

#[test]
fn tls_required_still_allows_abort() {
    let mut d = Driver::started(TlsPolicy::Required, C_FIXED);
    assert_eq!(d.feed(&opt(OPT_ABORT, &[])), Outcome::Abort);
    assert_eq!(d.take_replies()[0].ty, REP_ACK);
}

/// TLS needs fixed newstyle: a server that requires TLS ends the session of a client
/// without it at once; one that merely allows TLS treats it as a server without TLS.
#[test]
fn tls_needs_a_fixed_newstyle_client() {
    let mut d = Driver::new(HandshakeConfig {
        tls: TlsPolicy::Required,
        ..HandshakeConfig::default()
    });
    d.take_sent();
    assert_eq!(
        d.feed(&0u32.to_be_bytes()),
        Outcome::Err(ProtocolError::TlsNeedsFixedNewstyle)
    );
    assert!(d.take_sent().is_empty());

    let mut d = Driver::started(TlsPolicy::Allowed, 0);
    d.expect_single(OPT_STARTTLS, &[], REP_ERR_UNSUP);
    done(d.feed(&opt(OPT_EXPORT_NAME, b"ro")));
}

#[test]
fn tls_required_export_name_after_tls() {
    let mut d = Driver::started(TlsPolicy::Required, C_FIXED_NO_ZEROES);
    assert_eq!(d.feed(&opt(OPT_STARTTLS, &[])), Outcome::StartTls);
    d.take_replies();
    d.hs.tls_established();
    let n = done(d.feed(&opt(OPT_EXPORT_NAME, b"ro")));
    assert_eq!(n.export.name, "ro");
    assert_eq!(d.take_sent().len(), 10);
}

// ---------------------------------------------------------------------------------------
// Limits and framing
// ---------------------------------------------------------------------------------------

#[test]
fn export_names_up_to_4096_bytes() {
    let longest = "x".repeat(4096);
    let too_long = "x".repeat(4097);

    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let replies = d.option(OPT_INFO, &info_data(&longest, &[INFO_NAME]));
    let infos = successful_info(&replies, OPT_INFO);
    assert_eq!(find_info(&infos, INFO_NAME).unwrap().data.len(), 2 + 4096);
    let r = d.expect_single(OPT_INFO, &info_data(&too_long, &[]), REP_ERR_INVALID);
    assert_error_reply(&r, OPT_INFO, REP_ERR_INVALID);
    let r = d.expect_single(OPT_GO, &info_data(&too_long, &[]), REP_ERR_INVALID);
    assert_error_reply(&r, OPT_GO, REP_ERR_INVALID);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    d.expect_single(
        OPT_SET_META_CONTEXT,
        &meta_data(&too_long, &[]),
        REP_ERR_INVALID,
    );
    d.expect_single(
        OPT_LIST_META_CONTEXT,
        &meta_data(&too_long, &[]),
        REP_ERR_INVALID,
    );
    let n = done(d.feed(&opt(OPT_GO, &info_data(&longest, &[]))));
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
    let mut d = Driver::new(HandshakeConfig {
        tls: TlsPolicy::Disabled,
        max_option_len: 64,
    });
    d.feed(&C_FIXED.to_be_bytes());
    d.take_sent();

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
    let n = done(d.feed(&opt(OPT_GO, &info_data("disk", &[]))));
    assert_eq!(n.export.name, "disk");
}

#[test]
fn oversized_option_refused_only_after_all_its_bytes() {
    let mut d = Driver::new(HandshakeConfig {
        tls: TlsPolicy::Disabled,
        max_option_len: 8,
    });
    d.feed(&C_FIXED.to_be_bytes());
    d.take_sent();
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
    let mut d = Driver::new(HandshakeConfig {
        tls: TlsPolicy::Disabled,
        max_option_len: 8,
    });
    d.feed(&C_FIXED.to_be_bytes());
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

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

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
