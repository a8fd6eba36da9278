//! Thin, safe wrappers around the Linux system calls the file-backed layers share.
//!
//! Built for another Unix (macOS, where the VM launcher runs), the Linux-only calls
//! (`fallocate`, the block-device ioctls, `preadv2`, `posix_fadvise`) report
//! `EOPNOTSUPP`, which the callers already treat as "not available here" and answer
//! with their honest fallbacks (zeroes written as data, reads that may block).

use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;

/// `BLKGETSIZE64` from `<linux/fs.h>`: device size in bytes.
#[cfg(target_os = "linux")]
const BLKGETSIZE64: libc::Ioctl = libc::_IOR::<libc::size_t>(0x12, 114);

/// `fallocate` modes (Linux values; elsewhere fallocate is never available).
pub(crate) mod falloc {
    #[cfg(target_os = "linux")]
    pub(crate) use libc::{
        FALLOC_FL_KEEP_SIZE as KEEP_SIZE, FALLOC_FL_PUNCH_HOLE as PUNCH_HOLE,
        FALLOC_FL_ZERO_RANGE as ZERO_RANGE,
    };
    #[cfg(not(target_os = "linux"))]
    pub(crate) const KEEP_SIZE: libc::c_int = 0x01;
    #[cfg(not(target_os = "linux"))]
    pub(crate) const PUNCH_HOLE: libc::c_int = 0x02;
    #[cfg(not(target_os = "linux"))]
    pub(crate) const ZERO_RANGE: libc::c_int = 0x10;
}

#[cfg(not(target_os = "linux"))]
fn unsupported() -> io::Error {
    io::Error::from_raw_os_error(libc::EOPNOTSUPP)
}

/// True when the file is on a filesystem kept in memory, where I/O never waits for a
/// device.
pub(crate) fn memory_backed(file: &File) -> bool {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `file` is an open descriptor and `st` points to writable memory of the size
    // fstatfs fills in.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstatfs returned 0, so it initialised the whole struct.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as libc::c_long;
    magic == TMPFS_MAGIC || magic == RAMFS_MAGIC
}

/// Converts a byte offset to `off_t`.
pub(crate) fn off_t(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// The byte count a read or write system call returned, or the error it reported.
pub(crate) fn byte_count(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Reads into `buf` from `offset` until it is full or the file ends, retrying
/// interrupted calls. Returns how many bytes were read; exactly those are initialised.
pub(crate) fn pread_uninit(
    file: &File,
    buf: &mut [MaybeUninit<u8>],
    offset: u64,
) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let off = off_t(offset + done as u64)?;
        let n = retry_eintr(|| {
            // SAFETY: the kernel writes at most `rest.len()` bytes into the buffer, which
            // is valid and writable for that length; no reference to it is read meanwhile.
            byte_count(unsafe {
                libc::pread(file.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len(), off)
            })
        })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// Retries `f` while it fails with `EINTR`.
pub(crate) fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Takes `flock`'s advisory lock on `file` without waiting, exclusive or shared. Fails
/// with [`io::ErrorKind::WouldBlock`] while another open file holds a lock that
/// conflicts. The lock goes with the file's last descriptor.
pub(crate) fn try_lock(file: &File, exclusive: bool) -> io::Result<()> {
    use rustix::fs::FlockOperation;
    let operation = if exclusive {
        FlockOperation::NonBlockingLockExclusive
    } else {
        FlockOperation::NonBlockingLockShared
    };
    retry_eintr(|| rustix::fs::flock(file, operation).map_err(io::Error::from))
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn fallocate(
    _file: &File,
    _mode: libc::c_int,
    _offset: u64,
    _len: u64,
) -> io::Result<()> {
    Err(unsupported())
}

#[cfg(target_os = "linux")]
pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (off_t(offset)?, off_t(len)?);
    retry_eintr(|| {
        // SAFETY: fallocate only reads its scalar arguments; the descriptor is valid for
        // as long as `file` is borrowed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    })
}

pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, falloc::PUNCH_HOLE | falloc::KEEP_SIZE, offset, len)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn device_size(_file: &File) -> io::Result<u64> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "block devices are served on Linux only",
    ))
}

#[cfg(target_os = "linux")]
pub(crate) fn device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one `size_t` (a u64 on the 64-bit targets this is built
    // for; see the assertion below) through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &raw mut size) };
    if rc == 0 {
        Ok(size)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn logical_block_size(_file: &File) -> Option<u64> {
    None
}

#[cfg(target_os = "linux")]
pub(crate) fn logical_block_size(file: &File) -> Option<u64> {
    let mut sector: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one `int` through the pointer, which points at `sector`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &raw mut sector) };
    (rc == 0 && sector > 0).then_some(sector as u64)
}

/// Reads `queue/rotational` for the device `rdev`; partitions keep it in their parent.
#[cfg(not(target_os = "linux"))]
pub(crate) fn is_rotational(_rdev: u64) -> bool {
    false
}

/// Reads `queue/rotational` for the device `rdev`; partitions keep it in their parent.
#[cfg(target_os = "linux")]
pub(crate) fn is_rotational(rdev: u64) -> bool {
    let dir = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
    ["queue/rotational", "../queue/rotational"]
        .iter()
        .find_map(|rel| std::fs::read_to_string(format!("{dir}/{rel}")).ok())
        .is_some_and(|s| s.trim() == "1")
}

/// `lseek` with `SEEK_DATA` or `SEEK_HOLE`; `None` when there is no data (or hole) at or
/// after `offset` (ENXIO).
pub(crate) fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = off_t(offset)?;
    // SAFETY: lseek only reads its scalar arguments; the descriptor is valid for as long
    // as `file` is borrowed. Moving the shared file position is harmless: all I/O here is
    // positional.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if pos >= 0 {
        Ok(Some(pos as u64))
    } else {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        }
    }
}

const _: () = assert!(size_of::<libc::size_t>() == size_of::<u64>());

/// A block-device range operation.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RangeOp {
    /// `BLKDISCARD`: discard a byte range.
    Discard,
    /// `BLKZEROOUT`: zero a byte range.
    ZeroOut,
}

/// Issues a block-device range ioctl (`BLKDISCARD`, `BLKZEROOUT`).
#[cfg(target_os = "linux")]
pub(crate) fn block_range(file: &File, op: RangeOp, offset: u64, len: u64) -> io::Result<()> {
    /// `BLKDISCARD` from `<linux/fs.h>`.
    const BLKDISCARD: libc::Ioctl = libc::_IO(0x12, 119);
    /// `BLKZEROOUT` from `<linux/fs.h>`.
    const BLKZEROOUT: libc::Ioctl = libc::_IO(0x12, 127);
    let request = match op {
        RangeOp::Discard => BLKDISCARD,
        RangeOp::ZeroOut => BLKZEROOUT,
    };
    let range: [u64; 2] = [offset, len];
    retry_eintr(|| {
        // SAFETY: both ioctls read a `uint64_t[2]` through the pointer, which points at
        // `range`, alive and properly aligned for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, range.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    })
}

/// Issues a block-device range ioctl: not available off Linux.
#[cfg(not(target_os = "linux"))]
pub(crate) fn block_range(_file: &File, _op: RangeOp, _offset: u64, _len: u64) -> io::Result<()> {
    Err(unsupported())
}

/// One `preadv2(RWF_NOWAIT)` into `buf`'s spare capacity: the byte count, or `EAGAIN`
/// when the data is not all in the page cache.
#[cfg(target_os = "linux")]
pub(crate) fn pread_nowait_into(
    file: &File,
    buf: &mut Vec<u8>,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    buf.reserve(len);
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: `iov` describes `len` bytes of the vector's spare capacity, and the kernel
    // writes at most that many.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off_t(offset)?, libc::RWF_NOWAIT) };
    byte_count(n)
}

/// `preadv2(RWF_NOWAIT)` is Linux's: elsewhere every read may block.
#[cfg(not(target_os = "linux"))]
pub(crate) fn pread_nowait_into(
    _file: &File,
    _buf: &mut Vec<u8>,
    _offset: u64,
    _len: usize,
) -> io::Result<usize> {
    Err(unsupported())
}

/// `posix_fadvise(WILLNEED)`: starts reading a range into the page cache.
#[cfg(target_os = "linux")]
pub(crate) fn will_need(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (off_t(offset)?, off_t(len)?);
    // SAFETY: posix_fadvise only reads its scalar arguments; the descriptor is valid for
    // as long as `file` is borrowed.
    let rc =
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// A hint only: nothing to do where `posix_fadvise` is missing.
#[cfg(not(target_os = "linux"))]
pub(crate) fn will_need(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

/// Fills `buf` with random bytes from the kernel.
pub(crate) fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        #[cfg(target_os = "linux")]
        // SAFETY: getrandom writes at most `len - got` bytes into the buffer slice, which
        // is valid and writable for that length.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        #[cfg(not(target_os = "linux"))]
        let n = {
            let want = (buf.len() - got).min(256);
            // SAFETY: getentropy writes exactly `want` (at most 256) bytes into the
            // buffer slice, which is valid and writable for that length.
            if unsafe { libc::getentropy(buf[got..].as_mut_ptr().cast(), want) } == 0 {
                want as isize
            } else {
                -1
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            got += n as usize;
        }
    }
    Ok(())
}
