//! The engine of an open image: a writable (or read-only) top layer over a read-only
//! chain of backing layers, served through one merged cluster map.
//!
//! # Concurrency
//! - `state` (a read-write lock) guards the merged map and the allocation bookkeeping; it
//!   is held only to look up or change entries, never across I/O.
//! - `alloc` serialises requests that change the map (allocating writes, trims, zeroing),
//!   so two writers never allocate the same cluster twice.
//! - `commit` serialises metadata commits (flush).
//! - `gate` is held shared by every request for the duration of its I/O and taken
//!   exclusively, briefly, before freed clusters are reused: a request that looked up a
//!   cluster before it was freed finishes before the cluster can hold anybody else's data.
//!
//! # Crash safety
//! Data goes to newly allocated clusters first; map changes live in memory until a flush
//! commits them: `fdatasync` the data, write changed L2 pages to their older slots,
//! `fdatasync`, write changed L1 pages the same way, `fdatasync`. Freed clusters become
//! reusable only after the commit that unmapped them is durable. `docs/format.md` spells
//! out why every crash point is safe.

use std::collections::BTreeSet;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

use super::format::{
    self, BackingKind, ENTRIES, Entry, Header, L1Entry, PAGE, PageKind, encode_page,
};
use super::layer::{L2Content, PageState, Scan};
use super::map::{FreeList, MergedMap, Page, entry};
use super::storage::{Storage, as_uninit};
use crate::block::{DepthExtent, Extent, ReadChunk};
use crate::error::{Error, ErrorKind, Result};

/// Dirty map pages that trigger a commit without waiting for a flush.
const AUTO_COMMIT_PAGES: usize = 1024;
/// Freed ranges that trigger a commit, so that their space can be reused.
const AUTO_COMMIT_FREED: usize = 4096;
/// Size of an L2 page pair.
const PAIR: u64 = 2 * PAGE as u64;

/// What a layer of a chain is.
#[derive(Debug, Clone)]
pub enum LayerKind {
    /// A raw file or block device, always the bottom of a chain.
    Raw {
        /// Its size in bytes.
        size: u64,
    },
    /// A Strata image.
    Strata {
        /// Its header.
        header: Header,
    },
}

/// One layer of a chain.
#[derive(Debug)]
pub struct Layer {
    /// Where its bytes live.
    pub storage: Arc<dyn Storage>,
    /// Its path, for messages and `strata info`.
    pub path: PathBuf,
    /// Raw or Strata, with details.
    pub kind: LayerKind,
}

impl Layer {
    /// The virtual size this layer presents.
    pub fn size(&self) -> u64 {
        match &self.kind {
            LayerKind::Raw { size } => *size,
            LayerKind::Strata { header, .. } => header.virtual_size,
        }
    }
}

/// The read-only lower part of a chain: the backing layers of an overlay, with their
/// merged map. Shared by every overlay of the same base.
#[derive(Debug)]
pub struct Lower {
    /// Layers, bottom first.
    pub layers: Vec<Arc<Layer>>,
    map: MergedMap,
    /// What an overlay of this chain records to recognise it.
    pub identity: (BackingKind, [u8; 16]),
    /// The shared chain below this one's top, kept open (and so in the cache of open
    /// chains) as long as this one is.
    pub(super) below: Option<Arc<Lower>>,
}

impl Lower {
    /// A chain of one raw layer. `identity` is its content fingerprint.
    pub fn raw(storage: Arc<dyn Storage>, path: &Path, identity: [u8; 16]) -> Result<Lower> {
        let size = storage
            .len()
            .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
        Ok(Lower {
            layers: vec![Arc::new(Layer {
                storage,
                path: path.to_path_buf(),
                kind: LayerKind::Raw { size },
            })],
            map: MergedMap::default(),
            identity: (BackingKind::Raw, identity),
            below: None,
        })
    }

    /// A Strata layer (already scanned) over `below`.
    pub fn strata(
        storage: Arc<dyn Storage>,
        path: &Path,
        scan: Scan,
        below: Option<&Lower>,
    ) -> Result<Lower> {
        let mut layers = below.map(|b| b.layers.clone()).unwrap_or_default();
        let mut map = below.map(|b| b.map.clone()).unwrap_or_default();
        let id = layer_id(layers.len(), path)?;
        overlay_scan(&mut map, &scan, id);
        let identity = (BackingKind::Strata, scan.header.image_id);
        layers.push(Arc::new(Layer {
            storage,
            path: path.to_path_buf(),
            kind: LayerKind::Strata {
                header: scan.header,
            },
        }));
        Ok(Lower {
            layers,
            map,
            identity,
            below: None,
        })
    }

    /// Virtual size of the chain's top.
    pub fn size(&self) -> u64 {
        self.layers.last().map_or(0, |l| l.size())
    }

    /// The top layer of this chain.
    pub fn top(&self) -> &Arc<Layer> {
        self.layers.last().expect("a chain has a layer")
    }

    /// The chain below this one's top layer, when it has one.
    pub fn below(&self) -> Option<&Arc<Lower>> {
        self.below.as_ref()
    }

    /// Cluster size of the chain's top, when it is a Strata image.
    pub fn cluster_bits(&self) -> Option<u32> {
        match &self.layers.last()?.kind {
            LayerKind::Strata { header, .. } => Some(header.cluster_bits),
            LayerKind::Raw { .. } => None,
        }
    }
}

fn layer_id(index: usize, path: &Path) -> Result<u16> {
    u16::try_from(index).map_err(|_| {
        Error::msg(ErrorKind::InvalidInput, "backing chain is too deep")
            .with_op("open")
            .with_path(path)
    })
}

/// Lays the clusters a scanned image maps over `map`, as layer `id`.
fn overlay_scan(map: &mut MergedMap, scan: &Scan, id: u16) {
    map.grow(scan.header.l2_pages() as usize);
    let zero_page: Arc<Page> = Arc::new([entry::zero(id); ENTRIES]);
    for (q, content) in &scan.pages {
        let page = match content {
            L2Content::AllZero => Arc::clone(&zero_page),
            L2Content::Entries(entries) => Arc::new(entries.map(|e| match e {
                Entry::Unallocated => entry::UNALLOCATED,
                Entry::Zero => entry::zero(id),
                Entry::Data(host) => entry::data(id, host),
            })),
        };
        map.overlay_page(*q as usize, &page);
    }
}

/// How `zero` treats whole clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Deallocate: unallocated without a backing, zero clusters with one (which hide it).
    Trim,
    /// Zero clusters: read as zeroes, no data stored.
    Zero,
    /// Write zeroes as data: the storage stays allocated.
    ZeroNoHole,
}

/// Where the bytes of a stretch of the virtual disk come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Zero,
    Raw(u64),
    Host(u16, u64),
}

#[derive(Debug, Clone, Copy)]
struct Piece {
    len: u64,
    src: Src,
}

fn push_piece(out: &mut Vec<Piece>, len: u64, src: Src) {
    if let Some(last) = out.last_mut() {
        let joins = match (last.src, src) {
            (Src::Zero, Src::Zero) => true,
            (Src::Raw(a), Src::Raw(b)) => a + last.len == b,
            (Src::Host(la, a), Src::Host(lb, b)) => la == lb && a + last.len == b,
            _ => false,
        };
        if joins {
            last.len += len;
            return;
        }
    }
    out.push(Piece { len, src });
}

/// What `map` reports for a stretch of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRange {
    /// Start on the virtual disk.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Data, zero, or unallocated (falls through to nothing).
    pub state: RangeState,
    /// 1 for the top layer, 2 for its backing, ...; 0 when no layer has it.
    pub depth: u32,
    /// Offset in the owning layer's file, for data.
    pub host: Option<u64>,
}

/// The kind of a [`MapRange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeState {
    /// Stored data.
    Data,
    /// A zero cluster.
    Zero,
    /// Not allocated anywhere: reads as zeroes.
    Unallocated,
}

/// Durable-making work a chain must finish before its first flush (see
/// [`Chain::settle_first`]).
pub type Settle = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// A past generation of zero-copy reads and the space freed while it was current.
type Retired = (Arc<()>, Vec<(u64, u64)>);

/// Generations of zero-copy reads, so that space they may point at is not reused while
/// they are alive.
#[derive(Default)]
struct Pins {
    /// Cloned by every zero-copy read.
    current: Arc<()>,
    /// Space freed while an older generation was current, with that generation.
    retired: Vec<Retired>,
}

impl Pins {
    /// Gives back the space of every generation nobody pins any more.
    fn release_unpinned(&mut self, free: &mut FreeList) {
        self.retired.retain(|(generation, ranges)| {
            if Arc::strong_count(generation) > 1 {
                return true;
            }
            for &(h, l) in ranges {
                free.give(h, l);
            }
            false
        });
    }
}

struct State {
    map: MergedMap,
    /// State of each L1 page of the top image.
    l1: Vec<PageState>,
    /// L2 page pairs of the top image, by page index.
    pairs: std::collections::HashMap<u32, PageState>,
    /// L2 pages whose top-layer entries changed since the last commit.
    dirty: BTreeSet<u32>,
    /// L1 pages to rewrite at the next commit whatever else changes (repairs).
    l1_dirty: BTreeSet<usize>,
    /// Reusable space in the top image's file.
    free: FreeList,
    /// Space unmapped since the last commit: reusable once that commit is durable.
    pending_free: Vec<(u64, u64)>,
    /// Allocation frontier: the first byte past everything in use.
    eof: u64,
}

/// An open image: see the [module documentation](self).
pub struct Chain {
    layers: Vec<Arc<Layer>>,
    top: u16,
    header: Header,
    header_slot: usize,
    raw: Option<(Arc<dyn Storage>, u64)>,
    writable: bool,
    /// No backing layers: trimmed clusters can simply be unallocated.
    standalone: bool,
    zero_page: Arc<Page>,
    state: RwLock<State>,
    alloc: Mutex<()>,
    commit: Mutex<()>,
    gate: RwLock<()>,
    pins: Mutex<Pins>,
    /// Work that must be durable before this chain may acknowledge a flush: after a
    /// snapshot, the commit of the layer frozen below it and the rename that made this
    /// image the live one. Done at most once, by whoever flushes first.
    settle: Mutex<Option<Settle>>,
    /// The shared backing chain, kept open (and so in the cache of open chains) as long
    /// as this image is, for other overlays of the same base to share.
    pub(super) lower: Option<Arc<Lower>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("path", &self.path())
            .field("layers", &self.layers.len())
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

fn lock_err() -> Error {
    Error::msg(ErrorKind::Io, "internal lock poisoned by an earlier panic")
}

impl Chain {
    /// Builds a chain from a scanned top image over `lower` (already checked to be the
    /// backing the header names). The scan must have no problems unless `lenient`, in
    /// which case clusters with problems are treated as unallocated (for repair).
    pub fn new(
        storage: Arc<dyn Storage>,
        path: &Path,
        scan: Scan,
        lower: Option<&Lower>,
        writable: bool,
    ) -> Result<Chain> {
        let mut layers = lower.map(|l| l.layers.clone()).unwrap_or_default();
        let top = layer_id(layers.len(), path)?;
        let mut map = lower.map(|l| l.map.clone()).unwrap_or_default();
        overlay_scan(&mut map, &scan, top);
        let raw = match layers.first().map(|l| (&l.kind, l)) {
            Some((LayerKind::Raw { size }, l)) => Some((Arc::clone(&l.storage), *size)),
            _ => None,
        };
        let mut free = FreeList::default();
        let mut end = scan.header.data_start();
        for &(start, len) in &scan.used {
            if start > end {
                free.give(end, start - end);
            }
            end = end.max(start + len);
        }
        let eof = end.max(scan.file_len.next_multiple_of(PAGE as u64));
        if end < eof {
            free.give(end, eof - end);
        }
        let header = scan.header.clone();
        layers.push(Arc::new(Layer {
            storage,
            path: path.to_path_buf(),
            kind: LayerKind::Strata {
                header: scan.header.clone(),
            },
        }));
        let mut dirty = BTreeSet::new();
        dirty.extend(scan.rewrite.iter().copied());
        Ok(Chain {
            standalone: top == 0,
            zero_page: Arc::new([entry::zero(top); ENTRIES]),
            header_slot: scan.header_slot,
            state: RwLock::new(State {
                map,
                l1: scan.l1,
                pairs: scan.pairs,
                dirty,
                l1_dirty: BTreeSet::new(),
                free,
                pending_free: Vec::new(),
                eof,
            }),
            layers,
            top,
            header,
            raw,
            writable,
            alloc: Mutex::new(()),
            commit: Mutex::new(()),
            gate: RwLock::new(()),
            pins: Mutex::new(Pins::default()),
            settle: Mutex::new(None),
            lower: None,
        })
    }

    /// Builds a chain from a scanned top image over the shared backing chain `lower`,
    /// which it keeps open.
    pub fn over(
        storage: Arc<dyn Storage>,
        path: &Path,
        scan: Scan,
        lower: Arc<Lower>,
        writable: bool,
    ) -> Result<Chain> {
        let mut chain = Chain::new(storage, path, scan, Some(&lower), writable)?;
        chain.lower = Some(lower);
        Ok(chain)
    }

    /// The backing chain below the top, when there is one.
    pub fn lower(&self) -> Option<&Arc<Lower>> {
        self.lower.as_ref()
    }

    /// The backing chain whose top is layer `index` of this chain (0 is the bottom);
    /// `None` for the top itself or beyond.
    pub fn lower_at(&self, index: usize) -> Option<&Arc<Lower>> {
        let top = usize::from(self.top);
        if index >= top {
            return None;
        }
        let mut lower = self.lower.as_ref()?;
        for _ in index + 1..top {
            lower = lower.below.as_ref()?;
        }
        Some(lower)
    }

    /// Data and zero clusters that layer `index` (0 is the bottom) holds itself,
    /// whether or not layers above it hide them.
    pub fn clusters_of(&self, index: usize) -> Result<(u64, u64)> {
        let id = layer_id(index, self.path())?;
        if index == usize::from(self.top) {
            return Ok(self.state.read().map_err(|_| lock_err())?.map.owned_by(id));
        }
        Ok(self.lower_at(index).map_or((0, 0), |l| l.map.owned_by(id)))
    }

    /// Index of the top layer in [`Chain::layers`].
    pub fn top_index(&self) -> u16 {
        self.top
    }

    /// Turns this chain into a read-only backing chain whose top is this image, known
    /// from now on as `path` (a snapshot). Nothing may write to the chain afterwards;
    /// changes it has not committed yet stay in its memory (and in the frozen view) until
    /// its [`Chain::flush`] commits them. The merged map is shared, not rebuilt, so this
    /// costs the same whatever the size of the disk.
    pub fn freeze(&self, path: &Path) -> Result<Lower> {
        let st = self.state.read().map_err(|_| lock_err())?;
        let mut layers = self.layers[..usize::from(self.top)].to_vec();
        layers.push(Arc::new(Layer {
            storage: Arc::clone(self.storage()),
            path: path.to_path_buf(),
            kind: LayerKind::Strata {
                header: self.header.clone(),
            },
        }));
        Ok(Lower {
            layers,
            map: st.map.clone(),
            identity: (BackingKind::Strata, self.header.image_id),
            below: self.lower.clone(),
        })
    }

    /// True while replies that point into this chain's files may still be queued
    /// (zero-copy reads): their space must not be handed to a rebuilt chain yet.
    pub fn replies_pinned(&self) -> bool {
        self.pins.lock().map_or(true, |p| {
            Arc::strong_count(&p.current) > 1
                || p.retired.iter().any(|(g, _)| Arc::strong_count(g) > 1)
        })
    }

    /// Copies into the top layer every cluster that layer `owner` provides (data, and
    /// zero clusters that hide what is below), so that the chain reads the same without
    /// that layer. Clients may read and write meanwhile: a cluster they write first
    /// keeps their data. Returns the bytes of data copied.
    pub fn absorb(&self, owner: u16) -> Result<u64> {
        self.check_writable("merge")?;
        debug_assert!(owner < self.top);
        /// Clusters examined, and copied, per hold of the allocation lock.
        const SCAN: u64 = 4096;
        const COPY: usize = 32;
        let bits = self.header.cluster_bits;
        let cs = self.cluster_size();
        let (size, clusters) = (self.size(), self.header.clusters());
        let owned = |e: u64| e != entry::UNALLOCATED && entry::layer(e) == owner;
        let mut copied = 0u64;
        let mut c = 0u64;
        while c < clusters {
            let mut batch = Vec::new();
            {
                let st = self.state.read().map_err(|_| lock_err())?;
                let stop = (c + SCAN).min(clusters);
                while c < stop && batch.len() < COPY {
                    let p = c as usize / ENTRIES;
                    if st.map.page(p).is_none() {
                        c = ((p as u64 + 1) * ENTRIES as u64).min(clusters);
                        continue;
                    }
                    if owned(st.map.get(c)) {
                        batch.push(c);
                    }
                    c += 1;
                }
            }
            if batch.is_empty() {
                continue;
            }
            let commit_due = {
                let _io = self.gate.read().map_err(|_| lock_err())?;
                let _a = self.alloc.lock().map_err(|_| lock_err())?;
                let mut due = false;
                for cluster in batch {
                    // Looked at again under the lock: a client may have written it.
                    let e = self.state.read().map_err(|_| lock_err())?.map.get(cluster);
                    if !owned(e) {
                        continue;
                    }
                    if entry::host(e).is_none() {
                        self.remap(cluster, cluster + 1, entry::zero(self.top))?;
                        due |= self.commit_due()?;
                        continue;
                    }
                    let start = cluster << bits;
                    let len = cs.min(size - start) as usize;
                    let buf = read_into_new(len, |buf| {
                        let pieces = {
                            let st = self.state.read().map_err(|_| lock_err())?;
                            self.plan(&st.map, start, len as u64)
                        };
                        self.read_pieces(&pieces, start, buf)
                    })?;
                    due |= self.write_allocating(start, &buf)?;
                    copied += len as u64;
                }
                due
            };
            if commit_due {
                self.flush()?;
            }
        }
        Ok(copied)
    }

    /// Size of the virtual disk.
    pub fn size(&self) -> u64 {
        self.header.virtual_size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// The top image's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Which header slot is current.
    pub fn header_slot(&self) -> usize {
        self.header_slot
    }

    /// Path of the top image.
    pub fn path(&self) -> &Path {
        &self.layers[usize::from(self.top)].path
    }

    /// Storage of the top image.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.layers[usize::from(self.top)].storage
    }

    /// Layers, bottom first; the last is the top image.
    pub fn layers(&self) -> &[Arc<Layer>] {
        &self.layers
    }

    /// True when writes are allowed.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// True when every layer lives in memory, so calls never wait for a device.
    pub fn in_memory(&self) -> bool {
        self.layers.iter().all(|l| l.storage.in_memory())
    }

    /// Bytes of the top image's file that hold clusters or map pages, and free bytes
    /// inside it.
    pub fn space(&self) -> Result<(u64, u64)> {
        let st = self.state.read().map_err(|_| lock_err())?;
        Ok((st.eof - st.free.total(), st.free.total()))
    }

    fn io_err(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
    ) -> impl Fn(std::io::Error) -> Error + use<> {
        let path = self.path().to_path_buf();
        move |e| {
            let e = Error::from(e).with_op(op).with_path(path.clone());
            if len > 0 {
                e.with_range(offset, len)
            } else {
                e
            }
        }
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::ReadOnly).with_op(op))
        }
    }

    fn src_of(&self, e: u64, pos: u64, within: u64) -> Src {
        if let Some(host) = entry::host(e) {
            Src::Host(entry::layer(e), host + within)
        } else if entry::is_zero(e) || self.raw.is_none() {
            Src::Zero
        } else {
            Src::Raw(pos)
        }
    }

    /// Splits `[offset, offset + len)` into pieces by where their bytes come from.
    fn plan(&self, map: &MergedMap, offset: u64, len: u64) -> Vec<Piece> {
        let bits = self.header.cluster_bits;
        let mask = self.cluster_size() - 1;
        let mut out = Vec::with_capacity(1);
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let within = pos & mask;
            let n = (mask + 1 - within).min(end - pos);
            let src = self.src_of(map.get(pos >> bits), pos, within);
            push_piece(&mut out, n, src);
            pos += n;
        }
        out
    }

    fn read_piece(&self, piece: Piece, buf: &mut [MaybeUninit<u8>], offset: u64) -> Result<()> {
        match piece.src {
            Src::Zero => buf.fill(MaybeUninit::new(0)),
            Src::Raw(lba) => {
                let (storage, size) = self.raw.as_ref().expect("raw source needs a raw base");
                let n = size.saturating_sub(lba).min(buf.len() as u64) as usize;
                buf[n..].fill(MaybeUninit::new(0));
                if n > 0 {
                    storage.read_uninit(&mut buf[..n], lba).map_err(|e| {
                        Error::from(e)
                            .with_op("read")
                            .with_range(lba, n as u64)
                            .with_path(self.layers[0].path.clone())
                    })?;
                }
            }
            Src::Host(layer, host) => {
                let layer = &self.layers[usize::from(layer)];
                layer.storage.read_uninit(buf, host).map_err(|e| {
                    Error::from(e)
                        .with_op("read")
                        .with_range(offset, buf.len() as u64)
                        .with_path(layer.path.clone())
                })?;
            }
        }
        Ok(())
    }

    /// Reads pieces of `[offset, offset + buf.len())` into `buf`, initialising all of it
    /// on success.
    fn read_pieces(
        &self,
        pieces: &[Piece],
        offset: u64,
        buf: &mut [MaybeUninit<u8>],
    ) -> Result<()> {
        let mut at = 0usize;
        for &p in pieces {
            let n = p.len as usize;
            self.read_piece(p, &mut buf[at..at + n], offset + at as u64)?;
            at += n;
        }
        Ok(())
    }

    fn read_locked(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let pieces = {
            let st = self.state.read().map_err(|_| lock_err())?;
            self.plan(&st.map, offset, buf.len() as u64)
        };
        // SAFETY: read_pieces only stores bytes read from storage or zeroes through the
        // view, so `buf` stays initialised.
        self.read_pieces(&pieces, offset, unsafe { as_uninit(buf) })
    }

    /// Reads `len` bytes at `offset` into a new buffer (not cleared first).
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let _io = self.gate.read().map_err(|_| lock_err())?;
        let pieces = {
            let st = self.state.read().map_err(|_| lock_err())?;
            self.plan(&st.map, offset, len as u64)
        };
        read_into_new(len, |buf| self.read_pieces(&pieces, offset, buf))
    }

    /// Fills `buf` from `offset` of the virtual disk.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _io = self.gate.read().map_err(|_| lock_err())?;
        self.read_locked(offset, buf)
    }

    /// Reads `len` bytes at `offset`, reporting runs of zeroes without materialising
    /// them.
    pub fn read_sparse(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        let _io = self.gate.read().map_err(|_| lock_err())?;
        let pieces = {
            let st = self.state.read().map_err(|_| lock_err())?;
            self.plan(&st.map, offset, len as u64)
        };
        let mut out = Vec::with_capacity(pieces.len());
        let mut pos = offset;
        let mut i = 0;
        while i < pieces.len() {
            if pieces[i].src == Src::Zero {
                out.push(ReadChunk::Zero(pieces[i].len));
                pos += pieces[i].len;
                i += 1;
                continue;
            }
            // Gather consecutive data pieces into one buffer.
            let mut j = i;
            let mut n = 0u64;
            while j < pieces.len() && pieces[j].src != Src::Zero {
                n += pieces[j].len;
                j += 1;
            }
            let buf = read_into_new(n as usize, |buf| self.read_pieces(&pieces[i..j], pos, buf))?;
            out.push(ReadChunk::Data(Bytes::from(buf)));
            pos += n;
            i = j;
        }
        Ok(out)
    }

    /// Like [`Chain::read_sparse`], but on a chain whose layers are all in memory the
    /// data points into the layers' mappings instead of being copied, one chunk per
    /// piece. Such bytes must only ever be read by the kernel, as when writing them to a
    /// socket: see [`crate::mapping`].
    pub fn read_sparse_for_kernel(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        if !self.in_memory() {
            return self.read_sparse(offset, len);
        }
        let _io = self.gate.read().map_err(|_| lock_err())?;
        let pieces = {
            let st = self.state.read().map_err(|_| lock_err())?;
            self.plan(&st.map, offset, len as u64)
        };
        self.read_mapped(&pieces, offset)
    }

    /// The chunks of [`Chain::read_sparse_for_kernel`]: each piece points into its
    /// layer's mapping when it can, and is copied otherwise. Caller holds the gate.
    fn read_mapped(&self, pieces: &[Piece], offset: u64) -> Result<Vec<ReadChunk>> {
        // Taken under the gate: a flush that frees clusters swaps generations under the
        // gate held exclusively, so this pin covers every cluster these pieces name.
        let pin = Arc::clone(&self.pins.lock().map_err(|_| lock_err())?.current);
        let mut out = Vec::with_capacity(pieces.len());
        let mut pos = offset;
        for &p in pieces {
            let n = p.len as usize;
            let mapped = match p.src {
                Src::Zero => {
                    out.push(ReadChunk::Zero(p.len));
                    pos += p.len;
                    continue;
                }
                Src::Host(layer, host) => self.layers[usize::from(layer)]
                    .storage
                    .map_slice(host, n, &pin),
                Src::Raw(lba) => match &self.raw {
                    Some((storage, size)) if lba + p.len <= *size => {
                        storage.map_slice(lba, n, &pin)
                    }
                    _ => None,
                },
            };
            let data = match mapped {
                Some(d) => d,
                None => Bytes::from(read_into_new(n, |buf| self.read_piece(p, buf, pos))?),
            };
            out.push(ReadChunk::Data(data));
            pos += p.len;
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; with `fua`, commits before returning.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable("write")?;
        let commit_due = {
            let _io = self.gate.read().map_err(|_| lock_err())?;
            if self.write_in_place(offset, data)? {
                false
            } else {
                let _a = self.alloc.lock().map_err(|_| lock_err())?;
                self.write_allocating(offset, data)?
            }
        };
        if fua || commit_due {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes clusters the top layer already holds, in place. Returns false, having
    /// written nothing, when any cluster of the range needs allocating.
    fn write_in_place(&self, offset: u64, data: &[u8]) -> Result<bool> {
        let runs = {
            let st = self.state.read().map_err(|_| lock_err())?;
            let pieces = self.plan(&st.map, offset, data.len() as u64);
            if pieces
                .iter()
                .any(|p| !matches!(p.src, Src::Host(l, _) if l == self.top))
            {
                return Ok(false);
            }
            pieces
        };
        let mut at = 0usize;
        for p in runs {
            let Src::Host(_, host) = p.src else {
                unreachable!("checked above")
            };
            let n = p.len as usize;
            self.storage()
                .write_at(&[&data[at..at + n]], host)
                .map_err(self.io_err("write", offset + at as u64, n as u64))?;
            at += n;
        }
        Ok(true)
    }

    /// Takes `count` cluster-sized ranges of the top file for new clusters.
    fn reserve(&self, count: usize) -> Result<Vec<u64>> {
        let cs = self.cluster_size();
        let mut st = self.state.write().map_err(|_| lock_err())?;
        self.pins
            .lock()
            .map_err(|_| lock_err())?
            .release_unpinned(&mut st.free);
        Ok((0..count)
            .map(|_| {
                st.free.take(cs).unwrap_or_else(|| {
                    let host = st.eof;
                    st.eof += cs;
                    host
                })
            })
            .collect())
    }

    fn release(&self, hosts: &[u64]) {
        let cs = self.cluster_size();
        if let Ok(mut st) = self.state.write() {
            for &h in hosts {
                st.free.give(h, cs);
            }
        }
    }

    /// Writes a range where some clusters need allocating. Caller holds `alloc` and the
    /// gate. Returns true when enough metadata is dirty that a commit is due.
    fn write_allocating(&self, offset: u64, data: &[u8]) -> Result<bool> {
        let bits = self.header.cluster_bits;
        let cs = self.cluster_size();
        let size = self.size();
        // (cluster, offset within it, length, host if the top already has it)
        let mut steps: Vec<(u64, u64, u64, Option<u64>)> = Vec::new();
        {
            let st = self.state.read().map_err(|_| lock_err())?;
            let (mut pos, end) = (offset, offset + data.len() as u64);
            while pos < end {
                let c = pos >> bits;
                let within = pos & (cs - 1);
                let n = (cs - within).min(end - pos);
                let e = st.map.get(c);
                let own = entry::host(e).filter(|_| entry::layer(e) == self.top);
                steps.push((c, within, n, own));
                pos += n;
            }
        }
        let needed = steps.iter().filter(|s| s.3.is_none()).count();
        let hosts = self.reserve(needed)?;
        let result = self.write_steps(offset, data, &steps, &hosts, size);
        if let Err(e) = result {
            self.release(&hosts);
            return Err(e);
        }
        let mut st = self.state.write().map_err(|_| lock_err())?;
        let mut next = hosts.iter();
        for &(c, _, _, own) in &steps {
            if own.is_none() {
                let host = *next.next().expect("one host per allocation");
                st.map.set(c, entry::data(self.top, host));
                st.dirty.insert((c / ENTRIES as u64) as u32);
            }
        }
        Ok(st.dirty.len() >= AUTO_COMMIT_PAGES || st.pending_free.len() >= AUTO_COMMIT_FREED)
    }

    /// Performs the data writes of `write_allocating`: in-place pieces as they are, new
    /// clusters filled out with their previous contents, contiguous host ranges written
    /// with one call.
    fn write_steps(
        &self,
        offset: u64,
        data: &[u8],
        steps: &[(u64, u64, u64, Option<u64>)],
        hosts: &[u64],
        size: u64,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        // Partial new clusters need a buffer holding the old contents merged with the new.
        let mut merged: Vec<Vec<u8>> = Vec::new();
        let mut next = hosts.iter();
        let mut plan: Vec<(u64, usize, usize, bool)> = Vec::new(); // host, data/merged index, len, is_merged
        let mut at = 0usize;
        for &(c, within, n, own) in steps {
            let start = c << bits;
            let clen = cs.min(size - start);
            match own {
                Some(host) => plan.push((host + within, at, n as usize, false)),
                None => {
                    let host = *next.next().expect("one host per allocation");
                    if within == 0 && n == clen {
                        plan.push((host, at, n as usize, false));
                    } else {
                        let mut buf = vec![0u8; clen as usize];
                        self.read_locked(start, &mut buf)?;
                        buf[within as usize..(within + n) as usize]
                            .copy_from_slice(&data[at..at + n as usize]);
                        merged.push(buf);
                        plan.push((host, merged.len() - 1, clen as usize, true));
                    }
                }
            }
            at += n as usize;
        }
        let slice = |&(_, idx, len, is_merged): &(u64, usize, usize, bool)| -> &[u8] {
            if is_merged {
                &merged[idx][..len]
            } else {
                &data[idx..idx + len]
            }
        };
        let mut i = 0;
        while i < plan.len() {
            let host = plan[i].0;
            let mut bufs = vec![slice(&plan[i])];
            let mut end = host + plan[i].2 as u64;
            let mut j = i + 1;
            while j < plan.len() && plan[j].0 == end && bufs.len() < 512 {
                bufs.push(slice(&plan[j]));
                end += plan[j].2 as u64;
                j += 1;
            }
            self.storage().write_at(&bufs, host).map_err(self.io_err(
                "write",
                offset,
                data.len() as u64,
            ))?;
            i = j;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeroes. Whole clusters are unmapped or
    /// marked zero as `mode` says; partial clusters at the ends get zeroes written.
    pub fn zero(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        self.check_writable(if mode == ZeroMode::Trim {
            "trim"
        } else {
            "write_zeroes"
        })?;
        let commit_due = {
            let _io = self.gate.read().map_err(|_| lock_err())?;
            let _a = self.alloc.lock().map_err(|_| lock_err())?;
            self.zero_locked(offset, len, mode)?
        };
        if fua || commit_due {
            self.flush()?;
        }
        Ok(())
    }

    fn zero_locked(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<bool> {
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let end = offset + len;
        let size = self.size();
        // Whole clusters: [first, last). The disk's last cluster counts as whole when the
        // range reaches the end of the disk.
        let first = offset.div_ceil(cs);
        let last = if end == size {
            size.div_ceil(cs)
        } else {
            end / cs
        };
        let keep = mode == ZeroMode::ZeroNoHole;
        if keep || first >= last {
            self.write_zero_data(offset, len, keep)?;
            return self.commit_due();
        }
        if offset < first << bits {
            self.write_zero_data(offset, (first << bits) - offset, false)?;
        }
        let tail = last << bits;
        if tail < end {
            self.write_zero_data(tail, end - tail, false)?;
        }
        let new = if mode == ZeroMode::Trim && self.standalone {
            entry::UNALLOCATED
        } else {
            entry::zero(self.top)
        };
        let freed = self.remap(first, last, new)?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for host in freed {
            match ranges.last_mut() {
                Some((s, l)) if *s + *l == host => *l += cs,
                _ => ranges.push((host, cs)),
            }
        }
        for &(host, l) in &ranges {
            // Punching only returns space early; the clusters are reused either way.
            let _ = self.storage().punch_hole(host, l);
        }
        let mut st = self.state.write().map_err(|_| lock_err())?;
        st.pending_free.extend(ranges);
        Ok(st.dirty.len() >= AUTO_COMMIT_PAGES || st.pending_free.len() >= AUTO_COMMIT_FREED)
    }

    fn commit_due(&self) -> Result<bool> {
        let st = self.state.read().map_err(|_| lock_err())?;
        Ok(st.dirty.len() >= AUTO_COMMIT_PAGES || st.pending_free.len() >= AUTO_COMMIT_FREED)
    }

    /// Sets clusters `[first, last)` to `new`, page by page, and returns the host offsets
    /// of top-layer data they held.
    fn remap(&self, first: u64, last: u64, new: u64) -> Result<Vec<u64>> {
        let mut freed = Vec::new();
        let mut st = self.state.write().map_err(|_| lock_err())?;
        let e = ENTRIES as u64;
        let mut c = first;
        while c < last {
            let p = (c / e) as usize;
            let page_end = (c / e + 1) * e;
            let stop = page_end.min(last);
            let owned = |v: u64| entry::host(v).filter(|_| entry::layer(v) == self.top);
            if c % e == 0 && stop == page_end {
                let replacement = (new != entry::UNALLOCATED).then(|| Arc::clone(&self.zero_page));
                let unchanged = match (st.map.page(p), &replacement) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                };
                if !unchanged {
                    if let Some(old) = st.map.replace_page(p, replacement) {
                        freed.extend(old.iter().filter_map(|&v| owned(v)));
                    }
                    st.dirty.insert(p as u32);
                }
            } else if new != entry::UNALLOCATED || st.map.page(p).is_some() {
                for cluster in c..stop {
                    let old = st.map.set(cluster, new);
                    if old != new {
                        freed.extend(owned(old));
                        st.dirty.insert(p as u32);
                    }
                }
            }
            c = stop;
        }
        Ok(freed)
    }

    /// Writes zeroes as data over `[offset, offset + len)`. Unless `allocate`, pieces
    /// that already read as zeroes are left alone, so zeroing never allocates needlessly.
    fn write_zero_data(&self, offset: u64, len: u64, allocate: bool) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let pieces = {
            let st = self.state.read().map_err(|_| lock_err())?;
            self.plan(&st.map, offset, len)
        };
        let mut pos = offset;
        for piece in pieces {
            let piece_end = pos + piece.len;
            if allocate || piece.src != Src::Zero {
                while pos < piece_end {
                    let n = (piece_end - pos).min(CHUNK);
                    let chunk = &zeroes[..n as usize];
                    if !self.write_in_place(pos, chunk)? {
                        self.write_allocating(pos, chunk)?;
                    }
                    pos += n;
                }
            }
            pos = piece_end;
        }
        Ok(())
    }

    /// Makes `work` a condition of this chain's next flush: it runs (until it succeeds)
    /// before any commit of this chain is acknowledged.
    pub fn settle_first(&self, work: Settle) {
        if let Ok(mut s) = self.settle.lock() {
            *s = Some(work);
        }
    }

    /// Runs the work [`Chain::settle_first`] left, if it has not run yet.
    pub fn settle(&self) -> Result<()> {
        let mut pending = self.settle.lock().map_err(|_| lock_err())?;
        if let Some(work) = pending.as_ref() {
            work()?;
            *pending = None;
        }
        Ok(())
    }

    /// Makes every completed write durable: commits the map changes made since the last
    /// commit, in the order that keeps every crash point consistent.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.settle()?;
        let _c = self.commit.lock().map_err(|_| lock_err())?;
        let plan = {
            let mut st = self.state.write().map_err(|_| lock_err())?;
            self.prepare_commit(&mut st)
        };
        let mut l1_touched = false;
        if let Err(e) = self.write_commit(&plan, &mut l1_touched) {
            let mut st = self.state.write().map_err(|_| lock_err())?;
            if !l1_touched {
                // No L1 page can point at the new pairs yet: give their space back, so a
                // full disk can recover once the changes that needed them are undone.
                for &(q, off) in &plan.new_pairs {
                    st.pairs.remove(&q);
                    st.free.give(off, PAIR);
                }
            }
            // Otherwise an L1 page pointing at them may be on disk: they stay reserved
            // (and fresh, so the next commit initialises them again).
            st.dirty.extend(plan.dirty.iter().copied());
            st.l1_dirty.extend(plan.l1.iter().map(|w| w.index as usize));
            st.pending_free.extend(plan.freed.iter().copied());
            return Err(e);
        }
        {
            let mut st = self.state.write().map_err(|_| lock_err())?;
            for w in &plan.l2 {
                if let Some(pair) = st.pairs.get_mut(&(w.index as u32)) {
                    pair.sequence = w.sequence;
                    pair.newest = w.slot;
                }
            }
            for w in &plan.l1 {
                let page = &mut st.l1[w.index as usize];
                page.sequence = w.sequence;
                page.newest = w.slot;
            }
        }
        if !plan.freed.is_empty() {
            // Wait for requests that may have looked up a freed cluster before it was
            // unmapped; after this nobody can still be using it.
            let _quiet = self.gate.write().map_err(|_| lock_err())?;
            let mut st = self.state.write().map_err(|_| lock_err())?;
            // Zero-copy replies may still point at them, though: those hold a pin on the
            // current generation, and the space is reused only once they are all gone.
            let mut pins = self.pins.lock().map_err(|_| lock_err())?;
            let old = std::mem::take(&mut pins.current);
            pins.retired.push((old, plan.freed.clone()));
            pins.release_unpinned(&mut st.free);
        }
        Ok(())
    }

    /// The top layer's own entries of page `p`, as stored on disk.
    fn top_entries(&self, map: &MergedMap, p: usize) -> [u64; ENTRIES] {
        let mut out = [0u64; ENTRIES];
        if let Some(page) = map.page(p) {
            for (o, &e) in out.iter_mut().zip(page.iter()) {
                if e != entry::UNALLOCATED && entry::layer(e) == self.top {
                    *o = match entry::host(e) {
                        Some(h) => Entry::Data(h),
                        None => Entry::Zero,
                    }
                    .encode();
                }
            }
        }
        out
    }

    fn prepare_commit(&self, st: &mut State) -> CommitPlan {
        let mut plan = CommitPlan {
            dirty: std::mem::take(&mut st.dirty).into_iter().collect(),
            freed: std::mem::take(&mut st.pending_free),
            ..CommitPlan::default()
        };
        let zero = Entry::Zero.encode();
        let mut l1_dirty = std::mem::take(&mut st.l1_dirty);
        for &q in &plan.dirty {
            let entries = self.top_entries(&st.map, q as usize);
            let pair = match st.pairs.get(&q) {
                Some(pair) => *pair,
                None => {
                    l1_dirty.insert(q as usize / ENTRIES);
                    if entries.iter().all(|&e| e == 0) || entries.iter().all(|&e| e == zero) {
                        continue;
                    }
                    let off = st.free.take(PAIR).unwrap_or_else(|| {
                        let off = st.eof;
                        st.eof += PAIR;
                        off
                    });
                    plan.new_pairs.push((q, off));
                    let fresh = PageState::fresh(off);
                    st.pairs.insert(q, fresh);
                    fresh
                }
            };
            let (offset, sequence, slot) = pair.next();
            plan.l2.push(PageWrite {
                fresh: pair.sequence == 0,
                index: u64::from(q),
                offset,
                sequence,
                slot,
                bytes: encode_page(PageKind::L2, u64::from(q), sequence, &entries),
            });
        }
        let l2_pages = self.header.l2_pages();
        for i in l1_dirty {
            let mut entries = [0u64; ENTRIES];
            for (j, slot) in entries.iter_mut().enumerate() {
                let q = (i * ENTRIES + j) as u64;
                if q >= l2_pages {
                    break;
                }
                *slot = match st.pairs.get(&(q as u32)) {
                    Some(pair) => L1Entry::Pair(pair.offset),
                    None => {
                        let all_zero = match st.map.page(q as usize) {
                            Some(page) if Arc::ptr_eq(page, &self.zero_page) => true,
                            Some(_) => self
                                .top_entries(&st.map, q as usize)
                                .iter()
                                .all(|&e| e == zero),
                            None => false,
                        };
                        if all_zero {
                            L1Entry::AllZero
                        } else {
                            L1Entry::Absent
                        }
                    }
                }
                .encode();
            }
            let (offset, sequence, slot) = st.l1[i].next();
            plan.l1.push(PageWrite {
                fresh: false,
                index: i as u64,
                offset,
                sequence,
                slot,
                bytes: encode_page(PageKind::L1, i as u64, sequence, &entries),
            });
        }
        plan
    }

    /// Writes a commit's pages in order; sets `l1_touched` once any L1 page write has
    /// been attempted.
    fn write_commit(&self, plan: &CommitPlan, l1_touched: &mut bool) -> Result<()> {
        let storage = self.storage();
        let err = |op| self.io_err(op, 0, 0);
        storage.sync().map_err(err("flush"))?;
        for (level, pages) in [&plan.l2, &plan.l1].into_iter().enumerate() {
            if pages.is_empty() {
                continue;
            }
            *l1_touched |= level == 1;
            for w in pages {
                if w.fresh {
                    // A new pair's second slot gets zeroes (an empty slot): stale bytes
                    // from whatever used the space before can never pass for a newer
                    // version, and the file holds the whole pair from the start, so later
                    // commits rewrite it in place and never need to grow the file (which
                    // a full disk would refuse).
                    storage
                        .write_at(&[&w.bytes[..], &[0u8; PAGE]], w.offset)
                        .map_err(err("commit"))?;
                } else {
                    storage
                        .write_at(&[&w.bytes[..]], w.offset)
                        .map_err(err("commit"))?;
                }
            }
            storage.sync().map_err(err("commit"))?;
        }
        Ok(())
    }

    /// Describes allocation as a guest sees it (`base:allocation`): data, zero
    /// clusters, and holes.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let ranges = self.ranges(offset, len)?;
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            match r.state {
                RangeState::Data => out.push(Extent::data(r.length)),
                RangeState::Zero => out.push(Extent::zero(r.length)),
                RangeState::Unallocated if r.depth == 0 => out.push(Extent::hole(r.length)),
                RangeState::Unallocated => self.raw_status(r.offset, r.length, &mut out)?,
            }
        }
        Ok(out)
    }

    fn raw_status(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let (storage, _) = self.raw.as_ref().expect("depth > 0 needs a raw base");
        let data = storage.data_ranges(offset, len).map_err(|e| {
            Error::from(e)
                .with_op("block_status")
                .with_path(self.layers[0].path.clone())
        })?;
        let mut pos = offset;
        for (start, n) in data {
            if start > pos {
                out.push(Extent::hole(start - pos));
            }
            out.push(Extent::data(n));
            pos = start + n;
        }
        if pos < offset + len {
            out.push(Extent::hole(offset + len - pos));
        }
        Ok(())
    }

    /// Which layer owns each stretch of `[offset, offset + len)`
    /// (`qemu:allocation-depth`): 1 the top, 2 its backing, ..., 0 none.
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>> {
        let mut out: Vec<DepthExtent> = Vec::new();
        for r in self.ranges(offset, len)? {
            match out.last_mut() {
                Some(last) if last.depth == r.depth => last.length += r.length,
                _ => out.push(DepthExtent {
                    length: r.length,
                    depth: r.depth,
                }),
            }
        }
        Ok(out)
    }

    /// The state, owner and host offset of every stretch of `[offset, offset + len)`,
    /// neighbours with equal state, owner and contiguous data merged.
    pub fn ranges(&self, offset: u64, len: u64) -> Result<Vec<MapRange>> {
        let st = self.state.read().map_err(|_| lock_err())?;
        let bits = self.header.cluster_bits;
        let cs = self.cluster_size();
        let raw_size = self.raw.as_ref().map_or(0, |r| r.1);
        let top_depth = u32::from(self.top) + 1;
        let mut out: Vec<MapRange> = Vec::new();
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let c = pos >> bits;
            let p = c as usize / ENTRIES;
            // Skip whole absent pages at once.
            let n = if st.map.page(p).is_none() {
                let page_end = ((p as u64 + 1) * ENTRIES as u64) << bits;
                page_end.min(end) - pos
            } else {
                (cs - (pos & (cs - 1))).min(end - pos)
            };
            let e = st.map.get(c);
            let (state, depth, host) = if let Some(h) = entry::host(e) {
                let within = pos & (cs - 1);
                (
                    RangeState::Data,
                    top_depth - u32::from(entry::layer(e)),
                    Some(h + within),
                )
            } else if entry::is_zero(e) {
                (
                    RangeState::Zero,
                    top_depth - u32::from(entry::layer(e)),
                    None,
                )
            } else {
                (RangeState::Unallocated, 0, None)
            };
            let mut pieces = vec![(pos, n, state, depth, host)];
            if state == RangeState::Unallocated && pos < raw_size {
                // The raw base owns what it covers.
                let split = raw_size.min(pos + n);
                pieces = vec![(pos, split - pos, state, top_depth, None)];
                if split < pos + n {
                    pieces.push((split, pos + n - split, state, 0, None));
                }
            }
            for (offset, length, state, depth, host) in pieces {
                match out.last_mut() {
                    Some(last)
                        if last.state == state
                            && last.depth == depth
                            && match (last.host, host) {
                                (Some(a), Some(b)) => a + last.length == b,
                                (None, None) => true,
                                _ => false,
                            } =>
                    {
                        last.length += length;
                    }
                    _ => out.push(MapRange {
                        offset,
                        length,
                        state,
                        depth,
                        host,
                    }),
                }
            }
            pos += n;
        }
        Ok(out)
    }

    /// Marks every map page and every L1 page for rewriting at the next commit, so that
    /// a repair stores exactly what was kept in memory.
    pub fn mark_all_dirty(&self) -> Result<()> {
        let mut st = self.state.write().map_err(|_| lock_err())?;
        let pages: Vec<u32> = (0..st.map.len())
            .filter(|&p| st.map.page(p).is_some())
            .map(|p| p as u32)
            .chain(st.pairs.keys().copied())
            .collect();
        st.dirty.extend(pages);
        let l1 = st.l1.len();
        st.l1_dirty.extend(0..l1);
        Ok(())
    }

    /// Writes a new header (a changed backing reference) to the older slot, durably.
    pub fn rewrite_header(&mut self, header: Header) -> Result<()> {
        self.check_writable("rewrite header")?;
        let storage = Arc::clone(self.storage());
        let path = self.path().to_path_buf();
        self.header = store_header(
            storage.as_ref(),
            &path,
            &self.header,
            self.header_slot,
            header,
        )?;
        self.header_slot = 1 - self.header_slot;
        Ok(())
    }

    /// Gives back free space at the end of the top image's file. Only whole trailing free
    /// ranges that are durable-free are cut.
    pub fn truncate_free_tail(&self) -> Result<u64> {
        self.flush()?;
        let _c = self.commit.lock().map_err(|_| lock_err())?;
        let _a = self.alloc.lock().map_err(|_| lock_err())?;
        let mut st = self.state.write().map_err(|_| lock_err())?;
        let eof = st.eof;
        let Some((start, _)) = st.free.take_tail(eof) else {
            return Ok(0);
        };
        let start = start.max(self.header.data_start());
        self.storage()
            .set_len(start)
            .map_err(self.io_err("truncate", start, eof - start))?;
        st.eof = start;
        Ok(eof - start)
    }
}

/// Writes `header` (with the sequence after `current`'s) into the slot other than
/// `current_slot`, durably, and returns it as written. The data and map it describes
/// must be durable already; the old version stays intact until the new one is.
pub(crate) fn store_header(
    storage: &dyn Storage,
    path: &Path,
    current: &Header,
    current_slot: usize,
    header: Header,
) -> Result<Header> {
    let mut header = header;
    header.sequence = current.sequence + 1;
    if let Some(b) = &header.backing {
        if b.path.len() > format::MAX_BACKING_PATH {
            return Err(
                Error::msg(ErrorKind::InvalidInput, "backing path is too long")
                    .with_op("rewrite header")
                    .with_path(path),
            );
        }
    }
    let slot = 1 - current_slot;
    let bytes = format::encode_header(&header);
    let err = |e: std::io::Error| {
        Error::from(e)
            .with_op("rewrite header")
            .with_range(0, PAGE as u64)
            .with_path(path)
    };
    storage.sync().map_err(err)?;
    storage
        .write_at(&[&bytes[..]], (slot * PAGE) as u64)
        .map_err(err)?;
    storage.sync().map_err(err)?;
    Ok(header)
}

/// A new buffer of `len` bytes filled by `fill`, which must initialise all of it when it
/// succeeds: the buffer is not cleared first.
fn read_into_new(
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<u8>]) -> Result<()>,
) -> Result<Vec<u8>> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len])?;
    // SAFETY: `fill` succeeded, so it initialised all `len` bytes.
    unsafe { v.set_len(len) };
    Ok(v)
}

#[derive(Default)]
struct CommitPlan {
    dirty: Vec<u32>,
    freed: Vec<(u64, u64)>,
    /// L2 pairs allocated by this commit: (page, offset).
    new_pairs: Vec<(u32, u64)>,
    l2: Vec<PageWrite>,
    l1: Vec<PageWrite>,
}

struct PageWrite {
    index: u64,
    /// A newly allocated L2 pair, written for the first time (slot 0).
    fresh: bool,
    offset: u64,
    sequence: u64,
    slot: usize,
    bytes: Box<[u8; PAGE]>,
}
