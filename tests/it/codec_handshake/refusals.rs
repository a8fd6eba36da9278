//! Refusals that keep negotiation going.

use strata::proto::{ProtocolError, TlsPolicy};

use crate::support::codec::*;
use crate::support::spec::*;
use crate::support::wire::*;

#[test]
fn unknown_option_is_unsupported_and_negotiation_continues() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    for option in [0u32, 4, 12, 0x1234, u32::MAX] {
        d.expect_error(option, b"some data", REP_ERR_UNSUP);
    }
    d.go("disk");
}

#[test]
fn list_with_data_is_invalid() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_error(OPT_LIST, b"x", REP_ERR_INVALID);
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
        d.expect_error(option, &info_data("nope", &[INFO_NAME]), REP_ERR_UNKNOWN);
    }
    d.go("ro");
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
            d.expect_error(option, &data, REP_ERR_INVALID);
        }
    }
    d.go("disk");
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
    let mut d = Driver::structured(C_FIXED);
    d.expect_error(OPT_STRUCTURED_REPLY, &[], REP_ERR_INVALID);
    let n = d.go("disk");
    assert!(n.structured);
}

#[test]
fn structured_reply_with_data_is_invalid() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID);
    d.expect_single(OPT_EXTENDED_HEADERS, b"x", REP_ERR_INVALID);
    let n = d.go("disk");
    assert!(!n.structured && !n.extended);
}

#[test]
fn structured_reply_after_extended_headers() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.expect_single(OPT_EXTENDED_HEADERS, &[], REP_ACK);
    d.expect_error(OPT_STRUCTURED_REPLY, &[], REP_ERR_EXT_HEADER_REQD);
    d.expect_single(OPT_EXTENDED_HEADERS, &[], REP_ERR_INVALID);
    let n = d.go("disk");
    assert!(n.extended && n.structured, "still extended");
}

#[test]
fn extended_headers_after_structured_reply() {
    let mut d = Driver::structured(C_FIXED);
    d.expect_single(OPT_EXTENDED_HEADERS, &[], REP_ACK);
    let n = d.go("disk");
    assert!(n.extended && n.structured);
}
