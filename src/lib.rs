//! Strata: a fast NBD (Network Block Device) server for VM storage.
//!
//! Strata exports disks over the NBD protocol to any NBD client: qemu, libnbd tools, the
//! Linux kernel, and the client built into Apple's Virtualization.framework (macOS 14+).
//!
//! ```text
//!            clients (qemu, nbdcopy, Linux nbd, Virtualization.framework)
//!                                  │  TCP / Unix socket
//!   ┌──────────────────────────────▼───────────────────────────────┐
//!   │ server   listeners ─ slots ─ handshake driver ─ session      │  tokio, sockets
//!   │          TLS upgrade (rustls) · per-client export view       │  access rules
//!   ├──────────────────────────────────────────────────────────────┤
//!   │ proto    handshake state machine · request/reply codec ·     │  pure, no I/O
//!   │          validation · extents · errno mapping                │
//!   ├──────────────────────────────────────────────────────────────┤
//!   │ volume   an image export with online snapshots (Switchable)  │
//!   ├──────────────────────────────────────────────────────────────┤
//!   │ backend  Backend trait ─ Filter layers (ReadOnly, Faulty,    │
//!   │          Switchable) ─ RawBackend (file, block device) ·     │  storage
//!   │          MemoryBackend · ImageBackend ─┐                     │
//!   ├────────────────────────────────────────▼─────────────────────┤
//!   │ image    Strata images: format codec · merged map · engine   │  sparse, CoW
//!   │          top image ─ backing ─ … ─ raw base (any depth)      │  chains
//!   └──────────────────────────────────────────────────────────────┘
//!            block: the extents and read chunks both speak (a leaf)
//! ```
//!
//! A request crosses the layers once: the session decodes it with [`proto`], checks it
//! with [`proto::validate()`] (the only place requests are validated), runs it on the
//! export's [`backend::Backend`], and maps any failure to a wire errno with
//! [`proto::errno_for`] (the only place errors are mapped). Every module imports only
//! from the layers below its own (docs/architecture.md draws them; a test checks it).
//!
//! # Layout
//! - [`proto`]: the NBD protocol without I/O: constants, handshake, request and reply
//!   codecs, validation. Fuzzed and property-tested in isolation.
//! - [`server`]: listeners, connection limits (in total and per client), the handshake
//!   driver, the transmission session (concurrent requests, one reply writer, an idle
//!   timeout, memory bounded per connection and in total by [`server::budget`]),
//!   graceful shutdown, per-export counters and Prometheus metrics
//!   ([`server::metrics`]), and the HTTP/JSON control API ([`server::control`]).
//! - [`volume`]: Strata images with online snapshots, rollback and dirty ranges, served
//!   by the server and used offline by `strata snapshot`.
//! - [`backend`]: the [`backend::Backend`] trait, its object-safe twin, the raw, memory
//!   and image backends, and layers that pass what they do not change on to the backend
//!   below ([`backend::Filter`]): read-only, fault-injecting ([`backend::Faulty`]) and
//!   switchable.
//! - [`block`]: the extents and read chunks that the image engine and the backends both
//!   speak.
//! - [`image`]: the Strata image format: a pure header and map-page codec, the merged
//!   cluster map of a backing chain, the copy-on-write engine with its crash-safe commit
//!   order, the image tools (create, info, check, map, commit, rebase, convert), and
//!   snapshots as files of a chain ([`image::snapshot`]).
//! - [`access`]: who may use an export (client networks, certificate identities): pure
//!   rules the handshake driver applies before a client sees an export.
//! - [`config`]: the configuration of `strata serve` (a TOML file and the flags) as pure
//!   functions from text to a validated [`config::Config`], with errors that name the
//!   file, line, column and field.
//! - [`daemon`]: `strata serve` as a long-running service: the server built from a
//!   `Config`, reloads of its exports on `SIGHUP`, socket activation, readiness
//!   notifications and the pid file.
//! - [`vm`]: the VM launcher (`strata vm`): VM specs and bundles, checkpoints (machine
//!   state plus a disk snapshot), the QEMU driver and, on macOS, the
//!   Virtualization.framework driver.
//! - [`api`]: the control API's wire types (every request and answer body), shared by
//!   the server, `strata ctl` and the launcher, and its HTTP client ([`api::client`]).
//! - [`error`]: the crate's one error type.
//! - [`failpoint`]: named crash points for the crash tests (the `failpoints` feature).
//! - [`names`]: the rules for export, snapshot, VM and checkpoint names.
//! - [`size`]: parsing of human-friendly sizes.

pub mod access;
pub mod api;
pub mod backend;
pub mod block;
pub mod config;
pub mod daemon;
pub mod error;
pub mod failpoint;
pub mod history;
pub mod image;
pub mod mapping;
pub mod names;
pub mod proto;
pub mod server;
pub mod size;
mod sys;
pub mod time;
pub mod vm;
pub mod volume;

pub use error::{Error, ErrorKind, Result};
