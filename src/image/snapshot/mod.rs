//! Snapshots of a live image, as files linked into its backing chain.
//!
//! The snapshots of the image `DIR/disk.strata` are Strata images next to it,
//! `DIR/disk.strata@NAME`, and form the live image's backing chain, newest on top:
//!
//! ```text
//!   disk.strata  ──>  disk.strata@tuesday  ──>  disk.strata@monday  ──>  base
//!   (live, rw)        (read-only: what changed from Monday to Tuesday)
//! ```
//!
//! They share the live image's directory because backing references are relative to
//! the directory of the image that holds them: a file that becomes a snapshot keeps its
//! references, and they keep their meaning.
//!
//! Taking a snapshot turns the live top into the newest snapshot: the file gains a
//! second name, and a new, empty overlay takes the live name. The chain itself is the
//! record of which snapshots exist and in what order; a small manifest
//! (`disk.strata.snapshots.json`) adds creation times and the intent of a deletion or
//! rollback in progress, so that [`recover`] can finish or undo it after a crash.
//!
//! Every operation is ordered so that a crash at any point leaves either the old chain or
//! the new one (`docs/snapshots.md` walks through each step):
//!
//! - **take**: the new overlay is written under a temporary name; then the live file is
//!   linked to the snapshot name (a crash here leaves the snapshot name and the live
//!   name on one file, which [`recover`] unlinks); then the overlay is renamed over the
//!   live name, atomically.
//! - **delete**: the snapshot's clusters are copied into the layer above it, which then
//!   reads the same without it; that layer's header is pointed past it; only then is
//!   the snapshot's file removed.
//! - **rollback**: a new overlay of the target is renamed over the live name; newer
//!   snapshots are removed afterwards.
//!
//! Changes since a snapshot need no bitmap of their own: a cluster changed after
//! snapshot S exactly when a layer above S holds it, which the merged map already
//! knows ([`changed_since`]).

mod manifest;
mod recover;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::warn;

use super::chain::{Chain, Lower, store_header};
use super::format::{Backing, BackingKind, Header};
use super::layer;
use super::storage::{FileStorage, Storage};
use crate::block::{DepthExtent, DirtyExtent};
use crate::error::{Error, ErrorKind, Result};
use crate::names::SNAPSHOT;
use manifest::{Entry, Manifest, Pending};
pub use recover::recover;

/// Separates the live image's file name from the snapshot's name: `disk.strata@monday`.
pub const SEP: char = '@';
/// Overlays being prepared are hidden files with this suffix, which [`recover`] removes.
const TMP_SUFFIX: &str = ".new";
const MANIFEST_SUFFIX: &str = ".snapshots.json";

/// The directory of the image at `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// The file of snapshot `name` of the live image at `live`.
pub fn file_of(live: &Path, name: &str) -> PathBuf {
    live.with_file_name(format!("{}{SEP}{name}", file_name(live)))
}

fn tmp_of(live: &Path, name: &str) -> PathBuf {
    live.with_file_name(format!(".{}{SEP}{name}{TMP_SUFFIX}", file_name(live)))
}

/// The manifest of the live image at `live`.
pub fn manifest_of(live: &Path) -> PathBuf {
    live.with_file_name(format!("{}{MANIFEST_SUFFIX}", file_name(live)))
}

/// The live image and the snapshot name of the file at `path`, if it is a snapshot:
/// `LIVE@NAME` next to an existing `LIVE`.
pub fn owner_of(path: &Path) -> Option<(PathBuf, String)> {
    let name = file_name(path);
    let (live, snap) = name.rsplit_once(SEP)?;
    let live = path.with_file_name(live);
    (SNAPSHOT.accepts(snap) && live.is_file()).then(|| (live, snap.to_owned()))
}

/// A snapshot found in a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its name.
    pub name: String,
    /// Its index in [`Chain::layers`] (0 is the bottom).
    pub layer: usize,
    /// Its file.
    pub path: PathBuf,
    /// When it was taken, in seconds since the Unix epoch.
    pub created: u64,
    /// Bytes of data clusters it holds itself.
    pub allocated: u64,
}

/// The live image of a chain: its top, or the image its top is a snapshot of.
fn live_of_chain(chain: &Chain) -> PathBuf {
    let top = chain.path();
    owner_of(top).map_or_else(|| top.to_path_buf(), |(live, _)| live)
}

/// The snapshots among the layers of `chain` below its top, oldest first.
pub fn in_chain(chain: &Chain) -> Vec<Snapshot> {
    let live = live_of_chain(chain);
    let Ok(dir) = std::fs::canonicalize(parent_dir(&live)) else {
        return Vec::new();
    };
    let prefix = format!("{}{SEP}", file_name(&live));
    let manifest = Manifest::load(&live);
    let layers = chain.layers();
    let mut out = Vec::new();
    for (i, layer) in layers[..layers.len() - 1].iter().enumerate() {
        let file = file_name(&layer.path);
        let Some(name) = file.strip_prefix(&prefix).filter(|n| SNAPSHOT.accepts(n)) else {
            continue;
        };
        if std::fs::canonicalize(parent_dir(&layer.path)).ok().as_ref() != Some(&dir) {
            continue;
        }
        let allocated = match &layer.kind {
            super::chain::LayerKind::Strata { header } => {
                chain.clusters_of(i).map_or(0, |c| c.0) * header.cluster_size()
            }
            super::chain::LayerKind::Raw { .. } => continue,
        };
        let created = manifest
            .snapshots
            .get(name)
            .map(|e| e.created)
            .or_else(|| modified(&layer.path))
            .unwrap_or(0);
        out.push(Snapshot {
            name: name.to_owned(),
            layer: i,
            path: layer.path.clone(),
            created,
            allocated,
        });
    }
    out
}

fn modified(path: &Path) -> Option<u64> {
    let m = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(m.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Finds snapshot `name` in `chain`.
pub fn find(chain: &Chain, name: &str) -> Result<Snapshot> {
    SNAPSHOT.check(name)?;
    in_chain(chain)
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| Error::msg(ErrorKind::NotFound, format!("no snapshot named {name:?}")))
}

/// Which parts of `[offset, offset + len)` were written after the snapshot at layer
/// `layer` of `chain`: exactly those some layer above it holds. Returns contiguous
/// runs covering the range.
pub fn changed_since(
    chain: &Chain,
    layer: usize,
    offset: u64,
    len: u64,
) -> Result<Vec<DirtyExtent>> {
    // Depth 1 is the top; the layers above `layer` have depths 1 ..= top - layer.
    let above = u32::from(chain.top_index()) - layer as u32;
    let mut out: Vec<DirtyExtent> = Vec::new();
    for DepthExtent { length, depth } in chain.allocation_depth(offset, len)? {
        let dirty = depth >= 1 && depth <= above;
        match out.last_mut() {
            Some(last) if last.dirty == dirty => last.length += length,
            _ => out.push(DirtyExtent { length, dirty }),
        }
    }
    Ok(out)
}

/// Makes the directory's entries (creations, renames, removals) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::from(e).with_op("sync directory").with_path(d))
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::from(e).with_op("remove").with_path(path)),
    }
}

/// The steps of snapshot operations at which [`crate::failpoint::hit`] can stop the process, in
/// the order each operation reaches them.
pub const FAILPOINTS: &[&str] = &[
    "snapshot-prepared",
    "snapshot-linked",
    "snapshot-renamed",
    "delete-begun",
    "delete-merged",
    "delete-rebased",
    "delete-removed",
    "rollback-prepared",
    "rollback-renamed",
    "rollback-discarding",
];

/// An empty overlay of the live image at `live`, created under a temporary name with
/// its backing set to `backing` (the file it will refer to once renamed to `live`).
fn new_overlay(
    tmp: &Path,
    backing_path: &Path,
    backing: &Header,
) -> Result<(Arc<dyn Storage>, layer::Scan, Header)> {
    let header = Header {
        sequence: 1,
        virtual_size: backing.virtual_size,
        cluster_bits: backing.cluster_bits,
        incompatible: 0,
        compatible: 0,
        image_id: super::random_id()?,
        backing: Some(Backing {
            kind: BackingKind::Strata,
            // The snapshot sits next to the live image: its bare file name is right
            // wherever the directory is moved.
            path: file_name(backing_path),
            size: backing.virtual_size,
            identity: backing.image_id,
        }),
    };
    remove_file(tmp)?;
    let storage = FileStorage::create(tmp)?;
    super::write_new(&storage, &header).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        Error::from(e).with_op("create").with_path(tmp)
    })?;
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let scan = layer::scan(storage.as_ref(), tmp)?.into_result(tmp)?;
    Ok((storage, scan, header))
}

// --- taking a snapshot ---------------------------------------------------------------

/// A snapshot being taken: its overlay is ready, the switch is yet to happen.
pub struct Prepared {
    live: PathBuf,
    name: String,
    tmp: PathBuf,
    snap: PathBuf,
    storage: Arc<dyn Storage>,
    scan: layer::Scan,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("snap", &self.snap)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// Gives up before the switch: removes the snapshot's name and the prepared overlay.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.snap);
        let _ = std::fs::remove_file(&self.tmp);
    }

    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The snapshot's file.
    pub fn path(&self) -> &Path {
        &self.snap
    }
}

/// First half of taking snapshot `name` of the live image `live` open as `chain`, while
/// clients run: checks the name, writes the new overlay, commits what the live image
/// holds, and gives the live file the snapshot's name too (durably: the new overlay
/// will refer to that name). A crash from here until the switch leaves two names on
/// the live file, which [`recover`] undoes.
pub fn prepare(live: &Path, name: &str, chain: &Chain) -> Result<Prepared> {
    SNAPSHOT.check(name)?;
    if !chain.writable() {
        return Err(Error::msg(
            ErrorKind::ReadOnly,
            "the image is served read-only: a snapshot needs a writable image",
        ));
    }
    let dir = parent_dir(live);
    let snap = file_of(live, name);
    if snap.exists() || in_chain(chain).iter().any(|s| s.name == name) {
        return Err(Error::msg(
            ErrorKind::AlreadyExists,
            format!("a snapshot named {name:?} exists already"),
        ));
    }
    let tmp = tmp_of(live, name);
    let (storage, scan, _) = new_overlay(&tmp, &snap, chain.header())?;
    let prepared = Prepared {
        live: live.to_path_buf(),
        name: name.to_owned(),
        tmp,
        snap,
        storage,
        scan,
    };
    crate::failpoint::hit("snapshot-prepared");
    // Commit now, so that the commit left for after the switch is small.
    let linked = chain
        .flush()
        .and_then(|()| {
            std::fs::hard_link(&prepared.live, &prepared.snap)
                .map_err(|e| Error::from(e).with_op("snapshot").with_path(&prepared.snap))
        })
        .and_then(|()| sync_dir(dir));
    if let Err(e) = linked {
        prepared.abandon();
        return Err(e);
    }
    crate::failpoint::hit("snapshot-linked");
    Ok(prepared)
}

/// Second half, run while no request is in progress: makes the prepared overlay the
/// live image (a rename) over the old live image, frozen in memory as the snapshot, and
/// returns the new live chain. Nothing here waits for a disk: what remains to make the
/// snapshot durable (the old image's last changes, the directory entry) is left to the
/// new chain's [`Chain::settle`], which its first flush runs, and which the caller runs
/// once requests go on. On an error the old chain is untouched and still live.
pub fn switch(prepared: Prepared, chain: &Arc<Chain>) -> Result<Chain> {
    let frozen = match chain.freeze(&prepared.snap) {
        Ok(f) => f,
        Err(e) => {
            prepared.abandon();
            return Err(e);
        }
    };
    if let Err(e) = std::fs::rename(&prepared.tmp, &prepared.live) {
        // The live name still names the old image (a rename is all or nothing).
        let err = Error::from(e).with_op("snapshot").with_path(&prepared.live);
        prepared.abandon();
        return Err(err);
    }
    crate::failpoint::hit("snapshot-renamed");
    if let Err(e) = chain.storage().share_lock() {
        warn!("cannot share the lock of {}: {e}", prepared.snap.display());
    }
    let frozen = Arc::new(frozen);
    super::share(&prepared.snap, &frozen);
    let new = Chain::over(
        prepared.storage,
        &prepared.live,
        prepared.scan,
        frozen,
        true,
    )?;
    let (old, dir) = (Arc::clone(chain), parent_dir(&prepared.live).to_path_buf());
    new.settle_first(Box::new(move || {
        old.flush()?;
        sync_dir(&dir)
    }));
    Ok(new)
}

/// Records when snapshot `name` of `live` was taken (after [`switch`]). A failure
/// only loses the time, which is then read from the file.
pub fn record_taken(live: &Path, name: &str) {
    let mut m = Manifest::load(live);
    m.snapshots
        .insert(name.to_owned(), Entry { created: now() });
    if let Err(e) = m.store(live) {
        warn!("cannot record snapshot {name}: {e}");
    }
}

// --- deleting a snapshot -------------------------------------------------------------

/// What the layer above a deleted snapshot should point at instead: the snapshot's own
/// backing, exactly as its header records it (the layer above is in the same directory,
/// so the same reference means the same file).
fn bypass(chain: &Chain, snap: &Snapshot) -> Result<Option<Backing>> {
    match &chain.layers()[snap.layer].kind {
        super::chain::LayerKind::Strata { header, .. } => Ok(header.backing.clone()),
        super::chain::LayerKind::Raw { .. } => Err(Error::msg(
            ErrorKind::InvalidInput,
            "a raw layer is not a snapshot",
        )),
    }
}

/// Starts deleting snapshot `snap` of `live`: records the intent.
pub fn begin_delete(live: &Path, snap: &Snapshot) -> Result<()> {
    let mut m = Manifest::load(live);
    m.pending = Some(Pending::Delete {
        name: snap.name.clone(),
    });
    m.store(live)?;
    crate::failpoint::hit("delete-begun");
    Ok(())
}

/// Deletes snapshot `snap` whose layer above is another snapshot (not the live image):
/// copies the snapshot's clusters into that layer and points it past the snapshot.
/// The live chain still reads correctly afterwards (the layer above reads the same),
/// but must be reopened to drop the snapshot. Returns the bytes copied.
pub fn merge_into_snapshot(chain: &Chain, snap: &Snapshot) -> Result<u64> {
    let above = &chain.layers()[snap.layer + 1];
    let lower = chain
        .lower_at(snap.layer)
        .ok_or_else(|| Error::msg(ErrorKind::Io, "snapshot chain is not open"))?;
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open_for_merge(&above.path)?);
    let scan = layer::scan(storage.as_ref(), &above.path)?.into_result(&above.path)?;
    let mut target = Chain::over(storage, &above.path, scan, Arc::clone(lower), true)?;
    let copied = target.absorb(u16::try_from(snap.layer).expect("layer index fits"))?;
    target.flush()?;
    crate::failpoint::hit("delete-merged");
    let mut header = target.header().clone();
    header.backing = bypass(chain, snap)?;
    target.rewrite_header(header)?;
    crate::failpoint::hit("delete-rebased");
    super::forget_shared(&above.path);
    Ok(copied)
}

/// Deletes snapshot `snap` right below the live image of `chain`: its clusters must have
/// been copied into the live image ([`Chain::absorb`]) and committed; points the live
/// header past the snapshot. Run while no request is in progress; the chain must be
/// reopened afterwards.
pub fn bypass_below_live(chain: &Chain, snap: &Snapshot) -> Result<()> {
    crate::failpoint::hit("delete-merged");
    let mut header = chain.header().clone();
    header.backing = bypass(chain, snap)?;
    store_header(
        chain.storage().as_ref(),
        chain.path(),
        chain.header(),
        chain.header_slot(),
        header,
    )?;
    crate::failpoint::hit("delete-rebased");
    Ok(())
}

/// Reopens the live image of `chain` from its file, keeping its lock, after the chain
/// changed on disk; layers of the old chain that did not change are shared.
pub fn reopen(chain: &Chain) -> Result<Chain> {
    super::open_storage(Arc::clone(chain.storage()), chain.path(), chain.writable())
}

/// Finishes deleting snapshot `name`: removes its file and its record.
pub fn finish_delete(live: &Path, name: &str) -> Result<()> {
    let dir = parent_dir(live);
    remove_file(&file_of(live, name))?;
    crate::failpoint::hit("delete-removed");
    sync_dir(dir)?;
    let mut m = Manifest::load(live);
    m.snapshots.remove(name);
    m.pending = None;
    m.store(live)
}

// --- rolling back ----------------------------------------------------------------------

/// A rollback being made: the new live overlay is ready.
pub struct Rollback {
    live: PathBuf,
    tmp: PathBuf,
    storage: Arc<dyn Storage>,
    scan: layer::Scan,
    lower: Arc<Lower>,
    discard: Vec<String>,
}

impl std::fmt::Debug for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollback")
            .field("live", &self.live)
            .field("discard", &self.discard)
            .finish_non_exhaustive()
    }
}

impl Rollback {
    /// Snapshots newer than the target, removed by [`Rollback::finish`].
    pub fn discarded(&self) -> &[String] {
        &self.discard
    }
}

/// Prepares rolling the live image of `chain` back to `snap`: writes a new, empty
/// overlay of it and records the intent. `discard` are the snapshots newer than
/// `snap`, which go with the rollback.
pub fn prepare_rollback(
    live: &Path,
    chain: &Chain,
    snap: &Snapshot,
    discard: Vec<String>,
) -> Result<Rollback> {
    let lower = chain
        .lower_at(snap.layer)
        .ok_or_else(|| Error::msg(ErrorKind::Io, "snapshot chain is not open"))?;
    let header = match &lower.top().kind {
        super::chain::LayerKind::Strata { header, .. } => header.clone(),
        super::chain::LayerKind::Raw { .. } => {
            return Err(Error::msg(ErrorKind::InvalidInput, "not a snapshot"));
        }
    };
    let tmp = tmp_of(live, &snap.name);
    let (storage, scan, new_header) = new_overlay(&tmp, &snap.path, &header)?;
    let mut m = Manifest::load(live);
    m.pending = Some(Pending::Rollback {
        to: snap.name.clone(),
        new_id: super::format_id(&new_header.image_id),
        discard: discard.clone(),
    });
    if let Err(e) = m.store(live) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    crate::failpoint::hit("rollback-prepared");
    Ok(Rollback {
        live: live.to_path_buf(),
        tmp,
        storage,
        scan,
        lower: Arc::clone(lower),
        discard,
    })
}

/// Makes the prepared overlay the live image (run while no request is in progress) and
/// returns the new live chain.
pub fn switch_rollback(rollback: &Rollback) -> Result<Chain> {
    std::fs::rename(&rollback.tmp, &rollback.live)
        .map_err(|e| Error::from(e).with_op("rollback").with_path(&rollback.live))?;
    sync_dir(parent_dir(&rollback.live))?;
    crate::failpoint::hit("rollback-renamed");
    let scan = rollback.scan.clone();
    Chain::over(
        Arc::clone(&rollback.storage),
        &rollback.live,
        scan,
        Arc::clone(&rollback.lower),
        true,
    )
}

impl Rollback {
    /// Removes the discarded snapshots and the record of the rollback.
    pub fn finish(self) -> Result<()> {
        finish_discard(&self.live, &self.discard)
    }

    /// Gives up before the switch: removes the prepared overlay and the intent.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);

        let mut m = Manifest::load(&self.live);
        m.pending = None;
        let _ = m.store(&self.live);
    }
}

fn finish_discard(live: &Path, discard: &[String]) -> Result<()> {
    let dir = parent_dir(live);
    for name in discard {
        remove_file(&file_of(live, name))?;
        crate::failpoint::hit("rollback-discarding");
    }
    sync_dir(dir)?;
    let mut m = Manifest::load(live);
    for name in discard {
        m.snapshots.remove(name);
    }
    m.pending = None;
    m.store(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_files_sit_next_to_the_image() {
        assert_eq!(
            file_of(Path::new("/tank/vm1.strata"), "mon"),
            PathBuf::from("/tank/vm1.strata@mon")
        );
        assert_eq!(file_of(Path::new("vm.img"), "a"), PathBuf::from("vm.img@a"));
        assert_eq!(
            manifest_of(Path::new("/t/vm.img")),
            PathBuf::from("/t/vm.img.snapshots.json")
        );
    }
}
