//! The `strata` command line: a thin front end that builds the export stack and hands it to
//! the server.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use strata::backend;
use strata::server::{Export, Exports, ListenAddr, Listener, Server, ServerConfig};
use tracing::{error, info};

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
    /// Serve an image over NBD.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on: HOST:PORT, [V6]:PORT or unix:PATH. Repeat for several.
    #[arg(short, long = "listen", value_name = "ADDR")]
    listen: Vec<ListenAddr>,

    /// Export name (default: the image's file stem, or `memory`).
    #[arg(short, long)]
    name: Option<String>,

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

    /// Image to serve: a raw file or block device path, or memory:SIZE (e.g. memory:1G).
    #[arg(value_name = "IMAGE")]
    image: String,
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

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

async fn serve(args: ServeArgs) -> strata::Result<()> {
    let backend = backend::open(&args.image, args.read_only)?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_export_name(&args.image));
    let exports = Arc::new(Exports::new());
    exports.insert(Export::new(
        name.clone(),
        args.description.clone(),
        backend.clone(),
    ));

    let addrs = if args.listen.is_empty() {
        vec!["127.0.0.1:10809".parse()?]
    } else {
        args.listen
    };
    let mut listeners = Vec::new();
    for addr in &addrs {
        let listener = Listener::bind(addr).await?;
        info!("listening on {}", listener.local_addr()?);
        listeners.push(listener);
    }
    info!(
        export = name,
        size = backend.size(),
        read_only = args.read_only,
        "serving {}",
        args.image
    );

    let config = ServerConfig {
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        max_connections: args.max_connections.max(1),
        ..ServerConfig::default()
    };
    let server = Server::new(exports, config);
    let handle = server.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        handle.shutdown();
    });
    server.serve(listeners).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
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
            Command::Serve(args) => serve(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("strata: {e}");
            ExitCode::FAILURE
        }
    }
}
