//! AppKit for VMs with a display: the event loop must own the main thread, and a VM's
//! window and its `VZVirtualMachineView` must be made there, so the command line hands
//! the main thread over before anything else runs.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

use objc2::rc::Retained;
use objc2::{MainThreadMarker, MainThreadOnly};
use objc2_app_kit::{
    NSApplication, NSApplicationActivationPolicy, NSBackingStoreType, NSWindow, NSWindowStyleMask,
};
use objc2_foundation::{NSPoint, NSRect, NSSize, NSString};
use objc2_virtualization::{VZVirtualMachine, VZVirtualMachineView};

use crate::vm::VmSpec;

/// Set once AppKit's event loop runs on the main thread ([`run_app`]): only then can a
/// VM have a window.
static APP_RUNNING: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The VMs' windows, kept on the main thread (AppKit objects are released there).
    static WINDOWS: RefCell<Vec<Retained<NSWindow>>> = const { RefCell::new(Vec::new()) };
}

/// Whether VMs can get a window: AppKit's event loop runs.
pub(super) fn app_running() -> bool {
    APP_RUNNING.load(Ordering::SeqCst)
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
pub(super) fn open_window(
    mtm: MainThreadMarker,
    vm: &VZVirtualMachine,
    title: &str,
    spec: &VmSpec,
) {
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
    // SAFETY: on the main thread (`mtm` proves it), with a valid frame. A window
    // releases itself when closed unless told otherwise, which would leave the
    // reference in WINDOWS dangling: `setReleasedWhenClosed(false)` before anyone can
    // close it, and WINDOWS keeps it alive instead.
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
    // SAFETY: on the main thread (`mtm`), where views are made and used; `vm` runs on
    // the main queue, as a view showing it requires, and this runs there.
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
