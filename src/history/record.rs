//! The bytes of the log: segment headers and records, encoded and checked without I/O.
//!
//! A segment file is a 64-byte header followed by records. A record is a 64-byte header
//! followed by its payload (whole 4 KiB blocks for writes and relocations, nothing for
//! the others). Each header ends with a CRC32 over the header and the payload, so a
//! record torn by a crash, or bytes that were never a record, fail the check: the log is
//! read up to the first record that does not.
//!
//! Layouts (little-endian) are in docs/format.md, "Volumes with history".

use super::index::{BLOCK, Loc};

/// Bytes of a segment header and of a record header.
pub const HEADER_LEN: usize = 64;

const SEGMENT_MAGIC: [u8; 8] = *b"\x89STRLOG\n";
const SEGMENT_VERSION: u32 = 1;
const RECORD_MAGIC: [u8; 4] = *b"SREC";
const FLAG_POINT: u8 = 1;

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Blocks written; the payload holds them.
    Write,
    /// Blocks zeroed, kept allocated. A range that starts or ends inside a block
    /// carries those edge blocks whole in its payload (`aux` bit 0: the first block,
    /// bit 1: the last), so that the request stays one record.
    Zero,
    /// Blocks trimmed (or zeroed with a hole); edges as for [`Kind::Zero`].
    Trim,
    /// A restore point: every record before it was made durable by a flush.
    Flush,
    /// The live disk returns to an earlier point: `aux` is its `seq`, `aux2` its epoch.
    Rollback,
    /// Blocks of an earlier version moved by the reclaimer: `aux` is the version's `seq`;
    /// the payload holds them.
    Relocate,
    /// Space of a record whose write failed: `aux` is the payload length to skip, which
    /// the checksum does not cover.
    Void,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Write => 1,
            Kind::Zero => 2,
            Kind::Trim => 3,
            Kind::Flush => 4,
            Kind::Rollback => 5,
            Kind::Relocate => 6,
            Kind::Void => 7,
        }
    }

    fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            1 => Kind::Write,
            2 => Kind::Zero,
            3 => Kind::Trim,
            4 => Kind::Flush,
            5 => Kind::Rollback,
            6 => Kind::Relocate,
            7 => Kind::Void,
            _ => return None,
        })
    }

    /// Whether the payload holds `count` blocks.
    pub fn carries_blocks(self) -> bool {
        matches!(self, Kind::Write | Kind::Relocate)
    }

    /// Whether the record covers a range of blocks.
    pub fn covers_blocks(self) -> bool {
        matches!(self, Kind::Write | Kind::Zero | Kind::Trim | Kind::Relocate)
    }
}

/// A record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// What it does.
    pub kind: Kind,
    /// A write that is a restore point of its own (FUA).
    pub point: bool,
    /// Its place in the log.
    pub seq: u64,
    /// First block it touches.
    pub block: u64,
    /// Blocks it touches.
    pub count: u32,
    /// When it was appended, in microseconds since the epoch.
    pub time_us: u64,
    /// See [`Kind`].
    pub aux: u64,
    /// See [`Kind`].
    pub aux2: u32,
}

impl Record {
    /// A record of `kind` with nothing else set.
    pub fn new(kind: Kind, seq: u64, time_us: u64) -> Record {
        Record {
            kind,
            point: false,
            seq,
            block: 0,
            count: 0,
            time_us,
            aux: 0,
            aux2: 0,
        }
    }

    /// Bytes of payload after the header.
    pub fn payload_len(&self) -> u64 {
        match self.kind {
            k if k.carries_blocks() => u64::from(self.count) * BLOCK,
            Kind::Zero | Kind::Trim => u64::from((self.aux & 3).count_ones()) * BLOCK,
            Kind::Void => self.aux,
            _ => 0,
        }
    }

    /// Where block `i` of the record's range is, given where its payload is. The one
    /// rule for the engine applying a record and for an open replaying it.
    pub fn block_loc(&self, i: u64, segment: u32, payload: u64) -> Loc {
        let data = |k: u64| Loc::Data {
            segment,
            offset: payload + k * BLOCK,
        };
        let last = u64::from(self.count) - 1;
        match self.kind {
            Kind::Write | Kind::Relocate => data(i),
            Kind::Zero | Kind::Trim if i == 0 && self.aux & 1 != 0 => data(0),
            Kind::Zero | Kind::Trim if i == last && self.aux & 2 != 0 => data(self.aux & 1),
            Kind::Zero => Loc::Zero,
            _ => Loc::Hole,
        }
    }

    /// Bytes of the whole record.
    pub fn total_len(&self) -> u64 {
        HEADER_LEN as u64 + self.payload_len()
    }

    /// Whether the record changes what the disk reads (a relocation only moves bytes).
    pub fn changes_disk(&self) -> bool {
        matches!(
            self.kind,
            Kind::Write | Kind::Zero | Kind::Trim | Kind::Rollback
        )
    }

    /// Whether the record is a restore point.
    pub fn is_point(&self) -> bool {
        self.kind == Kind::Flush || self.point
    }

    /// The header, its checksum covering `payload` (the pieces, in order, of
    /// [`Record::payload_len`] bytes; nothing for a void record).
    pub fn encode(&self, payload: &[&[u8]]) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&RECORD_MAGIC);
        h[4] = self.kind.code();
        h[5] = if self.point { FLAG_POINT } else { 0 };
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.block.to_le_bytes());
        h[24..28].copy_from_slice(&self.count.to_le_bytes());
        h[32..40].copy_from_slice(&self.time_us.to_le_bytes());
        h[40..48].copy_from_slice(&self.aux.to_le_bytes());
        h[48..52].copy_from_slice(&self.aux2.to_le_bytes());
        let crc = checksum(&h, payload);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Reads a header; `None` unless it is one (magic, kind, flags and reserved bytes).
    /// The checksum is checked by [`Record::verify`] once the payload is read.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Option<Record> {
        if h[0..4] != RECORD_MAGIC || h[5] & !FLAG_POINT != 0 {
            return None;
        }
        if h[6..8] != [0, 0] || h[28..32] != [0; 4] || h[52..60] != [0; 8] {
            return None;
        }
        let kind = Kind::from_code(h[4])?;
        let r = Record {
            kind,
            point: h[5] & FLAG_POINT != 0,
            seq: le64(&h[8..16]),
            block: le64(&h[16..24]),
            count: le32(&h[24..28]),
            time_us: le64(&h[32..40]),
            aux: le64(&h[40..48]),
            aux2: le32(&h[48..52]),
        };
        let counted = kind.covers_blocks();
        let edges_ok = match kind {
            Kind::Zero | Kind::Trim => r.aux <= 3 && !(r.count == 1 && r.aux == 3),
            _ => true,
        };
        if !edges_ok {
            return None;
        }
        let pointable = matches!(kind, Kind::Write | Kind::Zero | Kind::Trim);
        if counted != (r.count > 0) || (r.point && !pointable) {
            return None;
        }
        Some(r)
    }

    /// Whether `h` (the header [`Record::decode`] read) checksums with `payload`.
    pub fn verify(h: &[u8; HEADER_LEN], payload: &[u8]) -> bool {
        let pieces: &[&[u8]] = if h[4] == Kind::Void.code() {
            &[]
        } else {
            &[payload]
        };
        checksum(h, pieces) == le32(&h[60..64])
    }
}

fn checksum(h: &[u8; HEADER_LEN], payload: &[&[u8]]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..60]);
    for p in payload {
        c.update(p);
    }
    c.finalize()
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

/// A segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The segment's number.
    pub number: u32,
    /// The volume it belongs to.
    pub volume: [u8; 16],
    /// The `seq` its first record has.
    pub first_seq: u64,
    /// When it was started, in microseconds since the epoch.
    pub created_us: u64,
}

impl SegmentHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&SEGMENT_MAGIC);
        h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.number.to_le_bytes());
        h[16..32].copy_from_slice(&self.volume);
        h[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        h[40..48].copy_from_slice(&self.created_us.to_le_bytes());
        let crc = crc32fast::hash(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Reads a header, or says what is wrong with it.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<SegmentHeader, &'static str> {
        if h[0..8] != SEGMENT_MAGIC {
            return Err("not a segment of a Strata volume");
        }
        if crc32fast::hash(&h[..60]) != le32(&h[60..64]) {
            return Err("segment header checksum mismatch");
        }
        if le32(&h[8..12]) != SEGMENT_VERSION {
            return Err("unsupported segment version");
        }
        Ok(SegmentHeader {
            number: le32(&h[12..16]),
            volume: h[16..32].try_into().expect("16 bytes"),
            first_seq: le64(&h[32..40]),
            created_us: le64(&h[40..48]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write(seq: u64, count: u32) -> Record {
        Record {
            block: 7,
            count,
            ..Record::new(Kind::Write, seq, 1_000)
        }
    }

    #[test]
    fn a_record_round_trips_and_checks_its_payload() {
        let payload = vec![0xab; BLOCK as usize];
        let r = write(5, 1);
        let h = r.encode(&[&payload]);
        assert_eq!(Record::decode(&h), Some(r));
        assert!(Record::verify(&h, &payload));
        let mut torn = payload.clone();
        torn[4000] ^= 1;
        assert!(
            !Record::verify(&h, &torn),
            "a payload torn by a crash fails the check"
        );
    }

    #[test]
    fn pieces_checksum_like_one_payload() {
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
        let r = write(9, 2);
        assert_eq!(r.encode(&[&a, &b]), r.encode(&[&whole]));
    }

    #[test]
    fn headers_that_cannot_be_are_refused() {
        let h = write(1, 1).encode(&[&[0u8; 4096]]);
        for (at, v) in [(0, b'X'), (4, 0), (4, 99), (5, 2), (6, 1), (30, 1), (55, 1)] {
            let mut bad = h;
            bad[at] = v;
            assert_eq!(Record::decode(&bad), None, "byte {at} = {v}");
        }
        let flush_with_count = Record {
            count: 1,
            ..Record::new(Kind::Flush, 3, 0)
        };
        assert_eq!(Record::decode(&flush_with_count.encode(&[])), None);
        assert_eq!(
            Record::decode(&[0u8; HEADER_LEN]),
            None,
            "zeroes are no record"
        );
    }

    #[test]
    fn a_void_record_skips_an_unchecked_payload() {
        let r = Record {
            aux: 8192,
            ..Record::new(Kind::Void, 4, 0)
        };
        let h = r.encode(&[]);
        assert_eq!(Record::decode(&h).unwrap().payload_len(), 8192);
        assert!(Record::verify(&h, b"anything"));
    }

    #[test]
    fn segment_headers_round_trip() {
        let s = SegmentHeader {
            number: 3,
            volume: [7; 16],
            first_seq: 99,
            created_us: 5,
        };
        assert_eq!(SegmentHeader::decode(&s.encode()), Ok(s));
        let mut bad = s.encode();
        bad[20] ^= 1;
        assert!(SegmentHeader::decode(&bad).is_err());
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), HEADER_LEN)) {
            let h: [u8; HEADER_LEN] = bytes.try_into().unwrap();
            if let Some(r) = Record::decode(&h) {
                prop_assert_eq!(Record::decode(&r.encode(&[])).map(|x| x.seq), Some(r.seq));
            }
            let _ = SegmentHeader::decode(&h);
        }
    }
}
