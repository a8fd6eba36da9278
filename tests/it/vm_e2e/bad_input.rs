//! Bad input: no VM needed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{run_timeout, scratch, strata};

use super::{golden, serve_unix, succeeds};

fn vm_cmd(root: &Path) -> Command {
    let mut c = strata();
    c.arg("vm").arg("--bundles").arg(root);
    c
}

fn fails_with(cmd: &mut Command, want: &str) -> crate::support::CmdOutput {
    let r = run_timeout(cmd, Duration::from_secs(30));
    assert_eq!(r.code(), Some(1), "{}", r.report());
    assert!(r.stderr.contains(want), "{want:?} missing\n{}", r.report());
    r
}

/// Runs without QEMU (scripts/test.sh runs it before QEMU is installed): the VMs that
/// would need one name `/bin/true`, which is never started.
#[test]
fn bad_input_gets_clear_messages() {
    let (dir, root) = scratch("vms");
    let image = golden(dir.path());

    fails_with(vm_cmd(&root).args(["run", "nope"]), "no VM named \"nope\"");
    fails_with(
        vm_cmd(&root).args(["suspend", "nope"]),
        "no VM named \"nope\"",
    );
    fails_with(vm_cmd(&root).args(["checkpoints", "nope"]), "no VM named");
    fails_with(
        vm_cmd(&root).args(["create", "bad", "--disk", "nbd://nas:0/x"]),
        "not a number from 1 to 65535",
    );
    fails_with(
        vm_cmd(&root).args(["create", "bad", "--disk", "nbd+unix:///x"]),
        "the socket is missing",
    );
    fails_with(
        vm_cmd(&root).args(["create", "bad", "--disk", "/no/such/image"]),
        "no such image",
    );
    fails_with(
        vm_cmd(&root)
            .args(["create", "bad/name", "--disk"])
            .arg(&image),
        "invalid VM name",
    );
    fails_with(
        vm_cmd(&root)
            .args(["create", "bad", "--memory", "1M", "--disk"])
            .arg(&image),
        "at least 64 MiB",
    );
    // None of that left a bundle, finished or not.
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // An unreachable server: the VM never starts, the bundle is as it was.
    let url = format!("nbd+unix:///x?socket={}/nothing.sock", dir.path().display());
    succeeds(vm_cmd(&root).args(["create", "far", "--qemu", "/bin/true", "--disk", &url]));
    let config = std::fs::read(root.join("far/config.json")).unwrap();
    fails_with(
        vm_cmd(&root).args(["run", "far"]),
        "cannot reach the NBD server",
    );
    assert_eq!(std::fs::read(root.join("far/config.json")).unwrap(), config);
    fails_with(vm_cmd(&root).args(["suspend", "far"]), "is not running");
    fails_with(vm_cmd(&root).args(["stop", "far"]), "is not running");
    fails_with(
        vm_cmd(&root).args(["resume", "far"]),
        "cannot reach the NBD server",
    );

    // A server that answers but has no such export.
    let sock = dir.path().join("s.sock");
    let server = serve_unix(&sock, &[image.as_os_str()], &sock, dir.path().join("s.log"));
    let url = format!("nbd+unix:///wrong?socket={}", sock.display());
    succeeds(vm_cmd(&root).args(["create", "wrong", "--qemu", "/bin/true", "--disk", &url]));
    fails_with(
        vm_cmd(&root).args(["run", "wrong"]),
        "has no export named \"wrong\"",
    );
    // A disk that is not a Strata server's or has no control API: no checkpoints.
    drop(server);

    // Hosts that cannot run the VM.
    succeeds(
        vm_cmd(&root)
            .args(["create", "mac", "--platform", "macos", "--disk"])
            .arg(&image),
    );
    if cfg!(not(target_os = "macos")) {
        fails_with(
            vm_cmd(&root).args(["run", "mac"]),
            "macOS VMs run only on a Mac",
        );
        fails_with(
            vm_cmd(&root).args(["install", "mac", "--ipsw", "/x.ipsw"]),
            "installing macOS needs a Mac",
        );
    }
    succeeds(
        vm_cmd(&root)
            .args([
                "create",
                "noqemu",
                "--qemu",
                "qemu-system-nonesuch",
                "--disk",
            ])
            .arg(&image),
    );
    fails_with(
        vm_cmd(&root).args(["run", "noqemu"]),
        "qemu-system-nonesuch is not installed",
    );
    // A QEMU that fails at once: reported, and the overlay made for the run is gone.
    succeeds(
        vm_cmd(&root)
            .args(["create", "badqemu", "--qemu", "/bin/false", "--disk"])
            .arg(&image),
    );
    fails_with(
        vm_cmd(&root)
            .args(["run", "badqemu", "--serve"])
            .arg(&image),
        "QEMU exited at once",
    );
    assert!(!root.join("badqemu/disk.strata").exists());
    let config = std::fs::read_to_string(root.join("badqemu/config.json")).unwrap();
    assert!(!config.contains("disk.strata"), "{config}");
    let r = run_timeout(
        vm_cmd(&root).args(["run", "noqemu", "--discard"]),
        Duration::from_secs(30),
    );
    assert!(
        r.code() == Some(2) && r.stderr.contains("--serve"),
        "{}",
        r.report()
    );
    let r = succeeds(vm_cmd(&root).arg("list"));
    for name in ["far", "wrong", "mac", "noqemu"] {
        assert!(r.stdout.contains(name), "{}", r.stdout);
    }
    // Resume without checkpoints.
    succeeds(
        vm_cmd(&root)
            .args([
                "create",
                "local",
                "--qemu",
                "/bin/true",
                "--overlay",
                "--disk",
            ])
            .arg(&image),
    );
    fails_with(vm_cmd(&root).args(["resume", "local"]), "has no checkpoint");
    fails_with(
        vm_cmd(&root).args(["run", "local", "--serve"]).arg(&image),
        "has a disk overlay already",
    );
}
