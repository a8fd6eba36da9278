//! In-memory structures of an open chain: the merged cluster map and the free list.
//!
//! The merged map answers "which layer owns cluster N, and where is it" with one lookup,
//! however deep the chain: it is built once at open by laying each layer's entries over
//! those of the layers below. Pages are reference-counted, so overlays of one base share
//! the base's pages until they write to them.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::format::ENTRIES;

/// One page of merged entries.
pub type Page = [u64; ENTRIES];

/// A merged entry, packed in a `u64`:
///
/// | bits   | meaning                                               |
/// |--------|-------------------------------------------------------|
/// | 0..2   | 0 unallocated everywhere, 1 zero cluster, 2 data      |
/// | 2..18  | owning layer (0 is the bottom of the chain)           |
/// | 18..64 | host offset / 4096, for data                          |
///
/// Zero (the all-clear pattern) means "no layer above the raw base has it".
pub mod entry {
    /// Nothing owns the cluster.
    pub const UNALLOCATED: u64 = 0;
    const ZERO: u64 = 1;
    const DATA: u64 = 2;

    /// A zero cluster owned by `layer`.
    pub fn zero(layer: u16) -> u64 {
        ZERO | (u64::from(layer) << 2)
    }

    /// Data owned by `layer` at byte offset `host` (4 KiB aligned) of its file.
    pub fn data(layer: u16, host: u64) -> u64 {
        debug_assert_eq!(host % 4096, 0);
        DATA | (u64::from(layer) << 2) | ((host >> 12) << 18)
    }

    /// True for a zero cluster.
    pub fn is_zero(e: u64) -> bool {
        e & 3 == ZERO
    }

    /// The host offset, for data entries.
    pub fn host(e: u64) -> Option<u64> {
        (e & 3 == DATA).then_some((e >> 18) << 12)
    }

    /// The owning layer (meaningless for [`UNALLOCATED`]).
    pub fn layer(e: u64) -> u16 {
        ((e >> 2) & 0xffff) as u16
    }
}

/// Pages per chunk of the map's page table.
const CHUNK: usize = 512;
/// A run of [`CHUNK`] optional pages, shared between maps until one changes it.
type Chunk = [Option<Arc<Page>>; CHUNK];

/// The merged cluster map: one optional page per L2 page of the top image.
///
/// The page table is itself in shared chunks of 512 pages, so cloning a map (a snapshot
/// does, to give the frozen layer and the new top the same view) copies one pointer per
/// 512 pages (about 1,000 for a 16 TiB disk with 64 KiB clusters), not one per page;
/// the first change to a chunk copies that chunk alone.
#[derive(Clone, Default)]
pub struct MergedMap {
    chunks: Vec<Option<Arc<Chunk>>>,
    pages: usize,
}

impl std::fmt::Debug for MergedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let present = (0..self.pages).filter(|&p| self.page(p).is_some()).count();
        write!(f, "MergedMap({} pages, {present} present)", self.pages)
    }
}

fn split(cluster: u64) -> (usize, usize) {
    (
        (cluster / ENTRIES as u64) as usize,
        (cluster % ENTRIES as u64) as usize,
    )
}

impl MergedMap {
    /// A map of `pages` pages, all unallocated.
    pub fn new(pages: usize) -> MergedMap {
        let mut map = MergedMap::default();
        map.grow(pages);
        map
    }

    /// Grows (never shrinks) to `pages` pages.
    pub fn grow(&mut self, pages: usize) {
        if self.pages < pages {
            self.pages = pages;
            self.chunks.resize(pages.div_ceil(CHUNK), None);
        }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// True when the map has no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The entry of `cluster`.
    #[inline]
    pub fn get(&self, cluster: u64) -> u64 {
        let (p, i) = split(cluster);
        match self.page(p) {
            Some(page) => page[i],
            None => entry::UNALLOCATED,
        }
    }

    /// The slot of page `p`, copying its chunk first if it is shared.
    fn slot_mut(&mut self, p: usize) -> &mut Option<Arc<Page>> {
        assert!(
            p < self.pages,
            "page {p} beyond the map's {} pages",
            self.pages
        );
        let chunk = self.chunks[p / CHUNK].get_or_insert_with(|| Arc::new([const { None }; CHUNK]));
        &mut Arc::make_mut(chunk)[p % CHUNK]
    }

    /// Sets the entry of `cluster`, returning the old one. Copies the page first if it is
    /// shared.
    pub fn set(&mut self, cluster: u64, value: u64) -> u64 {
        let (p, i) = split(cluster);
        let page = self
            .slot_mut(p)
            .get_or_insert_with(|| Arc::new([entry::UNALLOCATED; ENTRIES]));
        let page = Arc::make_mut(page);
        std::mem::replace(&mut page[i], value)
    }

    /// Page `p`, if present.
    #[inline]
    pub fn page(&self, p: usize) -> Option<&Arc<Page>> {
        self.chunks.get(p / CHUNK)?.as_ref()?[p % CHUNK].as_ref()
    }

    /// Replaces page `p`, returning the old one.
    pub fn replace_page(&mut self, p: usize, page: Option<Arc<Page>>) -> Option<Arc<Page>> {
        if page.is_none() && self.page(p).is_none() {
            return None;
        }
        std::mem::replace(self.slot_mut(p), page)
    }

    /// Lays `upper`'s entries for page `p` over this map's: every entry of `upper` that is
    /// not unallocated wins.
    pub fn overlay_page(&mut self, p: usize, upper: &Arc<Page>) {
        match self.slot_mut(p) {
            slot @ None => *slot = Some(Arc::clone(upper)),
            Some(lower) => {
                if upper.iter().all(|&e| e != entry::UNALLOCATED) {
                    *lower = Arc::clone(upper);
                    return;
                }
                let lower = Arc::make_mut(lower);
                for (l, &u) in lower.iter_mut().zip(upper.iter()) {
                    if u != entry::UNALLOCATED {
                        *l = u;
                    }
                }
            }
        }
    }

    /// The present pages, with their indices, in order (absent chunks are skipped
    /// whole).
    pub fn present(&self) -> impl Iterator<Item = (usize, &Arc<Page>)> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(c, chunk)| Some((c, chunk.as_ref()?)))
            .flat_map(|(c, chunk)| {
                chunk
                    .iter()
                    .enumerate()
                    .filter_map(move |(i, page)| Some((c * CHUNK + i, page.as_ref()?)))
            })
    }

    /// Data and zero clusters owned by `layer`.
    pub fn owned_by(&self, layer: u16) -> (u64, u64) {
        let (mut data, mut zero) = (0, 0);
        for (_, page) in self.present() {
            for &e in page.iter() {
                if e != entry::UNALLOCATED && entry::layer(e) == layer {
                    if entry::host(e).is_some() {
                        data += 1;
                    } else {
                        zero += 1;
                    }
                }
            }
        }
        (data, zero)
    }
}

/// Free byte ranges of an image file, reused for new clusters and map pages.
#[derive(Debug, Default, Clone)]
pub struct FreeList {
    /// start -> length, non-overlapping, merged with neighbours.
    ranges: BTreeMap<u64, u64>,
}

impl FreeList {
    /// Takes `len` bytes from the lowest free range large enough.
    pub fn take(&mut self, len: u64) -> Option<u64> {
        let (&start, &have) = self.ranges.iter().find(|&(_, &l)| l >= len)?;
        self.ranges.remove(&start);
        if have > len {
            self.ranges.insert(start + len, have - len);
        }
        Some(start)
    }

    /// Returns `[start, start + len)` to the list.
    pub fn give(&mut self, mut start: u64, mut len: u64) {
        if len == 0 {
            return;
        }
        if let Some((&prev, &plen)) = self.ranges.range(..start).next_back() {
            if prev + plen == start {
                self.ranges.remove(&prev);
                start = prev;
                len += plen;
            }
        }
        if let Some(&nlen) = self.ranges.get(&(start + len)) {
            self.ranges.remove(&(start + len));
            len += nlen;
        }
        self.ranges.insert(start, len);
    }

    /// Total free bytes.
    pub fn total(&self) -> u64 {
        self.ranges.values().sum()
    }

    /// The free ranges, in order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &l)| (s, l))
    }

    /// Removes and returns a range that ends exactly at `end`, if any.
    pub fn take_tail(&mut self, end: u64) -> Option<(u64, u64)> {
        let (&start, &len) = self.ranges.iter().next_back()?;
        if start + len == end {
            self.ranges.remove(&start);
            Some((start, len))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_chunks_until_one_changes() {
        let pages = 3 * CHUNK + 7;
        let mut a = MergedMap::new(pages);
        let last = (pages * ENTRIES - 1) as u64;
        for c in [0, 5 * ENTRIES as u64, (CHUNK * ENTRIES) as u64 + 1, last] {
            a.set(c, entry::data(1, c * 4096));
        }
        let mut b = a.clone();
        assert!(Arc::ptr_eq(
            a.chunks[0].as_ref().unwrap(),
            b.chunks[0].as_ref().unwrap()
        ));
        b.set(1, entry::zero(2));
        b.replace_page((CHUNK * 2) + 3, Some(Arc::new([entry::zero(2); ENTRIES])));
        // The original sees none of it; the untouched chunks are still shared.
        assert_eq!(a.get(1), entry::UNALLOCATED);
        assert_eq!(b.get(1), entry::zero(2));
        assert!(a.page(CHUNK * 2 + 3).is_none());
        assert!(Arc::ptr_eq(
            a.chunks[1].as_ref().unwrap(),
            b.chunks[1].as_ref().unwrap()
        ));
        assert_eq!(a.get(last), entry::data(1, last * 4096));
        assert_eq!(a.get(last + 1), entry::UNALLOCATED, "past the end");
        let present: Vec<usize> = a.present().map(|(p, _)| p).collect();
        assert_eq!(present, [0, 5, CHUNK, pages - 1]);
        assert_eq!(a.owned_by(1), (4, 0));
        assert_eq!(b.owned_by(2), (0, ENTRIES as u64 + 1));
        // Removing a page that is absent changes (and copies) nothing.
        assert!(b.replace_page(CHUNK * 3, None).is_none());
        assert!(Arc::ptr_eq(
            a.chunks[3].as_ref().unwrap(),
            b.chunks[3].as_ref().unwrap()
        ));
    }

    #[test]
    fn entries_pack_and_unpack() {
        let e = entry::data(7, 0x1234_5000);
        assert_eq!(entry::host(e), Some(0x1234_5000));
        assert_eq!(entry::layer(e), 7);
        assert!(!entry::is_zero(e));
        let z = entry::zero(65535);
        assert!(entry::is_zero(z));
        assert_eq!(entry::layer(z), 65535);
        assert_eq!(entry::host(z), None);
    }

    #[test]
    fn shared_pages_are_copied_on_write() {
        let mut base = MergedMap::new(2);
        base.set(3, entry::data(0, 4096));
        let mut over = base.clone();
        over.set(3, entry::data(1, 8192));
        assert_eq!(entry::layer(base.get(3)), 0);
        assert_eq!(entry::layer(over.get(3)), 1);
    }

    #[test]
    fn free_list_merges_and_splits() {
        let mut f = FreeList::default();
        f.give(0, 10);
        f.give(20, 10);
        f.give(10, 10);
        assert_eq!(f.ranges().collect::<Vec<_>>(), vec![(0, 30)]);
        assert_eq!(f.take(4), Some(0));
        assert_eq!(f.take(30), None);
        assert_eq!(f.total(), 26);
        assert_eq!(f.take_tail(30), Some((4, 26)));
    }
}
