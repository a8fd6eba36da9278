//! The image subcommands of the command line: argument definitions and printing. The
//! work itself is in [`strata::image::tools`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use strata::image::{self, tools};
use strata::size::{format_size, parse_size};

use super::output::print_json;
use super::progress::Bar;

pub(crate) fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// `strata create`
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Image to create (must not exist).
    pub image: PathBuf,
    /// Virtual size, e.g. 20G (default: the backing file's size).
    #[arg(short, long, value_parser = size_arg)]
    pub size: Option<u64>,
    /// Cluster size, a power of two from 4K to 2M (default 64K, or the backing image's).
    #[arg(short, long, value_parser = size_arg)]
    pub cluster_size: Option<u64>,
    /// Backing file (raw file, block device or Strata image): the new image starts as a
    /// copy-on-write overlay of it.
    #[arg(short, long)]
    pub backing: Option<PathBuf>,
    /// Keep every flushed state of the disk as a restore point for this long (e.g. 24h):
    /// the image is then a volume with history, a directory.
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub history: Option<std::time::Duration>,
    /// The most space the history may take; over it the oldest restore points go first,
    /// even inside the window (named snapshots are kept).
    #[arg(long, value_name = "SIZE", value_parser = size_arg, requires = "history")]
    pub history_max_bytes: Option<u64>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    strata::time::parse_duration(s).map_err(|e| e.to_string())
}

/// `strata info`
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Image to describe.
    pub image: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `strata check`
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Image to check.
    pub image: PathBuf,
    /// Fix what can be fixed: drop unreadable mappings, release leaked space.
    #[arg(long)]
    pub repair: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `strata map`
#[derive(Args, Debug)]
pub struct MapArgs {
    /// Image to map.
    pub image: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `strata commit`
#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Overlay whose changes go into its backing file.
    pub image: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `strata rebase`
#[derive(Args, Debug)]
pub struct RebaseArgs {
    /// Overlay to point at a new backing file.
    pub image: PathBuf,
    /// The new backing file.
    #[arg(short, long, required_unless_present = "no_backing")]
    pub backing: Option<PathBuf>,
    /// Drop the backing file: copy everything the image reads into it.
    #[arg(long, conflicts_with = "backing")]
    pub no_backing: bool,
    /// Only rewrite the reference; for when the new file holds the same data (a moved
    /// or copied base).
    #[arg(short, long = "unsafe")]
    pub unsafe_: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Output format of `convert`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutFormat {
    /// A Strata image.
    Strata,
    /// A raw, sparse file.
    Raw,
}

/// `strata convert`
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source: a Strata image (its whole chain is read), a raw file or device, or a
    /// volume with history (its live disk, or the disk at `--at`).
    pub source: PathBuf,
    /// Destination file (must not exist).
    pub destination: PathBuf,
    /// Copy the disk as it was at this restore point of a volume with history: a seq,
    /// an RFC 3339 time (the latest point at or before it) or a time ago (`-10m`).
    #[arg(long, value_name = "POINT", allow_hyphen_values = true)]
    pub at: Option<String>,
    /// Destination format.
    #[arg(short = 'O', long = "to", value_enum, default_value = "strata")]
    pub format: OutFormat,
    /// Cluster size of a Strata destination.
    #[arg(short, long, value_parser = size_arg)]
    pub cluster_size: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

type CmdResult = strata::Result<ExitCode>;

/// `strata create`
pub fn create(a: CreateArgs) -> CmdResult {
    if let Some(window) = a.history {
        return super::history::create(&a, window);
    }
    let header = image::create(
        &a.image,
        &image::CreateOptions {
            size: a.size,
            cluster_size: a.cluster_size,
            backing: a.backing.clone(),
        },
    )?;
    if a.json {
        print_json(&serde_json::json!({
            "path": a.image,
            "virtual_size": header.virtual_size,
            "cluster_size": header.cluster_size(),
            "image_id": image::format_id(&header.image_id),
            "backing": header.backing.as_ref().map(|b| &b.path),
        }));
    } else {
        let backing = header
            .backing
            .as_ref()
            .map(|b| format!(", backing {}", b.path))
            .unwrap_or_default();
        println!(
            "created {}: {} virtual, {} clusters{backing}",
            a.image.display(),
            format_size(header.virtual_size),
            format_size(header.cluster_size())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata info`
pub fn info(a: InfoArgs) -> CmdResult {
    let fmt = image::probe(&a.image)?;
    if fmt != image::Format::Strata {
        let meta =
            std::fs::metadata(&a.image).map_err(|e| strata::Error::from(e).with_path(&a.image))?;
        let name = match fmt {
            image::Format::Foreign(n) => n,
            _ => "raw",
        };
        if a.json {
            print_json(&serde_json::json!({
                "path": a.image, "format": name, "file_length": meta.len(),
            }));
        } else {
            println!("{}: {name}, {} bytes", a.image.display(), meta.len());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let info = tools::info(&a.image)?;
    if a.json {
        print_json(&info);
        return Ok(ExitCode::SUCCESS);
    }
    println!("image:         {}", info.path.display());
    println!("format:        strata (version {})", info.version);
    println!(
        "virtual size:  {} ({} bytes)",
        format_size(info.virtual_size),
        info.virtual_size
    );
    println!("cluster size:  {}", format_size(info.cluster_size));
    println!("image id:      {}", info.image_id);
    println!(
        "allocated:     {} data, {} zero clusters",
        format_size(info.allocated),
        format_size(info.zeroed)
    );
    println!(
        "file:          {} long, {} on disk",
        format_size(info.file_length),
        format_size(info.disk_usage)
    );
    if let Some(b) = &info.backing {
        println!(
            "backing:       {} ({}, {})",
            b.reference,
            b.format,
            b.resolved.display()
        );
    }
    if info.chain.len() > 1 {
        println!("chain:");
        for (i, l) in info.chain.iter().enumerate() {
            println!(
                "  {:>3}  {:<6} {:>10} allocated  {}",
                i + 1,
                l.format,
                format_size(l.allocated),
                l.path.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata check`
pub fn check(a: CheckArgs) -> CmdResult {
    if strata::history::is_volume(&a.image) {
        return super::history::check(&a);
    }
    let report = tools::check(&a.image, a.repair)?;
    let clean = report.is_clean();
    if a.json {
        print_json(&report);
    } else {
        for p in &report.problems {
            println!("error: {p}");
        }
        for p in &report.backing_problems {
            println!("error: backing: {p}");
        }
        for r in &report.repaired {
            println!("repaired: {r}");
        }
        if report.leaked_bytes > 0 {
            println!(
                "note: {} in clusters nothing maps (left by an interrupted write; \
                 reused automatically, released by --repair)",
                format_size(report.leaked_bytes)
            );
        }
        if report.torn_slots > 0 {
            println!(
                "note: {} map slots hold an interrupted update; their other copy is current",
                report.torn_slots
            );
        }
        println!(
            "{}: {} ({} data clusters, {} zero clusters)",
            a.image.display(),
            if clean { "no errors" } else { "CORRUPT" },
            report.data_clusters,
            report.zero_clusters
        );
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// `strata map`
pub fn map(a: MapArgs) -> CmdResult {
    let entries = tools::map(&a.image)?;
    if a.json {
        print_json(&entries);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>18} {:>18} {:<12} {:>5}  file",
        "offset", "length", "state", "depth"
    );
    for e in entries {
        println!(
            "{:>#18x} {:>#18x} {:<12} {:>5}  {}",
            e.offset,
            e.length,
            e.state,
            e.depth,
            e.file.map(|f| f.display().to_string()).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_copy(json: bool, what: &str, r: &tools::CopyReport) {
    if json {
        print_json(r);
    } else {
        println!(
            "{what}: {} copied, {} zeroed",
            format_size(r.copied),
            format_size(r.zeroed)
        );
    }
}

/// `strata commit`
pub fn commit(a: CommitArgs) -> CmdResult {
    let bar = Bar::bytes("commit", a.json);
    let r = tools::commit(&a.image, &|d, t| bar.update(d, t))?;
    bar.finish();
    print_copy(a.json, "committed", &r);
    Ok(ExitCode::SUCCESS)
}

/// `strata rebase`
pub fn rebase(a: RebaseArgs) -> CmdResult {
    let bar = Bar::bytes("rebase", a.json);
    let r = tools::rebase(&a.image, a.backing.as_deref(), a.unsafe_, &|d, t| {
        bar.update(d, t);
    })?;
    bar.finish();
    print_copy(a.json, "rebased", &r);
    Ok(ExitCode::SUCCESS)
}

/// `strata convert`
pub fn convert(a: ConvertArgs) -> CmdResult {
    let format = match a.format {
        OutFormat::Strata => tools::OutputFormat::Strata,
        OutFormat::Raw => tools::OutputFormat::Raw,
    };
    let bar = Bar::bytes("convert", a.json);
    let progress = |d, t| bar.update(d, t);
    let r = if strata::history::is_volume(&a.source) {
        super::history::convert(
            &a.source,
            a.at.as_deref(),
            &a.destination,
            format,
            a.cluster_size,
            &progress,
        )?
    } else if a.at.is_some() {
        return Err(strata::Error::msg(
            strata::ErrorKind::InvalidInput,
            "--at needs a volume with history (strata create --history)",
        ));
    } else {
        tools::convert(&a.source, &a.destination, format, a.cluster_size, &progress)?
    };
    bar.finish();
    print_copy(a.json, "converted", &r);
    Ok(ExitCode::SUCCESS)
}
