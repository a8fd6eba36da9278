//! Exclusive locks on ranges of blocks, for writes that read before they write.
//!
//! A write of part of a block reads the rest of it and appends the whole block; a write
//! to the same block landing in between would be overwritten with stale bytes. Every
//! write therefore holds its blocks from its read to its entry in the index. Requests
//! that overlap are rare (clients do not usually send them concurrently), so a short
//! list scanned under a mutex is enough.

use std::sync::{Condvar, Mutex, PoisonError};

/// The locks. See the [module documentation](self).
#[derive(Debug, Default)]
pub struct RangeLocks {
    /// The ranges held, and how many threads wait for one to go.
    held: Mutex<(Vec<(u64, u64)>, usize)>,
    freed: Condvar,
}

/// A held range, released on drop.
#[derive(Debug)]
pub struct Held<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub fn lock(&self, start: u64, end: u64) -> Held<'_> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        while held.0.iter().any(|&(s, e)| s < end && start < e) {
            held.1 += 1;
            held = self
                .freed
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
            held.1 -= 1;
        }
        held.0.push((start, end));
        Held {
            locks: self,
            range: (start, end),
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = self
            .locks
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = held.0.iter().position(|r| *r == self.range) {
            held.0.swap_remove(i);
        }
        // Waking costs a system call: only when someone waits.
        let waiting = held.1 > 0;
        drop(held);
        if waiting {
            self.locks.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn overlapping_ranges_wait_and_others_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.lock(0, 4);
        let _b = locks.lock(4, 8); // adjacent: no overlap
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (locks, done) = (Arc::clone(&locks), Arc::clone(&done));
            std::thread::spawn(move || {
                let _c = locks.lock(3, 5);
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "overlaps a held range");
        drop(a);
        drop(_b);
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }
}
