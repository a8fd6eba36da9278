//! Volumes with history driven through the library on simulated files: every retained
//! restore point reads what was written up to it, whatever the writes, rollbacks,
//! checkpoints, reopenings and expiries (`model`); and after a crash at any moment the
//! volume is an exact prefix of the write stream holding every write acknowledged as
//! durable (`crash`).

mod crash;
mod model;
mod space;

use std::path::Path;
use std::sync::Arc;

use strata::history::History;
use strata::history::files::{Files, SimFiles};
use strata::history::manifest::{FORMAT, Manifest};
use strata::image::format::Header;
use strata::image::sim::{Rng, SimStorage};
use strata::image::storage::Storage;
use strata::image::{self, Chain, layer};

/// The disk of the tests: 16 blocks, small enough to copy at every point.
const SIZE: u64 = 64 * 1024;

/// A base image in memory whose bytes are not zero, so that reads falling through to it
/// are told apart from zeroes.
fn base() -> Arc<SimStorage> {
    let storage = Arc::new(SimStorage::new());
    let header = Header {
        sequence: 1,
        virtual_size: SIZE,
        cluster_bits: 12,
        incompatible: 0,
        compatible: 0,
        image_id: [9; 16],
        backing: None,
    };
    image::write_new(storage.as_ref(), &header).unwrap();
    let chain = open_base(Arc::clone(&storage), true);
    let fill: Vec<u8> = (0..SIZE / 2).map(|i| (i % 251) as u8 | 0x80).collect();
    chain.write(0, &fill, false).unwrap();
    chain.flush().unwrap();
    storage
}

fn open_base(storage: Arc<SimStorage>, writable: bool) -> Chain {
    let s: Arc<dyn Storage> = storage;
    let scan = layer::scan(s.as_ref(), Path::new("base.strata")).unwrap();
    Chain::new(s, Path::new("base.strata"), scan, None, writable).unwrap()
}

/// A new volume in simulated files over `base`, with restore points kept for `window`
/// seconds and 64 KiB segments (so that the log spans several).
fn create(base: &Arc<SimStorage>, window: u64) -> Arc<SimFiles> {
    let files = Arc::new(SimFiles::new());
    let manifest = Manifest {
        format: FORMAT,
        id: "00112233445566778899aabbccddeeff".into(),
        size: SIZE,
        created_us: 0,
        window_secs: window,
        max_bytes: None,
        segment_bytes: 1 << 20,
        snapshots: Vec::new(),
    };
    manifest.store(files.as_ref()).unwrap();
    let _ = open_base(Arc::clone(base), false);
    files
}

fn open(files: &Arc<SimFiles>, base: &Arc<SimStorage>) -> Arc<History> {
    let f: Arc<dyn Files> = Arc::clone(files) as Arc<dyn Files>;
    Arc::new(History::open_files(f, open_base(Arc::clone(base), false), false).unwrap())
}

fn read_all(h: &History) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    h.read(0, &mut buf).unwrap();
    buf
}

/// Deterministic non-zero bytes for write `seed`.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| (rng.next_u64() as u8) | 1).collect()
}
