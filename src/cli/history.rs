//! Volumes with history on the command line: `strata create --history` and `strata
//! history`. The work is in [`strata::history`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use strata::api::{HistoryView, PointInfo};
use strata::history::engine::DEFAULT_SEGMENT_BYTES;
use strata::history::{CreateHistory, History, PointSpec};
use strata::image::tools;
use strata::size::format_size;

use super::image::{CheckArgs, CreateArgs};
use super::output::{Table, duration, print_json};

type CmdResult = strata::Result<ExitCode>;

/// How many points the text listing shows before it summarises.
const SHOWN: usize = 20;

/// `strata history`: works on a volume being served too (it takes no lock and reads
/// the log as far as it was written).
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct HistoryArgs {
    /// Turn history on for an existing image.
    #[command(subcommand)]
    pub command: Option<HistoryCommand>,
    /// The volume (a directory made by `strata create --history`).
    #[arg(required = true)]
    pub volume: Option<PathBuf>,
    /// List every point, not only the newest ones.
    #[arg(long)]
    pub all: bool,
    /// Print JSON: `{"points": [{"seq", "time", "kind"}, ...]}`, oldest first.
    #[arg(long)]
    pub json: bool,
}

/// `strata history enable`
#[derive(clap::Subcommand, Debug)]
pub enum HistoryCommand {
    /// Turn history on for an existing Strata image, in place: the image becomes the
    /// read-only base (renamed NAME.before-history) of a volume with history at its path.
    Enable {
        /// The image (not in use, without snapshots).
        image: PathBuf,
        /// How long restore points are kept (e.g. 24h).
        #[arg(long, value_name = "DURATION", value_parser = super::image::duration_arg)]
        window: Duration,
        /// The most space the history may take.
        #[arg(long, value_name = "SIZE", value_parser = super::image::size_arg)]
        max_bytes: Option<u64>,
    },
}

/// `strata create --history`
pub fn create(a: &CreateArgs, window: Duration) -> CmdResult {
    if a.cluster_size.is_some() {
        return Err(strata::Error::msg(
            strata::ErrorKind::InvalidInput,
            "--cluster-size does not apply to a volume with history (it keeps 4 KiB blocks)",
        ));
    }
    let manifest = History::create(
        &a.image,
        &CreateHistory {
            size: a.size,
            base: a.backing.clone(),
            window,
            max_bytes: a.history_max_bytes,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        },
    )?;
    if a.json {
        print_json(&serde_json::json!({
            "path": a.image,
            "virtual_size": manifest.size,
            "history_window_s": manifest.window_secs,
            "history_max_bytes": manifest.max_bytes,
            "volume_id": manifest.id,
            "backing": a.backing,
        }));
    } else {
        let backing = a
            .backing
            .as_ref()
            .map(|b| format!(", base {}", b.display()))
            .unwrap_or_default();
        let cap = manifest
            .max_bytes
            .map(|m| format!(" (at most {})", format_size(m)))
            .unwrap_or_default();
        println!(
            "created {}: {} virtual, restore points kept {}{cap}{backing}",
            a.image.display(),
            format_size(manifest.size),
            duration(manifest.window_secs)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata history`
pub fn list(a: &HistoryArgs) -> CmdResult {
    if let Some(HistoryCommand::Enable {
        image,
        window,
        max_bytes,
    }) = &a.command
    {
        let m = strata::history::enable::enable(image, *window, *max_bytes)?;
        println!(
            "{} keeps its history now: restore points kept {}; its former image is {}",
            image.display(),
            duration(m.window_secs),
            strata::history::enable::renamed(image).display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let volume = a
        .volume
        .as_deref()
        .expect("clap requires a volume without a subcommand");
    let history = History::inspect(volume)?;
    let view = HistoryView::of(&history);
    if a.json {
        print_json(&view);
    } else {
        print!("{}", render(&view, a.all));
    }
    Ok(ExitCode::SUCCESS)
}

/// The text listing: a summary line, then the points (only the newest unless `all`).
pub(crate) fn render(view: &HistoryView, all: bool) -> String {
    let points = &view.points;
    let mut out = format!(
        "{} restore points, kept {}{}; history {}\n",
        points.len(),
        duration(view.window_s),
        view.max_bytes
            .map(|m| format!(" (at most {})", format_size(m)))
            .unwrap_or_default(),
        format_size(view.history_bytes)
    );
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        out += &format!(
            "oldest {} (seq {}), newest {} (seq {})\n",
            first.time, first.seq, last.time, last.seq
        );
    }
    let shown: &[PointInfo] = if all || points.len() <= SHOWN {
        points
    } else {
        out += &format!("(the {SHOWN} newest; --all lists every one)\n");
        &points[points.len() - SHOWN..]
    };
    let table = Table {
        headers: &["SEQ", "TIME", "KIND"],
        numeric: &[true, false, false],
        rows: shown
            .iter()
            .map(|p| {
                let kind = match &p.name {
                    Some(n) => format!("snapshot {n}"),
                    None => p.kind.clone(),
                };
                vec![p.seq.to_string(), p.time.clone(), kind]
            })
            .collect(),
    };
    if !shown.is_empty() {
        out += &table.render();
    }
    out
}

/// `strata convert` of a volume with history: its live disk, or the disk at `at`.
pub fn convert(
    volume: &Path,
    at: Option<&str>,
    dst: &Path,
    format: tools::OutputFormat,
    cluster_size: Option<u64>,
    progress: tools::Progress<'_>,
) -> strata::Result<tools::CopyReport> {
    let history = Arc::new(History::inspect(volume)?);
    match at {
        None => tools::convert_from(history.as_ref(), dst, format, cluster_size, progress),
        Some(text) => {
            let point = history.resolve(PointSpec::parse(text)?)?;
            let view = history.view(point)?;
            tools::convert_from(&view, dst, format, cluster_size, progress)
        }
    }
}

/// `strata check` of a volume with history.
pub fn check(a: &CheckArgs) -> CmdResult {
    let report = strata::history::check::check(&a.image, a.repair)?;
    if a.json {
        print_json(&report);
    } else {
        for p in &report.problems {
            println!("error: {p}");
        }
        for r in &report.repaired {
            println!("repaired: {r}");
        }
        if report.torn_bytes > 0 || report.segments_after_tear > 0 {
            println!(
                "note: a torn log tail of {} ({} later segments): records a crash left \
                 incomplete, never acknowledged as durable; the next writable open cuts it \
                 (or --repair)",
                format_size(report.torn_bytes),
                report.segments_after_tear
            );
        }
        if report.bad_checkpoints > 0 {
            println!(
                "note: {} damaged checkpoints passed over (the log is replayed from an older one)",
                report.bad_checkpoints
            );
        }
        println!(
            "{}: {} restore points, {} segments ({}), {} records after the checkpoint{}",
            a.image.display(),
            report.points,
            report.segments,
            format_size(report.log_bytes),
            report.records_replayed,
            if report.is_clean() { "; no errors" } else { "" }
        );
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
