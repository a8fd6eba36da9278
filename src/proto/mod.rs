//! The NBD protocol, without I/O.
//!
//! Everything here is pure: bytes in, bytes and decisions out. No sockets, no clocks, no
//! tokio, so it can be fuzzed and property-tested in isolation.
//!
//! - [`consts`]: the numbers the specification fixes.
//! - [`handshake`]: the fixed-newstyle negotiation state machine.
//! - [`request`]: request headers (compact and extended).
//! - [`reply`]: simple replies and structured/extended chunks.
//! - [`extents`]: a backend's extents turned into the block-status descriptors sent.
//! - [`validate()`]: the single place a request is checked before it runs.
//! - [`errno_for`]: the single place an [`ErrorKind`] becomes a wire error.

use std::fmt;

use crate::error::ErrorKind;

pub mod consts;
pub mod extents;
pub mod handshake;
pub mod reply;
pub mod request;
pub mod validate;

pub use extents::{MAX_EXTENTS, StatusExtent, normalize_extents};
pub use handshake::{
    BlockSizes, ExportCatalog, ExportInfo, ExportSummary, HandshakeConfig, MetaContext, Negotiated,
    Progress, ServerHandshake, TlsPolicy,
};
pub use reply::{ChunkTarget, Descriptor, ReplyHeader, ReplyMode};
pub use request::{Command, RequestHeader};
pub use validate::{Limits, Refusal, validate};

/// A violation of the protocol that ends the connection (as opposed to a request error,
/// which is answered and leaves the connection open).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The client set client flags the server does not know.
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    BadOptionMagic(u64),
    /// An `EXPORT_NAME` option was malformed.
    BadOption(String),
    /// `EXPORT_NAME` named an export that does not exist (no error reply is possible).
    UnknownExport(String),
    /// `EXPORT_NAME` before the required TLS upgrade.
    TlsRequired,
    /// TLS is required, but the client did not set fixed newstyle, without which TLS
    /// cannot be negotiated.
    TlsNeedsFixedNewstyle,
    /// An option whose data cannot be skipped safely.
    OptionTooLarge(u32),
    /// Input after the handshake ended.
    HandshakeFinished,
    /// The client sent more data right behind `STARTTLS`, before the TLS handshake.
    DataAfterStartTls,
    /// A request did not start with the negotiated request magic.
    BadRequestMagic(u32),
    /// A request announced a payload too large to skip.
    PayloadTooLarge(u64),
    /// A reply did not start with a magic valid in the negotiated mode.
    BadReplyMagic(u32),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::BadClientFlags(x) => write!(f, "unknown client flags {x:#x}"),
            ProtocolError::BadOptionMagic(x) => write!(f, "bad option magic {x:#018x}"),
            ProtocolError::BadOption(m) => write!(f, "malformed option: {m}"),
            ProtocolError::UnknownExport(n) => write!(f, "no export named {n:?}"),
            ProtocolError::TlsRequired => write!(f, "TLS is required before choosing an export"),
            ProtocolError::TlsNeedsFixedNewstyle => write!(
                f,
                "TLS is required, and a client without fixed newstyle cannot start it"
            ),
            ProtocolError::OptionTooLarge(n) => write!(f, "option of {n} bytes is too large"),
            ProtocolError::HandshakeFinished => write!(f, "handshake already finished"),
            ProtocolError::DataAfterStartTls => {
                write!(
                    f,
                    "plaintext data sent after STARTTLS before the TLS handshake"
                )
            }
            ProtocolError::BadRequestMagic(x) => write!(f, "bad request magic {x:#010x}"),
            ProtocolError::PayloadTooLarge(n) => {
                write!(f, "request payload of {n} bytes is too large")
            }
            ProtocolError::BadReplyMagic(x) => write!(f, "bad reply magic {x:#010x}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Maps an error kind to the errno sent to the client. This is the only such mapping.
pub fn errno_for(kind: ErrorKind) -> u32 {
    use consts::errno;
    match kind {
        ErrorKind::InvalidInput | ErrorKind::NotFound | ErrorKind::AlreadyExists => errno::EINVAL,
        ErrorKind::NoSpace => errno::ENOSPC,
        ErrorKind::ReadOnly | ErrorKind::PermissionDenied => errno::EPERM,
        ErrorKind::NotSupported => errno::ENOTSUP,
        ErrorKind::NoMemory => errno::ENOMEM,
        ErrorKind::Overflow => errno::EOVERFLOW,
        ErrorKind::Shutdown => errno::ESHUTDOWN,
        _ => errno::EIO,
    }
}
