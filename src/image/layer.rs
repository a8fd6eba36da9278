//! Reading one Strata image file: its header and its map, every checksum and mapping
//! verified.
//!
//! [`scan`] walks the metadata once and records every problem it finds instead of
//! stopping at the first, so that opening (which refuses any problem) and `strata check`
//! (which reports them all, and can repair them) share one reader.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use super::format::{
    self, Current, ENTRIES, Entry, FormatError, Header, L1Entry, PAGE, PageKind, decode_page,
};
use super::storage::Storage;
use crate::error::{Error, ErrorKind, Result};

/// Where the current version of a two-slot page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageState {
    /// Offset of slot 0 (slot 1 follows it).
    pub offset: u64,
    /// Sequence number of the current version (0: never written).
    pub sequence: u64,
    /// Slot holding the current version; the next write goes to the other one.
    pub newest: usize,
}

impl PageState {
    /// A page pair at `offset` that was never written.
    pub fn fresh(offset: u64) -> PageState {
        PageState {
            offset,
            sequence: 0,
            newest: 1,
        }
    }

    /// Offset and sequence number of the next write.
    pub fn next(&self) -> (u64, u64, usize) {
        let slot = 1 - self.newest;
        (self.offset + (slot * PAGE) as u64, self.sequence + 1, slot)
    }
}

/// The contents of one L2 page as stored.
#[derive(Debug, Clone)]
pub enum L2Content {
    /// Every cluster is a zero cluster (no page stored).
    AllZero,
    /// Entries, as decoded.
    Entries(Box<[Entry; ENTRIES]>),
}

/// Something wrong with an image's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Neither header slot is valid.
    Header(FormatError),
    /// The file is shorter than its L1 table.
    TruncatedTable {
        /// File length.
        len: u64,
        /// Bytes the header and L1 table need.
        need: u64,
    },
    /// Both slots of an L1 page are unreadable: the L2 pages it pointed at are lost.
    L1Lost(u64, FormatError),
    /// An L1 entry holds an undefined value or points outside the file.
    BadL1Entry {
        /// L2 page index.
        page: u64,
        /// The raw entry.
        raw: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// Both slots of an L2 page are unreadable (or were never written).
    L2Lost(u64, String),
    /// A cluster entry holds an undefined value or points outside the file.
    BadEntry {
        /// Cluster index.
        cluster: u64,
        /// The raw entry.
        raw: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// Two mappings claim the same bytes of the file.
    Overlap {
        /// Cluster whose mapping was dropped.
        cluster: Option<u64>,
        /// The host offset claimed twice.
        host: u64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Header(e) => write!(f, "header: {e}"),
            Problem::TruncatedTable { len, need } => write!(
                f,
                "truncated: the file has {len} bytes but its header and map table need {need}"
            ),
            Problem::L1Lost(i, e) => write!(f, "L1 page {i}: both copies unreadable ({e})"),
            Problem::BadL1Entry { page, raw, why } => {
                write!(f, "L1 entry for map page {page} ({raw:#x}): {why}")
            }
            Problem::L2Lost(i, e) => write!(f, "map page {i}: both copies unreadable ({e})"),
            Problem::BadEntry { cluster, raw, why } => {
                write!(f, "cluster {cluster} entry {raw:#x}: {why}")
            }
            Problem::Overlap {
                cluster: Some(c),
                host,
            } => write!(
                f,
                "cluster {c} maps file offset {host:#x}, which another mapping already uses"
            ),
            Problem::Overlap {
                cluster: None,
                host,
            } => write!(
                f,
                "map page at file offset {host:#x} overlaps another mapping"
            ),
        }
    }
}

/// Everything read from one image file's metadata.
#[derive(Debug, Clone)]
pub struct Scan {
    /// The current header.
    pub header: Header,
    /// Which header slot holds it.
    pub header_slot: usize,
    /// Length of the file when scanned.
    pub file_len: u64,
    /// State of each L1 page.
    pub l1: Vec<PageState>,
    /// State of each L2 page that has a page pair, by L2 page index.
    pub pairs: HashMap<u32, PageState>,
    /// L2 pages with any cluster not unallocated, by index.
    pub pages: Vec<(u32, L2Content)>,
    /// Host ranges in use (header and L1 table, page pairs, data clusters), sorted.
    pub used: Vec<(u64, u64)>,
    /// Slots found torn or stale beside a valid twin: interrupted updates, harmless.
    pub torn_slots: u64,
    /// Metadata problems; opening refuses an image with any.
    pub problems: Vec<Problem>,
    /// L2 pages whose stored form differs from what was kept (bad entries dropped):
    /// a repair rewrites them.
    pub rewrite: BTreeSet<u32>,
}

impl Scan {
    /// Data clusters and zero clusters mapped by this image.
    pub fn counts(&self) -> (u64, u64) {
        let (mut data, mut zero) = (0, 0);
        for (_, content) in &self.pages {
            match content {
                L2Content::AllZero => zero += ENTRIES as u64,
                L2Content::Entries(e) => {
                    for entry in e.iter() {
                        match entry {
                            Entry::Data(_) => data += 1,
                            Entry::Zero => zero += 1,
                            Entry::Unallocated => {}
                        }
                    }
                }
            }
        }
        (data, zero)
    }

    /// Turns the first problem into an error naming the file.
    pub fn into_result(self, path: &Path) -> Result<Scan> {
        match self.problems.first() {
            None => Ok(self),
            Some(p) => {
                let more = match self.problems.len() {
                    1 => String::new(),
                    n => format!(" (and {} more problems; run `strata check`)", n - 1),
                };
                Err(
                    Error::msg(ErrorKind::Corrupt, format!("corrupt image: {p}{more}"))
                        .with_op("open")
                        .with_path(path),
                )
            }
        }
    }
}

/// A host range claimed by a mapping: start, length, and the cluster (L2 page, index)
/// that maps it, or `None` for an L2 page pair.
type Claim = (u64, u64, Option<(u32, usize)>);

/// The 4 KiB at `offset` of `bytes`, zero-filled past the end.
fn page_at(bytes: &[u8], offset: u64) -> std::borrow::Cow<'_, [u8]> {
    let start = offset as usize;
    if start + PAGE <= bytes.len() {
        std::borrow::Cow::Borrowed(&bytes[start..start + PAGE])
    } else {
        let mut page = vec![0u8; PAGE];
        if start < bytes.len() {
            page[..bytes.len() - start].copy_from_slice(&bytes[start..]);
        }
        std::borrow::Cow::Owned(page)
    }
}

/// The current version of the page of `kind` and `index` whose two slots start at
/// `offset`.
fn current_at(bytes: &[u8], kind: PageKind, index: u64, offset: u64) -> Current {
    format::current(
        decode_page(&page_at(bytes, offset), kind, index),
        decode_page(&page_at(bytes, offset + PAGE as u64), kind, index),
    )
}

/// Reads the header of the image in `storage`, refusing anything that is not a valid
/// Strata header.
pub fn read_header(storage: &dyn Storage, path: &Path) -> Result<(usize, Header)> {
    let mut two = vec![0u8; 2 * PAGE];
    storage
        .read_at(&mut two, 0)
        .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
    let len = storage
        .len()
        .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
    header_from(&two, len, path)
}

fn header_from(bytes: &[u8], len: u64, path: &Path) -> Result<(usize, Header)> {
    let bad = |msg: String| {
        Error::msg(ErrorKind::Corrupt, msg)
            .with_op("open")
            .with_path(path)
    };
    if !format::has_magic(bytes) {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            "not a Strata image (no Strata signature at offset 0)",
        )
        .with_op("open")
        .with_path(path));
    }
    if len < 2 * PAGE as u64 {
        return Err(bad(format!(
            "truncated: {len} bytes, shorter than the {} byte header",
            2 * PAGE
        )));
    }
    format::current_header(&bytes[..PAGE], &bytes[PAGE..2 * PAGE])
        .map_err(|e| bad(format!("unreadable header: {e}")))
}

/// Reads and verifies all metadata of the image in `storage`.
pub fn scan(storage: &dyn Storage, path: &Path) -> Result<Scan> {
    let view = storage
        .view()
        .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
    let bytes: &[u8] = &view;
    let file_len = bytes.len() as u64;
    let (header_slot, header) = header_from(bytes, file_len, path)?;
    let mut s = Scan {
        header_slot,
        file_len,
        l1: Vec::new(),
        pairs: HashMap::new(),
        pages: Vec::new(),
        used: Vec::new(),
        torn_slots: 0,
        problems: Vec::new(),
        rewrite: BTreeSet::new(),
        header,
    };
    let other_header = page_at(bytes, ((1 - header_slot) * PAGE) as u64);
    if format::decode_header(&other_header).is_err() && other_header.iter().any(|&b| b != 0) {
        s.torn_slots += 1;
    }
    let data_start = s.header.data_start();
    if file_len < data_start {
        s.problems.push(Problem::TruncatedTable {
            len: file_len,
            need: data_start,
        });
        return Ok(s);
    }
    s.used.push((0, data_start));
    let mut owners: Vec<Claim> = Vec::new();
    for i in 0..s.header.l1_pages() {
        scan_l1_page(bytes, &mut s, i, &mut owners);
    }
    check_overlaps(&mut s, owners);
    Ok(s)
}

fn scan_l1_page(bytes: &[u8], s: &mut Scan, i: u64, owners: &mut Vec<Claim>) {
    let h = s.header.clone();
    let slot_a = h.l1_slot(i, 0);
    let current = current_at(bytes, PageKind::L1, i, slot_a);
    let entries = match current {
        Current::Empty => {
            s.l1.push(PageState::fresh(slot_a));
            return;
        }
        Current::Lost(e) => {
            s.l1.push(PageState::fresh(slot_a));
            s.problems.push(Problem::L1Lost(i, e));
            return;
        }
        Current::Valid {
            slot,
            sequence,
            entries,
            other_invalid,
        } => {
            s.torn_slots += u64::from(other_invalid);
            s.l1.push(PageState {
                offset: slot_a,
                sequence,
                newest: slot,
            });
            entries
        }
    };
    let l2_pages = h.l2_pages();
    for (j, &raw) in entries.iter().enumerate() {
        let q = i * ENTRIES as u64 + j as u64;
        let bad = |why| Problem::BadL1Entry { page: q, raw, why };
        match L1Entry::decode(raw) {
            None => s.problems.push(bad("undefined value")),
            Some(L1Entry::Absent) => {}
            Some(_) if q >= l2_pages => s.problems.push(bad("past the end of the disk")),
            Some(L1Entry::AllZero) => s.pages.push((q as u32, L2Content::AllZero)),
            Some(L1Entry::Pair(off)) => {
                if off < h.data_start() || off + PAGE as u64 > s.file_len {
                    s.problems.push(bad("page pair outside the file"));
                    continue;
                }
                scan_l2_page(bytes, s, q, off, owners);
            }
        }
    }
}

fn scan_l2_page(bytes: &[u8], s: &mut Scan, q: u64, off: u64, owners: &mut Vec<Claim>) {
    let current = current_at(bytes, PageKind::L2, q, off);
    let (state, raw_entries) = match current {
        Current::Empty => {
            s.problems
                .push(Problem::L2Lost(q, "never written".to_owned()));
            return;
        }
        Current::Lost(e) => {
            s.problems.push(Problem::L2Lost(q, e.to_string()));
            return;
        }
        Current::Valid {
            slot,
            sequence,
            entries,
            other_invalid,
        } => {
            s.torn_slots += u64::from(other_invalid);
            (
                PageState {
                    offset: off,
                    sequence,
                    newest: slot,
                },
                entries,
            )
        }
    };
    s.pairs.insert(q as u32, state);
    owners.push((off, 2 * PAGE as u64, None));
    let cluster_size = s.header.cluster_size();
    let clusters = s.header.clusters();
    let data_start = s.header.data_start();
    let mut entries = Box::new([Entry::Unallocated; ENTRIES]);
    for (i, &raw) in raw_entries.iter().enumerate() {
        let cluster = q * ENTRIES as u64 + i as u64;
        let mut bad = |why| {
            s.problems.push(Problem::BadEntry { cluster, raw, why });
            s.rewrite.insert(q as u32);
        };
        match Entry::decode(raw) {
            None => bad("undefined value"),
            Some(Entry::Unallocated) => {}
            Some(_) if cluster >= clusters => bad("past the end of the disk"),
            Some(Entry::Data(host)) if host < data_start => bad("points into the map table"),
            Some(Entry::Data(host)) if host >= s.file_len => {
                bad("points past the end of the file (truncated?)");
            }
            Some(e @ Entry::Data(host)) => {
                owners.push((host, cluster_size, Some((q as u32, i))));
                entries[i] = e;
            }
            Some(Entry::Zero) => entries[i] = Entry::Zero,
        }
    }
    if entries.iter().any(|e| *e != Entry::Unallocated) {
        s.pages.push((q as u32, L2Content::Entries(entries)));
    }
}

/// Sorts the claimed host ranges and drops every mapping that overlaps an earlier one.
fn check_overlaps(s: &mut Scan, mut owners: Vec<Claim>) {
    owners.sort_unstable_by_key(|o| o.0);
    let mut end = s.header.data_start();
    let mut dropped: Vec<(u32, usize)> = Vec::new();
    for (start, len, owner) in owners {
        if start < end {
            s.problems.push(Problem::Overlap {
                cluster: owner.map(|(q, i)| u64::from(q) * ENTRIES as u64 + i as u64),
                host: start,
            });
            match owner {
                Some(o) => dropped.push(o),
                None => {
                    // A page pair overlapping data: keep the pair, its clusters may be
                    // fine; the data mapping it collided with is reported too.
                }
            }
            continue;
        }
        end = start + len;
        s.used.push((start, len));
    }
    for (q, i) in dropped {
        s.rewrite.insert(q);
        if let Some((_, L2Content::Entries(e))) = s.pages.iter_mut().find(|(p, _)| *p == q) {
            e[i] = Entry::Unallocated;
        }
    }
}
