//! The block index of a volume with history: for every 4 KiB block, where its current
//! bytes are, and the older versions that some restore point still reads.
//!
//! Pure: it knows nothing of files. The log applies each record to it in sequence order
//! (a write, a zeroing, a rollback), and asks it what a point reads.
//!
//! # Versions, points and epochs
//! Every record of the log has a sequence number (`seq`), and a block written by record
//! `s` gets the version `(s, where its bytes are)`. A block nobody wrote has the implicit
//! version `(0, Base)`: it reads from the volume's base, or as zeroes without one.
//!
//! A restore point is a `seq`: the disk it shows holds, for each block, the newest version
//! written at or before it. A rollback does not erase anything: it starts a new *epoch*
//! whose disk is the target point's, and the versions written after the target stay in
//! the index for the points of the old epoch until they leave the retention window. The
//! epochs form a tree; a point sees the versions of its own epoch up to its `seq`, then
//! those of its parent epoch up to the point the epoch started from, and so on to epoch
//! 0. Because an epoch starts after its parent point, these ranges of `seq`s never
//! overlap and fall as one walks up: the newest visible version is the one with the
//! largest visible `seq`.
//!
//! The current version of every block of the live epoch sits in a paged array (16 bytes
//! a block, pages allocated on first write); older versions, kept only while a retained
//! point needs them, sit in a map beside it.

use std::collections::HashMap;

/// log2 of [`BLOCK`].
pub const BLOCK_SHIFT: u32 = 12;
/// The unit of the index: 4 KiB.
pub const BLOCK: u64 = 1 << BLOCK_SHIFT;
/// Blocks per page of the current map.
const PAGE: usize = 512;

/// Where the bytes of a block version are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Loc {
    /// Never written in this volume: the base's bytes, or zeroes.
    Base,
    /// Zeroed, still allocated (`WRITE_ZEROES` that keeps the range).
    Zero,
    /// Trimmed or zeroed with a hole: reads as zeroes.
    Hole,
    /// 4 KiB at `offset` in segment `segment`.
    Data {
        /// The segment's number (at least 1).
        segment: u32,
        /// Byte offset in the segment file.
        offset: u64,
    },
}

const SEGMENT_SHIFT: u32 = 40;

impl Loc {
    /// The packed form: 0, 1 and 2 for the three kinds without bytes, otherwise the
    /// segment in the high 24 bits and the offset in the low 40.
    pub fn pack(self) -> u64 {
        match self {
            Loc::Base => 0,
            Loc::Zero => 1,
            Loc::Hole => 2,
            Loc::Data { segment, offset } => {
                debug_assert!(segment >= 1 && offset < 1 << SEGMENT_SHIFT);
                (u64::from(segment) << SEGMENT_SHIFT) | offset
            }
        }
    }

    /// The inverse of [`Loc::pack`]; `None` for a value no `Loc` packs to.
    pub fn unpack(v: u64) -> Option<Loc> {
        Some(match v {
            0 => Loc::Base,
            1 => Loc::Zero,
            2 => Loc::Hole,
            _ if v >> SEGMENT_SHIFT == 0 => return None,
            _ => Loc::Data {
                segment: u32::try_from(v >> SEGMENT_SHIFT).ok()?,
                offset: v & ((1 << SEGMENT_SHIFT) - 1),
            },
        })
    }

    /// The segment holding the bytes, if any.
    pub fn segment(self) -> Option<u32> {
        match self {
            Loc::Data { segment, .. } => Some(segment),
            _ => None,
        }
    }
}

/// One version of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// The record that wrote it (0 for the implicit base version).
    pub seq: u64,
    /// Where its bytes are.
    pub loc: Loc,
}

impl Version {
    /// The version of a block nobody wrote.
    pub const BASE: Version = Version {
        seq: 0,
        loc: Loc::Base,
    };
}

/// An epoch: the live disk between two rollbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    /// The first `seq` of the epoch (the rollback record's; 0 for epoch 0).
    pub start: u64,
    /// The epoch and point it started from (`None` for epoch 0).
    pub parent: Option<(u32, u64)>,
}

/// The `seq` ranges a point sees, newest first, disjoint and falling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage(Vec<(u64, u64)>);

impl Lineage {
    /// Whether a version written by `seq` is visible.
    pub fn sees(&self, seq: u64) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= seq && seq <= hi)
    }

    /// The newest `seq` the point sees.
    pub fn upto(&self) -> u64 {
        self.0.first().map_or(0, |r| r.1)
    }
}

/// The index. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Index {
    blocks: u64,
    pages: Vec<Option<Box<[Version; PAGE]>>>,
    older: HashMap<u64, Vec<Version>>,
    epochs: Vec<Epoch>,
    /// Current versions whose bytes are in the log.
    data_blocks: u64,
}

impl Index {
    /// An index of a disk of `blocks` blocks, all unwritten, in epoch 0.
    pub fn new(blocks: u64) -> Index {
        let pages = usize::try_from(blocks.div_ceil(PAGE as u64)).expect("disk size fits memory");
        Index {
            blocks,
            pages: vec![None; pages],
            older: HashMap::new(),
            data_blocks: 0,
            epochs: vec![Epoch {
                start: 0,
                parent: None,
            }],
        }
    }

    /// Blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The epochs, oldest first; the last is live.
    pub fn epochs(&self) -> &[Epoch] {
        &self.epochs
    }

    /// The live epoch.
    pub fn live_epoch(&self) -> u32 {
        u32::try_from(self.epochs.len() - 1).expect("fewer than 2^32 epochs")
    }

    /// What a point of `epoch` at `seq` sees.
    pub fn lineage(&self, epoch: u32, seq: u64) -> Lineage {
        let mut out = Vec::new();
        let (mut e, mut upto) = (epoch, seq);
        loop {
            let ep = self.epochs[e as usize];
            out.push((ep.start, upto));
            match ep.parent {
                Some((pe, ps)) => (e, upto) = (pe, ps),
                None => return Lineage(out),
            }
        }
    }

    /// The current version of `block` in the live epoch.
    pub fn current(&self, block: u64) -> Version {
        let (p, i) = split(block);
        self.pages[p].as_ref().map_or(Version::BASE, |page| page[i])
    }

    /// Replaces the current version of `block`, keeping the count of data blocks.
    fn replace_current(&mut self, block: u64, v: Version) -> Version {
        let old = std::mem::replace(self.slot(block), v);
        let was = u64::from(old.loc.segment().is_some());
        let is = u64::from(v.loc.segment().is_some());
        self.data_blocks = self.data_blocks + is - was;
        old
    }

    /// How many blocks of the live disk have their bytes in the log.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    fn slot(&mut self, block: u64) -> &mut Version {
        let (p, i) = split(block);
        &mut self.pages[p].get_or_insert_with(|| Box::new([Version::BASE; PAGE]))[i]
    }

    /// The older versions of `block` still kept, oldest first.
    pub fn older(&self, block: u64) -> &[Version] {
        self.older.get(&block).map_or(&[], Vec::as_slice)
    }

    /// The version of `block` a point with this lineage reads.
    pub fn version_at(&self, block: u64, lineage: &Lineage) -> Version {
        let cur = self.current(block);
        let mut best = lineage.sees(cur.seq).then_some(cur);
        for v in self.older(block).iter().rev() {
            if best.is_some_and(|b| v.seq < b.seq) {
                break;
            }
            if lineage.sees(v.seq) {
                best = Some(*v);
                break;
            }
        }
        best.unwrap_or(Version::BASE)
    }

    /// Makes `version` the current one of `block` in the live epoch. The version it
    /// replaces is kept as an older version when `keep` says a point may read it, and
    /// otherwise returned: nothing reads its bytes any more.
    pub fn set(
        &mut self,
        block: u64,
        version: Version,
        keep: impl Fn(u64) -> bool,
    ) -> Option<Version> {
        debug_assert!(block < self.blocks);
        let old = self.replace_current(block, version);
        if old.loc == Loc::Base {
            return None;
        }
        if keep(old.seq) {
            insert_sorted(self.older.entry(block).or_default(), old);
            None
        } else {
            Some(old)
        }
    }

    /// Points the version `(block, seq)` at `loc` (the log moved its bytes), wherever it
    /// is kept. Returns the location it had, or `None` if no such version is kept.
    pub fn relocate(&mut self, block: u64, seq: u64, loc: Loc) -> Option<Loc> {
        let cur = self.current(block);
        if cur.seq == seq && cur.loc != Loc::Base {
            return Some(std::mem::replace(&mut self.slot(block).loc, loc));
        }
        let list = self.older.get_mut(&block)?;
        let i = list.binary_search_by_key(&seq, |v| v.seq).ok()?;
        Some(std::mem::replace(&mut list[i].loc, loc))
    }

    /// Like [`Index::relocate`], only if the version is still at `old`: a copy made
    /// while the version moved or went is not used. Returns whether it moved.
    pub fn relocate_from(&mut self, block: u64, seq: u64, new: Loc, old: Loc) -> bool {
        let cur = self.current(block);
        if cur.seq == seq && cur.loc == old {
            self.slot(block).loc = new;
            return true;
        }
        let Some(list) = self.older.get_mut(&block) else {
            return false;
        };
        match list.binary_search_by_key(&seq, |v| v.seq) {
            Ok(i) if list[i].loc == old => {
                list[i].loc = new;
                true
            }
            _ => false,
        }
    }

    /// Starts a new live epoch at `seq` whose disk is that of the point `(epoch, at)`.
    /// Current versions it replaces become older versions (points of the old epoch read
    /// them); the pruning decides later which of them are still needed.
    pub fn rollback(&mut self, seq: u64, epoch: u32, at: u64) -> u32 {
        let lineage = self.lineage(epoch, at);
        for p in 0..self.pages.len() {
            if self.pages[p].is_none() {
                continue;
            }
            for i in 0..PAGE {
                let block = (p * PAGE + i) as u64;
                if block >= self.blocks {
                    break;
                }
                let target = self.version_at(block, &lineage);
                let cur = self.current(block);
                if target == cur {
                    continue;
                }
                let list = self.older.entry(block).or_default();
                if let Ok(j) = list.binary_search_by_key(&target.seq, |v| v.seq) {
                    list.remove(j);
                }
                if cur.loc != Loc::Base {
                    insert_sorted(list, cur);
                }
                if list.is_empty() {
                    self.older.remove(&block);
                }
                self.replace_current(block, target);
            }
        }
        self.epochs.push(Epoch {
            start: seq,
            parent: Some((epoch, at)),
        });
        self.live_epoch()
    }

    /// Drops the older versions no retained point reads. `points` lists the retained
    /// points as `(epoch, seq)`, in any order. Returns the dropped versions, whose
    /// bytes nothing reads any more.
    pub fn prune(&mut self, points: &[(u32, u64)]) -> Vec<Version> {
        let groups = self.group_points(points);
        let mut dead = Vec::new();
        let pages = &self.pages;
        // In place: this runs every second under the index's write lock, over every
        // block with older versions, so it neither rehashes nor reallocates the lists.
        self.older.retain(|&block, list| {
            let (p, i) = split(block);
            let cur = pages[p].as_ref().map_or(Version::BASE, |page| page[i]);
            let mut needed = needed_versions(list, cur, &groups).into_iter();
            list.retain(|v| {
                let need = needed.next().expect("one flag per version");
                if !need {
                    dead.push(*v);
                }
                need
            });
            !list.is_empty()
        });
        dead
    }

    /// For each epoch holding retained points: its lineage up to the end of the epoch,
    /// and its points sorted.
    fn group_points(&self, points: &[(u32, u64)]) -> Vec<(Lineage, Vec<u64>)> {
        let mut by_epoch: HashMap<u32, Vec<u64>> = HashMap::new();
        for &(e, s) in points {
            by_epoch.entry(e).or_default().push(s);
        }
        by_epoch
            .into_iter()
            .map(|(e, mut seqs)| {
                seqs.sort_unstable();
                (self.lineage(e, u64::MAX), seqs)
            })
            .collect()
    }

    /// Every kept version, current ones included, with its block: for the log's space
    /// accounting and for checkpoints.
    pub fn versions(&self) -> impl Iterator<Item = (u64, Version)> + '_ {
        let current = self.pages.iter().enumerate().flat_map(|(p, page)| {
            page.iter().flat_map(move |page| {
                page.iter()
                    .enumerate()
                    .filter(|(_, v)| v.loc != Loc::Base)
                    .map(move |(i, v)| ((p * PAGE + i) as u64, *v))
            })
        });
        current.chain(self.older_versions())
    }

    /// Every kept older version, with its block.
    pub fn older_versions(&self) -> impl Iterator<Item = (u64, Version)> + '_ {
        self.older
            .iter()
            .flat_map(|(b, list)| list.iter().map(move |v| (*b, *v)))
    }

    /// Rebuilds an index from its parts (a checkpoint): the current versions, the older
    /// ones and the epochs. Returns `None` if they contradict each other.
    pub fn from_parts(
        blocks: u64,
        current: impl IntoIterator<Item = (u64, Version)>,
        older: impl IntoIterator<Item = (u64, Version)>,
        epochs: Vec<Epoch>,
    ) -> Option<Index> {
        if epochs
            .first()
            .is_none_or(|e| e.start != 0 || e.parent.is_some())
        {
            return None;
        }
        for (i, e) in epochs.iter().enumerate().skip(1) {
            let (pe, ps) = e.parent?;
            if pe as usize >= i || ps >= e.start || e.start < epochs[i - 1].start {
                return None;
            }
        }
        let mut index = Index::new(blocks);
        index.epochs = epochs;
        for (b, v) in current {
            if b >= blocks {
                return None;
            }
            index.replace_current(b, v);
        }
        for (b, v) in older {
            if b >= blocks || v.loc == Loc::Base {
                return None;
            }
            insert_sorted(index.older.entry(b).or_default(), v);
        }
        Some(index)
    }
}

fn split(block: u64) -> (usize, usize) {
    (
        (block / PAGE as u64) as usize,
        (block % PAGE as u64) as usize,
    )
}

fn insert_sorted(list: &mut Vec<Version>, v: Version) {
    match list.binary_search_by_key(&v.seq, |x| x.seq) {
        Ok(i) => list[i] = v,
        Err(i) => list.insert(i, v),
    }
}

/// Which of `older` (sorted) a retained point reads. A point of an epoch reads, of the
/// versions its epoch's lineage sees, the newest at or before it: version `u` is read
/// when a point of the epoch lies at or after `u` and before the next visible version.
fn needed_versions(
    older: &[Version],
    current: Version,
    groups: &[(Lineage, Vec<u64>)],
) -> Vec<bool> {
    let mut needed = vec![false; older.len()];
    for (lineage, points) in groups {
        // Versions this epoch sees, with their place in `older` (None: the current one).
        let mut seen: Vec<(u64, Option<usize>)> = older
            .iter()
            .enumerate()
            .filter(|(_, v)| lineage.sees(v.seq))
            .map(|(i, v)| (v.seq, Some(i)))
            .collect();
        if current.loc != Loc::Base && lineage.sees(current.seq) {
            seen.push((current.seq, None));
        }
        seen.sort_unstable_by_key(|s| s.0);
        for (k, &(seq, place)) in seen.iter().enumerate() {
            let Some(i) = place else { continue };
            let next = seen.get(k + 1).map_or(u64::MAX, |s| s.0);
            let first = points.partition_point(|&p| p < seq);
            if points.get(first).is_some_and(|&p| p < next) {
                needed[i] = true;
            }
        }
    }
    needed
}

#[cfg(test)]
mod tests;
