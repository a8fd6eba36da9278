//! What only one backend or layer does: the memory disk's sparseness and zero-copy reads,
//! raw files' holes, shrinking and open errors, and wrappers passing allocation depth
//! through.

use std::sync::Arc;

use bytes::Bytes;
use strata::ErrorKind;
use strata::backend::{
    self, Backend, MemoryBackend, RawBackend, ReadOnly, SharedBackend, ZeroFlags,
};
use strata::block::{DepthExtent, Extent, ReadChunk};

use crate::support::scratch;

use super::checks::{all_zero, assert_not_hole, check_status, pattern, read};
use super::{CHUNK, Guard, SIZE, raw};

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
    let shared: SharedBackend = Arc::new(TwoLayers);
    let depths = depths_of(&TwoLayers, query).await;
    assert_eq!(depths, expected, "TwoLayers");
    let depths = depths_of(&shared, query).await;
    assert_eq!(depths, expected, "SharedBackend");
    let depths = depths_of(&ReadOnly::new(TwoLayers), query).await;
    assert_eq!(depths, expected, "ReadOnly");
    let depths = depths_of(&ReadOnly::new(shared), query).await;
    assert_eq!(depths, expected, "ReadOnly over SharedBackend");
}

/// The allocation depth `b` reports for `(offset, len)`, which must succeed.
async fn depths_of<B: Backend>(b: &B, (offset, len): (u64, u64)) -> Vec<DepthExtent> {
    b.allocation_depth(offset, len)
        .await
        .expect("allocation_depth")
}
