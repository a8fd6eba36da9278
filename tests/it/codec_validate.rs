//! `validate()`: the one place a request is checked against what was negotiated.

use crate::support::codec::EVERY_OPTIONAL_FLAG;
use proptest::prelude::*;
use strata::proto::consts::{cmd_flags as cf, errno, transmission_flags as tf};
use strata::proto::{Command, Limits, RequestHeader, validate};

const SIZE: u64 = 1 << 20;
const MAX_PAYLOAD: u32 = 64 * 1024;

/// A writable export advertising every optional command.
fn limits() -> Limits {
    Limits {
        size: SIZE,
        flags: EVERY_OPTIONAL_FLAG,
        max_payload: MAX_PAYLOAD,
        structured: true,
        extended: false,
        has_contexts: true,
    }
}

/// `limits()` with `change` made.
fn limits_with(change: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = limits();
    change(&mut l);
    l
}

fn req(command: Command, flags: u16, offset: u64, length: u64) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie: 42,
        offset,
        length,
    }
}

#[track_caller]
fn refused(r: RequestHeader, l: &Limits) -> u32 {
    match validate(&r, l) {
        Ok(()) => panic!("{r:?} accepted"),
        Err(refusal) => {
            assert!(!refusal.message.is_empty());
            refusal.errno
        }
    }
}

#[track_caller]
fn accepted(r: RequestHeader, l: &Limits) {
    if let Err(e) = validate(&r, l) {
        panic!("{r:?} refused: {e:?}");
    }
}

use Command::*;

#[test]
fn in_range_requests_are_accepted() {
    let l = limits();
    for c in [Read, Write, Trim, WriteZeroes, Cache, BlockStatus] {
        accepted(req(c, 0, 0, 512), &l);
        accepted(req(c, 0, SIZE - 512, 512), &l);
    }
    accepted(req(Read, 0, 0, u64::from(MAX_PAYLOAD)), &l);
    accepted(req(Flush, 0, 0, 0), &l);
    accepted(req(Disconnect, 0, 0, 0), &l);
}

#[test]
fn read_past_end_is_einval() {
    let l = limits();
    assert_eq!(refused(req(Read, 0, SIZE - 511, 512), &l), errno::EINVAL);
    assert_eq!(refused(req(Read, 0, SIZE, 1), &l), errno::EINVAL);
    assert_eq!(refused(req(Cache, 0, SIZE, 1), &l), errno::EINVAL);
    assert_eq!(refused(req(BlockStatus, 0, SIZE, 1), &l), errno::EINVAL);
}

#[test]
fn write_past_end_is_enospc() {
    let l = limits();
    assert_eq!(refused(req(Write, 0, SIZE - 511, 512), &l), errno::ENOSPC);
    assert_eq!(refused(req(WriteZeroes, 0, SIZE, 1), &l), errno::ENOSPC);
}

#[test]
fn trim_past_end_is_einval() {
    // The spec: EINVAL for "a read or trim request including one or more sectors beyond
    // the size of the device".
    assert_eq!(refused(req(Trim, 0, SIZE - 1, 2), &limits()), errno::EINVAL);
}

#[test]
fn offset_plus_length_overflow() {
    let l = limits_with(|l| {
        l.size = u64::MAX;
        l.extended = true;
    });
    assert_eq!(refused(req(Read, 0, u64::MAX - 10, 100), &l), errno::EINVAL);
    assert_eq!(
        refused(req(Write, 0, u64::MAX - 10, 100), &l),
        errno::ENOSPC
    );
    assert_eq!(refused(req(Trim, 0, u64::MAX, u64::MAX), &l), errno::EINVAL);
    assert_eq!(
        refused(req(WriteZeroes, 0, 2, u64::MAX - 1), &l),
        errno::ENOSPC
    );
    assert_eq!(refused(req(BlockStatus, 0, 1, u64::MAX), &l), errno::EINVAL);
    // Right up to the last byte is fine.
    accepted(req(Trim, 0, 1, u64::MAX - 1), &l);
}

#[test]
fn over_max_payload_is_einval() {
    let l = limits();
    let over = u64::from(MAX_PAYLOAD) + 1;
    assert_eq!(refused(req(Read, 0, 0, over), &l), errno::EINVAL);
    assert_eq!(refused(req(Write, 0, 0, over), &l), errno::EINVAL);
    // Effect lengths without a payload are not limited by it.
    accepted(req(Trim, 0, 0, over), &l);
    accepted(req(WriteZeroes, 0, 0, over), &l);
    accepted(req(BlockStatus, 0, 0, over), &l);
}

#[test]
fn unknown_or_misplaced_flags_are_einval() {
    let l = limits();
    let cases = [
        (Read, 1 << 15),
        (Read, 1 << 6),
        (Write, cf::NO_HOLE),
        (Write, cf::DF),
        (Write, cf::PAYLOAD_LEN), // only with extended headers
        (Read, cf::REQ_ONE),
        (Trim, cf::DF),
        (Trim, cf::NO_HOLE),
        (Flush, cf::REQ_ONE),
        (Cache, cf::FAST_ZERO),
        (BlockStatus, cf::NO_HOLE),
        (WriteZeroes, cf::REQ_ONE),
    ];
    for (c, flags) in cases {
        assert_eq!(
            refused(req(c, flags, 0, 512), &l),
            errno::EINVAL,
            "{c:?} {flags:#x}"
        );
    }
}

#[test]
fn documented_flags_are_accepted() {
    let l = limits();
    // FUA is tolerated on every command.
    for c in [Read, Write, Trim, WriteZeroes, Cache, BlockStatus, Flush] {
        let len = if c == Flush { 0 } else { 512 };
        accepted(req(c, cf::FUA, 0, len), &l);
    }
    accepted(req(Read, cf::DF, 0, 512), &l);
    accepted(req(WriteZeroes, cf::NO_HOLE | cf::FAST_ZERO, 0, 512), &l);
    accepted(req(BlockStatus, cf::REQ_ONE, 0, 512), &l);
}

#[test]
fn df_without_structured_replies_is_einval() {
    let l = limits_with(|l| {
        l.structured = false;
        l.has_contexts = false;
        l.flags &= !tf::SEND_DF;
    });
    assert_eq!(refused(req(Read, cf::DF, 0, 512), &l), errno::EINVAL);
    accepted(req(Read, 0, 0, 512), &l);
}

#[test]
fn modifying_a_read_only_export_is_eperm() {
    let l = limits_with(|l| l.flags |= tf::READ_ONLY);
    for c in [Write, Trim, WriteZeroes] {
        assert_eq!(refused(req(c, 0, 0, 512), &l), errno::EPERM, "{c:?}");
        assert_eq!(
            refused(req(c, 0, SIZE, 512), &l),
            errno::EPERM,
            "{c:?} past end"
        );
    }
    accepted(req(Read, 0, 0, 512), &l);
    accepted(req(Flush, 0, 0, 0), &l);
    accepted(req(BlockStatus, 0, 0, 512), &l);
}

#[test]
fn block_status_needs_a_context() {
    let l = limits_with(|l| l.has_contexts = false);
    assert_eq!(refused(req(BlockStatus, 0, 0, 512), &l), errno::EINVAL);
    let l = limits();
    assert_eq!(
        refused(req(BlockStatus, 0, 0, 0), &l),
        errno::EINVAL,
        "zero length"
    );
}

#[test]
fn unknown_commands_are_einval() {
    let l = limits();
    for t in [8u16, 9, 0x100, u16::MAX] {
        let c = Command::from_wire(t);
        assert_eq!(refused(req(c, 0, 0, 512), &l), errno::EINVAL, "type {t}");
    }
}

#[test]
fn fast_zero_needs_send_fast_zero() {
    let l = limits_with(|l| l.flags &= !tf::SEND_FAST_ZERO);
    assert_eq!(
        refused(req(WriteZeroes, cf::FAST_ZERO, 0, 512), &l),
        errno::EINVAL
    );
    accepted(req(WriteZeroes, cf::NO_HOLE, 0, 512), &l);
}

#[test]
fn optional_commands_need_their_flags() {
    let l = limits_with(|l| l.flags = tf::HAS_FLAGS);
    for c in [Flush, Trim, WriteZeroes, Cache] {
        assert_eq!(refused(req(c, 0, 0, 0), &l), errno::EINVAL, "{c:?}");
    }
    accepted(req(Read, 0, 0, 512), &l);
    accepted(req(Write, 0, 0, 512), &l);
}

#[test]
fn payload_len_with_extended_headers() {
    let mut l = limits_with(|l| l.extended = true);
    accepted(req(Write, cf::PAYLOAD_LEN, 0, 512), &l);
    accepted(req(Write, cf::PAYLOAD_LEN | cf::FUA, 0, 512), &l);
    // No command but WRITE takes a payload here (no BLOCK_STAT_PAYLOAD).
    assert_eq!(
        refused(req(BlockStatus, cf::PAYLOAD_LEN, 0, 16), &l),
        errno::EINVAL
    );
    assert_eq!(
        refused(req(Read, cf::PAYLOAD_LEN, 0, 16), &l),
        errno::EINVAL
    );
    // 64-bit effect lengths.
    l.size = 1 << 40;
    accepted(req(Trim, 0, 0, 1 << 36), &l);
    accepted(req(BlockStatus, 0, 0, 1 << 36), &l);
}

#[test]
fn disconnect_is_always_accepted() {
    let l = limits_with(|l| l.flags = tf::HAS_FLAGS | tf::READ_ONLY);
    accepted(req(Disconnect, 0, 0, 0), &l);
}

fn any_limits() -> impl Strategy<Value = Limits> {
    (
        any::<u64>(),
        any::<u16>(),
        any::<u32>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(size, flags, max_payload, structured, extended, has_contexts)| Limits {
                size,
                flags: flags | tf::HAS_FLAGS,
                max_payload,
                structured: structured || extended,
                extended,
                has_contexts,
            },
        )
}

proptest! {
    #![proptest_config(crate::support::proptest_cases(2048))]

    /// Whatever the request, an accepted one is within the export, uses only documented
    /// flags, respects the payload limit and never modifies a read-only export.
    #[test]
    fn accepted_requests_are_sane(
        l in any_limits(),
        command in (0u16..12).prop_map(Command::from_wire),
        flags in any::<u16>(),
        offset in prop_oneof![any::<u64>(), 0u64..4096],
        length in prop_oneof![any::<u64>(), 0u64..4096],
    ) {
        let r = req(command, flags, offset, length);
        let Ok(()) = validate(&r, &l) else { return Ok(()); };
        if command == Disconnect {
            return Ok(()); // never answered, so never refused
        }
        prop_assert_eq!(flags & !cf::KNOWN, 0);
        prop_assert!(!matches!(command, Resize | Unknown(_)));
        if matches!(command, Write | Trim | WriteZeroes) {
            prop_assert_eq!(l.flags & tf::READ_ONLY, 0);
        }
        if matches!(command, Read | Write | Trim | WriteZeroes | Cache | BlockStatus) {
            prop_assert!(offset.checked_add(length).is_some_and(|end| end <= l.size));
        }
        if matches!(command, Read | Write) {
            prop_assert!(length <= u64::from(l.max_payload));
        }
        if flags & cf::DF != 0 {
            prop_assert!(l.structured && command == Read);
        }
        if flags & cf::PAYLOAD_LEN != 0 {
            prop_assert!(l.extended && command == Write);
        }
        if command == BlockStatus {
            prop_assert!(l.has_contexts && length > 0);
        }
    }
}
