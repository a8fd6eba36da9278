//! Protocol behaviour over real sockets, driven by a raw client: the Apple client's
//! sequence, bad input, pipelining, limits and shutdown.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata::server::ServerConfig;

use crate::support::client::{Client, EXTENDED, Mode, Reply, SIMPLE, STRUCTURED};
use crate::support::in_process::{TestServer, memory_backend as memory};
use crate::support::spec::*;
use crate::support::wire::{be32, info_data, opt, request};
use crate::support::{MIB, pattern, poll};

/// How long the server may take to close a connection it should close.
const WAIT: Duration = Duration::from_secs(20);

/// Virtualization.framework's client: INFO asking for block sizes, then GO, simple replies
/// only, I/O in preferred-size blocks, and a reconnect that must see the same size.
#[test]
fn apple_client_sequence() {
    let srv = TestServer::start(memory(64 * MIB), ServerConfig::default());
    let mut sizes = Vec::new();
    for round in 0..2u64 {
        let mut c = srv.connect();
        c.greet(C_FIXED_NO_ZEROES).unwrap();
        let info = c
            .opt(OPT_INFO, &info_data("disk", &[INFO_BLOCK_SIZE]))
            .unwrap();
        assert_eq!(info.last().unwrap().ty, REP_ACK);
        let bs = info
            .iter()
            .find(|r| r.ty == REP_INFO && r.data[..2] == INFO_BLOCK_SIZE.to_be_bytes())
            .expect("INFO_BLOCK_SIZE is answered");
        let (min, pref, max) = (
            be32(&bs.data[2..6]),
            be32(&bs.data[6..10]),
            be32(&bs.data[10..14]),
        );
        assert!(min.is_power_of_two() && pref.is_power_of_two() && min <= pref && pref <= max);
        assert!(
            info.iter()
                .any(|r| r.ty == REP_INFO && r.data[..2] == INFO_EXPORT.to_be_bytes())
        );

        let (size, flags) = c.go("disk", &[INFO_BLOCK_SIZE]).unwrap();
        sizes.push(size);
        assert_eq!(flags & 1, 1, "HAS_FLAGS");
        assert_eq!(flags & 2, 0, "writable");
        let block = pattern(round, pref as usize);
        assert_eq!(
            c.command(0, CMD_WRITE, u64::from(pref) * 3, u64::from(pref), &block)
                .unwrap(),
            0
        );
        assert_eq!(
            c.read(0, u64::from(pref) * 3, pref as usize)
                .unwrap()
                .unwrap(),
            block
        );
        assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
        c.disconnect().unwrap();
        assert!(c.stream.hangs_up(WAIT));
    }
    assert_eq!(sizes[0], sizes[1], "size is stable across reconnects");
    assert_eq!(sizes[0], 64 * MIB);
}

#[test]
fn unknown_options_are_refused_and_negotiation_continues() {
    let srv = TestServer::start(memory(MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.greet(C_FIXED_NO_ZEROES).unwrap();
    for option in [0u32, 4, 12, 99, 0xffff_ffff] {
        let r = c.opt(option, b"whatever").unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].ty, REP_ERR_UNSUP, "option {option}");
    }
    // STARTTLS without TLS configured is refused with an error, not a hang or a close.
    let r = c.opt(OPT_STARTTLS, &[]).unwrap();
    assert_eq!(r[0].ty, REP_ERR_UNSUP);
    let (size, _) = c.go("", &[]).unwrap();
    assert_eq!(size, MIB);
}

#[test]
fn export_name_sends_124_zero_bytes_unless_no_zeroes() {
    let srv = TestServer::start(memory(MIB), ServerConfig::default());
    for (client_flags, trailer) in [(1u32, 124usize), (3, 0)] {
        let mut c = srv.connect();
        c.greet(client_flags).unwrap();
        c.send(&opt(OPT_EXPORT_NAME, b"disk")).unwrap();
        let export = c.read_exact(10 + trailer).unwrap();
        assert_eq!(export[..8], MIB.to_be_bytes());
        assert_eq!(export[10..], vec![0; trailer]);
        // The very next bytes must be a reply to our first request.
        assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    }
}

#[test]
fn export_names_up_to_4096_bytes() {
    let long = "n".repeat(4096);
    let srv = TestServer::start_named(&long, memory(MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.greet(C_FIXED_NO_ZEROES).unwrap();
    let too_long = "n".repeat(4097);
    let r = c.opt(OPT_GO, &info_data(&too_long, &[])).unwrap();
    assert_eq!(r[0].ty, REP_ERR_INVALID);
    let r = c.opt(OPT_INFO, &info_data("nope", &[])).unwrap();
    assert_eq!(r[0].ty, REP_ERR_UNKNOWN);
    let listing = c.opt(OPT_LIST, &[]).unwrap();
    assert_eq!(listing[0].ty, REP_SERVER);
    assert_eq!(&listing[0].data[4..4 + 4096], long.as_bytes());
    let (size, _) = c.go(&long, &[INFO_NAME]).unwrap();
    assert_eq!(size, MIB);
}

#[test]
fn bad_requests_get_errors_and_keep_the_connection() {
    for mode in [SIMPLE, STRUCTURED, EXTENDED] {
        let srv = TestServer::start(memory(MIB), ServerConfig::default());
        let mut c = srv.connect();
        c.handshake("disk", mode).unwrap();
        // Past the end.
        assert_eq!(c.read(0, MIB - 10, 20).unwrap().unwrap_err(), EINVAL);
        assert_eq!(
            c.command(0, CMD_WRITE, MIB - 10, 20, &[1; 20]).unwrap(),
            ENOSPC
        );
        assert_eq!(c.command(0, CMD_TRIM, MIB, 1, &[]).unwrap(), EINVAL);
        assert_eq!(
            c.command(0, CMD_WRITE_ZEROES, u64::MAX - 1, 4, &[])
                .unwrap(),
            ENOSPC
        );
        // Over the maximum payload: refused, payload consumed, connection intact.
        let big = 33 * MIB as usize;
        assert_eq!(c.read(0, 0, big).unwrap().unwrap_err(), EINVAL);
        let srv2 = TestServer::start(memory(64 * MIB), ServerConfig::default());
        let mut c2 = srv2.connect();
        c2.handshake("disk", mode).unwrap();
        assert_eq!(
            c2.command(0, CMD_WRITE, 0, big as u64, &vec![7; big])
                .unwrap(),
            EINVAL
        );
        assert_eq!(
            c2.read(0, 0, 16).unwrap().unwrap(),
            vec![0; 16],
            "refused write left no trace"
        );
        // Unknown flags and commands.
        assert_eq!(c.command(0x4000, CMD_FLUSH, 0, 0, &[]).unwrap(), EINVAL);
        assert_eq!(c.command(0, 42, 0, 0, &[]).unwrap(), EINVAL);
        assert_eq!(c.command(FLAG_DF, CMD_WRITE, 0, 1, &[1]).unwrap(), EINVAL);
        // The connection still works.
        assert_eq!(c.command(0, CMD_WRITE, 0, 4, b"okay").unwrap(), 0);
        assert_eq!(c.read(0, 0, 4).unwrap().unwrap(), b"okay");
    }
}

#[test]
fn structured_errors_carry_a_message() {
    let srv = TestServer::start(memory(MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.handshake("disk", STRUCTURED).unwrap();
    let reply = c.call(0, CMD_READ, MIB, 512, &[]).unwrap();
    let chunks = reply.chunks();
    assert_eq!(chunks.len(), 1);
    assert!(chunks[0].ty == CHUNK_ERROR || chunks[0].ty == CHUNK_ERROR_OFFSET);
    let (errno, message) = chunks[0].error().unwrap();
    assert_eq!(errno, EINVAL);
    assert!(
        message.contains("end"),
        "message explains the error: {message:?}"
    );
}

#[test]
fn read_only_exports_refuse_modification_with_eperm() {
    let backend = strata::backend::open("memory:1M", true).unwrap();
    let srv = TestServer::start(backend, ServerConfig::default());
    for mode in [SIMPLE, STRUCTURED] {
        let mut c = srv.connect();
        let (_, flags) = c.handshake("disk", mode).unwrap();
        assert_eq!(flags & 2, 2, "READ_ONLY flag");
        assert_eq!(c.command(0, CMD_WRITE, 0, 4, b"nope").unwrap(), EPERM);
        assert_eq!(c.command(0, CMD_TRIM, 0, 4096, &[]).unwrap(), EPERM);
        assert_eq!(c.command(0, CMD_WRITE_ZEROES, 0, 4096, &[]).unwrap(), EPERM);
        assert_eq!(c.read(0, 0, 4).unwrap().unwrap(), vec![0; 4]);
    }
}

#[test]
fn sparse_reads_send_holes_and_df_sends_one_chunk() {
    let srv = TestServer::start(memory(4 * MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.handshake("disk", STRUCTURED).unwrap();
    let data = pattern(5, 4096);
    assert_eq!(c.command(0, CMD_WRITE, MIB, 4096, &data).unwrap(), 0);

    let reply = c.call(0, CMD_READ, 0, 2 * MIB, &[]).unwrap();
    let chunks = reply.chunks();
    assert!(
        chunks.iter().any(|c| c.ty == CHUNK_OFFSET_HOLE),
        "unwritten space is sent as holes"
    );
    assert!(chunks.iter().any(|c| c.ty == CHUNK_OFFSET_DATA));

    let reply = c.call(FLAG_DF, CMD_READ, 0, 2 * MIB, &[]).unwrap();
    let chunks = reply.chunks();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].ty, CHUNK_OFFSET_DATA);
    assert_eq!(chunks[0].payload.len(), 8 + 2 * MIB as usize);

    let whole = c.read(0, 0, 2 * MIB as usize).unwrap().unwrap();
    assert_eq!(&whole[MIB as usize..MIB as usize + 4096], &data[..]);
    assert!(whole[..MIB as usize].iter().all(|&b| b == 0));
}

#[test]
fn block_status_reports_allocation() {
    for mode in [STRUCTURED, EXTENDED] {
        let srv = TestServer::start(memory(16 * MIB), ServerConfig::default());
        let mut c = srv.connect();
        c.handshake("disk", mode).unwrap();
        assert_eq!(
            c.command(0, CMD_WRITE, MIB, MIB, &vec![1; MIB as usize])
                .unwrap(),
            0
        );
        let ext = c.block_status(0, 0, 4 * MIB).unwrap();
        let total: u64 = ext.iter().map(|e| e.0).sum();
        assert!(total <= 4 * MIB && total > 0);
        assert!(ext.iter().all(|e| e.0 > 0));
        assert_eq!(ext[0], (MIB, 3), "hole+zero before the data");
        assert_eq!(ext[1], (MIB, 0), "data");
        let one = c.block_status(FLAG_REQ_ONE, MIB, 4 * MIB).unwrap();
        assert_eq!(one, vec![(MIB, 0)]);
        // Past the end is refused.
        let reply = c.call(0, CMD_BLOCK_STATUS, 16 * MIB, 1, &[]).unwrap();
        assert_eq!(reply.chunks()[0].error().unwrap().0, EINVAL);
    }
}

/// Greets, turns on structured replies (or extended headers), selects `queries` on
/// `disk` and GOes there; returns the contexts the server chose, as (id, name).
fn with_contexts(c: &mut Client, mode: Mode, queries: &[&str]) -> Vec<(u32, String)> {
    c.greet(C_FIXED_NO_ZEROES).unwrap();
    c.negotiate(mode).unwrap();
    let contexts = c.set_meta_contexts("disk", queries).unwrap();
    c.go("disk", &[]).unwrap();
    contexts
}

#[test]
fn block_status_answers_each_context_in_its_own_chunk() {
    for mode in [STRUCTURED, EXTENDED] {
        let srv = TestServer::start(memory(16 * MIB), ServerConfig::default());
        let mut c = srv.connect();
        let mut contexts =
            with_contexts(&mut c, mode, &["qemu:allocation-depth", "base:allocation"]);
        contexts.sort();
        assert_eq!(
            contexts,
            [
                (1, "base:allocation".to_owned()),
                (2, "qemu:allocation-depth".to_owned())
            ]
        );
        assert_eq!(
            c.command(0, CMD_WRITE, MIB, MIB, &vec![1; MIB as usize])
                .unwrap(),
            0
        );

        let mut chunks = c.block_status_chunks(0, 0, 4 * MIB).unwrap();
        chunks.sort_by_key(|chunk| chunk.0);
        let ids: Vec<u32> = chunks.iter().map(|chunk| chunk.0).collect();
        assert_eq!(ids, [1, 2], "one chunk per context");
        let allocation = &chunks[0].1;
        assert_eq!(allocation[..2], [(MIB, 3), (MIB, 0)], "{allocation:?}");
        // A memory disk is a single layer: holes and data alike come from the top layer.
        assert_eq!(chunks[1].1, [(4 * MIB, 1)]);

        let mut one = c
            .block_status_chunks(FLAG_REQ_ONE, 3 * MIB, 4 * MIB)
            .unwrap();
        one.sort_by_key(|chunk| chunk.0);
        assert_eq!(one, [(1, vec![(4 * MIB, 3)]), (2, vec![(4 * MIB, 1)])]);
    }
}

#[test]
fn allocation_depth_alone() {
    for mode in [STRUCTURED, EXTENDED] {
        let srv = TestServer::start(memory(16 * MIB), ServerConfig::default());
        let mut c = srv.connect();
        let contexts = with_contexts(&mut c, mode, &["qemu:allocation-depth"]);
        assert_eq!(contexts, [(2, "qemu:allocation-depth".to_owned())]);
        assert_eq!(
            c.block_status_chunks(0, 5 * MIB + 3, MIB).unwrap(),
            [(2, vec![(MIB, 1)])]
        );
        // The last byte of the export.
        assert_eq!(
            c.block_status_chunks(0, 16 * MIB - 1, 1).unwrap(),
            [(2, vec![(1, 1)])]
        );
    }
}

#[test]
fn allocation_depth_lengths_follow_the_reply_mode() {
    let size = 8u64 << 30;
    let srv = TestServer::start(memory(size), ServerConfig::default());
    // Compact descriptors: a 32-bit length, clamped to a block boundary.
    let mut c = srv.connect();
    with_contexts(&mut c, STRUCTURED, &["qemu:allocation-depth"]);
    let max = u64::from(u32::MAX);
    assert_eq!(
        c.block_status_chunks(0, 0, max).unwrap(),
        [(2, vec![(max & !4095, 1)])]
    );
    // Extended descriptors: one 64-bit length covers the whole export.
    let mut c = srv.connect();
    with_contexts(&mut c, EXTENDED, &["qemu:allocation-depth"]);
    assert_eq!(
        c.block_status_chunks(0, 0, size).unwrap(),
        [(2, vec![(size, 1)])]
    );
}

#[test]
fn extended_headers_carry_64_bit_lengths() {
    let size = 16u64 << 40;
    let srv = TestServer::start(memory(size), ServerConfig::default());
    let mut c = srv.connect();
    let (s, _) = c.handshake("disk", EXTENDED).unwrap();
    assert_eq!(s, size);
    assert_eq!(c.command(0, CMD_WRITE, 8 << 40, 4, b"deep").unwrap(), 0);
    let ext = c.block_status(0, 0, size).unwrap();
    assert!(
        ext[0].0 > u64::from(u32::MAX),
        "a single extent longer than 4 GiB: {ext:?}"
    );
    assert_eq!(ext[0], (8 << 40, 3));
    // Zeroing more than 4 GiB in one request.
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, 0, 9 << 40, &[]).unwrap(), 0);
    assert_eq!(c.read(0, 8 << 40, 4).unwrap().unwrap(), vec![0; 4]);
    // Extended replies echo the request offset.
    let cookie = c.request(0, CMD_FLUSH, 0, 0, &[]).unwrap();
    match c.reply(0).unwrap() {
        Reply::Structured {
            cookie: got,
            chunks,
        } => {
            assert_eq!(got, cookie);
            assert_eq!(chunks.len(), 1);
            assert_eq!(chunks[0].ty, CHUNK_NONE);
        }
        Reply::Simple { .. } => panic!("simple reply with extended headers"),
    }
}

#[test]
fn pipelined_requests_all_complete() {
    let srv = TestServer::start(memory(16 * MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.handshake("disk", SIMPLE).unwrap();
    let n = 200u64;
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(&request(false, 0, CMD_WRITE, 1000 + i, i * 8192, 4096));
        batch.extend_from_slice(&pattern(i, 4096));
    }
    // Everything at once, without waiting for a single reply.
    let writer = {
        let mut s = c.stream.try_clone().unwrap();
        std::thread::spawn(move || s.write_all(&batch).unwrap())
    };
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        match c.reply(0).unwrap() {
            Reply::Simple { errno, cookie, .. } => {
                assert_eq!(errno, 0);
                assert!(seen.insert(cookie), "cookie {cookie} answered twice");
            }
            Reply::Structured { .. } => panic!("chunks without structured replies"),
        }
    }
    writer.join().unwrap();
    assert_eq!(seen, (1000..1000 + n).collect());
    for i in (0..n).step_by(37) {
        assert_eq!(
            c.read(0, i * 8192, 4096).unwrap().unwrap(),
            pattern(i, 4096)
        );
    }
}

#[test]
fn garbage_ends_only_that_connection() {
    let srv = TestServer::start(memory(MIB), ServerConfig::default());
    let mut good = srv.connect();
    good.handshake("disk", STRUCTURED).unwrap();

    // Garbage instead of client flags.
    let mut bad = srv.connect();
    bad.greet(0xdead_beef).unwrap();
    assert!(bad.stream.hangs_up(WAIT));
    // Garbage instead of an option.
    let mut bad = srv.connect();
    bad.greet(C_FIXED_NO_ZEROES).unwrap();
    bad.send(&[0x55; 64]).unwrap();
    assert!(bad.stream.hangs_up(WAIT));
    // Garbage instead of a request.
    let mut bad = srv.connect();
    bad.handshake("disk", SIMPLE).unwrap();
    bad.send(&[0xaa; 28]).unwrap();
    assert!(bad.stream.hangs_up(WAIT));
    // A truncated handshake, then the client vanishes.
    let mut bad = srv.connect();
    bad.greet(C_FIXED_NO_ZEROES).unwrap();
    bad.send(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(bad);
    // A request header cut short.
    let mut bad = srv.connect();
    bad.handshake("disk", SIMPLE).unwrap();
    bad.send(&[0x25, 0x60, 0x95]).unwrap();
    drop(bad);

    assert_eq!(good.command(0, CMD_WRITE, 0, 3, b"abc").unwrap(), 0);
    assert_eq!(good.read(0, 0, 3).unwrap().unwrap(), b"abc");
}

#[test]
fn slow_handshakes_are_dropped() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = TestServer::start(memory(MIB), config);
    let mut idle = srv.connect();
    let start = Instant::now();
    idle.greet(C_FIXED_NO_ZEROES).unwrap();
    // Say nothing more: the server must hang up on its own.
    assert!(idle.stream.hangs_up(WAIT));
    assert!(start.elapsed() < Duration::from_secs(15));
    // A prompt client is unaffected.
    let mut c = srv.connect();
    c.handshake("disk", SIMPLE).unwrap();
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
}

#[test]
fn connections_are_capped_and_slots_come_back() {
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(memory(MIB), config);
    let mut a = srv.connect();
    a.handshake("disk", SIMPLE).unwrap();
    let mut b = srv.connect();
    b.handshake("disk", SIMPLE).unwrap();
    let mut c = srv.connect();
    assert!(c.stream.hangs_up(WAIT), "third connection is refused");
    // A client that vanishes without NBD_CMD_DISC frees its slot.
    drop(a);
    let magic = poll(Duration::from_secs(10), || srv.connect().read_exact(8).ok());
    assert_eq!(magic.expect("slot was never freed"), NBDMAGIC.to_be_bytes());
    assert_eq!(b.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
}

#[test]
fn flush_on_one_connection_covers_writes_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, path) = raw_file_server(dir.path(), 4 * MIB);
    let mut a = srv.connect();
    let (_, flags) = a.handshake("disk", STRUCTURED).unwrap();
    assert_ne!(flags & (1 << 8), 0, "CAN_MULTI_CONN");
    let mut b = srv.connect();
    b.handshake("disk", STRUCTURED).unwrap();
    let data = pattern(9, 65536);
    assert_eq!(a.command(0, CMD_WRITE, 4096, 65536, &data).unwrap(), 0);
    assert_eq!(b.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    assert_eq!(b.read(0, 4096, 65536).unwrap().unwrap(), data);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[4096..4096 + 65536], &data[..]);
}

#[test]
fn disconnect_completes_requests_in_flight() {
    let srv = TestServer::start(memory(16 * MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.handshake("disk", SIMPLE).unwrap();
    for i in 0..20u64 {
        let data = pattern(i, 65536);
        c.request(0, CMD_WRITE, i * MIB / 2, 65536, &data).unwrap();
    }
    c.disconnect().unwrap();
    let mut answered = 0;
    for _ in 0..20 {
        match c.reply(0).unwrap() {
            Reply::Simple { errno: 0, .. } => answered += 1,
            _ => panic!("write failed"),
        }
    }
    assert_eq!(answered, 20);
    assert!(c.stream.hangs_up(WAIT));
    let mut d = srv.connect();
    d.handshake("disk", SIMPLE).unwrap();
    assert_eq!(
        d.read(0, 19 * MIB / 2, 65536).unwrap().unwrap(),
        pattern(19, 65536)
    );
}

#[test]
fn shutdown_finishes_in_flight_writes_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, path) = raw_file_server(dir.path(), 16 * MIB);
    let mut c = srv.connect();
    c.handshake("disk", SIMPLE).unwrap();
    let data = pattern(3, MIB as usize);
    assert_eq!(c.command(0, CMD_WRITE, 0, MIB, &data).unwrap(), 0);
    srv.stop().expect("clean shutdown");
    assert!(c.stream.hangs_up(WAIT));
    assert_eq!(&std::fs::read(&path).unwrap()[..MIB as usize], &data[..]);
}

#[test]
fn shutdown_is_not_held_up_by_a_client_that_stops_reading() {
    let config = ServerConfig {
        session: strata::server::SessionConfig {
            final_replies_timeout: Duration::from_millis(500),
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    let srv = TestServer::start(memory(64 * MIB), config);
    let mut c = srv.connect();
    c.handshake("disk", SIMPLE).unwrap();
    // Far more reply data than the in-flight budget and the socket buffers hold, and
    // never a byte read back.
    for i in 0..2000u64 {
        c.request(0, CMD_READ, (i % 64) * MIB, MIB, &[]).unwrap();
    }
    // Give the server time to fill the socket and spend its budget.
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    srv.stop().expect("clean shutdown");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}",
        start.elapsed()
    );
}

/// A raw file of `len` bytes in `dir`, served in-process.
fn raw_file_server(dir: &Path, len: u64) -> (TestServer, PathBuf) {
    let path = dir.join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    let backend = strata::backend::open(path.to_str().unwrap(), false).unwrap();
    (TestServer::start(backend, ServerConfig::default()), path)
}

/// Random requests (valid magic, random everything else, random payload) and random
/// bytes after a good handshake: the server answers or hangs up, never panics, and other
/// clients keep working.
#[test]
fn random_requests_never_panic_the_server() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let srv = TestServer::start(memory(4 * MIB), ServerConfig::default());
    // Other tests run in this process too: only the panics of this server's threads count.
    let server_threads = srv.thread_name().to_owned();
    let previous = Arc::new(std::panic::take_hook());
    std::panic::set_hook({
        let previous = Arc::clone(&previous);
        Box::new(move |info| {
            if std::thread::current().name() == Some(server_threads.as_str()) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        })
    });

    let mut good = srv.connect();
    good.handshake("disk", STRUCTURED).unwrap();
    // A small deterministic generator keeps the test reproducible.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..60u64 {
        let mut c = srv.connect();
        let mode = [SIMPLE, STRUCTURED, EXTENDED][round as usize % 3];
        c.handshake("disk", mode).unwrap();
        c.stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut bytes = Vec::new();
        for _ in 0..20 {
            let r = next();
            if r % 4 == 0 {
                // Pure noise.
                bytes.extend((0..(r % 64)).map(|_| next() as u8));
                continue;
            }
            let (flags, cmd, cookie) = ((next() % 64) as u16, (next() % 10) as u16, next());
            let offset = match next() % 3 {
                0 => next(),
                1 => next() % (4 * MIB),
                _ => 4 * MIB - next() % 4096,
            };
            let len = match next() % 3 {
                0 => next() % 8192,
                1 => next() % (64 * 1024),
                _ => next(),
            };
            bytes.extend_from_slice(&request(mode.extended, flags, cmd, cookie, offset, len));
            bytes.extend((0..(next() % 4096)).map(|_| next() as u8));
        }
        let _ = c.send(&bytes);
        // Drain whatever comes back until the server hangs up or goes quiet.
        let mut sink = [0u8; 65536];
        while matches!(c.stream.read(&mut sink), Ok(n) if n > 0) {}
    }
    assert_eq!(good.command(0, CMD_WRITE, 0, 4, b"live").unwrap(), 0);
    assert_eq!(good.read(0, 0, 4).unwrap().unwrap(), b"live");
    drop(std::panic::take_hook());
    std::panic::set_hook(Box::new(move |info| previous(info)));
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "the server panicked");
}
