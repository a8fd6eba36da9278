//! A volume with history behind a [`Volume`]: snapshots are named restore points, and
//! any restore point can be served, rolled back to or compared with the live disk.
//!
//! Nothing here pauses requests: the engine takes its own gate for a rollback, and a
//! point is served through a view of the same index.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{DirtyRange, Kind, SnapshotInfo, Taken, Volume, blocking, lock, refuse_connected};
use crate::backend::SharedBackend;
use crate::backend::history::{HistoryBackend, PointBackend};
use crate::block::DirtyExtent;
use crate::error::{Error, ErrorKind, Result};
use crate::history::{History, Point, PointSpec};

/// Opens the volume with history in `dir`.
pub(super) fn open(dir: &Path, read_only: bool) -> Result<Arc<Volume>> {
    let history = Arc::new(History::open(dir, read_only)?);
    let backend = HistoryBackend::new(history);
    let shared: SharedBackend = Arc::new(backend.clone());
    Ok(Arc::new(Volume {
        path: dir.to_path_buf(),
        read_only,
        kind: Kind::History(backend),
        backend: shared,
        ops: tokio::sync::Mutex::new(()),
        served: Mutex::new(Default::default()),
    }))
}

/// The point the snapshot `name` names.
pub(super) fn pinned(h: &History, name: &str) -> Result<Point> {
    let pin = h
        .manifest()
        .snapshots
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| Error::msg(ErrorKind::NotFound, format!("no snapshot named {name:?}")))?;
    h.resolve(PointSpec::Seq(pin.seq))
}

/// A read-only backend of the disk at `point`.
pub(super) fn serve_point(h: &Arc<History>, point: Point) -> Result<SharedBackend> {
    Ok(Arc::new(PointBackend::new(h.view(point)?)))
}

/// The ranges of the live disk changed since `point`.
pub(super) async fn dirty_since(h: &Arc<History>, point: Point) -> Result<Vec<DirtyRange>> {
    let h = Arc::clone(h);
    blocking(move || {
        let view = h.view(point)?;
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < h.size() {
            let extents = h.changed_since(view.lineage(), offset, h.size() - offset)?;
            for DirtyExtent { length, dirty } in extents {
                if dirty {
                    match out.last_mut() {
                        Some(DirtyRange {
                            offset: o,
                            length: l,
                        }) if *o + *l == offset => *l += length,
                        _ => out.push(DirtyRange { offset, length }),
                    }
                }
                offset += length;
            }
        }
        Ok(out)
    })
    .await
}

impl Volume {
    pub(super) fn history_snapshots(&self, h: &History) -> Vec<SnapshotInfo> {
        let served = lock(&self.served);
        h.manifest()
            .snapshots
            .into_iter()
            .rev()
            .map(|pin| SnapshotInfo {
                exported_as: served
                    .iter()
                    .find(|(_, s)| **s == pin.name)
                    .map(|(e, _)| e.clone()),
                name: pin.name,
                created: pin.time_us / 1_000_000,
                path: self.path.clone(),
                allocated: 0,
            })
            .collect()
    }

    pub(super) async fn history_snapshot(&self, h: &Arc<History>, name: &str) -> Result<Taken> {
        let (hh, n) = (Arc::clone(h), name.to_owned());
        blocking(move || hh.snapshot(&n)).await?;
        let snapshot = self
            .history_snapshots(h)
            .into_iter()
            .find(|s| s.name == name)
            .expect("the snapshot was just named");
        Ok(Taken {
            snapshot,
            pause: std::time::Duration::ZERO,
        })
    }

    pub(super) async fn history_rollback(&self, h: &Arc<History>, point: Point) -> Result<()> {
        let h = Arc::clone(h);
        blocking(move || h.rollback(point)).await?;
        tracing::info!(volume = %self.path.display(), seq = point.seq, "rolled back");
        Ok(())
    }

    /// Names `point` of a volume with history as the snapshot `name`.
    pub async fn snapshot_at(&self, name: &str, point: Point) -> Result<Taken> {
        self.check_writable()?;
        let h = self.history().ok_or_else(not_history)?;
        let _op = self.ops.lock().await;
        let (hh, n) = (Arc::clone(h), name.to_owned());
        blocking(move || hh.name_point(&n, point)).await?;
        let snapshot = self
            .history_snapshots(h)
            .into_iter()
            .find(|s| s.name == name)
            .expect("the snapshot was just named");
        Ok(Taken {
            snapshot,
            pause: std::time::Duration::ZERO,
        })
    }

    /// Returns the live disk of a volume with history to `point`. Refused with
    /// `connected` clients unless `force`.
    pub async fn rollback_to(&self, point: Point, force: bool, connected: usize) -> Result<()> {
        self.check_writable()?;
        let h = self.history().ok_or_else(not_history)?;
        let _op = self.ops.lock().await;
        refuse_connected(connected, force)?;
        self.history_rollback(h, point).await
    }

    /// A read-only backend of the disk at `point`, to be served as `export_name`.
    pub fn serve_point(&self, point: Point, export_name: &str) -> Result<SharedBackend> {
        let h = self.history().ok_or_else(not_history)?;
        let backend = serve_point(h, point)?;
        lock(&self.served).insert(export_name.to_owned(), format!("{}", point.seq));
        Ok(backend)
    }

    /// The ranges of the live disk changed since `point`.
    pub async fn dirty_since(&self, point: Point) -> Result<Vec<DirtyRange>> {
        let h = self.history().ok_or_else(not_history)?;
        dirty_since(h, point).await
    }
}

fn not_history() -> Error {
    Error::msg(
        ErrorKind::NotSupported,
        "this volume keeps no history (create it with --history)",
    )
}
