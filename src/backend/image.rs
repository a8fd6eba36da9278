//! Strata images (sparse, and copy-on-write overlays over any depth of backing files) as
//! a [`Backend`].
//!
//! The engine in [`crate::image::Chain`] is synchronous: it runs inline when every layer
//! lives in memory, and on tokio's blocking pool otherwise, like the raw backend.
//!
//! It is a backend of its own, not a [`super::Filter`]: below it is the engine, not
//! another backend to pass requests to. Each method is a call into the engine, and
//! the methods it leaves out take [`Backend`]'s defaults on purpose (a plain read for
//! the kernel is a copy: only sparse reads may point into the layers' mappings).

use std::sync::Arc;

use bytes::Bytes;

use super::{Backend, BlockSize, Capabilities, ZeroFlags};
use crate::block::{DepthExtent, DirtyExtent, Extent, ReadChunk};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{Chain, ZeroMode, snapshot};

/// A Strata image served as a disk. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct ImageBackend {
    chain: Arc<Chain>,
    inline: bool,
    /// The snapshots in the chain, as (name, layer index), oldest first.
    snapshots: Arc<[(String, usize)]>,
}

impl ImageBackend {
    /// Serves `chain`.
    pub fn new(chain: Chain) -> ImageBackend {
        let inline = chain.in_memory();
        let snapshots = snapshot::in_chain(&chain)
            .into_iter()
            .map(|s| (s.name, s.layer))
            .collect();
        ImageBackend {
            chain: Arc::new(chain),
            inline,
            snapshots,
        }
    }

    /// The engine underneath.
    pub fn chain(&self) -> &Arc<Chain> {
        &self.chain
    }

    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Chain) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let chain = Arc::clone(&self.chain);
        super::blocking::offload(self.inline, "image", move || f(&chain)).await
    }
}

impl Backend for ImageBackend {
    fn size(&self) -> u64 {
        self.chain.size()
    }

    fn capabilities(&self) -> Capabilities {
        let writable = self.chain.writable();
        Capabilities {
            read_only: !writable,
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

    fn block_size(&self) -> BlockSize {
        BlockSize::default()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.run(move |c| Ok(Bytes::from(c.read_vec(offset, len)?)))
            .await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        self.run(move |c| c.read_sparse(offset, len)).await
    }

    async fn read_sparse_for_kernel(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        self.run(move |c| c.read_sparse_for_kernel(offset, len))
            .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.run(move |c| c.write(offset, &data, fua)).await
    }

    async fn flush(&self) -> Result<()> {
        self.run(Chain::flush).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.run(move |c| c.zero(offset, len, ZeroMode::Trim, fua))
            .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let mode = if flags.no_hole {
            if flags.fast {
                // Zeroes written as data are not fast.
                return Err(Error::new(ErrorKind::NotSupported).with_op("write_zeroes"));
            }
            ZeroMode::ZeroNoHole
        } else {
            ZeroMode::Zero
        };
        self.run(move |c| c.zero(offset, len, mode, flags.fua))
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.run(move |c| c.block_status(offset, len)).await
    }

    async fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>> {
        self.run(move |c| c.allocation_depth(offset, len)).await
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.snapshots.iter().map(|(n, _)| n.clone()).collect()
    }

    async fn dirty_status(&self, name: String, offset: u64, len: u64) -> Result<Vec<DirtyExtent>> {
        let Some(&(_, layer)) = self.snapshots.iter().find(|(n, _)| *n == name) else {
            return Err(Error::msg(
                ErrorKind::NotFound,
                format!("no snapshot named {name:?} below this disk"),
            ));
        };
        self.run(move |c| snapshot::changed_since(c, layer, offset, len))
            .await
    }
}
