//! Interop with libnbd's command-line tools: `nbdinfo` (listing, size, capability flags,
//! allocation and allocation-depth maps) and `nbdcopy` (single and multi-connection
//! copies).

use std::fs;
use std::process::Command;

use crate::support::*;

/// `nbdinfo --can X` / `--is X`: exit 0 means true, 2 means false, anything else is an
/// error. Returns the answer.
#[track_caller]
fn nbdinfo_flag(kind: &str, what: &str, uri: &str) -> bool {
    let out = nbdinfo(&[&format!("--{kind}"), what, uri]);
    match out.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!("nbdinfo --{kind} {what} failed\n{}", out.report()),
    }
}

#[track_caller]
fn assert_flag(kind: &str, what: &str, uri: &str, want: bool) {
    assert_eq!(
        nbdinfo_flag(kind, what, uri),
        want,
        "nbdinfo --{kind} {what} on {uri}"
    );
}

fn write_with_qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = run_ok(c.arg(uri));
    assert!(!out.stdout.contains("fail"), "{}", out.report());
}

// --- nbdinfo ---------------------------------------------------------------------------

fn nbdinfo_list_shows_export_name(t: Transport) {
    if !require_tool("nbdinfo") {
        return;
    }
    let server = memory(MIB).listen(t).name("vol-list-test").start();
    let out = nbdinfo(&["--list", &server.default_uri()]).assert_success();
    assert!(
        out.stdout.contains("export=\"vol-list-test\""),
        "export name missing from the list\n{}",
        out.report()
    );
    // The listed size belongs to that export.
    assert!(
        out.stdout.contains(&format!("export-size: {}", MIB)),
        "{}",
        out.report()
    );
}

fn nbdinfo_size(t: Transport) {
    if !require_tool("nbdinfo") {
        return;
    }
    let size = 77 * MIB + 4 * KIB;
    let server = memory(size).listen(t).start();
    for uri in [server.uri(), server.default_uri()] {
        let out = nbdinfo(&["--size", &uri]).assert_success();
        assert_eq!(
            out.stdout.trim().parse::<u64>().ok(),
            Some(size),
            "{}",
            out.report()
        );
    }
}

fn nbdinfo_flags_read_write(t: Transport) {
    if !require_tool("nbdinfo") {
        return;
    }
    let server = memory(8 * MIB).listen(t).start();
    let uri = server.uri();
    assert_flag("is", "read-only", &uri, false);
    for cap in [
        "flush",
        "trim",
        "zero",
        "fast-zero",
        "fua",
        "multi-conn",
        "cache",
    ] {
        assert_flag("can", cap, &uri, true);
    }
    // Structured replies are what make block status and sparse reads possible.
    assert_flag("can", "structured-reply", &uri, true);
}

fn nbdinfo_flags_read_only(t: Transport) {
    if !require_tool("nbdinfo") {
        return;
    }
    let server = memory(8 * MIB).listen(t).read_only().start();
    let uri = server.uri();
    assert_flag("is", "read-only", &uri, true);
    for cap in ["trim", "zero", "fast-zero", "fua"] {
        assert_flag("can", cap, &uri, false);
    }
}

fn nbdinfo_map_after_writes(t: Transport) {
    if !require_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let size = 8 * MIB;
    let server = memory(size).listen(t).start();
    let uri = server.uri();
    assert_nbdinfo_map(&uri, size, &[]);

    write_with_qemu_io(&uri, &["write -P 0x31 1M 1M", "write -P 0x32 5M 512k"]);
    assert_nbdinfo_map(
        &uri,
        size,
        &[(MIB, 2 * MIB), (5 * MIB, 5 * MIB + 512 * KIB)],
    );
}

#[test]
fn nbdinfo_map_read_only_file_export() {
    if !require_tool("nbdinfo") {
        return;
    }
    // A fully written file, exported read-only, is all data (block status works on
    // read-only exports too).
    let (_dir, disk) = scratch("full.img");
    fs::write(&disk, pattern(9, 2 * MIB as usize)).unwrap();
    let server = file(&disk).read_only().start();
    let out = nbdinfo(&["--map", &server.uri()]).assert_success();
    assert_map(
        &parse_nbdinfo_map(&out.stdout),
        2 * MIB,
        &[(0, 2 * MIB)],
        &out.stdout,
    );
}

/// Checks that `nbdinfo --map=qemu:allocation-depth` covers `[0, size)` contiguously
/// and puts every byte in the top layer (depth 1), as a single-layer export must.
#[track_caller]
fn assert_all_local(uri: &str, size: u64) {
    let out = nbdinfo(&["--map=qemu:allocation-depth", uri]).assert_success();
    let map = parse_nbdinfo_depth_map(&out.stdout);
    assert!(!map.is_empty(), "empty map\n{}", out.report());
    let mut pos = 0;
    for e in &map {
        assert_eq!(e.start, pos, "map not contiguous\n{}", out.report());
        assert!(e.length > 0, "empty entry {e:?}\n{}", out.report());
        assert_eq!(
            (e.depth, e.description.as_str()),
            (1, "local"),
            "{e:?} is not in the top layer\n{}",
            out.report()
        );
        pos += e.length;
    }
    assert_eq!(pos, size, "map does not cover the export\n{}", out.report());
}

fn nbdinfo_map_allocation_depth(t: Transport) {
    if !require_tools(&["nbdinfo", "qemu-io"]) || !strata_only("offering qemu:allocation-depth") {
        return;
    }
    let size = 8 * MIB;
    let server = memory(size).listen(t).start();
    let uri = server.uri();
    let out = nbdinfo(&[&uri]).assert_success();
    for context in ["base:allocation", "qemu:allocation-depth"] {
        assert!(
            out.stdout.lines().any(|l| l.trim() == context),
            "{context} not offered\n{}",
            out.report()
        );
    }
    assert_all_local(&uri, size);

    // Writes leave holes in base:allocation, but holes are the top layer's too.
    write_with_qemu_io(&uri, &["write -P 0x33 1M 1M", "write -P 0x34 7M 64k"]);
    assert_nbdinfo_map(&uri, size, &[(MIB, 2 * MIB), (7 * MIB, 7 * MIB + 64 * KIB)]);
    assert_all_local(&uri, size);

    // The same through the read-only layer, over a sparse raw file.
    let disk = server.scratch().join("sparse.img");
    let f = fs::File::create(&disk).unwrap();
    f.set_len(3 * MIB).unwrap();
    drop(f);
    let ro = file(&disk).listen(t).read_only().start();
    assert_all_local(&ro.uri(), 3 * MIB);
}

// --- nbdcopy ---------------------------------------------------------------------------

fn copy_in_and_out(t: Transport, connections: Option<u32>) {
    if !require_tool("nbdcopy") {
        return;
    }
    let len = 16 * MIB as usize;
    let server = memory(len as u64).listen(t).start();
    let dir = server.scratch();
    let uri = server.uri();
    if connections.is_some() {
        // nbdcopy opens several connections only to a server that allows it.
        assert_flag("can", "multi-conn", &uri, true);
    }
    let nbdcopy = |src: &str, dst: &str| {
        let mut c = Command::new("nbdcopy");
        if let Some(n) = connections {
            // nbdcopy caps connections at its thread count, which defaults to the cores.
            c.arg(format!("--connections={n}"))
                .arg(format!("--threads={n}"))
                .arg("--requests=16");
        }
        run_ok(c.arg("--flush").arg(src).arg(dst));
    };

    // Fill the export with non-zero data first, so the zero runs of the second image
    // must really be written (nbdcopy sends them as zero requests).
    let noise = dir.join("noise.raw");
    fs::write(&noise, pattern(77, len)).unwrap();
    nbdcopy(noise.to_str().unwrap(), &uri);

    let src = dir.join("src.raw");
    let data = write_mixed_image(&src, 3, len);
    nbdcopy(src.to_str().unwrap(), &uri);

    let out = dir.join("out.raw");
    nbdcopy(&uri, out.to_str().unwrap());
    assert_same_bytes("nbdcopy round trip", &fs::read(&out).unwrap(), &data);
}

fn nbdcopy_roundtrip(t: Transport) {
    copy_in_and_out(t, None);
}

fn nbdcopy_multi_conn(t: Transport) {
    if !require_tool("nbdinfo") {
        return;
    }
    copy_in_and_out(t, Some(4));
}

fn nbdcopy_out_of_read_only_export(t: Transport) {
    if !require_tool("nbdcopy") {
        return;
    }
    let (dir, disk) = scratch("ro.img");
    let data = write_mixed_image(&disk, 4, 4 * MIB as usize);
    let server = file(&disk).listen(t).read_only().start();
    let out = dir.path().join("out.raw");
    run_ok(Command::new("nbdcopy").arg(server.uri()).arg(&out));
    assert_same_bytes(
        "copied from read-only export",
        &fs::read(&out).unwrap(),
        &data,
    );

    // Copying into it must fail and change nothing.
    let other = dir.path().join("other.raw");
    fs::write(&other, pattern(5, 4 * MIB as usize)).unwrap();
    let w = run(Command::new("nbdcopy").arg(&other).arg(server.uri()));
    assert!(
        !w.success(),
        "nbdcopy into a read-only export succeeded\n{}",
        w.report()
    );
    drop(server);
    assert_same_bytes(
        "read-only file after a refused copy",
        &fs::read(&disk).unwrap(),
        &data,
    );
}

over_transports!(
    nbdinfo_list_shows_export_name,
    nbdinfo_size,
    nbdinfo_flags_read_write,
    nbdinfo_flags_read_only,
    nbdinfo_map_after_writes,
    nbdinfo_map_allocation_depth,
    nbdcopy_roundtrip,
    nbdcopy_multi_conn,
    nbdcopy_out_of_read_only_export,
);
