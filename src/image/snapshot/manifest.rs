//! The manifest beside a live image (`disk.strata.snapshots.json`): when each snapshot
//! was taken, and the intent of a deletion or rollback in progress, recorded before it
//! starts so that [`super::recover`] can finish or undo it after a crash. The chain
//! itself is the record of which snapshots exist; the manifest only adds to it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{MANIFEST_SUFFIX, file_name, manifest_of, parent_dir, sync_dir};
use crate::error::{Error, Result};

/// What the manifest holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Manifest {
    #[serde(default)]
    pub(super) snapshots: BTreeMap<String, Entry>,
    /// An operation that changes the chain and then removes files, recorded before it
    /// starts so that a crash between the two can be finished.
    #[serde(default)]
    pub(super) pending: Option<Pending>,
}

/// What the manifest records of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Entry {
    pub(super) created: u64,
}

/// A snapshot operation in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Pending {
    /// Snapshot `name` is being deleted: once the chain no longer uses its file, the
    /// file goes.
    Delete { name: String },
    /// The live image is being replaced by the overlay with image id `new_id` (hex)
    /// over snapshot `to`; once it is, the snapshots in `discard` go.
    Rollback {
        to: String,
        new_id: String,
        discard: Vec<String>,
    },
}

impl Manifest {
    /// The manifest of the live image `live`; a missing or unreadable one is empty (it
    /// only adds detail to what the chain says).
    pub(super) fn load(live: &Path) -> Manifest {
        let path = manifest_of(live);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!("ignoring unreadable {}: {e}", path.display());
                Manifest::default()
            }),
            Err(_) => Manifest::default(),
        }
    }

    /// Replaces the manifest of `live` atomically and durably.
    pub(super) fn store(&self, live: &Path) -> Result<()> {
        let path = manifest_of(live);
        let tmp = live.with_file_name(format!(".{}{MANIFEST_SUFFIX}.tmp", file_name(live)));
        let err = |e: std::io::Error| Error::from(e).with_op("write manifest").with_path(&path);
        let bytes = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(&bytes).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &path).map_err(err)?;
        sync_dir(parent_dir(live))
    }
}
