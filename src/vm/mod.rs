//! The companion launcher: boots VMs whose disk is a Strata (or any NBD) export, and
//! saves their state together with a disk snapshot, so that a VM can be suspended and
//! resumed, or returned to a checkpoint, disk and memory alike.
//!
//! ```text
//!   strata vm run NAME ──> launcher::run ──┬─> serve: the in-process Strata server
//!                           (this process)  │    (nbd.sock, control.sock in the bundle)
//!   strata vm suspend ──> launcher.sock ───>│
//!   strata vm stop                          ├─> Driver: QEMU (qemu.rs, over QMP)
//!                                           │     or Virtualization.framework (macos.rs)
//!                                           └─> the control API: disk snapshots,
//!                                                rollbacks (api::client)
//! ```
//!
//! Everything but the framework calls is portable and tested on Linux: the spec, the
//! bundle and its checkpoint bookkeeping, NBD URL validation, the QEMU command line,
//! the launcher's orchestration. A driver only starts, pauses, resumes, stops, saves and
//! restores a machine, and reports what happens to it.
//!
//! # Layout
//! - [`url`]: NBD URLs (`nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`), parsed and
//!   validated without I/O.
//! - [`spec`]: the VM spec stored as `config.json`.
//! - [`bundle`]: a VM's directory, its atomic writes and its checkpoint list.
//! - [`probe`]: checks that an NBD server answers and has the export, before a VM is
//!   started on it.
//! - [`serve`]: the Strata server a launcher runs in-process for a local image.
//! - [`qmp`]: a small QMP (QEMU Machine Protocol) client.
//! - [`qemu`]: the QEMU driver.
//! - `macos` (macOS only): the Virtualization.framework driver.
//! - [`launcher`]: runs a VM: the driver, the in-process server, the bundle's control
//!   socket, suspend and resume.

pub mod bundle;
pub mod launcher;
#[cfg(target_os = "macos")]
pub mod macos;
pub mod probe;
pub mod qemu;
pub mod qmp;
pub mod serve;
pub mod spec;
pub mod url;

use std::path::Path;
use std::sync::Arc;

pub use bundle::{Bundle, Checkpoint};
pub use spec::{Disk, Platform, VmSpec};
pub use url::NbdUrl;

use crate::error::Result;

/// Where the launcher's and the drivers' messages for the user go (the command line
/// prints them).
pub type Report = Arc<dyn Fn(&str) + Send + Sync>;

/// Where a long task's progress goes, as the fraction done (0.0 to 1.0).
pub type Progress = Arc<dyn Fn(f64) + Send + Sync>;

/// Something that happened to a running VM, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The VM stopped: the guest powered off, or it was stopped.
    Stopped {
        /// Why, in a few words.
        reason: String,
    },
    /// The VM failed and is gone.
    Failed(String),
    /// The disk's NBD connection is up (again).
    DiskConnected,
    /// The disk reported an error; `fatal` when the disk is gone for good.
    DiskError {
        /// What went wrong.
        message: String,
        /// The device cannot recover (Virtualization.framework disconnects it).
        fatal: bool,
    },
    /// Anything else worth a line of output.
    Note(String),
}

/// How a driver starts a VM.
#[derive(Debug, Clone, Copy)]
pub enum Boot<'a> {
    /// From power-on.
    Fresh,
    /// From a machine state saved by [`Driver::save_state`]; the VM is left paused.
    Restore(&'a Path),
}

/// A hypervisor binding: what the launcher needs from QEMU or Virtualization.framework.
/// Each call returns once the machine is in the new state.
#[allow(async_fn_in_trait)]
pub trait Driver {
    /// The name recorded in checkpoints (`qemu`, `vz`): only the same driver restores a
    /// state it saved.
    fn name(&self) -> &'static str;
    /// Pauses the guest's CPUs and devices; every write the guest issued before has
    /// been answered by the disk when this returns.
    async fn pause(&mut self) -> Result<()>;
    /// Runs a paused guest again.
    async fn resume(&mut self) -> Result<()>;
    /// Writes the paused machine's state to `path`.
    async fn save_state(&mut self, path: &Path) -> Result<()>;
    /// Asks the guest to shut down (ACPI power button).
    async fn request_stop(&mut self) -> Result<()>;
    /// Stops the machine at once (power pulled).
    async fn stop(&mut self) -> Result<()>;
    /// The next event; `None` once the VM is gone and nothing more will come.
    async fn next_event(&mut self) -> Option<VmEvent>;
}
