//! `qemu-img convert` and `compare` through Strata exports, and `qemu-io` on an overlay.

use std::fs;
use std::process::Command;

use crate::support::{
    KIB, MIB, Transport, assert_same_bytes, file, over_transports, pattern, qemu_img_compare,
    qemu_img_convert, qemu_img_convert_into, qemu_io_ok, require_tool, require_tools, run, run_ok,
    strata_at_ok, strata_only, write_mixed_image,
};

use super::{CS, assert_clean, contents, fill, put};

fn qemu_img_convert_through_strata_images(t: Transport) {
    if !require_tools(&["qemu-img", "qemu-io"]) || !strata_only("Strata images") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let len = 12 * MIB as usize;
    let src = d.join("src.raw");
    let data = write_mixed_image(&src, 31, len);

    // Into a fresh standalone image, and out again.
    strata_at_ok(d, &["create", "disk.strata", "-s", &len.to_string()]);
    let mut server = file(d.join("disk.strata")).listen(t).start();
    let uri = server.uri();
    run_ok(&mut qemu_img_convert_into(&src, &uri));
    run_ok(&mut qemu_img_compare(&src, &uri));
    let out = d.join("out.raw");
    run_ok(&mut qemu_img_convert(&uri, &out));
    assert_same_bytes("copied out of the export", &fs::read(&out).unwrap(), &data);
    // compare notices a change.
    qemu_io_ok(&uri, false, &["write -P 0xee 5M 512", "flush"]);
    let cmp = run(&mut qemu_img_compare(&src, &uri));
    assert_eq!(cmp.code(), Some(1), "{}", cmp.report());
    assert!(
        cmp.stdout.contains(&(5 * MIB).to_string()),
        "{}",
        cmp.report()
    );
    server.stop_cleanly_with(libc::SIGTERM);
    assert_clean(d, "disk.strata");
    let mut expected = data.clone();
    fill(&mut expected, 5 * MIB, 512, 0xee);
    assert_same_bytes(
        "image after shutdown",
        &contents(d, "disk.strata"),
        &expected,
    );
    // The zero runs of the source were not stored as data.
    let info = strata_at_ok(d, &["info", "--json", "disk.strata"]).json();
    assert!(
        info["allocated"].as_u64().unwrap() < len as u64,
        "every cluster allocated: {info:#}"
    );

    // Into an overlay of the source: only the differences are stored.
    let other = d.join("other.raw");
    let mut changed = data.clone();
    put(&mut changed, 3 * MIB + 100, &pattern(32, 70_000));
    fill(&mut changed, 8 * MIB, 256 * KIB, 0);
    fs::write(&other, &changed).unwrap();
    strata_at_ok(d, &["create", "-b", "src.raw", "ov.strata"]);
    let mut server = file(d.join("ov.strata")).listen(t).start();
    let uri = server.uri();
    run_ok(&mut qemu_img_compare(&src, &uri));
    run_ok(&mut qemu_img_convert_into(&other, &uri));
    run_ok(&mut qemu_img_compare(&other, &uri));
    server.stop_cleanly_with(libc::SIGTERM);
    assert_clean(d, "ov.strata");
    assert_same_bytes(
        "overlay after shutdown",
        &contents(d, "ov.strata"),
        &changed,
    );
    assert_same_bytes("base", &fs::read(&src).unwrap(), &data);
}

fn qemu_io_on_an_overlay(t: Transport) {
    if !require_tool("qemu-io") || !strata_only("Strata images") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A base of two patterns qemu-io can check: 0x11 in the first 2 MiB, 0x22 after.
    let mut base = vec![0x11u8; 4 * MIB as usize];
    fill(&mut base, 2 * MIB, 2 * MIB, 0x22);
    fs::write(d.join("base.raw"), &base).unwrap();
    strata_at_ok(d, &["create", "-b", "base.raw", "ov.strata"]);
    let mut server = file(d.join("ov.strata")).listen(t).start();
    let uri = server.uri();
    qemu_io_ok(
        &uri,
        false,
        &[
            "read -P 0x11 0 2M",
            "read -P 0x22 2M 2M",
            // A partial cluster: the rest of the cluster keeps the base's bytes.
            "write -P 0xaa 100k 10k",
            "read -P 0x11 64k 36k",
            "read -P 0xaa 100k 10k",
            "read -P 0x11 110k 18k",
            // Unaligned, across a cluster boundary.
            "write -P 0xab 262143 3",
            "read -P 0x11 262142 1",
            "read -P 0xab 262143 3",
            "read -P 0x11 262146 1",
            // Discard hides the base: the overlay records zero clusters.
            "discard 1M 128k",
            "read -P 0 1M 128k",
            "read -P 0x11 960k 64k",
            "read -P 0x11 1152k 64k",
            // Zeroing whole clusters (zero clusters, or zeroes stored as data when
            // holes are not allowed) and a piece of one.
            "write -z -u 2M 64k",
            "write -z 2112k 64k",
            "write -z -u 3000000 1000",
            "read -P 0 2M 128k",
            "read -P 0x22 2176k 64k",
            "read -P 0x22 2999999 1",
            "read -P 0 3000000 1000",
            "read -P 0x22 3001000 1",
            // A written cluster zeroed again, then discarded.
            "write -P 0xcc 3M 64k",
            "write -z -u 3M 32k",
            "read -P 0 3M 32k",
            "read -P 0xcc 3104k 32k",
            "discard 3M 64k",
            "read -P 0 3M 64k",
            "flush",
        ],
    );
    // Another connection sees the same.
    qemu_io_ok(
        &uri,
        true,
        &[
            "read -P 0xaa 100k 10k",
            "read -P 0x11 110k 18k",
            "read -P 0 1M 128k",
            "read -P 0 2M 128k",
            "read -P 0 3000000 1000",
            "read -P 0 3M 64k",
            "read -P 0x22 3136k 960k",
        ],
    );
    // Control: a wrong pattern fails, or the checks above prove nothing.
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-r", "-c", "read -P 0x11 1M 4k", &uri]);
    let bad = run(&mut c);
    assert!(
        !bad.success() || bad.stdout.contains("Pattern verification failed"),
        "qemu-io did not notice a wrong pattern\n{}",
        bad.report()
    );
    server.stop_cleanly_with(libc::SIGTERM);

    assert_clean(d, "ov.strata");
    assert_eq!(
        fs::read(d.join("base.raw")).unwrap(),
        base,
        "the base changed"
    );
    let rows = strata_at_ok(d, &["map", "--json", "ov.strata"]).json();
    let owned: Vec<(u64, u64, &str)> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["depth"] == 1)
        .map(|r| {
            (
                r["offset"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                r["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        owned,
        vec![
            (CS, CS, "data"),
            (3 * CS, 2 * CS, "data"),
            (MIB, 2 * CS, "zero"),
            (2 * MIB, CS, "zero"),
            (2 * MIB + CS, CS, "data"),
            // 3000000 is in the cluster at 2949120 (45 * 64 KiB).
            (45 * CS, CS, "data"),
            (3 * MIB, CS, "zero"),
        ],
        "{rows:#}"
    );
}

over_transports!(
    qemu_img_convert_through_strata_images,
    qemu_io_on_an_overlay
);
