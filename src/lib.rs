//! Strata: a fast NBD (Network Block Device) server for VM storage.
//!
//! PLACEHOLDER crate doc; expanded below once the layers land.

pub mod backend;
pub mod error;
pub mod proto;
pub mod server;
pub mod size;

pub use error::{Error, ErrorKind, Result};
