//! `strata serve` deployed as a service: a configuration with several exports served to
//! real clients, reloads on SIGHUP (good and bad), socket activation over TCP and Unix
//! sockets, readiness notifications, the pid file, exit statuses, JSON logs, and exports
//! that require TLS.
//!
//! Every server listens on loopback or on Unix sockets in a temporary directory, every
//! wait is bounded, and nothing asserts how long anything took.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::support::client::{Client, EXTENDED, SIMPLE, STRUCTURED, Stream};
use crate::support::daemon::{Daemon, WAIT};
use crate::support::spec::*;
use crate::support::wire::info_data;
use crate::support::{Endpoint, pattern, poll, strata};

/// A temporary directory for a server: its configuration file and images.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        Site {
            dir: tempfile::Builder::new()
                .prefix("strata-deploy-")
                .tempdir()
                .unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A raw image of `len` bytes of `fill`.
    fn raw(&self, name: &str, len: usize, fill: u8) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, vec![fill; len]).unwrap();
        path
    }

    /// Writes `strata.toml` and returns its path.
    fn config(&self, text: &str) -> PathBuf {
        let path = self.path("strata.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// The names `NBD_OPT_LIST` returns.
fn list(addr: SocketAddr) -> Vec<String> {
    let mut c = Client::tcp(addr).unwrap();
    c.greet(C_FIXED_NO_ZEROES).unwrap();
    let replies = c.opt(OPT_LIST, &[]).unwrap();
    let (ack, servers) = replies.split_last().unwrap();
    assert_eq!(ack.ty, REP_ACK);
    servers
        .iter()
        .map(|r| {
            assert_eq!(r.ty, REP_SERVER);
            let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
            String::from_utf8(r.data[4..4 + n].to_vec()).unwrap()
        })
        .collect()
}

/// `NBD_OPT_GO` for `name` must fail as for an unknown export.
#[track_caller]
fn assert_unknown(addr: SocketAddr, name: &str) {
    let mut c = Client::tcp(addr).unwrap();
    c.greet(C_FIXED_NO_ZEROES).unwrap();
    let replies = c.opt(OPT_GO, &info_data(name, &[])).unwrap();
    assert_eq!(
        replies.last().unwrap().ty,
        REP_ERR_UNKNOWN,
        "{name} should not be visible"
    );
}

fn write_ok(c: &mut Client, offset: u64, data: &[u8]) {
    assert_eq!(
        c.command(0, CMD_WRITE, offset, data.len() as u64, data)
            .unwrap(),
        0,
        "write at {offset}"
    );
}

/// A client of the `nbd` crate over a Unix socket: `NBD_OPT_EXPORT_NAME`, simple replies.
fn unix_client(path: &Path, name: &str) -> nbd::client::NbdClient<Stream> {
    let mut s = Endpoint::Unix(path.to_path_buf()).connect().unwrap();
    let export = nbd::client::handshake(&mut s, name.as_bytes()).unwrap();
    nbd::client::NbdClient::new(s, &export)
}

// ---------------------------------------------------------------------------------------
// Serving a configuration
// ---------------------------------------------------------------------------------------

#[test]
fn serves_the_exports_of_a_configuration() {
    let site = Site::new();
    site.raw("vm1.raw", 1 << 20, 0);
    site.raw("golden.raw", 1 << 20, 0x5a);
    let file = site.config(
        r#"
listen = ["127.0.0.1:0", "unix:nbd.sock"]
handshake_timeout = 5

[[exports]]
name = "vm1"
image = "vm1.raw"
description = "the first VM"

[[exports]]
name = "golden"
image = "golden.raw"
read_only = true

[[exports]]
name = "scratch"
image = "memory:4M"

[[exports]]
name = "local"
image = "memory:1M"
allow = ["unix"]
"#,
    );
    let mut server = Daemon::serve_config(&file, &[]);
    let addr = server.tcp_addr();
    server.wait_for("listening on unix:");

    assert_eq!(
        list(addr),
        ["golden", "scratch", "vm1"],
        "`local` is for Unix-socket clients only"
    );

    // The first export of the file is the default one.
    let mut c = Client::tcp(addr).unwrap();
    let (size, _) = c.handshake("", SIMPLE).unwrap();
    assert_eq!(size, 1 << 20);
    let data = pattern(1, 8192);
    write_ok(&mut c, 4096, &data);
    assert!(
        c.read(0, 4096, 8192).unwrap().unwrap() == data,
        "read back differs"
    );
    drop(c);
    let on_disk = std::fs::read(site.path("vm1.raw")).unwrap();
    assert_eq!(
        &on_disk[4096..4096 + 8192],
        &data[..],
        "written to the file"
    );

    let mut c = Client::tcp(addr).unwrap();
    let (_, flags) = c.handshake("golden", STRUCTURED).unwrap();
    assert_ne!(flags & 2, 0, "READ_ONLY flag");
    assert_eq!(c.command(0, CMD_WRITE, 0, 4, b"nope").unwrap(), EPERM);
    assert_eq!(c.read(0, 0, 4).unwrap().unwrap(), [0x5a; 4]);

    let mut c = Client::tcp(addr).unwrap();
    let (size, _) = c.handshake("scratch", EXTENDED).unwrap();
    assert_eq!(size, 4 << 20);

    assert_unknown(addr, "local");
    let mut u = unix_client(&site.path("nbd.sock"), "local");
    u.write_all(b"over unix").unwrap();
    u.seek(SeekFrom::Start(0)).unwrap();
    let mut back = [0u8; 9];
    u.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"over unix");

    let (status, _) = server.stop_with(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// Reloading
// ---------------------------------------------------------------------------------------

/// Writes and reads back on `c` until told to stop (or 100000 rounds), counting rounds.
fn keep_busy(
    mut c: Client,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for i in 0..100_000u64 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let offset = (i % 200) * 4096;
            let data = pattern(i, 4096);
            write_ok(&mut c, offset, &data);
            assert!(
                c.read(0, offset, 4096).unwrap().unwrap() == data,
                "round {i}: read back differs"
            );
            rounds.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// Waits (bounded) until `counter` has moved `by` past `from`.
fn wait_past(counter: &AtomicU64, from: u64, by: u64) {
    let moved = poll(WAIT, || {
        (counter.load(Ordering::Relaxed) >= from + by).then_some(())
    });
    assert!(moved.is_some(), "the busy client stopped making progress");
}

#[test]
fn sighup_adds_changes_and_removes_exports_and_leaves_the_others_alone() {
    let site = Site::new();
    site.raw("old.raw", 1 << 20, 0x11);
    site.raw("new.raw", 1 << 20, 0x22);
    let file = site.config(
        r#"
listen = ["127.0.0.1:0"]

[[exports]]
name = "keep"
image = "memory:1M"

[[exports]]
name = "change"
image = "old.raw"

[[exports]]
name = "remove"
image = "memory:1M"
"#,
    );
    let mut server = Daemon::serve_config(&file, &[]);
    let addr = server.tcp_addr();

    let mut keep = Client::tcp(addr).unwrap();
    keep.handshake("keep", STRUCTURED).unwrap();
    let kept = pattern(99, 4096);
    // Past the range the busy client below writes.
    write_ok(&mut keep, (1 << 20) - 4096, &kept);
    let mut change = Client::tcp(addr).unwrap();
    change.handshake("change", SIMPLE).unwrap();
    assert_eq!(change.read(0, 0, 4).unwrap().unwrap(), [0x11; 4]);
    let mut remove = Client::tcp(addr).unwrap();
    remove.handshake("remove", SIMPLE).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let busy = keep_busy(keep, stop.clone(), rounds.clone());
    wait_past(&rounds, 0, 10);

    site.config(
        r#"
listen = ["127.0.0.1:0"]

[[exports]]
name = "keep"
image = "memory:1M"

[[exports]]
name = "change"
image = "new.raw"

[[exports]]
name = "added"
image = "memory:2M"
"#,
    );
    server.signal(libc::SIGHUP);
    server.wait_for("reload complete");

    // The untouched export's client went on, on the same connection, across the reload.
    let after_reload = rounds.load(Ordering::Relaxed);
    wait_past(&rounds, after_reload, 10);
    stop.store(true, Ordering::Relaxed);
    busy.join().expect("the busy client's I/O all succeeded");

    for (c, export) in [(&mut change, "changed"), (&mut remove, "removed")] {
        assert!(
            c.stream.hangs_up(WAIT),
            "the {export} export's client is disconnected"
        );
    }

    assert_eq!(list(addr), ["added", "change", "keep"]);
    let mut c = Client::tcp(addr).unwrap();
    c.handshake("change", SIMPLE).unwrap();
    assert_eq!(
        c.read(0, 0, 4).unwrap().unwrap(),
        [0x22; 4],
        "the new image is served"
    );
    let mut c = Client::tcp(addr).unwrap();
    assert_eq!(c.handshake("added", SIMPLE).unwrap().0, 2 << 20);
    assert_unknown(addr, "remove");
    let mut c = Client::tcp(addr).unwrap();
    c.handshake("keep", SIMPLE).unwrap();
    assert!(
        c.read(0, (1 << 20) - 4096, 4096).unwrap().unwrap() == kept,
        "the kept memory disk still holds what was written before the reload"
    );
    let log = server.log();
    assert!(log.contains("reload: export removed"), "{log}");
    assert!(log.contains("reload: export changed, serving"), "{log}");

    let (status, _) = server.stop_with(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_reload_with_an_invalid_file_keeps_the_running_configuration() {
    let site = Site::new();
    let file = site
        .config("listen = [\"127.0.0.1:0\"]\n[[exports]]\nname = \"a\"\nimage = \"memory:1M\"\n");
    let mut server = Daemon::serve_config(&file, &[]);
    let addr = server.tcp_addr();
    let mut a = Client::tcp(addr).unwrap();
    a.handshake("a", SIMPLE).unwrap();
    write_ok(&mut a, 0, b"before");

    site.config(
        "listen = [\"127.0.0.1:0\"]\n[[exports]]\nname = \"a\"\nimage = \"memory:1M\"\n\
         [[exports]]\nname = \"a\"\nimage = \"missing.raw\"\n",
    );
    server.signal(libc::SIGHUP);
    server.wait_for("keeping the running configuration");
    let log = server.log();
    let at = file.display();
    assert!(
        log.contains(&format!(
            "reload: {at}:6:8: exports[1].name: \"a\" is the name of exports[0] already"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "reload: {at}:7:9: exports[1].image: file {} does not exist",
            site.path("missing.raw").display()
        )),
        "{log}"
    );

    // Nothing changed: the client goes on, and new clients see the same exports.
    assert_eq!(a.read(0, 0, 6).unwrap().unwrap(), b"before");
    write_ok(&mut a, 6, b"after");
    assert_eq!(list(addr), ["a"]);

    // Malformed TOML too, and then a good file is applied.
    site.config("[[exports]\n");
    server.signal(libc::SIGHUP);
    server.wait_for_nth("keeping the running configuration", 2);
    site.config(
        "listen = [\"127.0.0.1:0\"]\n[[exports]]\nname = \"a\"\nimage = \"memory:1M\"\n\
         [[exports]]\nname = \"b\"\nimage = \"memory:1M\"\n",
    );
    server.signal(libc::SIGHUP);
    server.wait_for("reload complete");
    assert_eq!(list(addr), ["a", "b"]);
    assert_eq!(a.read(0, 0, 11).unwrap().unwrap(), b"beforeafter");
}

#[test]
fn server_settings_changed_by_a_reload_wait_for_a_restart() {
    let site = Site::new();
    let file = site
        .config("listen = [\"127.0.0.1:0\"]\n[[exports]]\nname = \"a\"\nimage = \"memory:1M\"\n");
    let mut server = Daemon::serve_config(&file, &[]);
    let addr = server.tcp_addr();
    site.config(
        "listen = [\"127.0.0.1:0\", \"unix:more.sock\"]\nmax_connections = 3\n\
         [[exports]]\nname = \"a\"\nimage = \"memory:1M\"\n",
    );
    server.signal(libc::SIGHUP);
    server.wait_for("reload complete");
    let line = server.wait_for("applied at the next restart");
    assert!(line.contains("listen, max_connections changed"), "{line}");
    assert!(
        !site.path("more.sock").exists(),
        "listeners are not changed by a reload"
    );
    assert_eq!(list(addr), ["a"]);
}

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

// ---------------------------------------------------------------------------------------
// Pid file and exit statuses
// ---------------------------------------------------------------------------------------

fn serve_with_pid_file(pid_file: &Path) -> Daemon {
    Daemon::serve(&[
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--pid-file".as_ref(),
        pid_file.as_os_str(),
        "memory:1M".as_ref(),
    ])
}

#[test]
fn the_pid_file_is_written_held_and_removed() {
    let site = Site::new();
    let pid_file = site.path("strata.pid");
    let mut first = serve_with_pid_file(&pid_file);
    first.wait_for("written to");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", first.pid())
    );

    let second = serve_with_pid_file(&pid_file);
    let (status, log) = second.wait_exit();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "another process (pid {}) holds the pid file",
            first.pid()
        )),
        "{log}"
    );
    assert!(log.contains(&pid_file.display().to_string()), "{log}");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", first.pid()),
        "the refused server left the file alone"
    );

    let (status, _) = first.stop_with(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    assert!(!pid_file.exists(), "removed at a clean exit");

    // A file left by a killed server does not stop the next one.
    let mut killed = serve_with_pid_file(&pid_file);
    killed.wait_for("written to");
    let (status, _) = killed.stop_with(libc::SIGKILL);
    assert_eq!(status.code(), None);
    assert!(pid_file.exists(), "nothing removed it");
    let mut next = serve_with_pid_file(&pid_file);
    next.wait_for("written to");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", next.pid())
    );
    let (status, _) = next.stop_with(libc::SIGINT);
    assert_eq!(status.code(), Some(0));
    assert!(!pid_file.exists());
}

#[test]
fn exit_statuses() {
    let site = Site::new();
    let good = site
        .config("listen = [\"127.0.0.1:0\"]\n[[exports]]\nname = \"a\"\nimage = \"memory:1M\"\n");
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut server = Daemon::serve_config(&good, &[]);
        server.tcp_addr();
        let (status, log) = server.stop_with(signal);
        assert_eq!(status.code(), Some(0), "after signal {signal}: {log}");
    }

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, log) = Daemon::serve_config(&good, &["--listen", &addr]).wait_exit();
    assert_eq!(status.code(), Some(1), "a taken port: {log}");
    assert!(log.contains("cannot listen"), "{log}");

    let (status, log) = Daemon::serve(&["/nonexistent/disk.img"]).wait_exit();
    assert_eq!(status.code(), Some(1), "a missing image: {log}");

    let bad = site.path("bad.toml");
    std::fs::write(&bad, "max_connections = 0\n").unwrap();
    let (status, log) = Daemon::serve_config(&bad, &[]).wait_exit();
    assert_eq!(status.code(), Some(78), "an invalid configuration: {log}");

    let (status, log) = Daemon::serve_config(&good, &["memory:1M"]).wait_exit();
    assert_eq!(
        status.code(),
        Some(2),
        "exports on the command line and in the file: {log}"
    );

    let (status, log) = Daemon::serve(&["--listen", "nowhere", "memory:1M"]).wait_exit();
    assert_eq!(status.code(), Some(2), "a bad flag: {log}");
    let (status, log) = Daemon::serve(&["--tls", "require", "memory:1M"]).wait_exit();
    assert_eq!(status.code(), Some(2), "contradictory flags: {log}");
}

// ---------------------------------------------------------------------------------------
// JSON logs
// ---------------------------------------------------------------------------------------

/// Every line must be a JSON object with a timestamp, a level and a message; returns
/// the messages.
#[track_caller]
fn json_messages(log: &str) -> Vec<String> {
    assert!(!log.is_empty());
    log.lines()
        .map(|line| {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let obj = v
                .as_object()
                .unwrap_or_else(|| panic!("not an object: {line}"));
            assert!(obj["timestamp"].is_string(), "{line}");
            assert!(obj["level"].is_string(), "{line}");
            obj["message"]
                .as_str()
                .unwrap_or_else(|| panic!("no message: {line}"))
                .to_owned()
        })
        .collect()
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut server = Daemon::serve(&[
        "--log-format",
        "json",
        "--listen",
        "127.0.0.1:0",
        "memory:1M",
    ]);
    let addr = server.tcp_addr();
    let mut c = Client::tcp(addr).unwrap();
    c.handshake("memory", SIMPLE).unwrap();
    drop(c);
    let (status, log) = server.stop_with(libc::SIGTERM);
    assert!(status.success());
    let messages = json_messages(&log);
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("listening on 127.0.0.1:")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "transmission started"),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "shutdown complete"),
        "{messages:?}"
    );
    // The event's fields sit beside the message.
    let started = log
        .lines()
        .find(|l| l.contains("transmission started"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(started).unwrap();
    assert_eq!(v["export"], "memory");
}

#[test]
fn json_logs_stay_json_when_the_server_cannot_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, log) =
        Daemon::serve(&["--log-format", "json", "--listen", &addr, "memory:1M"]).wait_exit();
    assert_eq!(status.code(), Some(1), "{log}");
    let messages = json_messages(&log);
    assert!(
        messages.iter().any(|m| m.contains("cannot listen on")),
        "{messages:?}"
    );
}

#[test]
fn json_logs_from_the_file_cover_reload_errors() {
    let site = Site::new();
    let text = "listen = [\"127.0.0.1:0\"]\n[log]\nformat = \"json\"\n";
    let file = site.config(text);
    let mut server = Daemon::serve_config(&file, &[]);
    server.tcp_addr();
    site.config(&format!("{text}bogus = 1\n"));
    server.signal(libc::SIGHUP);
    server.wait_for("keeping the running configuration");
    let (status, log) = server.stop_with(libc::SIGTERM);
    assert!(status.success());
    let messages = json_messages(&log);
    let want = format!(
        "reload: {}:4:1: log.bogus: unknown field `bogus`",
        file.display()
    );
    assert!(
        messages.iter().any(|m| m.starts_with(&want)),
        "{messages:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Exports that require TLS
// ---------------------------------------------------------------------------------------

/// A CA and a server certificate for 127.0.0.1, as PEM files: `server/cert.pem`,
/// `server/key.pem`, and `client/ca-cert.pem` for libnbd's `tls-certificates=`.
#[cfg(feature = "tls")]
fn certificates(site: &Site) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "deploy test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    leaf.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    for (name, text) in [
        ("server/cert.pem", leaf.pem()),
        ("server/key.pem", key.serialize_pem()),
        ("client/ca-cert.pem", ca.pem()),
    ] {
        let path = site.path(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

#[cfg(feature = "tls")]
#[test]
fn an_export_that_requires_tls_is_invisible_to_plaintext_clients() {
    let site = Site::new();
    certificates(&site);
    let file = site.config(
        r#"
listen = ["127.0.0.1:0"]
[tls]
mode = "optional"
cert = "server/cert.pem"
key = "server/key.pem"

[[exports]]
name = "open"
image = "memory:1M"

[[exports]]
name = "secret"
image = "memory:2M"
require_tls = true
"#,
    );
    let mut server = Daemon::serve_config(&file, &[]);
    let addr = server.tcp_addr();
    assert_eq!(list(addr), ["open"], "plaintext clients do not see it");
    assert_unknown(addr, "secret");
    let mut c = Client::tcp(addr).unwrap();
    c.handshake("open", SIMPLE).unwrap();

    if !crate::support::require_tool("nbdinfo") {
        return;
    }
    let dir = site.path("client");
    let tls_uri = format!("nbds://{addr}/secret?tls-certificates={}", dir.display());
    let out = crate::support::nbdinfo(&["--size", &tls_uri]).assert_success();
    assert_eq!(out.stdout.trim(), (2u64 << 20).to_string());
    let out = crate::support::nbdinfo(&["--size", &format!("nbd://{addr}/secret")]);
    assert!(!out.success(), "plaintext is refused\n{}", out.report());
}
