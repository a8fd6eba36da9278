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
//!
//! # Layout
//! This file holds the chain itself: its state and locks, how it is built, and how it is
//! frozen into a backing chain for a snapshot. The rest is split by what a call does:
//! - `lower`: the read-only layers below the top and their merged map, shared by every
//!   overlay of the same base;
//! - `read`: reads, planned into pieces by where their bytes live, copied or mapped;
//! - `write`: writes in place or copy-on-write, zeroing and trimming, copying a lower
//!   layer's clusters up;
//! - `commit`: flushes, in the crash-safe order above, and header rewrites;
//! - `query`: allocation, depth and space, read from the map without changing it.

mod commit;
mod lower;
mod query;
mod read;
mod write;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use super::format::{BackingKind, ENTRIES, Header, PAGE};
use super::layer::{PageState, Scan};
use super::map::{FreeList, MergedMap, Page, entry};
use super::storage::Storage;
use crate::error::{Error, ErrorKind, Result};

pub use commit::Settle;
pub(crate) use commit::store_header;
pub use lower::{Layer, LayerKind, Lower};
use lower::{layer_id, overlay_scan};
pub use query::{MapRange, RangeState};
pub use write::ZeroMode;

/// Dirty map pages that trigger a commit without waiting for a flush.
const AUTO_COMMIT_PAGES: usize = 1024;
/// Freed ranges that trigger a commit, so that their space can be reused.
const AUTO_COMMIT_FREED: usize = 4096;
/// Size of an L2 page pair.
const PAIR: u64 = 2 * PAGE as u64;

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
}
