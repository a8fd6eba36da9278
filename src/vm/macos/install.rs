//! Installing macOS from a restore image (`.ipsw`): the image is loaded, its most
//! capable configuration this Mac supports gives the hardware model, a fresh auxiliary
//! storage is made for it, and the framework's installer runs on the VM's queue while
//! its progress is reported.

use std::path::Path;

use block2::RcBlock;
use dispatch2::{DispatchQueue, DispatchQueueAttr, DispatchRetained};
use objc2::AllocAnyThread;
use objc2::rc::Retained;
use objc2_foundation::NSError;
use objc2_virtualization::{
    VZMacAuxiliaryStorage, VZMacAuxiliaryStorageInitializationOptions, VZMacOSInstaller,
    VZMacOSRestoreImage,
};
use tokio::sync::mpsc;

use super::config::{Delegate, configure, new_machine};
use super::queue::{OnQueue, answer, completion, once};
use super::{AUXILIARY_STORAGE, HARDWARE_MODEL, MACHINE_IDENTIFIER};
use super::{check_host, file_url, framework_error};
use crate::error::{Error, ErrorKind, Result};
use crate::vm::bundle::{self, Bundle};
use crate::vm::spec::VmSpec;
use crate::vm::url::NbdUrl;
use crate::vm::{Progress, Report};

/// Installs macOS from the restore image `ipsw` into the VM of `bundle`, whose disk is
/// reachable at `url`; `progress` is called with the fraction done. The platform files
/// are written to `macos.installing/` and moved into `macos/` only once the install
/// has succeeded, so a failed install leaves the bundle as it was.
pub async fn install(
    bundle: &Bundle,
    spec: &VmSpec,
    url: &NbdUrl,
    ipsw: &Path,
    report: &Report,
    progress: Progress,
) -> Result<()> {
    check_host()?;
    let ipsw = std::path::absolute(ipsw).map_err(|e| Error::from(e).with_path(ipsw))?;
    if !ipsw.is_file() {
        return Err(Error::msg(ErrorKind::NotFound, "no such restore image").with_path(&ipsw));
    }
    report(&format!("loading {}", ipsw.display()));
    let image = load_restore_image(&ipsw).await?;
    let staging = bundle.path("macos.installing");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(|e| Error::from(e).with_path(&staging))?;
    let result = install_staged(
        bundle,
        spec,
        url,
        &ipsw,
        image.get(),
        &staging,
        report,
        progress,
    )
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
        return result;
    }
    let target = bundle.path(bundle::MACOS_DIR);
    for name in [HARDWARE_MODEL, AUXILIARY_STORAGE] {
        bundle::commit_file(&staging.join(name), &target.join(name))?;
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(())
}

/// Loads the restore image at `ipsw`; the framework answers on a thread of its own.
async fn load_restore_image(ipsw: &Path) -> Result<OnQueue<Retained<VZMacOSRestoreImage>>> {
    let (loaded, rx) = once();
    let block = RcBlock::new(
        move |image: *mut VZMacOSRestoreImage, error: *mut NSError| {
            // SAFETY: the framework passes a valid image or nil, and a valid error or
            // nil, both alive for the call; the image is retained before it is kept.
            let result = unsafe {
                match (Retained::retain(image), error.as_ref()) {
                    // SAFETY (OnQueue::new): the restore image, a description of the
                    // file with no thread affinity, goes to the install task, the only
                    // thread that uses it from then on.
                    (Some(image), _) => Ok(OnQueue::new(image)),
                    (None, Some(e)) => Err(e.localizedDescription().to_string()),
                    (None, None) => Err("no restore image".to_owned()),
                }
            };
            answer(&loaded, result);
        },
    );
    // SAFETY: a class method taking a file URL and a block of the type it declares
    // (image, error); the framework keeps the block until it has called it.
    unsafe { VZMacOSRestoreImage::loadFileURL_completionHandler(&file_url(ipsw), &block) };
    match rx.await {
        Ok(Ok(image)) => Ok(image),
        Ok(Err(why)) => Err(Error::msg(
            ErrorKind::InvalidInput,
            format!("cannot load the restore image: {why}"),
        )
        .with_path(ipsw)),
        Err(_) => Err(Error::msg(ErrorKind::Io, "the restore image did not load")),
    }
}

#[allow(clippy::too_many_arguments)]
async fn install_staged(
    bundle: &Bundle,
    spec: &VmSpec,
    url: &NbdUrl,
    ipsw: &Path,
    image: &VZMacOSRestoreImage,
    staging: &Path,
    report: &Report,
    progress: Progress,
) -> Result<()> {
    // SAFETY: the restore image and its requirements are value objects with no thread
    // affinity, used by this thread alone.
    let (hardware, min_cpus, min_memory) = unsafe {
        let requirements = image
            .mostFeaturefulSupportedConfiguration()
            .ok_or_else(|| {
                Error::msg(
                    ErrorKind::NotSupported,
                    "this Mac cannot run the macOS of this restore image",
                )
            })?;
        (
            requirements.hardwareModel(),
            requirements.minimumSupportedCPUCount(),
            requirements.minimumSupportedMemorySize(),
        )
    };
    if (spec.cpus as usize) < min_cpus || spec.memory < min_memory {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!(
                "this macOS needs at least {min_cpus} CPUs and {}; the VM has {} and {}",
                crate::size::format_size(min_memory),
                spec.cpus,
                crate::size::format_size(spec.memory)
            ),
        ));
    }
    // SAFETY: as above; the NSData returned is ours.
    let model = unsafe { hardware.dataRepresentation() };
    bundle::write_atomic(&staging.join(HARDWARE_MODEL), &model.to_vec())?;
    let id = bundle.path(bundle::MACOS_DIR).join(MACHINE_IDENTIFIER);
    std::fs::copy(&id, staging.join(MACHINE_IDENTIFIER))
        .map_err(|e| Error::from(e).with_path(&id))?;
    let aux_path = staging.join(AUXILIARY_STORAGE);
    // SAFETY: creates the storage file at a path in our staging directory, for a live
    // hardware model; the object made is used by this thread alone.
    let aux = unsafe {
        VZMacAuxiliaryStorage::initCreatingStorageAtURL_hardwareModel_options_error(
            VZMacAuxiliaryStorage::alloc(),
            &file_url(&aux_path),
            &hardware,
            VZMacAuxiliaryStorageInitializationOptions::AllowOverwrite,
        )
    }
    .map_err(|e| framework_error("cannot create the auxiliary storage", &e))?;

    let (tx, _events) = mpsc::unbounded_channel();
    let delegate = Delegate::new(tx);
    let machine = configure(spec, staging, &aux, &hardware, url, &delegate)?;
    let queue = DispatchQueue::new("org.strata.vm.install", DispatchQueueAttr::SERIAL);
    let (done, rx) = once();
    let (ptx, mut fraction) = mpsc::unbounded_channel::<f64>();
    // SAFETY: the configuration and the URL are used by the closure on the queue alone
    // (this thread keeps a reference to the configuration, but calls nothing on it).
    let job = unsafe { OnQueue::new((machine.config.clone(), file_url(ipsw))) };
    // The framework holds delegates weakly: this one lives until the install is over.
    let (q, d) = (queue.clone(), delegate.clone());
    queue.exec_async(move || {
        let (config, ipsw) = job.into_inner();
        // SAFETY: this runs on `q`, a serial queue of our own.
        let vm = unsafe { new_machine(&config, &q, &d) };
        // SAFETY: on the machine's queue, where the installer is bound too; `ipsw` is a
        // file URL, and the completion handler has the type the method declares.
        let installer = unsafe {
            let installer = VZMacOSInstaller::initWithVirtualMachine_restoreImageURL(
                VZMacOSInstaller::alloc(),
                &vm,
                &ipsw,
            );
            installer.installWithCompletionHandler(&completion(done));
            installer
        };
        // SAFETY: the installer stays on this queue: poll_progress uses it here and
        // schedules itself here, until it drops it here.
        poll_progress(q, unsafe { OnQueue::new(installer) }, ptx);
    });
    report("installing macOS (this takes a while)");
    let mut rx = rx;
    loop {
        tokio::select! {
            f = fraction.recv() => if let Some(f) = f { progress(f) },
            r = &mut rx => {
                return match r {
                    Ok(Ok(())) => {
                        progress(1.0);
                        Ok(())
                    }
                    Ok(Err(why)) => Err(Error::msg(ErrorKind::Io, format!("the install failed: {why}"))),
                    Err(_) => Err(Error::msg(ErrorKind::Io, "the installer went away")),
                };
            }
        }
    }
}

/// Reports the installer's progress every half second, until it is done or the
/// receiver is gone. Runs on `queue`, which must be the installer's.
fn poll_progress(
    queue: DispatchRetained<DispatchQueue>,
    installer: OnQueue<Retained<VZMacOSInstaller>>,
    tx: mpsc::UnboundedSender<f64>,
) {
    // SAFETY: this runs on the installer's queue, as `installer` was promised to be
    // used (install_staged calls this there, and the next call is scheduled on the
    // same queue below).
    let fraction = unsafe { installer.get().progress() }.fractionCompleted();
    if tx.send(fraction).is_err() || fraction >= 1.0 {
        return;
    }
    let q = queue.clone();
    let when = dispatch2::DispatchTime::NOW.time(500_000_000);
    let _ = q.after(when, move || poll_progress(queue, installer, tx));
}
