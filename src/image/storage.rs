//! Positional, synchronous access to the file under an image layer.
//!
//! The image engine never touches a file descriptor directly: it goes through
//! [`Storage`], which a real file ([`FileStorage`]) and a simulated disk that can lose
//! unsynced writes ([`super::sim::SimStorage`], for crash tests) both implement.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::mapping::GrowingMap;
use crate::sys;

/// A read-only view of a whole file, for parsing metadata without copying it.
pub enum View {
    /// The file mapped into memory.
    Mapped(memmap2::Mmap),
    /// A copy (empty files, simulated disks).
    Owned(Vec<u8>),
}

impl Deref for View {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            View::Mapped(m) => m,
            View::Owned(v) => v,
        }
    }
}

/// The byte store under one image layer.
#[allow(clippy::len_without_is_empty)] // a file's length, not a collection's
pub trait Storage: Send + Sync + fmt::Debug {
    /// Fills `buf` from `offset`; bytes past the end of the file read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Like [`Storage::read_at`] into memory that need not be initialised; every byte of
    /// `buf` is initialised on success. Saves clearing buffers that are about to be
    /// overwritten.
    fn read_uninit(&self, buf: &mut [MaybeUninit<u8>], offset: u64) -> io::Result<()> {
        buf.fill(MaybeUninit::new(0));
        // SAFETY: every byte was just initialised.
        self.read_at(unsafe { assume_init(buf) }, offset)
    }
    /// Writes all of `bufs`, back to back, at `offset`, growing the file if needed.
    fn write_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Reserves space for a range without changing the length, so that writes into it
    /// cannot fail for want of space. Fails with `ENOSPC` if there is none, and with
    /// [`io::ErrorKind::Unsupported`] where the file system cannot promise it.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Releases the storage of a range; it reads as zeroes afterwards.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// A read-only view of the whole file.
    fn view(&self) -> io::Result<View>;
    /// Ranges within `[offset, offset + len)` that hold data (the rest are holes), in
    /// order. The default says everything is data.
    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        Ok(vec![(offset, len)])
    }
    /// I/O never waits for a device (tmpfs, simulated disks): callers may run it inline.
    fn in_memory(&self) -> bool {
        false
    }
    /// Lets other readers open the file from now on: the layer became read-only (a
    /// snapshot). Storages without locks do nothing.
    fn share_lock(&self) -> io::Result<()> {
        Ok(())
    }
    /// `[offset, offset + len)` without copying, for a reply that only the kernel will
    /// read, holding `pin` until the bytes are dropped. `None` when the storage cannot
    /// (see [`crate::mapping`]); writable storages are only asked for ranges they hold
    /// written data in.
    fn map_slice(&self, offset: u64, len: usize, pin: &Arc<()>) -> Option<Bytes> {
        let _ = (offset, len, pin);
        None
    }
}

/// Views initialised bytes as possibly uninitialised ones, for code that only writes
/// initialised values through the view.
///
/// # Safety
/// The caller must write only initialised values through the returned view (never
/// `MaybeUninit::uninit()`): `buf` is still a `&mut [u8]` afterwards, which must hold
/// initialised bytes.
pub(crate) unsafe fn as_uninit(buf: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`; the caller keeps every byte
    // initialised, as its contract says.
    unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) }
}

/// Views bytes as initialised.
///
/// # Safety
/// Every byte of `buf` must be initialised.
pub(crate) unsafe fn assume_init(buf: &mut [MaybeUninit<u8>]) -> &mut [u8] {
    // SAFETY: the caller guarantees initialisation; the layouts are identical.
    unsafe { &mut *(std::ptr::from_mut::<[MaybeUninit<u8>]>(buf) as *mut [u8]) }
}

/// How a file is locked while open, so that a writer never shares an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// Readers share the file; nobody may write it.
    Shared,
    /// This process alone has the file.
    Exclusive,
}

/// A real file or block device.
pub struct FileStorage {
    file: File,
    path: PathBuf,
    block_device: bool,
    in_memory: bool,
    writable: bool,
    /// Made on first use by [`Storage::map_slice`], for files in memory only.
    map: OnceLock<Option<GrowingMap>>,
}

impl fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStorage")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FileStorage {
    /// Opens `path`, writable or not, and takes the lock: shared for read-only opens,
    /// exclusive for writable ones. A lock held elsewhere fails with [`ErrorKind::Busy`].
    pub fn open(path: &Path, writable: bool) -> Result<FileStorage> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
        Self::from_file(file, path, writable, true)
    }

    /// Opens `path` read-only without taking any lock, to inspect an image another
    /// process may be serving (what it shows may be a moment out of date).
    pub fn open_unlocked(path: &Path) -> Result<FileStorage> {
        let file = File::open(path).map_err(|e| Error::from(e).with_op("open").with_path(path))?;
        Self::from_file(file, path, false, false)
    }

    /// Opens `path` without taking any lock, for a file that a lock held on something
    /// else protects (a segment of a volume with history, under the volume's lock).
    pub fn open_without_lock(path: &Path, writable: bool) -> Result<FileStorage> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
        Self::from_file(file, path, writable, false)
    }

    /// Opens `path` for writing without taking any lock, for merging clusters into a
    /// read-only snapshot layer that this process serves (and so holds a shared lock
    /// on): the clusters added are copies of what the layer below already returns, so
    /// readers of the layer see the same bytes throughout.
    pub(crate) fn open_for_merge(path: &Path) -> Result<FileStorage> {
        Self::open_without_lock(path, true)
    }

    /// Creates `path`, which must not exist, and locks it exclusively.
    pub fn create(path: &Path) -> Result<FileStorage> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::from(e).with_op("create").with_path(path))?;
        Self::from_file(file, path, true, true)
    }

    fn from_file(file: File, path: &Path, writable: bool, lock: bool) -> Result<FileStorage> {
        let meta = file
            .metadata()
            .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
        let block_device = meta.file_type().is_block_device();
        if !meta.is_file() && !block_device {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                "is not a regular file or block device",
            )
            .with_op("open")
            .with_path(path));
        }
        let mode = if writable {
            Lock::Exclusive
        } else {
            Lock::Shared
        };
        let locked = if lock {
            sys::try_lock(&file, mode == Lock::Exclusive)
        } else {
            Ok(())
        };
        locked.map_err(|e| {
            let busy = e.kind() == io::ErrorKind::WouldBlock;
            let err = Error::from(e).with_op("lock").with_path(path);
            if busy {
                Error::msg(
                    ErrorKind::Busy,
                    if writable {
                        "in use: another process has this image open"
                    } else {
                        "in use: another process is writing this image"
                    },
                )
                .with_op("lock")
                .with_path(path)
            } else {
                err
            }
        })?;
        let in_memory = !block_device && sys::memory_backed(&file);
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            block_device,
            in_memory,
            writable,
            map: OnceLock::new(),
        })
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Identity of the open file (device, inode), to recognise one file opened twice.
    pub fn file_id(&self) -> io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }
}

impl Storage for FileStorage {
    fn share_lock(&self) -> io::Result<()> {
        sys::try_lock(&self.file, false)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_uninit(&self, buf: &mut [MaybeUninit<u8>], offset: u64) -> io::Result<()> {
        let n = sys::pread_uninit(&self.file, buf, offset)?;
        // Past the end of the file reads as zeroes.
        buf[n..].fill(MaybeUninit::new(0));
        Ok(())
    }

    fn write_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        if let [one] = bufs {
            return self.file.write_all_at(one, offset);
        }
        let mut slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        let mut pos = offset;
        while !rest.is_empty() {
            let iov = rest.as_ptr().cast::<libc::iovec>();
            let count = rest.len().min(1024) as libc::c_int;
            let off = sys::off_t(pos)?;
            let n = sys::retry_eintr(|| {
                // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix; the slices
                // point at buffers borrowed for the duration of the call, and `count`
                // does not exceed their number.
                let written = unsafe { libc::pwritev(self.file.as_raw_fd(), iov, count, off) };
                sys::byte_count(written)
            })?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            pos += n as u64;
            io::IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::ErrorKind::Unsupported.into());
        }
        sys::fallocate(&self.file, sys::falloc::KEEP_SIZE, offset, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::ErrorKind::Unsupported.into());
        }
        sys::punch_hole(&self.file, offset, len)
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            sys::device_size(&self.file)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn view(&self) -> io::Result<View> {
        if self.len()? == 0 {
            return Ok(View::Owned(Vec::new()));
        }
        // SAFETY: the mapping is read-only and this process holds a lock that keeps other
        // cooperating writers away. Views are only parsed while no write of this process
        // is in flight (at open and in `check`), so the bytes do not change underneath.
        let map = unsafe { memmap2::Mmap::map(&self.file)? };
        Ok(View::Mapped(map))
    }

    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        if self.block_device {
            return Ok(vec![(offset, len)]);
        }
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match sys::seek(&self.file, pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                // Filesystems without SEEK_DATA: everything is data.
                Err(_) => return Ok(vec![(offset, len)]),
            };
            if data >= end {
                break;
            }
            let hole = sys::seek(&self.file, data, libc::SEEK_HOLE)?
                .unwrap_or(end)
                .min(end);
            out.push((data, hole - data));
            pos = hole;
        }
        Ok(out)
    }

    fn in_memory(&self) -> bool {
        self.in_memory
    }

    fn map_slice(&self, offset: u64, len: usize, pin: &Arc<()>) -> Option<Bytes> {
        if !self.in_memory {
            return None;
        }
        self.map
            .get_or_init(|| GrowingMap::new(&self.file, !self.writable))
            .as_ref()?
            .slice(&self.file, offset, len, pin)
    }
}
