//! Random workloads against a model that copies the whole disk at every restore point.

use std::collections::BTreeMap;

use proptest::prelude::*;
use strata::ErrorKind;
use strata::history::{History, PointSpec};

use super::{SIZE, base, bytes, create, open, read_all};

#[derive(Debug, Clone)]
enum Op {
    Write {
        at: u64,
        len: u64,
        fua: bool,
    },
    Zero {
        at: u64,
        len: u64,
        trim: bool,
        fua: bool,
    },
    Flush,
    Rollback(usize),
    Expire,
    Checkpoint,
    Reclaim,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE - 1).prop_flat_map(|at| (Just(at), 1..=(SIZE - at).min(20_000)));
    prop_oneof![
        8 => (range.clone(), any::<bool>()).prop_map(|((at, len), fua)| Op::Write { at, len, fua: fua && len % 3 == 0 }),
        2 => (range, any::<bool>(), any::<bool>()).prop_map(|((at, len), trim, fua)| Op::Zero { at, len, trim, fua: fua && at % 2 == 0 }),
        4 => Just(Op::Flush),
        1 => any::<usize>().prop_map(Op::Rollback),
        1 => Just(Op::Expire),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Reclaim),
        1 => Just(Op::Reopen),
    ]
}

/// Checks every listed point against the model's copy, and the live disk.
fn check(
    h: &std::sync::Arc<History>,
    disk: &[u8],
    copies: &BTreeMap<u64, Vec<u8>>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(read_all(h), disk, "the live disk");
    for p in h.points() {
        let Some(copy) = copies.get(&p.seq) else {
            return Err(TestCaseError::fail(format!(
                "point {} was never made",
                p.seq
            )));
        };
        let view = h.view(p).unwrap();
        let mut buf = vec![0u8; SIZE as usize];
        view.read(0, &mut buf).unwrap();
        prop_assert!(
            buf == *copy,
            "point {} ({:?}) reads other bytes",
            p.seq,
            p.kind
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_retained_point_reads_what_was_written_up_to_it(ops in prop::collection::vec(op(), 1..60)) {
        let base = base();
        let files = create(&base, 3600);
        let mut h = open(&files, &base);
        let mut disk = read_all(&h);
        prop_assert!(disk.iter().any(|&b| b != 0), "the base shows through");
        let mut copies: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut changed = false;
        for (n, op) in ops.into_iter().enumerate() {
            let newest = h.points().last().map(|p| p.seq);
            match op {
                Op::Write { at, len, fua } => {
                    let data = bytes(n as u64, len as usize);
                    h.write(at, &data, fua).unwrap();
                    disk[at as usize..(at + len) as usize].copy_from_slice(&data);
                    changed = !fua;
                    if fua {
                        let p = h.points().last().copied().unwrap();
                        prop_assert!(Some(p.seq) != newest, "a FUA write is a point");
                        copies.insert(p.seq, disk.clone());
                    }
                }
                Op::Zero { at, len, trim, fua } => {
                    h.zero(at, len, trim, fua).unwrap();
                    disk[at as usize..(at + len) as usize].fill(0);
                    changed = !fua;
                    if fua {
                        let p = h.points().last().copied().unwrap();
                        copies.insert(p.seq, disk.clone());
                    }
                }
                Op::Flush => {
                    h.flush().unwrap();
                    let p = h.points().last().map(|p| p.seq);
                    if changed {
                        prop_assert!(p != newest, "a flush after a write is a new point");
                        copies.insert(p.unwrap(), disk.clone());
                    } else {
                        prop_assert_eq!(p, newest, "a flush with nothing new makes no point");
                    }
                    changed = false;
                }
                Op::Rollback(k) => {
                    let points = h.points();
                    if points.is_empty() {
                        let e = h.resolve(PointSpec::Seq(1)).unwrap_err();
                        prop_assert_eq!(e.kind(), ErrorKind::NotFound);
                        continue;
                    }
                    let p = points[k % points.len()];
                    h.rollback(p).unwrap();
                    disk = copies[&p.seq].clone();
                    changed = true;
                }
                Op::Expire => {
                    // Far past the window: only the newest point stays.
                    h.expire(u64::MAX / 2).unwrap();
                    let left = h.points();
                    prop_assert!(left.len() <= 1, "{} points left", left.len());
                    prop_assert_eq!(left.last().map(|p| p.seq), newest);
                }
                Op::Checkpoint => h.checkpoint().unwrap(),
                Op::Reclaim => {
                    h.reclaim().unwrap();
                }
                Op::Reopen => {
                    drop(h);
                    h = open(&files, &base);
                }
            }
            check(&h, &disk, &copies)?;
        }
    }
}

#[test]
fn names_of_points_resolve_and_bad_ones_are_clear_errors() {
    let base = base();
    let files = create(&base, 3600);
    let h = open(&files, &base);
    assert_eq!(
        h.resolve(PointSpec::parse("-1m").unwrap())
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    h.write(0, &bytes(1, 4096), false).unwrap();
    h.flush().unwrap();
    let p = h.points()[0];
    assert_eq!(h.resolve(PointSpec::Seq(p.seq)).unwrap(), p);
    assert_eq!(h.resolve(PointSpec::parse("-0s").unwrap()).unwrap(), p);
    let e = h
        .resolve(PointSpec::parse("2001-01-01T00:00:00Z").unwrap())
        .unwrap_err();
    assert!(
        e.to_string().contains("before the oldest restore point"),
        "{e}"
    );
    let e = h.resolve(PointSpec::Seq(p.seq + 10)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}
