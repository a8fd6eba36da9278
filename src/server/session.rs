//! The transmission phase of one connection.
//!
//! ```text
//!   socket read half ──> reader loop ──> validate ──> spawn per request ──┐
//!                        (this task)     (refusals answered at once)      │ backend op
//!                                                                         v
//!   socket write half <── writer task <── reply channel <── encoded reply ─┘
//! ```
//!
//! Requests run concurrently and complete in any order; replies carry the request's
//! cookie. Only the writer task touches the write half, and it batches whatever replies
//! are ready into one vectored write. Memory in flight is bounded by a per-connection byte
//! budget, which may draw from a server-wide one ([`super::budget`]): the reader stops
//! reading from the socket while the budget is spent, which pushes back on the client
//! through TCP flow control.
//!
//! With an idle timeout, a session whose client sent no request for that long is closed,
//! unless requests are still running; a client that stops reading its replies counts as
//! idle too (its replies make no progress), since it holds budget without using it.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::budget::{Charge, ConnBudget, GlobalBudget};
use super::export::{Export, ExportStats};
use super::listener::{ReadHalf, WriteHalf};
use crate::backend::{Backend, Extent, ReadChunk, SharedBackend, ZeroFlags};
use crate::error::Error;
use crate::proto::consts::{
    BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH, QEMU_DIRTY_BITMAP, cmd_flags, errno,
};
use crate::proto::reply::{self, ChunkTarget, Descriptor, ReplyMode};
use crate::proto::{Command, Limits, MetaContext, Negotiated, ProtocolError, RequestHeader};
use crate::proto::{errno_for, normalize_extents, validate};

/// Payloads larger than this cannot be skipped politely and end the connection.
const MAX_SKIPPABLE_PAYLOAD: u64 = u32::MAX as u64;

/// Minimum charge against the in-flight budget, so that the budget also bounds the number
/// of requests (and tasks) in flight.
const MIN_CHARGE: u64 = 64 * 1024;

/// Replies gathered into one vectored write at most.
const MAX_BATCH: usize = 64;

/// Tunables of the transmission phase.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Bytes of request and reply payload one connection may have in flight.
    pub max_in_flight: u64,
    /// How long the last replies of a closing session may take to reach a client that
    /// has stopped reading, before the connection is dropped without them.
    pub final_replies_timeout: Duration,
    /// A client that sends no request for this long, while none of its requests runs,
    /// is disconnected (within a quarter more); so is one that reads none of its
    /// replies for this long. `None` keeps idle clients forever, as VMs whose disks see
    /// no I/O for hours expect.
    pub idle_timeout: Option<Duration>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_in_flight: 64 * 1024 * 1024,
            final_replies_timeout: Duration::from_secs(10),
            idle_timeout: None,
        }
    }
}

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection without `NBD_CMD_DISC`.
    ClientClosed,
    /// The server is shutting down.
    Shutdown,
    /// The export was removed.
    Removed,
    /// The client sent nothing (or read nothing) for the idle timeout.
    Idle,
    /// The client broke the protocol.
    Protocol(ProtocolError),
    /// The socket failed.
    Io(io::Error),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Disconnect => f.write_str("client disconnected"),
            SessionEnd::ClientClosed => f.write_str("client closed the connection"),
            SessionEnd::Shutdown => f.write_str("server shutting down"),
            SessionEnd::Removed => f.write_str("export removed"),
            SessionEnd::Idle => f.write_str("client idle for too long"),
            SessionEnd::Protocol(e) => write!(f, "protocol error: {e}"),
            SessionEnd::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

/// Buffered reading of request headers and payloads from the socket.
struct FrameReader {
    inner: ReadHalf,
    buf: BytesMut,
}

const READ_CHUNK: usize = 64 * 1024;

impl FrameReader {
    /// Ensures at least `n` bytes are buffered. Returns `false` on a clean end of stream
    /// before any byte of the frame arrived.
    async fn fill(&mut self, n: usize) -> io::Result<bool> {
        while self.buf.len() < n {
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(true)
    }

    /// Reads exactly `n` payload bytes into a buffer of their own, copying only what was
    /// already buffered and reading the rest straight into place.
    async fn payload(&mut self, n: usize) -> io::Result<Bytes> {
        if self.buf.len() >= n {
            return Ok(self.buf.split_to(n).freeze());
        }
        let mut out = BytesMut::with_capacity(n);
        out.extend_from_slice(&self.buf.split());
        while out.len() < n {
            let want = n - out.len();
            let mut limited = (&mut self.inner).take(want as u64);
            if limited.read_buf(&mut out).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(out.freeze())
    }

    /// Reads and drops `n` bytes.
    async fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let buffered = (self.buf.len() as u64).min(n);
        let _ = self.buf.split_to(buffered as usize);
        n -= buffered;
        if n > 0 {
            let copied =
                tokio::io::copy(&mut (&mut self.inner).take(n), &mut tokio::io::sink()).await?;
            if copied < n {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }
}

/// One encoded reply, kept with the budget it holds until it is on the wire.
struct Outgoing {
    parts: Vec<Bytes>,
    _charge: Charge,
}

/// Builds a reply out of small encoded headers and large data buffers, without copying
/// the data.
struct ReplyBuf {
    parts: Vec<Bytes>,
    head: BytesMut,
}

impl ReplyBuf {
    fn new() -> Self {
        ReplyBuf {
            parts: Vec::with_capacity(2),
            head: BytesMut::with_capacity(64),
        }
    }

    fn data(&mut self, data: Bytes) {
        if !self.head.is_empty() {
            self.parts.push(self.head.split().freeze());
        }
        self.parts.push(data);
    }

    fn finish(mut self) -> Vec<Bytes> {
        if !self.head.is_empty() {
            self.parts.push(self.head.freeze());
        }
        self.parts
    }
}

/// What every request task of a session needs.
struct Context {
    backend: SharedBackend,
    mode: ReplyMode,
    contexts: Vec<MetaContext>,
    sparse_reads: bool,
    /// Replies reach the socket straight from the kernel (no TLS): reads may return bytes
    /// mapped from files ([`Backend::read_for_kernel`]).
    kernel_writes: bool,
    wrote: AtomicBool,
    stats: Arc<ExportStats>,
}

impl Context {
    fn target(&self, h: &RequestHeader) -> ChunkTarget {
        ChunkTarget {
            mode: self.mode,
            cookie: h.cookie,
            offset: h.offset,
        }
    }

    /// A successful reply without data.
    fn ok(&self, h: &RequestHeader) -> Vec<Bytes> {
        let mut b = BytesMut::with_capacity(32);
        match self.mode {
            // Structured mode may answer data-less requests with simple replies, which are
            // smaller; extended headers forbid them.
            ReplyMode::Simple | ReplyMode::Structured => reply::encode_simple(&mut b, h.cookie, 0),
            ReplyMode::Extended => reply::encode_done(&mut b, self.target(h)),
        }
        vec![b.freeze()]
    }

    /// An error reply; structured modes carry `message`, and `offset` when it is known.
    fn error(
        &self,
        h: &RequestHeader,
        errno: u32,
        message: &str,
        offset: Option<u64>,
    ) -> Vec<Bytes> {
        self.stats.count_error(errno);
        let mut b = BytesMut::with_capacity(64 + message.len());
        if self.mode == ReplyMode::Simple {
            reply::encode_simple(&mut b, h.cookie, errno);
        } else {
            reply::encode_error(&mut b, self.target(h), true, errno, message, offset);
        }
        vec![b.freeze()]
    }

    fn failed(&self, h: &RequestHeader, err: &Error) -> Vec<Bytes> {
        let errno = errno_for(err.kind());
        if errno == errno::EIO {
            warn!(
                command = h.command.name(),
                offset = h.offset,
                length = h.length,
                "{err}"
            );
        } else {
            debug!(
                command = h.command.name(),
                offset = h.offset,
                length = h.length,
                "{err}"
            );
        }
        let offset = err
            .offset()
            .filter(|&o| h.command == Command::Read && o >= h.offset && o < h.offset + h.length);
        self.error(h, errno, &err.to_string(), offset)
    }

    fn done_or_error(&self, h: &RequestHeader, result: crate::Result<()>) -> Vec<Bytes> {
        match result {
            Ok(()) => self.ok(h),
            Err(e) => self.failed(h, &e),
        }
    }

    /// Runs a request and encodes its reply, timing both for the latency histogram.
    async fn execute(&self, h: RequestHeader, payload: Bytes) -> Vec<Bytes> {
        let start = Instant::now();
        let parts = self.dispatch(h, payload).await;
        self.stats.record_latency(h.command, start.elapsed());
        parts
    }

    async fn dispatch(&self, h: RequestHeader, payload: Bytes) -> Vec<Bytes> {
        self.stats.count_request(h.command, h.length);
        let fua = h.flags & cmd_flags::FUA != 0;
        let backend = &self.backend;
        let ranged = matches!(
            h.command,
            Command::Trim | Command::WriteZeroes | Command::Cache
        );
        if ranged && h.length == 0 {
            // Nothing to do; backends need not handle empty ranges.
            return self.ok(&h);
        }
        if h.command.modifies() {
            self.wrote.store(true, Ordering::Relaxed);
        }
        match h.command {
            Command::Read => self.read(&h).await,
            Command::Write => {
                let r = backend.write(h.offset, payload, fua).await;
                self.done_or_error(&h, r)
            }
            Command::Flush => {
                let r = backend.flush().await;
                self.done_or_error(&h, r)
            }
            Command::Trim => {
                let r = backend.trim(h.offset, h.length, fua).await;
                self.done_or_error(&h, r)
            }
            Command::WriteZeroes => {
                let flags = ZeroFlags {
                    fua,
                    no_hole: h.flags & cmd_flags::NO_HOLE != 0,
                    fast: h.flags & cmd_flags::FAST_ZERO != 0,
                };
                let r = backend.write_zeroes(h.offset, h.length, flags).await;
                self.done_or_error(&h, r)
            }
            Command::Cache => {
                let r = backend.cache(h.offset, h.length).await;
                self.done_or_error(&h, r)
            }
            Command::BlockStatus => self.block_status(&h).await,
            Command::Disconnect | Command::Resize | Command::Unknown(_) => {
                // Validation refuses these before they are dispatched.
                self.error(&h, errno::EINVAL, "unsupported command", None)
            }
        }
    }

    async fn read(&self, h: &RequestHeader) -> Vec<Bytes> {
        let len = h.length as usize;
        let mut out = ReplyBuf::new();
        if self.mode == ReplyMode::Simple {
            return match self.read_data(h.offset, len).await {
                Ok(data) => {
                    reply::encode_simple(&mut out.head, h.cookie, 0);
                    out.data(data);
                    out.finish()
                }
                Err(e) => self.failed(h, &e),
            };
        }
        let target = self.target(h);
        if len == 0 {
            reply::encode_done(&mut out.head, target);
            return out.finish();
        }
        let df = h.flags & cmd_flags::DF != 0;
        let chunks = if !self.sparse_reads || df {
            self.read_data(h.offset, len)
                .await
                .map(|d| vec![ReadChunk::Data(d)])
        } else if self.kernel_writes {
            self.backend.read_sparse_for_kernel(h.offset, len).await
        } else {
            self.backend.read_sparse(h.offset, len).await
        };
        let chunks = match chunks {
            Ok(c) => c,
            Err(e) => return self.failed(h, &e),
        };
        let chunks: Vec<ReadChunk> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let covered: u64 = chunks.iter().map(ReadChunk::len).sum();
        if covered != len as u64 {
            let msg = format!("backend returned {covered} bytes for a read of {len}");
            warn!("{msg}");
            return self.error(h, errno::EIO, &msg, None);
        }
        let mut pos = h.offset;
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let done = i == last;
            let n = chunk.len();
            match chunk {
                ReadChunk::Data(data) => {
                    reply::encode_offset_data_header(&mut out.head, target, done, pos, n);
                    out.data(data);
                }
                ReadChunk::Zero(n) => {
                    // Reads are capped at the maximum payload, far below 4 GiB.
                    reply::encode_offset_hole(&mut out.head, target, done, pos, n as u32);
                }
            }
            pos += n;
        }
        out.finish()
    }

    /// The data of a read as one buffer, zero-copy when only the kernel reads it.
    async fn read_data(&self, offset: u64, len: usize) -> crate::Result<Bytes> {
        if self.kernel_writes {
            self.backend.read_for_kernel(offset, len).await
        } else {
            self.backend.read(offset, len).await
        }
    }

    async fn block_status(&self, h: &RequestHeader) -> Vec<Bytes> {
        let req_one = h.flags & cmd_flags::REQ_ONE != 0;
        let target = self.target(h);
        let mut out = BytesMut::with_capacity(256);
        // Compact descriptors hold 32-bit lengths; keep them block-aligned when clamped.
        let max_len = if self.mode == ReplyMode::Extended {
            u64::MAX
        } else {
            u64::from(u32::MAX) & !4095
        };
        // One chunk per context; only the last one ends the reply. A failure in any
        // context replaces the whole reply with an error.
        let last = self.contexts.len() - 1;
        for (i, ctx) in self.contexts.iter().enumerate() {
            let descriptors = match self.describe(ctx, h, max_len, req_one).await {
                Ok(d) => d,
                Err(e) => return self.failed(h, &e),
            };
            reply::encode_block_status(&mut out, target, i == last, ctx.id, &descriptors);
        }
        vec![out.freeze()]
    }

    /// The descriptors of one metadata context for a block-status request.
    async fn describe(
        &self,
        ctx: &MetaContext,
        h: &RequestHeader,
        max_len: u64,
        req_one: bool,
    ) -> crate::Result<Vec<Descriptor>> {
        let (offset, len) = (h.offset, h.length);
        Ok(match ctx.name.as_str() {
            BASE_ALLOCATION => {
                let extents = self.backend.block_status(offset, len).await?;
                normalize_extents(&extents, len, max_len, req_one)
            }
            QEMU_ALLOCATION_DEPTH => {
                let extents = self.backend.allocation_depth(offset, len).await?;
                normalize_extents(&extents, len, max_len, req_one)
            }
            name if name.starts_with(QEMU_DIRTY_BITMAP) => {
                let bitmap = name[QEMU_DIRTY_BITMAP.len()..].to_owned();
                let extents = self.backend.dirty_status(bitmap, offset, len).await?;
                normalize_extents(&extents, len, max_len, req_one)
            }
            // The handshake selects only contexts the export offers, all of them above.
            _ => normalize_extents::<Extent>(&[], len, max_len, req_one),
        })
    }
}

/// Runs the transmission phase on `export` until the client disconnects, the connection
/// fails, the export is closed, the client stays idle past the idle timeout, or the
/// server shuts down. `leftover` holds bytes read past the end of the handshake; requests
/// are charged to a budget of `config.max_in_flight` bytes leased from `global`, when
/// there is a server-wide budget. `tls` says that `writer` encrypts in user space, so
/// replies must not carry bytes only the kernel may read
/// ([`crate::backend::Backend::read_for_kernel`]).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    reader: ReadHalf,
    writer: WriteHalf,
    leftover: BytesMut,
    tls: bool,
    export: &Export,
    negotiated: &Negotiated,
    config: SessionConfig,
    global: Option<Arc<GlobalBudget>>,
    mut shutdown: watch::Receiver<bool>,
) -> SessionEnd {
    let backend = export.backend().clone();
    let mut closed = export.closed();
    let mode = if negotiated.extended {
        ReplyMode::Extended
    } else if negotiated.structured {
        ReplyMode::Structured
    } else {
        ReplyMode::Simple
    };
    let limits = Limits {
        size: negotiated.export.size,
        flags: negotiated.flags,
        max_payload: negotiated.export.block_sizes.maximum,
        structured: negotiated.structured,
        extended: negotiated.extended,
        has_contexts: !negotiated.contexts.is_empty(),
    };
    let ctx = Arc::new(Context {
        sparse_reads: backend.capabilities().block_status,
        kernel_writes: !tls,
        backend,
        mode,
        contexts: negotiated.contexts.clone(),
        wrote: AtomicBool::new(false),
        stats: export.stats().clone(),
    });
    let budget = ConnBudget::new(
        config.max_in_flight.max(u64::from(limits.max_payload)),
        global,
    );
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let progress = Arc::new(WriterProgress::default());
    let mut writer_task = tokio::spawn(write_loop(writer, rx, progress.clone()));
    let mut reader = FrameReader {
        inner: reader,
        buf: leftover,
    };
    let header_len = RequestHeader::wire_len(negotiated.extended);
    let mut idle = config.idle_timeout.map(IdleWatch::new);
    let mut requests_read = 0u64;
    // The charge of the request being read, which is not running yet.
    let reading = AtomicU64::new(0);

    let end = loop {
        if *shutdown.borrow() {
            break SessionEnd::Shutdown;
        }
        if *closed.borrow() {
            break SessionEnd::Removed;
        }
        // About to wait for the client: an idle connection holds no shared budget.
        let waiting = reader.buf.len() < header_len;
        if waiting {
            budget.set_waiting(true);
        }
        let next = next_request(&mut reader, &budget, &reading, &limits, header_len);
        tokio::pin!(next);
        // Shutdown, removal, a dead writer and idleness interrupt the wait for a request
        // wherever it is: its header, the budget, its payload. A request cut off there was
        // never accepted, so nothing is lost.
        let step = loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break Step::End(SessionEnd::Shutdown),
                _ = closed.changed() => break Step::End(SessionEnd::Removed),
                res = &mut writer_task => {
                    break Step::End(match res {
                        Ok(Err(e)) => SessionEnd::Io(e),
                        _ => SessionEnd::ClientClosed,
                    });
                }
                () = IdleWatch::tick(idle.as_mut()) => {
                    let watch = idle.as_mut().expect("ticks only with a watch");
                    let running = budget.charged() > reading.load(Ordering::Relaxed);
                    if watch.expired(requests_read, running, &progress) {
                        break Step::End(SessionEnd::Idle);
                    }
                }
                step = &mut next => break step,
            }
        };
        reading.store(0, Ordering::Relaxed);
        if waiting {
            budget.set_waiting(false);
        }
        match step {
            Step::End(end) => break end,
            Step::Refused(header, refusal, charge) => {
                requests_read += 1;
                debug!(
                    command = header.command.name(),
                    offset = header.offset,
                    length = header.length,
                    "refused: {}",
                    refusal.message
                );
                let parts = ctx.error(&header, refusal.errno, &refusal.message, None);
                let _ = tx.send(Outgoing {
                    parts,
                    _charge: charge,
                });
            }
            Step::Request(header, payload, charge) => {
                requests_read += 1;
                let ctx = ctx.clone();
                let tx = tx.clone();
                run_or_spawn(async move {
                    let parts = ctx.execute(header, payload).await;
                    let _ = tx.send(Outgoing {
                        parts,
                        _charge: charge,
                    });
                });
            }
        }
    };

    // Let every request already accepted finish and its reply reach the client: the
    // writer ends once the last sender (held by in-flight tasks) is gone.
    drop(tx);
    if !writer_task.is_finished() {
        match tokio::time::timeout(config.final_replies_timeout, &mut writer_task).await {
            Ok(Ok(Err(e))) => debug!("writing final replies failed: {e}"),
            Ok(Err(e)) => warn!("reply writer failed: {e}"),
            Ok(Ok(Ok(()))) => {}
            Err(_) => {
                warn!("client is not reading its replies; dropping the connection");
                writer_task.abort();
            }
        }
    }
    if ctx.wrote.load(Ordering::Relaxed) {
        if let Err(e) = ctx.backend.flush().await {
            warn!("flush at end of session failed: {e}");
        }
    }
    info!("session ended: {end}");
    end
}

/// What the reader got from the client.
enum Step {
    /// A valid request, its payload read, its budget charged.
    Request(RequestHeader, Bytes, Charge),
    /// A request validation refused; its payload, if any, was skipped.
    Refused(RequestHeader, crate::proto::Refusal, Charge),
    /// The session must end.
    End(SessionEnd),
}

/// Reads the next request: its header, its charge against the budget, its payload.
async fn next_request(
    reader: &mut FrameReader,
    budget: &ConnBudget,
    reading: &AtomicU64,
    limits: &Limits,
    header_len: usize,
) -> Step {
    let header = loop {
        match reader.fill(header_len).await {
            Ok(true) => {}
            Ok(false) => return Step::End(SessionEnd::ClientClosed),
            Err(e) => return Step::End(SessionEnd::Io(e)),
        }
        match RequestHeader::decode(&mut reader.buf, limits.extended) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => return Step::End(SessionEnd::Protocol(e)),
        }
    };
    budget.set_waiting(false);
    let payload_len = header.payload_len(limits.extended);
    if payload_len > MAX_SKIPPABLE_PAYLOAD {
        return Step::End(SessionEnd::Protocol(ProtocolError::PayloadTooLarge(
            payload_len,
        )));
    }
    if header.command == Command::Disconnect {
        return Step::End(SessionEnd::Disconnect);
    }
    let verdict = validate(&header, limits);
    // Refusals are charged too: a client that floods the server with bad requests
    // while never reading the replies must not grow the reply queue without bound.
    let data_len = match (&verdict, header.command) {
        (Ok(()), Command::Read | Command::Write) => header.length,
        _ => 0,
    };
    let charge = data_len.max(MIN_CHARGE).min(budget.max()) as u32;
    // Waiting here is the backpressure: while the budget is spent, nothing more is
    // read from the socket.
    let charge = budget.charge(charge).await;
    reading.store(u64::from(charge.bytes()), Ordering::Relaxed);
    if let Err(refusal) = verdict {
        if let Err(e) = reader.skip(payload_len).await {
            return Step::End(SessionEnd::Io(e));
        }
        return Step::Refused(header, refusal, charge);
    }
    let payload = if payload_len > 0 {
        match reader.payload(payload_len as usize).await {
            Ok(p) => p,
            Err(e) => return Step::End(SessionEnd::Io(e)),
        }
    } else {
        Bytes::new()
    };
    Step::Request(header, payload, charge)
}

/// What the reply writer tells the idle watch: whether it is in the middle of a write,
/// and how many writes it finished. Plain stores, a few per batch of replies.
#[derive(Debug, Default)]
struct WriterProgress {
    writing: AtomicBool,
    writes: AtomicU64,
}

/// Ticks a quarter of the idle timeout apart; a session is idle after four ticks in a
/// row without a new request, with nothing running or with replies that make no
/// progress. This costs a timer per session, not per request.
struct IdleWatch {
    period: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    quiet: u32,
    requests: u64,
    writes: u64,
}

/// Quiet ticks after which a session is idle.
const IDLE_TICKS: u32 = 4;

impl IdleWatch {
    fn new(timeout: Duration) -> IdleWatch {
        let period = (timeout / IDLE_TICKS).max(Duration::from_millis(1));
        IdleWatch {
            period,
            sleep: Box::pin(tokio::time::sleep(period)),
            quiet: 0,
            requests: 0,
            writes: 0,
        }
    }

    /// The next tick; never, without a watch.
    async fn tick(watch: Option<&mut IdleWatch>) {
        match watch {
            Some(w) => w.sleep.as_mut().await,
            None => std::future::pending().await,
        }
    }

    /// Called on each tick: true once the session has been quiet for the timeout.
    fn expired(&mut self, requests: u64, in_flight: bool, progress: &WriterProgress) -> bool {
        let writes = progress.writes.load(Ordering::Relaxed);
        let stalled = progress.writing.load(Ordering::Relaxed) && writes == self.writes;
        let busy = requests != self.requests || (in_flight && !stalled);
        self.requests = requests;
        self.writes = writes;
        self.quiet = if busy { 0 } else { self.quiet + 1 };
        let deadline = self.sleep.deadline() + self.period;
        self.sleep.as_mut().reset(deadline);
        self.quiet >= IDLE_TICKS
    }
}

/// Polls `request` once right here and spawns it only if it has to wait.
///
/// Most requests on memory-backed storage complete without ever waiting; running them
/// inline saves a task spawn and a cross-thread wake-up per request. A request that does
/// wait (a disk read on the thread pool, say) becomes its own task, so the reader moves on
/// to the next request at once. Polling first with a no-op waker is sound: a future must
/// register the waker of the poll that returns `Pending`, and the spawned task polls again
/// with its own.
fn run_or_spawn(request: impl Future<Output = ()> + Send + 'static) {
    let mut request = Box::pin(request);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if request.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(request);
    }
}

async fn write_loop(
    mut w: WriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    progress: Arc<WriterProgress>,
) -> io::Result<()> {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        progress.writing.store(true, Ordering::Relaxed);
        write_all_parts(&mut w, batch.iter().flat_map(|o| o.parts.iter()), &progress).await?;
        // A socket's flush does nothing; TLS may still hold records that the socket
        // would not take, and they must leave before the writer waits for more replies.
        w.flush().await?;
        progress.writing.store(false, Ordering::Relaxed);
        batch.clear();
    }
    w.flush().await?;
    w.shutdown().await
}

/// Most buffers handed to one `writev`.
const MAX_IOVECS: usize = 512;

async fn write_all_parts<'a>(
    w: &mut WriteHalf,
    parts: impl Iterator<Item = &'a Bytes>,
    progress: &WriterProgress,
) -> io::Result<()> {
    let mut writes = progress.writes.load(Ordering::Relaxed);
    let parts: Vec<&Bytes> = parts.filter(|p| !p.is_empty()).collect();
    let mut start = 0;
    while start < parts.len() {
        let end = (start + MAX_IOVECS).min(parts.len());
        let mut slices: Vec<IoSlice<'_>> =
            parts[start..end].iter().map(|b| IoSlice::new(b)).collect();
        let mut view: &mut [IoSlice<'_>] = &mut slices;
        while !view.is_empty() {
            let n = w.write_vectored(view).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut view, n);
            writes = writes.wrapping_add(1);
            progress.writes.store(writes, Ordering::Relaxed);
        }
        start = end;
    }
    Ok(())
}
