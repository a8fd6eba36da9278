//! TLS: `STARTTLS` refused when disabled; when allowed, what was negotiated before it is
//! forgotten; when required, everything but `ABORT` refused before it.

use strata::proto::consts::transmission_flags as tf;
use strata::proto::{HandshakeConfig, ProtocolError, TlsPolicy};

use crate::support::codec::*;
use crate::support::spec::*;
use crate::support::wire::*;

use super::base_allocation;

#[test]
fn starttls_when_disabled_is_unsupported() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_error(OPT_STARTTLS, &[], REP_ERR_UNSUP);
    d.go("disk");
    assert!(!d.hs.tls_active());
}

#[test]
fn starttls_allowed_forgets_earlier_negotiation() {
    let mut d = Driver::started(TlsPolicy::Allowed, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    d.set_meta("disk", &["base:allocation"]);
    d.expect_single(OPT_EXTENDED_HEADERS, &[], REP_ACK);

    let replies = d.starttls();
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].option, replies[0].ty), (OPT_STARTTLS, REP_ACK));
    assert!(replies[0].data.is_empty());

    // A second STARTTLS is invalid.
    d.expect_single(OPT_STARTTLS, &[], REP_ERR_INVALID);
    // SET_META_CONTEXT now needs structured replies again.
    let set = meta_data("disk", &["base:allocation"]);
    d.expect_single(OPT_SET_META_CONTEXT, &set, REP_ERR_INVALID);
    let n = d.go("disk");
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
    d.starttls();
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    d.set_meta("disk", &["base:allocation"]);
    let n = d.go("disk");
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
        let r = d.expect_error(*option, data, REP_ERR_TLS_REQD);
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
    d.starttls();
    assert_eq!(d.option(OPT_LIST, &[]).len(), 3);
    d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let n = d.go("disk");
    assert!(n.structured);
}

/// FORCEDTLS: "any other option" gets ERR_TLS_REQD before the upgrade, even one too big
/// to read; after the upgrade the same option is simply too big.
#[test]
fn tls_required_oversized_option_before_tls() {
    let mut d = Driver::limited(TlsPolicy::Required, 16);
    let big = opt(OPT_INFO, &[0; 100]);
    assert_eq!(d.feed(&big), Outcome::NeedInput);
    let replies = d.take_replies();
    assert_eq!(replies.len(), 1);
    assert_error_reply(&replies[0], OPT_INFO, REP_ERR_TLS_REQD);

    d.starttls();
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
    d.starttls();
    let n = done(d.feed(&opt(OPT_EXPORT_NAME, b"ro")));
    assert_eq!(n.export.name, "ro");
    assert_eq!(d.take_sent().len(), 10);
}
