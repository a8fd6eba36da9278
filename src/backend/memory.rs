//! A sparse disk held in memory.
//!
//! The disk is split into [`CHUNK_SIZE`] chunks and only chunks that have been written hold
//! memory, so a disk of many TiB costs nothing until it is used. Chunks live in a fixed set
//! of shards, each a map behind its own lock; consecutive chunks fall into different shards,
//! so concurrent requests on different chunks rarely contend, and no lock is ever held
//! across an `.await`.
//!
//! Allocation is visible to clients: unwritten chunks read as zero, are reported as holes by
//! [`Backend::block_status`] and as [`ReadChunk::Zero`] by [`Backend::read_sparse`]. Trimming
//! or zeroing a whole chunk frees it (unless `no_hole` is set, in which case an allocated
//! chunk stays allocated and is filled with zeroes).
//!
//! Chunks are reference-counted and copied on write: [`Backend::read_sparse`] hands out
//! slices of the chunks themselves, so a reply goes to the socket without being copied
//! first, and a write to a chunk that a pending reply still holds writes a copy of the
//! chunk instead (the reply keeps the contents it was read with).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::{Bytes, BytesMut};

use super::{Backend, Capabilities, ZeroFlags};
use crate::block::{Extent, ReadChunk};
use crate::error::Result;
use crate::mapping::slice_of;

const CHUNK_SHIFT: u32 = 16;

/// Allocation granularity of [`MemoryBackend`]: 64 KiB.
pub const CHUNK_SIZE: usize = 1 << CHUNK_SHIFT;

const CHUNK: u64 = CHUNK_SIZE as u64;

/// Number of lock shards (a power of two).
const SHARDS: usize = 256;

/// The bytes of one allocated chunk, always [`CHUNK_SIZE`] long, shared with the replies
/// that are reading it.
type ChunkBuf = Arc<Box<[u8]>>;

/// A new chunk of zeroes with `src` copied in at `start`.
fn new_chunk(start: usize, src: &[u8]) -> ChunkBuf {
    if src.len() == CHUNK_SIZE {
        return Arc::new(Box::from(src));
    }
    let mut buf = vec![0u8; CHUNK_SIZE].into_boxed_slice();
    buf[start..start + src.len()].copy_from_slice(src);
    Arc::new(buf)
}

type ChunkMap = HashMap<u64, ChunkBuf, BuildHasherDefault<ChunkHasher>>;

/// One lock and its chunks, padded to its own cache lines so that threads working on
/// neighbouring shards do not false-share the lock words.
#[repr(align(128))]
#[derive(Default)]
struct Shard(RwLock<ChunkMap>);

impl Shard {
    fn read(&self) -> RwLockReadGuard<'_, ChunkMap> {
        // A panic while a lock was held can at worst have left a chunk half copied, which
        // is what a torn write looks like anyway; the map itself stays consistent.
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, ChunkMap> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Hasher for chunk indices: a single folded multiply, much cheaper than SipHash and good
/// enough for keys that are not attacker-chosen beyond their range (the protocol bounds
/// them by the disk size, and collisions only cost time).
#[derive(Default)]
struct ChunkHasher(u64);

const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for ChunkHasher {
    fn finish(&self) -> u64 {
        let product = u128::from(self.0) * u128::from(MIX);
        (product as u64) ^ ((product >> 64) as u64)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(MIX);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The part of one chunk that a request touches.
#[derive(Debug, Clone, Copy)]
struct Piece {
    /// Chunk index.
    chunk: u64,
    /// Offset of the piece inside the chunk.
    start: usize,
    /// Length of the piece.
    len: usize,
}

/// Splits `[offset, offset + len)` at chunk boundaries.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let chunk = pos >> CHUNK_SHIFT;
        let start = (pos & (CHUNK - 1)) as usize;
        let len = (CHUNK - start as u64).min(end - pos) as usize;
        pos += len as u64;
        Some(Piece { chunk, start, len })
    })
}

/// Fills a chunk with zeroes, or replaces it with a zeroed one if a reply holds it.
fn zero_chunk(buf: &mut ChunkBuf) {
    match Arc::get_mut(buf) {
        Some(b) => b.fill(0),
        None => *buf = Arc::new(vec![0u8; CHUNK_SIZE].into_boxed_slice()),
    }
}

/// True when every byte of `buf` is zero.
fn is_zero(buf: &[u8]) -> bool {
    // OR-ing fixed-size blocks vectorises well; an early exit per block keeps the common
    // "not zero" case cheap.
    let mut blocks = buf.chunks_exact(64);
    blocks.all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// A sparse in-memory disk. See the [module documentation](self).
pub struct MemoryBackend {
    size: u64,
    shards: Box<[Shard]>,
    /// Number of allocated chunks, kept in step with the maps under their locks.
    allocated: AtomicU64,
}

impl MemoryBackend {
    /// Creates a disk of `size` bytes that reads as zeroes. No memory is allocated until
    /// data is written.
    pub fn new(size: u64) -> Self {
        MemoryBackend {
            size,
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            allocated: AtomicU64::new(0),
        }
    }

    /// Bytes of memory currently holding disk data (a multiple of [`CHUNK_SIZE`]).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed) * CHUNK
    }

    fn shard(&self, chunk: u64) -> &Shard {
        &self.shards[(chunk as usize) & (SHARDS - 1)]
    }

    fn nothing_allocated(&self) -> bool {
        self.allocated.load(Ordering::Relaxed) == 0
    }

    /// Number of bytes of chunk `chunk` that lie inside the disk.
    fn chunk_len(&self, chunk: u64) -> usize {
        (self.size - (chunk << CHUNK_SHIFT)).min(CHUNK) as usize
    }

    fn debug_check_range(&self, offset: u64, len: u64) {
        debug_assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.size),
            "request [{offset}, +{len}) outside a disk of {} bytes",
            self.size
        );
    }

    fn read_into(&self, offset: u64, len: usize, out: &mut BytesMut) {
        if self.nothing_allocated() {
            out.resize(out.len() + len, 0);
            return;
        }
        for p in pieces(offset, len as u64) {
            let map = self.shard(p.chunk).read();
            match map.get(&p.chunk) {
                Some(buf) => out.extend_from_slice(&buf[p.start..p.start + p.len]),
                None => {
                    drop(map);
                    out.resize(out.len() + p.len, 0);
                }
            }
        }
    }

    fn read_sparse_sync(&self, offset: u64, len: usize) -> Vec<ReadChunk> {
        if len == 0 {
            return Vec::new();
        }
        if self.nothing_allocated() {
            return vec![ReadChunk::Zero(len as u64)];
        }
        // Each allocated piece is a slice of its chunk, not a copy.
        let mut chunks = Vec::new();
        let mut zero_run = 0u64;
        for p in pieces(offset, len as u64) {
            let chunk = self.shard(p.chunk).read().get(&p.chunk).cloned();
            match chunk {
                Some(chunk) => {
                    if zero_run > 0 {
                        chunks.push(ReadChunk::Zero(zero_run));
                        zero_run = 0;
                    }
                    chunks.push(ReadChunk::Data(slice_of(&chunk, p.start, p.len, None)));
                }
                None => zero_run += p.len as u64,
            }
        }
        if zero_run > 0 {
            chunks.push(ReadChunk::Zero(zero_run));
        }
        chunks
    }

    fn write_sync(&self, offset: u64, data: &[u8]) {
        let mut done = 0;
        for p in pieces(offset, data.len() as u64) {
            self.write_piece(p, &data[done..done + p.len]);
            done += p.len;
        }
    }

    fn write_piece(&self, p: Piece, src: &[u8]) {
        let shard = self.shard(p.chunk);
        if let Some(buf) = shard.write().get_mut(&p.chunk) {
            Arc::make_mut(buf)[p.start..p.start + p.len].copy_from_slice(src);
            return;
        }
        // Allocate outside the lock, then insert unless another writer got there first.
        let fresh = new_chunk(p.start, src);
        let mut map = shard.write();
        match map.entry(p.chunk) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                Arc::make_mut(e.get_mut())[p.start..p.start + p.len].copy_from_slice(src);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(fresh);
                self.allocated.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Makes `[offset, offset + len)` read as zeroes. With `punch`, chunks that end up
    /// entirely zero are freed; without it, allocated chunks stay allocated.
    fn zero_sync(&self, offset: u64, len: u64, punch: bool) {
        if len == 0 || self.nothing_allocated() {
            return;
        }
        let end = offset + len;
        let first = offset >> CHUNK_SHIFT;
        let last = (end - 1) >> CHUNK_SHIFT;
        let piece = |chunk: u64| {
            let base = chunk << CHUNK_SHIFT;
            let from = offset.max(base);
            let to = end.min(base + CHUNK);
            Piece {
                chunk,
                start: (from - base) as usize,
                len: (to - from) as usize,
            }
        };
        let partial = |p: Piece| !(p.start == 0 && p.len == self.chunk_len(p.chunk));
        // Only the first and the last chunk can be partly covered.
        let (head, tail) = (piece(first), piece(last));
        let (head_partial, tail_partial) = (partial(head), partial(tail));
        if head_partial {
            self.zero_partial(head, punch);
        }
        if last != first && tail_partial {
            self.zero_partial(tail, punch);
        }
        let lo = first + u64::from(head_partial);
        let hi = last + 1 - u64::from(tail_partial);
        if lo < hi {
            self.zero_whole(lo, hi, punch);
        }
    }

    fn zero_partial(&self, p: Piece, punch: bool) {
        let mut map = self.shard(p.chunk).write();
        let Some(buf) = map.get_mut(&p.chunk) else {
            return;
        };
        let buf = Arc::make_mut(buf);
        buf[p.start..p.start + p.len].fill(0);
        if punch && is_zero(buf) {
            map.remove(&p.chunk);
            self.allocated.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Zeroes (with `punch`: frees) every allocated chunk with index in `[lo, hi)`.
    fn zero_whole(&self, lo: u64, hi: u64, punch: bool) {
        if hi - lo <= self.allocated.load(Ordering::Relaxed) {
            for chunk in lo..hi {
                let mut map = self.shard(chunk).write();
                if punch {
                    if map.remove(&chunk).is_some() {
                        self.allocated.fetch_sub(1, Ordering::Relaxed);
                    }
                } else if let Some(buf) = map.get_mut(&chunk) {
                    zero_chunk(buf);
                }
            }
        } else {
            // The range holds more chunks than are allocated in the whole disk: walking
            // the maps is cheaper than looking up every index (a TiB-sized trim).
            for shard in self.shards.iter() {
                let mut map = shard.write();
                if punch {
                    let before = map.len();
                    map.retain(|chunk, _| !(lo..hi).contains(chunk));
                    let removed = (before - map.len()) as u64;
                    self.allocated.fetch_sub(removed, Ordering::Relaxed);
                } else {
                    map.iter_mut()
                        .filter(|(chunk, _)| (lo..hi).contains(*chunk))
                        .for_each(|(_, buf)| zero_chunk(buf));
                }
            }
        }
    }

    fn block_status_sync(&self, offset: u64, len: u64) -> Vec<Extent> {
        if len == 0 {
            return Vec::new();
        }
        if self.nothing_allocated() {
            return vec![Extent::hole(len)];
        }
        let end = offset + len;
        let first = offset >> CHUNK_SHIFT;
        let last = (end - 1) >> CHUNK_SHIFT;
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |allocated: bool, length: u64| match extents.last_mut() {
            Some(e) if e.hole != allocated => e.length += length,
            _ => extents.push(if allocated {
                Extent::data(length)
            } else {
                Extent::hole(length)
            }),
        };
        let span = last - first + 1;
        if span <= self.allocated.load(Ordering::Relaxed).max(1024) {
            for p in pieces(offset, len) {
                let allocated = self.shard(p.chunk).read().contains_key(&p.chunk);
                push(allocated, p.len as u64);
            }
        } else {
            // Sparse case: collect the allocated chunks in range instead of probing every
            // index.
            let mut hits: Vec<u64> = Vec::new();
            for shard in self.shards.iter() {
                hits.extend(
                    shard
                        .read()
                        .keys()
                        .copied()
                        .filter(|c| (first..=last).contains(c)),
                );
            }
            hits.sort_unstable();
            let mut pos = offset;
            for chunk in hits {
                let start = (chunk << CHUNK_SHIFT).max(offset);
                let stop = ((chunk + 1) << CHUNK_SHIFT).min(end);
                if start > pos {
                    push(false, start - pos);
                }
                push(true, stop - start);
                pos = stop;
            }
            if pos < end {
                push(false, end - pos);
            }
        }
        extents
    }
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("size", &self.size)
            .field("allocated_bytes", &self.allocated_bytes())
            .finish()
    }
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            block_status: true,
            cache: true,
            multi_conn: true,
            ..Capabilities::NONE
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.debug_check_range(offset, len as u64);
        let mut out = BytesMut::with_capacity(len);
        self.read_into(offset, len, &mut out);
        Ok(out.freeze())
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        self.debug_check_range(offset, len as u64);
        Ok(self.read_sparse_sync(offset, len))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<()> {
        self.debug_check_range(offset, data.len() as u64);
        self.write_sync(offset, &data);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<()> {
        self.debug_check_range(offset, len);
        self.zero_sync(offset, len, true);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.debug_check_range(offset, len);
        self.zero_sync(offset, len, !flags.no_hole);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.debug_check_range(offset, len);
        Ok(self.block_status_sync(offset, len))
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.debug_check_range(offset, len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_chunk_boundaries() {
        let ps: Vec<_> = pieces(CHUNK - 10, CHUNK + 20)
            .map(|p| (p.chunk, p.start, p.len))
            .collect();
        assert_eq!(
            ps,
            vec![(0, CHUNK_SIZE - 10, 10), (1, 0, CHUNK_SIZE), (2, 0, 10)]
        );
        assert_eq!(pieces(5, 0).count(), 0);
    }

    #[test]
    fn is_zero_checks_every_byte() {
        let mut buf = vec![0u8; 1000];
        assert!(is_zero(&buf));
        buf[999] = 1;
        assert!(!is_zero(&buf));
        buf[999] = 0;
        buf[3] = 1;
        assert!(!is_zero(&buf));
    }
}
