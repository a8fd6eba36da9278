use super::*;
use proptest::prelude::*;

fn data(seq: u64) -> Loc {
    Loc::Data {
        segment: 1,
        offset: seq * BLOCK,
    }
}

#[test]
fn locations_pack_and_unpack() {
    for loc in [
        Loc::Base,
        Loc::Zero,
        Loc::Hole,
        Loc::Data {
            segment: 1,
            offset: 0,
        },
        Loc::Data {
            segment: (1 << 24) - 1,
            offset: (1 << 40) - 1,
        },
    ] {
        assert_eq!(Loc::unpack(loc.pack()), Some(loc));
    }
    assert_eq!(Loc::unpack(3), None, "a small value that is no kind");
}

#[test]
fn a_point_reads_the_version_written_before_it() {
    let mut ix = Index::new(4);
    let keep_all = |_| true;
    ix.set(
        1,
        Version {
            seq: 1,
            loc: data(1),
        },
        keep_all,
    );
    ix.set(
        1,
        Version {
            seq: 3,
            loc: data(3),
        },
        keep_all,
    );
    assert_eq!(ix.version_at(1, &ix.lineage(0, 2)).seq, 1);
    assert_eq!(ix.version_at(1, &ix.lineage(0, 3)).seq, 3);
    assert_eq!(ix.version_at(1, &ix.lineage(0, 0)), Version::BASE);
    assert_eq!(ix.version_at(0, &ix.lineage(0, 3)), Version::BASE);
}

#[test]
fn a_replaced_version_no_point_needs_is_returned() {
    let mut ix = Index::new(4);
    let gone = ix.set(
        2,
        Version {
            seq: 1,
            loc: data(1),
        },
        |_| false,
    );
    assert_eq!(gone, None, "the base version holds no bytes");
    let gone = ix.set(
        2,
        Version {
            seq: 2,
            loc: data(2),
        },
        |_| false,
    );
    assert_eq!(gone.map(|v| v.seq), Some(1));
    assert!(ix.older(2).is_empty());
}

#[test]
fn rollback_keeps_the_old_epoch_readable() {
    let mut ix = Index::new(2);
    let keep_all = |_| true;
    ix.set(
        0,
        Version {
            seq: 1,
            loc: data(1),
        },
        keep_all,
    );
    // point 2
    ix.set(
        0,
        Version {
            seq: 3,
            loc: data(3),
        },
        keep_all,
    );
    ix.set(
        1,
        Version {
            seq: 4,
            loc: data(4),
        },
        keep_all,
    );
    // point 5; roll back to 2 at 6
    let e = ix.rollback(6, 0, 2);
    assert_eq!(e, 1);
    assert_eq!(ix.current(0).seq, 1);
    assert_eq!(ix.current(1), Version::BASE);
    ix.set(
        1,
        Version {
            seq: 7,
            loc: data(7),
        },
        keep_all,
    );
    let old = ix.lineage(0, 5);
    assert_eq!(ix.version_at(0, &old).seq, 3);
    assert_eq!(ix.version_at(1, &old).seq, 4);
    let new = ix.lineage(1, 7);
    assert_eq!(ix.version_at(0, &new).seq, 1);
    assert_eq!(ix.version_at(1, &new).seq, 7);
}

#[test]
fn parts_that_contradict_are_refused() {
    let epochs = vec![
        Epoch {
            start: 0,
            parent: None,
        },
        Epoch {
            start: 5,
            parent: Some((0, 7)),
        },
    ];
    assert!(
        Index::from_parts(4, [], [], epochs).is_none(),
        "parent point after the epoch's start"
    );
    assert!(
        Index::from_parts(
            4,
            [(
                9,
                Version {
                    seq: 1,
                    loc: data(1)
                }
            )],
            [],
            vec![]
        )
        .is_none()
    );
}

/// What the index must answer, kept the slow way: every version ever written, and the
/// same epochs.
#[derive(Debug, Default)]
struct Model {
    versions: Vec<(u64, Version)>,
    epochs: Vec<Epoch>,
}

impl Model {
    fn sees(&self, epoch: u32, upto: u64, seq: u64) -> bool {
        let (mut e, mut hi) = (epoch, upto);
        loop {
            let ep = self.epochs[e as usize];
            if ep.start <= seq && seq <= hi {
                return true;
            }
            match ep.parent {
                Some((pe, ps)) => (e, hi) = (pe, ps),
                None => return false,
            }
        }
    }

    fn read(&self, block: u64, epoch: u32, upto: u64) -> Version {
        self.versions
            .iter()
            .filter(|(b, v)| *b == block && self.sees(epoch, upto, v.seq))
            .map(|(_, v)| *v)
            .max_by_key(|v| v.seq)
            .unwrap_or(Version::BASE)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64),
    Zero(u64),
    Point,
    Rollback(usize),
    Prune(usize),
}

fn op(blocks: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..blocks).prop_map(Op::Write),
        1 => (0..blocks).prop_map(Op::Zero),
        3 => Just(Op::Point),
        1 => any::<usize>().prop_map(Op::Rollback),
        1 => any::<usize>().prop_map(Op::Prune),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the writes, rollbacks and pruning, every retained point reads what the
    /// model says it wrote, and so does the live disk.
    #[test]
    fn retained_points_read_what_was_written(ops in prop::collection::vec(op(8), 1..120)) {
        let blocks = 8;
        let mut ix = Index::new(blocks);
        let mut model = Model { epochs: ix.epochs().to_vec(), ..Model::default() };
        let mut points: Vec<(u32, u64)> = Vec::new();
        let mut seq = 0u64;
        for op in ops {
            seq += 1;
            let last_point = points.iter().map(|p| p.1).max().unwrap_or(0);
            let keep = |s: u64| last_point >= s;
            match op {
                Op::Write(b) | Op::Zero(b) => {
                    let loc = if matches!(op, Op::Write(_)) { data(seq) } else { Loc::Zero };
                    let v = Version { seq, loc };
                    ix.set(b, v, keep);
                    model.versions.push((b, v));
                }
                Op::Point => points.push((ix.live_epoch(), seq)),
                Op::Rollback(k) if !points.is_empty() => {
                    let (e, at) = points[k % points.len()];
                    ix.rollback(seq, e, at);
                    model.epochs.push(Epoch { start: seq, parent: Some((e, at)) });
                }
                Op::Prune(k) if !points.is_empty() => {
                    // Expire a prefix of the points (the window moving on), keep the rest.
                    let drop = k % points.len();
                    points.drain(..drop);
                    ix.prune(&points);
                }
                Op::Rollback(_) | Op::Prune(_) => {}
            }
            let live = ix.live_epoch();
            let data = (0..blocks).filter(|&b| ix.current(b).loc.segment().is_some()).count() as u64;
            prop_assert_eq!(ix.data_blocks(), data, "the count of data blocks");
            for b in 0..blocks {
                prop_assert_eq!(ix.current(b), model.read(b, live, u64::MAX), "live block {}", b);
                for &(e, s) in &points {
                    prop_assert_eq!(
                        ix.version_at(b, &ix.lineage(e, s)),
                        model.read(b, e, s),
                        "block {} at point {} of epoch {}", b, s, e
                    );
                }
            }
        }
    }
}
