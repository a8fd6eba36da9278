//! The validated configuration: plain values the daemon builds the server from and a
//! reload compares, without spans or raw TOML. Defaults the server applies itself are
//! taken from the server's own constants, never restated here.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::error::{ConfigErrors, Location, Problems};
use super::validate::check_exports_tls;
use crate::access::Access;
use crate::image::Format;
use crate::proto::consts::DEFAULT_PORT;
use crate::server::{ListenAddr, ServerConfig};

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
    pub(super) fn word(self) -> &'static str {
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
    pub(super) at: ExportAt,
}

#[derive(Debug, Clone, Default)]
pub(super) struct ExportAt {
    /// `exports[N]`.
    pub(super) field: String,
    pub(super) require_tls: Option<Location>,
    pub(super) allow_identity: Option<Location>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

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
}
