//! Space: data a crash left uncommitted becomes free space that may hold anything; writes
//! that need new clusters fail with `NoSpace` when the disk is full, as does a flush that
//! needs a new map page pair, and neither disturbs what was written before; zeroing
//! allocates only when told to; freed space stays unused while a zero-copy read points
//! into it.

use std::path::Path;
use std::sync::Arc;

use strata::ErrorKind;
use strata::image::chain::RangeState;
use strata::image::format;
use strata::image::sim::{Rng, SimStorage};
use strata::image::storage::Storage;
use strata::image::{self, Chain, ZeroMode, layer};

use crate::support::{images_open, scratch};

use super::{TOP, create, header, open_rw, open_sim, pattern, read_at};

// ---------------------------------------------------------------------------------------
// Reusing space a crash left behind

/// A guest may store anything, valid Strata map pages included (a VM keeping Strata
/// images on its disk). Data written but never committed is free space after a crash,
/// and free space becomes new map page pairs: a page there must never be taken for one
/// of the image's own.
#[test]
fn page_like_guest_data_in_reused_space_is_never_taken_for_a_map_page() {
    let h = header(4 << 20, 12, 1, None);
    let disk = SimStorage::new();
    image::write_new(&disk, &h).unwrap();
    let disk: Arc<dyn Storage> = Arc::new(disk);
    let chain = open_sim(disk.clone(), None, "fresh");
    chain.write(0, &pattern(1, 0, 4096), true).unwrap();
    // Cluster 2 holds what looks like version 1000 of map page 1, mapping its first
    // cluster (510) onto cluster 0's data.
    let host0 = chain.ranges(0, 4096).unwrap()[0].host.unwrap();
    let mut entries = [0u64; format::ENTRIES];
    entries[0] = format::Entry::Data(host0).encode();
    let fake = format::encode_page(format::PageKind::L2, 1, 1000, &entries);
    chain.write(4096, &pattern(2, 4096, 4096), false).unwrap();
    chain.write(8192, &fake[..], false).unwrap();
    drop(chain);

    // The process dies before a flush; its writes reach the disk, its map does not.
    let disk: Arc<dyn Storage> = Arc::new(SimStorage::with_contents(disk.view().unwrap().to_vec()));
    let chain = open_sim(disk.clone(), None, "after the crash");
    // Zeroing a cluster of page 1 gives that page a page pair, in the space left free.
    chain.zero(511 * 4096, 4096, ZeroMode::Zero, true).unwrap();
    drop(chain);

    let disk: Arc<dyn Storage> = Arc::new(SimStorage::with_contents(disk.view().unwrap().to_vec()));
    let chain = open_sim(disk, None, "reopened");
    let mut buf = vec![0u8; 4096];
    chain.read(510 * 4096, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "cluster 510 reads another cluster's data"
    );
    chain.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(1, 0, 4096));
}

// ---------------------------------------------------------------------------------------
// Running out of space

/// Asserts that `disk` scans clean and, after a crash, still holds `expected` at each
/// offset.
fn assert_survives(disk: &SimStorage, expected: &[(u64, Vec<u8>)], what: &str) {
    let scan = layer::scan(disk, Path::new(TOP)).unwrap();
    assert!(scan.problems.is_empty(), "{what}: {:?}", scan.problems);
    let mut rng = Rng::new(5);
    for i in 0..8 {
        let crashed: Arc<dyn Storage> = Arc::new(disk.crash(&mut rng));
        let chain = open_sim(crashed, None, &format!("{what}, crash {i}"));
        for (at, data) in expected {
            assert!(
                read_at(&chain, *at, data.len() as u64) == *data,
                "{what}, crash {i}: the data at {at} is gone"
            );
        }
    }
}

/// A fresh 4 MiB image with 4 KiB clusters on a simulated disk, opened, holding `len`
/// bytes of data at offset 0, committed; the disk then has room for `room` more bytes
/// only. Returns the disk, the image and the data.
fn nearly_full_sim_image(len: u64, room: u64) -> (Arc<SimStorage>, Chain, Vec<u8>) {
    let sim = Arc::new(SimStorage::new());
    image::write_new(sim.as_ref(), &header(4 << 20, 12, 1, None)).unwrap();
    let chain = open_sim(sim.clone(), None, "fresh");
    let first = pattern(1, 0, len);
    chain.write(0, &first, true).unwrap();
    sim.set_capacity(Some(sim.len().unwrap() + room));
    (sim, chain, first)
}

/// Asserts that `err` says the disk holding the image is full, naming the image.
#[track_caller]
fn assert_no_space(err: &strata::Error) {
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert!(err.to_string().contains(TOP), "{err}");
}

#[test]
fn running_out_of_space_fails_writes_cleanly_and_keeps_the_image_sound() {
    const CS: u64 = 4096;
    // Ten clusters, flushed: the first map page has its pair now. Then room for three
    // more clusters.
    let (sim, chain, first) = nearly_full_sim_image(10 * CS, 3 * CS);
    let three = pattern(2, 20 * CS, 3 * CS);
    chain.write(20 * CS, &three, false).unwrap();
    let mut expected = first.clone();
    // The last write also covers a cluster the image holds: a failed write may leave its
    // own range old or new, byte by byte, and nothing else changes.
    for (at, len) in [(30 * CS, CS), (40 * CS + 5, 10), (9 * CS + 100, 2 * CS)] {
        let data = pattern(3, at, len);
        let err = chain
            .write(at, &data, false)
            .expect_err("a write needing a new cluster");
        assert_no_space(&err);
        let end = (at + len).min(10 * CS);
        if at < end {
            let got = read_at(&chain, at, end - at);
            let old = &mut expected[at as usize..end as usize];
            for (i, (o, g)) in old.iter_mut().zip(got).enumerate() {
                assert!(
                    g == *o || g == data[i],
                    "byte at {} after a failed write",
                    at + i as u64
                );
                *o = g;
            }
        }
    }
    // Clusters the image holds are still written in place, and trimming needs no space.
    let in_place = pattern(4, 100, 50);
    chain.write(100, &in_place, false).unwrap();
    chain.zero(5 * CS, CS, ZeroMode::Trim, false).unwrap();
    chain.flush().expect("a flush that needs no new space");

    expected[100..150].copy_from_slice(&in_place);
    expected[5 * CS as usize..6 * CS as usize].fill(0);
    assert!(read_at(&chain, 0, 10 * CS) == expected);
    assert!(read_at(&chain, 20 * CS, 3 * CS) == three);
    let kept = [(0, expected.clone()), (20 * CS, three.clone())];
    assert_survives(&sim, &kept, "after running out of space");

    // The trimmed cluster's space is free again once the trim is committed.
    let reused = pattern(5, 30 * CS, CS);
    chain.write(30 * CS, &reused, true).unwrap();
    assert!(read_at(&chain, 0, 10 * CS) == expected);
    let kept = [(0, expected), (20 * CS, three), (30 * CS, reused)];
    assert_survives(&sim, &kept, "after reusing the trimmed cluster");
}

#[test]
fn running_out_of_space_in_a_flush_keeps_the_last_commit() {
    const CS: u64 = 4096;
    // Room for one cluster: a write to the second map page fits, the page pair its
    // commit needs does not.
    let (sim, chain, first) = nearly_full_sim_image(3 * CS, CS);
    let far = pattern(2, 600 * CS, CS);
    chain.write(600 * CS, &far, false).unwrap();
    for _ in 0..2 {
        assert_no_space(&chain.flush().expect_err("a flush needing a new page pair"));
        // The engine still reads what was written, and the disk holds the last commit.
        assert!(read_at(&chain, 600 * CS, CS) == far);
        assert_survives(&sim, &[(0, first.clone())], "after a failed flush");
    }

    // With space again, the same flush goes through, and what the failed one had
    // reserved is not handed out twice.
    sim.set_capacity(None);
    chain.flush().unwrap();
    assert_survives(
        &sim,
        &[(0, first.clone()), (600 * CS, far.clone())],
        "after the retried flush",
    );
    let more = pattern(3, 700 * CS, 4 * CS);
    chain.write(700 * CS, &more, true).unwrap();
    let kept = [(0, first), (600 * CS, far), (700 * CS, more)];
    assert_survives(&sim, &kept, "after writing on");
}

// ---------------------------------------------------------------------------------------
// Zeroing without allocating; freed space pinned by zero-copy reads

#[test]
fn zeroing_part_of_a_cluster_that_reads_as_zeroes_allocates_nothing() {
    const CS: u64 = 64 * 1024;
    let _images = images_open();
    let (_dir, path) = scratch("disk.strata");
    create(&path, Some(16 * CS), Some(CS), None);
    let chain = open_rw(&path);
    chain.zero(CS + 512, 4096, ZeroMode::Trim, false).unwrap();
    chain
        .zero(3 * CS + 100, 9000, ZeroMode::Zero, false)
        .unwrap();
    // The same clusters over a whole-cluster zero: still nothing to allocate.
    chain.zero(5 * CS, CS, ZeroMode::Zero, false).unwrap();
    chain.zero(5 * CS + 10, 100, ZeroMode::Trim, false).unwrap();
    chain.flush().unwrap();
    let ranges = chain.ranges(0, 16 * CS).unwrap();
    assert!(
        ranges.iter().all(|r| r.state != RangeState::Data),
        "zeroing allocated data clusters: {ranges:?}"
    );
    // With NO_HOLE the storage must be allocated.
    chain
        .zero(7 * CS + 100, 4096, ZeroMode::ZeroNoHole, false)
        .unwrap();
    let ranges = chain.ranges(7 * CS, CS).unwrap();
    assert_eq!(ranges[0].state, RangeState::Data, "{ranges:?}");
}

/// Zero-copy reads point into the image file. Space freed by a trim must not be reused
/// for other data while such a read's bytes are still waiting to be sent, and must be
/// reused once they are gone.
#[test]
fn zero_copy_reads_keep_freed_space_from_reuse_until_dropped() {
    let Some(shm) = crate::support::memory_dir() else {
        return;
    };
    let dir = tempfile::tempdir_in(shm).unwrap();
    const CS: u64 = 64 * 1024;
    let path = dir.path().join("disk.strata");
    create(&path, Some(64 * CS), Some(CS), None);
    let chain = open_rw(&path);
    assert!(chain.in_memory());
    let old = pattern(1, 0, CS);
    chain.write(0, &old, false).unwrap();
    chain.flush().unwrap();
    // The test reads the mapped bytes itself: nothing truncates this file.
    let chunks = chain.read_sparse_for_kernel(0, CS as usize).unwrap();
    let held: Vec<u8> = chunks
        .iter()
        .flat_map(|c| match c {
            strata::block::ReadChunk::Data(d) => d.to_vec(),
            strata::block::ReadChunk::Zero(n) => vec![0; *n as usize],
        })
        .collect();
    assert_eq!(held, old);
    let (used_before, _) = chain.space().unwrap();

    // Free the cluster and commit: its space is now free, but pinned by `chunks`.
    chain.zero(0, CS, ZeroMode::Trim, false).unwrap();
    chain.flush().unwrap();
    let new = pattern(2, 10 * CS, CS);
    chain.write(10 * CS, &new, false).unwrap();
    // The trim may have punched the old data away (a read concurrent with a trim may
    // return zeroes), but the pending read must never show another offset's data.
    for c in &chunks {
        if let strata::block::ReadChunk::Data(d) = c {
            let zeroes = d.iter().all(|&b| b == 0);
            assert!(
                zeroes || d[..] == old[..],
                "a pending zero-copy read saw reused space"
            );
        }
    }
    let (used_pinned, _) = chain.space().unwrap();
    assert!(used_pinned > used_before, "the pinned cluster was reused");

    // Once the read is gone, the next allocation reuses the freed cluster.
    drop(chunks);
    chain
        .write(20 * CS, &pattern(3, 20 * CS, CS), false)
        .unwrap();
    let (used_after, _) = chain.space().unwrap();
    assert_eq!(
        used_after, used_pinned,
        "freed space was not reused after the read"
    );
    assert_eq!(read_at(&chain, 10 * CS, CS), new);
    assert_eq!(read_at(&chain, 0, CS), vec![0; CS as usize]);
}
