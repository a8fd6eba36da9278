//! Reading the log back at open: every record from a checkpoint's position, in order, up
//! to the first that is not whole.
//!
//! The records a crash may have torn are exactly those not yet synced, and a sync covers
//! every record before the one it was asked for, so the first record that fails its
//! checks ends what was ever acknowledged as durable: what follows it (in its segment or
//! in later ones) is cut off, so that it can never be read as part of the log later.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::image::storage::Storage;

use super::files::Files;
use super::log::{Tail, segment_name, segment_number};
use super::record::{HEADER_LEN, Kind, Record, SegmentHeader};

/// Where a replay starts: the first segment numbered `segment` or higher, at `offset`
/// if it is that very segment (else after its header), expecting record `next_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The lowest segment number to read.
    pub segment: u32,
    /// The offset in that segment.
    pub offset: u64,
    /// The `seq` of the first record to read.
    pub next_seq: u64,
}

impl Position {
    /// The start of an empty log.
    pub const START: Position = Position {
        segment: 1,
        offset: HEADER_LEN as u64,
        next_seq: 1,
    };
}

/// What a replay found.
#[derive(Debug)]
pub struct Replayed {
    /// Where the log continues.
    pub tail: Tail,
    /// The segments kept, opened.
    pub segments: BTreeMap<u32, Arc<dyn Storage>>,
    /// Records replayed.
    pub records: u64,
    /// Bytes cut off after the last whole record (a torn tail).
    pub cut_bytes: u64,
    /// Segments after the cut: removed when repairing, left unread otherwise.
    pub cut_segments: Vec<u32>,
}

/// A record handed to the replay's callback: the record, its segment and the offset of
/// its payload, and the payload.
pub struct Replay<'a> {
    /// The record.
    pub record: &'a Record,
    /// Its segment.
    pub segment: u32,
    /// The offset of its payload in the segment.
    pub payload_offset: u64,
    /// Its payload.
    pub payload: &'a [u8],
}

fn corrupt(why: String) -> Error {
    Error::msg(ErrorKind::Corrupt, why)
}

/// Replays the log of `volume` from `from`, calling `apply` for every whole record
/// except void ones. With `repair`, what follows the last whole record is cut off;
/// without (a read-only open), it is only left unread.
pub fn replay(
    files: &dyn Files,
    volume: [u8; 16],
    from: Position,
    repair: bool,
    mut apply: impl FnMut(Replay<'_>) -> Result<()>,
) -> Result<Replayed> {
    let names = files.list()?;
    let numbers: Vec<u32> = names.iter().filter_map(|n| segment_number(n)).collect();
    let mut segments = BTreeMap::new();
    let mut next_seq = from.next_seq;
    let mut records = 0;
    let mut cut: Option<(u32, u64, u64)> = None;
    let mut cut_segments = Vec::new();
    let mut last_number = from.segment.saturating_sub(1);
    for &n in &numbers {
        if n < from.segment {
            // Sealed before the checkpoint, still read by the index.
            segments.insert(n, files.open(&segment_name(n), repair)?);
            last_number = last_number.max(n);
            continue;
        }
        if cut.is_some() {
            cut_segments.push(n);
            continue;
        }
        let storage = files.open(&segment_name(n), repair)?;
        let len = storage
            .len()
            .map_err(|e| Error::from(e).with_op("read segment"))?;
        let mut head = [0u8; HEADER_LEN];
        storage
            .read_at(&mut head, 0)
            .map_err(|e| Error::from(e).with_op("read segment"))?;
        let first_seq = match SegmentHeader::decode(&head) {
            Ok(h) if h.volume != volume => {
                return Err(corrupt(format!(
                    "segment {} belongs to another volume",
                    segment_name(n)
                )));
            }
            Ok(h) if h.number != n => {
                return Err(corrupt(format!(
                    "segment {} says it is number {}",
                    segment_name(n),
                    h.number
                )));
            }
            Ok(h) => Some(h.first_seq),
            // A header that never became durable: nothing in the segment was synced.
            Err(_) => None,
        };
        // The segment must continue the log where it stands: a later one starts with the
        // next record; the checkpoint's own segment may have started before it.
        let continues = first_seq.is_some_and(|f| {
            if n == from.segment {
                f <= next_seq
            } else {
                f == next_seq
            }
        });
        if from == Position::START && segments.is_empty() && first_seq.is_some_and(|f| f != 1) {
            return Err(corrupt(format!(
                "the log starts at segment {} (record {}), and no checkpoint covers what came \
                 before",
                segment_name(n),
                first_seq.unwrap_or(0)
            )));
        }
        if !continues && n == from.segment && from.offset > HEADER_LEN as u64 {
            return Err(corrupt(format!(
                "segment {} holds records the last checkpoint counts on, but its header is damaged",
                segment_name(n)
            )));
        }
        if !continues {
            cut = Some((n, 0, len));
            cut_segments.push(n);
            continue;
        }
        let mut offset = if n == from.segment {
            from.offset
        } else {
            HEADER_LEN as u64
        };
        let mut payload = Vec::new();
        loop {
            let mut h = [0u8; HEADER_LEN];
            if offset + HEADER_LEN as u64 > len {
                break;
            }
            storage
                .read_at(&mut h, offset)
                .map_err(|e| Error::from(e).with_op("read segment"))?;
            let Some(record) = Record::decode(&h).filter(|r| r.seq == next_seq) else {
                break;
            };
            let plen = record.payload_len();
            if offset + HEADER_LEN as u64 + plen > len {
                break;
            }
            if record.kind != Kind::Void {
                payload.resize(
                    usize::try_from(plen).map_err(|_| corrupt("record too long".into()))?,
                    0,
                );
                storage
                    .read_at(&mut payload, offset + HEADER_LEN as u64)
                    .map_err(|e| Error::from(e).with_op("read segment"))?;
                if !Record::verify(&h, &payload) {
                    break;
                }
                apply(Replay {
                    record: &record,
                    segment: n,
                    payload_offset: offset + HEADER_LEN as u64,
                    payload: &payload,
                })?;
            } else if !Record::verify(&h, &[]) {
                break;
            }
            records += 1;
            next_seq += 1;
            offset += record.total_len();
        }
        segments.insert(n, storage);
        last_number = last_number.max(n);
        if offset < len {
            cut = Some((n, offset, len));
        }
    }
    // Space reserved past the end of the last segment when it was started is released:
    // new records go to a new segment.
    if repair && cut.is_none() {
        if let Some((_, s)) = segments.iter().next_back() {
            let len = s
                .len()
                .map_err(|e| Error::from(e).with_op("read segment"))?;
            s.set_len(len)
                .map_err(|e| Error::from(e).with_op("seal segment"))?;
        }
    }
    let mut cut_bytes = 0;
    if let Some((n, offset, len)) = cut {
        cut_bytes = len - offset;
        if repair {
            if let Some(s) = segments.get(&n) {
                s.set_len(offset)
                    .and_then(|()| s.sync())
                    .map_err(|e| Error::from(e).with_op("cut torn tail"))?;
            }
            for &c in &cut_segments {
                files.remove(&segment_name(c))?;
            }
            files.sync_names()?;
        }
    }
    let last_number = numbers.iter().copied().max().unwrap_or(0).max(last_number);
    Ok(Replayed {
        tail: Tail {
            last_number,
            next_seq,
        },
        segments,
        records,
        cut_bytes,
        cut_segments,
    })
}
