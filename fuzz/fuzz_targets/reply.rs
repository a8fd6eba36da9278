//! Decodes reply headers from arbitrary bytes in every reply mode and re-encodes what was
//! decoded with the matching encoder, comparing bytes.
//!
//! Input layout: byte 0 picks where the bytes are split into two chunks (to exercise
//! non-contiguous buffers); the rest is the wire.

#![no_main]

use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;
use strata::proto::consts::{reply_flags, reply_type};
use strata::proto::reply::{self, ChunkTarget, Descriptor, ReplyHeader, ReplyMode};

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn encoded(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut b = BytesMut::new();
    f(&mut b);
    b.to_vec()
}

/// Re-encodes a chunk with the dedicated encoder for its type when the payload is
/// available and well-formed; returns the bytes it should reproduce, or `None`.
fn specific(
    target: ChunkTarget,
    flags: u16,
    ty: u16,
    payload_len: u64,
    header: &[u8],
    payload: &[u8],
) -> Option<(Vec<u8>, Vec<u8>)> {
    let done = match flags {
        0 => false,
        reply_flags::DONE => true,
        _ => return None, // the encoders only ever set DONE
    };
    let len = usize::try_from(payload_len).ok()?;
    let whole = |n: usize| {
        let mut v = header.to_vec();
        v.extend_from_slice(&payload[..n]);
        v
    };
    let ext = target.mode == ReplyMode::Extended;
    match ty {
        reply_type::NONE if done && len == 0 => {
            Some((encoded(|b| reply::encode_done(b, target)), whole(0)))
        }
        reply_type::OFFSET_DATA if len >= 8 && payload.len() >= 8 => {
            let data_offset = be64(payload);
            let data_len = payload_len - 8;
            Some((
                encoded(|b| {
                    reply::encode_offset_data_header(b, target, done, data_offset, data_len)
                }),
                whole(8),
            ))
        }
        reply_type::OFFSET_HOLE if len == 12 && payload.len() >= 12 => {
            let (off, hole) = (be64(payload), be32(&payload[8..]));
            Some((
                encoded(|b| reply::encode_offset_hole(b, target, done, off, hole)),
                whole(12),
            ))
        }
        reply_type::BLOCK_STATUS
            if !ext && len >= 4 && (len - 4) % 8 == 0 && payload.len() >= len =>
        {
            let context = be32(payload);
            let d: Vec<Descriptor> = payload[4..len]
                .chunks(8)
                .map(|c| Descriptor {
                    length: u64::from(be32(c)),
                    flags: u64::from(be32(&c[4..])),
                })
                .collect();
            Some((
                encoded(|b| reply::encode_block_status(b, target, done, context, &d)),
                whole(len),
            ))
        }
        reply_type::BLOCK_STATUS_EXT
            if ext
                && len >= 8
                && (len - 8) % 16 == 0
                && payload.len() >= len
                && be32(&payload[4..]) as usize == (len - 8) / 16 =>
        {
            let context = be32(payload);
            let d: Vec<Descriptor> = payload[8..len]
                .chunks(16)
                .map(|c| Descriptor {
                    length: be64(c),
                    flags: be64(&c[8..]),
                })
                .collect();
            Some((
                encoded(|b| reply::encode_block_status(b, target, done, context, &d)),
                whole(len),
            ))
        }
        reply_type::ERROR | reply_type::ERROR_OFFSET if len >= 6 && payload.len() >= len => {
            let errno = be32(payload);
            let msg_len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
            let extra = if ty == reply_type::ERROR_OFFSET { 8 } else { 0 };
            if len != 6 + msg_len + extra || msg_len > 4096 {
                return None;
            }
            let message = std::str::from_utf8(&payload[6..6 + msg_len]).ok()?;
            let offset = (extra == 8).then(|| be64(&payload[6 + msg_len..]));
            Some((
                encoded(|b| reply::encode_error(b, target, done, errno, message, offset)),
                whole(len),
            ))
        }
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, wire)) = data.split_first() else {
        return;
    };
    for mode in [
        ReplyMode::Simple,
        ReplyMode::Structured,
        ReplyMode::Extended,
    ] {
        let mut src = wire;
        let decoded = ReplyHeader::decode(&mut src, mode);
        let consumed = wire.len() - src.len();

        // Split across two chunks anywhere (also inside the magic): same answer.
        let at = usize::from(split) % (wire.len() + 1);
        let mut chained = (&wire[..at]).chain(&wire[at..]);
        assert_eq!(ReplyHeader::decode(&mut chained, mode), decoded);
        if decoded.is_ok() {
            assert_eq!(chained.remaining(), src.len());
        }

        match decoded {
            Ok(None) => assert_eq!(consumed, 0),
            Err(_) => {}
            Ok(Some(ReplyHeader::Simple { errno, cookie })) => {
                assert_ne!(
                    mode,
                    ReplyMode::Extended,
                    "no simple replies with extended headers"
                );
                assert_eq!(consumed, reply::SIMPLE_LEN);
                let again = encoded(|b| reply::encode_simple(b, cookie, errno));
                assert_eq!(&again[..], &wire[..consumed]);
            }
            Ok(Some(ReplyHeader::Chunk {
                flags,
                ty,
                cookie,
                offset,
                payload_len,
            })) => {
                assert_ne!(
                    mode,
                    ReplyMode::Simple,
                    "no chunks without structured replies"
                );
                let target = ChunkTarget {
                    mode,
                    cookie,
                    offset,
                };
                if mode == ReplyMode::Structured {
                    assert_eq!(consumed, reply::STRUCTURED_LEN);
                    assert_eq!(offset, 0);
                } else {
                    assert_eq!(consumed, reply::EXTENDED_LEN);
                }
                let header = &wire[..consumed];
                let again =
                    encoded(|b| reply::encode_chunk_header(b, target, flags, ty, payload_len));
                assert_eq!(&again[..], header);
                if let Some((again, expected)) =
                    specific(target, flags, ty, payload_len, header, src)
                {
                    assert_eq!(again, expected, "type {ty:#x}");
                }
            }
        }
    }
});
