//! Protocol behaviour over real sockets, driven by a raw client: the Apple client's
//! sequence, bad input, pipelining, limits and shutdown.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::support::wire::*;
use strata::server::ServerConfig;

const MIB: u64 = 1024 * 1024;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Virtualization.framework's client: INFO asking for block sizes, then GO, simple replies
/// only, I/O in preferred-size blocks, and a reconnect that must see the same size.
#[test]
fn apple_client_sequence() {
    let srv = TestServer::start(memory(64 * MIB), ServerConfig::default());
    let mut sizes = Vec::new();
    for round in 0..2u8 {
        let mut c = srv.connect();
        c.greet(3);
        let info = c.opt(OPT_INFO, &Conn::info_payload("disk", &[INFO_BLOCK_SIZE]));
        assert_eq!(info.last().unwrap().ty, REP_ACK);
        let bs = info
            .iter()
            .find(|r| r.ty == REP_INFO && r.data[..2] == INFO_BLOCK_SIZE.to_be_bytes())
            .expect("INFO_BLOCK_SIZE is answered");
        let min = u32::from_be_bytes(bs.data[2..6].try_into().unwrap());
        let pref = u32::from_be_bytes(bs.data[6..10].try_into().unwrap());
        let max = u32::from_be_bytes(bs.data[10..14].try_into().unwrap());
        assert!(min.is_power_of_two() && pref.is_power_of_two() && min <= pref && pref <= max);
        assert!(
            info.iter()
                .any(|r| r.ty == REP_INFO && r.data[..2] == INFO_EXPORT.to_be_bytes())
        );

        let (size, flags) = c.go("disk", &[INFO_BLOCK_SIZE]);
        sizes.push(size);
        assert_eq!(flags & 1, 1, "HAS_FLAGS");
        assert_eq!(flags & 2, 0, "writable");
        let block = pattern(pref as usize, round);
        assert_eq!(
            c.command(0, CMD_WRITE, u64::from(pref) * 3, u64::from(pref), &block),
            0
        );
        assert_eq!(
            c.read(0, u64::from(pref) * 3, pref as usize).unwrap(),
            block
        );
        assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]), 0);
        c.request(0, CMD_DISC, 1, 0, 0, &[]);
        assert!(c.closed_by_server());
    }
    assert_eq!(sizes[0], sizes[1], "size is stable across reconnects");
    assert_eq!(sizes[0], 64 * MIB);
}

#[test]
fn unknown_options_are_refused_and_negotiation_continues() {
    let srv = TestServer::start(memory(MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.greet(3);
    for option in [0u32, 4, 12, 99, 0xffff_ffff] {
        let r = c.opt(option, b"whatever");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].ty, REP_ERR_UNSUP, "option {option}");
    }
    // STARTTLS without TLS configured is refused with an error, not a hang or a close.
    let r = c.opt(OPT_STARTTLS, &[]);
    assert_eq!(r[0].ty, REP_ERR_UNSUP);
    let (size, _) = c.go("", &[]);
    assert_eq!(size, MIB);
}

#[test]
fn export_name_sends_124_zero_bytes_unless_no_zeroes() {
    let srv = TestServer::start(memory(MIB), ServerConfig::default());
    for (client_flags, trailer) in [(1u32, 124usize), (3, 0)] {
        let mut c = srv.connect();
        c.greet(client_flags);
        c.send_opt(OPT_EXPORT_NAME, b"disk");
        assert_eq!(c.u64(), MIB);
        let _flags = c.u16();
        if trailer > 0 {
            assert_eq!(c.bytes(trailer), vec![0; trailer]);
        }
        // The very next bytes must be a reply to our first request.
        assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]), 0);
    }
}

#[test]
fn export_names_up_to_4096_bytes() {
    let long = "n".repeat(4096);
    let srv = TestServer::start_named(&long, memory(MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.greet(3);
    let too_long = "n".repeat(4097);
    let r = c.opt(OPT_GO, &Conn::info_payload(&too_long, &[]));
    assert_eq!(r[0].ty, REP_ERR_INVALID);
    let r = c.opt(OPT_INFO, &Conn::info_payload("nope", &[]));
    assert_eq!(r[0].ty, REP_ERR_UNKNOWN);
    let listing = c.opt(OPT_LIST, &[]);
    assert_eq!(listing[0].ty, REP_SERVER);
    assert_eq!(&listing[0].data[4..4 + 4096], long.as_bytes());
    let (size, _) = c.go(&long, &[INFO_NAME]);
    assert_eq!(size, MIB);
}

#[test]
fn bad_requests_get_errors_and_keep_the_connection() {
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let srv = TestServer::start(memory(MIB), ServerConfig::default());
        let mut c = srv.connect();
        c.handshake("disk", structured, extended);
        // Past the end.
        assert_eq!(c.read(0, MIB - 10, 20).unwrap_err(), EINVAL);
        assert_eq!(c.command(0, CMD_WRITE, MIB - 10, 20, &[1; 20]), ENOSPC);
        assert_eq!(c.command(0, CMD_TRIM, MIB, 1, &[]), EINVAL);
        assert_eq!(c.command(0, CMD_WRITE_ZEROES, u64::MAX - 1, 4, &[]), ENOSPC);
        // Over the maximum payload: refused, payload consumed, connection intact.
        let big = 33 * MIB as usize;
        assert_eq!(c.read(0, 0, big).unwrap_err(), EINVAL);
        let srv2 = TestServer::start(memory(64 * MIB), ServerConfig::default());
        let mut c2 = srv2.connect();
        c2.handshake("disk", structured, extended);
        assert_eq!(
            c2.command(0, CMD_WRITE, 0, big as u64, &vec![7; big]),
            EINVAL
        );
        assert_eq!(
            c2.read(0, 0, 16).unwrap(),
            vec![0; 16],
            "refused write left no trace"
        );
        // Unknown flags and commands.
        assert_eq!(c.command(0x4000, CMD_FLUSH, 0, 0, &[]), EINVAL);
        assert_eq!(c.command(0, 42, 0, 0, &[]), EINVAL);
        assert_eq!(c.command(FLAG_DF, CMD_WRITE, 0, 1, &[1]), EINVAL);
        // The connection still works.
        assert_eq!(c.command(0, CMD_WRITE, 0, 4, b"okay"), 0);
        assert_eq!(c.read(0, 0, 4).unwrap(), b"okay");
    }
}

#[test]
fn structured_errors_carry_a_message() {
    let srv = TestServer::start(memory(MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.handshake("disk", true, false);
    c.request(0, CMD_READ, 9, MIB, 512, &[]);
    let chunks = c.chunks();
    assert_eq!(chunks.len(), 1);
    assert!(chunks[0].ty == CHUNK_ERROR || chunks[0].ty == CHUNK_ERROR_OFFSET);
    let (errno, message) = error_of(&chunks[0]);
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
    for structured in [false, true] {
        let mut c = srv.connect();
        let (_, flags) = c.handshake("disk", structured, false);
        assert_eq!(flags & 2, 2, "READ_ONLY flag");
        assert_eq!(c.command(0, CMD_WRITE, 0, 4, b"nope"), EPERM);
        assert_eq!(c.command(0, CMD_TRIM, 0, 4096, &[]), EPERM);
        assert_eq!(c.command(0, CMD_WRITE_ZEROES, 0, 4096, &[]), EPERM);
        assert_eq!(c.read(0, 0, 4).unwrap(), vec![0; 4]);
    }
}

#[test]
fn sparse_reads_send_holes_and_df_sends_one_chunk() {
    let srv = TestServer::start(memory(4 * MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.handshake("disk", true, false);
    let data = pattern(4096, 5);
    assert_eq!(c.command(0, CMD_WRITE, MIB, 4096, &data), 0);

    c.request(0, CMD_READ, 1, 0, 2 * MIB, &[]);
    let chunks = c.chunks();
    assert!(
        chunks.iter().any(|c| c.ty == CHUNK_OFFSET_HOLE),
        "unwritten space is sent as holes"
    );
    assert!(chunks.iter().any(|c| c.ty == CHUNK_OFFSET_DATA));

    c.request(FLAG_DF, CMD_READ, 2, 0, 2 * MIB, &[]);
    let chunks = c.chunks();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].ty, CHUNK_OFFSET_DATA);
    assert_eq!(chunks[0].payload.len(), 8 + 2 * MIB as usize);

    let whole = c.read(0, 0, 2 * MIB as usize).unwrap();
    assert_eq!(&whole[MIB as usize..MIB as usize + 4096], &data[..]);
    assert!(whole[..MIB as usize].iter().all(|&b| b == 0));
}

#[test]
fn block_status_reports_allocation() {
    for extended in [false, true] {
        let srv = TestServer::start(memory(16 * MIB), ServerConfig::default());
        let mut c = srv.connect();
        c.handshake("disk", true, extended);
        assert_eq!(c.command(0, CMD_WRITE, MIB, MIB, &vec![1; MIB as usize]), 0);
        let ext = c.block_status(0, 0, 4 * MIB);
        let total: u64 = ext.iter().map(|e| e.0).sum();
        assert!(total <= 4 * MIB && total > 0);
        assert!(ext.iter().all(|e| e.0 > 0));
        assert_eq!(ext[0], (MIB, 3), "hole+zero before the data");
        assert_eq!(ext[1], (MIB, 0), "data");
        let one = c.block_status(FLAG_REQ_ONE, MIB, 4 * MIB);
        assert_eq!(one, vec![(MIB, 0)]);
        // Past the end is refused.
        c.request(0, CMD_BLOCK_STATUS, 3, 16 * MIB, 1, &[]);
        let chunks = c.chunks();
        assert_eq!(error_of(&chunks[0]).0, EINVAL);
    }
}

/// Greets, turns on structured replies (or extended headers), selects `queries` on
/// `disk` and GOes there; returns the contexts the server chose, as (id, name).
fn with_contexts(c: &mut Conn, extended: bool, queries: &[&str]) -> Vec<(u32, String)> {
    c.greet(3);
    let option = if extended {
        OPT_EXTENDED_HEADERS
    } else {
        OPT_STRUCTURED_REPLY
    };
    assert_eq!(c.opt(option, &[])[0].ty, REP_ACK);
    c.structured = true;
    c.extended = extended;
    let contexts = c.set_meta_contexts("disk", queries);
    c.go("disk", &[]);
    contexts
}

#[test]
fn block_status_answers_each_context_in_its_own_chunk() {
    for extended in [false, true] {
        let srv = TestServer::start(memory(16 * MIB), ServerConfig::default());
        let mut c = srv.connect();
        let mut contexts = with_contexts(
            &mut c,
            extended,
            &["qemu:allocation-depth", "base:allocation"],
        );
        contexts.sort();
        assert_eq!(
            contexts,
            [
                (1, "base:allocation".to_owned()),
                (2, "qemu:allocation-depth".to_owned())
            ]
        );
        assert_eq!(c.command(0, CMD_WRITE, MIB, MIB, &vec![1; MIB as usize]), 0);

        let mut chunks = c.block_status_chunks(0, 0, 4 * MIB);
        chunks.sort_by_key(|chunk| chunk.0);
        let ids: Vec<u32> = chunks.iter().map(|chunk| chunk.0).collect();
        assert_eq!(ids, [1, 2], "one chunk per context");
        let allocation = &chunks[0].1;
        assert_eq!(allocation[..2], [(MIB, 3), (MIB, 0)], "{allocation:?}");
        // A memory disk is a single layer: holes and data alike come from the top layer.
        assert_eq!(chunks[1].1, [(4 * MIB, 1)]);

        let mut one = c.block_status_chunks(FLAG_REQ_ONE, 3 * MIB, 4 * MIB);
        one.sort_by_key(|chunk| chunk.0);
        assert_eq!(one, [(1, vec![(4 * MIB, 3)]), (2, vec![(4 * MIB, 1)])]);
    }
}

#[test]
fn allocation_depth_alone() {
    for extended in [false, true] {
        let srv = TestServer::start(memory(16 * MIB), ServerConfig::default());
        let mut c = srv.connect();
        let contexts = with_contexts(&mut c, extended, &["qemu:allocation-depth"]);
        assert_eq!(contexts, [(2, "qemu:allocation-depth".to_owned())]);
        assert_eq!(
            c.block_status_chunks(0, 5 * MIB + 3, MIB),
            [(2, vec![(MIB, 1)])]
        );
        // The last byte of the export.
        assert_eq!(
            c.block_status_chunks(0, 16 * MIB - 1, 1),
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
    with_contexts(&mut c, false, &["qemu:allocation-depth"]);
    let max = u64::from(u32::MAX);
    assert_eq!(
        c.block_status_chunks(0, 0, max),
        [(2, vec![(max & !4095, 1)])]
    );
    // Extended descriptors: one 64-bit length covers the whole export.
    let mut c = srv.connect();
    with_contexts(&mut c, true, &["qemu:allocation-depth"]);
    assert_eq!(c.block_status_chunks(0, 0, size), [(2, vec![(size, 1)])]);
}

#[test]
fn extended_headers_carry_64_bit_lengths() {
    let size = 16u64 << 40;
    let srv = TestServer::start(memory(size), ServerConfig::default());
    let mut c = srv.connect();
    let (s, _) = c.handshake("disk", true, true);
    assert_eq!(s, size);
    assert_eq!(c.command(0, CMD_WRITE, 8 << 40, 4, b"deep"), 0);
    let ext = c.block_status(0, 0, size);
    assert!(
        ext[0].0 > u64::from(u32::MAX),
        "a single extent longer than 4 GiB: {ext:?}"
    );
    assert_eq!(ext[0], (8 << 40, 3));
    // Zeroing more than 4 GiB in one request.
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, 0, 9 << 40, &[]), 0);
    assert_eq!(c.read(0, 8 << 40, 4).unwrap(), vec![0; 4]);
    // Extended replies echo the request offset.
    c.request(0, CMD_FLUSH, 77, 0, 0, &[]);
    match c.reply() {
        Reply::Chunk(ch) => {
            assert_eq!(ch.cookie, 77);
            assert_eq!(ch.ty, CHUNK_NONE);
        }
        Reply::Simple { .. } => panic!("simple reply with extended headers"),
    }
}

#[test]
fn pipelined_requests_all_complete() {
    let srv = TestServer::start(memory(16 * MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.handshake("disk", false, false);
    let n = 200u64;
    let mut batch = Vec::new();
    for i in 0..n {
        let data = pattern(4096, i as u8);
        let mut m = Vec::new();
        m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&CMD_WRITE.to_be_bytes());
        m.extend_from_slice(&(1000 + i).to_be_bytes());
        m.extend_from_slice(&(i * 8192).to_be_bytes());
        m.extend_from_slice(&4096u32.to_be_bytes());
        m.extend_from_slice(&data);
        batch.extend_from_slice(&m);
    }
    // Everything at once, without waiting for a single reply.
    let writer = {
        let mut s = c.s.try_clone().unwrap();
        std::thread::spawn(move || s.write_all(&batch).unwrap())
    };
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        match c.reply() {
            Reply::Simple { errno, cookie } => {
                assert_eq!(errno, 0);
                assert!(seen.insert(cookie), "cookie {cookie} answered twice");
            }
            Reply::Chunk(_) => panic!("chunk without structured replies"),
        }
    }
    writer.join().unwrap();
    assert_eq!(seen, (1000..1000 + n).collect());
    for i in (0..n).step_by(37) {
        assert_eq!(c.read(0, i * 8192, 4096).unwrap(), pattern(4096, i as u8));
    }
}

#[test]
fn garbage_ends_only_that_connection() {
    let srv = TestServer::start(memory(MIB), ServerConfig::default());
    let mut good = srv.connect();
    good.handshake("disk", true, false);

    // Garbage instead of client flags.
    let mut bad = srv.connect();
    bad.greet(0xdead_beef);
    assert!(bad.closed_by_server());
    // Garbage instead of an option.
    let mut bad = srv.connect();
    bad.greet(3);
    bad.s.write_all(&[0x55; 64]).unwrap();
    assert!(bad.closed_by_server());
    // Garbage instead of a request.
    let mut bad = srv.connect();
    bad.handshake("disk", false, false);
    bad.s.write_all(&[0xaa; 28]).unwrap();
    assert!(bad.closed_by_server());
    // A truncated handshake, then the client vanishes.
    let mut bad = srv.connect();
    bad.greet(3);
    bad.s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(bad);
    // A request header cut short.
    let mut bad = srv.connect();
    bad.handshake("disk", false, false);
    bad.s.write_all(&[0x25, 0x60, 0x95]).unwrap();
    drop(bad);

    assert_eq!(good.command(0, CMD_WRITE, 0, 3, b"abc"), 0);
    assert_eq!(good.read(0, 0, 3).unwrap(), b"abc");
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
    idle.greet(3);
    // Say nothing more: the server must hang up on its own.
    assert!(idle.closed_by_server());
    assert!(start.elapsed() < Duration::from_secs(15));
    // A prompt client is unaffected.
    let mut c = srv.connect();
    c.handshake("disk", false, false);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]), 0);
}

#[test]
fn connections_are_capped_and_slots_come_back() {
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(memory(MIB), config);
    let mut a = srv.connect();
    a.handshake("disk", false, false);
    let mut b = srv.connect();
    b.handshake("disk", false, false);
    let mut c = srv.connect();
    assert!(c.closed_by_server(), "third connection is refused");
    // A client that vanishes without NBD_CMD_DISC frees its slot.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut d = srv.connect();
        let mut magic = [0u8; 8];
        use std::io::Read;
        if d.s.read_exact(&mut magic).is_ok() {
            assert_eq!(u64::from_be_bytes(magic), NBDMAGIC);
            break;
        }
        assert!(Instant::now() < deadline, "slot was never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.command(0, CMD_FLUSH, 0, 0, &[]), 0);
}

#[test]
fn flush_on_one_connection_covers_writes_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let backend = strata::backend::open(path.to_str().unwrap(), false).unwrap();
    let srv = TestServer::start(backend, ServerConfig::default());
    let mut a = srv.connect();
    let (_, flags) = a.handshake("disk", true, false);
    assert_ne!(flags & (1 << 8), 0, "CAN_MULTI_CONN");
    let mut b = srv.connect();
    b.handshake("disk", true, false);
    let data = pattern(65536, 9);
    assert_eq!(a.command(0, CMD_WRITE, 4096, 65536, &data), 0);
    assert_eq!(b.command(0, CMD_FLUSH, 0, 0, &[]), 0);
    assert_eq!(b.read(0, 4096, 65536).unwrap(), data);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[4096..4096 + 65536], &data[..]);
}

#[test]
fn disconnect_completes_requests_in_flight() {
    let srv = TestServer::start(memory(16 * MIB), ServerConfig::default());
    let mut c = srv.connect();
    c.handshake("disk", false, false);
    for i in 0..20u64 {
        c.request(
            0,
            CMD_WRITE,
            i,
            i * MIB / 2,
            65536,
            &pattern(65536, i as u8),
        );
    }
    c.request(0, CMD_DISC, 99, 0, 0, &[]);
    let mut answered = 0;
    for _ in 0..20 {
        match c.reply() {
            Reply::Simple { errno: 0, .. } => answered += 1,
            _ => panic!("write failed"),
        }
    }
    assert_eq!(answered, 20);
    assert!(c.closed_by_server());
    let mut d = srv.connect();
    d.handshake("disk", false, false);
    assert_eq!(d.read(0, 19 * MIB / 2, 65536).unwrap(), pattern(65536, 19));
}

#[test]
fn shutdown_finishes_in_flight_writes_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let backend = strata::backend::open(path.to_str().unwrap(), false).unwrap();
    let srv = TestServer::start(backend, ServerConfig::default());
    let mut c = srv.connect();
    c.handshake("disk", false, false);
    let data = pattern(MIB as usize, 3);
    assert_eq!(c.command(0, CMD_WRITE, 0, MIB, &data), 0);
    srv.stop().expect("clean shutdown");
    assert!(c.closed_by_server());
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
    c.handshake("disk", false, false);
    // Far more reply data than the in-flight budget and the socket buffers hold, and
    // never a byte read back.
    for i in 0..2000u64 {
        c.request(0, CMD_READ, i, (i % 64) * MIB, MIB, &[]);
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

/// Random requests (valid magic, random everything else, random payload) and random
/// bytes after a good handshake: the server answers or hangs up, never panics, and other
/// clients keep working.
#[test]
fn random_requests_never_panic_the_server() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));

    let srv = TestServer::start(memory(4 * MIB), ServerConfig::default());
    let mut good = srv.connect();
    good.handshake("disk", true, false);
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
        let (structured, extended) = match round % 3 {
            0 => (false, false),
            1 => (true, false),
            _ => (true, true),
        };
        c.handshake("disk", structured, extended);
        c.s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut bytes = Vec::new();
        for _ in 0..20 {
            let r = next();
            if r % 4 == 0 {
                // Pure noise.
                bytes.extend((0..(r % 64)).map(|_| next() as u8));
                continue;
            }
            let magic: u32 = if extended { 0x21e4_1c71 } else { 0x2560_9513 };
            bytes.extend_from_slice(&magic.to_be_bytes());
            bytes.extend_from_slice(&((next() % 64) as u16).to_be_bytes());
            bytes.extend_from_slice(&((next() % 10) as u16).to_be_bytes());
            bytes.extend_from_slice(&next().to_be_bytes());
            let offset = match next() % 3 {
                0 => next(),
                1 => next() % (4 * MIB),
                _ => 4 * MIB - next() % 4096,
            };
            bytes.extend_from_slice(&offset.to_be_bytes());
            let len = match next() % 3 {
                0 => next() % 8192,
                1 => next() % (64 * 1024),
                _ => next(),
            };
            if extended {
                bytes.extend_from_slice(&len.to_be_bytes());
            } else {
                bytes.extend_from_slice(&(len as u32).to_be_bytes());
            }
            bytes.extend((0..(next() % 4096)).map(|_| next() as u8));
        }
        let _ = c.s.write_all(&bytes);
        // Drain whatever comes back until the server hangs up or goes quiet.
        let mut sink = [0u8; 65536];
        use std::io::Read;
        while matches!(c.s.read(&mut sink), Ok(n) if n > 0) {}
    }
    assert_eq!(good.command(0, CMD_WRITE, 0, 4, b"live"), 0);
    assert_eq!(good.read(0, 0, 4).unwrap(), b"live");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "the server panicked");
}
