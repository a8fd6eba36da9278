//! `strata serve`: the flags and the configuration file into a [`Config`], then the
//! server until a clean exit, with the exit statuses docs/deploy.md lists.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use strata::access::{Access, NetworkRule};
use strata::config::{self, Config, ExportDef, Limits, LogFormat, Overrides, SystemFiles, TlsMode};
use strata::daemon::{self, Options, activation};
use strata::image::FormatChoice;
use strata::names;
use strata::server::{self, ListenAddr};
use strata::size::format_size;
use tracing::error;

/// `serve --tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TlsArg {
    /// No TLS: STARTTLS is refused.
    Off,
    /// Clients may upgrade to TLS with STARTTLS, or stay in plaintext.
    Optional,
    /// Clients must upgrade before they learn anything, even the export list.
    Require,
}

/// `serve --log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Read the configuration from this TOML file (see docs/deploy.md); flags given too
    /// override its settings. SIGHUP re-reads its exports.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Validate the configuration (the file and the flags) and exit: 0 when it is valid.
    #[arg(long, requires = "config")]
    check_config: bool,

    /// Write the server's pid to this file once it listens (locked while it runs,
    /// removed at exit); refuse to start if a running server holds it.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,

    /// Log format.
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormatArg>,

    #[arg(short, long = "listen", value_name = "ADDR", help = with_default(
        "Address to listen on: HOST:PORT, [V6]:PORT or unix:PATH. Repeat for several",
        config::DEFAULT_LISTEN,
    ))]
    listen: Vec<ListenAddr>,

    /// Export name for a single image (default: the image's file stem, or `memory`).
    #[arg(short, long)]
    name: Option<String>,

    /// Export an image under a name: NAME=IMAGE. Repeat for several.
    #[arg(short, long = "export", value_name = "NAME=IMAGE")]
    export: Vec<String>,

    #[arg(short, long, value_enum, help = with_default(
        "Image format",
        FormatChoice::default().to_possible_value().expect("a plain value").get_name(),
    ))]
    format: Option<FormatChoice>,

    /// Human-readable description sent to clients that ask.
    #[arg(long)]
    description: Option<String>,

    /// Refuse writes.
    #[arg(short, long)]
    read_only: bool,

    #[arg(long, value_name = "SECS", help = with_default(
        "Seconds a client may take to finish the handshake",
        server::DEFAULT_HANDSHAKE_TIMEOUT.as_secs(),
    ))]
    handshake_timeout: Option<u64>,

    #[arg(long, value_name = "N", help = with_default(
        "Connections served at once",
        server::DEFAULT_MAX_CONNECTIONS,
    ))]
    max_connections: Option<usize>,

    #[arg(long, value_name = "N", help = with_default(
        "Connections served at once from one client IP address (0: no limit)",
        Limits::default().max_connections_per_client,
    ))]
    max_connections_per_client: Option<usize>,

    #[arg(long, value_name = "SECS", help = with_default(
        "Seconds a client may send no request (with none running) before it is \
         disconnected; also a client that reads none of its replies (0: never)",
        Limits::default().idle_timeout.map_or(0, |t| t.as_secs()),
    ))]
    idle_timeout: Option<u64>,

    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg, help = with_default(
        "Request and reply bytes one connection may have in flight",
        format_size(Limits::default().max_in_flight),
    ))]
    max_in_flight: Option<u64>,

    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg, help = with_default(
        "Request and reply bytes all connections together may have in flight (0: no \
         server-wide limit)",
        format_size(Limits::default().max_in_flight_total.unwrap_or(0)),
    ))]
    max_in_flight_total: Option<u64>,

    /// Serve Prometheus metrics (GET /metrics) on HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<ListenAddr>,

    /// Fail the requests a rule selects, to test how clients cope:
    /// OPS:ERROR[:CONDITION,...], e.g. write:EIO:offset=1M,length=64K (see
    /// docs/deploy.md). Repeat for several; they apply to every export.
    #[arg(long = "inject-error", value_name = "RULE", value_parser = parse_fault_arg)]
    inject_error: Vec<String>,

    /// Serve the control API on this Unix socket (mode 0600: only this user may use it).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Also serve the control API over TCP on HOST:PORT; needs --control-token-file.
    #[arg(long, value_name = "HOST:PORT")]
    control_listen: Option<ListenAddr>,

    /// File holding the bearer token that clients of --control-listen must send.
    #[arg(long, value_name = "FILE")]
    control_token_file: Option<PathBuf>,

    /// TLS policy [default: optional with --tls-cert, off without].
    #[arg(long, value_enum, value_name = "MODE")]
    tls: Option<TlsArg>,

    /// The server's TLS certificate chain (PEM), leaf first.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,

    /// CA certificates (PEM): TLS clients must present a certificate signed by one of
    /// them (mutual TLS).
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,

    /// Let only clients from this network (CIDR, e.g. 10.0.0.0/8, or an address) use the
    /// exports; `unix` admits Unix-socket clients. Repeat for several.
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<NetworkRule>,

    /// Let only TLS clients whose certificate names NAME (subject CN, DNS or URI name)
    /// use the exports; needs --tls-client-ca. Repeat for several.
    #[arg(long = "allow-identity", value_name = "NAME")]
    allow_identity: Vec<String>,

    /// Images to serve: Strata images, raw files or block devices, or memory:SIZE (e.g.
    /// memory:1G). Each is exported under its file stem; the first is the default export.
    #[arg(value_name = "IMAGE", required_unless_present_any = ["export", "config"])]
    images: Vec<String>,
}

/// A flag's help followed by its default, `... [default: 1024]`, so that the text shows
/// the value the server applies rather than a copy of it.
fn with_default(help: &str, default: impl std::fmt::Display) -> String {
    format!("{help} [default: {default}]")
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    strata::size::parse_size(text).map_err(|e| e.to_string())
}

/// Checks a fault rule at parse time; each export parses it again for counters of its
/// own.
fn parse_fault_arg(text: &str) -> Result<String, String> {
    strata::backend::parse_fault_rule(text)
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
}

/// Exit statuses of `strata serve` (docs/deploy.md lists them).
mod exit {
    /// Clean shutdown after SIGTERM or SIGINT; a valid configuration for --check-config.
    pub const OK: u8 = 0;
    /// Start-up or run-time failure: a listener cannot be bound, an image cannot be
    /// opened, the pid file is held, the final flush failed.
    pub const FAILURE: u8 = 1;
    /// A bad command line (clap uses 2 as well).
    pub const USAGE: u8 = 2;
    /// The configuration file cannot be read or is invalid, alone or with the flags
    /// (`EX_CONFIG` of sysexits.h).
    pub const CONFIG: u8 = 78;
}

fn default_export_name(image: &str) -> String {
    if image.starts_with("memory:") {
        return "memory".to_owned();
    }
    Path::new(image)
        .file_stem()
        .map_or_else(|| "disk".to_owned(), |s| s.to_string_lossy().into_owned())
}

/// The exports `serve` was asked for on the command line, as (name, image) pairs, in
/// order. Every name must be a valid export name ([`names::EXPORT`]), as in the
/// configuration file and the control API.
fn export_list(args: &ServeArgs) -> Result<Vec<(String, String)>, String> {
    if args.name.is_some() && args.images.len() + args.export.len() != 1 {
        return Err(
            "--name applies to a single image; use --export NAME=IMAGE for several".to_owned(),
        );
    }
    let mut list: Vec<(String, String)> = Vec::new();
    for image in &args.images {
        let name = match &args.name {
            Some(name) => {
                names::EXPORT
                    .check(name)
                    .map_err(|e| format!("--name: {e}"))?;
                name.clone()
            }
            None => {
                let name = default_export_name(image);
                names::EXPORT.check(&name).map_err(|e| {
                    format!(
                        "{image}: the file's name cannot be the export's name ({e}); \
                         name it with --name NAME or --export NAME=IMAGE"
                    )
                })?;
                name
            }
        };
        list.push((name, image.clone()));
    }
    for spec in &args.export {
        let Some((name, image)) = spec.split_once('=') else {
            return Err(format!("--export {spec:?}: expected NAME=IMAGE"));
        };
        names::EXPORT
            .check(name)
            .map_err(|e| format!("--export {spec:?}: {e}"))?;
        list.push((name.to_owned(), image.to_owned()));
    }
    Ok(list)
}

/// The server-wide flags, which win over the configuration file.
fn overrides(args: &ServeArgs, verbose: u8) -> Overrides {
    Overrides {
        listen: args.listen.clone(),
        handshake_timeout: args.handshake_timeout,
        max_connections: args.max_connections,
        tls_mode: args.tls.map(|t| match t {
            TlsArg::Off => TlsMode::Off,
            TlsArg::Optional => TlsMode::Optional,
            TlsArg::Require => TlsMode::Require,
        }),
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        tls_client_ca: args.tls_client_ca.clone(),
        control_socket: args.control.clone(),
        control_listen: args.control_listen.clone(),
        control_token_file: args.control_token_file.clone(),
        log_level: super::verbosity(verbose).map(str::to_owned),
        log_format: args.log_format.map(|f| match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }),
        pid_file: args.pid_file.clone(),
        max_connections_per_client: args.max_connections_per_client,
        idle_timeout: args.idle_timeout,
        max_in_flight: args.max_in_flight,
        max_in_flight_total: args.max_in_flight_total,
        metrics: args.metrics.clone(),
    }
}

/// Flags that describe exports, which a configuration file describes itself.
fn export_flags_given(args: &ServeArgs) -> Vec<&'static str> {
    let given = [
        (!args.images.is_empty(), "IMAGE"),
        (!args.export.is_empty(), "--export"),
        (args.name.is_some(), "--name"),
        (args.read_only, "--read-only"),
        (args.format.is_some(), "--format"),
        (args.description.is_some(), "--description"),
        (!args.allow.is_empty(), "--allow"),
        (!args.allow_identity.is_empty(), "--allow-identity"),
        (!args.inject_error.is_empty(), "--inject-error"),
    ];
    given
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect()
}

/// The configuration `serve` runs with, or the exit status and message to fail with.
fn serve_config(args: &ServeArgs, verbose: u8) -> Result<Config, (u8, String)> {
    let flags = overrides(args, verbose);
    let Some(file) = &args.config else {
        let format = args.format.and_then(FormatChoice::forced);
        let access = Access::new(args.allow.clone(), args.allow_identity.clone());
        if !args.allow_identity.is_empty() && args.tls_client_ca.is_none() {
            return Err((
                exit::USAGE,
                "--allow-identity needs --tls-client-ca: identities come from verified \
                 client certificates"
                    .to_owned(),
            ));
        }
        let exports = export_list(args)
            .map_err(|e| (exit::USAGE, e))?
            .into_iter()
            .map(|(name, image)| {
                ExportDef::new(
                    name,
                    image,
                    args.read_only,
                    format,
                    args.description.clone().unwrap_or_default(),
                    access.clone(),
                )
                .with_faults(args.inject_error.clone())
            })
            .collect();
        return config::from_flags(&flags, exports).map_err(|e| (exit::USAGE, e.to_string()));
    };
    let given = export_flags_given(args);
    if !given.is_empty() {
        return Err((
            exit::USAGE,
            format!(
                "{} cannot be combined with --config: the file's [[exports]] describe the \
                 exports (name, image, read_only, format, description, allow, \
                 allow_identity, inject_errors)",
                given.join(", ")
            ),
        ));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| (exit::CONFIG, format!("cannot read {}: {e}", file.display())))?;
    config::load(&text, file, &flags, &SystemFiles).map_err(|e| (exit::CONFIG, e.to_string()))
}

/// `strata serve`: from the configuration to a clean exit.
pub fn run(args: &ServeArgs, verbose: u8) -> ExitCode {
    let config = match serve_config(args, verbose) {
        Ok(config) => config,
        Err((code, message)) => {
            for line in message.lines() {
                eprintln!("strata: {line}");
            }
            return ExitCode::from(code);
        }
    };
    if args.check_config {
        let file = config.file.as_deref().unwrap_or(Path::new("-")).display();
        let n = config.exports.len();
        println!(
            "{file}: valid ({n} export{})",
            if n == 1 { "" } else { "s" }
        );
        return ExitCode::from(exit::OK);
    }
    let format = config.server.log.format;
    super::init_logging(&config.server.log.level, format);
    // SAFETY: no other thread exists yet: the runtime is built below.
    let result = unsafe { activation::take() }.and_then(|inherited| {
        let flags = overrides(args, verbose);
        super::runtime()?.block_on(daemon::run(config, Options { flags, inherited }))
    });
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            // JSON logs stay JSON, line for line; text goes out as before logging began.
            match format {
                LogFormat::Json => error!("{e}"),
                LogFormat::Text => eprintln!("strata: {e}"),
            }
            ExitCode::from(exit::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    /// The help of flag `--long`.
    fn help_of(long: &str) -> String {
        let command = Serve::command();
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .unwrap_or_else(|| panic!("no --{long}"));
        arg.get_help().expect("help").to_string()
    }

    #[test]
    fn the_help_shows_the_defaults_in_force() {
        let cases = [
            ("listen", config::DEFAULT_LISTEN.to_string()),
            (
                "handshake-timeout",
                server::DEFAULT_HANDSHAKE_TIMEOUT.as_secs().to_string(),
            ),
            (
                "max-connections",
                server::DEFAULT_MAX_CONNECTIONS.to_string(),
            ),
            ("format", "auto".to_owned()),
            ("max-connections-per-client", "0".to_owned()),
            ("idle-timeout", "0".to_owned()),
            (
                "max-in-flight",
                format_size(server::session::DEFAULT_MAX_IN_FLIGHT),
            ),
            (
                "max-in-flight-total",
                format_size(server::DEFAULT_MAX_IN_FLIGHT_TOTAL),
            ),
        ];
        for (long, default) in cases {
            let help = help_of(long);
            assert!(
                help.ends_with(&format!(" [default: {default}]")),
                "--{long}: {help}"
            );
        }
        assert!(help_of("listen").ends_with("[default: 127.0.0.1:10809]"));
        assert!(help_of("max-in-flight").ends_with("[default: 64 MiB]"));
    }
}
