//! The image subcommands of the `strata` binary, end to end, a file for each: `create`,
//! `info`, `map` and `check` (clean, corrupt, repaired: `inspect`), `commit` and `rebase`
//! (`chains`), `convert`, and the images the tools refuse (`refused`: another tool's
//! format, a missing or changed backing file, an image being served).
//!
//! Test images are filled through the library (`strata::image`), which is not under test
//! here; everything else goes through the built binary. Contents are compared with byte
//! reads through the library and, where a raw file results, with the file itself. The
//! helpers for both are here.
//!
//! While the library has an image open in this process, it holds `images_open()`, so
//! that no command finds the image locked by a half-started child of another test.

mod chains;
mod convert;
mod create;
mod inspect;
mod refused;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use strata::image::{self, ZeroMode};

use crate::support::{CMD_TIMEOUT, CmdOutput, KIB, images_open, pattern, run_timeout, strata_at};

/// `strata ARGS...` run in `dir`.
fn strata_in(dir: &Path, args: &[&str]) -> CmdOutput {
    let mut cmd = strata_at(dir, args);
    run_timeout(&mut cmd, CMD_TIMEOUT)
}

#[track_caller]
fn strata_ok(dir: &Path, args: &[&str]) -> CmdOutput {
    strata_in(dir, args).assert_success()
}

/// Runs `strata ARGS...` expecting exit status 1 and `needles` in its standard error.
#[track_caller]
fn strata_fails(dir: &Path, args: &[&str], needles: &[&str]) -> CmdOutput {
    strata_in(dir, args).assert_code(1).assert_stderr(needles)
}

#[track_caller]
fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key:?} in {v:#}"))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Writes `data` at each offset into the Strata image at `path`, durably.
fn write_image(path: &Path, writes: &[(u64, &[u8])]) {
    let _images = images_open();
    let chain = image::open(path, true).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    for &(off, data) in writes {
        chain.write(off, data, false).expect("write");
    }
    chain.flush().expect("flush");
}

/// Zeroes ranges of the Strata image at `path` as `mode` says, durably.
fn zero_image(path: &Path, mode: ZeroMode, ranges: &[(u64, u64)]) {
    let _images = images_open();
    let chain = image::open(path, true).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    for &(off, len) in ranges {
        chain.zero(off, len, mode, false).expect("zero");
    }
    chain.flush().expect("flush");
}

/// Every byte the Strata image at `path` (with its chain) reads.
fn read_image(path: &Path) -> Vec<u8> {
    let _images = images_open();
    let chain = image::open(path, false).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read(0, &mut buf).expect("read");
    buf
}

/// Applies a write to the expected contents.
fn put(expected: &mut [u8], off: u64, data: &[u8]) {
    expected[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn zeroed(expected: &mut [u8], off: u64, len: u64) {
    expected[off as usize..(off + len) as usize].fill(0);
}

/// A raw file of `len` bytes of pseudo-random data.
fn raw_file(path: &Path, seed: u64, len: usize) -> Vec<u8> {
    let data = pattern(seed, len);
    fs::write(path, &data).unwrap();
    data
}

/// A sparse raw file of `len` bytes holding `pieces` and holes elsewhere.
fn sparse_raw(path: &Path, len: u64, pieces: &[(u64, &[u8])]) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    let mut expected = vec![0u8; len as usize];
    for &(off, data) in pieces {
        f.write_all_at(data, off).unwrap();
        put(&mut expected, off, data);
    }
    expected
}

fn disk_usage(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

fn info_json(dir: &Path, image: &Path) -> Value {
    strata_ok(dir, &["info", "--json", p(image)]).json()
}

/// `strata map --json` as (offset, length, state, depth) rows.
fn map_rows(dir: &Path, image: &Path) -> Vec<(u64, u64, String, u64)> {
    let v = strata_ok(dir, &["map", "--json", p(image)]).json();
    v.as_array()
        .unwrap_or_else(|| panic!("map --json is not an array: {v:#}"))
        .iter()
        .map(|e| {
            (
                num(e, "offset"),
                num(e, "length"),
                e["state"].as_str().expect("state").to_owned(),
                num(e, "depth"),
            )
        })
        .collect()
}

/// Asserts `strata check` exits 0 and reports no errors.
#[track_caller]
fn assert_clean(dir: &Path, image: &Path) {
    let out = strata_ok(dir, &["check", p(image)]);
    assert!(
        out.stdout.contains("no errors"),
        "check of a clean image\n{}",
        out.report()
    );
    let v = strata_ok(dir, &["check", "--json", p(image)]).json();
    assert_eq!(v["problems"], Value::Array(vec![]), "{v:#}");
    assert_eq!(v["backing_problems"], Value::Array(vec![]), "{v:#}");
}

const CS: u64 = 64 * KIB;

/// A three-layer chain: raw base (8 clusters of data, then a hole) <- mid.strata
/// (data in cluster 2, a zero cluster at 3) <- top.strata (data in cluster 5, zero at
/// 6), 16 clusters long. Returns (base, mid, top) paths.
fn three_layers(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = d.join("base.raw");
    let data = pattern(3, 8 * CS as usize);
    sparse_raw(&base, 16 * CS, &[(0, &data)]);
    let mid = d.join("mid.strata");
    let top = d.join("top.strata");
    strata_ok(d, &["create", "-b", "base.raw", "mid.strata"]);
    write_image(&mid, &[(2 * CS, &[0x22; CS as usize])]);
    zero_image(&mid, ZeroMode::Zero, &[(3 * CS, CS)]);
    strata_ok(d, &["create", "-b", "mid.strata", "top.strata"]);
    write_image(&top, &[(5 * CS, &[0x55; CS as usize])]);
    zero_image(&top, ZeroMode::Zero, &[(6 * CS, CS)]);
    (base, mid, top)
}
