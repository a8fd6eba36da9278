//! Volumes with history as backends: the live disk ([`HistoryBackend`]) and the disk as
//! it was at a restore point ([`PointBackend`], read-only).
//!
//! The engine in [`crate::history`] is synchronous, like the image engine: it runs inline
//! when the volume's files live in memory and on the blocking pool otherwise. A live
//! volume served in a runtime also gets a maintenance task (retention and checkpoints,
//! once a second) that ends with the volume.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use tracing::warn;

use super::blocking::offload;
use super::{Backend, Capabilities, ZeroFlags};
use crate::block::{DepthExtent, DirtyExtent, Extent};
use crate::error::{Error, ErrorKind, Result};
use crate::history::{History, PointView};

/// How often retention and checkpoints run on a live volume.
const MAINTENANCE: Duration = Duration::from_secs(1);

fn inline(history: &History) -> bool {
    history.in_memory()
}

/// The live disk of a volume with history. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct HistoryBackend {
    history: Arc<History>,
    inline: bool,
}

impl HistoryBackend {
    /// Serves `history`'s live disk, with its maintenance task if writable and inside a
    /// tokio runtime.
    pub fn new(history: Arc<History>) -> HistoryBackend {
        if !history.read_only() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(maintain(Arc::downgrade(&history)));
            }
        }
        HistoryBackend {
            inline: inline(&history),
            history,
        }
    }

    /// The volume.
    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&History) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let h = Arc::clone(&self.history);
        offload(self.inline, "volume", move || f(&h)).await
    }
}

async fn maintain(history: Weak<History>) {
    let mut tick = tokio::time::interval(MAINTENANCE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(h) = history.upgrade() else { break };
        match tokio::task::spawn_blocking(move || h.maintain()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("volume maintenance: {e}"),
            Err(e) => warn!("volume maintenance task failed: {e}"),
        }
    }
}

fn capabilities(read_only: bool) -> Capabilities {
    let writable = !read_only;
    Capabilities {
        read_only,
        flush: writable,
        fua: writable,
        trim: writable,
        write_zeroes: writable,
        fast_zero: writable,
        block_status: true,
        multi_conn: true,
        ..Capabilities::NONE
    }
}

impl Backend for HistoryBackend {
    fn size(&self) -> u64 {
        self.history.size()
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(self.history.read_only())
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.run(move |h| {
            let mut buf = vec![0u8; len];
            h.read(offset, &mut buf)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.run(move |h| h.write(offset, &data, fua)).await
    }

    async fn flush(&self) -> Result<()> {
        self.run(History::flush).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.run(move |h| h.zero(offset, len, true, fua)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        // Zeroing is one record whatever the length, so it is always fast; NO_HOLE keeps
        // the blocks allocated.
        self.run(move |h| h.zero(offset, len, !flags.no_hole, flags.fua))
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.run(move |h| h.block_status(offset, len, None)).await
    }

    async fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>> {
        self.run(move |h| h.allocation_depth(offset, len)).await
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.history.snapshot_names()
    }

    async fn dirty_status(&self, name: String, offset: u64, len: u64) -> Result<Vec<DirtyExtent>> {
        self.run(move |h| {
            let since = h.snapshot_lineage(&name).ok_or_else(|| {
                Error::msg(ErrorKind::NotFound, format!("no snapshot named {name:?}"))
            })?;
            h.changed_since(&since, offset, len)
        })
        .await
    }
}

/// The disk of a volume as it was at a restore point, read-only. The point is kept
/// while this lives.
#[derive(Debug, Clone)]
pub struct PointBackend {
    view: Arc<PointView>,
    inline: bool,
}

impl PointBackend {
    /// Serves `view`.
    pub fn new(view: PointView) -> PointBackend {
        PointBackend {
            inline: inline(view.history()),
            view: Arc::new(view),
        }
    }

    /// The view served.
    pub fn view(&self) -> &Arc<PointView> {
        &self.view
    }

    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&PointView) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let v = Arc::clone(&self.view);
        offload(self.inline, "volume", move || f(&v)).await
    }
}

impl Backend for PointBackend {
    fn size(&self) -> u64 {
        self.view.history().size()
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(true)
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.run(move |v| {
            let mut buf = vec![0u8; len];
            v.read(offset, &mut buf)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<()> {
        Err(Error::msg(ErrorKind::ReadOnly, "a restore point is read-only").with_op("write"))
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.run(move |v| v.history().block_status(offset, len, Some(v.lineage())))
            .await
    }
}
