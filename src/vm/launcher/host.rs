//! Which driver runs a platform, whether this host can run it, and starting it: QEMU
//! for Linux guests, Virtualization.framework for macOS guests (on a Mac only).

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::vm::bundle::Bundle;
use crate::vm::qemu::{self, QemuDriver, QemuPaths};
use crate::vm::spec::{Platform, VmSpec};
use crate::vm::url::NbdUrl;
use crate::vm::{Boot, Driver, VmEvent};

/// The driver of either platform.
pub(super) enum AnyDriver {
    Qemu(Box<QemuDriver>),
    #[cfg(target_os = "macos")]
    Vz(Box<crate::vm::macos::VzDriver>),
}

macro_rules! each {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            AnyDriver::Qemu($d) => $e,
            #[cfg(target_os = "macos")]
            AnyDriver::Vz($d) => $e,
        }
    };
}

impl Driver for AnyDriver {
    fn name(&self) -> &'static str {
        each!(self, d => d.name())
    }
    async fn pause(&mut self) -> Result<()> {
        each!(self, d => d.pause().await)
    }
    async fn resume(&mut self) -> Result<()> {
        each!(self, d => d.resume().await)
    }
    async fn save_state(&mut self, path: &Path) -> Result<()> {
        each!(self, d => d.save_state(path).await)
    }
    async fn request_stop(&mut self) -> Result<()> {
        each!(self, d => d.request_stop().await)
    }
    async fn stop(&mut self) -> Result<()> {
        each!(self, d => d.stop().await)
    }
    async fn next_event(&mut self) -> Option<VmEvent> {
        each!(self, d => d.next_event().await)
    }
}

/// The driver name for `platform` on this host.
pub(super) fn driver_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Linux => "qemu",
        Platform::Macos => "vz",
    }
}

/// Fails with [`NotSupported`](crate::ErrorKind::NotSupported) when this host cannot run `spec`.
pub fn check_host(spec: &VmSpec) -> Result<()> {
    match spec.platform {
        Platform::Linux => {
            let binary = qemu_binary(spec);
            if binary.components().count() == 1 && find_on_path(&binary).is_none() {
                return Err(qemu::not_installed(&binary));
            }
            Ok(())
        }
        Platform::Macos => check_macos_host(),
    }
}

#[cfg(target_os = "macos")]
fn check_macos_host() -> Result<()> {
    crate::vm::macos::check_host()
}

#[cfg(not(target_os = "macos"))]
fn check_macos_host() -> Result<()> {
    use crate::error::{Error, ErrorKind};
    Err(Error::msg(
        ErrorKind::NotSupported,
        format!(
            "macOS VMs run only on a Mac with Apple silicon and macOS 14 or later \
             (Virtualization.framework); this host runs {}",
            std::env::consts::OS
        ),
    ))
}

fn qemu_binary(spec: &VmSpec) -> PathBuf {
    spec.linux
        .as_ref()
        .and_then(|l| l.qemu.clone())
        .unwrap_or_else(|| PathBuf::from(qemu::default_binary()))
}

fn find_on_path(binary: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

pub(super) async fn start_driver(
    bundle: &Bundle,
    spec: &VmSpec,
    url: &NbdUrl,
    headless: bool,
    boot: Boot<'_>,
) -> Result<AnyDriver> {
    match spec.platform {
        Platform::Linux => {
            let paths = QemuPaths {
                qmp: bundle.path("qmp.sock"),
                console: bundle.path("console.log"),
            };
            let args = qemu::command_line(
                bundle.name(),
                spec,
                url,
                &paths,
                headless,
                qemu::kvm_available(),
                boot,
            );
            let restoring = matches!(boot, Boot::Restore(_));
            let driver = QemuDriver::start(&qemu_binary(spec), &args, &paths, restoring).await?;
            Ok(AnyDriver::Qemu(Box::new(driver)))
        }
        #[cfg(target_os = "macos")]
        Platform::Macos => {
            let driver =
                crate::vm::macos::VzDriver::start(bundle, spec, url, headless, boot).await?;
            Ok(AnyDriver::Vz(Box::new(driver)))
        }
        #[cfg(not(target_os = "macos"))]
        Platform::Macos => check_macos_host().map(|()| unreachable!()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::vm::spec::Disk;

    #[test]
    fn macos_guests_need_a_mac() {
        let spec = VmSpec::new(Platform::Macos, Disk::Image { path: "d".into() });
        if cfg!(not(target_os = "macos")) {
            let err = check_host(&spec).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::NotSupported);
            assert!(err.to_string().contains("macOS 14 or later"), "{err}");
        }
    }

    #[test]
    fn a_missing_qemu_is_named() {
        let mut spec = VmSpec::new(Platform::Linux, Disk::Image { path: "d".into() });
        spec.linux.as_mut().unwrap().qemu = Some("qemu-system-nonesuch".into());
        let err = check_host(&spec).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotSupported);
        assert!(
            err.to_string()
                .contains("qemu-system-nonesuch is not installed")
        );
    }
}
