//! The Virtualization.framework driver: macOS guests on macOS 14+ hosts with Apple
//! silicon, their disk attached with the framework's own NBD client
//! (`VZNetworkBlockDeviceStorageDeviceAttachment`).
//!
//! The driver is thin: it turns a [`VmSpec`](crate::vm::VmSpec) into a
//! `VZVirtualMachineConfiguration`, runs the machine on a serial dispatch queue of its
//! own (every call on the machine happens there, and so do the framework's callbacks),
//! and turns completion handlers and delegate calls into futures and
//! [`VmEvent`](crate::vm::VmEvent)s. Everything else (the bundle, the checkpoints, the
//! disk server, the orchestration) is the portable launcher's.
//!
//! The platform's identity lives in the bundle's `macos/` directory: the hardware model
//! and the auxiliary storage come from the restore image at install time; the machine
//! identifier is made when the bundle is created.
//!
//! # Layout
//! - `queue`: moving framework objects to and from the VM's queue, completion handlers.
//! - `config`: the machine's configuration from the spec, and the delegate.
//! - `driver`: [`VzDriver`], the machine running.
//! - `install`: [`install`], macOS from a restore image.
//! - `app`: AppKit's event loop ([`run_app`]) and the VMs' windows.

mod app;
mod config;
mod driver;
mod install;
mod queue;

use std::path::{Path, PathBuf};

use objc2::rc::Retained;
use objc2_foundation::{NSData, NSError, NSOperatingSystemVersion, NSProcessInfo, NSString, NSURL};
use objc2_virtualization::{VZMacMachineIdentifier, VZVirtualMachine};

pub use app::run_app;
pub use driver::VzDriver;
pub use install::install;

use crate::error::{Error, ErrorKind, Result};
use crate::vm::bundle::{self, Bundle};

/// The hardware model, from the restore image (`dataRepresentation`).
pub const HARDWARE_MODEL: &str = "hardware-model";
/// The machine identifier (`dataRepresentation`), unique to the VM.
pub const MACHINE_IDENTIFIER: &str = "machine-identifier";
/// The auxiliary storage (the VM's NVRAM).
pub const AUXILIARY_STORAGE: &str = "auxiliary-storage";

fn framework_error(what: &str, e: &NSError) -> Error {
    Error::msg(
        ErrorKind::Io,
        format!("{what}: {}", e.localizedDescription()),
    )
}

/// Fails unless this Mac can run macOS guests with NBD disks and saved states.
pub fn check_host() -> Result<()> {
    if !cfg!(target_arch = "aarch64") {
        return Err(Error::msg(
            ErrorKind::NotSupported,
            "macOS VMs need a Mac with Apple silicon",
        ));
    }
    let at_least_14 =
        NSProcessInfo::processInfo().isOperatingSystemAtLeastVersion(NSOperatingSystemVersion {
            majorVersion: 14,
            minorVersion: 0,
            patchVersion: 0,
        });
    if !at_least_14 {
        return Err(Error::msg(
            ErrorKind::NotSupported,
            "macOS VMs with NBD disks need macOS 14 or later on the host",
        ));
    }
    // SAFETY: a class property without arguments; it has no thread requirements (the
    // framework's headers give none) and returns a plain BOOL.
    if !unsafe { VZVirtualMachine::isSupported() } {
        return Err(Error::msg(
            ErrorKind::NotSupported,
            "Virtualization.framework says this Mac cannot run VMs (inside a VM without \
             nested virtualization?)",
        ));
    }
    Ok(())
}

/// Adds the platform's files to a new bundle: a fresh machine identifier.
pub fn prepare_bundle(dir: &Path) -> Result<()> {
    let macos = dir.join(bundle::MACOS_DIR);
    std::fs::create_dir_all(&macos).map_err(|e| Error::from(e).with_path(&macos))?;
    // SAFETY: `new` makes a fresh identifier, a value object with no thread affinity
    // that only this thread holds.
    let id = unsafe { VZMacMachineIdentifier::new() };
    // SAFETY: reads the identifier made above, which no other thread can reach; the
    // NSData returned is ours.
    let data = unsafe { id.dataRepresentation() };
    bundle::write_atomic(&macos.join(MACHINE_IDENTIFIER), &data.to_vec())
}

fn file_url(path: &Path) -> Retained<NSURL> {
    NSURL::fileURLWithPath(&NSString::from_str(&path.to_string_lossy()))
}

fn read_platform_file(dir: &Path, name: &str) -> Result<Retained<NSData>> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).map_err(|e| {
        Error::from(e)
            .with_message(format!(
                "the VM's {name} is missing: is macOS installed (`strata vm install`)?"
            ))
            .with_path(&path)
    })?;
    Ok(NSData::with_bytes(&bytes))
}

/// The bundle's macOS directory, for messages.
pub fn platform_dir(bundle: &Bundle) -> PathBuf {
    bundle.path(bundle::MACOS_DIR)
}
