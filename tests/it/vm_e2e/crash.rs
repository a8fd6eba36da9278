//! A launcher killed in the middle of a suspend.

use std::time::Duration;

use crate::support::{poll, run_timeout, strata};

use super::guest::build_guest;
use super::{GUEST_TIMEOUT, Launcher, MARKER, MARKER_OFFSET, Vm, golden, last_tick};

/// Waits until the launcher says the VM runs and the guest has ticked `ticks` times
/// since the console held `seen` bytes.
fn wait_running(vm: &Vm, launcher: &Launcher, seen: usize, ticks: u64) {
    let fresh = || {
        let console = std::fs::read_to_string(vm.console()).unwrap_or_default();
        console[seen.min(console.len())..].to_owned()
    };
    let running = poll(GUEST_TIMEOUT, || {
        (launcher.log().contains("is running") && last_tick(&fresh()) >= ticks).then_some(())
    });
    assert!(
        running.is_some(),
        "the VM did not run\n{}\n--- console ---\n{}",
        launcher.log(),
        fresh()
    );
}

/// A launcher that dies in the middle of a suspend (`STRATA_FAILPOINT`, which aborts it
/// there) leaves no checkpoint listed, a bundle that runs again, and nothing in the way
/// of taking the same checkpoint afterwards.
#[test]
fn a_crashed_suspend_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(guest) = build_guest(dir.path()) else {
        return;
    };
    // A golden image that has the marker already: the guest ticks at once.
    let golden = golden(dir.path());
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&golden)
            .unwrap();
        f.write_all_at(format!("{MARKER}\n").as_bytes(), MARKER_OFFSET)
            .unwrap();
    }
    let vm = Vm {
        root: dir.path().join("vms"),
        name: "crash",
    };
    vm.create(&guest, golden.to_str().unwrap(), &["--overlay"]);
    for (round, failpoint) in ["vm-suspend-snapshotted", "vm-suspend-saved"]
        .iter()
        .enumerate()
    {
        let seen = std::fs::read_to_string(vm.console()).map_or(0, |t| t.len());
        let mut cmd = vm.cmd();
        cmd.args(["run", "crash"])
            .env("STRATA_FAILPOINT", failpoint);
        let mut run = Launcher::spawn(cmd, vm.root.join(format!("crash-{round}.log")));
        wait_running(&vm, &run, seen, 2);
        let r = vm.ctl(&["suspend", "crash", "--checkpoint", "c1"]);
        assert!(!r.success(), "{}", r.report());
        let status = run.wait(Duration::from_secs(30));
        assert!(!status.success(), "{}", run.log());
        assert!(
            run.log().contains(&format!("failpoint {failpoint}")),
            "{}",
            run.log()
        );
        // Nothing listed; the bundle is whole and not locked.
        let r = vm.ctl(&["checkpoints", "crash"]);
        assert!(r.success() && !r.stdout.contains("c1"), "{}", r.report());
        let r = vm.ctl(&["list"]);
        assert!(
            r.success() && r.stdout.contains("stopped"),
            "{}",
            r.report()
        );
    }
    // The same checkpoint, taken properly now.
    let seen = std::fs::read_to_string(vm.console()).map_or(0, |t| t.len());
    let mut run = vm.launch(&["run", "crash"], "crash-ok.log");
    wait_running(&vm, &run, seen, 2);
    let r = vm.ctl(&["suspend", "crash", "--checkpoint", "c1", "--stop"]);
    assert!(r.success(), "{}\n{}", r.report(), run.log());
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.log());
    let r = vm.ctl(&["checkpoints", "crash"]);
    assert!(r.stdout.contains("c1"), "{}", r.report());
    let r = run_timeout(
        strata().arg("check").arg(vm.bundle().join("disk.strata")),
        Duration::from_secs(30),
    );
    assert!(r.success(), "{}", r.report());
}
