//! Runs a VM: takes the bundle's lock, serves a local disk in-process or checks a remote
//! one, starts the driver, answers `strata vm stop/suspend/status` on the bundle's
//! `launcher.sock`, reports what happens, and cleans up when the VM ends.
//!
//! # Layout
//! - `running`: [`run`], the VM's main loop of events, requests and signals.
//! - `disk`: the VM's disk as a run reaches it: an image served in-process (a fresh
//!   overlay for `--serve`) or a remote export checked first.
//! - `host`: which driver runs a platform, whether this host can, and starting it.
//! - `socket`: `launcher.sock`, one JSON line in and one out per [`Request`], and
//!   [`send`], the other end.
//! - `checkpoint`: suspend, resume and [`delete`]: a checkpoint's disk snapshot,
//!   machine state and record, kept in step.
//! - `install` (macOS only): installing macOS into a new VM.

mod checkpoint;
mod disk;
mod host;
#[cfg(target_os = "macos")]
mod install;
mod running;
mod socket;

use std::path::PathBuf;

pub use checkpoint::{FAILPOINTS, delete};
pub use host::check_host;
#[cfg(target_os = "macos")]
pub use install::install;
pub use running::{STOP_GRACE, run};
pub use socket::{Answer, Deleted, Failed, Request, SOCKET, Status, Stopping, Suspended, send};

/// What `run` and `resume` were asked for.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides the spec's `headless`.
    pub headless: Option<bool>,
    /// Serve a fresh overlay of this image in-process, instead of the spec's disk.
    pub serve: Option<PathBuf>,
    /// With `serve`: delete the overlay when the VM ends.
    pub discard: bool,
    /// Boot from a clone of the disk (a volume with history) at this restore point.
    pub at: Option<String>,
    /// Resume from a checkpoint instead of booting.
    pub resume: Option<ResumeOptions>,
}

/// Which checkpoint to resume from.
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// The checkpoint; the newest when `None`.
    pub checkpoint: Option<String>,
    /// Forget the checkpoints newer than it (their disk snapshots are deleted by the
    /// rollback), which a resume otherwise refuses to do.
    pub destroy_newer: bool,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The VM stopped (powered off, or stopped by `strata vm stop`).
    Stopped(String),
    /// The VM was suspended to this checkpoint and stopped.
    Suspended(String),
}
