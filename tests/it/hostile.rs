//! Hostile clients against a real `strata serve`: garbage, lies about lengths, oversize
//! messages, protocol confusion, disconnects at every step of the protocol, a slowloris
//! handshake, and 10,000 idle connections. Throughout, the server must stay up, a
//! well-behaved client's I/O must keep working between and after the attacks, resident
//! memory must stay bounded, and nothing may panic.
//!
//! The steps a client can vanish at, each tried: before reading the greeting, after it,
//! in the middle of the client flags, in the middle of an option header, in the middle
//! of an option's data, right after GO, in the middle of a request header, in the middle
//! of a write's payload, and with replies still pending.

use std::io;
use std::time::{Duration, Instant};

use crate::support::client::{Client, EXTENDED, Mode, SIMPLE, STRUCTURED};
use crate::support::spec::*;
use crate::support::wire::{info_data, opt, opt_announcing, request};
use crate::support::*;

const DISK: u64 = 64 * MIB;
/// Where the well-behaved client keeps its data; attacks write only below it.
const GOOD_AREA: u64 = 32 * MIB;
/// How long a test waits for the server to close a hostile connection. Generous: the
/// machine may be loaded; the server closes such connections at once or at the
/// handshake deadline (2 s here).
const CLOSE_WAIT: Duration = Duration::from_secs(20);

fn raw(server: &Server) -> Client {
    Client::connect(server.endpoint()).expect("connect")
}

/// The server's resident memory, in KiB.
fn rss_kib(server: &Server) -> u64 {
    let pid = server.pid().expect("server running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn alive(server: &Server) -> bool {
    let pid = server.pid().expect("server running");
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    exists
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// A client that behaves: it writes a pattern of its own, flushes, and reads it back,
/// once per attack.
struct Good {
    conn: Client,
    round: u64,
}

impl Good {
    fn new(server: &Server) -> Good {
        let mut conn = raw(server);
        conn.handshake_bare("", STRUCTURED)
            .expect("well-behaved handshake");
        Good { conn, round: 0 }
    }

    #[track_caller]
    fn check(&mut self, server: &Server, after: &str) {
        assert!(alive(server), "server died after {after}\n{}", server.log());
        self.round += 1;
        let offset = GOOD_AREA + (self.round % 64) * 64 * KIB;
        let data = pattern(self.round, 64 * KIB as usize);
        let io = (|| -> io::Result<Vec<u8>> {
            self.conn.write(FLAG_FUA, offset, &data)?.map_err(refusal)?;
            self.conn.flush()?.map_err(refusal)?;
            self.conn
                .read(0, offset, data.len())?
                .map_err(|errno| refusal((errno, String::new())))
        })();
        match io {
            Ok(back) => assert!(back == data, "well-behaved read differs after {after}"),
            Err(e) => panic!(
                "well-behaved client failed after {after}: {e}\n{}",
                server.log()
            ),
        }
        // A fresh connection works too: the accept loop is alive.
        let mut fresh = raw(server);
        fresh
            .handshake_bare("", SIMPLE)
            .unwrap_or_else(|e| panic!("new connection refused after {after}: {e}"));
        fresh.disconnect().unwrap();
    }
}

/// A request the server refused, as an error.
fn refusal((errno, msg): (u32, String)) -> io::Error {
    io::Error::other(format!("errno {errno}: {msg}"))
}

/// One attack: a name, and what the hostile client does. Returning an error is fine
/// (the server may close early); panicking is not.
type Attack = (&'static str, fn(&Server) -> io::Result<()>);

fn open(server: &Server) -> io::Result<Client> {
    Client::connect(server.endpoint())
}

/// A connection past the greeting and the client flags: ready for options.
fn greeted(server: &Server) -> io::Result<Client> {
    let mut c = open(server)?;
    c.greet(C_FIXED_NO_ZEROES)?;
    Ok(c)
}

/// Sends an option the server must refuse with `ty`; negotiation must go on to a GO.
fn refused_then_go(c: &mut Client, option: u32, data: &[u8], ty: u32) -> io::Result<()> {
    assert_eq!(c.opt_result(option, data)?, ty, "option {option}");
    c.go("", &[]).map(drop)
}

fn after_go(server: &Server, mode: Mode) -> io::Result<Client> {
    let mut c = open(server)?;
    c.handshake_bare("", mode)?;
    Ok(c)
}

#[track_caller]
fn expect_closed(c: &mut Client, what: &str) -> io::Result<()> {
    assert!(
        c.stream.closed_by_server(CLOSE_WAIT),
        "server kept the connection after {what}"
    );
    Ok(())
}

/// Expects an error reply with `errno`, then checks the connection still serves.
fn expect_errno(c: &mut Client, errno: u32, what: &str) -> io::Result<()> {
    let r = c.reply(0)?;
    assert_eq!(r.error().map(|e| e.0), Some(errno), "{what}: {r:?}");
    assert!(
        c.read(0, 0, 512)?.is_ok(),
        "{what}: the connection no longer serves"
    );
    Ok(())
}

fn garbage(n: usize, seed: u64) -> Vec<u8> {
    pattern(seed, n)
}

fn attacks() -> Vec<Attack> {
    vec![
        // --- disconnects at every step ---
        ("close before reading the greeting", |s| {
            drop(open(s)?);
            Ok(())
        }),
        ("close after the greeting", |s| {
            let mut c = open(s)?;
            c.greeting()?;
            Ok(())
        }),
        ("close in the middle of the client flags", |s| {
            let mut c = open(s)?;
            c.greeting()?;
            c.send(&[0, 0])
        }),
        ("close in the middle of an option header", |s| {
            let mut c = greeted(s)?;
            c.send(&opt_announcing(OPT_GO, 10, &[])[..9])
        }),
        ("close in the middle of an option's data", |s| {
            let mut c = greeted(s)?;
            let data = info_data("", &[]);
            c.send(&opt_announcing(OPT_GO, data.len() as u32, &data[..3]))
        }),
        ("close right after GO", |s| {
            after_go(s, STRUCTURED).map(drop)
        }),
        ("close in the middle of a request header", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            c.send(&request(false, 0, CMD_READ, 1, 0, 512)[..13])
        }),
        ("close in the middle of a write payload", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            let mut m = request(false, 0, CMD_WRITE, 1, 0, 1 << 20);
            m.extend_from_slice(&[0xaa; 1000]);
            c.send(&m)
        }),
        ("close with 64 reads of 1 MiB pending", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            for i in 0..64 {
                c.request(0, CMD_READ, i * MIB % (GOOD_AREA - MIB), MIB, &[])?;
            }
            Ok(())
        }),
        ("close with pending writes, never reading a reply", |s| {
            let mut c = after_go(s, SIMPLE)?;
            let data = vec![0x5a; 256 * KIB as usize];
            for i in 0..32 {
                c.request(0, CMD_WRITE, i * 256 * KIB, data.len() as u64, &data)?;
            }
            Ok(())
        }),
        ("DISC with requests pending", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            for i in 0..8 {
                c.request(0, CMD_READ, i * MIB, MIB, &[])?;
            }
            c.disconnect()?;
            for _ in 0..8 {
                c.reply(MIB as usize)?;
            }
            expect_closed(&mut c, "DISC")
        }),
        // --- garbage and wrong magic ---
        ("garbage instead of client flags", |s| {
            let mut c = open(s)?;
            c.greeting()?;
            c.send(&garbage(4096, 1))?;
            expect_closed(&mut c, "garbage")
        }),
        ("unknown client flags", |s| {
            let mut c = open(s)?;
            c.greeting()?;
            c.send(&0xffff_fffcu32.to_be_bytes())?;
            expect_closed(&mut c, "unknown client flags")
        }),
        ("wrong option magic", |s| {
            let mut c = greeted(s)?;
            let mut m = opt(OPT_LIST, &[]);
            m[0] ^= 0xff;
            c.send(&m)?;
            expect_closed(&mut c, "wrong option magic")
        }),
        ("garbage after the handshake", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            c.send(&garbage(4096, 2))?;
            expect_closed(&mut c, "garbage requests")
        }),
        ("wrong request magic", |s| {
            let mut c = after_go(s, SIMPLE)?;
            let mut m = request(false, 0, CMD_READ, 1, 0, 512);
            m[3] ^= 1;
            c.send(&m)?;
            expect_closed(&mut c, "wrong request magic")
        }),
        ("truncated greeting read, then garbage", |s| {
            let mut c = open(s)?;
            c.read_exact(5)?;
            c.send(&garbage(100, 3))?;
            expect_closed(&mut c, "garbage while the greeting is unread")
        }),
        // --- lies about lengths ---
        ("option length shorter than its name", |s| {
            let mut c = greeted(s)?;
            let mut data = info_data("an-export-name", &[]);
            data.truncate(6);
            refused_then_go(&mut c, OPT_GO, &data, REP_ERR_INVALID)
        }),
        ("option claims 1000 info requests", |s| {
            let mut c = greeted(s)?;
            let mut data = info_data("", &[]);
            let n = data.len();
            data[n - 2..].copy_from_slice(&1000u16.to_be_bytes());
            refused_then_go(&mut c, OPT_INFO, &data, REP_ERR_INVALID)
        }),
        ("name length of 4 GiB in an option", |s| {
            let mut c = greeted(s)?;
            let mut data = u32::MAX.to_be_bytes().to_vec();
            data.extend_from_slice(&[0, 0]);
            assert_eq!(c.opt_result(OPT_GO, &data)?, REP_ERR_INVALID);
            Ok(())
        }),
        ("meta context query count lies", |s| {
            let mut c = greeted(s)?;
            assert_eq!(c.opt_result(OPT_STRUCTURED_REPLY, &[])?, REP_ACK);
            let mut data = 0u32.to_be_bytes().to_vec();
            data.extend_from_slice(&500u32.to_be_bytes());
            data.extend_from_slice(&15u32.to_be_bytes());
            data.extend_from_slice(b"base:alloc");
            refused_then_go(&mut c, OPT_SET_META_CONTEXT, &data, REP_ERR_INVALID)
        }),
        ("option announced as 4 GiB, then a hang-up", |s| {
            let mut c = greeted(s)?;
            let mut m = opt_announcing(0x4242, u32::MAX, &[]);
            m.extend_from_slice(&garbage(100_000, 4));
            c.send(&m)
        }),
        ("oversize option (1 MiB), then a normal GO", |s| {
            let mut c = greeted(s)?;
            let big = vec![0u8; MIB as usize];
            refused_then_go(&mut c, OPT_INFO, &big, REP_ERR_TOO_BIG)
        }),
        ("oversize EXPORT_NAME", |s| {
            let mut c = greeted(s)?;
            c.send(&opt(OPT_EXPORT_NAME, &[b'a'; 70_000]))?;
            expect_closed(&mut c, "oversize EXPORT_NAME")
        }),
        ("EXPORT_NAME of an export that does not exist", |s| {
            let mut c = greeted(s)?;
            c.send(&opt(OPT_EXPORT_NAME, b"missing"))?;
            expect_closed(&mut c, "unknown EXPORT_NAME")
        }),
        (
            "write payload shorter than announced, then silence and a hang-up",
            |s| {
                let mut c = after_go(s, STRUCTURED)?;
                let mut m = request(false, 0, CMD_WRITE, 1, 0, 4096);
                m.extend_from_slice(&[1; 100]);
                c.send(&m)?;
                std::thread::sleep(Duration::from_millis(200));
                Ok(())
            },
        ),
        ("write payload longer than announced", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            let mut m = request(false, 0, CMD_WRITE, 1, 0, 512);
            m.extend_from_slice(&[7; 512 + 64]);
            c.send(&m)?;
            let r = c.reply(0)?;
            assert_eq!(r.error(), None, "the announced part is a good write");
            expect_closed(&mut c, "the surplus bytes (bad magic)")
        }),
        ("length and offset on a flush", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            c.request(0, CMD_FLUSH, 1 << 40, 4096, &[])?;
            c.reply(0)?;
            assert!(
                c.read(0, 0, 512)?.is_ok(),
                "the connection no longer serves"
            );
            Ok(())
        }),
        // --- oversize requests ---
        ("read of 64 MiB", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            c.request(0, CMD_READ, 0, 64 * MIB, &[])?;
            let r = c.reply(0)?;
            assert!(r.error().is_some(), "{r:?}");
            Ok(())
        }),
        ("write of 33 MiB, payload sent in full", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            let len = 33 * MIB;
            c.request(0, CMD_WRITE, 0, len, &vec![0x33; len as usize])?;
            let r = c.reply(0)?;
            assert!(r.error().is_some(), "{r:?}");
            assert!(c.read(0, 0, 512)?.is_ok(), "the stream kept its framing");
            Ok(())
        }),
        ("extended write announcing 5 GiB", |s| {
            let mut c = after_go(s, EXTENDED)?;
            c.request(0, CMD_WRITE, 0, 5 << 30, &[0; 4096])?;
            expect_closed(&mut c, "a payload too large to skip")
        }),
        ("read past the end", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            c.request(0, CMD_READ, DISK - 512, 4096, &[])?;
            expect_errno(&mut c, EINVAL, "read past the end")
        }),
        ("write past the end", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            c.request(0, CMD_WRITE, DISK, 512, &[0; 512])?;
            expect_errno(&mut c, ENOSPC, "write past the end")
        }),
        ("offset near 2^64", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            c.request(0, CMD_READ, u64::MAX - 100, 4096, &[])?;
            expect_errno(&mut c, EINVAL, "offset overflow")
        }),
        // --- unknown commands and flags ---
        ("unknown command", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            c.request(0, 99, 0, 0, &[])?;
            expect_errno(&mut c, EINVAL, "command 99")
        }),
        ("unknown request flags", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            c.request(0x8000, CMD_READ, 0, 512, &[])?;
            expect_errno(&mut c, EINVAL, "flag 0x8000")
        }),
        ("block status without a metadata context", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            c.request(0, CMD_BLOCK_STATUS, 0, 4096, &[])?;
            expect_errno(&mut c, EINVAL, "block status without context")
        }),
        ("DF on a simple-reply connection", |s| {
            let mut c = after_go(s, SIMPLE)?;
            c.request(FLAG_DF, CMD_READ, 0, 512, &[])?;
            expect_errno(&mut c, EINVAL, "DF without structured replies")
        }),
        ("10,000 bad requests, replies never read", |s| {
            let mut c = after_go(s, SIMPLE)?;
            let mut m = Vec::new();
            for i in 0..10_000u64 {
                m.extend_from_slice(&request(false, 0, 99, i, 0, 0));
            }
            c.send(&m)
        }),
        ("many unknown options in a row", |s| {
            let mut c = greeted(s)?;
            for i in 0..200u32 {
                assert_eq!(c.opt_result(0x1000 + i, &[1, 2, 3])?, REP_ERR_UNSUP);
            }
            c.go("", &[]).map(drop)
        }),
        // --- structured and extended confusion ---
        ("compact requests after extended headers", |s| {
            let mut c = after_go(s, EXTENDED)?;
            // Two, so that the server has a whole extended header's worth to judge.
            let mut m = request(false, 0, CMD_READ, 1, 0, 512);
            m.extend_from_slice(&request(false, 0, CMD_READ, 2, 0, 512));
            c.send(&m)?;
            expect_closed(&mut c, "a compact request under extended headers")
        }),
        ("extended requests without extended headers", |s| {
            let mut c = after_go(s, STRUCTURED)?;
            c.send(&request(true, 0, CMD_READ, 1, 0, 512))?;
            expect_closed(&mut c, "an extended request without extended headers")
        }),
        ("STRUCTURED_REPLY with data", |s| {
            let mut c = greeted(s)?;
            refused_then_go(&mut c, OPT_STRUCTURED_REPLY, &[1, 2, 3, 4], REP_ERR_INVALID)
        }),
        (
            "EXTENDED_HEADERS twice and STRUCTURED_REPLY after it",
            |s| {
                let mut c = greeted(s)?;
                assert_eq!(c.opt_result(OPT_EXTENDED_HEADERS, &[])?, REP_ACK);
                let _ = c.opt_result(OPT_EXTENDED_HEADERS, &[])?;
                let _ = c.opt_result(OPT_STRUCTURED_REPLY, &[])?;
                c.go("", &[])?;
                c.mode = EXTENDED;
                assert!(c.read(0, 0, 512)?.is_ok());
                Ok(())
            },
        ),
        ("STARTTLS without TLS, then bytes behind it", |s| {
            let mut c = greeted(s)?;
            let mut m = opt(OPT_STARTTLS, &[]);
            m.extend_from_slice(&opt(OPT_LIST, &[]));
            c.send(&m)?;
            assert_eq!(c.opt_reply()?.ty, REP_ERR_UNSUP);
            Ok(())
        }),
        ("requests before the handshake ends", |s| {
            let mut c = greeted(s)?;
            c.send(&request(false, 0, CMD_READ, 1, 0, 512))?;
            expect_closed(&mut c, "a request in place of an option")
        }),
    ]
}

#[test]
fn hostile_clients_leave_the_server_serving() {
    if !strata_only("hostile clients") {
        return;
    }
    let server = memory(DISK)
        .listen(Transport::Unix)
        .args(["--handshake-timeout", "2"])
        .start();
    let mut good = Good::new(&server);
    good.check(&server, "start-up");
    let rss_start = rss_kib(&server);
    let mut tried = 0;
    let mut peak = rss_start;
    for (name, attack) in attacks() {
        if let Err(e) = attack(&server) {
            // The server may hang up first: that is one of the outcomes allowed.
            eprintln!("{name}: {e}");
        }
        tried += 1;
        good.check(&server, name);
        peak = peak.max(rss_kib(&server));
    }
    // The slowloris: a valid handshake dribbled a byte every 100 ms would take 4 s;
    // the deadline covers the whole handshake, not each read, so it ends at 2 s.
    let mut c = raw(&server);
    c.greeting().unwrap();
    let mut bytes = 3u32.to_be_bytes().to_vec();
    let data = info_data("", &[]);
    bytes.extend_from_slice(&opt(OPT_GO, &data));
    let started = Instant::now();
    let mut cut_off = false;
    for b in &bytes {
        if c.send(&[*b]).is_err() {
            cut_off = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut_off = cut_off || c.stream.closed_by_server(CLOSE_WAIT);
    assert!(cut_off, "a dribbled handshake was let through");
    assert!(
        server.log().contains("handshake not finished within"),
        "the slowloris was not ended by the deadline\n{}",
        server.log()
    );
    eprintln!("slowloris cut off after {:?}", started.elapsed());
    tried += 1;
    good.check(&server, "slowloris");
    let rss_end = rss_kib(&server);
    // Attacks run one at a time, so at most one hostile connection's in-flight budget
    // (64 MiB) is live at once; glibc keeps up to 64 MiB of freed heap (the server sets
    // M_TRIM_THRESHOLD so); 32 MiB more for buffers, tasks and the disk's own pages.
    let bound = rss_start + 160 * 1024;
    eprintln!(
        "hostile cases tried: {tried}; VmRSS start {rss_start} KiB, peak {peak} KiB, end {rss_end} KiB (bound {bound} KiB)"
    );
    assert!(peak <= bound, "resident memory grew to {peak} KiB");
    let log = server.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

/// Raises the open-file limit to `want`, if it can; returns the limit in force.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to and read from a live rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur >= want {
            return lim.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

const IDLE: usize = 10_000;

#[test]
fn ten_thousand_idle_connections() {
    if !strata_only("idle connections") {
        return;
    }
    // This process holds the client ends, the server (which inherits the limit) the
    // other ends: 10,000 each, and some to spare.
    let want = IDLE as u64 + 1000;
    let got = raise_nofile(want);
    if got < want {
        let msg = format!(
            "cannot raise RLIMIT_NOFILE to {want} (it is {got}): 10,000 idle connections \
             need that many descriptors"
        );
        // SAFETY: geteuid has no preconditions.
        if is_ci() && unsafe { libc::geteuid() } == 0 {
            panic!("CI=true as root and {msg}");
        }
        eprintln!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n");
        return;
    }
    let server = memory(DISK)
        .listen(Transport::Unix)
        .args(["--max-connections", &(IDLE + 100).to_string()])
        .start();
    let mut good = Good::new(&server);
    good.check(&server, "start-up");
    let rss_start = rss_kib(&server);
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut c = open(&server).expect("connect");
        // Half finish the handshake and sit in transmission, half stop after the
        // greeting (and are dropped at the handshake deadline, 10 s by default, unless
        // the test is faster).
        if i % 2 == 0 {
            c.handshake_bare("", STRUCTURED)
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
        } else {
            c.greeting().expect("greeting");
        }
        idle.push(c);
    }
    good.check(&server, "10,000 idle connections opened");
    let rss_held = rss_kib(&server);
    let per_conn = (rss_held.saturating_sub(rss_start)) * 1024 / IDLE as u64;
    eprintln!(
        "{IDLE} idle connections held: VmRSS {rss_start} KiB -> {rss_held} KiB ({per_conn} bytes each)"
    );
    // An idle session keeps a read buffer (reserved 64 KiB, of which only the pages
    // a request touched are resident), two small tasks and a socket, and a handshake
    // a 4 KiB buffer: about 15 KiB each was measured; 32 KiB allows for allocator
    // slack and is still far below one request's budget.
    assert!(
        rss_held <= rss_start + (IDLE as u64) * 32,
        "10,000 idle connections cost {} KiB",
        rss_held - rss_start
    );
    drop(idle);
    good.check(&server, "10,000 idle connections closed");
    let log = server.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}
