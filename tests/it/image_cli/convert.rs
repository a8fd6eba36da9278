//! `strata convert`: sparse round trips, and a chain flattened.

use std::fs;

use serde_json::Value;

use crate::support::{MIB, assert_same_bytes, pattern};

use super::{
    assert_clean, disk_usage, info_json, num, p, read_image, sparse_raw, strata_fails, strata_ok,
    three_layers,
};

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
