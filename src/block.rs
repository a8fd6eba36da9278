//! The answers a disk gives about its blocks, shared by the image engine and the
//! backends.
//!
//! They live apart from both, in a module that imports neither, so that the engine can
//! return them directly without depending on the backends that serve it; a backend hands
//! them on unchanged to the session, which encodes them for the wire.

use bytes::Bytes;

/// Allocation state of a range, as `base:allocation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never zero).
    pub length: u64,
    /// The range is not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// The range reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    /// An allocated range holding data.
    pub fn data(length: u64) -> Self {
        Extent {
            length,
            hole: false,
            zero: false,
        }
    }

    /// An unallocated range that reads as zeroes.
    pub fn hole(length: u64) -> Self {
        Extent {
            length,
            hole: true,
            zero: true,
        }
    }

    /// An allocated range known to read as zeroes.
    pub fn zero(length: u64) -> Self {
        Extent {
            length,
            hole: false,
            zero: true,
        }
    }
}

/// Which layer of a backing chain provides a range, as `qemu:allocation-depth` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthExtent {
    /// Length in bytes (never zero).
    pub length: u64,
    /// 0: no layer holds the range (it reads as zeroes); 1: the top layer holds it; 2: the
    /// layer below, and so on down the chain.
    pub depth: u32,
}

/// Whether a range changed since a snapshot, as `qemu:dirty-bitmap:NAME` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyExtent {
    /// Length in bytes (never zero).
    pub length: u64,
    /// Written since the snapshot.
    pub dirty: bool,
}

/// A piece of a sparse read: bytes, or a run of zeroes that need not be sent.
#[derive(Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// Data as stored.
    Data(Bytes),
    /// This many bytes read as zero.
    Zero(u64),
}

impl ReadChunk {
    /// Number of bytes this chunk covers.
    pub fn len(&self) -> u64 {
        match self {
            ReadChunk::Data(b) => b.len() as u64,
            ReadChunk::Zero(n) => *n,
        }
    }

    /// True when the chunk covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for ReadChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadChunk::Data(b) => write!(f, "Data({} bytes)", b.len()),
            ReadChunk::Zero(n) => write!(f, "Zero({n})"),
        }
    }
}
