//! Volumes with history served by `strata serve` to real clients. A volume is made with
//! `strata create --history`; clients write through NBD (the tests' own client, and
//! qemu-io); restore points are then read back through the library and copied out with
//! `strata convert --at` for qemu-img to compare.
//!
//! - `stream`: a recorded write stream with over a thousand flushes; every restore
//!   point reads what a replay of the stream up to it gives.
//! - `kill`: a hundred `kill -9` rounds under load, each followed by the prefix check.
//! - `clients`: qemu-io and qemu-img against a served volume and its points.

mod check;
mod clients;
mod enable;
mod kill;
mod stream;

use std::path::{Path, PathBuf};

use strata::history::History;

use crate::support::client::{Client, STRUCTURED};
use crate::support::{Server, file, images_open, strata_at_ok};

/// A new volume with history of `size` bytes at `dir/vol`.
fn volume(dir: &Path, size: &str) -> PathBuf {
    strata_at_ok(dir, &["create", "vol", "--size", size, "--history", "1h"]);
    dir.join("vol")
}

/// `strata serve` on the volume, and a client in transmission.
fn serve(vol: &Path) -> (Server, Client) {
    let server = file(vol).name("vol").start();
    let mut c = Client::connect(server.endpoint()).unwrap();
    c.handshake("vol", STRUCTURED).unwrap();
    (server, c)
}

/// Opens the volume in this process (read-only, no lock), holding the guard that keeps
/// other tests' children from inheriting its files.
fn inspect(vol: &Path) -> (History, impl Drop) {
    let guard = images_open();
    (History::inspect(vol).unwrap(), guard)
}
