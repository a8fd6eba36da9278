//! Transmission-phase requests: the 28-byte compact and 32-byte extended headers.

use bytes::{Buf, BufMut};

use super::ProtocolError;
use super::consts::{EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC, cmd, cmd_flags};

/// A command as named by the request's type field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`
    Read,
    /// `NBD_CMD_WRITE`
    Write,
    /// `NBD_CMD_DISC`
    Disconnect,
    /// `NBD_CMD_FLUSH`
    Flush,
    /// `NBD_CMD_TRIM`
    Trim,
    /// `NBD_CMD_CACHE`
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`
    BlockStatus,
    /// `NBD_CMD_RESIZE` (recognised, not supported)
    Resize,
    /// Anything else.
    Unknown(u16),
}

impl Command {
    /// Interprets a wire type.
    pub fn from_wire(value: u16) -> Self {
        match value {
            cmd::READ => Command::Read,
            cmd::WRITE => Command::Write,
            cmd::DISC => Command::Disconnect,
            cmd::FLUSH => Command::Flush,
            cmd::TRIM => Command::Trim,
            cmd::CACHE => Command::Cache,
            cmd::WRITE_ZEROES => Command::WriteZeroes,
            cmd::BLOCK_STATUS => Command::BlockStatus,
            cmd::RESIZE => Command::Resize,
            other => Command::Unknown(other),
        }
    }

    /// The wire type.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => cmd::READ,
            Command::Write => cmd::WRITE,
            Command::Disconnect => cmd::DISC,
            Command::Flush => cmd::FLUSH,
            Command::Trim => cmd::TRIM,
            Command::Cache => cmd::CACHE,
            Command::WriteZeroes => cmd::WRITE_ZEROES,
            Command::BlockStatus => cmd::BLOCK_STATUS,
            Command::Resize => cmd::RESIZE,
            Command::Unknown(v) => v,
        }
    }

    /// True for commands that change the export's contents.
    pub fn modifies(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }

    /// A short lowercase name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disconnect => "disconnect",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::Cache => "cache",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
            Command::Resize => "resize",
            Command::Unknown(_) => "unknown",
        }
    }
}

/// A decoded request header. The payload of a write follows it on the wire and is not part
/// of this struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Raw command flags (`NBD_CMD_FLAG_*`), validated later.
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque value echoed in the reply (the spec's "handle").
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Byte count (or, with `PAYLOAD_LEN`, the payload length). 64 bits with extended
    /// headers, otherwise at most `u32::MAX`.
    pub length: u64,
}

impl RequestHeader {
    /// Size of the compact header on the wire.
    pub const COMPACT_LEN: usize = 28;
    /// Size of the extended header on the wire.
    pub const EXTENDED_LEN: usize = 32;

    /// Header size for the negotiated header style.
    pub fn wire_len(extended: bool) -> usize {
        if extended {
            Self::EXTENDED_LEN
        } else {
            Self::COMPACT_LEN
        }
    }

    /// Number of payload bytes that follow this header on the wire.
    ///
    /// Writes always carry `length` bytes. With extended headers a client may also attach a
    /// payload to other commands by setting `PAYLOAD_LEN`; that payload must be consumed
    /// even when the command is then refused, or the stream loses its framing.
    pub fn payload_len(&self, extended: bool) -> u64 {
        let flagged = extended && self.flags & cmd_flags::PAYLOAD_LEN != 0;
        if self.command == Command::Write || flagged {
            self.length
        } else {
            0
        }
    }

    /// Decodes one header from the front of `src`, consuming it.
    ///
    /// Returns `Ok(None)` (consuming nothing) while fewer bytes than a header are available,
    /// and an error when the magic does not match the negotiated header style.
    pub fn decode(src: &mut impl Buf, extended: bool) -> Result<Option<Self>, ProtocolError> {
        let need = Self::wire_len(extended);
        if src.remaining() < need {
            return Ok(None);
        }
        let magic = src.get_u32();
        let expected = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != expected {
            return Err(ProtocolError::BadRequestMagic(magic));
        }
        let flags = src.get_u16();
        let command = Command::from_wire(src.get_u16());
        let cookie = src.get_u64();
        let offset = src.get_u64();
        let length = if extended {
            src.get_u64()
        } else {
            u64::from(src.get_u32())
        };
        Ok(Some(RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        }))
    }

    /// Encodes the header (the client's side; used by tests, fuzzers and tools).
    ///
    /// # Panics
    /// With compact headers, when `length` does not fit in 32 bits.
    pub fn encode(&self, dst: &mut impl BufMut, extended: bool) {
        if extended {
            dst.put_u32(EXTENDED_REQUEST_MAGIC);
        } else {
            dst.put_u32(REQUEST_MAGIC);
        }
        dst.put_u16(self.flags);
        dst.put_u16(self.command.to_wire());
        dst.put_u64(self.cookie);
        dst.put_u64(self.offset);
        if extended {
            dst.put_u64(self.length);
        } else {
            let len = u32::try_from(self.length).expect("compact request length fits u32");
            dst.put_u32(len);
        }
    }
}
