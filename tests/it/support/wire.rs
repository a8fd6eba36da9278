//! A deliberately small, blocking NBD client that speaks raw protocol bytes, for tests that
//! need to send exactly what a particular client sends, or what no well-behaved client
//! would. It writes every header by hand from the protocol's field layout.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use strata::backend::SharedBackend;
use strata::server::{Export, Exports, ListenAddr, Listener, Server, ServerConfig, ShutdownHandle};

pub use super::spec::*;

/// A server running in-process on an ephemeral port, stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<strata::Result<()>>>,
}

impl TestServer {
    pub fn start(backend: SharedBackend, config: ServerConfig) -> TestServer {
        Self::start_named("disk", backend, config)
    }

    pub fn start_named(name: &str, backend: SharedBackend, config: ServerConfig) -> TestServer {
        let exports = Arc::new(Exports::new());
        exports.insert(Export::new(name, "a test disk", backend));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = Listener::bind(&"127.0.0.1:0".parse::<ListenAddr>().unwrap())
                    .await
                    .unwrap();
                let ListenAddr::Tcp(addr) = listener.local_addr().unwrap() else {
                    unreachable!()
                };
                let server = Server::new(exports, config);
                tx.send((addr, server.shutdown_handle())).unwrap();
                server.serve(vec![listener]).await
            })
        });
        let (addr, handle) = rx.recv().unwrap();
        TestServer {
            addr,
            handle,
            thread: Some(thread),
        }
    }

    /// Shuts the server down and returns what `serve` returned.
    pub fn stop(mut self) -> strata::Result<()> {
        self.handle.shutdown();
        self.thread.take().unwrap().join().unwrap()
    }

    pub fn connect(&self) -> Conn {
        Conn::connect(self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn memory(size: u64) -> SharedBackend {
    strata::backend::open(&format!("memory:{size}"), false).unwrap()
}

pub struct OptReply {
    pub option: u32,
    pub ty: u32,
    pub data: Vec<u8>,
}

pub struct Chunk {
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    pub offset: u64,
    pub payload: Vec<u8>,
}

pub enum Reply {
    Simple { errno: u32, cookie: u64 },
    Chunk(Chunk),
}

/// One raw connection.
pub struct Conn {
    pub s: TcpStream,
    pub extended: bool,
    pub structured: bool,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Conn {
            s,
            extended: false,
            structured: false,
        }
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0; 2];
        self.s.read_exact(&mut b).unwrap();
        u16::from_be_bytes(b)
    }
    pub fn u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.s.read_exact(&mut b).unwrap();
        u32::from_be_bytes(b)
    }
    pub fn u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.s.read_exact(&mut b).unwrap();
        u64::from_be_bytes(b)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// Reads the greeting and answers with `client_flags`.
    pub fn greet(&mut self, client_flags: u32) {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        let hs_flags = self.u16();
        assert_eq!(hs_flags, 3, "fixed newstyle and no-zeroes");
        self.s.write_all(&client_flags.to_be_bytes()).unwrap();
    }

    pub fn send_opt(&mut self, option: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    pub fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64(), REPLY_MAGIC);
        let option = self.u32();
        let ty = self.u32();
        let len = self.u32() as usize;
        let data = self.bytes(len);
        OptReply { option, ty, data }
    }

    /// Sends an option and collects replies up to and including the final one.
    pub fn opt(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_opt(option, data);
        let mut replies = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, option);
            let fin = r.ty == REP_ACK || r.ty & 0x8000_0000 != 0;
            replies.push(r);
            if fin {
                return replies;
            }
        }
    }

    pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Greets, optionally negotiates structured replies / extended headers and
    /// base:allocation, then GOes to `name`. Returns (size, transmission flags).
    pub fn handshake(&mut self, name: &str, structured: bool, extended: bool) -> (u64, u16) {
        self.greet(3);
        if extended {
            let r = self.opt(OPT_EXTENDED_HEADERS, &[]);
            assert_eq!(r[0].ty, REP_ACK);
            self.extended = true;
            self.structured = true;
        } else if structured {
            let r = self.opt(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r[0].ty, REP_ACK);
            self.structured = true;
        }
        if self.structured {
            let r = self.opt(
                OPT_SET_META_CONTEXT,
                &Self::meta_payload(name, &["base:allocation"]),
            );
            assert_eq!(r.len(), 2);
            assert_eq!(r[0].ty, REP_META_CONTEXT);
        }
        self.go(name, &[INFO_BLOCK_SIZE])
    }

    pub fn go(&mut self, name: &str, infos: &[u16]) -> (u64, u16) {
        let replies = self.opt(OPT_GO, &Self::info_payload(name, infos));
        let last = replies.last().unwrap();
        assert_eq!(
            last.ty,
            REP_ACK,
            "GO failed: {:#x} {}",
            last.ty,
            String::from_utf8_lossy(&last.data)
        );
        let export = replies
            .iter()
            .find(|r| r.ty == REP_INFO && r.data[..2] == INFO_EXPORT.to_be_bytes())
            .expect("INFO_EXPORT");
        let size = u64::from_be_bytes(export.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
        (size, flags)
    }

    pub fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let mut m = Vec::with_capacity(32 + payload.len());
        if self.extended {
            m.extend_from_slice(&0x21e4_1c71u32.to_be_bytes());
        } else {
            m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        }
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        if self.extended {
            m.extend_from_slice(&len.to_be_bytes());
        } else {
            m.extend_from_slice(&(len as u32).to_be_bytes());
        }
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
    }

    /// Reads one reply message (a simple reply, or one chunk). For a successful simple read
    /// reply, `read_len` bytes of data follow and are returned in a Chunk-less form by
    /// `read_simple_data`.
    pub fn reply(&mut self) -> Reply {
        let magic = self.u32();
        match magic {
            0x6744_6698 => {
                let errno = self.u32();
                let cookie = self.u64();
                Reply::Simple { errno, cookie }
            }
            0x668e_33ef => {
                assert!(!self.extended, "compact chunk with extended headers");
                let flags = self.u16();
                let ty = self.u16();
                let cookie = self.u64();
                let len = self.u32() as usize;
                let payload = self.bytes(len);
                Reply::Chunk(Chunk {
                    flags,
                    ty,
                    cookie,
                    offset: 0,
                    payload,
                })
            }
            0x6e8a_278c => {
                assert!(self.extended, "extended chunk without extended headers");
                let flags = self.u16();
                let ty = self.u16();
                let cookie = self.u64();
                let offset = self.u64();
                let len = self.u64() as usize;
                let payload = self.bytes(len);
                Reply::Chunk(Chunk {
                    flags,
                    ty,
                    cookie,
                    offset,
                    payload,
                })
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Reads chunks until the one flagged DONE; returns them all.
    pub fn chunks(&mut self) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            match self.reply() {
                Reply::Chunk(c) => {
                    let done = c.flags & 1 != 0;
                    out.push(c);
                    if done {
                        return out;
                    }
                }
                Reply::Simple { .. } => panic!("simple reply in the middle of a chunked reply"),
            }
        }
    }

    /// Issues a command that carries no reply data and returns its errno (0 = success).
    pub fn command(&mut self, flags: u16, cmd: u16, offset: u64, len: u64, payload: &[u8]) -> u32 {
        let cookie = 0xc0ffee;
        self.request(flags, cmd, cookie, offset, len, payload);
        match self.reply() {
            Reply::Simple { errno, cookie: c } => {
                assert_eq!(c, cookie);
                errno
            }
            Reply::Chunk(c) => {
                assert_eq!(c.cookie, cookie);
                assert!(c.flags & 1 != 0, "single chunk expected");
                match c.ty {
                    CHUNK_NONE => 0,
                    CHUNK_ERROR | CHUNK_ERROR_OFFSET => error_of(&c).0,
                    t => panic!("unexpected chunk type {t}"),
                }
            }
        }
    }

    /// Reads `len` bytes at `offset`, reassembling structured chunks; Err(errno) on failure.
    pub fn read(&mut self, flags: u16, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
        let cookie = 0xbeef;
        self.request(flags, CMD_READ, cookie, offset, len as u64, &[]);
        if !self.structured {
            return match self.reply() {
                Reply::Simple {
                    errno: 0,
                    cookie: c,
                } => {
                    assert_eq!(c, cookie);
                    Ok(self.bytes(len))
                }
                Reply::Simple { errno, .. } => Err(errno),
                Reply::Chunk(_) => panic!("chunk without structured replies"),
            };
        }
        let mut data = vec![0xeeu8; len];
        let mut covered = 0usize;
        for c in self.chunks() {
            assert_eq!(c.cookie, cookie);
            match c.ty {
                CHUNK_OFFSET_DATA => {
                    let off = u64::from_be_bytes(c.payload[..8].try_into().unwrap());
                    let start = (off - offset) as usize;
                    let body = &c.payload[8..];
                    data[start..start + body.len()].copy_from_slice(body);
                    covered += body.len();
                }
                CHUNK_OFFSET_HOLE => {
                    let off = u64::from_be_bytes(c.payload[..8].try_into().unwrap());
                    let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize;
                    let start = (off - offset) as usize;
                    data[start..start + n].fill(0);
                    covered += n;
                }
                CHUNK_NONE => {}
                CHUNK_ERROR | CHUNK_ERROR_OFFSET => return Err(error_of(&c).0),
                t => panic!("unexpected chunk type {t} in read"),
            }
        }
        assert_eq!(covered, len, "chunks must cover the read exactly");
        Ok(data)
    }

    /// Selects metadata contexts with `SET_META_CONTEXT` on export `name` (structured
    /// replies must be on); returns the (id, name) pairs the server chose.
    pub fn set_meta_contexts(&mut self, name: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let replies = self.opt(OPT_SET_META_CONTEXT, &Self::meta_payload(name, queries));
        let (ack, contexts) = replies.split_last().unwrap();
        assert_eq!(ack.ty, REP_ACK, "SET_META_CONTEXT failed: {:#x}", ack.ty);
        contexts
            .iter()
            .map(|r| {
                assert_eq!(r.ty, REP_META_CONTEXT);
                let id = u32::from_be_bytes(r.data[..4].try_into().unwrap());
                (id, String::from_utf8(r.data[4..].to_vec()).unwrap())
            })
            .collect()
    }

    /// Block status for base:allocation: (length, flags) pairs.
    pub fn block_status(&mut self, flags: u16, offset: u64, len: u64) -> Vec<(u64, u32)> {
        let chunks = self.block_status_chunks(flags, offset, len);
        assert_eq!(chunks.len(), 1);
        chunks[0]
            .1
            .iter()
            .map(|&(l, f)| {
                (
                    l,
                    u32::try_from(f).expect("base:allocation flags fit 32 bits"),
                )
            })
            .collect()
    }

    /// Block status for every selected context: per chunk up to the one flagged DONE, in
    /// the order received, the context id and its (length, status) pairs. Checks the
    /// framing: the chunk type of the reply mode, payload lengths that match the
    /// descriptor count.
    pub fn block_status_chunks(
        &mut self,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Vec<(u32, Vec<(u64, u64)>)> {
        let cookie = 0xb5;
        self.request(flags, CMD_BLOCK_STATUS, cookie, offset, len, &[]);
        let chunks = self.chunks();
        let mut out = Vec::new();
        for c in &chunks {
            assert_eq!(c.cookie, cookie);
            let p = &c.payload;
            let id = u32::from_be_bytes(p[..4].try_into().unwrap());
            let mut descriptors = Vec::new();
            if self.extended {
                assert_eq!(c.ty, CHUNK_BLOCK_STATUS_EXT);
                let count = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
                assert_eq!(p.len(), 8 + 16 * count);
                for at in (8..p.len()).step_by(16) {
                    let l = u64::from_be_bytes(p[at..at + 8].try_into().unwrap());
                    let f = u64::from_be_bytes(p[at + 8..at + 16].try_into().unwrap());
                    descriptors.push((l, f));
                }
            } else {
                assert_eq!(c.ty, CHUNK_BLOCK_STATUS);
                assert_eq!((p.len() - 4) % 8, 0);
                for at in (4..p.len()).step_by(8) {
                    let l = u32::from_be_bytes(p[at..at + 4].try_into().unwrap());
                    let f = u32::from_be_bytes(p[at + 4..at + 8].try_into().unwrap());
                    descriptors.push((u64::from(l), u64::from(f)));
                }
            }
            out.push((id, descriptors));
        }
        out
    }

    /// True once the server has closed the connection (read returns EOF or reset).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// (errno, message) of an error chunk.
pub fn error_of(c: &Chunk) -> (u32, String) {
    let errno = u32::from_be_bytes(c.payload[..4].try_into().unwrap());
    let n = u16::from_be_bytes(c.payload[4..6].try_into().unwrap()) as usize;
    (
        errno,
        String::from_utf8(c.payload[6..6 + n].to_vec()).unwrap(),
    )
}
