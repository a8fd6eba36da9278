//! qemu-io writing to a served volume with history, `strata history` listing what it
//! made durable, and qemu-img comparing restore points copied out with `strata convert
//! --at` against the same writes replayed on a raw file.

use std::process::Command;

use super::volume;
use crate::support::{
    CMD_TIMEOUT, file, qemu_img_compare, require_tools, run_ok, run_timeout, strata_at,
    strata_at_ok, strata_only,
};

/// qemu-io with a write-back cache (plain writes, durable at the flushes), running
/// `cmds` on `target`.
fn qemu_io_writeback(target: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-t", "writeback"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(target);
    let out = run_ok(&mut c);
    assert!(!out.report().contains("failed"), "{}", out.report());
}

#[test]
fn qemu_writes_become_restore_points_that_qemu_img_compares() {
    if !strata_only("volumes with history") || !require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(dir.path(), "4M");
    let steps: [&[&str]; 3] = [
        &["write -P 0x11 0 1M", "flush"],
        &["write -P 0x22 512K 1M", "flush"],
        &["write -z 0 256K", "write -P 0x33 3M 4K", "flush"],
    ];
    let mut server = file(&vol).name("vol").start();
    for s in steps {
        qemu_io_writeback(&server.uri(), s);
    }
    // While served: the listing reads the log without a lock.
    let listed = strata_at_ok(dir.path(), &["history", "vol", "--json"]).json();
    server.stop_cleanly_with(libc::SIGTERM);
    let points = listed["points"].as_array().unwrap();
    assert_eq!(
        points.len(),
        3,
        "one point per flush after writes: {listed}"
    );
    let mut last = 0;
    for p in points {
        let seq = p["seq"].as_u64().unwrap();
        assert!(seq > last, "points oldest first: {listed}");
        last = seq;
        let time = p["time"].as_str().unwrap();
        assert!(
            time.ends_with('Z') && time.len() == "2026-12-04T10:42:00.000000Z".len(),
            "{time}"
        );
        assert!(
            ["flush", "fua"].contains(&p["kind"].as_str().unwrap()),
            "{p}"
        );
    }
    // Each point, copied out, equals the same writes replayed on a raw file.
    let want = dir.path().join("want.raw");
    std::fs::write(&want, vec![0u8; 4 << 20]).unwrap();
    for (i, s) in steps.iter().enumerate() {
        qemu_io_writeback(want.to_str().unwrap(), s);
        let seq = points[i]["seq"].as_u64().unwrap().to_string();
        let got = format!("p{i}.raw");
        strata_at_ok(
            dir.path(),
            &["convert", "-O", "raw", "--at", &seq, "vol", &got],
        );
        run_ok(&mut qemu_img_compare(dir.path().join(&got), &want));
    }
    // Points that are not there, or not points at all, are clear errors.
    for (at, needle) in [
        ("2001-01-01T00:00:00Z", "before the oldest restore point"),
        ("999999", "no restore point with seq 999999"),
        ("yesterday", "is not a restore point"),
    ] {
        let out = run_timeout(
            &mut strata_at(dir.path(), &["convert", "--at", at, "vol", "x.raw"]),
            CMD_TIMEOUT,
        );
        out.assert_failure().assert_stderr(&[needle]);
        assert!(
            !dir.path().join("x.raw").exists(),
            "nothing written for a bad point"
        );
    }
}
