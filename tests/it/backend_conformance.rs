//! One conformance suite for every backend.
//!
//! The cases in [`cases`] (writable backends) and [`ro_cases`] (read-only stacks) are
//! written once, generically over [`Backend`], and instantiated by the [`conformance!`] and
//! [`read_only!`] macros for each fixture: the in-memory disk, a raw sparse file (in the
//! system temporary directory and in cargo's target directory, which may be different file
//! systems), standalone Strata images (64 KiB and 4 KiB clusters), Strata overlay stacks
//! of 1, 2 and 10 layers over a raw base that holds a known pattern, the same behind
//! `SharedBackend`, and the read-only layers. A property test then drives each backend
//! with random operation sequences against a `Vec<u8>` oracle.
//!
//! A fixture need not start out as zeroes: it says what it holds ([`Fixture::initial`])
//! and which layer of its chain provides each byte ([`Depths`]), and the cases check
//! against that.
//!
//! Setting `STRATA_TEST_BLOCK_DEVICE=/dev/loopN` also runs the suite against that block
//! device. **Its contents are destroyed.** Use a loop device over a sparse file of a few
//! MiB (loop devices make discarded ranges read as zeroes, which the suite checks).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use proptest::prelude::*;
use strata::ErrorKind;
use strata::backend::{
    self, Backend, ImageBackend, MemoryBackend, RawBackend, ReadOnly, SharedBackend, ZeroFlags,
};
use strata::block::{DepthExtent, Extent, ReadChunk};
use strata::image::{self, CreateOptions, ZeroMode};
use tempfile::{NamedTempFile, TempDir};

use crate::support::{ImagesOpen, images_open, scratch};

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

/// A standalone Strata image with `cluster`-byte clusters, served by [`ImageBackend`].
fn image_in(dir: Option<&str>, size: u64, cluster: u64) -> Fixture<ImageBackend> {
    let (tmp, path) = new_image(dir, size, cluster);
    let b = ImageBackend::new(image::open(&path, true).expect("open image"));
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
    let (tmp, path) = new_image(None, size, KIB64);
    let b = backend::open(path.to_str().unwrap(), false).expect("open image path");
    let mut f = Fixture::new(
        b,
        size,
        Some(Guard::Dir {
            _dir: tmp,
            top: path,
        }),
    );
    f.depths = Depths::Image(Arc::new(Layout {
        cluster: KIB64,
        top: 1,
        raw_len: 0,
        owner: vec![0; size.div_ceil(KIB64) as usize],
    }));
    f
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

// ---------------------------------------------------------------------------------------
// Helpers

/// Trims a range and updates the oracle: to zeroes, or (when trimmed ranges need not read
/// as zeroes) to what the disk now holds, after checking that every byte is either its old
/// value or zero.
async fn trim<B: Backend>(
    b: &B,
    trim_zeroes: bool,
    oracle: &mut [u8],
    at: u64,
    len: u64,
    fua: bool,
) {
    b.trim(at, len, fua)
        .await
        .unwrap_or_else(|e| panic!("trim at {at}+{len}: {e}"));
    let expected = &mut oracle[at as usize..][..len as usize];
    if trim_zeroes {
        expected.fill(0);
        return;
    }
    let actual = read(b, at, len).await;
    for (i, (old, new)) in expected.iter_mut().zip(actual).enumerate() {
        assert!(
            new == *old || new == 0,
            "trim at {at}+{len}: byte at {} became {new:#04x}, neither {old:#04x} nor zero",
            at + i as u64
        );
        *old = new;
    }
}

/// Deterministic bytes, never zero, different for every seed and position.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state as u8) | 1
        })
        .collect()
}

async fn write<B: Backend>(b: &B, oracle: &mut [u8], offset: u64, data: Vec<u8>, fua: bool) {
    let end = offset as usize + data.len();
    oracle[offset as usize..end].copy_from_slice(&data);
    b.write(offset, Bytes::from(data), fua)
        .await
        .unwrap_or_else(|e| panic!("write at {offset}: {e}"));
}

async fn read<B: Backend>(b: &B, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(READ_STEP) as usize;
        let data = b
            .read(pos, n)
            .await
            .unwrap_or_else(|e| panic!("read at {pos}+{n}: {e}"));
        assert_eq!(data.len(), n, "read at {pos} returned a short buffer");
        out.extend_from_slice(&data);
        pos += n as u64;
    }
    out
}

/// True when every byte is zero (compared a block at a time: fast even unoptimised).
fn all_zero(data: &[u8]) -> bool {
    static ZEROES: [u8; 4096] = [0; 4096];
    data.chunks(ZEROES.len()).all(|c| c == &ZEROES[..c.len()])
}

/// Panics with the first differing offset unless `actual == expected`.
#[track_caller]
fn assert_same(actual: &[u8], expected: &[u8], base: u64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if actual == expected {
        return;
    }
    if let Some(i) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "{what}: byte at offset {} is {:#04x}, expected {:#04x}",
            base + i as u64,
            actual[i],
            expected[i]
        );
    }
}

/// Reads the whole disk and compares it with the oracle.
async fn check_disk<B: Backend>(b: &B, oracle: &[u8], what: &str) {
    let actual = read(b, 0, oracle.len() as u64).await;
    assert_same(&actual, oracle, 0, what);
}

/// Checks the `block_status` contract for one query and its agreement with the data.
async fn check_status<B: Backend>(b: &B, offset: u64, len: u64) -> Vec<Extent> {
    let extents = b
        .block_status(offset, len)
        .await
        .unwrap_or_else(|e| panic!("block_status at {offset}+{len}: {e}"));
    assert!(
        !extents.is_empty(),
        "block_status at {offset}+{len}: no extents"
    );
    let mut pos = offset;
    for e in &extents {
        assert!(e.length > 0, "empty extent in {extents:?}");
        pos += e.length;
        assert!(
            pos <= offset + len,
            "extents {extents:?} cover more than {len} bytes from {offset}"
        );
    }
    let mut pos = offset;
    for e in &extents {
        if e.zero || e.hole {
            // Verify small extents entirely; sample the ends and middle of huge ones.
            let samples = if e.length <= 8 * READ_STEP {
                vec![(pos, e.length)]
            } else {
                let middle = pos + e.length / 2;
                vec![
                    (pos, READ_STEP),
                    (middle, READ_STEP),
                    (pos + e.length - READ_STEP, READ_STEP),
                ]
            };
            for (at, n) in samples {
                let data = read(b, at, n).await;
                assert!(
                    all_zero(&data),
                    "extent {e:?} at {pos} reported as zero/hole but holds data near {at}"
                );
            }
        }
        pos += e.length;
    }
    extents
}

/// Asserts that no byte of `[offset, offset + len)` is reported as a hole or as zero.
async fn assert_not_hole<B: Backend>(b: &B, offset: u64, len: u64) {
    let mut pos = offset;
    while pos < offset + len {
        let extents = check_status(b, pos, offset + len - pos).await;
        for e in &extents {
            assert!(
                !e.hole && !e.zero,
                "written range at {pos} reported as {e:?}"
            );
            pos += e.length;
        }
    }
}

/// Checks what `allocation_depth` reports for `[offset, offset + len)` after the top layer
/// wrote `written`: a single-layer backend says depth 1 for all of it, holes included (no
/// layer lies below it); a Strata chain names the layer that holds each cluster.
async fn assert_depths<B: Backend>(
    b: &B,
    depths: &Depths,
    written: &[(u64, u64)],
    offset: u64,
    len: u64,
) {
    let extents = b
        .allocation_depth(offset, len)
        .await
        .unwrap_or_else(|e| panic!("allocation_depth at {offset}+{len}: {e}"));
    let expected = match depths {
        Depths::Single => vec![DepthExtent {
            length: len,
            depth: 1,
        }],
        Depths::Image(layout) => layout.depths(written, offset, len),
    };
    assert_eq!(extents, expected, "allocation_depth at {offset}+{len}");
}

/// Reads sparsely, with and without zero-copy for the kernel, and checks that the chunks
/// cover `len` and match a plain read; so does a zero-copy plain read.
async fn check_sparse<B: Backend>(b: &B, offset: u64, len: usize) {
    let plain = read(b, offset, len as u64).await;
    for for_kernel in [false, true] {
        let what = if for_kernel {
            "read_sparse_for_kernel"
        } else {
            "read_sparse"
        };
        let chunks = if for_kernel {
            b.read_sparse_for_kernel(offset, len).await
        } else {
            b.read_sparse(offset, len).await
        }
        .unwrap_or_else(|e| panic!("{what} at {offset}+{len}: {e}"));
        let covered: u64 = chunks.iter().map(ReadChunk::len).sum();
        assert_eq!(covered, len as u64, "{what} chunks {chunks:?}");
        let mut joined = Vec::with_capacity(len);
        for c in &chunks {
            match c {
                ReadChunk::Data(d) => joined.extend_from_slice(d),
                ReadChunk::Zero(n) => joined.resize(joined.len() + *n as usize, 0),
            }
        }
        assert_same(&joined, &plain, offset, &format!("{what} vs read"));
    }
    let mapped = b
        .read_for_kernel(offset, len)
        .await
        .unwrap_or_else(|e| panic!("read_for_kernel at {offset}+{len}: {e}"));
    assert_same(&mapped, &plain, offset, "read_for_kernel vs read");
}

/// Write ranges that start and end off alignment and straddle chunk boundaries.
fn awkward_ranges(size: u64) -> Vec<(u64, u64)> {
    vec![
        (0, 1),
        (1, 511),
        (CHUNK - 1, 2),
        (CHUNK - 100, 3 * CHUNK + 300),
        (5 * CHUNK + 17, CHUNK + 1),
        (12345, 65537),
        (size / 2 - 3, 7),
        (size - 777, 777),
        (size - 1, 1),
    ]
}

// ---------------------------------------------------------------------------------------
// The suite for writable backends

mod cases {
    use super::*;

    pub async fn size<B: Backend>(f: Fixture<B>) {
        assert_eq!(f.b.size(), f.size);
    }

    pub async fn capabilities<B: Backend>(f: Fixture<B>) {
        let caps = f.b.capabilities();
        assert!(!caps.read_only, "{caps:?}");
        assert!(
            caps.flush && caps.fua && caps.trim && caps.write_zeroes,
            "{caps:?}"
        );
        let bs = f.b.block_size();
        assert!(
            bs.minimum.is_power_of_two() && bs.preferred.is_power_of_two(),
            "{bs:?}"
        );
        assert!(
            bs.minimum <= bs.preferred && bs.preferred <= bs.maximum,
            "{bs:?}"
        );
    }

    pub async fn fresh_disk_reads_initial_contents<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let data = read(b, 0, f.size).await;
        match &f.contents {
            None => assert!(all_zero(&data), "fresh disk holds data"),
            Some(c) => assert_same(&data, c, 0, "fresh disk"),
        }
        check_sparse(b, 0, READ_STEP as usize).await;
        check_sparse(b, f.size - 1000, 1000).await;
        check_status(b, 0, f.size).await;
        check_status(b, 3, CHUNK).await;
    }

    pub async fn write_then_read_back<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        for (i, (offset, len)) in awkward_ranges(f.size).into_iter().enumerate() {
            write(
                b,
                &mut oracle,
                offset,
                pattern(i as u64, len as usize),
                false,
            )
            .await;
            let back = read(b, offset, len).await;
            assert_same(
                &back,
                &oracle[offset as usize..][..len as usize],
                offset,
                "read back",
            );
        }
        check_disk(b, &oracle, "after writes").await;
    }

    pub async fn overwrite<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        write(b, &mut oracle, CHUNK - 5000, pattern(1, 20000), false).await;
        write(b, &mut oracle, CHUNK - 10, pattern(2, 20), false).await;
        write(b, &mut oracle, CHUNK - 6000, pattern(3, 1500), false).await;
        write(b, &mut oracle, CHUNK + 14000, pattern(4, 3000), false).await;
        check_disk(b, &oracle, "after overwrites").await;
    }

    pub async fn fua_write<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        write(b, &mut oracle, 4095, pattern(5, 8193), true).await;
        check_disk(b, &oracle, "after FUA write").await;
    }

    pub async fn flush<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        b.flush().await.expect("flush of an idle disk");
        let mut oracle = f.initial();
        write(b, &mut oracle, 100, pattern(6, 300_000), false).await;
        b.flush().await.expect("flush after a write");
        check_disk(b, &oracle, "after flush").await;
    }

    pub async fn trim_reads_zero<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        write(b, &mut oracle, 0, pattern(7, 12 * CHUNK as usize), false).await;
        write(
            b,
            &mut oracle,
            f.size - 3 * CHUNK,
            pattern(8, 3 * CHUNK as usize),
            false,
        )
        .await;
        // Unaligned, chunk-aligned, and reaching the end of the disk.
        for (offset, len, fua) in [
            (CHUNK - 3, 2 * CHUNK + 7, false),
            (6 * CHUNK, 2 * CHUNK, true),
            (10 * CHUNK + 1, 100, false),
            (f.size - CHUNK - 5, CHUNK + 5, false),
        ] {
            trim(b, f.trim_zeroes, &mut oracle, offset, len, fua).await;
            check_disk(b, &oracle, &format!("after trim at {offset}+{len}")).await;
            let around = offset.saturating_sub(CHUNK);
            check_status(b, around, (3 * CHUNK).min(f.size - around)).await;
        }
    }

    pub async fn write_zeroes<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        for no_hole in [false, true] {
            for fua in [false, true] {
                let seed = u64::from(no_hole) * 2 + u64::from(fua);
                write(b, &mut oracle, 0, pattern(seed, 8 * CHUNK as usize), false).await;
                let flags = ZeroFlags {
                    fua,
                    no_hole,
                    fast: false,
                };
                for (offset, len) in [(CHUNK - 1, CHUNK + 2), (3 * CHUNK, 2 * CHUNK), (7, 9)] {
                    b.write_zeroes(offset, len, flags)
                        .await
                        .unwrap_or_else(|e| panic!("write_zeroes {flags:?}: {e}"));
                    oracle[offset as usize..][..len as usize].fill(0);
                }
                check_disk(b, &oracle, &format!("after write_zeroes {flags:?}")).await;
                check_status(b, 0, 8 * CHUNK).await;
                zero_all(b).await;
                oracle.fill(0);
            }
        }
    }

    pub async fn fast_write_zeroes<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        for no_hole in [false, true] {
            write(b, &mut oracle, 0, pattern(9, 4 * CHUNK as usize), false).await;
            let flags = ZeroFlags {
                fua: false,
                no_hole,
                fast: true,
            };
            match b.write_zeroes(CHUNK / 2, 2 * CHUNK, flags).await {
                Ok(()) => oracle[(CHUNK / 2) as usize..][..2 * CHUNK as usize].fill(0),
                Err(e) if e.kind() == ErrorKind::NotSupported => {}
                Err(e) => panic!("fast write_zeroes failed with {e:?}"),
            }
            check_disk(b, &oracle, &format!("after write_zeroes {flags:?}")).await;
        }
    }

    pub async fn block_status<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        let ranges = awkward_ranges(f.size);
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            write(
                b,
                &mut oracle,
                offset,
                pattern(10 + i as u64, len as usize),
                false,
            )
            .await;
        }
        for &(offset, len) in &ranges {
            assert_not_hole(b, offset, len).await;
        }
        for (offset, len) in [
            (0, f.size),
            (1, 2 * CHUNK),
            (CHUNK - 1, 1),
            (CHUNK + 1, 7 * CHUNK - 2),
            (f.size - CHUNK - 3, CHUNK + 3),
            (f.size - 1, 1),
        ] {
            check_status(b, offset, len).await;
        }
    }

    pub async fn allocation_depth<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        for (offset, len) in [(0, f.size), (f.size - 1, 1)] {
            assert_depths(b, &f.depths, &[], offset, len).await;
        }
        let written = [(CHUNK + 5, 2 * CHUNK), (f.size - 3, 2)];
        for (i, &(at, len)) in written.iter().enumerate() {
            write(
                b,
                &mut oracle,
                at,
                pattern(60 + i as u64, len as usize),
                false,
            )
            .await;
        }
        for (offset, len) in [
            (0, f.size),
            (0, CHUNK),
            (CHUNK + 5, 2 * CHUNK),
            (CHUNK - 1, 5 * CHUNK),
            (f.size - 1, 1),
            (f.size - CHUNK - 1, CHUNK + 1),
        ] {
            assert_depths(b, &f.depths, &written, offset, len).await;
        }
        check_disk(b, &oracle, "after writes").await;
    }

    pub async fn read_sparse<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        write(b, &mut oracle, CHUNK + 10, pattern(11, 100), false).await;
        write(
            b,
            &mut oracle,
            3 * CHUNK,
            pattern(12, CHUNK as usize),
            false,
        )
        .await;
        write(b, &mut oracle, 6 * CHUNK - 1, pattern(13, 2), false).await;
        for (offset, len) in [
            (0, 8 * CHUNK as usize),
            (CHUNK + 10, 100),
            (CHUNK + 5, 3 * CHUNK as usize),
            (3 * CHUNK - 1, CHUNK as usize + 2),
            (f.size - 100, 100),
            (77, 1),
        ] {
            check_sparse(b, offset, len).await;
        }
    }

    pub async fn concurrent_writes<B: Backend>(f: Fixture<B>) {
        const TASKS: u64 = 8;
        const PIECES: u64 = 24;
        // Interleaved, unaligned pieces: neighbouring tasks share chunks.
        const PIECE: u64 = 4099;
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let b = Arc::clone(&f.b);
            tasks.spawn(async move {
                for i in 0..PIECES {
                    let offset = (i * TASKS + t) * PIECE;
                    let data = Bytes::from(pattern(offset, PIECE as usize));
                    b.write(offset, data, false)
                        .await
                        .expect("concurrent write");
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("writer task");
        }
        let mut oracle = f.initial();
        for k in 0..TASKS * PIECES {
            let offset = k * PIECE;
            oracle[offset as usize..][..PIECE as usize]
                .copy_from_slice(&pattern(offset, PIECE as usize));
        }
        check_disk(&*f.b, &oracle, "after concurrent writes").await;
    }

    pub async fn cache<B: Backend>(f: Fixture<B>) {
        f.b.cache(0, f.size).await.expect("cache whole disk");
        f.b.cache(12345, 678).await.expect("cache a range");
    }
}

/// Instantiates every case of [`cases`] for a fixture expression of type
/// `Option<Fixture<_>>` (`None` skips).
macro_rules! conformance {
    ($suite:ident, $fixture:expr) => {
        conformance!(@cases $suite, $fixture, [
            size, capabilities, fresh_disk_reads_initial_contents, write_then_read_back, overwrite,
            fua_write, flush, trim_reads_zero, write_zeroes, fast_write_zeroes, block_status,
            allocation_depth, read_sparse, concurrent_writes, cache
        ]);
    };
    (@cases $suite:ident, $fixture:expr, [$($case:ident),*]) => {
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
                    cases::$case(fixture).await;
                }
            )*
        }
    };
}

conformance!(memory_backend, Some(memory(SIZE)));
conformance!(raw_file, Some(raw(SIZE)));
conformance!(raw_file_in_target_dir, Some(raw_target(SIZE)));
conformance!(shared_memory, Some(memory(SIZE).shared()));
conformance!(shared_raw_file, Some(raw(SIZE).shared()));
conformance!(opened_memory_spec, Some(opened_memory(SIZE)));
conformance!(opened_raw_path, Some(opened_raw(SIZE)));
conformance!(image_64k, Some(image_file(SIZE, KIB64)));
conformance!(image_4k, Some(image_file(SIZE, KIB4)));
conformance!(image_64k_in_target_dir, Some(image_target(SIZE, KIB64)));
conformance!(image_4k_in_target_dir, Some(image_target(SIZE, KIB4)));
conformance!(shared_image, Some(image_file(SIZE, KIB4).shared()));
conformance!(opened_image_path, Some(opened_image(SIZE)));
conformance!(overlay_depth_1, Some(overlay(SIZE, 1)));
conformance!(overlay_depth_2, Some(overlay(SIZE, 2)));
conformance!(overlay_depth_10, Some(overlay(SIZE, 10)));
conformance!(
    overlay_4k_in_target_dir,
    Some(overlay_in(Some(env!("CARGO_TARGET_TMPDIR")), SIZE, KIB4, 2))
);
conformance!(shared_overlay, Some(overlay(SIZE, 2).shared()));
// Files in memory take the zero-copy read paths (replies point into mappings).
conformance!(
    raw_file_in_memory,
    crate::support::memory_dir().map(|d| raw_in(Some(d), SIZE, false))
);
conformance!(
    shared_raw_file_in_memory,
    crate::support::memory_dir().map(|d| raw_in(Some(d), SIZE, false).shared())
);
conformance!(
    image_64k_in_memory,
    crate::support::memory_dir().map(|d| image_in(Some(d), SIZE, KIB64))
);
conformance!(
    image_4k_in_memory,
    crate::support::memory_dir().map(|d| image_in(Some(d), SIZE, KIB4))
);
conformance!(
    overlay_depth_2_in_memory,
    crate::support::memory_dir().map(|d| overlay_in(Some(d), SIZE, KIB64, 2))
);
conformance!(
    overlay_4k_depth_10_in_memory,
    crate::support::memory_dir().map(|d| overlay_in(Some(d), SIZE, KIB4, 10))
);
conformance!(opened_overlay_path, Some(opened_overlay(SIZE, 10)));
conformance!(block_device_raw, {
    let f = block_device(false);
    if let Some(f) = &f {
        zero_all(&*f.b).await;
    }
    f
});
conformance!(block_device_shared, {
    let f = block_device(false).map(Fixture::shared);
    if let Some(f) = &f {
        zero_all(&*f.b).await;
    }
    f
});

// ---------------------------------------------------------------------------------------
// The suite for read-only stacks

/// A read-only stack over a disk whose contents are known.
struct Prefilled<B> {
    f: Fixture<B>,
    contents: Vec<u8>,
    /// What the prefill wrote through the top layer.
    written: Vec<(u64, u64)>,
}

/// Writes known data through a writable fixture, then wraps it read-only with `wrap`.
async fn prefill<W: Backend, B: Backend>(
    f: Fixture<W>,
    wrap: impl FnOnce(Fixture<W>) -> Fixture<B>,
) -> Prefilled<B> {
    if f.needs_reset {
        zero_all(&*f.b).await;
    }
    let mut contents = f.initial();
    let written = vec![(CHUNK - 7, 3 * CHUNK), (f.size - 10, 10)];
    for (i, &(at, len)) in written.iter().enumerate() {
        let data = pattern(20 + i as u64, len as usize);
        write(&*f.b, &mut contents, at, data, false).await;
    }
    f.b.flush().await.expect("flush");
    Prefilled {
        f: wrap(f),
        contents,
        written,
    }
}

/// Prefills a raw file, then reopens it read-only with `reopen`.
async fn prefill_file<B: Backend>(reopen: impl FnOnce(&str) -> B) -> Prefilled<B> {
    let Prefilled {
        f,
        contents,
        written,
    } = prefill(raw(SIZE), |f| f).await;
    let Some(Guard::File(file)) = f._guard else {
        unreachable!("raw fixtures hold their file")
    };
    let b = reopen(file.path().to_str().unwrap());
    Prefilled {
        f: Fixture::new(b, SIZE, Some(Guard::File(file))),
        contents,
        written,
    }
}

/// Prefills an image fixture, closes it, then reopens its top image read-only with
/// `reopen`.
async fn prefill_image<W: Backend, B: Backend>(
    f: Fixture<W>,
    reopen: impl FnOnce(&Path) -> B,
) -> Prefilled<B> {
    let Prefilled {
        f,
        contents,
        written,
    } = prefill(f, |f| f).await;
    let Fixture {
        b,
        size,
        depths,
        _guard,
        ..
    } = f;
    // Closing the writable image releases its lock, so it can be opened again.
    drop(Arc::into_inner(b).expect("fixture not shared"));
    let Some(Guard::Dir { top, .. }) = &_guard else {
        unreachable!("image fixtures hold their directory")
    };
    let b = reopen(top);
    let mut f = Fixture::new(b, size, _guard);
    f.depths = depths;
    Prefilled {
        f,
        contents,
        written,
    }
}

mod ro_cases {
    use super::*;

    pub async fn capabilities<B: Backend>(p: Prefilled<B>) {
        let caps = p.f.b.capabilities();
        assert!(caps.read_only, "{caps:?}");
        assert!(
            !caps.fua && !caps.trim && !caps.write_zeroes && !caps.fast_zero,
            "{caps:?}"
        );
        assert_eq!(p.f.b.size(), p.f.size);
    }

    pub async fn reads_pass_through<B: Backend>(p: Prefilled<B>) {
        let b = &*p.f.b;
        check_disk(b, &p.contents, "read-only read").await;
        check_sparse(b, 0, 5 * CHUNK as usize).await;
        check_sparse(b, p.f.size - 100, 100).await;
        check_status(b, 0, p.f.size).await;
        assert_not_hole(b, CHUNK - 7, 3 * CHUNK).await;
        assert_depths(b, &p.f.depths, &p.written, 0, p.f.size).await;
        assert_depths(b, &p.f.depths, &p.written, 5 * CHUNK, CHUNK).await;
        b.cache(0, CHUNK).await.expect("cache");
    }

    pub async fn refuses_modification<B: Backend>(p: Prefilled<B>) {
        let b = &*p.f.b;
        let refused = |what: &str, r: strata::Result<()>| match r {
            Err(e) => assert_eq!(e.kind(), ErrorKind::ReadOnly, "{what}: {e}"),
            Ok(()) => panic!("{what} succeeded on a read-only stack"),
        };
        for fua in [false, true] {
            let data = Bytes::from(pattern(22, 5000));
            refused("write", b.write(CHUNK, data, fua).await);
            refused("trim", b.trim(0, 2 * CHUNK, fua).await);
        }
        for (fua, no_hole, fast) in [
            (false, false, false),
            (true, true, false),
            (false, false, true),
        ] {
            let flags = ZeroFlags { fua, no_hole, fast };
            refused("write_zeroes", b.write_zeroes(0, 2 * CHUNK, flags).await);
        }
        check_disk(b, &p.contents, "after refused modifications").await;
    }
}

/// Instantiates every case of [`ro_cases`] for an expression evaluating (with `.await`
/// allowed) to `Option<Prefilled<_>>`.
macro_rules! read_only {
    ($suite:ident, $prefilled:expr) => {
        read_only!(@cases $suite, $prefilled,
            [capabilities, reads_pass_through, refuses_modification]);
    };
    (@cases $suite:ident, $prefilled:expr, [$($case:ident),*]) => {
        mod $suite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let prefilled: Option<_> = $prefilled;
                    let Some(prefilled) = prefilled else {
                        eprintln!("skipped: STRATA_TEST_BLOCK_DEVICE is not set");
                        return;
                    };
                    ro_cases::$case(prefilled).await;
                }
            )*
        }
    };
}

read_only!(
    read_only_memory,
    Some(prefill(memory(SIZE), Fixture::read_only).await)
);
read_only!(
    read_only_shared_memory,
    Some(prefill(memory(SIZE), |f| f.shared().read_only()).await)
);
read_only!(
    read_only_raw_file,
    Some(prefill(raw(SIZE), Fixture::read_only).await)
);
read_only!(
    raw_file_opened_read_only,
    Some(prefill_file(|path| RawBackend::open(path, true).expect("open read-only")).await)
);
read_only!(
    opened_path_read_only,
    Some(prefill_file(|path| backend::open(path, true).expect("open read-only")).await)
);
read_only!(
    read_only_image,
    Some(prefill(image_file(SIZE, KIB64), Fixture::read_only).await)
);
read_only!(
    read_only_overlay,
    Some(prefill(overlay(SIZE, 2), Fixture::read_only).await)
);
read_only!(
    image_opened_read_only,
    Some(
        prefill_image(image_file(SIZE, KIB4), |path| {
            ImageBackend::new(image::open(path, false).expect("open read-only"))
        })
        .await
    )
);
read_only!(
    image_path_opened_read_only,
    Some(
        prefill_image(image_file(SIZE, KIB64), |path| {
            backend::open(path.to_str().unwrap(), true).expect("open read-only")
        })
        .await
    )
);
read_only!(
    overlay_opened_read_only,
    Some(
        prefill_image(overlay(SIZE, 10), |path| {
            ImageBackend::new(image::open(path, false).expect("open read-only"))
        })
        .await
    )
);
read_only!(
    overlay_path_opened_read_only,
    Some(
        prefill_image(overlay(SIZE, 2), |path| {
            backend::open(path.to_str().unwrap(), true).expect("open read-only")
        })
        .await
    )
);
read_only!(read_only_block_device, {
    match block_device(false) {
        Some(f) => Some(prefill(f, Fixture::read_only).await),
        None => None,
    }
});

// ---------------------------------------------------------------------------------------
// Backend-specific behaviour

#[tokio::test]
async fn memory_disk_of_many_tib_stays_sparse() {
    const TIB: u64 = 1 << 40;
    let size = 64 * TIB + 4321;
    let b = MemoryBackend::new(size);
    let writes = [(0, 10), (size - 10, 10), (17 * TIB - 5, 10)];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data = Bytes::from(pattern(30 + i as u64, len as usize));
        b.write(offset, data.clone(), false).await.unwrap();
        assert_eq!(b.read(offset, len as usize).await.unwrap(), data);
    }
    // The write at 17 TiB - 5 straddles two chunks.
    assert_eq!(b.allocated_bytes(), 4 * CHUNK);
    let extents = check_status(&b, 0, size).await;
    let expected = vec![
        Extent::data(CHUNK),
        Extent::hole(17 * TIB - 2 * CHUNK),
        Extent::data(2 * CHUNK),
        Extent::hole(size - size % CHUNK - 17 * TIB - CHUNK),
        Extent::data(size % CHUNK),
    ];
    assert_eq!(extents, expected);
    let chunks = b
        .read_sparse(17 * TIB - 3 * CHUNK, 6 * CHUNK as usize)
        .await
        .unwrap();
    // Holes come back as zero runs; data as one or more pieces in between.
    let n = chunks.len();
    assert!(n >= 3, "{chunks:?}");
    assert_eq!(chunks[0], ReadChunk::Zero(2 * CHUNK));
    assert_eq!(chunks[n - 1], ReadChunk::Zero(2 * CHUNK));
    assert!(
        chunks[1..n - 1]
            .iter()
            .all(|c| matches!(c, ReadChunk::Data(_))),
        "{chunks:?}"
    );
    let data: u64 = chunks[1..n - 1].iter().map(ReadChunk::len).sum();
    assert_eq!(data, 2 * CHUNK);
    b.trim(0, size, false).await.unwrap();
    assert_eq!(b.allocated_bytes(), 0);
    assert_eq!(
        b.block_status(0, size).await.unwrap(),
        vec![Extent::hole(size)]
    );
}

/// Sparse reads of a memory disk share its chunks; a write to a chunk that a pending
/// read still holds must leave that read's bytes as they were.
#[tokio::test]
async fn memory_reads_keep_their_bytes_across_later_writes() {
    let b = MemoryBackend::new(SIZE);
    let old = pattern(7, 3 * CHUNK as usize);
    b.write(CHUNK, Bytes::from(old.clone()), false)
        .await
        .unwrap();
    let held = b
        .read_sparse(CHUNK + 100, 2 * CHUNK as usize)
        .await
        .unwrap();
    let joined = |chunks: &[ReadChunk]| -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            match c {
                ReadChunk::Data(d) => out.extend_from_slice(d),
                ReadChunk::Zero(n) => out.resize(out.len() + *n as usize, 0),
            }
        }
        out
    };
    let expect = old[100..100 + 2 * CHUNK as usize].to_vec();
    assert_eq!(joined(&held), expect);
    // Overwrite, zero and trim under the pending read.
    b.write(CHUNK + 50, Bytes::from(vec![0xEE; 4096]), false)
        .await
        .unwrap();
    let flags = ZeroFlags {
        no_hole: true,
        ..ZeroFlags::default()
    };
    b.write_zeroes(2 * CHUNK, CHUNK, flags).await.unwrap();
    b.trim(CHUNK + 8192, 1000, false).await.unwrap();
    assert_eq!(joined(&held), expect, "a pending read saw a later write");
    // New reads see the new contents.
    let now = joined(&b.read_sparse(CHUNK, 3 * CHUNK as usize).await.unwrap());
    assert_eq!(&now[50..50 + 4096], &[0xEE; 4096][..]);
    assert!(
        now[CHUNK as usize..2 * CHUNK as usize]
            .iter()
            .all(|&x| x == 0)
    );
    assert_eq!(now[8192..9192], vec![0u8; 1000][..]);
    assert_eq!(&now[2 * CHUNK as usize..], &old[2 * CHUNK as usize..]);
    drop(held);
    assert_eq!(b.allocated_bytes(), 3 * CHUNK);
}

#[tokio::test]
async fn memory_zeroing_frees_chunks_unless_no_hole() {
    let b = MemoryBackend::new(SIZE);
    let full = Bytes::from(pattern(40, 4 * CHUNK as usize));
    b.write(0, full.clone(), false).await.unwrap();
    assert_eq!(b.allocated_bytes(), 4 * CHUNK);

    let no_hole = ZeroFlags {
        no_hole: true,
        ..ZeroFlags::default()
    };
    b.write_zeroes(0, CHUNK + 10, no_hole).await.unwrap();
    assert_eq!(
        b.allocated_bytes(),
        4 * CHUNK,
        "no_hole must not free chunks"
    );
    assert_eq!(
        b.block_status(0, CHUNK).await.unwrap(),
        vec![Extent::data(CHUNK)]
    );

    b.write_zeroes(CHUNK, 2 * CHUNK, ZeroFlags::default())
        .await
        .unwrap();
    // Chunks 1 and 2 were wholly covered: both freed.
    assert_eq!(b.allocated_bytes(), 2 * CHUNK);
    b.trim(3 * CHUNK + 1, CHUNK - 1, false).await.unwrap();
    assert_eq!(b.allocated_bytes(), 2 * CHUNK, "chunk 3 still holds a byte");
    b.trim(3 * CHUNK, 1, false).await.unwrap();
    assert_eq!(b.allocated_bytes(), CHUNK);
    assert_eq!(
        b.block_status(0, 4 * CHUNK).await.unwrap(),
        vec![Extent::data(CHUNK), Extent::hole(3 * CHUNK)]
    );
    assert!(all_zero(&read(&b, 0, 4 * CHUNK).await));
}

#[tokio::test]
async fn raw_sparse_file_reports_holes() {
    let f = raw(SIZE);
    let b = &*f.b;
    assert_eq!(
        b.block_status(0, SIZE).await.unwrap(),
        vec![Extent::hole(SIZE)],
        "a fresh sparse file is one hole"
    );
    b.write(CHUNK, Bytes::from(pattern(50, 3 * CHUNK as usize)), false)
        .await
        .unwrap();
    assert_not_hole(b, CHUNK, 3 * CHUNK).await;
    b.trim(2 * CHUNK, CHUNK, false).await.unwrap();
    let extents = check_status(b, 2 * CHUNK, CHUNK).await;
    assert!(
        extents.iter().any(|e| e.hole),
        "a punched range shows a hole: {extents:?}"
    );
}

#[tokio::test]
async fn raw_read_past_end_of_shrunk_file_is_an_error() {
    let f = raw(SIZE);
    let Some(Guard::File(file)) = &f._guard else {
        unreachable!("raw fixtures hold their file")
    };
    file.as_file().set_len(CHUNK).unwrap();
    let err = f.b.read(CHUNK - 10, 100).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.to_string().contains("read"), "{err}");
    // Allocation queries past the new end see a hole rather than failing.
    let extents = f.b.block_status(2 * CHUNK, CHUNK).await.unwrap();
    assert_eq!(extents, vec![Extent::hole(CHUNK)]);
}

#[test]
fn raw_open_errors_name_the_path() {
    let (dir, missing) = scratch("no-such-image.raw");
    let missing = missing.to_str().unwrap();
    let err = RawBackend::open(missing, false).unwrap_err();
    assert!(err.to_string().contains(missing), "{err}");

    let dir_path = dir.path().to_str().unwrap();
    for read_only in [false, true] {
        let err = RawBackend::open(dir_path, read_only).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains(dir_path), "{err}");
        assert!(err.to_string().contains("directory"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------
// Model test: random operations against a Vec<u8> oracle

/// Size of the model-tested disks.
const MODEL_SIZE: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write {
        at: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    Read {
        at: u64,
        len: u64,
    },
    ReadSparse {
        at: u64,
        len: u64,
    },
    Trim {
        at: u64,
        len: u64,
    },
    WriteZeroes {
        at: u64,
        len: u64,
        flags: ZeroFlags,
    },
    BlockStatus {
        at: u64,
        len: u64,
    },
    Flush,
}

fn position() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![
        any::<u64>(),
        // Near a chunk boundary.
        (0u64..64, 0u64..16).prop_map(|(k, d)| (k * CHUNK + d).wrapping_sub(8)),
    ]
}

fn length() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![1u64..600, 1u64..3 * CHUNK]
}

fn op() -> impl Strategy<Value = Op> {
    let range = (position(), length());
    prop_oneof![
        5 => (range.clone(), any::<u8>(), prop::bool::weighted(0.1))
            .prop_map(|((at, len), seed, fua)| Op::Write { at, len, seed, fua }),
        3 => range.clone().prop_map(|(at, len)| Op::Read { at, len }),
        1 => range.clone().prop_map(|(at, len)| Op::ReadSparse { at, len }),
        2 => range.clone().prop_map(|(at, len)| Op::Trim { at, len }),
        2 => (range.clone(), any::<bool>(), prop::bool::weighted(0.3)).prop_map(
            |((at, len), no_hole, fast)| Op::WriteZeroes {
                at,
                len,
                flags: ZeroFlags { fua: false, no_hole, fast },
            }
        ),
        1 => range.prop_map(|(at, len)| Op::BlockStatus { at, len }),
        1 => Just(Op::Flush),
    ]
}

/// Maps a generated range into the disk (non-empty, in bounds).
fn clamp(size: u64, at: u64, len: u64) -> (u64, u64) {
    let at = at % size;
    (at, len.min(size - at).max(1))
}

/// Applies `ops` to the backend and the oracle, which starts as `oracle`, comparing every
/// read.
async fn run_model<B: Backend>(
    b: &B,
    trim_zeroes: bool,
    mut oracle: Vec<u8>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let size = b.size();
    for op in ops {
        match *op {
            Op::Write { at, len, seed, fua } => {
                let (at, len) = clamp(size, at, len);
                let data = pattern((u64::from(seed) << 32) | at, len as usize);
                oracle[at as usize..][..len as usize].copy_from_slice(&data);
                b.write(at, Bytes::from(data), fua).await.unwrap();
            }
            Op::Read { at, len } => {
                let (at, len) = clamp(size, at, len);
                let data = b.read(at, len as usize).await.unwrap();
                prop_assert!(
                    data[..] == oracle[at as usize..][..len as usize],
                    "read at {}+{} differs from the oracle",
                    at,
                    len
                );
            }
            Op::ReadSparse { at, len } => {
                let (at, len) = clamp(size, at, len);
                check_sparse(b, at, len as usize).await;
            }
            Op::Trim { at, len } => {
                let (at, len) = clamp(size, at, len);
                trim(b, trim_zeroes, &mut oracle, at, len, false).await;
            }
            Op::WriteZeroes { at, len, flags } => {
                let (at, len) = clamp(size, at, len);
                match b.write_zeroes(at, len, flags).await {
                    Ok(()) => oracle[at as usize..][..len as usize].fill(0),
                    Err(e) if flags.fast && e.kind() == ErrorKind::NotSupported => {}
                    Err(e) => panic!("write_zeroes {flags:?} at {at}+{len}: {e}"),
                }
            }
            Op::BlockStatus { at, len } => {
                let (at, len) = clamp(size, at, len);
                check_status(b, at, len).await;
            }
            Op::Flush => b.flush().await.unwrap(),
        }
    }
    let all = read(b, 0, size).await;
    prop_assert!(all == oracle, "final contents differ from the oracle");
    Ok(())
}

/// Runs one model case on a fresh fixture, on a small runtime of its own.
fn model<B: Backend>(
    make: impl FnOnce() -> Option<Fixture<B>>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let Some(f) = make() else { return Ok(()) };
        if f.needs_reset {
            zero_all(&*f.b).await;
        }
        // The oracle starts from what the disk reads as, which must be what the fixture
        // says it holds.
        let start = read(&*f.b, 0, f.size).await;
        prop_assert!(
            start == f.initial(),
            "initial contents differ from the fixture's"
        );
        run_model(&*f.b, f.trim_zeroes, start, ops).await
    })
}

proptest! {
    #![proptest_config(crate::support::proptest_cases(48))]

    #[test]
    fn model_memory(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(memory(MODEL_SIZE)), &ops)?;
    }

    #[test]
    fn model_memory_unaligned_size(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(memory(MODEL_SIZE - 4097)), &ops)?;
    }

    #[test]
    fn model_raw_file(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(raw(MODEL_SIZE - 4097)), &ops)?;
    }

    #[test]
    fn model_raw_file_in_target_dir(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(raw_target(MODEL_SIZE)), &ops)?;
    }

    #[test]
    fn model_shared_memory(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(memory(MODEL_SIZE).shared()), &ops)?;
    }

    #[test]
    fn model_shared_raw_file(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(raw(MODEL_SIZE).shared()), &ops)?;
    }

    #[test]
    fn model_image_64k(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(image_file(MODEL_SIZE - 4097, KIB64)), &ops)?;
    }

    #[test]
    fn model_image_4k(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(image_file(MODEL_SIZE, KIB4)), &ops)?;
    }

    #[test]
    fn model_image_in_target_dir(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(image_target(MODEL_SIZE - 4097, KIB4)), &ops)?;
    }

    #[test]
    fn model_overlay_depth_1(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(overlay_in(None, MODEL_SIZE - 4097, KIB4, 1)), &ops)?;
    }

    #[test]
    fn model_overlay_depth_2(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(overlay_in(None, MODEL_SIZE, KIB64, 2)), &ops)?;
    }

    #[test]
    fn model_overlay_depth_10(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(overlay_in(None, MODEL_SIZE - 4097, KIB4, 10)), &ops)?;
    }

    #[test]
    fn model_block_device(ops in prop::collection::vec(op(), 1..40)) {
        model(|| block_device(false), &ops)?;
    }
}

// ---------------------------------------------------------------------------------------
// Layers pass allocation depth through

/// A stand-in for a two-layer image (the top layer holds the first chunk, its backing the
/// next two, nothing the rest), for checking that wrappers pass depths through instead of
/// falling back to the single-layer default.
struct TwoLayers;

impl TwoLayers {
    const LAYOUT: [(u64, u32); 3] = [(CHUNK, 1), (2 * CHUNK, 2), (CHUNK, 0)];
}

impl Backend for TwoLayers {
    fn size(&self) -> u64 {
        TwoLayers::LAYOUT.iter().map(|l| l.0).sum()
    }

    fn capabilities(&self) -> backend::Capabilities {
        backend::Capabilities::NONE
    }

    async fn read(&self, _offset: u64, len: usize) -> strata::Result<Bytes> {
        Ok(Bytes::from(vec![0; len]))
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> strata::Result<()> {
        Ok(())
    }

    async fn allocation_depth(&self, offset: u64, len: u64) -> strata::Result<Vec<DepthExtent>> {
        let (end, mut start, mut out) = (offset + len, 0, Vec::new());
        for (length, depth) in TwoLayers::LAYOUT {
            let (from, to) = (start.max(offset), (start + length).min(end));
            if from < to {
                out.push(DepthExtent {
                    length: to - from,
                    depth,
                });
            }
            start += length;
        }
        Ok(out)
    }
}

#[tokio::test]
async fn layers_pass_allocation_depth_through() {
    let query = (CHUNK / 2, 3 * CHUNK);
    let expected = vec![
        DepthExtent {
            length: CHUNK / 2,
            depth: 1,
        },
        DepthExtent {
            length: 2 * CHUNK,
            depth: 2,
        },
        DepthExtent {
            length: CHUNK / 2,
            depth: 0,
        },
    ];
    let depth = |r: strata::Result<Vec<DepthExtent>>| r.expect("allocation_depth");
    assert_eq!(
        depth(TwoLayers.allocation_depth(query.0, query.1).await),
        expected
    );
    let shared: SharedBackend = Arc::new(TwoLayers);
    assert_eq!(
        depth(shared.allocation_depth(query.0, query.1).await),
        expected,
        "SharedBackend"
    );
    assert_eq!(
        depth(
            ReadOnly::new(TwoLayers)
                .allocation_depth(query.0, query.1)
                .await
        ),
        expected,
        "ReadOnly"
    );
    assert_eq!(
        depth(
            ReadOnly::new(shared)
                .allocation_depth(query.0, query.1)
                .await
        ),
        expected,
        "ReadOnly over SharedBackend"
    );
}
