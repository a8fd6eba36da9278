//! A write stream recorded as dm-log-writes records one (writes, zeroing, flushes, FUA
//! writes, in order), with more than a thousand flushes: every restore point reads
//! exactly what a replay of the stream up to its flush gives.

use strata::image::sim::Rng;

use super::{inspect, serve, volume};
use crate::support::spec::{CMD_TRIM, CMD_WRITE_ZEROES, FLAG_FUA};
use crate::support::{
    KIB, pattern, qemu_img_compare, require_tool, run_ok, strata_at_ok, strata_only,
};

const SIZE: usize = 256 * KIB as usize;

#[derive(Debug, Clone)]
enum Op {
    Write { at: u64, data: Vec<u8>, fua: bool },
    Zero { at: u64, len: u64 },
    Flush,
}

impl Op {
    fn apply(&self, disk: &mut [u8]) {
        match self {
            Op::Write { at, data, .. } => {
                disk[*at as usize..*at as usize + data.len()].copy_from_slice(data)
            }
            Op::Zero { at, len } => disk[*at as usize..(*at + *len) as usize].fill(0),
            Op::Flush => {}
        }
    }
}

#[test]
fn every_restore_point_reads_the_replayed_write_stream() {
    if !strata_only("volumes with history") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(dir.path(), "256K");
    let (mut server, mut c) = serve(&vol);
    let mut rng = Rng::new(0x5eed);
    let mut stream = Vec::new();
    let (mut points, mut changed) = (0, false);
    while points < 1100 {
        let at = rng.below(SIZE as u64 - 1);
        let len = 1 + rng.below((SIZE as u64 - at).min(16 * KIB));
        let op = match rng.below(10) {
            0..=5 => Op::Write {
                at,
                data: pattern(rng.next_u64(), len as usize),
                fua: rng.below(8) == 0,
            },
            6 => Op::Zero { at, len },
            _ => Op::Flush,
        };
        match &op {
            Op::Write { at, data, fua } => {
                c.write(if *fua { FLAG_FUA } else { 0 }, *at, data)
                    .unwrap()
                    .unwrap();
                if *fua {
                    points += 1;
                }
                changed = !fua;
            }
            Op::Zero { at, len } => {
                let cmd = if rng.below(2) == 0 {
                    CMD_TRIM
                } else {
                    CMD_WRITE_ZEROES
                };
                c.outcome(0, cmd, *at, *len, &[]).unwrap().unwrap();
                changed = true;
            }
            Op::Flush => {
                c.flush().unwrap().unwrap();
                points += usize::from(changed);
                changed = false;
            }
        }
        stream.push(op);
    }
    drop(c);
    server.stop_cleanly_with(libc::SIGTERM);

    // Replay the stream, comparing every restore point as its flush (or FUA write) comes.
    let (history, guard) = inspect(&vol);
    let listed = history.points();
    assert!(
        listed.len() >= 1000,
        "{} restore points listed",
        listed.len()
    );
    let history = std::sync::Arc::new(history);
    let mut disk = vec![0u8; SIZE];
    let mut next = 0;
    let mut changed = false;
    let sample = [10usize, 500, listed.len() - 1];
    let mut samples = Vec::new();
    for op in &stream {
        op.apply(&mut disk);
        let is_point = match op {
            Op::Write { fua: true, .. } => true,
            Op::Flush => changed,
            _ => false,
        };
        changed = match op {
            Op::Write { fua, .. } => !fua,
            Op::Zero { .. } => true,
            Op::Flush => false,
        };
        if !is_point {
            continue;
        }
        let point = listed[next];
        let mut buf = vec![0u8; SIZE];
        history.view(point).unwrap().read(0, &mut buf).unwrap();
        assert!(
            buf == disk,
            "restore point {} (the {next}th) reads other bytes than the replay",
            point.seq
        );
        if sample.contains(&next) {
            samples.push((point.seq, disk.clone()));
        }
        next += 1;
    }
    assert_eq!(
        next,
        listed.len(),
        "every listed point is a flush or FUA write of the stream"
    );
    drop(history);
    drop(guard);

    // A few points copied out and compared by qemu-img with the replay.
    if !require_tool("qemu-img") {
        return;
    }
    for (seq, expected) in samples {
        let want = dir.path().join(format!("want-{seq}.raw"));
        std::fs::write(&want, &expected).unwrap();
        let got = format!("got-{seq}.raw");
        strata_at_ok(
            dir.path(),
            &[
                "convert",
                "-O",
                "raw",
                "--at",
                &seq.to_string(),
                "vol",
                &got,
            ],
        );
        run_ok(&mut qemu_img_compare(dir.path().join(&got), &want));
    }
}
