//! [`VzDriver`]: a macOS VM under Virtualization.framework. Every call on the machine is
//! sent to its serial queue with a completion handler, and awaited; the delegate's
//! calls arrive as [`VmEvent`]s.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatch2::{DispatchObject, DispatchQueue, DispatchQueueAttr, DispatchRetained};
use objc2::MainThreadMarker;
use objc2::rc::Retained;
use objc2_virtualization::{
    VZNetworkBlockDeviceStorageDeviceAttachment, VZVirtualMachine, VZVirtualMachineConfiguration,
};
use tokio::sync::mpsc;

use super::app::{app_running, open_window};
use super::config::{Delegate, configure, new_machine, platform_files};
use super::queue::{Done, OnQueue, answer, completion, lock, once};
use super::{check_host, file_url, framework_error};
use crate::error::{Error, ErrorKind, Result};
use crate::vm::bundle::{self, Bundle};
use crate::vm::spec::VmSpec;
use crate::vm::url::NbdUrl;
use crate::vm::{Boot, Driver, VmEvent};

/// How long a state change may take before the driver gives up waiting.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The machine, shared with the closures sent to its queue, where it is made, used and
/// released; `None` before and after.
type Shared = Arc<Mutex<Option<OnQueue<Retained<VZVirtualMachine>>>>>;

/// A macOS VM running under Virtualization.framework.
pub struct VzDriver {
    queue: DispatchRetained<DispatchQueue>,
    machine: Shared,
    /// Kept alive: the framework holds its delegates weakly.
    _delegate: Retained<Delegate>,
    _attachment: OnQueue<Retained<VZNetworkBlockDeviceStorageDeviceAttachment>>,
    /// The configuration, for asking whether states can be saved (the machine has a
    /// copy of its own).
    config: OnQueue<Retained<VZVirtualMachineConfiguration>>,
    events: mpsc::UnboundedReceiver<VmEvent>,
    stopped: bool,
}

impl std::fmt::Debug for VzDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VzDriver").finish_non_exhaustive()
    }
}

impl Drop for VzDriver {
    fn drop(&mut self) {
        // The machine is released on its queue, after every call queued before.
        let machine = Arc::clone(&self.machine);
        self.queue.exec_async(move || drop(lock(&machine).take()));
    }
}

impl VzDriver {
    /// Configures and starts the VM of `bundle` on its disk at `url`; for a
    /// [`Boot::Restore`], restores the saved state instead (the VM is left paused).
    pub async fn start(
        bundle: &Bundle,
        spec: &VmSpec,
        url: &NbdUrl,
        headless: bool,
        boot: Boot<'_>,
    ) -> Result<VzDriver> {
        check_host()?;
        let windowed = !headless && app_running();
        if !headless && !windowed {
            tracing::warn!("no window without AppKit's event loop: the VM runs headless");
        }
        let dir = bundle.path(bundle::MACOS_DIR);
        let (aux, hardware) = platform_files(&dir)?;
        let (tx, events) = mpsc::unbounded_channel();
        let delegate = Delegate::new(tx);
        let machine = configure(spec, &dir, &aux, &hardware, url, &delegate)?;
        // A VM shown in a window must run on the main queue; others get their own.
        let queue = if windowed {
            DispatchQueue::main().retain()
        } else {
            DispatchQueue::new("org.strata.vm", DispatchQueueAttr::SERIAL)
        };
        let driver = VzDriver {
            queue,
            machine: Arc::new(Mutex::new(None)),
            _delegate: delegate.clone(),
            // SAFETY: the driver only holds the attachment, a configuration object
            // without thread affinity (the framework calls the delegate through it).
            _attachment: unsafe { OnQueue::new(machine.attachment) },
            // SAFETY: the configuration stays with the driver, which is not Sync:
            // one thread at a time asks it whether states can be saved.
            config: unsafe { OnQueue::new(machine.config.clone()) },
            events,
            stopped: false,
        };
        // SAFETY: the closure below only hands the configuration to the machine's
        // initialiser on the queue; this thread calls nothing on it meanwhile.
        let config = unsafe { OnQueue::new(machine.config) };
        let (slot, q) = (Arc::clone(&driver.machine), driver.queue.clone());
        let window = windowed.then(|| (bundle.name().to_owned(), spec.clone()));
        let (done, made) = once();
        driver.queue.exec_async(move || {
            // SAFETY: this runs on `q`, a serial queue (the main queue or one of ours).
            let vm = unsafe { new_machine(config.get(), &q, &delegate) };
            if let (Some((title, spec)), Some(mtm)) = (window, MainThreadMarker::new()) {
                open_window(mtm, &vm, &title, &spec);
            }
            // SAFETY: the machine goes into the driver's slot, which only closures on
            // this queue use, and which the driver empties here when it is dropped,
            // even before `start` has returned it.
            *lock(&slot) = Some(unsafe { OnQueue::new(vm) });
            answer(&done, ());
        });
        made.await
            .map_err(|_| Error::msg(ErrorKind::Io, "the VM's queue went away"))?;
        match boot {
            Boot::Fresh => {
                driver
                    .call("starting the VM", |vm, done| {
                        // SAFETY: on the VM's queue (`call` runs this there).
                        unsafe { vm.startWithCompletionHandler(&completion(done)) }
                    })
                    .await?;
            }
            Boot::Restore(state) => {
                driver.check_save_restore()?;
                // SAFETY: the URL is used by the closure on the queue alone.
                let url = unsafe { OnQueue::new(file_url(state)) };
                driver
                    .call("restoring the saved state", move |vm, done| {
                        // SAFETY: on the VM's queue; the VM is stopped, as restoring
                        // requires, and `url` is a file URL.
                        unsafe {
                            vm.restoreMachineStateFromURL_completionHandler(
                                url.get(),
                                &completion(done),
                            );
                        }
                    })
                    .await?;
            }
        }
        Ok(driver)
    }

    /// Fails unless this configuration's state can be saved and restored (macOS 14+,
    /// no devices that forbid it).
    fn check_save_restore(&self) -> Result<()> {
        // SAFETY: the configuration has no thread affinity, and only this thread uses
        // it now (the driver is not Sync).
        unsafe { self.config.get().validateSaveRestoreSupportWithError() }
            .map_err(|e| framework_error("this VM's state cannot be saved or restored", &e))
    }

    /// Runs `f` on the VM's queue with a completion handler, and waits for it.
    async fn call(
        &self,
        what: &'static str,
        f: impl FnOnce(&VZVirtualMachine, Done) + Send + 'static,
    ) -> Result<()> {
        let (done, rx) = once();
        let machine = Arc::clone(&self.machine);
        self.queue.exec_async(move || {
            // Without a machine (released), `done` is dropped unanswered.
            if let Some(vm) = lock(&machine).as_ref() {
                f(vm.get(), done);
            }
        });
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(why))) => Err(Error::msg(ErrorKind::Io, format!("{what}: {why}"))),
            Ok(Err(_)) => Err(Error::msg(ErrorKind::Io, format!("{what}: no answer"))),
            Err(_) => Err(Error::msg(ErrorKind::Io, format!("{what}: timed out"))),
        }
    }
}

impl Driver for VzDriver {
    fn name(&self) -> &'static str {
        "vz"
    }

    async fn pause(&mut self) -> Result<()> {
        self.call("pausing the VM", |vm, done| {
            // SAFETY: on the VM's queue (`call` runs this there).
            unsafe { vm.pauseWithCompletionHandler(&completion(done)) }
        })
        .await
    }

    async fn resume(&mut self) -> Result<()> {
        self.call("resuming the VM", |vm, done| {
            // SAFETY: on the VM's queue (`call` runs this there).
            unsafe { vm.resumeWithCompletionHandler(&completion(done)) }
        })
        .await
    }

    async fn save_state(&mut self, path: &Path) -> Result<()> {
        self.check_save_restore()?;
        // SAFETY: the URL is used by the closure on the queue alone.
        let url = unsafe { OnQueue::new(file_url(path)) };
        self.call("saving the machine state", move |vm, done| {
            // SAFETY: on the VM's queue; the VM is paused, as saving requires, and
            // `url` is a file URL.
            unsafe { vm.saveMachineStateToURL_completionHandler(url.get(), &completion(done)) }
        })
        .await
    }

    async fn request_stop(&mut self) -> Result<()> {
        self.call("asking the guest to stop", |vm, done| {
            // SAFETY: on the VM's queue (`call` runs this there).
            let result = unsafe { vm.requestStopWithError() };
            answer(
                &done,
                result.map_err(|e| e.localizedDescription().to_string()),
            );
        })
        .await
    }

    async fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.call("stopping the VM", |vm, done| {
            // SAFETY: on the VM's queue (`call` runs this there).
            unsafe { vm.stopWithCompletionHandler(&completion(done)) }
        })
        .await?;
        self.stopped = true;
        Ok(())
    }

    async fn next_event(&mut self) -> Option<VmEvent> {
        if self.stopped {
            // stopWithCompletionHandler does not call the delegate.
            self.stopped = false;
            return Some(VmEvent::Stopped {
                reason: "stopped".to_owned(),
            });
        }
        self.events.recv().await
    }
}
