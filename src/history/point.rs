//! Restore points, and how people name one: a `seq`, a time, or a time relative to now.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::time;

/// What made a restore point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointKind {
    /// An acknowledged `NBD_CMD_FLUSH`.
    Flush,
    /// A write with force-unit-access.
    Fua,
}

impl PointKind {
    /// The name the API and `--json` use.
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::Flush => "flush",
            PointKind::Fua => "fua",
        }
    }

    /// The code a checkpoint stores.
    pub fn code(self) -> u8 {
        match self {
            PointKind::Flush => 1,
            PointKind::Fua => 2,
        }
    }

    /// The inverse of [`PointKind::code`].
    pub fn from_code(c: u8) -> Option<PointKind> {
        match c {
            1 => Some(PointKind::Flush),
            2 => Some(PointKind::Fua),
            _ => None,
        }
    }
}

/// A restore point: the disk as it was after record `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// The record that made it.
    pub seq: u64,
    /// When, in microseconds since the epoch.
    pub time_us: u64,
    /// What made it.
    pub kind: PointKind,
    /// The epoch it belongs to (see [`super::index`]).
    pub epoch: u32,
}

/// How a person names a restore point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointSpec {
    /// Its `seq`.
    Seq(u64),
    /// The latest point at or before this time (microseconds since the epoch).
    At(u64),
    /// The latest point at or before this long ago.
    Ago(Duration),
}

impl PointSpec {
    /// Reads `42`, an RFC 3339 time, or `-10m`.
    pub fn parse(text: &str) -> Result<PointSpec> {
        let t = text.trim();
        if let Some(rel) = t.strip_prefix('-') {
            return time::parse_duration(rel)
                .map(PointSpec::Ago)
                .map_err(|_| bad_point(text));
        }
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            return t.parse().map(PointSpec::Seq).map_err(|_| bad_point(text));
        }
        if t.len() >= 19 && t.as_bytes()[4] == b'-' {
            return time::parse_rfc3339(t).map(PointSpec::At);
        }
        Err(bad_point(text))
    }

    /// The point of `points` (sorted by `seq`) this names, at `now_us`.
    pub fn resolve(self, points: &[Point], now_us: u64) -> Result<Point> {
        let Some(first) = points.first() else {
            return Err(Error::msg(
                ErrorKind::NotFound,
                "the volume has no restore point yet",
            ));
        };
        let at_or_before = |us: u64, what: String| {
            let i = points.partition_point(|p| p.time_us <= us);
            if i == 0 {
                return Err(Error::msg(
                    ErrorKind::NotFound,
                    format!(
                        "{what} is before the oldest restore point ({}, seq {})",
                        time::rfc3339_us(first.time_us),
                        first.seq
                    ),
                ));
            }
            Ok(points[i - 1])
        };
        match self {
            PointSpec::Seq(seq) => match points.binary_search_by_key(&seq, |p| p.seq) {
                Ok(i) => Ok(points[i]),
                Err(_) => Err(Error::msg(
                    ErrorKind::NotFound,
                    if seq < first.seq {
                        format!(
                            "restore point {seq} has left the retention window (the oldest is {})",
                            first.seq
                        )
                    } else {
                        format!("no restore point with seq {seq}")
                    },
                )),
            },
            PointSpec::At(us) => at_or_before(us, time::rfc3339_us(us)),
            PointSpec::Ago(d) => {
                let ago = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
                let us = now_us.saturating_sub(ago);
                at_or_before(
                    us,
                    format!("{}s ago ({})", d.as_secs(), time::rfc3339_us(us)),
                )
            }
        }
    }
}

fn bad_point(text: &str) -> Error {
    Error::msg(
        ErrorKind::InvalidInput,
        format!(
            "{text:?} is not a restore point: give a seq (1234), a time \
             (2026-12-04T10:42:00Z) or a time ago (-10m)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points() -> Vec<Point> {
        [
            (3, 1_000_000),
            (7, 2_000_000),
            (9, 2_000_000),
            (12, 5_000_000),
        ]
        .iter()
        .map(|&(seq, time_us)| Point {
            seq,
            time_us,
            kind: PointKind::Flush,
            epoch: 0,
        })
        .collect()
    }

    #[test]
    fn points_are_named_three_ways() {
        assert_eq!(PointSpec::parse("42").unwrap(), PointSpec::Seq(42));
        assert_eq!(
            PointSpec::parse("-10m").unwrap(),
            PointSpec::Ago(Duration::from_secs(600))
        );
        assert_eq!(
            PointSpec::parse("1970-01-01T00:00:02Z").unwrap(),
            PointSpec::At(2_000_000)
        );
        for bad in ["", "soon", "-", "-10x", "12abc", "2026-13-01T00:00:00Z"] {
            assert_eq!(
                PointSpec::parse(bad).unwrap_err().kind(),
                ErrorKind::InvalidInput,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_time_names_the_latest_point_at_or_before_it() {
        let p = points();
        assert_eq!(PointSpec::At(2_000_000).resolve(&p, 0).unwrap().seq, 9);
        assert_eq!(PointSpec::At(4_999_999).resolve(&p, 0).unwrap().seq, 9);
        assert_eq!(
            PointSpec::Ago(Duration::from_secs(1))
                .resolve(&p, 6_000_000)
                .unwrap()
                .seq,
            12
        );
        assert_eq!(PointSpec::Seq(7).resolve(&p, 0).unwrap().time_us, 2_000_000);
    }

    #[test]
    fn points_outside_the_window_are_clear_errors() {
        let p = points();
        let e = PointSpec::At(999_999).resolve(&p, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(
            e.to_string().contains("before the oldest restore point"),
            "{e}"
        );
        let e = PointSpec::Seq(1).resolve(&p, 0).unwrap_err();
        assert!(e.to_string().contains("left the retention window"), "{e}");
        let e = PointSpec::Seq(8).resolve(&p, 0).unwrap_err();
        assert!(e.to_string().contains("no restore point with seq 8"), "{e}");
        assert!(PointSpec::Seq(1).resolve(&[], 0).is_err());
    }
}
