//! Bundles: a VM's directory. It holds the spec (`config.json`), the checkpoint list
//! (`checkpoints.json`) and their machine-state files, the platform's identity files
//! on macOS, and, while the VM runs, its lock and sockets.
//!
//! ```text
//! vms/NAME/
//!   config.json            the VmSpec
//!   checkpoints.json       the checkpoints, oldest first
//!   checkpoints/C.state    machine state saved for checkpoint C
//!   disk.strata            the disk, when the launcher serves an overlay of an image
//!   macos/                 hardware-model, machine-identifier, auxiliary-storage
//!   lock                   held (flock) by the launcher running the VM
//!   launcher.sock          that launcher's commands (stop, suspend, status)
//!   qmp.sock               QEMU's monitor
//!   nbd.sock control.sock  the in-process server's NBD and control sockets
//!   console.log            the guest's serial console (QEMU)
//! ```
//!
//! Every file that must never be seen half-written (`config.json`,
//! `checkpoints.json`, a state file) is written to a temporary name in the same
//! directory, synced, renamed over its final name, and the directory synced. A bundle
//! is created under a temporary name and renamed into place once complete. A
//! checkpoint is recorded in `checkpoints.json` only after its disk snapshot and state
//! file exist, so a crash at any moment leaves the old list or the new one.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::spec::{Disk, VmSpec};
use crate::error::{Error, ErrorKind, Result};
use crate::names::VM;

/// The spec's file name.
pub const CONFIG: &str = "config.json";
/// The checkpoint list's file name.
pub const CHECKPOINTS: &str = "checkpoints.json";
/// The directory of state files.
pub const STATE_DIR: &str = "checkpoints";
/// The overlay a launcher creates for `run --serve` or `create --overlay`.
pub const OVERLAY: &str = "disk.strata";
/// The directory of the macOS platform's identity files.
pub const MACOS_DIR: &str = "macos";

/// The disk of a VM that runs on its own overlay ([`OVERLAY`] in its bundle).
pub fn overlay_disk() -> Disk {
    Disk::Image {
        path: PathBuf::from(OVERLAY),
    }
}

/// Creates the overlay [`OVERLAY`] in the bundle directory `dir`, its backing file
/// `base`, and returns its path.
pub fn create_overlay(dir: &Path, base: &Path) -> Result<PathBuf> {
    let overlay = dir.join(OVERLAY);
    crate::image::create(
        &overlay,
        &crate::image::CreateOptions {
            backing: Some(base.to_path_buf()),
            ..Default::default()
        },
    )?;
    Ok(overlay)
}

/// The default directory of bundles: `$XDG_DATA_HOME/strata/vms`, or
/// `~/.local/share/strata/vms`.
pub fn default_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("strata/vms"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/share/strata/vms")),
        None => Err(Error::msg(
            ErrorKind::InvalidInput,
            "neither XDG_DATA_HOME nor HOME is set: give --bundles DIR",
        )),
    }
}

fn io_error(e: std::io::Error, what: &str, path: &Path) -> Error {
    Error::from(e).with_message(what.to_owned()).with_path(path)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(e, "cannot sync the directory", dir))
}

/// A temporary name next to `path`, unique to this process and call.
fn temp_name(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Writes `contents` to `path` so that `path` is always either its old contents or the
/// new ones, never part of either: temp file, sync, rename, sync the directory.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let temp = temp_name(path);
    let written = (|| {
        let mut f = File::create(&temp)?;
        f.write_all(contents)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(io_error(e, "cannot write", path));
    }
    if let Err(e) = std::fs::rename(&temp, path) {
        let _ = std::fs::remove_file(&temp);
        return Err(io_error(e, "cannot rename into place", path));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Makes a file written elsewhere (a state file) durable under its final name:
/// syncs it and renames it over `path`.
pub fn commit_file(temp: &Path, path: &Path) -> Result<()> {
    File::open(temp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(e, "cannot sync", temp))?;
    std::fs::rename(temp, path).map_err(|e| io_error(e, "cannot rename into place", path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// A saved point of a VM: its machine state and the disk snapshot taken at the same
/// instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Its name, unique in the bundle.
    pub name: String,
    /// When it was taken, in seconds since the Unix epoch.
    pub created: u64,
    /// The disk snapshot's name on the server.
    pub snapshot: String,
    /// The state file, relative to the bundle.
    pub state: PathBuf,
    /// Which driver wrote the state (`qemu`, `vz`); only that driver can restore it.
    pub driver: String,
    /// [`VmSpec::machine_fingerprint`] when it was taken.
    pub machine: String,
    /// The disk it belongs to (the URL or the image path), to refuse restoring it over
    /// another disk.
    pub disk: String,
    /// Size of the state file in bytes.
    pub state_bytes: u64,
}

impl Checkpoint {
    /// The disk snapshot name for a checkpoint.
    pub fn snapshot_name(checkpoint: &str) -> String {
        format!("vm.{checkpoint}")
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointList {
    version: u32,
    checkpoints: Vec<Checkpoint>,
}

/// An exclusive hold on a bundle, taken by the launcher that runs its VM (and by
/// commands that change it while it is not running); released when dropped.
#[derive(Debug)]
pub struct BundleLock {
    _file: File,
}

/// A VM's bundle: see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    name: String,
}

impl Bundle {
    /// Creates the bundle `root/name` for `spec`; `fill` adds further files (platform
    /// identity, a disk overlay) to the directory before it gets its name, so a
    /// failure leaves nothing behind and a bundle never exists half-made.
    pub fn create(
        root: &Path,
        name: &str,
        spec: &VmSpec,
        fill: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Bundle> {
        VM.check(name)?;
        spec.validate()?;
        std::fs::create_dir_all(root)
            .map_err(|e| io_error(e, "cannot create the bundle directory", root))?;
        let dir = root.join(name);
        if dir.exists() {
            return Err(Error::msg(
                ErrorKind::AlreadyExists,
                format!("a VM named {name:?} exists already"),
            )
            .with_path(&dir));
        }
        let temp = root.join(format!(".{name}.creating-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&temp);
        std::fs::create_dir(&temp).map_err(|e| io_error(e, "cannot create", &temp))?;
        let made = (|| {
            std::fs::create_dir(temp.join(STATE_DIR))
                .map_err(|e| io_error(e, "cannot create", &temp))?;
            write_atomic(&temp.join(CONFIG), &spec_json(spec)?)?;
            fill(&temp)?;
            sync_dir(&temp)?;
            // rename(2) refuses to replace a non-empty directory: a bundle made meanwhile
            // by someone else stays as it is.
            std::fs::rename(&temp, &dir).map_err(|e| {
                if dir.exists() {
                    Error::msg(
                        ErrorKind::AlreadyExists,
                        format!("a VM named {name:?} exists already"),
                    )
                    .with_path(&dir)
                } else {
                    io_error(e, "cannot rename the new bundle into place", &dir)
                }
            })?;
            sync_dir(root)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&temp);
            return Err(e);
        }
        Ok(Bundle {
            dir,
            name: name.to_owned(),
        })
    }

    /// Opens the existing bundle `root/name`.
    pub fn open(root: &Path, name: &str) -> Result<Bundle> {
        VM.check(name)?;
        let dir = root.join(name);
        if !dir.join(CONFIG).is_file() {
            let why = if dir.exists() {
                format!("{} has no {CONFIG}: not a VM bundle", dir.display())
            } else {
                format!(
                    "no VM named {name:?} in {} (`strata vm list` shows them, \
                     `strata vm create` makes one)",
                    root.display()
                )
            };
            return Err(Error::msg(ErrorKind::NotFound, why));
        }
        Ok(Bundle {
            dir,
            name: name.to_owned(),
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bundle's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path inside the bundle.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.join(rel)
    }

    /// Reads and validates the spec.
    pub fn spec(&self) -> Result<VmSpec> {
        let path = self.path(CONFIG);
        let text = std::fs::read(&path).map_err(|e| io_error(e, "cannot read", &path))?;
        let spec: VmSpec = serde_json::from_slice(&text).map_err(|e| {
            Error::msg(ErrorKind::InvalidInput, format!("bad {CONFIG}: {e}")).with_path(&path)
        })?;
        spec.validate().map_err(|e| e.with_path(&path))?;
        Ok(spec)
    }

    /// Replaces the spec, atomically.
    pub fn save_spec(&self, spec: &VmSpec) -> Result<()> {
        spec.validate()?;
        write_atomic(&self.path(CONFIG), &spec_json(spec)?)
    }

    /// The checkpoints, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let path = self.path(CHECKPOINTS);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(e, "cannot read", &path)),
        };
        let list: CheckpointList = serde_json::from_slice(&text).map_err(|e| {
            Error::msg(ErrorKind::Corrupt, format!("bad {CHECKPOINTS}: {e}")).with_path(&path)
        })?;
        Ok(list.checkpoints)
    }

    /// The checkpoint `name`.
    pub fn checkpoint(&self, name: &str) -> Result<Checkpoint> {
        let all = self.checkpoints()?;
        let names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
        all.iter().find(|c| c.name == name).cloned().ok_or_else(|| {
            Error::msg(
                ErrorKind::NotFound,
                format!(
                    "VM {:?} has no checkpoint {name:?} (it has: {})",
                    self.name,
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                ),
            )
        })
    }

    fn write_checkpoints(&self, checkpoints: Vec<Checkpoint>) -> Result<()> {
        let list = CheckpointList {
            version: 1,
            checkpoints,
        };
        let text = serde_json::to_vec_pretty(&list)
            .map_err(|e| Error::msg(ErrorKind::Io, format!("cannot encode: {e}")))?;
        write_atomic(&self.path(CHECKPOINTS), &text)
    }

    /// Records a new checkpoint (its state file and disk snapshot must exist already).
    pub fn add_checkpoint(&self, checkpoint: Checkpoint) -> Result<()> {
        let mut all = self.checkpoints()?;
        if all.iter().any(|c| c.name == checkpoint.name) {
            return Err(Error::msg(
                ErrorKind::AlreadyExists,
                format!(
                    "VM {:?} has a checkpoint {:?} already",
                    self.name, checkpoint.name
                ),
            ));
        }
        all.push(checkpoint);
        self.write_checkpoints(all)
    }

    /// Forgets the checkpoints named in `names` (their state files are the caller's to
    /// remove, after this returns).
    pub fn remove_checkpoints(&self, names: &[String]) -> Result<()> {
        let mut all = self.checkpoints()?;
        all.retain(|c| !names.contains(&c.name));
        self.write_checkpoints(all)
    }

    /// A name for a new checkpoint: `ckpt-N`, one more than the highest so far.
    pub fn next_checkpoint_name(&self) -> Result<String> {
        let n = self
            .checkpoints()?
            .iter()
            .filter_map(|c| c.name.strip_prefix("ckpt-")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        Ok(format!("ckpt-{}", n + 1))
    }

    /// The state file of checkpoint `name`, relative to the bundle.
    pub fn state_file(name: &str) -> PathBuf {
        Path::new(STATE_DIR).join(format!("{name}.state"))
    }

    /// Takes the bundle's lock, or fails with [`ErrorKind::Busy`] when a launcher holds
    /// it (the VM is running).
    pub fn lock(&self) -> Result<BundleLock> {
        let path = self.path("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(e, "cannot open", &path))?;
        if let Err(e) = crate::sys::try_lock(&file, true) {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Err(Error::msg(
                    ErrorKind::Busy,
                    format!(
                        "VM {:?} is running (another launcher holds {})",
                        self.name,
                        path.display()
                    ),
                ));
            }
            return Err(io_error(e, "cannot lock", &path));
        }
        Ok(BundleLock { _file: file })
    }

    /// Is a launcher running this VM (holding the lock)?
    pub fn is_running(&self) -> bool {
        matches!(self.lock(), Err(e) if e.kind() == ErrorKind::Busy)
    }
}

fn spec_json(spec: &VmSpec) -> Result<Vec<u8>> {
    let mut text = serde_json::to_vec_pretty(spec)
        .map_err(|e| Error::msg(ErrorKind::Io, format!("cannot encode the spec: {e}")))?;
    text.push(b'\n');
    Ok(text)
}

/// The bundles under `root`, by name, with their specs (or why they cannot be read).
pub fn list(root: &Path) -> Result<Vec<(Bundle, Result<VmSpec>)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(e, "cannot list", root)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().join(CONFIG).is_file() {
            continue;
        }
        if let Ok(bundle) = Bundle::open(root, &name) {
            let spec = bundle.spec();
            out.push((bundle, spec));
        }
    }
    out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::spec::{Disk, Platform};

    fn spec() -> VmSpec {
        VmSpec::new(
            Platform::Linux,
            Disk::Image {
                path: "/x.strata".into(),
            },
        )
    }

    fn checkpoint(name: &str) -> Checkpoint {
        Checkpoint {
            name: name.into(),
            created: 1,
            snapshot: Checkpoint::snapshot_name(name),
            state: Bundle::state_file(name),
            driver: "qemu".into(),
            machine: spec().machine_fingerprint(),
            disk: "/x.strata".into(),
            state_bytes: 10,
        }
    }

    #[test]
    fn bundles_are_created_whole_or_not_at_all() {
        let root = tempfile::tempdir().unwrap();
        let err = Bundle::create(root.path(), "vm1", &spec(), |_| {
            Err(Error::msg(ErrorKind::Io, "disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            0,
            "nothing left"
        );

        let b = Bundle::create(root.path(), "vm1", &spec(), |dir| {
            std::fs::write(dir.join("extra"), b"x").map_err(Error::from)
        })
        .unwrap();
        assert_eq!(b.spec().unwrap(), spec());
        assert!(b.path("extra").is_file() && b.path(STATE_DIR).is_dir());
        let again = Bundle::create(root.path(), "vm1", &spec(), |_| Ok(())).unwrap_err();
        assert_eq!(again.kind(), ErrorKind::AlreadyExists);
        let names: Vec<_> = list(root.path())
            .unwrap()
            .into_iter()
            .map(|(b, _)| b.name)
            .collect();
        assert_eq!(names, ["vm1"]);
        assert!(Bundle::create(root.path(), "../x", &spec(), |_| Ok(())).is_err());
    }

    #[test]
    fn missing_bundles_are_named() {
        let root = tempfile::tempdir().unwrap();
        let err = Bundle::open(root.path(), "nope").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.to_string().contains("no VM named \"nope\""), "{err}");
        std::fs::create_dir(root.path().join("empty")).unwrap();
        let err = Bundle::open(root.path(), "empty").unwrap_err();
        assert!(err.to_string().contains("not a VM bundle"), "{err}");
    }

    #[test]
    fn checkpoints_are_kept_in_order() {
        let root = tempfile::tempdir().unwrap();
        let b = Bundle::create(root.path(), "vm1", &spec(), |_| Ok(())).unwrap();
        assert!(b.checkpoints().unwrap().is_empty());
        assert_eq!(b.next_checkpoint_name().unwrap(), "ckpt-1");
        b.add_checkpoint(checkpoint("ckpt-1")).unwrap();
        b.add_checkpoint(checkpoint("before-upgrade")).unwrap();
        assert_eq!(b.next_checkpoint_name().unwrap(), "ckpt-2");
        let err = b.add_checkpoint(checkpoint("ckpt-1")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        let names: Vec<_> = b
            .checkpoints()
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["ckpt-1", "before-upgrade"]);
        assert_eq!(b.checkpoint("ckpt-1").unwrap().snapshot, "vm.ckpt-1");
        let err = b.checkpoint("x").unwrap_err().to_string();
        assert!(err.contains("it has: ckpt-1, before-upgrade"), "{err}");
        b.remove_checkpoints(&["ckpt-1".into()]).unwrap();
        assert_eq!(b.checkpoints().unwrap().len(), 1);
        // No temporary file is left behind by the atomic writes.
        let stray: Vec<_> = std::fs::read_dir(b.dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(stray.is_empty());
    }

    #[test]
    fn a_running_vm_holds_its_lock() {
        let root = tempfile::tempdir().unwrap();
        let b = Bundle::create(root.path(), "vm1", &spec(), |_| Ok(())).unwrap();
        assert!(!b.is_running());
        let lock = b.lock().unwrap();
        assert!(b.is_running());
        let err = b.lock().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy);
        assert!(err.to_string().contains("is running"));
        drop(lock);
        assert!(!b.is_running());
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let missing = dir.path().join("no/such/dir/f");
        assert!(write_atomic(&missing, b"x").is_err());
    }
}
