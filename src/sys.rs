//! Thin, safe wrappers around the Linux system calls the file-backed layers share.

use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;

/// `BLKGETSIZE64` from `<linux/fs.h>`: device size in bytes.
const BLKGETSIZE64: libc::Ioctl = libc::_IOR::<libc::size_t>(0x12, 114);

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
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

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

pub(crate) fn logical_block_size(file: &File) -> Option<u64> {
    let mut sector: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one `int` through the pointer, which points at `sector`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &raw mut sector) };
    (rc == 0 && sector > 0).then_some(sector as u64)
}

/// Reads `queue/rotational` for the device `rdev`; partitions keep it in their parent.
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
