//! Numbers fixed by the NBD protocol: magics, option and reply codes, flags, errnos.
//!
//! Names follow the specification with the `NBD_` prefix dropped.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, marks newstyle negotiation and prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Oldstyle `cliserv_magic`, recognised only to refuse it.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;

/// The TCP port assigned to NBD, where servers listen and clients connect by default.
pub const DEFAULT_PORT: u16 = 10809;

/// Compact (28-byte) request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended (32-byte) request header.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// 16-byte simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// 20-byte structured reply chunk header.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// 32-byte extended reply chunk header.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server, 16 bits).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag a client may set.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits), describing an export.
pub mod transmission_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The medium is rotational.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `CMD_FLAG_DF` is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent disk.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `CMD_RESIZE` is supported.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// `CMD_BLOCK_STATUS` accepts a payload (extended headers only).
    pub const BLOCK_STAT_PAYLOAD: u16 = 1 << 12;
}

/// Option codes sent by the client during the handshake.
pub mod opt {
    /// Pick an export and start transmission (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Withdrawn extension.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and start transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use 64-bit extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Success, no data.
    pub const ACK: u32 = 1;
    /// One export in a `LIST` answer.
    pub const SERVER: u32 = 2;
    /// One piece of export information.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// Not available on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// TLS must be negotiated first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// The client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// The option is larger than the server accepts.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
    /// Extended headers must be negotiated first.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR | 10;
}

/// Information types in `INFO`/`GO` requests and `REP_INFO` replies.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// Read data.
    pub const READ: u16 = 0;
    /// Write data.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Persist completed writes.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;
    /// Resize the export (not supported by Strata).
    pub const RESIZE: u16 = 8;
}

/// Command flags.
pub mod cmd_flags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Do not punch holes when zeroing.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Do not fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// One extent per context is enough.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail instead of zeroing slowly.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// The length field is a payload length (extended headers).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
    /// Every flag this server understands.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO | PAYLOAD_LEN;
}

/// Structured reply chunk flags.
pub mod reply_flags {
    /// Last chunk of this reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types.
pub mod reply_type {
    /// No payload; only meaningful with `DONE`.
    pub const NONE: u16 = 0;
    /// Offset followed by data.
    pub const OFFSET_DATA: u16 = 1;
    /// Offset and length of a run of zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// Compact block status (32-bit extents).
    pub const BLOCK_STATUS: u16 = 5;
    /// Extended block status (64-bit extents).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Error with message.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// Error with message and the offset it concerns.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// `base:allocation` extent flags.
pub mod state {
    /// Not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// Error numbers on the wire (Linux values, fixed by the protocol).
pub mod errno {
    /// Operation not permitted (writes to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// Name of the one metadata context defined by the protocol itself.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Name of qemu's metadata context reporting, per extent, which layer of a backing chain
/// provides the data: 0 for none (reads as zeroes), 1 for the top layer, 2 for the layer
/// below it, and so on. The whole 32-bit status value is the depth.
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Prefix of qemu's metadata contexts reporting, per extent, whether it changed since a
/// point in time (for Strata, a snapshot): `qemu:dirty-bitmap:NAME`. Status bit 0 set
/// means changed.
pub const QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// Status bit of a changed extent in a `qemu:dirty-bitmap:` context.
pub const STATE_DIRTY: u32 = 1;
