//! Crashes at random moments: the reopened volume is the disk after some prefix of the
//! operations, at least up to the last one acknowledged as durable, and every restore
//! point it lists reads what the disk was at that point.

use std::collections::{BTreeMap, BTreeSet};

use strata::history::files::Files;
use strata::image::sim::Rng;

use super::{SIZE, base, bytes, create, open, read_all};

/// One round: random operations (remembering the disk after each), then a crash, a
/// reopen and the checks. Returns how many operations were lost (not durable).
fn round(seed: u64) -> usize {
    let mut rng = Rng::new(seed);
    let base = base();
    let files = create(&base, 3600);
    let h = open(&files, &base);
    let mut disk = read_all(&h);
    // states[i]: the disk after the first i operations.
    let mut states = vec![disk.clone()];
    let mut durable_ops = 0;
    let mut copies: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    // The points listed now: those made, less those retention dropped.
    let mut kept: BTreeSet<u64> = BTreeSet::new();
    let ops = 5 + rng.below(40) as usize;
    for n in 0..ops {
        let at = rng.below(SIZE - 1);
        let len = 1 + rng.below((SIZE - at).min(30_000));
        match rng.below(10) {
            0..=5 => {
                let fua = rng.below(6) == 0;
                let data = bytes(seed ^ (n as u64) << 20, len as usize);
                h.write(at, &data, fua).unwrap();
                disk[at as usize..(at + len) as usize].copy_from_slice(&data);
                if fua {
                    durable_ops = n + 1;
                    let seq = h.points().last().unwrap().seq;
                    copies.insert(seq, disk.clone());
                    kept.insert(seq);
                }
            }
            6 => {
                h.zero(at, len, rng.below(2) == 0, false).unwrap();
                disk[at as usize..(at + len) as usize].fill(0);
            }
            7 if rng.below(3) == 0 => h.checkpoint().unwrap(),
            7 if rng.below(2) == 0 => {
                h.expire(u64::MAX / 2).unwrap();
                h.reclaim().unwrap();
                kept = h.points().iter().map(|p| p.seq).collect();
            }
            _ => {
                let before = h.points().last().map(|p| p.seq);
                h.flush().unwrap();
                durable_ops = n + 1;
                let p = h.points().last().map(|p| p.seq);
                if p != before {
                    copies.insert(p.unwrap(), disk.clone());
                    kept.insert(p.unwrap());
                }
            }
        }
        states.push(disk.clone());
    }
    let crashed = std::sync::Arc::new(files.crash(&mut rng));
    drop(h);
    let h = open(&crashed, &base);
    let now = read_all(&h);
    let prefix = (durable_ops..states.len())
        .rev()
        .find(|&i| states[i] == now)
        .unwrap_or_else(|| {
            panic!(
                "seed {seed}: the reopened disk is no prefix of the {} operations from {durable_ops} on \
                 (recovery: {:?})",
                states.len() - 1,
                h.recovery()
            )
        });
    for p in h.points() {
        let copy = copies
            .get(&p.seq)
            .unwrap_or_else(|| panic!("seed {seed}: point {} was never made", p.seq));
        let mut buf = vec![0u8; SIZE as usize];
        h.view(p).unwrap().read(0, &mut buf).unwrap();
        assert!(
            buf == *copy,
            "seed {seed}: point {} reads other bytes after the crash",
            p.seq
        );
    }
    // Every point listed before the crash was durable.
    for p in &kept {
        assert!(
            h.points().iter().any(|q| q.seq == *p),
            "seed {seed}: durable point {p} is gone after the crash"
        );
    }
    // The volume keeps working after recovery.
    h.write(0, &bytes(seed, 4096), true).unwrap();
    assert!(
        crashed
            .list()
            .unwrap()
            .iter()
            .any(|n| n.starts_with("seg-"))
    );
    states.len() - 1 - prefix
}

#[test]
fn a_crash_leaves_a_prefix_holding_every_durable_write() {
    let mut lost = 0;
    for seed in 0..150 {
        lost += round(seed);
    }
    // Some rounds must lose unsynced work, or the crashes test nothing.
    assert!(lost > 0, "no crash lost an unsynced operation");
}
