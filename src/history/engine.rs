//! The engine of a volume with history: opening (checkpoint, then replay), the shared
//! state, and checkpoints. The data path is in [`super::io`], restore points and
//! retention in [`super::retention`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tracing::{info, warn};

use crate::error::{Error, ErrorKind, Result};
use crate::image::storage::{FileStorage, Storage};
use crate::image::{self, Chain, CreateOptions};

use super::checkpoint::{Checkpoint, checkpoint_name, checkpoint_seq};
use super::files::{DirFiles, Files};
use super::index::{BLOCK, Index, Version};
use super::log::Log;
use super::manifest::{FORMAT, MANIFEST, Manifest};
use super::point::{Point, PointKind};
use super::ranges::RangeLocks;
use super::record::{Kind, Record};
use super::replay::{Position, Replay, replay};

/// The base image's file name in the volume directory.
pub const BASE: &str = "base.strata";
/// The lock file's name.
const LOCK: &str = "lock";
/// Segments are sealed at this size unless told otherwise.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// A checkpoint is written after this many bytes of log, or this many records.
const CHECKPOINT_BYTES: u64 = 256 << 20;
const CHECKPOINT_RECORDS: u64 = 200_000;

/// How to make a volume.
#[derive(Debug, Clone)]
pub struct CreateHistory {
    /// The disk's size; defaults to the base's.
    pub size: Option<u64>,
    /// A raw file or Strata image whose bytes the volume starts from (never written).
    pub base: Option<PathBuf>,
    /// How long restore points are kept.
    pub window: Duration,
    /// The most bytes the history may take.
    pub max_bytes: Option<u64>,
    /// Segment size.
    pub segment_bytes: u64,
}

/// What the last open found in the log.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// The checkpoint the open started from, by its `seq`.
    pub checkpoint: Option<u64>,
    /// Records replayed after it.
    pub records: u64,
    /// Bytes of a torn tail cut off.
    pub cut_bytes: u64,
    /// Segments after the tear (removed by a writable open).
    pub cut_segments: usize,
    /// Checkpoints that did not check out and were passed over.
    pub bad_checkpoints: usize,
}

/// A volume with history. See the [module documentation](super).
#[derive(Debug)]
pub struct History {
    pub(super) path: Option<PathBuf>,
    pub(super) files: Arc<dyn Files>,
    pub(super) manifest: Mutex<Manifest>,
    pub(super) id: [u8; 16],
    pub(super) size: u64,
    pub(super) log: Log,
    pub(super) index: RwLock<Index>,
    /// Points applied, oldest first; those past the durable mark are not shown yet.
    pub(super) points: Mutex<Vec<Point>>,
    /// The highest `seq` of a point record appended so far.
    pub(super) latest_mark: AtomicU64,
    /// The highest `seq` of a record that changed the disk (a write, zeroing or
    /// rollback; not a relocation): a flush makes a point only if it is newer than the
    /// latest point.
    pub(super) latest_change: AtomicU64,
    /// Points held by readers (views being served, operations in progress): `seq` → count.
    pub(super) pins: Mutex<BTreeMap<u64, usize>>,
    /// Live bytes of block versions, by segment.
    pub(super) usage: Mutex<BTreeMap<u32, u64>>,
    pub(super) base: Chain,
    /// Shared by requests, taken alone to cut a checkpoint, roll back or remove segments.
    pub(super) gate: RwLock<()>,
    pub(super) ranges: RangeLocks,
    pub(super) read_only: bool,
    pub(super) recovery: Recovery,
    pub(super) checkpointed: Mutex<Position>,
    pub(super) dropped_for_space: AtomicU64,
    /// Bytes copied by the reclaimer since the volume was opened.
    pub(super) reclaimed_bytes: AtomicU64,
    _lock: Option<Arc<dyn Storage>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

/// Whether `path` is the directory of a volume with history.
pub fn is_volume(path: &Path) -> bool {
    path.is_dir() && path.join(MANIFEST).is_file()
}

fn lock_dir(dir: &Path, writable: bool) -> Result<Arc<dyn Storage>> {
    let path = dir.join(LOCK);
    if !path.exists() {
        std::fs::write(&path, b"")
            .map_err(|e| Error::from(e).with_op("create").with_path(&path))?;
    }
    let storage = FileStorage::open(&path, writable).map_err(|e| {
        if e.kind() == ErrorKind::Busy {
            Error::msg(
                ErrorKind::Busy,
                "in use: another process has this volume open",
            )
            .with_path(dir)
        } else {
            e
        }
    })?;
    Ok(Arc::new(storage))
}

impl History {
    /// Makes a volume in the directory `dir`, which must not exist.
    pub fn create(dir: &Path, options: &CreateHistory) -> Result<Manifest> {
        Self::create_filled(dir, options, |_| Ok(()))
    }

    /// Makes a volume in `dir` as [`History::create`] does, letting `fill` write the
    /// disk it starts with into its base image (given by path) before the volume
    /// appears under its name: a crash while filling leaves no volume behind.
    pub(super) fn create_filled(
        dir: &Path,
        options: &CreateHistory,
        fill: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Manifest> {
        if dir.exists() {
            return Err(Error::msg(ErrorKind::AlreadyExists, "already exists").with_path(dir));
        }
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let staging = parent.join(format!(
            ".{}.new",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("volume")
        ));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging)
            .map_err(|e| Error::from(e).with_op("create").with_path(&staging))?;
        let made = (|| {
            // The base is an empty image over the given base, inside the directory: the
            // image engine then resolves, checks and reads the base, as for any overlay.
            let base_opts = CreateOptions {
                size: options.size,
                cluster_size: None,
                backing: options.base.clone(),
            };
            let header = image::create(&staging.join(BASE), &base_opts)?;
            fill(&staging.join(BASE))?;
            let manifest = Manifest {
                format: FORMAT,
                id: image::format_id(&image::random_id()?),
                size: header.virtual_size,
                created_us: crate::time::now_us(),
                window_secs: options.window.as_secs(),
                max_bytes: options.max_bytes,
                segment_bytes: options.segment_bytes,
                snapshots: Vec::new(),
            };
            let files = DirFiles::new(&staging)?;
            manifest.store(&files)?;
            Ok(manifest)
        })();
        let manifest = match made {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        std::fs::rename(&staging, dir)
            .map_err(|e| Error::from(e).with_op("create").with_path(dir))?;
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::from(e).with_op("sync").with_path(parent))?;
        // The base was made with a backing reference relative to the staging directory,
        // which is the final one's sibling under the same parent: it still resolves.
        Ok(manifest)
    }

    /// Opens the volume in `dir`, read-write unless `read_only`.
    pub fn open(dir: &Path, read_only: bool) -> Result<History> {
        Self::open_dir(dir, read_only, true)
    }

    /// Opens the volume in `dir` read-only without taking its lock, to look at a volume
    /// a server may be writing: what it shows is the log as far as it was written.
    pub fn inspect(dir: &Path) -> Result<History> {
        Self::open_dir(dir, true, false)
    }

    fn open_dir(dir: &Path, read_only: bool, locked: bool) -> Result<History> {
        if !is_volume(dir) {
            return Err(Error::msg(
                ErrorKind::NotFound,
                "not a volume with history (no manifest.json)",
            )
            .with_path(dir));
        }
        let lock = if locked {
            Some(lock_dir(dir, !read_only)?)
        } else {
            None
        };
        let files: Arc<dyn Files> = Arc::new(DirFiles::new(dir)?);
        let base = image::open(&dir.join(BASE), false)?;
        let mut h = History::open_files(files, base, read_only).map_err(|e| e.with_path(dir))?;
        h.path = Some(dir.to_path_buf());
        h._lock = lock;
        Ok(h)
    }

    /// Opens a volume kept in `files`, over the base chain `base`.
    pub fn open_files(files: Arc<dyn Files>, base: Chain, read_only: bool) -> Result<History> {
        let manifest = Manifest::load(&*files)?;
        let id = manifest.id_bytes()?;
        if base.size() != manifest.size {
            return Err(Error::msg(
                ErrorKind::Corrupt,
                format!(
                    "the base is {} bytes, the volume {}",
                    base.size(),
                    manifest.size
                ),
            ));
        }
        let blocks = manifest.size.div_ceil(BLOCK);
        let mut recovery = Recovery::default();
        let mut names: Vec<(u64, String)> = files
            .list()?
            .into_iter()
            .filter_map(|n| checkpoint_seq(&n).map(|s| (s, n)))
            .collect();
        names.sort();
        let mut start = None;
        for (seq, name) in names.iter().rev() {
            match load_checkpoint(&*files, name, id) {
                Ok(c) => {
                    recovery.checkpoint = Some(*seq);
                    start = Some(c);
                    break;
                }
                Err(e) => {
                    warn!("passing over checkpoint {name}: {e}");
                    recovery.bad_checkpoints += 1;
                }
            }
        }
        let Checkpoint {
            position,
            mut index,
            mut points,
            mut latest_change,
        } = start.unwrap_or_else(|| Checkpoint {
            position: Position::START,
            index: Index::new(blocks),
            points: Vec::new(),
            latest_change: 0,
        });
        if index.blocks() != blocks {
            return Err(Error::msg(
                ErrorKind::Corrupt,
                "the checkpoint's disk size differs from the manifest's",
            ));
        }
        let mut latest_mark = points.last().map_or(0, |p| p.seq);
        let replayed = replay(&*files, id, position, !read_only, |r| {
            if r.record.changes_disk() {
                latest_change = r.record.seq;
            }
            apply_replayed(&mut index, &mut points, &mut latest_mark, &r)
        })?;
        recovery.records = replayed.records;
        recovery.cut_bytes = replayed.cut_bytes;
        recovery.cut_segments = replayed.cut_segments.len();
        if replayed.cut_bytes > 0 {
            info!(
                "cut {} bytes of a torn log tail ({} later segments)",
                replayed.cut_bytes,
                replayed.cut_segments.len()
            );
        }
        let log = Log::new(
            Arc::clone(&files),
            id,
            manifest.segment_bytes,
            replayed.tail,
            replayed.segments,
        );
        let mut usage = BTreeMap::new();
        for (_, v) in index.versions() {
            if let Some(s) = v.loc.segment() {
                *usage.entry(s).or_insert(0) += BLOCK;
            }
        }
        Ok(History {
            path: None,
            files,
            manifest: Mutex::new(manifest.clone()),
            id,
            size: manifest.size,
            log,
            index: RwLock::new(index),
            points: Mutex::new(points),
            latest_mark: AtomicU64::new(latest_mark),
            latest_change: AtomicU64::new(latest_change),
            pins: Mutex::new(BTreeMap::new()),
            usage: Mutex::new(usage),
            base,
            gate: RwLock::new(()),
            ranges: RangeLocks::default(),
            read_only,
            recovery,
            checkpointed: Mutex::new(position),
            dropped_for_space: AtomicU64::new(0),
            reclaimed_bytes: AtomicU64::new(0),
            _lock: None,
        })
    }

    /// The volume's directory (`None` for one kept in simulated files).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// What the open found.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The manifest as it stands.
    pub fn manifest(&self) -> Manifest {
        lock(&self.manifest).clone()
    }

    /// Whether the volume's files and base live in memory (no request waits for a
    /// device).
    pub fn in_memory(&self) -> bool {
        self.files.in_memory() && self.base.in_memory()
    }

    /// The base chain.
    pub fn base(&self) -> &Chain {
        &self.base
    }

    /// Bytes of log on disk, by segment number.
    pub fn segment_bytes(&self) -> Vec<(u32, u64)> {
        self.log
            .segments()
            .into_iter()
            .filter_map(|n| Some((n, self.log.storage(n)?.len().ok()?)))
            .collect()
    }

    /// Writes a checkpoint if enough log was written since the last one that an open
    /// would take long to replay it.
    pub fn maybe_checkpoint(&self) -> Result<()> {
        let since = *lock(&self.checkpointed);
        let (_, tail) = self.log.position();
        let records = tail.next_seq - since.next_seq;
        let bytes: u64 = self
            .segment_bytes()
            .iter()
            .filter(|(n, _)| *n >= since.segment)
            .map(|&(n, len)| {
                if n == since.segment {
                    len.saturating_sub(since.offset)
                } else {
                    len
                }
            })
            .sum();
        if records >= CHECKPOINT_RECORDS || bytes >= CHECKPOINT_BYTES {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Writes a checkpoint of the index and points as they stand, so that the next open
    /// replays only what comes after. Older checkpoints are removed once it is durable.
    pub fn checkpoint(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let (checkpoint, cut, position) = {
            let _gate = write(&self.gate);
            let (active, tail) = self.log.position();
            let position = match active {
                Some((segment, offset)) => Position {
                    segment,
                    offset,
                    next_seq: tail.next_seq,
                },
                None => Position {
                    segment: tail.last_number + 1,
                    offset: super::record::HEADER_LEN as u64,
                    next_seq: tail.next_seq,
                },
            };
            let index = read(&self.index).clone();
            let points = lock(&self.points).clone();
            let latest_change = self.latest_change.load(Ordering::SeqCst);
            (
                Checkpoint {
                    position,
                    index,
                    points,
                    latest_change,
                },
                tail.next_seq,
                position,
            )
        };
        // Everything the checkpoint describes must be durable before it can be used.
        self.log.sync(cut - 1)?;
        let bytes = checkpoint.encode(self.id);
        let name = checkpoint_name(cut);
        let temporary = format!("{name}.new");
        let _ = self.files.remove(&temporary);
        let storage = self.files.create(&temporary)?;
        storage
            .write_at(&[&bytes], 0)
            .and_then(|()| storage.sync())
            .map_err(|e| Error::from(e).with_op("write checkpoint"))?;
        self.files.rename(&temporary, &name)?;
        self.files.sync_names()?;
        for old in self.files.list()? {
            if checkpoint_seq(&old).is_some_and(|s| s < cut) {
                let _ = self.files.remove(&old);
            }
        }
        *lock(&self.checkpointed) = position;
        Ok(())
    }

    /// Appends a record without payload that changes no block, and applies it.
    pub(super) fn append_mark(&self, make: impl FnOnce(u64) -> Record) -> Result<u64> {
        let now = crate::time::now_us();
        let slot = self.log.append(
            |seq| {
                let r = make(seq);
                if r.is_point() {
                    self.latest_mark.fetch_max(seq, Ordering::SeqCst);
                }
                if r.changes_disk() {
                    self.latest_change.fetch_max(seq, Ordering::SeqCst);
                }
                r
            },
            &[],
            now,
        )?;
        Ok(slot.seq)
    }
}

fn load_checkpoint(files: &dyn Files, name: &str, id: [u8; 16]) -> Result<Checkpoint> {
    let storage = files.open(name, false)?;
    let len = storage
        .len()
        .map_err(|e| Error::from(e).with_op("read checkpoint"))?;
    let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| Error::new(ErrorKind::Overflow))?];
    storage
        .read_at(&mut bytes, 0)
        .map_err(|e| Error::from(e).with_op("read checkpoint"))?;
    Checkpoint::decode(&bytes, id)
}

/// Applies one replayed record to the index and points, as the live engine did.
fn apply_replayed(
    index: &mut Index,
    points: &mut Vec<Point>,
    latest_mark: &mut u64,
    r: &Replay<'_>,
) -> Result<()> {
    let rec = r.record;
    let epoch = index.live_epoch();
    let bad = |why: &str| Error::msg(ErrorKind::Corrupt, format!("record {}: {why}", rec.seq));
    if rec.kind.covers_blocks() {
        let end = rec
            .block
            .checked_add(u64::from(rec.count))
            .ok_or_else(|| bad("range overflows"))?;
        if end > index.blocks() {
            return Err(bad("past the end of the disk"));
        }
    }
    if rec.is_point() {
        *latest_mark = rec.seq;
    }
    let keep_from = *latest_mark;
    match rec.kind {
        Kind::Write | Kind::Zero | Kind::Trim => {
            for i in 0..u64::from(rec.count) {
                let loc = rec.block_loc(i, r.segment, r.payload_offset);
                index.set(rec.block + i, Version { seq: rec.seq, loc }, |s| {
                    keep_from >= s
                });
            }
            if rec.point {
                points.push(Point {
                    seq: rec.seq,
                    time_us: rec.time_us,
                    kind: PointKind::Fua,
                    epoch,
                });
            }
        }
        Kind::Relocate => {
            for i in 0..u64::from(rec.count) {
                index.relocate(
                    rec.block + i,
                    rec.aux,
                    rec.block_loc(i, r.segment, r.payload_offset),
                );
            }
        }
        Kind::Flush => points.push(Point {
            seq: rec.seq,
            time_us: rec.time_us,
            kind: PointKind::Flush,
            epoch,
        }),
        Kind::Rollback => {
            let target = (rec.aux2, rec.aux);
            if rec.aux2 as usize >= index.epochs().len() || rec.aux >= rec.seq {
                return Err(bad("rollback to a point that does not exist"));
            }
            index.rollback(rec.seq, target.0, target.1);
        }
        Kind::Void => {}
    }
    Ok(())
}

impl Drop for History {
    /// A clean close leaves a checkpoint, so that the next open replays nothing.
    fn drop(&mut self) {
        if !self.read_only && !self.log.failed() {
            if let Err(e) = self.checkpoint() {
                warn!("checkpoint at close: {e}");
            }
            self.log.seal_active();
        }
    }
}
