//! NBD messages built and taken apart byte by byte from the specification's field
//! layout, for the socket client and for the codec tests, which must not trust the
//! crate's own encoders. Builders take the fields as they are, so a test can also lie
//! about a length.

use super::spec::{
    CHUNK_BLOCK_STATUS, CHUNK_BLOCK_STATUS_EXT, EXTENDED_REQUEST_MAGIC, IHAVEOPT, REP_INFO,
    REPLY_FLAG_DONE, REPLY_MAGIC, REQUEST_MAGIC,
};

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().expect("two bytes"))
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("four bytes"))
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("eight bytes"))
}

/// An option: `IHAVEOPT`, the option code, the length of `data`, then `data`.
pub fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    opt_announcing(option, data.len() as u32, data)
}

/// An option that announces `announced` bytes of data, whatever `data` holds.
pub fn opt_announcing(option: u32, announced: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&announced.to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// Data of `INFO`/`GO`: name length, name, request count, requests.
pub fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

/// Data of `LIST_META_CONTEXT`/`SET_META_CONTEXT`: export name, query count, queries.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// A request header, compact (a 32-bit length) or extended (a 64-bit one); the payload,
/// if any, follows it.
pub fn request(
    extended: bool,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    let mut m = magic.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&cmd.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    if extended {
        m.extend_from_slice(&len.to_be_bytes());
    } else {
        m.extend_from_slice(&(len as u32).to_be_bytes());
    }
    m
}

/// One fixed-newstyle option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub ty: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    /// The reply as it appears on the wire.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut v = REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&self.option.to_be_bytes());
        v.extend_from_slice(&self.ty.to_be_bytes());
        v.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.data);
        v
    }

    /// The reply `bytes` start with, and its length on the wire; None unless `bytes`
    /// start with a whole option reply.
    pub fn decode(bytes: &[u8]) -> Option<(OptReply, usize)> {
        if bytes.len() < 20 || be64(&bytes[..8]) != REPLY_MAGIC {
            return None;
        }
        let len = 20 + be32(&bytes[16..20]) as usize;
        let reply = OptReply {
            option: be32(&bytes[8..12]),
            ty: be32(&bytes[12..16]),
            data: bytes.get(20..len)?.to_vec(),
        };
        Some((reply, len))
    }

    /// For `REP_INFO`: the information type.
    pub fn info_type(&self) -> Option<u16> {
        (self.ty == REP_INFO && self.data.len() >= 2).then(|| be16(&self.data[..2]))
    }

    pub fn is_error(&self) -> bool {
        self.ty & 0x8000_0000 != 0
    }
}

/// The (length, status) descriptors a block status chunk holds for one context.
pub type Descriptors = Vec<(u64, u64)>;

/// One chunk of a structured reply (compact or extended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    /// The request's offset, echoed by extended chunks (0 in compact ones).
    pub offset: u64,
    pub payload: Vec<u8>,
}

impl Chunk {
    /// The last chunk of its reply.
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// The errno and message of an error chunk.
    pub fn error(&self) -> Option<(u32, String)> {
        if self.ty & 0x8000 == 0 {
            return None;
        }
        let p = &self.payload;
        let len = be16(&p[4..6]) as usize;
        Some((
            be32(&p[..4]),
            String::from_utf8_lossy(&p[6..6 + len]).into_owned(),
        ))
    }

    /// The metadata context id and the (length, status) descriptors of a block status
    /// chunk, checking its framing: the chunk type of the reply mode, a payload length
    /// that matches the descriptor count.
    pub fn block_status(&self, extended: bool) -> Result<(u32, Descriptors), String> {
        let p = &self.payload;
        let id = be32(&p[..4]);
        let (want, start, width) = if extended {
            (CHUNK_BLOCK_STATUS_EXT, 8, 16)
        } else {
            (CHUNK_BLOCK_STATUS, 4, 8)
        };
        if self.ty != want {
            return Err(format!("chunk type {} in a block status reply", self.ty));
        }
        let whole = (p.len() - start) % width == 0;
        if !whole || (extended && be32(&p[4..8]) as usize != (p.len() - 8) / 16) {
            return Err(format!("block status payload of {} bytes", p.len()));
        }
        let half = width / 2;
        let field = |b: &[u8]| {
            if extended {
                be64(b)
            } else {
                u64::from(be32(b))
            }
        };
        let descriptors = p[start..]
            .chunks(width)
            .map(|d| (field(&d[..half]), field(&d[half..])))
            .collect();
        Ok((id, descriptors))
    }
}
