//! Checkpoints: a VM's machine state saved together with a snapshot of its disk, taken
//! by a suspend, restored by a resume, removed by a delete.
//!
//! A suspend is ordered so that a checkpoint is recorded only once it is whole:
//!
//! 1. the VM is paused (QEMU's `stop` also drains and flushes the disk);
//! 2. the disk server takes snapshot `vm.NAME` through its control API;
//! 3. the machine state is written to `checkpoints/.NAME.state.partial`, synced and
//!    renamed to `checkpoints/NAME.state`;
//! 4. `checkpoints.json` is rewritten (atomically) with the new checkpoint;
//! 5. the VM resumes, or stops.
//!
//! A failure at 2 or 3 undoes what was done (the partial file, the snapshot) and
//! resumes the VM; a crash leaves at worst an unreferenced snapshot or state file,
//! never a checkpoint without its state or its snapshot. Resuming rolls the disk back
//! to the checkpoint's snapshot before the state is loaded, so memory and disk match.

use std::time::{Duration, Instant};

use super::disk::{DiskAccess, open_disk};
use super::host::{AnyDriver, driver_name};
use super::socket::{Deleted, Request, Suspended, send};
use super::{ResumeOptions, RunOptions};
use crate::api::Taken;
use crate::api::client::ControlTarget;
use crate::error::{Error, ErrorKind, Result};
use crate::vm::bundle::{Bundle, Checkpoint, commit_file};
use crate::vm::spec::VmSpec;
use crate::vm::{Driver, Report};

/// The steps of a suspend at which `STRATA_FAILPOINT` can stop the launcher (see
/// [`crate::failpoint::hit`]), for the crash tests: after the disk snapshot,
/// and after the state file is in place but before the checkpoint is recorded.
pub const FAILPOINTS: &[&str] = &["vm-suspend-snapshotted", "vm-suspend-saved"];

/// A checkpoint to restore, checked against the VM and its disk, with its disk rolled
/// back already.
pub(super) async fn prepare_resume(
    bundle: &Bundle,
    spec: &VmSpec,
    disk: &DiskAccess,
    options: &ResumeOptions,
    report: &Report,
) -> Result<Checkpoint> {
    let all = bundle.checkpoints()?;
    let checkpoint = match &options.checkpoint {
        Some(name) => bundle.checkpoint(name)?,
        None => all.last().cloned().ok_or_else(|| {
            Error::msg(
                ErrorKind::NotFound,
                format!(
                    "VM {:?} has no checkpoint to resume from (`strata vm suspend` makes one)",
                    bundle.name()
                ),
            )
        })?,
    };
    let want = driver_name(spec.platform);
    if checkpoint.driver != want {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!(
                "checkpoint {:?} was saved by the {} driver; this VM runs with {want}",
                checkpoint.name, checkpoint.driver
            ),
        ));
    }
    if checkpoint.machine != spec.machine_fingerprint() {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!(
                "checkpoint {:?} was saved from a different machine ({}); the VM is now {}",
                checkpoint.name,
                checkpoint.machine,
                spec.machine_fingerprint()
            ),
        ));
    }
    if checkpoint.disk != disk.identity {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!(
                "checkpoint {:?} belongs to the disk {}; the VM's disk is now {}",
                checkpoint.name, checkpoint.disk, disk.identity
            ),
        ));
    }
    let state = bundle.path(&checkpoint.state);
    if !state.is_file() {
        return Err(Error::msg(
            ErrorKind::NotFound,
            format!(
                "the state file of checkpoint {:?} is missing",
                checkpoint.name
            ),
        )
        .with_path(&state));
    }
    let newer: Vec<Checkpoint> = all
        .iter()
        .skip_while(|c| c.name != checkpoint.name)
        .skip(1)
        .cloned()
        .collect();
    if !newer.is_empty() && !options.destroy_newer {
        let names: Vec<&str> = newer.iter().map(|c| c.name.as_str()).collect();
        return Err(Error::msg(
            ErrorKind::Busy,
            format!(
                "newer checkpoints exist ({}): resuming {:?} deletes them; allow that with \
                 --destroy-newer",
                names.join(", "),
                checkpoint.name
            ),
        ));
    }
    let control = disk.control()?;
    let names: Vec<String> = newer.iter().map(|c| c.name.clone()).collect();
    if !names.is_empty() {
        // Forget them first: a crash then leaves unreferenced files, never a checkpoint
        // whose snapshot is gone.
        bundle.remove_checkpoints(&names)?;
    }
    control
        .rollback(
            &disk.export,
            &checkpoint.snapshot,
            false,
            options.destroy_newer,
        )
        .await
        .map_err(|e| {
            Error::msg(
                e.kind(),
                format!(
                    "cannot roll the disk back to checkpoint {:?}: {e}",
                    checkpoint.name
                ),
            )
        })?;
    for c in &newer {
        let _ = std::fs::remove_file(bundle.path(&c.state));
        report(&format!("deleted newer checkpoint {}", c.name));
    }
    Ok(checkpoint)
}

/// Takes a checkpoint: see the [module documentation](self) for the order of steps.
pub(super) async fn suspend(
    bundle: &Bundle,
    spec: &VmSpec,
    disk: &DiskAccess,
    driver: &mut AnyDriver,
    name: Option<String>,
    then_stop: bool,
    report: &Report,
) -> Result<Suspended> {
    let control = disk.control()?;
    let name = match name {
        Some(n) => n,
        None => bundle.next_checkpoint_name()?,
    };
    crate::names::CHECKPOINT.check(&name)?;
    if bundle.checkpoints()?.iter().any(|c| c.name == name) {
        return Err(Error::msg(
            ErrorKind::AlreadyExists,
            format!("VM {:?} has a checkpoint {name:?} already", bundle.name()),
        ));
    }
    let snapshot = Checkpoint::snapshot_name(&name);
    let rel = Bundle::state_file(&name);
    let path = bundle.path(&rel);
    let partial = path.with_file_name(format!(".{name}.state.partial"));

    let start = Instant::now();
    driver.pause().await?;
    let paused = start.elapsed();
    let snapshot_pause_us = match take_snapshot(bundle, control, &disk.export, &snapshot).await {
        Ok(taken) => taken.pause_us,
        Err(e) => {
            let _ = driver.resume().await;
            return Err(Error::msg(
                e.kind(),
                format!("the disk snapshot failed, the VM runs on: {e}"),
            ));
        }
    };
    let snapped = start.elapsed();
    crate::failpoint::hit(FAILPOINTS[0]);
    let saved = async {
        driver.save_state(&partial).await?;
        commit_file(&partial, &path)?;
        crate::failpoint::hit(FAILPOINTS[1]);
        let state_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        bundle.add_checkpoint(Checkpoint {
            name: name.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            snapshot: snapshot.clone(),
            state: rel.clone(),
            driver: driver_name(spec.platform).to_owned(),
            machine: spec.machine_fingerprint(),
            disk: disk.identity.clone(),
            state_bytes,
        })?;
        Ok::<u64, Error>(state_bytes)
    }
    .await;
    let state_bytes = match saved {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            let _ = std::fs::remove_file(&path);
            let _ = control.delete_snapshot(&disk.export, &snapshot).await;
            let _ = driver.resume().await;
            return Err(Error::msg(
                e.kind(),
                format!("saving the machine state failed, the VM runs on: {e}"),
            ));
        }
    };
    let saved_at = start.elapsed();
    if then_stop {
        driver.stop().await?;
    } else {
        driver.resume().await?;
    }
    let total = start.elapsed();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    report(&format!(
        "checkpoint {name}: paused in {} ms, disk snapshot in {} ms, {} of machine state in \
         {} ms; {} after {} ms",
        ms(paused),
        ms(snapped - paused),
        crate::size::format_size(state_bytes),
        ms(saved_at - snapped),
        if then_stop {
            "stopped"
        } else {
            "running again"
        },
        ms(total)
    ));
    Ok(Suspended {
        checkpoint: name,
        snapshot,
        state_bytes,
        pause_ms: ms(paused),
        snapshot_ms: ms(snapped - paused),
        snapshot_pause_us,
        state_ms: ms(saved_at - snapped),
        total_ms: ms(total),
        stopped: then_stop,
    })
}

/// Deletes checkpoint `name`: first its record (so that a crash never leaves a listed
/// checkpoint without its snapshot), then its disk snapshot (merged into the layer
/// above it, so the disk reads as before), then its state file.
pub(super) async fn delete_checkpoint(
    bundle: &Bundle,
    disk: &DiskAccess,
    name: &str,
) -> Result<Deleted> {
    let checkpoint = bundle.checkpoint(name)?;
    let control = disk.control()?;
    bundle.remove_checkpoints(std::slice::from_ref(&checkpoint.name))?;
    let snapshot = match control
        .delete_snapshot(&disk.export, &checkpoint.snapshot)
        .await
    {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::NotFound => false,
        Err(e) => {
            let _ = std::fs::remove_file(bundle.path(&checkpoint.state));
            return Err(Error::msg(
                e.kind(),
                format!(
                    "checkpoint {name:?} is forgotten, but its disk snapshot {} is left \
                     (`strata ctl delete-snapshot` removes it): {e}",
                    checkpoint.snapshot
                ),
            ));
        }
    };
    let _ = std::fs::remove_file(bundle.path(&checkpoint.state));
    Ok(Deleted {
        deleted: name.to_owned(),
        snapshot_deleted: snapshot,
    })
}

/// Deletes checkpoint `name` of `bundle`: through its launcher when the VM runs (which
/// serialises it with suspends), directly otherwise (the disk served in-process for the
/// time it takes, for a local disk).
pub async fn delete(bundle: &Bundle, name: &str, report: Report) -> Result<Deleted> {
    if bundle.is_running() {
        let request = Request::Delete {
            checkpoint: name.to_owned(),
        };
        return send(bundle, &request, Duration::from_secs(600)).await;
    }
    let mut spec = bundle.spec()?;
    bundle.checkpoint(name)?;
    let _lock = bundle.lock()?;
    let disk = open_disk(bundle, &mut spec, &RunOptions::default(), &report).await?;
    let result = delete_checkpoint(bundle, &disk, name).await;
    disk.close(&report).await;
    result
}

/// Takes the disk snapshot of a new checkpoint. A snapshot of that name that no
/// checkpoint lists was left by a suspend that crashed before recording it: it is
/// deleted and taken anew.
async fn take_snapshot(
    bundle: &Bundle,
    control: &ControlTarget,
    export: &str,
    snapshot: &str,
) -> Result<Taken> {
    match control.take_snapshot(export, snapshot).await {
        Err(e) if e.kind() == ErrorKind::Busy => {
            let listed = bundle.checkpoints()?.iter().any(|c| c.snapshot == snapshot);
            let exists = control
                .snapshots(export)
                .await?
                .iter()
                .any(|s| s.name == snapshot);
            if listed || !exists {
                return Err(e);
            }
            control.delete_snapshot(export, snapshot).await?;
            control.take_snapshot(export, snapshot).await
        }
        other => other,
    }
}
