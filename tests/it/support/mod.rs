//! What the integration tests share: the server under test (strata, or nbdkit when
//! `STRATA_TEST_SERVER=nbdkit`) on a loopback TCP port or a Unix socket, stopped on
//! drop; external tools run with a time limit, their output shown when they fail; the
//! decision whether a missing tool skips a test or fails it; a raw NBD client and the
//! protocol's numbers and message layouts, written from the specification; an
//! in-process server; the control API's HTTP client; the codec tests' handshake driver.
//!
//! Environment:
//! - `STRATA_TEST_SERVER`: `strata` (default) or `nbdkit`. nbdkit is a reference server
//!   used to check the tests' own logic; tests of strata-only behaviour skip under it.
//! - `CI=true`: a missing external tool is a test failure, never a skip.
//! - `STRATA_TEST_NBDKIT_FILTERS`: extra nbdkit filters (space-separated), to check that
//!   the tests catch a server that misbehaves (`noextents`, `nozero`, ...).
//! - `STRATA_TEST_LOG`: passed to strata as `RUST_LOG` (e.g. `debug`).
//! - `STRATA_TEST_SHOW_LOG=1`: print the server's output after every test, not only
//!   after failures (with `--nocapture` to see it).

pub mod client;
pub mod codec;
pub mod control;
pub mod daemon;
mod data;
mod env;
mod forks;
pub mod in_process;
mod maps;
mod process;
mod server;
pub mod spec;
mod tools;
pub mod wire;

use std::time::Duration;

pub use data::*;
pub use env::*;
pub use forks::*;
pub use maps::*;
pub use process::*;
pub use server::*;
pub use tools::*;

/// How long a server may take to start answering.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to exit after SIGTERM before it is killed.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit for one external command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Read/write timeout on sockets the tests open themselves.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
