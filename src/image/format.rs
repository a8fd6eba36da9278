//! The on-disk layout of a Strata image, without any I/O: header and map-page codecs.
//!
//! Everything here turns bytes into typed values and back, and says precisely what is
//! wrong with bytes that do not decode. `docs/format.md` is the prose version of this
//! file; the two must agree.
//!
//! ```text
//! offset 0       header slot A   (4 KiB)
//! offset 4096    header slot B   (4 KiB)
//! offset 8192    L1 table: for each L1 page, two 4 KiB slots
//! after that     data clusters and L2 page pairs, allocated as needed
//! ```
//!
//! Every metadata page (header, L1, L2) is written to the older of two slots and carries
//! a sequence number and a CRC32, so a torn or lost write leaves the previous version
//! intact and readable.

use std::fmt;

/// First eight bytes of every Strata image. The high-bit first byte and the trailing
/// newline catch 7-bit and line-ending mangling, as PNG's signature does.
pub const MAGIC: [u8; 8] = *b"\x89STRATA\n";
/// The only format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Size of every metadata page and of each header slot.
pub const PAGE: usize = 4096;
/// Map entries in one L1 or L2 page (the rest of the page is the trailer).
pub const ENTRIES: usize = 510;
/// Offset of the first L1 slot: after the two header slots.
pub const L1_OFFSET: u64 = 2 * PAGE as u64;
/// Smallest and largest cluster size, as powers of two (4 KiB .. 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 12;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// The default cluster size, 64 KiB.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;
/// Bytes of the header that may hold the backing file's path.
pub const MAX_BACKING_PATH: usize = PAGE - 4 - PATH_OFFSET;
/// Largest virtual size: byte offsets must fit `off_t`. Smaller clusters allow less, see
/// [`max_virtual_size`].
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 62;
/// Most L2 pages an image may have: a page's tag holds 28 bits of its index.
pub const MAX_L2_PAGES: u64 = 1 << 28;

/// Largest virtual size with clusters of `1 << cluster_bits` bytes: [`MAX_VIRTUAL_SIZE`],
/// or less where the map would need more than [`MAX_L2_PAGES`] pages.
pub fn max_virtual_size(cluster_bits: u32) -> u64 {
    MAX_VIRTUAL_SIZE.min((MAX_L2_PAGES * ENTRIES as u64) << cluster_bits)
}

/// Incompatible feature bits this version understands (none yet): an image with any other
/// bit set is refused, because reading it without the feature would return wrong data.
pub const KNOWN_INCOMPATIBLE: u64 = 0;
/// Compatible feature bits this version understands (none yet); unknown ones are ignored
/// and preserved.
pub const KNOWN_COMPATIBLE: u64 = 0;

// Header field offsets (little-endian integers).
const H_VERSION: usize = 8;
const H_PAGE_SIZE: usize = 12;
const H_SEQUENCE: usize = 16;
const H_VIRTUAL_SIZE: usize = 24;
const H_CLUSTER_BITS: usize = 32;
const H_L1_PAGES: usize = 36;
const H_INCOMPATIBLE: usize = 40;
const H_COMPATIBLE: usize = 48;
const H_IMAGE_ID: usize = 56;
const H_BACKING_SIZE: usize = 72;
const H_BACKING_ID: usize = 80;
const H_BACKING_KIND: usize = 96;
const H_BACKING_PATH_LEN: usize = 98;
const PATH_OFFSET: usize = 128;
/// Offset of the CRC32 that ends every page: it covers all bytes before it.
const CRC_OFFSET: usize = PAGE - 4;
// Map page trailer.
const P_SEQUENCE: usize = ENTRIES * 8;
const P_TAG: usize = P_SEQUENCE + 8;

/// What a backing file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    /// A raw file or block device.
    Raw,
    /// Another Strata image.
    Strata,
}

/// The backing reference stored in an overlay's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// Raw or Strata.
    pub kind: BackingKind,
    /// Path as given at creation: relative paths are relative to the overlay's directory.
    pub path: String,
    /// The backing's virtual size when the overlay was made; a resized base is refused.
    pub size: u64,
    /// The backing's identity: a Strata image's id, or a raw file's content fingerprint.
    pub identity: [u8; 16],
}

/// A decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bumped on every header rewrite; the valid slot with the highest sequence wins.
    pub sequence: u64,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Feature bits a reader must understand.
    pub incompatible: u64,
    /// Feature bits a reader may ignore.
    pub compatible: u64,
    /// Random identity given at creation; overlays record it to recognise their base.
    pub image_id: [u8; 16],
    /// The backing file, for overlays.
    pub backing: Option<Backing>,
}

impl Header {
    /// Size of a cluster in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Clusters in the virtual disk (the last may be partial).
    pub fn clusters(&self) -> u64 {
        self.virtual_size.div_ceil(self.cluster_size())
    }

    /// L2 pages needed to map every cluster.
    pub fn l2_pages(&self) -> u64 {
        self.clusters().div_ceil(ENTRIES as u64)
    }

    /// L1 pages needed to point at every L2 page.
    pub fn l1_pages(&self) -> u64 {
        self.l2_pages().div_ceil(ENTRIES as u64)
    }

    /// First byte after the L1 table: where clusters and L2 pages may be allocated.
    pub fn data_start(&self) -> u64 {
        L1_OFFSET + self.l1_pages() * 2 * PAGE as u64
    }

    /// Offset of slot `slot` (0 or 1) of L1 page `index`.
    pub fn l1_slot(&self, index: u64, slot: usize) -> u64 {
        L1_OFFSET + (index * 2 + slot as u64) * PAGE as u64
    }
}

/// Why bytes are not a valid header or page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// Not a Strata image at all.
    BadMagic,
    /// Fewer bytes than the structure needs.
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The CRC32 does not match the contents.
    BadChecksum,
    /// A format version this code does not know.
    UnsupportedVersion(u32),
    /// Incompatible feature bits this code does not know.
    UnknownFeatures(u64),
    /// A field holds a value the format forbids.
    BadField(&'static str, u64),
    /// The backing path is not UTF-8 or too long.
    BadBackingPath,
    /// A page carries the tag of another page: it was written to the wrong place.
    Misplaced {
        /// Tag expected here.
        expected: u32,
        /// Tag found.
        found: u32,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::BadMagic => f.write_str("not a Strata image (bad magic)"),
            FormatError::Truncated { have, need } => {
                write!(f, "truncated: {have} bytes where {need} are needed")
            }
            FormatError::BadChecksum => f.write_str("checksum mismatch"),
            FormatError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "format version {v} is not supported (this build reads {VERSION})"
                )
            }
            FormatError::UnknownFeatures(bits) => {
                write!(f, "unknown incompatible feature bits {bits:#x}")
            }
            FormatError::BadField(name, value) => write!(f, "invalid {name}: {value}"),
            FormatError::BadBackingPath => f.write_str("backing path is not valid UTF-8"),
            FormatError::Misplaced { expected, found } => {
                write!(f, "page tag {found:#x} where {expected:#x} belongs")
            }
        }
    }
}

impl std::error::Error for FormatError {}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}

fn page_crc(page: &[u8]) -> u32 {
    crc32fast::hash(&page[..CRC_OFFSET])
}

fn check_crc(page: &[u8]) -> Result<(), FormatError> {
    if get_u32(page, CRC_OFFSET) == page_crc(page) {
        Ok(())
    } else {
        Err(FormatError::BadChecksum)
    }
}

fn seal(page: &mut [u8]) {
    let crc = page_crc(page);
    put(page, CRC_OFFSET, &crc.to_le_bytes());
}

/// True when the first bytes of a file are the Strata magic.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] == MAGIC
}

/// Encodes `header` into one 4 KiB slot.
///
/// # Panics
/// When the backing path exceeds [`MAX_BACKING_PATH`]; callers check it first.
pub fn encode_header(header: &Header) -> Box<[u8; PAGE]> {
    let mut b = Box::new([0u8; PAGE]);
    put(&mut b[..], 0, &MAGIC);
    put(&mut b[..], H_VERSION, &VERSION.to_le_bytes());
    put(&mut b[..], H_PAGE_SIZE, &(PAGE as u32).to_le_bytes());
    put(&mut b[..], H_SEQUENCE, &header.sequence.to_le_bytes());
    put(
        &mut b[..],
        H_VIRTUAL_SIZE,
        &header.virtual_size.to_le_bytes(),
    );
    put(
        &mut b[..],
        H_CLUSTER_BITS,
        &header.cluster_bits.to_le_bytes(),
    );
    let l1 = u32::try_from(header.l1_pages()).expect("virtual size is bounded");
    put(&mut b[..], H_L1_PAGES, &l1.to_le_bytes());
    put(
        &mut b[..],
        H_INCOMPATIBLE,
        &header.incompatible.to_le_bytes(),
    );
    put(&mut b[..], H_COMPATIBLE, &header.compatible.to_le_bytes());
    put(&mut b[..], H_IMAGE_ID, &header.image_id);
    if let Some(backing) = &header.backing {
        assert!(
            backing.path.len() <= MAX_BACKING_PATH,
            "backing path too long"
        );
        put(&mut b[..], H_BACKING_SIZE, &backing.size.to_le_bytes());
        put(&mut b[..], H_BACKING_ID, &backing.identity);
        b[H_BACKING_KIND] = match backing.kind {
            BackingKind::Raw => 1,
            BackingKind::Strata => 2,
        };
        put(
            &mut b[..],
            H_BACKING_PATH_LEN,
            &(backing.path.len() as u16).to_le_bytes(),
        );
        put(&mut b[..], PATH_OFFSET, backing.path.as_bytes());
    }
    seal(&mut b[..]);
    b
}

/// Decodes one header slot, checking magic, checksum and every field.
pub fn decode_header(b: &[u8]) -> Result<Header, FormatError> {
    if b.len() < MAGIC.len() || !has_magic(b) {
        return Err(if b.len() < MAGIC.len() {
            FormatError::Truncated {
                have: b.len(),
                need: PAGE,
            }
        } else {
            FormatError::BadMagic
        });
    }
    if b.len() < PAGE {
        return Err(FormatError::Truncated {
            have: b.len(),
            need: PAGE,
        });
    }
    let b = &b[..PAGE];
    check_crc(b)?;
    let version = get_u32(b, H_VERSION);
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let page_size = get_u32(b, H_PAGE_SIZE);
    if page_size as usize != PAGE {
        return Err(FormatError::BadField("page size", page_size.into()));
    }
    let cluster_bits = get_u32(b, H_CLUSTER_BITS);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(FormatError::BadField("cluster bits", cluster_bits.into()));
    }
    let virtual_size = get_u64(b, H_VIRTUAL_SIZE);
    if virtual_size > max_virtual_size(cluster_bits) {
        return Err(FormatError::BadField("virtual size", virtual_size));
    }
    let incompatible = get_u64(b, H_INCOMPATIBLE);
    if incompatible & !KNOWN_INCOMPATIBLE != 0 {
        return Err(FormatError::UnknownFeatures(
            incompatible & !KNOWN_INCOMPATIBLE,
        ));
    }
    let backing = decode_backing(b)?;
    let sequence = get_u64(b, H_SEQUENCE);
    if sequence == u64::MAX {
        // No version can follow it: a rewrite would wrap around to an older number.
        return Err(FormatError::BadField("sequence", sequence));
    }
    let header = Header {
        sequence,
        virtual_size,
        cluster_bits,
        incompatible,
        compatible: get_u64(b, H_COMPATIBLE),
        image_id: b[H_IMAGE_ID..H_IMAGE_ID + 16].try_into().expect("16 bytes"),
        backing,
    };
    let l1 = get_u32(b, H_L1_PAGES);
    if u64::from(l1) != header.l1_pages() {
        return Err(FormatError::BadField("L1 page count", l1.into()));
    }
    Ok(header)
}

fn decode_backing(b: &[u8]) -> Result<Option<Backing>, FormatError> {
    let kind = match b[H_BACKING_KIND] {
        0 => return Ok(None),
        1 => BackingKind::Raw,
        2 => BackingKind::Strata,
        other => return Err(FormatError::BadField("backing kind", other.into())),
    };
    let len = usize::from(get_u16(b, H_BACKING_PATH_LEN));
    if len == 0 || len > MAX_BACKING_PATH {
        return Err(FormatError::BadField("backing path length", len as u64));
    }
    let path = std::str::from_utf8(&b[PATH_OFFSET..PATH_OFFSET + len])
        .map_err(|_| FormatError::BadBackingPath)?
        .to_owned();
    Ok(Some(Backing {
        kind,
        path,
        size: get_u64(b, H_BACKING_SIZE),
        identity: b[H_BACKING_ID..H_BACKING_ID + 16]
            .try_into()
            .expect("16 bytes"),
    }))
}

/// Which table a map page belongs to; part of its tag, so a page written to the wrong
/// place is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// A page of the L1 table (entries point at L2 page pairs).
    L1,
    /// A page of cluster entries.
    L2,
}

/// The tag a page of `kind` at logical `index` carries.
pub fn page_tag(kind: PageKind, index: u64) -> u32 {
    let kind = match kind {
        PageKind::L1 => 1u32,
        PageKind::L2 => 2u32,
    };
    (kind << 28) | (index as u32 & 0x0fff_ffff)
}

/// Encodes a map page: `ENTRIES` little-endian u64 entries, then the sequence, the tag and
/// the CRC32.
pub fn encode_page(kind: PageKind, index: u64, sequence: u64, entries: &[u64]) -> Box<[u8; PAGE]> {
    debug_assert_eq!(entries.len(), ENTRIES);
    let mut b = Box::new([0u8; PAGE]);
    for (i, e) in entries.iter().enumerate() {
        put(&mut b[..], i * 8, &e.to_le_bytes());
    }
    put(&mut b[..], P_SEQUENCE, &sequence.to_le_bytes());
    put(&mut b[..], P_TAG, &page_tag(kind, index).to_le_bytes());
    seal(&mut b[..]);
    b
}

/// One slot of a map page, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// Never written: all zero bytes.
    Empty,
    /// A valid page.
    Valid {
        /// Sequence number; the higher of two valid slots is current.
        sequence: u64,
        /// The raw entries.
        entries: Box<[u64; ENTRIES]>,
    },
    /// Written but unreadable: torn, corrupted or misplaced.
    Invalid(FormatError),
}

/// Decodes one slot of the page of `kind` at `index`.
pub fn decode_page(b: &[u8], kind: PageKind, index: u64) -> Slot {
    if b.len() < PAGE {
        return Slot::Invalid(FormatError::Truncated {
            have: b.len(),
            need: PAGE,
        });
    }
    let b = &b[..PAGE];
    if b.iter().all(|&x| x == 0) {
        return Slot::Empty;
    }
    if let Err(e) = check_crc(b) {
        return Slot::Invalid(e);
    }
    let expected = page_tag(kind, index);
    let found = get_u32(b, P_TAG);
    if found != expected {
        return Slot::Invalid(FormatError::Misplaced { expected, found });
    }
    let sequence = get_u64(b, P_SEQUENCE);
    if sequence == u64::MAX {
        // No version can follow it: the next commit would wrap around to an older number.
        return Slot::Invalid(FormatError::BadField("sequence", sequence));
    }
    let mut entries = Box::new([0u64; ENTRIES]);
    for (i, e) in entries.iter_mut().enumerate() {
        *e = get_u64(b, i * 8);
    }
    Slot::Valid { sequence, entries }
}

/// The current version of a page stored in two slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Current {
    /// Neither slot was ever written.
    Empty,
    /// The newest valid slot.
    Valid {
        /// Which slot (0 or 1) holds it.
        slot: usize,
        /// Its sequence number.
        sequence: u64,
        /// Its entries.
        entries: Box<[u64; ENTRIES]>,
        /// The other slot is written but unreadable (a torn update, harmless).
        other_invalid: bool,
    },
    /// No slot is valid and at least one was written: the page is lost.
    Lost(FormatError),
}

/// Picks the current version of a page from its two slots: the valid one with the higher
/// sequence number.
pub fn current(a: Slot, b: Slot) -> Current {
    let slots = [a, b];
    let mut best: Option<usize> = None;
    for (i, s) in slots.iter().enumerate() {
        if let Slot::Valid { sequence, .. } = s {
            let better = match best {
                None => true,
                Some(j) => match &slots[j] {
                    Slot::Valid {
                        sequence: other, ..
                    } => sequence > other,
                    _ => true,
                },
            };
            if better {
                best = Some(i);
            }
        }
    }
    match best {
        Some(i) => {
            let other_invalid = matches!(slots[1 - i], Slot::Invalid(_));
            let [a, b] = slots;
            let chosen = if i == 0 { a } else { b };
            let Slot::Valid { sequence, entries } = chosen else {
                unreachable!("chosen slot is valid")
            };
            Current::Valid {
                slot: i,
                sequence,
                entries,
                other_invalid,
            }
        }
        None => match slots {
            [Slot::Invalid(e), _] | [_, Slot::Invalid(e)] => Current::Lost(e),
            _ => Current::Empty,
        },
    }
}

/// The sequence number of a header slot that is intact (magic and checksum hold), whether
/// or not this version can read the rest.
fn intact_sequence(b: &[u8]) -> Option<u64> {
    (b.len() >= PAGE && has_magic(b) && check_crc(&b[..PAGE]).is_ok())
        .then(|| get_u64(b, H_SEQUENCE))
}

/// Picks the current header from its two slots.
///
/// A slot that fails to decode is passed over for the other when it is torn or damaged,
/// but not when it is intact and newer: then it was written on purpose (by a later
/// version, with a feature this one lacks), and reading the older slot would ignore it.
pub fn current_header(a: &[u8], b: &[u8]) -> Result<(usize, Header), FormatError> {
    match (decode_header(a), decode_header(b)) {
        (Ok(x), Ok(y)) => Ok(if y.sequence > x.sequence {
            (1, y)
        } else {
            (0, x)
        }),
        (Ok(x), Err(e)) if intact_sequence(b).is_some_and(|s| s > x.sequence) => Err(e),
        (Err(e), Ok(y)) if intact_sequence(a).is_some_and(|s| s > y.sequence) => Err(e),
        (Ok(x), Err(_)) => Ok((0, x)),
        (Err(_), Ok(y)) => Ok((1, y)),
        (Err(e), Err(_)) => Err(e),
    }
}

/// An L2 entry: what one cluster of the virtual disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Not allocated here: reads fall through to the backing, or zeroes without one.
    Unallocated,
    /// Reads as zeroes, hiding the backing; no data stored.
    Zero,
    /// Data stored at this host offset (4 KiB aligned).
    Data(u64),
}

const STATE_MASK: u64 = 3;
const STATE_ZERO: u64 = 1;
const STATE_DATA: u64 = 2;
const OFFSET_MASK: u64 = !(PAGE as u64 - 1);

impl Entry {
    /// Encodes the entry as stored in an L2 page.
    pub fn encode(self) -> u64 {
        match self {
            Entry::Unallocated => 0,
            Entry::Zero => STATE_ZERO,
            Entry::Data(host) => {
                debug_assert_eq!(host & !OFFSET_MASK, 0);
                host | STATE_DATA
            }
        }
    }

    /// Decodes a stored entry; `None` for bit patterns the format does not define.
    pub fn decode(raw: u64) -> Option<Entry> {
        match raw & STATE_MASK {
            0 if raw == 0 => Some(Entry::Unallocated),
            STATE_ZERO if raw == STATE_ZERO => Some(Entry::Zero),
            STATE_DATA if raw & !OFFSET_MASK == STATE_DATA && raw & OFFSET_MASK != 0 => {
                Some(Entry::Data(raw & OFFSET_MASK))
            }
            _ => None,
        }
    }
}

/// An L1 entry: where an L2 page pair lives, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L1Entry {
    /// No L2 page: every cluster it would map is unallocated.
    Absent,
    /// No L2 page: every cluster it would map is a zero cluster.
    AllZero,
    /// The L2 page pair at this host offset (two consecutive 4 KiB slots).
    Pair(u64),
}

impl L1Entry {
    /// Encodes the entry as stored in an L1 page.
    pub fn encode(self) -> u64 {
        match self {
            L1Entry::Absent => 0,
            L1Entry::AllZero => STATE_ZERO,
            L1Entry::Pair(host) => host | STATE_DATA,
        }
    }

    /// Decodes a stored entry; `None` for undefined bit patterns.
    pub fn decode(raw: u64) -> Option<L1Entry> {
        Some(match Entry::decode(raw)? {
            Entry::Unallocated => L1Entry::Absent,
            Entry::Zero => L1Entry::AllZero,
            Entry::Data(host) => L1Entry::Pair(host),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            sequence: 3,
            virtual_size: 10 << 30,
            cluster_bits: 16,
            incompatible: 0,
            compatible: 0,
            image_id: [7; 16],
            backing: Some(Backing {
                kind: BackingKind::Strata,
                path: "../base.strata".into(),
                size: 10 << 30,
                identity: [9; 16],
            }),
        }
    }

    #[test]
    fn header_round_trips() {
        let h = header();
        assert_eq!(decode_header(&encode_header(&h)[..]).unwrap(), h);
    }

    #[test]
    fn header_detects_every_flipped_bit_of_a_field() {
        let b = encode_header(&header());
        for byte in [0, 9, 20, 30, 60, 100, 130] {
            let mut c = b.clone();
            c[byte] ^= 0x10;
            assert!(decode_header(&c[..]).is_err(), "byte {byte}");
        }
    }

    #[test]
    fn newer_valid_slot_wins_and_torn_slot_is_ignored() {
        let old = encode_page(PageKind::L2, 5, 1, &[0; ENTRIES]);
        let mut new_entries = [0u64; ENTRIES];
        new_entries[0] = Entry::Zero.encode();
        let new = encode_page(PageKind::L2, 5, 2, &new_entries);
        let pick = |a: &[u8], b: &[u8]| {
            current(
                decode_page(a, PageKind::L2, 5),
                decode_page(b, PageKind::L2, 5),
            )
        };
        assert!(matches!(
            pick(&old[..], &new[..]),
            Current::Valid {
                slot: 1,
                sequence: 2,
                ..
            }
        ));
        let mut torn = new.clone();
        torn[100] ^= 1;
        assert!(matches!(
            pick(&old[..], &torn[..]),
            Current::Valid {
                slot: 0,
                sequence: 1,
                other_invalid: true,
                ..
            }
        ));
        assert!(matches!(pick(&[0; PAGE], &[0; PAGE]), Current::Empty));
        assert!(matches!(pick(&torn[..], &[0; PAGE]), Current::Lost(_)));
        // A valid page at the wrong index is not accepted.
        assert!(matches!(
            decode_page(&old[..], PageKind::L2, 6),
            Slot::Invalid(FormatError::Misplaced { .. })
        ));
    }

    #[test]
    fn entries_reject_undefined_patterns() {
        for e in [Entry::Unallocated, Entry::Zero, Entry::Data(1 << 20)] {
            assert_eq!(Entry::decode(e.encode()), Some(e));
        }
        for raw in [3, 2, 5, (1 << 20) | 1, (1 << 20) | 6] {
            assert_eq!(Entry::decode(raw), None, "{raw:#x}");
        }
    }
}
