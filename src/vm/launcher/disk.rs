//! The VM's disk as a run reaches it: a local image served by an in-process server
//! (with a fresh overlay for `run --serve`), or a remote export that is checked to
//! answer before the VM is started on it. Either way the run ends up with an NBD URL
//! for the driver and, when there is one, the control API that checkpoints need.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::RunOptions;
use crate::api::client::ControlTarget;
use crate::error::{Error, ErrorKind, Result};
use crate::vm::Report;
use crate::vm::bundle::{self, Bundle};
use crate::vm::probe;
use crate::vm::serve::{self, LocalServer};
use crate::vm::spec::{Disk, VmSpec};
use crate::vm::url::NbdUrl;

/// The VM's disk, as this run reaches it.
pub(super) struct DiskAccess {
    pub(super) url: NbdUrl,
    control: Option<ControlTarget>,
    pub(super) export: String,
    /// What checkpoints record as the disk.
    pub(super) identity: String,
    pub(super) local: Option<LocalServer>,
    /// An overlay made for this run, deleted at the end.
    discard: Option<PathBuf>,
}

impl DiskAccess {
    pub(super) fn control(&self) -> Result<&ControlTarget> {
        if self.discard.is_some() {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                "this run discards its disk when it ends (--discard): a checkpoint of it \
                 would be lost",
            ));
        }
        self.control.as_ref().ok_or_else(|| {
            Error::msg(
                ErrorKind::InvalidInput,
                "checkpoints need the disk server's control API to take disk snapshots: \
                 give the VM one with `strata vm create ... --control PATH|URL`",
            )
        })
    }

    pub(super) async fn close(self, report: &Report) {
        if let Some(local) = self.local {
            if let Err(e) = local.stop().await {
                report(&format!("the disk server: {e}"));
            }
        }
        if let Some(overlay) = self.discard {
            remove_overlay(&overlay);
            report(&format!("discarded {}", overlay.display()));
        }
    }
}

/// Removes an overlay with its snapshots and manifest (or a clone's directory).
pub(super) fn remove_overlay(overlay: &Path) {
    if overlay.is_dir() {
        let _ = std::fs::remove_dir_all(overlay);
        return;
    }
    let (Some(dir), Some(name)) = (overlay.parent(), overlay.file_name()) else {
        return;
    };
    let name = name.to_string_lossy().into_owned();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            let f = f.strip_prefix('.').unwrap_or(&f);
            if f == name || f.starts_with(&format!("{name}@")) || f.starts_with(&format!("{name}."))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The bundle's clone of a disk at a point, for `run --at`.
const AT_CLONE: &str = "disk-at";

/// Serves a clone of the VM's disk (or of `--serve`'s image) as it was at `at`: a
/// volume with history, read without taking it from whoever serves it. The clone goes
/// when the VM ends.
async fn open_at(
    bundle: &Bundle,
    spec: &VmSpec,
    options: &RunOptions,
    at: &str,
    report: &Report,
) -> Result<DiskAccess> {
    let source = match (&options.serve, &spec.disk) {
        (Some(image), _) => {
            std::path::absolute(image).map_err(|e| Error::from(e).with_path(image))?
        }
        (None, Disk::Image { path }) => bundle.dir().join(path),
        (None, Disk::Url { .. }) => {
            return Err(Error::msg(
                ErrorKind::NotSupported,
                "--at needs the VM's disk to be a local volume with history; for a disk served \
                 elsewhere, clone the point there (strata ctl clone) and run a VM on that export",
            ));
        }
    };
    if !crate::history::is_volume(&source) {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            "--at needs a volume with history (strata create --history)",
        )
        .with_path(&source));
    }
    let clone = bundle.path(AT_CLONE);
    remove_overlay(&clone);
    let (spec_at, source2, clone2) = (at.to_owned(), source.clone(), clone.clone());
    let point = tokio::task::spawn_blocking(move || -> Result<crate::history::Point> {
        let history = std::sync::Arc::new(crate::history::History::inspect(&source2)?);
        let point = history.resolve(crate::history::PointSpec::parse(&spec_at)?)?;
        history.view(point)?.clone_to(&clone2)?;
        Ok(point)
    })
    .await
    .map_err(|e| Error::msg(ErrorKind::Io, "clone task failed").with_source(e))??;
    report(&format!(
        "booting from {} as it was at restore point {} ({}), on a clone ({})",
        source.display(),
        point.seq,
        crate::time::rfc3339_us(point.time_us),
        clone.display()
    ));
    let local = match LocalServer::start(
        &clone,
        &bundle.path("nbd.sock"),
        &bundle.path("control.sock"),
        false,
    )
    .await
    {
        Ok(l) => l,
        Err(e) => {
            remove_overlay(&clone);
            return Err(e);
        }
    };
    Ok(DiskAccess {
        url: local.url.clone(),
        control: Some(local.control.clone()),
        export: serve::EXPORT.to_owned(),
        identity: image_identity(&clone),
        local: Some(local),
        discard: Some(clone),
    })
}

fn image_identity(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// Opens the disk for this run: serves a local image or checks a remote export.
pub(super) async fn open_disk(
    bundle: &Bundle,
    spec: &mut VmSpec,
    options: &RunOptions,
    report: &Report,
) -> Result<DiskAccess> {
    let nbd_sock = bundle.path("nbd.sock");
    let control_sock = bundle.path("control.sock");
    if let Some(at) = &options.at {
        return open_at(bundle, spec, options, at, report).await;
    }
    if let Some(image) = &options.serve {
        let overlay = bundle.path(bundle::OVERLAY);
        if overlay.exists() {
            return Err(Error::msg(
                ErrorKind::AlreadyExists,
                format!(
                    "VM {:?} has a disk overlay already ({}): run it without --serve to go \
                     on with that disk",
                    bundle.name(),
                    overlay.display()
                ),
            ));
        }
        let base = std::path::absolute(image).map_err(|e| Error::from(e).with_path(image))?;
        if !base.exists() {
            return Err(Error::msg(ErrorKind::NotFound, "no such image").with_path(&base));
        }
        bundle::create_overlay(bundle.dir(), &base)?;
        report(&format!(
            "serving a new overlay of {} ({})",
            base.display(),
            overlay.display()
        ));
        let local = match LocalServer::start(&overlay, &nbd_sock, &control_sock, false).await {
            Ok(l) => l,
            Err(e) => {
                remove_overlay(&overlay);
                return Err(e);
            }
        };
        if !options.discard {
            // From now on the overlay is this VM's disk.
            spec.disk = bundle::overlay_disk();
        }
        return Ok(DiskAccess {
            url: local.url.clone(),
            control: Some(local.control.clone()),
            export: serve::EXPORT.to_owned(),
            identity: image_identity(&overlay),
            local: Some(local),
            discard: options.discard.then_some(overlay),
        });
    }
    match &spec.disk {
        Disk::Image { path } => {
            let path = bundle.dir().join(path);
            let local =
                LocalServer::start(&path, &nbd_sock, &control_sock, spec.nbd.read_only).await?;
            Ok(DiskAccess {
                url: local.url.clone(),
                control: Some(local.control.clone()),
                export: serve::EXPORT.to_owned(),
                identity: image_identity(&path),
                local: Some(local),
                discard: None,
            })
        }
        Disk::Url {
            url,
            control,
            token_file,
        } => {
            let timeout = Duration::from_secs_f64(spec.nbd.timeout_s.max(1.0));
            let info = probe::probe(url, timeout).await?;
            if let Some(size) = info.size {
                report(&format!(
                    "disk {url}: {}{}",
                    crate::size::format_size(size),
                    if info.read_only { ", read-only" } else { "" }
                ));
            }
            let token = match token_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .map_err(|e| Error::from(e).with_path(f))?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            let control = control
                .as_deref()
                .map(|c| ControlTarget::parse(c, token))
                .transpose()?;
            Ok(DiskAccess {
                url: url.clone(),
                control,
                export: url.export.clone(),
                identity: url.to_string(),
                local: None,
                discard: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_go_with_their_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "disk.strata",
            "disk.strata@vm.ckpt-1",
            "disk.strata.snapshots.json",
            ".disk.strata@x.new",
            "config.json",
            "disk.strata2",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        remove_overlay(&dir.path().join("disk.strata"));
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["config.json", "disk.strata2"]);
    }
}
