//! Volumes with history: every write a client made durable is a restore point.
//!
//! A volume with history is a directory: a manifest, a log of segments holding every
//! write, checkpoints of the block index, and a base image for what was never written.
//! Writes go to the log rather than over older data, so the disk at any restore point
//! kept is still there to be read, served or rolled back to. See docs/format.md
//! ("Volumes with history") for the bytes and docs/history.md for the behaviour.
//!
//! - [`record`]: the bytes of segments and records, pure.
//! - [`index`]: which version of each block a point reads, pure and property-tested.
//! - [`log`]: appending records and group commit; [`replay`]: reading them back.
//! - [`checkpoint`], [`manifest`]: the index and the volume's settings at rest.
//! - [`engine`], [`io`], [`retention`]: the volume: open, data path, points over time.
//! - [`clone`]: a new volume that starts as another's disk at a restore point.
//! - [`files`]: where the files live (a directory, or a simulated one for crash tests).

pub mod check;
pub mod checkpoint;
pub mod clone;
mod copy;
pub mod enable;
pub mod engine;
pub mod files;
pub mod index;
pub mod io;
pub mod log;
pub mod manifest;
pub mod point;
mod ranges;
pub mod reclaim;
pub mod record;
pub mod replay;
pub mod retention;

pub use engine::{CreateHistory, History, Recovery, is_volume};
pub use point::{Point, PointKind, PointSpec};
pub use retention::{Expired, PointView};
