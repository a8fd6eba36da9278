//! `strata ctl`: a client of a running server's control API (`docs/api.md`). It sends one
//! HTTP request per command, over the control socket or TCP, and prints the answer as
//! aligned text, or as the server's JSON with `--json`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use hyper::Method;
use serde_json::{Value, json};
use strata::control_client::{ControlTarget as Target, encode};
use strata::size::format_size;
use strata::{Error, ErrorKind};

use super::output::{Table, duration, fields, timestamp};

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
        format: Format,
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
    /// Take a snapshot of an export.
    Snapshot {
        /// Export name.
        export: String,
        /// Snapshot name.
        name: String,
    },
    /// Delete a snapshot, keeping what it holds in the layer above.
    DeleteSnapshot {
        /// Export name.
        export: String,
        /// Snapshot name.
        name: String,
    },
    /// Return an export's disk to a snapshot's contents.
    Rollback {
        /// Export name.
        export: String,
        /// Snapshot name.
        name: String,
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
    /// The ranges of an export written since a snapshot.
    Dirty {
        /// Export name.
        export: String,
        /// Snapshot name.
        #[arg(long, value_name = "SNAPSHOT")]
        since: String,
    },
}

/// `add --format`
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// Strata image if the file has the Strata signature, raw otherwise.
    Auto,
    /// The file's bytes as they are.
    Raw,
    /// A Strata image.
    Strata,
}

impl Format {
    fn as_str(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Raw => "raw",
            Format::Strata => "strata",
        }
    }
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
    let target = target_from_args(&args)?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    let (method, path, body) = request_for(&args.command, &target)?;
    let answer = tokio::time::timeout(timeout, target.call(method, &path, body))
        .await
        .map_err(|_| {
            Error::msg(
                ErrorKind::Io,
                format!("no answer from the control API at {target} within {timeout:?}"),
            )
        })??;
    if args.json {
        println!("{}", String::from_utf8_lossy(&answer).trim_end());
        return Ok(ExitCode::SUCCESS);
    }
    let value: Value = serde_json::from_slice(&answer).map_err(|e| {
        Error::msg(
            ErrorKind::Io,
            format!("the server's answer is not JSON: {e}"),
        )
    })?;
    print!("{}", render(&args.command, &value));
    Ok(ExitCode::SUCCESS)
}

/// The HTTP request for a command.
fn request_for(
    command: &CtlCommand,
    target: &Target,
) -> strata::Result<(Method, String, Option<Value>)> {
    let export = |name: &str| format!("/v1/exports/{}", encode(name));
    Ok(match command {
        CtlCommand::Server => (Method::GET, "/v1/server".to_owned(), None),
        CtlCommand::Exports => (Method::GET, "/v1/exports".to_owned(), None),
        CtlCommand::Export { name } => (Method::GET, export(name), None),
        CtlCommand::Add {
            name,
            image,
            read_only,
            format,
            description,
        } => {
            // Over the socket the server runs on this machine: a relative path means
            // what it means here.
            let image = match target {
                Target::Unix(_) if !image.starts_with("memory:") => std::path::absolute(image)
                    .map_err(|e| Error::from(e).with_path(image))?
                    .to_string_lossy()
                    .into_owned(),
                _ => image.clone(),
            };
            let mut body = json!({
                "name": name,
                "image": image,
                "read_only": read_only,
                "format": format.as_str(),
            });
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            (Method::POST, "/v1/exports".to_owned(), Some(body))
        }
        CtlCommand::Remove { name, force } => (
            Method::DELETE,
            format!("{}?force={force}", export(name)),
            None,
        ),
        CtlCommand::Snapshots { export: e } => {
            (Method::GET, format!("{}/snapshots", export(e)), None)
        }
        CtlCommand::Snapshot { export: e, name } => (
            Method::POST,
            format!("{}/snapshots", export(e)),
            Some(json!({ "name": name })),
        ),
        CtlCommand::DeleteSnapshot { export: e, name } => (
            Method::DELETE,
            format!("{}/snapshots/{}", export(e), encode(name)),
            None,
        ),
        CtlCommand::Rollback {
            export: e,
            name,
            force,
            destroy_newer,
        } => (
            Method::POST,
            format!("{}/rollback", export(e)),
            Some(json!({ "snapshot": name, "force": force, "destroy_newer": destroy_newer })),
        ),
        CtlCommand::ServeSnapshot {
            export: e,
            name,
            as_name,
        } => {
            let body = match as_name {
                Some(n) => json!({ "name": n }),
                None => json!({}),
            };
            (
                Method::POST,
                format!("{}/snapshots/{}/export", export(e), encode(name)),
                Some(body),
            )
        }
        CtlCommand::Dirty { export: e, since } => (
            Method::GET,
            format!("{}/dirty?since={}", export(e), encode(since)),
            None,
        ),
    })
}

// ---------------------------------------------------------------------------------------
// Text output
// ---------------------------------------------------------------------------------------

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(other) => other.to_string(),
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn mode(export: &Value) -> &'static str {
    if export.get("read_only").and_then(Value::as_bool) == Some(true) {
        "ro"
    } else {
        "rw"
    }
}

/// What an export serves, in a few words.
fn serves(export: &Value) -> String {
    if let Some(of) = export.get("snapshot_of").filter(|v| v.is_object()) {
        return format!(
            "snapshot {} of {}",
            text(of, "snapshot"),
            text(of, "export")
        );
    }
    match (
        export.get("image").and_then(Value::as_str),
        text(export, "kind").as_str(),
    ) {
        (Some(path), _) => path.to_owned(),
        (None, "memory") => "memory".to_owned(),
        (None, _) => "-".to_owned(),
    }
}

fn render_export(e: &Value) -> String {
    let stats = e.get("stats").cloned().unwrap_or_default();
    let size = num(e, "size");
    let counted = |count: &str, bytes: &str| {
        format!(
            "{} ({})",
            num(&stats, count),
            format_size(num(&stats, bytes))
        )
    };
    fields(&[
        ("name", text(e, "name")),
        ("kind", text(e, "kind")),
        ("serves", serves(e)),
        ("size", format!("{} ({size} bytes)", format_size(size))),
        (
            "mode",
            if mode(e) == "ro" {
                "read-only"
            } else {
                "read-write"
            }
            .to_owned(),
        ),
        (
            "description",
            Some(text(e, "description"))
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "-".to_owned()),
        ),
        (
            "connections",
            format!(
                "{} now, {} in all",
                num(&stats, "connections"),
                num(&stats, "total_connections")
            ),
        ),
        ("reads", counted("reads", "bytes_read")),
        ("writes", counted("writes", "bytes_written")),
        ("flushes", num(&stats, "flushes").to_string()),
        ("trims", num(&stats, "trims").to_string()),
        ("zeroes", num(&stats, "zeroes").to_string()),
        ("block status", num(&stats, "block_status").to_string()),
        ("cache", num(&stats, "caches").to_string()),
        ("errors", num(&stats, "errors").to_string()),
    ])
}

fn render(command: &CtlCommand, v: &Value) -> String {
    match command {
        CtlCommand::Server => {
            let joined = |key: &str| {
                let items: Vec<String> = list(v, key)
                    .iter()
                    .filter_map(|a| a.as_str().map(str::to_owned))
                    .collect();
                if items.is_empty() {
                    "-".to_owned()
                } else {
                    items.join(", ")
                }
            };
            fields(&[
                ("version", text(v, "version")),
                ("uptime", duration(num(v, "uptime_s"))),
                ("listening on", joined("listen")),
                ("control API", joined("control")),
                (
                    "connections",
                    format!("{} of {}", num(v, "connections"), num(v, "max_connections")),
                ),
                ("exports", num(v, "exports").to_string()),
            ])
        }
        CtlCommand::Exports => {
            let rows = list(v, "exports")
                .iter()
                .map(|e| {
                    let stats = e.get("stats").cloned().unwrap_or_default();
                    vec![
                        text(e, "name"),
                        text(e, "kind"),
                        format_size(num(e, "size")),
                        mode(e).to_owned(),
                        num(&stats, "connections").to_string(),
                        num(&stats, "reads").to_string(),
                        num(&stats, "writes").to_string(),
                        num(&stats, "errors").to_string(),
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
        CtlCommand::Export { .. } | CtlCommand::Add { .. } => render_export(v),
        CtlCommand::ServeSnapshot { .. } => format!(
            "serving {} read-only as export {}\n",
            serves(v),
            text(v, "name")
        ),
        CtlCommand::Remove { .. } => {
            let n = num(v, "disconnected");
            let clients = if n == 1 { "client" } else { "clients" };
            format!(
                "removed export {} ({n} {clients} disconnected)\n",
                text(v, "removed")
            )
        }
        CtlCommand::Snapshots { .. } => {
            let rows = list(v, "snapshots")
                .iter()
                .map(|s| {
                    vec![
                        text(s, "name"),
                        timestamp(num(s, "created")),
                        format_size(num(s, "allocated")),
                        text(s, "exported_as"),
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
        CtlCommand::Snapshot { export, .. } => {
            let snap = v.get("snapshot").cloned().unwrap_or_default();
            format!(
                "snapshot {} of {export} taken; requests waited {} us\n",
                text(&snap, "name"),
                num(v, "pause_us")
            )
        }
        CtlCommand::DeleteSnapshot { export, name } => format!(
            "snapshot {name} of {export} deleted; {} merged into the layer above\n",
            format_size(num(v, "copied"))
        ),
        CtlCommand::Rollback { export, name, .. } => {
            format!("export {export} rolled back to snapshot {name}\n")
        }
        CtlCommand::Dirty { since, .. } => {
            let ranges = list(v, "ranges");
            let rows = ranges
                .iter()
                .map(|r| vec![num(r, "offset").to_string(), num(r, "length").to_string()])
                .collect();
            let mut out = Table {
                headers: &["OFFSET", "LENGTH"],
                numeric: &[true, true],
                rows,
            }
            .render();
            let _ = write!(
                out,
                "{} range(s), {} written since {since}",
                ranges.len(),
                format_size(num(v, "bytes"))
            );
            if let Some(cs) = v.get("cluster_size").and_then(Value::as_u64) {
                let _ = write!(out, " (in clusters of {})", format_size(cs));
            }
            out.push('\n');
            out
        }
    }
}
