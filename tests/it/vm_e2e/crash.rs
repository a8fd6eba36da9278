//! A launcher killed in the middle of a suspend.

use std::time::Duration;

use crate::support::{poll, strata};

use super::{GUEST_TIMEOUT, Launcher, MARKER, MARKER_OFFSET, Rig, Vm, last_tick, succeeds};

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
    let Some(rig) = Rig::new() else {
        return;
    };
    // A golden image that has the marker already: the guest ticks at once.
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&rig.golden)
            .unwrap();
        f.write_all_at(format!("{MARKER}\n").as_bytes(), MARKER_OFFSET)
            .unwrap();
    }
    let vm = rig.vm("crash", rig.golden_disk(), &["--overlay"]);
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
        run.assert_logged(&format!("failpoint {failpoint}"));
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
    run.assert_exits_ok();
    let r = vm.ctl(&["checkpoints", "crash"]);
    assert!(r.stdout.contains("c1"), "{}", r.report());
    succeeds(strata().arg("check").arg(vm.bundle().join("disk.strata")));
}
