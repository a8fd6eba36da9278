//! Framework objects on the VM's dispatch queue. Most of them are not `Send` (Apple
//! promises nothing about their threads), yet each call on a machine must be made on
//! its queue and each completion handler is called on some thread of the framework's:
//! [`OnQueue`] carries such objects across, with the promise that makes it sound, and
//! [`Done`] brings a completion handler's outcome back to async code.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use block2::RcBlock;
use objc2_foundation::NSError;
use tokio::sync::oneshot;

/// A value moved to or from the VM's queue although its type is not `Send`; see
/// [`OnQueue::new`] for what makes that sound.
pub(super) struct OnQueue<T>(T);

impl<T> OnQueue<T> {
    /// Wraps `value` so that it may be moved to another thread.
    ///
    /// # Safety
    ///
    /// Wherever the wrapper goes, `value` must be used only as its type allows on that
    /// thread:
    /// - an object bound to a dispatch queue (a `VZVirtualMachine`, a
    ///   `VZMacOSInstaller`) has its methods called, and its last reference released,
    ///   only on that queue;
    /// - any other Objective-C object (a configuration, a URL, a restore image) has its
    ///   methods called by one thread at a time. Retaining and releasing it may happen
    ///   anywhere: the runtime makes reference counts atomic.
    pub(super) unsafe fn new(value: T) -> OnQueue<T> {
        OnQueue(value)
    }

    /// The value, on the thread the caller of [`OnQueue::new`] meant it for.
    pub(super) fn get(&self) -> &T {
        &self.0
    }

    /// The value itself, on the thread the caller of [`OnQueue::new`] meant it for.
    pub(super) fn into_inner(self) -> T {
        self.0
    }
}

// SAFETY: an `OnQueue` is only made by `OnQueue::new`, whose callers promise that the
// value is used, and released, only on threads where its type allows it. Moving the
// wrapper between threads moves a pointer and touches nothing of the object.
unsafe impl<T> Send for OnQueue<T> {}

/// Where an outcome goes from whatever thread the framework produces it on; the first
/// answer is delivered, later ones (none are expected) are dropped.
pub(super) type Once<T> = Arc<Mutex<Option<oneshot::Sender<T>>>>;

/// A completion handler's outcome: an error's description, or success.
pub(super) type Done = Once<std::result::Result<(), String>>;

/// A new [`Once`] and the receiving end of its answer.
pub(super) fn once<T>() -> (Once<T>, oneshot::Receiver<T>) {
    let (tx, rx) = oneshot::channel();
    (Arc::new(Mutex::new(Some(tx))), rx)
}

/// Delivers `value` through `once`, unless it has answered already or its receiver is
/// gone.
pub(super) fn answer<T>(once: &Once<T>, value: T) {
    if let Some(tx) = lock(once).take() {
        let _ = tx.send(value);
    }
}

/// Locks `mutex`, poisoned or not: what it guards stays consistent (a value is put in
/// or taken out whole), so a panic elsewhere leaves nothing half-done.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A completion handler (`void (^)(NSError *)`) that delivers its outcome to `done`.
pub(super) fn completion(done: Done) -> RcBlock<dyn Fn(*mut NSError)> {
    RcBlock::new(move |error: *mut NSError| {
        // SAFETY: the framework passes nil or a valid NSError that lives for the call.
        let result = match unsafe { error.as_ref() } {
            None => Ok(()),
            Some(e) => Err(e.localizedDescription().to_string()),
        };
        answer(&done, result);
    })
}
