//! Shared harness for the interop tests: starts an NBD server (strata, or nbdkit when
//! `STRATA_TEST_SERVER=nbdkit`) on a loopback TCP port or a Unix socket, waits until it
//! answers, and stops it on drop; runs external tools with a time limit and shows their
//! output when they fail; decides whether a missing tool skips a test or fails it.
//!
//! Environment:
//! - `STRATA_TEST_SERVER`: `strata` (default) or `nbdkit`. nbdkit is a reference server
//!   used to check the tests' own logic; tests of strata-only behaviour skip under it.
//! - `CI=true`: a missing external tool is a test failure, never a skip.
//! - `STRATA_TEST_NBDKIT_FILTERS`: extra nbdkit filters (space-separated), to check that
//!   the tests catch a server that misbehaves (`noextents`, `nozero`, ...).
//! - `STRATA_TEST_LOG`: passed to strata as `RUST_LOG` (e.g. `debug`).
//! - `STRATA_TEST_SHOW_LOG=1`: print the server's output after every test, not only
//!   after failures (with `--nocapture` to see it).

#![allow(dead_code)]

pub mod control;
pub mod daemon;

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to start answering.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to exit after SIGTERM before it is killed.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit for one external command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Read/write timeout on sockets the tests open themselves.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------

/// True when running under CI (`CI=true`): missing tools are failures there.
pub fn is_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Which server the tests drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// The strata binary built by cargo.
    Strata,
    /// nbdkit with the memory or file plugin, to validate test logic.
    Nbdkit,
}

/// The server selected by `STRATA_TEST_SERVER`.
pub fn server_kind() -> ServerKind {
    match std::env::var("STRATA_TEST_SERVER").as_deref() {
        Err(_) | Ok("") | Ok("strata") => ServerKind::Strata,
        Ok("nbdkit") => ServerKind::Nbdkit,
        Ok(other) => panic!("STRATA_TEST_SERVER={other:?}: expected `strata` or `nbdkit`"),
    }
}

/// For tests of behaviour only strata promises (its command line, its export naming):
/// returns false, loudly, when another server is under test.
pub fn strata_only(what: &str) -> bool {
    match server_kind() {
        ServerKind::Strata => true,
        kind => {
            eprintln!("SKIPPED ({kind:?} under test): {what} is strata-specific");
            false
        }
    }
}

fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A directory holding a `python3` that can `import nbd` (python3-libnbd), which nbdsh
/// needs. The first `python3` on PATH may be another interpreter (pyenv, venv) without
/// the module; Debian's `/usr/bin/python3` is tried next.
fn python_with_libnbd_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = on_path("python3") {
            candidates.push(p);
        }
        candidates.push(PathBuf::from("/usr/bin/python3"));
        candidates.into_iter().find_map(|py| {
            let ok = Command::new(&py)
                .args(["-c", "import nbd"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                py.parent().map(Path::to_path_buf)
            } else {
                None
            }
        })
    })
    .clone()
}

fn tool_present(tool: &str) -> bool {
    match tool {
        // nbdsh is a python script: it needs python3-libnbd as well.
        "nbdsh" => on_path("nbdsh").is_some() && python_with_libnbd_dir().is_some(),
        "python3-libnbd" => python_with_libnbd_dir().is_some(),
        _ => on_path(tool).is_some(),
    }
}

/// Checks that every tool is installed. Missing under `CI=true`: panics (a hard failure,
/// never a silent skip). Missing elsewhere: prints a loud SKIPPED message and returns
/// false, and the test should return at once.
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !tool_present(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "required tool(s) not installed: {} (scripts/test.sh installs them: qemu-utils, \
         libnbd-bin, python3-libnbd, nbdkit, fio)",
        missing.join(", ")
    );
    if is_ci() {
        panic!("CI=true and {msg}");
    }
    eprintln!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n");
    false
}

/// Shorthand for one tool.
pub fn require_tool(tool: &str) -> bool {
    require_tools(&[tool])
}

/// `::1` can be bound here (IPv6 loopback is configured).
pub fn ipv6_loopback_available() -> bool {
    TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

// ---------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------

/// Makes a spawned process safe to leave behind: its own process group (so a timeout can
/// kill everything it started) and SIGKILL if the spawning thread dies.
fn harden(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // prctl(2), which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Renders a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), v.to_string_lossy());
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.contains(char::is_whitespace) || a.is_empty() {
            let _ = write!(s, " '{}'", a.replace('\'', "'\\''"));
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

/// What a finished command did.
#[derive(Debug)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CmdOutput {
    /// Exit code (None if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Everything about the run, for a failure message.
    pub fn report(&self) -> String {
        format!(
            "command: {}\nstatus: {} (after {:.1?})\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.command,
            self.status,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    /// Panics with the full report unless the command exited 0.
    #[track_caller]
    pub fn assert_success(self) -> Self {
        assert!(self.success(), "command failed\n{}", self.report());
        self
    }

    /// Panics with the full report unless the command exited with `code`.
    #[track_caller]
    pub fn assert_code(self, code: i32) -> Self {
        assert_eq!(
            self.code(),
            Some(code),
            "unexpected exit status\n{}",
            self.report()
        );
        self
    }
}

/// Runs `cmd` with stdin empty, capturing stdout and stderr, killing it (and its process
/// group) if it is still running after `timeout`, which panics.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    run_inner(cmd, None, timeout)
}

/// [`run_timeout`] with [`CMD_TIMEOUT`].
pub fn run(cmd: &mut Command) -> CmdOutput {
    run_inner(cmd, None, CMD_TIMEOUT)
}

/// Runs `cmd` with [`CMD_TIMEOUT`] and panics unless it exits 0.
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> CmdOutput {
    run(cmd).assert_success()
}

/// Runs `cmd` with `input` on stdin.
pub fn run_with_input(cmd: &mut Command, input: &[u8], timeout: Duration) -> CmdOutput {
    run_inner(cmd, Some(input), timeout)
}

fn run_inner(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> CmdOutput {
    let command = describe(cmd);
    harden(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let stdin_writer = input.map(|data| {
        let mut stdin = child.stdin.take().expect("stdin piped");
        let data = data.to_vec();
        thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let out_reader = spawn_reader(child.stdout.take().expect("stdout piped"));
    let err_reader = spawn_reader(child.stderr.take().expect("stderr piped"));
    let status = wait_deadline(&mut child, timeout);
    let timed_out = status.is_none();
    let status = status.unwrap_or_else(|| {
        kill_group(&child, libc::SIGKILL);
        child.wait().expect("wait after kill")
    });
    let elapsed = start.elapsed();
    if let Some(w) = stdin_writer {
        let _ = w.join();
    }
    let output = CmdOutput {
        command,
        status,
        stdout: String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned(),
        elapsed,
    };
    if timed_out {
        panic!(
            "command timed out after {timeout:?} and was killed\n{}",
            output.report()
        );
    }
    output
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child` until `timeout`; None if it is still running.
fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn kill_group(child: &Child, signal: libc::c_int) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on the process group we created for this child (process_group(0)
    // makes its pgid equal its pid); no memory is involved.
    unsafe {
        libc::kill(-pid, signal);
    }
}

fn kill_one(child: &Child, signal: libc::c_int) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet (we hold
    // the Child and have not seen it exit), so the pid cannot have been reused.
    unsafe {
        libc::kill(pid, signal);
    }
}

// ---------------------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A raw image of `len` bytes mixing random data, zero runs and a byte fill, so copies
/// exercise data, holes and zero detection. Written to `path`.
pub fn write_mixed_image(path: &Path, seed: u64, len: usize) -> Vec<u8> {
    let mut data = pattern(seed, len);
    let chunk = 256 * 1024;
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        match i % 4 {
            1 => c.fill(0),
            3 => c.fill(0x5a),
            _ => {}
        }
    }
    std::fs::write(path, &data).expect("write image");
    data
}

/// Panics with the first differing offset if `a != b`.
#[track_caller]
pub fn assert_same_bytes(what: &str, a: &[u8], b: &[u8]) {
    if a == b {
        return;
    }
    let first = a.iter().zip(b).position(|(x, y)| x != y);
    match first {
        Some(i) => panic!(
            "{what}: contents differ first at offset {i} (0x{i:x}): {:#04x} vs {:#04x} (lengths {} and {})",
            a[i],
            b[i],
            a.len(),
            b.len()
        ),
        None => panic!("{what}: lengths differ: {} vs {}", a.len(), b.len()),
    }
}

// ---------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------

/// How a client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP on 127.0.0.1.
    Tcp,
    /// TCP on ::1.
    Tcp6,
    /// A Unix socket in a temporary directory.
    Unix,
}

/// One listening address of a running server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Endpoint {
    /// The `--listen` argument for strata.
    pub fn listen_arg(&self) -> String {
        match self {
            Endpoint::Tcp(a) => a.to_string(),
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
        }
    }

    /// NBD URI (as qemu, libnbd and fio take it) of export `name` on this endpoint.
    pub fn uri(&self, name: &str) -> String {
        match self {
            Endpoint::Tcp(a) => format!("nbd://{a}/{name}"),
            Endpoint::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
        }
    }

    /// qemu `--image-opts` for export `name` on this endpoint with the nbd driver, for
    /// options a URI cannot carry (such as `x-dirty-bitmap`).
    pub fn qemu_image_opts(&self, name: &str) -> String {
        // Commas separate options; a literal comma is doubled.
        let esc = |s: &str| s.replace(',', ",,");
        let server = match self {
            Endpoint::Tcp(a) => format!(
                "server.type=inet,server.host={},server.port={}",
                a.ip(),
                a.port()
            ),
            Endpoint::Unix(p) => format!(
                "server.type=unix,server.path={}",
                esc(&p.display().to_string())
            ),
        };
        format!("driver=nbd,{server},export={}", esc(name))
    }

    /// Opens a plain socket to the server, with I/O timeouts.
    pub fn connect(&self) -> io::Result<Stream> {
        match self {
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, Duration::from_secs(2))?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Stream::Unix(s))
            }
        }
    }
}

/// A client socket, TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// What the server exports.
#[derive(Debug, Clone)]
pub enum Image {
    /// `memory:SIZE`, a sparse RAM disk of this many bytes.
    Memory(u64),
    /// A raw file (or block device), or a Strata image (strata tells them apart).
    File(PathBuf),
    /// Several images served by one strata process, each under its name
    /// (`--export NAME=IMAGE`); the first is the one the builder's URIs name.
    Exports(Vec<(String, PathBuf)>),
}

impl Image {
    fn args(&self) -> Vec<String> {
        match self {
            Image::Memory(size) => vec![format!("memory:{size}")],
            Image::File(p) => vec![p.display().to_string()],
            Image::Exports(list) => list
                .iter()
                .flat_map(|(name, p)| ["--export".to_owned(), format!("{name}={}", p.display())])
                .collect(),
        }
    }

    /// The export name strata gives this image without `--name`.
    pub fn default_name(&self) -> String {
        match self {
            Image::Memory(_) => "memory".to_owned(),
            Image::File(p) => p
                .file_stem()
                .expect("image path has a file name")
                .to_string_lossy()
                .into_owned(),
            Image::Exports(list) => list.first().expect("at least one export").0.clone(),
        }
    }

    /// The export's size for raw images; 0 when it is not the file's length (Strata
    /// images, several exports).
    fn size(&self) -> u64 {
        match self {
            Image::Memory(size) => *size,
            Image::File(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            Image::Exports(_) => 0,
        }
    }
}

/// Sets up a server; [`ServerBuilder::start`] runs it.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    image: Image,
    listen: Vec<Transport>,
    name: Option<String>,
    read_only: bool,
    file_size_limit: Option<u64>,
    extra_args: Vec<OsString>,
}

/// A server on `memory:SIZE`.
pub fn memory(size: u64) -> ServerBuilder {
    ServerBuilder::new(Image::Memory(size))
}

/// A server on a raw file or a Strata image.
pub fn file(path: impl Into<PathBuf>) -> ServerBuilder {
    ServerBuilder::new(Image::File(path.into()))
}

/// One strata server for several images, each exported under its name.
pub fn exports(list: &[(&str, &Path)]) -> ServerBuilder {
    ServerBuilder::new(Image::Exports(
        list.iter()
            .map(|(name, p)| ((*name).to_owned(), p.to_path_buf()))
            .collect(),
    ))
}

impl ServerBuilder {
    pub fn new(image: Image) -> Self {
        ServerBuilder {
            image,
            listen: Vec::new(),
            name: None,
            read_only: false,
            file_size_limit: None,
            extra_args: Vec::new(),
        }
    }

    /// More `strata serve` arguments (strata only: guard the test with
    /// [`strata_only`]).
    pub fn args<S: Into<OsString>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Runs the server with `RLIMIT_FSIZE` at `bytes` and `SIGXFSZ` ignored, so that
    /// writes growing a file past that size fail with `EFBIG` (strata only).
    pub fn file_size_limit(mut self, bytes: u64) -> Self {
        self.file_size_limit = Some(bytes);
        self
    }

    /// Adds a listening address of this kind (default: one TCP on 127.0.0.1).
    pub fn listen(mut self, t: Transport) -> Self {
        self.listen.push(t);
        self
    }

    /// `--name NAME`.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// `--read-only`.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Starts the server and waits (at most [`STARTUP_TIMEOUT`]) until every endpoint
    /// sends the NBD greeting. TCP ports are picked free on loopback; if another process
    /// took the port first and the server exits complaining of it, retries on a new one.
    #[track_caller]
    pub fn start(self) -> Server {
        let kind = server_kind();
        if kind == ServerKind::Nbdkit && !require_tool("nbdkit") {
            panic!("STRATA_TEST_SERVER=nbdkit but nbdkit is not installed");
        }
        let listen = if self.listen.is_empty() {
            vec![Transport::Tcp]
        } else {
            self.listen.clone()
        };
        let export_name = self
            .name
            .clone()
            .unwrap_or_else(|| self.image.default_name());
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("strata-test-")
                .tempdir()
                .expect("tempdir");
            let endpoints: Vec<Endpoint> = listen
                .iter()
                .enumerate()
                .map(|(i, t)| match t {
                    Transport::Tcp => Endpoint::Tcp(SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::LOCALHOST),
                        free_port(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                    )),
                    Transport::Tcp6 => Endpoint::Tcp(SocketAddr::new(
                        IpAddr::V6(Ipv6Addr::LOCALHOST),
                        free_port(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                    )),
                    Transport::Unix => Endpoint::Unix(dir.path().join(format!("nbd{i}.sock"))),
                })
                .collect();
            let log_path = dir.path().join("server.log");
            let mut cmd = match kind {
                ServerKind::Strata => self.strata_command(&endpoints),
                ServerKind::Nbdkit => self.nbdkit_command(&endpoints, &export_name),
            };
            let command = describe(&cmd);
            let log = std::fs::File::create(&log_path).expect("create server log");
            harden(&mut cmd);
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log);
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start server `{command}`: {e}"));
            let mut server = Server {
                child: Some(child),
                endpoints,
                export_name: export_name.clone(),
                image: self.image.clone(),
                read_only: self.read_only,
                command,
                log_path,
                dir,
            };
            match server.wait_ready() {
                Ok(()) => return server,
                Err(Startup::AddrInUse(msg)) if attempt < ATTEMPTS => {
                    eprintln!(
                        "server start attempt {attempt}: address taken, retrying: {msg}\n{}",
                        server.log()
                    );
                    server.kill_now();
                    continue;
                }
                Err(Startup::AddrInUse(msg)) | Err(Startup::Failed(msg)) => {
                    server.kill_now();
                    panic!(
                        "server did not start: {msg}\ncommand: {}\n--- server output ---\n{}\n---------------------",
                        server.command,
                        server.log()
                    );
                }
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    fn strata_command(&self, endpoints: &[Endpoint]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        cmd.arg("serve");
        for e in endpoints {
            cmd.arg("--listen").arg(e.listen_arg());
        }
        if let Some(name) = &self.name {
            cmd.arg("--name").arg(name);
        }
        if self.read_only {
            cmd.arg("--read-only");
        }
        cmd.args(&self.extra_args);
        cmd.args(self.image.args());
        if let Some(level) = std::env::var_os("STRATA_TEST_LOG") {
            cmd.env("RUST_LOG", level);
        }
        if let Some(limit) = self.file_size_limit {
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // setrlimit(2) and signal(2), which are async-signal-safe; it reads only the
            // copied `limit`.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: limit as libc::rlim_t,
                        rlim_max: limit as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &rl) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    fn nbdkit_command(&self, endpoints: &[Endpoint], export_name: &str) -> Command {
        assert!(
            endpoints.len() == 1,
            "nbdkit listens on one address only; guard this test with common::strata_only"
        );
        assert!(
            self.file_size_limit.is_none(),
            "file size limits apply to strata; guard this test with common::strata_only"
        );
        assert!(
            self.extra_args.is_empty(),
            "serve arguments apply to strata; guard this test with common::strata_only"
        );
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "--exit-with-parent"]);
        match &endpoints[0] {
            Endpoint::Tcp(a) => {
                cmd.arg("-i")
                    .arg(a.ip().to_string())
                    .arg("-p")
                    .arg(a.port().to_string());
            }
            Endpoint::Unix(p) => {
                cmd.arg("-U").arg(p);
            }
        }
        if self.read_only {
            cmd.arg("-r");
        }
        // Extra filters, to check that the tests notice a misbehaving server, e.g.
        // STRATA_TEST_NBDKIT_FILTERS="noextents nozero".
        // Words with `=` are filter parameters ("multi-conn multi-conn-mode=disable").
        let extra = std::env::var("STRATA_TEST_NBDKIT_FILTERS").unwrap_or_default();
        let (params, filters): (Vec<&str>, Vec<&str>) =
            extra.split_whitespace().partition(|w| w.contains('='));
        for f in filters {
            cmd.arg(format!("--filter={f}"));
        }
        // Make NBD_OPT_LIST report the export under the name strata would use.
        cmd.arg("--filter=exportname");
        match &self.image {
            Image::Memory(size) => cmd.arg("memory").arg(format!("size={size}")),
            Image::File(p) => cmd.arg("file").arg(format!("file={}", p.display())),
            Image::Exports(_) => {
                panic!("nbdkit serves one image; guard this test with common::strata_only")
            }
        };
        cmd.arg(format!("exportname={export_name}"))
            .arg("exportname-list=explicit")
            .args(params);
        cmd
    }
}

enum Startup {
    AddrInUse(String),
    Failed(String),
}

/// Picks a loopback port that is free now and was not handed out before in this process.
fn free_port(ip: IpAddr) -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let l = TcpListener::bind((ip, 0)).expect("bind loopback port 0");
        let port = l.local_addr().expect("local_addr").port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no free port on {ip}");
}

/// A running server; stopped (SIGTERM, then SIGKILL) when dropped. Its output is
/// printed if the test is failing.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    endpoints: Vec<Endpoint>,
    export_name: String,
    image: Image,
    read_only: bool,
    command: String,
    log_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Server {
    fn wait_ready(&mut self) -> Result<(), Startup> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut pending: Vec<Endpoint> = self.endpoints.clone();
        let mut last_err = String::new();
        while !pending.is_empty() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                let log = self.log();
                let msg = format!("server exited during startup with {status}");
                return if log.contains("Address already in use") || log.contains("EADDRINUSE") {
                    Err(Startup::AddrInUse(msg))
                } else {
                    Err(Startup::Failed(msg))
                };
            }
            if Instant::now() >= deadline {
                return Err(Startup::Failed(format!(
                    "no NBD greeting within {STARTUP_TIMEOUT:?} on {pending:?} (last error: {last_err})"
                )));
            }
            pending.retain(|ep| match probe_greeting(ep) {
                Ok(()) => false,
                Err(e) => {
                    last_err = format!("{ep:?}: {e}");
                    true
                }
            });
            if !pending.is_empty() {
                thread::sleep(Duration::from_millis(25));
            }
        }
        Ok(())
    }

    /// The first endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoints[0]
    }

    /// All endpoints, in the order they were requested.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The export's name.
    pub fn export_name(&self) -> &str {
        &self.export_name
    }

    /// Export size as configured.
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// URI of the named export on the first endpoint.
    pub fn uri(&self) -> String {
        self.endpoint().uri(&self.export_name)
    }

    /// URI of export `name` on the first endpoint.
    pub fn uri_of(&self, name: &str) -> String {
        self.endpoint().uri(name)
    }

    /// URI of the default export name "" on the first endpoint.
    pub fn default_uri(&self) -> String {
        self.endpoint().uri("")
    }

    /// A scratch directory that lives as long as the server.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// What the server has printed so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` and waits up to [`SHUTDOWN_TIMEOUT`] for the server to exit.
    /// Returns its exit status, or None if it had to be killed (which is then reported).
    pub fn stop_with(&mut self, signal: libc::c_int) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        kill_one(&child, signal);
        match wait_deadline(&mut child, SHUTDOWN_TIMEOUT) {
            Some(status) => Some(status),
            None => {
                eprintln!(
                    "server did not exit within {SHUTDOWN_TIMEOUT:?} of signal {signal}; killing it"
                );
                kill_group(&child, libc::SIGKILL);
                let _ = child.wait();
                None
            }
        }
    }

    /// Graceful stop (SIGTERM); see [`Server::stop_with`].
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_with(libc::SIGTERM)
    }

    /// Panics (showing the server log) unless the server exits 0 within the shutdown
    /// timeout after `signal`.
    #[track_caller]
    pub fn stop_cleanly_with(&mut self, signal: libc::c_int) {
        let status = self.stop_with(signal);
        match status {
            Some(s) if s.success() => {}
            other => panic!(
                "server did not shut down cleanly on signal {signal}: {}\n--- server output ---\n{}\n---------------------",
                match other {
                    Some(s) => format!("exited with {s} (signal {:?})", s.signal()),
                    None => "still running after the timeout (killed)".to_owned(),
                },
                self.log()
            ),
        }
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let was_running = self.child.is_some();
        let status = self.stop();
        let show = std::env::var_os("STRATA_TEST_SHOW_LOG").is_some_and(|v| v == "1");
        if thread::panicking() || show {
            eprintln!(
                "\n--- server output ({}) ---\n{}\n--- end of server output ---",
                self.command,
                self.log()
            );
        } else if was_running && status.is_none() {
            eprintln!("warning: the server ignored SIGTERM and was killed");
        }
    }
}

/// Connects and reads the 16-byte fixed-newstyle greeting (`NBDMAGIC` `IHAVEOPT`).
fn probe_greeting(ep: &Endpoint) -> io::Result<()> {
    let mut s = ep.connect()?;
    match &s {
        Stream::Tcp(t) => t.set_read_timeout(Some(Duration::from_secs(2)))?,
        Stream::Unix(u) => u.set_read_timeout(Some(Duration::from_secs(2)))?,
    }
    let mut greeting = [0u8; 16];
    s.read_exact(&mut greeting)?;
    if &greeting != b"NBDMAGICIHAVEOPT" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected greeting {greeting:02x?}"),
        ));
    }
    // Tell the server we are going away (NBD_OPT_ABORT) rather than just hanging up.
    let mut abort = Vec::with_capacity(20);
    abort.extend_from_slice(&1u32.to_be_bytes()); // client flags: FIXED_NEWSTYLE
    abort.extend_from_slice(b"IHAVEOPT");
    abort.extend_from_slice(&2u32.to_be_bytes()); // NBD_OPT_ABORT
    abort.extend_from_slice(&0u32.to_be_bytes());
    if s.write_all(&abort).is_ok() {
        // Wait for the server's reply (or its close) so it sees a clean soft disconnect.
        let mut reply = [0u8; 20];
        let _ = s.read(&mut reply);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Tool helpers
// ---------------------------------------------------------------------------------------

/// A `nbdsh` command that works even when the first `python3` on PATH lacks the `nbd`
/// module (nbdsh runs `python3 -m nbd`).
pub fn nbdsh() -> Command {
    let mut cmd = Command::new("nbdsh");
    if let Some(dir) = python_with_libnbd_dir() {
        let mut path = OsString::from(dir.as_os_str());
        if let Some(old) = std::env::var_os("PATH") {
            path.push(":");
            path.push(old);
        }
        cmd.env("PATH", path);
    }
    cmd
}

/// Runs a Python snippet in nbdsh (`h` is a fresh, unconnected handle; `import nbd`
/// and `os` are available) with `URI` and the given variables in the environment.
/// Panics with the script's output unless it succeeds.
#[track_caller]
pub fn nbdsh_script(uri: &str, vars: &[(&str, String)], script: &str) -> CmdOutput {
    let mut cmd = nbdsh();
    cmd.env("URI", uri);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let prelude = "import os, sys, errno\nimport nbd\n";
    cmd.arg("-c").arg(format!("{prelude}{script}"));
    run_timeout(&mut cmd, CMD_TIMEOUT).assert_success()
}

/// Runs `nbdinfo` with `args` and returns its output (not asserting success).
pub fn nbdinfo(args: &[&str]) -> CmdOutput {
    run(Command::new("nbdinfo").args(args))
}

/// Values of a flat JSON object's scalar members, as written by qemu-img (`"key": 123`,
/// `"key": true`): a deliberately small parser so the tests need no JSON crate.
pub fn json_scalar(text: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\"");
    let at = text.find(&needle)? + needle.len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest.find([',', '}', '\n', ']']).unwrap_or(rest.len());
    Some(rest[..end].trim().trim_matches('"').to_owned())
}

/// Splits the output of `qemu-img map --output=json` (an array of flat objects) into
/// one string per object.
pub fn json_objects(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').expect("unterminated object") + start;
        out.push(&rest[start..=end]);
        rest = &rest[end + 1..];
    }
    out
}

/// One entry of an allocation map: `[start, start+length)` with flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// Reads as zeroes.
    pub zero: bool,
    /// Allocated data (not a hole).
    pub data: bool,
}

impl MapEntry {
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// Checks that `map` covers `[0, size)` contiguously and that it reports exactly the
/// ranges in `data` (sorted, non-overlapping `(start, end)` pairs) as allocated data and
/// everything else as unallocated zeroes. An entry straddling a boundary fails.
#[track_caller]
pub fn assert_map(map: &[MapEntry], size: u64, data: &[(u64, u64)], raw: &str) {
    let mut pos = 0;
    for e in map {
        assert_eq!(
            e.start, pos,
            "map not contiguous at {pos}: {e:?}\nfull map:\n{raw}"
        );
        assert!(e.length > 0, "empty map entry {e:?}\nfull map:\n{raw}");
        pos = e.end();
    }
    assert_eq!(pos, size, "map does not cover the export\nfull map:\n{raw}");
    for e in map {
        let covered: u64 = data
            .iter()
            .map(|&(s, t)| t.min(e.end()).saturating_sub(s.max(e.start)))
            .sum();
        if covered == e.length {
            assert!(
                e.data,
                "{e:?} lies inside written ranges {data:?} but is not reported as data\nfull map:\n{raw}"
            );
        } else if covered == 0 {
            assert!(
                !e.data && e.zero,
                "{e:?} lies outside written ranges {data:?} but is not reported as a zero hole\nfull map:\n{raw}"
            );
        } else {
            panic!(
                "{e:?} straddles the edge of written ranges {data:?} ({covered} of its bytes written)\nfull map:\n{raw}"
            );
        }
    }
}

/// `over_transports!(name)` generates `mod name { #[test] fn tcp(); #[test] fn unix(); }`,
/// each calling the enclosing module's `fn name(Transport)`.
#[macro_export]
macro_rules! over_transports {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn tcp() {
                    super::$name($crate::common::Transport::Tcp);
                }
                #[test]
                fn unix() {
                    super::$name($crate::common::Transport::Unix);
                }
            }
        )+
    };
}

/// Parses `qemu-img map --output=json`.
pub fn parse_qemu_map(json: &str) -> Vec<MapEntry> {
    json_objects(json)
        .into_iter()
        .map(|o| {
            let num = |k: &str| -> u64 {
                json_scalar(o, k)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("qemu-img map entry without numeric {k:?}: {o}"))
            };
            let flag = |k: &str| -> bool {
                match json_scalar(o, k).as_deref() {
                    Some("true") => true,
                    Some("false") => false,
                    other => panic!("qemu-img map entry with {k:?} = {other:?}: {o}"),
                }
            };
            MapEntry {
                start: num("start"),
                length: num("length"),
                zero: flag("zero"),
                data: flag("data"),
            }
        })
        .collect()
}

/// Parses `nbdinfo --map` output: `offset length type description` per line, where type
/// is the base:allocation flags (bit 0 hole, bit 1 zero).
pub fn parse_nbdinfo_map(text: &str) -> Vec<MapEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num = |i: usize| -> u64 {
                f.get(i)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("bad nbdinfo --map line {l:?}"))
            };
            let flags = num(2);
            MapEntry {
                start: num(0),
                length: num(1),
                zero: flags & 2 != 0,
                data: flags & 1 == 0,
            }
        })
        .collect()
}

/// One line of `nbdinfo --map=qemu:allocation-depth`: `[start, start+length)` provided by
/// the layer at `depth` (0 unallocated, 1 the top layer, 2 its backing, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepthEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    /// nbdinfo's wording for the depth (`absent`, `local`, `backing depth N`).
    pub description: String,
}

/// Parses `nbdinfo --map=qemu:allocation-depth` output: `offset length depth description`
/// per line.
pub fn parse_nbdinfo_depth_map(text: &str) -> Vec<DepthEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num = |i: usize| -> u64 {
                f.get(i)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("bad nbdinfo --map line {l:?}"))
            };
            DepthEntry {
                start: num(0),
                length: num(1),
                depth: u32::try_from(num(2))
                    .unwrap_or_else(|_| panic!("depth beyond 32 bits in {l:?}")),
                description: f.get(3..).map(|d| d.join(" ")).unwrap_or_default(),
            }
        })
        .collect()
}

/// Creates an empty standalone Strata image at `path` (which must not exist).
pub fn new_image(path: &Path, size: u64, cluster: u64) {
    strata::image::create(
        path,
        &strata::image::CreateOptions {
            size: Some(size),
            cluster_size: Some(cluster),
            backing: None,
        },
    )
    .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

/// A small tokio runtime for tests that drive the library's async API.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// `strata ARGS...` with `dir` as its working directory (so paths are relative, as users
/// type them), logging only errors.
pub fn strata_at(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    c.current_dir(dir).args(args).env("RUST_LOG", "error");
    c
}

/// Runs [`strata_at`], failing the test unless it succeeds.
#[track_caller]
pub fn strata_at_ok(dir: &Path, args: &[&str]) -> CmdOutput {
    run_ok(&mut strata_at(dir, args))
}

/// `qemu-img`.
pub fn qemu_img() -> Command {
    Command::new("qemu-img")
}

/// `qemu-io -f raw [-r] -c CMD... URI`.
pub fn qemu_io(uri: &str, read_only: bool, cmds: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    c
}

/// Runs qemu-io on `uri` and panics unless every command succeeded: exit 0 and no
/// failure message (qemu-io reports pattern mismatches on stdout).
#[track_caller]
pub fn qemu_io_ok(uri: &str, read_only: bool, cmds: &[&str]) -> CmdOutput {
    let out = run(&mut qemu_io(uri, read_only, cmds)).assert_success();
    let all = format!("{}{}", out.stdout, out.stderr).to_ascii_lowercase();
    assert!(
        !all.contains("fail") && !all.contains("error"),
        "qemu-io reported a failure\n{}",
        out.report()
    );
    out
}

/// Checks that the seed files of fuzz target `target` under `fuzz/corpus/` hold exactly
/// `seeds`; with `STRATA_WRITE_FUZZ_CORPUS` set, writes them instead.
#[track_caller]
pub fn check_fuzz_seeds(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let write = std::env::var_os("STRATA_WRITE_FUZZ_CORPUS").is_some();
    for (name, bytes) in seeds {
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, bytes).unwrap();
            continue;
        }
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with STRATA_WRITE_FUZZ_CORPUS=1",
                path.display()
            )
        });
        assert!(
            on_disk == *bytes,
            "{} is stale; regenerate with STRATA_WRITE_FUZZ_CORPUS=1",
            path.display()
        );
    }
}

/// A memory-backed directory (`/dev/shm`), for tests of the zero-copy read paths.
/// Without one such tests are skipped (`None`), except under `CI=true`, where that is a
/// failure.
pub fn memory_dir() -> Option<&'static str> {
    const DIR: &str = "/dev/shm";
    match tempfile::tempdir_in(DIR) {
        Ok(_) => Some(DIR),
        Err(e) if is_ci() => {
            panic!("{DIR} is not usable, so the zero-copy paths cannot be tested: {e}")
        }
        Err(_) => None,
    }
}

/// proptest's settings for `cases` cases. Failures are kept beside the test's source file
/// (`NAME.proptest-regressions`): proptest's default would put them under
/// `tests/proptest-regressions/`, because this directory has a `main.rs`.
pub fn proptest_cases(cases: u32) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, FileFailurePersistence};
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}
