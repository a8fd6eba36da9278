//! Block-status descriptors from a backend's extents.
//!
//! What a backend reports about a range is not yet what a client may be sent: it may be
//! empty, run past the request, repeat the same state in adjacent pieces, or hold more
//! extents than a reply should. [`normalize_extents`] turns it into descriptors a client
//! can trust, the same way for every metadata context; each context says through
//! [`StatusExtent`] how its extents read as status flags. Pure like the rest of `proto`:
//! the session calls it between the backend and the reply encoder.

use super::consts::{STATE_DIRTY, state};
use super::reply::Descriptor;
use crate::block::{DepthExtent, DirtyExtent, Extent};

/// Largest number of extents sent in one block-status chunk.
pub const MAX_EXTENTS: usize = 2048;

/// A backend's answer about one run of bytes, as one metadata context describes it.
pub trait StatusExtent {
    /// Status flags that claim nothing a client could wrongly rely on, for a range the
    /// backend left undescribed.
    const UNKNOWN: u64;
    /// Bytes covered.
    fn length(&self) -> u64;
    /// The context's status value for these bytes.
    fn flags(&self) -> u64;
}

/// `base:allocation`: the hole and zero bits; unknown ranges are plain data.
impl StatusExtent for Extent {
    const UNKNOWN: u64 = 0;

    fn length(&self) -> u64 {
        self.length
    }

    fn flags(&self) -> u64 {
        let mut flags = 0;
        if self.hole {
            flags |= state::HOLE;
        }
        if self.zero {
            flags |= state::ZERO;
        }
        u64::from(flags)
    }
}

/// `qemu:allocation-depth`: the depth is the status value; an unknown range is taken to
/// belong to the top layer, since calling it unallocated would invite a client to skip it.
impl StatusExtent for DepthExtent {
    const UNKNOWN: u64 = 1;

    fn length(&self) -> u64 {
        self.length
    }

    fn flags(&self) -> u64 {
        u64::from(self.depth)
    }
}

/// `qemu:dirty-bitmap:NAME`: the dirty bit; an unknown range counts as changed, so that
/// a backup copies it rather than missing it.
impl StatusExtent for DirtyExtent {
    const UNKNOWN: u64 = STATE_DIRTY as u64;

    fn length(&self) -> u64 {
        self.length
    }

    fn flags(&self) -> u64 {
        if self.dirty { Self::UNKNOWN } else { 0 }
    }
}

/// Turns a backend's extents into descriptors a client can trust: never empty, never past
/// the requested length, adjacent runs of equal state merged, each at most `max_len`
/// bytes, at most [`MAX_EXTENTS`] of them (one with `req_one`).
pub fn normalize_extents<E: StatusExtent>(
    extents: &[E],
    len: u64,
    max_len: u64,
    req_one: bool,
) -> Vec<Descriptor> {
    let limit = if req_one { 1 } else { MAX_EXTENTS };
    let mut out: Vec<Descriptor> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        if covered >= len {
            break;
        }
        let length = e.length().min(len - covered);
        if length == 0 {
            continue;
        }
        covered += length;
        let flags = e.flags();
        match out.last_mut() {
            Some(prev) if prev.flags == flags => prev.length += length,
            _ => out.push(Descriptor { length, flags }),
        }
    }
    if out.is_empty() {
        // Always make progress: with nothing known, claim nothing risky.
        out.push(Descriptor {
            length: len,
            flags: E::UNKNOWN,
        });
    }
    let mut capped = Vec::with_capacity(out.len().min(limit));
    for d in out {
        if capped.len() == limit {
            break;
        }
        capped.push(Descriptor {
            length: d.length.min(max_len),
            flags: d.flags,
        });
        if d.length > max_len {
            break;
        }
    }
    capped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_always_progresses() {
        let d = normalize_extents::<Extent>(&[], 4096, u64::MAX, false);
        assert_eq!(
            d,
            vec![Descriptor {
                length: 4096,
                flags: 0
            }]
        );
    }

    #[test]
    fn normalize_clips_merges_and_caps() {
        let ext = [
            Extent::hole(100),
            Extent::hole(50),
            Extent::data(1000),
            Extent::zero(10),
        ];
        let d = normalize_extents(&ext, 500, u64::MAX, false);
        assert_eq!(
            d,
            vec![
                Descriptor {
                    length: 150,
                    flags: 3
                },
                Descriptor {
                    length: 350,
                    flags: 0
                },
            ]
        );
        let d = normalize_extents(&ext, 500, u64::MAX, true);
        assert_eq!(
            d,
            vec![Descriptor {
                length: 150,
                flags: 3
            }]
        );
        let many: Vec<Extent> = (0..5000)
            .map(|i| {
                if i % 2 == 0 {
                    Extent::data(1)
                } else {
                    Extent::hole(1)
                }
            })
            .collect();
        assert_eq!(
            normalize_extents(&many, 5000, u64::MAX, false).len(),
            MAX_EXTENTS
        );
    }

    #[test]
    fn normalize_depths_like_allocation() {
        let depth = |length, depth| DepthExtent { length, depth };
        let d = |length, flags| Descriptor { length, flags };
        let ext = [depth(100, 1), depth(50, 1), depth(1000, 2), depth(10, 0)];
        assert_eq!(
            normalize_extents(&ext, 1200, u64::MAX, false),
            vec![d(150, 1), d(1000, 2), d(10, 0)]
        );
        assert_eq!(
            normalize_extents(&ext, 500, u64::MAX, false),
            vec![d(150, 1), d(350, 2)]
        );
        assert_eq!(
            normalize_extents(&ext, 500, u64::MAX, true),
            vec![d(150, 1)]
        );
        // The whole 32-bit depth survives.
        assert_eq!(
            normalize_extents(&[depth(7, u32::MAX)], 7, u64::MAX, false),
            vec![d(7, u64::from(u32::MAX))]
        );
        // Nothing known: the top layer, not "unallocated".
        assert_eq!(
            normalize_extents::<DepthExtent>(&[], 4096, u64::MAX, false),
            vec![d(4096, 1)]
        );
        let max = u64::from(u32::MAX) & !4095;
        assert_eq!(
            normalize_extents(&[depth(10 << 32, 1)], 10 << 32, max, false),
            vec![d(max, 1)]
        );
    }

    #[test]
    fn normalize_splits_oversized_extents() {
        let ext = [Extent::hole(10 << 32)];
        let d = normalize_extents(&ext, 10 << 32, u64::from(u32::MAX) & !4095, false);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].length, u64::from(u32::MAX) & !4095);
    }
}
