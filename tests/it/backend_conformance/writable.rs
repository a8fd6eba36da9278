//! The suite for writable backends: every case of `cases`, run on every fixture.

use std::sync::Arc;

use bytes::Bytes;
use strata::ErrorKind;
use strata::backend::{Backend, ZeroFlags};

use super::checks::{
    all_zero, assert_depths, assert_not_hole, assert_same, awkward_ranges, check_disk,
    check_sparse, check_status, pattern, read, trim, write, write_ranges,
};
use super::{
    CHUNK, Fixture, KIB4, KIB64, READ_STEP, SIZE, block_device, image_file, image_in, image_target,
    memory, opened_image, opened_memory, opened_overlay, opened_raw, overlay, overlay_in, raw,
    raw_in, raw_target, zero_all,
};

mod cases {
    use super::*;

    pub async fn size<B: Backend>(f: Fixture<B>) {
        assert_eq!(f.b.size(), f.size);
    }

    pub async fn capabilities<B: Backend>(f: Fixture<B>) {
        let caps = f.b.capabilities();
        assert!(!caps.read_only, "{caps:?}");
        assert!(
            caps.flush && caps.fua && caps.trim && caps.write_zeroes,
            "{caps:?}"
        );
        let bs = f.b.block_size();
        assert!(
            bs.minimum.is_power_of_two() && bs.preferred.is_power_of_two(),
            "{bs:?}"
        );
        assert!(
            bs.minimum <= bs.preferred && bs.preferred <= bs.maximum,
            "{bs:?}"
        );
    }

    pub async fn fresh_disk_reads_initial_contents<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let data = read(b, 0, f.size).await;
        match &f.contents {
            None => assert!(all_zero(&data), "fresh disk holds data"),
            Some(c) => assert_same(&data, c, 0, "fresh disk"),
        }
        check_sparse(b, 0, READ_STEP as usize).await;
        check_sparse(b, f.size - 1000, 1000).await;
        check_status(b, 0, f.size).await;
        check_status(b, 3, CHUNK).await;
    }

    pub async fn write_then_read_back<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        for (i, (offset, len)) in awkward_ranges(f.size).into_iter().enumerate() {
            write(
                b,
                &mut oracle,
                offset,
                pattern(i as u64, len as usize),
                false,
            )
            .await;
            let back = read(b, offset, len).await;
            assert_same(
                &back,
                &oracle[offset as usize..][..len as usize],
                offset,
                "read back",
            );
        }
        check_disk(b, &oracle, "after writes").await;
    }

    pub async fn overwrite<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        write(b, &mut oracle, CHUNK - 5000, pattern(1, 20000), false).await;
        write(b, &mut oracle, CHUNK - 10, pattern(2, 20), false).await;
        write(b, &mut oracle, CHUNK - 6000, pattern(3, 1500), false).await;
        write(b, &mut oracle, CHUNK + 14000, pattern(4, 3000), false).await;
        check_disk(b, &oracle, "after overwrites").await;
    }

    pub async fn fua_write<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        write(b, &mut oracle, 4095, pattern(5, 8193), true).await;
        check_disk(b, &oracle, "after FUA write").await;
    }

    pub async fn flush<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        b.flush().await.expect("flush of an idle disk");
        let mut oracle = f.initial();
        write(b, &mut oracle, 100, pattern(6, 300_000), false).await;
        b.flush().await.expect("flush after a write");
        check_disk(b, &oracle, "after flush").await;
    }

    pub async fn trim_reads_zero<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        write(b, &mut oracle, 0, pattern(7, 12 * CHUNK as usize), false).await;
        write(
            b,
            &mut oracle,
            f.size - 3 * CHUNK,
            pattern(8, 3 * CHUNK as usize),
            false,
        )
        .await;
        // Unaligned, chunk-aligned, and reaching the end of the disk.
        for (offset, len, fua) in [
            (CHUNK - 3, 2 * CHUNK + 7, false),
            (6 * CHUNK, 2 * CHUNK, true),
            (10 * CHUNK + 1, 100, false),
            (f.size - CHUNK - 5, CHUNK + 5, false),
        ] {
            trim(b, f.trim_zeroes, &mut oracle, offset, len, fua).await;
            check_disk(b, &oracle, &format!("after trim at {offset}+{len}")).await;
            let around = offset.saturating_sub(CHUNK);
            check_status(b, around, (3 * CHUNK).min(f.size - around)).await;
        }
    }

    pub async fn write_zeroes<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        for no_hole in [false, true] {
            for fua in [false, true] {
                let seed = u64::from(no_hole) * 2 + u64::from(fua);
                write(b, &mut oracle, 0, pattern(seed, 8 * CHUNK as usize), false).await;
                let flags = ZeroFlags {
                    fua,
                    no_hole,
                    fast: false,
                };
                for (offset, len) in [(CHUNK - 1, CHUNK + 2), (3 * CHUNK, 2 * CHUNK), (7, 9)] {
                    b.write_zeroes(offset, len, flags)
                        .await
                        .unwrap_or_else(|e| panic!("write_zeroes {flags:?}: {e}"));
                    oracle[offset as usize..][..len as usize].fill(0);
                }
                check_disk(b, &oracle, &format!("after write_zeroes {flags:?}")).await;
                check_status(b, 0, 8 * CHUNK).await;
                zero_all(b).await;
                oracle.fill(0);
            }
        }
    }

    pub async fn fast_write_zeroes<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        for no_hole in [false, true] {
            write(b, &mut oracle, 0, pattern(9, 4 * CHUNK as usize), false).await;
            let flags = ZeroFlags {
                fua: false,
                no_hole,
                fast: true,
            };
            match b.write_zeroes(CHUNK / 2, 2 * CHUNK, flags).await {
                Ok(()) => oracle[(CHUNK / 2) as usize..][..2 * CHUNK as usize].fill(0),
                Err(e) if e.kind() == ErrorKind::NotSupported => {}
                Err(e) => panic!("fast write_zeroes failed with {e:?}"),
            }
            check_disk(b, &oracle, &format!("after write_zeroes {flags:?}")).await;
        }
    }

    pub async fn block_status<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        let ranges = awkward_ranges(f.size);
        write_ranges(b, &mut oracle, &ranges, 10).await;
        for &(offset, len) in &ranges {
            assert_not_hole(b, offset, len).await;
        }
        for (offset, len) in [
            (0, f.size),
            (1, 2 * CHUNK),
            (CHUNK - 1, 1),
            (CHUNK + 1, 7 * CHUNK - 2),
            (f.size - CHUNK - 3, CHUNK + 3),
            (f.size - 1, 1),
        ] {
            check_status(b, offset, len).await;
        }
    }

    pub async fn allocation_depth<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        for (offset, len) in [(0, f.size), (f.size - 1, 1)] {
            assert_depths(b, &f.depths, &[], offset, len).await;
        }
        let written = [(CHUNK + 5, 2 * CHUNK), (f.size - 3, 2)];
        write_ranges(b, &mut oracle, &written, 60).await;
        for (offset, len) in [
            (0, f.size),
            (0, CHUNK),
            (CHUNK + 5, 2 * CHUNK),
            (CHUNK - 1, 5 * CHUNK),
            (f.size - 1, 1),
            (f.size - CHUNK - 1, CHUNK + 1),
        ] {
            assert_depths(b, &f.depths, &written, offset, len).await;
        }
        check_disk(b, &oracle, "after writes").await;
    }

    pub async fn read_sparse<B: Backend>(f: Fixture<B>) {
        let b = &*f.b;
        let mut oracle = f.initial();
        write(b, &mut oracle, CHUNK + 10, pattern(11, 100), false).await;
        write(
            b,
            &mut oracle,
            3 * CHUNK,
            pattern(12, CHUNK as usize),
            false,
        )
        .await;
        write(b, &mut oracle, 6 * CHUNK - 1, pattern(13, 2), false).await;
        for (offset, len) in [
            (0, 8 * CHUNK as usize),
            (CHUNK + 10, 100),
            (CHUNK + 5, 3 * CHUNK as usize),
            (3 * CHUNK - 1, CHUNK as usize + 2),
            (f.size - 100, 100),
            (77, 1),
        ] {
            check_sparse(b, offset, len).await;
        }
    }

    pub async fn concurrent_writes<B: Backend>(f: Fixture<B>) {
        const TASKS: u64 = 8;
        const PIECES: u64 = 24;
        // Interleaved, unaligned pieces: neighbouring tasks share chunks.
        const PIECE: u64 = 4099;
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let b = Arc::clone(&f.b);
            tasks.spawn(async move {
                for i in 0..PIECES {
                    let offset = (i * TASKS + t) * PIECE;
                    let data = Bytes::from(pattern(offset, PIECE as usize));
                    b.write(offset, data, false)
                        .await
                        .expect("concurrent write");
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("writer task");
        }
        let mut oracle = f.initial();
        for k in 0..TASKS * PIECES {
            let offset = k * PIECE;
            oracle[offset as usize..][..PIECE as usize]
                .copy_from_slice(&pattern(offset, PIECE as usize));
        }
        check_disk(&*f.b, &oracle, "after concurrent writes").await;
    }

    pub async fn cache<B: Backend>(f: Fixture<B>) {
        f.b.cache(0, f.size).await.expect("cache whole disk");
        f.b.cache(12345, 678).await.expect("cache a range");
    }
}

/// Instantiates every case of [`cases`] for a fixture expression of type
/// `Option<Fixture<_>>` (`None` skips).
macro_rules! conformance {
    ($suite:ident, $fixture:expr) => {
        suite!(
            $suite,
            cases,
            $fixture,
            [
                size,
                capabilities,
                fresh_disk_reads_initial_contents,
                write_then_read_back,
                overwrite,
                fua_write,
                flush,
                trim_reads_zero,
                write_zeroes,
                fast_write_zeroes,
                block_status,
                allocation_depth,
                read_sparse,
                concurrent_writes,
                cache
            ]
        );
    };
}

conformance!(memory_backend, Some(memory(SIZE)));
conformance!(raw_file, Some(raw(SIZE)));
conformance!(raw_file_in_target_dir, Some(raw_target(SIZE)));
conformance!(shared_memory, Some(memory(SIZE).shared()));
conformance!(shared_raw_file, Some(raw(SIZE).shared()));
conformance!(opened_memory_spec, Some(opened_memory(SIZE)));
conformance!(opened_raw_path, Some(opened_raw(SIZE)));
conformance!(image_64k, Some(image_file(SIZE, KIB64)));
conformance!(image_4k, Some(image_file(SIZE, KIB4)));
conformance!(image_64k_in_target_dir, Some(image_target(SIZE, KIB64)));
conformance!(image_4k_in_target_dir, Some(image_target(SIZE, KIB4)));
conformance!(shared_image, Some(image_file(SIZE, KIB4).shared()));
conformance!(opened_image_path, Some(opened_image(SIZE)));
conformance!(overlay_depth_1, Some(overlay(SIZE, 1)));
conformance!(overlay_depth_2, Some(overlay(SIZE, 2)));
conformance!(overlay_depth_10, Some(overlay(SIZE, 10)));
conformance!(
    overlay_4k_in_target_dir,
    Some(overlay_in(Some(env!("CARGO_TARGET_TMPDIR")), SIZE, KIB4, 2))
);
conformance!(shared_overlay, Some(overlay(SIZE, 2).shared()));
// Files in memory take the zero-copy read paths (replies point into mappings).
conformance!(
    raw_file_in_memory,
    crate::support::memory_dir().map(|d| raw_in(Some(d), SIZE, false))
);
conformance!(
    shared_raw_file_in_memory,
    crate::support::memory_dir().map(|d| raw_in(Some(d), SIZE, false).shared())
);
conformance!(
    image_64k_in_memory,
    crate::support::memory_dir().map(|d| image_in(Some(d), SIZE, KIB64))
);
conformance!(
    image_4k_in_memory,
    crate::support::memory_dir().map(|d| image_in(Some(d), SIZE, KIB4))
);
conformance!(
    overlay_depth_2_in_memory,
    crate::support::memory_dir().map(|d| overlay_in(Some(d), SIZE, KIB64, 2))
);
conformance!(
    overlay_4k_depth_10_in_memory,
    crate::support::memory_dir().map(|d| overlay_in(Some(d), SIZE, KIB4, 10))
);
conformance!(opened_overlay_path, Some(opened_overlay(SIZE, 10)));
conformance!(block_device_raw, {
    let f = block_device(false);
    if let Some(f) = &f {
        zero_all(&*f.b).await;
    }
    f
});
conformance!(block_device_shared, {
    let f = block_device(false).map(Fixture::shared);
    if let Some(f) = &f {
        zero_all(&*f.b).await;
    }
    f
});
