//! The write path: writes in place where the top layer holds the clusters, copy-on-write
//! into newly allocated clusters elsewhere, zeroing and trimming by remapping whole
//! clusters, and copying a lower layer's clusters up (when a snapshot is deleted).

use std::sync::Arc;

use super::read::{Src, read_into_new};
use super::{AUTO_COMMIT_FREED, AUTO_COMMIT_PAGES, Chain, lock_err};
use crate::error::Result;
use crate::image::format::ENTRIES;
use crate::image::map::entry;

/// How `zero` treats whole clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Deallocate: unallocated without a backing, zero clusters with one (which hide it).
    Trim,
    /// Zero clusters: read as zeroes, no data stored.
    Zero,
    /// Write zeroes as data: the storage stays allocated.
    ZeroNoHole,
}

impl Chain {
    /// Writes `data` at `offset`; with `fua`, commits before returning.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable("write")?;
        let commit_due = {
            let _io = self.gate.read().map_err(|_| lock_err())?;
            if self.write_in_place(offset, data)? {
                false
            } else {
                let _a = self.alloc.lock().map_err(|_| lock_err())?;
                self.write_allocating(offset, data)?
            }
        };
        if fua || commit_due {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes clusters the top layer already holds, in place. Returns false, having
    /// written nothing, when any cluster of the range needs allocating.
    fn write_in_place(&self, offset: u64, data: &[u8]) -> Result<bool> {
        let runs = {
            let st = self.state.read().map_err(|_| lock_err())?;
            let pieces = self.plan(&st.map, offset, data.len() as u64);
            if pieces
                .iter()
                .any(|p| !matches!(p.src, Src::Host(l, _) if l == self.top))
            {
                return Ok(false);
            }
            pieces
        };
        let mut at = 0usize;
        for p in runs {
            let Src::Host(_, host) = p.src else {
                unreachable!("checked above")
            };
            let n = p.len as usize;
            self.storage()
                .write_at(&[&data[at..at + n]], host)
                .map_err(self.io_err("write", offset + at as u64, n as u64))?;
            at += n;
        }
        Ok(true)
    }

    /// Takes `count` cluster-sized ranges of the top file for new clusters.
    fn reserve(&self, count: usize) -> Result<Vec<u64>> {
        let cs = self.cluster_size();
        let mut st = self.state.write().map_err(|_| lock_err())?;
        self.pins
            .lock()
            .map_err(|_| lock_err())?
            .release_unpinned(&mut st.free);
        Ok((0..count)
            .map(|_| {
                st.free.take(cs).unwrap_or_else(|| {
                    let host = st.eof;
                    st.eof += cs;
                    host
                })
            })
            .collect())
    }

    fn release(&self, hosts: &[u64]) {
        let cs = self.cluster_size();
        if let Ok(mut st) = self.state.write() {
            for &h in hosts {
                st.free.give(h, cs);
            }
        }
    }

    /// Writes a range where some clusters need allocating. Caller holds `alloc` and the
    /// gate. Returns true when enough metadata is dirty that a commit is due.
    fn write_allocating(&self, offset: u64, data: &[u8]) -> Result<bool> {
        let bits = self.header.cluster_bits;
        let cs = self.cluster_size();
        let size = self.size();
        // (cluster, offset within it, length, host if the top already has it)
        let mut steps: Vec<(u64, u64, u64, Option<u64>)> = Vec::new();
        {
            let st = self.state.read().map_err(|_| lock_err())?;
            let (mut pos, end) = (offset, offset + data.len() as u64);
            while pos < end {
                let c = pos >> bits;
                let within = pos & (cs - 1);
                let n = (cs - within).min(end - pos);
                let e = st.map.get(c);
                let own = entry::host(e).filter(|_| entry::layer(e) == self.top);
                steps.push((c, within, n, own));
                pos += n;
            }
        }
        let needed = steps.iter().filter(|s| s.3.is_none()).count();
        let hosts = self.reserve(needed)?;
        let result = self.write_steps(offset, data, &steps, &hosts, size);
        if let Err(e) = result {
            self.release(&hosts);
            return Err(e);
        }
        let mut st = self.state.write().map_err(|_| lock_err())?;
        let mut next = hosts.iter();
        for &(c, _, _, own) in &steps {
            if own.is_none() {
                let host = *next.next().expect("one host per allocation");
                st.map.set(c, entry::data(self.top, host));
                st.dirty.insert((c / ENTRIES as u64) as u32);
            }
        }
        Ok(st.dirty.len() >= AUTO_COMMIT_PAGES || st.pending_free.len() >= AUTO_COMMIT_FREED)
    }

    /// Performs the data writes of `write_allocating`: in-place pieces as they are, new
    /// clusters filled out with their previous contents, contiguous host ranges written
    /// with one call.
    fn write_steps(
        &self,
        offset: u64,
        data: &[u8],
        steps: &[(u64, u64, u64, Option<u64>)],
        hosts: &[u64],
        size: u64,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        // Partial new clusters need a buffer holding the old contents merged with the new.
        let mut merged: Vec<Vec<u8>> = Vec::new();
        let mut next = hosts.iter();
        let mut plan: Vec<(u64, usize, usize, bool)> = Vec::new(); // host, data/merged index, len, is_merged
        let mut at = 0usize;
        for &(c, within, n, own) in steps {
            let start = c << bits;
            let clen = cs.min(size - start);
            match own {
                Some(host) => plan.push((host + within, at, n as usize, false)),
                None => {
                    let host = *next.next().expect("one host per allocation");
                    if within == 0 && n == clen {
                        plan.push((host, at, n as usize, false));
                    } else {
                        let mut buf = vec![0u8; clen as usize];
                        self.read_locked(start, &mut buf)?;
                        buf[within as usize..(within + n) as usize]
                            .copy_from_slice(&data[at..at + n as usize]);
                        merged.push(buf);
                        plan.push((host, merged.len() - 1, clen as usize, true));
                    }
                }
            }
            at += n as usize;
        }
        let slice = |&(_, idx, len, is_merged): &(u64, usize, usize, bool)| -> &[u8] {
            if is_merged {
                &merged[idx][..len]
            } else {
                &data[idx..idx + len]
            }
        };
        let mut i = 0;
        while i < plan.len() {
            let host = plan[i].0;
            let mut bufs = vec![slice(&plan[i])];
            let mut end = host + plan[i].2 as u64;
            let mut j = i + 1;
            while j < plan.len() && plan[j].0 == end && bufs.len() < 512 {
                bufs.push(slice(&plan[j]));
                end += plan[j].2 as u64;
                j += 1;
            }
            self.storage().write_at(&bufs, host).map_err(self.io_err(
                "write",
                offset,
                data.len() as u64,
            ))?;
            i = j;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeroes. Whole clusters are unmapped or
    /// marked zero as `mode` says; partial clusters at the ends get zeroes written.
    pub fn zero(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        self.check_writable(if mode == ZeroMode::Trim {
            "trim"
        } else {
            "write_zeroes"
        })?;
        let commit_due = {
            let _io = self.gate.read().map_err(|_| lock_err())?;
            let _a = self.alloc.lock().map_err(|_| lock_err())?;
            self.zero_locked(offset, len, mode)?
        };
        if fua || commit_due {
            self.flush()?;
        }
        Ok(())
    }

    fn zero_locked(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<bool> {
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let end = offset + len;
        let size = self.size();
        // Whole clusters: [first, last). The disk's last cluster counts as whole when the
        // range reaches the end of the disk.
        let first = offset.div_ceil(cs);
        let last = if end == size {
            size.div_ceil(cs)
        } else {
            end / cs
        };
        let keep = mode == ZeroMode::ZeroNoHole;
        if keep || first >= last {
            self.write_zero_data(offset, len, keep)?;
            return self.commit_due();
        }
        if offset < first << bits {
            self.write_zero_data(offset, (first << bits) - offset, false)?;
        }
        let tail = last << bits;
        if tail < end {
            self.write_zero_data(tail, end - tail, false)?;
        }
        let new = if mode == ZeroMode::Trim && self.standalone {
            entry::UNALLOCATED
        } else {
            entry::zero(self.top)
        };
        let freed = self.remap(first, last, new)?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for host in freed {
            match ranges.last_mut() {
                Some((s, l)) if *s + *l == host => *l += cs,
                _ => ranges.push((host, cs)),
            }
        }
        for &(host, l) in &ranges {
            // Punching only returns space early; the clusters are reused either way.
            let _ = self.storage().punch_hole(host, l);
        }
        let mut st = self.state.write().map_err(|_| lock_err())?;
        st.pending_free.extend(ranges);
        Ok(st.dirty.len() >= AUTO_COMMIT_PAGES || st.pending_free.len() >= AUTO_COMMIT_FREED)
    }

    fn commit_due(&self) -> Result<bool> {
        let st = self.state.read().map_err(|_| lock_err())?;
        Ok(st.dirty.len() >= AUTO_COMMIT_PAGES || st.pending_free.len() >= AUTO_COMMIT_FREED)
    }

    /// Sets clusters `[first, last)` to `new`, page by page, and returns the host offsets
    /// of top-layer data they held.
    fn remap(&self, first: u64, last: u64, new: u64) -> Result<Vec<u64>> {
        let mut freed = Vec::new();
        let mut st = self.state.write().map_err(|_| lock_err())?;
        let e = ENTRIES as u64;
        let mut c = first;
        while c < last {
            let p = (c / e) as usize;
            let page_end = (c / e + 1) * e;
            let stop = page_end.min(last);
            let owned = |v: u64| entry::host(v).filter(|_| entry::layer(v) == self.top);
            if c % e == 0 && stop == page_end {
                let replacement = (new != entry::UNALLOCATED).then(|| Arc::clone(&self.zero_page));
                let unchanged = match (st.map.page(p), &replacement) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                };
                if !unchanged {
                    if let Some(old) = st.map.replace_page(p, replacement) {
                        freed.extend(old.iter().filter_map(|&v| owned(v)));
                    }
                    st.dirty.insert(p as u32);
                }
            } else if new != entry::UNALLOCATED || st.map.page(p).is_some() {
                for cluster in c..stop {
                    let old = st.map.set(cluster, new);
                    if old != new {
                        freed.extend(owned(old));
                        st.dirty.insert(p as u32);
                    }
                }
            }
            c = stop;
        }
        Ok(freed)
    }

    /// Writes zeroes as data over `[offset, offset + len)`. Unless `allocate`, pieces
    /// that already read as zeroes are left alone, so zeroing never allocates needlessly.
    fn write_zero_data(&self, offset: u64, len: u64, allocate: bool) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let pieces = {
            let st = self.state.read().map_err(|_| lock_err())?;
            self.plan(&st.map, offset, len)
        };
        let mut pos = offset;
        for piece in pieces {
            let piece_end = pos + piece.len;
            if allocate || piece.src != Src::Zero {
                while pos < piece_end {
                    let n = (piece_end - pos).min(CHUNK);
                    let chunk = &zeroes[..n as usize];
                    if !self.write_in_place(pos, chunk)? {
                        self.write_allocating(pos, chunk)?;
                    }
                    pos += n;
                }
            }
            pos = piece_end;
        }
        Ok(())
    }

    /// Copies into the top layer every cluster that layer `owner` provides (data, and
    /// zero clusters that hide what is below), so that the chain reads the same without
    /// that layer. Clients may read and write meanwhile: a cluster they write first
    /// keeps their data. Returns the bytes of data copied.
    pub fn absorb(&self, owner: u16) -> Result<u64> {
        self.check_writable("merge")?;
        debug_assert!(owner < self.top);
        /// Clusters examined, and copied, per hold of the allocation lock.
        const SCAN: u64 = 4096;
        const COPY: usize = 32;
        let bits = self.header.cluster_bits;
        let cs = self.cluster_size();
        let (size, clusters) = (self.size(), self.header.clusters());
        let owned = |e: u64| e != entry::UNALLOCATED && entry::layer(e) == owner;
        let mut copied = 0u64;
        let mut c = 0u64;
        while c < clusters {
            let mut batch = Vec::new();
            {
                let st = self.state.read().map_err(|_| lock_err())?;
                let stop = (c + SCAN).min(clusters);
                while c < stop && batch.len() < COPY {
                    let p = c as usize / ENTRIES;
                    if st.map.page(p).is_none() {
                        c = ((p as u64 + 1) * ENTRIES as u64).min(clusters);
                        continue;
                    }
                    if owned(st.map.get(c)) {
                        batch.push(c);
                    }
                    c += 1;
                }
            }
            if batch.is_empty() {
                continue;
            }
            let commit_due = {
                let _io = self.gate.read().map_err(|_| lock_err())?;
                let _a = self.alloc.lock().map_err(|_| lock_err())?;
                let mut due = false;
                for cluster in batch {
                    // Looked at again under the lock: a client may have written it.
                    let e = self.state.read().map_err(|_| lock_err())?.map.get(cluster);
                    if !owned(e) {
                        continue;
                    }
                    if entry::host(e).is_none() {
                        self.remap(cluster, cluster + 1, entry::zero(self.top))?;
                        due |= self.commit_due()?;
                        continue;
                    }
                    let start = cluster << bits;
                    let len = cs.min(size - start) as usize;
                    let buf = read_into_new(len, |buf| {
                        let pieces = {
                            let st = self.state.read().map_err(|_| lock_err())?;
                            self.plan(&st.map, start, len as u64)
                        };
                        self.read_pieces(&pieces, start, buf)
                    })?;
                    due |= self.write_allocating(start, &buf)?;
                    copied += len as u64;
                }
                due
            };
            if commit_due {
                self.flush()?;
            }
        }
        Ok(copied)
    }
}
