//! Reading requests: headers decoded from a buffer, payloads read into buffers of their
//! own, each request validated and charged to the connection's budget before its payload
//! is read. Waiting for the budget is the backpressure: while it is spent, nothing more is
//! read from the socket.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;

use super::SessionEnd;
use crate::proto::{Command, Limits, Negotiated, ProtocolError, Refusal, RequestHeader, validate};
use crate::server::budget::{Charge, ConnBudget};
use crate::server::listener::ReadHalf;

/// Payloads larger than this cannot be skipped politely and end the connection.
const MAX_SKIPPABLE_PAYLOAD: u64 = u32::MAX as u64;

/// Minimum charge against the in-flight budget, so that the budget also bounds the number
/// of requests (and tasks) in flight.
const MIN_CHARGE: u64 = 64 * 1024;

/// What validation checks a session's requests against: what was negotiated.
pub(super) fn limits(negotiated: &Negotiated) -> Limits {
    Limits {
        size: negotiated.export.size,
        flags: negotiated.flags,
        max_payload: negotiated.export.block_sizes.maximum,
        structured: negotiated.structured,
        extended: negotiated.extended,
        has_contexts: !negotiated.contexts.is_empty(),
    }
}

/// Buffered reading of request headers and payloads from the socket.
pub(super) struct FrameReader {
    inner: ReadHalf,
    buf: BytesMut,
}

const READ_CHUNK: usize = 64 * 1024;

impl FrameReader {
    /// A reader of `inner`, starting with the bytes the handshake read past its end.
    pub(super) fn new(inner: ReadHalf, leftover: BytesMut) -> Self {
        FrameReader {
            inner,
            buf: leftover,
        }
    }

    /// Bytes buffered and not consumed yet.
    pub(super) fn buffered(&self) -> usize {
        self.buf.len()
    }

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

/// What the reader got from the client.
pub(super) enum Step {
    /// A valid request, its payload read, its budget charged.
    Request(RequestHeader, Bytes, Charge),
    /// A request validation refused; its payload, if any, was skipped.
    Refused(RequestHeader, Refusal, Charge),
    /// The session must end.
    End(SessionEnd),
}

/// Reads the next request: its header, its charge against the budget, its payload.
pub(super) async fn next_request(
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
