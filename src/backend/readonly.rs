//! A layer that refuses every modification of the backend below it.

use bytes::Bytes;

use super::{Backend, BlockSize, Capabilities, ZeroFlags};
use crate::block::{DepthExtent, DirtyExtent, Extent, ReadChunk};
use crate::error::{Error, ErrorKind, Result};

/// Wraps a backend so that it is exported read-only. The protocol layer already refuses
/// writes to read-only exports with `EPERM`; this layer makes the guarantee hold for any
/// other caller too.
#[derive(Debug)]
pub struct ReadOnly<B> {
    inner: B,
}

impl<B> ReadOnly<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        ReadOnly { inner }
    }
}

fn refused(op: &'static str) -> Error {
    Error::msg(ErrorKind::ReadOnly, "export is read-only").with_op(op)
}

impl<B: Backend> Backend for ReadOnly<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            flush: false,
            fua: false,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            ..self.inner.capabilities()
        }
    }

    fn block_size(&self) -> BlockSize {
        self.inner.block_size()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.inner.read(offset, len).await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        self.inner.read_sparse(offset, len).await
    }

    async fn read_for_kernel(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.inner.read_for_kernel(offset, len).await
    }

    async fn read_sparse_for_kernel(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        self.inner.read_sparse_for_kernel(offset, len).await
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<()> {
        Err(refused("write"))
    }

    async fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> Result<()> {
        Err(refused("trim"))
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        Err(refused("write_zeroes"))
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.block_status(offset, len).await
    }

    async fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>> {
        self.inner.allocation_depth(offset, len).await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.cache(offset, len).await
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.inner.dirty_bitmaps()
    }

    async fn dirty_status(
        &self,
        bitmap: String,
        offset: u64,
        len: u64,
    ) -> Result<Vec<DirtyExtent>> {
        self.inner.dirty_status(bitmap, offset, len).await
    }
}
