//! Test data: deterministic patterns, images made through the library, byte comparisons
//! that name the first difference, the fuzz seeds, proptest's settings.

use std::path::{Path, PathBuf};

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A raw image of `len` bytes mixing random data, zero runs and a byte fill, so copies
/// exercise data, holes and zero detection. Written to `path`.
pub fn write_mixed_image(path: &Path, seed: u64, len: usize) -> Vec<u8> {
    let mut data = pattern(seed, len);
    let chunk = 256 * 1024;
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        match i % 4 {
            1 => c.fill(0),
            3 => c.fill(0x5a),
            _ => {}
        }
    }
    std::fs::write(path, &data).expect("write image");
    data
}

/// Panics with the first differing offset if `a != b`.
#[track_caller]
pub fn assert_same_bytes(what: &str, a: &[u8], b: &[u8]) {
    if a == b {
        return;
    }
    let first = a.iter().zip(b).position(|(x, y)| x != y);
    match first {
        Some(i) => panic!(
            "{what}: contents differ first at offset {i} (0x{i:x}): {:#04x} vs {:#04x} (lengths {} and {})",
            a[i],
            b[i],
            a.len(),
            b.len()
        ),
        None => panic!("{what}: lengths differ: {} vs {}", a.len(), b.len()),
    }
}

/// A fresh temporary directory, and the path of `name` in it.
pub fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join(name);
    (dir, path)
}

/// Creates an empty standalone Strata image at `path` (which must not exist).
pub fn new_image(path: &Path, size: u64, cluster: u64) {
    let _images = super::images_open();
    strata::image::create(
        path,
        &strata::image::CreateOptions {
            size: Some(size),
            cluster_size: Some(cluster),
            backing: None,
        },
    )
    .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

/// A small tokio runtime for tests that drive the library's async API.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Checks that the seed files of fuzz target `target` under `fuzz/corpus/` hold exactly
/// `seeds`; with `STRATA_WRITE_FUZZ_CORPUS` set, writes them instead.
#[track_caller]
pub fn check_fuzz_seeds(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let write = std::env::var_os("STRATA_WRITE_FUZZ_CORPUS").is_some();
    for (name, bytes) in seeds {
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, bytes).unwrap();
            continue;
        }
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with STRATA_WRITE_FUZZ_CORPUS=1",
                path.display()
            )
        });
        assert!(
            on_disk == *bytes,
            "{} is stale; regenerate with STRATA_WRITE_FUZZ_CORPUS=1",
            path.display()
        );
    }
}

/// proptest's settings for `cases` cases. Failures are kept beside the test's source file
/// (`NAME.proptest-regressions`): proptest's default would put them under
/// `tests/proptest-regressions/`, because this directory has a `main.rs`.
pub fn proptest_cases(cases: u32) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, FileFailurePersistence};
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}
