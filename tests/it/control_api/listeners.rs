//! The control listeners: the TCP listener's token, the Unix socket's mode, stale file
//! and removal, a socket path already in use, and idle connections capped and timed out.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use crate::support::client::Stream;
use crate::support::control::{Running, TOKEN, http};
use crate::support::daemon::WAIT;
use crate::support::{scratch, strata};

#[test]
fn tcp_control_needs_a_token() {
    // Refused at start: no token file, an empty one.
    crate::support::run(strata().args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--control-listen",
        "127.0.0.1:0",
        "memory:1M",
    ]))
    .assert_failure()
    .assert_stderr(&["--control-token-file"]);
    let (_dir, empty) = scratch("empty");
    std::fs::write(&empty, "\n").unwrap();
    crate::support::run(
        strata()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--control-listen",
                "127.0.0.1:0",
                "--control-token-file",
            ])
            .arg(&empty)
            .arg("memory:1M"),
    )
    .assert_failure()
    .assert_stderr(&["token is empty"]);

    let server = Running::serve_with_tcp(&[OsStr::new("memory:1M")]);
    let bearer = format!("Bearer {TOKEN}");
    let r = server.tcp("GET", "/v1/server", &[]);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert!(r.error().contains("Bearer"), "{r:?}");
    for wrong in [
        "Bearer nope".to_owned(),
        format!("Bearer {TOKEN}x"),
        format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]),
        format!("Bearer {}", TOKEN.to_uppercase()),
        format!("Basic {TOKEN}"),
        TOKEN.to_owned(),
    ] {
        let r = server.tcp("GET", "/v1/server", &[("Authorization", &wrong)]);
        assert_eq!(r.status, 401, "{wrong}: {r:?}");
        assert!(!r.error().is_empty());
    }
    // Without the token nothing is revealed, not even which routes exist.
    let r = server.tcp("GET", "/v1/nothing", &[]);
    assert_eq!(r.status, 401, "{r:?}");
    let r = server.tcp("DELETE", "/v1/exports/memory?force=true", &[]);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(server.get("/v1/exports/memory").status, 200);

    let r = server.tcp("GET", "/v1/server", &[("Authorization", &bearer)]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["version"], env!("CARGO_PKG_VERSION"));
    let r = server.tcp("GET", "/v1/nothing", &[("Authorization", &bearer)]);
    assert_eq!(r.status, 404, "{r:?}");
    // The Unix socket needs no token.
    assert_eq!(server.get("/v1/server").status, 200);
}

#[test]
fn control_socket_is_private_replaces_a_stale_one_and_goes_at_shutdown() {
    let (_dir, socket) = scratch("ctl.sock");
    // A socket file left by a server that died.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let server = Running::serve_at(&socket, &[OsStr::new("memory:1M")]);
    let stream = UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let r = http(stream, "GET", "/v1/server", &[], None);
    assert_eq!(r.status, 200, "{r:?}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }
    // An idle keep-alive connection does not hold up shutdown.
    let mut idle = UnixStream::connect(&socket).unwrap();
    idle.write_all(b"GET /v1/server HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    server.signal(libc::SIGTERM);
    let (status, log) = server.wait_exit();
    assert!(status.success(), "exit status {status}: {log}");
    assert!(log.contains("shutdown complete"), "{log}");
    assert!(
        !socket.exists(),
        "the control socket is removed at shutdown"
    );
    drop(idle);
}

#[test]
fn control_socket_path_must_be_free() {
    let (_dir, file) = scratch("not-a-socket");
    std::fs::write(&file, "data").unwrap();
    crate::support::run(
        strata()
            .args(["serve", "--listen", "127.0.0.1:0", "--control"])
            .arg(&file)
            .arg("memory:1M"),
    )
    .assert_failure()
    .assert_stderr(&["not a socket"]);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"data",
        "the file is left alone"
    );

    // A live control socket is not taken over.
    let server = Running::serve(&[OsStr::new("memory:1M")]);
    crate::support::run(
        strata()
            .args(["serve", "--listen", "127.0.0.1:0", "--control"])
            .arg(&server.socket)
            .arg("memory:1M"),
    )
    .assert_failure()
    .assert_stderr(&["another server"]);
    assert_eq!(server.get("/v1/server").status, 200);
}

/// `MAX_CONNECTIONS` in src/server/http.rs.
const CONTROL_CONNECTIONS: usize = 64;

#[test]
fn idle_control_connections_are_capped_and_timed_out() {
    let server = Running::serve_with_tcp(&[OsStr::new("memory:1M")]);
    let tcp = server.tcp.unwrap();
    // Connections that never send a request, as anyone may open without the token.
    let idle: Vec<TcpStream> = (0..CONTROL_CONNECTIONS)
        .map(|_| TcpStream::connect(tcp).unwrap())
        .collect();
    // One more is closed unanswered, even with a valid request.
    let mut extra = TcpStream::connect(tcp).unwrap();
    extra.set_read_timeout(Some(WAIT)).unwrap();
    let request = format!(
        "GET /v1/server HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    let _ = extra.write_all(request.as_bytes());
    assert!(
        Stream::from(extra).hangs_up(WAIT),
        "a connection past the cap was served"
    );
    // The socket is a separate listener: it still answers.
    assert_eq!(server.get("/v1/server").status, 200);
    // Idle connections are closed by the server after the header timeout.
    for s in idle {
        assert!(
            Stream::from(s).hangs_up(WAIT),
            "an idle connection stayed open"
        );
    }
    // Then there is room again.
    let r = server.tcp(
        "GET",
        "/v1/server",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    assert_eq!(r.status, 200, "{r:?}");
}
