//! The restore points of a volume with history, as `strata history --json`, `strata ctl
//! history` and `GET /v1/exports/NAME/history` show them.

use serde::{Deserialize, Serialize};

use crate::history::History;
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
