//! Crashes in the middle of snapshot operations. Each test stops `strata` at one step of
//! taking, deleting or rolling back a snapshot (`STRATA_FAILPOINT`, which aborts the
//! process there, as a power cut or `kill -9` would), then opens the image again and
//! checks that the chain is exactly the old one or exactly the new one: every layer
//! reads what it read before, nothing is half done, and no stray file is left.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use bytes::Bytes;
use strata::backend::Backend;
use strata::image::{self, snapshot};
use strata::volume::Volume;

use crate::support::{images_open, new_image, run, run_ok, runtime, scratch, strata, strata_at};

const CLUSTER: u64 = 4096;
const SIZE: u64 = 64 * CLUSTER;

/// What a volume reads: the live disk and each snapshot, by name.
#[derive(Debug, PartialEq, Eq)]
struct State {
    live: Vec<u8>,
    snapshots: BTreeMap<String, Vec<u8>>,
}

fn read_state(path: &Path) -> State {
    let _images = images_open();
    runtime().block_on(async {
        let v = Volume::open(path, false).expect("the volume opens");
        let live = v.backend().read(0, SIZE as usize).await.unwrap().to_vec();
        let mut snapshots = BTreeMap::new();
        for s in v.snapshots().unwrap() {
            let b = v.serve_snapshot(&s.name, "check").unwrap();
            snapshots.insert(
                s.name.clone(),
                b.read(0, SIZE as usize).await.unwrap().to_vec(),
            );
            v.unserve("check");
        }
        State { live, snapshots }
    })
}

/// An image with snapshots s1, s2, s3, each layer holding writes of its own (some
/// clusters overwritten in later layers, some trimmed), and live writes on top.
fn setup(dir: &Path) -> PathBuf {
    let _images = images_open();
    let path = dir.join("disk.strata");
    new_image(&path, SIZE, CLUSTER);
    runtime().block_on(async {
        let v = Volume::open(&path, false).unwrap();
        let b = v.backend();
        for (layer, byte) in [(0u64, 0x11u8), (1, 0x22), (2, 0x33), (3, 0x44)] {
            for i in 0..12u64 {
                let cluster = (i * 5 + layer * 3) % 64;
                let data = vec![byte.wrapping_add(i as u8); 3000];
                b.write(cluster * CLUSTER + 500, Bytes::from(data), false)
                    .await
                    .unwrap();
            }
            b.trim((layer * 7 + 1) * CLUSTER, 2 * CLUSTER, false)
                .await
                .unwrap();
            b.flush().await.unwrap();
            if layer < 3 {
                v.snapshot(&format!("s{}", layer + 1)).await.unwrap();
            }
        }
    });
    path
}

/// Runs `strata ARGS` in `dir` (with paths relative to it, as users type them), to stop
/// at `failpoint`.
fn strata_stopping_at(dir: &Path, args: &[&str], failpoint: &str) -> ExitStatus {
    run(strata_at(dir, args).env("STRATA_FAILPOINT", failpoint)).status
}

fn stray_files(path: &Path, state: &State) -> Vec<String> {
    let mut expected: Vec<String> = state
        .snapshots
        .keys()
        .map(|n| format!("disk.strata@{n}"))
        .collect();
    expected.push("disk.strata".into());
    expected.push("disk.strata.snapshots.json".into());
    std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !expected.contains(n))
        .collect()
}

fn check_clean(path: &Path) {
    run_ok(strata().args(["check", path.to_str().unwrap()]));
}

/// Runs `args` on a fresh setup, stopping at `failpoint`, and checks what a reopen finds.
fn crash_at(failpoint: &str, args: &[&str], after: impl Fn(&State) -> State, done: bool) {
    // A reopen must find `after(before)` when `done`, else `before`.
    let dir = tempfile::tempdir().unwrap();
    let path = setup(dir.path());
    let before = read_state(&path);
    let expected_after = after(&before);
    assert_ne!(before, expected_after, "the operation changes something");
    // `strata snapshot OP IMAGE NAME [FLAGS]`
    let mut cmd_args: Vec<&str> = args[..2].to_vec();
    cmd_args.push("disk.strata");
    cmd_args.extend_from_slice(&args[2..]);
    let status = strata_stopping_at(dir.path(), &cmd_args, failpoint);
    assert!(
        !status.success(),
        "{failpoint}: the process should have stopped there ({status})"
    );
    let found = read_state(&path);
    let expected = if done { &expected_after } else { &before };
    assert!(
        found == *expected,
        "{failpoint}: after the crash the volume should read the {} state; \
         live equal: {}, snapshots found {:?}, expected {:?}",
        if done { "new" } else { "old" },
        found.live == expected.live,
        found.snapshots.keys().collect::<Vec<_>>(),
        expected.snapshots.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        stray_files(&path, &found),
        Vec::<String>::new(),
        "{failpoint}"
    );
    for layer in std::iter::once(path.clone())
        .chain(found.snapshots.keys().map(|n| snapshot::file_of(&path, n)))
    {
        check_clean(&layer);
    }
    // The volume works on: an operation that did not happen can be done now (one that
    // did is refused or changes nothing), and then the new state is there.
    let status = strata_stopping_at(dir.path(), &cmd_args, "");
    assert!(
        status.success() || done,
        "{failpoint}: redoing the operation after recovery failed ({status})"
    );
    assert!(
        read_state(&path) == expected_after,
        "{failpoint}: the state after redoing the operation"
    );
}

fn take_s4(before: &State) -> State {
    let mut s = State {
        live: before.live.clone(),
        snapshots: before.snapshots.clone(),
    };
    s.snapshots.insert("s4".into(), before.live.clone());
    s
}

fn without(name: &'static str) -> impl Fn(&State) -> State {
    move |before| {
        let mut s = State {
            live: before.live.clone(),
            snapshots: before.snapshots.clone(),
        };
        s.snapshots.remove(name);
        s
    }
}

fn rolled_back_to_s2(before: &State) -> State {
    let mut snapshots = before.snapshots.clone();
    snapshots.remove("s3");
    State {
        live: before.snapshots["s2"].clone(),
        snapshots,
    }
}

#[test]
fn a_snapshot_interrupted_before_the_switch_leaves_the_old_chain() {
    for fp in ["snapshot-prepared", "snapshot-linked"] {
        crash_at(fp, &["snapshot", "create", "s4"], take_s4, false);
    }
}

#[test]
fn a_snapshot_interrupted_after_the_switch_is_complete() {
    crash_at(
        "snapshot-renamed",
        &["snapshot", "create", "s4"],
        take_s4,
        true,
    );
}

/// Where a deletion can stop, and whether the snapshot is gone once it has stopped there.
const DELETE_STEPS: [(&str, bool); 4] = [
    ("delete-begun", false),
    ("delete-merged", false),
    ("delete-rebased", true),
    ("delete-removed", true),
];

#[test]
fn deleting_the_newest_snapshot_survives_a_crash_at_every_step() {
    for (fp, done) in DELETE_STEPS {
        crash_at(fp, &["snapshot", "delete", "s3"], without("s3"), done);
    }
}

#[test]
fn deleting_a_middle_snapshot_survives_a_crash_at_every_step() {
    for (fp, done) in DELETE_STEPS {
        crash_at(fp, &["snapshot", "delete", "s2"], without("s2"), done);
    }
}

#[test]
fn deleting_the_oldest_snapshot_survives_a_crash_at_every_step() {
    for (fp, done) in [("delete-merged", false), ("delete-rebased", true)] {
        crash_at(fp, &["snapshot", "delete", "s1"], without("s1"), done);
    }
}

#[test]
fn a_rollback_survives_a_crash_at_every_step() {
    for (fp, done) in [
        ("rollback-prepared", false),
        ("rollback-renamed", true),
        ("rollback-discarding", true),
    ] {
        crash_at(
            fp,
            &["snapshot", "rollback", "s2", "--destroy-newer"],
            rolled_back_to_s2,
            done,
        );
    }
}

#[test]
fn every_failpoint_is_covered() {
    let source = include_str!("snapshot_crash.rs");
    for fp in snapshot::FAILPOINTS {
        assert!(
            source.matches(&format!("\"{fp}\"")).count() >= 1,
            "failpoint {fp} has no crash test"
        );
    }
}

/// Writes acknowledged between the commit that prepares a snapshot and the switch are
/// committed (into the snapshot's file) by the first flush after the switch, or before
/// the snapshot call returns: reopening the files afresh finds them.
#[test]
fn writes_just_before_the_switch_are_durable_after_the_next_flush() {
    let _images = images_open();
    let (_dir, path) = scratch("disk.strata");
    new_image(&path, SIZE, CLUSTER);
    {
        let chain = std::sync::Arc::new(image::open(&path, true).unwrap());
        chain.write(0, &[1; 4096], false).unwrap();
        let prepared = snapshot::prepare(&path, "s", &chain).unwrap();
        // In flight while the snapshot is prepared: acknowledged, not committed.
        chain.write(CLUSTER * 5, &[2; 4096], false).unwrap();
        let new = snapshot::switch(prepared, &chain).unwrap();
        new.write(CLUSTER * 9, &[3; 4096], false).unwrap();
        new.flush().unwrap();
    }
    // Fresh opens read only what was committed to the files.
    let reads = |chain: &image::Chain, cluster: u64, byte: u8| {
        chain.read_vec(CLUSTER * cluster, 4096).unwrap() == vec![byte; 4096]
    };
    let snap = image::open(&snapshot::file_of(&path, "s"), false).unwrap();
    assert!(
        reads(&snap, 5, 2),
        "the write in flight is not in the snapshot's file"
    );
    assert!(reads(&snap, 0, 1), "the write before the snapshot");
    assert!(reads(&snap, 9, 0), "a write after the snapshot reached it");
    drop(snap);
    let live = image::open(&path, false).unwrap();
    assert!(reads(&live, 5, 2) && reads(&live, 9, 3), "the live disk");
}
