//! Volumes: image exports that can be snapshotted, rolled back and diffed while clients
//! are connected.
//!
//! A [`Volume`] owns a Strata image (the *live* top layer) and serves it through a
//! switchable backend, so that a snapshot can turn the live top into a read-only layer
//! and put a fresh overlay in its place between two requests. Snapshots are files next
//! to the image (`IMAGE.snapshots/NAME.strata`), linked into its backing chain; see
//! `docs/snapshots.md`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::backend::SharedBackend;
use crate::error::{Error, ErrorKind, Result};

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

/// A Strata image served with snapshots. See the [module documentation](self).
pub struct Volume {
    path: PathBuf,
    backend: SharedBackend,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn unavailable() -> Error {
    Error::msg(ErrorKind::NotSupported, "snapshots are not available yet")
}

impl Volume {
    /// Opens the Strata image at `path` for serving (finishing or undoing any snapshot
    /// operation a crash interrupted first), read-write unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<Arc<Volume>> {
        let backend = crate::backend::open_as(
            path.to_str().ok_or_else(|| {
                Error::msg(ErrorKind::InvalidInput, "path is not valid UTF-8").with_path(path)
            })?,
            read_only,
            Some(crate::image::Format::Strata),
        )?;
        Ok(Arc::new(Volume {
            path: path.to_path_buf(),
            backend,
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

    /// The volume's snapshots, newest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Err(unavailable())
    }

    /// Takes a snapshot named `name` of the live disk: every write acknowledged before
    /// the call is in it, every write started after it returns is not.
    ///
    /// Fails with [`ErrorKind::InvalidInput`] for a bad name, [`ErrorKind::AlreadyExists`]
    /// when the name is taken, [`ErrorKind::ReadOnly`] for a read-only volume.
    pub async fn snapshot(&self, name: &str) -> Result<Taken> {
        let _ = name;
        Err(unavailable())
    }

    /// Deletes snapshot `name`, merging the clusters it holds into the layer above it,
    /// so the live disk and every other snapshot read as before. Returns the bytes
    /// copied. Fails with [`ErrorKind::NotFound`], or [`ErrorKind::Busy`] while the
    /// snapshot is served as an export.
    pub async fn delete_snapshot(&self, name: &str) -> Result<u64> {
        let _ = name;
        Err(unavailable())
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
        let _ = (name, options, connected);
        Err(unavailable())
    }

    /// The ranges of the live disk written since snapshot `since`.
    pub async fn dirty(&self, since: &str) -> Result<Vec<DirtyRange>> {
        let _ = since;
        Err(unavailable())
    }

    /// Opens snapshot `name` read-only, to be served as the export `export_name`;
    /// the snapshot cannot be deleted until [`Volume::unserve`] is called for it.
    pub fn serve_snapshot(&self, name: &str, export_name: &str) -> Result<SharedBackend> {
        let _ = (name, export_name);
        Err(unavailable())
    }

    /// Forgets that the export `export_name` serves a snapshot (it was removed).
    pub fn unserve(&self, export_name: &str) {
        let _ = export_name;
    }
}

/// Is `name` acceptable as a snapshot or export name: 1 to 64 characters of ASCII
/// letters, digits, `.`, `_`, `-` and `@`, not starting with `.` or `-`?
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}
