//! Commits: the map changes made since the last flush reach the file in the order that
//! keeps every crash point consistent (the chain module's notes on crash safety say why).

use std::path::Path;
use std::sync::Arc;

use super::{Chain, PAIR, State, lock_err};
use crate::error::{Error, ErrorKind, Result};
use crate::image::format::{self, ENTRIES, Entry, Header, L1Entry, PAGE, PageKind, encode_page};
use crate::image::layer::PageState;
use crate::image::map::{MergedMap, entry};
use crate::image::storage::Storage;

/// Durable-making work a chain must finish before its first flush (see
/// [`Chain::settle_first`]).
pub type Settle = Box<dyn Fn() -> Result<()> + Send + Sync>;

impl Chain {
    /// Makes `work` a condition of this chain's next flush: it runs (until it succeeds)
    /// before any commit of this chain is acknowledged.
    pub fn settle_first(&self, work: Settle) {
        if let Ok(mut s) = self.settle.lock() {
            *s = Some(work);
        }
    }

    /// Runs the work [`Chain::settle_first`] left, if it has not run yet.
    pub fn settle(&self) -> Result<()> {
        let mut pending = self.settle.lock().map_err(|_| lock_err())?;
        if let Some(work) = pending.as_ref() {
            work()?;
            *pending = None;
        }
        Ok(())
    }

    /// Makes every completed write durable: commits the map changes made since the last
    /// commit, in the order that keeps every crash point consistent.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.settle()?;
        let _c = self.commit.lock().map_err(|_| lock_err())?;
        let plan = {
            let mut st = self.state.write().map_err(|_| lock_err())?;
            self.prepare_commit(&mut st)
        };
        let mut l1_touched = false;
        if let Err(e) = self.write_commit(&plan, &mut l1_touched) {
            let mut st = self.state.write().map_err(|_| lock_err())?;
            if !l1_touched {
                // No L1 page can point at the new pairs yet: give their space back, so a
                // full disk can recover once the changes that needed them are undone.
                for &(q, off) in &plan.new_pairs {
                    st.pairs.remove(&q);
                    st.free.give(off, PAIR);
                }
            }
            // Otherwise an L1 page pointing at them may be on disk: they stay reserved
            // (and fresh, so the next commit initialises them again).
            st.dirty.extend(plan.dirty.iter().copied());
            st.l1_dirty.extend(plan.l1.iter().map(|w| w.index as usize));
            st.pending_free.extend(plan.freed.iter().copied());
            return Err(e);
        }
        {
            let mut st = self.state.write().map_err(|_| lock_err())?;
            for w in &plan.l2 {
                if let Some(pair) = st.pairs.get_mut(&(w.index as u32)) {
                    pair.sequence = w.sequence;
                    pair.newest = w.slot;
                }
            }
            for w in &plan.l1 {
                let page = &mut st.l1[w.index as usize];
                page.sequence = w.sequence;
                page.newest = w.slot;
            }
        }
        if !plan.freed.is_empty() {
            // Wait for requests that may have looked up a freed cluster before it was
            // unmapped; after this nobody can still be using it.
            let _quiet = self.gate.write().map_err(|_| lock_err())?;
            let mut st = self.state.write().map_err(|_| lock_err())?;
            // Zero-copy replies may still point at them, though: those hold a pin on the
            // current generation, and the space is reused only once they are all gone.
            let mut pins = self.pins.lock().map_err(|_| lock_err())?;
            let old = std::mem::take(&mut pins.current);
            pins.retired.push((old, plan.freed.clone()));
            pins.release_unpinned(&mut st.free);
        }
        Ok(())
    }

    /// The top layer's own entries of page `p`, as stored on disk.
    fn top_entries(&self, map: &MergedMap, p: usize) -> [u64; ENTRIES] {
        let mut out = [0u64; ENTRIES];
        if let Some(page) = map.page(p) {
            for (o, &e) in out.iter_mut().zip(page.iter()) {
                if e != entry::UNALLOCATED && entry::layer(e) == self.top {
                    *o = match entry::host(e) {
                        Some(h) => Entry::Data(h),
                        None => Entry::Zero,
                    }
                    .encode();
                }
            }
        }
        out
    }

    fn prepare_commit(&self, st: &mut State) -> CommitPlan {
        let mut plan = CommitPlan {
            dirty: std::mem::take(&mut st.dirty).into_iter().collect(),
            freed: std::mem::take(&mut st.pending_free),
            ..CommitPlan::default()
        };
        let zero = Entry::Zero.encode();
        let mut l1_dirty = std::mem::take(&mut st.l1_dirty);
        for &q in &plan.dirty {
            let entries = self.top_entries(&st.map, q as usize);
            let pair = match st.pairs.get(&q) {
                Some(pair) => *pair,
                None => {
                    l1_dirty.insert(q as usize / ENTRIES);
                    if entries.iter().all(|&e| e == 0) || entries.iter().all(|&e| e == zero) {
                        continue;
                    }
                    let off = st.free.take(PAIR).unwrap_or_else(|| {
                        let off = st.eof;
                        st.eof += PAIR;
                        off
                    });
                    plan.new_pairs.push((q, off));
                    let fresh = PageState::fresh(off);
                    st.pairs.insert(q, fresh);
                    fresh
                }
            };
            let (offset, sequence, slot) = pair.next();
            plan.l2.push(PageWrite {
                fresh: pair.sequence == 0,
                index: u64::from(q),
                offset,
                sequence,
                slot,
                bytes: encode_page(PageKind::L2, u64::from(q), sequence, &entries),
            });
        }
        let l2_pages = self.header.l2_pages();
        for i in l1_dirty {
            let mut entries = [0u64; ENTRIES];
            for (j, slot) in entries.iter_mut().enumerate() {
                let q = (i * ENTRIES + j) as u64;
                if q >= l2_pages {
                    break;
                }
                *slot = match st.pairs.get(&(q as u32)) {
                    Some(pair) => L1Entry::Pair(pair.offset),
                    None => {
                        let all_zero = match st.map.page(q as usize) {
                            Some(page) if Arc::ptr_eq(page, &self.zero_page) => true,
                            Some(_) => self
                                .top_entries(&st.map, q as usize)
                                .iter()
                                .all(|&e| e == zero),
                            None => false,
                        };
                        if all_zero {
                            L1Entry::AllZero
                        } else {
                            L1Entry::Absent
                        }
                    }
                }
                .encode();
            }
            let (offset, sequence, slot) = st.l1[i].next();
            plan.l1.push(PageWrite {
                fresh: false,
                index: i as u64,
                offset,
                sequence,
                slot,
                bytes: encode_page(PageKind::L1, i as u64, sequence, &entries),
            });
        }
        plan
    }

    /// Writes a commit's pages in order; sets `l1_touched` once any L1 page write has
    /// been attempted.
    fn write_commit(&self, plan: &CommitPlan, l1_touched: &mut bool) -> Result<()> {
        let storage = self.storage();
        let err = |op| self.io_err(op, 0, 0);
        storage.sync().map_err(err("flush"))?;
        for (level, pages) in [&plan.l2, &plan.l1].into_iter().enumerate() {
            if pages.is_empty() {
                continue;
            }
            *l1_touched |= level == 1;
            for w in pages {
                if w.fresh {
                    // A new pair's second slot gets zeroes (an empty slot): stale bytes
                    // from whatever used the space before can never pass for a newer
                    // version, and the file holds the whole pair from the start, so later
                    // commits rewrite it in place and never need to grow the file (which
                    // a full disk would refuse).
                    storage
                        .write_at(&[&w.bytes[..], &[0u8; PAGE]], w.offset)
                        .map_err(err("commit"))?;
                } else {
                    storage
                        .write_at(&[&w.bytes[..]], w.offset)
                        .map_err(err("commit"))?;
                }
            }
            storage.sync().map_err(err("commit"))?;
        }
        Ok(())
    }

    /// Marks every map page and every L1 page for rewriting at the next commit, so that
    /// a repair stores exactly what was kept in memory.
    pub fn mark_all_dirty(&self) -> Result<()> {
        let mut st = self.state.write().map_err(|_| lock_err())?;
        let pages: Vec<u32> = (0..st.map.len())
            .filter(|&p| st.map.page(p).is_some())
            .map(|p| p as u32)
            .chain(st.pairs.keys().copied())
            .collect();
        st.dirty.extend(pages);
        let l1 = st.l1.len();
        st.l1_dirty.extend(0..l1);
        Ok(())
    }

    /// Writes a new header (a changed backing reference) to the older slot, durably.
    pub fn rewrite_header(&mut self, header: Header) -> Result<()> {
        self.check_writable("rewrite header")?;
        let storage = Arc::clone(self.storage());
        let path = self.path().to_path_buf();
        self.header = store_header(
            storage.as_ref(),
            &path,
            &self.header,
            self.header_slot,
            header,
        )?;
        self.header_slot = 1 - self.header_slot;
        Ok(())
    }

    /// Gives back free space at the end of the top image's file. Only whole trailing free
    /// ranges that are durable-free are cut.
    pub fn truncate_free_tail(&self) -> Result<u64> {
        self.flush()?;
        let _c = self.commit.lock().map_err(|_| lock_err())?;
        let _a = self.alloc.lock().map_err(|_| lock_err())?;
        let mut st = self.state.write().map_err(|_| lock_err())?;
        let eof = st.eof;
        let Some((start, _)) = st.free.take_tail(eof) else {
            return Ok(0);
        };
        let start = start.max(self.header.data_start());
        self.storage()
            .set_len(start)
            .map_err(self.io_err("truncate", start, eof - start))?;
        st.eof = start;
        Ok(eof - start)
    }
}

/// Writes `header` (with the sequence after `current`'s) into the slot other than
/// `current_slot`, durably, and returns it as written. The data and map it describes
/// must be durable already; the old version stays intact until the new one is.
pub(crate) fn store_header(
    storage: &dyn Storage,
    path: &Path,
    current: &Header,
    current_slot: usize,
    header: Header,
) -> Result<Header> {
    let mut header = header;
    header.sequence = current.sequence + 1;
    if let Some(b) = &header.backing {
        if b.path.len() > format::MAX_BACKING_PATH {
            return Err(
                Error::msg(ErrorKind::InvalidInput, "backing path is too long")
                    .with_op("rewrite header")
                    .with_path(path),
            );
        }
    }
    let slot = 1 - current_slot;
    let bytes = format::encode_header(&header);
    let err = |e: std::io::Error| {
        Error::from(e)
            .with_op("rewrite header")
            .with_range(0, PAGE as u64)
            .with_path(path)
    };
    storage.sync().map_err(err)?;
    storage
        .write_at(&[&bytes[..]], (slot * PAGE) as u64)
        .map_err(err)?;
    storage.sync().map_err(err)?;
    Ok(header)
}

#[derive(Default)]
struct CommitPlan {
    dirty: Vec<u32>,
    freed: Vec<(u64, u64)>,
    /// L2 pairs allocated by this commit: (page, offset).
    new_pairs: Vec<(u32, u64)>,
    l2: Vec<PageWrite>,
    l1: Vec<PageWrite>,
}

struct PageWrite {
    index: u64,
    /// A newly allocated L2 pair, written for the first time (slot 0).
    fresh: bool,
    offset: u64,
    sequence: u64,
    slot: usize,
    bytes: Box<[u8; PAGE]>,
}
