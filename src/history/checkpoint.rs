//! Checkpoints: the index and the restore points as of a place in the log, so that an
//! open replays only the records after it.
//!
//! A checkpoint is written under a temporary name, synced, and renamed into place; the
//! newest one that checks out is used, so a crash while writing one costs nothing.
//! Current versions are stored as runs (consecutive blocks written by one record are
//! one entry), which keeps the checkpoint of a disk written sequentially small.

use crate::error::{Error, ErrorKind, Result};

use super::index::{BLOCK, Epoch, Index, Loc, Version};
use super::point::{Point, PointKind};
use super::replay::Position;

const MAGIC: [u8; 8] = *b"\x89STRCKP\n";
const VERSION: u32 = 1;
const NO_PARENT: u32 = u32::MAX;

/// The file name of the checkpoint cut at `next_seq`.
pub fn checkpoint_name(next_seq: u64) -> String {
    format!("ckpt-{next_seq:016x}")
}

/// The `seq` of a checkpoint's file name.
pub fn checkpoint_seq(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("ckpt-")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

/// What a checkpoint holds.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Where the log continues after it.
    pub position: Position,
    /// The index.
    pub index: Index,
    /// The restore points, oldest first.
    pub points: Vec<Point>,
    /// The `seq` of the last record that changed the disk (a flush after it makes a
    /// point if it is newer than the newest point).
    pub latest_change: u64,
}

struct Out(Vec<u8>);

impl Out {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

struct In<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl In<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| bad("truncated"))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn count(&mut self, each: usize) -> Result<usize> {
        let n = usize::try_from(self.u64()?).map_err(|_| bad("count too large"))?;
        if n.checked_mul(each)
            .is_none_or(|b| b > self.bytes.len() - self.at)
        {
            return Err(bad("count larger than the file"));
        }
        Ok(n)
    }
}

fn bad(why: &str) -> Error {
    Error::msg(ErrorKind::Corrupt, format!("checkpoint: {why}"))
}

fn next_loc(loc: Loc) -> Loc {
    match loc {
        Loc::Data { segment, offset } => Loc::Data {
            segment,
            offset: offset + BLOCK,
        },
        other => other,
    }
}

impl Checkpoint {
    /// The checkpoint's bytes.
    pub fn encode(&self, volume: [u8; 16]) -> Vec<u8> {
        let mut o = Out(Vec::with_capacity(4096));
        o.0.extend_from_slice(&MAGIC);
        o.u32(VERSION);
        o.u32(0);
        o.0.extend_from_slice(&volume);
        o.u64(self.index.blocks());
        o.u32(self.position.segment);
        o.u32(0);
        o.u64(self.position.offset);
        o.u64(self.position.next_seq);
        o.u64(self.latest_change);
        let epochs = self.index.epochs();
        o.u64(epochs.len() as u64);
        for e in epochs {
            o.u64(e.start);
            let (pe, ps) = e.parent.unwrap_or((NO_PARENT, 0));
            o.u32(pe);
            o.u32(0);
            o.u64(ps);
        }
        o.u64(self.points.len() as u64);
        for p in &self.points {
            o.u64(p.seq);
            o.u64(p.time_us);
            o.u32(p.epoch);
            o.u32(u32::from(p.kind.code()));
        }
        // Current versions as runs; older ones one by one.
        let mut runs: Vec<(u64, u32, Version)> = Vec::new();
        let blocks = self.index.blocks();
        let mut b = 0;
        while b < blocks {
            let v = self.index.current(b);
            if v.loc == Loc::Base {
                b += 1;
                continue;
            }
            match runs.last_mut() {
                Some((start, n, first))
                    if *start + u64::from(*n) == b
                        && first.seq == v.seq
                        && *n < u32::MAX
                        && (0..*n).fold(first.loc, |l, _| next_loc(l)) == v.loc =>
                {
                    *n += 1;
                }
                _ => runs.push((b, 1, v)),
            }
            b += 1;
        }
        o.u64(runs.len() as u64);
        for (start, n, v) in &runs {
            o.u64(*start);
            o.u32(*n);
            o.u32(0);
            o.u64(v.seq);
            o.u64(v.loc.pack());
        }
        let older: Vec<(u64, Version)> = self.index.older_versions().collect();
        o.u64(older.len() as u64);
        for (b, v) in &older {
            o.u64(*b);
            o.u64(v.seq);
            o.u64(v.loc.pack());
        }
        let crc = crc32fast::hash(&o.0);
        o.u32(crc);
        o.0
    }

    /// Reads a checkpoint of `volume`, or says what is wrong with it.
    pub fn decode(bytes: &[u8], volume: [u8; 16]) -> Result<Checkpoint> {
        if bytes.len() < 4 {
            return Err(bad("truncated"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(bad("checksum mismatch"));
        }
        let mut i = In { bytes: body, at: 0 };
        if i.take(8)? != MAGIC {
            return Err(bad("not a checkpoint"));
        }
        if i.u32()? != VERSION {
            return Err(bad("unsupported version"));
        }
        i.u32()?;
        if i.take(16)? != volume {
            return Err(bad("belongs to another volume"));
        }
        let blocks = i.u64()?;
        let segment = i.u32()?;
        i.u32()?;
        let position = Position {
            segment,
            offset: i.u64()?,
            next_seq: i.u64()?,
        };
        let latest_change = i.u64()?;
        let n = i.count(24)?;
        let mut epochs = Vec::with_capacity(n);
        for _ in 0..n {
            let start = i.u64()?;
            let pe = i.u32()?;
            i.u32()?;
            let ps = i.u64()?;
            epochs.push(Epoch {
                start,
                parent: (pe != NO_PARENT).then_some((pe, ps)),
            });
        }
        let n = i.count(24)?;
        let mut points = Vec::with_capacity(n);
        for _ in 0..n {
            let seq = i.u64()?;
            let time_us = i.u64()?;
            let epoch = i.u32()?;
            let kind = u8::try_from(i.u32()?)
                .ok()
                .and_then(PointKind::from_code)
                .ok_or_else(|| bad("bad point kind"))?;
            if points.last().is_some_and(|p: &Point| p.seq >= seq) || epoch as usize >= epochs.len()
            {
                return Err(bad("points out of order"));
            }
            points.push(Point {
                seq,
                time_us,
                kind,
                epoch,
            });
        }
        let loc = |v: u64| Loc::unpack(v).ok_or_else(|| bad("bad location"));
        let n = i.count(32)?;
        let mut current = Vec::new();
        for _ in 0..n {
            let start = i.u64()?;
            let count = i.u32()?;
            i.u32()?;
            let seq = i.u64()?;
            let mut l = loc(i.u64()?)?;
            if start
                .checked_add(u64::from(count))
                .is_none_or(|end| end > blocks)
            {
                return Err(bad("run past the end of the disk"));
            }
            for b in start..start + u64::from(count) {
                current.push((b, Version { seq, loc: l }));
                l = next_loc(l);
            }
        }
        let n = i.count(24)?;
        let mut older = Vec::with_capacity(n);
        for _ in 0..n {
            let b = i.u64()?;
            let seq = i.u64()?;
            older.push((
                b,
                Version {
                    seq,
                    loc: loc(i.u64()?)?,
                },
            ));
        }
        if i.at != body.len() {
            return Err(bad("trailing bytes"));
        }
        let index = Index::from_parts(blocks, current, older, epochs)
            .ok_or_else(|| bad("inconsistent index"))?;
        Ok(Checkpoint {
            position,
            index,
            points,
            latest_change,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let mut index = Index::new(1000);
        for b in 0..100 {
            let loc = Loc::Data {
                segment: 1,
                offset: 64 + 64 + b * BLOCK,
            };
            index.set(b, Version { seq: 1, loc }, |_| true);
        }
        index.set(
            500,
            Version {
                seq: 2,
                loc: Loc::Zero,
            },
            |_| true,
        );
        index.set(
            5,
            Version {
                seq: 3,
                loc: Loc::Data {
                    segment: 2,
                    offset: 128,
                },
            },
            |_| true,
        );
        index.rollback(4, 0, 2);
        Checkpoint {
            position: Position {
                segment: 2,
                offset: 4288,
                next_seq: 5,
            },
            index,
            latest_change: 3,
            points: vec![Point {
                seq: 2,
                time_us: 9,
                kind: PointKind::Flush,
                epoch: 0,
            }],
        }
    }

    #[test]
    fn a_checkpoint_round_trips() {
        let c = sample();
        let bytes = c.encode([3; 16]);
        let back = Checkpoint::decode(&bytes, [3; 16]).unwrap();
        assert_eq!(back.position, c.position);
        assert_eq!(back.points, c.points);
        assert_eq!(back.latest_change, 3);
        assert_eq!(back.index.epochs(), c.index.epochs());
        for b in 0..1000 {
            assert_eq!(back.index.current(b), c.index.current(b), "block {b}");
            assert_eq!(back.index.older(b), c.index.older(b), "block {b}");
        }
        assert!(
            bytes.len() < 1024,
            "100 consecutive blocks are one run ({} bytes)",
            bytes.len()
        );
    }

    #[test]
    fn damaged_checkpoints_are_refused() {
        let bytes = sample().encode([3; 16]);
        assert!(
            Checkpoint::decode(&bytes, [4; 16]).is_err(),
            "another volume's"
        );
        for at in [0, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert_eq!(
                Checkpoint::decode(&bad, [3; 16]).unwrap_err().kind(),
                ErrorKind::Corrupt,
                "byte {at}"
            );
        }
        assert!(Checkpoint::decode(&bytes[..bytes.len() - 9], [3; 16]).is_err());
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(checkpoint_seq(&checkpoint_name(77)), Some(77));
        assert_eq!(checkpoint_seq("ckpt-xyz"), None);
    }
}
