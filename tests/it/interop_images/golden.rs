//! A golden image (raw or Strata) and its overlays, served by one process: several
//! clients write their overlays concurrently, the golden image stays untouched, and one
//! overlay is committed into it.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;

use crate::support::client::{Client, SIMPLE};
use crate::support::spec::{CMD_FLUSH, CMD_WRITE};
use crate::support::{
    Endpoint, MIB, assert_same_bytes, exports, pattern, qemu_img_compare, qemu_io_ok,
    require_tools, run, run_ok, strata_at, strata_at_ok, strata_only, write_mixed_image,
};

use super::{CS, assert_clean, contents, put};

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
