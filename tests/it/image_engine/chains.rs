//! Chains of real files: 100 layers deep, a 16 TiB image that stays small, and many
//! overlays of one base open at once, sharing it.

use std::path::PathBuf;
use std::sync::Arc;

use strata::block::DepthExtent;
use strata::image::{self, Chain, ZeroMode};

use crate::support::{images_open, scratch};

use super::{create, open_rw, pattern, read_at};

/// What `allocation_depth` must say, from the depth of each cluster.
fn depth_runs(cs: u64, size: u64, depth_of: impl Fn(u64) -> u32) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for c in 0..size.div_ceil(cs) {
        let len = cs.min(size - c * cs);
        match out.last_mut() {
            Some((l, d)) if *d == depth_of(c) => *l += len,
            _ => out.push((len, depth_of(c))),
        }
    }
    out
}

#[test]
fn a_chain_100_layers_deep_opens_and_reads_through_every_layer() {
    const LAYERS: u64 = 100;
    const CS: u64 = 4096;
    let size = (LAYERS + 20) * CS + 1234;
    let _images = images_open();
    let dir = tempfile::tempdir().unwrap();
    let path = |k: u64| dir.path().join(format!("layer{k:03}.strata"));
    // Layer k (1 at the bottom) writes cluster k, and appends to cluster 0 a few bytes of
    // its own (copying up the rest); layer 50 zeroes cluster 20, hiding layer 20's data.
    let mut c0 = vec![0u8; CS as usize];
    for k in 1..=LAYERS {
        match k {
            1 => create(&path(k), Some(size), Some(CS), None),
            _ => create(&path(k), None, None, Some(&path(k - 1))),
        }
        let chain = open_rw(&path(k));
        assert_eq!(chain.layers().len() as u64, k);
        chain.write(k * CS, &pattern(k, k * CS, CS), false).unwrap();
        let at = k * 10;
        chain.write(at, &pattern(k, at, 10), false).unwrap();
        c0[at as usize..at as usize + 10].copy_from_slice(&pattern(k, at, 10));
        if k == 50 {
            chain.zero(20 * CS, CS, ZeroMode::Zero, false).unwrap();
        }
        chain.flush().unwrap();
    }

    for writable in [false, true] {
        let top = image::open(&path(LAYERS), writable).unwrap();
        assert_eq!(top.layers().len() as u64, LAYERS);
        assert_eq!(top.size(), size);
        assert!(read_at(&top, 0, CS) == c0, "cluster 0");
        for k in 1..=LAYERS {
            let got = read_at(&top, k * CS, CS);
            if k == 20 {
                assert!(got.iter().all(|&b| b == 0), "cluster 20 is hidden");
            } else {
                assert!(got == pattern(k, k * CS, CS), "cluster {k}");
            }
        }
        // Layer k is at depth LAYERS - k + 1; layer 50 owns cluster 20; cluster 0 is the
        // top's; nothing owns the clusters past the last layer's.
        let expected = depth_runs(CS, size, |c| match c {
            0 => 1,
            20 => (LAYERS - 50 + 1) as u32,
            c if c <= LAYERS => (LAYERS - c + 1) as u32,
            _ => 0,
        });
        let runs = |extents: Vec<DepthExtent>| -> Vec<(u64, u32)> {
            extents.iter().map(|e| (e.length, e.depth)).collect()
        };
        assert_eq!(runs(top.allocation_depth(0, size).unwrap()), expected);
        assert_eq!(
            runs(top.allocation_depth(37 * CS + 5, 2 * CS).unwrap()),
            vec![(CS - 5, 64), (CS, 63), (5, 62)]
        );
    }
}

#[test]
fn a_16_tib_image_with_writes_far_apart_stays_small() {
    const TIB: u64 = 1 << 40;
    const GIB: u64 = 1 << 30;
    let size = 16 * TIB;
    let _images = images_open();
    let (_dir, path) = scratch("huge.strata");
    create(&path, Some(size), None, None);
    let writes = [
        (0, 10),
        (3 * GIB + 5, 5000),
        (GIB * 1000 - 100, 200),
        (7 * TIB + 12345, 70000),
        (size - 10, 10),
    ];
    {
        let chain = open_rw(&path);
        for (i, &(at, len)) in writes.iter().enumerate() {
            chain.write(at, &pattern(i as u64, at, len), false).unwrap();
        }
        chain.flush().unwrap();
    }
    let chain = image::open(&path, false).unwrap();
    assert_eq!(chain.size(), size);
    for (i, &(at, len)) in writes.iter().enumerate() {
        assert!(
            read_at(&chain, at, len) == pattern(i as u64, at, len),
            "write {i}"
        );
        // Around each write the disk reads as zeroes.
        let before = at.saturating_sub(3);
        assert!(read_at(&chain, before, at - before).iter().all(|&b| b == 0));
    }
    // Data exactly where the writes went, in whole clusters; holes elsewhere.
    let cs = chain.cluster_size();
    let mut clusters: Vec<u64> = writes
        .iter()
        .flat_map(|&(at, len)| at / cs..(at + len).div_ceil(cs))
        .collect();
    clusters.dedup();
    let data: Vec<(u64, u64)> = chain
        .block_status(0, size)
        .unwrap()
        .iter()
        .scan(0, |pos, e| {
            let start = *pos;
            *pos += e.length;
            Some((start, *e))
        })
        .filter(|(_, e)| !e.hole)
        .map(|(start, e)| (start, e.length))
        .collect();
    let expected: Vec<(u64, u64)> = clusters
        .iter()
        .map(|&c| (c * cs, cs.min(size - c * cs)))
        .fold(Vec::new(), |mut v: Vec<(u64, u64)>, (s, l)| {
            match v.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => v.push((s, l)),
            }
            v
        });
    assert_eq!(data, expected);

    // The file holds the header, the map table (sparse but for one empty version per L1
    // page), the clusters written and their map pages.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&path).unwrap();
    let h = chain.header();
    let mapped = clusters.len() as u64 * cs + writes.len() as u64 * 2 * 4096;
    assert!(
        meta.len() <= h.data_start() + mapped,
        "file length {} for a map table ending at {}",
        meta.len(),
        h.data_start()
    );
    let usage = meta.blocks() * 512;
    let expected_usage = 2 * 4096 + 2 * 4096 * h.l1_pages() + mapped;
    assert!(
        usage <= expected_usage + (1 << 20),
        "{usage} bytes on disk, about {expected_usage} expected"
    );
}

#[test]
fn many_overlays_of_one_base_open_at_once_share_it() {
    const OVERLAYS: u64 = 32;
    const CS: u64 = 65536;
    let size = 40 * CS + 77;
    let _images = images_open();
    let dir = tempfile::tempdir().unwrap();
    for golden_kind in ["raw", "strata"] {
        let golden = dir.path().join(format!("golden.{golden_kind}"));
        let contents = pattern(1, 0, size);
        if golden_kind == "raw" {
            std::fs::write(&golden, &contents).unwrap();
        } else {
            create(&golden, Some(size), Some(CS), None);
            let chain = open_rw(&golden);
            chain.write(0, &contents, true).unwrap();
        }
        let before = std::fs::read(&golden).unwrap();
        let tops: Vec<PathBuf> = (0..OVERLAYS)
            .map(|i| {
                let p = dir.path().join(format!("{golden_kind}-vm{i}.strata"));
                create(&p, None, Some(CS), Some(&golden));
                p
            })
            .collect();
        let chains: Vec<Chain> = tops.iter().map(|p| open_rw(p)).collect();
        // One base, opened once, under every overlay.
        for c in &chains[1..] {
            assert!(Arc::ptr_eq(&c.layers()[0], &chains[0].layers()[0]));
        }
        // Held read-only and shared: nobody may open it for writing meanwhile.
        let busy = image::open(&golden, true)
            .map(drop)
            .map_err(|e| e.to_string());
        if golden_kind == "strata" {
            let e = busy.expect_err("the base is in use");
            assert!(
                e.contains("in use") && e.contains(golden.to_str().unwrap()),
                "{e}"
            );
        }
        // Each overlay writes on its own: a whole cluster and a partial one.
        for (i, c) in chains.iter().enumerate() {
            let i = i as u64;
            c.write(3 * CS, &pattern(100 + i, 3 * CS, CS), false)
                .unwrap();
            c.write(
                7 * CS + i * 100,
                &pattern(200 + i, 7 * CS + i * 100, 50),
                false,
            )
            .unwrap();
        }
        for (i, c) in chains.iter().enumerate() {
            let i = i as u64;
            let mut expected = contents.clone();
            expected[3 * CS as usize..4 * CS as usize].copy_from_slice(&pattern(
                100 + i,
                3 * CS,
                CS,
            ));
            let at = (7 * CS + i * 100) as usize;
            expected[at..at + 50].copy_from_slice(&pattern(200 + i, at as u64, 50));
            assert!(read_at(c, 0, size) == expected, "overlay {i}");
            c.flush().unwrap();
        }
        drop(chains);
        assert!(
            std::fs::read(&golden).unwrap() == before,
            "the base was modified"
        );
        // Closing the overlays lets go of the base.
        if golden_kind == "strata" {
            drop(open_rw(&golden));
        }
        // Reopened, each still has its own writes.
        let c = image::open(&tops[5], false).unwrap();
        assert!(read_at(&c, 3 * CS, CS) == pattern(105, 3 * CS, CS));
    }
}

#[test]
fn overlays_of_different_templates_share_the_base_under_them() {
    let _images = images_open();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    create(&p("golden.strata"), Some(1 << 20), None, None);
    open_rw(&p("golden.strata"))
        .write(0, &pattern(1, 0, 1 << 20), true)
        .unwrap();
    for t in ["t1", "t2"] {
        create(&p(t), None, None, Some(&p("golden.strata")));
        open_rw(&p(t)).write(4096, &[7; 100], true).unwrap();
        create(&p(&format!("{t}-vm")), None, None, Some(&p(t)));
    }
    let a = open_rw(&p("t1-vm"));
    let b = open_rw(&p("t2-vm"));
    assert_eq!(a.layers().len(), 3);
    assert!(Arc::ptr_eq(&a.layers()[0], &b.layers()[0]));
    assert!(!Arc::ptr_eq(&a.layers()[1], &b.layers()[1]));
    assert!(read_at(&a, 0, 1 << 20) == read_at(&b, 0, 1 << 20));
}
