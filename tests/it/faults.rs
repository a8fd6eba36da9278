//! Fault injection (`Faulty`, `strata serve --inject-error`): every injected error
//! reaches clients as its NBD errno and, with structured replies, a message naming the
//! rule; the raw wire client and qemu-io both see them; and nothing acknowledged is lost
//! around them, also across a server killed and restarted on a Strata image.

use std::sync::Arc;

use crate::support::client::{Client, EXTENDED, Reply, SIMPLE, STRUCTURED};
use crate::support::in_process::{TestServer, memory_backend};
use crate::support::spec::*;
use crate::support::wire::Chunk;
use crate::support::*;
use strata::backend::{Faulty, SharedBackend, parse_fault_rule};
use strata::server::ServerConfig;

const RULES: &[&str] = &[
    "write:EIO:offset=1M,length=64K",
    "read:ENOSPC:offset=2M,length=4K",
    "flush:EIO:after=1,count=1",
    "trim:EPERM:offset=3M,length=1M",
    "zero:ENOTSUP:offset=3M,length=1M",
    "block-status:EOVERFLOW:offset=4M,length=4K",
    "cache:ESHUTDOWN:offset=5M,length=4K",
];

fn faulty_memory() -> SharedBackend {
    let rules = RULES.iter().map(|r| parse_fault_rule(r).unwrap()).collect();
    Arc::new(Faulty::new(memory_backend(16 * MIB), rules))
}

/// The one reply chunk of a request, in structured mode.
fn only_chunk(reply: Reply) -> Chunk {
    match reply {
        Reply::Structured { mut chunks, .. } => {
            assert_eq!(chunks.len(), 1, "one chunk expected");
            chunks.pop().unwrap()
        }
        Reply::Simple { errno, .. } => panic!("simple reply (errno {errno}) in structured mode"),
    }
}

/// Sends a request and returns its errno and message.
fn failure(
    c: &mut Client,
    flags: u16,
    cmd: u16,
    offset: u64,
    len: u64,
    payload: &[u8],
) -> (u32, String) {
    let chunk = only_chunk(c.call(flags, cmd, offset, len, payload).unwrap());
    assert!(
        chunk.ty & 0x8000 != 0,
        "expected an error chunk, got type {}",
        chunk.ty
    );
    chunk.error().unwrap()
}

#[test]
fn each_fault_reaches_the_wire_client_as_its_errno_and_message() {
    let server = TestServer::start(faulty_memory(), ServerConfig::default());
    let mut c = server.connect();
    c.handshake("disk", STRUCTURED).unwrap();
    let a = pattern(1, 64 * 1024);
    let b = pattern(2, 64 * 1024);
    assert_eq!(c.command(0, CMD_WRITE, 0, a.len() as u64, &a).unwrap(), 0);
    assert_eq!(
        c.command(0, CMD_WRITE, 2 * MIB + 8192, b.len() as u64, &b)
            .unwrap(),
        0
    );
    assert_eq!(
        c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(),
        0,
        "the first flush passes"
    );

    /// op, flags, command, offset, length, payload, errno
    type Case = (&'static str, u16, u16, u64, u64, Vec<u8>, u32);
    let cases: Vec<Case> = vec![
        ("write", 0, CMD_WRITE, MIB + 4096, 4096, vec![9; 4096], EIO),
        ("read", 0, CMD_READ, 2 * MIB, 4096, vec![], ENOSPC),
        ("flush", 0, CMD_FLUSH, 0, 0, vec![], EIO),
        ("trim", 0, CMD_TRIM, 3 * MIB, 4096, vec![], EPERM),
        (
            "zero",
            0,
            CMD_WRITE_ZEROES,
            3 * MIB + 8192,
            4096,
            vec![],
            ENOTSUP,
        ),
        (
            "block-status",
            0,
            CMD_BLOCK_STATUS,
            4 * MIB,
            4096,
            vec![],
            EOVERFLOW,
        ),
        ("cache", 0, CMD_CACHE, 5 * MIB, 4096, vec![], ESHUTDOWN),
    ];
    for (op, flags, cmd, offset, len, payload, errno) in cases {
        let (got, message) = failure(&mut c, flags, cmd, offset, len, &payload);
        assert_eq!(got, errno, "{op}: errno");
        assert!(
            message.contains("injected") && message.contains(op),
            "{op}: message {message:?}"
        );
    }
    // The rules select only what they say: neighbours, the second flush, other ops.
    assert_eq!(
        c.command(0, CMD_WRITE, MIB - 4096, 4096, &[3; 4096])
            .unwrap(),
        0
    );
    assert_eq!(
        c.command(0, CMD_WRITE, MIB + 64 * 1024, 4096, &[4; 4096])
            .unwrap(),
        0
    );
    assert_eq!(
        c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(),
        0,
        "count=1: only one flush fails"
    );
    assert_eq!(c.command(0, CMD_TRIM, 5 * MIB, 4096, &[]).unwrap(), 0);
    // Acknowledged data is all there; the failed write changed nothing.
    assert_eq!(c.read(0, 0, a.len()).unwrap().unwrap(), a);
    assert_eq!(c.read(0, 2 * MIB + 8192, b.len()).unwrap().unwrap(), b);
    assert_eq!(c.read(0, MIB + 4096, 4096).unwrap().unwrap(), vec![0; 4096]);
    assert_eq!(c.read(0, MIB - 4096, 4096).unwrap().unwrap(), vec![3; 4096]);

    // Simple replies carry the errno alone.
    let mut s = server.connect();
    s.handshake("disk", SIMPLE).unwrap();
    assert_eq!(s.command(0, CMD_WRITE, MIB, 512, &[1; 512]).unwrap(), EIO);
    assert_eq!(s.read(0, 2 * MIB, 512).unwrap(), Err(ENOSPC));
    assert_eq!(s.read(0, 0, a.len()).unwrap().unwrap(), a);
    // Extended headers too.
    let mut e = server.connect();
    e.handshake("disk", EXTENDED).unwrap();
    match e.call(0, CMD_WRITE, MIB, 512, &[1; 512]).unwrap() {
        reply @ Reply::Structured { .. } => assert_eq!(only_chunk(reply).error().unwrap().0, EIO),
        Reply::Simple { .. } => panic!("simple reply with extended headers"),
    }
}

fn serve_faulty(rules: &[&str], t: Transport) -> Server {
    let mut args = Vec::new();
    for r in rules {
        args.push("--inject-error".to_owned());
        args.push((*r).to_owned());
    }
    memory(16 * MIB).listen(t).args(args).start()
}

fn qemu_sees_injected_errors(t: Transport) {
    if !require_tool("qemu-io") || !strata_only("--inject-error") {
        return;
    }
    let server = serve_faulty(
        &[
            "write:EIO:offset=1M,length=64K",
            "read:ENOSPC:offset=8M,length=4K",
        ],
        t,
    );
    let uri = server.uri();
    qemu_io_ok(&uri, false, &["write -P 0x11 0 64k", "flush"]);
    let out = run(&mut qemu_io(&uri, false, &["write -P 0x22 1M 4k"]));
    assert!(
        out.stdout.contains("Input/output error") || out.stderr.contains("Input/output error"),
        "qemu-io did not report EIO\n{}",
        out.report()
    );
    let out = run(&mut qemu_io(&uri, true, &["read 8M 4k"]));
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("No space left on device"),
        "qemu-io did not report ENOSPC\n{}",
        out.report()
    );
    // What was acknowledged before the faults reads back; the failed write left nothing.
    qemu_io_ok(&uri, true, &["read -P 0x11 0 64k", "read -P 0 1M 4k"]);
    let log = server.log();
    assert!(
        log.contains("injected EIO"),
        "the server log names the fault\n{log}"
    );
}

over_transports!(qemu_sees_injected_errors);

/// Writes acknowledged before an acknowledged flush survive a kill, even with writes and
/// a flush failing around them; the failed ones are simply not promised.
#[test]
fn acknowledged_writes_survive_faults_and_a_kill() {
    if !strata_only("--inject-error") {
        return;
    }
    let (_dir, image) = scratch("disk.strata");
    run_ok(strata().args(["create", "-s", "8M", image.to_str().unwrap()]));
    let mut server = file(&image)
        .listen(Transport::Unix)
        .args([
            "--inject-error",
            "write:EIO:probability=0.25,seed=11",
            "--inject-error",
            "flush:EIO:after=3,count=2",
        ])
        .start();
    let mut c = Client::connect(server.endpoint()).unwrap();
    c.handshake_bare("", STRUCTURED).unwrap();
    let block = 64 * 1024usize;
    let blocks = 8 * MIB as usize / block;
    // The content each block is known to have durably, and what was acknowledged since.
    let mut durable: Vec<Option<u64>> = vec![None; blocks];
    let mut acked: Vec<Option<u64>> = vec![None; blocks];
    let (mut failed_writes, mut failed_flushes, mut flushes) = (0, 0, 0);
    for round in 0..400u64 {
        let i = (round * 7919 % blocks as u64) as usize;
        let data = pattern(round + 100, block);
        match c.write(0, (i * block) as u64, &data).unwrap() {
            Ok(()) => acked[i] = Some(round + 100),
            Err((errno, msg)) => {
                assert_eq!(errno, EIO, "{msg}");
                assert!(msg.contains("injected EIO"), "{msg}");
                failed_writes += 1;
                // A failed write's range is undefined until written again.
                acked[i] = None;
                durable[i] = None;
            }
        }
        if round % 25 == 24 {
            match c.flush().unwrap() {
                Ok(()) => {
                    flushes += 1;
                    for (d, a) in durable.iter_mut().zip(&acked) {
                        if a.is_some() {
                            *d = *a;
                        }
                    }
                }
                Err((errno, _)) => {
                    assert_eq!(errno, EIO);
                    failed_flushes += 1;
                }
            }
        }
    }
    assert!(
        failed_writes > 50 && failed_flushes == 2,
        "{failed_writes} {failed_flushes}"
    );
    server.stop_with(libc::SIGKILL);
    let server = file(&image).listen(Transport::Unix).start();
    let mut c = Client::connect(server.endpoint()).unwrap();
    c.handshake_bare("", SIMPLE).unwrap();
    let mut checked = 0;
    for (i, d) in durable.iter().enumerate() {
        let Some(seed) = d else { continue };
        let got = c.read(0, (i * block) as u64, block).unwrap().unwrap();
        // A later acknowledged write may have reached the disk too.
        let later = acked[i].is_some_and(|a| got == pattern(a, block));
        assert!(
            got == pattern(*seed, block) || later,
            "block {i} lost its flushed data"
        );
        checked += 1;
    }
    eprintln!(
        "faults: {failed_writes} writes and {failed_flushes} flushes failed, {flushes} flushes \
         succeeded; {checked} flushed blocks checked after SIGKILL, none lost"
    );
    assert!(checked > 20);
}
