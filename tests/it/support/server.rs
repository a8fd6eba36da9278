//! The NBD server under test, started as a child process: strata by default, nbdkit when
//! `STRATA_TEST_SERVER=nbdkit`. It listens on loopback TCP ports or Unix sockets in a
//! temporary directory, is ready once every endpoint sends the NBD greeting, and is
//! stopped when dropped.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::client::{Client, Stream};
use super::process::{harden, kill_group, kill_one, wait_deadline};
use super::spec::{C_FIXED, OPT_ABORT};
use super::wire::opt;
use super::{
    IO_TIMEOUT, SHUTDOWN_TIMEOUT, STARTUP_TIMEOUT, ServerKind, describe, require_tool, server_kind,
    spawn, strata,
};

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
            let child =
                spawn(&mut cmd).unwrap_or_else(|e| panic!("cannot start server `{command}`: {e}"));
            let mut server = Server {
                child: Some(child),
                endpoints,
                export_name: export_name.clone(),
                image: self.image.clone(),
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
        let mut cmd = strata();
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
            "nbdkit listens on one address only; guard this test with support::strata_only"
        );
        assert!(
            self.file_size_limit.is_none(),
            "file size limits apply to strata; guard this test with support::strata_only"
        );
        assert!(
            self.extra_args.is_empty(),
            "serve arguments apply to strata; guard this test with support::strata_only"
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
                panic!("nbdkit serves one image; guard this test with support::strata_only")
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

/// Connects and reads the fixed-newstyle greeting, then says goodbye with `NBD_OPT_ABORT`
/// rather than just hanging up.
fn probe_greeting(ep: &Endpoint) -> io::Result<()> {
    let mut c = Client::new(ep.connect()?);
    c.stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.greeting()?;
    let mut abort = C_FIXED.to_be_bytes().to_vec();
    abort.extend_from_slice(&opt(OPT_ABORT, &[]));
    if c.send(&abort).is_ok() {
        // Wait for the server's reply (or its close) so it sees a clean soft disconnect.
        let _ = c.stream.read(&mut [0u8; 20]);
    }
    Ok(())
}

/// `over_transports!(name)` generates `mod name { #[test] fn tcp(); #[test] fn unix(); }`,
/// each calling the enclosing module's `fn name(Transport)`.
macro_rules! over_transports {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn tcp() {
                    super::$name($crate::support::Transport::Tcp);
                }
                #[test]
                fn unix() {
                    super::$name($crate::support::Transport::Unix);
                }
            }
        )+
    };
}
pub(crate) use over_transports;
