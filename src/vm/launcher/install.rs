//! Installing macOS into a new VM: the disk is opened as for a run, the framework's
//! installer does the rest, and the spec is marked installed only once it succeeded.

use std::path::Path;

use super::RunOptions;
use super::disk::open_disk;
use super::host::check_host;
use crate::error::{Error, ErrorKind, Result};
use crate::vm::bundle::Bundle;
use crate::vm::spec::Platform;
use crate::vm::{Progress, Report};

/// Installs macOS into the VM of `bundle` from the restore image `ipsw`, its disk
/// served or reached as for a run; `progress` gets the fraction done. Marks the spec
/// installed once the install has succeeded.
#[cfg(target_os = "macos")]
pub async fn install(
    bundle: &Bundle,
    ipsw: &Path,
    report: Report,
    progress: Progress,
) -> Result<()> {
    let mut spec = bundle.spec()?;
    if spec.platform != Platform::Macos {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!(
                "VM {:?} is a {} VM: only macOS is installed this way",
                bundle.name(),
                spec.platform
            ),
        ));
    }
    check_host(&spec)?;
    let _lock = bundle.lock()?;
    let disk = open_disk(bundle, &mut spec, &RunOptions::default(), &report).await?;
    let result = crate::vm::macos::install(bundle, &spec, &disk.url, ipsw, &report, progress).await;
    disk.close(&report).await;
    result?;
    if let Some(m) = spec.macos.as_mut() {
        m.installed = true;
    }
    bundle.save_spec(&spec)
}
