//! A layer whose backend can be replaced between two requests.
//!
//! Requests hold the layer shared while they run; [`Switchable::pause`] waits for those
//! in progress to finish, holds new ones back, and lets the caller replace the backend
//! (a snapshot puts a new live image in place this way) before letting them through.
//! Every request therefore runs wholly on the old backend or wholly on the new one.

use std::future::Future;
use std::ops::Deref;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::{RwLock, RwLockWriteGuard};

use super::{Backend, Below, Filter};

/// See the [module documentation](self).
#[derive(Debug)]
pub struct Switchable<B> {
    slot: Slot<B>,
}

/// Where a [`Switchable`] keeps the backend in place.
#[derive(Debug)]
pub struct Slot<B> {
    /// Held shared by every request while it runs, exclusively by a pause.
    current: RwLock<B>,
    /// A copy of the backend in place, for what cannot wait for a pause to end: the
    /// synchronous methods and [`Switchable::current`]. Size, capabilities and block
    /// sizes never change (clients learnt them in the handshake, so a replacement must
    /// match them); the dirty bitmaps follow the backend in place.
    now: Mutex<B>,
}

fn lock<B>(now: &Mutex<B>) -> MutexGuard<'_, B> {
    now.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B: Backend> Below for Slot<B> {
    type Backend = B;

    fn hold(&self) -> impl Future<Output = impl Deref<Target = B> + Send + Sync + '_> + Send {
        self.current.read()
    }

    fn now(&self) -> impl Deref<Target = B> + '_ {
        lock(&self.now)
    }
}

/// Requests are held back while this lives; see [`Switchable::pause`].
#[derive(Debug)]
pub struct Paused<'a, B> {
    guard: RwLockWriteGuard<'a, B>,
    now: &'a Mutex<B>,
}

impl<B: Backend + Clone> Paused<'_, B> {
    /// The backend in place.
    pub fn current(&self) -> &B {
        &self.guard
    }

    /// Puts `backend` in place of the current one, which is returned.
    ///
    /// # Panics
    /// If `backend` differs in size, capabilities or block sizes: clients would see a
    /// different disk.
    pub fn replace(&mut self, backend: B) -> B {
        assert_eq!(
            backend.size(),
            self.guard.size(),
            "a replacement keeps the size"
        );
        assert_eq!(
            backend.capabilities(),
            self.guard.capabilities(),
            "a replacement keeps the capabilities"
        );
        assert_eq!(
            backend.block_size(),
            self.guard.block_size(),
            "a replacement keeps the block sizes"
        );
        *lock(self.now) = backend.clone();
        std::mem::replace(&mut *self.guard, backend)
    }
}

impl<B: Backend + Clone> Switchable<B> {
    /// Serves `backend` until it is replaced.
    pub fn new(backend: B) -> Self {
        Switchable {
            slot: Slot {
                now: Mutex::new(backend.clone()),
                current: RwLock::new(backend),
            },
        }
    }

    /// Waits until no request is running and holds new ones back until the returned
    /// guard is dropped. Requests queue fairly: once a pause is waiting, requests that
    /// arrive after it wait for it.
    pub async fn pause(&self) -> Paused<'_, B> {
        Paused {
            guard: self.slot.current.write().await,
            now: &self.slot.now,
        }
    }

    /// The backend in place, without waiting for a pause to end: a replacement is in
    /// place from the moment [`Paused::replace`] returns.
    pub fn current(&self) -> impl Deref<Target = B> + '_ {
        self.slot.now()
    }
}

impl<B: Backend> Filter for Switchable<B> {
    type Inner = Slot<B>;

    fn inner(&self) -> &Slot<B> {
        &self.slot
    }
}
