//! The service manager's side: socket activation (the test passes the listening sockets)
//! and readiness notifications (the test listens for them).

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

use crate::support::client::{Client, SIMPLE};
use crate::support::daemon::{Daemon, WAIT};
use crate::support::strata;

use super::{Site, unix_client, write_ok};

// ---------------------------------------------------------------------------------------
// Socket activation
// ---------------------------------------------------------------------------------------

/// Starts `strata ARGS...` the way systemd does with socket activation: `sockets` as
/// descriptors 3, 4, ..., and `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (the
/// child's own pid) in its environment.
fn activated(sockets: Vec<OwnedFd>, names: Option<&str>, args: &[&std::ffi::OsStr]) -> Daemon {
    use std::ffi::CString;
    let fds: Vec<i32> = sockets.iter().map(AsRawFd::as_raw_fd).collect();
    let count = CString::new(fds.len().to_string()).unwrap();
    let names = names.map(|n| CString::new(n).unwrap());
    let mut cmd = strata();
    cmd.args(args);
    // SAFETY: the closure runs in the child between fork and exec. It calls fcntl,
    // dup2, getpid and setenv. The first three are async-signal-safe. setenv may
    // allocate, which is safe in the child of this multithreaded test process because
    // glibc's fork resets the allocator's locks in the child; the strings it reads were
    // made before the fork, and the pid is formatted on the stack.
    unsafe {
        cmd.pre_exec(move || {
            // Move every socket out of the way first, so that placing one at 3 + i
            // cannot overwrite another that happens to sit there.
            let mut moved = [0i32; 8];
            assert!(fds.len() <= moved.len());
            for (i, &fd) in fds.iter().enumerate() {
                let to = libc::fcntl(fd, libc::F_DUPFD, 100);
                if to < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                moved[i] = to;
            }
            for (i, &fd) in moved[..fds.len()].iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let mut digits = [0u8; 24];
            let mut pid = libc::getpid() as u32;
            let mut at = digits.len() - 1; // the last byte stays 0: the terminator
            loop {
                at -= 1;
                digits[at] = b'0' + (pid % 10) as u8;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            let set = |key: &[u8], value: *const libc::c_char| {
                if libc::setenv(key.as_ptr().cast(), value, 1) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            set(b"LISTEN_PID\0", digits[at..].as_ptr().cast())?;
            set(b"LISTEN_FDS\0", count.as_ptr())?;
            if let Some(names) = &names {
                set(b"LISTEN_FDNAMES\0", names.as_ptr())?;
            }
            Ok(())
        });
    }
    let server = Daemon::spawn(cmd);
    drop(sockets);
    server
}

#[test]
fn socket_activation_serves_the_passed_tcp_and_unix_sockets() {
    let site = Site::new();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let unix_path = site.path("nbd.sock");
    let unix = std::os::unix::net::UnixListener::bind(&unix_path).unwrap();
    let file = site.config(
        "listen = [\"unix:configured.sock\"]\n[[exports]]\nname = \"disk\"\nimage = \"memory:1M\"\n",
    );
    let mut server = activated(
        vec![tcp.into(), unix.into()],
        Some("nbd:nbd-unix"),
        &["serve".as_ref(), "--config".as_ref(), file.as_os_str()],
    );
    let line = server.wait_for("socket activation: fd 3");
    assert!(
        line.contains(&format!("listening on {addr}")) && line.contains("nbd"),
        "{line}"
    );
    let line = server.wait_for("socket activation: fd 4");
    assert!(
        line.contains(&format!("listening on unix:{}", unix_path.display()))
            && line.contains("nbd-unix"),
        "{line}"
    );

    let mut c = Client::tcp(addr).unwrap();
    c.handshake("disk", SIMPLE).unwrap();
    write_ok(&mut c, 0, b"via tcp");
    let mut u = unix_client(&unix_path, "disk");
    let mut back = [0u8; 7];
    u.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"via tcp", "one disk behind both sockets");
    assert!(
        !site.path("configured.sock").exists(),
        "the configured address is not bound when sockets are passed"
    );
    drop(u);
    drop(c);

    let (status, _) = server.stop_with(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    assert!(
        unix_path.exists(),
        "the service manager's socket file is left in place"
    );
}

#[test]
fn socket_activation_without_a_configuration_file() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let mut server = activated(
        vec![tcp.into()],
        None,
        &["serve".as_ref(), "memory:1M".as_ref()],
    );
    server.wait_for("socket activation: fd 3");
    let mut c = Client::tcp(addr).unwrap();
    assert_eq!(c.handshake("memory", SIMPLE).unwrap().0, 1 << 20);
    let log = server.log();
    assert!(!log.contains("listening on 127.0.0.1:10809"), "{log}");
}

#[test]
fn sockets_meant_for_another_process_are_ignored() {
    let mut cmd = strata();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "memory:1M"])
        .env("LISTEN_PID", std::process::id().to_string())
        .env("LISTEN_FDS", "1");
    let mut server = Daemon::spawn(cmd);
    let addr = server.tcp_addr();
    let mut c = Client::tcp(addr).unwrap();
    c.handshake("memory", SIMPLE).unwrap();
    assert!(!server.log().contains("socket activation"));
}

#[test]
fn a_passed_descriptor_that_is_not_a_listening_socket_stops_the_server() {
    let file = std::fs::File::open("/dev/null").unwrap();
    let server = activated(
        vec![file.into()],
        None,
        &["serve".as_ref(), "memory:1M".as_ref()],
    );
    let (status, log) = server.wait_exit();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("socket activation: descriptor 3: is not a socket"),
        "{log}"
    );
}

#[test]
fn malformed_activation_variables_stop_the_server() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = activated(
        vec![tcp.into()],
        Some("nbd:one-too-many"),
        &["serve".as_ref(), "memory:1M".as_ref()],
    );
    let (status, log) = server.wait_exit();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("socket activation") && log.contains("LISTEN_FDNAMES"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------------------
// Readiness notifications
// ---------------------------------------------------------------------------------------

/// The next notification the server sent to `manager`, one `KEY=VALUE` per line.
fn notification(manager: &std::os::unix::net::UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 1024];
    let len = manager
        .recv(&mut buf)
        .expect("a notification within the wait");
    let text = std::str::from_utf8(&buf[..len]).unwrap();
    text.lines().map(str::to_owned).collect()
}

#[test]
fn the_service_manager_hears_ready_reloading_and_stopping() {
    let site = Site::new();
    let socket = site.path("notify");
    let manager = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    service_manager_hears(&site, &manager, socket.as_os_str());
}

/// The same through an abstract socket (`NOTIFY_SOCKET=@name`), as some service
/// managers give.
#[test]
fn the_service_manager_hears_through_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let site = Site::new();
    let name = format!("strata-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let manager = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
    service_manager_hears(&site, &manager, format!("@{name}").as_ref());
}

/// Runs a server whose `NOTIFY_SOCKET` is `socket`, where `manager` listens: it hears
/// READY, RELOADING (with the time) and READY around a SIGHUP, and STOPPING.
fn service_manager_hears(
    site: &Site,
    manager: &std::os::unix::net::UnixDatagram,
    socket: &std::ffi::OsStr,
) {
    let file = site
        .config("listen = [\"127.0.0.1:0\"]\n[[exports]]\nname = \"a\"\nimage = \"memory:1M\"\n");
    manager.set_read_timeout(Some(WAIT)).unwrap();
    let mut cmd = strata();
    cmd.arg("serve")
        .arg("--config")
        .arg(&file)
        .env("NOTIFY_SOCKET", socket);
    let mut server = Daemon::spawn(cmd);
    assert_eq!(
        notification(manager),
        ["READY=1", "STATUS=serving 1 export"]
    );
    server.tcp_addr();

    server.signal(libc::SIGHUP);
    let reloading = notification(manager);
    assert_eq!(reloading[0], "RELOADING=1", "{reloading:?}");
    assert!(
        reloading.iter().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|t| t.parse::<u64>().is_ok())),
        "systemd needs the time of a reload: {reloading:?}"
    );
    assert_eq!(
        notification(manager),
        ["READY=1", "STATUS=serving 1 export"]
    );

    server.signal(libc::SIGTERM);
    assert_eq!(
        notification(manager),
        ["STOPPING=1", "STATUS=shutting down"]
    );
    let (status, _) = server.wait_exit();
    assert_eq!(status.code(), Some(0));
}
