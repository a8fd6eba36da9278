//! A volume with history as a disk the image tools copy from (`strata convert`): the
//! live disk, or the disk at a restore point.

use crate::error::Result;
use crate::image::tools::Disk;

use super::engine::History;
use super::index::Lineage;
use super::retention::PointView;

/// Ranges that may hold non-zero data, from block status (live or at a point).
fn data_ranges(h: &History, at: Option<&Lineage>) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < h.size() {
        let extents = h.block_status(pos, h.size() - pos, at)?;
        for e in extents {
            if !e.zero {
                match out.last_mut() {
                    Some((start, len)) if *start + *len == pos => *len += e.length,
                    _ => out.push((pos, e.length)),
                }
            }
            pos += e.length;
        }
    }
    Ok(out)
}

impl Disk for History {
    fn size(&self) -> u64 {
        History::size(self)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        History::read(self, offset, buf)
    }

    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        data_ranges(self, None)
    }
}

impl Disk for PointView {
    fn size(&self) -> u64 {
        self.history().size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        PointView::read(self, offset, buf)
    }

    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        data_ranges(self.history(), Some(self.lineage()))
    }
}
