//! A `strata serve` child with a control API, and a minimal HTTP/1.1 client for it,
//! shared by the tests that drive the control API. The client is written by hand so that
//! a test can send exactly the bytes it wants: odd headers, bodies that lie about their
//! length.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use serde_json::Value;

use super::client::{Client, STRUCTURED};
use super::daemon::{Daemon, WAIT, address_after};
use super::{CmdOutput, poll, run, strata};

// ---------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------

/// A `strata serve --listen 127.0.0.1:0 --control DIR/control.sock` child, optionally
/// with `--control-listen 127.0.0.1:0` and a token. The addresses come from its log; it
/// is killed when dropped.
pub struct Running {
    daemon: Daemon,
    pub nbd: SocketAddr,
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub token_file: Option<PathBuf>,
    dir: tempfile::TempDir,
}

pub const TOKEN: &str = "5f0e7c1d-control-token";

impl Running {
    /// Serves `args` (images, `--export`s) with a control socket.
    pub fn serve(args: &[&OsStr]) -> Running {
        Self::start(args, false, None, &[])
    }

    /// Serves `args` with a control socket and these environment variables.
    pub fn serve_env(args: &[&OsStr], env: &[(&str, &str)]) -> Running {
        Self::start(args, false, None, env)
    }

    /// Serves `args` without a control API (`socket` then names nothing).
    pub fn serve_plain(args: &[&OsStr]) -> Running {
        Self::start(args, false, Some(PathBuf::new()), &[])
    }

    /// Also with a TCP control listener and a token file.
    pub fn serve_with_tcp(args: &[&OsStr]) -> Running {
        Self::start(args, true, None, &[])
    }

    /// With the control socket at `socket`.
    pub fn serve_at(socket: &Path, args: &[&OsStr]) -> Running {
        Self::start(args, false, Some(socket.to_path_buf()), &[])
    }

    fn start(args: &[&OsStr], tcp: bool, socket: Option<PathBuf>, env: &[(&str, &str)]) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket.unwrap_or_else(|| dir.path().join("control.sock"));
        // An empty path: no control API at all.
        let control = !socket.as_os_str().is_empty();
        let mut cmd = strata();
        cmd.args(["serve", "--listen", "127.0.0.1:0"]);
        if control {
            cmd.arg("--control").arg(&socket);
        }
        let token_file = tcp.then(|| {
            let path = dir.path().join("token");
            std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
            cmd.args(["--control-listen", "127.0.0.1:0", "--control-token-file"])
                .arg(&path);
            path
        });
        cmd.envs(env.iter().copied()).args(args);
        let mut daemon = Daemon::spawn(cmd);
        let nbd = daemon.tcp_addr();
        if control {
            daemon.wait_for("control API on unix:");
        }
        let tcp = tcp.then(|| {
            let line = daemon.wait_for("control API on http://");
            address_after(&line, "control API on http://")
                .unwrap_or_else(|| panic!("no address in {line:?}"))
        });
        Running {
            daemon,
            nbd,
            socket,
            tcp,
            token_file,
            dir,
        }
    }

    /// An NBD connection to `export`, its handshake done with structured replies.
    pub fn connect(&self, export: &str) -> Client {
        let mut c = Client::tcp(self.nbd).unwrap();
        c.handshake(export, STRUCTURED).unwrap();
        c
    }

    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    fn unix(&self) -> io::Result<UnixStream> {
        let s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(WAIT))?;
        s.set_write_timeout(Some(WAIT))?;
        Ok(s)
    }

    /// A JSON request over the control socket.
    #[track_caller]
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Response {
        self.try_call(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A JSON request over the control socket, for a server that may die meanwhile:
    /// an error when it went away without answering.
    pub fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> io::Result<Response> {
        let body = body.map(|b| b.to_string());
        let json = [("Content-Type", "application/json")];
        let headers: &[(&str, &str)] = if body.is_some() { &json } else { &[] };
        let request = request_bytes(method, path, headers, body.as_deref().map(str::as_bytes));
        exchange(self.unix()?, &request)
    }

    pub fn get(&self, path: &str) -> Response {
        self.call("GET", path, None)
    }

    /// A request over the control socket with exactly these headers and body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        http(self.unix().unwrap(), method, path, headers, body)
    }

    /// A request over the TCP control listener.
    pub fn tcp(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        let s = TcpStream::connect(self.tcp.expect("a TCP control listener")).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        http(s, method, path, headers, None)
    }

    /// `strata ctl --socket SOCKET ARGS...`
    pub fn ctl(&self, args: &[&str]) -> CmdOutput {
        let mut cmd = strata();
        cmd.arg("ctl").arg("--socket").arg(&self.socket).args(args);
        run(&mut cmd)
    }

    pub fn export(&self, name: &str) -> Value {
        let r = self.get(&format!("/v1/exports/{name}"));
        assert_eq!(r.status, 200, "{r:?}");
        r.json()
    }

    /// Waits (bounded) until `name` reports `n` connected clients, and returns its view.
    pub fn wait_connections(&self, name: &str, n: u64) -> Value {
        let got = poll(WAIT, || {
            let e = self.export(name);
            (e["stats"]["connections"] == n).then_some(e)
        });
        got.unwrap_or_else(|| panic!("{name} never had {n} connection(s): {}", self.export(name)))
    }

    pub fn signal(&self, signal: libc::c_int) {
        self.daemon.signal(signal);
    }

    /// Waits (bounded) for the child to exit; returns its status and log.
    pub fn wait_exit(self) -> (ExitStatus, String) {
        self.daemon.wait_exit()
    }
}

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }

    /// The message of an error answer, checking it has the API's error shape.
    #[track_caller]
    pub fn error(&self) -> String {
        let v = self.json();
        let obj = v.as_object().expect("an object");
        assert_eq!(obj.len(), 1, "only an error field: {v}");
        obj["error"].as_str().expect("a string message").to_owned()
    }
}

/// A request with `Connection: close`, these headers and this body.
fn request_bytes(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    bytes
}

/// Sends a request and reads the whole response.
fn exchange(mut s: impl Read + Write, request: &[u8]) -> io::Result<Response> {
    // The server may answer (and stop reading) before a refused body is all sent.
    let _ = s.write_all(request);
    Ok(parse_response(&read_response(&mut s)?))
}

/// Sends one request (with `Connection: close`) and reads the whole response.
#[track_caller]
pub fn http(
    s: impl Read + Write,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    exchange(s, &request_bytes(method, path, headers, body))
        .unwrap_or_else(|e| panic!("reading the response to {method} {path}: {e}"))
}

/// Reads what the server sends until it closes the connection; an error when it sent
/// nothing (it went away without answering).
fn read_response(s: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) if raw.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection without answering",
                ));
            }
            Ok(0) => return Ok(raw),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !raw.is_empty() => {
                return Ok(raw);
            }
            Err(e) => return Err(e),
        }
    }
}

pub fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}
