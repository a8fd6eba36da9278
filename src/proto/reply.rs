//! Transmission-phase replies: simple replies and structured/extended chunks.
//!
//! Encoders write headers (and small payloads) into a `BufMut`; bulk read data is never
//! copied here: the session sends it as a separate buffer right after the header that
//! [`encode_offset_data_header`] produced.

use bytes::{Buf, BufMut};

use super::ProtocolError;
use super::consts::{
    EXTENDED_REPLY_MAGIC, MAX_STRING, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, reply_flags,
    reply_type,
};

/// Which reply format the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// Simple replies only (no structured replies negotiated).
    Simple,
    /// 20-byte structured chunk headers.
    Structured,
    /// 32-byte extended chunk headers.
    Extended,
}

impl ReplyMode {
    /// True when chunked replies are in use.
    pub fn is_structured(self) -> bool {
        self != ReplyMode::Simple
    }
}

/// Size of a simple reply header.
pub const SIMPLE_LEN: usize = 16;
/// Size of a structured chunk header.
pub const STRUCTURED_LEN: usize = 20;
/// Size of an extended chunk header.
pub const EXTENDED_LEN: usize = 32;

/// Writes a simple reply header. For a successful read the data follows it.
pub fn encode_simple(dst: &mut impl BufMut, cookie: u64, errno: u32) {
    dst.put_u32(SIMPLE_REPLY_MAGIC);
    dst.put_u32(errno);
    dst.put_u64(cookie);
}

/// The fields shared by every chunk of one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkTarget {
    /// Structured or extended (never simple).
    pub mode: ReplyMode,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset; extended headers echo it in every chunk.
    pub offset: u64,
}

/// Writes a chunk header announcing `payload_len` bytes of payload.
///
/// # Panics
/// In structured (20-byte) mode when `payload_len` exceeds 32 bits, or in simple mode;
/// both are programming errors in the caller.
pub fn encode_chunk_header(
    dst: &mut impl BufMut,
    target: ChunkTarget,
    flags: u16,
    ty: u16,
    payload_len: u64,
) {
    match target.mode {
        ReplyMode::Structured => {
            dst.put_u32(STRUCTURED_REPLY_MAGIC);
            dst.put_u16(flags);
            dst.put_u16(ty);
            dst.put_u64(target.cookie);
            dst.put_u32(u32::try_from(payload_len).expect("structured chunk payload fits u32"));
        }
        ReplyMode::Extended => {
            dst.put_u32(EXTENDED_REPLY_MAGIC);
            dst.put_u16(flags);
            dst.put_u16(ty);
            dst.put_u64(target.cookie);
            dst.put_u64(target.offset);
            dst.put_u64(payload_len);
        }
        ReplyMode::Simple => panic!("chunk header requested without structured replies"),
    }
}

fn done_flag(done: bool) -> u16 {
    if done { reply_flags::DONE } else { 0 }
}

/// Final chunk with no payload: the request succeeded (after any earlier chunks).
pub fn encode_done(dst: &mut impl BufMut, target: ChunkTarget) {
    encode_chunk_header(dst, target, reply_flags::DONE, reply_type::NONE, 0);
}

/// Header of an `OFFSET_DATA` chunk carrying `data_len` bytes read at `data_offset`; the
/// caller sends the data itself right after.
pub fn encode_offset_data_header(
    dst: &mut impl BufMut,
    target: ChunkTarget,
    done: bool,
    data_offset: u64,
    data_len: u64,
) {
    encode_chunk_header(
        dst,
        target,
        done_flag(done),
        reply_type::OFFSET_DATA,
        8 + data_len,
    );
    dst.put_u64(data_offset);
}

/// An `OFFSET_HOLE` chunk: `hole_len` bytes of zeroes at `hole_offset`.
pub fn encode_offset_hole(
    dst: &mut impl BufMut,
    target: ChunkTarget,
    done: bool,
    hole_offset: u64,
    hole_len: u32,
) {
    encode_chunk_header(dst, target, done_flag(done), reply_type::OFFSET_HOLE, 12);
    dst.put_u64(hole_offset);
    dst.put_u32(hole_len);
}

/// One block-status descriptor: a run of `length` bytes with the given state flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Bytes covered.
    pub length: u64,
    /// Context-specific flags (`NBD_STATE_*` for `base:allocation`).
    pub flags: u64,
}

/// A block-status chunk for one metadata context. Uses `BLOCK_STATUS_EXT` with extended
/// headers and `BLOCK_STATUS` otherwise.
///
/// # Panics
/// In structured mode when a descriptor's length or flags exceed 32 bits: the caller
/// clamps lengths before encoding.
pub fn encode_block_status(
    dst: &mut impl BufMut,
    target: ChunkTarget,
    done: bool,
    context_id: u32,
    descriptors: &[Descriptor],
) {
    let n = descriptors.len() as u64;
    if target.mode == ReplyMode::Extended {
        encode_chunk_header(
            dst,
            target,
            done_flag(done),
            reply_type::BLOCK_STATUS_EXT,
            8 + 16 * n,
        );
        dst.put_u32(context_id);
        dst.put_u32(u32::try_from(n).expect("descriptor count fits u32"));
        for d in descriptors {
            dst.put_u64(d.length);
            dst.put_u64(d.flags);
        }
    } else {
        encode_chunk_header(
            dst,
            target,
            done_flag(done),
            reply_type::BLOCK_STATUS,
            4 + 8 * n,
        );
        dst.put_u32(context_id);
        for d in descriptors {
            dst.put_u32(u32::try_from(d.length).expect("descriptor length fits u32"));
            dst.put_u32(u32::try_from(d.flags).expect("descriptor flags fit u32"));
        }
    }
}

/// Truncates `message` to the protocol's string limit on a character boundary.
fn clamp_message(message: &str) -> &str {
    if message.len() <= MAX_STRING {
        return message;
    }
    let mut end = MAX_STRING;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// An `ERROR` chunk (or `ERROR_OFFSET` when `error_offset` is given) with a human-readable
/// message.
pub fn encode_error(
    dst: &mut impl BufMut,
    target: ChunkTarget,
    done: bool,
    errno: u32,
    message: &str,
    error_offset: Option<u64>,
) {
    let message = clamp_message(message);
    let (ty, extra) = match error_offset {
        Some(_) => (reply_type::ERROR_OFFSET, 8),
        None => (reply_type::ERROR, 0),
    };
    encode_chunk_header(
        dst,
        target,
        done_flag(done),
        ty,
        6 + message.len() as u64 + extra,
    );
    dst.put_u32(errno);
    dst.put_u16(message.len() as u16);
    dst.put_slice(message.as_bytes());
    if let Some(off) = error_offset {
        dst.put_u64(off);
    }
}

/// A reply header as a client sees it: the parsing half of this module, used by tests,
/// fuzzers and client tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple {
        /// Error number (0 for success).
        errno: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured or extended chunk header; `payload_len` bytes follow.
    Chunk {
        /// Chunk flags.
        flags: u16,
        /// Chunk type.
        ty: u16,
        /// The request's cookie.
        cookie: u64,
        /// Echoed request offset (extended headers only, else 0).
        offset: u64,
        /// Payload length.
        payload_len: u64,
    },
}

/// Reads the first four bytes of `src` without consuming them, even when they are split
/// across chunks. `None` only for a `Buf` whose `chunks_vectored` does not expose them.
fn peek_u32(src: &impl Buf) -> Option<u32> {
    let mut magic = [0u8; 4];
    let chunk = src.chunk();
    if chunk.len() >= 4 {
        magic.copy_from_slice(&chunk[..4]);
        return Some(u32::from_be_bytes(magic));
    }
    let mut slices = [std::io::IoSlice::new(&[]); 4];
    let n = src.chunks_vectored(&mut slices);
    let mut filled = 0;
    for slice in &slices[..n] {
        let take = (4 - filled).min(slice.len());
        magic[filled..filled + take].copy_from_slice(&slice[..take]);
        filled += take;
        if filled == 4 {
            return Some(u32::from_be_bytes(magic));
        }
    }
    None
}

impl ReplyHeader {
    /// Decodes one reply header from `src` in the given mode, consuming it. Returns
    /// `Ok(None)` and consumes nothing while the header is incomplete.
    pub fn decode(src: &mut impl Buf, mode: ReplyMode) -> Result<Option<Self>, ProtocolError> {
        if src.remaining() < 4 {
            return Ok(None);
        }
        // The magic may straddle chunks of a non-contiguous `Buf` (e.g. `Chain`): indexing
        // `chunk()[..4]` would panic there, so peek across chunks instead.
        let Some(magic) = peek_u32(src) else {
            return Ok(None);
        };
        let need = match (magic, mode) {
            (SIMPLE_REPLY_MAGIC, ReplyMode::Simple | ReplyMode::Structured) => SIMPLE_LEN,
            (STRUCTURED_REPLY_MAGIC, ReplyMode::Structured) => STRUCTURED_LEN,
            (EXTENDED_REPLY_MAGIC, ReplyMode::Extended) => EXTENDED_LEN,
            _ => return Err(ProtocolError::BadReplyMagic(magic)),
        };
        if src.remaining() < need {
            return Ok(None);
        }
        src.advance(4);
        Ok(Some(match magic {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                errno: src.get_u32(),
                cookie: src.get_u64(),
            },
            STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: src.get_u16(),
                ty: src.get_u16(),
                cookie: src.get_u64(),
                offset: 0,
                payload_len: u64::from(src.get_u32()),
            },
            _ => ReplyHeader::Chunk {
                flags: src.get_u16(),
                ty: src.get_u16(),
                cookie: src.get_u64(),
                offset: src.get_u64(),
                payload_len: src.get_u64(),
            },
        }))
    }
}
