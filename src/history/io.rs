//! The data path of a volume with history: reads of the live disk or of a point, writes,
//! zeroing, flushes, and what the blocks hold.
//!
//! A write appends one record holding whole blocks (a partial block is completed with
//! its current bytes, under a range lock), then points the index at it. A flush appends
//! a restore-point mark and syncs the log up to it; if nothing was appended since the
//! last point, it only makes sure that point is durable.

use std::sync::atomic::Ordering;

use crate::block::{DepthExtent, DirtyExtent, Extent};
use crate::error::{Error, ErrorKind, Result};

use super::engine::{History, lock, read, write};
use super::index::{BLOCK, Lineage, Loc, Version};
use super::point::{Point, PointKind};
use super::record::{Kind, Record};

/// The most blocks one record covers.
const MAX_COUNT: u64 = u32::MAX as u64;
/// The most of the disk one block-status answer describes.
const STATUS_SPAN: u64 = 1 << 30;

/// Whether `b` continues the run `a` started (so that one read serves both).
fn continues(a: Version, b: Version) -> bool {
    match (a.loc, b.loc) {
        (Loc::Base, Loc::Base) => true,
        (Loc::Zero | Loc::Hole, Loc::Zero | Loc::Hole) => true,
        (
            Loc::Data {
                segment: s1,
                offset: o1,
            },
            Loc::Data {
                segment: s2,
                offset: o2,
            },
        ) => s1 == s2 && o2 == o1 + BLOCK,
        _ => false,
    }
}

impl History {
    fn refuse_read_only(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            return Err(Error::msg(ErrorKind::ReadOnly, "volume opened read-only").with_op(op));
        }
        Ok(())
    }

    /// The versions of `count` blocks from `first`, live or at a point.
    fn versions(&self, first: u64, count: u64, at: Option<&Lineage>) -> Vec<Version> {
        let ix = read(&self.index);
        (first..first + count)
            .map(|b| match at {
                None => ix.current(b),
                Some(l) => ix.version_at(b, l),
            })
            .collect()
    }

    /// Reads the live disk.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _gate = read(&self.gate);
        self.read_ungated(offset, buf, None)
    }

    /// Reads the disk as it was at a point.
    pub fn read_at(&self, at: &Lineage, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _gate = read(&self.gate);
        self.read_ungated(offset, buf, Some(at))
    }

    fn read_ungated(&self, offset: u64, buf: &mut [u8], at: Option<&Lineage>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let first = offset / BLOCK;
        let versions = self.versions(first, (end - 1) / BLOCK - first + 1, at);
        let mut pos = offset;
        while pos < end {
            let i = ((pos / BLOCK) - first) as usize;
            let mut j = i + 1;
            while j < versions.len() && continues(versions[j - 1], versions[j]) {
                j += 1;
            }
            let run_end = end.min((first + j as u64) * BLOCK);
            let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            match versions[i].loc {
                Loc::Base => self.base.read(pos, dst)?,
                Loc::Zero | Loc::Hole => dst.fill(0),
                Loc::Data { segment, offset: o } => self.log.read(segment, o + pos % BLOCK, dst)?,
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua` it is a restore point, durable on return.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.refuse_read_only("write")?;
        if data.is_empty() {
            return if fua { self.flush() } else { Ok(()) };
        }
        let mut last = 0;
        let mut done = 0usize;
        // A record covers at most MAX_COUNT blocks; requests are far smaller.
        while done < data.len() {
            let n = (data.len() - done).min((MAX_COUNT * BLOCK) as usize / 2);
            let is_last = done + n == data.len();
            last =
                self.write_blocks(offset + done as u64, &data[done..done + n], fua && is_last)?;
            done += n;
        }
        if fua {
            self.log.sync(last)?;
        }
        Ok(())
    }

    fn write_blocks(&self, offset: u64, data: &[u8], point: bool) -> Result<u64> {
        let end = offset + data.len() as u64;
        let first = offset / BLOCK;
        let count = end.div_ceil(BLOCK) - first;
        let _gate = read(&self.gate);
        let _held = self.ranges.lock(first, first + count);
        let head_at = (offset % BLOCK) as usize;
        let tail_len = (end % BLOCK) as usize;
        let head = (head_at != 0 || (count == 1 && tail_len != 0))
            .then(|| {
                self.edge_block(first, |b| {
                    let n = (BLOCK as usize - head_at).min(data.len());
                    b[head_at..head_at + n].copy_from_slice(&data[..n]);
                })
            })
            .transpose()?;
        let tail = (count > 1 && tail_len != 0)
            .then(|| {
                self.edge_block(first + count - 1, |b| {
                    b[..tail_len].copy_from_slice(&data[data.len() - tail_len..])
                })
            })
            .transpose()?;
        let mid_start = if head.is_some() {
            (BLOCK as usize - head_at).min(data.len())
        } else {
            0
        };
        let mid_end = if tail.is_some() {
            data.len() - tail_len
        } else {
            data.len()
        };
        let mut pieces: Vec<&[u8]> = Vec::with_capacity(3);
        pieces.extend(head.as_deref());
        if mid_start < mid_end {
            pieces.push(&data[mid_start..mid_end]);
        }
        pieces.extend(tail.as_deref());
        self.append_blocks(Kind::Write, first, count, 0, point, &pieces)
    }

    /// The current bytes of `block`, changed by `change`: a block a request covers only
    /// in part. The caller holds the block's range lock and the gate.
    fn edge_block(&self, block: u64, change: impl FnOnce(&mut [u8])) -> Result<Vec<u8>> {
        let mut b = vec![0u8; BLOCK as usize];
        self.read_ungated(block * BLOCK, &mut b, None)?;
        change(&mut b);
        Ok(b)
    }

    /// Appends a record covering `count` blocks from `first` and points the index at it.
    fn append_blocks(
        &self,
        kind: Kind,
        first: u64,
        count: u64,
        aux: u64,
        point: bool,
        payload: &[&[u8]],
    ) -> Result<u64> {
        let now = crate::time::now_us();
        let count32 =
            u32::try_from(count).map_err(|_| Error::new(ErrorKind::Overflow).with_op("append"))?;
        let slot = self.log.append(
            |seq| {
                if point {
                    self.latest_mark.fetch_max(seq, Ordering::SeqCst);
                }
                self.latest_change.fetch_max(seq, Ordering::SeqCst);
                Record {
                    point,
                    block: first,
                    count: count32,
                    aux,
                    ..Record::new(kind, seq, now)
                }
            },
            payload,
            now,
        )?;
        let record = Record {
            count: count32,
            aux,
            ..Record::new(kind, slot.seq, now)
        };
        self.apply(first, count, slot.seq, |i| {
            record.block_loc(i, slot.segment, slot.payload())
        });
        if point {
            self.add_point(slot.seq, now, PointKind::Fua);
        }
        self.log.applied(slot.seq);
        Ok(slot.seq)
    }

    /// Points the index at the new versions of `count` blocks from `first`, and counts
    /// the bytes that became live and those nothing reads any more.
    fn apply(&self, first: u64, count: u64, seq: u64, loc: impl Fn(u64) -> Loc) {
        let keep_from = self.latest_mark.load(Ordering::SeqCst);
        let mut dead = Vec::new();
        let mut added = None;
        {
            let mut ix = write(&self.index);
            for i in 0..count {
                let v = Version { seq, loc: loc(i) };
                if let Some(s) = v.loc.segment() {
                    let a = added.get_or_insert((s, 0));
                    a.1 += BLOCK;
                }
                if let Some(d) = ix.set(first + i, v, |s| keep_from >= s) {
                    dead.push(d);
                }
            }
        }
        let mut usage = lock(&self.usage);
        if let Some((s, bytes)) = added {
            *usage.entry(s).or_insert(0) += bytes;
        }
        for d in dead {
            if let Some(s) = d.loc.segment() {
                if let Some(u) = usage.get_mut(&s) {
                    *u = u.saturating_sub(BLOCK);
                }
            }
        }
    }

    pub(super) fn add_point(&self, seq: u64, time_us: u64, kind: PointKind) {
        let epoch = read(&self.index).live_epoch();
        let mut points = lock(&self.points);
        let at = points.partition_point(|p| p.seq < seq);
        points.insert(
            at,
            Point {
                seq,
                time_us,
                kind,
                epoch,
            },
        );
    }

    /// Makes the range read as zeroes: trimmed (a hole) or zeroed (allocated), in one
    /// record whatever its alignment.
    pub fn zero(&self, offset: u64, len: u64, trim: bool, fua: bool) -> Result<()> {
        self.refuse_read_only(if trim { "trim" } else { "write_zeroes" })?;
        if len == 0 {
            return if fua { self.flush() } else { Ok(()) };
        }
        let end = offset + len;
        let first = offset / BLOCK;
        let count = end.div_ceil(BLOCK) - first;
        let seq = {
            let _gate = read(&self.gate);
            let _held = self.ranges.lock(first, first + count);
            let last = first + count - 1;
            let head_at = (offset % BLOCK) as usize;
            let head_end = if count == 1 {
                (end - first * BLOCK) as usize
            } else {
                BLOCK as usize
            };
            let tail_len = (end % BLOCK) as usize;
            let head = (head_at != 0 || head_end != BLOCK as usize)
                .then(|| self.edge_block(first, |b| b[head_at..head_end].fill(0)))
                .transpose()?;
            let tail = (count > 1 && tail_len != 0)
                .then(|| self.edge_block(last, |b| b[..tail_len].fill(0)))
                .transpose()?;
            let aux = u64::from(head.is_some()) | (u64::from(tail.is_some()) << 1);
            let mut pieces: Vec<&[u8]> = Vec::with_capacity(2);
            pieces.extend(head.as_deref());
            pieces.extend(tail.as_deref());
            let kind = if trim { Kind::Trim } else { Kind::Zero };
            self.append_blocks(kind, first, count, aux, fua, &pieces)?
        };
        if fua {
            self.log.sync(seq)?;
        }
        Ok(())
    }

    /// Makes every completed write durable; the disk as it is becomes a restore point
    /// (unless nothing changed since the last one).
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let seq = {
            let _gate = read(&self.gate);
            let last_point = self.latest_mark.load(Ordering::SeqCst);
            let latest = self.latest_change.load(Ordering::SeqCst);
            if latest <= last_point {
                last_point
            } else {
                let now = crate::time::now_us();
                let seq = self.append_mark(|seq| Record::new(Kind::Flush, seq, now))?;
                self.add_point(seq, now, PointKind::Flush);
                self.log.applied(seq);
                seq
            }
        };
        self.log.sync(seq)
    }

    /// Describes allocation from `offset` (live, or at a point): blocks in the log are
    /// data or zeroes; the rest is described by the base.
    pub fn block_status(&self, offset: u64, len: u64, at: Option<&Lineage>) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        self.runs(offset, len.min(STATUS_SPAN), at, |pos, n, loc| {
            let pieces = match loc {
                Loc::Base => self.base.block_status(pos, n)?,
                Loc::Zero => vec![Extent::zero(n)],
                Loc::Hole => vec![Extent::hole(n)],
                Loc::Data { .. } => vec![Extent::data(n)],
            };
            let mut covered = 0;
            for e in pieces {
                covered += e.length;
                match out.last_mut() {
                    Some(l) if l.hole == e.hole && l.zero == e.zero => l.length += e.length,
                    _ => out.push(e),
                }
            }
            Ok(covered == n)
        })?;
        Ok(out)
    }

    /// Says which layer holds each part of the range: 1 for the log, the base chain's
    /// own depth for the rest (its top holds nothing, or, in a clone, the disk the clone
    /// started with, which is the volume's own data like the log's: depth 1 as well).
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>> {
        let mut out: Vec<DepthExtent> = Vec::new();
        self.runs(offset, len.min(STATUS_SPAN), None, |pos, n, loc| {
            let pieces = match loc {
                Loc::Base => self.base.allocation_depth(pos, n)?,
                _ => vec![DepthExtent {
                    length: n,
                    depth: 1,
                }],
            };
            let mut covered = 0;
            for e in pieces {
                covered += e.length;
                match out.last_mut() {
                    Some(l) if l.depth == e.depth => l.length += e.length,
                    _ => out.push(e),
                }
            }
            Ok(covered == n)
        })?;
        Ok(out)
    }

    /// Which parts of the range the live disk changed since the point `since`.
    pub fn changed_since(
        &self,
        since: &Lineage,
        offset: u64,
        len: u64,
    ) -> Result<Vec<DirtyExtent>> {
        let len = len.min(STATUS_SPAN);
        let end = offset + len;
        let first = offset / BLOCK;
        let count = (end - 1) / BLOCK - first + 1;
        let ix = read(&self.index);
        let mut out: Vec<DirtyExtent> = Vec::new();
        for b in first..first + count {
            let dirty = ix.current(b).seq != ix.version_at(b, since).seq;
            let n = end.min((b + 1) * BLOCK) - offset.max(b * BLOCK);
            match out.last_mut() {
                Some(l) if l.dirty == dirty => l.length += n,
                _ => out.push(DirtyExtent { length: n, dirty }),
            }
        }
        Ok(out)
    }

    /// Calls `f(offset, len, loc)` for each run of blocks of one kind in the range; `f`
    /// returns whether it described the whole run (if not, the walk stops there).
    pub(super) fn runs(
        &self,
        offset: u64,
        len: u64,
        at: Option<&Lineage>,
        mut f: impl FnMut(u64, u64, Loc) -> Result<bool>,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = offset / BLOCK;
        let versions = self.versions(first, (end - 1) / BLOCK - first + 1, at);
        let kind = |v: Version| match v.loc {
            Loc::Data { .. } => Loc::Data {
                segment: 1,
                offset: 0,
            },
            other => other,
        };
        let mut pos = offset;
        let mut i = 0;
        while pos < end {
            let mut j = i + 1;
            while j < versions.len() && kind(versions[j]) == kind(versions[i]) {
                j += 1;
            }
            let run_end = end.min((first + j as u64) * BLOCK);
            if !f(pos, run_end - pos, versions[i].loc)? {
                break;
            }
            pos = run_end;
            i = j;
        }
        Ok(())
    }
}
