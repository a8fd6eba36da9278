//! One conformance suite for every backend.
//!
//! The cases in `writable::cases` (writable backends) and `read_only::ro_cases` (read-only
//! stacks) are written once, generically over [`Backend`], and instantiated by the
//! `conformance!` and `read_only!` macros for each fixture: the in-memory disk, a raw
//! sparse file (in the system temporary directory and in cargo's target directory, which
//! may be different file systems), standalone Strata images (64 KiB and 4 KiB clusters),
//! Strata overlay stacks of 1, 2 and 10 layers over a raw base that holds a known pattern,
//! the same behind `SharedBackend`, and the read-only layers. A property test (`model`)
//! then drives each backend with random operation sequences against a `Vec<u8>` oracle;
//! `specific` holds what only one backend or layer does.
//!
//! A fixture need not start out as zeroes: it says what it holds ([`Fixture::initial`])
//! and which layer of its chain provides each byte ([`Depths`]), and the cases check
//! against that. The fixtures are here; the checks the suites share are in `checks`.
//!
//! Setting `STRATA_TEST_BLOCK_DEVICE=/dev/loopN` also runs the suite against that block
//! device. **Its contents are destroyed.** Use a loop device over a sparse file of a few
//! MiB (loop devices make discarded ranges read as zeroes, which the suite checks).

/// Instantiates each `$case` of module `$cases` as a test in a module `$suite`, run on
/// the fixture that `$fixture` (an `Option<_>`, which may use `.await`) makes; `None`
/// skips the suite (no block device given).
macro_rules! suite {
    ($suite:ident, $cases:ident, $fixture:expr, [$($case:ident),*]) => {
        mod $suite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let fixture: Option<_> = $fixture;
                    let Some(fixture) = fixture else {
                        eprintln!("skipped: STRATA_TEST_BLOCK_DEVICE is not set");
                        return;
                    };
                    $cases::$case(fixture).await;
                }
            )*
        }
    };
}

mod checks;
mod model;
mod read_only;
mod specific;
mod writable;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use strata::backend::{
    self, Backend, ImageBackend, MemoryBackend, RawBackend, ReadOnly, SharedBackend, ZeroFlags,
};
use strata::block::DepthExtent;
use strata::image::{self, CreateOptions, ZeroMode};
use tempfile::{NamedTempFile, TempDir};

use crate::support::{ImagesOpen, images_open};

use checks::pattern;

/// Size of the test disks: not a multiple of the memory chunk or of a sector.
const SIZE: u64 = 4 * 1024 * 1024 + 12345;
/// The memory backend's chunk size, where interesting boundaries are.
const CHUNK: u64 = 64 * 1024;
/// Largest single read the helpers issue.
const READ_STEP: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Fixtures

/// Whatever must outlive a backend under test.
enum Guard {
    File(NamedTempFile),
    /// A directory holding an image and its backing files; `top` is the image served.
    Dir {
        _dir: ImageDir,
        top: PathBuf,
    },
    Device {
        _lock: MutexGuard<'static, ()>,
    },
}

/// Which layer of a backing chain provides each byte, as `allocation_depth` reports it.
#[derive(Clone)]
enum Depths {
    /// A single layer owns every byte, holes included: depth 1 everywhere.
    Single,
    /// A Strata image, perhaps an overlay: see [`Layout`].
    Image(Arc<Layout>),
}

/// Who owns each cluster of a Strata chain: Strata layers are numbered from 1 at the
/// bottom to `top`, under which (when `raw_len > 0`) lies a raw base of `raw_len` bytes.
struct Layout {
    cluster: u64,
    top: u32,
    raw_len: u64,
    /// The Strata layer that holds each cluster (data or zero cluster), 0 for none.
    owner: Vec<u32>,
}

impl Layout {
    /// Depth of `[offset, offset + len)` after the top layer wrote `written` (whole
    /// clusters become the top layer's: partial writes copy the rest of the cluster up).
    fn depths(&self, written: &[(u64, u64)], offset: u64, len: u64) -> Vec<DepthExtent> {
        let mut owner = self.owner.clone();
        for &(at, n) in written {
            for c in at / self.cluster..(at + n).div_ceil(self.cluster) {
                owner[c as usize] = self.top;
            }
        }
        let mut out: Vec<DepthExtent> = Vec::new();
        let mut push = |length: u64, depth: u32| match out.last_mut() {
            Some(last) if last.depth == depth => last.length += length,
            _ if length > 0 => out.push(DepthExtent { length, depth }),
            _ => {}
        };
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let c = pos / self.cluster;
            let next = ((c + 1) * self.cluster).min(end);
            match owner[c as usize] {
                0 => {
                    let split = self.raw_len.clamp(pos, next);
                    push(split - pos, self.top + 1);
                    push(next - split, 0);
                }
                k => push(next - pos, self.top - k + 1),
            }
            pos = next;
        }
        out
    }
}

/// A backend under test.
struct Fixture<B> {
    b: Arc<B>,
    /// The size the backend must report.
    size: u64,
    /// Trimmed ranges read as zeroes. Discard on a block device is only a hint: a trimmed
    /// range may keep its old data (partial sectors always do).
    trim_zeroes: bool,
    /// The disk may hold anything (a reused block device): zero it before use.
    needs_reset: bool,
    /// What the disk holds before a case writes to it; `None` for zeroes.
    contents: Option<Arc<Vec<u8>>>,
    /// Which layer provides each byte before a case writes to it.
    depths: Depths,
    _guard: Option<Guard>,
}

impl<B: Backend> Fixture<B> {
    fn new(b: B, size: u64, guard: Option<Guard>) -> Self {
        Fixture {
            b: Arc::new(b),
            size,
            trim_zeroes: true,
            needs_reset: false,
            contents: None,
            depths: Depths::Single,
            _guard: guard,
        }
    }

    /// What the disk holds before a case writes anything: the oracle's starting point.
    fn initial(&self) -> Vec<u8> {
        match &self.contents {
            Some(c) => c.to_vec(),
            None => vec![0u8; self.size as usize],
        }
    }

    /// Wraps the backend with `wrap`, keeping the rest of the fixture.
    fn map<C: Backend>(self, wrap: impl FnOnce(B) -> C) -> Fixture<C> {
        let b = Arc::into_inner(self.b).expect("fixture not shared yet");
        Fixture {
            b: Arc::new(wrap(b)),
            size: self.size,
            trim_zeroes: self.trim_zeroes,
            needs_reset: self.needs_reset,
            contents: self.contents,
            depths: self.depths,
            _guard: self._guard,
        }
    }

    /// The same backend behind `Arc<dyn DynBackend>`.
    fn shared(self) -> Fixture<SharedBackend> {
        self.map(|b| Arc::new(b) as SharedBackend)
    }

    /// The same backend behind the [`ReadOnly`] layer.
    fn read_only(self) -> Fixture<ReadOnly<B>> {
        self.map(ReadOnly::new)
    }
}

fn memory(size: u64) -> Fixture<MemoryBackend> {
    Fixture::new(MemoryBackend::new(size), size, None)
}

fn sparse_file(dir: Option<&str>, size: u64) -> NamedTempFile {
    let file = match dir {
        Some(dir) => NamedTempFile::new_in(dir),
        None => NamedTempFile::new(),
    }
    .expect("create temporary file");
    file.as_file().set_len(size).expect("size temporary file");
    file
}

fn raw_in(dir: Option<&str>, size: u64, read_only: bool) -> Fixture<RawBackend> {
    let file = sparse_file(dir, size);
    let b = RawBackend::open(file.path().to_str().unwrap(), read_only).expect("open raw file");
    Fixture::new(b, size, Some(Guard::File(file)))
}

/// A raw file in the system temporary directory.
fn raw(size: u64) -> Fixture<RawBackend> {
    raw_in(None, size, false)
}

/// A raw file in cargo's per-target temporary directory (often another file system).
fn raw_target(size: u64) -> Fixture<RawBackend> {
    raw_in(Some(env!("CARGO_TARGET_TMPDIR")), size, false)
}

/// `backend::open` as the command line uses it.
fn opened_memory(size: u64) -> Fixture<SharedBackend> {
    let b = backend::open(&format!("memory:{size}"), false).expect("open memory backend");
    Fixture::new(b, size, None)
}

/// `backend::open` on a file path.
fn opened_raw(size: u64) -> Fixture<SharedBackend> {
    let file = sparse_file(None, size);
    let b = backend::open(file.path().to_str().unwrap(), false).expect("open raw file");
    Fixture::new(b, size, Some(Guard::File(file)))
}

/// The block device named by `STRATA_TEST_BLOCK_DEVICE`, zeroed, held exclusively; `None`
/// (the test is skipped) when the variable is unset.
fn block_device(read_only: bool) -> Option<Fixture<RawBackend>> {
    static LOCK: Mutex<()> = Mutex::new(());
    let path = std::env::var("STRATA_TEST_BLOCK_DEVICE").ok()?;
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let b = RawBackend::open(&path, read_only).expect("open block device");
    let size = b.size();
    assert!(size >= 2 * READ_STEP, "{path} is too small for the suite");
    let mut f = Fixture::new(b, size, Some(Guard::Device { _lock: guard }));
    f.trim_zeroes = false;
    f.needs_reset = true;
    Some(f)
}

/// Cluster sizes the image fixtures use.
const KIB64: u64 = 64 * 1024;
const KIB4: u64 = 4096;

/// A directory for images this process opens; while it lives, no child process is
/// forked (see `support::images_open`).
struct ImageDir {
    tmp: TempDir,
    _images: ImagesOpen,
}

impl ImageDir {
    fn path(&self) -> &Path {
        self.tmp.path()
    }
}

/// A directory for images in the system temporary directory or in `dir`.
fn temp_dir(dir: Option<&str>) -> ImageDir {
    let images = images_open();
    let tmp = match dir {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    };
    ImageDir {
        tmp: tmp.expect("create temporary directory"),
        _images: images,
    }
}

/// A new, empty standalone Strata image; returns the directory holding it and its path.
fn new_image(dir: Option<&str>, size: u64, cluster: u64) -> (ImageDir, PathBuf) {
    let tmp = temp_dir(dir);
    let path = tmp.path().join("disk.strata");
    image::create(
        &path,
        &CreateOptions {
            size: Some(size),
            cluster_size: Some(cluster),
            backing: None,
        },
    )
    .expect("create image");
    (tmp, path)
}

impl<B: Backend> Fixture<B> {
    /// A fixture serving, with `b`, the fresh standalone image `path` in `tmp`, which has
    /// `cluster`-byte clusters: zeroes, every one of its own layer (depth 1).
    fn over_image(b: B, size: u64, cluster: u64, (tmp, path): (ImageDir, PathBuf)) -> Self {
        let mut f = Fixture::new(
            b,
            size,
            Some(Guard::Dir {
                _dir: tmp,
                top: path,
            }),
        );
        f.depths = Depths::Image(Arc::new(Layout {
            cluster,
            top: 1,
            raw_len: 0,
            owner: vec![0; size.div_ceil(cluster) as usize],
        }));
        f
    }
}

/// A standalone Strata image with `cluster`-byte clusters, served by [`ImageBackend`].
fn image_in(dir: Option<&str>, size: u64, cluster: u64) -> Fixture<ImageBackend> {
    let image = new_image(dir, size, cluster);
    let b = ImageBackend::new(image::open(&image.1, true).expect("open image"));
    Fixture::over_image(b, size, cluster, image)
}

/// A standalone image in the system temporary directory.
fn image_file(size: u64, cluster: u64) -> Fixture<ImageBackend> {
    image_in(None, size, cluster)
}

/// A standalone image in cargo's per-target temporary directory.
fn image_target(size: u64, cluster: u64) -> Fixture<ImageBackend> {
    image_in(Some(env!("CARGO_TARGET_TMPDIR")), size, cluster)
}

/// `backend::open` on a Strata image, as the command line serves one.
fn opened_image(size: u64) -> Fixture<SharedBackend> {
    let image = new_image(None, size, KIB64);
    let b = backend::open(image.1.to_str().unwrap(), false).expect("open image path");
    Fixture::over_image(b, size, KIB64, image)
}

/// What building an overlay stack left behind: the files, what the top image reads as,
/// and who owns each cluster.
struct Stack {
    dir: ImageDir,
    top: PathBuf,
    contents: Vec<u8>,
    layout: Layout,
}

/// Builds a chain of `layers` Strata images over a raw base and leaves it closed.
///
/// The raw base is shorter than the disk (by an amount that is no multiple of anything)
/// and holds a pattern in stripes with holes between them. Every layer, the top one
/// included, then writes some clusters of its own: a whole cluster, a partial write
/// (whose cluster is copied up), and in turns zeroing and trimming (which hide the
/// backing), each updating the expected contents and owners.
fn overlay_stack(dir: Option<&str>, size: u64, cluster: u64, layers: u32) -> Stack {
    let tmp = temp_dir(dir);
    let clusters = size.div_ceil(cluster);
    let raw_len = size - size / 8 - 333;
    let base = tmp.path().join("base.raw");
    let mut contents = vec![0u8; size as usize];
    {
        const STRIPE: u64 = 96 * 1024 + 7;
        let file = std::fs::File::create(&base).expect("create raw base");
        file.set_len(raw_len).expect("size raw base");
        let mut at = 0;
        let mut i = 0;
        while at < raw_len {
            let n = STRIPE.min(raw_len - at);
            if i % 3 != 2 {
                let data = pattern(1000 + i, n as usize);
                file.write_all_at(&data, at).expect("fill raw base");
                contents[at as usize..][..n as usize].copy_from_slice(&data);
            }
            at += n;
            i += 1;
        }
    }
    let mut layout = Layout {
        cluster,
        top: layers,
        raw_len,
        owner: vec![0; clusters as usize],
    };
    let mut below = base;
    for k in 1..=layers {
        let path = tmp.path().join(format!("layer{k}.strata"));
        image::create(
            &path,
            &CreateOptions {
                size: Some(size),
                cluster_size: (k == 1).then_some(cluster),
                backing: Some(below.clone()),
            },
        )
        .unwrap_or_else(|e| panic!("create layer {k}: {e}"));
        let chain = image::open(&path, true).unwrap_or_else(|e| panic!("open layer {k}: {e}"));
        let k64 = u64::from(k);
        let own = |at: u64, n: u64, layout: &mut Layout| {
            for c in at / cluster..(at + n).div_ceil(cluster) {
                layout.owner[c as usize] = k;
            }
        };
        // A whole cluster, and a partial write that copies its cluster up.
        let whole = (k64 * 7 % clusters) * cluster;
        let n = cluster.min(size - whole);
        let data = pattern(2000 + k64, n as usize);
        chain.write(whole, &data, false).expect("write layer");
        contents[whole as usize..][..n as usize].copy_from_slice(&data);
        own(whole, n, &mut layout);
        let partial = (k64 * 13 + 3) % (clusters - 1) * cluster + cluster / 3;
        let n = 1000.min(size - partial);
        let data = pattern(3000 + k64, n as usize);
        chain
            .write(partial, &data, false)
            .expect("partial write layer");
        contents[partial as usize..][..n as usize].copy_from_slice(&data);
        own(partial, n, &mut layout);
        // Every other layer zeroes or trims a stretch that starts and ends mid-cluster.
        if k % 2 == 0 {
            let at = (k64 * 5 + 1) % (clusters - 3) * cluster + 100;
            let n = 2 * cluster;
            let mode = if k % 4 == 0 {
                ZeroMode::Trim
            } else {
                ZeroMode::Zero
            };
            chain.zero(at, n, mode, false).expect("zero layer");
            contents[at as usize..][..n as usize].fill(0);
            own(at, n, &mut layout);
        }
        chain.flush().expect("flush layer");
        drop(chain);
        below = path;
    }
    Stack {
        dir: tmp,
        top: below,
        contents,
        layout,
    }
}

impl<B: Backend> Fixture<B> {
    /// A fixture serving the top of `stack` with `b`.
    fn over_stack(b: B, size: u64, stack: Stack) -> Fixture<B> {
        let mut f = Fixture::new(
            b,
            size,
            Some(Guard::Dir {
                _dir: stack.dir,
                top: stack.top,
            }),
        );
        f.contents = Some(Arc::new(stack.contents));
        f.depths = Depths::Image(Arc::new(stack.layout));
        f
    }
}

/// The top of an overlay stack of `layers` Strata layers, writable.
fn overlay_in(dir: Option<&str>, size: u64, cluster: u64, layers: u32) -> Fixture<ImageBackend> {
    let stack = overlay_stack(dir, size, cluster, layers);
    let b = ImageBackend::new(image::open(&stack.top, true).expect("open overlay"));
    Fixture::over_stack(b, size, stack)
}

/// An overlay stack in the system temporary directory, 64 KiB clusters.
fn overlay(size: u64, layers: u32) -> Fixture<ImageBackend> {
    overlay_in(None, size, KIB64, layers)
}

/// An overlay stack opened through `backend::open`, as the command line does.
fn opened_overlay(size: u64, layers: u32) -> Fixture<SharedBackend> {
    let stack = overlay_stack(None, size, KIB4, layers);
    let b = backend::open(stack.top.to_str().unwrap(), false).expect("open overlay path");
    Fixture::over_stack(b, size, stack)
}

/// Zeroes a whole disk so that a reused device starts like a fresh one.
async fn zero_all<B: Backend>(b: &B) {
    let size = b.size();
    b.write_zeroes(0, size, ZeroFlags::default())
        .await
        .expect("zero whole disk");
}
