//! A raw NBD client over any stream (TCP or Unix, from `common::Endpoint::connect`),
//! for the hostile, fault, limit and soak suites: it sends exactly the bytes a test asks
//! for, well-formed or not, and reads replies in every mode.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::time::Duration;

use super::spec::*;

pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Anything a raw client can run over.
pub trait Io: Read + Write {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Io for std::net::TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, t)
    }
}

impl Io for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, t)
    }
}

/// A reply: simple, or the chunks of a structured/extended one (the last has DONE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        cookie: u64,
        errno: u32,
        data: Vec<u8>,
    },
    Chunks {
        cookie: u64,
        chunks: Vec<(u16, Vec<u8>)>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunks { cookie, .. } => *cookie,
        }
    }

    /// The errno and (structured modes) the message, if the reply is an error.
    pub fn error(&self) -> Option<(u32, String)> {
        match self {
            Reply::Simple { errno: 0, .. } => None,
            Reply::Simple { errno, .. } => Some((*errno, String::new())),
            Reply::Chunks { chunks, .. } => chunks.iter().find_map(|(ty, p)| {
                (ty & 0x8000 != 0).then(|| {
                    let errno = u32::from_be_bytes(p[0..4].try_into().unwrap());
                    let len = u16::from_be_bytes(p[4..6].try_into().unwrap()) as usize;
                    (errno, String::from_utf8_lossy(&p[6..6 + len]).into_owned())
                })
            }),
        }
    }

    /// The data of a successful read, holes filled with zeroes; `offset` is where the
    /// read started.
    pub fn data(&self, offset: u64, len: usize) -> Vec<u8> {
        match self {
            Reply::Simple { data, .. } => data.clone(),
            Reply::Chunks { chunks, .. } => {
                let mut out = vec![0u8; len];
                for (ty, p) in chunks {
                    let at = |p: &[u8]| {
                        (u64::from_be_bytes(p[0..8].try_into().unwrap()) - offset) as usize
                    };
                    match *ty {
                        CHUNK_OFFSET_DATA => {
                            let start = at(p);
                            out[start..start + p.len() - 8].copy_from_slice(&p[8..]);
                        }
                        CHUNK_OFFSET_HOLE => {}
                        _ => {}
                    }
                }
                out
            }
        }
    }
}

/// Negotiated mode of a raw connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mode {
    pub structured: bool,
    pub extended: bool,
}

pub struct Raw<S: Io> {
    pub s: S,
    pub mode: Mode,
    pub size: u64,
    pub flags: u16,
    next_cookie: u64,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}

/// An option message: IHAVEOPT, the option, the announced length, then `data`.
pub fn option_bytes(option: u32, announced: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&announced.to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// The data of a GO or INFO option for export `name` with the given info requests.
pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// A request header, compact or extended.
pub fn request_bytes(
    extended: bool,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(32);
    if extended {
        m.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    } else {
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
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

impl<S: Io> Raw<S> {
    /// Wraps a connected stream; nothing is read yet.
    pub fn new(s: S) -> Raw<S> {
        Raw {
            s,
            mode: Mode::default(),
            size: 0,
            flags: 0,
            next_cookie: 1,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)?;
        self.s.flush()
    }

    pub fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }

    /// Reads the 18-byte greeting and checks its magic numbers.
    pub fn greeting(&mut self) -> io::Result<u16> {
        let g = self.read_exact(18)?;
        if be64(&g[0..8]) != NBDMAGIC || be64(&g[8..16]) != IHAVEOPT {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad greeting"));
        }
        Ok(be16(&g[16..18]))
    }

    /// Greeting, then FIXED_NEWSTYLE | NO_ZEROES.
    pub fn start(&mut self) -> io::Result<()> {
        self.greeting()?;
        self.send(&3u32.to_be_bytes())
    }

    /// One option reply: (option, type, data).
    pub fn opt_reply(&mut self) -> io::Result<(u32, u32, Vec<u8>)> {
        let h = self.read_exact(20)?;
        let len = be32(&h[16..20]) as usize;
        let data = self.read_exact(len)?;
        Ok((be32(&h[8..12]), be32(&h[12..16]), data))
    }

    /// Sends an option and returns the type of its (last) reply, skipping INFO and
    /// SERVER and META_CONTEXT replies that precede it.
    pub fn opt(&mut self, option: u32, data: &[u8]) -> io::Result<u32> {
        self.send(&option_bytes(option, data.len() as u32, data))?;
        loop {
            let (_, ty, _) = self.opt_reply()?;
            if ty != REP_INFO && ty != REP_SERVER && ty != REP_META_CONTEXT {
                return Ok(ty);
            }
        }
    }

    /// A full handshake to `name`: structured replies and extended headers as asked,
    /// then GO. Returns the size.
    pub fn handshake(&mut self, name: &str, mode: Mode) -> io::Result<u64> {
        self.start()?;
        if mode.extended {
            let ty = self.opt(OPT_EXTENDED_HEADERS, &[])?;
            assert_eq!(ty, REP_ACK, "extended headers refused");
        } else if mode.structured {
            let ty = self.opt(OPT_STRUCTURED_REPLY, &[])?;
            assert_eq!(ty, REP_ACK, "structured replies refused");
        }
        self.go(name)?;
        self.mode = Mode {
            structured: mode.structured || mode.extended,
            extended: mode.extended,
        };
        Ok(self.size)
    }

    /// GO for `name`, recording size and flags.
    pub fn go(&mut self, name: &str) -> io::Result<()> {
        self.send(&option_bytes(
            OPT_GO,
            go_data(name, &[]).len() as u32,
            &go_data(name, &[]),
        ))?;
        loop {
            let (_, ty, data) = self.opt_reply()?;
            match ty {
                REP_INFO if be16(&data[0..2]) == INFO_EXPORT => {
                    self.size = be64(&data[2..10]);
                    self.flags = be16(&data[10..12]);
                }
                REP_INFO => {}
                REP_ACK => return Ok(()),
                other => {
                    return Err(io::Error::other(format!("GO refused: {other:#x}")));
                }
            }
        }
    }

    /// Sends a request with a fresh cookie and returns the cookie.
    pub fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut m = request_bytes(self.mode.extended, flags, cmd, cookie, offset, len);
        m.extend_from_slice(payload);
        self.send(&m)?;
        Ok(cookie)
    }

    /// Reads one whole reply. `read_len` tells how much data a simple reply to a read
    /// carries (the protocol does not say): pass the read's length, or 0.
    pub fn reply(&mut self, read_len: usize) -> io::Result<Reply> {
        let magic = be32(&self.read_exact(4)?);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let h = self.read_exact(12)?;
                let errno = be32(&h[0..4]);
                let cookie = be64(&h[4..12]);
                let data = if errno == 0 && read_len > 0 {
                    self.read_exact(read_len)?
                } else {
                    Vec::new()
                };
                Ok(Reply::Simple {
                    cookie,
                    errno,
                    data,
                })
            }
            STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
                let mut chunks = Vec::new();
                let mut magic = magic;
                loop {
                    let extended = magic == EXTENDED_REPLY_MAGIC;
                    let h = self.read_exact(if extended { 28 } else { 16 })?;
                    let flags = be16(&h[0..2]);
                    let ty = be16(&h[2..4]);
                    let cookie = be64(&h[4..12]);
                    let len = if extended {
                        be64(&h[20..28]) as usize
                    } else {
                        be32(&h[12..16]) as usize
                    };
                    let payload = self.read_exact(len)?;
                    if ty != CHUNK_NONE {
                        chunks.push((ty, payload));
                    }
                    if flags & 1 != 0 {
                        return Ok(Reply::Chunks { cookie, chunks });
                    }
                    magic = be32(&self.read_exact(4)?);
                }
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad reply magic {other:#x}"),
            )),
        }
    }

    /// Writes and waits for the answer; the errno and message of an error.
    pub fn write(
        &mut self,
        flags: u16,
        offset: u64,
        data: &[u8],
    ) -> io::Result<Result<(), (u32, String)>> {
        self.request(flags, CMD_WRITE, offset, data.len() as u64, data)?;
        Ok(self.reply(0)?.error().map_or(Ok(()), Err))
    }

    pub fn flush(&mut self) -> io::Result<Result<(), (u32, String)>> {
        self.request(0, CMD_FLUSH, 0, 0, &[])?;
        Ok(self.reply(0)?.error().map_or(Ok(()), Err))
    }

    pub fn read(&mut self, offset: u64, len: usize) -> io::Result<Result<Vec<u8>, (u32, String)>> {
        self.request(0, CMD_READ, offset, len as u64, &[])?;
        let r = self.reply(len)?;
        Ok(match r.error() {
            Some(e) => Err(e),
            None => Ok(r.data(offset, len)),
        })
    }

    /// A simple command without payload (trim, zero, cache, block status...).
    pub fn command(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u64,
    ) -> io::Result<Result<(), (u32, String)>> {
        self.request(flags, cmd, offset, len, &[])?;
        Ok(self.reply(0)?.error().map_or(Ok(()), Err))
    }

    /// Sends DISC.
    pub fn disconnect(&mut self) -> io::Result<()> {
        self.request(0, CMD_DISC, 0, 0, &[]).map(|_| ())
    }

    /// True if the server closes the connection (end of stream or reset) within
    /// `within`, whatever it sends first.
    pub fn closed_by_server(&mut self, within: Duration) -> bool {
        let _ = self.s.set_read_timeout(Some(within));
        let mut buf = [0u8; 65536];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}

impl Io for crate::common::Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            crate::common::Stream::Tcp(s) => s.set_read_timeout(t),
            crate::common::Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}
