//! `strata ctl`: a client of a running server's control API (`docs/api.md`). It sends one
//! HTTP request per command, over the control socket or TCP, and prints the answer as
//! aligned text, or as the server's JSON with `--json`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use strata::api::client::{Call, ControlTarget as Target, decode};
use strata::api::{
    AddExport, CloneAt, Dirty, DirtyQuery, ExportView, PointRef, RemoveQuery, Rollback, ServeAt,
    ServeSnapshot, ServerView, Snapshot, TakeSnapshot,
};
use strata::history::PointSpec;
use strata::image::FormatChoice;
use strata::size::format_size;
use strata::{Error, ErrorKind};

use super::output::{Table, duration, fields};
use strata::time::seconds_utc;

/// `strata ctl`
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The server's control socket (`strata serve --control PATH`); default
    /// $STRATA_CONTROL.
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    socket: Option<PathBuf>,
    /// The control API over TCP (`strata serve --control-listen`): http://HOST:PORT.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// File holding the bearer token for --url.
    #[arg(long, value_name = "FILE", requires = "url")]
    token_file: Option<PathBuf>,
    /// Print the server's JSON answer instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the server's answer.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    timeout: u64,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// The server's version, uptime, addresses and connection count.
    Server,
    /// All exports with their counters.
    Exports,
    /// One export in detail.
    Export {
        /// Export name.
        name: String,
    },
    /// Serve another image under a new export name.
    Add {
        /// Export name.
        name: String,
        /// A Strata image, a raw file or block device, or memory:SIZE. Over --socket a
        /// relative path starts from the current directory; over --url it is sent as
        /// given, for the server's machine.
        image: String,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// How to read the file.
        #[arg(long, value_enum, default_value = "auto")]
        format: FormatChoice,
        /// Description sent to clients that ask.
        #[arg(long)]
        description: Option<String>,
    },
    /// Stop serving an export.
    Remove {
        /// Export name.
        name: String,
        /// Disconnect its clients instead of refusing while there are any.
        #[arg(long)]
        force: bool,
    },
    /// List an export's snapshots.
    Snapshots {
        /// Export name.
        export: String,
    },
    /// Take a snapshot of an export (for a volume with history: name a restore point).
    Snapshot {
        /// Export name.
        export: String,
        /// Snapshot name.
        name: String,
        /// Volume with history: name this restore point (a seq, an RFC 3339 time or a
        /// time ago such as -10m) instead of the disk as it is now.
        #[arg(long, value_name = "POINT", allow_hyphen_values = true)]
        at: Option<String>,
    },
    /// Delete a snapshot, keeping what it holds in the layer above.
    DeleteSnapshot {
        /// Export name.
        export: String,
        /// Snapshot name.
        name: String,
    },
    /// Return an export's disk to a snapshot's contents, or (a volume with history) to
    /// a restore point.
    Rollback {
        /// Export name.
        export: String,
        /// Snapshot name.
        #[arg(required_unless_present = "at")]
        name: Option<String>,
        /// A restore point instead of a snapshot: a seq, an RFC 3339 time or a time
        /// ago (-10m).
        #[arg(
            long,
            value_name = "POINT",
            allow_hyphen_values = true,
            conflicts_with_all = ["name", "destroy_newer"]
        )]
        at: Option<String>,
        /// Even with clients connected (they see the disk change under them).
        #[arg(long)]
        force: bool,
        /// Delete the snapshots newer than this one.
        #[arg(long)]
        destroy_newer: bool,
    },
    /// Serve a snapshot read-only as an export of its own.
    ServeSnapshot {
        /// Export name.
        export: String,
        /// Snapshot name.
        name: String,
        /// Name of the new export (default EXPORT@SNAPSHOT).
        #[arg(long = "as", value_name = "EXPORT_NAME")]
        as_name: Option<String>,
    },
    /// The ranges of an export written since a snapshot or a restore point.
    Dirty {
        /// Export name.
        export: String,
        /// A restore point (a seq, an RFC 3339 time, a time ago such as -10m), or else a
        /// snapshot name. A name of digits alone is read as a seq.
        #[arg(long, value_name = "POINT|SNAPSHOT", allow_hyphen_values = true)]
        since: String,
    },
    /// The restore points of an export that serves a volume with history.
    History {
        /// Export name.
        export: String,
        /// List every point, not only the newest ones.
        #[arg(long)]
        all: bool,
    },
    /// Serve the disk of a volume with history at a restore point, read-only, as an
    /// export of its own.
    ServeAt {
        /// Export name.
        export: String,
        /// The point: a seq, an RFC 3339 time or a time ago (-10m).
        #[arg(allow_hyphen_values = true)]
        point: String,
        /// Name of the new export (default EXPORT@SEQ).
        #[arg(long = "as", value_name = "EXPORT_NAME")]
        as_name: Option<String>,
    },
    /// Make a new volume with history that starts as the disk at a restore point, and
    /// serve it as a writable export.
    Clone {
        /// Export name.
        export: String,
        /// The point: a seq, an RFC 3339 time or a time ago (-10m).
        #[arg(allow_hyphen_values = true)]
        point: String,
        /// Name of the new export.
        name: String,
        /// The new volume's directory, which must not exist. Over --socket a relative
        /// path starts from the current directory.
        image: String,
    },
}

fn invalid(message: impl Into<String>) -> Error {
    Error::msg(ErrorKind::InvalidInput, message)
}

/// Where the control API is, from `--url`/`--token-file`, `--socket` or
/// `$STRATA_CONTROL`.
fn target_from_args(args: &CtlArgs) -> strata::Result<Target> {
    if let Some(url) = &args.url {
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(invalid(format!("--url {url:?}: expected http://HOST:PORT")));
        }
        let token = match &args.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        Error::from(e)
                            .with_message("cannot read the token file")
                            .with_path(path)
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        return Target::parse(url, token).map_err(|e| invalid(format!("--url: {e}")));
    }
    let socket = args
        .socket
        .clone()
        .or_else(|| std::env::var_os("STRATA_CONTROL").map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| {
            invalid("where is the server? give --socket PATH, --url URL or set STRATA_CONTROL")
        })?;
    Ok(Target::Unix(socket))
}

/// Runs `strata ctl`.
pub async fn run(args: CtlArgs) -> strata::Result<ExitCode> {
    let ctl = Ctl {
        target: target_from_args(&args)?,
        timeout: Duration::from_secs(args.timeout.max(1)),
        json: args.json,
    };
    match &args.command {
        CtlCommand::Server => ctl.show(&Call::server(), |v| render_server(&v)).await?,
        CtlCommand::Exports => {
            ctl.show(&Call::exports(), |v| render_exports(&v.exports))
                .await?;
        }
        CtlCommand::Export { name } => ctl.show(&Call::export(name), |v| render_export(&v)).await?,
        CtlCommand::Add {
            name,
            image,
            read_only,
            format,
            description,
        } => {
            let body = AddExport {
                name: name.clone(),
                image: ctl.server_path(image)?,
                read_only: *read_only,
                format: *format,
                description: description.clone().unwrap_or_default(),
            };
            ctl.show(&Call::add_export(&body), |v| render_export(&v))
                .await?;
        }
        CtlCommand::Remove { name, force } => {
            let call = Call::remove_export(name, RemoveQuery { force: *force });
            ctl.show(&call, |v| {
                let n = v.disconnected;
                let clients = if n == 1 { "client" } else { "clients" };
                format!(
                    "removed export {} ({n} {clients} disconnected)\n",
                    v.removed
                )
            })
            .await?;
        }
        CtlCommand::Snapshots { export } => {
            ctl.show(&Call::snapshots(export), |v| render_snapshots(&v.snapshots))
                .await?;
        }
        CtlCommand::Snapshot { export, name, at } => {
            let body = TakeSnapshot {
                name: name.clone(),
                at: at.clone(),
            };
            ctl.show(&Call::take_snapshot(export, &body), |v| {
                format!(
                    "snapshot {} of {export} taken; requests waited {} us\n",
                    v.snapshot.name, v.pause_us
                )
            })
            .await?;
        }
        CtlCommand::DeleteSnapshot { export, name } => {
            ctl.show(&Call::delete_snapshot(export, name), |v| {
                format!(
                    "snapshot {name} of {export} deleted; {} merged into the layer above\n",
                    format_size(v.copied)
                )
            })
            .await?;
        }
        CtlCommand::Rollback {
            export,
            name,
            at,
            force,
            destroy_newer,
        } => {
            let body = Rollback {
                snapshot: name.clone(),
                at: at.clone(),
                force: *force,
                destroy_newer: *destroy_newer,
            };
            ctl.show(&Call::rollback(export, &body), |v| {
                let to = match (&v.snapshot, &v.point) {
                    (_, Some(p)) => point_text(p),
                    (Some(s), None) => format!("snapshot {s}"),
                    (None, None) => "the state asked for".to_owned(),
                };
                format!("export {export} rolled back to {to}\n")
            })
            .await?;
        }
        CtlCommand::ServeSnapshot {
            export,
            name,
            as_name,
        } => {
            let body = ServeSnapshot {
                name: as_name.clone(),
            };
            ctl.show(&Call::serve_snapshot(export, name, &body), |v| {
                format!("serving {} read-only as export {}\n", serves(&v), v.name)
            })
            .await?;
        }
        CtlCommand::Dirty { export, since } => {
            let query = if PointSpec::parse(since).is_ok() {
                DirtyQuery {
                    since: None,
                    since_point: Some(since.clone()),
                }
            } else {
                DirtyQuery {
                    since: Some(since.clone()),
                    since_point: None,
                }
            };
            ctl.show(&Call::dirty(export, &query), |v| render_dirty(&v))
                .await?;
        }
        CtlCommand::History { export, all } => {
            ctl.show(&Call::history(export), |v| super::history::render(&v, *all))
                .await?;
        }
        CtlCommand::ServeAt {
            export,
            point,
            as_name,
        } => {
            let body = ServeAt {
                at: point.clone(),
                as_name: as_name.clone(),
            };
            ctl.show(&Call::serve_at(export, &body), |v| {
                format!("serving {} read-only as export {}\n", serves(&v), v.name)
            })
            .await?;
        }
        CtlCommand::Clone {
            export,
            point,
            name,
            image,
        } => {
            let body = CloneAt {
                at: point.clone(),
                name: name.clone(),
                image: ctl.server_path(image)?,
            };
            ctl.show(&Call::clone_at(export, &body), |v| {
                format!(
                    "serving {} as export {}: {}\n",
                    serves(&v),
                    v.name,
                    v.description
                )
            })
            .await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The control API `strata ctl` talks to, and how it prints answers.
struct Ctl {
    target: Target,
    /// How long to wait for an answer.
    timeout: Duration,
    /// Print answers as the server sent them.
    json: bool,
}

impl Ctl {
    /// `path` as the server should read it: over the socket the server runs on this
    /// machine, so a relative path means what it means here; over TCP it is sent as
    /// given. `memory:SIZE` is never a path.
    fn server_path(&self, path: &str) -> strata::Result<String> {
        Ok(match &self.target {
            Target::Unix(_) if !path.starts_with("memory:") => std::path::absolute(path)
                .map_err(|e| Error::from(e).with_path(path))?
                .to_string_lossy()
                .into_owned(),
            _ => path.to_owned(),
        })
    }

    /// Sends `call` and prints its answer: the server's JSON as it came with `--json`,
    /// else the text `render` makes of it.
    async fn show<A: DeserializeOwned>(
        &self,
        call: &Call<A>,
        render: impl FnOnce(A) -> String,
    ) -> strata::Result<()> {
        let answer = tokio::time::timeout(self.timeout, self.target.send_raw(call))
            .await
            .map_err(|_| {
                Error::msg(
                    ErrorKind::Io,
                    format!(
                        "no answer from the control API at {} within {:?}",
                        self.target, self.timeout
                    ),
                )
            })??;
        if self.json {
            println!("{}", String::from_utf8_lossy(&answer).trim_end());
        } else {
            print!("{}", render(decode(&answer)?));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Text output
// ---------------------------------------------------------------------------------------

/// "rw", or "ro" for an export that refuses writes.
fn mode(export: &ExportView) -> &'static str {
    if export.read_only { "ro" } else { "rw" }
}

/// What an export serves, in a few words.
fn serves(export: &ExportView) -> String {
    if let Some(of) = &export.snapshot_of {
        return format!("snapshot {} of {}", of.snapshot, of.export);
    }
    if let Some(of) = &export.point_of {
        return format!("{} of {}", point_text(&of.point), of.export);
    }
    match (&export.image, export.kind.as_str()) {
        (Some(path), _) => path.display().to_string(),
        (None, "memory") => "memory".to_owned(),
        (None, _) => "-".to_owned(),
    }
}

/// A restore point as the text output names it.
fn point_text(p: &PointRef) -> String {
    format!("restore point {} ({})", p.seq, p.time)
}

fn render_server(v: &ServerView) -> String {
    let joined = |items: &[String]| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    fields(&[
        ("version", v.version.clone()),
        ("uptime", duration(v.uptime_s)),
        ("listening on", joined(&v.listen)),
        ("control API", joined(&v.control)),
        (
            "connections",
            format!("{} of {}", v.connections, v.max_connections),
        ),
        ("exports", v.exports.to_string()),
    ])
}

fn render_exports(exports: &[ExportView]) -> String {
    let rows = exports
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.kind.clone(),
                format_size(e.size),
                mode(e).to_owned(),
                e.stats.connections.to_string(),
                e.stats.reads.to_string(),
                e.stats.writes.to_string(),
                e.stats.errors.to_string(),
                serves(e),
            ]
        })
        .collect();
    Table {
        headers: &[
            "NAME", "KIND", "SIZE", "MODE", "CONNS", "READS", "WRITES", "ERRORS", "SERVES",
        ],
        numeric: &[false, false, true, false, true, true, true, true, false],
        rows,
    }
    .render()
}

fn render_export(e: &ExportView) -> String {
    let stats = &e.stats;
    let counted = |count: u64, bytes: u64| format!("{count} ({})", format_size(bytes));
    let history = e.history.as_ref().map(|h| {
        let points = match (&h.oldest_point, &h.newest_point) {
            (Some(oldest), Some(newest)) => format!(
                "points from seq {} ({}) to seq {} ({})",
                oldest.seq, oldest.time, newest.seq, newest.time
            ),
            _ => "no restore point yet".to_owned(),
        };
        (
            "history",
            format!("kept {}; {points}", duration(h.window_s)),
        )
    });
    let mut pairs = vec![
        ("name", e.name.clone()),
        ("kind", e.kind.clone()),
        ("serves", serves(e)),
        (
            "size",
            format!("{} ({} bytes)", format_size(e.size), e.size),
        ),
        (
            "mode",
            if e.read_only {
                "read-only"
            } else {
                "read-write"
            }
            .to_owned(),
        ),
        (
            "description",
            Some(e.description.clone())
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "-".to_owned()),
        ),
        (
            "connections",
            format!(
                "{} now, {} in all",
                stats.connections, stats.total_connections
            ),
        ),
        ("reads", counted(stats.reads, stats.bytes_read)),
        ("writes", counted(stats.writes, stats.bytes_written)),
        ("flushes", stats.flushes.to_string()),
        ("trims", stats.trims.to_string()),
        ("zeroes", stats.zeroes.to_string()),
        ("block status", stats.block_status.to_string()),
        ("cache", stats.caches.to_string()),
        ("errors", stats.errors.to_string()),
    ];
    if let Some(line) = history {
        pairs.insert(3, line);
    }
    fields(&pairs)
}

fn render_snapshots(snapshots: &[Snapshot]) -> String {
    let rows = snapshots
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                seconds_utc(s.created),
                format_size(s.allocated),
                s.exported_as.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    Table {
        headers: &["NAME", "CREATED (UTC)", "ALLOCATED", "EXPORTED AS"],
        numeric: &[false, false, true, false],
        rows,
    }
    .render()
}

fn render_dirty(v: &Dirty) -> String {
    let rows = v
        .ranges
        .iter()
        .map(|r| vec![r.offset.to_string(), r.length.to_string()])
        .collect();
    let mut out = Table {
        headers: &["OFFSET", "LENGTH"],
        numeric: &[true, true],
        rows,
    }
    .render();
    let _ = write!(
        out,
        "{} range(s), {} written since {}",
        v.ranges.len(),
        format_size(v.bytes),
        v.point.as_ref().map_or_else(|| v.since.clone(), point_text)
    );
    if let Some(cs) = v.cluster_size {
        let _ = write!(out, " (in clusters of {})", format_size(cs));
    }
    out.push('\n');
    out
}
