//! Crash tests of Strata images: `strata serve` is killed with SIGKILL at random moments
//! while a client writes, trims, zeroes and flushes, then `strata check` must pass and
//! the image must hold what the crash-safety promise says:
//!
//! - every write acknowledged before an acknowledged flush, and every acknowledged FUA
//!   request, reads back (unless a later request covered it);
//! - every other byte holds its last durable value or a value written after it — never
//!   anything else (another cluster's data, stale or uninitialised space).
//!
//! Each iteration restarts the server on the same image and carries on from what the
//! previous one left. The client pipelines several requests at a time, never two
//! overlapping ones, so the value of each byte follows the order the requests were sent.
//!
//! Environment: `STRATA_CRASH_ITERATIONS` (per image kind, default 100) and
//! `STRATA_CRASH_SEED` (to replay a run's choice of requests; the kill moments differ).

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::client::{Client, SIMPLE};
use crate::support::spec::*;
use crate::support::*;

const DISK: u64 = 4 * MIB;
/// Largest request the reading client sends.
const READ_CHUNK: usize = 1 << 20;

// ---------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[lo, hi)`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The byte write `id` puts at disk offset `pos`: a function of both, so that data
/// from another request or another place on the disk is recognised.
fn value(id: u32, pos: u64) -> u8 {
    (mix((u64::from(id) << 40) ^ (pos >> 3)) >> ((pos & 7) * 8)) as u8
}

fn fill(id: u32, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| value(id, offset + i)).collect()
}

// ---------------------------------------------------------------------------------------
// What the disk may hold
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Trim,
    Zero,
    ZeroNoHole,
}

#[derive(Debug, Clone)]
struct Op {
    id: u32,
    kind: Kind,
    offset: u64,
    len: u64,
    fua: bool,
    acked: bool,
}

impl Op {
    fn value(&self, pos: u64) -> u8 {
        match self.kind {
            Kind::Write => value(self.id, pos),
            // Strata reads trimmed ranges as zeroes: standalone images unmap them,
            // overlays record zero clusters that hide the backing file.
            Kind::Trim | Kind::Zero | Kind::ZeroNoHole => 0,
        }
    }

    fn range(&self) -> std::ops::Range<usize> {
        self.offset as usize..(self.offset + self.len) as usize
    }
}

/// Per byte: the newest request known durable (0: what the disk held when the model
/// started), the newest request sent, and their values.
struct Model {
    ops: Vec<Op>,
    durable_id: Vec<u32>,
    last_id: Vec<u32>,
    floor: Vec<u8>,
    latest: Vec<u8>,
    /// Writes acknowledged and not yet known durable: the next flush sent covers them.
    acked_volatile: Vec<u32>,
    flushes_acked: u64,
    fua_acked: u64,
}

impl Model {
    fn new(disk: Vec<u8>) -> Model {
        let n = disk.len();
        Model {
            ops: Vec::new(),
            durable_id: vec![0; n],
            last_id: vec![0; n],
            floor: disk.clone(),
            latest: disk,
            acked_volatile: Vec::new(),
            flushes_acked: 0,
            fua_acked: 0,
        }
    }

    /// Records a request about to be sent; returns its id.
    fn sent(&mut self, kind: Kind, offset: u64, len: u64, fua: bool) -> u32 {
        let id = self.ops.len() as u32 + 1;
        let op = Op {
            id,
            kind,
            offset,
            len,
            fua,
            acked: false,
        };
        for pos in op.range() {
            self.last_id[pos] = id;
            self.latest[pos] = op.value(pos as u64);
        }
        self.ops.push(op);
        id
    }

    fn op(&self, id: u32) -> &Op {
        &self.ops[id as usize - 1]
    }

    fn make_durable(&mut self, id: u32) {
        let op = self.op(id).clone();
        for pos in op.range() {
            if self.durable_id[pos] < id {
                self.durable_id[pos] = id;
                self.floor[pos] = op.value(pos as u64);
            }
        }
    }

    fn acked(&mut self, id: u32) {
        let op = &mut self.ops[id as usize - 1];
        op.acked = true;
        if op.fua {
            self.fua_acked += 1;
            self.make_durable(id);
        } else {
            self.acked_volatile.push(id);
        }
    }

    /// A flush is being sent: what it will make durable once acknowledged.
    fn flush_sent(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.acked_volatile)
    }

    fn flush_acked(&mut self, covered: Vec<u32>) {
        self.flushes_acked += 1;
        for id in covered {
            self.make_durable(id);
        }
    }

    /// Checks `disk` against what may be there; returns a description of every
    /// violation (at most a few).
    fn verify(&self, disk: &[u8]) -> Result<(), String> {
        let mut bad = Vec::new();
        let mut count = 0u64;
        for (pos, &b) in disk.iter().enumerate() {
            if b == self.floor[pos] || b == self.latest[pos] {
                continue;
            }
            let (lo, hi) = (self.durable_id[pos], self.last_id[pos]);
            let later = (lo + 1..hi).any(|id| {
                let op = self.op(id);
                op.range().contains(&pos) && op.value(pos as u64) == b
            });
            if later {
                continue;
            }
            count += 1;
            if bad.len() < 8 {
                let writers: Vec<String> = self
                    .ops
                    .iter()
                    .filter(|o| o.range().contains(&pos))
                    .map(|o| format!("{o:?}"))
                    .collect();
                bad.push(format!(
                    "byte {pos} ({pos:#x}) is {b:#04x}: durable value {:#04x} (request {lo}), \
                     newest {:#04x} (request {hi}); requests covering it: [{}]",
                    self.floor[pos],
                    self.latest[pos],
                    writers.join(", ")
                ));
            }
        }
        if count == 0 {
            Ok(())
        } else {
            Err(format!(
                "{count} bytes hold neither their durable value nor one written after it:\n{}",
                bad.join("\n")
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------

/// How the workload ended.
struct Outcome {
    model: Model,
    requests: u64,
    /// A reply that makes the run fail (an error from a live server).
    failure: Option<String>,
    /// The connection error that ended it (expected: the server was killed).
    ended_by: String,
}

/// Picks a request's range: aligned or not, within a cluster or across several.
fn pick_range(rng: &mut Rng, cluster: u64) -> (u64, u64) {
    let (offset, len) = match rng.range(0, 6) {
        0 => (rng.range(0, DISK), rng.range(1, 4096)),
        1 => (rng.range(0, DISK / 4096) * 4096, 4096),
        2 => (rng.range(0, DISK / cluster) * cluster, cluster),
        3 => (
            rng.range(0, DISK / cluster) * cluster,
            cluster * rng.range(2, 5),
        ),
        4 => (rng.range(0, DISK), rng.range(1, 3 * cluster)),
        _ => (rng.range(0, DISK / 512) * 512, 512 * rng.range(1, 300)),
    };
    let offset = offset.min(DISK - 1);
    (offset, len.min(DISK - offset))
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

/// Sends batches of non-overlapping requests, each batch waiting for all its replies,
/// until the connection fails.
fn workload(ep: Endpoint, name: String, disk: Vec<u8>, seed: u64, cluster: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut model = Model::new(disk);
    let mut requests = 0;
    let connected =
        Client::connect(&ep).and_then(|mut c| c.handshake_bare(&name, SIMPLE).map(|_| c));
    let mut client = match connected {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                model,
                requests,
                failure: None,
                ended_by: format!("connect: {e}"),
            };
        }
    };
    let need = 4 | 8 | 32 | 64; // SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES
    if client.flags & need != need || client.size != DISK {
        return Outcome {
            model,
            requests,
            failure: Some(format!(
                "export size {} flags {:#x}: expected {DISK} and flush, FUA, trim, zeroes",
                client.size, client.flags
            )),
            ended_by: String::new(),
        };
    }
    let ended_by = loop {
        // (cookie, request id or 0 for a flush, writes the flush covers)
        let mut batch: Vec<(u64, u32, Vec<u32>)> = Vec::new();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut send_result = Ok(());
        let size = rng.range(1, 8);
        let flush_at = rng.chance(35).then(|| rng.range(0, size));
        for i in 0..size {
            let (sent, id, covered) = if flush_at == Some(i) {
                let covered = model.flush_sent();
                (client.request(0, CMD_FLUSH, 0, 0, &[]), 0, covered)
            } else {
                let (offset, len) = pick_range(&mut rng, cluster);
                if ranges.iter().any(|&r| overlaps(r, (offset, len))) {
                    continue;
                }
                ranges.push((offset, len));
                let fua = rng.chance(15);
                let kind = match rng.range(0, 10) {
                    0 => Kind::Trim,
                    1 => Kind::Zero,
                    2 => Kind::ZeroNoHole,
                    _ => Kind::Write,
                };
                let id = model.sent(kind, offset, len, fua);
                let flags = if fua { FLAG_FUA } else { 0 };
                let sent = match kind {
                    Kind::Write => {
                        let data = fill(id, offset, len as usize);
                        client.request(flags, CMD_WRITE, offset, len, &data)
                    }
                    Kind::Trim => client.request(flags, CMD_TRIM, offset, len, &[]),
                    Kind::Zero => client.request(flags, CMD_WRITE_ZEROES, offset, len, &[]),
                    Kind::ZeroNoHole => {
                        client.request(flags | FLAG_NO_HOLE, CMD_WRITE_ZEROES, offset, len, &[])
                    }
                };
                (sent, id, Vec::new())
            };
            requests += 1;
            match sent {
                Ok(cookie) => batch.push((cookie, id, covered)),
                Err(e) => {
                    send_result = Err(e);
                    break;
                }
            }
        }
        if let Err(e) = send_result {
            break format!("send: {e}");
        }
        let mut failed = None;
        for _ in 0..batch.len() {
            let (cookie, errno) = match client.reply(0) {
                Ok(r) => (r.cookie(), r.error().map_or(0, |e| e.0)),
                Err(e) => {
                    failed = Some(format!("reply: {e}"));
                    break;
                }
            };
            let Some(i) = batch.iter().position(|b| b.0 == cookie) else {
                return Outcome {
                    model,
                    requests,
                    failure: Some(format!("reply for unknown cookie {cookie}")),
                    ended_by: String::new(),
                };
            };
            let (_, id, covered) = batch.swap_remove(i);
            if errno != 0 {
                let what = if id == 0 {
                    "flush".to_owned()
                } else {
                    format!("{:?}", model.op(id))
                };
                return Outcome {
                    model,
                    requests,
                    failure: Some(format!("{what} failed with errno {errno}")),
                    ended_by: String::new(),
                };
            }
            if id == 0 {
                model.flush_acked(covered);
            } else {
                model.acked(id);
            }
        }
        if let Some(e) = failed {
            break e;
        }
    };
    Outcome {
        model,
        requests,
        failure: None,
        ended_by,
    }
}

// ---------------------------------------------------------------------------------------
// The loop
// ---------------------------------------------------------------------------------------

fn strata(args: &[&str]) -> Command {
    let mut c = crate::support::strata();
    c.args(args).env("RUST_LOG", "error");
    c
}

fn iterations() -> u64 {
    std::env::var("STRATA_CRASH_ITERATIONS")
        .ok()
        .map(|v| v.parse().expect("STRATA_CRASH_ITERATIONS: a number"))
        .unwrap_or(100)
}

fn base_seed() -> u64 {
    match std::env::var("STRATA_CRASH_SEED") {
        Ok(v) => v.parse().expect("STRATA_CRASH_SEED: a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

fn start(image: &Path) -> Server {
    file(image).listen(Transport::Unix).start()
}

fn read_disk(server: &Server) -> Vec<u8> {
    let mut c = Client::connect(server.endpoint())
        .and_then(|mut c| c.handshake_bare(server.export_name(), SIMPLE).map(|_| c))
        .unwrap_or_else(|e| panic!("connect after restart: {e}\n{}", server.log()));
    let mut out = Vec::with_capacity(c.size as usize);
    while (out.len() as u64) < c.size {
        let pos = out.len() as u64;
        let n = READ_CHUNK.min((c.size - pos) as usize);
        match c.read(0, pos, n) {
            Ok(Ok(data)) => out.extend(data),
            other => panic!("read at {pos} after restart: {other:?}\n{}", server.log()),
        }
    }
    out
}

/// Runs the crash loop on `image` (already created) whose contents start as `initial`.
fn crash_loop(label: &str, image: &Path, initial: &[u8], cluster: u64) {
    let seed = base_seed();
    let count = iterations();
    eprintln!("{label}: {count} iterations, STRATA_CRASH_SEED={seed}");
    let started = Instant::now();
    let mut kill_rng = Rng::new(seed ^ 0x5eed);
    let mut server = start(image);
    let mut disk = read_disk(&server);
    assert_same_bytes("image before the first crash", &disk, initial);
    let (mut requests, mut flushes, mut fuas, mut leaks, mut torn) = (0, 0, 0, 0, 0);
    for i in 0..count {
        let ep = server.endpoint().clone();
        let name = server.export_name().to_owned();
        let cluster_size = cluster;
        let start_disk = std::mem::take(&mut disk);
        let iter_seed = seed.wrapping_add(i);
        let client = thread::spawn(move || workload(ep, name, start_disk, iter_seed, cluster_size));
        thread::sleep(Duration::from_millis(kill_rng.range(0, 250)));
        let log = server.log();
        let status = server.stop_with(libc::SIGKILL);
        let outcome = client.join().expect("client thread panicked");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(libc::SIGKILL),
            "iteration {i}: the server exited on its own ({status:?}) before it was killed\n{log}"
        );
        if let Some(f) = outcome.failure {
            panic!("iteration {i} (seed {iter_seed}): {f}\n--- server log ---\n{log}");
        }
        requests += outcome.requests;
        flushes += outcome.model.flushes_acked;
        fuas += outcome.model.fua_acked;

        let check = run(&mut strata(&["check", "--json", image.to_str().unwrap()]));
        assert_eq!(
            check.code(),
            Some(0),
            "iteration {i} (seed {iter_seed}): strata check after the crash\n{}",
            check.report()
        );
        let report = check.json();
        leaks += u64::from(report["leaked_bytes"].as_u64().unwrap_or(0) > 0);
        torn += report["torn_slots"].as_u64().unwrap_or(0);

        server = start(image);
        disk = read_disk(&server);
        if let Err(e) = outcome.model.verify(&disk) {
            panic!(
                "iteration {i} (seed {iter_seed}, {} requests, ended by {}): {e}",
                outcome.requests, outcome.ended_by
            );
        }
    }
    server.stop_cleanly_with(libc::SIGTERM);
    run_ok(&mut strata(&["check", image.to_str().unwrap()]));
    eprintln!(
        "{label}: {count} crash iterations passed in {:.1?}: {requests} requests, \
         {flushes} flushes and {fuas} FUA requests acknowledged; {leaks} crashes left \
         leaked clusters, {torn} torn map slots seen",
        started.elapsed()
    );
}

#[test]
fn crash_standalone_image() {
    if !strata_only("Strata images") {
        return;
    }
    let (_dir, image) = scratch("disk.strata");
    run_ok(&mut strata(&[
        "create",
        image.to_str().unwrap(),
        "--size",
        &DISK.to_string(),
        "--cluster-size",
        "4K",
    ]));
    crash_loop("standalone", &image, &vec![0u8; DISK as usize], 4096);
}

#[test]
fn crash_overlay_over_raw_base() {
    if !strata_only("Strata images") {
        return;
    }
    let (dir, base) = scratch("base.raw");
    let initial = pattern(77, DISK as usize);
    std::fs::write(&base, &initial).unwrap();
    let image = dir.path().join("overlay.strata");
    run_ok(&mut strata(&[
        "create",
        "--backing",
        base.to_str().unwrap(),
        image.to_str().unwrap(),
    ]));
    crash_loop("overlay", &image, &initial, 64 * KIB);
    // The base is never written.
    assert_same_bytes("raw base", &std::fs::read(&base).unwrap(), &initial);
}
