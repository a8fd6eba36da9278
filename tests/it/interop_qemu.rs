//! Interop with qemu's NBD client: `qemu-img` (info, convert, compare, map, and map of
//! `qemu:allocation-depth`) and `qemu-io`. Uses only options qemu 7.2 already has.

use std::fs;

use crate::support::*;

fn virtual_size(uri: &str) -> u64 {
    let out = run_ok(qemu_img().args(["info", "--output=json", "-f", "raw", uri]));
    out.json()["virtual-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no virtual-size in qemu-img info\n{}", out.report()))
}

// --- qemu-img info ---------------------------------------------------------------------

fn qemu_img_info_reports_size(t: Transport) {
    if !require_tool("qemu-img") {
        return;
    }
    // Not a power of two, so a server that rounds or truncates is caught.
    let size = 100 * MIB + 12 * KIB;
    let server = memory(size).listen(t).start();
    assert_eq!(virtual_size(&server.uri()), size, "named export");
    assert_eq!(
        virtual_size(&server.default_uri()),
        size,
        "default export \"\""
    );
}

#[test]
fn qemu_img_info_read_only_export() {
    if !require_tool("qemu-img") {
        return;
    }
    let size = 3 * MIB;
    let server = memory(size).read_only().start();
    assert_eq!(virtual_size(&server.uri()), size);
}

// --- qemu-img convert / compare --------------------------------------------------------

fn qemu_img_convert_roundtrip(t: Transport) {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let len = 8 * MIB as usize;
    let server = memory(len as u64).listen(t).start();
    let dir = server.scratch();
    let src = dir.join("src.raw");
    let out = dir.join("out.raw");
    let data = write_mixed_image(&src, 1, len);
    let uri = server.uri();

    run_ok(&mut qemu_img_convert_into(&src, &uri));
    run_ok(&mut qemu_img_convert(&uri, &out));
    assert_same_bytes("copied out of the export", &fs::read(&out).unwrap(), &data);
    run_ok(&mut qemu_img_compare(&src, &uri));

    // The comparison must notice a change made through another connection.
    qemu_io_ok(&uri, false, &["write -P 0xee 4096 512"]);
    let cmp = run(&mut qemu_img_compare(&src, &uri));
    assert_eq!(
        cmp.code(),
        Some(1),
        "qemu-img compare should report a difference at 4096\n{}",
        cmp.report()
    );
    assert!(cmp.stdout.contains("4096"), "{}", cmp.report());
}

#[test]
fn qemu_img_convert_into_file_export_persists() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let len = 4 * MIB as usize;
    let src = dir.path().join("src.raw");
    let disk = dir.path().join("disk.img");
    let data = write_mixed_image(&src, 2, len);
    fs::write(&disk, vec![0x77u8; len]).unwrap();
    let mut server = file(&disk).start();
    run_ok(&mut qemu_img_convert_into(&src, server.uri()));
    run_ok(&mut qemu_img_compare(&src, server.uri()));
    server.stop_cleanly_with(libc::SIGTERM);
    assert_same_bytes(
        "backing file after shutdown",
        &fs::read(&disk).unwrap(),
        &data,
    );
}

// --- qemu-img map ----------------------------------------------------------------------

fn qemu_img_map_shows_written_ranges(t: Transport) {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let size = 16 * MIB;
    let server = memory(size).listen(t).start();
    let uri = server.uri();

    // Fresh memory disk: one unallocated zero range.
    assert_qemu_map(&uri, size, &[]);

    qemu_io_ok(
        &uri,
        false,
        &["write -P 0x61 1M 1M", "write -P 0x62 6M 2M", "flush"],
    );
    assert_qemu_map(&uri, size, &[(MIB, 2 * MIB), (6 * MIB, 8 * MIB)]);
}

/// `qemu-img map` of the `qemu:allocation-depth` context. qemu's client reads another
/// context through `x-dirty-bitmap` by taking its status values for base:allocation
/// flags: depth 0 (unallocated) shows as data, depth 1 (the top layer) as neither data
/// nor zero (bit 0, "hole"), depth 2 and beyond as zero data (bit 1).
fn qemu_img_map_allocation_depth(t: Transport) {
    if !require_tools(&["qemu-img", "qemu-io"]) || !strata_only("offering qemu:allocation-depth") {
        return;
    }
    let (_dir, disk) = scratch("layer.img");
    let size = 16 * MIB;
    let f = fs::File::create(&disk).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let server = file(&disk).listen(t).start();
    qemu_io_ok(&server.uri(), false, &["write -P 0x63 2M 1M", "flush"]);
    // The plain map sees a hole before the data...
    assert_qemu_map(&server.uri(), size, &[(2 * MIB, 3 * MIB)]);
    // ...but every byte of a raw file, hole or not, is the top layer's.
    let opts = format!(
        "{},x-dirty-bitmap=qemu:allocation-depth",
        server.endpoint().qemu_image_opts(server.export_name())
    );
    let out = run_ok(qemu_img().args(["map", "--output=json", "--image-opts", &opts]));
    let map = parse_qemu_map(&out.stdout);
    let mut pos = 0;
    for e in &map {
        assert_eq!(e.start, pos, "map not contiguous\n{}", out.report());
        assert!(
            !e.data && !e.zero,
            "{e:?} is not reported at depth 1\n{}",
            out.report()
        );
        pos = e.end();
    }
    assert_eq!(pos, size, "map does not cover the export\n{}", out.report());
}

// --- qemu-io ---------------------------------------------------------------------------

fn qemu_io_commands(t: Transport) {
    if !require_tool("qemu-io") {
        return;
    }
    let server = memory(64 * MIB).listen(t).start();
    let uri = server.uri();
    qemu_io_ok(
        &uri,
        false,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            // zero a written range, with and without permission to unmap
            "write -P 0x01 64k 128k",
            "write -z 64k 64k",
            "write -z -u 128k 64k",
            "read -P 0 64k 128k",
            // discard the middle of a written range; the edges must survive
            "write -P 0xcd 256k 128k",
            "discard 288k 32k",
            "read -P 0xcd 256k 32k",
            "read -P 0xcd 320k 64k",
            // several writes in flight at once (disjoint: their order is not defined)
            "aio_write -P 0x11 1M 64k",
            "aio_write -P 0x22 2M 64k",
            "aio_write -P 0x33 3M 60k",
            "aio_write -P 0x44 3132k 4k",
            "aio_flush",
            "read -P 0x11 1M 64k",
            "read -P 0x22 2M 64k",
            "read -P 0x33 3M 60k",
            "read -P 0x44 3132k 4k",
            // unaligned I/O
            "write -P 0x5e 5000001 3333",
            "read -P 0x5e 5000001 3333",
            "read -P 0 5000000 1",
            "read -P 0 5003334 1",
            // the last byte of the export
            "write -P 0x7f 67108863 1",
            "read -P 0x7f 67108863 1",
            "flush",
        ],
    );
    // A new connection (read-only open) sees the same data.
    let mut c = qemu_io(
        &uri,
        false,
        &[
            "read -P 0xab 0 64k",
            "read -P 0 64k 128k",
            "read -P 0x22 2M 64k",
            "read -P 0x7f 67108863 1",
        ],
    );
    c.arg("-r");
    run(&mut c).assert_success();

    // Control: a wrong pattern must make qemu-io fail, or the checks above prove nothing.
    let bad = run(&mut qemu_io(&uri, false, &["read -P 0xac 0 64k"]));
    assert!(
        !bad.success() || bad.stdout.contains("Pattern verification failed"),
        "qemu-io did not notice a wrong pattern\n{}",
        bad.report()
    );
}

fn qemu_io_read_only_export(t: Transport) {
    if !require_tool("qemu-io") {
        return;
    }
    let server = memory(MIB).listen(t).read_only().start();
    let uri = server.uri();
    let mut c = qemu_io(&uri, false, &["read -P 0 0 64k", "read -P 0 960k 64k"]);
    c.arg("-r");
    run(&mut c).assert_success();

    let w = run(&mut qemu_io(&uri, false, &["write -P 0x99 0 4k"]));
    assert!(
        !w.success() || !w.stdout.contains("wrote 4096/4096"),
        "write to a read-only export did not fail\n{}",
        w.report()
    );
    let mut c = qemu_io(&uri, false, &["read -P 0 0 4k"]);
    c.arg("-r");
    run(&mut c).assert_success();
}

over_transports!(
    qemu_img_info_reports_size,
    qemu_img_convert_roundtrip,
    qemu_img_map_shows_written_ranges,
    qemu_img_map_allocation_depth,
    qemu_io_commands,
    qemu_io_read_only_export,
);
