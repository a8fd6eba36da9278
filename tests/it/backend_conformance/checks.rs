//! The checks the suites share: writes and trims that keep an oracle, reads in steps,
//! and what block status, allocation depth and sparse reads must say about a disk.

use bytes::Bytes;
use strata::backend::Backend;
use strata::block::{DepthExtent, Extent, ReadChunk};

use super::{CHUNK, Depths, READ_STEP};

/// Trims a range and updates the oracle: to zeroes, or (when trimmed ranges need not read
/// as zeroes) to what the disk now holds, after checking that every byte is either its old
/// value or zero.
pub(super) async fn trim<B: Backend>(
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
pub(super) fn pattern(seed: u64, len: usize) -> Vec<u8> {
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

pub(super) async fn write<B: Backend>(
    b: &B,
    oracle: &mut [u8],
    offset: u64,
    data: Vec<u8>,
    fua: bool,
) {
    let end = offset as usize + data.len();
    oracle[offset as usize..end].copy_from_slice(&data);
    b.write(offset, Bytes::from(data), fua)
        .await
        .unwrap_or_else(|e| panic!("write at {offset}: {e}"));
}

/// Writes the `i`th of `ranges` with `pattern(seed + i, ..)`, keeping `oracle` in step.
pub(super) async fn write_ranges<B: Backend>(
    b: &B,
    oracle: &mut [u8],
    ranges: &[(u64, u64)],
    seed: u64,
) {
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        let data = pattern(seed + i as u64, len as usize);
        write(b, oracle, offset, data, false).await;
    }
}

pub(super) async fn read<B: Backend>(b: &B, offset: u64, len: u64) -> Vec<u8> {
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
pub(super) fn all_zero(data: &[u8]) -> bool {
    static ZEROES: [u8; 4096] = [0; 4096];
    data.chunks(ZEROES.len()).all(|c| c == &ZEROES[..c.len()])
}

/// Panics with the first differing offset unless `actual == expected`.
#[track_caller]
pub(super) fn assert_same(actual: &[u8], expected: &[u8], base: u64, what: &str) {
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
pub(super) async fn check_disk<B: Backend>(b: &B, oracle: &[u8], what: &str) {
    let actual = read(b, 0, oracle.len() as u64).await;
    assert_same(&actual, oracle, 0, what);
}

/// Checks the `block_status` contract for one query and its agreement with the data.
pub(super) async fn check_status<B: Backend>(b: &B, offset: u64, len: u64) -> Vec<Extent> {
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
pub(super) async fn assert_not_hole<B: Backend>(b: &B, offset: u64, len: u64) {
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
pub(super) async fn assert_depths<B: Backend>(
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
pub(super) async fn check_sparse<B: Backend>(b: &B, offset: u64, len: usize) {
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
pub(super) fn awkward_ranges(size: u64) -> Vec<(u64, u64)> {
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
