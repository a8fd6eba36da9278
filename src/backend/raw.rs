//! Raw images: a regular file or a block device, accessed with positional I/O.
//!
//! Every system call goes through one private helper (`RawBackend::blocking`), which picks
//! where it runs:
//!
//! - files on memory-backed filesystems (tmpfs, ramfs) never wait for a disk, so their
//!   system calls run inline on the calling task: a thread hand-off would cost more than
//!   the copy itself;
//! - elsewhere, reads first try `preadv2(RWF_NOWAIT)` inline, which succeeds when the data
//!   is in the page cache and fails with `EAGAIN` instead of blocking otherwise;
//! - everything else runs on tokio's blocking thread pool, so a slow disk never stalls the
//!   threads that serve the network.
//!
//! | request        | regular file                                  | block device              |
//! |----------------|-----------------------------------------------|---------------------------|
//! | read / write   | `pread` / `pwrite`                            | same                      |
//! | flush, FUA     | `fdatasync`                                   | same                      |
//! | trim           | `fallocate(PUNCH_HOLE)`                       | `BLKDISCARD`              |
//! | write zeroes   | punch hole, `ZERO_RANGE`, or zero buffers     | `BLKZEROOUT`              |
//! | block status   | `lseek(SEEK_DATA / SEEK_HOLE)`                | everything is data        |
//! | cache          | `posix_fadvise(WILLNEED)`                     | same                      |
//!
//! This module is written for Linux; elsewhere the Linux-only calls report
//! `EOPNOTSUPP` (see `crate::sys`) and the fallbacks above take over.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use super::{Backend, Capabilities, ZeroFlags};
use crate::block::{Extent, ReadChunk};
use crate::error::{Error, ErrorKind, Result};
use crate::mapping::MappedReads;
use crate::sys::{
    RangeOp, block_range, device_size, falloc, fallocate, is_rotational, logical_block_size,
    memory_backed, pread_nowait_into, pread_uninit, punch_hole, seek, will_need,
};

/// Largest buffer used when zeroes have to be written out.
const ZERO_BUF: usize = 1024 * 1024;

/// Most extents one `block_status` call returns; the client asks again for the rest.
const MAX_EXTENTS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    BlockDevice,
}

/// A raw disk image in a regular file, or a block device. See the
/// [module documentation](self).
#[derive(Debug)]
pub struct RawBackend {
    file: Arc<File>,
    path: PathBuf,
    kind: Kind,
    size: u64,
    read_only: bool,
    rotational: bool,
    /// Logical block size of a block device (alignment of discard and zero-out ranges);
    /// 1 for regular files.
    sector: u64,
    /// The file lives in memory (tmpfs, ramfs): system calls never wait for a device and
    /// run inline.
    inline: bool,
    /// `preadv2(RWF_NOWAIT)` is worth trying; cleared when the kernel or filesystem says
    /// it is not supported.
    try_nowait: AtomicBool,
    /// Zero-copy reads of a memory-backed file's allocated pages.
    mapped: Option<MappedReads>,
}

impl RawBackend {
    /// Opens the regular file or block device at `path`, read-only when asked and
    /// read-write otherwise.
    ///
    /// Fails with a message naming the path when it does not exist, cannot be opened, or
    /// is neither a regular file nor a block device.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self> {
        let path = path.as_ref();
        let open_error = |e: io::Error| {
            Error::from(e)
                .with_op("open")
                .with_message("cannot open backing file")
                .with_path(path)
        };
        // Check the type before opening: opening a FIFO would block.
        let meta = std::fs::metadata(path).map_err(open_error)?;
        check_file_type(path, &meta)?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_error)?;
        // Decide from the file actually opened, in case the path changed meanwhile.
        let meta = file.metadata().map_err(open_error)?;
        let kind = check_file_type(path, &meta)?;
        let (size, sector, rotational) = match kind {
            Kind::File => (meta.len(), 1, false),
            Kind::BlockDevice => {
                let size = device_size(&file).map_err(|e| {
                    open_error(e).with_message("cannot read the size of block device")
                })?;
                let sector = logical_block_size(&file).unwrap_or(512);
                (size, sector, is_rotational(meta.rdev()))
            }
        };
        let inline = kind == Kind::File && memory_backed(&file);
        let mapped = if inline {
            MappedReads::new(&file, size)
        } else {
            None
        };
        Ok(RawBackend {
            file: Arc::new(file),
            path: path.to_path_buf(),
            kind,
            size,
            read_only,
            rotational,
            sector,
            inline,
            try_nowait: AtomicBool::new(!inline),
            mapped,
        })
    }

    /// Runs `f` with the open file, inline for memory-backed files and on the blocking
    /// thread pool otherwise, and attaches `op`, the range and the path to any error.
    /// Every system call of this backend goes through here.
    async fn blocking<T, F>(&self, op: &'static str, range: Option<(u64, u64)>, f: F) -> Result<T>
    where
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let result = if self.inline {
            f(&self.file)
        } else {
            let file = Arc::clone(&self.file);
            match tokio::task::spawn_blocking(move || f(&file)).await {
                Ok(result) => result,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {
                    return Err(Error::msg(
                        ErrorKind::Shutdown,
                        "I/O task cancelled by runtime shutdown",
                    )
                    .with_op(op));
                }
            }
        };
        result.map_err(|e| self.io_error(e, op, range))
    }

    fn io_error(&self, e: io::Error, op: &'static str, range: Option<(u64, u64)>) -> Error {
        let err = Error::from(e).with_op(op).with_path(&self.path);
        match range {
            Some((offset, len)) => err.with_range(offset, len),
            None => err,
        }
    }

    /// Reads from the page cache without blocking, if the data is there. `None` means
    /// "not without waiting": the caller goes to the thread pool.
    fn read_nowait(&self, offset: u64, len: usize) -> Option<io::Result<Bytes>> {
        if !self.try_nowait.load(Ordering::Relaxed) {
            return None;
        }
        match pread_nowait(&self.file, offset, len) {
            Ok(Some(buf)) => Some(Ok(buf)),
            Ok(None) => None,
            Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                self.try_nowait.store(false, Ordering::Relaxed);
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Stops zero-copy reads of a range that is about to be punched or zeroed.
    fn release_mapped(&self, offset: u64, len: u64) {
        if let Some(m) = &self.mapped {
            m.note_released(offset, len);
        }
    }

    fn refuse_if_read_only(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            Err(
                Error::msg(ErrorKind::ReadOnly, "backing file opened read-only")
                    .with_op(op)
                    .with_path(&self.path),
            )
        } else {
            Ok(())
        }
    }

    fn debug_check_range(&self, offset: u64, len: u64) {
        debug_assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.size),
            "request [{offset}, +{len}) outside a disk of {} bytes",
            self.size
        );
    }
}

/// Reads exactly `len` bytes at `offset` into a fresh buffer, without zero-filling it
/// first. Hitting the end of the file is an error.
fn pread_exact(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    let n = pread_uninit(file, &mut buf.spare_capacity_mut()[..len], offset)?;
    if n < len {
        // The file shrank under us: those bytes are gone, which is an I/O error, not
        // zeroes.
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "file is shorter than the export",
        ));
    }
    // SAFETY: pread_uninit initialised all `len` bytes of the spare capacity.
    unsafe { buf.set_len(len) };
    Ok(buf)
}

/// One `preadv2(RWF_NOWAIT)`: `Ok(None)` when the data is not all in the page cache.
fn pread_nowait(file: &File, offset: u64, len: usize) -> io::Result<Option<Bytes>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    let n = match pread_nowait_into(file, &mut buf, offset, len) {
        Ok(n) => n,
        Err(e) => {
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
    };
    if n < len {
        // Partly cached, or the end of the file: let the blocking path sort it out.
        return Ok(None);
    }
    // SAFETY: the kernel initialised all `len` bytes.
    unsafe { buf.set_len(len) };
    Ok(Some(Bytes::from(buf)))
}

fn check_file_type(path: &Path, meta: &std::fs::Metadata) -> Result<Kind> {
    let file_type = meta.file_type();
    let problem = if file_type.is_file() {
        return Ok(Kind::File);
    } else if file_type.is_block_device() {
        return Ok(Kind::BlockDevice);
    } else if file_type.is_dir() {
        "is a directory, not a regular file or block device"
    } else {
        "is not a regular file or block device"
    };
    Err(Error::msg(ErrorKind::InvalidInput, problem)
        .with_op("open")
        .with_path(path))
}

/// True for the errors a file system or device uses to say it lacks an operation.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY)
    )
}

fn write_zero_buffers(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; (len as usize).min(ZERO_BUF)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Zeroes a range of a regular file, as cheaply as the file system allows.
fn zero_file_range(file: &File, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
    let mut punch_works = true;
    if !flags.no_hole {
        match punch_hole(file, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => punch_works = false,
            Err(e) => return Err(e),
        }
    }
    match fallocate(file, falloc::ZERO_RANGE | falloc::KEEP_SIZE, offset, len) {
        Ok(()) => return Ok(()),
        Err(e) if unsupported(&e) => {}
        Err(e) => return Err(e),
    }
    if flags.no_hole && punch_works {
        // No ZERO_RANGE (tmpfs, for one): punch, then allocate the range again, which
        // leaves it allocated and reading as zeroes.
        match punch_hole(file, offset, len) {
            Ok(()) => match fallocate(file, 0, offset, len) {
                Ok(()) => return Ok(()),
                // The range already reads as zeroes; writing them keeps it allocated.
                Err(e) if unsupported(&e) => return write_zero_buffers(file, offset, len),
                Err(e) => return Err(e),
            },
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    if flags.fast {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    write_zero_buffers(file, offset, len)
}

/// Zeroes a range of a block device: `BLKZEROOUT` for the sector-aligned middle, written
/// zeroes for unaligned ends (or everything, if the ioctl is missing).
fn zero_device_range(file: &File, offset: u64, len: u64, sector: u64) -> io::Result<()> {
    let end = offset + len;
    let start = offset.next_multiple_of(sector);
    let stop = end / sector * sector;
    if start < stop {
        match block_range(file, RangeOp::ZeroOut, start, stop - start) {
            Ok(()) => {
                write_zero_buffers(file, offset, start - offset)?;
                return write_zero_buffers(file, stop, end - stop);
            }
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    write_zero_buffers(file, offset, len)
}

/// Appends an extent, merging it with the previous one when they agree.
fn push_extent(extents: &mut Vec<Extent>, extent: Extent) {
    match extents.last_mut() {
        Some(last) if last.hole == extent.hole && last.zero == extent.zero => {
            last.length += extent.length;
        }
        _ => extents.push(extent),
    }
}

/// Maps data and holes of a regular file in `[offset, offset + len)`.
fn file_extents(file: &File, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
    let end = offset + len;
    let mut extents = Vec::new();
    let mut pos = offset;
    while pos < end && extents.len() < MAX_EXTENTS {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(data) => data,
            // No SEEK_DATA here: everything is data.
            Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                push_extent(&mut extents, Extent::data(end - pos));
                break;
            }
            Err(e) => return Err(e),
        };
        let Some(data) = data.map(|d| d.clamp(pos, end)) else {
            push_extent(&mut extents, Extent::hole(end - pos));
            break;
        };
        if data > pos {
            push_extent(&mut extents, Extent::hole(data - pos));
            pos = data;
            continue;
        }
        let hole = match seek(file, pos, libc::SEEK_HOLE)? {
            Some(hole) if hole > pos => hole.min(end),
            // The file shrank under us (or the file system misbehaves): stop guessing.
            Some(_) => end,
            None => {
                push_extent(&mut extents, Extent::hole(end - pos));
                break;
            }
        };
        push_extent(&mut extents, Extent::data(hole - pos));
        pos = hole;
    }
    Ok(extents)
}

impl Backend for RawBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let writable = !self.read_only;
        Capabilities {
            read_only: self.read_only,
            flush: writable,
            fua: writable,
            trim: writable,
            write_zeroes: writable,
            fast_zero: writable,
            block_status: self.kind == Kind::File,
            cache: true,
            multi_conn: true,
            rotational: self.rotational,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.debug_check_range(offset, len as u64);
        if len == 0 {
            return Ok(Bytes::new());
        }
        if let Some(result) = self.read_nowait(offset, len) {
            return result.map_err(|e| self.io_error(e, "read", Some((offset, len as u64))));
        }
        self.blocking("read", Some((offset, len as u64)), move |file| {
            pread_exact(file, offset, len).map(Bytes::from)
        })
        .await
    }

    async fn read_for_kernel(&self, offset: u64, len: usize) -> Result<Bytes> {
        if len > 0
            && let Some(data) = self.mapped.as_ref().and_then(|m| m.get(offset, len))
        {
            self.debug_check_range(offset, len as u64);
            return Ok(data);
        }
        self.read(offset, len).await
    }

    async fn read_sparse_for_kernel(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        Ok(vec![ReadChunk::Data(
            self.read_for_kernel(offset, len).await?,
        )])
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.refuse_if_read_only("write")?;
        self.debug_check_range(offset, data.len() as u64);
        if data.is_empty() && !fua {
            return Ok(());
        }
        let len = data.len() as u64;
        let result = self
            .blocking("write", Some((offset, len)), move |file| {
                file.write_all_at(&data, offset)?;
                if fua {
                    file.sync_data()?;
                }
                Ok(())
            })
            .await;
        if let Some(m) = &self.mapped {
            // Even a failed write may have allocated some of its pages; noting them is
            // harmless, they read back whatever they hold.
            m.note_written(offset, len);
        }
        result
    }

    async fn flush(&self) -> Result<()> {
        self.blocking("flush", None, |file| file.sync_data()).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.refuse_if_read_only("trim")?;
        self.debug_check_range(offset, len);
        self.release_mapped(offset, len);
        let (kind, sector) = (self.kind, self.sector);
        self.blocking("trim", Some((offset, len)), move |file| {
            let result = match kind {
                Kind::File if len > 0 => punch_hole(file, offset, len),
                Kind::BlockDevice => {
                    // Discard only whole sectors inside the range; trim is advisory.
                    let start = offset.next_multiple_of(sector);
                    let stop = (offset + len) / sector * sector;
                    if start < stop {
                        block_range(file, RangeOp::Discard, start, stop - start)
                    } else {
                        Ok(())
                    }
                }
                Kind::File => Ok(()),
            };
            if let Err(e) = result
                && !unsupported(&e)
            {
                return Err(e);
            }
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.refuse_if_read_only("write_zeroes")?;
        self.debug_check_range(offset, len);
        if self.kind == Kind::BlockDevice && flags.fast {
            // BLKZEROOUT may fall back to writing zeroes inside the kernel: not fast.
            return Err(Error::new(ErrorKind::NotSupported)
                .with_op("write_zeroes")
                .with_range(offset, len));
        }
        self.release_mapped(offset, len);
        let (kind, sector) = (self.kind, self.sector);
        self.blocking("write_zeroes", Some((offset, len)), move |file| {
            if len > 0 {
                match kind {
                    Kind::File => zero_file_range(file, offset, len, flags)?,
                    Kind::BlockDevice => zero_device_range(file, offset, len, sector)?,
                }
            }
            if flags.fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.debug_check_range(offset, len);
        if len == 0 {
            return Ok(Vec::new());
        }
        match self.kind {
            Kind::BlockDevice => Ok(vec![Extent::data(len)]),
            Kind::File => {
                self.blocking("block_status", Some((offset, len)), move |file| {
                    file_extents(file, offset, len)
                })
                .await
            }
        }
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.debug_check_range(offset, len);
        if len == 0 {
            // posix_fadvise would take a zero length to mean "to the end of the file".
            return Ok(());
        }
        self.blocking("cache", Some((offset, len)), move |file| {
            will_need(file, offset, len)
        })
        .await
    }
}
