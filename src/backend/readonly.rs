//! A layer that refuses every modification of the backend below it.

use bytes::Bytes;

use super::{Capabilities, Filter, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};

/// Wraps a backend so that it is exported read-only. The protocol layer already refuses
/// writes to read-only exports with `EPERM`; this layer makes the guarantee hold for any
/// other caller too.
#[derive(Debug)]
pub struct ReadOnly<B> {
    inner: B,
}

impl<B> ReadOnly<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        ReadOnly { inner }
    }
}

fn refused(op: &'static str) -> Error {
    Error::msg(ErrorKind::ReadOnly, "export is read-only").with_op(op)
}

impl<B: super::Backend> Filter for ReadOnly<B> {
    type Inner = B;

    fn inner(&self) -> &B {
        &self.inner
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            flush: false,
            fua: false,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            ..self.inner.capabilities()
        }
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<()> {
        Err(refused("write"))
    }

    /// Nothing was written through this layer, so there is nothing to make durable; a
    /// flush does not reach the backend below.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> Result<()> {
        Err(refused("trim"))
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        Err(refused("write_zeroes"))
    }
}
