//! One error type for the whole crate.
//!
//! Callers match on [`ErrorKind`]; the rest (operation, offset, path, cause) is context for
//! humans and logs. The NBD wire code for an error is derived from its kind in exactly one
//! place, `proto::errno_for`; its HTTP status for the control API in one place too.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarse enough to match on and to map onto an NBD errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request or argument is malformed or out of range (`EINVAL`).
    InvalidInput,
    /// A write would go past the end of the device, or the host is out of space (`ENOSPC`).
    NoSpace,
    /// The target refuses modification: a read-only export, volume or file system
    /// (`EPERM`).
    ReadOnly,
    /// The operating system refused access to a file or device (`EACCES`, `EPERM`)
    /// (`EPERM`).
    PermissionDenied,
    /// The operation, or one of its flags, is not available here (`ENOTSUP`).
    NotSupported,
    /// Memory could not be obtained (`ENOMEM`).
    NoMemory,
    /// A value does not fit the reply format (`EOVERFLOW`).
    Overflow,
    /// The server is shutting down (`ESHUTDOWN`).
    Shutdown,
    /// A lower layer failed to read or write (`EIO`).
    Io,
    /// On-disk metadata is inconsistent: a bad checksum, a truncated file, a mapping that
    /// points outside the file (`EIO`).
    Corrupt,
    /// The file is locked by another user: a server or tool already has it open, or the
    /// object is in use (clients connected, a snapshot served) (`EIO`).
    Busy,
    /// A named object (export, snapshot) does not exist (`EINVAL`).
    NotFound,
    /// A named object (export, snapshot) exists already (`EINVAL`).
    AlreadyExists,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid argument",
            ErrorKind::NoSpace => "no space left",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::NotSupported => "not supported",
            ErrorKind::NoMemory => "out of memory",
            ErrorKind::Overflow => "value too large",
            ErrorKind::Shutdown => "shutting down",
            ErrorKind::Io => "I/O error",
            ErrorKind::Corrupt => "image is corrupt",
            ErrorKind::Busy => "in use",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
        }
    }
}

/// Where the error happened: the operation, and when known the byte range and the file.
#[derive(Debug, Default, Clone)]
struct Context {
    op: Option<&'static str>,
    offset: Option<u64>,
    len: Option<u64>,
    path: Option<PathBuf>,
    message: Option<String>,
}

/// The crate's error: a kind, optional context, and an optional underlying cause.
pub struct Error {
    kind: ErrorKind,
    context: Box<Context>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// An error of `kind` with no further detail.
    pub fn new(kind: ErrorKind) -> Self {
        Error {
            kind,
            context: Box::default(),
            source: None,
        }
    }

    /// An error of `kind` with a human-readable message.
    pub fn msg(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::new(kind).with_message(message)
    }

    /// The kind, for matching and errno mapping.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Names the operation that failed (`"read"`, `"flush"`, ...).
    #[must_use]
    pub fn with_op(mut self, op: &'static str) -> Self {
        self.context.op = Some(op);
        self
    }

    /// Records the byte range the failing operation covered.
    #[must_use]
    pub fn with_range(mut self, offset: u64, len: u64) -> Self {
        self.context.offset = Some(offset);
        self.context.len = Some(len);
        self
    }

    /// Records the file involved.
    #[must_use]
    pub fn with_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.context.path = Some(path.into());
        self
    }

    /// Replaces the human-readable message.
    #[must_use]
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.context.message = Some(message.into());
        self
    }

    /// Attaches the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The offset the failing operation started at, when known.
    pub fn offset(&self) -> Option<u64> {
        self.context.offset
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(op) = self.context.op {
            write!(f, "{op}: ")?;
        }
        match (&self.context.message, &self.context.path, &self.source) {
            (Some(m), Some(path), _) => write!(f, "{m} ({})", path.display())?,
            (Some(m), None, _) => f.write_str(m)?,
            // The cause says what went wrong; the kind would only repeat it vaguely.
            (None, Some(path), Some(_)) => write!(f, "{}", path.display())?,
            (None, Some(path), None) => write!(f, "{} ({})", self.kind.describe(), path.display())?,
            (None, None, _) => f.write_str(self.kind.describe())?,
        }
        if let (Some(off), Some(len)) = (self.context.offset, self.context.len) {
            write!(f, " at offset {off}, length {len}")?;
        }
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({:?}: {self})", self.kind)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ErrorKind::NoSpace,
            Some(libc::EROFS) => ErrorKind::ReadOnly,
            Some(libc::EPERM | libc::EACCES) => ErrorKind::PermissionDenied,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => ErrorKind::NotSupported,
            Some(libc::ENOMEM) => ErrorKind::NoMemory,
            Some(libc::EINVAL) => ErrorKind::InvalidInput,
            Some(libc::EOVERFLOW) => ErrorKind::Overflow,
            _ => match err.kind() {
                io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
                io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::Unsupported => ErrorKind::NotSupported,
                io::ErrorKind::OutOfMemory => ErrorKind::NoMemory,
                _ => ErrorKind::Io,
            },
        };
        Error::new(kind).with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_kinds() {
        let e: Error = io::Error::from_raw_os_error(libc::ENOSPC).into();
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        let e: Error = io::Error::from_raw_os_error(libc::EIO).into();
        assert_eq!(e.kind(), ErrorKind::Io);
        let e: Error = io::Error::from_raw_os_error(libc::EROFS).into();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        let e: Error = io::Error::from_raw_os_error(libc::EACCES).into();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        let e: Error = io::Error::from_raw_os_error(libc::EPERM).into();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        let e: Error = io::Error::from_raw_os_error(libc::ENOENT).into();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e: Error = io::Error::from(io::ErrorKind::NotFound).into();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn display_carries_context() {
        let e = Error::msg(ErrorKind::Io, "disk on fire")
            .with_op("write")
            .with_range(4096, 512)
            .with_path("/tmp/x.img");
        let s = e.to_string();
        assert_eq!(
            s,
            "write: disk on fire (/tmp/x.img) at offset 4096, length 512"
        );
    }
}
