//! The image tools behind `strata info`, `check`, `map`, `commit`, `rebase` and
//! `convert`, as library functions returning reports (the command line prints them as
//! text or JSON).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::chain::{Chain, LayerKind, MapRange, RangeState, ZeroMode};
use super::format::{BackingKind, Header};
use super::storage::{FileStorage, Storage};
use super::{Format, layer};
use crate::error::{Error, ErrorKind, Result};

/// Bytes moved per step of the copying tools.
const STEP: u64 = 1 << 20;

/// Called with (bytes done, bytes in all) as long work progresses.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// One layer of a chain, as `strata info` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// Path as opened.
    pub path: PathBuf,
    /// `strata` or `raw`.
    pub format: &'static str,
    /// Virtual size.
    pub virtual_size: u64,
    /// Bytes of data clusters it maps (Strata) or holds (raw).
    pub allocated: u64,
    /// Zero clusters it maps, in bytes.
    pub zeroed: u64,
}

/// What `strata info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    /// Path as given.
    pub path: PathBuf,
    /// `strata`.
    pub format: &'static str,
    /// Format version.
    pub version: u32,
    /// Virtual disk size.
    pub virtual_size: u64,
    /// Cluster size.
    pub cluster_size: u64,
    /// The image's identity.
    pub image_id: String,
    /// Length of the file.
    pub file_length: u64,
    /// Bytes the file occupies on the host file system.
    pub disk_usage: u64,
    /// Bytes of data clusters this image maps.
    pub allocated: u64,
    /// Bytes of zero clusters this image maps.
    pub zeroed: u64,
    /// The backing reference as stored, and where it resolves.
    pub backing: Option<BackingInfo>,
    /// Every layer from the top down.
    pub chain: Vec<LayerInfo>,
}

/// The backing reference of an overlay.
#[derive(Debug, Clone, Serialize)]
pub struct BackingInfo {
    /// As stored in the header.
    pub reference: String,
    /// Resolved against the image's directory.
    pub resolved: PathBuf,
    /// `strata` or `raw`.
    pub format: &'static str,
    /// Its size when the overlay was made.
    pub size: u64,
}

fn kind_name(kind: BackingKind) -> &'static str {
    match kind {
        BackingKind::Raw => "raw",
        BackingKind::Strata => "strata",
    }
}

fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Describes the image at `path` and its chain, without locking it.
pub fn info(path: &Path) -> Result<Info> {
    let chain = super::inspect(path)?;
    let h = chain.header().clone();
    let cs = h.cluster_size();
    let mut layers = Vec::new();
    for (i, l) in chain.layers().iter().enumerate().rev() {
        layers.push(match &l.kind {
            LayerKind::Raw { size } => LayerInfo {
                path: l.path.clone(),
                format: "raw",
                virtual_size: *size,
                allocated: l
                    .storage
                    .data_ranges(0, *size)
                    .map_or(*size, |r| r.iter().map(|x| x.1).sum()),
                zeroed: 0,
            },
            LayerKind::Strata { header } => {
                let (data, zero) = chain.clusters_of(i)?;
                LayerInfo {
                    path: l.path.clone(),
                    format: "strata",
                    virtual_size: header.virtual_size,
                    allocated: data * header.cluster_size(),
                    zeroed: zero * header.cluster_size(),
                }
            }
        });
    }
    let top = &layers[0];
    Ok(Info {
        path: path.to_path_buf(),
        format: "strata",
        version: super::format::VERSION,
        virtual_size: h.virtual_size,
        cluster_size: cs,
        image_id: super::format_id(&h.image_id),
        file_length: chain.storage().len().unwrap_or(0),
        disk_usage: disk_usage(path),
        allocated: top.allocated,
        zeroed: top.zeroed,
        backing: h.backing.as_ref().map(|b| BackingInfo {
            reference: b.path.clone(),
            resolved: super::resolve_backing(path, &b.path),
            format: kind_name(b.kind),
            size: b.size,
        }),
        chain: layers,
    })
}

/// One stretch of `strata map`.
#[derive(Debug, Clone, Serialize)]
pub struct MapEntry {
    /// Start on the virtual disk.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// `data`, `zero` or `unallocated`.
    pub state: &'static str,
    /// 1 the top image, 2 its backing, ...; 0 none.
    pub depth: u32,
    /// The owning layer's file.
    pub file: Option<PathBuf>,
    /// Offset in that file, for Strata data.
    pub host_offset: Option<u64>,
}

/// Maps the whole image at `path`: state and owning layer per stretch.
pub fn map(path: &Path) -> Result<Vec<MapEntry>> {
    let chain = super::inspect(path)?;
    let layers = chain.layers();
    let ranges = chain.ranges(0, chain.size())?;
    Ok(ranges
        .into_iter()
        .map(|r: MapRange| MapEntry {
            offset: r.offset,
            length: r.length,
            state: match r.state {
                RangeState::Data => "data",
                RangeState::Zero => "zero",
                RangeState::Unallocated if r.depth > 0 => "data",
                RangeState::Unallocated => "unallocated",
            },
            depth: r.depth,
            file: (r.depth > 0).then(|| layers[layers.len() - r.depth as usize].path.clone()),
            host_offset: r.host,
        })
        .collect())
}

/// What `strata check` found (and repaired).
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// Path checked.
    pub path: PathBuf,
    /// Metadata problems: any makes the image unusable until repaired.
    pub problems: Vec<String>,
    /// Problems found in the backing chain.
    pub backing_problems: Vec<String>,
    /// Bytes in the file holding data nothing maps (left by a crash; harmless, reused).
    pub leaked_bytes: u64,
    /// Map slots torn by an interrupted update; harmless, the other copy is used.
    pub torn_slots: u64,
    /// Data clusters mapped.
    pub data_clusters: u64,
    /// Zero clusters mapped.
    pub zero_clusters: u64,
    /// What a repair did.
    pub repaired: Vec<String>,
}

impl CheckReport {
    /// True when the image (and its chain) can be used as it is.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.backing_problems.is_empty()
    }
}

/// Leaked ranges: bytes past the map table that nothing maps but that hold data.
fn leaks(storage: &dyn Storage, scan: &layer::Scan) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = scan.header.data_start();
    let mut gaps = Vec::new();
    for &(start, len) in &scan.used {
        if start > pos {
            gaps.push((pos, start - pos));
        }
        pos = pos.max(start + len);
    }
    if scan.file_len > pos {
        gaps.push((pos, scan.file_len - pos));
    }
    for (start, len) in gaps {
        if let Ok(ranges) = storage.data_ranges(start, len) {
            out.extend(ranges);
        }
    }
    out
}

/// Verifies every checksum and mapping of the image at `path` and that its backing chain
/// opens; with `repair`, fixes what it can: drops unreadable mappings, releases leaked
/// space and rewrites the map.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    let storage: Arc<dyn Storage> = Arc::new(if repair {
        FileStorage::open(path, true)?
    } else {
        FileStorage::open_unlocked(path)?
    });
    let scan = layer::scan(storage.as_ref(), path)?;
    let leaked = leaks(storage.as_ref(), &scan);
    let (data, zero) = scan.counts();
    let mut report = CheckReport {
        path: path.to_path_buf(),
        problems: scan.problems.iter().map(ToString::to_string).collect(),
        backing_problems: Vec::new(),
        leaked_bytes: leaked.iter().map(|r| r.1).sum(),
        torn_slots: scan.torn_slots,
        data_clusters: data,
        zero_clusters: zero,
        repaired: Vec::new(),
    };
    if let Some(b) = &scan.header.backing {
        let resolved = super::resolve_backing(path, &b.path);
        if let Err(e) = super::open_lower(&resolved, Some(b), &mut Vec::new()) {
            report.backing_problems.push(e.to_string());
        }
    }
    if !repair {
        return Ok(report);
    }
    let problems = scan.problems.len();
    let truncated = scan
        .problems
        .iter()
        .any(|p| matches!(p, layer::Problem::TruncatedTable { .. }));
    if truncated {
        return Err(Error::msg(
            ErrorKind::Corrupt,
            "the map table itself is truncated; nothing to repair from",
        )
        .with_op("repair")
        .with_path(path));
    }
    let chain = Chain::new(Arc::clone(&storage), path, scan, None, true)?;
    if problems > 0 {
        chain.mark_all_dirty()?;
        chain.flush()?;
        report.repaired.push(format!(
            "rewrote the map without the {problems} bad entries or pages"
        ));
    }
    let mut released = 0;
    for &(start, len) in &leaked {
        if storage.punch_hole(start, len).is_ok() {
            released += len;
        }
    }
    if released > 0 {
        report
            .repaired
            .push(format!("released {released} leaked bytes"));
    }
    let cut = chain.truncate_free_tail()?;
    if cut > 0 {
        report
            .repaired
            .push(format!("trimmed {cut} free bytes off the end of the file"));
    }
    drop(chain);
    let after = layer::scan(storage.as_ref(), path)?;
    report.problems = after.problems.iter().map(ToString::to_string).collect();
    report.leaked_bytes = leaks(storage.as_ref(), &after).iter().map(|r| r.1).sum();
    report.torn_slots = after.torn_slots;
    Ok(report)
}

/// A disk the copying tools read from. Strata chains and raw files are read here;
/// other engines (a volume with history at a restore point) implement it too.
pub trait Disk {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Ranges of `[0, size)` that may hold non-zero data.
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>>;
}

/// A disk the tools read from: a Strata chain or a raw file.
enum Source {
    Strata(Box<Chain>),
    Raw(FileStorage, u64),
}

impl Source {
    fn open(path: &Path) -> Result<Source> {
        match super::probe(path)? {
            Format::Strata => Ok(Source::Strata(Box::new(super::open(path, false)?))),
            Format::Raw => {
                let s = FileStorage::open(path, false)?;
                let len = s
                    .len()
                    .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
                Ok(Source::Raw(s, len))
            }
            Format::Foreign(name) => Err(super::refuse_foreign(path, name)),
        }
    }
}

impl Disk for Source {
    fn size(&self) -> u64 {
        match self {
            Source::Strata(c) => c.size(),
            Source::Raw(_, len) => *len,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Strata(c) => c.read(offset, buf),
            Source::Raw(s, len) => {
                let n = len.saturating_sub(offset).min(buf.len() as u64) as usize;
                buf[n..].fill(0);
                s.read_at(&mut buf[..n], offset)
                    .map_err(|e| Error::from(e).with_op("read").with_path(s.path()))
            }
        }
    }

    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        match self {
            Source::Strata(c) => {
                let mut out = Vec::new();
                let mut pos = 0;
                for e in c.block_status(0, c.size())? {
                    if !e.zero {
                        out.push((pos, e.length));
                    }
                    pos += e.length;
                }
                Ok(out)
            }
            Source::Raw(s, len) => s
                .data_ranges(0, *len)
                .map_err(|e| Error::from(e).with_op("map").with_path(s.path())),
        }
    }
}

/// A disk the tools write to.
enum Target {
    Strata(Box<Chain>),
    Raw(FileStorage),
}

impl Target {
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Target::Strata(c) => c.write(offset, data, false),
            Target::Raw(s) => s
                .write_at(&[data], offset)
                .map_err(|e| Error::from(e).with_op("write").with_path(s.path())),
        }
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Target::Strata(c) => c.zero(offset, len, ZeroMode::Zero, false),
            Target::Raw(s) => {
                if s.punch_hole(offset, len).is_ok() {
                    return Ok(());
                }
                let zeroes = vec![0u8; STEP.min(len) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(STEP) as usize;
                    self.write(offset + done, &zeroes[..n])?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }

    fn flush(&self) -> Result<()> {
        match self {
            Target::Strata(c) => c.flush(),
            Target::Raw(s) => s
                .sync()
                .map_err(|e| Error::from(e).with_op("flush").with_path(s.path())),
        }
    }
}

/// Output format of `convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// A Strata image.
    Strata,
    /// A raw (sparse) file.
    Raw,
}

/// What a copying tool did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    /// Bytes of the virtual disk examined.
    pub scanned: u64,
    /// Bytes written to the destination.
    pub copied: u64,
    /// Bytes zeroed in the destination.
    pub zeroed: u64,
}

fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: any bit pattern is a valid u64; align_to only splits the slice.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Copies `src` (Strata or raw) to a new file `dst`, reading only what is allocated and
/// writing only what is not zero.
pub fn convert(
    src: &Path,
    dst: &Path,
    format: OutputFormat,
    cluster_size: Option<u64>,
    progress: Progress<'_>,
) -> Result<CopyReport> {
    convert_from(&Source::open(src)?, dst, format, cluster_size, progress)
}

/// Copies the disk `source` to a new file `dst`, as [`convert`] does.
pub fn convert_from(
    source: &dyn Disk,
    dst: &Path,
    format: OutputFormat,
    cluster_size: Option<u64>,
    progress: Progress<'_>,
) -> Result<CopyReport> {
    let size = source.size();
    let target = match format {
        OutputFormat::Raw => {
            let s = FileStorage::create(dst)?;
            s.set_len(size)
                .map_err(|e| Error::from(e).with_op("create").with_path(dst))?;
            Target::Raw(s)
        }
        OutputFormat::Strata => {
            super::create(
                dst,
                &super::CreateOptions {
                    size: Some(size),
                    cluster_size,
                    backing: None,
                },
            )?;
            Target::Strata(Box::new(super::open(dst, true)?))
        }
    };
    let result = copy_ranges(source, &target, &source.data_ranges()?, size, progress);
    match result {
        Ok(report) => Ok(report),
        Err(e) => {
            drop(target);
            let _ = std::fs::remove_file(dst);
            Err(e)
        }
    }
}

fn copy_ranges(
    source: &dyn Disk,
    target: &Target,
    ranges: &[(u64, u64)],
    size: u64,
    progress: Progress<'_>,
) -> Result<CopyReport> {
    let mut report = CopyReport {
        scanned: size,
        ..CopyReport::default()
    };
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let mut done = 0;
    let mut buf = vec![0u8; STEP as usize];
    progress(0, total);
    for &(start, len) in ranges {
        let mut pos = start;
        while pos < start + len {
            let n = (start + len - pos).min(STEP);
            let chunk = &mut buf[..n as usize];
            source.read(pos, chunk)?;
            if !is_zero(chunk) {
                target.write(pos, chunk)?;
                report.copied += n;
            }
            pos += n;
            done += n;
            progress(done, total);
        }
    }
    target.flush()?;
    Ok(report)
}

/// Merges the overlay at `path` into its backing file, then empties the overlay, which
/// stays a valid (now thin) overlay of the updated backing.
///
/// Other overlays of the same backing see the merged data too: commit only into a base
/// that nothing else depends on.
pub fn commit(path: &Path, progress: Progress<'_>) -> Result<CopyReport> {
    let (mut top, _) = super::open_standalone(path, true, false)?;
    let header = top.header().clone();
    let Some(backing) = header.backing.clone() else {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            "image has no backing file to commit into",
        )
        .with_op("commit")
        .with_path(path));
    };
    let base_path = super::resolve_backing(path, &backing.path);
    // Verify that the backing is the one the overlay was made on before changing it.
    drop(super::open_lower(
        &base_path,
        Some(&backing),
        &mut Vec::new(),
    )?);
    if header.virtual_size > backing.size {
        let owned_past_end = top
            .ranges(backing.size, header.virtual_size - backing.size)?
            .iter()
            .any(|r| r.depth == 1);
        if owned_past_end {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                "the overlay holds data past the end of its smaller backing file",
            )
            .with_op("commit")
            .with_path(path));
        }
    }
    let target = match backing.kind {
        BackingKind::Strata => Target::Strata(Box::new(super::open(&base_path, true)?)),
        BackingKind::Raw => Target::Raw(FileStorage::open(&base_path, true)?),
    };
    let owned: Vec<MapRange> = top
        .ranges(0, backing.size.min(header.virtual_size))?
        .into_iter()
        .filter(|r| r.depth == 1)
        .collect();
    let total: u64 = owned.iter().map(|r| r.length).sum();
    let mut report = CopyReport {
        scanned: header.virtual_size,
        ..CopyReport::default()
    };
    let mut done = 0;
    let mut buf = vec![0u8; STEP as usize];
    progress(0, total);
    for r in &owned {
        if r.state == RangeState::Zero {
            target.zero(r.offset, r.length)?;
            report.zeroed += r.length;
            done += r.length;
            progress(done, total);
            continue;
        }
        let mut pos = r.offset;
        while pos < r.offset + r.length {
            let n = (r.offset + r.length - pos).min(STEP);
            top.read(pos, &mut buf[..n as usize])?;
            target.write(pos, &buf[..n as usize])?;
            report.copied += n;
            pos += n;
            done += n;
            progress(done, total);
        }
    }
    target.flush()?;
    drop(target);
    if backing.kind == BackingKind::Raw {
        // The base's contents changed; record its new fingerprint.
        let (fresh, _) = super::describe_backing(path, &base_path)?;
        let mut h: Header = top.header().clone();
        h.backing = Some(super::format::Backing {
            path: backing.path.clone(),
            ..fresh
        });
        top.rewrite_header(h)?;
    }
    top.zero(0, header.virtual_size, ZeroMode::Trim, false)?;
    top.flush()?;
    top.truncate_free_tail()?;
    Ok(report)
}

/// Points the overlay at `path` to a new backing file (or none). Unless `unsafe_`, first
/// copies into the overlay every cluster whose contents would change, so the disk reads
/// the same before and after.
pub fn rebase(
    path: &Path,
    new_backing: Option<&Path>,
    unsafe_: bool,
    progress: Progress<'_>,
) -> Result<CopyReport> {
    let mut report = CopyReport::default();
    let new_ref = match new_backing {
        Some(b) => {
            let (backing, bits) = super::describe_backing(path, b)?;
            Some((backing, bits))
        }
        None => None,
    };
    if unsafe_ {
        let (mut top, _) = super::open_standalone(path, true, false)?;
        return finish_rebase(&mut top, path, new_ref, report);
    }
    let mut top = super::open(path, true)?;
    let size = top.size();
    if let Some((b, bits)) = &new_ref {
        if b.size > size {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                format!(
                    "new backing file ({} bytes) is larger than the image",
                    b.size
                ),
            )
            .with_op("rebase")
            .with_path(path));
        }
        if let Some(bits) = bits.filter(|&x| x != top.header().cluster_bits) {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                format!("new backing file has {} byte clusters", 1u64 << bits),
            )
            .with_op("rebase")
            .with_path(path));
        }
    }
    let new_source = match new_backing {
        Some(b) => Some(Source::open(b)?),
        None => None,
    };
    let cs = top.cluster_size();
    // Everything the top does not own may read differently over the new backing.
    let foreign: Vec<MapRange> = top
        .ranges(0, size)?
        .into_iter()
        .filter(|r| r.depth != 1)
        .collect();
    let total: u64 = foreign.iter().map(|r| r.length).sum();
    report.scanned = total;
    let mut done = 0;
    let step = STEP.max(cs);
    let mut old = vec![0u8; step as usize];
    let mut new = vec![0u8; step as usize];
    progress(0, total);
    for r in &foreign {
        // Ranges not owned by the top are whole clusters, except at the disk's end.
        let mut pos = r.offset;
        while pos < r.offset + r.length {
            let n = (r.offset + r.length - pos).min(step) as usize;
            top.read(pos, &mut old[..n])?;
            match &new_source {
                Some(s) => s.read(pos, &mut new[..n])?,
                None => new[..n].fill(0),
            }
            // Copy only the clusters that differ, not the whole step around them.
            for at in (0..n).step_by(cs as usize) {
                let end = (at + cs as usize).min(n);
                if old[at..end] != new[at..end] {
                    top.write(pos + at as u64, &old[at..end], false)?;
                    report.copied += (end - at) as u64;
                }
            }
            pos += n as u64;
            done += n as u64;
            progress(done, total);
        }
    }
    top.flush()?;
    drop(new_source);
    finish_rebase(&mut top, path, new_ref, report)
}

fn finish_rebase(
    top: &mut Chain,
    path: &Path,
    new_ref: Option<(super::format::Backing, Option<u32>)>,
    report: CopyReport,
) -> Result<CopyReport> {
    let mut h = top.header().clone();
    h.backing = new_ref.map(|(b, _)| b);
    top.rewrite_header(h).map_err(|e| e.with_path(path))?;
    Ok(report)
}

/// The header of the image at `path`, read without locking.
pub fn header(path: &Path) -> Result<Header> {
    let s = FileStorage::open_unlocked(path)?;
    Ok(layer::read_header(&s, path)?.1)
}
