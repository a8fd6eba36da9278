//! Reclaiming space: the versions still read in a mostly-unread segment are copied to
//! the tail of the log, so that the segment can go.
//!
//! A sealed segment holds versions that are current, versions a kept point reads, and
//! bytes nothing reads any more (overwritten, or only read by points that expired).
//! Retention alone removes a segment once nothing in it is read; a segment in which a
//! few blocks stay current forever would otherwise be kept whole. The reclaimer copies
//! what is still read into relocation records, which keep each version's `seq` (the
//! points that read it still do), then the segment is removed by retention after the
//! next checkpoint. Segments are taken emptiest first, and a pass copies a bounded
//! amount, so that reclaiming never competes much with clients.

use std::sync::atomic::Ordering;

use crate::error::Result;

use super::engine::{History, lock, read, write};
use super::index::{BLOCK, Loc, Version};
use super::record::{Kind, Record};

/// A segment is reclaimed when less than this share of it is still read.
const RECLAIM_BELOW: f64 = 0.5;
/// At most this many bytes are copied in one pass.
const PASS_BYTES: u64 = 64 << 20;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Segments emptied.
    pub segments: usize,
    /// Bytes of versions copied.
    pub copied: u64,
}

impl History {
    /// Copies what is still read out of the emptiest sealed segments (those less than
    /// half read), up to a bounded amount.
    pub fn reclaim(&self) -> Result<Reclaimed> {
        let mut out = Reclaimed::default();
        if self.read_only {
            return Ok(out);
        }
        for segment in self.reclaimable() {
            if out.copied >= PASS_BYTES {
                break;
            }
            out.copied += self.relocate_segment(segment)?;
            out.segments += 1;
        }
        self.reclaimed_bytes
            .fetch_add(out.copied, Ordering::Relaxed);
        Ok(out)
    }

    /// Sealed segments less than [`RECLAIM_BELOW`] read, emptiest first.
    fn reclaimable(&self) -> Vec<u32> {
        let active = self.log.active();
        let usage = lock(&self.usage).clone();
        let mut found: Vec<(f64, u32)> = self
            .segment_bytes()
            .into_iter()
            .filter(|(n, len)| Some(*n) != active && *len > 0)
            .filter_map(|(n, len)| {
                let used = usage.get(&n).copied().unwrap_or(0);
                let share = used as f64 / len as f64;
                (used > 0 && share < RECLAIM_BELOW).then_some((share, n))
            })
            .collect();
        found.sort_by(|a, b| a.0.total_cmp(&b.0));
        found.into_iter().map(|f| f.1).collect()
    }

    /// Copies every version still read in `segment` to the tail; returns the bytes.
    fn relocate_segment(&self, segment: u32) -> Result<u64> {
        let mut held: Vec<(u64, Version)> = read(&self.index)
            .versions()
            .filter(|(_, v)| v.loc.segment() == Some(segment))
            .collect();
        held.sort_by_key(|(b, v)| (v.seq, *b));
        let mut copied = 0;
        let mut i = 0;
        while i < held.len() {
            // A run: consecutive blocks of one version, stored one after the other.
            let (first, v) = held[i];
            let mut n = 1;
            while i + n < held.len() && n < 256 {
                let (b, w) = held[i + n];
                let next = match v.loc {
                    Loc::Data { offset, .. } => offset + n as u64 * BLOCK,
                    _ => unreachable!("only data has a segment"),
                };
                if w.seq != v.seq
                    || b != first + n as u64
                    || w.loc
                        != (Loc::Data {
                            segment,
                            offset: next,
                        })
                {
                    break;
                }
                n += 1;
            }
            copied += self.relocate_run(first, n as u64, v)?;
            i += n;
        }
        Ok(copied)
    }

    /// Copies `count` blocks of version `v` from `first` to the tail, and points the
    /// index at the copy where it still reads the original.
    fn relocate_run(&self, first: u64, count: u64, v: Version) -> Result<u64> {
        let Loc::Data { segment, offset } = v.loc else {
            return Ok(0);
        };
        let mut bytes = vec![0u8; (count * BLOCK) as usize];
        self.log.read(segment, offset, &mut bytes)?;
        let _gate = read(&self.gate);
        let now = crate::time::now_us();
        let make = |seq| Record {
            block: first,
            count: count as u32,
            aux: v.seq,
            ..Record::new(Kind::Relocate, seq, now)
        };
        let slot = self.log.append(make, &[&bytes], now)?;
        let record = make(slot.seq);
        let mut moved = 0;
        {
            let mut ix = write(&self.index);
            for i in 0..count {
                let old = Loc::Data {
                    segment,
                    offset: offset + i * BLOCK,
                };
                let new = record.block_loc(i, slot.segment, slot.payload());
                if ix.relocate_from(first + i, v.seq, new, old) {
                    moved += 1;
                }
            }
        }
        {
            let mut usage = lock(&self.usage);
            *usage.entry(slot.segment).or_insert(0) += moved * BLOCK;
            if let Some(u) = usage.get_mut(&segment) {
                *u = u.saturating_sub(moved * BLOCK);
            }
        }
        self.log.applied(slot.seq);
        Ok(count * BLOCK)
    }
}
