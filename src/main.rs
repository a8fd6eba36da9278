//! The `strata` command line: a thin front end that builds the export stack and hands it to
//! the server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use strata::access::{Access, NetworkRule};
use strata::proto::{HandshakeConfig, TlsPolicy};
use strata::server::control::{ControlConfig, ControlServer, ControlState, Token};
use strata::server::export::open_export;
use strata::server::{Exports, ListenAddr, Listener, Server, ServerConfig, TlsFiles, TlsSettings};
use tracing::{error, info};

mod cli_ctl;
mod cli_image;
mod cli_snapshot;
mod cli_vm;

/// Strata: a fast NBD server for VM storage.
#[derive(Parser, Debug)]
#[command(name = "strata", version, about, propagate_version = true)]
struct Cli {
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve images over NBD.
    Serve(ServeArgs),
    /// Create a Strata image, empty or as an overlay of a backing file.
    Create(cli_image::CreateArgs),
    /// Describe an image and its backing chain.
    Info(cli_image::InfoArgs),
    /// Verify an image's checksums and map; optionally repair it.
    Check(cli_image::CheckArgs),
    /// Show which layer holds each range of an image.
    Map(cli_image::MapArgs),
    /// Merge an overlay into its backing file.
    Commit(cli_image::CommitArgs),
    /// Point an overlay at a different backing file.
    Rebase(cli_image::RebaseArgs),
    /// Copy an image to a new Strata image or raw file, skipping unallocated data.
    Convert(cli_image::ConvertArgs),
    /// Take, list, delete and roll back snapshots of an image that is not being served.
    Snapshot(cli_snapshot::SnapshotArgs),
    /// Print the ranges of an image written since one of its snapshots.
    Diff(cli_snapshot::DiffArgs),
    /// Manage a running server through its control API.
    Ctl(cli_ctl::CtlArgs),
    /// Boot, suspend and resume VMs whose disk is an NBD export.
    Vm(cli_vm::VmArgs),
}

/// How `serve` reads image files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    /// Strata image if the file starts with the Strata signature, raw otherwise
    /// (other tools' image formats are refused).
    Auto,
    /// The file's bytes as they are.
    Raw,
    /// A Strata image.
    Strata,
}

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

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on: HOST:PORT, [V6]:PORT or unix:PATH. Repeat for several.
    #[arg(short, long = "listen", value_name = "ADDR")]
    listen: Vec<ListenAddr>,

    /// Export name for a single image (default: the image's file stem, or `memory`).
    #[arg(short, long)]
    name: Option<String>,

    /// Export an image under a name: NAME=IMAGE. Repeat for several.
    #[arg(short, long = "export", value_name = "NAME=IMAGE")]
    export: Vec<String>,

    /// Image format.
    #[arg(short, long, value_enum, default_value = "auto")]
    format: FormatArg,

    /// Human-readable description sent to clients that ask.
    #[arg(long, default_value = "")]
    description: String,

    /// Refuse writes.
    #[arg(short, long)]
    read_only: bool,

    /// Seconds a client may take to finish the handshake.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    handshake_timeout: u64,

    /// Connections served at once.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_connections: usize,

    /// Serve the control API on this Unix socket (mode 0600: only this user may use it).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Also serve the control API over TCP on HOST:PORT; needs --control-token-file.
    #[arg(long, value_name = "HOST:PORT", requires = "control_token_file")]
    control_listen: Option<ListenAddr>,

    /// File holding the bearer token that clients of --control-listen must send.
    #[arg(long, value_name = "FILE", requires = "control_listen")]
    control_token_file: Option<PathBuf>,
    /// TLS policy [default: optional with --tls-cert, off without].
    #[arg(long, value_enum, value_name = "MODE")]
    tls: Option<TlsArg>,

    /// The server's TLS certificate chain (PEM), leaf first.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// CA certificates (PEM): TLS clients must present a certificate signed by one of
    /// them (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// Let only clients from this network (CIDR, e.g. 10.0.0.0/8, or an address) use the
    /// exports; `unix` admits Unix-socket clients. Repeat for several.
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<NetworkRule>,

    /// Let only TLS clients whose certificate names NAME (subject CN, DNS or URI name)
    /// use the exports; needs --tls-client-ca. Repeat for several.
    #[arg(
        long = "allow-identity",
        value_name = "NAME",
        requires = "tls_client_ca"
    )]
    allow_identity: Vec<String>,

    /// Images to serve: Strata images, raw files or block devices, or memory:SIZE (e.g.
    /// memory:1G). Each is exported under its file stem; the first is the default export.
    #[arg(value_name = "IMAGE", required_unless_present = "export")]
    images: Vec<String>,
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn default_export_name(image: &str) -> String {
    if image.starts_with("memory:") {
        return "memory".to_owned();
    }
    Path::new(image)
        .file_stem()
        .map_or_else(|| "disk".to_owned(), |s| s.to_string_lossy().into_owned())
}

/// SIGTERM and SIGINT, caught from the moment this exists: installed before any
/// listener is bound, so a signal sent as soon as the server says where it listens
/// shuts it down gracefully instead of killing it.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> strata::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind| {
            signal(kind)
                .map_err(|e| strata::Error::from(e).with_message("cannot install signal handlers"))
        };
        Ok(ShutdownSignals {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
        })
    }

    async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM received"),
            _ = self.int.recv() => info!("SIGINT received"),
        }
    }
}

/// The exports `serve` was asked for, as (name, image) pairs, in order.
fn export_list(args: &ServeArgs) -> strata::Result<Vec<(String, String)>> {
    use strata::{Error, ErrorKind};
    if args.name.is_some() && args.images.len() + args.export.len() != 1 {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            "--name applies to a single image; use --export NAME=IMAGE for several",
        ));
    }
    let mut list: Vec<(String, String)> = Vec::new();
    for image in &args.images {
        let name = args
            .name
            .clone()
            .unwrap_or_else(|| default_export_name(image));
        list.push((name, image.clone()));
    }
    for spec in &args.export {
        let Some((name, image)) = spec.split_once('=') else {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                format!("--export {spec:?}: expected NAME=IMAGE"),
            ));
        };
        list.push((name.to_owned(), image.to_owned()));
    }
    for (i, (name, _)) in list.iter().enumerate() {
        if list[..i].iter().any(|(n, _)| n == name) {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                format!("two exports are named {name:?}; name them with --export NAME=IMAGE"),
            ));
        }
    }
    Ok(list)
}

/// The TLS policy and, unless it is off, the loaded certificates.
fn tls_config(args: &ServeArgs) -> strata::Result<(TlsPolicy, Option<TlsSettings>)> {
    use strata::{Error, ErrorKind};
    let mode = args.tls.unwrap_or(if args.tls_cert.is_some() {
        TlsArg::Optional
    } else {
        TlsArg::Off
    });
    let policy = match mode {
        TlsArg::Off => TlsPolicy::Disabled,
        TlsArg::Optional => TlsPolicy::Allowed,
        TlsArg::Require => TlsPolicy::Required,
    };
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        if policy != TlsPolicy::Disabled {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                "--tls optional and --tls require need --tls-cert and --tls-key",
            ));
        }
        return Ok((policy, None));
    };
    if policy == TlsPolicy::Disabled {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            "--tls off contradicts --tls-cert: drop one of them",
        ));
    }
    let settings = TlsSettings::load(&TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: args.tls_client_ca.clone(),
    })?;
    Ok((policy, Some(settings)))
}

async fn serve(args: ServeArgs) -> strata::Result<()> {
    let signals = ShutdownSignals::install()?;
    let (tls_policy, tls) = tls_config(&args)?;
    let access = Access::new(args.allow.clone(), args.allow_identity.clone());
    let format = match args.format {
        FormatArg::Auto => None,
        FormatArg::Raw => Some(strata::image::Format::Raw),
        FormatArg::Strata => Some(strata::image::Format::Strata),
    };
    let exports = Arc::new(Exports::new());
    for (name, image) in export_list(&args)? {
        let export = open_export(&name, &image, args.read_only, format, &args.description)?
            .with_access(access.clone());
        info!(
            export = name,
            size = export.backend().size(),
            read_only = args.read_only,
            "serving {image}"
        );
        exports.insert(export);
    }

    let addrs = if args.listen.is_empty() {
        vec!["127.0.0.1:10809".parse()?]
    } else {
        args.listen
    };
    let mut listeners = Vec::new();
    let mut bound = Vec::new();
    for addr in &addrs {
        let listener = Listener::bind(addr).await?;
        let local = listener.local_addr()?;
        info!("listening on {local}");
        listeners.push(listener);
        bound.push(local);
    }
    if !access.is_open() {
        info!(
            networks = ?access.networks().iter().map(ToString::to_string).collect::<Vec<_>>(),
            identities = ?access.identities(),
            "exports restricted"
        );
    }
    info!(tls = ?tls_policy, client_certificates = tls.as_ref().is_some_and(TlsSettings::verifies_clients), "TLS policy");
    let config = ServerConfig {
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        max_connections: args.max_connections.max(1),
        handshake: HandshakeConfig {
            tls: tls_policy,
            ..HandshakeConfig::default()
        },
        tls,
        ..ServerConfig::default()
    };
    let server = Server::new(exports.clone(), config);
    let handle = server.shutdown_handle();
    let control =
        ControlState::new(exports, &bound, server.connection_gauge()).with_access(access.clone());
    let control = bind_control(
        args.control.as_deref(),
        args.control_listen,
        args.control_token_file.as_deref(),
        control,
    )
    .await?;
    let control = control.map(|c| tokio::spawn(c.serve(handle.clone())));
    {
        let handle = handle.clone();
        tokio::spawn(async move {
            signals.recv().await;
            handle.shutdown();
        });
    }
    let served = server.serve(listeners).await;
    if let Some(control) = control {
        // The control API stops on the same signal; make sure it was sent even if the
        // server ended on its own.
        handle.shutdown();
        let _ = control.await;
    }
    served
}

/// Binds the control API's listeners, if any were asked for.
async fn bind_control(
    socket: Option<&Path>,
    tcp: Option<ListenAddr>,
    token_file: Option<&Path>,
    state: ControlState,
) -> strata::Result<Option<ControlServer>> {
    use strata::{Error, ErrorKind};
    if socket.is_none() && tcp.is_none() {
        return Ok(None);
    }
    let tcp = match tcp {
        Some(ListenAddr::Tcp(addr)) => Some(addr),
        Some(ListenAddr::Unix(_)) => {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                "--control-listen takes HOST:PORT; use --control PATH for a Unix socket",
            ));
        }
        None => None,
    };
    let config = ControlConfig {
        socket: socket.map(Path::to_path_buf),
        tcp,
        token: token_file.map(Token::from_file).transpose()?,
    };
    let server = ControlServer::bind(config, state).await?;
    for addr in server.local_addrs() {
        match addr {
            ListenAddr::Tcp(a) => info!("control API on http://{a}"),
            ListenAddr::Unix(p) => info!("control API on unix:{}", p.display()),
        }
    }
    Ok(Some(server))
}

/// Keeps request-sized buffers (up to the 32 MiB maximum payload) in the allocator's
/// heaps. By default glibc serves allocations above a dynamic threshold with fresh `mmap`s
/// and unmaps them on free, so every large read or write buffer cost page faults and
/// page zeroing: a fifth of the CPU time of 1 MiB reads.
fn tune_allocator() {
    // glibc's: other C libraries have no such knobs.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; it is called before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    // A macOS VM with a window needs AppKit's event loop on this thread.
    #[cfg(target_os = "macos")]
    if let Command::Vm(args) = &cli.command
        && cli_vm::wants_window(args)
    {
        let Command::Vm(args) = cli.command else {
            unreachable!()
        };
        cli_vm::run_with_window(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await.map(|()| ExitCode::SUCCESS),
            Command::Create(a) => cli_image::create(a),
            Command::Info(a) => cli_image::info(a),
            Command::Check(a) => cli_image::check(a),
            Command::Map(a) => cli_image::map(a),
            Command::Commit(a) => cli_image::commit(a),
            Command::Rebase(a) => cli_image::rebase(a),
            Command::Convert(a) => cli_image::convert(a),
            Command::Snapshot(a) => cli_snapshot::run(a).await,
            Command::Diff(a) => cli_snapshot::diff(&a),
            Command::Ctl(a) => cli_ctl::run(a).await,
            Command::Vm(a) => cli_vm::run(a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("strata: {e}");
            ExitCode::FAILURE
        }
    }
}
