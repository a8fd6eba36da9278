//! Snapshots seen by real clients: `qemu:dirty-bitmap:NAME` contexts read by `nbdinfo
//! --map` and by `qemu-img map` (through `x-dirty-bitmap`), checked against the ranges
//! written and against `strata diff`; a snapshot's point-in-time contents served
//! read-only and checked with `qemu-img compare` and `nbdcopy`. Snapshots here are taken
//! with `strata snapshot` between two runs of the server; control_api.rs takes
//! them through a running server. Uses only options qemu 7.2 has (`scripts/test.sh`
//! runs this file with qemu-img 7.2 as well).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use crate::support::*;

const CS: u64 = 64 * KIB;
const SIZE: u64 = 16 * MIB;

/// The clusters touched by `[start, start + len)`.
/// Serves the snapshot `name` of `d/disk.strata` read-only, under its name, over `t`.
fn serve_snapshot(d: &Path, name: &str, t: Transport) -> Server {
    file(d.join(format!("disk.strata@{name}")))
        .name(name)
        .read_only()
        .listen(t)
        .start()
}

fn clusters(start: u64, len: u64) -> std::ops::Range<u64> {
    start / CS..(start + len).div_ceil(CS)
}

/// Cluster-aligned `(start, end)` runs covering a set of clusters.
fn runs(set: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in set {
        match out.last_mut() {
            Some((_, end)) if *end == c * CS => *end += CS,
            _ => out.push((c * CS, (c + 1) * CS)),
        }
    }
    out
}

/// Dirty runs reported by `nbdinfo --map=qemu:dirty-bitmap:NAME` (type 1 = dirty).
fn nbdinfo_dirty(uri: &str, name: &str) -> Vec<(u64, u64)> {
    let out = nbdinfo(&[&format!("--map=qemu:dirty-bitmap:{name}"), uri]);
    assert!(out.success(), "{}", out.report());
    let mut pos = 0;
    let mut dirty = Vec::new();
    for line in out.stdout.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (start, len, ty): (u64, u64, u64) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        assert_eq!(start, pos, "map not contiguous:\n{}", out.stdout);
        pos += len;
        match ty {
            1 => dirty.push((start, start + len)),
            0 => {}
            other => panic!("dirty bitmap status {other}:\n{}", out.stdout),
        }
    }
    assert_eq!(pos, SIZE, "map does not cover the disk:\n{}", out.stdout);
    merge(dirty)
}

fn merge(v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some((_, end)) if *end == s => *end = e,
            _ => out.push((s, e)),
        }
    }
    out
}

/// Dirty runs as `qemu-img map` reports them through `x-dirty-bitmap`: qemu reads the
/// bitmap in place of base:allocation, so dirty ranges come out as "not data".
fn qemu_dirty(server: &Server, export: &str, name: &str) -> Vec<(u64, u64)> {
    let opts = format!(
        "{},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        server.endpoint().qemu_image_opts(export)
    );
    let out = run_ok(
        qemu_img()
            .args(["map", "--output=json", "--image-opts"])
            .arg(&opts),
    );
    let map = parse_qemu_map(&out.stdout);
    assert_eq!(map.last().map(MapEntry::end), Some(SIZE), "{}", out.stdout);
    merge(
        map.iter()
            .filter(|e| !e.data)
            .map(|e| (e.start, e.end()))
            .collect(),
    )
}

fn strata_dirty(dir: &Path, image: &str, name: &str) -> Vec<(u64, u64)> {
    let out = strata_at_ok(dir, &["diff", "--json", image, "--since", name]);
    let v = out.json();
    assert_eq!(v["cluster_size"].as_u64(), Some(CS));
    let ranges: Vec<(u64, u64)> = v["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let (o, l) = (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap());
            (o, o + l)
        })
        .collect();
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    assert_eq!(v["bytes"].as_u64(), Some(total));
    // The text form says the same.
    let text = strata_at_ok(dir, &["diff", image, "--since", name]);
    let from_text: Vec<(u64, u64)> = text
        .stdout
        .lines()
        .map(|l| {
            let (o, n) = l.split_once(' ').unwrap();
            let (o, n): (u64, u64) = (o.parse().unwrap(), n.parse().unwrap());
            (o, o + n)
        })
        .collect();
    assert_eq!(from_text, ranges);
    merge(ranges)
}

fn contexts(uri: &str) -> Vec<String> {
    let out = nbdinfo(&["--json", uri]);
    assert!(out.success(), "{}", out.report());
    let v = out.json();
    v["exports"][0]["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}

fn serve(dir: &Path, t: Transport) -> Server {
    file(dir.join("disk.strata")).name("disk").listen(t).start()
}

fn dirty_bitmaps_through_real_clients(t: Transport) {
    if !require_tools(&["qemu-img", "qemu-io", "nbdinfo"]) || !strata_only("snapshots") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    strata_at_ok(
        d,
        &[
            "create",
            "disk.strata",
            "-s",
            &SIZE.to_string(),
            "-c",
            "64K",
        ],
    );
    let mut server = serve(d, t);
    qemu_io_ok(&server.uri(), false, &["write -P 0x11 0 4M", "flush"]);
    server.stop_cleanly_with(libc::SIGTERM);
    strata_at_ok(d, &["snapshot", "create", "disk.strata", "mon"]);

    // Changes after mon: a partial cluster, an unaligned run over cluster boundaries,
    // a discard (hides data below: changed) and zeroing.
    let mut since_mon = BTreeSet::new();
    let mut server = serve(d, t);
    let uri = server.uri();
    let writes: [(&str, u64, u64); 4] = [
        ("write -P 0x22", 100 * KIB, 10 * KIB),
        ("write -P 0x33", 3 * MIB - 1000, 200 * KIB),
        ("discard", MIB, 2 * CS),
        ("write -z", 9 * MIB, 5 * CS),
    ];
    for (cmd, off, len) in writes {
        qemu_io_ok(&uri, false, &[&format!("{cmd} {off} {len}"), "flush"]);
        since_mon.extend(clusters(off, len));
    }
    assert!(contexts(&uri).contains(&"qemu:dirty-bitmap:mon".to_owned()));
    let expected = runs(&since_mon);
    assert_eq!(nbdinfo_dirty(&uri, "mon"), expected, "nbdinfo");
    assert_eq!(qemu_dirty(&server, "disk", "mon"), expected, "qemu-img map");
    // strata diff reads the files of the image being served.
    assert_eq!(
        strata_dirty(d, "disk.strata", "mon"),
        expected,
        "strata diff"
    );
    server.stop_cleanly_with(libc::SIGTERM);

    // A second snapshot: mon keeps accumulating, tue sees only what follows it.
    strata_at_ok(d, &["snapshot", "create", "disk.strata", "tue"]);
    let mut server = serve(d, t);
    let uri = server.uri();
    qemu_io_ok(&uri, false, &["write -P 0x44 12M 300k", "flush"]);
    let since_tue: BTreeSet<u64> = clusters(12 * MIB, 300 * KIB).collect();
    since_mon.extend(since_tue.iter().copied());
    let ctx = contexts(&uri);
    assert!(ctx.contains(&"qemu:dirty-bitmap:mon".to_owned()), "{ctx:?}");
    assert!(ctx.contains(&"qemu:dirty-bitmap:tue".to_owned()), "{ctx:?}");
    assert_eq!(nbdinfo_dirty(&uri, "mon"), runs(&since_mon));
    assert_eq!(nbdinfo_dirty(&uri, "tue"), runs(&since_tue));
    assert_eq!(qemu_dirty(&server, "disk", "tue"), runs(&since_tue));
    server.stop_cleanly_with(libc::SIGTERM);

    // The snapshot tue, served read-only on its own: what changed between mon and tue.
    let mut snap = serve_snapshot(d, "tue", t);
    let between: BTreeSet<u64> = since_mon.difference(&since_tue).copied().collect();
    let ctx = contexts(&snap.uri());
    assert!(ctx.contains(&"qemu:dirty-bitmap:mon".to_owned()), "{ctx:?}");
    assert!(!ctx.iter().any(|c| c.ends_with(":tue")), "{ctx:?}");
    assert_eq!(nbdinfo_dirty(&snap.uri(), "mon"), runs(&between));
    snap.stop_cleanly_with(libc::SIGTERM);

    // Deleting mon merges it into tue: tue's own changes are then everything since the
    // base, and the live disk's changes since tue are unchanged.
    strata_at_ok(d, &["snapshot", "delete", "disk.strata", "mon"]);
    let mut server = serve(d, t);
    let ctx = contexts(&server.uri());
    assert!(!ctx.iter().any(|c| c.ends_with(":mon")), "{ctx:?}");
    assert_eq!(nbdinfo_dirty(&server.uri(), "tue"), runs(&since_tue));
    server.stop_cleanly_with(libc::SIGTERM);
}

fn snapshot_exports_read_by_qemu_img_and_nbdcopy(t: Transport) {
    if !require_tools(&["qemu-img", "qemu-io", "nbdcopy"]) || !strata_only("snapshots") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    let data = write_mixed_image(&src, 77, SIZE as usize);
    strata_at_ok(d, &["create", "disk.strata", "-s", &SIZE.to_string()]);
    let mut server = serve(d, t);
    run_ok(&mut qemu_img_convert_into(&src, server.uri()));
    server.stop_cleanly_with(libc::SIGTERM);
    strata_at_ok(d, &["snapshot", "create", "disk.strata", "before"]);
    let mut server = serve(d, t);
    qemu_io_ok(
        &server.uri(),
        false,
        &["write -P 0x5a 1M 3M", "discard 8M 1M", "flush"],
    );
    // The live disk changed...
    let cmp = run(&mut qemu_img_compare(&src, server.uri()));
    assert_eq!(cmp.code(), Some(1), "{}", cmp.report());
    server.stop_cleanly_with(libc::SIGTERM);
    // ...the snapshot did not.
    let mut snap = serve_snapshot(d, "before", t);
    run_ok(&mut qemu_img_compare(&src, snap.uri()));
    let copy = d.join("copy.raw");
    run_ok(Command::new("nbdcopy").arg(snap.uri()).arg(&copy));
    assert_same_bytes("nbdcopy of the snapshot", &fs::read(&copy).unwrap(), &data);
    snap.stop_cleanly_with(libc::SIGTERM);
    // Writing to a snapshot's file would change what the live disk reads through it.
    let out = run(&mut strata_at(d, &["serve", "disk.strata@before"]));
    assert!(
        !out.success(),
        "a snapshot served writable: {}",
        out.report()
    );
    assert!(out.stderr.contains("snapshot"), "{}", out.report());
}

over_transports!(
    dirty_bitmaps_through_real_clients,
    snapshot_exports_read_by_qemu_img_and_nbdcopy
);
