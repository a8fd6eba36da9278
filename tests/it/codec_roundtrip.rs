//! Property tests for the transmission-phase codec: request headers round-trip in both
//! header styles, every reply encoder is understood by `ReplyHeader::decode`, and decoding
//! never panics and never consumes a partial header.

use bytes::{Buf, BytesMut};
use proptest::prelude::*;
use strata::proto::consts::{reply_flags, reply_type};
use strata::proto::reply::{self, ChunkTarget, Descriptor, ReplyHeader, ReplyMode};
use strata::proto::{Command, RequestHeader};

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (0u16..=8).prop_map(Command::from_wire),
        any::<u16>().prop_map(Command::from_wire),
    ]
}

/// Any request header; its length fits the header style (32 bits in a compact header).
fn request_header(extended: bool) -> impl Strategy<Value = RequestHeader> {
    let length = if extended {
        any::<u64>().boxed()
    } else {
        any::<u32>().prop_map(u64::from).boxed()
    };
    (any::<u16>(), command(), any::<u64>(), any::<u64>(), length).prop_map(
        |(flags, command, cookie, offset, length)| RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        },
    )
}

fn encode_request(h: &RequestHeader, extended: bool) -> Vec<u8> {
    let mut b = BytesMut::new();
    h.encode(&mut b, extended);
    b.to_vec()
}

/// `h` encodes to `len` bytes starting with `magic`, and decodes back from them when
/// `trailing` follows, consuming exactly one header.
fn request_roundtrip(
    h: RequestHeader,
    extended: bool,
    (len, magic): (usize, u32),
    trailing: &[u8],
) -> Result<(), TestCaseError> {
    let mut wire = encode_request(&h, extended);
    prop_assert_eq!(wire.len(), len);
    prop_assert_eq!(&wire[..4], &magic.to_be_bytes()[..]);
    wire.extend_from_slice(trailing);
    let mut src = &wire[..];
    prop_assert_eq!(RequestHeader::decode(&mut src, extended), Ok(Some(h)));
    prop_assert_eq!(src, trailing, "exactly one header consumed");
    Ok(())
}

/// Decodes from a buffer split in two non-contiguous chunks.
fn split_buf(bytes: &[u8], at: usize) -> impl Buf + '_ {
    let at = at.min(bytes.len());
    let (a, b) = bytes.split_at(at);
    a.chain(b)
}

/// The reply mode an encoder call is valid in: simple replies exist in simple and
/// structured mode, chunks in structured and extended mode. Also says whether `call`
/// encodes a simple reply.
fn mode_for(call: &Encode, extended: bool) -> (ReplyMode, bool) {
    let simple = matches!(call, Encode::Simple { .. });
    let mode = match (simple, extended) {
        (true, false) => ReplyMode::Simple,
        (true, true) | (false, false) => ReplyMode::Structured,
        (false, true) => ReplyMode::Extended,
    };
    (mode, simple)
}

proptest! {
    #![proptest_config(crate::support::proptest_cases(512))]

    #[test]
    fn compact_request_roundtrip(h in request_header(false), trailing in prop::collection::vec(any::<u8>(), 0..8)) {
        request_roundtrip(h, false, (RequestHeader::COMPACT_LEN, 0x2560_9513), &trailing)?;
    }

    #[test]
    fn extended_request_roundtrip(h in request_header(true), trailing in prop::collection::vec(any::<u8>(), 0..8)) {
        request_roundtrip(h, true, (RequestHeader::EXTENDED_LEN, 0x21e4_1c71), &trailing)?;
    }

    #[test]
    fn request_strict_prefix_needs_more(h in request_header(true), extended in any::<bool>(), cut in 0usize..32) {
        let h = if extended { h } else { RequestHeader { length: h.length & 0xffff_ffff, ..h } };
        let wire = encode_request(&h, extended);
        let cut = cut % wire.len();
        let mut src = &wire[..cut];
        prop_assert_eq!(RequestHeader::decode(&mut src, extended), Ok(None));
        prop_assert_eq!(src.len(), cut, "nothing consumed");
    }

    #[test]
    fn request_decode_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64), extended in any::<bool>(), at in 0usize..64) {
        let mut src = &bytes[..];
        let contiguous = RequestHeader::decode(&mut src, extended);
        if let Ok(Some(h)) = &contiguous {
            let need = RequestHeader::wire_len(extended);
            prop_assert_eq!(src.len(), bytes.len() - need);
            prop_assert_eq!(&encode_request(h, extended)[..], &bytes[..need]);
        }
        let mut split = split_buf(&bytes, at);
        prop_assert_eq!(RequestHeader::decode(&mut split, extended), contiguous);
    }
}

/// One call of a reply encoder.
#[derive(Debug, Clone)]
enum Encode {
    Simple {
        errno: u32,
    },
    Header {
        flags: u16,
        ty: u16,
        payload_len: u64,
    },
    Done,
    OffsetData {
        done: bool,
        data_offset: u64,
        data_len: u32,
    },
    Hole {
        done: bool,
        hole_offset: u64,
        hole_len: u32,
    },
    BlockStatus {
        done: bool,
        context: u32,
        descriptors: Vec<(u64, u64)>,
    },
    Error {
        done: bool,
        errno: u32,
        message: String,
        offset: Option<u64>,
    },
}

fn encode_call() -> impl Strategy<Value = Encode> {
    prop_oneof![
        any::<u32>().prop_map(|errno| Encode::Simple { errno }),
        (any::<u16>(), any::<u16>(), any::<u32>()).prop_map(|(flags, ty, len)| Encode::Header {
            flags,
            ty,
            payload_len: u64::from(len)
        }),
        Just(Encode::Done),
        (any::<bool>(), any::<u64>(), any::<u32>()).prop_map(|(done, data_offset, data_len)| {
            Encode::OffsetData {
                done,
                data_offset,
                data_len,
            }
        }),
        (any::<bool>(), any::<u64>(), any::<u32>()).prop_map(|(done, hole_offset, hole_len)| {
            Encode::Hole {
                done,
                hole_offset,
                hole_len,
            }
        }),
        (
            any::<bool>(),
            any::<u32>(),
            prop::collection::vec((any::<u32>(), any::<u32>()), 1..8)
        )
            .prop_map(|(done, context, d)| Encode::BlockStatus {
                done,
                context,
                descriptors: d
                    .into_iter()
                    .map(|(l, f)| (u64::from(l), u64::from(f)))
                    .collect()
            }),
        (
            any::<bool>(),
            any::<u32>(),
            "\\PC{0,40}",
            prop::option::of(any::<u64>())
        )
            .prop_map(|(done, errno, message, offset)| Encode::Error {
                done,
                errno,
                message,
                offset
            }),
    ]
}

/// Expected (flags, type, payload length) and the number of payload bytes the encoder
/// itself writes after the header.
fn expected(call: &Encode) -> (u16, u16, u64, usize) {
    let done = |d: bool| if d { reply_flags::DONE } else { 0 };
    match call {
        Encode::Simple { .. } => unreachable!(),
        Encode::Header {
            flags,
            ty,
            payload_len,
        } => (*flags, *ty, *payload_len, 0),
        Encode::Done => (reply_flags::DONE, reply_type::NONE, 0, 0),
        Encode::OffsetData {
            done: d, data_len, ..
        } => (
            done(*d),
            reply_type::OFFSET_DATA,
            8 + u64::from(*data_len),
            8,
        ),
        Encode::Hole { done: d, .. } => (done(*d), reply_type::OFFSET_HOLE, 12, 12),
        Encode::BlockStatus {
            done: d,
            descriptors,
            ..
        } => {
            let n = descriptors.len();
            (
                done(*d),
                reply_type::BLOCK_STATUS,
                (4 + 8 * n) as u64,
                4 + 8 * n,
            )
        }
        Encode::Error {
            done: d,
            message,
            offset,
            ..
        } => {
            let extra = if offset.is_some() { 8 } else { 0 };
            let ty = if offset.is_some() {
                reply_type::ERROR_OFFSET
            } else {
                reply_type::ERROR
            };
            let n = 6 + message.len() + extra;
            (done(*d), ty, n as u64, n)
        }
    }
}

fn run_encoder(call: &Encode, target: ChunkTarget, dst: &mut BytesMut) {
    match call {
        Encode::Simple { errno } => reply::encode_simple(dst, target.cookie, *errno),
        Encode::Header {
            flags,
            ty,
            payload_len,
        } => reply::encode_chunk_header(dst, target, *flags, *ty, *payload_len),
        Encode::Done => reply::encode_done(dst, target),
        Encode::OffsetData {
            done,
            data_offset,
            data_len,
        } => {
            reply::encode_offset_data_header(dst, target, *done, *data_offset, u64::from(*data_len))
        }
        Encode::Hole {
            done,
            hole_offset,
            hole_len,
        } => reply::encode_offset_hole(dst, target, *done, *hole_offset, *hole_len),
        Encode::BlockStatus {
            done,
            context,
            descriptors,
        } => {
            let d: Vec<Descriptor> = descriptors
                .iter()
                .map(|&(length, flags)| Descriptor { length, flags })
                .collect();
            reply::encode_block_status(dst, target, *done, *context, &d)
        }
        Encode::Error {
            done,
            errno,
            message,
            offset,
        } => reply::encode_error(dst, target, *done, *errno, message, *offset),
    }
}

fn header_len(mode: ReplyMode, simple: bool) -> usize {
    match (mode, simple) {
        (_, true) => reply::SIMPLE_LEN,
        (ReplyMode::Structured, false) => reply::STRUCTURED_LEN,
        (ReplyMode::Extended, false) => reply::EXTENDED_LEN,
        (ReplyMode::Simple, false) => unreachable!(),
    }
}

proptest! {
    #![proptest_config(crate::support::proptest_cases(512))]

    #[test]
    fn reply_encoders_decode(call in encode_call(), extended in any::<bool>(), cookie in any::<u64>(), offset in any::<u64>()) {
        let (mode, simple) = mode_for(&call, extended);
        // BLOCK_STATUS_EXT is what extended mode produces for block status.
        let call = match (call, mode) {
            (Encode::BlockStatus { done, context, descriptors }, ReplyMode::Extended) => {
                let mut wire = BytesMut::new();
                let target = ChunkTarget { mode, cookie, offset };
                let d: Vec<Descriptor> = descriptors.iter().map(|&(length, flags)| Descriptor { length, flags }).collect();
                reply::encode_block_status(&mut wire, target, done, context, &d);
                let n = descriptors.len();
                let mut src = &wire[..];
                let h = ReplyHeader::decode(&mut src, mode).unwrap().unwrap();
                prop_assert_eq!(h, ReplyHeader::Chunk {
                    flags: if done { reply_flags::DONE } else { 0 },
                    ty: reply_type::BLOCK_STATUS_EXT,
                    cookie,
                    offset,
                    payload_len: (8 + 16 * n) as u64,
                });
                prop_assert_eq!(src.len(), 8 + 16 * n);
                prop_assert_eq!(u32::from_be_bytes(src[..4].try_into().unwrap()), context);
                prop_assert_eq!(u32::from_be_bytes(src[4..8].try_into().unwrap()) as usize, n);
                return Ok(());
            }
            (call, _) => call,
        };
        let target = ChunkTarget { mode, cookie, offset };
        let mut wire = BytesMut::new();
        run_encoder(&call, target, &mut wire);
        let mut src = &wire[..];
        let decoded = ReplyHeader::decode(&mut src, mode);
        let header = header_len(mode, simple);
        prop_assert_eq!(src.len(), wire.len() - header);
        if let Encode::Simple { errno } = call {
            prop_assert_eq!(decoded, Ok(Some(ReplyHeader::Simple { errno, cookie })));
            prop_assert_eq!(wire.len(), 16);
        } else {
            let (flags, ty, payload_len, written) = expected(&call);
            let echoed = if mode == ReplyMode::Extended { offset } else { 0 };
            prop_assert_eq!(decoded, Ok(Some(ReplyHeader::Chunk { flags, ty, cookie, offset: echoed, payload_len })));
            prop_assert_eq!(src.len(), written);
        }
    }

    #[test]
    fn reply_strict_prefix_needs_more(call in encode_call(), extended in any::<bool>(), cookie in any::<u64>(), cut in 0usize..32) {
        let (mode, simple) = mode_for(&call, extended);
        let mut wire = BytesMut::new();
        run_encoder(&call, ChunkTarget { mode, cookie, offset: 0 }, &mut wire);
        let cut = cut % header_len(mode, simple);
        let mut src = &wire[..cut];
        prop_assert_eq!(ReplyHeader::decode(&mut src, mode), Ok(None));
        prop_assert_eq!(src.len(), cut, "nothing consumed");
    }

    #[test]
    fn reply_decode_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..48), at in 0usize..48) {
        for mode in [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended] {
            let mut src = &bytes[..];
            let contiguous = ReplyHeader::decode(&mut src, mode);
            match &contiguous {
                Ok(None) => prop_assert_eq!(src.len(), bytes.len()),
                Ok(Some(ReplyHeader::Simple { .. })) => prop_assert_eq!(src.len(), bytes.len() - 16),
                Ok(Some(ReplyHeader::Chunk { .. })) => {
                    let n = if mode == ReplyMode::Extended { 32 } else { 20 };
                    prop_assert_eq!(src.len(), bytes.len() - n);
                }
                Err(_) => {}
            }
            // The same bytes in two chunks decode the same way.
            let mut split = split_buf(&bytes, at);
            prop_assert_eq!(ReplyHeader::decode(&mut split, mode), contiguous);
        }
    }

    /// Valid headers survive being split across chunks anywhere, including inside the magic.
    #[test]
    fn reply_decode_split_valid_header(call in encode_call(), extended in any::<bool>(), cookie in any::<u64>(), at in 0usize..40) {
        let (mode, simple) = mode_for(&call, extended);
        let mut wire = BytesMut::new();
        run_encoder(&call, ChunkTarget { mode, cookie, offset: 3 }, &mut wire);
        let contiguous = ReplyHeader::decode(&mut &wire[..], mode);
        prop_assert!(matches!(contiguous, Ok(Some(_))));
        let mut split = split_buf(&wire, at);
        prop_assert_eq!(ReplyHeader::decode(&mut split, mode), contiguous);
        prop_assert_eq!(split.remaining(), wire.len() - header_len(mode, simple));
    }
}

#[test]
fn reply_magic_split_across_chunks() {
    // The four magic bytes arrive as 2 + 2: the decoder must not index past the first chunk.
    let wire = [0x67u8, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let mut src = (&wire[..2]).chain(&wire[2..]);
    assert_eq!(
        ReplyHeader::decode(&mut src, ReplyMode::Simple),
        Ok(Some(ReplyHeader::Simple {
            errno: 0,
            cookie: 0x0102_0304_0506_0708
        }))
    );
    // Incomplete and split: nothing consumed.
    let mut src = (&wire[..1]).chain(&wire[1..10]);
    assert_eq!(ReplyHeader::decode(&mut src, ReplyMode::Simple), Ok(None));
    assert_eq!(src.remaining(), 10);
}
