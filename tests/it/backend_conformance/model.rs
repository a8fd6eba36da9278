//! Model test: random operations against a `Vec<u8>` oracle, on every kind of fixture.

use bytes::Bytes;
use proptest::prelude::*;
use strata::ErrorKind;
use strata::backend::{Backend, ZeroFlags};

use super::checks::{check_sparse, check_status, pattern, read, trim};
use super::{
    CHUNK, Fixture, KIB4, KIB64, block_device, image_file, image_target, memory, overlay_in, raw,
    raw_target, zero_all,
};

/// Size of the model-tested disks.
const MODEL_SIZE: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write {
        at: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    Read {
        at: u64,
        len: u64,
    },
    ReadSparse {
        at: u64,
        len: u64,
    },
    Trim {
        at: u64,
        len: u64,
    },
    WriteZeroes {
        at: u64,
        len: u64,
        flags: ZeroFlags,
    },
    BlockStatus {
        at: u64,
        len: u64,
    },
    Flush,
}

fn position() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![
        any::<u64>(),
        // Near a chunk boundary.
        (0u64..64, 0u64..16).prop_map(|(k, d)| (k * CHUNK + d).wrapping_sub(8)),
    ]
}

fn length() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![1u64..600, 1u64..3 * CHUNK]
}

fn op() -> impl Strategy<Value = Op> {
    let range = (position(), length());
    prop_oneof![
        5 => (range.clone(), any::<u8>(), prop::bool::weighted(0.1))
            .prop_map(|((at, len), seed, fua)| Op::Write { at, len, seed, fua }),
        3 => range.clone().prop_map(|(at, len)| Op::Read { at, len }),
        1 => range.clone().prop_map(|(at, len)| Op::ReadSparse { at, len }),
        2 => range.clone().prop_map(|(at, len)| Op::Trim { at, len }),
        2 => (range.clone(), any::<bool>(), prop::bool::weighted(0.3)).prop_map(
            |((at, len), no_hole, fast)| Op::WriteZeroes {
                at,
                len,
                flags: ZeroFlags { fua: false, no_hole, fast },
            }
        ),
        1 => range.prop_map(|(at, len)| Op::BlockStatus { at, len }),
        1 => Just(Op::Flush),
    ]
}

/// Maps a generated range into the disk (non-empty, in bounds).
fn clamp(size: u64, at: u64, len: u64) -> (u64, u64) {
    let at = at % size;
    (at, len.min(size - at).max(1))
}

/// Applies `ops` to the backend and the oracle, which starts as `oracle`, comparing every
/// read.
async fn run_model<B: Backend>(
    b: &B,
    trim_zeroes: bool,
    mut oracle: Vec<u8>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let size = b.size();
    for op in ops {
        match *op {
            Op::Write { at, len, seed, fua } => {
                let (at, len) = clamp(size, at, len);
                let data = pattern((u64::from(seed) << 32) | at, len as usize);
                oracle[at as usize..][..len as usize].copy_from_slice(&data);
                b.write(at, Bytes::from(data), fua).await.unwrap();
            }
            Op::Read { at, len } => {
                let (at, len) = clamp(size, at, len);
                let data = b.read(at, len as usize).await.unwrap();
                prop_assert!(
                    data[..] == oracle[at as usize..][..len as usize],
                    "read at {}+{} differs from the oracle",
                    at,
                    len
                );
            }
            Op::ReadSparse { at, len } => {
                let (at, len) = clamp(size, at, len);
                check_sparse(b, at, len as usize).await;
            }
            Op::Trim { at, len } => {
                let (at, len) = clamp(size, at, len);
                trim(b, trim_zeroes, &mut oracle, at, len, false).await;
            }
            Op::WriteZeroes { at, len, flags } => {
                let (at, len) = clamp(size, at, len);
                match b.write_zeroes(at, len, flags).await {
                    Ok(()) => oracle[at as usize..][..len as usize].fill(0),
                    Err(e) if flags.fast && e.kind() == ErrorKind::NotSupported => {}
                    Err(e) => panic!("write_zeroes {flags:?} at {at}+{len}: {e}"),
                }
            }
            Op::BlockStatus { at, len } => {
                let (at, len) = clamp(size, at, len);
                check_status(b, at, len).await;
            }
            Op::Flush => b.flush().await.unwrap(),
        }
    }
    let all = read(b, 0, size).await;
    prop_assert!(all == oracle, "final contents differ from the oracle");
    Ok(())
}

/// Runs one model case on a fresh fixture, on a small runtime of its own.
fn model<B: Backend>(
    make: impl FnOnce() -> Option<Fixture<B>>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let Some(f) = make() else { return Ok(()) };
        if f.needs_reset {
            zero_all(&*f.b).await;
        }
        // The oracle starts from what the disk reads as, which must be what the fixture
        // says it holds.
        let start = read(&*f.b, 0, f.size).await;
        prop_assert!(
            start == f.initial(),
            "initial contents differ from the fixture's"
        );
        run_model(&*f.b, f.trim_zeroes, start, ops).await
    })
}

proptest! {
    #![proptest_config(crate::support::proptest_cases(48))]

    #[test]
    fn model_memory(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(memory(MODEL_SIZE)), &ops)?;
    }

    #[test]
    fn model_memory_unaligned_size(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(memory(MODEL_SIZE - 4097)), &ops)?;
    }

    #[test]
    fn model_raw_file(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(raw(MODEL_SIZE - 4097)), &ops)?;
    }

    #[test]
    fn model_raw_file_in_target_dir(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(raw_target(MODEL_SIZE)), &ops)?;
    }

    #[test]
    fn model_shared_memory(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(memory(MODEL_SIZE).shared()), &ops)?;
    }

    #[test]
    fn model_shared_raw_file(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(raw(MODEL_SIZE).shared()), &ops)?;
    }

    #[test]
    fn model_image_64k(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(image_file(MODEL_SIZE - 4097, KIB64)), &ops)?;
    }

    #[test]
    fn model_image_4k(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(image_file(MODEL_SIZE, KIB4)), &ops)?;
    }

    #[test]
    fn model_image_in_target_dir(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(image_target(MODEL_SIZE - 4097, KIB4)), &ops)?;
    }

    #[test]
    fn model_overlay_depth_1(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(overlay_in(None, MODEL_SIZE - 4097, KIB4, 1)), &ops)?;
    }

    #[test]
    fn model_overlay_depth_2(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(overlay_in(None, MODEL_SIZE, KIB64, 2)), &ops)?;
    }

    #[test]
    fn model_overlay_depth_10(ops in prop::collection::vec(op(), 1..40)) {
        model(|| Some(overlay_in(None, MODEL_SIZE - 4097, KIB4, 10)), &ops)?;
    }

    #[test]
    fn model_block_device(ops in prop::collection::vec(op(), 1..40)) {
        model(|| block_device(false), &ops)?;
    }
}
