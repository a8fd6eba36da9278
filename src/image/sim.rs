//! A simulated disk for crash testing.
//!
//! [`SimStorage`] keeps two states: what is durable (survived the last `sync`) and what
//! the running program sees (durable plus every write since). [`SimStorage::crash`] makes
//! the disk a power failure would leave behind: the durable state plus an arbitrary
//! subset of the unsynced writes, each possibly torn at 512-byte sector granularity. An
//! image that opens, checks clean and returns every flushed write from every such disk is
//! crash safe.
//!
//! It can also run out of space ([`SimStorage::set_capacity`]) to test `ENOSPC` handling.

use std::io;
use std::sync::Mutex;

use super::storage::{Storage, View};

/// Sector size at which simulated writes tear.
const SECTOR: usize = 512;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Punch { offset: u64, len: u64 },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    durable: Vec<u8>,
    current: Vec<u8>,
    unsynced: Vec<Op>,
    capacity: Option<u64>,
    allocated: u64,
    syncs: u64,
}

/// An in-memory disk that can forget unsynced writes. See the [module docs](self).
#[derive(Debug, Default)]
pub struct SimStorage {
    state: Mutex<State>,
}

/// A small deterministic generator (xorshift64*), so a crash is reproducible from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next pseudo-random value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn apply(buf: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => {
            let start = *offset as usize;
            let end = start + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[start..end].copy_from_slice(data);
        }
        Op::Punch { offset, len } => {
            let start = (*offset as usize).min(buf.len());
            let end = (*offset + *len).min(buf.len() as u64) as usize;
            buf[start..end].fill(0);
        }
        Op::SetLen(len) => buf.resize(*len as usize, 0),
    }
}

impl SimStorage {
    /// An empty disk.
    pub fn new() -> SimStorage {
        SimStorage::default()
    }

    /// A disk holding `bytes`, all durable.
    pub fn with_contents(bytes: Vec<u8>) -> SimStorage {
        let s = SimStorage::default();
        {
            let mut st = s.state.lock().expect("sim lock");
            st.durable.clone_from(&bytes);
            st.current = bytes;
        }
        s
    }

    /// Limits the file to `capacity` bytes: writes past it fail with `ENOSPC`.
    pub fn set_capacity(&self, capacity: Option<u64>) {
        self.state.lock().expect("sim lock").capacity = capacity;
    }

    /// What the program currently sees.
    pub fn contents(&self) -> Vec<u8> {
        self.state.lock().expect("sim lock").current.clone()
    }

    /// Number of `sync` calls so far.
    pub fn syncs(&self) -> u64 {
        self.state.lock().expect("sim lock").syncs
    }

    /// Number of writes, punches and truncations not yet synced.
    pub fn unsynced(&self) -> usize {
        self.state.lock().expect("sim lock").unsynced.len()
    }

    /// The disk a power failure now could leave: the durable bytes plus a random subset
    /// of the unsynced operations, applied in order, writes possibly torn to a random
    /// subset of their sectors.
    pub fn crash(&self, rng: &mut Rng) -> SimStorage {
        let st = self.state.lock().expect("sim lock");
        let mut bytes = st.durable.clone();
        for op in &st.unsynced {
            match rng.below(3) {
                0 => {}
                1 => apply(&mut bytes, op),
                _ => match op {
                    Op::Write { offset, data } => {
                        for (i, chunk) in data.chunks(SECTOR).enumerate() {
                            if rng.below(2) == 0 {
                                let torn = Op::Write {
                                    offset: offset + (i * SECTOR) as u64,
                                    data: chunk.to_vec(),
                                };
                                apply(&mut bytes, &torn);
                            }
                        }
                    }
                    other => apply(&mut bytes, other),
                },
            }
        }
        SimStorage::with_contents(bytes)
    }

    fn record(&self, op: Op) -> io::Result<()> {
        let mut st = self.state.lock().expect("sim lock");
        if let (Some(cap), Op::Write { offset, data }) = (st.capacity, &op) {
            let end = offset + data.len() as u64;
            if end > cap && end > st.allocated {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        apply(&mut st.current, &op);
        st.unsynced.push(op);
        Ok(())
    }
}

impl Storage for SimStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.state.lock().expect("sim lock");
        let start = (offset as usize).min(st.current.len());
        let end = (offset as usize + buf.len()).min(st.current.len());
        buf[..end - start].copy_from_slice(&st.current[start..end]);
        buf[end - start..].fill(0);
        Ok(())
    }

    fn write_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.record(Op::Write {
            offset,
            data: bufs.concat(),
        })
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.state.lock().expect("sim lock");
        st.durable = st.current.clone();
        st.unsynced.clear();
        st.syncs += 1;
        Ok(())
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.state.lock().expect("sim lock");
        if st.capacity.is_some_and(|cap| offset + len > cap) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        st.allocated = st.allocated.max(offset + len);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Op::Punch { offset, len })
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().expect("sim lock").current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.record(Op::SetLen(len))
    }

    fn view(&self) -> io::Result<View> {
        Ok(View::Owned(self.contents()))
    }

    fn in_memory(&self) -> bool {
        true
    }
}
