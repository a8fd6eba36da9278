//! A layer whose backend can be replaced between two requests.
//!
//! Requests hold the layer shared while they run; [`Switchable::pause`] waits for those
//! in progress to finish, holds new ones back, and lets the caller replace the backend
//! (a snapshot puts a new live image in place this way) before letting them through.
//! Every request therefore runs wholly on the old backend or wholly on the new one.

use bytes::Bytes;
use tokio::sync::{RwLock, RwLockWriteGuard};

use super::{Backend, BlockSize, Capabilities, ZeroFlags};
use crate::block::{DepthExtent, DirtyExtent, Extent, ReadChunk};
use crate::error::Result;

/// See the [module documentation](self).
#[derive(Debug)]
pub struct Switchable<B> {
    current: RwLock<B>,
    /// The current backend's dirty bitmaps, readable without waiting for a pause.
    bitmaps: std::sync::Mutex<Vec<String>>,
    // Size, capabilities and block sizes are fixed at creation: clients learnt them in
    // the handshake, so a replacement must match them.
    size: u64,
    capabilities: Capabilities,
    block_size: BlockSize,
}

/// Requests are held back while this lives; see [`Switchable::pause`].
#[derive(Debug)]
pub struct Paused<'a, B> {
    guard: RwLockWriteGuard<'a, B>,
    bitmaps: &'a std::sync::Mutex<Vec<String>>,
}

impl<B: Backend> Paused<'_, B> {
    /// The backend in place.
    pub fn current(&self) -> &B {
        &self.guard
    }

    /// Puts `backend` in place of the current one, which is returned.
    ///
    /// # Panics
    /// If `backend` differs in size or capabilities: clients would see a different disk.
    pub fn replace(&mut self, backend: B) -> B {
        assert_eq!(
            backend.size(),
            self.guard.size(),
            "a replacement keeps the size"
        );
        assert_eq!(
            backend.capabilities(),
            self.guard.capabilities(),
            "a replacement keeps the capabilities"
        );
        let names = backend.dirty_bitmaps();
        let old = std::mem::replace(&mut *self.guard, backend);
        *self
            .bitmaps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = names;
        old
    }
}

impl<B: Backend> Switchable<B> {
    /// Serves `backend` until it is replaced.
    pub fn new(backend: B) -> Self {
        Switchable {
            size: backend.size(),
            capabilities: backend.capabilities(),
            block_size: backend.block_size(),
            bitmaps: std::sync::Mutex::new(backend.dirty_bitmaps()),
            current: RwLock::new(backend),
        }
    }

    /// Waits until no request is running and holds new ones back until the returned
    /// guard is dropped. Requests queue fairly: once a pause is waiting, requests that
    /// arrive after it wait for it.
    pub async fn pause(&self) -> Paused<'_, B> {
        Paused {
            guard: self.current.write().await,
            bitmaps: &self.bitmaps,
        }
    }

    /// Runs `f` on the backend in place, holding off replacements meanwhile.
    pub async fn with<T>(&self, f: impl FnOnce(&B) -> T) -> T {
        f(&*self.current.read().await)
    }
}

impl<B: Backend> Backend for Switchable<B> {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    fn block_size(&self) -> BlockSize {
        self.block_size
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.current.read().await.read(offset, len).await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        self.current.read().await.read_sparse(offset, len).await
    }

    async fn read_for_kernel(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.current.read().await.read_for_kernel(offset, len).await
    }

    async fn read_sparse_for_kernel(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        self.current
            .read()
            .await
            .read_sparse_for_kernel(offset, len)
            .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.current.read().await.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<()> {
        self.current.read().await.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.current.read().await.trim(offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.current
            .read()
            .await
            .write_zeroes(offset, len, flags)
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.current.read().await.block_status(offset, len).await
    }

    async fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>> {
        self.current
            .read()
            .await
            .allocation_depth(offset, len)
            .await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.current.read().await.cache(offset, len).await
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.bitmaps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn dirty_status(
        &self,
        bitmap: String,
        offset: u64,
        len: u64,
    ) -> Result<Vec<DirtyExtent>> {
        self.current
            .read()
            .await
            .dirty_status(bitmap, offset, len)
            .await
    }
}
