//! `strata info`, `map` and `check`: a chain described, each cluster's state and owner,
//! damaged and truncated images found and repaired, an image larger than one L1 page.

use std::fs;

use serde_json::Value;
use strata::image;

use crate::support::{assert_same_bytes, images_open, pattern};

use super::{
    CS, assert_clean, info_json, map_rows, num, p, read_image, strata_fails, strata_in, strata_ok,
    three_layers, write_image,
};

// ---------------------------------------------------------------------------------------
// info and map
// ---------------------------------------------------------------------------------------

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
// A large image
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
