//! The `strata serve` command line: argument errors, logging and exit status, block
//! devices. Listeners, export naming and signals are also covered with the real clients
//! in `interop_server.rs`.

use std::net::TcpListener;

use crate::support::client::{Client, SIMPLE, STRUCTURED};
use crate::support::control::Running;
use crate::support::spec::{CMD_WRITE, FLAG_FUA};
use crate::support::{run, scratch, strata};

/// A `strata serve` child listening on a port the kernel chose (`--listen 127.0.0.1:0`),
/// so no other socket on the machine can take the port between choosing and binding it.
fn serve(args: &[&std::ffi::OsStr]) -> Running {
    Running::serve_plain(args)
}

fn conn(server: &Running) -> Client {
    Client::tcp(server.nbd).unwrap()
}

fn fails_with(args: &[&str], expect: &str) {
    let out = run(strata().args(args));
    assert!(!out.success(), "{args:?} should fail");
    let stderr = &out.stderr;
    assert!(
        stderr.contains(expect),
        "{args:?}: expected {expect:?} in {stderr}"
    );
}

#[test]
fn bad_arguments_give_clear_errors() {
    fails_with(&["serve"], "IMAGE");
    fails_with(&["serve", "/nonexistent/disk.img"], "/nonexistent/disk.img");
    fails_with(&["serve", "memory:lots"], "invalid size");
    fails_with(
        &["serve", "--listen", "nowhere", "memory:1M"],
        "invalid listen address",
    );
    let dir = tempfile::tempdir().unwrap();
    fails_with(
        &["serve", dir.path().to_str().unwrap()],
        dir.path().to_str().unwrap(),
    );
    // A port already taken is reported, not ignored.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    fails_with(&["serve", "--listen", &addr, "memory:1M"], "cannot listen");
}

#[test]
fn export_names_follow_one_rule() {
    let usage_error = |args: &[&str], expect: &str| {
        let out = strata().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expect),
            "{args:?}: expected {expect:?} in {stderr}"
        );
    };
    usage_error(
        &["serve", "--name", "bad/name", "memory:1M"],
        "--name: invalid export name \"bad/name\": use 1 to 64 ASCII letters",
    );
    usage_error(
        &["serve", "--export", "a b=memory:1M"],
        "--export \"a b=memory:1M\": invalid export name \"a b\"",
    );
    // A file whose name is no export name must be named on the command line.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("my disk.img");
    std::fs::write(&image, [0; 512]).unwrap();
    usage_error(
        &["serve", image.to_str().unwrap()],
        "invalid export name \"my disk\"",
    );
    usage_error(&["serve", image.to_str().unwrap()], "--name NAME");
    // Named, a directory is refused for what it is.
    fails_with(
        &["serve", "--name", "d", dir.path().to_str().unwrap()],
        &format!("{}: Is a directory", dir.path().display()),
    );
}

#[test]
fn sigterm_flushes_and_exits_cleanly() {
    let (_dir, img) = scratch("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let server = serve(&[img.as_os_str()]);
    let mut c = conn(&server);
    c.handshake("d", SIMPLE).unwrap();
    assert_eq!(c.command(0, CMD_WRITE, 512, 5, b"hello").unwrap(), 0);
    server.signal(libc::SIGTERM);
    let (status, log) = server.wait_exit();
    assert!(status.success(), "exit status {status}");
    assert!(
        log.contains("listening on 127.0.0.1:"),
        "listening address is logged: {log}"
    );
    assert!(log.contains("shutdown complete"), "{log}");
    assert_eq!(&std::fs::read(&img).unwrap()[512..517], b"hello");
}

/// Serves the scratch block device named by `STRATA_TEST_BLOCK_DEVICE` (the test script
/// makes a loop device when it can): the size comes from the device, and data written
/// through NBD lands on it.
#[test]
fn serves_a_block_device() {
    let Ok(dev) = std::env::var("STRATA_TEST_BLOCK_DEVICE") else {
        eprintln!("skipped: STRATA_TEST_BLOCK_DEVICE is not set");
        return;
    };
    let size = {
        use std::io::Seek;
        let mut f = std::fs::File::open(&dev).unwrap();
        f.seek(std::io::SeekFrom::End(0)).unwrap()
    };
    let server = serve(&[std::ffi::OsStr::new(&dev)]);
    let mut c = conn(&server);
    let (export_size, _) = c.handshake("", STRUCTURED).unwrap();
    assert_eq!(export_size, size);
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        c.command(FLAG_FUA, CMD_WRITE, 4096, 65536, &data).unwrap(),
        0
    );
    let mut on_device = vec![0u8; 65536];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&dev)
            .unwrap()
            .read_exact_at(&mut on_device, 4096)
            .unwrap();
    }
    assert_eq!(on_device, data);
}
