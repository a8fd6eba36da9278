//! The suite for read-only stacks: every case of `ro_cases`, run on read-only layers over
//! disks prefilled with known data.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use strata::ErrorKind;
use strata::backend::{self, Backend, ImageBackend, RawBackend, ZeroFlags};
use strata::image;

use super::checks::{
    assert_depths, assert_not_hole, check_disk, check_sparse, check_status, pattern, write_ranges,
};
use super::{
    CHUNK, Fixture, Guard, KIB4, KIB64, SIZE, block_device, image_file, memory, overlay, raw,
    zero_all,
};

/// A read-only stack over a disk whose contents are known.
struct Prefilled<B> {
    f: Fixture<B>,
    contents: Vec<u8>,
    /// What the prefill wrote through the top layer.
    written: Vec<(u64, u64)>,
}

/// Writes known data through a writable fixture, then wraps it read-only with `wrap`.
async fn prefill<W: Backend, B: Backend>(
    f: Fixture<W>,
    wrap: impl FnOnce(Fixture<W>) -> Fixture<B>,
) -> Prefilled<B> {
    if f.needs_reset {
        zero_all(&*f.b).await;
    }
    let mut contents = f.initial();
    let written = vec![(CHUNK - 7, 3 * CHUNK), (f.size - 10, 10)];
    write_ranges(&*f.b, &mut contents, &written, 20).await;
    f.b.flush().await.expect("flush");
    Prefilled {
        f: wrap(f),
        contents,
        written,
    }
}

/// Prefills a raw file, then reopens it read-only with `reopen`.
async fn prefill_file<B: Backend>(reopen: impl FnOnce(&str) -> B) -> Prefilled<B> {
    let Prefilled {
        f,
        contents,
        written,
    } = prefill(raw(SIZE), |f| f).await;
    let Some(Guard::File(file)) = f._guard else {
        unreachable!("raw fixtures hold their file")
    };
    let b = reopen(file.path().to_str().unwrap());
    Prefilled {
        f: Fixture::new(b, SIZE, Some(Guard::File(file))),
        contents,
        written,
    }
}

/// Prefills an image fixture, closes it, then reopens its top image read-only with
/// `reopen`.
async fn prefill_image<W: Backend, B: Backend>(
    f: Fixture<W>,
    reopen: impl FnOnce(&Path) -> B,
) -> Prefilled<B> {
    let Prefilled {
        f,
        contents,
        written,
    } = prefill(f, |f| f).await;
    let Fixture {
        b,
        size,
        depths,
        _guard,
        ..
    } = f;
    // Closing the writable image releases its lock, so it can be opened again.
    drop(Arc::into_inner(b).expect("fixture not shared"));
    let Some(Guard::Dir { top, .. }) = &_guard else {
        unreachable!("image fixtures hold their directory")
    };
    let b = reopen(top);
    let mut f = Fixture::new(b, size, _guard);
    f.depths = depths;
    Prefilled {
        f,
        contents,
        written,
    }
}

mod ro_cases {
    use super::*;

    pub async fn capabilities<B: Backend>(p: Prefilled<B>) {
        let caps = p.f.b.capabilities();
        assert!(caps.read_only, "{caps:?}");
        assert!(
            !caps.fua && !caps.trim && !caps.write_zeroes && !caps.fast_zero,
            "{caps:?}"
        );
        assert_eq!(p.f.b.size(), p.f.size);
    }

    pub async fn reads_pass_through<B: Backend>(p: Prefilled<B>) {
        let b = &*p.f.b;
        check_disk(b, &p.contents, "read-only read").await;
        check_sparse(b, 0, 5 * CHUNK as usize).await;
        check_sparse(b, p.f.size - 100, 100).await;
        check_status(b, 0, p.f.size).await;
        assert_not_hole(b, CHUNK - 7, 3 * CHUNK).await;
        assert_depths(b, &p.f.depths, &p.written, 0, p.f.size).await;
        assert_depths(b, &p.f.depths, &p.written, 5 * CHUNK, CHUNK).await;
        b.cache(0, CHUNK).await.expect("cache");
    }

    pub async fn refuses_modification<B: Backend>(p: Prefilled<B>) {
        let b = &*p.f.b;
        let refused = |what: &str, r: strata::Result<()>| match r {
            Err(e) => assert_eq!(e.kind(), ErrorKind::ReadOnly, "{what}: {e}"),
            Ok(()) => panic!("{what} succeeded on a read-only stack"),
        };
        for fua in [false, true] {
            let data = Bytes::from(pattern(22, 5000));
            refused("write", b.write(CHUNK, data, fua).await);
            refused("trim", b.trim(0, 2 * CHUNK, fua).await);
        }
        for (fua, no_hole, fast) in [
            (false, false, false),
            (true, true, false),
            (false, false, true),
        ] {
            let flags = ZeroFlags { fua, no_hole, fast };
            refused("write_zeroes", b.write_zeroes(0, 2 * CHUNK, flags).await);
        }
        check_disk(b, &p.contents, "after refused modifications").await;
    }
}

/// Instantiates every case of [`ro_cases`] for an expression evaluating (with `.await`
/// allowed) to `Option<Prefilled<_>>`.
macro_rules! read_only {
    ($suite:ident, $prefilled:expr) => {
        suite!(
            $suite,
            ro_cases,
            $prefilled,
            [capabilities, reads_pass_through, refuses_modification]
        );
    };
}

read_only!(
    read_only_memory,
    Some(prefill(memory(SIZE), Fixture::read_only).await)
);
read_only!(
    read_only_shared_memory,
    Some(prefill(memory(SIZE), |f| f.shared().read_only()).await)
);
read_only!(
    read_only_raw_file,
    Some(prefill(raw(SIZE), Fixture::read_only).await)
);
read_only!(
    raw_file_opened_read_only,
    Some(prefill_file(|path| RawBackend::open(path, true).expect("open read-only")).await)
);
read_only!(
    opened_path_read_only,
    Some(prefill_file(|path| backend::open(path, true).expect("open read-only")).await)
);
read_only!(
    read_only_image,
    Some(prefill(image_file(SIZE, KIB64), Fixture::read_only).await)
);
read_only!(
    read_only_overlay,
    Some(prefill(overlay(SIZE, 2), Fixture::read_only).await)
);
read_only!(
    image_opened_read_only,
    Some(
        prefill_image(image_file(SIZE, KIB4), |path| {
            ImageBackend::new(image::open(path, false).expect("open read-only"))
        })
        .await
    )
);
read_only!(
    image_path_opened_read_only,
    Some(
        prefill_image(image_file(SIZE, KIB64), |path| {
            backend::open(path.to_str().unwrap(), true).expect("open read-only")
        })
        .await
    )
);
read_only!(
    overlay_opened_read_only,
    Some(
        prefill_image(overlay(SIZE, 10), |path| {
            ImageBackend::new(image::open(path, false).expect("open read-only"))
        })
        .await
    )
);
read_only!(
    overlay_path_opened_read_only,
    Some(
        prefill_image(overlay(SIZE, 2), |path| {
            backend::open(path.to_str().unwrap(), true).expect("open read-only")
        })
        .await
    )
);
read_only!(read_only_block_device, {
    match block_device(false) {
        Some(f) => Some(prefill(f, Fixture::read_only).await),
        None => None,
    }
});
