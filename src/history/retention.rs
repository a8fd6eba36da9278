//! Restore points over time: which are shown, which are kept, views of one, rollbacks.
//!
//! A point is kept while it is inside the retention window, while something holds it (a
//! view being served, a named snapshot), and the newest point always. When the history
//! outgrows its byte cap, the oldest points go first even inside the window; that is
//! logged and counted. Dropping points lets the index drop the versions only they read,
//! and a segment whose bytes nothing reads is removed.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::warn;

use crate::error::{Error, ErrorKind, Result};

use super::engine::{History, lock, read, write};
use super::index::Lineage;
use super::manifest::Pin;
use super::point::{Point, PointSpec};
use super::record::{Kind, Record};

/// What retention did in one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expired {
    /// Points dropped because they left the window.
    pub points: usize,
    /// Points dropped inside the window because the history was over its byte cap.
    pub for_space: usize,
    /// Block versions whose bytes nothing reads any more.
    pub versions: usize,
    /// Segments removed.
    pub segments: usize,
}

/// The disk as it was at a point, held so that the point stays while it is read.
#[derive(Debug)]
pub struct PointView {
    history: Arc<History>,
    point: Point,
    lineage: Lineage,
}

impl PointView {
    /// The point.
    pub fn point(&self) -> Point {
        self.point
    }

    /// The volume.
    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    /// What the point sees.
    pub fn lineage(&self) -> &Lineage {
        &self.lineage
    }

    /// Reads the disk as it was.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.history.read_at(&self.lineage, offset, buf)
    }
}

impl Drop for PointView {
    fn drop(&mut self) {
        self.history.unpin(self.point.seq);
    }
}

impl History {
    /// The restore points, oldest first: those made durable.
    pub fn points(&self) -> Vec<Point> {
        self.shown_points(<[Point]>::to_vec)
    }

    /// How many restore points are shown, without copying the list.
    pub fn point_count(&self) -> usize {
        self.shown_points(<[Point]>::len)
    }

    /// The oldest and the newest restore point, without copying the list.
    pub fn point_bounds(&self) -> Option<(Point, Point)> {
        self.shown_points(|p| Some((*p.first()?, *p.last()?)))
    }

    /// Runs `f` on the points shown (those made durable), oldest first.
    fn shown_points<T>(&self, f: impl FnOnce(&[Point]) -> T) -> T {
        let durable = self.log_durable();
        let points = lock(&self.points);
        let n = points.partition_point(|p| p.seq <= durable);
        f(&points[..n])
    }

    fn log_durable(&self) -> u64 {
        // A point is shown once its mark was synced: by then everything before it is
        // written and in the index.
        self.log.durable()
    }

    /// The point a person's name for one names.
    pub fn resolve(&self, spec: PointSpec) -> Result<Point> {
        spec.resolve(&self.points(), crate::time::now_us())
    }

    fn pin(&self, seq: u64) {
        *lock(&self.pins).entry(seq).or_insert(0) += 1;
    }

    fn unpin(&self, seq: u64) {
        let mut pins = lock(&self.pins);
        if let Some(n) = pins.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&seq);
            }
        }
    }

    /// A view of the disk at `point`, which stays kept while the view lives.
    pub fn view(self: &Arc<Self>, point: Point) -> Result<PointView> {
        // Pin first, then check it is still there, so that retention cannot drop it
        // between the two.
        self.pin(point.seq);
        let present = lock(&self.points)
            .binary_search_by_key(&point.seq, |p| p.seq)
            .is_ok();
        if !present {
            self.unpin(point.seq);
            return Err(Error::msg(
                ErrorKind::NotFound,
                format!("restore point {} has left the retention window", point.seq),
            ));
        }
        let lineage = read(&self.index).lineage(point.epoch, point.seq);
        Ok(PointView {
            history: Arc::clone(self),
            point,
            lineage,
        })
    }

    /// Makes the live disk what it was at `point`. What was written after it stays
    /// readable at its own points until they leave the window. Durable on return.
    pub fn rollback(&self, point: Point) -> Result<()> {
        if self.read_only {
            return Err(
                Error::msg(ErrorKind::ReadOnly, "volume opened read-only").with_op("rollback")
            );
        }
        self.pin(point.seq);
        let result = (|| {
            let _gate = write(&self.gate);
            if lock(&self.points)
                .binary_search_by_key(&point.seq, |p| p.seq)
                .is_err()
            {
                return Err(Error::msg(
                    ErrorKind::NotFound,
                    format!("no restore point {}", point.seq),
                ));
            }
            let now = crate::time::now_us();
            let seq = self.append_mark(|seq| Record {
                aux: point.seq,
                aux2: point.epoch,
                ..Record::new(Kind::Rollback, seq, now)
            })?;
            write(&self.index).rollback(seq, point.epoch, point.seq);
            self.log.applied(seq);
            Ok(seq)
        })();
        self.unpin(point.seq);
        self.log.sync(result?)
    }

    /// Drops the points that retention no longer keeps at `now_us`, the versions only
    /// they read, and the segments nothing reads.
    pub fn expire(&self, now_us: u64) -> Result<Expired> {
        let manifest = self.manifest();
        let mut out = Expired::default();
        let window_start = now_us.saturating_sub(manifest.window_secs.saturating_mul(1_000_000));
        let retained: Vec<(u32, u64)> = {
            let pins = lock(&self.pins);
            let mut points = lock(&self.points);
            let durable = self.log.durable();
            let newest = points
                .iter()
                .rev()
                .find(|p| p.seq <= durable)
                .map(|p| p.seq);
            let named = |seq: u64| manifest.snapshots.iter().any(|s| s.seq == seq);
            let held = |p: &Point| {
                p.time_us >= window_start
                    || Some(p.seq) == newest
                    || p.seq > durable
                    || pins.contains_key(&p.seq)
                    || named(p.seq)
            };
            let before = points.len();
            points.retain(held);
            out.points = before - points.len();
            if let Some(cap) = manifest.max_bytes {
                let over = self.history_bytes().saturating_sub(cap);
                if over > 0 {
                    // Oldest first, as long as the history is over its cap; an estimate
                    // per point, since the bytes are only freed by the pruning below.
                    let per_point = self.history_bytes() / points.len().max(1) as u64;
                    let mut freed = 0;
                    let mut i = 0;
                    while freed < over && i < points.len() {
                        let p = points[i];
                        if Some(p.seq) == newest
                            || p.seq > durable
                            || pins.contains_key(&p.seq)
                            || named(p.seq)
                        {
                            i += 1;
                            continue;
                        }
                        points.remove(i);
                        out.for_space += 1;
                        freed += per_point.max(1);
                    }
                    if out.for_space > 0 {
                        warn!(
                            "history over its cap of {cap} bytes: dropped the {} oldest restore points inside the window",
                            out.for_space
                        );
                        self.dropped_for_space
                            .fetch_add(out.for_space as u64, Ordering::Relaxed);
                    }
                }
            }
            points.iter().map(|p| (p.epoch, p.seq)).collect()
        };
        // Points kept or added never make a version unread: prune only after a drop.
        let dead = if out.points + out.for_space > 0 {
            write(&self.index).prune(&retained)
        } else {
            Vec::new()
        };
        out.versions = dead.len();
        {
            let mut usage = lock(&self.usage);
            for d in dead {
                if let Some(s) = d.loc.segment() {
                    if let Some(u) = usage.get_mut(&s) {
                        *u = u.saturating_sub(super::index::BLOCK);
                    }
                }
            }
        }
        out.segments = self.remove_unread_segments()?;
        Ok(out)
    }

    /// What a live volume does in the background: retention, reclaiming the emptiest
    /// segments, then a checkpoint when enough log was written since the last.
    pub fn maintain(&self) -> Result<()> {
        self.expire(crate::time::now_us())?;
        self.reclaim()?;
        self.maybe_checkpoint()
    }

    /// Bytes copied by the reclaimer since the volume was opened.
    pub fn reclaimed_bytes(&self) -> u64 {
        self.reclaimed_bytes.load(Ordering::Relaxed)
    }

    /// Names the newest point `name`: a snapshot, kept whatever the window. The disk's
    /// writes so far are flushed first, so the point is the disk as it is now.
    pub fn snapshot(&self, name: &str) -> Result<Pin> {
        if self.read_only {
            return Err(
                Error::msg(ErrorKind::ReadOnly, "volume opened read-only").with_op("snapshot")
            );
        }
        self.flush()?;
        let point = *self.points().last().ok_or_else(|| {
            Error::msg(
                ErrorKind::NotFound,
                "the volume has no restore point to name",
            )
        })?;
        self.name_point(name, point)
    }

    /// Names `point` (one kept now) `name`: a snapshot, kept whatever the window, with
    /// its `qemu:dirty-bitmap:NAME` context for what changed since.
    pub fn name_point(&self, name: &str, point: Point) -> Result<Pin> {
        crate::names::SNAPSHOT.check(name)?;
        if self.read_only {
            return Err(
                Error::msg(ErrorKind::ReadOnly, "volume opened read-only").with_op("snapshot")
            );
        }
        let mut m = lock(&self.manifest);
        if m.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::msg(
                ErrorKind::AlreadyExists,
                format!("snapshot {name:?} already exists"),
            ));
        }
        // Held while it is named, so that retention cannot drop it in between.
        self.pin(point.seq);
        let kept = lock(&self.points)
            .binary_search_by_key(&point.seq, |p| p.seq)
            .is_ok();
        let result = if kept {
            let pin = Pin {
                name: name.to_owned(),
                seq: point.seq,
                epoch: point.epoch,
                time_us: point.time_us,
            };
            let mut next = m.clone();
            next.snapshots.push(pin.clone());
            next.store(&*self.files).map(|()| {
                *m = next;
                pin
            })
        } else {
            Err(Error::msg(
                ErrorKind::NotFound,
                format!("restore point {} has left the retention window", point.seq),
            ))
        };
        self.unpin(point.seq);
        result
    }

    /// Removes the name of a snapshot; its point is then kept only while the window
    /// keeps it.
    pub fn delete_snapshot(&self, name: &str) -> Result<Pin> {
        let mut m = lock(&self.manifest);
        let i = m
            .snapshots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| {
                Error::msg(ErrorKind::NotFound, format!("no snapshot named {name:?}"))
            })?;
        let mut next = m.clone();
        let pin = next.snapshots.remove(i);
        next.store(&*self.files)?;
        *m = next;
        Ok(pin)
    }

    /// The names of the snapshots, oldest first.
    pub fn snapshot_names(&self) -> Vec<String> {
        self.manifest()
            .snapshots
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    /// What the snapshot `name` sees.
    pub fn snapshot_lineage(&self, name: &str) -> Option<Lineage> {
        let pin = self
            .manifest()
            .snapshots
            .into_iter()
            .find(|s| s.name == name)?;
        Some(read(&self.index).lineage(pin.epoch, pin.seq))
    }

    /// Points dropped inside the window because the history was over its byte cap,
    /// since the volume was opened.
    pub fn dropped_for_space(&self) -> u64 {
        self.dropped_for_space.load(Ordering::Relaxed)
    }

    /// Bytes of the log not holding a current version: history and garbage.
    pub fn history_bytes(&self) -> u64 {
        let total: u64 = self.segment_bytes().iter().map(|s| s.1).sum();
        let current = self.live_bytes();
        total.saturating_sub(current)
    }

    /// Bytes of the log holding current versions.
    pub fn live_bytes(&self) -> u64 {
        read(&self.index).data_blocks() * super::index::BLOCK
    }

    /// Removes sealed segments no kept version reads, once a checkpoint past them means
    /// no open replays them.
    fn remove_unread_segments(&self) -> Result<usize> {
        let unread = |past_checkpoint: bool| -> Vec<u32> {
            let checkpointed = *lock(&self.checkpointed);
            let active = self.log.active();
            let usage = lock(&self.usage);
            self.log
                .segments()
                .into_iter()
                .filter(|n| Some(*n) != active && (!past_checkpoint || *n < checkpointed.segment))
                .filter(|n| usage.get(n).copied().unwrap_or(0) == 0)
                .collect()
        };
        if unread(false).is_empty() {
            return Ok(0);
        }
        // The checkpoint an open would start from may still list points (and versions)
        // that read these segments: replace it with one of the index as pruned.
        self.checkpoint()?;
        let candidates = unread(true);
        // Readers that looked a block up before the pruning may still read it: wait for
        // them by taking the gate.
        let _gate = write(&self.gate);
        for n in &candidates {
            self.log.remove(*n)?;
            lock(&self.usage).remove(n);
        }
        self.files.sync_names()?;
        Ok(candidates.len())
    }
}
