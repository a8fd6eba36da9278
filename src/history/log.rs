//! The log: records appended to segment files, made durable in groups.
//!
//! Appends reserve a `seq` and a place at the tail under a short lock, then write
//! concurrently. Space is reserved on the file system ahead of the tail (4 MiB at a
//! time), so that a write into a reserved place cannot fail for want of space: a full
//! disk shows up when space is reserved, before any `seq` is handed out, and the log
//! stays a clean prefix.
//!
//! A flush makes durable every record up to a `seq`: it waits until every record before
//! it is written and applied (the *written* watermark), then syncs the segments touched
//! since the last sync. Concurrent flushes share one sync (group commit). If a sync
//! fails, nothing more is acknowledged as durable: the kernel may have dropped the
//! pages, so the only safe state is the one the next open recovers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};

use crate::error::{Error, ErrorKind, Result};
use crate::image::storage::Storage;

use super::files::Files;
use super::record::{HEADER_LEN, Kind, Record, SegmentHeader};

/// The file name of segment `n`.
pub fn segment_name(n: u32) -> String {
    format!("seg-{n:08x}")
}

/// The number of a segment's file name.
pub fn segment_number(name: &str) -> Option<u32> {
    let hex = name.strip_prefix("seg-")?;
    (hex.len() == 8).then(|| u32::from_str_radix(hex, 16).ok())?
}

/// Where a record was put.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Its `seq`.
    pub seq: u64,
    /// Its segment.
    pub segment: u32,
    /// The offset of its header in the segment.
    pub offset: u64,
}

impl Slot {
    /// The offset of its payload.
    pub fn payload(&self) -> u64 {
        self.offset + HEADER_LEN as u64
    }
}

#[derive(Debug)]
struct State {
    /// The segment being appended to, and the offset of its tail.
    active: Option<Active>,
    last_number: u32,
    next_seq: u64,
    /// Reserved and not yet applied.
    in_flight: BTreeSet<u64>,
    /// Segments written since the last sync.
    dirty: BTreeSet<u32>,
    /// Segments created since the last sync of the names.
    names_dirty: bool,
    durable: u64,
    syncing: bool,
    failed: Option<String>,
    /// Threads waiting on `changed`: the others need no wake-up call.
    waiters: usize,
}

/// The segment being appended to.
#[derive(Debug)]
struct Active {
    number: u32,
    storage: Arc<dyn Storage>,
    /// Where the next record goes.
    tail: u64,
    /// How far space is reserved (or `u64::MAX` where the file system cannot reserve).
    reserved: u64,
}

/// Space is reserved in a segment this much at a time, ahead of the tail.
const RESERVE_CHUNK: u64 = 4 << 20;

impl State {
    fn written(&self) -> u64 {
        self.in_flight.first().map_or(self.next_seq - 1, |s| s - 1)
    }
}

/// The log of a volume. See the [module documentation](self).
#[derive(Debug)]
pub struct Log {
    files: Arc<dyn Files>,
    volume: [u8; 16],
    segment_bytes: u64,
    state: Mutex<State>,
    changed: Condvar,
    segments: RwLock<BTreeMap<u32, Arc<dyn Storage>>>,
}

/// Where a log continues after recovery.
#[derive(Debug, Clone, Copy)]
pub struct Tail {
    /// The highest segment number in use.
    pub last_number: u32,
    /// The `seq` of the next record.
    pub next_seq: u64,
}

impl Log {
    /// A log continuing at `tail` with the segments already present (each opened), new
    /// records going to a new segment.
    pub fn new(
        files: Arc<dyn Files>,
        volume: [u8; 16],
        segment_bytes: u64,
        tail: Tail,
        segments: BTreeMap<u32, Arc<dyn Storage>>,
    ) -> Log {
        Log {
            files,
            volume,
            segment_bytes,
            state: Mutex::new(State {
                active: None,
                last_number: tail.last_number,
                next_seq: tail.next_seq,
                in_flight: BTreeSet::new(),
                dirty: BTreeSet::new(),
                names_dirty: false,
                durable: tail.next_seq - 1,
                syncing: false,
                failed: None,
                waiters: 0,
            }),
            changed: Condvar::new(),
            segments: RwLock::new(segments),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refuse_if_failed(st: &State) -> Result<()> {
        match &st.failed {
            Some(why) => Err(Error::msg(
                ErrorKind::Io,
                format!("the volume's log failed earlier ({why}); reopen the volume to recover"),
            )),
            None => Ok(()),
        }
    }

    /// Seals the active segment: the space reserved past its last record goes back to
    /// the file system. Its bytes stay as they are.
    fn seal(st: &mut State) {
        if let Some(a) = st.active.take() {
            if let Err(e) = a.storage.set_len(a.tail) {
                tracing::warn!("sealing segment {}: {e}", segment_name(a.number));
            }
        }
    }

    /// Seals the active segment (at close): the next record starts a new one.
    pub fn seal_active(&self) {
        Self::seal(&mut self.lock());
    }

    /// Reserves space in `storage` up to at least `end`, a chunk at a time. A file
    /// system that cannot reserve space is written without.
    fn reserve(storage: &dyn Storage, from: u64, end: u64, limit: u64) -> std::io::Result<u64> {
        let to = end.max(from + RESERVE_CHUNK).min(limit.max(end));
        match storage.allocate(from, to - from) {
            Ok(()) => Ok(to),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(u64::MAX),
            Err(e) => Err(e),
        }
    }

    /// Starts segment `last_number + 1` at `next_seq`, with space reserved for a record
    /// of `len` bytes.
    fn start_segment(&self, st: &mut State, len: u64, now_us: u64) -> Result<()> {
        let number = st.last_number + 1;
        let name = segment_name(number);
        let storage = self.files.create(&name)?;
        let header = SegmentHeader {
            number,
            volume: self.volume,
            first_seq: st.next_seq,
            created_us: now_us,
        };
        let first = HEADER_LEN as u64;
        let started = Self::reserve(storage.as_ref(), 0, first + len, self.segment_bytes)
            .and_then(|r| storage.write_at(&[&header.encode()], 0).map(|()| r));
        let reserved = match started {
            Ok(r) => r,
            Err(e) => {
                let _ = self.files.remove(&name);
                return Err(Error::from(e)
                    .with_op("start segment")
                    .with_message(format!("segment {name}")));
            }
        };
        Self::seal(st);
        st.last_number = number;
        st.names_dirty = true;
        st.dirty.insert(number);
        self.segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(number, Arc::clone(&storage));
        st.active = Some(Active {
            number,
            storage,
            tail: first,
            reserved,
        });
        Ok(())
    }

    /// Appends the record `make` builds for the `seq` it is given, with its payload.
    /// The record counts as in flight until [`Log::applied`] is called with its `seq`;
    /// on error nothing is in flight and the log is unchanged or failed.
    pub fn append(
        &self,
        make: impl FnOnce(u64) -> Record,
        payload: &[&[u8]],
        now_us: u64,
    ) -> Result<Slot> {
        let (record, slot, storage) = {
            let mut st = self.lock();
            Self::refuse_if_failed(&st)?;
            // The record is made only once its place is sure: `make` may note its seq
            // (a point, a change), which must not happen for an append that fails.
            let len = HEADER_LEN as u64 + payload.iter().map(|p| p.len() as u64).sum::<u64>();
            let full = st
                .active
                .as_ref()
                .is_none_or(|a| a.tail > HEADER_LEN as u64 && a.tail + len > self.segment_bytes);
            if full {
                self.start_segment(&mut st, len, now_us)?;
            }
            let seq = st.next_seq;
            let a = st.active.as_mut().expect("a segment was started");
            if a.tail + len > a.reserved {
                a.reserved = Self::reserve(
                    a.storage.as_ref(),
                    a.reserved,
                    a.tail + len,
                    self.segment_bytes,
                )
                .map_err(|e| Error::from(e).with_op("append"))?;
            }
            let slot = Slot {
                seq,
                segment: a.number,
                offset: a.tail,
            };
            let record = make(seq);
            debug_assert_eq!(record.total_len(), len, "the payload is the record's");
            a.tail += len;
            let storage = Arc::clone(&a.storage);
            st.next_seq += 1;
            st.in_flight.insert(slot.seq);
            st.dirty.insert(slot.segment);
            (record, slot, storage)
        };
        debug_assert_eq!(record.seq, slot.seq);
        let header = record.encode(payload);
        let mut pieces = Vec::with_capacity(payload.len() + 1);
        pieces.push(&header[..]);
        pieces.extend_from_slice(payload);
        if let Err(e) = storage.write_at(&pieces, slot.offset) {
            // Keep the log readable past this place: a void record of the same length.
            let void = Record {
                aux: record.payload_len(),
                ..Record::new(Kind::Void, slot.seq, record.time_us)
            };
            if let Err(e2) = storage.write_at(&[&void.encode(&[])], slot.offset) {
                let mut st = self.lock();
                st.failed = Some(format!("writing segment {}: {e2}", slot.segment));
            }
            self.applied(slot.seq);
            return Err(Error::from(e).with_op("append"));
        }
        Ok(slot)
    }

    /// Marks record `seq` as applied: the written watermark may pass it.
    pub fn applied(&self, seq: u64) {
        let mut st = self.lock();
        st.in_flight.remove(&seq);
        let waiting = st.waiters > 0;
        drop(st);
        if waiting {
            self.changed.notify_all();
        }
    }

    /// Waits on `changed`, counted so that [`Log::applied`] knows someone listens.
    fn wait<'a>(&self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        st.waiters += 1;
        let mut st = self
            .changed
            .wait(st)
            .unwrap_or_else(PoisonError::into_inner);
        st.waiters -= 1;
        st
    }

    /// Every record at or before this `seq` is written and applied.
    pub fn written(&self) -> u64 {
        self.lock().written()
    }

    /// Every record at or before this `seq` is durable.
    pub fn durable(&self) -> u64 {
        self.lock().durable
    }

    /// The `seq` the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Waits until every record at or before `seq` is written and applied.
    pub fn wait_written(&self, seq: u64) {
        let mut st = self.lock();
        while st.written() < seq {
            st = self.wait(st);
        }
    }

    /// Makes every record at or before `seq` durable (waiting for them to be written).
    pub fn sync(&self, seq: u64) -> Result<()> {
        let mut st = self.lock();
        loop {
            Self::refuse_if_failed(&st)?;
            if st.durable >= seq {
                return Ok(());
            }
            if st.written() < seq || st.syncing {
                st = self.wait(st);
                continue;
            }
            let target = st.written();
            let dirty = std::mem::take(&mut st.dirty);
            let names = std::mem::take(&mut st.names_dirty);
            st.syncing = true;
            drop(st);
            let result = self.sync_segments(&dirty, names);
            st = self.lock();
            st.syncing = false;
            match result {
                Ok(()) => st.durable = st.durable.max(target),
                Err(e) => {
                    st.failed = Some(format!("sync: {e}"));
                    drop(st);
                    self.changed.notify_all();
                    return Err(e);
                }
            }
            self.changed.notify_all();
        }
    }

    fn sync_segments(&self, dirty: &BTreeSet<u32>, names: bool) -> Result<()> {
        for n in dirty {
            if let Some(s) = self.storage(*n) {
                s.sync()
                    .map_err(|e| Error::from(e).with_op("sync segment"))?;
            }
        }
        if names {
            self.files.sync_names()?;
        }
        Ok(())
    }

    /// The segment's storage, if it exists.
    pub fn storage(&self, segment: u32) -> Option<Arc<dyn Storage>> {
        let map = self.segments.read().unwrap_or_else(PoisonError::into_inner);
        map.get(&segment).cloned()
    }

    /// Reads `buf` from segment `segment` at `offset`.
    pub fn read(&self, segment: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let storage = self.storage(segment).ok_or_else(|| {
            Error::msg(
                ErrorKind::Corrupt,
                format!("segment {} is missing", segment_name(segment)),
            )
        })?;
        storage
            .read_at(buf, offset)
            .map_err(|e| Error::from(e).with_op("read segment"))
    }

    /// Where the next record goes: the active segment and its tail, or `None` when the
    /// next record starts a segment.
    pub fn position(&self) -> (Option<(u32, u64)>, Tail) {
        let st = self.lock();
        let active = st.active.as_ref().map(|a| (a.number, a.tail));
        (
            active,
            Tail {
                last_number: st.last_number,
                next_seq: st.next_seq,
            },
        )
    }

    /// The segments present, by number.
    pub fn segments(&self) -> Vec<u32> {
        let map = self.segments.read().unwrap_or_else(PoisonError::into_inner);
        map.keys().copied().collect()
    }

    /// The segment being appended to.
    pub fn active(&self) -> Option<u32> {
        self.lock().active.as_ref().map(|a| a.number)
    }

    /// Removes a sealed segment nothing reads any more.
    pub fn remove(&self, segment: u32) -> Result<()> {
        debug_assert_ne!(self.active(), Some(segment));
        self.segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&segment);
        self.files.remove(&segment_name(segment))
    }

    /// Whether a sync failed, so that nothing more is acknowledged.
    pub fn failed(&self) -> bool {
        self.lock().failed.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::files::SimFiles;

    fn log(files: &Arc<SimFiles>, segment_bytes: u64) -> Log {
        let files: Arc<dyn Files> = Arc::clone(files) as Arc<dyn Files>;
        let tail = Tail {
            last_number: 0,
            next_seq: 1,
        };
        Log::new(files, [1; 16], segment_bytes, tail, BTreeMap::new())
    }

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_number(&segment_name(0x1f)), Some(0x1f));
        assert_eq!(segment_number("seg-1"), None);
        assert_eq!(segment_number("manifest"), None);
    }

    #[test]
    fn records_fill_segments_in_order() {
        let files = Arc::new(SimFiles::new());
        let log = log(&files, 4 * 4096);
        let block = vec![7u8; 4096];
        let mut slots = Vec::new();
        for _ in 0..5 {
            let slot = log
                .append(
                    |seq| Record {
                        block: 0,
                        count: 1,
                        ..Record::new(Kind::Write, seq, 0)
                    },
                    &[&block],
                    0,
                )
                .unwrap();
            log.applied(slot.seq);
            slots.push(slot);
        }
        assert_eq!(
            slots.iter().map(|s| s.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        // 64 + 3 × 4160 fits in 16 KiB, a fourth record does not.
        assert_eq!(
            slots.iter().map(|s| s.segment).collect::<Vec<_>>(),
            [1, 1, 1, 2, 2]
        );
        let mut back = vec![0u8; 4096];
        log.read(slots[4].segment, slots[4].payload(), &mut back)
            .unwrap();
        assert_eq!(back, block);
        assert_eq!(files.list().unwrap(), ["seg-00000001", "seg-00000002"]);
    }

    #[test]
    fn the_watermark_waits_for_records_in_flight() {
        let files = Arc::new(SimFiles::new());
        let log = log(&files, 1 << 20);
        let a = log
            .append(|s| Record::new(Kind::Flush, s, 0), &[], 0)
            .unwrap();
        let b = log
            .append(|s| Record::new(Kind::Flush, s, 0), &[], 0)
            .unwrap();
        log.applied(b.seq);
        assert_eq!(log.written(), 0, "record 1 is still in flight");
        log.applied(a.seq);
        assert_eq!(log.written(), 2);
        log.sync(2).unwrap();
    }

    #[test]
    fn a_full_disk_fails_the_append_that_needs_a_segment_and_nothing_else() {
        let files = Arc::new(SimFiles::new());
        files.set_capacity(Some(1024));
        let log = log(&files, 1 << 20);
        let e = log
            .append(|s| Record::new(Kind::Flush, s, 0), &[], 0)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(log.next_seq(), 1, "no seq was handed out");
        assert!(
            files.list().unwrap().is_empty(),
            "the half-made segment is gone"
        );
        files.set_capacity(None);
        let slot = log
            .append(|s| Record::new(Kind::Flush, s, 0), &[], 0)
            .unwrap();
        assert_eq!(slot.seq, 1);
    }
}
