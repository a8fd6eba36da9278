//! Strata images served to real clients: `qemu-img convert`/`compare` in and out of a
//! Strata export and `qemu-io` on an overlay (`qemu`), `qemu-img map` and `nbdinfo --map`
//! (both contexts) over a three-layer chain (`maps`), one server holding a golden
//! image's overlays written concurrently by several clients, then `strata commit`
//! (`golden`), clients sharing the clusters of one overlay (`shared_clusters`), and a
//! server that runs out of file space (`space`). Uses only options qemu 7.2 already has
//! (`scripts/test.sh` runs this module with qemu-img 7.2 as well).

mod golden;
mod maps;
mod qemu;
mod shared_clusters;
mod space;

use std::fs;
use std::path::Path;

use crate::support::{KIB, strata_at_ok};

const CS: u64 = 64 * KIB;

#[track_caller]
fn assert_clean(dir: &Path, image: &str) {
    strata_at_ok(dir, &["check", image]).assert_stdout(&["no errors"]);
}

/// The contents of a Strata image (with its chain), through `strata convert -O raw`.
fn contents(dir: &Path, image: &str) -> Vec<u8> {
    let out = dir.join(format!("{image}.contents.raw"));
    let _ = fs::remove_file(&out);
    strata_at_ok(dir, &["convert", "-O", "raw", image, out.to_str().unwrap()]);
    let data = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    data
}

fn put(buf: &mut [u8], off: u64, data: &[u8]) {
    buf[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn fill(buf: &mut [u8], off: u64, len: u64, byte: u8) {
    buf[off as usize..(off + len) as usize].fill(byte);
}
