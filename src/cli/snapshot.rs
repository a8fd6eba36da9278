//! Snapshot subcommands for images that are not being served (`strata snapshot ...`),
//! and `strata diff`, which also works on images being served. A served image's
//! snapshots are managed through the control API (`strata ctl`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;
use strata::image;
use strata::image::snapshot;
use strata::size::format_size;
use strata::volume::{self, DirtyRange, RollbackOptions, Volume};

use super::output::print_json;
use strata::time::seconds_utc;

type CmdResult = strata::Result<ExitCode>;

/// `strata snapshot`
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Take a snapshot of an image.
    Create {
        /// The live image.
        image: PathBuf,
        /// Name of the new snapshot.
        name: String,
    },
    /// List an image's snapshots, newest first.
    List {
        /// The live image.
        image: PathBuf,
    },
    /// Delete a snapshot, merging what it holds into the layer above it.
    Delete {
        /// The live image.
        image: PathBuf,
        /// The snapshot to delete.
        name: String,
    },
    /// Return the image to a snapshot's contents.
    Rollback {
        /// The live image.
        image: PathBuf,
        /// The snapshot to return to.
        name: String,
        /// Delete the snapshots newer than NAME (refused otherwise).
        #[arg(long)]
        destroy_newer: bool,
    },
}

fn open(image: &Path) -> strata::Result<std::sync::Arc<Volume>> {
    Volume::open(image, false).map_err(|e| {
        if e.kind() == strata::ErrorKind::Busy {
            e.with_message(
                "the image is in use (served?): manage a served image's snapshots with `strata ctl`",
            )
        } else {
            e
        }
    })
}

fn print_snapshots(list: &[volume::SnapshotInfo]) {
    if list.is_empty() {
        println!("no snapshots");
        return;
    }
    println!(
        "{:<24} {:<20} {:>10}  FILE",
        "NAME", "CREATED (UTC)", "ALLOCATED"
    );
    for s in list {
        println!(
            "{:<24} {:<20} {:>10}  {}",
            s.name,
            seconds_utc(s.created),
            format_size(s.allocated),
            s.path.display()
        );
    }
}

/// `strata snapshot ...`
pub async fn run(a: SnapshotArgs) -> CmdResult {
    match a.command {
        SnapshotCommand::Create { image, name } => {
            let taken = open(&image)?.snapshot(&name).await?;
            if a.json {
                print_json(&taken);
            } else {
                println!(
                    "snapshot {name} of {} taken: {}",
                    image.display(),
                    taken.snapshot.path.display()
                );
            }
        }
        SnapshotCommand::List { image } => {
            // Listing takes no lock: it works on a served image too.
            let chain = image::inspect(&image)?;
            let list: Vec<volume::SnapshotInfo> = snapshot::in_chain(&chain)
                .into_iter()
                .rev()
                .map(|s| volume::SnapshotInfo {
                    name: s.name,
                    created: s.created,
                    path: s.path,
                    allocated: s.allocated,
                    exported_as: None,
                })
                .collect();
            if a.json {
                print_json(&list);
            } else {
                print_snapshots(&list);
            }
        }
        SnapshotCommand::Delete { image, name } => {
            let copied = open(&image)?.delete_snapshot(&name).await?;
            if a.json {
                print_json(&serde_json::json!({ "deleted": name, "copied": copied }));
            } else {
                println!(
                    "snapshot {name} deleted ({} merged into the layer above)",
                    format_size(copied)
                );
            }
        }
        SnapshotCommand::Rollback {
            image,
            name,
            destroy_newer,
        } => {
            let options = RollbackOptions {
                force: false,
                destroy_newer,
            };
            open(&image)?.rollback(&name, options, 0).await?;
            if a.json {
                print_json(&serde_json::json!({ "rolled_back_to": name }));
            } else {
                println!("{} rolled back to snapshot {name}", image.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata diff`
#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The live image (or a snapshot's file, to compare two snapshots).
    pub image: PathBuf,
    /// The snapshot to compare with.
    #[arg(long)]
    pub since: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `strata diff --json` and the control API's dirty ranges report.
#[derive(Serialize)]
struct Diff<'a> {
    since: &'a str,
    cluster_size: u64,
    ranges: &'a [DirtyRange],
    bytes: u64,
}

/// `strata diff`: the ranges written since a snapshot, read without locking, so it
/// also works on an image being served (the answer may be a moment out of date).
pub fn diff(a: &DiffArgs) -> CmdResult {
    let chain = image::inspect(&a.image)?;
    let snap = snapshot::find(&chain, &a.since).map_err(|e| e.with_path(&a.image))?;
    let ranges = volume::dirty_ranges(&chain, snap.layer)?;
    let bytes = ranges.iter().map(|r| r.length).sum();
    if a.json {
        print_json(&Diff {
            since: &a.since,
            cluster_size: chain.cluster_size(),
            ranges: &ranges,
            bytes,
        });
    } else {
        for r in &ranges {
            println!("{} {}", r.offset, r.length);
        }
        eprintln!(
            "{} range(s), {} changed since snapshot {}",
            ranges.len(),
            format_size(bytes),
            a.since
        );
    }
    Ok(ExitCode::SUCCESS)
}
