//! Micro-benchmarks of the image engine's cluster lookup: the merged map on its own, and
//! 4 KiB reads through overlay chains of growing depth, all on in-memory storage.
//!
//! Run with `cargo bench --bench overlay_lookup`. The per-read cost should not depend on
//! the depth of the chain: the merged map answers "which layer owns this cluster" with
//! one lookup, built once when the chain is opened (also measured here).

// `criterion_group!` defines a public function without documentation.
#![allow(missing_docs)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use strata::image::format::{Backing, BackingKind, ENTRIES, Header};
use strata::image::map::{MergedMap, entry};
use strata::image::sim::{Rng, SimStorage};
use strata::image::storage::Storage;
use strata::image::{self, Chain, Lower, layer};

/// Lookups per iteration of the map benchmarks.
const LOOKUPS: u64 = 4096;

/// A map of `pages` pages with every cluster mapped to data of its own.
fn full_map(pages: usize) -> MergedMap {
    let mut map = MergedMap::new(pages);
    for cluster in 0..(pages * ENTRIES) as u64 {
        map.set(
            cluster,
            entry::data((cluster % 7) as u16, (cluster + 1) << 12),
        );
    }
    map
}

fn map_get(c: &mut Criterion) {
    let mut group = c.benchmark_group("merged_map_get");
    group.throughput(Throughput::Elements(LOOKUPS));
    // 4 KiB, 1 MiB and 32 MiB of entries: in L1, in L2 and beyond the caches.
    for pages in [1usize, 256, 8192] {
        let map = full_map(pages);
        let clusters = (pages * ENTRIES) as u64;
        let mut rng = Rng::new(pages as u64);
        let random: Vec<u64> = (0..LOOKUPS).map(|_| rng.below(clusters)).collect();
        let sequential: Vec<u64> = (0..LOOKUPS).map(|i| i % clusters).collect();
        for (order, clusters) in [("sequential", &sequential), ("random", &random)] {
            group.bench_with_input(BenchmarkId::new(order, pages), clusters, |b, clusters| {
                b.iter(|| {
                    let mut sum = 0u64;
                    for &cluster in clusters {
                        sum = sum.wrapping_add(map.get(black_box(cluster)));
                    }
                    sum
                })
            });
        }
    }
    group.finish();
}

/// Virtual size of every layer.
const SIZE: u64 = 64 << 20;
/// 4 KiB clusters: one read is one cluster.
const CLUSTER_BITS: u32 = 12;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Every this many clusters the bottom layer holds data.
const STRIDE: u64 = 16;
/// Clusters each layer above the bottom writes.
const PER_LAYER: u64 = 8;

fn layer_path(i: usize) -> PathBuf {
    PathBuf::from(format!("layer{i}.strata"))
}

fn image_id(i: usize) -> [u8; 16] {
    let mut id = [0x5b; 16];
    id[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    id
}

/// One scanned layer of a chain.
struct Built {
    storage: Arc<dyn Storage>,
    path: PathBuf,
}

/// Creates the layers of a chain `depth` Strata images deep on simulated disks. The
/// bottom one holds data every [`STRIDE`] clusters; each one above writes a few clusters
/// of its own, spread over the whole disk so that each adds to many map pages.
fn build_layers(depth: usize) -> Vec<Built> {
    let mut layers: Vec<Built> = Vec::with_capacity(depth);
    let mut lower: Option<Lower> = None;
    for i in 0..depth {
        let backing = (i > 0).then(|| Backing {
            kind: BackingKind::Strata,
            path: layer_path(i - 1).to_string_lossy().into_owned(),
            size: SIZE,
            identity: image_id(i - 1),
        });
        let header = Header {
            sequence: 1,
            virtual_size: SIZE,
            cluster_bits: CLUSTER_BITS,
            incompatible: 0,
            compatible: 0,
            image_id: image_id(i),
            backing,
        };
        let storage: Arc<dyn Storage> = Arc::new(SimStorage::new());
        image::write_new(storage.as_ref(), &header).unwrap();
        let path = layer_path(i);
        let scan = layer::scan(storage.as_ref(), &path).unwrap();
        let chain = Chain::new(Arc::clone(&storage), &path, scan, lower.as_ref(), true).unwrap();
        let clusters = SIZE / CLUSTER;
        if i == 0 {
            for cluster in (0..clusters).step_by(STRIDE as usize) {
                chain
                    .write(
                        cluster * CLUSTER,
                        &[cluster as u8 | 1; CLUSTER as usize],
                        false,
                    )
                    .unwrap();
            }
        } else {
            for k in 0..PER_LAYER {
                // Odd clusters, never those of the bottom layer.
                let cluster = ((i as u64 * 131 + k * 2027) * 2 + 1) % clusters;
                chain
                    .write(cluster * CLUSTER, &[i as u8; CLUSTER as usize], false)
                    .unwrap();
            }
        }
        chain.flush().unwrap();
        drop(chain);
        let scan = layer::scan(storage.as_ref(), &path).unwrap();
        assert!(
            scan.problems.is_empty(),
            "{}: {:?}",
            path.display(),
            scan.problems
        );
        lower = Some(Lower::strata(Arc::clone(&storage), &path, scan, lower.as_ref()).unwrap());
        layers.push(Built { storage, path });
    }
    layers
}

/// Opens `layers` as one chain: scans every layer, merges the maps bottom up and opens
/// the top one read-only.
fn open(layers: &[Built]) -> Chain {
    let (top, below) = layers.split_last().unwrap();
    let mut lower: Option<Lower> = None;
    for l in below {
        let scan = layer::scan(l.storage.as_ref(), &l.path).unwrap();
        lower = Some(Lower::strata(Arc::clone(&l.storage), &l.path, scan, lower.as_ref()).unwrap());
    }
    let scan = layer::scan(top.storage.as_ref(), &top.path).unwrap();
    Chain::new(
        Arc::clone(&top.storage),
        &top.path,
        scan,
        lower.as_ref(),
        false,
    )
    .unwrap()
}

fn chain_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("chain_read_4k");
    group.throughput(Throughput::Elements(1));
    for depth in [1usize, 10, 100] {
        let chain = open(&build_layers(depth));
        assert_eq!(chain.layers().len(), depth);
        let mut buf = vec![0u8; CLUSTER as usize];
        // Data of the bottom layer, seen through every layer above it.
        let offset = 5 * STRIDE * CLUSTER;
        chain.read(offset, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == (5 * STRIDE) as u8 | 1));
        group.bench_function(BenchmarkId::new("bottom_layer_data", depth), |b| {
            b.iter(|| chain.read(black_box(offset), &mut buf).unwrap())
        });
        // A cluster no layer has: zeroes.
        let hole = 2 * STRIDE * CLUSTER + 2 * CLUSTER;
        chain.read(hole, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        group.bench_function(BenchmarkId::new("unallocated", depth), |b| {
            b.iter(|| chain.read(black_box(hole), &mut buf).unwrap())
        });
    }
    group.finish();
}

fn chain_open(c: &mut Criterion) {
    let layers = build_layers(10);
    let mut group = c.benchmark_group("chain_open");
    group.throughput(Throughput::Elements(1));
    group.bench_function("depth_10", |b| b.iter(|| open(black_box(&layers))));
    // The merge alone, from scans already made.
    let scans: Vec<_> = layers
        .iter()
        .map(|l| layer::scan(l.storage.as_ref(), &l.path).unwrap())
        .collect();
    group.bench_function("depth_10_merge_only", |b| {
        b.iter(|| {
            let (top, below) = layers.split_last().unwrap();
            let mut lower: Option<Lower> = None;
            for (l, scan) in below.iter().zip(&scans) {
                lower = Some(
                    Lower::strata(
                        Arc::clone(&l.storage),
                        &l.path,
                        scan.clone(),
                        lower.as_ref(),
                    )
                    .unwrap(),
                );
            }
            Chain::new(
                Arc::clone(&top.storage),
                Path::new(&top.path),
                scans[layers.len() - 1].clone(),
                lower.as_ref(),
                false,
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, map_get, chain_read, chain_open);
criterion_main!(benches);
