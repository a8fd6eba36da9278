//! Running one request on the export's backend and encoding its reply, timed for the
//! latency histograms. A reply is a list of buffers: small encoded headers and the data
//! buffers the backend returned, which are never copied on the way to the socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tracing::{debug, warn};

use crate::backend::{Backend, SharedBackend, ZeroFlags};
use crate::block::{Extent, ReadChunk};
use crate::error::Error;
use crate::proto::consts::{
    BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH, QEMU_DIRTY_BITMAP, cmd_flags, errno,
};
use crate::proto::reply::{self, ChunkTarget, Descriptor, ReplyMode};
use crate::proto::{
    Command, MetaContext, Negotiated, Refusal, RequestHeader, errno_for, normalize_extents,
};
use crate::server::export::{Export, ExportStats};

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

/// Runs a session's requests on its export's backend and encodes their replies; shared
/// by every request task of the session.
pub(super) struct Dispatcher {
    backend: SharedBackend,
    mode: ReplyMode,
    /// The metadata contexts the client selected, in the order their chunks are sent.
    contexts: Vec<MetaContext>,
    /// Reads may answer unallocated ranges as holes: the backend can tell them apart.
    sparse_reads: bool,
    /// Replies reach the socket straight from the kernel (no TLS): reads may return bytes
    /// mapped from files ([`Backend::read_for_kernel`]).
    kernel_writes: bool,
    /// A request that modifies the disk ran: the session flushes when it ends.
    wrote: AtomicBool,
    stats: Arc<ExportStats>,
}

impl Dispatcher {
    /// A dispatcher for a session on `export` with what was `negotiated`; `tls` says that
    /// replies are encrypted in user space, so reads must not return bytes mapped from
    /// files.
    pub(super) fn new(export: &Export, negotiated: &Negotiated, tls: bool) -> Self {
        let backend = export.backend().clone();
        let mode = if negotiated.extended {
            ReplyMode::Extended
        } else if negotiated.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        };
        Dispatcher {
            sparse_reads: backend.capabilities().block_status,
            kernel_writes: !tls,
            backend,
            mode,
            contexts: negotiated.contexts.clone(),
            wrote: AtomicBool::new(false),
            stats: export.stats().clone(),
        }
    }

    /// The reply to a request validation refused.
    pub(super) fn refused(&self, h: &RequestHeader, refusal: &Refusal) -> Vec<Bytes> {
        debug!(
            command = h.command.name(),
            offset = h.offset,
            length = h.length,
            "refused: {}",
            refusal.message
        );
        self.error(h, refusal.errno, &refusal.message, None)
    }

    /// Flushes the export if a request of this session modified it: at the end of the
    /// session, after its last reply.
    pub(super) async fn flush_if_written(&self) {
        if self.wrote.load(Ordering::Relaxed) {
            if let Err(e) = self.backend.flush().await {
                warn!("flush at end of session failed: {e}");
            }
        }
    }

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
    pub(super) async fn execute(&self, h: RequestHeader, payload: Bytes) -> Vec<Bytes> {
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
