//! Volumes against a model: random writes, trims, snapshots, deletions, rollbacks and
//! reopenings, checked against byte vectors. After every step the live disk, every
//! snapshot (read through its own export) and every snapshot's dirty ranges must match
//! the model exactly: a cluster is dirty since snapshot S if and only if it was written
//! or trimmed after S was taken (with deletions of other snapshots and rollbacks taken
//! into account).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use strata::backend::{Backend, SharedBackend};
use strata::volume::{RollbackOptions, Volume};

const CLUSTER: u64 = 4096;
const CLUSTERS: u64 = 48;
const SIZE: u64 = CLUSTER * CLUSTERS;

#[derive(Debug, Clone)]
enum Op {
    /// Writes `len` bytes of `byte` at `offset`.
    Write {
        offset: u64,
        len: u64,
        byte: u8,
    },
    /// Trims whole clusters `[first, first + count)`.
    Trim {
        first: u64,
        count: u64,
    },
    Snapshot,
    /// Deletes the snapshot at this index (modulo the number of snapshots).
    Delete(usize),
    /// Rolls back to the snapshot at this index, deleting newer ones.
    Rollback(usize),
    /// Closes the volume and opens it again from its files.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SIZE - 1, 1..3 * CLUSTER, any::<u8>()).prop_map(|(offset, len, byte)| Op::Write {
            offset,
            len: len.min(SIZE - offset),
            byte: byte | 1,
        }),
        2 => (0..CLUSTERS, 1..4u64).prop_map(|(first, count)| Op::Trim {
            first,
            count: count.min(CLUSTERS - first),
        }),
        2 => Just(Op::Snapshot),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => any::<usize>().prop_map(Op::Rollback),
        1 => Just(Op::Reopen),
    ]
}

struct ModelSnapshot {
    name: String,
    contents: Vec<u8>,
    /// Clusters changed since this snapshot was taken.
    dirty: BTreeSet<u64>,
    /// The dirty sets of the older snapshots when this one was taken (a rollback to this
    /// one brings them back).
    older_dirty: Vec<(String, BTreeSet<u64>)>,
}

struct Model {
    live: Vec<u8>,
    snapshots: Vec<ModelSnapshot>,
    next: usize,
}

impl Model {
    fn touch(&mut self, first: u64, last: u64) {
        for s in &mut self.snapshots {
            s.dirty.extend(first..last);
        }
    }
}

async fn read_all(b: &SharedBackend) -> Vec<u8> {
    b.read(0, SIZE as usize).await.unwrap().to_vec()
}

fn dirty_clusters(ranges: &[strata::volume::DirtyRange]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for r in ranges {
        assert_eq!(
            r.offset % CLUSTER,
            0,
            "dirty ranges are cluster-aligned: {r:?}"
        );
        out.extend(r.offset / CLUSTER..(r.offset + r.length).div_ceil(CLUSTER));
    }
    out
}

async fn check(volume: &Volume, model: &Model) -> Result<(), TestCaseError> {
    let live = read_all(volume.backend()).await;
    prop_assert!(live == model.live, "live disk differs from the model");
    let listed: Vec<String> = volume
        .snapshots()
        .unwrap()
        .into_iter()
        .rev()
        .map(|s| s.name)
        .collect();
    let expected: Vec<String> = model.snapshots.iter().map(|s| s.name.clone()).collect();
    prop_assert_eq!(&listed, &expected);
    for s in &model.snapshots {
        let export = format!("snap-{}", s.name);
        let b = volume.serve_snapshot(&s.name, &export).unwrap();
        let got = read_all(&b).await;
        volume.unserve(&export);
        prop_assert!(
            got == s.contents,
            "snapshot {} differs from the model",
            s.name
        );
        let dirty = dirty_clusters(&volume.dirty(&s.name).await.unwrap());
        prop_assert_eq!(&dirty, &s.dirty, "dirty clusters since {}", s.name);
        // The live export offers the same answer as a metadata context.
        prop_assert!(volume.backend().dirty_bitmaps().contains(&s.name));
    }
    Ok(())
}

fn run_case(dir: &Path, ops: &[Op]) -> Result<(), TestCaseError> {
    let path: PathBuf = dir.join("disk.strata");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    crate::support::new_image(&path, SIZE, CLUSTER);
    let rt = crate::support::runtime();
    rt.block_on(async {
        let mut volume = Volume::open(&path, false).unwrap();
        let mut model = Model {
            live: vec![0; SIZE as usize],
            snapshots: Vec::new(),
            next: 0,
        };
        for op in ops {
            match op.clone() {
                Op::Write { offset, len, byte } => {
                    let data = vec![byte; len as usize];
                    volume
                        .backend()
                        .write(offset, Bytes::from(data), false)
                        .await
                        .unwrap();
                    model.live[offset as usize..(offset + len) as usize].fill(byte);
                    model.touch(offset / CLUSTER, (offset + len).div_ceil(CLUSTER));
                }
                Op::Trim { first, count } => {
                    volume
                        .backend()
                        .trim(first * CLUSTER, count * CLUSTER, false)
                        .await
                        .unwrap();
                    model.live[(first * CLUSTER) as usize..((first + count) * CLUSTER) as usize]
                        .fill(0);
                    model.touch(first, first + count);
                }
                Op::Snapshot => {
                    let name = format!("s{}", model.next);
                    model.next += 1;
                    let taken = volume.snapshot(&name).await.unwrap();
                    prop_assert_eq!(&taken.snapshot.name, &name);
                    let older_dirty = model
                        .snapshots
                        .iter()
                        .map(|s| (s.name.clone(), s.dirty.clone()))
                        .collect();
                    model.snapshots.push(ModelSnapshot {
                        name,
                        contents: model.live.clone(),
                        dirty: BTreeSet::new(),
                        older_dirty,
                    });
                }
                Op::Delete(i) if !model.snapshots.is_empty() => {
                    let i = i % model.snapshots.len();
                    let gone = model.snapshots.remove(i);
                    volume.delete_snapshot(&gone.name).await.unwrap();
                    // A rollback to a newer snapshot restores older dirty sets; the
                    // deleted one no longer has any.
                    for s in &mut model.snapshots {
                        s.older_dirty.retain(|(n, _)| *n != gone.name);
                    }
                }
                Op::Rollback(i) if !model.snapshots.is_empty() => {
                    let i = i % model.snapshots.len();
                    let name = model.snapshots[i].name.clone();
                    if i + 1 < model.snapshots.len() {
                        // Newer snapshots exist: refused unless allowed to delete them.
                        let refused = volume
                            .rollback(&name, RollbackOptions::default(), 0)
                            .await
                            .unwrap_err();
                        prop_assert_eq!(refused.kind(), strata::ErrorKind::Busy);
                    }
                    // Connected clients refuse it too, unless forced.
                    let refused = volume
                        .rollback(
                            &name,
                            RollbackOptions {
                                force: false,
                                destroy_newer: true,
                            },
                            1,
                        )
                        .await
                        .unwrap_err();
                    prop_assert_eq!(refused.kind(), strata::ErrorKind::Busy);
                    volume
                        .rollback(
                            &name,
                            RollbackOptions {
                                force: true,
                                destroy_newer: true,
                            },
                            1,
                        )
                        .await
                        .unwrap();
                    model.snapshots.truncate(i + 1);
                    let target = &mut model.snapshots[i];
                    target.dirty.clear();
                    model.live = target.contents.clone();
                    let older = target.older_dirty.clone();
                    for s in &mut model.snapshots[..i] {
                        if let Some((_, d)) = older.iter().find(|(n, _)| *n == s.name) {
                            s.dirty = d.clone();
                        }
                    }
                }
                Op::Delete(_) | Op::Rollback(_) => {}
                Op::Reopen => {
                    volume.backend().flush().await.unwrap();
                    drop(volume);
                    volume = Volume::open(&path, false).unwrap();
                }
            }
            check(&volume, &model).await?;
        }
        // Nothing is left behind but the live image, its snapshots and the manifest.
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "disk.strata.snapshots.json")
            .collect();
        files.sort();
        let mut expected: Vec<String> = model
            .snapshots
            .iter()
            .map(|s| format!("disk.strata@{}", s.name))
            .collect();
        expected.push("disk.strata".into());
        expected.sort();
        prop_assert_eq!(files, expected);
        let _ = Arc::strong_count(&volume);
        Ok(())
    })
}

proptest! {
    #![proptest_config(crate::support::proptest_cases(48))]

    #[test]
    fn volumes_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let _images = crate::support::images_open();
        let dir = tempfile::tempdir().unwrap();
        run_case(&dir.path().join("v"), &ops)?;
    }

    /// The same on a filesystem in memory, where reads are zero-copy slices of mappings.
    #[test]
    fn volumes_in_memory_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let Some(base) = crate::support::memory_dir() else {
            return Ok(());
        };
        let _images = crate::support::images_open();
        let dir = tempfile::tempdir_in(base).unwrap();
        run_case(&dir.path().join("v"), &ops)?;
    }
}
