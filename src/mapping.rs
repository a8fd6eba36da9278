//! Zero-copy reads of files that live in memory (tmpfs, ramfs): raw files through
//! [`MappedReads`], image layers through [`GrowingMap`].
//!
//! A read of such a file with `pread` costs a system call, a page-cache lookup and a
//! copy into a buffer, which the reply then copies again into the socket. Here the file
//! is mapped read-only once, and a read returns a [`Bytes`] that points into the mapping:
//! the only copy is the one the kernel makes while writing the reply to the socket.
//!
//! Two hazards decide where the mapping may be used:
//!
//! - Touching a hole of a tmpfs file through a mapping allocates a page for it (a `pread`
//!   of the same hole does not). Reads therefore use the mapping only for pages known to
//!   be allocated: the file's data extents found when it was opened, plus every page
//!   written since. Trimmed or zeroed ranges are forgotten before they are punched.
//!   Anything else is read with `pread`, as before.
//! - Bytes of a mapping are only ever read by the kernel (the socket write), never by
//!   user-space code of the server: if another process truncates the file, that write
//!   fails with `EFAULT` and the connection ends, where a user-space access would have
//!   killed the process with `SIGBUS`. Backends hand such bytes out only from
//!   `Backend::read_for_kernel` and `Backend::read_sparse_for_kernel`, which plaintext
//!   sessions call; TLS sessions, which encrypt in user space, read copies.
//!
//! Contents may change under a returned buffer if a later write lands on the same pages
//! before the reply is sent; that write was issued while the read was in flight, and NBD
//! lets such a read return either version.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Deref;
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::sys::seek;

/// Granularity of allocation in memory-backed file systems.
const PAGE: u64 = 4096;

/// A set of disjoint, non-adjacent half-open ranges of `u64`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end; ranges neither overlap nor touch.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// True when `[start, end)` lies inside one range of the set.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        matches!(self.ranges.range(..=start).next_back(), Some((_, &e)) if e >= end)
    }

    /// Adds `[start, end)`, merging it with ranges it overlaps or touches.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        let absorbed: Vec<u64> = self.ranges.range(start..=end).map(|(&s, _)| s).collect();
        for s in absorbed {
            if let Some(e) = self.ranges.remove(&s) {
                end = end.max(e);
            }
        }
        self.ranges.insert(start, end);
    }

    /// Removes `[start, end)`, splitting a range that covers it.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.ranges.range(..start).next_back()
            && e > start
        {
            self.ranges.insert(s, start);
            if e > end {
                self.ranges.insert(end, e);
                return;
            }
        }
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(start..end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in inside {
            self.ranges.remove(&s);
            if e > end {
                self.ranges.insert(end, e);
            }
        }
    }

    /// The ranges, in order.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }
}

/// A slice of a reference-counted buffer (a file mapping, a memory disk's chunk), kept
/// alive by the [`Bytes`] that points into it, with an optional pin that tells the
/// buffer's owner the bytes may still be read.
struct SharedSlice<T> {
    owner: Arc<T>,
    offset: usize,
    len: usize,
    _pin: Option<Arc<()>>,
}

impl<T: Deref<Target = [u8]>> AsRef<[u8]> for SharedSlice<T> {
    fn as_ref(&self) -> &[u8] {
        &self.owner[self.offset..self.offset + self.len]
    }
}

/// `[offset, offset + len)` of `owner` as [`Bytes`], without copying.
pub fn slice_of<T>(owner: &Arc<T>, offset: usize, len: usize, pin: Option<Arc<()>>) -> Bytes
where
    T: Deref<Target = [u8]> + Send + Sync + 'static,
{
    Bytes::from_owner(SharedSlice {
        owner: Arc::clone(owner),
        offset,
        len,
        _pin: pin,
    })
}

/// A read-only mapping of a memory-backed file and the pages known to be allocated in
/// it. See the [module documentation](self).
#[derive(Debug)]
pub struct MappedReads {
    map: Arc<memmap2::Mmap>,
    allocated: RwLock<RangeSet>,
}

impl MappedReads {
    /// Maps the first `size` bytes of `file` and records its allocated pages. `None`
    /// when the file cannot be mapped or scanned; reads then simply use `pread`.
    pub fn new(file: &File, size: u64) -> Option<MappedReads> {
        if size == 0 || usize::try_from(size).is_err() {
            return None;
        }
        // SAFETY: the mapping is read-only and shared, and its bytes are only handed to
        // the kernel (see the module documentation), so a file changed or truncated by
        // another process cannot break memory safety in this process.
        let map = unsafe { memmap2::MmapOptions::new().len(size as usize).map(file) }.ok()?;
        let allocated = data_pages(file, size)?;
        Some(MappedReads {
            map: Arc::new(map),
            allocated: RwLock::new(allocated),
        })
    }

    /// The bytes at `[offset, offset + len)` without copying them, when all their pages
    /// are known to be allocated.
    pub fn get(&self, offset: u64, len: usize) -> Option<Bytes> {
        let end = offset.checked_add(len as u64)?;
        if end > self.map.len() as u64 {
            return None;
        }
        let (first, last) = page_span(offset, end);
        if !self.allocated.read().ok()?.contains(first, last) {
            return None;
        }
        Some(slice_of(&self.map, offset as usize, len, None))
    }

    /// Records that `[offset, offset + len)` was written, which allocated its pages.
    pub fn note_written(&self, offset: u64, len: u64) {
        let (first, last) = page_span(offset, offset.saturating_add(len));
        let Ok(set) = self.allocated.read() else {
            return;
        };
        if set.contains(first, last) {
            return;
        }
        drop(set);
        if let Ok(mut set) = self.allocated.write() {
            set.insert(first, last);
        }
    }

    /// Forgets the pages touching `[offset, offset + len)`: they are about to become
    /// holes, or may be.
    pub fn note_released(&self, offset: u64, len: u64) {
        let (first, last) = page_span(offset, offset.saturating_add(len));
        if let Ok(mut set) = self.allocated.write() {
            set.remove(first, last);
        }
    }

    /// A copy of the set of pages known to be allocated.
    #[cfg(test)]
    pub fn allocated(&self) -> RangeSet {
        self.allocated.read().map(|s| s.clone()).unwrap_or_default()
    }
}

/// A read-only mapping of an image file that grows with the file, for zero-copy reads
/// of its data clusters.
///
/// Writable layers only ask for clusters they have written (so their pages exist);
/// read-only layers may be asked for anything, and serve from the mapping only the pages
/// that held data when the mapping was first made (their contents never change).
#[derive(Debug)]
pub struct GrowingMap {
    map: RwLock<Option<Arc<memmap2::Mmap>>>,
    /// For read-only files: the pages known to be allocated. `None`: trust the caller.
    allocated: Option<RangeSet>,
}

/// Smallest mapping made; grown by doubling.
const MIN_MAP: u64 = 64 << 20;

impl GrowingMap {
    /// A map for `file`; `read_only` files get their allocated pages recorded now.
    /// `None` when the file cannot be scanned.
    pub fn new(file: &File, read_only: bool) -> Option<GrowingMap> {
        let allocated = if read_only {
            let len = file.metadata().ok()?.len();
            Some(data_pages(file, len)?)
        } else {
            None
        };
        Some(GrowingMap {
            map: RwLock::new(None),
            allocated,
        })
    }

    /// `[offset, offset + len)` of `file` without copying, holding `pin` until the
    /// returned bytes are dropped. `None` when the range cannot be served from memory.
    pub fn slice(&self, file: &File, offset: u64, len: usize, pin: &Arc<()>) -> Option<Bytes> {
        let end = offset.checked_add(len as u64)?;
        if let Some(set) = &self.allocated {
            let (first, last) = page_span(offset, end);
            if !set.contains(first, last) {
                return None;
            }
        }
        {
            let map = self.map.read().ok()?;
            if let Some(m) = map.as_ref()
                && m.len() as u64 >= end
            {
                return Some(slice_of(m, offset as usize, len, Some(Arc::clone(pin))));
            }
        }
        let mut map = self.map.write().ok()?;
        if map.as_ref().is_none_or(|m| (m.len() as u64) < end) {
            let file_len = file.metadata().ok()?.len();
            if end > file_len {
                return None;
            }
            let want = map
                .as_ref()
                .map_or(MIN_MAP, |m| 2 * m.len() as u64)
                .max(file_len)
                .max(MIN_MAP);
            let want = usize::try_from(want).ok()?;
            // SAFETY: as for `MappedReads::new`: read-only, shared, and its bytes are only
            // read by the kernel. The mapping may reach past the end of the file; callers
            // only ask for ranges of written data, inside the file (a kernel copy from a
            // range the file lost since fails with EFAULT rather than a signal).
            let m = unsafe { memmap2::MmapOptions::new().len(want).map(file) }.ok()?;
            *map = Some(Arc::new(m));
        }
        let m = map.as_ref()?;
        Some(slice_of(m, offset as usize, len, Some(Arc::clone(pin))))
    }
}

/// The whole pages touching `[start, end)`.
fn page_span(start: u64, end: u64) -> (u64, u64) {
    (
        start / PAGE * PAGE,
        end.checked_next_multiple_of(PAGE).unwrap_or(u64::MAX),
    )
}

/// The data extents of the first `size` bytes of `file`, in whole pages.
fn data_pages(file: &File, size: u64) -> Option<RangeSet> {
    let mut set = RangeSet::default();
    let mut pos = 0;
    while pos < size {
        let Some(data) = seek(file, pos, libc::SEEK_DATA).ok()? else {
            break;
        };
        if data >= size {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE).ok()?.unwrap_or(size);
        let hole = hole.min(size);
        if hole <= data {
            break;
        }
        // Only whole pages inside the extent are surely allocated.
        let first = data.next_multiple_of(PAGE);
        let last = hole / PAGE * PAGE;
        set.insert(first, last);
        pos = hole;
    }
    Some(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    const SPAN: u64 = 64;

    fn model_of(set: &RangeSet) -> Vec<bool> {
        let mut bits = vec![false; SPAN as usize];
        let mut prev_end = None;
        for (s, e) in set.iter() {
            assert!(s < e, "empty range {s}..{e}");
            if let Some(p) = prev_end {
                assert!(s > p, "ranges touch or overlap at {s}");
            }
            prev_end = Some(e);
            for b in &mut bits[s as usize..e as usize] {
                *b = true;
            }
        }
        bits
    }

    proptest! {
        #[test]
        fn range_set_matches_a_bitmap(ops in proptest::collection::vec(
            (any::<bool>(), 0..SPAN, 0..SPAN), 0..60)) {
            let mut set = RangeSet::default();
            let mut model = vec![false; SPAN as usize];
            for (add, a, b) in ops {
                let (s, e) = (a.min(b), a.max(b));
                if add {
                    set.insert(s, e);
                } else {
                    set.remove(s, e);
                }
                for bit in &mut model[s as usize..e as usize] {
                    *bit = add;
                }
                prop_assert_eq!(&model_of(&set), &model);
                for s in 0..SPAN {
                    for e in s..=SPAN {
                        let all = model[s as usize..e as usize].iter().all(|&b| b);
                        prop_assert_eq!(set.contains(s, e), all, "contains({}, {})", s, e);
                    }
                }
            }
        }
    }

    fn shm_file(len: u64) -> Option<(tempfile::TempDir, File)> {
        let dir = tempfile::tempdir_in("/dev/shm").ok()?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("disk"))
            .ok()?;
        file.set_len(len).ok()?;
        Some((dir, file))
    }

    fn allocated_bytes(file: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        file.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn serves_only_allocated_pages_from_the_mapping() {
        let Some((_dir, mut file)) = shm_file(1 << 20) else {
            return;
        };
        file.write_all(&[7u8; 10_000]).unwrap();
        let reads = MappedReads::new(&file, 1 << 20).unwrap();
        // Data from the start; 10,000 bytes allocate three pages.
        assert_eq!(
            reads.allocated().iter().collect::<Vec<_>>(),
            vec![(0, 12288)]
        );
        let b = reads.get(100, 9000).unwrap();
        assert_eq!(&b[..], &[7u8; 9000][..]);
        // Holes are never touched through the mapping: no page gets allocated.
        assert!(reads.get(12288, 4096).is_none());
        assert!(reads.get(8192, 8192).is_none());
        assert_eq!(allocated_bytes(&file), 12288);
        // A write makes its pages eligible.
        file.write_all_at(&[9u8; 100], 65536 + 10).unwrap();
        reads.note_written(65536 + 10, 100);
        assert_eq!(&reads.get(65536, 4096).unwrap()[10..110], &[9u8; 100][..]);
        // Released pages are forgotten, whole pages touching the range.
        reads.note_released(4000, 200);
        assert!(reads.get(0, 100).is_none());
        assert!(reads.get(4096, 100).is_none());
        assert!(reads.get(8192, 100).is_some());
        // Past the end: no.
        assert!(reads.get((1 << 20) - 10, 20).is_none());
    }
}
