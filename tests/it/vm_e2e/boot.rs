//! A VM's life on a Strata overlay: boot, write, power off; boot again, suspend to a
//! checkpoint, resume from it; more checkpoints, resumes and deletions.

use std::time::{Duration, Instant};

use super::{
    GOLDEN, GUEST_TIMEOUT, MARKER, MARKER_OFFSET, Rig, TICK_OFFSET, Vm, last_tick, raw_copy,
    read_at, wait_for,
};

#[test]
fn boot_write_poweroff_checkpoint_resume() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let vm = rig.vm("e2e", rig.golden_disk(), &["--overlay"]);
    let overlay = vm.bundle().join("disk.strata");
    assert!(overlay.is_file());

    // Boot 1: the guest writes its marker and powers off.
    let start = Instant::now();
    let mut first = vm.launch(&["run", "e2e"], "run1.log");
    let status = first.wait(GUEST_TIMEOUT);
    let boot_to_poweroff = start.elapsed();
    let console = std::fs::read_to_string(vm.console()).unwrap_or_default();
    assert!(
        status.success(),
        "{}\n--- console ---\n{console}",
        first.log()
    );
    assert!(
        console.contains("STRATA-E2E: wrote the marker"),
        "--- console ---\n{console}"
    );
    assert!(
        console.contains("golden says GOLDEN-IMAGE-0001"),
        "{console}"
    );
    first.assert_logged("VM stopped: the guest powered off");
    eprintln!(
        "TIMING boot to poweroff: {:.2} s",
        boot_to_poweroff.as_secs_f64()
    );

    // The bytes, through Strata: the marker in the overlay, the golden image untouched.
    let raw = raw_copy(&overlay, &rig.path().join("after-boot1.raw"));
    assert_eq!(read_at(&raw, 0, GOLDEN.len()), GOLDEN);
    assert_eq!(
        read_at(&raw, MARKER_OFFSET, MARKER.len()),
        MARKER.as_bytes()
    );
    assert_eq!(
        read_at(&rig.golden, MARKER_OFFSET, MARKER.len()),
        vec![0; MARKER.len()]
    );

    // Boot 2: the guest finds the marker and ticks; a checkpoint stops it.
    let mut second = vm.launch(&["run", "e2e"], "run2.log");
    let context = || second_log(&vm);
    wait_for(
        &vm.console(),
        &format!("found {MARKER}"),
        GUEST_TIMEOUT,
        &context,
    );
    wait_for(&vm.console(), "STRATA-E2E-TICK 3", GUEST_TIMEOUT, &context);
    let start = Instant::now();
    let r = vm.ctl(&["suspend", "e2e", "--stop"]);
    let suspend_time = start.elapsed();
    assert!(r.success(), "{}\n{}", r.report(), second.log());
    assert!(
        r.stdout.contains("checkpoint ckpt-1 of e2e saved"),
        "{}",
        r.stdout
    );
    second.assert_exits_ok();
    second.assert_logged("suspended to checkpoint ckpt-1");
    eprintln!(
        "TIMING suspend (pause + snapshot + state + stop): {:.2} s: {}",
        suspend_time.as_secs_f64(),
        r.stdout.trim()
    );
    let console = std::fs::read_to_string(vm.console()).unwrap();
    let at_suspend = last_tick(&console);
    assert!(at_suspend >= 3);

    // The checkpoint: listed, its state saved, its snapshot holding the marker and the
    // last tick the guest wrote.
    let r = vm.ctl(&["checkpoints", "e2e"]);
    assert!(
        r.success() && r.stdout.contains("ckpt-1") && r.stdout.contains("vm.ckpt-1"),
        "{}",
        r.report()
    );
    let state = vm.bundle().join("checkpoints/ckpt-1.state");
    assert!(std::fs::metadata(&state).unwrap().len() > 0);
    let snapshot = vm.bundle().join("disk.strata@vm.ckpt-1");
    let raw = raw_copy(&snapshot, &rig.path().join("ckpt-1.raw"));
    assert_eq!(
        read_at(&raw, MARKER_OFFSET, MARKER.len()),
        MARKER.as_bytes()
    );
    let tick = String::from_utf8_lossy(&read_at(&raw, TICK_OFFSET, 16)).into_owned();
    let disk_tick: u64 = tick
        .trim_matches(char::from(0))
        .trim()
        .strip_prefix("TICK ")
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tick on the disk: {tick:?}"));
    assert!(
        disk_tick == at_suspend || disk_tick + 1 == at_suspend || disk_tick == at_suspend + 1,
        "the disk's tick {disk_tick} is not the guest's last one, {at_suspend}"
    );
    let listed = vm.ctl(&["list"]);
    assert!(
        listed.stdout.contains("e2e") && listed.stdout.contains("stopped"),
        "{}",
        listed.stdout
    );

    // Resume: the guest counts on from where it was, without booting again.
    let boots_before = console.matches("STRATA-E2E: init").count();
    let start = Instant::now();
    let mut third = vm.launch(&["resume", "e2e"], "resume.log");
    let next = format!("STRATA-E2E-TICK {}", at_suspend + 2);
    let context = || third_log(&vm);
    let console = wait_for(&vm.console(), &next, GUEST_TIMEOUT, &context);
    eprintln!(
        "TIMING resume to the guest's next ticks: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(
        console.matches("STRATA-E2E: init").count(),
        boots_before,
        "the guest booted again instead of resuming\n{console}"
    );
    third.assert_logged("resumed from checkpoint ckpt-1");
    let r = vm.ctl(&["status", "e2e"]);
    assert!(
        r.success() && r.stdout.contains("\"running\""),
        "{}",
        r.report()
    );
    // A second checkpoint, the VM running on; then back to the first one, which needs
    // the second one deleted.
    let r = vm.ctl(&["suspend", "e2e"]);
    assert!(
        r.success() && r.stdout.contains("checkpoint ckpt-2"),
        "{}",
        r.report()
    );
    vm.force_stop(&mut third);
    assert!(!vm.bundle().join("launcher.sock").exists());
    assert!(!vm.bundle().join("nbd.sock").exists());
    let r = vm.ctl(&["resume", "e2e", "--checkpoint", "ckpt-1"]);
    assert_eq!(r.code(), Some(1), "{}", r.report());
    assert!(
        r.stderr.contains("newer checkpoints exist (ckpt-2)"),
        "{}",
        r.report()
    );
    assert!(vm.bundle().join("checkpoints/ckpt-2.state").is_file());

    let seen = std::fs::read_to_string(vm.console()).unwrap().len();
    let mut fourth = vm.launch(
        &["resume", "e2e", "--checkpoint", "ckpt-1", "--destroy-newer"],
        "resume2.log",
    );
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let fresh = loop {
        let text = std::fs::read_to_string(vm.console()).unwrap();
        let fresh = text[seen.min(text.len())..].to_owned();
        if last_tick(&fresh) > 0 {
            break fresh;
        }
        assert!(
            Instant::now() < deadline,
            "no tick after the second resume\n{}",
            fourth.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let first_tick = fresh
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("STRATA-E2E-TICK ")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap();
    assert_eq!(
        first_tick,
        at_suspend + 1,
        "the guest should go on from checkpoint ckpt-1\n{fresh}"
    );
    let r = vm.ctl(&["checkpoints", "e2e"]);
    assert!(
        r.stdout.contains("ckpt-1") && !r.stdout.contains("ckpt-2"),
        "{}",
        r.report()
    );
    assert!(!vm.bundle().join("checkpoints/ckpt-2.state").exists());
    assert!(!vm.bundle().join("disk.strata@vm.ckpt-2").exists());

    // Deleting checkpoints: one of the running VM (through its launcher), then, with the
    // VM stopped, the last one; the disk reads as before.
    let r = vm.ctl(&["suspend", "e2e", "--checkpoint", "scratch"]);
    assert!(r.success(), "{}", r.report());
    let r = vm.ctl(&["delete-checkpoint", "e2e", "scratch"]);
    assert!(r.success(), "{}\n{}", r.report(), fourth.log());
    assert!(!vm.bundle().join("checkpoints/scratch.state").exists());
    assert!(!vm.bundle().join("disk.strata@vm.scratch").exists());
    vm.force_stop(&mut fourth);
    let before = raw_copy(&overlay, &rig.path().join("before-delete.raw"));
    let r = vm.ctl(&["delete-checkpoint", "e2e", "ckpt-1"]);
    assert!(r.success(), "{}", r.report());
    let r = vm.ctl(&["checkpoints", "e2e"]);
    assert!(!r.stdout.contains("ckpt-1"), "{}", r.report());
    assert!(!vm.bundle().join("checkpoints/ckpt-1.state").exists());
    assert!(!vm.bundle().join("disk.strata@vm.ckpt-1").exists());
    let after = raw_copy(&overlay, &rig.path().join("after-delete.raw"));
    assert!(
        std::fs::read(&before).unwrap() == std::fs::read(&after).unwrap(),
        "deleting a checkpoint changed the disk"
    );
    let r = vm.ctl(&["delete-checkpoint", "e2e", "ckpt-1"]);
    assert_eq!(r.code(), Some(1), "{}", r.report());
    assert!(
        r.stderr.contains("has no checkpoint \"ckpt-1\""),
        "{}",
        r.report()
    );
}

fn second_log(vm: &Vm) -> String {
    std::fs::read_to_string(vm.root.join("run2.log")).unwrap_or_default()
}

fn third_log(vm: &Vm) -> String {
    std::fs::read_to_string(vm.root.join("resume.log")).unwrap_or_default()
}
