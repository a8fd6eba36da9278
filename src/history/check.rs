//! `strata check` of a volume with history: what an open finds (the checkpoint it
//! starts from, the records replayed, a torn tail and what follows it), and whether
//! every block version the index keeps is in a segment that exists.

use std::path::Path;

use serde::Serialize;

use crate::error::Result;

use super::engine::{History, read};

/// What a check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Problems: the volume cannot be read as it should.
    pub problems: Vec<String>,
    /// What a repair did.
    pub repaired: Vec<String>,
    /// The checkpoint an open starts from, by the `seq` it was cut at.
    pub checkpoint: Option<u64>,
    /// Checkpoints that did not check out (an open passes over them).
    pub bad_checkpoints: usize,
    /// Records replayed after the checkpoint.
    pub records_replayed: u64,
    /// Bytes of a torn tail (records a crash left incomplete; an open cuts them).
    pub torn_bytes: u64,
    /// Segments after the tear (never acknowledged as durable; an open removes them).
    pub segments_after_tear: usize,
    /// Restore points.
    pub points: usize,
    /// Segments in the log.
    pub segments: usize,
    /// Bytes of log.
    pub log_bytes: u64,
}

impl CheckReport {
    /// Whether nothing is wrong (a torn tail is normal after a crash, not a problem).
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the volume in `dir` without changing it; with `repair`, opens it for
/// writing (which cuts a torn tail) and checks again.
pub fn check(dir: &Path, repair: bool) -> Result<CheckReport> {
    let mut report = inspect(&History::inspect(dir)?);
    if repair && (report.torn_bytes > 0 || report.segments_after_tear > 0) {
        let (torn, after) = (report.torn_bytes, report.segments_after_tear);
        drop(History::open(dir, false)?);
        let repaired = report_repair(torn, after);
        report = inspect(&History::inspect(dir)?);
        report.repaired = repaired;
    }
    Ok(report)
}

fn report_repair(torn: u64, after: usize) -> Vec<String> {
    let mut out = Vec::new();
    if torn > 0 {
        out.push(format!("cut {torn} bytes of a torn log tail"));
    }
    if after > 0 {
        out.push(format!("removed {after} segments written after the tear"));
    }
    out
}

fn inspect(h: &History) -> CheckReport {
    let recovery = h.recovery();
    let segments = h.segment_bytes();
    let mut problems = Vec::new();
    let present: std::collections::BTreeSet<u32> = segments.iter().map(|s| s.0).collect();
    let mut missing = std::collections::BTreeMap::<u32, u64>::new();
    for (_, v) in read(&h.index).versions() {
        if let Some(s) = v.loc.segment().filter(|s| !present.contains(s)) {
            *missing.entry(s).or_default() += 1;
        }
    }
    for (s, n) in missing {
        problems.push(format!(
            "{n} block versions are in segment {}, which is missing",
            super::log::segment_name(s)
        ));
    }
    CheckReport {
        problems,
        repaired: Vec::new(),
        checkpoint: recovery.checkpoint,
        bad_checkpoints: recovery.bad_checkpoints,
        records_replayed: recovery.records,
        torn_bytes: recovery.cut_bytes,
        segments_after_tear: recovery.cut_segments,
        points: h.points().len(),
        segments: segments.len(),
        log_bytes: segments.iter().map(|s| s.1).sum(),
    }
}
