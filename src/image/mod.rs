//! Strata images: a crash-safe sparse format with copy-on-write backing chains.
//!
//! - [`format`](mod@format): the on-disk layout, as pure encode/decode functions.
//! - [`storage`]: positional I/O on the file under a layer ([`storage::FileStorage`]) and
//!   a simulated disk for crash tests ([`sim::SimStorage`]).
//! - [`layer`]: reading and verifying one image's metadata (shared by open and check).
//! - [`map`]: the merged cluster map and the free list.
//! - [`chain`]: the engine: reads through the chain, copy-on-write writes, zeroing,
//!   commits.
//!
//! This module adds the file-level operations: probing a file's format, creating images,
//! opening whole chains (with backing files resolved, verified and shared between
//! overlays), and rewriting headers.

pub mod chain;
pub mod format;
pub mod layer;
pub mod map;
pub mod sim;
pub mod snapshot;
pub mod storage;
pub mod tools;

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

pub use chain::{Chain, Lower, ZeroMode};
use format::{Backing, BackingKind, Header};
use storage::{FileStorage, Storage};

use crate::error::{Error, ErrorKind, Result};

/// Deepest backing chain accepted; deeper chains are almost certainly a loop or a mistake.
pub const MAX_CHAIN_DEPTH: usize = 1000;

/// What a file holds, judged from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A Strata image.
    Strata,
    /// Anything without a recognised signature: served as raw bytes.
    Raw,
    /// Another tool's image format, which Strata does not read.
    Foreign(&'static str),
}

/// How a file is to be read, as the command line, the configuration file and the
/// control API say it (`auto`, `raw`, `strata`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum FormatChoice {
    /// A Strata image if the file starts with the Strata signature, raw otherwise
    /// (other tools' image formats are refused).
    #[default]
    Auto,
    /// The file's bytes as they are.
    Raw,
    /// A Strata image.
    Strata,
}

impl FormatChoice {
    /// The format to force, or `None` to detect it from the file.
    pub fn forced(self) -> Option<Format> {
        match self {
            FormatChoice::Auto => None,
            FormatChoice::Raw => Some(Format::Raw),
            FormatChoice::Strata => Some(Format::Strata),
        }
    }
}

/// Recognises the format of the first bytes of a file.
pub fn detect(head: &[u8]) -> Format {
    if format::has_magic(head) {
        return Format::Strata;
    }
    let starts = |sig: &[u8]| head.len() >= sig.len() && &head[..sig.len()] == sig;
    if starts(b"QFI\xfb") {
        Format::Foreign("qcow2")
    } else if starts(b"vhdxfile") {
        Format::Foreign("vhdx")
    } else if starts(b"KDMV") || starts(b"# Disk DescriptorFile") {
        Format::Foreign("vmdk")
    } else if head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        Format::Foreign("vdi")
    } else if starts(b"QED\0") {
        Format::Foreign("qed")
    } else {
        Format::Raw
    }
}

/// Reads the first bytes of `path` and says what it holds.
pub fn probe(path: &Path) -> Result<Format> {
    use std::io::Read;
    let mut head = [0u8; 512];
    let mut file =
        std::fs::File::open(path).map_err(|e| Error::from(e).with_op("open").with_path(path))?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from(e).with_op("open").with_path(path)),
        }
    }
    Ok(detect(&head[..n]))
}

/// Refuses a foreign format with a message that says what to do instead.
pub fn refuse_foreign(path: &Path, name: &str) -> Error {
    Error::msg(
        ErrorKind::InvalidInput,
        format!(
            "this is a {name} image, which Strata does not read; convert it first \
             (qemu-img convert -O raw), or pass --format raw to serve its bytes as they are"
        ),
    )
    .with_op("open")
    .with_path(path)
}

/// A content fingerprint of a raw backing file: its size and CRC32s of its first
/// 64 KiB and of 64 blocks spread across it. It recognises a swapped or rewritten base,
/// not every small edit.
pub fn fingerprint(storage: &dyn Storage, size: u64) -> std::io::Result<[u8; 16]> {
    const BLOCK: u64 = 4096;
    const SAMPLES: u64 = 64;
    let mut head = vec![0u8; 65536.min(size) as usize];
    storage.read_at(&mut head, 0)?;
    let mut spread = crc32fast::Hasher::new();
    spread.update(&size.to_le_bytes());
    let mut block = vec![0u8; BLOCK as usize];
    for i in 0..SAMPLES {
        let at = (size.saturating_sub(BLOCK) / (SAMPLES - 1)) * i;
        let n = BLOCK.min(size.saturating_sub(at)) as usize;
        storage.read_at(&mut block[..n], at)?;
        spread.update(&block[..n]);
    }
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&size.to_le_bytes());
    id[8..12].copy_from_slice(&crc32fast::hash(&head).to_le_bytes());
    id[12..].copy_from_slice(&spread.finalize().to_le_bytes());
    Ok(id)
}

/// Random bytes from the kernel, for image identities.
pub(crate) fn random_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    crate::sys::random_bytes(&mut id).map_err(|e| Error::from(e).with_op("getrandom"))?;
    Ok(id)
}

/// Formats an image identity for people.
pub fn format_id(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Options for [`create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Virtual size; defaults to the backing file's size.
    pub size: Option<u64>,
    /// Cluster size in bytes; defaults to the backing's (for a Strata backing) or 64 KiB.
    pub cluster_size: Option<u64>,
    /// Backing file, as a path relative to the current directory or absolute.
    pub backing: Option<PathBuf>,
}

/// Where an overlay's header should point to reach `backing` (a path valid from the
/// current directory): relative paths are made relative to the overlay's directory.
pub fn backing_reference(image: &Path, backing: &Path) -> Result<String> {
    let text = if backing.is_absolute() {
        backing.to_path_buf()
    } else {
        let abs_backing = std::path::absolute(backing)
            .map_err(|e| Error::from(e).with_op("resolve backing").with_path(backing))?;
        let abs_image = std::path::absolute(image)
            .map_err(|e| Error::from(e).with_op("resolve image").with_path(image))?;
        let dir = abs_image.parent().unwrap_or(Path::new("/"));
        relative_to(&normalize(&abs_backing), &normalize(dir))
    };
    text.to_str().map(str::to_owned).ok_or_else(|| {
        Error::msg(ErrorKind::InvalidInput, "backing path is not valid UTF-8").with_path(backing)
    })
}

/// Removes `.` and resolves `..` lexically.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn relative_to(target: &Path, base: &Path) -> PathBuf {
    let t: Vec<_> = target.components().collect();
    let b: Vec<_> = base.components().collect();
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// Resolves a backing reference stored in `image`'s header to a path.
pub fn resolve_backing(image: &Path, reference: &str) -> PathBuf {
    let r = Path::new(reference);
    if r.is_absolute() {
        r.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(r)
    }
}

/// Describes `backing` as an overlay's header records it. An existing `image` (being
/// rebased) must not be part of `backing`'s chain.
pub fn describe_backing(image: &Path, backing: &Path) -> Result<(Backing, Option<u32>)> {
    let mut seen: Vec<_> = file_id(image).ok().into_iter().collect();
    let lower = open_lower(backing, None, &mut seen)?;
    let (kind, identity) = lower.identity;
    Ok((
        Backing {
            kind,
            path: backing_reference(image, backing)?,
            size: lower.size(),
            identity,
        },
        lower.cluster_bits(),
    ))
}

/// Creates a new, empty Strata image at `path`, which must not exist.
pub fn create(path: &Path, options: &CreateOptions) -> Result<Header> {
    let (backing, backing_bits) = match &options.backing {
        Some(b) => {
            let (backing, bits) = describe_backing(path, b)?;
            (Some(backing), bits)
        }
        None => (None, None),
    };
    let invalid = |msg: String| {
        Error::msg(ErrorKind::InvalidInput, msg)
            .with_op("create")
            .with_path(path)
    };
    let cluster_bits = match options.cluster_size {
        Some(cs) => {
            if !cs.is_power_of_two()
                || !(format::MIN_CLUSTER_BITS..=format::MAX_CLUSTER_BITS)
                    .contains(&cs.trailing_zeros())
            {
                return Err(invalid(format!(
                    "cluster size {cs} must be a power of two from 4 KiB to 2 MiB"
                )));
            }
            let bits = cs.trailing_zeros();
            if let Some(b) = backing_bits.filter(|&b| b != bits) {
                return Err(invalid(format!(
                    "cluster size {cs} differs from the backing image's {}",
                    1u64 << b
                )));
            }
            bits
        }
        None => backing_bits.unwrap_or(format::DEFAULT_CLUSTER_BITS),
    };
    let size = match (options.size, &backing) {
        (Some(s), _) => s,
        (None, Some(b)) => b.size,
        (None, None) => return Err(invalid("a size is needed (or a backing file)".into())),
    };
    if let Some(b) = &backing {
        if size < b.size {
            return Err(invalid(format!(
                "size {size} is smaller than the backing file's {}",
                b.size
            )));
        }
        if b.path.len() > format::MAX_BACKING_PATH {
            return Err(invalid("backing path is too long".into()));
        }
    }
    let max = format::max_virtual_size(cluster_bits);
    if size > max {
        return Err(invalid(format!(
            "size {size} is too large for {} byte clusters (at most {max})",
            1u64 << cluster_bits
        )));
    }
    let header = Header {
        sequence: 1,
        virtual_size: size,
        cluster_bits,
        incompatible: 0,
        compatible: 0,
        image_id: random_id()?,
        backing,
    };
    let storage = FileStorage::create(path)?;
    write_new(&storage, &header).map_err(|e| {
        let _ = std::fs::remove_file(path);
        Error::from(e).with_op("create").with_path(path)
    })?;
    Ok(header)
}

/// Writes the header and sizes the file of a new image.
///
/// Every L1 page gets a first, empty version in its slot 0, so that the first commit that
/// uses the page writes slot 1: a torn write there falls back to the empty version. Were
/// slot 0 the only one ever written, tearing it would leave the page with no valid copy.
pub fn write_new(storage: &dyn Storage, header: &Header) -> std::io::Result<()> {
    storage.write_at(&[&format::encode_header(header)[..]], 0)?;
    storage.set_len(header.data_start())?;
    let empty = [0u64; format::ENTRIES];
    for i in 0..header.l1_pages() {
        let page = format::encode_page(format::PageKind::L1, i, 1, &empty);
        storage.write_at(&[&page[..]], header.l1_slot(i, 0))?;
    }
    storage.sync()
}

/// Opens the Strata image at `path` with its whole backing chain; the image itself
/// read-write when `writable`, every backing layer read-only and shared.
pub fn open(path: &Path, writable: bool) -> Result<Chain> {
    open_storage(Arc::new(FileStorage::open(path, writable)?), path, writable)
}

/// Opens the image at `path` read-only without locking it, to inspect an image that may
/// be in use.
pub fn inspect(path: &Path) -> Result<Chain> {
    open_storage(Arc::new(FileStorage::open_unlocked(path)?), path, false)
}

/// Opens the image at `path` whose file is already open as `storage` (keeping its lock),
/// with its backing chain; backing layers open in this process are shared.
pub(crate) fn open_storage(
    storage: Arc<dyn Storage>,
    path: &Path,
    writable: bool,
) -> Result<Chain> {
    let (scan, lower) = scan_with_backing(storage.as_ref(), path, &mut vec![file_id(path)?])?;
    let mut chain = Chain::new(storage, path, scan, lower.as_deref(), writable)?;
    chain.lower = lower;
    Ok(chain)
}

/// Reads and verifies the image in `storage` and opens the backing chain its header
/// names (checked against what the header recorded, with the same cluster size).
fn scan_with_backing(
    storage: &dyn Storage,
    path: &Path,
    seen: &mut Vec<(u64, u64)>,
) -> Result<(layer::Scan, Option<Arc<Lower>>)> {
    let scan = layer::scan(storage, path)?.into_result(path)?;
    let lower = match &scan.header.backing {
        Some(b) => Some(open_lower(&resolve_backing(path, &b.path), Some(b), seen)?),
        None => None,
    };
    check_cluster_size(path, &scan.header, lower.as_deref())?;
    Ok((scan, lower))
}

/// Opens the top image alone, ignoring its backing (for repairs and header rewrites),
/// tolerating metadata problems when `lenient`.
pub fn open_standalone(path: &Path, writable: bool, lenient: bool) -> Result<(Chain, layer::Scan)> {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, writable)?);
    let scan = layer::scan(storage.as_ref(), path)?;
    let report = scan.clone();
    let scan = if lenient {
        scan
    } else {
        scan.into_result(path)?
    };
    Ok((Chain::new(storage, path, scan, None, writable)?, report))
}

fn check_cluster_size(path: &Path, header: &Header, lower: Option<&Lower>) -> Result<()> {
    if let Some(bits) = lower.and_then(Lower::cluster_bits) {
        if bits != header.cluster_bits {
            return Err(Error::msg(
                ErrorKind::Corrupt,
                format!(
                    "cluster size {} differs from the backing image's {}",
                    header.cluster_size(),
                    1u64 << bits
                ),
            )
            .with_op("open")
            .with_path(path));
        }
    }
    Ok(())
}

fn file_id(path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| Error::from(e).with_op("open").with_path(path))?;
    Ok((m.dev(), m.ino()))
}

type LowerCache = Mutex<HashMap<(u64, u64), Weak<Lower>>>;

/// Backing chains open in this process, by the identity of their top file: overlays of
/// one base share its file handles and map.
fn lower_cache() -> &'static LowerCache {
    static CACHE: OnceLock<LowerCache> = OnceLock::new();
    CACHE.get_or_init(LowerCache::default)
}

/// Makes backing chains opened from now on read the file at `path` afresh instead of
/// sharing the copy open in this process (its metadata changed on disk).
pub(crate) fn forget_shared(path: &Path) {
    if let (Ok(id), Ok(mut cache)) = (file_id(path), lower_cache().lock()) {
        cache.remove(&id);
    }
}

/// Lets overlays opened from now on share `lower`, the chain whose top is the file at
/// `path`.
pub(crate) fn share(path: &Path, lower: &Arc<Lower>) {
    if let (Ok(id), Ok(mut cache)) = (file_id(path), lower_cache().lock()) {
        cache.retain(|_, w| w.strong_count() > 0);
        cache.insert(id, Arc::downgrade(lower));
    }
}

/// Opens `path` as a read-only backing chain, checking it against `expected` (what the
/// overlay's header recorded) when given.
fn open_lower(
    path: &Path,
    expected: Option<&Backing>,
    seen: &mut Vec<(u64, u64)>,
) -> Result<Arc<Lower>> {
    let id = file_id(path)
        .map_err(|e| e.with_message(format!("backing file {} cannot be opened", path.display())))?;
    if seen.contains(&id) {
        return Err(
            Error::msg(ErrorKind::Corrupt, "backing chain loops back on itself")
                .with_op("open")
                .with_path(path),
        );
    }
    if seen.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!("backing chain deeper than {MAX_CHAIN_DEPTH} layers"),
        )
        .with_op("open")
        .with_path(path));
    }
    seen.push(id);
    let cached = lower_cache()
        .lock()
        .ok()
        .and_then(|c| c.get(&id).and_then(Weak::upgrade));
    let lower = match cached {
        Some(l) => l,
        None => {
            let lower = Arc::new(load_lower(path, seen)?);
            if let Ok(mut c) = lower_cache().lock() {
                c.retain(|_, w| w.strong_count() > 0);
                c.insert(id, Arc::downgrade(&lower));
            }
            lower
        }
    };
    if let Some(expected) = expected {
        verify_backing(path, expected, &lower)?;
    }
    Ok(lower)
}

fn load_lower(path: &Path, seen: &mut Vec<(u64, u64)>) -> Result<Lower> {
    let file = FileStorage::open(path, false)?;
    let storage: Arc<dyn Storage> = Arc::new(file);
    let mut head = [0u8; 512];
    storage
        .read_at(&mut head, 0)
        .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
    match detect(&head) {
        Format::Strata => {
            let (scan, below) = scan_with_backing(storage.as_ref(), path, seen)?;
            let mut lower = Lower::strata(storage, path, scan, below.as_deref())?;
            lower.below = below;
            Ok(lower)
        }
        Format::Raw => {
            let size = storage
                .len()
                .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
            let identity = fingerprint(storage.as_ref(), size)
                .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
            Lower::raw(storage, path, identity)
        }
        Format::Foreign(name) => Err(refuse_foreign(path, name)),
    }
}

fn verify_backing(path: &Path, expected: &Backing, lower: &Lower) -> Result<()> {
    let refuse = |why: String| {
        Err(Error::msg(
            ErrorKind::InvalidInput,
            format!("backing file has changed: {why}"),
        )
        .with_op("open")
        .with_path(path))
    };
    let (kind, identity) = lower.identity;
    if kind != expected.kind {
        return refuse(format!(
            "it was a {:?} image and is now a {kind:?} one",
            expected.kind
        ));
    }
    if lower.size() != expected.size {
        return refuse(format!(
            "its size was {} and is now {}",
            expected.size,
            lower.size()
        ));
    }
    if identity != expected.identity {
        return refuse(match kind {
            BackingKind::Strata => format!(
                "it is image {} where image {} was expected",
                format_id(&identity),
                format_id(&expected.identity)
            ),
            BackingKind::Raw => "its contents no longer match the fingerprint taken when \
                                 the overlay was made"
                .to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_paths() {
        assert_eq!(
            relative_to(Path::new("/a/b/base.img"), Path::new("/a/c")),
            PathBuf::from("../b/base.img")
        );
        assert_eq!(
            relative_to(Path::new("/a/base.img"), Path::new("/a")),
            PathBuf::from("base.img")
        );
        assert_eq!(
            resolve_backing(Path::new("/a/c/top.strata"), "../b/base.img"),
            PathBuf::from("/a/c/../b/base.img")
        );
    }

    #[test]
    fn a_torn_first_commit_of_the_map_table_loses_nothing() {
        use sim::SimStorage;
        let header = Header {
            sequence: 1,
            virtual_size: 4 << 20,
            cluster_bits: 12,
            incompatible: 0,
            compatible: 0,
            image_id: [1; 16],
            backing: None,
        };
        let disk = Arc::new(SimStorage::new());
        write_new(disk.as_ref(), &header).unwrap();
        let path = Path::new("fresh.strata");
        let scan = layer::scan(disk.as_ref(), path).unwrap();
        let chain = Chain::new(disk.clone(), path, scan, None, true).unwrap();
        chain.write(0, &[1; 4096], false).unwrap();
        chain.flush().unwrap();
        drop(chain);
        // A power cut during the first commit's L1 write: its first sector reached the
        // disk, its last (with the checksum) did not.
        let mut bytes = disk.contents();
        let l1 = (0..2)
            .map(|slot| header.l1_slot(0, slot) as usize)
            .find(|&at| bytes[at..at + 8] != [0; 8])
            .expect("the commit wrote an L1 slot");
        bytes[l1 + 3584..l1 + 4096].copy_from_slice(&[0; 512]);
        let torn = SimStorage::with_contents(bytes);
        let scan = layer::scan(&torn, path).unwrap();
        assert!(scan.problems.is_empty(), "{:?}", scan.problems);
        assert_eq!(scan.torn_slots, 1);
        // The flush never returned: the write is simply not there.
        assert!(scan.pages.is_empty());
    }

    #[test]
    fn foreign_formats_are_recognised() {
        assert_eq!(detect(b"QFI\xfb\0\0\0\x03"), Format::Foreign("qcow2"));
        assert_eq!(detect(&format::MAGIC), Format::Strata);
        assert_eq!(detect(b"\0\0\0\0"), Format::Raw);
    }
}
