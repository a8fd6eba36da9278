//! Allocation maps as clients report them (`qemu-img map --output=json`, `nbdinfo
//! --map`), parsed into one shape and checked against the ranges a test wrote.

use serde::Deserialize;

use super::{nbdinfo, qemu_img, run_ok};

/// One entry of an allocation map: `[start, start+length)` with flags. Deserialized from
/// an entry of `qemu-img map --output=json`, whose other members are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// Reads as zeroes.
    pub zero: bool,
    /// Allocated data (not a hole).
    pub data: bool,
}

impl MapEntry {
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}
/// Checks that `map` covers `[0, size)` contiguously and that it reports exactly the
/// ranges in `data` (sorted, non-overlapping `(start, end)` pairs) as allocated data and
/// everything else as unallocated zeroes. An entry straddling a boundary fails.
#[track_caller]
pub fn assert_map(map: &[MapEntry], size: u64, data: &[(u64, u64)], raw: &str) {
    let mut pos = 0;
    for e in map {
        assert_eq!(
            e.start, pos,
            "map not contiguous at {pos}: {e:?}\nfull map:\n{raw}"
        );
        assert!(e.length > 0, "empty map entry {e:?}\nfull map:\n{raw}");
        pos = e.end();
    }
    assert_eq!(pos, size, "map does not cover the export\nfull map:\n{raw}");
    for e in map {
        let covered: u64 = data
            .iter()
            .map(|&(s, t)| t.min(e.end()).saturating_sub(s.max(e.start)))
            .sum();
        if covered == e.length {
            assert!(
                e.data,
                "{e:?} lies inside written ranges {data:?} but is not reported as data\nfull map:\n{raw}"
            );
        } else if covered == 0 {
            assert!(
                !e.data && e.zero,
                "{e:?} lies outside written ranges {data:?} but is not reported as a zero hole\nfull map:\n{raw}"
            );
        } else {
            panic!(
                "{e:?} straddles the edge of written ranges {data:?} ({covered} of its bytes written)\nfull map:\n{raw}"
            );
        }
    }
}

/// Asserts that `nbdinfo --map` of the export at `uri` reports exactly the `data` ranges
/// as written, as [`assert_map`] does.
#[track_caller]
pub fn assert_nbdinfo_map(uri: &str, size: u64, data: &[(u64, u64)]) {
    let out = nbdinfo(&["--map", uri]).assert_success();
    assert_map(&parse_nbdinfo_map(&out.stdout), size, data, &out.stdout);
}

/// Asserts that `qemu-img map` of the raw export at `uri` reports exactly the `data`
/// ranges as written, as [`assert_map`] does.
#[track_caller]
pub fn assert_qemu_map(uri: &str, size: u64, data: &[(u64, u64)]) {
    let out = run_ok(qemu_img().args(["map", "--output=json", "-f", "raw", uri]));
    assert_map(&parse_qemu_map(&out.stdout), size, data, &out.stdout);
}

/// Parses `qemu-img map --output=json`.
#[track_caller]
pub fn parse_qemu_map(json: &str) -> Vec<MapEntry> {
    serde_json::from_str(json).unwrap_or_else(|e| {
        panic!("qemu-img map output is not a list of map entries ({e}):\n{json}")
    })
}

/// The lines of `nbdinfo --map`: `offset length value description...`, the value being
/// the metadata context's flags or depth.
#[track_caller]
fn nbdinfo_lines(text: &str) -> Vec<(u64, u64, u64, String)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num = |i: usize| -> u64 {
                f.get(i)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("bad nbdinfo --map line {l:?}"))
            };
            let description = f.get(3..).map(|d| d.join(" ")).unwrap_or_default();
            (num(0), num(1), num(2), description)
        })
        .collect()
}

/// Parses `nbdinfo --map` output, whose values are the base:allocation flags (bit 0 hole,
/// bit 1 zero).
#[track_caller]
pub fn parse_nbdinfo_map(text: &str) -> Vec<MapEntry> {
    nbdinfo_lines(text)
        .into_iter()
        .map(|(start, length, flags, _)| MapEntry {
            start,
            length,
            zero: flags & 2 != 0,
            data: flags & 1 == 0,
        })
        .collect()
}

/// One line of `nbdinfo --map=qemu:allocation-depth`: `[start, start+length)` provided by
/// the layer at `depth` (0 unallocated, 1 the top layer, 2 its backing, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepthEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    /// nbdinfo's wording for the depth (`absent`, `local`, `backing depth N`).
    pub description: String,
}

/// Parses `nbdinfo --map=qemu:allocation-depth` output.
#[track_caller]
pub fn parse_nbdinfo_depth_map(text: &str) -> Vec<DepthEntry> {
    nbdinfo_lines(text)
        .into_iter()
        .map(|(start, length, depth, description)| DepthEntry {
            start,
            length,
            depth: u32::try_from(depth)
                .unwrap_or_else(|_| panic!("depth {depth} beyond 32 bits at offset {start}")),
            description,
        })
        .collect()
}
