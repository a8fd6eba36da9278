//! The VM spec: what a VM is made of, as stored in its bundle's `config.json`.
//!
//! The spec is the same on every host; `linux` and `macos` hold what only one driver
//! reads. Unknown fields are refused, so a typo in a hand-edited file is an error.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::url::NbdUrl;
use crate::error::{Error, ErrorKind, Result};
use crate::size::format_size;

/// The `config.json` format version this code writes and reads.
pub const SPEC_VERSION: u32 = 1;

/// The guest operating system, which picks the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// A Linux guest: QEMU on Linux hosts.
    Linux,
    /// A macOS guest: Virtualization.framework on macOS 14+ hosts (Apple silicon).
    Macos,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Platform::Linux => "linux",
            Platform::Macos => "macos",
        })
    }
}

/// Where the VM's disk comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Disk {
    /// An export of a Strata server (or any NBD server) that runs elsewhere.
    Url {
        /// The export.
        url: NbdUrl,
        /// The server's control API (a socket path, `unix:PATH` or `http://HOST:PORT`),
        /// which checkpoints need to take disk snapshots; `None` when unknown.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        control: Option<String>,
        /// The bearer token file for a control API over TCP.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_file: Option<PathBuf>,
    },
    /// A Strata image or raw file that the launcher serves itself, in-process, on a
    /// private Unix socket in the bundle. A relative path is relative to the bundle.
    Image {
        /// The image file.
        path: PathBuf,
    },
}

/// How guest flushes reach the disk (Virtualization.framework's synchronisation mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Guest flushes become NBD flushes (Apple's default).
    #[default]
    Full,
    /// Guest flushes are ignored: faster, and a host crash loses what was not written.
    None,
}

/// How the VM's NBD client behaves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdOptions {
    /// Seconds the client waits for the server before it reconnects (Apple: 5).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Flush behaviour.
    #[serde(default)]
    pub sync: SyncMode,
    /// Attach the disk read-only, whatever the server allows.
    #[serde(default)]
    pub read_only: bool,
}

fn default_timeout() -> f64 {
    5.0
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            timeout_s: default_timeout(),
            sync: SyncMode::Full,
            read_only: false,
        }
    }
}

/// The VM's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// No network device at all.
    #[default]
    None,
    /// One virtio NIC behind the host's NAT (QEMU user networking, VZ NAT).
    Nat,
}

/// How QEMU accelerates the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` can be opened, software emulation (TCG) otherwise.
    #[default]
    Auto,
    /// KVM only.
    Kvm,
    /// Software emulation only.
    Tcg,
}

/// What only the QEMU driver reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxSection {
    /// A kernel to boot directly (`-kernel`); without one the firmware boots the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Its initramfs (`-initrd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Its command line (`-append`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// The emulator; default `qemu-system-<host architecture>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<PathBuf>,
    /// Acceleration.
    #[serde(default)]
    pub accel: Accel,
}

/// What only the Virtualization.framework driver reads. The platform's identity (hardware
/// model, machine identifier, auxiliary storage) is kept in files of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MacosSection {
    /// Display width in pixels.
    #[serde(default = "default_width")]
    pub display_width: u32,
    /// Display height in pixels.
    #[serde(default = "default_height")]
    pub display_height: u32,
    /// Whether `strata vm install` has completed.
    #[serde(default)]
    pub installed: bool,
}

fn default_width() -> u32 {
    1920
}

fn default_height() -> u32 {
    1200
}

impl Default for MacosSection {
    fn default() -> Self {
        MacosSection {
            display_width: default_width(),
            display_height: default_height(),
            installed: false,
        }
    }
}

/// A VM: see the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// [`SPEC_VERSION`].
    pub version: u32,
    /// The guest's platform.
    pub platform: Platform,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// The disk.
    pub disk: Disk,
    /// The NBD client's options.
    #[serde(default)]
    pub nbd: NbdOptions,
    /// The network.
    #[serde(default)]
    pub network: Network,
    /// Run without a display by default.
    #[serde(default)]
    pub headless: bool,
    /// QEMU settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux: Option<LinuxSection>,
    /// Virtualization.framework settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macos: Option<MacosSection>,
}

const MIB: u64 = 1 << 20;
/// The smallest memory size accepted.
pub const MIN_MEMORY: u64 = 64 * MIB;
/// The most virtual CPUs accepted.
pub const MAX_CPUS: u32 = 256;

fn invalid(message: impl Into<String>) -> Error {
    Error::msg(ErrorKind::InvalidInput, message)
}

impl VmSpec {
    /// A spec for `platform` with `disk` and the defaults: 2 CPUs, 2 GiB (4 GiB for
    /// macOS), no network.
    pub fn new(platform: Platform, disk: Disk) -> VmSpec {
        let (memory, linux, macos) = match platform {
            Platform::Linux => (2 << 30, Some(LinuxSection::default()), None),
            Platform::Macos => (4 << 30, None, Some(MacosSection::default())),
        };
        VmSpec {
            version: SPEC_VERSION,
            platform,
            cpus: 2,
            memory,
            disk,
            nbd: NbdOptions::default(),
            network: Network::None,
            headless: false,
            linux,
            macos,
        }
    }

    /// Checks what the types cannot say.
    pub fn validate(&self) -> Result<()> {
        if self.version != SPEC_VERSION {
            return Err(invalid(format!(
                "config.json is version {}; this strata reads version {SPEC_VERSION}",
                self.version
            )));
        }
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return Err(invalid(format!(
                "{} CPUs: expected 1 to {MAX_CPUS}",
                self.cpus
            )));
        }
        if self.memory < MIN_MEMORY || self.memory % MIB != 0 {
            return Err(invalid(format!(
                "memory {}: expected a whole number of MiB, at least {}",
                format_size(self.memory),
                format_size(MIN_MEMORY)
            )));
        }
        let t = self.nbd.timeout_s;
        if !t.is_finite() || t <= 0.0 || t > 3600.0 {
            return Err(invalid(format!(
                "NBD timeout {t} s: expected more than 0 and at most 3600"
            )));
        }
        match (self.platform, &self.linux, &self.macos) {
            (Platform::Linux, _, Some(_)) => {
                return Err(invalid("a Linux VM has no macos section"));
            }
            (Platform::Macos, Some(_), _) => {
                return Err(invalid("a macOS VM has no linux section"));
            }
            _ => {}
        }
        if let Disk::Image { path } = &self.disk {
            if path.as_os_str().is_empty() {
                return Err(invalid("the disk image path is empty"));
            }
        }
        Ok(())
    }

    /// What a saved machine state depends on; a checkpoint can only be restored into a
    /// VM with the same fingerprint.
    pub fn machine_fingerprint(&self) -> String {
        format!(
            "{} {} cpus={} memory={}",
            self.platform,
            std::env::consts::ARCH,
            self.cpus,
            self.memory
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A Linux VM on the export `vm1` of `nbd://nas`, with the defaults.
    pub(crate) fn linux() -> VmSpec {
        VmSpec::new(
            Platform::Linux,
            Disk::Url {
                url: NbdUrl::parse("nbd://nas/vm1").unwrap(),
                control: None,
                token_file: None,
            },
        )
    }

    #[test]
    fn specs_round_trip_through_json() {
        let mut spec = linux();
        spec.linux.as_mut().unwrap().kernel = Some("/boot/vmlinuz".into());
        let text = serde_json::to_string_pretty(&spec).unwrap();
        assert!(text.contains("\"url\": \"nbd://nas:10809/vm1\""), "{text}");
        assert_eq!(serde_json::from_str::<VmSpec>(&text).unwrap(), spec);
        let mac = VmSpec::new(
            Platform::Macos,
            Disk::Image {
                path: "disk.strata".into(),
            },
        );
        let text = serde_json::to_string(&mac).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&text).unwrap(), mac);
        mac.validate().unwrap();
    }

    #[test]
    fn defaults_fill_in() {
        let text = r#"{"version":1,"platform":"linux","cpus":1,"memory":268435456,
                       "disk":{"kind":"image","path":"/x.strata"}}"#;
        let spec: VmSpec = serde_json::from_str(text).unwrap();
        assert_eq!(spec.nbd, NbdOptions::default());
        assert_eq!(spec.nbd.timeout_s, 5.0);
        assert_eq!(spec.nbd.sync, SyncMode::Full);
        spec.validate().unwrap();
    }

    #[test]
    fn bad_specs_are_refused() {
        let typo = r#"{"version":1,"platform":"linux","cpus":1,"memroy":1,
                       "disk":{"kind":"image","path":"/x"}}"#;
        assert!(serde_json::from_str::<VmSpec>(typo).is_err());
        let bad_url = r#"{"version":1,"platform":"linux","cpus":1,"memory":268435456,
                       "disk":{"kind":"url","url":"nbd://nas:0/x"}}"#;
        let err = serde_json::from_str::<VmSpec>(bad_url)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a number from 1 to 65535"), "{err}");

        let check = |f: &dyn Fn(&mut VmSpec), want: &str| {
            let mut s = linux();
            f(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        };
        check(&|s| s.cpus = 0, "expected 1 to 256");
        check(&|s| s.memory = 1 << 20, "at least 64 MiB");
        check(&|s| s.memory = (256 << 20) + 1, "whole number of MiB");
        check(&|s| s.nbd.timeout_s = 0.0, "NBD timeout");
        check(&|s| s.nbd.timeout_s = f64::NAN, "NBD timeout");
        check(&|s| s.version = 2, "version 2");
        check(
            &|s| s.macos = Some(MacosSection::default()),
            "no macos section",
        );
    }
}
