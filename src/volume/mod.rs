//! Volumes: images that can be snapshotted, rolled back and diffed while clients are
//! connected.
//!
//! A [`Volume`] owns a Strata image (the *live* top layer) and serves it through a
//! switchable backend, so that a snapshot can turn the live top into a read-only layer
//! and put a fresh overlay in its place between two requests. Snapshots are files next
//! to the image (`IMAGE@NAME`), linked into its backing chain; see
//! `docs/snapshots.md`.
//!
//! It stands apart from the server: the server exports volumes, and `strata snapshot`
//! works on images nobody serves through the same operations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::info;

use crate::backend::history::HistoryBackend;
use crate::backend::{ImageBackend, SharedBackend, Switchable};
use crate::block::DirtyExtent;
use crate::error::{Error, ErrorKind, Result};
use crate::history::History;
use crate::image::{self, Chain, snapshot};

mod history;

/// A snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Its name, unique within the volume.
    pub name: String,
    /// When it was taken, in seconds since the Unix epoch.
    pub created: u64,
    /// Its image file.
    pub path: PathBuf,
    /// Bytes of data it holds itself: what changed between the snapshot before it and
    /// this one.
    pub allocated: u64,
    /// The read-only export serving it, if any.
    pub exported_as: Option<String>,
}

/// The outcome of taking a snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct Taken {
    /// The new snapshot.
    pub snapshot: SnapshotInfo,
    /// How long requests were held back while the live layer was switched.
    #[serde(serialize_with = "as_micros", rename = "pause_us")]
    pub pause: Duration,
}

fn as_micros<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// How a rollback treats what it would discard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollbackOptions {
    /// Roll back even though clients are connected (they see the disk change under them).
    pub force: bool,
    /// Delete the snapshots newer than the target, which a rollback otherwise refuses
    /// to lose.
    pub destroy_newer: bool,
}

/// A stretch of the disk written since a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DirtyRange {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes (whole clusters, except at the end of the disk).
    pub length: u64,
}

/// What is behind a volume.
enum Kind {
    /// A Strata image: snapshots are files of its chain.
    Image(Arc<Switchable<ImageBackend>>),
    /// A volume with history: snapshots are named restore points.
    History(HistoryBackend),
}

/// A Strata image, or a volume with history, served with snapshots. See the [module
/// documentation](self).
pub struct Volume {
    path: PathBuf,
    read_only: bool,
    kind: Kind,
    backend: SharedBackend,
    /// Serialises snapshot operations.
    ops: tokio::sync::Mutex<()>,
    /// Exports serving a snapshot: export name -> snapshot name.
    served: Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// How long a pause waits for replies still queued for slow clients to leave, before
/// a chain that reuses their space may replace the one they point into.
const REPLY_DRAIN: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs blocking storage work off the network threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(Error::msg(ErrorKind::Io, "snapshot task failed").with_source(e)),
    }
}

impl Volume {
    /// Opens the Strata image at `path` for serving (finishing or undoing any snapshot
    /// operation a crash interrupted first), read-write unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<Arc<Volume>> {
        if crate::history::is_volume(path) {
            return history::open(path, read_only);
        }
        if !read_only {
            if let Some((live, _)) = snapshot::owner_of(path) {
                return Err(Error::msg(
                    ErrorKind::ReadOnly,
                    format!(
                        "this is a snapshot of {}: writing it would change what that disk \
                         reads; serve it read-only",
                        live.display()
                    ),
                )
                .with_path(path));
            }
            snapshot::recover(path)?;
        }
        let backend = ImageBackend::new(image::open(path, !read_only)?);
        let switch = Arc::new(Switchable::new(backend));
        let shared: SharedBackend = switch.clone();
        Ok(Arc::new(Volume {
            path: path.to_path_buf(),
            read_only,
            kind: Kind::Image(switch),
            backend: shared,
            ops: tokio::sync::Mutex::new(()),
            served: Mutex::new(BTreeMap::new()),
        }))
    }

    /// The live image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backend clients of the live export use; it stays the same object across
    /// snapshots and rollbacks.
    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// The image's switch, or an error naming what a volume with history does instead.
    fn switch(&self) -> &Arc<Switchable<ImageBackend>> {
        match &self.kind {
            Kind::Image(s) => s,
            Kind::History(_) => {
                unreachable!("image operations are not called on a volume with history")
            }
        }
    }

    fn chain(&self) -> Arc<Chain> {
        Arc::clone(self.switch().current().chain())
    }

    /// The volume with history behind this volume, if it is one.
    pub fn history(&self) -> Option<&Arc<History>> {
        match &self.kind {
            Kind::History(h) => Some(h.history()),
            Kind::Image(_) => None,
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::msg(
                ErrorKind::ReadOnly,
                "the image is served read-only: snapshots need a writable image",
            ))
        } else {
            Ok(())
        }
    }

    fn info(&self, s: &snapshot::Snapshot) -> SnapshotInfo {
        let exported_as = lock(&self.served)
            .iter()
            .find(|(_, snap)| **snap == s.name)
            .map(|(export, _)| export.clone());
        SnapshotInfo {
            name: s.name.clone(),
            created: s.created,
            path: s.path.clone(),
            allocated: s.allocated,
            exported_as,
        }
    }

    /// The volume's snapshots, newest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        if let Some(h) = self.history() {
            return Ok(self.history_snapshots(h));
        }
        let chain = self.chain();
        Ok(snapshot::in_chain(&chain)
            .iter()
            .rev()
            .map(|s| self.info(s))
            .collect())
    }

    /// Takes a snapshot named `name` of the live disk: every write acknowledged before
    /// the call is in it, every write started after it returns is not.
    ///
    /// Fails with [`ErrorKind::InvalidInput`] for a bad name, [`ErrorKind::AlreadyExists`]
    /// when the name is taken, [`ErrorKind::ReadOnly`] for a read-only volume.
    pub async fn snapshot(&self, name: &str) -> Result<Taken> {
        self.check_writable()?;
        let _op = self.ops.lock().await;
        if let Some(h) = self.history() {
            return self.history_snapshot(h, name).await;
        }
        let chain = self.chain();
        let prepared = {
            let (live, name, chain) = (self.path.clone(), name.to_owned(), Arc::clone(&chain));
            blocking(move || snapshot::prepare(&live, &name, &chain)).await?
        };
        let start = Instant::now();
        let mut paused = self.switch().pause().await;
        let new = {
            let chain = Arc::clone(&chain);
            blocking(move || snapshot::switch(prepared, &chain)).await?
        };
        paused.replace(ImageBackend::new(new));
        drop(paused);
        let pause = start.elapsed();
        {
            // Durable before the answer (clients' flushes would wait for this too).
            let (live, name, new) = (self.path.clone(), name.to_owned(), self.chain());
            blocking(move || {
                new.settle()?;
                snapshot::record_taken(&live, &name);
                Ok(())
            })
            .await?;
        }
        info!(volume = %self.path.display(), snapshot = name, pause_us = pause.as_micros() as u64, "snapshot taken");
        let taken = snapshot::find(&self.chain(), name)?;
        Ok(Taken {
            snapshot: self.info(&taken),
            pause,
        })
    }

    fn refuse_served(&self, names: &[&str]) -> Result<()> {
        let served = lock(&self.served);
        if let Some((export, snap)) = served.iter().find(|(_, s)| names.contains(&s.as_str())) {
            return Err(Error::msg(
                ErrorKind::Busy,
                format!(
                    "snapshot {snap:?} is served as export {export:?}; remove that export first"
                ),
            ));
        }
        Ok(())
    }

    /// Waits, while paused, until no reply points into the files of `chain` any more.
    async fn drain_replies(chain: &Chain) -> Result<()> {
        let deadline = Instant::now() + REPLY_DRAIN;
        while chain.replies_pinned() {
            if Instant::now() >= deadline {
                return Err(Error::msg(
                    ErrorKind::Busy,
                    "a client is slow to take its replies; try again",
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Deletes snapshot `name`, merging the clusters it holds into the layer above it,
    /// so the live disk and every other snapshot read as before. Returns the bytes
    /// copied. Fails with [`ErrorKind::NotFound`], or [`ErrorKind::Busy`] while the
    /// snapshot is served as an export.
    pub async fn delete_snapshot(&self, name: &str) -> Result<u64> {
        self.check_writable()?;
        let _op = self.ops.lock().await;
        self.refuse_served(&[name])?;
        if let Some(h) = self.history() {
            let (h, name) = (Arc::clone(h), name.to_owned());
            blocking(move || h.delete_snapshot(&name)).await?;
            return Ok(0);
        }
        let chain = self.chain();
        let snap = snapshot::find(&chain, name)?;
        let below_live = snap.layer + 1 == usize::from(chain.top_index());
        let copied = {
            let (live, chain, snap) = (self.path.clone(), Arc::clone(&chain), snap.clone());
            blocking(move || {
                snapshot::begin_delete(&live, &snap)?;
                if below_live {
                    let owner = u16::try_from(snap.layer).expect("layer index fits");
                    let copied = chain.absorb(owner)?;
                    chain.flush()?;
                    Ok(copied)
                } else {
                    snapshot::merge_into_snapshot(&chain, &snap)
                }
            })
            .await?
        };
        let mut paused = self.switch().pause().await;
        Self::drain_replies(&chain).await?;
        let new = {
            let (chain, snap) = (Arc::clone(&chain), snap.clone());
            blocking(move || {
                chain.flush()?;
                if below_live {
                    snapshot::bypass_below_live(&chain, &snap)?;
                } else {
                    // Chains opened above the merged layer embed the deleted one.
                    for layer in &chain.layers()[snap.layer + 1..usize::from(chain.top_index())] {
                        image::forget_shared(&layer.path);
                    }
                }
                snapshot::reopen(&chain)
            })
            .await?
        };
        paused.replace(ImageBackend::new(new));
        drop(paused);
        drop(chain);
        {
            let (live, name) = (self.path.clone(), name.to_owned());
            blocking(move || snapshot::finish_delete(&live, &name)).await?;
        }
        info!(volume = %self.path.display(), snapshot = name, copied, "snapshot deleted");
        Ok(copied)
    }

    /// Returns the live disk to snapshot `name`'s contents. With `connected` clients
    /// it fails with [`ErrorKind::Busy`] unless `options.force`; when newer snapshots
    /// exist it fails with [`ErrorKind::Busy`] unless `options.destroy_newer`.
    pub async fn rollback(
        &self,
        name: &str,
        options: RollbackOptions,
        connected: usize,
    ) -> Result<()> {
        self.check_writable()?;
        let _op = self.ops.lock().await;
        if let Some(h) = self.history() {
            refuse_connected(connected, options.force)?;
            let point = history::pinned(h, name)?;
            return self.history_rollback(h, point).await;
        }
        let chain = self.chain();
        let snap = snapshot::find(&chain, name)?;
        refuse_connected(connected, options.force)?;
        let newer: Vec<String> = snapshot::in_chain(&chain)
            .into_iter()
            .filter(|s| s.layer > snap.layer)
            .map(|s| s.name)
            .collect();
        if !newer.is_empty() && !options.destroy_newer {
            return Err(Error::msg(
                ErrorKind::Busy,
                format!(
                    "newer snapshots exist ({}): a rollback to {name:?} deletes them; \
                     allow that explicitly",
                    newer.join(", ")
                ),
            ));
        }
        let refs: Vec<&str> = newer.iter().map(String::as_str).collect();
        self.refuse_served(&refs)?;
        let rollback = {
            let (live, chain, snap) = (self.path.clone(), Arc::clone(&chain), snap.clone());
            blocking(move || snapshot::prepare_rollback(&live, &chain, &snap, newer)).await?
        };
        let rollback = Arc::new(rollback);
        let mut paused = self.switch().pause().await;
        let switched = {
            let rollback = Arc::clone(&rollback);
            blocking(move || snapshot::switch_rollback(&rollback)).await
        };
        let rollback = Arc::into_inner(rollback).expect("the switch task has finished");
        match switched {
            Ok(new) => {
                paused.replace(ImageBackend::new(new));
            }
            Err(e) => {
                drop(paused);
                rollback.abandon();
                return Err(e);
            }
        }
        drop(paused);
        drop(chain);
        blocking(move || rollback.finish()).await?;
        info!(volume = %self.path.display(), snapshot = name, "rolled back");
        Ok(())
    }

    /// The ranges of the live disk written since snapshot `since`.
    pub async fn dirty(&self, since: &str) -> Result<Vec<DirtyRange>> {
        if let Some(h) = self.history() {
            let point = history::pinned(h, since)?;
            return history::dirty_since(h, point).await;
        }
        let chain = self.chain();
        let snap = snapshot::find(&chain, since)?;
        blocking(move || dirty_ranges(&chain, snap.layer)).await
    }

    /// Opens snapshot `name` read-only, to be served as the export `export_name`;
    /// the snapshot cannot be deleted until [`Volume::unserve`] is called for it.
    pub fn serve_snapshot(&self, name: &str, export_name: &str) -> Result<SharedBackend> {
        if let Some(h) = self.history() {
            let backend = history::serve_point(h, history::pinned(h, name)?)?;
            lock(&self.served).insert(export_name.to_owned(), name.to_owned());
            return Ok(backend);
        }
        let snap = snapshot::find(&self.chain(), name)?;
        let backend = ImageBackend::new(image::open(&snap.path, false)?);
        lock(&self.served).insert(export_name.to_owned(), name.to_owned());
        Ok(Arc::new(backend))
    }

    /// Forgets that the export `export_name` serves a snapshot (it was removed).
    pub fn unserve(&self, export_name: &str) {
        lock(&self.served).remove(export_name);
    }
}

/// Refuses a rollback under `connected` clients unless forced: their disk would change
/// under them.
fn refuse_connected(connected: usize, force: bool) -> Result<()> {
    if connected > 0 && !force {
        return Err(Error::msg(
            ErrorKind::Busy,
            format!(
                "{connected} client(s) connected: the disk would change under them; \
                 disconnect them or force the rollback"
            ),
        ));
    }
    Ok(())
}

/// The ranges of `chain` written since the snapshot at layer `layer`.
pub fn dirty_ranges(chain: &Chain, layer: usize) -> Result<Vec<DirtyRange>> {
    let mut out = Vec::new();
    let mut offset = 0;
    for DirtyExtent { length, dirty } in snapshot::changed_since(chain, layer, 0, chain.size())? {
        if dirty {
            out.push(DirtyRange { offset, length });
        }
        offset += length;
    }
    Ok(out)
}
