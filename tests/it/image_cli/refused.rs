//! Images the tools refuse: `serve` on another tool's format or with a missing or changed
//! backing file, and the tools that change an image while it is served.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{
    CMD_TIMEOUT, MIB, Transport, file, require_tool, run_timeout, strata, strata_only,
};

use super::{
    CS, assert_clean, info_json, map_rows, num, p, raw_file, strata_fails, strata_in, strata_ok,
    write_image,
};

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
// Images in use
// ---------------------------------------------------------------------------------------

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
