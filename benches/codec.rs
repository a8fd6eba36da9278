//! Micro-benchmarks of the sans-IO protocol codec in `strata::proto`: request header
//! decoding, reply encoding, and a whole fixed-newstyle handshake against an in-memory
//! catalog.
//!
//! Run with `cargo bench --bench codec`. Each benchmark works on a batch of messages and
//! reports its throughput in messages (or handshakes) per second.

// `criterion_group!` defines a public function without documentation.
#![allow(missing_docs)]

use std::hint::black_box;

use bytes::{BufMut, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use strata::proto::consts::{
    BASE_ALLOCATION, IHAVEOPT, client_flags, info, opt, transmission_flags as tf,
};
use strata::proto::reply::{self, ChunkTarget, Descriptor, ReplyMode};
use strata::proto::{
    BlockSizes, Command, ExportCatalog, ExportInfo, ExportSummary, HandshakeConfig, Progress,
    RequestHeader, ServerHandshake,
};

/// Messages per batch: large enough that the per-iteration overhead of the harness is
/// lost in the noise.
const BATCH: u64 = 1024;

/// A pipelined stream of `BATCH` read and write request headers (write payloads left
/// out), as a client would send them.
fn request_stream(extended: bool) -> Vec<u8> {
    let mut out = BytesMut::new();
    for i in 0..BATCH {
        let command = if i % 4 == 3 {
            Command::Write
        } else {
            Command::Read
        };
        RequestHeader {
            flags: 0,
            command,
            cookie: i,
            offset: (i * 7919 % 4096) << 12,
            length: 4096,
        }
        .encode(&mut out, extended);
    }
    out.to_vec()
}

fn decode_requests(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_decode");
    group.throughput(Throughput::Elements(BATCH));
    for (name, extended) in [("compact_28B", false), ("extended_32B", true)] {
        let stream = request_stream(extended);
        assert_eq!(
            stream.len(),
            BATCH as usize * RequestHeader::wire_len(extended)
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut src = black_box(stream.as_slice());
                let mut sum = 0u64;
                while let Some(h) = RequestHeader::decode(&mut src, extended).unwrap() {
                    sum = sum.wrapping_add(h.offset ^ h.length);
                }
                sum
            })
        });
    }
    group.finish();
}

fn encode_replies(c: &mut Criterion) {
    let mut group = c.benchmark_group("reply_encode");
    group.throughput(Throughput::Elements(BATCH));
    let mut buf = BytesMut::with_capacity(64 * BATCH as usize);

    group.bench_function("simple", |b| {
        b.iter(|| {
            buf.clear();
            for cookie in 0..BATCH {
                reply::encode_simple(&mut buf, black_box(cookie), 0);
            }
            buf.len()
        })
    });

    encode_chunks_per_mode(&mut group, &mut buf, "offset_data", |buf, target| {
        let offset = target.cookie << 12;
        let target = ChunkTarget { offset, ..target };
        reply::encode_offset_data_header(buf, target, true, offset, 4096);
    });

    // A typical `base:allocation` answer: a few alternating data and hole extents.
    let descriptors: Vec<Descriptor> = (0..8)
        .map(|i| Descriptor {
            length: 64 << 10,
            flags: if i % 2 == 0 { 0 } else { 3 },
        })
        .collect();
    encode_chunks_per_mode(&mut group, &mut buf, "block_status_8", |buf, target| {
        reply::encode_block_status(buf, target, true, 1, &descriptors);
    });
    group.finish();
}

/// Benchmarks `encode` on a batch of chunks, once with structured replies and once with
/// extended headers, as `{name}_structured` and `{name}_extended`. Each chunk gets its own
/// cookie (offset 0; `encode` may set one).
fn encode_chunks_per_mode(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    buf: &mut BytesMut,
    name: &str,
    encode: impl Fn(&mut BytesMut, ChunkTarget),
) {
    for (suffix, mode) in [
        ("structured", ReplyMode::Structured),
        ("extended", ReplyMode::Extended),
    ] {
        group.bench_function(format!("{name}_{suffix}"), |b| {
            b.iter(|| {
                buf.clear();
                for cookie in 0..BATCH {
                    let target = ChunkTarget {
                        mode,
                        cookie: black_box(cookie),
                        offset: 0,
                    };
                    encode(buf, target);
                }
                buf.len()
            })
        });
    }
}

/// One listed export, `disk`, of 1 GiB offering `base:allocation`.
struct Catalog;

impl ExportCatalog for Catalog {
    fn export(&self, name: &str) -> Option<ExportInfo> {
        (name == "disk" || name.is_empty()).then(|| ExportInfo {
            name: "disk".into(),
            description: "benchmark disk".into(),
            size: 1 << 30,
            flags: tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_TRIM,
            block_sizes: BlockSizes {
                minimum: 1,
                preferred: 4096,
                maximum: 32 << 20,
            },
            meta_contexts: vec![BASE_ALLOCATION.into()],
        })
    }

    fn list(&self) -> Vec<ExportSummary> {
        vec![ExportSummary {
            name: "disk".into(),
            description: "benchmark disk".into(),
        }]
    }
}

fn put_option(out: &mut BytesMut, option: u32, data: &[u8]) {
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    out.put_u32(u32::try_from(data.len()).unwrap());
    out.put_slice(data);
}

/// What a modern client sends in one go: client flags, `EXTENDED_HEADERS`,
/// `SET_META_CONTEXT base:allocation`, and `GO disk` asking for block sizes.
fn client_handshake() -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u32(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    put_option(&mut out, opt::EXTENDED_HEADERS, &[]);

    let mut meta = BytesMut::new();
    meta.put_u32(4);
    meta.put_slice(b"disk");
    meta.put_u32(1);
    meta.put_u32(u32::try_from(BASE_ALLOCATION.len()).unwrap());
    meta.put_slice(BASE_ALLOCATION.as_bytes());
    put_option(&mut out, opt::SET_META_CONTEXT, &meta);

    let mut go = BytesMut::new();
    go.put_u32(4);
    go.put_slice(b"disk");
    go.put_u16(1);
    go.put_u16(info::BLOCK_SIZE);
    put_option(&mut out, opt::GO, &go);
    out.to_vec()
}

/// Runs one handshake to completion; returns the bytes the server sent.
fn run_handshake(input: &mut BytesMut) -> usize {
    let mut hs = ServerHandshake::new(HandshakeConfig::default());
    let mut sent = 0;
    loop {
        let progress = hs.handle_input(input, &Catalog).unwrap();
        if let Some(out) = hs.poll_transmit() {
            sent += out.len();
        }
        match progress {
            Progress::Continue => {}
            Progress::Done(n) => {
                black_box(n);
                return sent;
            }
            other => panic!("handshake stopped early: {other:?}"),
        }
    }
}

fn handshake(c: &mut Criterion) {
    let wire = client_handshake();
    // The run must succeed before it is timed.
    let sent = run_handshake(&mut BytesMut::from(wire.as_slice()));
    assert!(sent > 18, "the server answered more than the greeting");

    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    group.bench_function("extended_meta_go", |b| {
        b.iter_batched_ref(
            || BytesMut::from(wire.as_slice()),
            run_handshake,
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, decode_requests, encode_replies, handshake);
criterion_main!(benches);
