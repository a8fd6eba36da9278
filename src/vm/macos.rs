//! The Virtualization.framework driver: macOS guests on macOS 14+ hosts with Apple
//! silicon, their disk attached with the framework's own NBD client
//! (`VZNetworkBlockDeviceStorageDeviceAttachment`).
//!
//! The driver is thin: it turns a [`VmSpec`] into a `VZVirtualMachineConfiguration`,
//! runs the machine on a serial dispatch queue of its own (every call on the machine
//! happens there, and so do the framework's callbacks), and turns completion handlers
//! and delegate calls into futures and [`VmEvent`]s. Everything else (the bundle, the
//! checkpoints, the disk server, the orchestration) is the portable launcher's.
//!
//! The platform's identity lives in the bundle's `macos/` directory: the hardware model
//! and the auxiliary storage come from the restore image at install time; the machine
//! identifier is made when the bundle is created.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use block2::RcBlock;
use dispatch2::{DispatchObject, DispatchQueue, DispatchQueueAttr, DispatchRetained};
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2::{
    AllocAnyThread, DefinedClass, MainThreadMarker, MainThreadOnly, define_class, msg_send,
};
use objc2_app_kit::{
    NSApplication, NSApplicationActivationPolicy, NSBackingStoreType, NSWindow, NSWindowStyleMask,
};
use objc2_foundation::{
    NSArray, NSData, NSError, NSObject, NSObjectProtocol, NSOperatingSystemVersion, NSPoint,
    NSProcessInfo, NSRect, NSSize, NSString, NSURL,
};
use objc2_virtualization::{
    VZDiskSynchronizationMode, VZEntropyDeviceConfiguration, VZGraphicsDeviceConfiguration,
    VZKeyboardConfiguration, VZMacAuxiliaryStorage, VZMacAuxiliaryStorageInitializationOptions,
    VZMacGraphicsDeviceConfiguration, VZMacGraphicsDisplayConfiguration, VZMacHardwareModel,
    VZMacKeyboardConfiguration, VZMacMachineIdentifier, VZMacOSBootLoader, VZMacOSInstaller,
    VZMacOSRestoreImage, VZMacPlatformConfiguration, VZNATNetworkDeviceAttachment,
    VZNetworkBlockDeviceStorageDeviceAttachment,
    VZNetworkBlockDeviceStorageDeviceAttachmentDelegate, VZNetworkDeviceConfiguration,
    VZPointingDeviceConfiguration, VZStorageDeviceConfiguration,
    VZUSBScreenCoordinatePointingDeviceConfiguration, VZVirtioBlockDeviceConfiguration,
    VZVirtioEntropyDeviceConfiguration, VZVirtioNetworkDeviceConfiguration, VZVirtualMachine,
    VZVirtualMachineConfiguration, VZVirtualMachineDelegate, VZVirtualMachineView,
};
use tokio::sync::{mpsc, oneshot};

use super::bundle::{self, Bundle};
use super::spec::{Network, SyncMode, VmSpec};
use super::url::NbdUrl;
use super::{Boot, Driver, Progress, Report, VmEvent};
use crate::error::{Error, ErrorKind, Result};

/// The hardware model, from the restore image (`dataRepresentation`).
pub const HARDWARE_MODEL: &str = "hardware-model";
/// The machine identifier (`dataRepresentation`), unique to the VM.
pub const MACHINE_IDENTIFIER: &str = "machine-identifier";
/// The auxiliary storage (the VM's NVRAM).
pub const AUXILIARY_STORAGE: &str = "auxiliary-storage";

/// How long a state change may take before the driver gives up waiting.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

fn framework_error(what: &str, e: &NSError) -> Error {
    Error::msg(
        ErrorKind::Io,
        format!("{what}: {}", e.localizedDescription()),
    )
}

/// Set once AppKit's event loop runs on the main thread ([`run_app`]): only then can a
/// VM have a window.
static APP_RUNNING: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The VMs' windows, kept on the main thread (AppKit objects are released there).
    static WINDOWS: RefCell<Vec<Retained<NSWindow>>> = const { RefCell::new(Vec::new()) };
}

/// Runs AppKit's event loop on the main thread (which must be the caller's) while
/// `work` runs on another thread, and ends the process with `work`'s exit code. A VM
/// with a display needs this: its window and its `VZVirtualMachineView` live on the
/// main thread, and the VM on the main queue.
pub fn run_app(work: impl FnOnce() -> i32 + Send + 'static) -> ! {
    let Some(mtm) = MainThreadMarker::new() else {
        std::process::exit(work());
    };
    let app = NSApplication::sharedApplication(mtm);
    app.setActivationPolicy(NSApplicationActivationPolicy::Regular);
    APP_RUNNING.store(true, Ordering::SeqCst);
    std::thread::spawn(move || {
        let code = work();
        std::process::exit(code);
    });
    app.run();
    std::process::exit(0)
}

/// Opens a window showing `vm`'s display. Runs on the main thread.
fn open_window(mtm: MainThreadMarker, vm: &VZVirtualMachine, title: &str, spec: &VmSpec) {
    let macos = spec.macos.clone().unwrap_or_default();
    // Pixels are points on a standard display and half of them on a Retina one; the
    // window can be resized, and the guest's display follows it.
    let size = NSSize::new(
        f64::from(macos.display_width) / 2.0,
        f64::from(macos.display_height) / 2.0,
    );
    let style = NSWindowStyleMask::Titled
        | NSWindowStyleMask::Closable
        | NSWindowStyleMask::Miniaturizable
        | NSWindowStyleMask::Resizable;
    // SAFETY: on the main thread, with a valid frame; the window is kept alive in
    // WINDOWS rather than released when closed.
    let window = unsafe {
        let window = NSWindow::initWithContentRect_styleMask_backing_defer(
            NSWindow::alloc(mtm),
            NSRect::new(NSPoint::new(0.0, 0.0), size),
            style,
            NSBackingStoreType::Buffered,
            false,
        );
        window.setReleasedWhenClosed(false);
        window
    };
    window.setTitle(&NSString::from_str(title));
    // SAFETY: on the main thread; the VM runs on the main queue, as the view requires.
    let view = unsafe {
        let view = VZVirtualMachineView::new(mtm);
        view.setVirtualMachine(Some(vm));
        view.setCapturesSystemKeys(true);
        view.setAutomaticallyReconfiguresDisplay(true);
        view
    };
    window.setContentView(Some(&view));
    window.center();
    window.makeKeyAndOrderFront(None);
    NSApplication::sharedApplication(mtm).activate();
    WINDOWS.with(|w| w.borrow_mut().push(window));
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
    // SAFETY: a class property, readable from any thread.
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
    // SAFETY: creating a value object; no thread requirements.
    let id = unsafe { VZMacMachineIdentifier::new() };
    // SAFETY: as above.
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

/// Something only ever touched on the VM's queue, so that it may be moved there.
struct OnQueue<T>(T);
// SAFETY: the wrapped framework objects are only used from closures that run on the
// VM's serial queue, as the framework requires; moving the reference between threads
// does not touch the object.
unsafe impl<T> Send for OnQueue<T> {}

/// The instance variables of [`Delegate`]: where events go.
struct DelegateIvars {
    events: mpsc::UnboundedSender<VmEvent>,
}

define_class!(
    // SAFETY: NSObject has no subclassing requirements, and Delegate does not implement
    // Drop.
    #[unsafe(super(NSObject))]
    #[name = "StrataVmDelegate"]
    #[ivars = DelegateIvars]
    struct Delegate;

    unsafe impl NSObjectProtocol for Delegate {}

    unsafe impl VZVirtualMachineDelegate for Delegate {
        #[unsafe(method(guestDidStopVirtualMachine:))]
        fn guest_did_stop(&self, _vm: &VZVirtualMachine) {
            self.send(VmEvent::Stopped {
                reason: "the guest shut down".to_owned(),
            });
        }

        #[unsafe(method(virtualMachine:didStopWithError:))]
        fn did_stop_with_error(&self, _vm: &VZVirtualMachine, error: &NSError) {
            self.send(VmEvent::Failed(format!(
                "the VM stopped: {}",
                error.localizedDescription()
            )));
        }
    }

    unsafe impl VZNetworkBlockDeviceStorageDeviceAttachmentDelegate for Delegate {
        #[unsafe(method(attachmentWasConnected:))]
        fn attachment_was_connected(
            &self,
            _attachment: &VZNetworkBlockDeviceStorageDeviceAttachment,
        ) {
            self.send(VmEvent::DiskConnected);
        }

        #[unsafe(method(attachment:didEncounterError:))]
        fn attachment_did_encounter_error(
            &self,
            _attachment: &VZNetworkBlockDeviceStorageDeviceAttachment,
            error: &NSError,
        ) {
            self.send(VmEvent::DiskError {
                message: format!("the NBD client gave up: {}", error.localizedDescription()),
                fatal: true,
            });
        }
    }
);

impl Delegate {
    fn new(events: mpsc::UnboundedSender<VmEvent>) -> Retained<Delegate> {
        let this = Self::alloc().set_ivars(DelegateIvars { events });
        // SAFETY: NSObject's init, on a freshly allocated object.
        unsafe { msg_send![super(this), init] }
    }

    fn send(&self, event: VmEvent) {
        let _ = self.ivars().events.send(event);
    }
}

/// The configuration and what must outlive it.
struct Machine {
    config: Retained<VZVirtualMachineConfiguration>,
    /// The NBD attachment; its delegate is weak in the framework.
    attachment: Retained<VZNetworkBlockDeviceStorageDeviceAttachment>,
}

/// Builds the VM's configuration from the spec and the platform files in `platform`.
fn configure(
    spec: &VmSpec,
    platform_dir: &Path,
    aux: &VZMacAuxiliaryStorage,
    hardware: &VZMacHardwareModel,
    url: &NbdUrl,
    delegate: &Delegate,
) -> Result<Machine> {
    let macos = spec.macos.clone().unwrap_or_default();
    // SAFETY: the framework's configuration objects are plain value objects with no
    // thread requirements; every argument is a live object.
    unsafe {
        let id_data = read_platform_file(platform_dir, MACHINE_IDENTIFIER)?;
        let identifier = VZMacMachineIdentifier::initWithDataRepresentation(
            VZMacMachineIdentifier::alloc(),
            &id_data,
        )
        .ok_or_else(|| Error::msg(ErrorKind::Corrupt, "the machine identifier is damaged"))?;
        let platform = VZMacPlatformConfiguration::new();
        platform.setHardwareModel(hardware);
        platform.setMachineIdentifier(&identifier);
        platform.setAuxiliaryStorage(Some(aux));

        let config = VZVirtualMachineConfiguration::new();
        config.setPlatform(&platform);
        config.setBootLoader(Some(&VZMacOSBootLoader::new()));
        config.setCPUCount(spec.cpus as usize);
        config.setMemorySize(spec.memory);

        // The disk: validate the URL the framework's way first, so a URL it refuses is
        // named as such rather than as a failed start.
        let text = url.to_string();
        let nsurl = NSURL::URLWithString(&NSString::from_str(&text))
            .ok_or_else(|| Error::msg(ErrorKind::InvalidInput, format!("{text:?} is not a URL")))?;
        VZNetworkBlockDeviceStorageDeviceAttachment::validateURL_error(&nsurl).map_err(|e| {
            framework_error(&format!("Virtualization.framework refuses {text}"), &e)
        })?;
        let mode = match spec.nbd.sync {
            SyncMode::Full => VZDiskSynchronizationMode::Full,
            SyncMode::None => VZDiskSynchronizationMode::None,
        };
        let attachment =
            VZNetworkBlockDeviceStorageDeviceAttachment::initWithURL_timeout_forcedReadOnly_synchronizationMode_error(
                VZNetworkBlockDeviceStorageDeviceAttachment::alloc(),
                &nsurl,
                spec.nbd.timeout_s,
                spec.nbd.read_only,
                mode,
            )
            .map_err(|e| framework_error("cannot attach the NBD disk", &e))?;
        attachment.setDelegate(Some(ProtocolObject::from_ref(delegate)));
        let block = VZVirtioBlockDeviceConfiguration::initWithAttachment(
            VZVirtioBlockDeviceConfiguration::alloc(),
            &attachment,
        );
        let storage: Retained<VZStorageDeviceConfiguration> = Retained::into_super(block);
        config.setStorageDevices(&NSArray::from_retained_slice(&[storage]));

        let display =
            VZMacGraphicsDisplayConfiguration::initWithWidthInPixels_heightInPixels_pixelsPerInch(
                VZMacGraphicsDisplayConfiguration::alloc(),
                macos.display_width as isize,
                macos.display_height as isize,
                80,
            );
        let graphics = VZMacGraphicsDeviceConfiguration::new();
        graphics.setDisplays(&NSArray::from_retained_slice(&[display]));
        let graphics: Retained<VZGraphicsDeviceConfiguration> = Retained::into_super(graphics);
        config.setGraphicsDevices(&NSArray::from_retained_slice(&[graphics]));
        let keyboard: Retained<VZKeyboardConfiguration> =
            Retained::into_super(VZMacKeyboardConfiguration::new());
        config.setKeyboards(&NSArray::from_retained_slice(&[keyboard]));
        let pointer: Retained<VZPointingDeviceConfiguration> =
            Retained::into_super(VZUSBScreenCoordinatePointingDeviceConfiguration::new());
        config.setPointingDevices(&NSArray::from_retained_slice(&[pointer]));
        let entropy: Retained<VZEntropyDeviceConfiguration> =
            Retained::into_super(VZVirtioEntropyDeviceConfiguration::new());
        config.setEntropyDevices(&NSArray::from_retained_slice(&[entropy]));
        if spec.network == Network::Nat {
            let nic = VZVirtioNetworkDeviceConfiguration::new();
            nic.setAttachment(Some(&VZNATNetworkDeviceAttachment::new()));
            let nic: Retained<VZNetworkDeviceConfiguration> = Retained::into_super(nic);
            config.setNetworkDevices(&NSArray::from_retained_slice(&[nic]));
        }
        config
            .validateWithError()
            .map_err(|e| framework_error("the VM's configuration is refused", &e))?;
        Ok(Machine { config, attachment })
    }
}

fn platform_files(
    dir: &Path,
) -> Result<(
    Retained<VZMacAuxiliaryStorage>,
    Retained<VZMacHardwareModel>,
)> {
    let data = read_platform_file(dir, HARDWARE_MODEL)?;
    // SAFETY: value objects with no thread requirements.
    unsafe {
        let hardware =
            VZMacHardwareModel::initWithDataRepresentation(VZMacHardwareModel::alloc(), &data)
                .ok_or_else(|| Error::msg(ErrorKind::Corrupt, "the hardware model is damaged"))?;
        if !hardware.isSupported() {
            return Err(Error::msg(
                ErrorKind::NotSupported,
                "this Mac does not support the VM's hardware model (installed by a newer macOS?)",
            ));
        }
        let aux_path = dir.join(AUXILIARY_STORAGE);
        if !aux_path.is_file() {
            return Err(Error::msg(
                ErrorKind::NotFound,
                "the VM's auxiliary storage is missing: is macOS installed?",
            )
            .with_path(&aux_path));
        }
        let aux = VZMacAuxiliaryStorage::initWithURL(
            VZMacAuxiliaryStorage::alloc(),
            &file_url(&aux_path),
        );
        Ok((aux, hardware))
    }
}

/// A completion handler's outcome, sent from whatever thread the framework calls it on.
type Done = Arc<Mutex<Option<oneshot::Sender<std::result::Result<(), String>>>>>;

fn completion(done: Done) -> RcBlock<dyn Fn(*mut NSError)> {
    RcBlock::new(move |error: *mut NSError| {
        // SAFETY: the framework passes nil or a valid NSError that lives for the call.
        let result = match unsafe { error.as_ref() } {
            None => Ok(()),
            Some(e) => Err(e.localizedDescription().to_string()),
        };
        if let Some(tx) = done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = tx.send(result);
        }
    })
}

/// A macOS VM running under Virtualization.framework.
pub struct VzDriver {
    queue: DispatchRetained<DispatchQueue>,
    vm: Arc<Mutex<OnQueue<Retained<VZVirtualMachine>>>>,
    /// Kept alive: the framework holds its delegates weakly.
    _delegate: OnQueue<Retained<Delegate>>,
    _attachment: OnQueue<Retained<VZNetworkBlockDeviceStorageDeviceAttachment>>,
    config: OnQueue<Retained<VZVirtualMachineConfiguration>>,
    events: mpsc::UnboundedReceiver<VmEvent>,
    stopped: bool,
}

impl std::fmt::Debug for VzDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VzDriver").finish_non_exhaustive()
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
        let windowed = !headless && APP_RUNNING.load(Ordering::SeqCst);
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
        let vm = {
            let (done, wait) = oneshot::channel();
            let config = OnQueue(machine.config.clone());
            let delegate = OnQueue(delegate.clone());
            let q = OnQueue(queue.clone());
            let window = windowed.then(|| OnQueue((bundle.name().to_owned(), spec.clone())));
            queue.exec_async(move || {
                let (config, delegate, q, window) = (config, delegate, q, window);
                // SAFETY: runs on the queue the VM is bound to; the configuration was
                // validated.
                let vm = unsafe {
                    VZVirtualMachine::initWithConfiguration_queue(
                        VZVirtualMachine::alloc(),
                        &config.0,
                        &q.0,
                    )
                };
                // SAFETY: on the VM's queue.
                unsafe { vm.setDelegate(Some(ProtocolObject::from_ref(&*delegate.0))) };
                if let (Some(window), Some(mtm)) = (window, MainThreadMarker::new()) {
                    let (title, spec) = window.0;
                    open_window(mtm, &vm, &title, &spec);
                }
                let _ = done.send(OnQueue(vm));
            });
            wait.await
                .map_err(|_| Error::msg(ErrorKind::Io, "the VM's queue went away"))?
        };
        let driver = VzDriver {
            queue,
            vm: Arc::new(Mutex::new(vm)),
            _delegate: OnQueue(delegate),
            _attachment: OnQueue(machine.attachment),
            config: OnQueue(machine.config),
            events,
            stopped: false,
        };
        match boot {
            Boot::Fresh => {
                driver
                    .call("starting the VM", |vm, done| {
                        // SAFETY: on the VM's queue.
                        unsafe { vm.startWithCompletionHandler(&completion(done)) }
                    })
                    .await?;
            }
            Boot::Restore(state) => {
                driver.check_save_restore()?;
                let url = OnQueue(file_url(state));
                driver
                    .call("restoring the saved state", move |vm, done| {
                        let url = url;
                        // SAFETY: on the VM's queue; the VM is stopped.
                        unsafe {
                            vm.restoreMachineStateFromURL_completionHandler(
                                &url.0,
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
        // SAFETY: the configuration is a value object.
        unsafe { self.config.0.validateSaveRestoreSupportWithError() }
            .map_err(|e| framework_error("this VM's state cannot be saved or restored", &e))
    }

    /// Runs `f` on the VM's queue with a completion handler, and waits for it.
    async fn call(
        &self,
        what: &'static str,
        f: impl FnOnce(&VZVirtualMachine, Done) + Send + 'static,
    ) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let done: Done = Arc::new(Mutex::new(Some(tx)));
        let vm = Arc::clone(&self.vm);
        let job = OnQueue((vm, f));
        self.queue.exec_async(move || {
            let job = job;
            let (vm, f) = job.0;
            let guard = vm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&guard.0, done);
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
            // SAFETY: on the VM's queue.
            unsafe { vm.pauseWithCompletionHandler(&completion(done)) }
        })
        .await
    }

    async fn resume(&mut self) -> Result<()> {
        self.call("resuming the VM", |vm, done| {
            // SAFETY: on the VM's queue.
            unsafe { vm.resumeWithCompletionHandler(&completion(done)) }
        })
        .await
    }

    async fn save_state(&mut self, path: &Path) -> Result<()> {
        self.check_save_restore()?;
        let url = OnQueue(file_url(path));
        self.call("saving the machine state", move |vm, done| {
            let url = url;
            // SAFETY: on the VM's queue; the VM is paused.
            unsafe { vm.saveMachineStateToURL_completionHandler(&url.0, &completion(done)) }
        })
        .await
    }

    async fn request_stop(&mut self) -> Result<()> {
        self.call("asking the guest to stop", |vm, done| {
            // SAFETY: on the VM's queue.
            let result = unsafe { vm.requestStopWithError() };
            let outcome = result.map_err(|e| e.localizedDescription().to_string());
            if let Some(tx) = done
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
            {
                let _ = tx.send(outcome);
            }
        })
        .await
    }

    async fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.call("stopping the VM", |vm, done| {
            // SAFETY: on the VM's queue.
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
        bundle, spec, url, &ipsw, &image.0, &staging, report, progress,
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

async fn load_restore_image(ipsw: &Path) -> Result<OnQueue<Retained<VZMacOSRestoreImage>>> {
    let (tx, rx) = oneshot::channel();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let block = RcBlock::new(
        move |image: *mut VZMacOSRestoreImage, error: *mut NSError| {
            // SAFETY: the framework passes a valid image or a valid error (or nil).
            let result = unsafe {
                match (Retained::retain(image), error.as_ref()) {
                    (Some(image), _) => Ok(OnQueue(image)),
                    (None, Some(e)) => Err(e.localizedDescription().to_string()),
                    (None, None) => Err("no restore image".to_owned()),
                }
            };
            if let Some(tx) = tx
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
            {
                let _ = tx.send(result);
            }
        },
    );
    // SAFETY: a class method taking a file URL and a block; the block is retained by
    // the framework until it is called.
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
    // SAFETY: value objects with no thread requirements.
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
    // SAFETY: as above.
    let model = unsafe { hardware.dataRepresentation() };
    bundle::write_atomic(&staging.join(HARDWARE_MODEL), &model.to_vec())?;
    let id = bundle.path(bundle::MACOS_DIR).join(MACHINE_IDENTIFIER);
    std::fs::copy(&id, staging.join(MACHINE_IDENTIFIER))
        .map_err(|e| Error::from(e).with_path(&id))?;
    let aux_path = staging.join(AUXILIARY_STORAGE);
    // SAFETY: creates a file at a path of ours.
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
    let (tx, rx) = oneshot::channel();
    let done: Done = Arc::new(Mutex::new(Some(tx)));
    let (ptx, mut fraction) = mpsc::unbounded_channel::<f64>();
    let job = OnQueue((
        machine.config.clone(),
        delegate.clone(),
        queue.clone(),
        file_url(ipsw),
    ));
    queue.exec_async(move || {
        let job = job;
        let (config, delegate, q, ipsw) = job.0;
        // SAFETY: on the queue the VM is bound to; the configuration was validated.
        unsafe {
            let vm = VZVirtualMachine::initWithConfiguration_queue(
                VZVirtualMachine::alloc(),
                &config,
                &q,
            );
            vm.setDelegate(Some(ProtocolObject::from_ref(&*delegate)));
            let installer = VZMacOSInstaller::initWithVirtualMachine_restoreImageURL(
                VZMacOSInstaller::alloc(),
                &vm,
                &ipsw,
            );
            installer.installWithCompletionHandler(&completion(done));
            poll_progress(OnQueue(q.clone()), OnQueue(installer), ptx);
        }
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

/// Reports the installer's progress every half second, from the VM's queue, until the
/// receiver is gone.
fn poll_progress(
    queue: OnQueue<DispatchRetained<DispatchQueue>>,
    installer: OnQueue<Retained<VZMacOSInstaller>>,
    tx: mpsc::UnboundedSender<f64>,
) {
    // SAFETY: on the VM's queue, where the installer lives.
    let fraction = unsafe { installer.0.progress() }.fractionCompleted();
    if tx.send(fraction).is_err() || fraction >= 1.0 {
        return;
    }
    let q = queue.0.clone();
    let when = dispatch2::DispatchTime::NOW.time(500_000_000);
    let _ = q.after(when, move || {
        let (queue, installer) = (queue, installer);
        poll_progress(queue, installer, tx);
    });
}

/// The bundle's macOS directory, for messages.
pub fn platform_dir(bundle: &Bundle) -> PathBuf {
    bundle.path(bundle::MACOS_DIR)
}
