//! Crash safety: random writes, partial writes, trims, zeroing and flushes on simulated
//! disks ([`SimStorage`]) that are "crashed" at random points, in the middle of operations
//! and commits too; every crashed disk must scan clean, hold everything flushed, hold
//! nothing that was never written there, and keep working after reopening.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use strata::image::format::{Backing, BackingKind, Header};
use strata::image::sim::{Rng, SimStorage};
use strata::image::storage::{Storage, View};
use strata::image::{self, Chain, Lower, ZeroMode, layer};

use super::{header, open_sim, pat, pattern};

// ---------------------------------------------------------------------------------------
// A storage wrapper that takes crash snapshots in the middle of operations

/// Wraps a [`SimStorage`] and, before some of the writes, punches, truncations and syncs
/// the engine makes, records the disk a power failure at that moment could leave
/// ([`SimStorage::crash`]). Crashes therefore also fall between the steps of a commit.
#[derive(Debug)]
struct Tap {
    inner: SimStorage,
    when: When,
    /// Modifying calls so far.
    calls: AtomicUsize,
    rng: Mutex<Rng>,
    snapshots: Mutex<Vec<SimStorage>>,
}

/// When a [`Tap`] takes crash snapshots.
#[derive(Debug, Clone, Copy)]
enum When {
    /// Never (to count the calls of a run).
    Never,
    /// Before each modifying call with these chances, in 1/1000: before a sync (when the
    /// most is unsynced) and before anything else.
    Random { sync: u64, other: u64 },
    /// Before modifying call number `call` (from 0), `variants` different crashes.
    At { call: usize, variants: usize },
}

impl Tap {
    fn new(inner: SimStorage, seed: u64, when: When) -> Tap {
        Tap {
            inner,
            when,
            calls: AtomicUsize::new(0),
            rng: Mutex::new(Rng::new(seed)),
            snapshots: Mutex::new(Vec::new()),
        }
    }

    fn maybe_snapshot(&self, sync: bool) {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut rng = self.rng.lock().unwrap();
        let n = match self.when {
            When::Never => 0,
            When::Random { sync: s, other } => {
                usize::from(rng.below(1000) < if sync { s } else { other })
            }
            When::At { call: c, variants } => {
                if c == call {
                    variants
                } else {
                    0
                }
            }
        };
        for _ in 0..n {
            let disk = self.inner.crash(&mut rng);
            self.snapshots.lock().unwrap().push(disk);
        }
    }

    /// A crash now.
    fn snapshot(&self) -> SimStorage {
        self.inner.crash(&mut self.rng.lock().unwrap())
    }

    fn take(&self) -> Vec<SimStorage> {
        std::mem::take(&mut self.snapshots.lock().unwrap())
    }
}

impl Storage for Tap {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        self.maybe_snapshot(false);
        self.inner.write_at(bufs, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.maybe_snapshot(true);
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.maybe_snapshot(false);
        self.inner.punch_hole(offset, len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.maybe_snapshot(false);
        self.inner.set_len(len)
    }
    fn view(&self) -> std::io::Result<View> {
        self.inner.view()
    }
    fn in_memory(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------
// The model: what a crashed disk may hold

/// A stretch of the disk that a scenario writes to, with the model of its contents.
#[derive(Clone)]
struct Window {
    start: u64,
    /// Contents as of the last completed flush: what any crash must keep, unless written
    /// since.
    flushed: Vec<u8>,
    /// Contents as the running engine must return them.
    current: Vec<u8>,
}

/// What was written since the last completed flush: `(offset, length, seed)`, `None` for
/// zeroes.
type Since = Vec<(u64, u64, Option<u64>)>;

/// The expected contents of the windows of a disk, and which values a crash may leave.
#[derive(Clone)]
struct Model {
    windows: Vec<Window>,
    since: Since,
}

impl Model {
    fn new(windows: Vec<(u64, Vec<u8>)>) -> Model {
        Model {
            windows: windows
                .into_iter()
                .map(|(start, data)| Window {
                    start,
                    flushed: data.clone(),
                    current: data,
                })
                .collect(),
            since: Vec::new(),
        }
    }

    /// Records a write (`Some(seed)`) or zeroing (`None`) of `[at, at + len)`, which must
    /// lie within one window. Called before the engine runs it: from then on, until the
    /// next flush completes, a crash may leave it.
    fn write(&mut self, at: u64, len: u64, seed: Option<u64>) {
        let w = self
            .windows
            .iter_mut()
            .find(|w| w.start <= at && at + len <= w.start + w.current.len() as u64)
            .expect("operations stay inside a window");
        let dst = &mut w.current[(at - w.start) as usize..][..len as usize];
        match seed {
            Some(s) => dst.copy_from_slice(&pattern(s, at, len)),
            None => dst.fill(0),
        }
        self.since.push((at, len, seed));
    }

    /// A flush completed: everything written so far must survive any crash.
    fn flushed(&mut self) {
        for w in &mut self.windows {
            w.flushed.clone_from(&w.current);
        }
        self.since.clear();
    }

    /// Checks bytes read from window `i` after a crash: each is its last flushed value or
    /// one written there since.
    fn check_crashed(&self, i: usize, got: &[u8]) -> Result<(), String> {
        let w = &self.windows[i];
        // Sectors: a torn write leaves whole sectors old or new.
        const BLOCK: usize = 512;
        for (b, chunk) in got.chunks(BLOCK).enumerate() {
            let base = b * BLOCK;
            let flushed = &w.flushed[base..base + chunk.len()];
            let current = &w.current[base..base + chunk.len()];
            if chunk == flushed || chunk == current {
                continue;
            }
            for (j, &v) in chunk.iter().enumerate() {
                let pos = w.start + (base + j) as u64;
                if v == flushed[j] || v == current[j] {
                    continue;
                }
                let written = self.since.iter().any(|&(at, len, seed)| {
                    at <= pos && pos < at + len && seed.map_or(0, |s| pat(s, pos)) == v
                });
                if !written {
                    return Err(format!(
                        "byte at {pos} is {v:#04x}: neither its flushed value {:#04x} nor \
                         anything written there since the last flush",
                        flushed[j]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks bytes read from window `i` of the running engine: exactly the current
    /// contents.
    fn check_live(&self, i: usize, got: &[u8]) -> Result<(), String> {
        let w = &self.windows[i];
        if got == w.current {
            return Ok(());
        }
        match got.iter().zip(&w.current).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(j) => Err(format!(
                "byte at {} reads {:#04x}, last written {:#04x}",
                w.start + j as u64,
                got[j],
                w.current[j]
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios

/// What lies under the image being crashed.
#[derive(Debug, Clone, Copy)]
enum Under {
    /// Nothing: a standalone image.
    Nothing,
    /// A raw file holding a pattern, shorter than the disk.
    Raw,
    /// A Strata image with clusters of its own, itself over a raw file.
    Strata,
}

/// One crash scenario: the disk and where the operations go.
struct Scenario {
    name: &'static str,
    under: Under,
    cluster_bits: u32,
    size: u64,
    /// `(start, length)` of the windows operations go to.
    windows: Vec<(u64, u64)>,
}

/// The fixed part of a scenario: the lower chain (shared by every reopen) and the top
/// image's header.
struct Setup {
    lower: Option<Lower>,
    header: Header,
}

/// A raw base on a simulated disk, a pattern with a hole in it, and the backing entry
/// of an image over it.
fn raw_lower(len: u64) -> (Lower, Backing) {
    let mut bytes = pattern(7, 0, len);
    let hole = (len / 3) as usize;
    bytes[hole..hole + 20000].fill(0);
    let storage = SimStorage::with_contents(bytes);
    let identity = image::fingerprint(&storage, len).unwrap();
    let lower = Lower::raw(Arc::new(storage), Path::new("base.raw"), identity).unwrap();
    let backing = Backing {
        kind: BackingKind::Raw,
        path: "base.raw".into(),
        size: len,
        identity: lower.identity.1,
    };
    (lower, backing)
}

impl Scenario {
    fn setup(&self) -> Setup {
        let cs = 1u64 << self.cluster_bits;
        let raw_len = self.size - self.size / 5 - 777;
        let (lower, backing) = match self.under {
            Under::Nothing => (None, None),
            Under::Raw => {
                let (lower, backing) = raw_lower(raw_len);
                (Some(lower), Some(backing))
            }
            Under::Strata => {
                let (raw, raw_backing) = raw_lower(raw_len);
                let mid = SimStorage::new();
                let h = header(self.size, self.cluster_bits, 2, Some(raw_backing));
                image::write_new(&mid, &h).unwrap();
                let mid: Arc<dyn Storage> = Arc::new(mid);
                let chain = open_sim(Arc::clone(&mid), Some(&raw), "middle layer");
                // Clusters of its own: data, a partial write, and zeroes hiding the base.
                chain.write(cs, &pattern(8, cs, cs), false).unwrap();
                chain
                    .write(5 * cs + 100, &pattern(9, 5 * cs + 100, 300), false)
                    .unwrap();
                chain.zero(9 * cs, 2 * cs, ZeroMode::Zero, false).unwrap();
                chain.zero(12 * cs + 1, cs, ZeroMode::Trim, false).unwrap();
                chain.flush().unwrap();
                drop(chain);
                let scan = layer::scan(mid.as_ref(), Path::new("mid.strata")).unwrap();
                let lower = Lower::strata(mid, Path::new("mid.strata"), scan, Some(&raw)).unwrap();
                let backing = Backing {
                    kind: BackingKind::Strata,
                    path: "mid.strata".into(),
                    size: self.size,
                    identity: [2; 16],
                };
                (Some(lower), Some(backing))
            }
        };
        Setup {
            lower,
            header: header(self.size, self.cluster_bits, 1, backing),
        }
    }

    /// A random operation inside a random window.
    fn op(&self, rng: &mut Rng, seed: u64) -> Op {
        let cs = 1u64 << self.cluster_bits;
        let &(start, len) = &self.windows[rng.below(self.windows.len() as u64) as usize];
        // Mostly small or about a cluster, starting anywhere or near a cluster boundary;
        // now and then long.
        let n = match rng.below(10) {
            0..=3 => 1 + rng.below(600),
            4..=7 => 1 + rng.below(2 * cs),
            _ => 1 + rng.below(12 * cs),
        }
        .min(len);
        let at = match rng.below(3) {
            0 => start + rng.below(len - n + 1),
            _ => {
                let c = rng.below(len / cs);
                (start + c * cs + rng.below(16))
                    .saturating_sub(8)
                    .clamp(start, start + len - n)
            }
        };
        let fua = rng.below(12) == 0;
        match rng.below(20) {
            0..=9 => Op::Write { at, n, seed, fua },
            10..=11 => Op::Zero {
                at,
                n,
                mode: ZeroMode::Trim,
                fua,
            },
            12..=13 => Op::Zero {
                at,
                n,
                mode: ZeroMode::Zero,
                fua,
            },
            14 => Op::Zero {
                at,
                n,
                mode: ZeroMode::ZeroNoHole,
                fua,
            },
            15..=16 => Op::Read { at, n },
            _ => Op::Flush,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        at: u64,
        n: u64,
        seed: u64,
        fua: bool,
    },
    Zero {
        at: u64,
        n: u64,
        mode: ZeroMode,
        fua: bool,
    },
    Read {
        at: u64,
        n: u64,
    },
    Flush,
}

/// Reads every window of `chain`.
fn read_windows(chain: &Chain, model: &Model) -> Vec<Vec<u8>> {
    model
        .windows
        .iter()
        .map(|w| {
            let mut buf = vec![0u8; w.current.len()];
            chain.read(w.start, &mut buf).unwrap();
            buf
        })
        .collect()
}

/// Checks that nothing outside the windows is allocated in the top image: writes landed
/// where they were aimed.
fn check_confined(chain: &Chain, model: &Model, what: &str) {
    for r in chain.ranges(0, chain.size()).unwrap() {
        if r.depth != 1 {
            continue;
        }
        let inside = model.windows.iter().any(|w| {
            let cs = chain.cluster_size();
            let lo = w.start / cs * cs;
            let hi = (w.start + w.current.len() as u64).next_multiple_of(cs);
            lo <= r.offset && r.offset + r.length <= hi
        });
        assert!(
            inside,
            "{what}: the top image holds {r:?}, outside every window"
        );
    }
}

/// Verifies a crashed disk: it scans clean and every window holds only what it may. Then
/// checks that the image keeps working: a new write and a flush, after which it scans
/// clean again and reads back what it held plus the new write. Returns the windows as
/// the crashed disk held them.
fn verify_crash(
    disk: SimStorage,
    setup: &Setup,
    model: &Model,
    seed: u64,
    what: &str,
) -> Vec<Vec<u8>> {
    let disk = Arc::new(disk);
    let chain = open_sim(disk.clone(), setup.lower.as_ref(), what);
    let got = read_windows(&chain, model);
    for (i, g) in got.iter().enumerate() {
        model
            .check_crashed(i, g)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    check_confined(&chain, model, what);

    // The recovered image takes new writes (reusing whatever space the crash left free)
    // without disturbing what it holds.
    let mut after = Model::new(
        model
            .windows
            .iter()
            .zip(&got)
            .map(|(w, g)| (w.start, g.clone()))
            .collect(),
    );
    let mut rng = Rng::new(seed);
    let cs = chain.cluster_size();
    for k in 0..3 {
        let w = &after.windows[rng.below(after.windows.len() as u64) as usize];
        let len = (cs + 999).min(w.current.len() as u64);
        let at = w.start + rng.below(w.current.len() as u64 - len + 1);
        let s = seed ^ (0xabc0 + k);
        after.write(at, len, Some(s));
        chain.write(at, &pattern(s, at, len), false).unwrap();
    }
    chain
        .flush()
        .unwrap_or_else(|e| panic!("{what}: flush after recovery: {e}"));
    drop(chain);
    let again = Arc::new(disk.crash(&mut rng));
    let chain = open_sim(again, setup.lower.as_ref(), &format!("{what}, rewritten"));
    for (i, g) in read_windows(&chain, &after).iter().enumerate() {
        after
            .check_live(i, g)
            .unwrap_or_else(|e| panic!("{what}, rewritten and flushed: {e}"));
    }
    got
}

/// How long a crash run goes on and where it crashes.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Rounds: each starts from the disk the previous one's final crash left.
    generations: usize,
    /// Operations per round.
    ops: usize,
    when: When,
}

/// What a crash run did.
struct Outcome {
    crashes: usize,
    /// Modifying storage calls of the last round.
    calls: usize,
}

/// Runs rounds of random operations on a fresh image of the scenario, crashing where
/// `run` says (checking every crashed disk). Each round ends with a crash, and the next
/// continues from the disk it left. The operations depend only on `seed`, not on where
/// the crashes fall.
fn crash_scenario(sc: &Scenario, seed: u64, run: Run) -> Outcome {
    let setup = sc.setup();
    let mut ops_rng = Rng::new(seed);
    let mut rng = Rng::new(!seed);
    let fresh = SimStorage::new();
    image::write_new(&fresh, &setup.header).unwrap();
    let mut disk = fresh;
    let mut model = None;
    let mut crashes = 0;
    let mut calls = 0;
    for generation in 0..run.generations {
        let tap = Arc::new(Tap::new(disk, rng.next_u64(), run.when));
        let chain = open_sim(tap.clone(), setup.lower.as_ref(), "reopened");
        let m: &mut Model = model.get_or_insert_with(|| {
            // The first round starts from what the fresh overlay shows of its backing.
            Model::new(
                sc.windows
                    .iter()
                    .map(|&(start, len)| {
                        let mut buf = vec![0u8; len as usize];
                        chain.read(start, &mut buf).unwrap();
                        (start, buf)
                    })
                    .collect(),
            )
        });
        for i in 0..run.ops {
            let op = sc.op(
                &mut ops_rng,
                seed << 20 | (generation as u64) << 10 | i as u64,
            );
            let ctx = format!("{} seed {seed} round {generation} op {i} {op:?}", sc.name);
            match op {
                Op::Write { at, n, seed, fua } => {
                    m.write(at, n, Some(seed));
                    chain
                        .write(at, &pattern(seed, at, n), fua)
                        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                }
                Op::Zero { at, n, mode, fua } => {
                    m.write(at, n, None);
                    chain
                        .zero(at, n, mode, fua)
                        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                }
                Op::Read { at, n } => {
                    let mut buf = vec![0u8; n as usize];
                    chain.read(at, &mut buf).unwrap();
                    let w = m
                        .windows
                        .iter()
                        .position(|w| w.start <= at && at + n <= w.start + w.current.len() as u64)
                        .unwrap();
                    let off = (at - m.windows[w].start) as usize;
                    let expected = &m.windows[w].current[off..off + n as usize];
                    assert!(buf == expected, "{ctx}: read differs from what was written");
                }
                Op::Flush => chain.flush().unwrap_or_else(|e| panic!("{ctx}: {e}")),
            }
            // Crashes during the operation: the model still allows everything since the
            // last completed flush, this operation included.
            for (k, snap) in tap.take().into_iter().enumerate() {
                crashes += 1;
                verify_crash(
                    snap,
                    &setup,
                    m,
                    rng.next_u64(),
                    &format!("{ctx}, crash {k}"),
                );
            }
            let flushed = match op {
                Op::Flush => true,
                Op::Write { fua, .. } | Op::Zero { fua, .. } => fua,
                Op::Read { .. } => false,
            };
            if flushed {
                m.flushed();
                // A crash right after a flush keeps exactly what was flushed.
                if rng.below(4) == 0 {
                    crashes += 1;
                    verify_crash(
                        tap.snapshot(),
                        &setup,
                        m,
                        rng.next_u64(),
                        &format!("{ctx}, crash after it"),
                    );
                }
            }
        }
        for (i, g) in read_windows(&chain, m).iter().enumerate() {
            m.check_live(i, g)
                .unwrap_or_else(|e| panic!("{} seed {seed} round {generation}: {e}", sc.name));
        }
        calls = tap.calls.load(Ordering::Relaxed);
        // End the round with a crash, and carry on from whatever it left.
        let last = tap.snapshot();
        let keep = SimStorage::with_contents(last.contents());
        crashes += 1;
        let what = format!("{} seed {seed} round {generation}, final crash", sc.name);
        let got = verify_crash(last, &setup, m, rng.next_u64(), &what);
        drop(chain);
        *m = Model::new(m.windows.iter().map(|w| w.start).zip(got).collect());
        disk = keep;
    }
    Outcome { crashes, calls }
}

/// Scales the crash test: `STRATA_CRASH_SEEDS=N` runs N seeds per scenario (default 3).
fn crash_seeds() -> u64 {
    std::env::var("STRATA_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

fn scenarios() -> Vec<Scenario> {
    const MIB: u64 = 1 << 20;
    // Two L2 pages' worth of 4 KiB clusters and then some, so commits touch several
    // pages and new page pairs are allocated among data clusters.
    let dense = 2 * MIB + 300 * 1024 + 123;
    vec![
        Scenario {
            name: "standalone, 4 KiB clusters",
            under: Under::Nothing,
            cluster_bits: 12,
            size: dense,
            windows: vec![(0, dense)],
        },
        Scenario {
            name: "standalone, 64 KiB clusters",
            under: Under::Nothing,
            cluster_bits: 16,
            size: dense,
            windows: vec![(0, dense)],
        },
        Scenario {
            name: "overlay over raw, 4 KiB clusters",
            under: Under::Raw,
            cluster_bits: 12,
            size: dense,
            windows: vec![(0, dense)],
        },
        Scenario {
            name: "overlay over Strata over raw, 16 KiB clusters",
            under: Under::Strata,
            cluster_bits: 14,
            size: dense,
            windows: vec![(0, dense)],
        },
        // 1.5 GiB of 4 KiB clusters: two L1 pages. Operations go to windows at the start,
        // across an L2 page boundary, across the L1 page boundary, and at the end.
        {
            let size = 1536 * MIB + 4321;
            let l2_span = 510 * 4096;
            let l1_span = 510 * l2_span;
            Scenario {
                name: "standalone, 1.5 GiB, two L1 pages",
                under: Under::Nothing,
                cluster_bits: 12,
                size,
                windows: vec![
                    (0, 256 * 1024),
                    (7 * l2_span - 100 * 1024, 256 * 1024),
                    (l1_span - 128 * 1024, 256 * 1024),
                    (size - 200 * 1024, 200 * 1024),
                ],
            }
        },
    ]
}

#[test]
fn crashes_at_random_points_lose_nothing_flushed() {
    let run = Run {
        generations: 6,
        ops: 60,
        when: When::Random {
            sync: 250,
            other: 80,
        },
    };
    let mut total = 0;
    for sc in scenarios() {
        let mut n = 0;
        for seed in 1..=crash_seeds() {
            n += crash_scenario(&sc, seed, run).crashes;
        }
        eprintln!("crash model: {}: {n} random crashes simulated", sc.name);
        total += n;
    }
    eprintln!("crash model: {total} random crashes simulated in all");
    assert!(total >= 500, "only {total} crashes simulated");
}

/// Crashes before every single storage call of a short run on a fresh image (its first
/// commits included), each in several ways.
#[test]
fn every_step_of_the_first_commits_is_a_safe_crash_point() {
    let mut total = 0;
    for sc in scenarios() {
        let run = |when| Run {
            generations: 1,
            ops: 20,
            when,
        };
        let calls = crash_scenario(&sc, 99, run(When::Never)).calls;
        let mut n = 0;
        for call in 0..calls {
            let when = When::At { call, variants: 4 };
            n += crash_scenario(&sc, 99, run(when)).crashes;
        }
        eprintln!(
            "crash model: {}: {n} crashes, before each of {calls} steps",
            sc.name
        );
        total += n;
    }
    eprintln!("crash model: {total} step-by-step crashes simulated in all");
}
