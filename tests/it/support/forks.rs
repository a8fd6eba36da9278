//! Children are forked from this test process while other tests run in it. Between fork
//! and exec a child holds a copy of every descriptor the process has open, and an
//! image's `flock` belongs to the open file: if a test closes an image and opens it again
//! (or hands it to a `strata` command) while a sibling test's child is half started, the
//! image is still locked and the open fails as "in use".
//!
//! So the two never overlap: a test holds [`ImagesOpen`] for as long as it has image
//! files open in this process, and every child is started through [`spawn`], which waits
//! until no test holds one (and makes new ones wait while a child is pending).

use std::cell::Cell;
use std::io;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

#[derive(Default)]
struct State {
    /// Live [`ImagesOpen`] guards.
    images_open: usize,
    /// Children waiting to be started, or being started.
    forks: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    images_open: 0,
    forks: 0,
});
static CHANGED: Condvar = Condvar::new();

thread_local! {
    /// Guards taken by this thread, to refuse a spawn that would wait for itself.
    static HELD: Cell<usize> = const { Cell::new(0) };
}

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait_until(mut ready: impl FnMut(&State) -> bool) -> MutexGuard<'static, State> {
    let mut s = state();
    while !ready(&s) {
        s = CHANGED.wait(s).unwrap_or_else(PoisonError::into_inner);
    }
    s
}

/// Held while this process has image files open: no child is forked meanwhile.
#[must_use = "the guard protects the images only while it lives"]
pub struct ImagesOpen(());

/// Waits for the children being started, then keeps new ones from starting until the
/// guard is dropped.
pub fn images_open() -> ImagesOpen {
    wait_until(|s| s.forks == 0).images_open += 1;
    HELD.with(|h| h.set(h.get() + 1));
    ImagesOpen(())
}

impl Drop for ImagesOpen {
    fn drop(&mut self) {
        HELD.with(|h| h.set(h.get().saturating_sub(1)));
        state().images_open -= 1;
        CHANGED.notify_all();
    }
}

/// Starts `cmd` once no test has images open. Every child of the tests starts here.
pub fn spawn(cmd: &mut Command) -> io::Result<Child> {
    assert_eq!(
        HELD.with(Cell::get),
        0,
        "a child started while this thread holds ImagesOpen would wait for itself"
    );
    state().forks += 1;
    let started = {
        let _ready = wait_until(|s| s.images_open == 0);
        // Held across the fork: no guard is taken before the child has exec'd, which
        // `Command::spawn` waits for.
        cmd.spawn()
    };
    state().forks -= 1;
    CHANGED.notify_all();
    started
}
