//! The control API through the real HTTP stack: a `strata serve` child with a control
//! socket (and, for some tests, a TCP control listener with a token), driven by a small
//! HTTP/1.1 client written here from the protocol's text format, by `strata ctl`, and by
//! NBD clients whose I/O the counters must show. By theme: exports and their counters,
//! added and removed at run time (`exports`), `strata ctl` (`ctl`), malformed requests
//! and unknown routes and exports (`errors`), the control listeners (`listeners`), and
//! what the API itself promises around snapshots (`snapshots`: which exports have them,
//! name checks). Snapshots themselves, through the API and `strata ctl`, are tested in
//! snapshot_online.rs.

mod ctl;
mod errors;
mod exports;
mod listeners;
mod snapshots;

use std::path::{Path, PathBuf};

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

fn export_arg(name: &str, image: &Path) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from(format!("{name}="));
    arg.push(image);
    arg
}
