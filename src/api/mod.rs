//! The control API's wire types: every request and answer body, and the query strings,
//! as serde structs. The server's handlers answer with them, and `strata ctl`, the VM
//! launcher and anyone using [`client`] read them, so a field cannot be renamed on one
//! side only. `docs/api.md` documents each of them.
//!
//! The JSON is the API's contract: fields go out in the order they are declared here,
//! optional fields marked `skip_serializing_if` are left out when empty and the others
//! are sent as `null`, and request bodies refuse unknown fields (a typo is an error, not
//! an ignored option). Answers accept unknown fields, so a client keeps working with a
//! newer server that says more.
//!
//! Nothing here depends on the server or on the launcher: only on the types a body
//! carries.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::image::FormatChoice;

pub mod client;
mod history;

pub use history::{CloneAt, HistorySummary, HistoryView, PointInfo, PointOf, PointRef, ServeAt};

/// `GET /v1/server`: the server's version, uptime, addresses and connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerView {
    /// Strata's version.
    pub version: String,
    /// Seconds since the server started.
    pub uptime_s: u64,
    /// The NBD listeners, as they were given.
    pub listen: Vec<String>,
    /// The control API's listeners (`unix:PATH`, `http://ADDR`).
    pub control: Vec<String>,
    /// NBD connections open now, in the handshake or in transmission.
    pub connections: u64,
    /// NBD connections served at once at most.
    pub max_connections: u64,
    /// Exports served.
    pub exports: u64,
}

/// An export: what it serves and its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportView {
    /// Its name.
    pub name: String,
    /// The description clients are sent.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Does it refuse writes?
    pub read_only: bool,
    /// What it serves: `image`, `history`, `raw`, `memory`, `snapshot`, `point` or
    /// `backend`. Text rather than an enum, so that a client reads the kinds of a newer
    /// server too.
    pub kind: String,
    /// The file served, if any (`null` for memory disks and snapshots).
    pub image: Option<PathBuf>,
    /// For a snapshot served as an export: whose snapshot it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<SnapshotOf>,
    /// For a restore point served as an export: whose point it is, and which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_of: Option<PointOf>,
    /// For a volume with history: its window and its oldest and newest points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySummary>,
    /// Its counters.
    pub stats: StatsSnapshot,
}

/// The snapshot an export serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotOf {
    /// The export serving the snapshot's volume.
    pub export: String,
    /// The snapshot's name.
    pub snapshot: String,
}

/// An export's counters at one moment, each read on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Clients in the transmission phase now.
    pub connections: u64,
    /// Clients that ever reached the transmission phase.
    pub total_connections: u64,
    /// `NBD_CMD_READ` requests executed.
    pub reads: u64,
    /// `NBD_CMD_WRITE` requests executed.
    pub writes: u64,
    /// `NBD_CMD_FLUSH` requests executed.
    pub flushes: u64,
    /// `NBD_CMD_TRIM` requests executed.
    pub trims: u64,
    /// `NBD_CMD_WRITE_ZEROES` requests executed.
    pub zeroes: u64,
    /// `NBD_CMD_BLOCK_STATUS` requests executed.
    pub block_status: u64,
    /// `NBD_CMD_CACHE` requests executed.
    pub caches: u64,
    /// Bytes asked for by the reads executed.
    pub bytes_read: u64,
    /// Bytes carried by the writes executed.
    pub bytes_written: u64,
    /// Requests answered with an error, refused ones included.
    pub errors: u64,
}

/// `GET /v1/exports`: every export, in name order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportList {
    /// The exports.
    pub exports: Vec<ExportView>,
}

/// `POST /v1/exports`: serve an image under a new name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddExport {
    /// The export's name.
    pub name: String,
    /// A Strata image, a raw file or block device, or `memory:SIZE`.
    pub image: String,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// How to read the file.
    #[serde(default)]
    pub format: FormatChoice,
    /// The description clients are sent (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// The query of `DELETE /v1/exports/{name}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    /// Disconnect the export's clients instead of refusing while there are any.
    #[serde(default)]
    pub force: bool,
}

/// The answer to `DELETE /v1/exports/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The export removed.
    pub removed: String,
    /// Clients it had when it was removed.
    pub disconnected: u64,
}

/// A snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its name, unique within the volume.
    pub name: String,
    /// When it was taken, in seconds since the Unix epoch.
    pub created: u64,
    /// Its image file.
    pub path: PathBuf,
    /// Bytes it holds itself: what changed between the snapshot before it and this one.
    pub allocated: u64,
    /// The read-only export serving it, if any.
    pub exported_as: Option<String>,
}

/// `GET /v1/exports/{name}/snapshots`: an export's snapshots, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    /// The snapshots.
    pub snapshots: Vec<Snapshot>,
}

/// `POST /v1/exports/{name}/snapshots`: take a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeSnapshot {
    /// The snapshot's name.
    pub name: String,
    /// For a volume with history: name this restore point (a seq, an RFC 3339 time or a
    /// time ago) instead of the disk as it is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

/// The answer to taking a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    /// The new snapshot.
    pub snapshot: Snapshot,
    /// Microseconds requests were held back while the live layer was switched.
    pub pause_us: u64,
}

/// The answer to `DELETE /v1/exports/{name}/snapshots/{snap}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// Bytes merged into the layer above the deleted snapshot.
    pub copied: u64,
}

/// `POST /v1/exports/{name}/rollback`: return the live disk to a snapshot, or (for a
/// volume with history) to a restore point; exactly one of the two is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// The snapshot to return to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The restore point to return to: a seq, an RFC 3339 time or a time ago (`-10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// Even with clients connected.
    #[serde(default)]
    pub force: bool,
    /// Delete the snapshots newer than this one, which a rollback otherwise refuses to
    /// lose.
    #[serde(default)]
    pub destroy_newer: bool,
}

/// The answer to a rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    /// The export rolled back.
    pub export: String,
    /// The snapshot it returned to, for a rollback to a snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The restore point it returned to, for a rollback to a point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<PointRef>,
}

/// `POST /v1/exports/{name}/snapshots/{snap}/export`: serve a snapshot read-only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSnapshot {
    /// The new export's name; `EXPORT@SNAP` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The query of `GET /v1/exports/{name}/dirty`: exactly one of the two.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirtyQuery {
    /// The snapshot to compare the live disk with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The restore point to compare the live disk with (a volume with history): a seq,
    /// an RFC 3339 time or a time ago (`-10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_point: Option<String>,
}

/// The answer to `GET /v1/exports/{name}/dirty`: what was written since a snapshot or a
/// restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirty {
    /// The snapshot, or the restore point as it was asked for.
    pub since: String,
    /// The restore point compared with, when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<PointRef>,
    /// The size of the units changes are tracked in (an image's clusters, a volume with
    /// history's 4 KiB blocks), left out when it cannot be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// The ranges written, in order.
    pub ranges: Vec<DirtyRange>,
    /// The sum of their lengths.
    pub bytes: u64,
}

/// A stretch of the disk written since a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRange {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes (whole clusters, except at the end of the disk).
    pub length: u64,
}

/// Every failure's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

#[cfg(test)]
mod tests;
