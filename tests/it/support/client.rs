//! A deliberately small, blocking NBD client that speaks raw protocol bytes over TCP or
//! a Unix socket: it sends exactly what a test asks for, what a particular client sends
//! or what no well-behaved client would, and reads replies in every mode (simple,
//! structured, extended). Every call returns `io::Result`, so that a test can go on when
//! the server hangs up or dies; what the server answers that the protocol does not allow
//! is an `InvalidData` error.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::Endpoint;
use super::spec::*;
use super::wire::{
    Chunk, Descriptors, OptReply, be16, be32, be64, info_data, meta_data, opt, request,
};

/// A client socket, TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// True if the peer closes the connection (end of stream or reset) within `within`,
    /// after whatever it sends first.
    pub fn closed_by_server(&mut self, within: Duration) -> bool {
        self.wait_close(within, true)
    }

    /// True if the next thing the peer does, within `within`, is to close the
    /// connection (end of stream or reset), sending nothing more.
    pub fn hangs_up(&mut self, within: Duration) -> bool {
        self.wait_close(within, false)
    }

    fn wait_close(&mut self, within: Duration, drain: bool) -> bool {
        let _ = self.set_read_timeout(Some(within));
        let mut buf = [0u8; 65536];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) if drain => {}
                Ok(_) => return false,
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

    /// A second handle on the same socket, e.g. to write from another thread.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Tcp(s)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// The reply mode a connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mode {
    pub structured: bool,
    pub extended: bool,
}

/// Simple replies only.
pub const SIMPLE: Mode = Mode {
    structured: false,
    extended: false,
};
/// Structured replies, compact headers.
pub const STRUCTURED: Mode = Mode {
    structured: true,
    extended: false,
};
/// Extended headers (which carry structured replies).
pub const EXTENDED: Mode = Mode {
    structured: true,
    extended: true,
};

/// A whole reply: a simple one, or every chunk of a structured one (the last is DONE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        cookie: u64,
        errno: u32,
        /// What a successful read returned.
        data: Vec<u8>,
    },
    Structured {
        cookie: u64,
        chunks: Vec<Chunk>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Structured { cookie, .. } => *cookie,
        }
    }

    /// The errno and (structured modes) the message, if the reply is an error.
    pub fn error(&self) -> Option<(u32, String)> {
        match self {
            Reply::Simple { errno: 0, .. } => None,
            Reply::Simple { errno, .. } => Some((*errno, String::new())),
            Reply::Structured { chunks, .. } => chunks.iter().find_map(Chunk::error),
        }
    }

    /// The chunks of a structured reply; none for a simple one.
    pub fn chunks(&self) -> &[Chunk] {
        match self {
            Reply::Simple { .. } => &[],
            Reply::Structured { chunks, .. } => chunks,
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One raw connection, and what its handshake learnt.
pub struct Client {
    pub stream: Stream,
    /// The reply mode in force; set by the handshake, or by a test that negotiated it.
    pub mode: Mode,
    /// Export size and transmission flags from the last successful GO.
    pub size: u64,
    pub flags: u16,
    next_cookie: u64,
}

impl Client {
    /// Wraps a connected stream; nothing is read yet.
    pub fn new(stream: impl Into<Stream>) -> Client {
        Client {
            stream: stream.into(),
            mode: SIMPLE,
            size: 0,
            flags: 0,
            next_cookie: 1,
        }
    }

    /// Connects to an endpoint of a server (with I/O timeouts).
    pub fn connect(ep: &Endpoint) -> io::Result<Client> {
        Ok(Client::new(ep.connect()?))
    }

    /// Connects over TCP (with I/O timeouts).
    pub fn tcp(addr: SocketAddr) -> io::Result<Client> {
        Client::connect(&Endpoint::Tcp(addr))
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    pub fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.stream.read_exact(&mut b)?;
        Ok(b)
    }

    // --- handshake ----------------------------------------------------------------------

    /// Reads the 18-byte greeting, checks its magic numbers and returns its flags.
    pub fn greeting(&mut self) -> io::Result<u16> {
        let g = self.read_exact(18)?;
        if be64(&g[..8]) != NBDMAGIC || be64(&g[8..16]) != IHAVEOPT {
            return Err(invalid(format!("bad greeting {g:02x?}")));
        }
        Ok(be16(&g[16..]))
    }

    /// Reads the greeting, which must offer fixed newstyle and no zeroes, and answers
    /// with `client_flags`.
    pub fn greet(&mut self, client_flags: u32) -> io::Result<()> {
        let flags = self.greeting()?;
        if flags != 3 {
            return Err(invalid(format!(
                "greeting flags {flags:#x}, not fixed newstyle and no zeroes"
            )));
        }
        self.send(&client_flags.to_be_bytes())
    }

    /// Reads one option reply.
    pub fn opt_reply(&mut self) -> io::Result<OptReply> {
        let mut m = self.read_exact(20)?;
        let len = be32(&m[16..20]) as usize;
        m.extend_from_slice(&self.read_exact(len)?);
        OptReply::decode(&m)
            .map(|(reply, _)| reply)
            .ok_or_else(|| invalid(format!("bad option reply {:02x?}", &m[..20])))
    }

    /// Sends an option and reads its replies up to the final one (an ACK or an error),
    /// which is last.
    pub fn opt(&mut self, option: u32, data: &[u8]) -> io::Result<Vec<OptReply>> {
        self.send(&opt(option, data))?;
        let mut replies = Vec::new();
        loop {
            let r = self.opt_reply()?;
            if r.option != option {
                return Err(invalid(format!(
                    "reply to option {} after option {option}",
                    r.option
                )));
            }
            let last = r.ty == REP_ACK || r.is_error();
            replies.push(r);
            if last {
                return Ok(replies);
            }
        }
    }

    /// The type of the final reply to an option.
    pub fn opt_result(&mut self, option: u32, data: &[u8]) -> io::Result<u32> {
        Ok(self.opt(option, data)?.last().expect("a final reply").ty)
    }

    /// Turns on structured replies, or extended headers, as `mode` says; both must be
    /// acknowledged.
    pub fn negotiate(&mut self, mode: Mode) -> io::Result<()> {
        let option = match mode {
            Mode { extended: true, .. } => OPT_EXTENDED_HEADERS,
            Mode {
                structured: true, ..
            } => OPT_STRUCTURED_REPLY,
            _ => return Ok(()),
        };
        let ty = self.opt_result(option, &[])?;
        if ty != REP_ACK {
            return Err(invalid(format!("option {option} refused: {ty:#x}")));
        }
        self.mode = Mode {
            structured: true,
            extended: mode.extended,
        };
        Ok(())
    }

    /// Selects metadata contexts with `SET_META_CONTEXT` on export `name`; returns the
    /// (id, name) pairs the server chose.
    pub fn set_meta_contexts(
        &mut self,
        name: &str,
        queries: &[&str],
    ) -> io::Result<Vec<(u32, String)>> {
        let replies = self.opt(OPT_SET_META_CONTEXT, &meta_data(name, queries))?;
        let (last, contexts) = replies.split_last().expect("a final reply");
        if last.ty != REP_ACK {
            return Err(invalid(format!("SET_META_CONTEXT failed: {:#x}", last.ty)));
        }
        contexts
            .iter()
            .map(|r| match r.ty {
                REP_META_CONTEXT => Ok((
                    be32(&r.data[..4]),
                    String::from_utf8_lossy(&r.data[4..]).into_owned(),
                )),
                ty => Err(invalid(format!("reply {ty:#x} to SET_META_CONTEXT"))),
            })
            .collect()
    }

    /// GO to export `name` with these information requests; returns its size and
    /// transmission flags, also kept in `size` and `flags`.
    pub fn go(&mut self, name: &str, infos: &[u16]) -> io::Result<(u64, u16)> {
        let replies = self.opt(OPT_GO, &info_data(name, infos))?;
        let last = replies.last().expect("a final reply");
        if last.ty != REP_ACK {
            return Err(io::Error::other(format!(
                "GO refused: {:#x} {}",
                last.ty,
                String::from_utf8_lossy(&last.data)
            )));
        }
        let export = replies
            .iter()
            .find(|r| r.info_type() == Some(INFO_EXPORT))
            .ok_or_else(|| invalid("GO without INFO_EXPORT".into()))?;
        self.size = be64(&export.data[2..10]);
        self.flags = be16(&export.data[10..12]);
        Ok((self.size, self.flags))
    }

    /// The handshake of a typical client: greets, turns on the reply `mode`, selects
    /// `base:allocation` when structured, and GOes to `name` asking for block sizes.
    /// Returns the export's size and transmission flags.
    pub fn handshake(&mut self, name: &str, mode: Mode) -> io::Result<(u64, u16)> {
        self.greet(C_FIXED_NO_ZEROES)?;
        self.negotiate(mode)?;
        if mode.structured {
            let contexts = self.set_meta_contexts(name, &["base:allocation"])?;
            if contexts.len() != 1 {
                return Err(invalid(format!("base:allocation selected as {contexts:?}")));
            }
        }
        self.go(name, &[INFO_BLOCK_SIZE])
    }

    /// The least a client can do: greets, turns on the reply `mode` and GOes to `name`,
    /// with no metadata context and no information requests.
    pub fn handshake_bare(&mut self, name: &str, mode: Mode) -> io::Result<(u64, u16)> {
        self.greet(C_FIXED_NO_ZEROES)?;
        self.negotiate(mode)?;
        self.go(name, &[])
    }

    // --- transmission -------------------------------------------------------------------

    /// Sends a request with a fresh cookie, in the header format of the mode in force,
    /// and returns the cookie.
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
        let mut m = request(self.mode.extended, flags, cmd, cookie, offset, len);
        m.extend_from_slice(payload);
        self.send(&m)?;
        Ok(cookie)
    }

    /// Reads one whole reply. `read_len` tells how much data a simple reply to a read
    /// carries (the protocol does not say): pass the read's length, or 0.
    pub fn reply(&mut self, read_len: usize) -> io::Result<Reply> {
        let magic = be32(&self.read_exact(4)?);
        if magic == SIMPLE_REPLY_MAGIC {
            let h = self.read_exact(12)?;
            let (errno, cookie) = (be32(&h[..4]), be64(&h[4..]));
            let data = if errno == 0 && read_len > 0 {
                self.read_exact(read_len)?
            } else {
                Vec::new()
            };
            return Ok(Reply::Simple {
                cookie,
                errno,
                data,
            });
        }
        let mut chunks = vec![self.chunk(magic)?];
        while !chunks.last().unwrap().is_done() {
            let magic = be32(&self.read_exact(4)?);
            chunks.push(self.chunk(magic)?);
        }
        let cookie = chunks[0].cookie;
        if chunks.iter().any(|c| c.cookie != cookie) {
            return Err(invalid(format!(
                "chunks of several replies mixed: {chunks:?}"
            )));
        }
        Ok(Reply::Structured { cookie, chunks })
    }

    /// The rest of a chunk whose magic has been read.
    fn chunk(&mut self, magic: u32) -> io::Result<Chunk> {
        let extended = match magic {
            STRUCTURED_REPLY_MAGIC => false,
            EXTENDED_REPLY_MAGIC => true,
            other => return Err(invalid(format!("bad reply magic {other:#x}"))),
        };
        if !self.mode.structured || extended != self.mode.extended {
            return Err(invalid(format!(
                "chunk magic {magic:#x} in mode {:?}",
                self.mode
            )));
        }
        let h = self.read_exact(if extended { 28 } else { 16 })?;
        let (offset, len) = if extended {
            (be64(&h[12..20]), be64(&h[20..28]) as usize)
        } else {
            (0, be32(&h[12..16]) as usize)
        };
        Ok(Chunk {
            flags: be16(&h[..2]),
            ty: be16(&h[2..4]),
            cookie: be64(&h[4..12]),
            offset,
            payload: self.read_exact(len)?,
        })
    }

    /// Sends a request and reads its whole reply, which must carry its cookie.
    pub fn call(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<Reply> {
        let cookie = self.request(flags, cmd, offset, len, payload)?;
        let read_len = if cmd == CMD_READ { len as usize } else { 0 };
        let reply = self.reply(read_len)?;
        if reply.cookie() != cookie {
            return Err(invalid(format!(
                "reply for cookie {} to cookie {cookie}",
                reply.cookie()
            )));
        }
        Ok(reply)
    }

    /// Issues a command that carries no reply data: Ok, or the errno and (structured
    /// modes) the server's message. In structured modes the reply must be one chunk,
    /// NONE or an error.
    pub fn outcome(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<Result<(), (u32, String)>> {
        let reply = self.call(flags, cmd, offset, len, payload)?;
        if let Reply::Structured { chunks, .. } = &reply {
            let single = matches!(&chunks[..], [c] if c.ty == CHUNK_NONE || c.error().is_some());
            if !single {
                return Err(invalid(format!("{chunks:?} answering command {cmd}")));
            }
        }
        Ok(reply.error().map_or(Ok(()), Err))
    }

    /// [`Client::outcome`] as an errno alone (0: success).
    pub fn command(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<u32> {
        Ok(self
            .outcome(flags, cmd, offset, len, payload)?
            .err()
            .map_or(0, |e| e.0))
    }

    /// Writes `data` at `offset`: Ok, or the errno and the server's message.
    pub fn write(
        &mut self,
        flags: u16,
        offset: u64,
        data: &[u8],
    ) -> io::Result<Result<(), (u32, String)>> {
        self.outcome(flags, CMD_WRITE, offset, data.len() as u64, data)
    }

    /// Flushes: Ok, or the errno and the server's message.
    pub fn flush(&mut self) -> io::Result<Result<(), (u32, String)>> {
        self.outcome(0, CMD_FLUSH, 0, 0, &[])
    }

    /// Reads `len` bytes at `offset`, reassembling structured chunks, which must cover
    /// the range exactly; `Err(errno)` if the server refuses.
    pub fn read(
        &mut self,
        flags: u16,
        offset: u64,
        len: usize,
    ) -> io::Result<Result<Vec<u8>, u32>> {
        let reply = self.call(flags, CMD_READ, offset, len as u64, &[])?;
        if let Some((errno, _)) = reply.error() {
            return Ok(Err(errno));
        }
        let chunks = match reply {
            Reply::Simple { data, .. } => return Ok(Ok(data)),
            Reply::Structured { chunks, .. } => chunks,
        };
        let mut data = vec![0xeeu8; len];
        let mut covered = 0usize;
        for c in chunks {
            let at = |p: &[u8]| (be64(&p[..8]) - offset) as usize;
            match c.ty {
                CHUNK_OFFSET_DATA => {
                    let (start, body) = (at(&c.payload), &c.payload[8..]);
                    data[start..start + body.len()].copy_from_slice(body);
                    covered += body.len();
                }
                CHUNK_OFFSET_HOLE => {
                    let (start, n) = (at(&c.payload), be32(&c.payload[8..12]) as usize);
                    data[start..start + n].fill(0);
                    covered += n;
                }
                CHUNK_NONE => {}
                ty => return Err(invalid(format!("chunk type {ty} in a read reply"))),
            }
        }
        if covered != len {
            return Err(invalid(format!(
                "read chunks cover {covered} of {len} bytes"
            )));
        }
        Ok(Ok(data))
    }

    /// Block status for every selected context: per chunk, in the order received, the
    /// context id and its (length, status) pairs.
    pub fn block_status_chunks(
        &mut self,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<(u32, Descriptors)>> {
        let reply = self.call(flags, CMD_BLOCK_STATUS, offset, len, &[])?;
        let extended = self.mode.extended;
        reply
            .chunks()
            .iter()
            .map(|c| c.block_status(extended).map_err(invalid))
            .collect()
    }

    /// Block status of the one selected context, base:allocation: (length, flags) pairs.
    pub fn block_status(
        &mut self,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<(u64, u32)>> {
        let mut chunks = self.block_status_chunks(flags, offset, len)?;
        if chunks.len() != 1 {
            return Err(invalid(format!(
                "{} block status chunks for one context",
                chunks.len()
            )));
        }
        let (_, descriptors) = chunks.pop().unwrap();
        descriptors
            .into_iter()
            .map(|(l, f)| {
                Ok((
                    l,
                    u32::try_from(f).map_err(|_| invalid(format!("flags {f:#x}")))?,
                ))
            })
            .collect()
    }

    /// Sends DISC.
    pub fn disconnect(&mut self) -> io::Result<()> {
        self.request(0, CMD_DISC, 0, 0, &[]).map(drop)
    }
}
