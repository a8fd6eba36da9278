//! The `strata serve` command line: argument errors, logging and exit status, block
//! devices. Listeners, export naming and signals are also covered with the real clients
//! in `interop_server.rs`.

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::wire::Conn;

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

fn free_port(v6: bool) -> u16 {
    let addr = if v6 { "[::1]:0" } else { "127.0.0.1:0" };
    TcpListener::bind(addr)
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_tcp(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = TcpStream::connect(addr) {
            return s;
        }
        assert!(Instant::now() < deadline, "server never listened on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn conn(addr: SocketAddr) -> Conn {
    drop(wait_tcp(addr));
    Conn::connect(addr)
}

fn fails_with(args: &[&str], expect: &str) {
    let out = strata().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
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
fn sigterm_flushes_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let port = free_port(false);
    let mut child = strata()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg(&img)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = conn(addr);
    c.handshake("d", false, false);
    assert_eq!(c.command(0, support::wire::CMD_WRITE, 512, 5, b"hello"), 0);
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
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
    let port = free_port(false);
    let child = strata()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), &dev])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Running(child);
    let mut c = conn(format!("127.0.0.1:{port}").parse().unwrap());
    let (export_size, _) = c.handshake("", true, false);
    assert_eq!(export_size, size);
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        c.command(
            support::wire::FLAG_FUA,
            support::wire::CMD_WRITE,
            4096,
            65536,
            &data
        ),
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
