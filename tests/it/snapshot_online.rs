//! Snapshots of a running server, through the control API and `strata ctl`: taking,
//! listing, serving, deleting and rolling back snapshots while NBD clients are connected;
//! snapshots under a write load (a load generator that records when every write was sent
//! and acknowledged, and fio with verification), checked write by write; and the server
//! killed at every step of a snapshot operation (`STRATA_FAILPOINT`), then restarted.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::client::Client;
use crate::support::control::{Response, Running};
use crate::support::spec::*;
use crate::support::{run_ok, spawn, strata};

const BLOCK: u64 = 4096;

/// A fresh Strata image, `disk.strata`, in a scratch directory of its own.
struct Disk {
    dir: TempDir,
    img: PathBuf,
}

impl Disk {
    fn new(size: &str, cluster: &str) -> Disk {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.strata");
        run_ok(
            strata()
                .args(["create", "--size", size, "--cluster-size", cluster])
                .arg(&img),
        );
        Disk { dir, img }
    }

    /// A server of the image alone (export `disk`), with a control socket.
    fn serve(&self) -> Running {
        Running::serve(&[self.img.as_os_str()])
    }

    /// A fresh image of `size` with 64 KiB clusters, served, and a client of it.
    fn served(size: &str) -> (Disk, Running, Client) {
        let disk = Disk::new(size, "64K");
        let server = disk.serve();
        let c = server.connect("disk");
        (disk, server, c)
    }

    /// Whether `name` exists beside the image (a snapshot is `disk.strata@NAME`).
    fn has(&self, name: &str) -> bool {
        self.dir.path().join(name).exists()
    }
}

fn write(c: &mut Client, offset: u64, data: &[u8]) {
    assert_eq!(
        c.command(FLAG_FUA, CMD_WRITE, offset, data.len() as u64, data)
            .unwrap(),
        0
    );
}

#[track_caller]
fn ok(r: &Response, status: u16) -> Value {
    assert_eq!(
        r.status,
        status,
        "{r:?} {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// Asks for a snapshot `name` of `export`, whatever the answer.
fn try_snapshot(server: &Running, export: &str, name: &str) -> Response {
    server.call(
        "POST",
        &format!("/v1/exports/{export}/snapshots"),
        Some(json!({ "name": name })),
    )
}

fn snapshot(server: &Running, export: &str, name: &str) -> Value {
    ok(&try_snapshot(server, export, name), 201)
}

/// Asserts that `r` is an error answer with `status` whose message says `needle`.
#[track_caller]
fn refused(r: &Response, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert!(r.error().contains(needle), "{needle:?}: {}", r.error());
}

/// Serves snapshot `name` of export `disk` as the read-only export `disk@NAME`.
fn serve_snapshot(server: &Running, name: &str) -> Value {
    ok(
        &server.call(
            "POST",
            &format!("/v1/exports/disk/snapshots/{name}/export"),
            Some(json!({})),
        ),
        201,
    )
}

/// The snapshots of export `disk`, newest first.
fn snapshots(server: &Running) -> Vec<Value> {
    let list = ok(&server.get("/v1/exports/disk/snapshots"), 200)["snapshots"].clone();
    match list {
        Value::Array(list) => list,
        other => panic!("snapshots is not a list: {other}"),
    }
}

fn names(snapshots: &[Value]) -> Vec<&str> {
    snapshots
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The API's snapshot operations
// ---------------------------------------------------------------------------------------

#[test]
fn snapshots_are_taken_listed_served_and_deleted_while_clients_write() {
    let (disk, server, mut c) = Disk::served("8M");
    write(&mut c, 0, &[0xaa; 65536]);

    let taken = snapshot(&server, "disk", "first");
    assert_eq!(taken["snapshot"]["name"], "first");
    assert!(taken["pause_us"].as_u64().is_some(), "{taken}");
    assert!(taken["snapshot"]["created"].as_u64().unwrap() > 1_700_000_000);
    assert!(
        taken["snapshot"]["path"]
            .as_str()
            .unwrap()
            .ends_with("disk.strata@first")
    );
    // The same connection keeps writing, to the new live layer.
    write(&mut c, 0, &[0xbb; 65536]);
    write(&mut c, 1 << 20, &[0xcc; 4096]);
    let second = snapshot(&server, "disk", "second");
    assert_eq!(second["snapshot"]["name"], "second");
    write(&mut c, 2 << 20, &[0xdd; 4096]);

    // Newest first, with what each holds.
    let list = snapshots(&server);
    assert_eq!(names(&list), ["second", "first"]);
    assert_eq!(list[1]["allocated"], 65536, "{list:?}");
    // A name in use, and a bad one.
    refused(&try_snapshot(&server, "disk", "first"), 409, "exists");

    // A snapshot served as a read-only export shows the disk as it was.
    let served = serve_snapshot(&server, "first");
    assert_eq!(served["name"], "disk@first");
    assert_eq!(served["read_only"], true, "{served}");
    let mut old = server.connect("disk@first");
    assert_eq!(old.read(0, 0, 65536).unwrap().unwrap(), vec![0xaa; 65536]);
    assert_eq!(old.read(0, 1 << 20, 4096).unwrap().unwrap(), vec![0; 4096]);
    assert_ne!(
        old.command(0, CMD_WRITE, 0, 512, &[1; 512]).unwrap(),
        0,
        "snapshot writable"
    );
    let mut live = server.connect("disk");
    assert_eq!(live.read(0, 0, 65536).unwrap().unwrap(), vec![0xbb; 65536]);

    // Dirty ranges since first: cluster 0, the 1 MiB cluster and the 2 MiB cluster.
    let dirty = ok(&server.get("/v1/exports/disk/dirty?since=first"), 200);
    assert_eq!(dirty["cluster_size"], 65536);
    let ranges: Vec<(u64, u64)> = dirty["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(ranges, [(0, 65536), (1 << 20, 65536), (2 << 20, 65536)]);
    assert_eq!(dirty["bytes"], 3 * 65536);
    let unknown = server.get("/v1/exports/disk/dirty?since=nosuch");
    assert_eq!(unknown.status, 404, "{unknown:?}");

    // A served snapshot cannot be deleted; once its export is gone it can.
    let busy = server.call("DELETE", "/v1/exports/disk/snapshots/first", None);
    assert_eq!(busy.status, 409, "{busy:?}");
    drop(old);
    ok(
        &server.call("DELETE", "/v1/exports/disk@first?force=true", None),
        200,
    );
    let deleted = ok(
        &server.call("DELETE", "/v1/exports/disk/snapshots/first", None),
        200,
    );
    assert!(deleted["copied"].as_u64().is_some(), "{deleted}");
    assert_eq!(names(&snapshots(&server)), ["second"]);
    // Nothing the clients see changed.
    assert_eq!(live.read(0, 0, 65536).unwrap().unwrap(), vec![0xbb; 65536]);
    assert_eq!(
        live.read(0, 1 << 20, 4096).unwrap().unwrap(),
        vec![0xcc; 4096]
    );
    assert!(!disk.has("disk.strata@first"));
}

#[test]
fn rollback_respects_connected_clients_and_newer_snapshots() {
    let (disk, server, mut c) = Disk::served("4M");
    write(&mut c, 0, &[1; 4096]);
    snapshot(&server, "disk", "one");
    write(&mut c, 0, &[2; 4096]);
    snapshot(&server, "disk", "two");
    write(&mut c, 0, &[3; 4096]);

    let rollback = |body: Value| server.call("POST", "/v1/exports/disk/rollback", Some(body));
    // A client is connected.
    refused(&rollback(json!({"snapshot": "two"})), 409, "connected");
    // A newer snapshot exists.
    let r = rollback(json!({"snapshot": "one", "force": true}));
    refused(&r, 409, "two");
    // Forced, the connected client sees the rolled-back disk.
    ok(&rollback(json!({"snapshot": "two", "force": true})), 200);
    assert_eq!(c.read(0, 0, 4096).unwrap().unwrap(), vec![2; 4096]);
    drop(c);
    server.wait_connections("disk", 0);
    ok(
        &rollback(json!({"snapshot": "one", "destroy_newer": true})),
        200,
    );
    let mut c = server.connect("disk");
    assert_eq!(c.read(0, 0, 4096).unwrap().unwrap(), vec![1; 4096]);
    assert_eq!(names(&snapshots(&server)), ["one"]);
    assert!(!disk.has("disk.strata@two"));
}

#[test]
fn read_only_and_raw_exports_have_no_snapshots() {
    let disk = Disk::new("4M", "64K");
    let raw = disk.dir.path().join("raw.img");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let server = Running::serve(&[
        OsStr::new("--read-only"),
        disk.img.as_os_str(),
        raw.as_os_str(),
    ]);
    refused(&try_snapshot(&server, "disk", "x"), 409, "read-only");
    refused(&try_snapshot(&server, "raw", "x"), 400, "Strata image");
}

#[test]
fn ctl_snapshot_commands() {
    let (_disk, server, mut c) = Disk::served("4M");
    let out = server.ctl(&["snapshot", "disk", "mon"]);
    assert!(out.success(), "{}", out.report());
    assert!(out.stdout.contains("mon"), "{}", out.report());
    write(&mut c, 65536, &[7; 100]);
    let out = server.ctl(&["--json", "dirty", "disk", "--since", "mon"]);
    assert!(out.success(), "{}", out.report());
    let v = out.json();
    assert_eq!(v["ranges"][0]["offset"], 65536, "{v}");
    let out = server.ctl(&["snapshots", "disk"]);
    assert!(
        out.success() && out.stdout.contains("mon"),
        "{}",
        out.report()
    );
    let out = server.ctl(&["serve-snapshot", "disk", "mon", "--as", "monday"]);
    assert!(out.success(), "{}", out.report());
    let mut m = server.connect("monday");
    assert_eq!(m.read(0, 65536, 100).unwrap().unwrap(), vec![0; 100]);
    drop(m);
    let out = server.ctl(&["delete-snapshot", "disk", "mon"]);
    assert!(!out.success(), "deleted while served: {}", out.report());
    assert!(server.ctl(&["remove", "monday", "--force"]).success());
    let out = server.ctl(&["delete-snapshot", "disk", "mon"]);
    assert!(out.success(), "{}", out.report());
    let out = server.ctl(&["snapshots", "disk"]);
    assert!(!out.stdout.contains("mon"), "{}", out.report());
}

// ---------------------------------------------------------------------------------------
// Under load
// ---------------------------------------------------------------------------------------

/// One write of the load generator: block, stamp, when it was sent and acknowledged.
#[derive(Debug, Clone, Copy)]
struct Sent {
    block: u64,
    stamp: u64,
    sent: Instant,
    acked: Instant,
}

/// A block's contents carry its stamp in every 8 bytes.
fn stamped(stamp: u64) -> Vec<u8> {
    stamp.to_le_bytes().repeat((BLOCK / 8) as usize)
}

fn stamp_of(data: &[u8]) -> u64 {
    let s = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert!(
        data.chunks(8).all(|c| c == s.to_le_bytes()),
        "a block mixes two writes (torn): {:?}",
        &data[..16]
    );
    s
}

#[derive(Debug)]
struct Window {
    name: String,
    start: Instant,
    end: Instant,
    pause_us: u64,
}

#[test]
fn snapshots_under_a_write_load_hold_exactly_the_writes_before_them() {
    if !crate::support::require_tool("fio") {
        return;
    }
    const THREADS: u64 = 4;
    const BLOCKS: u64 = 4096; // 16 MiB written by the generator
    let disk = Disk::new("64M", "4K");
    let server = Arc::new(disk.serve());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(THREADS as usize + 1));
    // Thread k owns the blocks b with b % THREADS == k and writes them one at a time,
    // so the writes of each block are totally ordered.
    let writers: Vec<_> = (0..THREADS)
        .map(|k| {
            let (server, stop, start) = (server.clone(), stop.clone(), start.clone());
            thread::spawn(move || {
                let mut c = server.connect("disk");
                let mut log = Vec::new();
                let mut seq = 0u64;
                let mut x = k * 7919 + 1;
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let block = (x >> 33) % (BLOCKS / THREADS) * THREADS + k;
                    seq += 1;
                    let stamp = (k << 48) | seq;
                    let sent = Instant::now();
                    let flags = if seq % 64 == 0 { FLAG_FUA } else { 0 };
                    let errno = c
                        .command(flags, CMD_WRITE, block * BLOCK, BLOCK, &stamped(stamp))
                        .unwrap();
                    assert_eq!(errno, 0);
                    log.push(Sent {
                        block,
                        stamp,
                        sent,
                        acked: Instant::now(),
                    });
                }
                log
            })
        })
        .collect();
    // fio, a real client, writes and verifies another region meanwhile.
    let mut fio = Command::new("fio");
    // fio leaves its verify state files in its working directory.
    fio.current_dir(disk.dir.path())
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri=nbd://{}/disk", server.nbd),
            "--rw=randwrite",
            "--bs=4k",
            "--offset=32M",
            "--size=32M",
            "--iodepth=16",
            "--loops=2",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let fio = spawn(&mut fio).unwrap();
    start.wait();
    let mut windows = Vec::new();
    for i in 0..4 {
        thread::sleep(Duration::from_millis(250));
        let name = format!("s{i}");
        let t0 = Instant::now();
        let taken = snapshot(&server, "disk", &name);
        windows.push(Window {
            name,
            start: t0,
            end: Instant::now(),
            pause_us: taken["pause_us"].as_u64().unwrap(),
        });
    }
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<Vec<Sent>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let fio = fio.wait_with_output().unwrap();
    assert!(
        fio.status.success(),
        "fio verification failed:\n{}\n{}",
        String::from_utf8_lossy(&fio.stdout),
        String::from_utf8_lossy(&fio.stderr)
    );

    // Every write, per block, in order.
    let mut per_block: Vec<Vec<Sent>> = vec![Vec::new(); BLOCKS as usize];
    for log in &logs {
        for w in log {
            per_block[w.block as usize].push(*w);
        }
    }
    let total: usize = logs.iter().map(Vec::len).sum();
    assert!(
        total > 1000,
        "the load was too small to mean anything: {total}"
    );
    let index_of = |b: usize, stamp: u64| -> isize {
        if stamp == 0 {
            return -1;
        }
        per_block[b]
            .iter()
            .position(|w| w.stamp == stamp)
            .unwrap_or_else(|| panic!("block {b} holds stamp {stamp:#x} nobody wrote"))
            as isize
    };
    let read_all = |export: &str| -> Vec<u64> {
        let mut c = server.connect(export);
        let mut out = Vec::new();
        for chunk in 0..BLOCKS / 256 {
            let data = c
                .read(0, chunk * 256 * BLOCK, (256 * BLOCK) as usize)
                .unwrap()
                .unwrap();
            out.extend(data.chunks(BLOCK as usize).map(stamp_of));
        }
        out
    };
    // The live disk holds the last write of every block.
    let live = read_all("disk");
    for (b, writes) in per_block.iter().enumerate() {
        let last = writes.last().map_or(0, |w| w.stamp);
        assert_eq!(live[b], last, "live block {b}");
    }
    // Each snapshot holds, for every block, a write no older than the last one
    // acknowledged before the snapshot was asked for, and none sent after it was
    // taken; snapshots taken later never hold older writes.
    let mut previous: Vec<isize> = vec![-1; BLOCKS as usize];
    let mut in_flight = 0;
    for w in &windows {
        serve_snapshot(&server, &w.name);
        let content = read_all(&format!("disk@{}", w.name));
        for (b, writes) in per_block.iter().enumerate() {
            let lo = writes
                .iter()
                .rposition(|x| x.acked < w.start)
                .map_or(-1, |i| i as isize);
            let hi = writes
                .iter()
                .rposition(|x| x.sent < w.end)
                .map_or(-1, |i| i as isize);
            let got = index_of(b, content[b]);
            assert!(
                lo <= got && got <= hi,
                "snapshot {} block {b}: holds write #{got}, acknowledged before it: #{lo}, \
                 sent before it returned: #{hi}",
                w.name
            );
            assert!(
                got >= previous[b],
                "snapshot {} block {b} went back in time",
                w.name
            );
            previous[b] = got;
            if lo < hi {
                in_flight += 1;
            }
        }
    }
    // Report the pauses (measured by the server) and the worst write latency seen by
    // the generator during each snapshot; no assertion on time.
    for w in &windows {
        let worst = logs
            .iter()
            .flatten()
            .filter(|x| x.acked >= w.start && x.sent <= w.end)
            .map(|x| x.acked - x.sent)
            .max()
            .unwrap_or_default();
        eprintln!(
            "snapshot {}: pause {} us, call {} us, slowest write in the window {} us",
            w.name,
            w.pause_us,
            (w.end - w.start).as_micros(),
            worst.as_micros()
        );
    }
    eprintln!(
        "{total} writes by the generator, {} snapshots, {in_flight} block/snapshot pairs \
         with writes in flight at the snapshot",
        windows.len()
    );
}

// ---------------------------------------------------------------------------------------
// Killed at every step
// ---------------------------------------------------------------------------------------

/// Stops the server at `failpoint` during `op`, restarts it and checks the state.
fn killed_at(failpoint: &str, op: &str, done: bool) {
    let disk = Disk::new("4M", "64K");
    // Three snapshots with data of their own, and live data.
    {
        let server = disk.serve();
        let mut c = server.connect("disk");
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            write(&mut c, i as u64 * 65536, &[i as u8 + 1; 65536]);
            write(&mut c, 3 * 65536, &[0x10 + i as u8; 4096]);
            snapshot(&server, "disk", name);
        }
        write(&mut c, 3 * 65536, &[0x99; 4096]);
    }
    let server = Running::serve_env(&[disk.img.as_os_str()], &[("STRATA_FAILPOINT", failpoint)]);
    // A client is connected when the server dies.
    let c = server.connect("disk");
    let (method, path, body) = match op {
        "snapshot" => (
            "POST",
            "/v1/exports/disk/snapshots",
            Some(json!({"name": "d"})),
        ),
        "delete" => ("DELETE", "/v1/exports/disk/snapshots/b", None),
        "rollback" => (
            "POST",
            "/v1/exports/disk/rollback",
            Some(json!({"snapshot": "b", "force": true, "destroy_newer": true})),
        ),
        _ => unreachable!(),
    };
    // The server dies during the call: the answer never comes.
    let answered = server.try_call(method, path, body);
    assert!(
        answered.is_err(),
        "{failpoint}: the server answered {answered:?}"
    );
    let (status, _) = server.wait_exit();
    assert!(
        !status.success(),
        "{failpoint}: the server should have died"
    );
    drop(c);

    let server = disk.serve();
    let list = snapshots(&server);
    let names = names(&list);
    let mut c = server.connect("disk");
    let live = c.read(0, 3 * 65536, 4096).unwrap().unwrap();
    let expect_names: &[&str] = match (op, done) {
        ("snapshot", false) | ("delete", false) | ("rollback", false) => &["c", "b", "a"],
        ("snapshot", true) => &["d", "c", "b", "a"],
        ("delete", true) => &["c", "a"],
        ("rollback", true) => &["b", "a"],
        _ => unreachable!(),
    };
    assert_eq!(names, expect_names, "{failpoint}");
    let expect_live = if op == "rollback" && done { 0x11 } else { 0x99 };
    assert_eq!(live, vec![expect_live; 4096], "{failpoint}: live data");
    // The snapshots that remain read as they did.
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        if !names.contains(name) {
            continue;
        }
        serve_snapshot(&server, name);
        let mut s = server.connect(&format!("disk@{name}"));
        assert_eq!(
            s.read(0, 3 * 65536, 4096).unwrap().unwrap(),
            vec![0x10 + i as u8; 4096],
            "{failpoint}: snapshot {name}"
        );
        for j in 0..3u8 {
            let expect = if usize::from(j) <= i { j + 1 } else { 0 };
            assert_eq!(
                s.read(0, u64::from(j) * 65536, 512).unwrap().unwrap(),
                vec![expect; 512],
                "{failpoint}: snapshot {name} cluster {j}"
            );
        }
    }
}

#[test]
fn the_server_killed_at_every_step_restarts_with_the_old_or_the_new_chain() {
    let cases = [
        ("snapshot-prepared", "snapshot", false),
        ("snapshot-linked", "snapshot", false),
        ("snapshot-renamed", "snapshot", true),
        ("delete-begun", "delete", false),
        ("delete-merged", "delete", false),
        ("delete-rebased", "delete", true),
        ("delete-removed", "delete", true),
        ("rollback-prepared", "rollback", false),
        ("rollback-renamed", "rollback", true),
        ("rollback-discarding", "rollback", true),
    ];
    for fp in strata::image::snapshot::FAILPOINTS {
        assert!(
            cases.iter().any(|(c, _, _)| c == fp),
            "failpoint {fp} is not tested"
        );
    }
    for (fp, op, done) in cases {
        killed_at(fp, op, done);
    }
}
