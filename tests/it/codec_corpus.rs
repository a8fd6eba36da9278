//! The seed corpus of the fuzz targets in `fuzz/`: a handful of valid messages per target.
//!
//! The seeds are generated here and checked in under `fuzz/corpus/<target>/`. This test
//! checks that the files are present and current; to (re)write them after a change run
//! `STRATA_WRITE_FUZZ_CORPUS=1 cargo test --test it fuzz_seed`.
//!
//! Input layouts are those documented at the top of each `fuzz/fuzz_targets/*.rs`.

use crate::support::codec::*;
use crate::support::spec::*;
use crate::support::wire::*;
use bytes::BytesMut;
use strata::proto::consts::{cmd_flags as cf, errno, state, transmission_flags as tf};
use strata::proto::reply::{self, ChunkTarget, Descriptor, ReplyMode};
use strata::proto::{Command, RequestHeader, TlsPolicy};

/// Handshake seed: configuration byte, chunk sizes, then the client's stream.
fn handshake_seed(config: u8, sizes: &[u8], parts: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![config, sizes.len() as u8];
    v.extend_from_slice(sizes);
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

fn handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let flags = |f: u32| f.to_be_bytes().to_vec();
    let go_disk = opt(OPT_GO, &info_data("disk", &[INFO_BLOCK_SIZE]));
    vec![
        (
            "go-structured-meta",
            handshake_seed(
                0,
                &[],
                &[
                    flags(C_FIXED),
                    opt(OPT_STRUCTURED_REPLY, &[]),
                    opt(
                        OPT_SET_META_CONTEXT,
                        &meta_data("disk", &["base:allocation"]),
                    ),
                    go_disk.clone(),
                ],
            ),
        ),
        (
            "info-then-go",
            handshake_seed(
                0,
                &[],
                &[
                    flags(C_FIXED_NO_ZEROES),
                    opt(OPT_INFO, &info_data("disk", &[INFO_BLOCK_SIZE])),
                    go_disk.clone(),
                ],
            ),
        ),
        (
            "list-export-name-no-zeroes",
            handshake_seed(
                0,
                &[],
                &[
                    flags(C_FIXED_NO_ZEROES),
                    opt(OPT_LIST, &[]),
                    opt(OPT_EXPORT_NAME, b"ro"),
                ],
            ),
        ),
        (
            "export-name-default",
            handshake_seed(0, &[], &[flags(C_FIXED), opt(OPT_EXPORT_NAME, b"")]),
        ),
        (
            "extended-headers-go",
            handshake_seed(
                0,
                &[],
                &[
                    flags(C_FIXED),
                    opt(OPT_EXTENDED_HEADERS, &[]),
                    opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &["base:"])),
                    opt(
                        OPT_SET_META_CONTEXT,
                        &meta_data("disk", &["base:allocation"]),
                    ),
                    opt(OPT_GO, &info_data("disk", &[])),
                ],
            ),
        ),
        (
            "starttls-allowed",
            handshake_seed(
                1,
                &[],
                &[
                    flags(C_FIXED),
                    opt(OPT_STRUCTURED_REPLY, &[]),
                    opt(OPT_STARTTLS, &[]),
                    opt(OPT_STRUCTURED_REPLY, &[]),
                    go_disk.clone(),
                ],
            ),
        ),
        (
            "tls-required",
            handshake_seed(
                2,
                &[],
                &[
                    flags(C_FIXED),
                    opt(OPT_LIST, &[]),
                    opt(OPT_STARTTLS, &[]),
                    opt(OPT_LIST, &[]),
                    opt(OPT_GO, &info_data("ro", &[INFO_NAME, INFO_DESCRIPTION])),
                ],
            ),
        ),
        (
            "too-big-unknown-abort",
            // max_option_len 16 (bits 2-3 = 2).
            handshake_seed(
                2 << 2,
                &[],
                &[
                    flags(C_FIXED),
                    opt(OPT_INFO, &[0; 40]),
                    opt(0x42, &[]),
                    opt(OPT_ABORT, &[]),
                ],
            ),
        ),
        (
            "go-in-small-chunks",
            handshake_seed(
                0,
                &[0, 2, 6],
                &[
                    flags(C_FIXED),
                    opt(OPT_STRUCTURED_REPLY, &[]),
                    go_disk.clone(),
                ],
            ),
        ),
        (
            // The fuzz catalog offers qemu:dirty-bitmap:monday; "missing" is unknown.
            "meta-dirty-bitmap",
            handshake_seed(
                0,
                &[],
                &[
                    flags(C_FIXED),
                    opt(OPT_STRUCTURED_REPLY, &[]),
                    opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &["qemu:"])),
                    opt(
                        OPT_SET_META_CONTEXT,
                        &meta_data(
                            "disk",
                            &[
                                "base:allocation",
                                "qemu:dirty-bitmap:monday",
                                "qemu:dirty-bitmap:missing",
                                "qemu:allocation-depth",
                            ],
                        ),
                    ),
                    go_disk.clone(),
                ],
            ),
        ),
        (
            "extended-list-all-contexts-then-structured",
            handshake_seed(
                0,
                &[],
                &[
                    flags(C_FIXED_NO_ZEROES),
                    opt(OPT_EXTENDED_HEADERS, &[]),
                    opt(OPT_STRUCTURED_REPLY, &[]),
                    opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[])),
                    opt(
                        OPT_SET_META_CONTEXT,
                        &meta_data("disk", &["qemu:dirty-bitmap:monday"]),
                    ),
                    opt(OPT_INFO, &info_data("disk", &[INFO_BLOCK_SIZE, INFO_NAME])),
                    go_disk.clone(),
                ],
            ),
        ),
        (
            // Bytes right behind STARTTLS must end the session, not be read as options.
            "starttls-with-data-behind",
            handshake_seed(
                1,
                &[],
                &[
                    flags(C_FIXED),
                    [opt(OPT_STARTTLS, &[]), opt(OPT_LIST, &[])].concat(),
                    go_disk.clone(),
                ],
            ),
        ),
        (
            "starttls-required-in-chunks",
            handshake_seed(
                2,
                &[15, 3],
                &[
                    flags(C_FIXED),
                    opt(OPT_STARTTLS, &[]),
                    opt(OPT_EXTENDED_HEADERS, &[]),
                    opt(
                        OPT_SET_META_CONTEXT,
                        &meta_data("disk", &["base:allocation", "qemu:dirty-bitmap:monday"]),
                    ),
                    go_disk,
                ],
            ),
        ),
    ]
}

/// Request seed: limits (structured + contexts, 1 MiB, every optional flag, 32 MiB max
/// payload) then one header.
fn request_seed(read_only: bool, header: RequestHeader, extended: bool) -> Vec<u8> {
    let mut v = vec![3u8];
    v.extend_from_slice(&(1u64 << 20).to_be_bytes());
    let mut flags = EVERY_OPTIONAL_FLAG;
    if read_only {
        flags |= tf::READ_ONLY;
    }
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&(32u32 << 20).to_be_bytes());
    let mut b = BytesMut::new();
    header.encode(&mut b, extended);
    v.extend_from_slice(&b);
    v
}

fn request_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let h = |command, flags, offset, length| RequestHeader {
        flags,
        command,
        cookie: 0x1122_3344_5566_7788,
        offset,
        length,
    };
    vec![
        (
            "compact-read",
            request_seed(false, h(Command::Read, 0, 4096, 4096), false),
        ),
        (
            "compact-read-df",
            request_seed(false, h(Command::Read, cf::DF, 0, 65536), false),
        ),
        (
            "compact-write-fua",
            request_seed(false, h(Command::Write, cf::FUA, 512, 512), false),
        ),
        (
            "compact-flush",
            request_seed(false, h(Command::Flush, 0, 0, 0), false),
        ),
        (
            "compact-disc",
            request_seed(false, h(Command::Disconnect, 0, 0, 0), false),
        ),
        (
            "compact-block-status",
            request_seed(
                false,
                h(Command::BlockStatus, cf::REQ_ONE, 0, 1 << 20),
                false,
            ),
        ),
        (
            "compact-trim-read-only",
            request_seed(true, h(Command::Trim, 0, 0, 4096), false),
        ),
        (
            "extended-write",
            request_seed(false, h(Command::Write, cf::PAYLOAD_LEN, 0, 4096), true),
        ),
        (
            "extended-zero-fast",
            request_seed(
                false,
                h(
                    Command::WriteZeroes,
                    cf::FAST_ZERO | cf::NO_HOLE,
                    0,
                    1 << 20,
                ),
                true,
            ),
        ),
        (
            "extended-block-status-64",
            request_seed(false, h(Command::BlockStatus, 0, 0, 1 << 33), true),
        ),
        (
            "extended-read-df",
            request_seed(false, h(Command::Read, cf::DF, 1 << 19, 65536), true),
        ),
        (
            "extended-cache",
            request_seed(false, h(Command::Cache, 0, 0, 1 << 20), true),
        ),
        (
            "compact-write-past-end",
            request_seed(false, h(Command::Write, 0, (1 << 20) - 512, 4096), false),
        ),
    ]
}

fn reply_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const COOKIE: u64 = 0x1122_3344_5566_7788;
    let t = |mode| ChunkTarget {
        mode,
        cookie: COOKIE,
        offset: 4096,
    };
    let s = t(ReplyMode::Structured);
    let x = t(ReplyMode::Extended);
    let seed = |split: u8, f: &dyn Fn(&mut BytesMut)| {
        let mut b = BytesMut::new();
        b.extend_from_slice(&[split]);
        f(&mut b);
        b.to_vec()
    };
    let descriptors = [
        Descriptor {
            length: 4096,
            flags: 0,
        },
        Descriptor {
            length: 8192,
            flags: u64::from(state::HOLE | state::ZERO),
        },
    ];
    vec![
        (
            "simple-ok",
            seed(0, &|b| reply::encode_simple(b, COOKIE, 0)),
        ),
        (
            "simple-error",
            seed(2, &|b| reply::encode_simple(b, COOKIE, errno::EIO)),
        ),
        ("structured-done", seed(0, &|b| reply::encode_done(b, s))),
        (
            "structured-offset-data",
            seed(5, &|b| {
                reply::encode_offset_data_header(b, s, true, 4096, 4);
                b.extend_from_slice(b"data");
            }),
        ),
        (
            "structured-hole",
            seed(0, &|b| reply::encode_offset_hole(b, s, false, 4096, 512)),
        ),
        (
            "structured-block-status",
            seed(0, &|b| {
                reply::encode_block_status(b, s, true, 1, &descriptors)
            }),
        ),
        (
            "structured-error",
            seed(1, &|b| {
                reply::encode_error(b, s, true, errno::EINVAL, "bad request", None)
            }),
        ),
        (
            "structured-error-offset",
            seed(0, &|b| {
                reply::encode_error(b, s, false, errno::EIO, "read failed", Some(8192))
            }),
        ),
        ("extended-done", seed(3, &|b| reply::encode_done(b, x))),
        (
            "extended-offset-data",
            seed(0, &|b| {
                reply::encode_offset_data_header(b, x, false, 4096, 4);
                b.extend_from_slice(b"data");
            }),
        ),
        (
            "extended-block-status-ext",
            seed(0, &|b| {
                reply::encode_block_status(b, x, true, 1, &descriptors)
            }),
        ),
        (
            "extended-error",
            seed(0, &|b| {
                reply::encode_error(b, x, true, errno::ENOSPC, "full", None)
            }),
        ),
        (
            // One chunk per context: base:allocation, then a dirty bitmap (id 3).
            "structured-block-status-two-contexts",
            seed(0, &|b| {
                reply::encode_block_status(b, s, false, 1, &descriptors);
                reply::encode_block_status(b, s, true, 3, &descriptors[..1]);
            }),
        ),
        (
            "extended-block-status-dirty",
            seed(2, &|b| {
                reply::encode_block_status(b, x, false, 2, &descriptors[1..]);
                reply::encode_block_status(b, x, true, 3, &descriptors);
            }),
        ),
        (
            "structured-data-hole-error",
            seed(0, &|b| {
                reply::encode_offset_data_header(b, s, false, 4096, 4);
                b.extend_from_slice(b"data");
                reply::encode_offset_hole(b, s, false, 4100, 4092);
                reply::encode_error(b, s, true, errno::EIO, "injected EIO", Some(8192));
            }),
        ),
    ]
}

#[test]
fn fuzz_seed_corpus_is_current() {
    crate::support::check_fuzz_seeds("handshake", &handshake_seeds());
    crate::support::check_fuzz_seeds("request", &request_seeds());
    crate::support::check_fuzz_seeds("reply", &reply_seeds());
}

#[test]
fn handshake_seeds_negotiate() {
    for (name, seed) in handshake_seeds() {
        let tls = match seed[0] & 3 {
            0 => TlsPolicy::Disabled,
            1 => TlsPolicy::Allowed,
            _ => TlsPolicy::Required,
        };
        let max_option_len = if (seed[0] >> 2) & 3 == 2 {
            16
        } else {
            64 * 1024
        };
        let mut d = Driver::new(strata::proto::HandshakeConfig {
            tls,
            max_option_len,
        });
        d.auto_tls = true;
        let stream = &seed[2 + usize::from(seed[1])..];
        // One byte at a time, as a client that waits for each reply would send them:
        // data queued behind STARTTLS is (rightly) refused.
        let mut outcome = Outcome::NeedInput;
        for b in stream {
            outcome = d.feed(std::slice::from_ref(b));
            if !matches!(outcome, Outcome::NeedInput) {
                break;
            }
        }
        assert!(
            matches!(outcome, Outcome::Done(_) | Outcome::Abort),
            "{name}: {outcome:?}"
        );
        assert!(d.input.is_empty(), "{name}: all input used");
    }
}
