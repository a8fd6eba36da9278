//! A soak test: for a bounded time (`STRATA_SOAK_SECONDS`, 20 by default), three
//! reconnecting clients write, flush and FUA-write their own regions of a Strata image
//! while fio's nbd engine writes and verifies another region over two connections; the
//! server is killed with SIGKILL and restarted on the same image three times on the way.
//! After every restart each client reconnects and checks that every write acknowledged
//! by a FLUSH (or with FUA) before the kill is there; fio, which cannot reconnect, is
//! started again, and its last run must write and verify its region in full.

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::client::{Client, STRUCTURED};
use crate::support::spec::*;
use crate::support::*;

const DISK: u64 = 64 * MIB;
const REGION: u64 = 16 * MIB;
const BLOCK: usize = 64 * 1024;
const WRITERS: u64 = 3;
const KILLS: u32 = 3;

/// The bytes write `id` puts in a block: recognisable, different for every write.
fn content(id: u64) -> Vec<u8> {
    pattern(id.wrapping_mul(0x9E37_79B9), BLOCK)
}

/// Where the server listens now; `None` while it is down.
type Current = Arc<Mutex<Option<Endpoint>>>;

#[derive(Default)]
struct Figures {
    writes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    reconnects: AtomicU64,
    blocks_checked: AtomicU64,
    lost: AtomicU64,
}

/// What one block may hold: the value made durable last, and values written since
/// (acknowledged or not), any of which may have reached the disk.
#[derive(Clone, Default)]
struct BlockState {
    durable: Option<u64>,
    since: Vec<u64>,
}

impl BlockState {
    fn allows(&self, data: &[u8]) -> Option<Option<u64>> {
        let matches = |id: Option<u64>| match id {
            Some(id) => data == content(id).as_slice(),
            None => data.iter().all(|&b| b == 0),
        };
        if matches(self.durable) {
            return Some(self.durable);
        }
        self.since
            .iter()
            .find(|&&id| matches(Some(id)))
            .map(|&id| Some(id))
    }
}

fn connect(current: &Current, stop: &AtomicBool) -> Option<Client> {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(ep) = current.lock().unwrap().clone() {
            if let Ok(mut c) = Client::connect(&ep) {
                if c.handshake_bare("", STRUCTURED).is_ok() {
                    return Some(c);
                }
            }
        }
        if stop.load(Ordering::Relaxed) && Instant::now() > give_up {
            return None;
        }
        assert!(Instant::now() < give_up, "could not reconnect for 60 s");
        thread::sleep(Duration::from_millis(20));
    }
}

/// One writer: a loop of writes to random blocks of its region, a FLUSH every 16
/// writes and FUA on every 7th, reconnecting (and checking what survived) whenever the
/// server goes away.
fn writer(
    n: u64,
    current: Current,
    stop: Arc<AtomicBool>,
    figures: Arc<Figures>,
) -> Vec<BlockState> {
    let blocks = (REGION / BLOCK as u64) as usize;
    let base = n * REGION;
    let mut state = vec![BlockState::default(); blocks];
    // Blocks written since the last acknowledged flush, with the ids they were given.
    let mut unflushed: Vec<(usize, u64)> = Vec::new();
    let mut rng = n.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    let mut next_id = (n + 1) << 40;
    let mut conn = connect(&current, &stop).expect("first connection");
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let b = (rng % blocks as u64) as usize;
        let id = next_id;
        next_id += 1;
        i += 1;
        let fua = i % 7 == 0;
        state[b].since.push(id);
        let step = (|| -> io::Result<bool> {
            let flags = if fua { FLAG_FUA } else { 0 };
            conn.write(flags, base + (b * BLOCK) as u64, &content(id))?
                .map_err(|(e, m)| io::Error::other(format!("write: errno {e}: {m}")))?;
            figures.writes.fetch_add(1, Ordering::Relaxed);
            if fua {
                figures.fua_writes.fetch_add(1, Ordering::Relaxed);
                state[b] = BlockState {
                    durable: Some(id),
                    since: Vec::new(),
                };
            } else {
                unflushed.push((b, id));
            }
            if i % 16 == 0 {
                conn.flush()?
                    .map_err(|(e, m)| io::Error::other(format!("flush: errno {e}: {m}")))?;
                figures.flushes.fetch_add(1, Ordering::Relaxed);
                for (b, id) in unflushed.drain(..) {
                    // Only the last write of a block counts; later ones replace it.
                    if state[b].since.contains(&id) {
                        let newer: Vec<u64> =
                            state[b].since.iter().copied().filter(|&x| x > id).collect();
                        state[b] = BlockState {
                            durable: Some(id),
                            since: newer,
                        };
                    }
                }
            }
            Ok(true)
        })();
        if let Err(e) = step {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let _ = e;
            figures.reconnects.fetch_add(1, Ordering::Relaxed);
            let Some(c) = connect(&current, &stop) else {
                break;
            };
            conn = c;
            unflushed.clear();
            check_region(&mut conn, base, &mut state, &figures);
        }
    }
    state
}

/// After a restart: every block holds its durable value or one written since; then a
/// flush makes what is there the new durable value.
fn check_region(conn: &mut Client, base: u64, state: &mut [BlockState], figures: &Figures) {
    let mut found = Vec::with_capacity(state.len());
    for (b, s) in state.iter().enumerate() {
        if s.durable.is_none() && s.since.is_empty() {
            found.push(None);
            continue;
        }
        let Ok(Ok(data)) = conn.read(0, base + (b * BLOCK) as u64, BLOCK) else {
            // Killed again while checking: the next reconnect checks again.
            return;
        };
        figures.blocks_checked.fetch_add(1, Ordering::Relaxed);
        match s.allows(&data) {
            Some(id) => found.push(id),
            None => {
                eprintln!(
                    "block {b} at {}: holds neither its flushed write {:?} nor a later one",
                    base + (b * BLOCK) as u64,
                    s.durable
                );
                figures.lost.fetch_add(1, Ordering::Relaxed);
                found.push(s.durable);
            }
        }
    }
    if matches!(conn.flush(), Ok(Ok(()))) {
        for (s, id) in state.iter_mut().zip(found) {
            *s = BlockState {
                durable: id,
                since: Vec::new(),
            };
        }
    }
}

fn fio_once(ep: &Endpoint, scratch: &Path) -> CmdOutput {
    let mut c = Command::new("fio");
    c.current_dir(scratch);
    c.args([
        "--verify_state_save=0",
        "--name=soak",
        "--ioengine=nbd",
        &format!("--uri={}", ep.uri("")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--numjobs=2",
        "--offset=48m",
        "--size=4m",
        "--offset_increment=4m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--group_reporting",
    ]);
    run_timeout(&mut c, Duration::from_secs(120))
}

#[test]
fn soak_with_kills_loses_nothing_acknowledged() {
    if !strata_only("the soak test") {
        return;
    }
    let with_fio = require_tool("fio");
    let seconds: u64 = std::env::var("STRATA_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let (dir, image) = scratch("soak.strata");
    run_ok(strata().args(["create", "-s", &DISK.to_string(), image.to_str().unwrap()]));
    let start = |image: &Path| file(image).listen(Transport::Unix).start();
    let mut server = start(&image);
    let current: Current = Arc::new(Mutex::new(Some(server.endpoint().clone())));
    let stop = Arc::new(AtomicBool::new(false));
    let figures = Arc::new(Figures::default());
    let writers: Vec<_> = (0..WRITERS)
        .map(|n| {
            let (current, stop, figures) = (current.clone(), stop.clone(), figures.clone());
            thread::spawn(move || writer(n, current, stop, figures))
        })
        .collect();
    let fio_runs = Arc::new(Mutex::new((0u32, 0u32)));
    let fio = with_fio.then(|| {
        let (current, stop, runs) = (current.clone(), stop.clone(), fio_runs.clone());
        let scratch = dir.path().to_path_buf();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(ep) = current.lock().unwrap().clone() else {
                    thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let out = fio_once(&ep, &scratch);
                let mut r = runs.lock().unwrap();
                if out.success() {
                    r.0 += 1;
                } else {
                    r.1 += 1;
                }
            }
        })
    });

    let began = Instant::now();
    let period = Duration::from_secs(seconds) / (KILLS + 1);
    let mut logs = Vec::new();
    for kill in 1..=KILLS {
        thread::sleep(period);
        *current.lock().unwrap() = None;
        server.stop_with(libc::SIGKILL);
        logs.push(server.log());
        server = start(&image);
        *current.lock().unwrap() = Some(server.endpoint().clone());
        eprintln!(
            "soak: kill {kill} at {:?}, server restarted",
            began.elapsed()
        );
    }
    thread::sleep(period);
    stop.store(true, Ordering::Relaxed);
    let states: Vec<Vec<BlockState>> = writers
        .into_iter()
        .map(|w| w.join().expect("writer thread"))
        .collect();
    if let Some(f) = fio {
        f.join().expect("fio thread");
    }
    // Every region checked once more against what was made durable, on a fresh start.
    server.stop_with(libc::SIGKILL);
    logs.push(server.log());
    let server = start(&image);
    let stopped = AtomicBool::new(true);
    let last: Current = Arc::new(Mutex::new(Some(server.endpoint().clone())));
    let mut conn = connect(&last, &stopped).expect("connection after the last kill");
    for (n, mut state) in states.into_iter().enumerate() {
        check_region(&mut conn, n as u64 * REGION, &mut state, &figures);
    }
    if with_fio {
        let out = fio_once(server.endpoint(), dir.path());
        assert!(
            out.success(),
            "fio's final write-and-verify failed\n{}",
            out.report()
        );
    }
    logs.push(server.log());
    for log in &logs {
        assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    }
    let check = run(strata().args(["check", image.to_str().unwrap()]));
    let f = &figures;
    let (fio_ok, fio_killed) = *fio_runs.lock().unwrap();
    eprintln!(
        "soak: {:?}, {} kills survived; {} writes ({} FUA), {} flushes acknowledged; {} \
         reconnects, {} blocks checked after restarts; fio runs: {} complete, {} cut off by a \
         kill, final verify {}; data lost: {}",
        began.elapsed(),
        KILLS,
        f.writes.load(Ordering::Relaxed),
        f.fua_writes.load(Ordering::Relaxed),
        f.flushes.load(Ordering::Relaxed),
        f.reconnects.load(Ordering::Relaxed),
        f.blocks_checked.load(Ordering::Relaxed),
        fio_ok,
        fio_killed,
        if with_fio { "passed" } else { "skipped" },
        f.lost.load(Ordering::Relaxed),
    );
    assert_eq!(
        f.lost.load(Ordering::Relaxed),
        0,
        "acknowledged data was lost"
    );
    assert!(
        f.reconnects.load(Ordering::Relaxed) >= u64::from(KILLS),
        "the kills were not felt"
    );
    assert!(f.blocks_checked.load(Ordering::Relaxed) > 0);
    assert!(
        check.success(),
        "strata check after the soak\n{}",
        check.report()
    );
}
