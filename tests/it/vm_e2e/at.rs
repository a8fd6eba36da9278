//! A VM on a volume with history booted as its disk was before a file was deleted: the
//! guest finds the file again, on a clone, and the live disk is left alone.

use std::time::Duration;

use super::{GUEST_TIMEOUT, MARKER, MARKER_OFFSET, Rig, raw_copy, read_at, succeeds, wait_for};
use crate::support::strata;

#[test]
fn run_at_a_point_before_the_file_was_deleted_finds_it() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let dir = rig.path();
    let vol = dir.join("vol");
    succeeds(
        strata()
            .arg("create")
            .arg(&vol)
            .arg("--backing")
            .arg(&rig.golden)
            .args(["--history", "1h"]),
    );
    let vm = rig.vm("cdp", vol.to_str().unwrap(), &[]);

    // Boot 1: the guest writes its marker (the "file") and powers off; its flush is a
    // restore point.
    let mut first = vm.launch(&["run", "cdp"], "at1.log");
    assert!(first.wait(GUEST_TIMEOUT).success(), "{}", first.log());
    let console = std::fs::read_to_string(vm.console()).unwrap_or_default();
    assert!(
        console.contains("STRATA-E2E: wrote the marker"),
        "{console}"
    );
    let points = succeeds(strata().arg("history").arg(&vol).arg("--json")).json();
    let before = points["points"].as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap();

    // The disaster: the marker is wiped, durably.
    let sock = dir.join("wipe.sock");
    let mut server = super::serve_unix(&sock, &[vol.as_os_str()], &sock, dir.join("wipe.log"));
    succeeds(
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("write -z {MARKER_OFFSET} 4096"))
            .arg(format!("nbd+unix:///vol?socket={}", sock.display())),
    );
    // SAFETY: SIGTERM to the server this test started.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert!(
        server.wait(Duration::from_secs(20)).success(),
        "{}",
        server.log()
    );
    let live = raw_copy(&vol, &dir.join("live.raw"));
    assert_eq!(
        read_at(&live, MARKER_OFFSET, MARKER.len()),
        vec![0; MARKER.len()],
        "wiped"
    );

    // Boot 2, at the point before the wipe: the guest finds the marker and ticks.
    let _ = std::fs::remove_file(vm.console());
    let mut second = vm.launch(&["run", "cdp", "--at", &before.to_string()], "at2.log");
    wait_for(
        &vm.console(),
        "STRATA-E2E: found STRATA-E2E-MARKER",
        GUEST_TIMEOUT,
        &|| second.log(),
    );
    second.assert_logged(&format!("as it was at restore point {before}"));
    vm.force_stop(&mut second);
    assert!(
        !vm.bundle().join("disk-at").exists(),
        "the clone goes with the run"
    );
    // The live disk was left alone.
    let live = raw_copy(&vol, &dir.join("live2.raw"));
    assert_eq!(
        read_at(&live, MARKER_OFFSET, MARKER.len()),
        vec![0; MARKER.len()]
    );
}
