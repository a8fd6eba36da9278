//! Questions about the disk that read the map without changing it: which layer holds
//! what (`base:allocation`, `qemu:allocation-depth`, `strata map`), and how much space
//! the top image uses.

use super::lower::layer_id;
use super::{Chain, lock_err};
use crate::block::{DepthExtent, Extent};
use crate::error::{Error, Result};
use crate::image::format::ENTRIES;
use crate::image::map::entry;

/// What `map` reports for a stretch of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRange {
    /// Start on the virtual disk.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Data, zero, or unallocated (falls through to nothing).
    pub state: RangeState,
    /// 1 for the top layer, 2 for its backing, ...; 0 when no layer has it.
    pub depth: u32,
    /// Offset in the owning layer's file, for data.
    pub host: Option<u64>,
}

/// The kind of a [`MapRange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeState {
    /// Stored data.
    Data,
    /// A zero cluster.
    Zero,
    /// Not allocated anywhere: reads as zeroes.
    Unallocated,
}

impl Chain {
    /// Data and zero clusters that layer `index` (0 is the bottom) holds itself,
    /// whether or not layers above it hide them.
    pub fn clusters_of(&self, index: usize) -> Result<(u64, u64)> {
        let id = layer_id(index, self.path())?;
        if index == usize::from(self.top) {
            return Ok(self.state.read().map_err(|_| lock_err())?.map.owned_by(id));
        }
        Ok(self.lower_at(index).map_or((0, 0), |l| l.map.owned_by(id)))
    }

    /// Bytes of the top image's file that hold clusters or map pages, and free bytes
    /// inside it.
    pub fn space(&self) -> Result<(u64, u64)> {
        let st = self.state.read().map_err(|_| lock_err())?;
        Ok((st.eof - st.free.total(), st.free.total()))
    }

    /// Describes allocation as a guest sees it (`base:allocation`): data, zero
    /// clusters, and holes.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let ranges = self.ranges(offset, len)?;
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            match r.state {
                RangeState::Data => out.push(Extent::data(r.length)),
                RangeState::Zero => out.push(Extent::zero(r.length)),
                RangeState::Unallocated if r.depth == 0 => out.push(Extent::hole(r.length)),
                RangeState::Unallocated => self.raw_status(r.offset, r.length, &mut out)?,
            }
        }
        Ok(out)
    }

    fn raw_status(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let (storage, _) = self.raw.as_ref().expect("depth > 0 needs a raw base");
        let data = storage.data_ranges(offset, len).map_err(|e| {
            Error::from(e)
                .with_op("block_status")
                .with_path(self.layers[0].path.clone())
        })?;
        let mut pos = offset;
        for (start, n) in data {
            if start > pos {
                out.push(Extent::hole(start - pos));
            }
            out.push(Extent::data(n));
            pos = start + n;
        }
        if pos < offset + len {
            out.push(Extent::hole(offset + len - pos));
        }
        Ok(())
    }

    /// Which layer owns each stretch of `[offset, offset + len)`
    /// (`qemu:allocation-depth`): 1 the top, 2 its backing, ..., 0 none.
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>> {
        let mut out: Vec<DepthExtent> = Vec::new();
        for r in self.ranges(offset, len)? {
            match out.last_mut() {
                Some(last) if last.depth == r.depth => last.length += r.length,
                _ => out.push(DepthExtent {
                    length: r.length,
                    depth: r.depth,
                }),
            }
        }
        Ok(out)
    }

    /// The state, owner and host offset of every stretch of `[offset, offset + len)`,
    /// neighbours with equal state, owner and contiguous data merged.
    pub fn ranges(&self, offset: u64, len: u64) -> Result<Vec<MapRange>> {
        let st = self.state.read().map_err(|_| lock_err())?;
        let bits = self.header.cluster_bits;
        let cs = self.cluster_size();
        let raw_size = self.raw.as_ref().map_or(0, |r| r.1);
        let top_depth = u32::from(self.top) + 1;
        let mut out: Vec<MapRange> = Vec::new();
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let c = pos >> bits;
            let p = c as usize / ENTRIES;
            // Skip whole absent pages at once.
            let n = if st.map.page(p).is_none() {
                let page_end = ((p as u64 + 1) * ENTRIES as u64) << bits;
                page_end.min(end) - pos
            } else {
                (cs - (pos & (cs - 1))).min(end - pos)
            };
            let e = st.map.get(c);
            let (state, depth, host) = if let Some(h) = entry::host(e) {
                let within = pos & (cs - 1);
                (
                    RangeState::Data,
                    top_depth - u32::from(entry::layer(e)),
                    Some(h + within),
                )
            } else if entry::is_zero(e) {
                (
                    RangeState::Zero,
                    top_depth - u32::from(entry::layer(e)),
                    None,
                )
            } else {
                (RangeState::Unallocated, 0, None)
            };
            let mut pieces = vec![(pos, n, state, depth, host)];
            if state == RangeState::Unallocated && pos < raw_size {
                // The raw base owns what it covers.
                let split = raw_size.min(pos + n);
                pieces = vec![(pos, split - pos, state, top_depth, None)];
                if split < pos + n {
                    pieces.push((split, pos + n - split, state, 0, None));
                }
            }
            for (offset, length, state, depth, host) in pieces {
                match out.last_mut() {
                    Some(last)
                        if last.state == state
                            && last.depth == depth
                            && match (last.host, host) {
                                (Some(a), Some(b)) => a + last.length == b,
                                (None, None) => true,
                                _ => false,
                            } =>
                    {
                        last.length += length;
                    }
                    _ => out.push(MapRange {
                        offset,
                        length,
                        state,
                        depth,
                        host,
                    }),
                }
            }
            pos += n;
        }
        Ok(out)
    }
}
