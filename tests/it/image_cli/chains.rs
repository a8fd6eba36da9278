//! Changing a chain: `strata commit` into raw and Strata bases, safe, flattening and
//! unsafe rebases, and a rebase that would make the chain loop.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use strata::image::ZeroMode;
use tempfile::TempDir;

use crate::support::{MIB, assert_same_bytes, pattern};

use super::{
    CS, assert_clean, info_json, map_rows, num, p, put, raw_file, read_image, strata_fails,
    strata_in, strata_ok, write_image, zero_image, zeroed,
};

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

/// A scratch directory holding base1.raw and an overlay ov.strata changed by
/// [`change_overlay`]; returns the directory, the overlay's path and its contents.
fn overlay_on_raw() -> (TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (d, ov) = (dir.path(), dir.path().join("ov.strata"));
    let mut expected = raw_file(&d.join("base1.raw"), 5, 20 * CS as usize);
    strata_ok(d, &["create", "-b", "base1.raw", "ov.strata"]);
    change_overlay(&ov, &mut expected, 50);
    assert_same_bytes("overlay", &read_image(&ov), &expected);
    (dir, ov, expected)
}

#[test]
fn rebase_onto_another_base_keeps_the_contents() {
    let (dir, ov, contents) = overlay_on_raw();
    let d = dir.path();
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
    let (dir, ov, contents) = overlay_on_raw();
    let d = dir.path();
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
    let (dir, ov, contents) = overlay_on_raw();
    let d = dir.path();
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
