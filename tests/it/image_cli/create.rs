//! `strata create`: sizes and cluster sizes, refused arguments, overlays.

use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::support::{KIB, MIB};

use super::{assert_clean, info_json, num, p, raw_file, strata_fails, strata_in, strata_ok};

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
