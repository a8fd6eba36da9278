//! The machine's configuration, made from the spec and the platform's files, and the
//! delegate through which the framework reports what happens to the machine and its
//! disk.

use std::path::Path;

use dispatch2::DispatchQueue;
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2::{AllocAnyThread, DefinedClass, define_class, msg_send};
use objc2_foundation::{NSArray, NSError, NSObject, NSObjectProtocol, NSString, NSURL};
use objc2_virtualization::{
    VZDiskSynchronizationMode, VZEntropyDeviceConfiguration, VZGraphicsDeviceConfiguration,
    VZKeyboardConfiguration, VZMacAuxiliaryStorage, VZMacGraphicsDeviceConfiguration,
    VZMacGraphicsDisplayConfiguration, VZMacHardwareModel, VZMacKeyboardConfiguration,
    VZMacMachineIdentifier, VZMacOSBootLoader, VZMacPlatformConfiguration,
    VZNATNetworkDeviceAttachment, VZNetworkBlockDeviceStorageDeviceAttachment,
    VZNetworkBlockDeviceStorageDeviceAttachmentDelegate, VZNetworkDeviceConfiguration,
    VZPointingDeviceConfiguration, VZStorageDeviceConfiguration,
    VZUSBScreenCoordinatePointingDeviceConfiguration, VZVirtioBlockDeviceConfiguration,
    VZVirtioEntropyDeviceConfiguration, VZVirtioNetworkDeviceConfiguration, VZVirtualMachine,
    VZVirtualMachineConfiguration, VZVirtualMachineDelegate,
};
use tokio::sync::mpsc;

use super::{AUXILIARY_STORAGE, HARDWARE_MODEL, MACHINE_IDENTIFIER};
use super::{file_url, framework_error, read_platform_file};
use crate::error::{Error, ErrorKind, Result};
use crate::vm::VmEvent;
use crate::vm::spec::{Network, SyncMode, VmSpec};
use crate::vm::url::NbdUrl;

/// The instance variables of `Delegate`: where events go.
pub(super) struct DelegateIvars {
    events: mpsc::UnboundedSender<VmEvent>,
}

define_class!(
    // SAFETY: NSObject has no invariants a subclass must keep, and Delegate does not
    // implement Drop. Its ivars (an unbounded sender) are Send and Sync, so the
    // delegate may be called from the VM's queue while it is held elsewhere.
    #[unsafe(super(NSObject))]
    #[name = "StrataVmDelegate"]
    #[ivars = DelegateIvars]
    pub(super) struct Delegate;

    // SAFETY: the NSObject protocol's methods are all inherited from NSObject.
    unsafe impl NSObjectProtocol for Delegate {}

    // SAFETY: every method of the protocol is optional; those below take the argument
    // types and return the void the protocol declares for their selectors (checked
    // against objc2-virtualization's declaration of the protocol), and only send on a
    // channel, which any thread may do.
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

    // SAFETY: as for VZVirtualMachineDelegate: optional methods, declared with the
    // protocol's argument and return types.
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
    /// A delegate that sends what it is told to `events`.
    pub(super) fn new(events: mpsc::UnboundedSender<VmEvent>) -> Retained<Delegate> {
        let this = Self::alloc().set_ivars(DelegateIvars { events });
        // SAFETY: NSObject's `init` on a freshly allocated object whose ivars are set;
        // it returns the same object, initialised.
        unsafe { msg_send![super(this), init] }
    }

    fn send(&self, event: VmEvent) {
        let _ = self.ivars().events.send(event);
    }
}

/// The configuration and what must outlive it.
pub(super) struct Machine {
    /// The validated configuration.
    pub(super) config: Retained<VZVirtualMachineConfiguration>,
    /// The NBD attachment; its delegate is weak in the framework.
    pub(super) attachment: Retained<VZNetworkBlockDeviceStorageDeviceAttachment>,
}

/// Builds the VM's configuration from the spec and the platform files in
/// `platform_dir`.
pub(super) fn configure(
    spec: &VmSpec,
    platform_dir: &Path,
    aux: &VZMacAuxiliaryStorage,
    hardware: &VZMacHardwareModel,
    url: &NbdUrl,
    delegate: &Delegate,
) -> Result<Machine> {
    let macos = spec.macos.clone().unwrap_or_default();
    // SAFETY: configuration objects have no thread affinity, and these are made here
    // and used by this thread alone; every argument is a live object of the type the
    // method declares. The attachment's delegate is a zeroing weak reference, so it
    // cannot dangle if the delegate goes first.
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

/// The platform's hardware model and auxiliary storage, from the files in `dir`.
pub(super) fn platform_files(
    dir: &Path,
) -> Result<(
    Retained<VZMacAuxiliaryStorage>,
    Retained<VZMacHardwareModel>,
)> {
    let data = read_platform_file(dir, HARDWARE_MODEL)?;
    // SAFETY: the hardware model and the auxiliary storage are value objects with no
    // thread affinity, made here from live arguments and used by this thread alone.
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

/// Makes the machine of `config`, bound to `queue`, its events going to `delegate`.
///
/// # Safety
///
/// Must run on `queue`, which must be serial: the machine is bound to it and may only
/// be used there, from its creation on.
pub(super) unsafe fn new_machine(
    config: &VZVirtualMachineConfiguration,
    queue: &DispatchQueue,
    delegate: &Delegate,
) -> Retained<VZVirtualMachine> {
    // SAFETY: `config` was validated by `configure` (the initialiser copies it); `queue`
    // is serial and this runs on it, as the caller promises, so the machine's first
    // call is made on its own queue.
    unsafe {
        let vm =
            VZVirtualMachine::initWithConfiguration_queue(VZVirtualMachine::alloc(), config, queue);
        vm.setDelegate(Some(ProtocolObject::from_ref(delegate)));
        vm
    }
}
