//! Maps of a three-layer chain: `qemu-img map` and `nbdinfo --map`, both contexts.

use std::fs;

use crate::support::{
    MapEntry, Transport, file, nbdinfo, over_transports, parse_nbdinfo_depth_map,
    parse_nbdinfo_map, parse_qemu_map, pattern, qemu_img, qemu_io_ok, require_tools, run_ok,
    strata_at_ok, strata_only,
};

use super::CS;

/// Per cluster of `[0, size)`: the (data, zero) flags of `map`, whose entries must
/// start and end on cluster boundaries (or the end of the disk).
#[track_caller]
fn flags_per_cluster(map: &[MapEntry], size: u64, raw: &str) -> Vec<(bool, bool)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for e in map {
        assert_eq!(e.start, pos, "map not contiguous\n{raw}");
        assert!(
            e.start % CS == 0 && (e.end() % CS == 0 || e.end() == size),
            "{e:?} does not follow cluster boundaries\n{raw}"
        );
        for _ in 0..e.length.div_ceil(CS) {
            out.push((e.data, e.zero));
        }
        pos = e.end();
    }
    assert_eq!(pos, size, "map does not cover the export\n{raw}");
    out
}

fn maps_of_a_three_layer_chain(t: Transport) {
    if !require_tools(&["qemu-img", "nbdinfo"]) || !strata_only("Strata images") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // base.raw: 16 clusters, data in the first 8, a hole after.
    let base = d.join("base.raw");
    let f = fs::File::create(&base).unwrap();
    f.set_len(16 * CS).unwrap();
    drop(f);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&base).unwrap();
        f.write_all_at(&pattern(40, 8 * CS as usize), 0).unwrap();
    }
    strata_at_ok(d, &["create", "-b", "base.raw", "mid.strata"]);
    // top is larger than its backing: its last 4 clusters belong to no layer.
    strata_at_ok(
        d,
        &[
            "create",
            "-b",
            "mid.strata",
            "top.strata",
            "-s",
            &(20 * CS).to_string(),
        ],
    );

    // Fill mid (data at 2, zero cluster at 3), then top (data at 5, zero at 6, a
    // discard at 9 over the base's hole, data at 17 past the base).
    let mut server = file(d.join("mid.strata")).listen(t).start();
    qemu_io_ok(
        &server.uri(),
        false,
        &["write -P 0x22 128k 64k", "write -z -u 192k 64k", "flush"],
    );
    server.stop_cleanly_with(libc::SIGTERM);
    let server = file(d.join("top.strata")).listen(t).start();
    qemu_io_ok(
        &server.uri(),
        false,
        &[
            "write -P 0x55 320k 64k",
            "write -z -u 384k 64k",
            "discard 576k 64k",
            "write -P 0x77 1088k 64k",
            "flush",
        ],
    );
    let size = 20 * CS;
    let uri = server.uri();

    // Expected per cluster: (data, zero) for base:allocation, and the depth.
    const DATA: (bool, bool) = (true, false);
    const ZERO: (bool, bool) = (true, true);
    const HOLE: (bool, bool) = (false, true);
    let mut want = vec![(DATA, 3); 8];
    want.extend(vec![(HOLE, 3); 8]);
    want.extend(vec![(HOLE, 0); 4]);
    want[2] = (DATA, 2);
    want[3] = (ZERO, 2);
    want[5] = (DATA, 1);
    want[6] = (ZERO, 1);
    want[9] = (ZERO, 1);
    want[17] = (DATA, 1);
    let want_flags: Vec<(bool, bool)> = want.iter().map(|w| w.0).collect();
    let want_depth: Vec<u32> = want.iter().map(|w| w.1).collect();

    let out = run_ok(qemu_img().args(["map", "--output=json", "-f", "raw", &uri]));
    let got = flags_per_cluster(&parse_qemu_map(&out.stdout), size, &out.stdout);
    assert_eq!(got, want_flags, "qemu-img map\n{}", out.stdout);

    let out = nbdinfo(&["--map", &uri]).assert_success();
    let got = flags_per_cluster(&parse_nbdinfo_map(&out.stdout), size, &out.stdout);
    assert_eq!(got, want_flags, "nbdinfo --map\n{}", out.stdout);

    let out = nbdinfo(&["--map=qemu:allocation-depth", &uri]).assert_success();
    let mut got = Vec::new();
    let mut pos = 0;
    for e in parse_nbdinfo_depth_map(&out.stdout) {
        assert_eq!(e.start, pos, "map not contiguous\n{}", out.stdout);
        assert!(
            e.start % CS == 0 && e.length % CS == 0,
            "{e:?}\n{}",
            out.stdout
        );
        let words = match e.depth {
            0 => "absent".to_owned(),
            1 => "local".to_owned(),
            n => format!("backing depth {n}"),
        };
        assert_eq!(e.description, words, "{e:?}\n{}", out.stdout);
        got.extend(std::iter::repeat_n(e.depth, (e.length / CS) as usize));
        pos += e.length;
    }
    assert_eq!(
        got, want_depth,
        "nbdinfo --map=qemu:allocation-depth\n{}",
        out.stdout
    );

    // qemu reads another context through x-dirty-bitmap, taking its values as
    // base:allocation flags: depth 0 shows as data, 1 (bit 0, "hole") as neither data
    // nor zero, 2 and beyond as zero data.
    let opts = format!(
        "{},x-dirty-bitmap=qemu:allocation-depth",
        server.endpoint().qemu_image_opts(server.export_name())
    );
    let out = run_ok(qemu_img().args(["map", "--output=json", "--image-opts", &opts]));
    let got = flags_per_cluster(&parse_qemu_map(&out.stdout), size, &out.stdout);
    let as_flags: Vec<(bool, bool)> = want_depth
        .iter()
        .map(|&depth| match depth {
            0 => (true, false),
            1 => (false, false),
            _ => (true, true),
        })
        .collect();
    assert_eq!(
        got, as_flags,
        "qemu-img map of qemu:allocation-depth\n{}",
        out.stdout
    );

    // And strata map agrees, the server still running.
    let rows = strata_at_ok(d, &["map", "--json", "top.strata"]).json();
    let mut depths = Vec::new();
    for r in rows.as_array().unwrap() {
        let n = r["length"].as_u64().unwrap() / CS;
        depths.extend(std::iter::repeat_n(
            r["depth"].as_u64().unwrap() as u32,
            n as usize,
        ));
    }
    assert_eq!(depths, want_depth, "strata map\n{rows:#}");
}

over_transports!(maps_of_a_three_layer_chain);
