//! The `strata` command line: a thin front end over the library. Each subcommand group
//! has a module of its own, which parses its arguments, calls the library and prints
//! the outcome.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strata::config::{self, LogFormat};
use tracing::error;

mod ctl;
mod history;
mod image;
mod output;
mod progress;
mod serve;
mod snapshot;
mod vm;

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
    Serve(Box<serve::ServeArgs>),
    /// Create a Strata image, empty or as an overlay of a backing file.
    Create(image::CreateArgs),
    /// Describe an image and its backing chain.
    Info(image::InfoArgs),
    /// Verify an image's checksums and map; optionally repair it.
    Check(image::CheckArgs),
    /// Show which layer holds each range of an image.
    Map(image::MapArgs),
    /// Merge an overlay into its backing file.
    Commit(image::CommitArgs),
    /// Point an overlay at a different backing file.
    Rebase(image::RebaseArgs),
    /// Copy an image to a new Strata image or raw file, skipping unallocated data.
    Convert(image::ConvertArgs),
    /// Take, list, delete and roll back snapshots of an image that is not being served.
    Snapshot(snapshot::SnapshotArgs),
    /// Print the ranges of an image written since one of its snapshots.
    Diff(snapshot::DiffArgs),
    /// List the restore points of a volume with history.
    History(history::HistoryArgs),
    /// Manage a running server through its control API.
    Ctl(ctl::CtlArgs),
    /// Boot, suspend and resume VMs whose disk is an NBD export.
    Vm(vm::VmArgs),
}

/// Logging to stderr: `RUST_LOG` if set, else `level`; colours only on a terminal.
pub(crate) fn init_logging(level: &str, format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

pub(crate) fn verbosity(verbose: u8) -> Option<&'static str> {
    match verbose {
        0 => None,
        1 => Some("debug"),
        _ => Some("trace"),
    }
}

pub(crate) fn runtime() -> strata::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| strata::Error::from(e).with_message("cannot start the runtime"))
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Serve(args) => return serve::run(&args, cli.verbose),
        command => command,
    };
    init_logging(
        verbosity(cli.verbose).unwrap_or(config::DEFAULT_LOG_LEVEL),
        LogFormat::Text,
    );
    // A macOS VM with a window needs AppKit's event loop on this thread.
    #[cfg(target_os = "macos")]
    if let Command::Vm(args) = &command
        && vm::wants_window(args)
    {
        let Command::Vm(args) = command else {
            unreachable!()
        };
        vm::run_with_window(args);
    }
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Serve(_) => unreachable!("served above"),
            Command::Create(a) => image::create(a),
            Command::Info(a) => image::info(a),
            Command::Check(a) => image::check(a),
            Command::Map(a) => image::map(a),
            Command::Commit(a) => image::commit(a),
            Command::Rebase(a) => image::rebase(a),
            Command::Convert(a) => image::convert(a),
            Command::Snapshot(a) => snapshot::run(a).await,
            Command::Diff(a) => snapshot::diff(&a),
            Command::History(a) => history::list(&a),
            Command::Ctl(a) => ctl::run(a).await,
            Command::Vm(a) => vm::run(a).await,
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
