//! Strata images served to real clients: `qemu-img convert`/`compare` in and out of a
//! Strata export, `qemu-io` on an overlay, `qemu-img map` and `nbdinfo --map` (both
//! contexts) over a three-layer chain, one server holding a golden image's overlays
//! written concurrently by several clients, then `strata commit`, and a server that runs
//! out of file space. Uses only options qemu 7.2 already has (`scripts/test.sh` runs
//! this file with qemu-img 7.2 as well).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;

use crate::support::client::{Client, SIMPLE};
use crate::support::spec::*;
use crate::support::*;

const CS: u64 = 64 * KIB;

#[track_caller]
fn assert_clean(dir: &Path, image: &str) {
    strata_at_ok(dir, &["check", image]).assert_stdout(&["no errors"]);
}

/// The contents of a Strata image (with its chain), through `strata convert -O raw`.
fn contents(dir: &Path, image: &str) -> Vec<u8> {
    let out = dir.join(format!("{image}.contents.raw"));
    let _ = fs::remove_file(&out);
    strata_at_ok(dir, &["convert", "-O", "raw", image, out.to_str().unwrap()]);
    let data = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    data
}

fn put(buf: &mut [u8], off: u64, data: &[u8]) {
    buf[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn fill(buf: &mut [u8], off: u64, len: u64, byte: u8) {
    buf[off as usize..(off + len) as usize].fill(byte);
}

// ---------------------------------------------------------------------------------------
// qemu-img convert and compare
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// qemu-io on an overlay
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// Maps of a three-layer chain
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// A golden image and its overlays, served by one process
// ---------------------------------------------------------------------------------------

const GOLDEN: u64 = 16 * MIB;
const VMS: usize = 4;

/// The writes client `i` makes: the same places for every client (so that any leak
/// between overlays shows), one of its own, each with its own data.
fn client_writes(i: usize) -> Vec<(u64, Vec<u8>)> {
    let places: [(u64, usize); 6] = [
        (0, 4096),
        (100_000, 5000),
        (MIB, CS as usize),
        (5 * MIB + 12_345, 200_000),
        (GOLDEN - 70_000, 70_000),
        (2 * MIB * (i as u64 + 1) + 777, 3000),
    ];
    places
        .iter()
        .enumerate()
        .map(|(k, &(off, len))| {
            let data = if i % 2 == 0 {
                pattern(1000 + 10 * i as u64 + k as u64, len)
            } else {
                // qemu-io writes one byte value per request.
                vec![0x40 + (i as u8) * 16 + k as u8; len]
            };
            (off, data)
        })
        .collect()
}

/// Client `i` writes its data to `uri` (even clients with the raw client over TCP, odd
/// ones with qemu-io), flushes, and reads its whole disk back.
fn golden_client(i: usize, server_ep: Endpoint, uri: String, name: String, golden: &[u8]) {
    let writes = client_writes(i);
    let mut expected = golden.to_vec();
    for (off, data) in &writes {
        put(&mut expected, *off, data);
    }
    if i % 2 == 0 {
        let Endpoint::Tcp(addr) = server_ep else {
            panic!("the raw client needs TCP")
        };
        let mut c = Client::tcp(addr).unwrap();
        c.handshake(&name, SIMPLE).unwrap();
        for (off, data) in &writes {
            let errno = c
                .command(0, CMD_WRITE, *off, data.len() as u64, data)
                .unwrap();
            assert_eq!(errno, 0, "{name}: write at {off}");
        }
        assert_eq!(
            c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(),
            0,
            "{name}: flush"
        );
        let mut got = Vec::new();
        for off in (0..GOLDEN).step_by(MIB as usize) {
            got.extend(c.read(0, off, MIB as usize).unwrap().expect("read"));
        }
        assert_same_bytes(&format!("{name} read back"), &got, &expected);
    } else {
        let cmds: Vec<String> = writes
            .iter()
            .map(|(off, data)| format!("write -P {} {off} {}", data[0], data.len()))
            .chain(std::iter::once("flush".to_owned()))
            .chain(
                writes
                    .iter()
                    .map(|(off, data)| format!("read -P {} {off} {}", data[0], data.len())),
            )
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io_ok(&uri, false, &cmds);
    }
}

fn golden_image(kind: &str) {
    if !require_tools(&["qemu-img", "qemu-io", "nbdcopy"]) || !strata_only("Strata images") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = write_mixed_image(&d.join("golden.raw"), 50, GOLDEN as usize);
    let golden = if kind == "raw" {
        "golden.raw"
    } else {
        strata_at_ok(d, &["convert", "golden.raw", "golden.strata"]);
        "golden.strata"
    };
    let before = fs::read(d.join(golden)).unwrap();
    let names: Vec<String> = (0..VMS).map(|i| format!("vm-{i}")).collect();
    let paths: Vec<_> = (0..VMS).map(|i| d.join(format!("vm{i}.strata"))).collect();
    for p in &paths {
        strata_at_ok(d, &["create", "-b", golden, p.to_str().unwrap()]);
    }
    let list: Vec<(&str, &Path)> = names
        .iter()
        .map(String::as_str)
        .zip(paths.iter().map(|p| p.as_path()))
        .collect();
    let mut server = exports(&list).start();

    let barrier = std::sync::Arc::new(std::sync::Barrier::new(VMS));
    let clients: Vec<_> = (0..VMS)
        .map(|i| {
            let (ep, uri, name) = (
                server.endpoint().clone(),
                server.uri_of(&names[i]),
                names[i].clone(),
            );
            let (raw, barrier) = (raw.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                golden_client(i, ep, uri, name, &raw);
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        if let Err(e) = c.join() {
            std::panic::resume_unwind(Box::new(format!(
                "client {i} failed: {}\n--- server log ---\n{}",
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default(),
                server.log()
            )));
        }
    }
    // Every export holds the golden data and its own writes only, seen from new
    // connections and other tools.
    let mut expected: Vec<Vec<u8>> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut e = raw.clone();
        for (off, data) in client_writes(i) {
            put(&mut e, off, &data);
        }
        let want = d.join(format!("want{i}.raw"));
        fs::write(&want, &e).unwrap();
        run_ok(&mut qemu_img_compare(&want, server.uri_of(name)));
        expected.push(e);
    }
    let copy = d.join("copy.raw");
    run_ok(
        Command::new("nbdcopy")
            .arg(server.uri_of(&names[3]))
            .arg(&copy),
    );
    assert_same_bytes("nbdcopy of vm-3", &fs::read(&copy).unwrap(), &expected[3]);
    server.stop_cleanly_with(libc::SIGTERM);

    assert_eq!(
        fs::read(d.join(golden)).unwrap(),
        before,
        "the golden image changed"
    );
    for (i, p) in paths.iter().enumerate() {
        let p = p.to_str().unwrap();
        assert_clean(d, p);
        assert_same_bytes(
            &format!("vm{i} after shutdown"),
            &contents(d, p),
            &expected[i],
        );
    }

    // Commit one overlay into the golden image.
    strata_at_ok(d, &["commit", "vm0.strata"]);
    let merged = if kind == "raw" {
        fs::read(d.join(golden)).unwrap()
    } else {
        assert_clean(d, golden);
        contents(d, golden)
    };
    assert_same_bytes("golden image after commit", &merged, &expected[0]);
    let info = strata_at_ok(d, &["info", "--json", "vm0.strata"]).json();
    assert_eq!(info["allocated"], 0, "{info:#}");
    assert_same_bytes("vm0 after commit", &contents(d, "vm0.strata"), &expected[0]);
    if kind == "raw" {
        // The other overlays were made on the old contents and now refuse to open.
        run(&mut strata_at(d, &["info", "vm1.strata"]))
            .assert_code(1)
            .assert_stderr(&["backing file has changed", "golden.raw"]);
    }
}

#[test]
fn golden_raw_image_with_overlays() {
    golden_image("raw");
}

#[test]
fn golden_strata_image_with_overlays() {
    golden_image("strata");
}

// ---------------------------------------------------------------------------------------
// Several clients sharing the clusters of one overlay
// ---------------------------------------------------------------------------------------

/// A barrier for the client threads that never leaves them waiting forever: a client
/// that fails (panics) while holding a [`Seat`] breaks it for the others, and waiting
/// gives up after a minute.
struct Rendezvous {
    parties: usize,
    /// (arrived, generation, broken)
    state: std::sync::Mutex<(usize, u64, bool)>,
    cv: std::sync::Condvar,
}

/// A client's place at a [`Rendezvous`].
struct Seat(std::sync::Arc<Rendezvous>);

impl Drop for Seat {
    fn drop(&mut self) {
        if thread::panicking() {
            let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            st.2 = true;
            self.0.cv.notify_all();
        }
    }
}

impl Seat {
    fn wait(&self) {
        let r = &self.0;
        let mut st = r.state.lock().unwrap_or_else(|e| e.into_inner());
        let generation = st.1;
        st.0 += 1;
        if st.0 == r.parties {
            st.0 = 0;
            st.1 += 1;
            r.cv.notify_all();
            return;
        }
        let (st, timeout) =
            r.cv.wait_timeout_while(st, std::time::Duration::from_secs(60), |st| {
                st.1 == generation && !st.2
            })
            .unwrap_or_else(|e| e.into_inner());
        assert!(!st.2, "another client failed");
        assert!(!timeout.timed_out(), "another client never arrived");
    }
}

/// Four connections to one overlay write, zero and trim concurrently, each in its own
/// stripes of the disk, narrower than a cluster, so that clusters are shared by several
/// clients and copied up while their neighbours write. After each round every client
/// checks that its stripes hold exactly what it did to them, over the base's bytes;
/// then the whole disk is trimmed or zeroed, so that the next round allocates every
/// cluster again (reusing the space the trims freed).
fn concurrent_clients(cluster: &str, stripe: u64) {
    if !strata_only("Strata images") {
        return;
    }
    const CLIENTS: u64 = 4;
    const SIZE: u64 = MIB;
    const ROUNDS: u64 = 20;
    const OPS: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = pattern(90, SIZE as usize);
    fs::write(d.join("base.raw"), &base).unwrap();
    strata_at_ok(
        d,
        &["create", "-b", "base.raw", "shared.strata", "-c", cluster],
    );
    let server = file(d.join("shared.strata")).start();
    let Endpoint::Tcp(addr) = server.endpoint().clone() else {
        panic!("TCP expected")
    };
    let name = server.export_name().to_owned();
    let meet = std::sync::Arc::new(Rendezvous {
        parties: CLIENTS as usize,
        state: std::sync::Mutex::new((0, 0, false)),
        cv: std::sync::Condvar::new(),
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (name, meet, mut disk) = (name.clone(), Seat(meet.clone()), base.clone());
            thread::spawn(move || {
                let mine: Vec<u64> = (0..SIZE.div_ceil(stripe))
                    .filter(|s| s % CLIENTS == k)
                    .collect();
                let stripes = |s: u64| (s * stripe) as usize..((s + 1) * stripe).min(SIZE) as usize;
                let mut c = Client::tcp(addr).unwrap();
                c.handshake(&name, SIMPLE).unwrap();
                let mut x = 0x1234_5678 ^ ((k + 1) * 0x9E37_79B9);
                let mut next = |n: u64| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % n
                };
                meet.wait();
                for round in 0..ROUNDS {
                    for i in 0..OPS {
                        let s = mine[next(mine.len() as u64) as usize];
                        let r = stripes(s);
                        let off = r.start as u64 + next((r.end - r.start) as u64);
                        let len = 1 + next(r.end as u64 - off);
                        let (cmd, payload) = match next(10) {
                            0 | 1 => (CMD_WRITE_ZEROES, Vec::new()),
                            2 => (CMD_TRIM, Vec::new()),
                            _ => (CMD_WRITE, pattern(1000 * k + 100 * round + i, len as usize)),
                        };
                        let errno = c.command(0, cmd, off, len, &payload).unwrap();
                        assert_eq!(errno, 0, "client {k}: command {cmd} at {off}+{len}");
                        let range = off as usize..(off + len) as usize;
                        if cmd == CMD_WRITE {
                            disk[range].copy_from_slice(&payload);
                        } else {
                            disk[range].fill(0);
                        }
                    }
                    meet.wait();
                    let got = c.read(0, 0, SIZE as usize).unwrap().expect("read");
                    for &s in &mine {
                        let r = stripes(s);
                        assert_same_bytes(
                            &format!("client {k}, round {round}, stripe at {}", r.start),
                            &got[r.clone()],
                            &disk[r],
                        );
                    }
                    if round + 1 == ROUNDS {
                        break;
                    }
                    meet.wait();
                    if k == 0 {
                        let cmd = if round % 2 == 0 {
                            CMD_TRIM
                        } else {
                            CMD_WRITE_ZEROES
                        };
                        assert_eq!(
                            c.command(0, cmd, 0, SIZE, &[]).unwrap(),
                            0,
                            "clearing the disk"
                        );
                        if round % 3 != 2 {
                            assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
                        }
                    }
                    disk.fill(0);
                    meet.wait();
                }
                assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
                (mine, disk)
            })
        })
        .collect();
    let mut expected = vec![0u8; SIZE as usize];
    for c in clients {
        let (mine, disk) = c.join().expect("client failed");
        for s in mine {
            let r = (s * stripe) as usize..((s + 1) * stripe).min(SIZE) as usize;
            expected[r.clone()].copy_from_slice(&disk[r]);
        }
    }
    drop(server);
    assert_clean(d, "shared.strata");
    assert_same_bytes("after shutdown", &contents(d, "shared.strata"), &expected);
    assert_eq!(
        fs::read(d.join("base.raw")).unwrap(),
        base,
        "the base changed"
    );
}

#[test]
fn concurrent_clients_share_small_clusters() {
    // 4 KiB clusters, 1000-byte stripes: most requests allocate a cluster that others
    // are allocating too.
    concurrent_clients("4K", 1000);
}

#[test]
fn concurrent_clients_share_large_clusters() {
    // 64 KiB clusters, stripes of 25576 bytes: requests cross cluster boundaries.
    concurrent_clients("64K", 25_576);
}

// ---------------------------------------------------------------------------------------
// Out of space
// ---------------------------------------------------------------------------------------

/// A connection over TCP to the server's export.
fn conn(server: &Server) -> Client {
    let Endpoint::Tcp(addr) = server.endpoint() else {
        panic!("TCP expected")
    };
    let mut c = Client::tcp(*addr).unwrap();
    c.handshake(server.export_name(), SIMPLE).unwrap();
    c
}

#[test]
fn writes_beyond_the_file_size_limit_fail_with_enospc() {
    if !strata_only("Strata images") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.strata");
    strata_at_ok(d, &["create", "disk.strata", "-s", "64M"]);
    let first = pattern(60, 4 * CS as usize);
    let mut expected = vec![0u8; 64 * MIB as usize];
    put(&mut expected, 0, &first);
    let mut server = file(&img).start();
    let mut c = conn(&server);
    assert_eq!(
        c.command(0, CMD_WRITE, 0, first.len() as u64, &first)
            .unwrap(),
        0
    );
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    drop(c);
    server.stop_cleanly_with(libc::SIGTERM);

    // The file may not grow at all: new clusters cannot be stored.
    let len = fs::metadata(&img).unwrap().len();
    let mut server = file(&img).file_size_limit(len).start();
    let mut c = conn(&server);
    let new = pattern(61, CS as usize);
    assert_eq!(
        c.command(0, CMD_WRITE, 10 * MIB, CS, &new).unwrap(),
        ENOSPC,
        "a write needing a new cluster\n{}",
        server.log()
    );
    // Clusters the image holds are still written in place, on the same connection.
    let small = pattern(62, 1000);
    assert_eq!(c.command(0, CMD_WRITE, 100, 1000, &small).unwrap(), 0);
    put(&mut expected, 100, &small);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    assert_same_bytes(
        "after ENOSPC",
        &c.read(0, 0, 4 * CS as usize).unwrap().unwrap(),
        &expected[..4 * CS as usize],
    );
    // Space given back by a trim is reused once the trim is durable.
    assert_eq!(c.command(0, CMD_TRIM, 2 * CS, CS, &[]).unwrap(), 0);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    put(&mut expected, 2 * CS, &vec![0; CS as usize]);
    assert_eq!(
        c.command(0, CMD_WRITE, 10 * MIB, CS, &new).unwrap(),
        0,
        "{}",
        server.log()
    );
    put(&mut expected, 10 * MIB, &new);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    // Two clusters do not fit in the one freed.
    let two = pattern(63, 2 * CS as usize);
    assert_eq!(
        c.command(0, CMD_WRITE, 20 * MIB, 2 * CS, &two).unwrap(),
        ENOSPC
    );
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    // The server still serves this connection and new ones.
    assert_same_bytes(
        "written cluster",
        &c.read(0, 10 * MIB, CS as usize).unwrap().unwrap(),
        &new,
    );
    let mut c2 = conn(&server);
    assert_same_bytes(
        "new connection",
        &c2.read(0, 0, 4 * CS as usize).unwrap().unwrap(),
        &expected[..4 * CS as usize],
    );
    drop((c, c2));
    server.stop_cleanly_with(libc::SIGTERM);
    assert_clean(d, "disk.strata");
    let got = contents(d, "disk.strata");
    assert_same_bytes(
        "before the failed write",
        &got[..20 * MIB as usize],
        &expected[..20 * MIB as usize],
    );
    assert_same_bytes(
        "after the failed write",
        &got[22 * MIB as usize..],
        &expected[22 * MIB as usize..],
    );

    // Room for one more cluster, not for the map page a far cluster needs: the write
    // succeeds, the flush that would make it durable fails and says so.
    let len = fs::metadata(&img).unwrap().len();
    let mut server = file(&img).file_size_limit(len + CS).start();
    let mut c = conn(&server);
    let far = 40 * MIB;
    assert_eq!(
        c.command(0, CMD_WRITE, far, CS, &new).unwrap(),
        0,
        "{}",
        server.log()
    );
    assert_eq!(
        c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(),
        ENOSPC,
        "{}",
        server.log()
    );
    assert_eq!(
        c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(),
        ENOSPC,
        "{}",
        server.log()
    );
    // Taking the write back makes the map fit again.
    assert_eq!(c.command(0, CMD_TRIM, far, CS, &[]).unwrap(), 0);
    assert_eq!(
        c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(),
        0,
        "{}",
        server.log()
    );
    assert_same_bytes(
        "flushed data",
        &c.read(0, 0, 4 * CS as usize).unwrap().unwrap(),
        &expected[..4 * CS as usize],
    );
    drop(c);
    server.stop_cleanly_with(libc::SIGTERM);
    assert_clean(d, "disk.strata");
    let got = contents(d, "disk.strata");
    assert_same_bytes(
        "flushed data after restart",
        &got[..20 * MIB as usize],
        &expected[..20 * MIB as usize],
    );
    assert!(
        got[far as usize..(far + CS) as usize]
            .iter()
            .all(|&b| b == 0)
    );
}

over_transports!(
    qemu_img_convert_through_strata_images,
    qemu_io_on_an_overlay,
    maps_of_a_three_layer_chain,
);
