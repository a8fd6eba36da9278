//! The image subcommands of the `strata` binary, end to end: `create`, `info`, `map`,
//! `check` (clean, corrupt, repaired), `commit`, `rebase`, `convert`, and `serve`
//! refusing images it must not open (another tool's format, a missing or changed backing
//! file).
//!
//! Test images are filled through the library (`strata::image`), which is not under test
//! here; everything else goes through the built binary. Contents are compared with byte
//! reads through the library and, where a raw file results, with the file itself.
//!
//! While the library has an image open in this process, it holds `images_open()`, so
//! that no command finds the image locked by a half-started child of another test.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;
use serde_json::Value;
use strata::image::{self, ZeroMode};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------------------

#[test]
fn create_sizes_and_cluster_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&str, u64, Option<&str>, u64)] = &[
        ("1G", 1 << 30, None, 64 * KIB),
        ("12345", 12345, Some("4K"), 4 * KIB),
        ("100M", 100 * MIB, Some("2M"), 2 * MIB),
        ("3T", 3 << 40, Some("65536"), 64 * KIB),
        ("5000K", 5000 * KIB, Some("16KiB"), 16 * KIB),
    ];
    for (i, &(size, bytes, cluster, cs)) in cases.iter().enumerate() {
        let img = d.join(format!("img{i}.strata"));
        let mut args = vec!["create", p(&img), "--size", size, "--json"];
        if let Some(c) = cluster {
            args.extend(["--cluster-size", c]);
        }
        let created = strata_ok(d, &args).json();
        assert_eq!(num(&created, "virtual_size"), bytes, "{created:#}");
        assert_eq!(num(&created, "cluster_size"), cs, "{created:#}");
        assert_eq!(created["backing"], Value::Null);
        let info = info_json(d, &img);
        assert_eq!(info["format"], "strata");
        assert_eq!(num(&info, "virtual_size"), bytes);
        assert_eq!(num(&info, "cluster_size"), cs);
        assert_eq!(num(&info, "allocated"), 0);
        assert_eq!(info["image_id"], created["image_id"]);
        // An empty image is its header and map table: no space per virtual byte.
        assert!(
            fs::metadata(&img).unwrap().len() < 4 * MIB,
            "a new {size} image takes {} bytes",
            fs::metadata(&img).unwrap().len()
        );
        assert_clean(d, &img);
    }
    // Text output.
    let img = d.join("text.strata");
    strata_ok(d, &["create", p(&img), "-s", "20M"])
        .assert_stdout(&["20 MiB virtual", "64 KiB clusters"]);
    // Two images never share an identity.
    let a = info_json(d, &d.join("img0.strata"));
    let b = info_json(d, &d.join("img1.strata"));
    assert_ne!(a["image_id"], b["image_id"]);
}

#[test]
fn create_rejects_bad_cluster_sizes_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("bad.strata");
    for cs in ["3000", "1K", "2048", "4M", "0", "96K"] {
        strata_fails(
            d,
            &["create", p(&img), "--size", "1M", "--cluster-size", cs],
            &["cluster size", "power of two from 4 KiB to 2 MiB"],
        );
        assert!(!img.exists(), "a refused create left {img:?} behind");
    }
    strata_fails(d, &["create", p(&img)], &["a size is needed"]);
    assert!(!img.exists());
    let out = strata_in(d, &["create", p(&img), "--size", "lots"]);
    assert!(!out.success(), "{}", out.report());
    assert!(out.stderr.contains("invalid size"), "{}", out.report());
    assert!(!img.exists());
}

#[test]
fn create_refuses_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("precious.img");
    let data = raw_file(&img, 1, 100_000);
    strata_fails(
        d,
        &["create", p(&img), "--size", "1M"],
        &[p(&img), "exists"],
    );
    assert_eq!(
        fs::read(&img).unwrap(),
        data,
        "the existing file was touched"
    );
    // Nor an existing Strata image.
    let s = d.join("a.strata");
    strata_ok(d, &["create", p(&s), "--size", "1M"]);
    let before = info_json(d, &s);
    strata_fails(d, &["create", p(&s), "--size", "2M"], &["exists"]);
    assert_eq!(info_json(d, &s)["image_id"], before["image_id"]);
}

#[test]
fn create_overlay_takes_the_backing_size_and_cluster_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("bases")).unwrap();
    fs::create_dir(d.join("vms")).unwrap();
    // A raw base of a size that is not a multiple of any cluster size.
    let base_len = 3 * MIB + 4 * KIB + 7;
    raw_file(&d.join("bases/base.raw"), 2, base_len as usize);
    let ov = strata_ok(
        d,
        &[
            "create",
            "--backing",
            "bases/base.raw",
            "vms/ov.strata",
            "--json",
        ],
    )
    .json();
    assert_eq!(num(&ov, "virtual_size"), base_len, "{ov:#}");
    assert_eq!(num(&ov, "cluster_size"), 64 * KIB, "{ov:#}");
    // Stored relative to the overlay's directory, given relative to the current one.
    assert_eq!(ov["backing"], "../bases/base.raw", "{ov:#}");
    // Opens from any directory.
    let info = info_json(Path::new("/"), &d.join("vms/ov.strata"));
    assert_eq!(info["backing"]["reference"], "../bases/base.raw");
    assert_eq!(info["backing"]["format"], "raw");
    assert_eq!(num(&info["backing"], "size"), base_len);
    // A larger overlay is allowed, a smaller one is not.
    let big = strata_ok(
        d,
        &[
            "create",
            "-b",
            "bases/base.raw",
            "vms/big.strata",
            "-s",
            "8M",
            "--json",
        ],
    )
    .json();
    assert_eq!(num(&big, "virtual_size"), 8 * MIB);
    strata_fails(
        d,
        &[
            "create",
            "-b",
            "bases/base.raw",
            "vms/small.strata",
            "-s",
            "1M",
        ],
        &["smaller than the backing"],
    );
    assert!(!d.join("vms/small.strata").exists());

    // A Strata base passes on its cluster size; a different one is refused.
    strata_ok(d, &["create", "bases/s.strata", "-s", "5M", "-c", "16K"]);
    let ov2 = strata_ok(
        d,
        &["create", "-b", "bases/s.strata", "vms/ov2.strata", "--json"],
    )
    .json();
    assert_eq!(num(&ov2, "cluster_size"), 16 * KIB);
    assert_eq!(num(&ov2, "virtual_size"), 5 * MIB);
    strata_fails(
        d,
        &[
            "create",
            "-b",
            "bases/s.strata",
            "vms/ov3.strata",
            "-c",
            "64K",
        ],
        &["cluster size 65536 differs from the backing image's 16384"],
    );
    // An absolute backing path is stored as it is.
    let abs = d.join("bases/base.raw");
    let ov4 = strata_ok(d, &["create", "-b", p(&abs), "vms/ov4.strata", "--json"]).json();
    assert_eq!(ov4["backing"], p(&abs));
    // A missing backing file is named.
    strata_fails(
        d,
        &["create", "-b", "bases/nope.raw", "vms/ov5.strata"],
        &["bases/nope.raw"],
    );
    assert!(!d.join("vms/ov5.strata").exists());
}

// ---------------------------------------------------------------------------------------
// info and map
// ---------------------------------------------------------------------------------------

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

#[test]
fn info_describes_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, _, top) = three_layers(d);
    let v = info_json(d, &top);
    assert_eq!(v["format"], "strata");
    assert_eq!(num(&v, "version"), 1);
    assert_eq!(num(&v, "virtual_size"), 16 * CS);
    assert_eq!(num(&v, "cluster_size"), CS);
    assert_eq!(num(&v, "allocated"), CS, "{v:#}");
    assert_eq!(num(&v, "zeroed"), CS, "{v:#}");
    assert_eq!(v["backing"]["reference"], "mid.strata");
    assert_eq!(v["backing"]["format"], "strata");
    let chain = v["chain"].as_array().expect("chain");
    let formats: Vec<&str> = chain
        .iter()
        .map(|l| l["format"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["strata", "strata", "raw"], "{v:#}");
    assert!(chain[0]["path"].as_str().unwrap().ends_with("top.strata"));
    assert!(chain[1]["path"].as_str().unwrap().ends_with("mid.strata"));
    assert!(chain[2]["path"].as_str().unwrap().ends_with("base.raw"));
    assert_eq!(num(&chain[1], "allocated"), CS);
    assert_eq!(num(&chain[1], "zeroed"), CS);
    // The raw base's data, not its holes.
    assert_eq!(num(&chain[2], "allocated"), 8 * CS, "{v:#}");

    let out = strata_ok(d, &["info", p(&top)]);
    for needle in [
        "format:        strata (version 1)",
        "virtual size:  1 MiB (1048576 bytes)",
        "cluster size:  64 KiB",
        "allocated:     64 KiB data, 64 KiB zero clusters",
        "backing:       mid.strata (strata,",
        "chain:",
        "base.raw",
    ] {
        assert!(out.stdout.contains(needle), "{needle:?}\n{}", out.report());
    }
    assert_eq!(
        out.stdout.lines().filter(|l| l.starts_with("  ")).count(),
        3,
        "three chain lines\n{}",
        out.report()
    );

    // Files that are not Strata images.
    let raw = d.join("plain.img");
    fs::write(&raw, vec![1u8; 5000]).unwrap();
    strata_ok(d, &["info", p(&raw)]).assert_stdout(&["raw, 5000 bytes"]);
    let v = info_json(d, &raw);
    assert_eq!(v["format"], "raw");
    assert_eq!(num(&v, "file_length"), 5000);
    let qcow = d.join("disk.qcow2");
    let mut head = b"QFI\xfb\0\0\0\x03".to_vec();
    head.resize(1024, 0);
    fs::write(&qcow, head).unwrap();
    assert_eq!(info_json(d, &qcow)["format"], "qcow2");
    strata_fails(d, &["info", "nope.strata"], &["nope.strata"]);
}

#[test]
fn map_shows_state_and_owner() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, _, top) = three_layers(d);
    let data = |s: &str| s.to_owned();
    let want = vec![
        (0, 2 * CS, data("data"), 3),
        (2 * CS, CS, data("data"), 2),
        (3 * CS, CS, data("zero"), 2),
        (4 * CS, CS, data("data"), 3),
        (5 * CS, CS, data("data"), 1),
        (6 * CS, CS, data("zero"), 1),
        // The raw base owns all it covers, holes included.
        (7 * CS, 9 * CS, data("data"), 3),
    ];
    assert_eq!(map_rows(d, &top), want);
    // Files named per row.
    let v = strata_ok(d, &["map", "--json", p(&top)]).json();
    let files: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["file"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(files[0].ends_with("base.raw"), "{v:#}");
    assert!(files[1].ends_with("mid.strata"), "{v:#}");
    assert!(files[4].ends_with("top.strata"), "{v:#}");
    assert!(v[4]["host_offset"].as_u64().is_some(), "{v:#}");
    assert_eq!(v[5]["host_offset"], Value::Null, "{v:#}");

    let out = strata_ok(d, &["map", p(&top)]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1 + want.len(), "{}", out.report());
    assert!(lines[0].contains("offset") && lines[0].contains("depth"));
    assert!(
        lines[3].contains("0x30000")
            && lines[3].contains("zero")
            && lines[3].contains("mid.strata"),
        "{}",
        out.report()
    );

    // A standalone image: unallocated where nothing was written.
    let solo = d.join("solo.strata");
    strata_ok(d, &["create", p(&solo), "-s", "1M"]);
    write_image(&solo, &[(CS + 100, b"x")]);
    assert_eq!(
        map_rows(d, &solo),
        vec![
            (0, CS, data("unallocated"), 0),
            (CS, CS, data("data"), 1),
            (2 * CS, 14 * CS, data("unallocated"), 0),
        ]
    );
}

// ---------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------

/// Offsets of every 4 KiB page of `bytes` whose map-page tag says it is L2 page `index`.
fn l2_page_slots(bytes: &[u8], index: u32) -> Vec<usize> {
    const TAG_AT: usize = 510 * 8 + 8;
    let tag = (2u32 << 28) | index;
    (0..bytes.len() / 4096)
        .map(|i| i * 4096)
        .filter(|&at| bytes[at + TAG_AT..at + TAG_AT + 4] == tag.to_le_bytes())
        .collect()
}

#[test]
fn check_finds_and_repairs_a_damaged_map_page() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("good.strata");
    strata_ok(d, &["create", p(&img), "-s", "64M"]);
    // Clusters in map page 0 and map page 1 (510 clusters of 64 KiB each).
    let far = 600 * CS;
    write_image(
        &img,
        &[(0, &[0xab; 3 * CS as usize]), (far, &[0xcd; CS as usize])],
    );
    assert_clean(d, &img);

    let bad = d.join("bad.strata");
    fs::copy(&img, &bad).unwrap();
    let mut bytes = fs::read(&bad).unwrap();
    let slots = l2_page_slots(&bytes, 0);
    assert!(!slots.is_empty(), "no copy of map page 0 found");
    for at in slots {
        bytes[at + 8] ^= 0xff;
        bytes[at + 100] ^= 0x01;
    }
    fs::write(&bad, &bytes).unwrap();

    strata_in(d, &["check", p(&bad)])
        .assert_code(2)
        .assert_stdout(&["map page 0", "checksum mismatch", "CORRUPT"]);
    let v = strata_in(d, &["check", "--json", p(&bad)])
        .assert_code(2)
        .json();
    let problems = v["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 1, "{v:#}");
    assert!(
        problems[0].as_str().unwrap().contains("map page 0"),
        "{v:#}"
    );
    // The original is untouched.
    assert_clean(d, &img);
    // Serving the damaged copy is refused, pointing at check.
    strata_fails(
        d,
        &[
            "serve",
            "-l",
            &format!("unix:{}", p(&d.join("s.sock"))),
            p(&bad),
        ],
        &["corrupt image", "map page 0", p(&bad)],
    );

    strata_ok(d, &["check", "--repair", p(&bad)]).assert_stdout(&["repaired:", "no errors"]);
    assert_clean(d, &bad);
    // What page 0 mapped is gone (reads as zeroes); page 1's data survived.
    let after = read_image(&bad);
    assert!(after[..3 * CS as usize].iter().all(|&b| b == 0));
    assert!(
        after[far as usize..(far + CS) as usize]
            .iter()
            .all(|&b| b == 0xcd)
    );
    let v = info_json(d, &bad);
    assert_eq!(num(&v, "allocated"), CS, "{v:#}");
}

#[test]
fn check_finds_a_truncated_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("t.strata");
    strata_ok(d, &["create", p(&img), "-s", "16M", "-c", "4K"]);
    let chunk = pattern(9, 40 * 4096);
    // The first cluster and its map page pair first, then 39 more clusters after them.
    write_image(&img, &[(0, &chunk[..4096])]);
    write_image(&img, &[(4096, &chunk[4096..])]);
    assert_clean(d, &img);
    let len = fs::metadata(&img).unwrap().len();
    // Cut the last 20 data clusters off.
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(len - 20 * 4096).unwrap();
    drop(f);
    let out = strata_in(d, &["check", p(&img)]).assert_code(2);
    assert!(
        out.stdout
            .contains("points past the end of the file (truncated?)"),
        "{}",
        out.report()
    );
    let v = strata_in(d, &["check", "--json", p(&img)])
        .assert_code(2)
        .json();
    assert_eq!(v["problems"].as_array().unwrap().len(), 20, "{v:#}");
    strata_fails(
        d,
        &["info", p(&img)],
        &["corrupt image", "(and 19 more problems"],
    );
    strata_ok(d, &["check", "--repair", p(&img)]);
    assert_clean(d, &img);
    // The clusters still inside the file read as before; the others as zeroes.
    let after = read_image(&img);
    let half = 20 * 4096;
    assert_same_bytes("kept clusters", &after[..half], &chunk[..half]);
    assert!(
        after[half..].iter().all(|&b| b == 0),
        "lost clusters are not zeroes"
    );
}

// ---------------------------------------------------------------------------------------
// commit
// ---------------------------------------------------------------------------------------

/// Writes a mix of changes to `overlay` (cluster size CS) and applies them to
/// `expected`: whole and partial clusters, an unaligned write, zero clusters and a trim.
fn change_overlay(overlay: &Path, expected: &mut [u8], seed: u64) {
    let whole = pattern(seed, 2 * CS as usize);
    let partial = pattern(seed + 1, 3000);
    let unaligned = pattern(seed + 2, 70_000);
    let writes: [(u64, &[u8]); 3] = [
        (0, &whole),
        (4 * CS + 1000, &partial),
        (9 * CS - 5000, &unaligned),
    ];
    write_image(overlay, &writes);
    for (off, data) in writes {
        put(expected, off, data);
    }
    zero_image(overlay, ZeroMode::Zero, &[(12 * CS, 2 * CS)]);
    zeroed(expected, 12 * CS, 2 * CS);
    zero_image(overlay, ZeroMode::Trim, &[(15 * CS, CS)]);
    zeroed(expected, 15 * CS, CS);
}

fn commit_into(base_kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let len = 20 * CS as usize;
    let mut expected = raw_file(&d.join("base.raw"), 4, len);
    let base = if base_kind == "raw" {
        d.join("base.raw")
    } else {
        strata_ok(d, &["convert", "base.raw", "base.strata"]);
        d.join("base.strata")
    };
    let ov = d.join("ov.strata");
    strata_ok(d, &["create", "-b", p(&base), p(&ov)]);
    change_overlay(&ov, &mut expected, 40);
    assert_same_bytes("overlay before commit", &read_image(&ov), &expected);

    let out = strata_ok(d, &["commit", "--json", p(&ov)]);
    let v = out.json();
    assert!(num(&v, "copied") >= 2 * CS + 3000 + 70_000, "{v:#}");
    assert_eq!(num(&v, "zeroed"), 3 * CS, "{v:#}");

    // The base now holds the overlay's changes...
    let base_now = if base_kind == "raw" {
        fs::read(&base).unwrap()
    } else {
        assert_clean(d, &base);
        read_image(&base)
    };
    assert_same_bytes("base after commit", &base_now, &expected);
    // ...and the overlay is empty, reading the same through the base.
    let info = info_json(d, &ov);
    assert_eq!(num(&info, "allocated"), 0, "{info:#}");
    assert_eq!(num(&info, "zeroed"), 0, "{info:#}");
    assert!(
        map_rows(d, &ov).iter().all(|r| r.3 == 2),
        "overlay still owns ranges: {:?}",
        map_rows(d, &ov)
    );
    assert_same_bytes("overlay after commit", &read_image(&ov), &expected);
    assert_clean(d, &ov);

    // Committing an image without a backing file is refused.
    let solo = d.join("solo.strata");
    strata_ok(d, &["create", p(&solo), "-s", "1M"]);
    strata_fails(d, &["commit", p(&solo)], &["no backing file"]);
}

#[test]
fn commit_into_a_raw_base() {
    commit_into("raw");
}

#[test]
fn commit_into_a_strata_base() {
    commit_into("strata");
}

// ---------------------------------------------------------------------------------------
// rebase
// ---------------------------------------------------------------------------------------

/// base1.raw and an overlay ov.strata changed by [`change_overlay`]; returns the
/// overlay's contents.
fn overlay_on_raw(d: &Path) -> Vec<u8> {
    let mut expected = raw_file(&d.join("base1.raw"), 5, 20 * CS as usize);
    strata_ok(d, &["create", "-b", "base1.raw", "ov.strata"]);
    change_overlay(&d.join("ov.strata"), &mut expected, 50);
    assert_same_bytes("overlay", &read_image(&d.join("ov.strata")), &expected);
    expected
}

#[test]
fn rebase_onto_another_base_keeps_the_contents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ov = d.join("ov.strata");
    let contents = overlay_on_raw(d);
    // The new base: the old one with a few clusters changed, as a Strata image.
    strata_ok(d, &["convert", "base1.raw", "base2.strata"]);
    write_image(
        &d.join("base2.strata"),
        &[
            (CS, &[0x11; 100]),             // owned by the overlay
            (7 * CS, &[0x77; CS as usize]), // not owned
            (18 * CS + 5, &[0x88; 10]),     // not owned
        ],
    );
    let before = num(&info_json(d, &ov), "allocated");
    let v = strata_ok(d, &["rebase", "--json", "-b", "base2.strata", p(&ov)]).json();
    // Exactly the two clusters that would read differently are copied up.
    assert_eq!(num(&v, "copied"), 2 * CS, "{v:#}");
    let info = info_json(d, &ov);
    assert_eq!(num(&info, "allocated"), before + 2 * CS, "{info:#}");
    assert_eq!(info["backing"]["reference"], "base2.strata", "{info:#}");
    assert_eq!(info["backing"]["format"], "strata");
    assert_same_bytes("overlay after rebase", &read_image(&ov), &contents);
    assert_clean(d, &ov);
    // The old base is no longer needed.
    fs::remove_file(d.join("base1.raw")).unwrap();
    assert_same_bytes("without the old base", &read_image(&ov), &contents);

    // Rebasing onto a base of another cluster size is refused.
    strata_ok(d, &["create", "small.strata", "-s", "1M", "-c", "4K"]);
    strata_fails(
        d,
        &["rebase", "-b", "small.strata", p(&ov)],
        &["4096 byte clusters"],
    );
    // Onto a larger base too.
    fs::write(d.join("huge.raw"), vec![0u8; 40 * CS as usize]).unwrap();
    strata_fails(
        d,
        &["rebase", "-b", "huge.raw", p(&ov)],
        &["larger than the image"],
    );
    assert_same_bytes("after refused rebases", &read_image(&ov), &contents);
    // Neither a backing nor --no-backing.
    let out = strata_in(d, &["rebase", p(&ov)]);
    assert!(!out.success(), "{}", out.report());
}

#[test]
fn rebase_without_backing_flattens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ov = d.join("ov.strata");
    let contents = overlay_on_raw(d);
    let v = strata_ok(d, &["rebase", "--json", "--no-backing", p(&ov)]).json();
    assert!(num(&v, "copied") > 0, "{v:#}");
    let info = info_json(d, &ov);
    assert_eq!(info["backing"], Value::Null, "{info:#}");
    assert_eq!(info["chain"].as_array().unwrap().len(), 1);
    fs::remove_file(d.join("base1.raw")).unwrap();
    assert_same_bytes("flattened", &read_image(&ov), &contents);
    assert_clean(d, &ov);
}

#[test]
fn unsafe_rebase_only_rewrites_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ov = d.join("ov.strata");
    let contents = overlay_on_raw(d);
    let before = info_json(d, &ov);
    // The base moves: an unsafe rebase points the overlay at it without copying.
    fs::create_dir(d.join("moved")).unwrap();
    fs::rename(d.join("base1.raw"), d.join("moved/base1.raw")).unwrap();
    strata_fails(d, &["info", p(&ov)], &["base1.raw", "cannot be opened"]);
    let v = strata_ok(
        d,
        &[
            "rebase",
            "--json",
            "--unsafe",
            "-b",
            "moved/base1.raw",
            p(&ov),
        ],
    )
    .json();
    assert_eq!(num(&v, "copied"), 0, "{v:#}");
    let info = info_json(d, &ov);
    assert_eq!(info["backing"]["reference"], "moved/base1.raw");
    assert_eq!(info["allocated"], before["allocated"]);
    assert_same_bytes("after the move", &read_image(&ov), &contents);

    // Onto different contents: what the overlay does not own changes.
    let other = raw_file(&d.join("other.raw"), 6, 20 * CS as usize);
    strata_ok(d, &["rebase", "-u", "-b", "other.raw", p(&ov)]);
    let now = read_image(&ov);
    let owned: Vec<(u64, u64)> = map_rows(d, &ov)
        .into_iter()
        .filter(|r| r.3 == 1)
        .map(|r| (r.0, r.0 + r.1))
        .collect();
    for (i, (&b, (&c, &o))) in now.iter().zip(contents.iter().zip(&other)).enumerate() {
        let i = i as u64;
        let want = if owned.iter().any(|&(s, e)| s <= i && i < e) {
            c
        } else {
            o
        };
        assert_eq!(b, want, "byte {i} after an unsafe rebase");
    }
    assert_eq!(info_json(d, &ov)["allocated"], before["allocated"]);
}

// ---------------------------------------------------------------------------------------
// convert
// ---------------------------------------------------------------------------------------

#[test]
fn convert_round_trip_is_identical_and_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let len = 64 * MIB;
    let a = pattern(10, 300_000);
    let b = pattern(11, 5000);
    let c = pattern(12, MIB as usize);
    let zeros = vec![0u8; 2 * MIB as usize];
    let src = d.join("src.raw");
    let expected = sparse_raw(
        &src,
        len,
        &[
            (0, &a),
            (7 * MIB + 123, &b),
            (20 * MIB, &zeros), // allocated in the file, but zeroes
            (40 * MIB, &c),
            (len - 4096, &[0xee; 4096]),
        ],
    );
    let v = strata_ok(d, &["convert", "--json", "src.raw", "mid.strata"]).json();
    assert!(
        num(&v, "copied") >= (a.len() + b.len() + c.len()) as u64,
        "{v:#}"
    );
    assert!(num(&v, "copied") < 8 * MIB, "zeroes were copied: {v:#}");
    let info = info_json(d, &d.join("mid.strata"));
    assert_eq!(num(&info, "virtual_size"), len);
    assert!(num(&info, "allocated") < 8 * MIB, "{info:#}");
    assert!(disk_usage(&d.join("mid.strata")) < 8 * MIB, "{info:#}");
    assert_clean(d, &d.join("mid.strata"));
    assert_same_bytes("Strata copy", &read_image(&d.join("mid.strata")), &expected);

    strata_ok(d, &["convert", "-O", "raw", "mid.strata", "back.raw"]);
    let back = fs::read(d.join("back.raw")).unwrap();
    assert_same_bytes("raw copy of the Strata copy", &back, &expected);
    assert!(
        disk_usage(&d.join("back.raw")) < 8 * MIB,
        "the raw copy is not sparse: {} bytes on disk",
        disk_usage(&d.join("back.raw"))
    );

    // Cluster size of the destination.
    strata_ok(d, &["convert", "-c", "4K", "src.raw", "small.strata"]);
    assert_eq!(
        num(&info_json(d, &d.join("small.strata")), "cluster_size"),
        4096
    );
    assert_same_bytes(
        "4K clusters",
        &read_image(&d.join("small.strata")),
        &expected,
    );
    // An existing destination is refused and left alone.
    strata_fails(d, &["convert", "src.raw", "back.raw"], &["exists"]);
    assert_same_bytes(
        "untouched",
        &fs::read(d.join("back.raw")).unwrap(),
        &expected,
    );
}

#[test]
fn convert_flattens_a_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, _, top) = three_layers(d);
    let expected = read_image(&top);
    strata_ok(d, &["convert", "-O", "raw", p(&top), "flat.raw"]);
    assert_same_bytes(
        "flattened chain",
        &fs::read(d.join("flat.raw")).unwrap(),
        &expected,
    );
    strata_ok(d, &["convert", p(&top), "flat.strata"]);
    let info = info_json(d, &d.join("flat.strata"));
    assert_eq!(info["backing"], Value::Null);
    assert_same_bytes(
        "flattened chain",
        &read_image(&d.join("flat.strata")),
        &expected,
    );
}

// ---------------------------------------------------------------------------------------
// serve: images it refuses
// ---------------------------------------------------------------------------------------

/// `strata serve` on `images` must exit (not serve) with status 1 and `needles` in its
/// message.
#[track_caller]
fn serve_refuses(d: &Path, images: &[&str], needles: &[&str]) {
    let sock = format!("unix:{}", p(&d.join("refused.sock")));
    let mut args = vec!["serve", "-l", &sock];
    args.extend(images);
    let mut cmd = strata();
    cmd.current_dir(d).args(&args);
    run_timeout(&mut cmd, Duration::from_secs(20))
        .assert_code(1)
        .assert_stderr(needles);
}

#[test]
fn serve_refuses_qcow2() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_timeout(
        Command::new("qemu-img")
            .current_dir(d)
            .args(["create", "-q", "-f", "qcow2", "vm.qcow2", "64M"]),
        CMD_TIMEOUT,
    )
    .assert_success();
    serve_refuses(
        d,
        &["vm.qcow2"],
        &[
            "vm.qcow2",
            "qcow2 image, which Strata does not read",
            "qemu-img convert",
        ],
    );
    // Among other images too: nothing is served.
    strata_ok(d, &["create", "ok.strata", "-s", "1M"]);
    serve_refuses(d, &["ok.strata", "vm.qcow2"], &["vm.qcow2", "qcow2"]);
    // The other tools refuse it as well, and info names it.
    strata_fails(d, &["convert", "vm.qcow2", "x.strata"], &["qcow2"]);
    strata_fails(d, &["create", "-b", "vm.qcow2", "y.strata"], &["qcow2"]);
    assert_eq!(info_json(d, &d.join("vm.qcow2"))["format"], "qcow2");
}

#[test]
fn missing_or_changed_backing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_file(&d.join("base.raw"), 7, 4 * MIB as usize);
    strata_ok(d, &["create", "-b", "base.raw", "ov.strata"]);
    strata_ok(d, &["create", "sbase.strata", "-s", "4M"]);
    strata_ok(d, &["create", "-b", "sbase.strata", "sov.strata"]);
    assert_clean(d, &d.join("ov.strata"));

    // Missing.
    fs::rename(d.join("base.raw"), d.join("away.raw")).unwrap();
    serve_refuses(d, &["ov.strata"], &["base.raw", "cannot be opened"]);
    strata_fails(d, &["info", "ov.strata"], &["base.raw"]);
    strata_in(d, &["check", "ov.strata"])
        .assert_code(2)
        .assert_stdout(&["backing", "base.raw"]);
    fs::rename(d.join("away.raw"), d.join("base.raw")).unwrap();
    assert_clean(d, &d.join("ov.strata"));

    // Rewritten.
    let mut bytes = fs::read(d.join("base.raw")).unwrap();
    bytes[..4096].fill(0x42);
    fs::write(d.join("base.raw"), &bytes).unwrap();
    serve_refuses(d, &["ov.strata"], &["base.raw", "backing file has changed"]);
    strata_in(d, &["check", "ov.strata"]).assert_code(2);

    // Resized.
    bytes.truncate(3 * MIB as usize);
    fs::write(d.join("base.raw"), &bytes).unwrap();
    serve_refuses(d, &["ov.strata"], &["base.raw", "its size was 4194304"]);

    // Another Strata image in place of the base.
    fs::rename(d.join("sbase.strata"), d.join("old.strata")).unwrap();
    strata_ok(d, &["create", "sbase.strata", "-s", "4M"]);
    serve_refuses(d, &["sov.strata"], &["sbase.strata", "where image"]);
    strata_fails(d, &["info", "sov.strata"], &["backing file has changed"]);
    // A raw file in place of a Strata base.
    fs::remove_file(d.join("sbase.strata")).unwrap();
    fs::write(d.join("sbase.strata"), vec![0u8; 4 * MIB as usize]).unwrap();
    serve_refuses(
        d,
        &["sov.strata"],
        &["sbase.strata", "backing file has changed"],
    );
}

// ---------------------------------------------------------------------------------------
// Large images and images in use
// ---------------------------------------------------------------------------------------

#[test]
fn an_image_larger_than_one_l1_page() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("big.strata");
    // One L1 page maps 510 map pages of 510 clusters: 1065369600 bytes at 4 KiB.
    let l1_span = 510 * 510 * 4096u64;
    strata_ok(d, &["create", p(&img), "-s", "3G", "-c", "4K"]);
    let a = pattern(70, 3 * 4096);
    let b = pattern(71, 10_000);
    let c = pattern(72, 4096);
    write_image(
        &img,
        &[
            (l1_span - 4096, &a), // the last cluster of L1 page 0 and two of page 1
            (2 * l1_span + 123, &b),
            ((3 << 30) - 4096, &c),
        ],
    );
    assert_clean(d, &img);
    let rows = map_rows(d, &img);
    let data: Vec<(u64, u64)> = rows
        .iter()
        .filter(|r| r.2 == "data")
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(
        data,
        vec![
            (l1_span - 4096, 3 * 4096),
            (2 * l1_span, 3 * 4096),
            ((3 << 30) - 4096, 4096),
        ],
        "{rows:?}"
    );
    let info = info_json(d, &img);
    assert_eq!(num(&info, "allocated"), 7 * 4096, "{info:#}");
    // Reopened, every piece reads back.
    let _images = images_open();
    let chain = image::open(&img, false).unwrap();
    for (off, want) in [
        (l1_span - 4096, &a),
        (2 * l1_span + 123, &b),
        ((3 << 30) - 4096, &c),
    ] {
        let mut buf = vec![0u8; want.len()];
        chain.read(off, &mut buf).unwrap();
        assert_same_bytes(&format!("data at {off}"), &buf, want);
    }
}

#[test]
fn tools_refuse_to_change_a_served_image() {
    if !strata_only("strata's image locking") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_file(&d.join("base.raw"), 8, 2 * MIB as usize);
    strata_ok(d, &["create", "-b", "base.raw", "ov.strata"]);
    strata_ok(d, &["create", "-b", "base.raw", "other.strata"]);
    write_image(&d.join("ov.strata"), &[(0, &[1; 4096])]);
    let mut server = file(d.join("ov.strata")).listen(Transport::Unix).start();
    let ov = p(&d.join("ov.strata")).to_owned();
    for args in [
        vec!["commit", ov.as_str()],
        vec!["rebase", "--no-backing", ov.as_str()],
        vec!["rebase", "-u", "-b", "base.raw", ov.as_str()],
        vec!["check", "--repair", ov.as_str()],
    ] {
        strata_fails(d, &args, &["in use", "ov.strata"]);
    }
    // Committing another overlay would change the base under the served one.
    strata_fails(d, &["commit", "other.strata"], &["in use", "base.raw"]);
    // Looking is fine.
    assert_clean(d, &d.join("ov.strata"));
    assert_eq!(num(&info_json(d, &d.join("ov.strata")), "allocated"), CS);
    assert_eq!(map_rows(d, &d.join("ov.strata"))[0].3, 1);
    server.stop_cleanly_with(libc::SIGTERM);
    strata_ok(d, &["commit", "ov.strata"]);
    assert_eq!(fs::read(d.join("base.raw")).unwrap()[..4096], [1; 4096]);
}

#[test]
fn rebase_refuses_a_chain_back_to_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_file(&d.join("base.raw"), 9, MIB as usize);
    strata_ok(d, &["create", "-b", "base.raw", "ov.strata"]);
    strata_ok(d, &["create", "-b", "ov.strata", "top.strata"]);
    std::os::unix::fs::symlink("ov.strata", d.join("alias.strata")).unwrap();
    for backing in ["ov.strata", "top.strata", "alias.strata"] {
        for unsafe_ in [true, false] {
            let mut args = vec!["rebase", "-b", backing, "ov.strata"];
            if unsafe_ {
                args.insert(1, "--unsafe");
            }
            strata_fails(d, &args, &["loops back on itself"]);
        }
    }
    // Nothing changed: the chain still opens, with its old backing.
    let info = info_json(d, &d.join("top.strata"));
    assert_eq!(info["chain"].as_array().unwrap().len(), 3, "{info:#}");
    assert_eq!(
        info_json(d, &d.join("ov.strata"))["backing"]["reference"],
        "base.raw"
    );
}
