//! Budgets of bytes in flight: one per connection, drawing from an optional server-wide
//! one.
//!
//! Every request is charged against its connection's budget from the moment it is read
//! until its reply is written (see [`super::session`]). Without a server-wide budget a
//! connection owns its whole budget from the start, as before. With one
//! (`--max-in-flight-total`), a connection starts with nothing and *leases* bytes from
//! the server-wide pool as its requests need them, up to its own cap, and gives its lease
//! back whenever it has nothing in flight, so idle connections hold nothing and the sum of
//! all leases never exceeds the total: 10,000 clients cannot pin 10,000 × 64 MiB.
//!
//! The request path stays cheap: a charge is taken from the connection's own semaphore;
//! the shared pool is touched only when the lease must grow or is given back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Semaphore;

/// The smallest step by which a lease grows, so that a burst of small requests does
/// not go to the shared pool for each one.
const LEASE_STEP: u64 = 1024 * 1024;

/// A server-wide budget of bytes in flight, shared by every connection.
#[derive(Debug)]
pub struct GlobalBudget {
    pool: Semaphore,
    total: u64,
}

impl GlobalBudget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Arc<GlobalBudget> {
        let permits = usize::try_from(total)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Arc::new(GlobalBudget {
            pool: Semaphore::new(permits),
            total: permits as u64,
        })
    }

    /// The budget's size.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes leased to connections now.
    pub fn leased(&self) -> u64 {
        self.total
            .saturating_sub(self.pool.available_permits() as u64)
    }
}

/// One connection's budget. Its semaphore holds the bytes leased and not charged.
#[derive(Debug)]
pub struct ConnBudget {
    local: Arc<LocalPool>,
    /// The most this connection may lease.
    max: u64,
}

/// The permits of one connection, and what it leased from the shared pool; the lease
/// goes back when the last charge and the session are gone.
#[derive(Debug)]
struct LocalPool {
    sem: Semaphore,
    /// Bytes leased from `global` (all of `max` without one). Grown by the session's
    /// reader, shrunk by whoever gives the lease back, always with atomic adds.
    lease: AtomicU64,
    global: Option<Arc<GlobalBudget>>,
    /// Set while the reader waits for the client's next request: the last charge given
    /// back then gives the lease back too.
    waiting: AtomicBool,
}

impl LocalPool {
    /// Gives the whole lease back to the shared pool if nothing is charged.
    fn release_if_idle(&self) {
        let Some(global) = &self.global else {
            return;
        };
        let lease = self.lease.load(Ordering::Relaxed);
        let Ok(lease32) = u32::try_from(lease) else {
            return;
        };
        if lease32 == 0 {
            return;
        }
        // Succeeds only when every leased byte is free, i.e. nothing is charged.
        if let Ok(p) = self.sem.try_acquire_many(lease32) {
            p.forget();
            self.lease.fetch_sub(lease, Ordering::Relaxed);
            global.pool.add_permits(lease as usize);
        }
    }
}

impl Drop for LocalPool {
    fn drop(&mut self) {
        if let Some(global) = &self.global {
            global.pool.add_permits(*self.lease.get_mut() as usize);
        }
    }
}

/// Bytes charged to a connection's budget; given back when dropped.
#[derive(Debug)]
pub struct Charge {
    local: Arc<LocalPool>,
    bytes: u32,
}

impl Charge {
    /// Bytes charged.
    pub fn bytes(&self) -> u32 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.local.sem.add_permits(self.bytes as usize);
        if self.local.waiting.load(Ordering::Relaxed) {
            self.local.release_if_idle();
        }
    }
}

impl ConnBudget {
    /// A budget of at most `max` bytes, leased from `global` when there is one.
    pub fn new(max: u64, global: Option<Arc<GlobalBudget>>) -> ConnBudget {
        let max = match &global {
            Some(g) => max.min(g.total()),
            None => max,
        }
        .min(u64::from(u32::MAX));
        let owned = if global.is_some() { 0 } else { max };
        ConnBudget {
            local: Arc::new(LocalPool {
                sem: Semaphore::new(owned as usize),
                lease: AtomicU64::new(owned),
                global,
                waiting: AtomicBool::new(false),
            }),
            max,
        }
    }

    /// The most one charge can be.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// True while some charge is outstanding (a request running, or its reply waiting
    /// to be written).
    pub fn in_flight(&self) -> bool {
        self.charged() > 0
    }

    /// Bytes charged now.
    pub fn charged(&self) -> u64 {
        self.local
            .lease
            .load(Ordering::Relaxed)
            .saturating_sub(self.local.sem.available_permits() as u64)
    }

    /// Charges `bytes` (at most [`ConnBudget::max`]), waiting until charges in flight are
    /// given back or the shared pool has room. Cancel safe.
    pub async fn charge(&self, bytes: u32) -> Charge {
        let bytes = bytes.min(u32::try_from(self.max).unwrap_or(u32::MAX));
        loop {
            if let Ok(p) = self.local.sem.try_acquire_many(bytes) {
                p.forget();
                return self.charge_of(bytes);
            }
            let lease = self.local.lease.load(Ordering::Relaxed);
            let available = self.local.sem.available_permits() as u64;
            let need = u64::from(bytes).saturating_sub(available);
            let room = self.max.saturating_sub(lease);
            let grow = match &self.local.global {
                Some(global) if room >= need => {
                    Some((global.clone(), need.max(LEASE_STEP).min(room)))
                }
                _ => None,
            };
            let Some((global, step)) = grow else {
                // Only charges in flight can make room.
                let p = self.local.sem.acquire_many(bytes).await;
                p.expect("the semaphore is never closed").forget();
                return self.charge_of(bytes);
            };
            // Whichever comes first: our own charges given back, or a bigger lease.
            tokio::select! {
                p = self.local.sem.acquire_many(bytes) => {
                    p.expect("the semaphore is never closed").forget();
                    return self.charge_of(bytes);
                }
                p = global.pool.acquire_many(step as u32) => {
                    p.expect("the semaphore is never closed").forget();
                    self.local.lease.fetch_add(step, Ordering::Relaxed);
                    self.local.sem.add_permits(step as usize);
                }
            }
        }
    }

    fn charge_of(&self, bytes: u32) -> Charge {
        Charge {
            local: self.local.clone(),
            bytes,
        }
    }

    /// Says whether the reader is waiting for the client's next request. While it is,
    /// the lease goes back to the shared pool as soon as nothing is charged, so an idle
    /// connection holds nothing.
    pub fn set_waiting(&self, waiting: bool) {
        self.local.waiting.store(waiting, Ordering::Relaxed);
        if waiting {
            self.local.release_if_idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_shared_pool_a_connection_owns_its_budget() {
        let b = ConnBudget::new(1 << 20, None);
        let a = b.charge(1 << 19).await;
        let c = b.charge(1 << 19).await;
        assert!(b.in_flight());
        let blocked = tokio::time::timeout(std::time::Duration::from_millis(20), b.charge(1)).await;
        assert!(blocked.is_err(), "the budget is spent");
        drop((a, c));
        assert!(!b.in_flight());
        b.set_waiting(true);
        let _again = b.charge(1 << 20).await;
    }

    #[tokio::test]
    async fn leases_come_from_the_shared_pool_and_go_back_when_idle() {
        let global = GlobalBudget::new(4 << 20);
        let one = ConnBudget::new(64 << 20, Some(global.clone()));
        let two = ConnBudget::new(64 << 20, Some(global.clone()));
        assert_eq!(
            one.max(),
            4 << 20,
            "a connection cannot lease more than the total"
        );
        assert_eq!(global.leased(), 0, "idle connections hold nothing");
        let big = one.charge(3 << 20).await;
        assert!(global.leased() >= 3 << 20);
        let small = two.charge(64 << 10).await;
        // Neither can get more while the pool is spent.
        let blocked =
            tokio::time::timeout(std::time::Duration::from_millis(20), two.charge(2 << 20)).await;
        assert!(blocked.is_err(), "the shared pool is spent");
        drop(big);
        one.set_waiting(true);
        one.set_waiting(false);
        let more = two.charge(2 << 20).await;
        drop((small, more));
        two.set_waiting(true);
        two.set_waiting(false);
        assert_eq!(global.leased(), 0);
        // A charge given back while the reader waits gives the lease back at once.
        two.set_waiting(true);
        let held = two.charge(64 << 10).await;
        assert!(global.leased() > 0);
        drop(held);
        assert_eq!(global.leased(), 0, "the last charge gave the lease back");
        // A session that ends with a charge still out gives its lease back with it.
        let late = one.charge(1 << 20).await;
        drop(one);
        assert!(global.leased() > 0);
        drop(late);
        assert_eq!(global.leased(), 0);
    }
}
