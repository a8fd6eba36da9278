//! The control API through the real HTTP stack: a `strata serve` child with a control
//! socket (and, for some tests, a TCP control listener with a token), driven by a small
//! HTTP/1.1 client written here from the protocol's text format, by `strata ctl`, and by
//! NBD clients whose I/O the counters must show. By theme: exports and their counters,
//! added and removed at run time (`exports`), `strata ctl` (`ctl`), malformed requests
//! and unknown routes and exports (`errors`), the control listeners (`listeners`), and
//! what the API itself promises around snapshots (`snapshots`: which exports have them,
//! name checks). Snapshots themselves, through the API and `strata ctl`, are tested in
//! snapshot_online.rs; restore points of volumes with history, through both, in
//! `history`.

mod ctl;
mod errors;
mod exports;
mod history;
mod history_clients;
mod listeners;
mod snapshots;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::support::control::Running;
use crate::support::{run_ok, strata};

fn raw_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn strata_image(dir: &Path, name: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    run_ok(strata().args(["create", "--size", size]).arg(&path));
    path
}

fn export_arg(name: &str, image: &Path) -> OsString {
    let mut arg = OsString::from(format!("{name}="));
    arg.push(image);
    arg
}

/// A server with a control socket that serves a 1 MiB raw file, `NAME.img` in a scratch
/// directory, as export `name`, then takes the `more` arguments (other exports,
/// options). Returns the directory, the file and the server.
fn serve_raw(name: &str, more: &[&str]) -> (TempDir, PathBuf, Running) {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_image(dir.path(), &format!("{name}.img"), 1 << 20);
    let mut args = vec![OsString::from("--export"), export_arg(name, &raw)];
    args.extend(more.iter().map(OsString::from));
    let server = Running::serve(&args.iter().map(OsString::as_os_str).collect::<Vec<_>>());
    (dir, raw, server)
}
