//! Storage behind an export.
//!
//! Every kind of storage (a raw file or block device, an in-memory disk, a Strata image)
//! implements [`Backend`]. Layers such as [`ReadOnly`] wrap any backend and change only
//! what they are for: they implement [`Filter`], whose methods all pass the request to the
//! backend below unless the layer says otherwise, the way nbdkit filters stack over
//! plugins.
//!
//! Backends assume their requests were validated at the protocol boundary (in range, flags
//! allowed); they only `debug_assert!` it.
//!
//! [`Backend`] uses `async fn`s and is therefore not object safe. [`DynBackend`] is its
//! object-safe twin (boxed futures), implemented for every backend, so that the command line
//! can pick a stack at run time and hand the server an `Arc<dyn DynBackend>`; that handle
//! implements [`Backend`] again, so layers can wrap it too.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::block::{DepthExtent, DirtyExtent, Extent, ReadChunk};
use crate::error::{Error, ErrorKind, Result};
use crate::image::Format;

/// Calls the macro `$then` with the signature of every method of [`Backend`], the
/// synchronous ones first.
///
/// What must pass every method on (the object-safe twin [`DynBackend`] and its bridges
/// both ways, and the pass-through of [`Filter`]) is generated from this one list, so
/// that no layer falls back to a default where it should forward: a layer that answered
/// [`Backend::read_for_kernel`] with the default would copy what the backend below maps,
/// and one that answered [`Backend::dirty_status`] with the default would hide every
/// snapshot. A method added to [`Backend`] is added here too.
macro_rules! backend_methods {
    ($then:ident) => {
        $then! {
            fn size() -> u64;
            fn capabilities() -> Capabilities;
            fn block_size() -> BlockSize;
            fn dirty_bitmaps() -> Vec<String>;
            async fn read(offset: u64, len: usize) -> Bytes;
            async fn read_sparse(offset: u64, len: usize) -> Vec<ReadChunk>;
            async fn read_for_kernel(offset: u64, len: usize) -> Bytes;
            async fn read_sparse_for_kernel(offset: u64, len: usize) -> Vec<ReadChunk>;
            async fn write(offset: u64, data: Bytes, fua: bool) -> ();
            async fn flush() -> ();
            async fn trim(offset: u64, len: u64, fua: bool) -> ();
            async fn write_zeroes(offset: u64, len: u64, flags: ZeroFlags) -> ();
            async fn block_status(offset: u64, len: u64) -> Vec<Extent>;
            async fn allocation_depth(offset: u64, len: u64) -> Vec<DepthExtent>;
            async fn cache(offset: u64, len: u64) -> ();
            async fn dirty_status(bitmap: String, offset: u64, len: u64) -> Vec<DirtyExtent>;
        }
    };
}

mod blocking;
pub mod faulty;
mod filter;
pub mod history;
pub mod image;
pub mod memory;
pub mod raw;
mod readonly;
pub mod switch;

pub use faulty::{FaultRule, Faulty, parse_rule as parse_fault_rule};
pub use filter::{Below, Filter};
pub use image::ImageBackend;
pub use memory::MemoryBackend;
pub use raw::RawBackend;
pub use readonly::ReadOnly;
pub use switch::Switchable;

/// What a backend can do; the server advertises exactly this to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct Capabilities {
    /// Writes, trims and zeroing are refused.
    pub read_only: bool,
    /// `flush` persists data (otherwise it is a no-op and FLUSH is not advertised).
    pub flush: bool,
    /// Writes honour force-unit-access.
    pub fua: bool,
    /// `trim` can release storage.
    pub trim: bool,
    /// `write_zeroes` is efficient (not merely the default fallback).
    pub write_zeroes: bool,
    /// `write_zeroes` with `fast` can say quickly whether zeroing is cheap.
    pub fast_zero: bool,
    /// `block_status` reports real allocation rather than "all data".
    pub block_status: bool,
    /// `cache` does something useful (prefetch).
    pub cache: bool,
    /// Connections share one consistent view: a flush on one covers writes on all.
    pub multi_conn: bool,
    /// The medium is rotational (seeks are expensive).
    pub rotational: bool,
}

impl Capabilities {
    /// Capabilities with everything off; backends switch on what they support.
    pub const NONE: Capabilities = Capabilities {
        read_only: false,
        flush: false,
        fua: false,
        trim: false,
        write_zeroes: false,
        fast_zero: false,
        block_status: false,
        cache: false,
        multi_conn: false,
        rotational: false,
    };
}

/// Block size constraints advertised to clients (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest unit of I/O, a power of two.
    pub minimum: u32,
    /// Size that avoids read-modify-write, a power of two.
    pub preferred: u32,
    /// Largest request payload accepted.
    pub maximum: u32,
}

impl BlockSize {
    /// The largest payload Strata accepts in one request (32 MiB, as qemu and nbdkit do).
    pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: Self::MAX_PAYLOAD,
        }
    }
}

/// Options of a `write_zeroes` request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Persist before returning.
    pub fua: bool,
    /// Keep the range allocated (do not punch a hole).
    pub no_hole: bool,
    /// Fail with [`ErrorKind::NotSupported`] rather than fall back to writing zeroes slowly.
    pub fast: bool,
}

/// Granularity of the default `write_zeroes` fallback.
const ZERO_CHUNK: usize = 1024 * 1024;

/// A virtual disk. All offsets and lengths are in bytes and already validated against
/// [`Backend::size`] by the caller.
pub trait Backend: Send + Sync + 'static {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;

    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Block size constraints.
    fn block_size(&self) -> BlockSize {
        BlockSize::default()
    }

    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> impl Future<Output = Result<Bytes>> + Send;

    /// Reads `len` bytes at `offset`, reporting runs of zeroes without materialising them.
    /// The chunks cover exactly `len` bytes, in order.
    fn read_sparse(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Vec<ReadChunk>>> + Send {
        async move { Ok(vec![ReadChunk::Data(self.read(offset, len).await?)]) }
    }

    /// Like [`Backend::read`], for a caller that hands the bytes only to the kernel (a
    /// plaintext reply written to a socket): they may point into a mapping of a file in
    /// memory instead of being copied ([`crate::mapping`]). User-space code must never
    /// read them: if another process truncates the file, the kernel's access fails with
    /// `EFAULT` where a user-space one kills the process with `SIGBUS`. The default is
    /// [`Backend::read`].
    fn read_for_kernel(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Bytes>> + Send {
        self.read(offset, len)
    }

    /// [`Backend::read_sparse`] with the contract of [`Backend::read_for_kernel`]. The
    /// default is [`Backend::read_sparse`].
    fn read_sparse_for_kernel(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Vec<ReadChunk>>> + Send {
        self.read_sparse(offset, len)
    }

    /// Writes `data` at `offset`; with `fua` the data is durable on return.
    fn write(&self, offset: u64, data: Bytes, fua: bool)
    -> impl Future<Output = Result<()>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Hints that the range is no longer needed. Contents afterwards are unspecified
    /// (backends in this crate make them read as zeroes).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<()>> + Send {
        let _ = (offset, len, fua);
        async { Ok(()) }
    }

    /// Makes the range read as zeroes. The default writes zero buffers, which is honest but
    /// slow, so it refuses `fast` requests.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            if flags.fast {
                return Err(Error::new(ErrorKind::NotSupported).with_op("write_zeroes"));
            }
            let zeroes = Bytes::from(vec![0u8; ZERO_CHUNK.min(len as usize)]);
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(zeroes.len() as u64) as usize;
                self.write(offset + done, zeroes.slice(..n), false).await?;
                done += n as u64;
            }
            if flags.fua {
                self.flush().await?;
            }
            Ok(())
        }
    }

    /// Describes allocation from `offset`. Returns at least one extent; extents are
    /// contiguous, start at `offset` and cover at most `len` bytes.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>>> + Send {
        let _ = offset;
        async move { Ok(vec![Extent::data(len)]) }
    }

    /// Says which layer of a backing chain provides each part of the range from `offset`.
    /// Same contract as [`Backend::block_status`]: at least one extent, contiguous from
    /// `offset`, covering at most `len` bytes.
    ///
    /// The default suits a backend that is a single layer owning every byte, as a raw
    /// file or an in-memory disk is: the whole range at depth 1, holes included.
    fn allocation_depth(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<DepthExtent>>> + Send {
        let _ = offset;
        async move {
            Ok(vec![DepthExtent {
                length: len,
                depth: 1,
            }])
        }
    }

    /// Hints that the range will be read soon.
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = Result<()>> + Send {
        let _ = (offset, len);
        async { Ok(()) }
    }

    /// Names of the snapshots this backend can compare the disk with: each is offered
    /// to clients as the metadata context `qemu:dirty-bitmap:NAME`. The default has none.
    fn dirty_bitmaps(&self) -> Vec<String> {
        Vec::new()
    }

    /// Says which parts of the range from `offset` were written since snapshot
    /// `bitmap`. Same contract as [`Backend::block_status`].
    fn dirty_status(
        &self,
        bitmap: String,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<DirtyExtent>>> + Send {
        let _ = (offset, len);
        let err = Error::msg(ErrorKind::NotFound, format!("no snapshot named {bitmap:?}"));
        async move { Err(err) }
    }
}

/// A boxed future, as returned by [`DynBackend`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Generates [`DynBackend`] and its bridges from the methods of [`Backend`].
macro_rules! dyn_backend {
    (
        $(fn $sync:ident() -> $sync_out:ty;)*
        $(async fn $name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*
    ) => {
        /// Object-safe form of [`Backend`], implemented for every backend.
        #[allow(missing_docs)]
        pub trait DynBackend: Send + Sync + 'static {
            $(fn $sync(&self) -> $sync_out;)*
            $(fn $name(&self, $($arg: $ty),*) -> BoxFuture<'_, Result<$out>>;)*
        }

        impl<B: Backend> DynBackend for B {
            $(fn $sync(&self) -> $sync_out {
                Backend::$sync(self)
            })*
            $(fn $name(&self, $($arg: $ty),*) -> BoxFuture<'_, Result<$out>> {
                Box::pin(Backend::$name(self, $($arg),*))
            })*
        }

        impl Backend for SharedBackend {
            $(fn $sync(&self) -> $sync_out {
                (**self).$sync()
            })*
            $(fn $name(&self, $($arg: $ty),*) -> impl Future<Output = Result<$out>> + Send {
                (**self).$name($($arg),*)
            })*
        }
    };
}

backend_methods!(dyn_backend);

/// A backend chosen at run time.
pub type SharedBackend = Arc<dyn DynBackend>;

/// What a spec names: `memory:SIZE`, the directory of a volume with history, or the path
/// of a Strata image, a raw file or a block device, told apart by the file's first bytes
/// once, when the spec is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// An in-memory disk of this many bytes.
    Memory(u64),
    /// A raw file or block device, served as its bytes are.
    Raw(PathBuf),
    /// A Strata image.
    Image(PathBuf),
    /// A volume with history (a directory).
    History(PathBuf),
}

impl Spec {
    /// Reads `spec`. A path is probed unless `format` forces how it is read (`Raw` serves
    /// any file's bytes as they are, even one that looks like an image); other tools'
    /// image formats are refused.
    pub fn parse(spec: &str, format: Option<Format>) -> Result<Spec> {
        if let Some(size) = spec.strip_prefix("memory:") {
            return Ok(Spec::Memory(crate::size::parse_size(size)?));
        }
        let path = Path::new(spec);
        if format.is_none() && crate::history::is_volume(path) {
            return Ok(Spec::History(path.to_path_buf()));
        }
        let format = match format {
            Some(f) => f,
            None => crate::image::probe(path)?,
        };
        match format {
            Format::Strata => Ok(Spec::Image(path.to_path_buf())),
            Format::Raw => Ok(Spec::Raw(path.to_path_buf())),
            Format::Foreign(name) => Err(crate::image::refuse_foreign(path, name)),
        }
    }

    /// Opens what the spec names as a plain backend (a Strata image as an
    /// [`ImageBackend`], without a volume's online snapshots), behind [`ReadOnly`] when
    /// `read_only`. Nothing is probed again.
    pub fn open(&self, read_only: bool) -> Result<SharedBackend> {
        let backend: SharedBackend = match self {
            Spec::Memory(size) => Arc::new(MemoryBackend::new(*size)),
            Spec::Raw(path) => Arc::new(RawBackend::open(path, read_only)?),
            Spec::Image(path) => Arc::new(ImageBackend::new(crate::image::open(path, !read_only)?)),
            Spec::History(path) => Arc::new(history::HistoryBackend::new(Arc::new(
                crate::history::History::open(path, read_only)?,
            ))),
        };
        Ok(if read_only {
            Arc::new(ReadOnly::new(backend))
        } else {
            backend
        })
    }
}

/// Opens the backend `spec` names ([`Spec::parse`], then [`Spec::open`]): a path's
/// format is probed once. The server opens its exports from a [`Spec`] too, but serves
/// images as volumes.
pub fn open(spec: &str, read_only: bool) -> Result<SharedBackend> {
    Spec::parse(spec, None)?.open(read_only)
}
