//! Volumes with history in the control API: the restore points as `strata history
//! --json`, `strata ctl history` and `GET /v1/exports/NAME/history` show them, and the
//! bodies of the endpoints that serve, clone and name points.

use serde::{Deserialize, Serialize};

use crate::history::{History, Point};
use crate::time::rfc3339_us;

/// One restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    /// Its place in the volume's log: the number that names it for good.
    pub seq: u64,
    /// When it was made, RFC 3339 in UTC with microseconds.
    pub time: String,
    /// `flush`, `fua` or `snapshot` (a point kept under a name).
    pub kind: String,
    /// The snapshot's name, for a named point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The history of a volume: its retention and its points, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryView {
    /// How long points are kept, in seconds.
    pub window_s: u64,
    /// The most bytes the history may take, if capped.
    pub max_bytes: Option<u64>,
    /// Bytes of log that do not hold the live disk: the history (and space not yet
    /// reclaimed).
    pub history_bytes: u64,
    /// Points dropped inside the window because of the cap, since the volume was opened.
    pub dropped_for_space: u64,
    /// The points, oldest first.
    pub points: Vec<PointInfo>,
}

impl HistoryView {
    /// What `history` holds now.
    pub fn of(history: &History) -> HistoryView {
        let manifest = history.manifest();
        let points = history
            .points()
            .into_iter()
            .map(|p| {
                let name = manifest
                    .snapshots
                    .iter()
                    .find(|s| s.seq == p.seq)
                    .map(|s| s.name.clone());
                PointInfo {
                    seq: p.seq,
                    time: rfc3339_us(p.time_us),
                    kind: if name.is_some() {
                        "snapshot"
                    } else {
                        p.kind.as_str()
                    }
                    .to_owned(),
                    name,
                }
            })
            .collect();
        HistoryView {
            window_s: manifest.window_secs,
            max_bytes: manifest.max_bytes,
            history_bytes: history.history_bytes(),
            dropped_for_space: history.dropped_for_space(),
            points,
        }
    }
}

/// A restore point named back by the server: which one a POINT given as a time or a
/// time ago resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRef {
    /// Its place in the volume's log.
    pub seq: u64,
    /// When it was made, RFC 3339 in UTC with microseconds.
    pub time: String,
}

impl PointRef {
    /// How the API names `point`.
    pub fn of(point: &Point) -> PointRef {
        PointRef {
            seq: point.seq,
            time: rfc3339_us(point.time_us),
        }
    }
}

/// The restore point an export of `kind: "point"` serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointOf {
    /// The export serving the volume's live disk.
    pub export: String,
    /// The point.
    #[serde(flatten)]
    pub point: PointRef,
}

/// What the view of an export of `kind: "history"` says of its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistorySummary {
    /// How long points are kept, in seconds.
    pub window_s: u64,
    /// The oldest point kept, if any.
    pub oldest_point: Option<PointRef>,
    /// The newest point, if any.
    pub newest_point: Option<PointRef>,
}

impl HistorySummary {
    /// What `history` holds now.
    pub fn of(history: &History) -> HistorySummary {
        let bounds = history.point_bounds();
        HistorySummary {
            window_s: history.manifest().window_secs,
            oldest_point: bounds.map(|(oldest, _)| PointRef::of(&oldest)),
            newest_point: bounds.map(|(_, newest)| PointRef::of(&newest)),
        }
    }
}

/// `POST /v1/exports/{name}/serve-at`: serve the disk at a restore point, read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeAt {
    /// The point: a seq, an RFC 3339 time or a time ago (`-10m`).
    pub at: String,
    /// The new export's name; `EXPORT@SEQ` when left out.
    #[serde(rename = "as", default, skip_serializing_if = "Option::is_none")]
    pub as_name: Option<String>,
}

/// `POST /v1/exports/{name}/clone`: a new volume with history, starting as the disk at
/// a restore point, served at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneAt {
    /// The point: a seq, an RFC 3339 time or a time ago (`-10m`).
    pub at: String,
    /// The new export's name.
    pub name: String,
    /// The new volume's directory, which must not exist.
    pub image: String,
}
