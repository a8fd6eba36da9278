//! The Strata image engine driven through the library, without a server. By theme:
//! crash safety on simulated disks (`crash`), running out of space and what happens to
//! freed space (`space`), chains of real files (`chains`), damaged, foreign and
//! mismatched files (`damaged`), and the metadata codecs with the seed corpus of the
//! `image_meta` fuzz target (`codecs`). What they share lives here: the test data, a
//! header, and ways to open, read and refuse images.

mod chains;
mod codecs;
mod crash;
mod damaged;
mod space;

use std::path::Path;
use std::sync::Arc;

use strata::ErrorKind;
use strata::image::format::{Backing, Header};
use strata::image::storage::Storage;
use strata::image::{self, Chain, CreateOptions, Lower, layer};

/// Deterministic, never-zero byte for write `seed` at virtual offset `pos`: every write
/// leaves its own bytes, so data that lands in the wrong place is recognised.
fn pat(seed: u64, pos: u64) -> u8 {
    let x = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ pos.wrapping_mul(0xd6e8_feb8_6659_fd93))
        .wrapping_mul(0x2545_f491_4f6c_dd1d);
    ((x >> 40) as u8) | 1
}

/// The bytes write `seed` puts at `[at, at + len)`.
fn pattern(seed: u64, at: u64, len: u64) -> Vec<u8> {
    (at..at + len).map(|p| pat(seed, p)).collect()
}

const TOP: &str = "top.strata";

fn header(size: u64, cluster_bits: u32, id: u8, backing: Option<Backing>) -> Header {
    Header {
        sequence: 1,
        virtual_size: size,
        cluster_bits,
        incompatible: 0,
        compatible: 0,
        image_id: [id; 16],
        backing,
    }
}

/// Scans `storage` and opens it as the top of `lower`, insisting on a clean scan.
fn open_sim(storage: Arc<dyn Storage>, lower: Option<&Lower>, what: &str) -> Chain {
    let scan = layer::scan(storage.as_ref(), Path::new(TOP))
        .unwrap_or_else(|e| panic!("{what}: the image does not scan: {e}"));
    assert!(
        scan.problems.is_empty(),
        "{what}: the scan finds problems: {:?}",
        scan.problems
    );
    Chain::new(storage, Path::new(TOP), scan, lower, true)
        .unwrap_or_else(|e| panic!("{what}: the image does not open: {e}"))
}

/// Reads `len` bytes at `at`.
fn read_at(chain: &Chain, at: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    chain
        .read(at, &mut buf)
        .unwrap_or_else(|e| panic!("read at {at}+{len}: {e}"));
    buf
}

fn create(path: &Path, size: Option<u64>, cluster: Option<u64>, backing: Option<&Path>) {
    image::create(
        path,
        &CreateOptions {
            size,
            cluster_size: cluster,
            backing: backing.map(Path::to_path_buf),
        },
    )
    .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

fn open_rw(path: &Path) -> Chain {
    image::open(path, true).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Asserts that `r` failed with `kind`, naming `file` and saying each of `words`.
#[track_caller]
fn refused<T>(r: strata::Result<T>, kind: ErrorKind, file: &Path, words: &[&str]) -> String {
    let Err(e) = r else {
        panic!("{} was accepted", file.display())
    };
    let text = e.to_string();
    assert_eq!(e.kind(), kind, "{text}");
    assert!(
        text.contains(file.to_str().unwrap()),
        "{text:?} does not name {}",
        file.display()
    );
    for w in words {
        assert!(text.contains(w), "{text:?} does not say {w:?}");
    }
    text
}
