//! The configuration of `strata serve`: a TOML file (`--config FILE`) and the command
//! line's flags, turned into one validated [`Config`].
//!
//! Everything here is a pure function of its inputs: the text of the file, the flags
//! ([`Overrides`]) and, for the checks that files exist, a [`Files`] that answers what
//! is at a path ([`SystemFiles`] asks the file system; tests give a fixed answer). Nothing
//! is opened or bound; the server does that with the result.
//!
//! Every problem is reported, not only the first, each naming where it is and which
//! field it concerns:
//!
//! ```text
//! strata.toml:12:9: exports[1].image: file /tank/vms/vm2.strata does not exist
//! strata.toml:3:15: tls.mode: "require" needs tls.cert and tls.key
//! --handshake-timeout: must be at least 1 second
//! ```
//!
//! Indices count from 0, as the file's order does. A malformed file (bad TOML, an
//! unknown key, a value of the wrong type) stops at its first problem, since what
//! follows cannot be read reliably; checks of values then report every problem found.
//!
//! Flags given on the command line win over the file's value of the same setting;
//! flags that describe exports (`IMAGE`, `--export`, `--name`, `--read-only`, ...) cannot
//! be combined with a file, which describes its exports itself (see `docs/deploy.md`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::access::{Access, NetworkRule};
use crate::backend::BlockSize;
use crate::image::{Format, FormatChoice};
use crate::names;
use crate::proto::consts::DEFAULT_PORT;
use crate::server::{DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, ListenAddr, ServerConfig};

/// Where `strata serve` listens when neither the file nor the flags say: this host only,
/// on NBD's port.
pub const DEFAULT_LISTEN: ListenAddr = ListenAddr::Tcp(SocketAddr::V4(SocketAddrV4::new(
    Ipv4Addr::LOCALHOST,
    DEFAULT_PORT,
)));
/// The log filter unless configured.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// The most connections that may be configured.
pub const MAX_CONNECTIONS_LIMIT: usize = 1 << 20;

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// A place in a configuration file, 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, as it was named.
    pub file: PathBuf,
    /// The line.
    pub line: usize,
    /// The column, in characters.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// One problem of a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where in the file; `None` for flags and for the file as a whole.
    pub location: Option<Location>,
    /// The field: `exports[1].image`, `tls.mode`, or a flag such as `--tls`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(at) = &self.location {
            write!(f, "{at}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a configuration, in the order of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    fn one(
        location: Option<Location>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigErrors(vec![ConfigError {
            location,
            field: field.into(),
            message: message.into(),
        }])
    }

    /// The problems, one per item.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects problems as validation goes on.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn add(&mut self, at: Option<Location>, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            location: at,
            field: field.into(),
            message: message.into(),
        });
    }

    fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.0))
        }
    }
}

// ---------------------------------------------------------------------------------------
// The validated configuration
// ---------------------------------------------------------------------------------------

/// When clients may or must use TLS (`--tls`, `tls.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS: `STARTTLS` is refused.
    Off,
    /// Clients may upgrade with `STARTTLS` or stay in plaintext.
    Optional,
    /// Clients must upgrade before they learn anything.
    Require,
}

impl TlsMode {
    fn word(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::Optional => "optional",
            TlsMode::Require => "require",
        }
    }
}

/// How log lines are written (`--log-format`, `log.format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The server's TLS settings; the files are loaded when the server starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The policy.
    pub mode: TlsMode,
    /// The certificate chain (PEM); set unless `mode` is off.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM); set unless `mode` is off.
    pub key: Option<PathBuf>,
    /// CA certificates client certificates must chain to (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// Where the control API listens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlSettings {
    /// The Unix socket (mode 0600).
    pub socket: Option<PathBuf>,
    /// A TCP address, only ever with `token_file`.
    pub listen: Option<SocketAddr>,
    /// The file holding the bearer token of the TCP listener.
    pub token_file: Option<PathBuf>,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// A level (`info`) or a list of directives (`info,strata::server=debug`), as
    /// `RUST_LOG` takes them; `RUST_LOG` itself wins over it.
    pub level: String,
    /// Text or JSON lines.
    pub format: LogFormat,
}

/// Server-wide settings: everything but the exports. A reload applies none of them
/// (see [`ServerSettings::differences`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Listening addresses, unless the listeners are inherited (socket activation).
    pub listen: Vec<ListenAddr>,
    /// How long a client may take over its handshake.
    pub handshake_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// TLS.
    pub tls: TlsConfig,
    /// The control API.
    pub control: ControlSettings,
    /// Logging.
    pub log: LogSettings,
    /// A file to write the server's pid to once it listens.
    pub pid_file: Option<PathBuf>,
    /// The rules of exports added through the control API (the file's `[access]`).
    pub api_access: Access,
    /// Connection and memory limits (the file's `[limits]`).
    pub limits: Limits,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<ListenAddr>,
}

/// Connection and memory limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections from one client IP address at once; 0 for no limit.
    pub max_connections_per_client: usize,
    /// How long a client may send no request (with none running) before it is
    /// disconnected; `None` for never.
    pub idle_timeout: Option<Duration>,
    /// Request and reply bytes one connection may have in flight.
    pub max_in_flight: u64,
    /// Request and reply bytes all connections may have in flight together; `None` for
    /// no server-wide limit.
    pub max_in_flight_total: Option<u64>,
}

/// The server's own defaults: a limit the configuration does not set is the one the
/// server applies unconfigured.
impl Default for Limits {
    fn default() -> Self {
        let server = ServerConfig::default();
        Limits {
            max_connections_per_client: server.max_connections_per_client,
            idle_timeout: server.session.idle_timeout,
            max_in_flight: server.session.max_in_flight,
            max_in_flight_total: server.max_in_flight_total,
        }
    }
}

impl ServerSettings {
    /// The names of the settings that differ between `self` and `other`, for a reload to
    /// report as needing a restart.
    pub fn differences(&self, other: &ServerSettings) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |same: bool, name| {
            if !same {
                out.push(name);
            }
        };
        check(self.listen == other.listen, "listen");
        check(
            self.handshake_timeout == other.handshake_timeout,
            "handshake_timeout",
        );
        check(
            self.max_connections == other.max_connections,
            "max_connections",
        );
        check(self.tls == other.tls, "tls");
        check(self.control == other.control, "control");
        check(self.log == other.log, "log");
        check(self.pid_file == other.pid_file, "pid_file");
        check(
            self.api_access == other.api_access,
            "[access] for exports added through the control API",
        );
        check(self.limits == other.limits, "limits");
        check(self.metrics == other.metrics, "metrics");
        out
    }
}

/// One export as configured.
#[derive(Debug, Clone)]
pub struct ExportDef {
    /// The name clients ask for.
    pub name: String,
    /// What to serve, as [`crate::server::export::open_export`] takes it: `memory:SIZE` or
    /// a path (relative paths of a file are resolved against the file's directory).
    pub image: String,
    /// Refuse writes.
    pub read_only: bool,
    /// How to read the file; `None` detects it.
    pub format: Option<Format>,
    /// Sent to clients that ask.
    pub description: String,
    /// Who may see and open it.
    pub access: Access,
    /// Fault-injection rules (`--inject-error`, `inject_errors`), already checked.
    pub faults: Vec<String>,
    /// Where its fields are, for checks made against settings the file does not hold.
    at: ExportAt,
}

#[derive(Debug, Clone, Default)]
struct ExportAt {
    /// `exports[N]`.
    field: String,
    require_tls: Option<Location>,
    allow_identity: Option<Location>,
}

impl PartialEq for ExportDef {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.image == other.image
            && self.read_only == other.read_only
            && self.format == other.format
            && self.description == other.description
            && self.access == other.access
            && self.faults == other.faults
    }
}

impl Eq for ExportDef {}

impl ExportDef {
    /// An export of the command line (`IMAGE`, `--export NAME=IMAGE`).
    pub fn new(
        name: impl Into<String>,
        image: impl Into<String>,
        read_only: bool,
        format: Option<Format>,
        description: impl Into<String>,
        access: Access,
    ) -> Self {
        ExportDef {
            name: name.into(),
            image: image.into(),
            read_only,
            format,
            description: description.into(),
            access,
            faults: Vec::new(),
            at: ExportAt::default(),
        }
    }

    /// The same export with requests failing as `faults` say (rules as
    /// [`crate::backend::parse_fault_rule`] reads them).
    #[must_use]
    pub fn with_faults(mut self, faults: Vec<String>) -> Self {
        self.faults = faults;
        self
    }

    /// True if serving `other` instead needs the image opened again: another file, or
    /// the same file read differently.
    pub fn storage_differs(&self, other: &ExportDef) -> bool {
        self.image != other.image
            || self.read_only != other.read_only
            || self.format != other.format
            || self.faults != other.faults
    }
}

/// A complete, validated configuration of `strata serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from, if any.
    pub file: Option<PathBuf>,
    /// Server-wide settings.
    pub server: ServerSettings,
    /// The exports, in order; the first is the default export.
    pub exports: Vec<ExportDef>,
}

impl Config {
    /// Checks the exports' TLS-related rules against `tls`, the settings a running
    /// server actually has, which may differ from the file's after a reload (TLS
    /// settings need a restart).
    pub fn check_exports_against(&self, tls: &TlsConfig) -> Result<(), ConfigErrors> {
        let mut problems = Problems::default();
        check_exports_tls(&self.exports, tls, &mut problems);
        problems.finish(())
    }
}

// ---------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------

/// Server-wide settings given as flags; each one set wins over the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--listen`, repeated: replaces the file's `listen`.
    pub listen: Vec<ListenAddr>,
    /// `--handshake-timeout SECS`.
    pub handshake_timeout: Option<u64>,
    /// `--max-connections N`.
    pub max_connections: Option<usize>,
    /// `--tls MODE`.
    pub tls_mode: Option<TlsMode>,
    /// `--tls-cert FILE`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key FILE`.
    pub tls_key: Option<PathBuf>,
    /// `--tls-client-ca FILE`.
    pub tls_client_ca: Option<PathBuf>,
    /// `--control PATH`.
    pub control_socket: Option<PathBuf>,
    /// `--control-listen HOST:PORT`.
    pub control_listen: Option<ListenAddr>,
    /// `--control-token-file FILE`.
    pub control_token_file: Option<PathBuf>,
    /// `-v` (debug) or `-vv` (trace).
    pub log_level: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--pid-file PATH`.
    pub pid_file: Option<PathBuf>,
    /// `--max-connections-per-client N`.
    pub max_connections_per_client: Option<usize>,
    /// `--idle-timeout SECS` (0: never).
    pub idle_timeout: Option<u64>,
    /// `--max-in-flight SIZE`.
    pub max_in_flight: Option<u64>,
    /// `--max-in-flight-total SIZE` (0: no server-wide limit).
    pub max_in_flight_total: Option<u64>,
    /// `--metrics ADDR`.
    pub metrics: Option<ListenAddr>,
}

// ---------------------------------------------------------------------------------------
// What is on disk
// ---------------------------------------------------------------------------------------

/// What a path names, as far as validation cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A block device.
    BlockDevice,
    /// A directory.
    Directory,
    /// Something else (a socket, a FIFO, ...).
    Other,
    /// Nothing.
    Missing,
    /// It cannot be looked at (permissions, I/O); the reason.
    Unreadable(String),
}

/// Answers what is at a path, so that validation can say a file is missing without
/// doing I/O itself.
pub trait Files {
    /// What `path` names, following symbolic links.
    fn kind(&self, path: &Path) -> FileKind;
}

/// [`Files`] of the real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemFiles;

impl Files for SystemFiles {
    fn kind(&self, path: &Path) -> FileKind {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => FileKind::File,
            Ok(m) if m.file_type().is_block_device() => FileKind::BlockDevice,
            Ok(m) if m.is_dir() => FileKind::Directory,
            Ok(_) => FileKind::Other,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileKind::Missing,
            Err(e) => FileKind::Unreadable(e.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The file's shape
// ---------------------------------------------------------------------------------------

type Str = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<Vec<Str>>>,
    handshake_timeout: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    pid_file: Option<Str>,
    tls: Option<RawTls>,
    control: Option<RawControl>,
    log: Option<RawLog>,
    access: Option<RawAccess>,
    limits: Option<RawLimits>,
    metrics: Option<Str>,
    #[serde(default)]
    exports: Vec<Spanned<RawExport>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections_per_client: Option<Spanned<i64>>,
    idle_timeout: Option<Spanned<i64>>,
    max_in_flight: Option<Str>,
    max_in_flight_total: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    mode: Option<Spanned<TlsMode>>,
    cert: Option<Str>,
    key: Option<Str>,
    client_ca: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<Str>,
    listen: Option<Str>,
    token_file: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<Str>,
    format: Option<Spanned<LogFormat>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    allow: Option<Spanned<Vec<Str>>>,
    allow_identity: Option<Spanned<Vec<Str>>>,
    require_tls: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExport {
    name: Str,
    image: Str,
    #[serde(default)]
    read_only: bool,
    format: Option<Spanned<FormatChoice>>,
    #[serde(default)]
    description: String,
    allow: Option<Spanned<Vec<Str>>>,
    allow_identity: Option<Spanned<Vec<Str>>>,
    require_tls: Option<Spanned<bool>>,
    #[serde(default)]
    inject_errors: Vec<Str>,
}

/// The text being read, to turn byte spans into lines and columns.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
    /// Relative paths in the file are relative to this directory.
    dir: PathBuf,
}

impl Source<'_> {
    fn at(&self, span: Range<usize>) -> Location {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Location {
            file: self.file.to_path_buf(),
            line,
            column,
        }
    }

    fn at_of<T>(&self, value: &Spanned<T>) -> Option<Location> {
        Some(self.at(value.span()))
    }

    fn path(&self, value: &str) -> PathBuf {
        self.dir.join(value)
    }
}

/// Reads the TOML and its shape: syntax, unknown keys, types. Stops at the first problem.
fn read_raw(source: &Source<'_>) -> Result<RawConfig, ConfigErrors> {
    let deserializer = toml::Deserializer::parse(source.text).map_err(|e| {
        let at = e.span().map(|s| source.at(s));
        ConfigErrors::one(at, "", e.message().trim_end().to_owned())
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = field_path(&e.path().to_string());
        let inner = e.into_inner();
        let at = inner
            .span()
            .map(|s| source.at(s))
            .or_else(|| Some(source.at(0..0)));
        ConfigErrors::one(at, field, inner.message().trim_end().to_owned())
    })
}

/// A serde path without the segments `toml::Spanned` adds, and `.` for the root.
fn field_path(path: &str) -> String {
    let cleaned: Vec<&str> = path
        .split('.')
        .filter(|segment| !segment.starts_with("$__serde_spanned_private"))
        .collect();
    let joined = cleaned.join(".");
    // A segment such as `exports[1].$__...` leaves `exports[1]`; a root error leaves "".
    if joined == "." { String::new() } else { joined }
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// Reads the configuration file `file` whose text is `text`, with the command line's
/// `flags` winning over it, and validates the result. Image, TLS and token files must
/// exist, as `files` says.
pub fn load(
    text: &str,
    file: &Path,
    flags: &Overrides,
    files: &dyn Files,
) -> Result<Config, ConfigErrors> {
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let source = Source { file, text, dir };
    let raw = read_raw(&source)?;
    let mut problems = Problems::default();
    let server = server_settings(&raw, Some(&source), flags, Some(files), &mut problems);
    let exports = exports(&raw, &source, server.as_ref(), files, &mut problems);
    if let Some(server) = &server {
        check_exports_tls(&exports, &server.tls, &mut problems);
    }
    let server = match server {
        Some(server) => server,
        None => return Err(ConfigErrors(problems.0)),
    };
    problems.finish(Config {
        file: Some(file.to_path_buf()),
        server,
        exports,
    })
}

/// A configuration from flags alone: the exports of the command line and its settings.
/// Files are not checked here; opening them reports what is wrong.
pub fn from_flags(flags: &Overrides, exports: Vec<ExportDef>) -> Result<Config, ConfigErrors> {
    let mut problems = Problems::default();
    let server = server_settings(&RawConfig::default(), None, flags, None, &mut problems);
    let mut seen: BTreeMap<&str, ()> = BTreeMap::new();
    for e in &exports {
        if seen.insert(&e.name, ()).is_some() {
            problems.add(
                None,
                "",
                format!(
                    "two exports are named {:?}; name them with --export NAME=IMAGE",
                    e.name
                ),
            );
        }
    }
    match server {
        Some(server) => problems.finish(Config {
            file: None,
            server,
            exports,
        }),
        None => Err(ConfigErrors(problems.0)),
    }
}

/// One setting as the validation sees it: its value, the name to report (a flag or a
/// field of the file) and where it is written.
struct Setting<T> {
    value: T,
    name: String,
    at: Option<Location>,
    from_flag: bool,
}

impl<T> Setting<T> {
    /// How to quote the setting with a value in a message: `--tls off` for a flag,
    /// `tls.mode = "off"` for the file.
    fn with_value(&self, value: &str) -> String {
        if self.from_flag {
            format!("{} {value}", self.name)
        } else {
            format!("{} = {value:?}", self.name)
        }
    }
}

/// The flag's value if it was given, else the file's.
fn pick<F, T: Clone>(
    flag: Option<F>,
    flag_name: &str,
    file: Option<&Spanned<T>>,
    file_name: &str,
    source: Option<&Source<'_>>,
    convert: impl FnOnce(F) -> T,
) -> Setting<Option<T>> {
    match (flag, file) {
        (Some(v), _) => Setting {
            value: Some(convert(v)),
            name: flag_name.to_owned(),
            at: None,
            from_flag: true,
        },
        (None, Some(v)) => Setting {
            value: Some(v.get_ref().clone()),
            name: file_name.to_owned(),
            at: source.and_then(|s| s.at_of(v)),
            from_flag: false,
        },
        // Unset: name it as the user would set it, in the file if there is one.
        (None, None) => Setting {
            value: None,
            name: if source.is_some() {
                file_name
            } else {
                flag_name
            }
            .to_owned(),
            at: None,
            from_flag: source.is_none(),
        },
    }
}

/// A path setting: the flag's path as given, or the file's resolved against its
/// directory.
fn pick_path(
    flag: Option<&PathBuf>,
    flag_name: &str,
    file: Option<&Str>,
    file_name: &str,
    source: Option<&Source<'_>>,
) -> Setting<Option<PathBuf>> {
    let mut setting = pick(flag.cloned(), flag_name, file, file_name, source, |p| {
        p.display().to_string()
    });
    let value = setting.value.take();
    let resolved = match (&value, setting.from_flag, source) {
        (Some(v), false, Some(s)) => Some(s.path(v)),
        (Some(v), _, _) => Some(PathBuf::from(v)),
        (None, _, _) => None,
    };
    Setting {
        value: resolved,
        name: setting.name,
        at: setting.at,
        from_flag: setting.from_flag,
    }
}

fn server_settings(
    raw: &RawConfig,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    files: Option<&dyn Files>,
    problems: &mut Problems,
) -> Option<ServerSettings> {
    let errors_before = problems.0.len();
    let listen = listen_addrs(raw, source, flags, problems);

    let handshake_timeout = pick(
        flags
            .handshake_timeout
            .map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
        "--handshake-timeout",
        raw.handshake_timeout.as_ref(),
        "handshake_timeout",
        source,
        |v| v,
    );
    let timeout = match handshake_timeout.value {
        None => DEFAULT_HANDSHAKE_TIMEOUT,
        Some(s) if s >= 1 => Duration::from_secs(s.unsigned_abs()),
        Some(_) => {
            problems.add(
                handshake_timeout.at.clone(),
                handshake_timeout.name.clone(),
                "must be at least 1 second",
            );
            DEFAULT_HANDSHAKE_TIMEOUT
        }
    };

    let max_connections = pick(
        flags
            .max_connections
            .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        "--max-connections",
        raw.max_connections.as_ref(),
        "max_connections",
        source,
        |v| v,
    );
    let max = match max_connections.value {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(n) if n >= 1 && n.unsigned_abs() <= MAX_CONNECTIONS_LIMIT as u64 => {
            usize::try_from(n).unwrap_or(DEFAULT_MAX_CONNECTIONS)
        }
        Some(_) => {
            problems.add(
                max_connections.at.clone(),
                max_connections.name.clone(),
                format!("must be between 1 and {MAX_CONNECTIONS_LIMIT}"),
            );
            DEFAULT_MAX_CONNECTIONS
        }
    };

    let tls = tls_settings(raw.tls.as_ref(), source, flags, files, problems);
    let control = control_settings(raw.control.as_ref(), source, flags, files, problems);
    let log = log_settings(raw.log.as_ref(), source, flags, problems);
    let pid_file = pick_path(
        flags.pid_file.as_ref(),
        "--pid-file",
        raw.pid_file.as_ref(),
        "pid_file",
        source,
    );
    if pid_file
        .value
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        problems.add(pid_file.at.clone(), pid_file.name.clone(), "is empty");
    }
    let api_access = match (&raw.access, source) {
        (Some(a), Some(s)) => {
            rules(
                a.allow.as_ref(),
                a.allow_identity.as_ref(),
                a.require_tls.as_ref(),
                "access",
                s,
                problems,
            )
            .0
        }
        _ => Access::open(),
    };
    if let (Some(a), Some(s)) = (&raw.access, source) {
        check_rules_tls(
            a.require_tls
                .as_ref()
                .filter(|r| *r.get_ref())
                .map(|r| s.at(r.span())),
            a.allow_identity
                .as_ref()
                .filter(|l| !l.get_ref().is_empty())
                .map(|l| s.at(l.span())),
            "access",
            &tls,
            problems,
        );
    }
    let limits = limits(raw.limits.as_ref(), source, flags, problems);
    let metrics = match (&flags.metrics, &raw.metrics) {
        (Some(addr), _) => Some(addr.clone()),
        (None, Some(text)) => match text.get_ref().parse::<ListenAddr>() {
            Ok(addr) => Some(addr),
            Err(e) => {
                problems.add(source.and_then(|s| s.at_of(text)), "metrics", e.to_string());
                None
            }
        },
        (None, None) => None,
    };
    if problems.0.len() > errors_before {
        return None;
    }
    Some(ServerSettings {
        listen,
        handshake_timeout: timeout,
        max_connections: max,
        tls,
        control,
        log,
        pid_file: pid_file.value,
        api_access,
        limits,
        metrics,
    })
}

/// `[limits]` and the limit flags.
fn limits(
    raw: Option<&RawLimits>,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    problems: &mut Problems,
) -> Limits {
    let empty = RawLimits::default();
    let raw = raw.unwrap_or(&empty);
    let mut out = Limits::default();
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let per_client = pick(
        flags.max_connections_per_client.map(|n| count(n as u64)),
        "--max-connections-per-client",
        raw.max_connections_per_client.as_ref(),
        "limits.max_connections_per_client",
        source,
        |v| v,
    );
    match per_client.value {
        None => {}
        Some(n) if (0..=MAX_CONNECTIONS_LIMIT as i64).contains(&n) => {
            out.max_connections_per_client = n.unsigned_abs() as usize;
        }
        Some(_) => problems.add(
            per_client.at,
            per_client.name,
            format!("must be between 0 (no limit) and {MAX_CONNECTIONS_LIMIT}"),
        ),
    }
    let idle = pick(
        flags.idle_timeout.map(count),
        "--idle-timeout",
        raw.idle_timeout.as_ref(),
        "limits.idle_timeout",
        source,
        |v| v,
    );
    match idle.value {
        None | Some(0) => {}
        Some(n) if n > 0 => out.idle_timeout = Some(Duration::from_secs(n.unsigned_abs())),
        Some(_) => problems.add(
            idle.at,
            idle.name,
            "must be 0 (never) or a number of seconds",
        ),
    }
    let size = |flag: Option<u64>, flag_name: &str, file: Option<&Str>, file_name: &str| {
        let setting = pick(
            flag.map(|n| n.to_string()),
            flag_name,
            file,
            file_name,
            source,
            |v| v,
        );
        let value = setting.value.as_deref().map(crate::size::parse_size);
        (setting, value)
    };
    // A budget must hold the largest request, or that request could never run.
    let largest_request = u64::from(BlockSize::MAX_PAYLOAD);
    let largest_request_text = format!("{}M", largest_request >> 20);
    let (setting, value) = size(
        flags.max_in_flight,
        "--max-in-flight",
        raw.max_in_flight.as_ref(),
        "limits.max_in_flight",
    );
    match value {
        None => {}
        Some(Ok(n)) if n >= largest_request => {
            out.max_in_flight = n;
        }
        Some(Ok(_)) => problems.add(
            setting.at,
            setting.name,
            format!("must be at least {largest_request_text}, the largest request"),
        ),
        Some(Err(e)) => problems.add(setting.at, setting.name, e.to_string()),
    }
    let (setting, value) = size(
        flags.max_in_flight_total,
        "--max-in-flight-total",
        raw.max_in_flight_total.as_ref(),
        "limits.max_in_flight_total",
    );
    match value {
        None => {}
        Some(Ok(0)) => out.max_in_flight_total = None,
        // Below max_in_flight, it caps each connection too.
        Some(Ok(n)) if n >= largest_request => {
            out.max_in_flight_total = Some(n);
        }
        Some(Ok(_)) => problems.add(
            setting.at,
            setting.name,
            format!("must be 0 (no limit) or at least {largest_request_text}, the largest request"),
        ),
        Some(Err(e)) => problems.add(setting.at, setting.name, e.to_string()),
    }
    out
}

fn listen_addrs(
    raw: &RawConfig,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    problems: &mut Problems,
) -> Vec<ListenAddr> {
    if !flags.listen.is_empty() {
        return flags.listen.clone();
    }
    let (Some(list), Some(source)) = (&raw.listen, source) else {
        return vec![DEFAULT_LISTEN];
    };
    if list.get_ref().is_empty() {
        problems.add(
            source.at_of(list),
            "listen",
            "is empty: give at least one address (HOST:PORT, [V6]:PORT or unix:PATH)",
        );
    }
    let mut out: Vec<ListenAddr> = Vec::new();
    for (i, entry) in list.get_ref().iter().enumerate() {
        let field = format!("listen[{i}]");
        match entry.get_ref().parse::<ListenAddr>() {
            Ok(ListenAddr::Unix(p)) => {
                let addr = ListenAddr::Unix(source.path(&p.display().to_string()));
                push_unique(&mut out, addr, source.at_of(entry), field, problems);
            }
            Ok(addr) => push_unique(&mut out, addr, source.at_of(entry), field, problems),
            Err(e) => problems.add(source.at_of(entry), field, e.to_string()),
        }
    }
    out
}

fn push_unique(
    out: &mut Vec<ListenAddr>,
    addr: ListenAddr,
    at: Option<Location>,
    field: String,
    problems: &mut Problems,
) {
    if let Some(first) = out.iter().position(|a| *a == addr) {
        problems.add(
            at,
            field,
            format!("{addr} is listed already, as listen[{first}]"),
        );
    } else {
        out.push(addr);
    }
}

fn tls_settings(
    raw: Option<&RawTls>,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    files: Option<&dyn Files>,
    problems: &mut Problems,
) -> TlsConfig {
    let empty = RawTls::default();
    let raw = raw.unwrap_or(&empty);
    let mode = pick(
        flags.tls_mode,
        "--tls",
        raw.mode.as_ref(),
        "tls.mode",
        source,
        |m| m,
    );
    let cert = pick_path(
        flags.tls_cert.as_ref(),
        "--tls-cert",
        raw.cert.as_ref(),
        "tls.cert",
        source,
    );
    let key = pick_path(
        flags.tls_key.as_ref(),
        "--tls-key",
        raw.key.as_ref(),
        "tls.key",
        source,
    );
    let client_ca = pick_path(
        flags.tls_client_ca.as_ref(),
        "--tls-client-ca",
        raw.client_ca.as_ref(),
        "tls.client_ca",
        source,
    );
    for setting in [&cert, &key, &client_ca] {
        check_regular_file(setting, files, problems);
    }
    match (&cert.value, &key.value) {
        (Some(_), None) => problems.add(
            cert.at.clone(),
            cert.name.clone(),
            format!("needs {} too", key.name),
        ),
        (None, Some(_)) => problems.add(
            key.at.clone(),
            key.name.clone(),
            format!("needs {} too", cert.name),
        ),
        _ => {}
    }
    if client_ca.value.is_some() && cert.value.is_none() {
        problems.add(
            client_ca.at.clone(),
            client_ca.name.clone(),
            format!(
                "needs a server certificate ({} and {})",
                cert.name, key.name
            ),
        );
    }
    let has_cert = cert.value.is_some() && key.value.is_some();
    let resolved = mode.value.unwrap_or(if cert.value.is_some() {
        TlsMode::Optional
    } else {
        TlsMode::Off
    });
    match (mode.value, has_cert) {
        (Some(m @ (TlsMode::Optional | TlsMode::Require)), false) if cert.value.is_none() => {
            problems.add(
                mode.at.clone(),
                mode.name.clone(),
                format!(
                    "{} needs {} and {}",
                    mode.with_value(m.word()),
                    cert.name,
                    key.name
                ),
            );
        }
        (Some(TlsMode::Off), _) if cert.value.is_some() => problems.add(
            mode.at.clone(),
            mode.name.clone(),
            format!(
                "{} contradicts {}: drop one of them",
                mode.with_value("off"),
                cert.name
            ),
        ),
        _ => {}
    }
    TlsConfig {
        mode: resolved,
        cert: cert.value,
        key: key.value,
        client_ca: client_ca.value,
    }
}

fn control_settings(
    raw: Option<&RawControl>,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    files: Option<&dyn Files>,
    problems: &mut Problems,
) -> ControlSettings {
    let empty = RawControl::default();
    let raw = raw.unwrap_or(&empty);
    let socket = pick_path(
        flags.control_socket.as_ref(),
        "--control",
        raw.socket.as_ref(),
        "control.socket",
        source,
    );
    let token = pick_path(
        flags.control_token_file.as_ref(),
        "--control-token-file",
        raw.token_file.as_ref(),
        "control.token_file",
        source,
    );
    let listen_setting = match (&flags.control_listen, &raw.listen) {
        (Some(addr), _) => Setting {
            value: Some(Ok(addr.clone())),
            name: "--control-listen".to_owned(),
            at: None,
            from_flag: true,
        },
        (None, Some(text)) => Setting {
            value: Some(text.get_ref().parse::<ListenAddr>()),
            name: "control.listen".to_owned(),
            at: source.and_then(|s| s.at_of(text)),
            from_flag: false,
        },
        (None, None) => Setting {
            value: None,
            name: if source.is_some() {
                "control.listen"
            } else {
                "--control-listen"
            }
            .to_owned(),
            at: None,
            from_flag: source.is_none(),
        },
    };
    let listen = match &listen_setting.value {
        None => None,
        Some(Ok(ListenAddr::Tcp(addr))) => Some(*addr),
        Some(Ok(ListenAddr::Unix(_))) => {
            let socket_name = if listen_setting.from_flag {
                "--control PATH"
            } else {
                "control.socket"
            };
            problems.add(
                listen_setting.at.clone(),
                listen_setting.name.clone(),
                format!("takes HOST:PORT; use {socket_name} for a Unix socket"),
            );
            None
        }
        Some(Err(e)) => {
            problems.add(
                listen_setting.at.clone(),
                listen_setting.name.clone(),
                e.to_string(),
            );
            None
        }
    };
    if listen_setting.value.is_some() && token.value.is_none() {
        problems.add(
            listen_setting.at.clone(),
            listen_setting.name.clone(),
            format!(
                "the control API on TCP needs a bearer token: set {}",
                token.name
            ),
        );
    }
    if token.value.is_some() && listen_setting.value.is_none() {
        problems.add(
            token.at.clone(),
            token.name.clone(),
            format!(
                "is only used by a TCP control listener, and {} is not set",
                listen_setting.name
            ),
        );
    }
    if socket
        .value
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        problems.add(socket.at.clone(), socket.name.clone(), "is empty");
    }
    check_regular_file(&token, files, problems);
    ControlSettings {
        socket: socket.value,
        listen,
        token_file: token.value,
    }
}

fn log_settings(
    raw: Option<&RawLog>,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    problems: &mut Problems,
) -> LogSettings {
    let empty = RawLog::default();
    let raw = raw.unwrap_or(&empty);
    let level = pick(
        flags.log_level.clone(),
        "-v",
        raw.level.as_ref(),
        "log.level",
        source,
        |l| l,
    );
    let format = pick(
        flags.log_format,
        "--log-format",
        raw.format.as_ref(),
        "log.format",
        source,
        |f| f,
    );
    let text = level
        .value
        .clone()
        .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
    if let Err(why) = check_log_filter(&text) {
        problems.add(level.at.clone(), level.name.clone(), why);
    }
    LogSettings {
        level: text,
        format: format.value.unwrap_or_default(),
    }
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Accepts what `RUST_LOG` takes in practice: a level, or comma-separated directives
/// `LEVEL` or `TARGET=LEVEL`. A bare word that is not a level would be taken by the
/// logging library as a target to enable, which silences everything else: a typo such
/// as `verbose` must be an error instead.
fn check_log_filter(text: &str) -> Result<(), String> {
    let bad = |d: &str| {
        format!(
            "{d:?} is not a level: use off, error, warn, info, debug or trace, or \
             directives such as \"info,strata::server=debug\""
        )
    };
    if text.trim().is_empty() {
        return Err("is empty".to_owned());
    }
    for directive in text.split(',') {
        let directive = directive.trim();
        let level = match directive.split_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            Some(_) => return Err(bad(directive)),
            None => directive,
        };
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(bad(directive));
        }
    }
    Ok(())
}

/// Reads allow lists and `require_tls`, wherever they appear (`[access]` or an export).
/// Returns the rules, whether the export set each part itself, and reports bad values.
fn rules(
    allow: Option<&Spanned<Vec<Str>>>,
    allow_identity: Option<&Spanned<Vec<Str>>>,
    require_tls: Option<&Spanned<bool>>,
    prefix: &str,
    source: &Source<'_>,
    problems: &mut Problems,
) -> (Access, [bool; 3]) {
    let mut networks = Vec::new();
    for (i, entry) in allow
        .map(|l| l.get_ref().as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match entry.get_ref().parse::<NetworkRule>() {
            Ok(rule) => networks.push(rule),
            Err(e) => problems.add(
                source.at_of(entry),
                format!("{prefix}.allow[{i}]"),
                e.to_string(),
            ),
        }
    }
    let mut identities = Vec::new();
    for (i, entry) in allow_identity
        .map(|l| l.get_ref().as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if entry.get_ref().trim().is_empty() {
            problems.add(
                source.at_of(entry),
                format!("{prefix}.allow_identity[{i}]"),
                "is empty",
            );
        } else {
            identities.push(entry.get_ref().clone());
        }
    }
    let tls = require_tls.is_some_and(|r| *r.get_ref());
    (
        Access::new(networks, identities).with_tls_required(tls),
        [
            allow.is_some(),
            allow_identity.is_some(),
            require_tls.is_some(),
        ],
    )
}

/// Rules that need TLS settings: `require_tls` needs TLS on, identities need a client CA.
fn check_rules_tls(
    require_tls: Option<Location>,
    allow_identity: Option<Location>,
    prefix: &str,
    tls: &TlsConfig,
    problems: &mut Problems,
) {
    if let Some(at) = require_tls {
        if tls.mode == TlsMode::Off {
            problems.add(
                Some(at),
                format!("{prefix}.require_tls"),
                "needs TLS on the server: set tls.cert and tls.key",
            );
        }
    }
    if let Some(at) = allow_identity {
        if tls.client_ca.is_none() {
            problems.add(
                Some(at),
                format!("{prefix}.allow_identity"),
                "needs tls.client_ca: identities come from verified client certificates",
            );
        }
    }
}

fn check_exports_tls(exports: &[ExportDef], tls: &TlsConfig, problems: &mut Problems) {
    for e in exports {
        check_rules_tls(
            e.at.require_tls.clone(),
            e.at.allow_identity.clone(),
            &e.at.field,
            tls,
            problems,
        );
    }
}

fn exports(
    raw: &RawConfig,
    source: &Source<'_>,
    server: Option<&ServerSettings>,
    files: &dyn Files,
    problems: &mut Problems,
) -> Vec<ExportDef> {
    let defaults = server.map_or_else(Access::open, |s| s.api_access.clone());
    let mut out: Vec<ExportDef> = Vec::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, entry) in raw.exports.iter().enumerate() {
        let field = format!("exports[{i}]");
        let e = entry.get_ref();
        let name = e.name.get_ref();
        if name.is_empty() {
            problems.add(source.at_of(&e.name), format!("{field}.name"), "is empty");
        } else if let Err(why) = names::EXPORT.check(name) {
            problems.add(
                source.at_of(&e.name),
                format!("{field}.name"),
                why.to_string(),
            );
        } else if let Some(first) = names.get(name) {
            problems.add(
                source.at_of(&e.name),
                format!("{field}.name"),
                format!("{name:?} is the name of exports[{first}] already"),
            );
        } else {
            names.insert(name.clone(), i);
        }
        let image = export_image(e, &field, source, files, problems);
        let format = e.format.as_ref().and_then(|f| f.get_ref().forced());
        if format.is_some() && image.starts_with("memory:") {
            problems.add(
                e.format.as_ref().and_then(|f| source.at_of(f)),
                format!("{field}.format"),
                "applies to files; a memory: disk has no format",
            );
        }
        let (own, set) = rules(
            e.allow.as_ref(),
            e.allow_identity.as_ref(),
            e.require_tls.as_ref(),
            &field,
            source,
            problems,
        );
        // Each part an export sets replaces that part of [access]; the rest is inherited.
        let access = Access::new(
            if set[0] {
                own.networks().to_vec()
            } else {
                defaults.networks().to_vec()
            },
            if set[1] {
                own.identities().to_vec()
            } else {
                defaults.identities().to_vec()
            },
        )
        .with_tls_required(if set[2] {
            own.tls_required()
        } else {
            defaults.tls_required()
        });
        let at = ExportAt {
            field: field.clone(),
            require_tls: e
                .require_tls
                .as_ref()
                .filter(|r| *r.get_ref())
                .and_then(|r| source.at_of(r)),
            allow_identity: e
                .allow_identity
                .as_ref()
                .filter(|l| !l.get_ref().is_empty())
                .and_then(|l| source.at_of(l)),
        };
        let mut faults = Vec::new();
        for (j, rule) in e.inject_errors.iter().enumerate() {
            match crate::backend::parse_fault_rule(rule.get_ref()) {
                Ok(_) => faults.push(rule.get_ref().clone()),
                Err(err) => problems.add(
                    source.at_of(rule),
                    format!("{field}.inject_errors[{j}]"),
                    err.to_string(),
                ),
            }
        }
        out.push(ExportDef {
            name: name.clone(),
            image,
            read_only: e.read_only,
            format,
            description: e.description.clone(),
            access,
            faults,
            at,
        });
    }
    out
}

/// The image spec of an export: `memory:SIZE` with a valid size, or a path resolved
/// against the file's directory.
fn export_image(
    e: &RawExport,
    field: &str,
    source: &Source<'_>,
    files: &dyn Files,
    problems: &mut Problems,
) -> String {
    let text = e.image.get_ref();
    let at = source.at_of(&e.image);
    if text.is_empty() {
        problems.add(at, format!("{field}.image"), "is empty");
        return String::new();
    }
    if let Some(size) = text.strip_prefix("memory:") {
        match crate::size::parse_size(size) {
            Ok(0) => problems.add(
                at,
                format!("{field}.image"),
                "a memory: disk needs a size above 0",
            ),
            Ok(_) => {}
            Err(e) => problems.add(at, format!("{field}.image"), e.to_string()),
        }
        return text.clone();
    }
    let path = source.path(text);
    let problem = match files.kind(&path) {
        FileKind::File | FileKind::BlockDevice => None,
        FileKind::Missing => Some(format!("file {} does not exist", path.display())),
        FileKind::Directory => Some(format!(
            "{} is a directory, not an image, raw file or block device",
            path.display()
        )),
        FileKind::Other => Some(format!(
            "{} is not a regular file or block device",
            path.display()
        )),
        FileKind::Unreadable(why) => Some(format!("cannot look at {}: {why}", path.display())),
    };
    if let Some(problem) = problem {
        problems.add(at, format!("{field}.image"), problem);
    }
    path.display().to_string()
}

/// Reports a path setting that does not name a regular file (when `files` can tell).
fn check_regular_file(
    setting: &Setting<Option<PathBuf>>,
    files: Option<&dyn Files>,
    problems: &mut Problems,
) {
    let (Some(path), Some(files)) = (&setting.value, files) else {
        return;
    };
    let problem = match files.kind(path) {
        FileKind::File => return,
        FileKind::Missing => format!("file {} does not exist", path.display()),
        FileKind::Unreadable(why) => format!("cannot look at {}: {why}", path.display()),
        FileKind::Directory | FileKind::BlockDevice | FileKind::Other => {
            format!("{} is not a regular file", path.display())
        }
    };
    problems.add(setting.at.clone(), setting.name.clone(), problem);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path is a regular file except those listed.
    struct Fake(Vec<(&'static str, FileKind)>);

    impl Files for Fake {
        fn kind(&self, path: &Path) -> FileKind {
            self.0
                .iter()
                .find(|(p, _)| Path::new(p) == path)
                .map_or(FileKind::File, |(_, k)| k.clone())
        }
    }

    const FILE: &str = "/etc/strata/strata.toml";

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        load(text, Path::new(FILE), &Overrides::default(), &Fake(vec![]))
    }

    fn parse_ok(text: &str) -> Config {
        parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The messages of a configuration that must fail.
    #[track_caller]
    fn errors_with(text: &str, flags: &Overrides, files: &Fake) -> Vec<String> {
        match load(text, Path::new(FILE), flags, files) {
            Ok(c) => panic!("should fail: {c:?}"),
            Err(e) => e.errors().iter().map(ToString::to_string).collect(),
        }
    }

    #[track_caller]
    fn errors(text: &str) -> Vec<String> {
        errors_with(text, &Overrides::default(), &Fake(vec![]))
    }

    /// The one problem of `text`, which must be exactly `expected`.
    #[track_caller]
    fn fails(text: &str, expected: &str) {
        assert_eq!(errors(text), vec![expected.to_owned()], "for:\n{text}");
    }

    const EXPORT: &str = "[[exports]]\nname = \"vm1\"\nimage = \"/tank/vm1.strata\"\n";

    #[test]
    fn an_empty_file_means_the_defaults() {
        let c = parse_ok("");
        assert_eq!(c.server.listen, vec!["127.0.0.1:10809".parse().unwrap()]);
        assert_eq!(c.server.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.server.tls.mode, TlsMode::Off);
        assert_eq!(c.server.control, ControlSettings::default());
        assert_eq!(c.server.log.level, "info");
        assert_eq!(c.server.log.format, LogFormat::Text);
        assert!(c.server.api_access.is_open());
        assert!(c.exports.is_empty());
        assert_eq!(c.file.as_deref(), Some(Path::new(FILE)));
    }

    #[test]
    fn reads_every_setting() {
        let c = parse_ok(
            r#"
listen = ["0.0.0.0:10809", "[::1]:10810", "unix:nbd.sock"]
handshake_timeout = 5
max_connections = 64
pid_file = "/run/strata/strata.pid"

[tls]
mode = "optional"
cert = "tls/cert.pem"
key = "/etc/strata/tls/key.pem"
client_ca = "tls/ca.pem"

[control]
socket = "/run/strata/control.sock"
listen = "127.0.0.1:10810"
token_file = "token"

[log]
level = "info,strata::server=debug"
format = "json"

[access]
allow = ["10.20.0.0/24", "unix"]

[[exports]]
name = "vm1"
image = "vm1.strata"
description = "web server"
require_tls = true

[[exports]]
name = "golden"
image = "/tank/golden.raw"
read_only = true
format = "raw"
allow = ["192.0.2.7"]
allow_identity = ["vmhost1"]

[[exports]]
name = "scratch"
image = "memory:1G"
"#,
        );
        let s = &c.server;
        assert_eq!(
            s.listen,
            vec![
                "0.0.0.0:10809".parse().unwrap(),
                "[::1]:10810".parse().unwrap(),
                ListenAddr::Unix("/etc/strata/nbd.sock".into()),
            ]
        );
        assert_eq!(s.handshake_timeout, Duration::from_secs(5));
        assert_eq!(s.max_connections, 64);
        assert_eq!(
            s.pid_file.as_deref(),
            Some(Path::new("/run/strata/strata.pid"))
        );
        assert_eq!(
            s.tls,
            TlsConfig {
                mode: TlsMode::Optional,
                cert: Some("/etc/strata/tls/cert.pem".into()),
                key: Some("/etc/strata/tls/key.pem".into()),
                client_ca: Some("/etc/strata/tls/ca.pem".into()),
            }
        );
        assert_eq!(
            s.control,
            ControlSettings {
                socket: Some("/run/strata/control.sock".into()),
                listen: Some("127.0.0.1:10810".parse().unwrap()),
                token_file: Some("/etc/strata/token".into()),
            }
        );
        assert_eq!(s.log.level, "info,strata::server=debug");
        assert_eq!(s.log.format, LogFormat::Json);
        let lan = Access::new(
            vec!["10.20.0.0/24".parse().unwrap(), NetworkRule::Unix],
            vec![],
        );
        assert_eq!(s.api_access, lan);

        let [vm1, golden, scratch] = &c.exports[..] else {
            panic!("three exports: {:?}", c.exports)
        };
        assert_eq!(vm1.name, "vm1");
        assert_eq!(vm1.image, "/etc/strata/vm1.strata");
        assert!(!vm1.read_only);
        assert_eq!(vm1.format, None);
        assert_eq!(vm1.description, "web server");
        assert_eq!(vm1.access, lan.clone().with_tls_required(true));
        assert_eq!(golden.image, "/tank/golden.raw");
        assert!(golden.read_only);
        assert_eq!(golden.format, Some(Format::Raw));
        assert_eq!(
            golden.access,
            Access::new(vec!["192.0.2.7".parse().unwrap()], vec!["vmhost1".into()]),
            "the export's own lists replace those of [access]"
        );
        assert_eq!(scratch.image, "memory:1G");
        assert_eq!(scratch.access, lan);
    }

    #[test]
    fn malformed_toml_names_line_and_column() {
        fails(
            "listen = [\"127.0.0.1:1\"\n",
            "/etc/strata/strata.toml:1:24: unclosed array, expected `]`",
        );
        fails(
            "max_connections = 4\nmax_connections = 5\n",
            "/etc/strata/strata.toml:2:1: duplicate key",
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        fails(
            "listen = []\nlisten_on = 1\n",
            "/etc/strata/strata.toml:2:1: listen_on: unknown field `listen_on`, expected one of \
             `listen`, `handshake_timeout`, `max_connections`, `pid_file`, `tls`, `control`, \
             `log`, `access`, `limits`, `metrics`, `exports`",
        );
        let text = format!("{EXPORT}readonly = true\n");
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(
                "/etc/strata/strata.toml:4:1: exports[0].readonly: unknown field `readonly`"
            ),
            "{e:?}"
        );
        let e = errors("[tls]\nmode = \"off\"\ncertificate = \"x\"\n");
        assert!(
            e[0].starts_with("/etc/strata/strata.toml:3:1: tls.certificate: unknown field"),
            "{e:?}"
        );
        // A misspelt table is an unknown key too, not a silently ignored section.
        let e = errors("[[export]]\nname = \"a\"\n");
        assert!(e[0].contains("export: unknown field `export`"), "{e:?}");
    }

    #[test]
    fn wrong_types_and_missing_fields_name_the_field() {
        let text = format!("{EXPORT}[[exports]]\nname = \"vm2\"\nimage = 5\n");
        fails(
            &text,
            "/etc/strata/strata.toml:6:9: exports[1].image: invalid type: integer `5`, expected a string",
        );
        let text = format!("{EXPORT}read_only = \"yes\"\n");
        fails(
            &text,
            "/etc/strata/strata.toml:4:13: exports[0].read_only: invalid type: string \"yes\", expected a boolean",
        );
        fails(
            "listen = \"127.0.0.1:10809\"\n",
            "/etc/strata/strata.toml:1:10: listen: invalid type: string \"127.0.0.1:10809\", expected a sequence",
        );
        let e = errors("[[exports]]\nname = \"vm1\"\n");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("/etc/strata/strata.toml:1:1: exports[0]: missing field `image`"),
            "{e:?}"
        );
        fails(
            "[tls]\nmode = \"maybe\"\n",
            "/etc/strata/strata.toml:2:8: tls.mode: unknown variant `maybe`, expected one of `off`, `optional`, `require`",
        );
        fails(
            "[log]\nformat = \"xml\"\n",
            "/etc/strata/strata.toml:2:10: log.format: unknown variant `xml`, expected `text` or `json`",
        );
        let text = format!("{EXPORT}format = \"qcow2\"\n");
        let e = errors(&text);
        assert!(
            e[0].starts_with(
                "/etc/strata/strata.toml:4:10: exports[0].format: unknown variant `qcow2`"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        fails(
            "handshake_timeout = 0\n",
            "/etc/strata/strata.toml:1:21: handshake_timeout: must be at least 1 second",
        );
        fails(
            "handshake_timeout = -3\n",
            "/etc/strata/strata.toml:1:21: handshake_timeout: must be at least 1 second",
        );
        fails(
            "max_connections = 0\n",
            "/etc/strata/strata.toml:1:19: max_connections: must be between 1 and 1048576",
        );
        fails(
            "listen = []\n",
            "/etc/strata/strata.toml:1:10: listen: is empty: give at least one address \
             (HOST:PORT, [V6]:PORT or unix:PATH)",
        );
        let e = errors("listen = [\"127.0.0.1:1\", \"nowhere\"]\n");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(
                "/etc/strata/strata.toml:1:26: listen[1]: invalid listen address \"nowhere\""
            ),
            "{e:?}"
        );
        fails(
            "listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
            "/etc/strata/strata.toml:1:26: listen[1]: 127.0.0.1:1 is listed already, as listen[0]",
        );
        fails(
            "[log]\nlevel = \"verbose\"\n",
            "/etc/strata/strata.toml:2:9: log.level: \"verbose\" is not a level: use off, error, \
             warn, info, debug or trace, or directives such as \"info,strata::server=debug\"",
        );
        assert!(check_log_filter("warn,strata=trace, hyper=off").is_ok());
        assert!(check_log_filter("=debug").is_err());
        assert!(check_log_filter("strata=loud").is_err());
    }

    #[test]
    fn bad_exports_name_the_export() {
        let text = format!("{EXPORT}allow = [\"10.0.0.0/8\", \"10.1.2.3/8\"]\n");
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(
                "/etc/strata/strata.toml:4:24: exports[0].allow[1]: invalid network \"10.1.2.3/8\""
            ),
            "{e:?}"
        );
        assert!(e[0].contains("10.0.0.0/8"), "{e:?}");
        fails(
            "[[exports]]\nname = \"m\"\nimage = \"memory:lots\"\n",
            "/etc/strata/strata.toml:3:9: exports[0].image: invalid size \"lots\": expected a number \
             with an optional K/M/G/T suffix",
        );
        fails(
            "[[exports]]\nname = \"m\"\nimage = \"memory:0\"\n",
            "/etc/strata/strata.toml:3:9: exports[0].image: a memory: disk needs a size above 0",
        );
        fails(
            "[[exports]]\nname = \"m\"\nimage = \"memory:1G\"\nformat = \"raw\"\n",
            "/etc/strata/strata.toml:4:10: exports[0].format: applies to files; a memory: disk has no format",
        );
        fails(
            "[[exports]]\nname = \"\"\nimage = \"memory:1G\"\n",
            "/etc/strata/strata.toml:2:8: exports[0].name: is empty",
        );
        fails(
            "[[exports]]\nname = \"a/b\"\nimage = \"memory:1G\"\n",
            "/etc/strata/strata.toml:2:8: exports[0].name: invalid export name \"a/b\": use 1 \
             to 64 ASCII letters, digits, '.', '_', '-' and '@', not starting with '.' or '-'",
        );
        let text = format!("{EXPORT}\n[[exports]]\nname = \"vm1\"\nimage = \"memory:1M\"\n");
        fails(
            &text,
            "/etc/strata/strata.toml:6:8: exports[1].name: \"vm1\" is the name of exports[0] already",
        );
        let text = format!("{EXPORT}allow_identity = [\"\"]\n");
        assert_eq!(
            errors(&text)[0],
            "/etc/strata/strata.toml:4:19: exports[0].allow_identity[0]: is empty"
        );
    }

    #[test]
    fn missing_files_are_reported_where_they_are_named() {
        let text = r#"
[tls]
cert = "cert.pem"
key = "key.pem"
client_ca = "/etc/ssl"

[control]
listen = "127.0.0.1:10810"
token_file = "/etc/strata/nothing"

[[exports]]
name = "vm1"
image = "/tank/vm1.strata"

[[exports]]
name = "vm2"
image = "/x"

[[exports]]
name = "vm3"
image = "/tank"
"#;
        let files = Fake(vec![
            ("/etc/strata/key.pem", FileKind::Missing),
            ("/etc/ssl", FileKind::Directory),
            ("/etc/strata/nothing", FileKind::Missing),
            ("/x", FileKind::Missing),
            ("/tank", FileKind::Directory),
        ]);
        assert_eq!(
            errors_with(text, &Overrides::default(), &files),
            vec![
                "/etc/strata/strata.toml:4:7: tls.key: file /etc/strata/key.pem does not exist",
                "/etc/strata/strata.toml:5:13: tls.client_ca: /etc/ssl is not a regular file",
                "/etc/strata/strata.toml:9:14: control.token_file: file /etc/strata/nothing does not exist",
                "/etc/strata/strata.toml:17:9: exports[1].image: file /x does not exist",
                "/etc/strata/strata.toml:21:9: exports[2].image: /tank is a directory, not an \
                 image, raw file or block device",
            ]
        );
    }

    #[test]
    fn contradictions_are_refused() {
        fails(
            "[tls]\nmode = \"require\"\n",
            "/etc/strata/strata.toml:2:8: tls.mode: tls.mode = \"require\" needs tls.cert and tls.key",
        );
        fails(
            "[tls]\nmode = \"off\"\ncert = \"c\"\nkey = \"k\"\n",
            "/etc/strata/strata.toml:2:8: tls.mode: tls.mode = \"off\" contradicts tls.cert: drop one of them",
        );
        fails(
            "[tls]\ncert = \"c\"\n",
            "/etc/strata/strata.toml:2:8: tls.cert: needs tls.key too",
        );
        fails(
            "[tls]\nclient_ca = \"ca\"\n",
            "/etc/strata/strata.toml:2:13: tls.client_ca: needs a server certificate (tls.cert and tls.key)",
        );
        fails(
            "[control]\nlisten = \"127.0.0.1:10810\"\n",
            "/etc/strata/strata.toml:2:10: control.listen: the control API on TCP needs a bearer \
             token: set control.token_file",
        );
        fails(
            "[control]\nlisten = \"unix:/run/c.sock\"\ntoken_file = \"t\"\n",
            "/etc/strata/strata.toml:2:10: control.listen: takes HOST:PORT; use control.socket for a Unix socket",
        );
        fails(
            "[control]\ntoken_file = \"t\"\n",
            "/etc/strata/strata.toml:2:14: control.token_file: is only used by a TCP control \
             listener, and control.listen is not set",
        );
        let text = format!("{EXPORT}require_tls = true\n");
        fails(
            &text,
            "/etc/strata/strata.toml:4:15: exports[0].require_tls: needs TLS on the server: set tls.cert and tls.key",
        );
        let text =
            format!("[tls]\ncert = \"c\"\nkey = \"k\"\n{EXPORT}allow_identity = [\"vmhost1\"]\n");
        fails(
            &text,
            "/etc/strata/strata.toml:7:18: exports[0].allow_identity: needs tls.client_ca: \
             identities come from verified client certificates",
        );
        fails(
            "[access]\nrequire_tls = true\n",
            "/etc/strata/strata.toml:2:15: access.require_tls: needs TLS on the server: set tls.cert and tls.key",
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "handshake_timeout = 0\nmax_connections = 0\n[[exports]]\nname = \"a\"\nimage = \"memory:x\"\n";
        let e = errors(text);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains("handshake_timeout"));
        assert!(e[1].contains("max_connections"));
        assert!(e[2].contains("exports[0].image"));
    }

    #[test]
    fn flags_win_over_the_file() {
        let text = "listen = [\"0.0.0.0:10809\"]\nhandshake_timeout = 5\n\
                    [log]\nformat = \"json\"\nlevel = \"warn\"\n\
                    [tls]\nmode = \"require\"\ncert = \"c\"\nkey = \"k\"\n";
        let flags = Overrides {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            handshake_timeout: Some(30),
            tls_mode: Some(TlsMode::Optional),
            log_level: Some("debug".into()),
            log_format: Some(LogFormat::Text),
            tls_key: Some("/other/key.pem".into()),
            ..Overrides::default()
        };
        let c = load(text, Path::new(FILE), &flags, &Fake(vec![])).unwrap();
        assert_eq!(c.server.listen, flags.listen);
        assert_eq!(c.server.handshake_timeout, Duration::from_secs(30));
        assert_eq!(c.server.tls.mode, TlsMode::Optional);
        assert_eq!(
            c.server.tls.cert.as_deref(),
            Some(Path::new("/etc/strata/c"))
        );
        assert_eq!(
            c.server.tls.key.as_deref(),
            Some(Path::new("/other/key.pem"))
        );
        assert_eq!(c.server.log.level, "debug");
        assert_eq!(c.server.log.format, LogFormat::Text);

        // A flag that contradicts the file is refused, naming both.
        let flags = Overrides {
            tls_mode: Some(TlsMode::Off),
            ..Overrides::default()
        };
        let e = errors_with(text, &flags, &Fake(vec![]));
        assert_eq!(
            e,
            vec!["--tls: --tls off contradicts tls.cert: drop one of them"]
        );
        let flags = Overrides {
            handshake_timeout: Some(0),
            ..Overrides::default()
        };
        let e = errors_with("", &flags, &Fake(vec![]));
        assert_eq!(e, vec!["--handshake-timeout: must be at least 1 second"]);
        // A token from the file completes a TCP listener from the flags.
        let flags = Overrides {
            control_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Overrides::default()
        };
        let c = load(
            "[control]\ntoken_file = \"t\"\n",
            Path::new(FILE),
            &flags,
            &Fake(vec![]),
        );
        assert_eq!(
            c.unwrap().server.control.token_file.as_deref(),
            Some(Path::new("/etc/strata/t"))
        );
    }

    #[test]
    fn flags_alone_make_a_configuration() {
        let flags = Overrides {
            tls_mode: Some(TlsMode::Require),
            ..Overrides::default()
        };
        let e = from_flags(&flags, vec![]).unwrap_err().to_string();
        assert_eq!(e, "--tls: --tls require needs --tls-cert and --tls-key");
        let flags = Overrides {
            tls_cert: Some("c".into()),
            ..Overrides::default()
        };
        let e = from_flags(&flags, vec![]).unwrap_err().to_string();
        assert_eq!(e, "--tls-cert: needs --tls-key too");
        let flags = Overrides {
            control_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Overrides::default()
        };
        let e = from_flags(&flags, vec![]).unwrap_err().to_string();
        assert_eq!(
            e,
            "--control-listen: the control API on TCP needs a bearer token: set --control-token-file"
        );
        let disk = |name: &str| ExportDef::new(name, "memory:1M", false, None, "", Access::open());
        let e = from_flags(&Overrides::default(), vec![disk("a"), disk("a")]).unwrap_err();
        assert!(e.to_string().contains("two exports are named \"a\""), "{e}");
        let c = from_flags(&Overrides::default(), vec![disk("a"), disk("b")]).unwrap();
        assert_eq!(c.exports.len(), 2);
        assert_eq!(c.file, None);
    }

    #[test]
    fn exports_can_be_checked_against_the_running_settings() {
        let text = format!("[tls]\ncert = \"c\"\nkey = \"k\"\n{EXPORT}require_tls = true\n");
        let c = parse_ok(&text);
        assert!(c.check_exports_against(&c.server.tls).is_ok());
        let off = TlsConfig {
            mode: TlsMode::Off,
            cert: None,
            key: None,
            client_ca: None,
        };
        let e = c.check_exports_against(&off).unwrap_err().to_string();
        assert_eq!(
            e,
            "/etc/strata/strata.toml:7:15: exports[0].require_tls: needs TLS on the server: set tls.cert and tls.key"
        );
    }

    #[test]
    fn differences_name_the_server_settings_that_changed() {
        let a = parse_ok(EXPORT);
        let b = parse_ok(&format!(
            "max_connections = 5\n[log]\nformat = \"json\"\n{EXPORT}"
        ));
        assert_eq!(a.server.differences(&a.server), Vec::<&str>::new());
        assert_eq!(
            a.server.differences(&b.server),
            vec!["max_connections", "log"]
        );
    }

    #[test]
    fn export_equality_ignores_where_fields_are_written() {
        let a = parse_ok(EXPORT);
        let b = parse_ok(&format!("\n\n{EXPORT}"));
        assert_eq!(a.exports, b.exports);
        let c = parse_ok(&format!("{EXPORT}description = \"x\"\n"));
        assert_ne!(a.exports, c.exports);
        assert!(!a.exports[0].storage_differs(&c.exports[0]));
        let d = parse_ok(&format!("{EXPORT}read_only = true\n"));
        assert!(a.exports[0].storage_differs(&d.exports[0]));
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let c = load(
            EXPORT.replace("/tank/", "").as_str(),
            Path::new("strata.toml"),
            &Overrides::default(),
            &Fake(vec![]),
        )
        .unwrap();
        assert_eq!(c.exports[0].image, "vm1.strata");
        let c = load(
            EXPORT.replace("/tank/", "").as_str(),
            Path::new("conf/strata.toml"),
            &Overrides::default(),
            &Fake(vec![]),
        )
        .unwrap();
        assert_eq!(c.exports[0].image, "conf/vm1.strata");
    }

    #[test]
    fn field_paths_drop_the_span_wrappers() {
        assert_eq!(
            field_path(
                "exports[1].$__serde_spanned_private_value.image.$__serde_spanned_private_value"
            ),
            "exports[1].image"
        );
        assert_eq!(field_path("."), "");
        assert_eq!(field_path("listen"), "listen");
    }
}
