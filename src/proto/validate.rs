//! Checks a request against what was negotiated, once, before any backend sees it.

use super::consts::{cmd_flags, errno, transmission_flags as tf};
use super::request::{Command, RequestHeader};

/// The facts about a connection that decide whether a request is acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Largest read or write payload.
    pub max_payload: u32,
    /// Structured replies are on.
    pub structured: bool,
    /// Extended headers are on.
    pub extended: bool,
    /// At least one metadata context is selected.
    pub has_contexts: bool,
}

/// Why a request is refused: the errno for the reply and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// NBD error number.
    pub errno: u32,
    /// Explanation, sent in structured error chunks and logged.
    pub message: String,
}

fn refuse(errno: u32, message: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        message: message.into(),
    }
}

/// Flags each command accepts, beyond `FUA`, which every command tolerates.
fn allowed_flags(command: Command, limits: &Limits) -> u16 {
    let mut allowed = cmd_flags::FUA;
    if limits.extended && command == Command::Write {
        allowed |= cmd_flags::PAYLOAD_LEN;
    }
    match command {
        Command::Read if limits.structured => allowed | cmd_flags::DF,
        Command::WriteZeroes if limits.flags & tf::SEND_FAST_ZERO != 0 => {
            allowed | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO
        }
        Command::WriteZeroes => allowed | cmd_flags::NO_HOLE,
        Command::BlockStatus => allowed | cmd_flags::REQ_ONE,
        _ => allowed,
    }
}

/// Validates `req` against `limits`. `Ok` means a backend may run it as is.
pub fn validate(req: &RequestHeader, limits: &Limits) -> Result<(), Refusal> {
    let command = req.command;
    let modifies = command.modifies();
    if modifies && limits.flags & tf::READ_ONLY != 0 {
        return Err(refuse(errno::EPERM, "export is read-only"));
    }
    let needs_flag = |flag: u16, what: &str| {
        if limits.flags & flag == 0 {
            Err(refuse(
                errno::EINVAL,
                format!("{what} is not supported by this export"),
            ))
        } else {
            Ok(())
        }
    };
    match command {
        Command::Unknown(t) => return Err(refuse(errno::EINVAL, format!("unknown command {t}"))),
        Command::Resize => return Err(refuse(errno::EINVAL, "resize is not supported")),
        Command::Disconnect => return Ok(()),
        Command::Flush => needs_flag(tf::SEND_FLUSH, "flush")?,
        Command::Trim => needs_flag(tf::SEND_TRIM, "trim")?,
        Command::WriteZeroes => needs_flag(tf::SEND_WRITE_ZEROES, "write zeroes")?,
        Command::Cache => needs_flag(tf::SEND_CACHE, "cache")?,
        Command::BlockStatus if !limits.has_contexts => {
            return Err(refuse(
                errno::EINVAL,
                "block status needs a metadata context selected during negotiation",
            ));
        }
        Command::Read | Command::Write | Command::BlockStatus => {}
    }

    let unknown = req.flags & !allowed_flags(command, limits);
    if unknown != 0 {
        return Err(refuse(
            errno::EINVAL,
            format!("flags {unknown:#x} are not valid for {}", command.name()),
        ));
    }

    if command == Command::Flush {
        return Ok(());
    }
    if matches!(command, Command::Read | Command::Write)
        && req.length > u64::from(limits.max_payload)
    {
        return Err(refuse(
            errno::EINVAL,
            format!(
                "{} of {} bytes exceeds the maximum of {} bytes",
                command.name(),
                req.length,
                limits.max_payload
            ),
        ));
    }
    if command == Command::BlockStatus && req.length == 0 {
        return Err(refuse(errno::EINVAL, "block status of zero bytes"));
    }
    let end = req.offset.checked_add(req.length);
    if end.is_none_or(|end| end > limits.size) {
        // The spec asks for ENOSPC from writes (and write zeroes) past the end, but EINVAL
        // from reads and trims.
        let errno = if matches!(command, Command::Write | Command::WriteZeroes) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        return Err(refuse(
            errno,
            format!(
                "{} at offset {} length {} goes past the end of the export ({} bytes)",
                command.name(),
                req.offset,
                req.length,
                limits.size
            ),
        ));
    }
    Ok(())
}
