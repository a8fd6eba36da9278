//! A VM on a disk it does not own: a throwaway overlay served for one run, and a disk
//! server that vanishes under a running VM.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{run_timeout, strata};

use super::guest::build_guest;
use super::{GUEST_TIMEOUT, Launcher, MARKER, MARKER_OFFSET, Vm, golden, read_at, wait_for};

/// A throwaway VM from a golden image in one command, and a disk server that vanishes
/// under a running VM: the guest's I/O errors are reported, a suspend then fails
/// cleanly, and the checkpoint taken before is still there.
#[test]
fn serve_discard_and_a_vanishing_server() {
    let dir = tempfile::tempdir().unwrap();
    let Some(guest) = build_guest(dir.path()) else {
        return;
    };
    let golden = golden(dir.path());

    // run --serve --discard: boots on a fresh overlay, which is gone afterwards.
    let vm = Vm {
        root: dir.path().join("vms"),
        name: "tmp",
    };
    vm.create(&guest, golden.to_str().unwrap(), &[]);
    let mut run = vm.launch(
        &[
            "run",
            "tmp",
            "--serve",
            golden.to_str().unwrap(),
            "--discard",
        ],
        "serve.log",
    );
    assert!(run.wait(GUEST_TIMEOUT).success(), "{}", run.log());
    assert!(run.log().contains("discarded"), "{}", run.log());
    assert!(!vm.bundle().join("disk.strata").exists());
    assert_eq!(
        read_at(&golden, MARKER_OFFSET, 4),
        vec![0; 4],
        "golden untouched"
    );

    // An external server with a control API, serving an image that already has the
    // marker, so that the guest ticks.
    let image = dir.path().join("remote.strata");
    let r = run_timeout(
        strata()
            .arg("create")
            .arg(&image)
            .arg("--backing")
            .arg(&golden),
        Duration::from_secs(30),
    );
    assert!(r.success(), "{}", r.report());
    write_marker(&image, dir.path());
    let nbd = dir.path().join("remote.sock");
    let control = dir.path().join("remote-control.sock");
    let mut server = strata();
    server
        .arg("serve")
        .arg("--listen")
        .arg(format!("unix:{}", nbd.display()))
        .arg("--control")
        .arg(&control)
        .args(["--name", "remote"])
        .arg(&image);
    let mut server = Launcher::spawn(server, dir.path().join("server.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.exists() {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let remote = Vm {
        root: dir.path().join("vms"),
        name: "remote",
    };
    let url = format!("nbd+unix:///remote?socket={}", nbd.display());
    remote.create(
        &guest,
        &url,
        &["--control", control.to_str().unwrap(), "--timeout", "1"],
    );
    let mut run = remote.launch(&["run", "remote"], "remote.log");
    let context = || std::fs::read_to_string(dir.path().join("vms/remote.log")).unwrap_or_default();
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
    let mut server = strata();
    server
        .arg("serve")
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg(image);
    let mut server = Launcher::spawn(server, dir.join("marker-server.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            break s;
        }
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stream = stream;
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
