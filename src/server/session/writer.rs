//! The reply writer: the only owner of the socket's write half. It takes every reply
//! that is ready (up to [`MAX_BATCH`]) and sends them with one vectored write, then
//! releases their budget; read data goes out straight from the buffers the backend
//! filled.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::server::budget::Charge;
use crate::server::listener::WriteHalf;

/// Replies gathered into one vectored write at most.
const MAX_BATCH: usize = 64;

/// One encoded reply, kept with the budget it holds until it is on the wire.
pub(super) struct Outgoing {
    /// The encoded reply: headers and data buffers, in order.
    parts: Vec<Bytes>,
    /// Released once the reply is written.
    _charge: Charge,
}

impl Outgoing {
    /// The reply `parts`, holding `charge` until they are written.
    pub(super) fn new(parts: Vec<Bytes>, charge: Charge) -> Self {
        Outgoing {
            parts,
            _charge: charge,
        }
    }
}

/// What the reply writer tells the idle watch: whether it is in the middle of a write,
/// and how many writes it finished. Plain stores, a few per batch of replies.
#[derive(Debug, Default)]
pub(super) struct WriterProgress {
    writing: AtomicBool,
    writes: AtomicU64,
}

impl WriterProgress {
    /// Is a batch being written now?
    pub(super) fn writing(&self) -> bool {
        self.writing.load(Ordering::Relaxed)
    }

    /// Writes finished so far (wrapping).
    pub(super) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

/// Writes every reply sent on `rx`, batching those that are ready into one vectored
/// write, until every sender is gone; then shuts the write half down.
pub(super) async fn write_loop(
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

/// Writes `parts` in full, at most [`MAX_IOVECS`] buffers per system call.
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
