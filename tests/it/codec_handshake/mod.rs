//! The handshake state machine against a tiny in-test catalog: the option flows real
//! clients use (`flows`), every refusal the specification asks for (`refusals`), metadata
//! contexts (`meta`), TLS policies (`tls`), size limits and framing (`limits`), and
//! robustness to how the input is split (`properties`). The reply readers they share are
//! here.

mod flows;
mod limits;
mod meta;
mod properties;
mod refusals;
mod tls;

use strata::proto::MetaContext;

use crate::support::codec::*;
use crate::support::spec::*;
use crate::support::wire::*;

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
