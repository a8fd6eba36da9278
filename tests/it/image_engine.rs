//! The Strata image engine driven through the library, without a server.
//!
//! Crash safety: random writes, partial writes, trims, zeroing and flushes on simulated
//! disks ([`SimStorage`]) that are "crashed" at random points, in the middle of operations
//! and commits too; every crashed disk must scan clean, hold everything flushed, hold
//! nothing that was never written there, and keep working after reopening.
//!
//! Running out of space: writes that need new clusters fail with `NoSpace`, as does a
//! flush that needs a new map page pair, and neither disturbs what was written before.
//!
//! Chains of real files: 100 layers deep, a 16 TiB image that stays small, and many
//! overlays of one base open at once, sharing it.
//!
//! Bad input: truncated files, damaged headers and map pages, other tools' images, and
//! missing, changed or looping backing files are refused with an error that names the
//! file and the problem; a single torn or damaged copy of a page is survived, by reading
//! the other.
//!
//! The metadata codecs of `image::format`, by property tests: headers and map pages
//! round-trip, any single flipped bit is detected, and the newer valid copy wins.
//!
//! The seed corpus of the `image_meta` fuzz target is made here too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use strata::ErrorKind;
use strata::block::DepthExtent;
use strata::image::chain::RangeState;
use strata::image::format::{self, Backing, BackingKind, Header};
use strata::image::sim::{Rng, SimStorage};
use strata::image::storage::{Storage, View};
use strata::image::{self, Chain, CreateOptions, Lower, ZeroMode, layer};

use crate::support::{images_open, scratch, spawn};

/// Deterministic, never-zero byte for write `seed` at virtual offset `pos`: every write
/// leaves its own bytes, so data that lands in the wrong place is recognised.
fn pat(seed: u64, pos: u64) -> u8 {
    let x = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ pos.wrapping_mul(0xd6e8_feb8_6659_fd93))
        .wrapping_mul(0x2545_f491_4f6c_dd1d);
    ((x >> 40) as u8) | 1
}

/// The bytes write `seed` puts at `[at, at + len)`.
fn pattern(seed: u64, at: u64, len: u64) -> Vec<u8> {
    (at..at + len).map(|p| pat(seed, p)).collect()
}

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

const TOP: &str = "top.strata";

/// The fixed part of a scenario: the lower chain (shared by every reopen) and the top
/// image's header.
struct Setup {
    lower: Option<Lower>,
    header: Header,
}

fn header(size: u64, cluster_bits: u32, id: u8, backing: Option<Backing>) -> Header {
    Header {
        sequence: 1,
        virtual_size: size,
        cluster_bits,
        incompatible: 0,
        compatible: 0,
        image_id: [id; 16],
        backing,
    }
}

/// A raw base on a simulated disk: a pattern with a hole in it.
fn raw_lower(len: u64) -> Lower {
    let mut bytes = pattern(7, 0, len);
    let hole = (len / 3) as usize;
    bytes[hole..hole + 20000].fill(0);
    let storage = SimStorage::with_contents(bytes);
    let identity = image::fingerprint(&storage, len).unwrap();
    Lower::raw(Arc::new(storage), Path::new("base.raw"), identity).unwrap()
}

/// Scans `storage` and opens it as the top of `lower`, insisting on a clean scan.
fn open_sim(storage: Arc<dyn Storage>, lower: Option<&Lower>, what: &str) -> Chain {
    let scan = layer::scan(storage.as_ref(), Path::new(TOP))
        .unwrap_or_else(|e| panic!("{what}: the image does not scan: {e}"));
    assert!(
        scan.problems.is_empty(),
        "{what}: the scan finds problems: {:?}",
        scan.problems
    );
    Chain::new(storage, Path::new(TOP), scan, lower, true)
        .unwrap_or_else(|e| panic!("{what}: the image does not open: {e}"))
}

impl Scenario {
    fn setup(&self) -> Setup {
        let cs = 1u64 << self.cluster_bits;
        let raw_len = self.size - self.size / 5 - 777;
        let (lower, backing) = match self.under {
            Under::Nothing => (None, None),
            Under::Raw => {
                let lower = raw_lower(raw_len);
                let backing = Backing {
                    kind: BackingKind::Raw,
                    path: "base.raw".into(),
                    size: raw_len,
                    identity: lower.identity.1,
                };
                (Some(lower), Some(backing))
            }
            Under::Strata => {
                let raw = raw_lower(raw_len);
                let raw_backing = Backing {
                    kind: BackingKind::Raw,
                    path: "base.raw".into(),
                    size: raw_len,
                    identity: raw.identity.1,
                };
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

// ---------------------------------------------------------------------------------------
// Reusing space a crash left behind

/// A guest may store anything, valid Strata map pages included (a VM keeping Strata
/// images on its disk). Data written but never committed is free space after a crash,
/// and free space becomes new map page pairs: a page there must never be taken for one
/// of the image's own.
#[test]
fn page_like_guest_data_in_reused_space_is_never_taken_for_a_map_page() {
    let h = header(4 << 20, 12, 1, None);
    let disk = SimStorage::new();
    image::write_new(&disk, &h).unwrap();
    let disk: Arc<dyn Storage> = Arc::new(disk);
    let chain = open_sim(disk.clone(), None, "fresh");
    chain.write(0, &pattern(1, 0, 4096), true).unwrap();
    // Cluster 2 holds what looks like version 1000 of map page 1, mapping its first
    // cluster (510) onto cluster 0's data.
    let host0 = chain.ranges(0, 4096).unwrap()[0].host.unwrap();
    let mut entries = [0u64; format::ENTRIES];
    entries[0] = format::Entry::Data(host0).encode();
    let fake = format::encode_page(format::PageKind::L2, 1, 1000, &entries);
    chain.write(4096, &pattern(2, 4096, 4096), false).unwrap();
    chain.write(8192, &fake[..], false).unwrap();
    drop(chain);

    // The process dies before a flush; its writes reach the disk, its map does not.
    let disk: Arc<dyn Storage> = Arc::new(SimStorage::with_contents(disk.view().unwrap().to_vec()));
    let chain = open_sim(disk.clone(), None, "after the crash");
    // Zeroing a cluster of page 1 gives that page a page pair, in the space left free.
    chain.zero(511 * 4096, 4096, ZeroMode::Zero, true).unwrap();
    drop(chain);

    let disk: Arc<dyn Storage> = Arc::new(SimStorage::with_contents(disk.view().unwrap().to_vec()));
    let chain = open_sim(disk, None, "reopened");
    let mut buf = vec![0u8; 4096];
    chain.read(510 * 4096, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "cluster 510 reads another cluster's data"
    );
    chain.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(1, 0, 4096));
}

// ---------------------------------------------------------------------------------------
// Running out of space

/// Reads `len` bytes at `at`.
fn read_at(chain: &Chain, at: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    chain
        .read(at, &mut buf)
        .unwrap_or_else(|e| panic!("read at {at}+{len}: {e}"));
    buf
}

/// Asserts that `disk` scans clean and, after a crash, still holds `expected` at each
/// offset.
fn assert_survives(disk: &SimStorage, expected: &[(u64, Vec<u8>)], what: &str) {
    let scan = layer::scan(disk, Path::new(TOP)).unwrap();
    assert!(scan.problems.is_empty(), "{what}: {:?}", scan.problems);
    let mut rng = Rng::new(5);
    for i in 0..8 {
        let crashed: Arc<dyn Storage> = Arc::new(disk.crash(&mut rng));
        let chain = open_sim(crashed, None, &format!("{what}, crash {i}"));
        for (at, data) in expected {
            assert!(
                read_at(&chain, *at, data.len() as u64) == *data,
                "{what}, crash {i}: the data at {at} is gone"
            );
        }
    }
}

/// A fresh 4 MiB image with 4 KiB clusters on a simulated disk, and the image opened.
fn fresh_sim_image() -> (Arc<SimStorage>, Chain) {
    let sim = Arc::new(SimStorage::new());
    image::write_new(sim.as_ref(), &header(4 << 20, 12, 1, None)).unwrap();
    let chain = open_sim(sim.clone(), None, "fresh");
    (sim, chain)
}

/// Asserts that `err` says the disk holding the image is full, naming the image.
#[track_caller]
fn assert_no_space(err: &strata::Error) {
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert!(err.to_string().contains(TOP), "{err}");
}

#[test]
fn running_out_of_space_fails_writes_cleanly_and_keeps_the_image_sound() {
    const CS: u64 = 4096;
    let (sim, chain) = fresh_sim_image();
    // Ten clusters, flushed: the first map page has its pair now.
    let first = pattern(1, 0, 10 * CS);
    chain.write(0, &first, false).unwrap();
    chain.flush().unwrap();

    // Room for three more clusters.
    sim.set_capacity(Some(sim.len().unwrap() + 3 * CS));
    let three = pattern(2, 20 * CS, 3 * CS);
    chain.write(20 * CS, &three, false).unwrap();
    let mut expected = first.clone();
    // The last write also covers a cluster the image holds: a failed write may leave its
    // own range old or new, byte by byte, and nothing else changes.
    for (at, len) in [(30 * CS, CS), (40 * CS + 5, 10), (9 * CS + 100, 2 * CS)] {
        let data = pattern(3, at, len);
        let err = chain
            .write(at, &data, false)
            .expect_err("a write needing a new cluster");
        assert_no_space(&err);
        let end = (at + len).min(10 * CS);
        if at < end {
            let got = read_at(&chain, at, end - at);
            let old = &mut expected[at as usize..end as usize];
            for (i, (o, g)) in old.iter_mut().zip(got).enumerate() {
                assert!(
                    g == *o || g == data[i],
                    "byte at {} after a failed write",
                    at + i as u64
                );
                *o = g;
            }
        }
    }
    // Clusters the image holds are still written in place, and trimming needs no space.
    let in_place = pattern(4, 100, 50);
    chain.write(100, &in_place, false).unwrap();
    chain.zero(5 * CS, CS, ZeroMode::Trim, false).unwrap();
    chain.flush().expect("a flush that needs no new space");

    expected[100..150].copy_from_slice(&in_place);
    expected[5 * CS as usize..6 * CS as usize].fill(0);
    assert!(read_at(&chain, 0, 10 * CS) == expected);
    assert!(read_at(&chain, 20 * CS, 3 * CS) == three);
    let kept = [(0, expected.clone()), (20 * CS, three.clone())];
    assert_survives(&sim, &kept, "after running out of space");

    // The trimmed cluster's space is free again once the trim is committed.
    let reused = pattern(5, 30 * CS, CS);
    chain.write(30 * CS, &reused, true).unwrap();
    assert!(read_at(&chain, 0, 10 * CS) == expected);
    let kept = [(0, expected), (20 * CS, three), (30 * CS, reused)];
    assert_survives(&sim, &kept, "after reusing the trimmed cluster");
}

#[test]
fn running_out_of_space_in_a_flush_keeps_the_last_commit() {
    const CS: u64 = 4096;
    let (sim, chain) = fresh_sim_image();
    let first = pattern(1, 0, 3 * CS);
    chain.write(0, &first, true).unwrap();

    // Room for one cluster: a write to the second map page fits, the page pair its
    // commit needs does not.
    sim.set_capacity(Some(sim.len().unwrap() + CS));
    let far = pattern(2, 600 * CS, CS);
    chain.write(600 * CS, &far, false).unwrap();
    for _ in 0..2 {
        assert_no_space(&chain.flush().expect_err("a flush needing a new page pair"));
        // The engine still reads what was written, and the disk holds the last commit.
        assert!(read_at(&chain, 600 * CS, CS) == far);
        assert_survives(&sim, &[(0, first.clone())], "after a failed flush");
    }

    // With space again, the same flush goes through, and what the failed one had
    // reserved is not handed out twice.
    sim.set_capacity(None);
    chain.flush().unwrap();
    assert_survives(
        &sim,
        &[(0, first.clone()), (600 * CS, far.clone())],
        "after the retried flush",
    );
    let more = pattern(3, 700 * CS, 4 * CS);
    chain.write(700 * CS, &more, true).unwrap();
    let kept = [(0, first), (600 * CS, far), (700 * CS, more)];
    assert_survives(&sim, &kept, "after writing on");
}

// ---------------------------------------------------------------------------------------
// Chains of real files

fn create(path: &Path, size: Option<u64>, cluster: Option<u64>, backing: Option<&Path>) {
    image::create(
        path,
        &CreateOptions {
            size,
            cluster_size: cluster,
            backing: backing.map(Path::to_path_buf),
        },
    )
    .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

fn open_rw(path: &Path) -> Chain {
    image::open(path, true).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// What `allocation_depth` must say, from the depth of each cluster.
fn depth_runs(cs: u64, size: u64, depth_of: impl Fn(u64) -> u32) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for c in 0..size.div_ceil(cs) {
        let len = cs.min(size - c * cs);
        match out.last_mut() {
            Some((l, d)) if *d == depth_of(c) => *l += len,
            _ => out.push((len, depth_of(c))),
        }
    }
    out
}

#[test]
fn a_chain_100_layers_deep_opens_and_reads_through_every_layer() {
    const LAYERS: u64 = 100;
    const CS: u64 = 4096;
    let size = (LAYERS + 20) * CS + 1234;
    let _images = images_open();
    let dir = tempfile::tempdir().unwrap();
    let path = |k: u64| dir.path().join(format!("layer{k:03}.strata"));
    // Layer k (1 at the bottom) writes cluster k, and appends to cluster 0 a few bytes of
    // its own (copying up the rest); layer 50 zeroes cluster 20, hiding layer 20's data.
    let mut c0 = vec![0u8; CS as usize];
    for k in 1..=LAYERS {
        match k {
            1 => create(&path(k), Some(size), Some(CS), None),
            _ => create(&path(k), None, None, Some(&path(k - 1))),
        }
        let chain = open_rw(&path(k));
        assert_eq!(chain.layers().len() as u64, k);
        chain.write(k * CS, &pattern(k, k * CS, CS), false).unwrap();
        let at = k * 10;
        chain.write(at, &pattern(k, at, 10), false).unwrap();
        c0[at as usize..at as usize + 10].copy_from_slice(&pattern(k, at, 10));
        if k == 50 {
            chain.zero(20 * CS, CS, ZeroMode::Zero, false).unwrap();
        }
        chain.flush().unwrap();
    }

    for writable in [false, true] {
        let top = image::open(&path(LAYERS), writable).unwrap();
        assert_eq!(top.layers().len() as u64, LAYERS);
        assert_eq!(top.size(), size);
        assert!(read_at(&top, 0, CS) == c0, "cluster 0");
        for k in 1..=LAYERS {
            let got = read_at(&top, k * CS, CS);
            if k == 20 {
                assert!(got.iter().all(|&b| b == 0), "cluster 20 is hidden");
            } else {
                assert!(got == pattern(k, k * CS, CS), "cluster {k}");
            }
        }
        // Layer k is at depth LAYERS - k + 1; layer 50 owns cluster 20; cluster 0 is the
        // top's; nothing owns the clusters past the last layer's.
        let expected = depth_runs(CS, size, |c| match c {
            0 => 1,
            20 => (LAYERS - 50 + 1) as u32,
            c if c <= LAYERS => (LAYERS - c + 1) as u32,
            _ => 0,
        });
        let runs = |extents: Vec<DepthExtent>| -> Vec<(u64, u32)> {
            extents.iter().map(|e| (e.length, e.depth)).collect()
        };
        assert_eq!(runs(top.allocation_depth(0, size).unwrap()), expected);
        assert_eq!(
            runs(top.allocation_depth(37 * CS + 5, 2 * CS).unwrap()),
            vec![(CS - 5, 64), (CS, 63), (5, 62)]
        );
    }
}

#[test]
fn a_16_tib_image_with_writes_far_apart_stays_small() {
    const TIB: u64 = 1 << 40;
    const GIB: u64 = 1 << 30;
    let size = 16 * TIB;
    let _images = images_open();
    let (_dir, path) = scratch("huge.strata");
    create(&path, Some(size), None, None);
    let writes = [
        (0, 10),
        (3 * GIB + 5, 5000),
        (GIB * 1000 - 100, 200),
        (7 * TIB + 12345, 70000),
        (size - 10, 10),
    ];
    {
        let chain = open_rw(&path);
        for (i, &(at, len)) in writes.iter().enumerate() {
            chain.write(at, &pattern(i as u64, at, len), false).unwrap();
        }
        chain.flush().unwrap();
    }
    let chain = image::open(&path, false).unwrap();
    assert_eq!(chain.size(), size);
    for (i, &(at, len)) in writes.iter().enumerate() {
        assert!(
            read_at(&chain, at, len) == pattern(i as u64, at, len),
            "write {i}"
        );
        // Around each write the disk reads as zeroes.
        let before = at.saturating_sub(3);
        assert!(read_at(&chain, before, at - before).iter().all(|&b| b == 0));
    }
    // Data exactly where the writes went, in whole clusters; holes elsewhere.
    let cs = chain.cluster_size();
    let mut clusters: Vec<u64> = writes
        .iter()
        .flat_map(|&(at, len)| at / cs..(at + len).div_ceil(cs))
        .collect();
    clusters.dedup();
    let data: Vec<(u64, u64)> = chain
        .block_status(0, size)
        .unwrap()
        .iter()
        .scan(0, |pos, e| {
            let start = *pos;
            *pos += e.length;
            Some((start, *e))
        })
        .filter(|(_, e)| !e.hole)
        .map(|(start, e)| (start, e.length))
        .collect();
    let expected: Vec<(u64, u64)> = clusters
        .iter()
        .map(|&c| (c * cs, cs.min(size - c * cs)))
        .fold(Vec::new(), |mut v: Vec<(u64, u64)>, (s, l)| {
            match v.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => v.push((s, l)),
            }
            v
        });
    assert_eq!(data, expected);

    // The file holds the header, the map table (sparse but for one empty version per L1
    // page), the clusters written and their map pages.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&path).unwrap();
    let h = chain.header();
    let mapped = clusters.len() as u64 * cs + writes.len() as u64 * 2 * 4096;
    assert!(
        meta.len() <= h.data_start() + mapped,
        "file length {} for a map table ending at {}",
        meta.len(),
        h.data_start()
    );
    let usage = meta.blocks() * 512;
    let expected_usage = 2 * 4096 + 2 * 4096 * h.l1_pages() + mapped;
    assert!(
        usage <= expected_usage + (1 << 20),
        "{usage} bytes on disk, about {expected_usage} expected"
    );
}

#[test]
fn many_overlays_of_one_base_open_at_once_share_it() {
    const OVERLAYS: u64 = 32;
    const CS: u64 = 65536;
    let size = 40 * CS + 77;
    let _images = images_open();
    let dir = tempfile::tempdir().unwrap();
    for golden_kind in ["raw", "strata"] {
        let golden = dir.path().join(format!("golden.{golden_kind}"));
        let contents = pattern(1, 0, size);
        if golden_kind == "raw" {
            std::fs::write(&golden, &contents).unwrap();
        } else {
            create(&golden, Some(size), Some(CS), None);
            let chain = open_rw(&golden);
            chain.write(0, &contents, true).unwrap();
        }
        let before = std::fs::read(&golden).unwrap();
        let tops: Vec<PathBuf> = (0..OVERLAYS)
            .map(|i| {
                let p = dir.path().join(format!("{golden_kind}-vm{i}.strata"));
                create(&p, None, Some(CS), Some(&golden));
                p
            })
            .collect();
        let chains: Vec<Chain> = tops.iter().map(|p| open_rw(p)).collect();
        // One base, opened once, under every overlay.
        for c in &chains[1..] {
            assert!(Arc::ptr_eq(&c.layers()[0], &chains[0].layers()[0]));
        }
        // Held read-only and shared: nobody may open it for writing meanwhile.
        let busy = image::open(&golden, true)
            .map(drop)
            .map_err(|e| e.to_string());
        if golden_kind == "strata" {
            let e = busy.expect_err("the base is in use");
            assert!(
                e.contains("in use") && e.contains(golden.to_str().unwrap()),
                "{e}"
            );
        }
        // Each overlay writes on its own: a whole cluster and a partial one.
        for (i, c) in chains.iter().enumerate() {
            let i = i as u64;
            c.write(3 * CS, &pattern(100 + i, 3 * CS, CS), false)
                .unwrap();
            c.write(
                7 * CS + i * 100,
                &pattern(200 + i, 7 * CS + i * 100, 50),
                false,
            )
            .unwrap();
        }
        for (i, c) in chains.iter().enumerate() {
            let i = i as u64;
            let mut expected = contents.clone();
            expected[3 * CS as usize..4 * CS as usize].copy_from_slice(&pattern(
                100 + i,
                3 * CS,
                CS,
            ));
            let at = (7 * CS + i * 100) as usize;
            expected[at..at + 50].copy_from_slice(&pattern(200 + i, at as u64, 50));
            assert!(read_at(c, 0, size) == expected, "overlay {i}");
            c.flush().unwrap();
        }
        drop(chains);
        assert!(
            std::fs::read(&golden).unwrap() == before,
            "the base was modified"
        );
        // Closing the overlays lets go of the base.
        if golden_kind == "strata" {
            drop(open_rw(&golden));
        }
        // Reopened, each still has its own writes.
        let c = image::open(&tops[5], false).unwrap();
        assert!(read_at(&c, 3 * CS, CS) == pattern(105, 3 * CS, CS));
    }
}

#[test]
fn overlays_of_different_templates_share_the_base_under_them() {
    let _images = images_open();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    create(&p("golden.strata"), Some(1 << 20), None, None);
    open_rw(&p("golden.strata"))
        .write(0, &pattern(1, 0, 1 << 20), true)
        .unwrap();
    for t in ["t1", "t2"] {
        create(&p(t), None, None, Some(&p("golden.strata")));
        open_rw(&p(t)).write(4096, &[7; 100], true).unwrap();
        create(&p(&format!("{t}-vm")), None, None, Some(&p(t)));
    }
    let a = open_rw(&p("t1-vm"));
    let b = open_rw(&p("t2-vm"));
    assert_eq!(a.layers().len(), 3);
    assert!(Arc::ptr_eq(&a.layers()[0], &b.layers()[0]));
    assert!(!Arc::ptr_eq(&a.layers()[1], &b.layers()[1]));
    assert!(read_at(&a, 0, 1 << 20) == read_at(&b, 0, 1 << 20));
}

// ---------------------------------------------------------------------------------------
// Bad input: refused with the file and the problem named; one torn copy survived

/// Asserts that `r` failed with `kind`, naming `file` and saying each of `words`.
#[track_caller]
fn refused<T>(r: strata::Result<T>, kind: ErrorKind, file: &Path, words: &[&str]) -> String {
    let Err(e) = r else {
        panic!("{} was accepted", file.display())
    };
    let text = e.to_string();
    assert_eq!(e.kind(), kind, "{text}");
    assert!(
        text.contains(file.to_str().unwrap()),
        "{text:?} does not name {}",
        file.display()
    );
    for w in words {
        assert!(text.contains(w), "{text:?} does not say {w:?}");
    }
    text
}

/// Opens `path` both ways the command line does, expecting the same refusal.
#[track_caller]
fn refused_both_ways(path: &Path, kind: ErrorKind, file: &Path, words: &[&str]) {
    refused(image::open(path, false), kind, file, words);
    refused(
        strata::backend::open(path.to_str().unwrap(), false),
        kind,
        file,
        words,
    );
}

/// A copy of `src` at `dst` with `edit` applied to its bytes.
fn edited(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(src).unwrap();
    edit(&mut bytes);
    std::fs::write(dst, &bytes).unwrap();
    dst.to_path_buf()
}

/// The metadata of the image at `path`.
fn scan_file(path: &Path) -> layer::Scan {
    let storage = strata::image::storage::FileStorage::open_unlocked(path).unwrap();
    layer::scan(&storage, path).unwrap()
}

#[test]
fn truncated_images_are_refused() {
    const CS: u64 = 4096;
    let _images = images_open();
    let (dir, path) = scratch("disk.strata");
    create(&path, Some(4 << 20), Some(CS), None);
    {
        // Three clusters, then their map page pair, then one more cluster.
        let chain = open_rw(&path);
        chain.write(0, &pattern(1, 0, 3 * CS), true).unwrap();
        chain
            .write(10 * CS, &pattern(2, 10 * CS, CS), true)
            .unwrap();
    }
    let scan = scan_file(&path);
    let pair = scan.pairs[&0].offset;
    let last = std::fs::metadata(&path).unwrap().len() - CS;
    let cut =
        |name: &str, len: u64| edited(&path, &dir.path().join(name), |b| b.truncate(len as usize));
    let header_only = cut("header.strata", 5000);
    refused_both_ways(
        &header_only,
        ErrorKind::Corrupt,
        &header_only,
        &["truncated: 5000 bytes", "header"],
    );
    let table = cut("table.strata", scan.header.data_start() - 100);
    refused_both_ways(
        &table,
        ErrorKind::Corrupt,
        &table,
        &["corrupt image", "truncated", "map table"],
    );
    let data = cut("data.strata", last);
    refused_both_ways(
        &data,
        ErrorKind::Corrupt,
        &data,
        &["corrupt image", "cluster 10", "past the end of the file"],
    );
    let map = cut("map.strata", pair + 100);
    refused_both_ways(
        &map,
        ErrorKind::Corrupt,
        &map,
        &["corrupt image", "map page 0", "outside the file"],
    );
}

#[test]
fn damaged_headers_are_refused_and_one_torn_copy_is_survived() {
    let _images = images_open();
    let (dir, path) = scratch("disk.strata");
    create(&path, Some(1 << 20), None, None);
    open_rw(&path).write(0, &pattern(1, 0, 5000), true).unwrap();
    // A second header version (an unknown compatible feature bit: kept, ignored), in
    // slot 1.
    {
        let (mut chain, _) = image::open_standalone(&path, true, false).unwrap();
        let mut h = chain.header().clone();
        h.compatible = 1 << 7;
        chain.rewrite_header(h).unwrap();
    }
    let at = |name: &str| dir.path().join(name);
    let flip = |b: &mut Vec<u8>, i: usize| b[i] ^= 0x20;

    let both = edited(&path, &at("both.strata"), |b| {
        flip(b, 30);
        flip(b, 4096 + 30);
    });
    refused_both_ways(
        &both,
        ErrorKind::Corrupt,
        &both,
        &["unreadable header", "checksum mismatch"],
    );

    // One copy bad: the other is used, be it the newer or the older.
    let newer_bad = edited(&path, &at("newer.strata"), |b| flip(b, 4096 + 30));
    let torn = edited(&path, &at("torn.strata"), |b| b[4096 + 3584..8192].fill(0));
    for (p, sequence) in [(&newer_bad, 1), (&torn, 1)] {
        let chain = image::open(p, false).unwrap();
        assert_eq!(chain.header().sequence, sequence, "{}", p.display());
        assert_eq!(chain.header().compatible, 0);
        assert!(read_at(&chain, 0, 5000) == pattern(1, 0, 5000));
    }
    let older_bad = edited(&path, &at("older.strata"), |b| flip(b, 30));
    let chain = image::open(&older_bad, false).unwrap();
    assert_eq!(chain.header().sequence, 2);
    assert_eq!(chain.header().compatible, 1 << 7);

    // A newer header version, intact but with values this version cannot read, written
    // on purpose (by a later version): refused, not passed over for the older one.
    let h = scan_file(&path).header;
    let features = edited(&path, &at("features.strata"), |b| {
        let mut v = h.clone();
        v.incompatible = 1 << 3;
        v.sequence = 9;
        b[..4096].copy_from_slice(&format::encode_header(&v)[..]);
    });
    refused_both_ways(
        &features,
        ErrorKind::Corrupt,
        &features,
        &["unknown incompatible feature bits 0x8"],
    );
    let version = edited(&path, &at("version.strata"), |b| {
        let mut v = h.clone();
        v.sequence = 9;
        let mut page = format::encode_header(&v);
        page[8] = 2;
        let crc = crc32fast::hash(&page[..4092]);
        page[4092..].copy_from_slice(&crc.to_le_bytes());
        b[..4096].copy_from_slice(&page[..]);
    });
    refused_both_ways(
        &version,
        ErrorKind::Corrupt,
        &version,
        &["format version 2 is not supported"],
    );
}

#[test]
fn damaged_map_pages_are_refused_and_one_torn_copy_is_survived() {
    const CS: u64 = 4096;
    let _images = images_open();
    let (dir, path) = scratch("disk.strata");
    create(&path, Some(4 << 20), Some(CS), None);
    {
        // Three commits: map page 0 twice (its second version adds cluster 1), then
        // page 1, which rewrites the L1 page.
        let chain = open_rw(&path);
        for (seed, c) in [(1, 0), (2, 1), (3, 600)] {
            chain
                .write(c * CS, &pattern(seed, c * CS, CS), true)
                .unwrap();
        }
    }
    let scan = scan_file(&path);
    let slot = |offset: u64, newest: usize, which: usize| {
        (offset + [newest, 1 - newest][which] as u64 * 4096) as usize
    };
    let l1 = scan.l1[0];
    let (l1_new, l1_old) = (slot(l1.offset, l1.newest, 0), slot(l1.offset, l1.newest, 1));
    let p0 = scan.pairs[&0];
    let (p0_new, p0_old) = (slot(p0.offset, p0.newest, 0), slot(p0.offset, p0.newest, 1));
    let p1 = scan.pairs[&1];
    let p1_new = slot(p1.offset, p1.newest, 0);
    let at = |name: &str| dir.path().join(name);
    let flip = |b: &mut Vec<u8>, i: usize| b[i + 8] ^= 0x01;
    let reads = |p: &Path, present: &[(u64, u64)], absent: &[u64]| {
        let chain = image::open(p, false).unwrap_or_else(|e| panic!("{e}"));
        for &(seed, c) in present {
            assert!(
                read_at(&chain, c * CS, CS) == pattern(seed, c * CS, CS),
                "cluster {c}"
            );
        }
        for &c in absent {
            assert!(
                read_at(&chain, c * CS, CS).iter().all(|&b| b == 0),
                "cluster {c}"
            );
        }
    };

    let l1_both = edited(&path, &at("l1.strata"), |b| {
        flip(b, l1_new);
        flip(b, l1_old);
    });
    refused_both_ways(
        &l1_both,
        ErrorKind::Corrupt,
        &l1_both,
        &[
            "corrupt image",
            "L1 page 0",
            "both copies unreadable",
            "checksum",
        ],
    );
    // The newest L1 version torn: the one before knows only page 0.
    let l1_torn = edited(&path, &at("l1-torn.strata"), |b| flip(b, l1_new));
    reads(&l1_torn, &[(1, 0), (2, 1)], &[600]);

    let l2_both = edited(&path, &at("l2.strata"), |b| {
        flip(b, p0_new);
        flip(b, p0_old);
    });
    refused_both_ways(
        &l2_both,
        ErrorKind::Corrupt,
        &l2_both,
        &["corrupt image", "map page 0", "both copies unreadable"],
    );
    // The newest version of page 0 torn: the one before maps cluster 0 only.
    let l2_torn = edited(&path, &at("l2-torn.strata"), |b| {
        b[p0_new + 3584..p0_new + 4096].fill(0);
    });
    reads(&l2_torn, &[(1, 0), (3, 600)], &[1]);

    // A valid page in the wrong place is not taken for the page that belongs there.
    let misplaced = edited(&path, &at("misplaced.strata"), |b| {
        let page1 = b[p1_new..p1_new + 4096].to_vec();
        b[p0_new..p0_new + 4096].copy_from_slice(&page1);
        b[p0_old..p0_old + 4096].copy_from_slice(&page1);
    });
    refused_both_ways(
        &misplaced,
        ErrorKind::Corrupt,
        &misplaced,
        &["map page 0", "page tag 0x20000001 where 0x20000000 belongs"],
    );
}

/// A map page copy claiming the last possible sequence number cannot be followed by a
/// newer one: it is not taken for the current version, or every later commit of the
/// page would be written under it and lost at the next open.
#[test]
fn a_page_whose_sequence_number_cannot_be_followed_is_not_current() {
    const CS: u64 = 4096;
    let _images = images_open();
    let (_dir, path) = scratch("disk.strata");
    create(&path, Some(1 << 20), Some(CS), None);
    open_rw(&path).write(0, &pattern(1, 0, CS), true).unwrap();
    let scan = scan_file(&path);
    let pair = scan.pairs[&0];
    // The pair's unused slot gets the same entries under sequence u64::MAX.
    let mut entries = [0u64; format::ENTRIES];
    entries[0] = format::Entry::Data(scan.used[1].0).encode();
    let other = pair.offset as usize + (1 - pair.newest) * 4096;
    edited(&path, &path, |b| {
        let page = format::encode_page(format::PageKind::L2, 0, u64::MAX, &entries);
        b[other..other + 4096].copy_from_slice(&page[..]);
    });
    {
        let chain = open_rw(&path);
        assert!(read_at(&chain, 0, CS) == pattern(1, 0, CS));
        chain.write(CS, &pattern(2, CS, CS), true).unwrap();
    }
    let chain = image::open(&path, false).unwrap();
    assert!(read_at(&chain, 0, CS) == pattern(1, 0, CS));
    assert!(
        read_at(&chain, CS, CS) == pattern(2, CS, CS),
        "the commit was lost"
    );
    drop(chain);

    // The same for the header, whose rewrite follows its sequence number too.
    let h = scan_file(&path).header;
    edited(&path, &path, |b| {
        let v = Header {
            sequence: u64::MAX,
            ..h.clone()
        };
        b[4096..8192].copy_from_slice(&format::encode_header(&v)[..]);
    });
    refused_both_ways(
        &path,
        ErrorKind::Corrupt,
        &path,
        &["unreadable header", "invalid sequence"],
    );
}

/// An image made by another tool: qemu-img's qcow2 when qemu-img is installed.
fn foreign_image(dir: &Path) -> (PathBuf, &'static str) {
    let path = dir.join("disk.qcow2");
    let mut qemu_img = std::process::Command::new("qemu-img");
    qemu_img
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("1M");
    let made = spawn(&mut qemu_img)
        .and_then(|mut c| c.wait())
        .is_ok_and(|s| s.success());
    if !made {
        eprintln!("qemu-img is not installed: using a hand-made qcow2 header");
        let mut bytes = b"QFI\xfb\0\0\0\x03".to_vec();
        bytes.resize(65536, 0);
        std::fs::write(&path, bytes).unwrap();
    }
    (path, "qcow2")
}

#[test]
fn foreign_images_are_refused_as_disks_and_as_backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let (path, name) = foreign_image(dir.path());
    let _images = images_open();
    for read_only in [false, true] {
        refused(
            strata::backend::open(path.to_str().unwrap(), read_only),
            ErrorKind::InvalidInput,
            &path,
            &[&format!("this is a {name} image"), "convert it first"],
        );
    }
    let vhdx = edited(&path, &dir.path().join("disk.vhdx"), |b| {
        b[..8].copy_from_slice(b"vhdxfile");
    });
    refused(
        strata::backend::open(vhdx.to_str().unwrap(), true),
        ErrorKind::InvalidInput,
        &vhdx,
        &["this is a vhdx image"],
    );
    let overlay = dir.path().join("over.strata");
    let r = image::create(
        &overlay,
        &CreateOptions {
            backing: Some(path.clone()),
            ..CreateOptions::default()
        },
    );
    refused(r, ErrorKind::InvalidInput, &path, &["qcow2"]);
    assert!(!overlay.exists());
}

#[test]
fn backing_file_problems_are_refused_naming_the_backing_file() {
    const MIB: u64 = 1 << 20;
    let _images = images_open();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let raw = |name: &str, len: u64| {
        std::fs::write(p(name), pattern(1, 0, len)).unwrap();
        p(name)
    };
    let overlay = |name: &str, base: &Path| {
        create(&p(name), None, None, Some(base));
        p(name)
    };

    // Missing.
    let gone = raw("gone.raw", MIB);
    let over_gone = overlay("over-gone.strata", &gone);
    std::fs::remove_file(&gone).unwrap();
    refused_both_ways(
        &over_gone,
        ErrorKind::NotFound,
        &gone,
        &["backing file", "cannot be opened", "No such file"],
    );

    // Resized.
    let resized = raw("resized.raw", MIB + 3);
    let over_resized = overlay("over-resized.strata", &resized);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&resized)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    refused_both_ways(
        &over_resized,
        ErrorKind::InvalidInput,
        &resized,
        &[
            "backing file has changed",
            "size was 1048579 and is now 2097152",
        ],
    );

    // Changed where the fingerprint looks: in its first 64 KiB, and at one of the blocks
    // sampled across it.
    let len = 4 * MIB;
    let step = (len - 4096) / 63;
    for (i, at) in [(0, 1000), (1, 10 * step + 7)] {
        let changed = raw(&format!("changed{i}.raw"), len);
        let over_changed = overlay(&format!("over-changed{i}.strata"), &changed);
        edited(&changed, &changed, |b| b[at as usize] ^= 0xff);
        refused_both_ways(
            &over_changed,
            ErrorKind::InvalidInput,
            &changed,
            &["backing file has changed", "contents no longer match"],
        );
    }

    // Replaced by another image of the same size.
    let base = p("base.strata");
    create(&base, Some(MIB), None, None);
    let over_base = overlay("over-base.strata", &base);
    let expected = strata::image::tools::header(&over_base)
        .unwrap()
        .backing
        .unwrap();
    std::fs::remove_file(&base).unwrap();
    create(&base, Some(MIB), None, None);
    let now = strata::image::tools::header(&base).unwrap().image_id;
    refused_both_ways(
        &over_base,
        ErrorKind::InvalidInput,
        &base,
        &[
            "backing file has changed",
            &format!(
                "it is image {} where image {} was expected",
                image::format_id(&now),
                image::format_id(&expected.identity)
            ),
        ],
    );

    // Replaced by a raw file.
    std::fs::remove_file(&base).unwrap();
    raw("base.strata", MIB);
    refused_both_ways(
        &over_base,
        ErrorKind::InvalidInput,
        &base,
        &["it was a Strata image and is now a Raw one"],
    );

    // A chain that comes back to where it started.
    let a = p("a.strata");
    create(&a, Some(MIB), None, None);
    let b = overlay("b.strata", &a);
    // `strata rebase` refuses to close a loop, so write the header directly.
    {
        let b_header = strata::image::tools::header(&b).unwrap();
        let backing = strata::image::format::Backing {
            kind: strata::image::format::BackingKind::Strata,
            path: "b.strata".to_owned(),
            size: b_header.virtual_size,
            identity: b_header.image_id,
        };
        let (mut chain, _) = strata::image::open_standalone(&a, true, false).unwrap();
        let mut header = chain.header().clone();
        header.backing = Some(backing);
        chain.rewrite_header(header).unwrap();
    }
    refused_both_ways(
        &b,
        ErrorKind::Corrupt,
        &b,
        &["backing chain loops back on itself"],
    );

    // An overlay whose clusters differ from its Strata backing's.
    let big = p("big.strata");
    create(&big, Some(MIB), Some(65536), None);
    let r = image::create(
        &p("small.strata"),
        &CreateOptions {
            cluster_size: Some(4096),
            backing: Some(big),
            ..CreateOptions::default()
        },
    );
    refused(
        r,
        ErrorKind::InvalidInput,
        &p("small.strata"),
        &["cluster size 4096 differs from the backing image's 65536"],
    );
}

// ---------------------------------------------------------------------------------------
// The metadata codecs

mod codecs {
    use super::*;
    use format::{Current, ENTRIES, Entry, FormatError, L1Entry, PAGE, PageKind, Slot};
    use proptest::prelude::*;

    fn backing() -> impl Strategy<Value = Backing> {
        (
            prop_oneof![Just(BackingKind::Raw), Just(BackingKind::Strata)],
            "[a-zA-Z0-9 ._/é-]{1,300}",
            any::<u64>(),
            any::<[u8; 16]>(),
        )
            .prop_filter("path fits", |(_, p, _, _)| {
                p.len() <= format::MAX_BACKING_PATH
            })
            .prop_map(|(kind, path, size, identity)| Backing {
                kind,
                path,
                size,
                identity,
            })
    }

    /// Any header this version can write: every cluster size, any size up to the largest
    /// the format allows.
    fn header() -> impl Strategy<Value = Header> {
        let bits = format::MIN_CLUSTER_BITS..=format::MAX_CLUSTER_BITS;
        (bits, 0..u64::MAX, any::<u64>())
            .prop_flat_map(|(bits, sequence, compatible)| {
                let max = format::max_virtual_size(bits);
                let size = prop_oneof![0..=max, (max - 1000)..=max, 0..=1u64 << 40];
                (
                    Just(bits),
                    Just(sequence),
                    Just(compatible),
                    size,
                    any::<[u8; 16]>(),
                    proptest::option::of(backing()),
                )
            })
            .prop_map(
                |(cluster_bits, sequence, compatible, virtual_size, image_id, backing)| Header {
                    sequence,
                    virtual_size,
                    cluster_bits,
                    incompatible: 0,
                    compatible,
                    image_id,
                    backing,
                },
            )
    }

    fn entries() -> impl Strategy<Value = Vec<u64>> {
        let entry = prop_oneof![
            Just(0u64),
            Just(Entry::Zero.encode()),
            (1u64..1 << 40).prop_map(|h| Entry::Data(h << 12).encode()),
            any::<u64>(),
        ];
        proptest::collection::vec(entry, ENTRIES)
    }

    fn kind() -> impl Strategy<Value = PageKind> {
        prop_oneof![Just(PageKind::L1), Just(PageKind::L2)]
    }

    proptest! {
        #![proptest_config(crate::support::proptest_cases(256))]

        #[test]
        fn headers_round_trip(h in header()) {
            let bytes = format::encode_header(&h);
            prop_assert!(format::has_magic(&bytes[..]));
            prop_assert_eq!(format::decode_header(&bytes[..]), Ok(h));
        }

        #[test]
        fn any_flipped_bit_of_a_header_is_detected(h in header(), bit in 0..PAGE * 8) {
            let mut bytes = format::encode_header(&h);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(format::decode_header(&bytes[..]).is_err());
        }

        #[test]
        fn sizes_past_what_the_map_can_address_are_refused(
            h in header(),
            excess in prop_oneof![1u64..1000, any::<u64>()],
        ) {
            let max = format::max_virtual_size(h.cluster_bits);
            let size = max.saturating_add(excess).max(max + 1);
            let mut page = format::encode_header(&h);
            page[24..32].copy_from_slice(&size.to_le_bytes());
            let crc = crc32fast::hash(&page[..PAGE - 4]);
            page[PAGE - 4..].copy_from_slice(&crc.to_le_bytes());
            prop_assert_eq!(
                format::decode_header(&page[..]),
                Err(FormatError::BadField("virtual size", size))
            );
        }

        #[test]
        fn short_or_foreign_bytes_are_not_headers(bytes in proptest::collection::vec(any::<u8>(), 0..PAGE + 10)) {
            prop_assert!(format::decode_header(&bytes).is_err());
        }

        #[test]
        fn pages_round_trip(kind in kind(), index in 0u64..1 << 28, sequence in 0..u64::MAX, e in entries()) {
            let bytes = format::encode_page(kind, index, sequence, &e);
            match format::decode_page(&bytes[..], kind, index) {
                Slot::Valid { sequence: s, entries } => {
                    prop_assert_eq!(s, sequence);
                    prop_assert_eq!(&entries[..], &e[..]);
                }
                other => prop_assert!(false, "{:?}", other),
            }
            // Anywhere else, or as the other kind of page, it is misplaced.
            let other_kind = match kind { PageKind::L1 => PageKind::L2, PageKind::L2 => PageKind::L1 };
            for (k, i) in [(kind, index ^ 1), (other_kind, index)] {
                let misplaced = matches!(
                    format::decode_page(&bytes[..], k, i),
                    Slot::Invalid(FormatError::Misplaced { .. })
                );
                prop_assert!(misplaced);
            }
        }

        #[test]
        fn any_flipped_bit_of_a_page_is_detected(
            kind in kind(),
            index in 0u64..1 << 28,
            sequence in 0..u64::MAX,
            e in entries(),
            bit in 0..PAGE * 8,
        ) {
            let mut bytes = format::encode_page(kind, index, sequence, &e);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let invalid = matches!(format::decode_page(&bytes[..], kind, index), Slot::Invalid(_));
            prop_assert!(invalid);
        }

        #[test]
        fn the_last_sequence_number_is_never_valid(h in header(), kind in kind(), e in entries()) {
            let header = Header { sequence: u64::MAX, ..h };
            prop_assert_eq!(
                format::decode_header(&format::encode_header(&header)[..]),
                Err(FormatError::BadField("sequence", u64::MAX))
            );
            let page = format::encode_page(kind, 3, u64::MAX, &e);
            let invalid = matches!(
                format::decode_page(&page[..], kind, 3),
                Slot::Invalid(FormatError::BadField("sequence", u64::MAX))
            );
            prop_assert!(invalid);
        }

        #[test]
        fn the_newer_valid_slot_wins(
            seqs in (0..u64::MAX, 0..u64::MAX),
            damage in (0u8..3, 0u8..3),
            bit in 0..PAGE * 8,
        ) {
            // Each slot: 0 valid, 1 damaged, 2 never written.
            let slot = |seq: u64, d: u8, fill: u64| {
                let mut b = format::encode_page(PageKind::L2, 7, seq, &[fill; ENTRIES]);
                match d {
                    1 => b[bit / 8] ^= 1 << (bit % 8),
                    2 => b.fill(0),
                    _ => {}
                }
                format::decode_page(&b[..], PageKind::L2, 7)
            };
            let got = format::current(slot(seqs.0, damage.0, 1), slot(seqs.1, damage.1, 3));
            let valid = [damage.0 == 0, damage.1 == 0];
            let expected_slot = match valid {
                [true, true] => Some(usize::from(seqs.1 > seqs.0)),
                [true, false] => Some(0),
                [false, true] => Some(1),
                [false, false] => None,
            };
            match (got, expected_slot) {
                (Current::Valid { slot, sequence, entries, other_invalid }, Some(s)) => {
                    prop_assert_eq!(slot, s);
                    prop_assert_eq!(sequence, [seqs.0, seqs.1][s]);
                    prop_assert_eq!(entries[0], [1, 3][s]);
                    prop_assert_eq!(other_invalid, [damage.0, damage.1][1 - s] == 1);
                }
                (Current::Lost(_), None) => prop_assert!(damage.0 == 1 || damage.1 == 1),
                (Current::Empty, None) => prop_assert!(damage == (2, 2)),
                (got, s) => prop_assert!(false, "{:?} where slot {:?} was expected", got, s),
            }
        }

        #[test]
        fn the_newer_header_wins_unless_torn(h in header(), s0 in 0u64..1 << 62, s1 in 0u64..1 << 62, tear in 0u8..3) {
            let slot = |s| {
                let mut v = h.clone();
                v.sequence = s;
                format::encode_header(&v)
            };
            let (a, mut b) = (slot(s0), slot(s1));
            match tear {
                // Torn: the slot's last sector never reached the disk.
                1 => b[PAGE - 512..].fill(0),
                // Intact, newer, and with a feature this version does not know.
                2 => {
                    let mut v = h.clone();
                    v.sequence = s0 + 1;
                    v.incompatible = 1;
                    let mut page = format::encode_header(&h);
                    page.copy_from_slice(&format::encode_header(&Header { incompatible: 0, ..v })[..]);
                    page[40] = 1;
                    let crc = crc32fast::hash(&page[..PAGE - 4]);
                    page[PAGE - 4..].copy_from_slice(&crc.to_le_bytes());
                    b = page;
                }
                _ => {}
            }
            let got = format::current_header(&a[..], &b[..]);
            match tear {
                0 => prop_assert_eq!(got.unwrap().0, usize::from(s1 > s0)),
                1 => prop_assert_eq!(got.unwrap().0, 0),
                _ => prop_assert_eq!(got.unwrap_err(), FormatError::UnknownFeatures(1)),
            }
        }

        #[test]
        fn entries_decode_to_what_encodes_them(raw: u64, host in 1u64..1 << 50) {
            if let Some(e) = Entry::decode(raw) {
                prop_assert_eq!(e.encode(), raw);
            }
            if let Some(e) = L1Entry::decode(raw) {
                prop_assert_eq!(e.encode(), raw);
            }
            let data = Entry::Data(host << 12);
            prop_assert_eq!(Entry::decode(data.encode()), Some(data));
            // Unaligned host offsets and stray bits are not entries.
            prop_assert_eq!(Entry::decode((host << 12) | 2 | 4), None);
        }
    }

    #[test]
    fn the_map_limit_is_the_tags_and_every_cluster_size_reaches_it() {
        for bits in format::MIN_CLUSTER_BITS..=format::MAX_CLUSTER_BITS {
            let max = format::max_virtual_size(bits);
            let h = Header {
                sequence: 1,
                virtual_size: max,
                cluster_bits: bits,
                incompatible: 0,
                compatible: 0,
                image_id: [0; 16],
                backing: None,
            };
            assert_eq!(h.l2_pages(), format::MAX_L2_PAGES, "{bits}");
            assert_eq!(format::decode_header(&format::encode_header(&h)[..]), Ok(h));
        }
    }

    #[test]
    fn create_refuses_sizes_the_map_cannot_address() {
        let _images = images_open();
        let dir = tempfile::tempdir().unwrap();
        for (size, cluster) in [(1u64 << 62, 4096u64), ((1 << 40) * 511, 4096)] {
            let path = dir.path().join("huge.strata");
            let r = image::create(
                &path,
                &CreateOptions {
                    size: Some(size),
                    cluster_size: Some(cluster),
                    backing: None,
                },
            );
            refused(
                r,
                ErrorKind::InvalidInput,
                &path,
                &[&format!("size {size} is too large for 4096 byte clusters")],
            );
            assert!(!path.exists());
        }
    }
}

// ---------------------------------------------------------------------------------------
// The seed corpus of the image_meta fuzz target

/// Seeds for `fuzz/fuzz_targets/image_meta.rs`: small valid images, made
/// deterministically, behind the target's 5-byte prefix (flags, then a page index).
fn image_meta_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let make = |cluster_bits: u32, size: u64, backing: Option<Backing>, work: &dyn Fn(&Chain)| {
        let disk = Arc::new(SimStorage::new());
        image::write_new(disk.as_ref(), &header(size, cluster_bits, 0x5e, backing)).unwrap();
        let chain = open_sim(disk.clone(), None, "seed");
        work(&chain);
        chain.flush().unwrap();
        disk.contents()
    };
    let seed = |flags: u8, index: u32, image: Vec<u8>| {
        let mut v = vec![flags];
        v.extend_from_slice(&index.to_le_bytes());
        v.extend_from_slice(&image);
        v
    };
    let busy = |chain: &Chain| {
        let cs = chain.cluster_size();
        chain.write(0, &pattern(1, 0, 3 * cs), false).unwrap();
        chain
            .write(10 * cs + 100, &pattern(2, 10 * cs + 100, 300), false)
            .unwrap();
        chain.zero(20 * cs, cs, ZeroMode::Zero, false).unwrap();
        chain.zero(cs, cs, ZeroMode::Trim, false).unwrap();
        chain.flush().unwrap();
        // A second version of the map page.
        chain
            .write(30 * cs, &pattern(3, 30 * cs, 10), false)
            .unwrap();
    };
    let raw = Backing {
        kind: BackingKind::Raw,
        path: "base.raw".into(),
        size: 100_000,
        identity: [7; 16],
    };
    vec![
        ("empty", seed(0, 0, make(12, 1 << 20, None, &|_| {}))),
        (
            "standalone-4k",
            seed(0, 0, make(12, 256 << 10, None, &busy)),
        ),
        (
            "overlay-4k-l2",
            seed(2, 0, make(12, 256 << 10, Some(raw), &busy)),
        ),
        (
            "sealed-8k-two-pages",
            seed(
                3,
                1,
                make(13, 5 << 20, None, &|c| {
                    busy(c);
                    c.write(600 * 8192, &[9; 8192], false).unwrap();
                }),
            ),
        ),
    ]
}

#[test]
fn image_meta_fuzz_seeds_are_current() {
    let seeds = image_meta_seeds();
    for (name, bytes) in &seeds {
        // Each is a clean image.
        let scan = layer::scan(
            &SimStorage::with_contents(bytes[5..].to_vec()),
            Path::new(name),
        );
        assert!(scan.unwrap().problems.is_empty(), "{name}");
    }
    crate::support::check_fuzz_seeds("image_meta", &seeds);
}

#[test]
fn zeroing_part_of_a_cluster_that_reads_as_zeroes_allocates_nothing() {
    const CS: u64 = 64 * 1024;
    let _images = images_open();
    let (_dir, path) = scratch("disk.strata");
    create(&path, Some(16 * CS), Some(CS), None);
    let chain = open_rw(&path);
    chain.zero(CS + 512, 4096, ZeroMode::Trim, false).unwrap();
    chain
        .zero(3 * CS + 100, 9000, ZeroMode::Zero, false)
        .unwrap();
    // The same clusters over a whole-cluster zero: still nothing to allocate.
    chain.zero(5 * CS, CS, ZeroMode::Zero, false).unwrap();
    chain.zero(5 * CS + 10, 100, ZeroMode::Trim, false).unwrap();
    chain.flush().unwrap();
    let ranges = chain.ranges(0, 16 * CS).unwrap();
    assert!(
        ranges.iter().all(|r| r.state != RangeState::Data),
        "zeroing allocated data clusters: {ranges:?}"
    );
    // With NO_HOLE the storage must be allocated.
    chain
        .zero(7 * CS + 100, 4096, ZeroMode::ZeroNoHole, false)
        .unwrap();
    let ranges = chain.ranges(7 * CS, CS).unwrap();
    assert_eq!(ranges[0].state, RangeState::Data, "{ranges:?}");
}

/// Zero-copy reads point into the image file. Space freed by a trim must not be reused
/// for other data while such a read's bytes are still waiting to be sent, and must be
/// reused once they are gone.
#[test]
fn zero_copy_reads_keep_freed_space_from_reuse_until_dropped() {
    let Some(shm) = crate::support::memory_dir() else {
        return;
    };
    let dir = tempfile::tempdir_in(shm).unwrap();
    const CS: u64 = 64 * 1024;
    let path = dir.path().join("disk.strata");
    create(&path, Some(64 * CS), Some(CS), None);
    let chain = open_rw(&path);
    assert!(chain.in_memory());
    let old = pattern(1, 0, CS);
    chain.write(0, &old, false).unwrap();
    chain.flush().unwrap();
    // The test reads the mapped bytes itself: nothing truncates this file.
    let chunks = chain.read_sparse_for_kernel(0, CS as usize).unwrap();
    let held: Vec<u8> = chunks
        .iter()
        .flat_map(|c| match c {
            strata::block::ReadChunk::Data(d) => d.to_vec(),
            strata::block::ReadChunk::Zero(n) => vec![0; *n as usize],
        })
        .collect();
    assert_eq!(held, old);
    let (used_before, _) = chain.space().unwrap();

    // Free the cluster and commit: its space is now free, but pinned by `chunks`.
    chain.zero(0, CS, ZeroMode::Trim, false).unwrap();
    chain.flush().unwrap();
    let new = pattern(2, 10 * CS, CS);
    chain.write(10 * CS, &new, false).unwrap();
    // The trim may have punched the old data away (a read concurrent with a trim may
    // return zeroes), but the pending read must never show another offset's data.
    for c in &chunks {
        if let strata::block::ReadChunk::Data(d) = c {
            let zeroes = d.iter().all(|&b| b == 0);
            assert!(
                zeroes || d[..] == old[..],
                "a pending zero-copy read saw reused space"
            );
        }
    }
    let (used_pinned, _) = chain.space().unwrap();
    assert!(used_pinned > used_before, "the pinned cluster was reused");

    // Once the read is gone, the next allocation reuses the freed cluster.
    drop(chunks);
    chain
        .write(20 * CS, &pattern(3, 20 * CS, CS), false)
        .unwrap();
    let (used_after, _) = chain.space().unwrap();
    assert_eq!(
        used_after, used_pinned,
        "freed space was not reused after the read"
    );
    assert_eq!(read_at(&chain, 10 * CS, CS), new);
    assert_eq!(read_at(&chain, 0, CS), vec![0; CS as usize]);
}
