//! Metadata contexts: setting and listing `base:allocation` and
//! `qemu:allocation-depth`, by name and by namespace, with their fixed ids.

use strata::proto::TlsPolicy;

use crate::support::codec::*;
use crate::support::spec::*;
use crate::support::wire::*;

use super::{allocation_depth, base_allocation, listed, meta_reply};

#[test]
fn set_meta_context_needs_structured_replies() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let set = meta_data("disk", &["base:allocation"]);
    d.expect_error(OPT_SET_META_CONTEXT, &set, REP_ERR_INVALID);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let n = d.go("disk");
    assert!(n.contexts.is_empty());
}

#[test]
fn list_meta_context_without_query_and_with_namespace() {
    let mut d = Driver::structured(C_FIXED);
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
    let n = d.go("disk");
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
            let replies = d.set_meta("disk", queries);
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
            let n = d.go("disk");
            let mut contexts = n.contexts.clone();
            contexts.sort_by_key(|c| c.id);
            assert_eq!(contexts, vec![base_allocation(1), allocation_depth(2)]);
        }
    }
}

#[test]
fn set_meta_context_allocation_depth_alone_keeps_its_id() {
    let mut d = Driver::structured(C_FIXED);
    let replies = d.set_meta("disk", &["qemu:allocation-depth"]);
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(meta_reply(&replies[0]), (2, "qemu:allocation-depth".into()));
    assert_eq!(replies[1].ty, REP_ACK);
    let n = d.go("disk");
    assert_eq!(n.contexts, vec![allocation_depth(2)]);
}

#[test]
fn set_meta_context_allocation_depth_on_an_export_without_it() {
    let mut d = Driver::structured(C_FIXED);
    let replies = d.set_meta("ro", &["qemu:allocation-depth", "base:allocation"]);
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(meta_reply(&replies[0]), (1, "base:allocation".into()));
    let n = d.go("ro");
    assert_eq!(n.contexts, vec![base_allocation(1)]);
}

#[test]
fn meta_context_errors() {
    let mut d = Driver::structured(C_FIXED);
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
        let mut d = Driver::structured(C_FIXED);
        d.expect_single(OPT_SET_META_CONTEXT, &meta_data("disk", queries), REP_ACK);
        let n = d.go("disk");
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
        let mut d = Driver::structured(C_FIXED);
        let replies = d.set_meta(set_on, &["base:allocation"]);
        assert_eq!(meta_reply(&replies[0]), (1, "base:allocation".into()));
        let n = d.go(go_to);
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
    let mut d = Driver::structured(C_FIXED);
    d.set_meta("disk", &["base:allocation"]);
    d.expect_single(OPT_SET_META_CONTEXT, &meta_data("disk", &[]), REP_ACK);
    let n = d.go("disk");
    assert!(n.contexts.is_empty());
}

/// "Issuing this command replaces all previously-set metadata contexts (including when
/// this command fails)".
#[test]
fn failed_set_meta_context_clears_the_selection() {
    let mut d = Driver::structured(C_FIXED);
    d.set_meta("disk", &["base:allocation"]);
    let unknown = meta_data("nope", &["base:allocation"]);
    d.expect_single(OPT_SET_META_CONTEXT, &unknown, REP_ERR_UNKNOWN);
    let n = d.go("disk");
    assert!(n.contexts.is_empty(), "{:?}", n.contexts);
}
