//! A VM on a disk it does not own: a throwaway overlay served for one run, and a disk
//! server that vanishes under a running VM.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use crate::support::strata;

use super::{
    GUEST_TIMEOUT, MARKER, MARKER_OFFSET, Rig, Vm, read_at, serve_unix, succeeds, wait_for,
};

/// A throwaway VM from a golden image in one command, and a disk server that vanishes
/// under a running VM: the guest's I/O errors are reported, a suspend then fails
/// cleanly, and the checkpoint taken before is still there.
#[test]
fn serve_discard_and_a_vanishing_server() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let dir = rig.path();

    // run --serve --discard: boots on a fresh overlay, which is gone afterwards.
    let vm = rig.vm("tmp", rig.golden_disk(), &[]);
    let mut run = vm.launch(
        &["run", "tmp", "--serve", rig.golden_disk(), "--discard"],
        "serve.log",
    );
    assert!(run.wait(GUEST_TIMEOUT).success(), "{}", run.log());
    run.assert_logged("discarded");
    assert!(!vm.bundle().join("disk.strata").exists());
    assert_eq!(
        read_at(&rig.golden, MARKER_OFFSET, 4),
        vec![0; 4],
        "golden untouched"
    );

    // An external server with a control API, serving an image that already has the
    // marker, so that the guest ticks.
    let image = dir.join("remote.strata");
    succeeds(
        strata()
            .arg("create")
            .arg(&image)
            .arg("--backing")
            .arg(&rig.golden),
    );
    write_marker(&image, dir);
    let nbd = dir.join("remote.sock");
    let control = dir.join("remote-control.sock");
    let args = [
        OsStr::new("--control"),
        control.as_os_str(),
        OsStr::new("--name"),
        OsStr::new("remote"),
        image.as_os_str(),
    ];
    let mut server = serve_unix(&nbd, &args, &control, dir.join("server.log"));
    let url = format!("nbd+unix:///remote?socket={}", nbd.display());
    let remote = rig.vm(
        "remote",
        &url,
        &["--control", control.to_str().unwrap(), "--timeout", "1"],
    );
    let mut run = remote.launch(&["run", "remote"], "remote.log");
    let context = || std::fs::read_to_string(dir.join("vms/remote.log")).unwrap_or_default();
    wait_for(
        &remote.console(),
        "STRATA-E2E-TICK 2",
        GUEST_TIMEOUT,
        &context,
    );
    let r = remote.ctl(&["suspend", "remote", "--checkpoint", "before"]);
    assert!(r.success(), "{}\n{}", r.report(), run.log());

    // The server goes away.
    // SAFETY: kill(2) on the server we started.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGKILL) };
    let _ = server.child.wait();
    wait_for(
        &run.log,
        "error on the disk",
        Duration::from_secs(60),
        &|| remote_console(&remote),
    );
    wait_for(
        &run.log,
        "the disk server does not answer: cannot reach the NBD server",
        Duration::from_secs(30),
        &|| remote_console(&remote),
    );
    let r = remote.ctl(&["suspend", "remote", "--checkpoint", "after"]);
    assert!(!r.success(), "{}", r.report());
    assert!(
        r.stderr.contains("cannot reach the control API"),
        "{}",
        r.report()
    );
    let r = remote.ctl(&["checkpoints", "remote"]);
    assert!(
        r.stdout.contains("before") && !r.stdout.contains("after"),
        "{}",
        r.report()
    );
    assert!(remote.bundle().join("checkpoints/before.state").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(remote.bundle().join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "before.state")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let r = remote.ctl(&["stop", "remote", "--force"]);
    assert!(r.success(), "{}", r.report());
    run.wait(Duration::from_secs(30));
}

fn remote_console(vm: &Vm) -> String {
    std::fs::read_to_string(vm.console()).unwrap_or_default()
}

/// Writes the guest's marker into `image` through a short-lived server and qemu-io-free
/// means: `strata convert` to raw, patch, convert back would lose the chain, so the
/// marker goes in with the NBD crate's client instead.
fn write_marker(image: &Path, dir: &Path) {
    let sock = dir.join("marker.sock");
    let log = dir.join("marker-server.log");
    let mut server = serve_unix(&sock, &[image.as_os_str()], &sock, log);
    let mut stream = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let name = image.file_stem().unwrap().to_string_lossy().into_owned();
    let export = nbd::client::handshake(&mut stream, name.as_bytes()).expect("handshake");
    let mut client = nbd::client::NbdClient::new(&mut stream, &export);
    use std::io::{Seek as _, SeekFrom, Write as _};
    client.seek(SeekFrom::Start(MARKER_OFFSET)).unwrap();
    client.write_all(format!("{MARKER}\n").as_bytes()).unwrap();
    client.flush().unwrap();
    drop(stream);
    // SAFETY: SIGTERM to the server we started; it flushes and exits.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert!(
        server.wait(Duration::from_secs(20)).success(),
        "{}",
        server.log()
    );
}
