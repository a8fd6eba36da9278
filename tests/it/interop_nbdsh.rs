//! Protocol-level interop through libnbd's Python bindings (`nbdsh`, python3-libnbd):
//! negotiation (structured replies, extended headers, meta contexts), block status,
//! write-zeroes flags, trim, FUA, pipelining, multi-connection consistency and
//! read-only enforcement by the server.
//!
//! Each test runs a Python snippet with a fresh handle `h`; the snippet connects to
//! `os.environ["URI"]` itself so that it can request meta contexts first.

use crate::support::*;

/// Python helpers shared by the snippets.
const PY_HELPERS: &str = r#"
import random
MiB = 1 << 20
KiB = 1 << 10
STRICT = os.environ.get("STRICT") == "1"

def pat(seed, n):
    """Deterministic pseudo-random bytes, different for each seed."""
    return random.Random(seed).randbytes(n)

def extents(h, off, length):
    """base:allocation extents covering [off, off+length) as (start, len, flags)."""
    out = []
    pos = off
    end = off + length
    while pos < end:
        got = []
        def cb(metacontext, offset, entries, err):
            if metacontext == "base:allocation":
                got.append((offset, list(entries)))
            return 0
        h.block_status(end - pos, pos, cb)
        assert len(got) == 1, "expected one base:allocation reply, got %r" % (got,)
        reply_off, ents = got[0]
        assert reply_off == pos, "block status reply for %d, asked %d" % (reply_off, pos)
        assert len(ents) >= 2 and len(ents) % 2 == 0, "bad extent list %r" % (ents,)
        for i in range(0, len(ents), 2):
            n, flags = ents[i], ents[i + 1]
            assert n > 0, "zero-length extent in %r" % (ents,)
            n = min(n, end - pos)
            out.append((pos, n, flags))
            pos += n
            if pos >= end:
                break
    return out

def expect_extents(h, off, length, is_data, what):
    """Every extent in range must be wholly data (hole bit clear) where is_data(offset)
    is true, and wholly hole+zero elsewhere; is_data must be constant per extent."""
    ext = extents(h, off, length)
    for (s, n, f) in ext:
        want = is_data(s)
        assert all(is_data(b) == want for b in range(s, s + n, 4096)) and is_data(s + n - 1) == want, \
            "%s: extent (%d, %d, flags=%d) straddles a written/unwritten edge; extents: %r" % (what, s, n, f, ext)
        if want:
            assert f & 1 == 0, "%s: written extent (%d, %d) reported as hole (flags=%d); extents: %r" % (what, s, n, f, ext)
        else:
            assert f == 3, "%s: unwritten extent (%d, %d) not hole+zero (flags=%d); extents: %r" % (what, s, n, f, ext)
    return ext

def expect_error(fn, errnum, what):
    try:
        fn()
    except nbd.Error as e:
        assert errnum is None or e.errnum == errnum, \
            "%s: expected errno %s, got %s (%s)" % (what, errnum, e.errnum, e.string)
        return e
    raise AssertionError("%s: succeeded but should have failed" % what)
"#;

/// Runs `script` (after the helpers) against `server`'s named export.
#[track_caller]
fn nbdsh_run(server: &Server, script: &str) -> CmdOutput {
    nbdsh_run_uri(server, &server.uri(), script)
}

#[track_caller]
fn nbdsh_run_uri(server: &Server, uri: &str, script: &str) -> CmdOutput {
    let strict = if server_kind() == ServerKind::Strata {
        "1"
    } else {
        "0"
    };
    nbdsh_script(
        uri,
        &[
            ("SIZE", server.size().to_string()),
            ("STRICT", strict.to_owned()),
        ],
        &format!("{PY_HELPERS}\n{script}"),
    )
}

/// Runs `script` on a fresh memory disk of `size` bytes reached over `t`, when nbdsh is
/// installed.
fn script_on_memory(t: Transport, size: u64, script: &str) {
    if require_tool("nbdsh") {
        nbdsh_run(&memory(size).listen(t).start(), script);
    }
}

fn negotiation(t: Transport) {
    if !require_tool("nbdsh") {
        return;
    }
    let server = memory(32 * MIB).listen(t).start();
    let out = nbdsh_run(
        &server,
        r#"
h.add_meta_context("base:allocation")
h.connect_uri(os.environ["URI"])
assert h.get_structured_replies_negotiated(), "structured replies not negotiated"
assert h.can_meta_context("base:allocation"), "base:allocation not negotiated"
assert h.get_size() == int(os.environ["SIZE"]), "size %d" % h.get_size()
assert h.aio_is_ready()
if hasattr(h, "get_extended_headers_negotiated"):
    neg = h.get_extended_headers_negotiated()
    print("extended headers negotiated:", neg)
    if STRICT:
        assert neg, "extended headers not negotiated"
else:
    print("libnbd", h.get_version(), "cannot negotiate extended headers; not checked")
h.shutdown()
"#,
    );
    eprintln!("{}", out.stdout);

    // The default export "" answers the same way.
    nbdsh_run_uri(
        &server,
        &server.default_uri(),
        r#"
h.connect_uri(os.environ["URI"])
assert h.get_structured_replies_negotiated()
assert h.get_size() == int(os.environ["SIZE"])
"#,
    );
}

#[test]
fn option_info_and_list() {
    if !require_tool("nbdsh") {
        return;
    }
    let server = memory(5 * MIB).name("infovol").start();
    nbdsh_run(
        &server,
        r#"
# NBD_OPT_LIST then NBD_OPT_INFO on the named export, then NBD_OPT_GO.
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(os.environ["URI"])
names = []
def got(name, desc):
    names.append(name)
    return 0
n = h.opt_list(got)
assert "infovol" in names, "NBD_OPT_LIST gave %r" % names
h.set_export_name("infovol")
h.opt_info()
assert h.get_size() == 5 * MiB, "INFO size %d" % h.get_size()
assert not h.is_read_only()
h.opt_go()
assert h.get_size() == 5 * MiB
h.pwrite(b"\x01" * 512, 0)
assert h.pread(512, 0) == b"\x01" * 512
"#,
    );
}

const BLOCK_STATUS_BASE_ALLOCATION: &str = r#"
h.add_meta_context("base:allocation")
h.connect_uri(os.environ["URI"])
size = h.get_size()
expect_extents(h, 0, size, lambda o: False, "fresh disk")
h.pwrite(pat(1, MiB), MiB)
h.pwrite(pat(2, 2 * MiB), 8 * MiB)
written = lambda o: MiB <= o < 2 * MiB or 8 * MiB <= o < 10 * MiB
expect_extents(h, 0, size, written, "after writes")
# A query starting inside an extent reports from that offset.
ext = extents(h, MiB + 4096, 4096)
assert ext[0][2] & 1 == 0, "inside written range: %r" % ext
ext = extents(h, 3 * MiB + 512, 512)
assert ext[0][2] == 3, "inside hole: %r" % ext
# REQ_ONE: at most one extent.
got = []
def cb(ctx, off, ents, err):
    got.append(list(ents)); return 0
h.block_status(size, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(got) == 1 and len(got[0]) == 2, "REQ_ONE gave %r" % got
assert got[0][1] == 3 and 0 < got[0][0] <= MiB, "REQ_ONE first extent %r" % got
# Sparse reads: holes read as zeroes, data as written.
assert h.pread(MiB, 0) == bytes(MiB)
assert h.pread(MiB, MiB) == pat(1, MiB)
assert h.pread(2 * MiB, 8 * MiB) == pat(2, 2 * MiB)
assert h.pread(3 * MiB, MiB - 4096) == bytes(4096) + pat(1, MiB) + bytes(2 * MiB - 4096)
"#;

fn block_status_base_allocation(t: Transport) {
    script_on_memory(t, 16 * MIB, BLOCK_STATUS_BASE_ALLOCATION);
}

const WRITE_ZEROES_FLAGS: &str = r#"
h.add_meta_context("base:allocation")
h.connect_uri(os.environ["URI"])
assert h.can_zero(), "WRITE_ZEROES not advertised"
for i in range(4):
    h.pwrite(pat(10 + i, MiB), i * MiB)

# NO_HOLE: reads back zero, and the range stays allocated.
h.zero(MiB, 0, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(MiB, 0) == bytes(MiB), "NO_HOLE zero did not zero"
ext = extents(h, 0, MiB)
if STRICT:
    assert all(f & 1 == 0 for (_, _, f) in ext), "NO_HOLE zero left a hole: %r" % ext
else:
    print("NO_HOLE allocation not checked on this server:", ext)

# Plain zero (may punch a hole): reads back zero.
h.zero(MiB, MiB)
assert h.pread(MiB, MiB) == bytes(MiB), "zero did not zero"
ext = extents(h, MiB, MiB)
assert all(f & 2 == 2 or f & 1 == 0 for (_, _, f) in ext), "zeroed range: %r" % ext

# Unaligned zero inside data; neighbours intact.
h.zero(1000, 2 * MiB + 12345)
got = h.pread(MiB, 2 * MiB)
want = bytearray(pat(12, MiB)); want[12345:13345] = bytes(1000)
assert got == bytes(want), "unaligned zero damaged neighbours"

# FAST_ZERO: either done (and zero) or refused with ENOTSUP, never slow-pathed wrongly.
if h.can_fast_zero():
    try:
        h.zero(MiB, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(MiB, 3 * MiB) == bytes(MiB), "FAST_ZERO did not zero"
    except nbd.Error as e:
        assert e.errnum == errno.ENOTSUP, "FAST_ZERO failed with %s" % e
        assert h.pread(MiB, 3 * MiB) == pat(13, MiB), "refused FAST_ZERO changed data"
elif STRICT:
    raise AssertionError("FAST_ZERO not advertised")

# FUA on zero.
h.pwrite(pat(20, MiB), 4 * MiB)
h.zero(64 * KiB, 4 * MiB, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
assert h.pread(128 * KiB, 4 * MiB) == bytes(64 * KiB) + pat(20, MiB)[64 * KiB:128 * KiB]
"#;

fn write_zeroes_flags(t: Transport) {
    script_on_memory(t, 16 * MIB, WRITE_ZEROES_FLAGS);
}

const TRIM_FUA_FLUSH_CACHE: &str = r#"
h.connect_uri(os.environ["URI"])
assert h.can_trim() and h.can_fua() and h.can_flush(), "trim/fua/flush not all advertised"
data = pat(30, MiB)
h.pwrite(data, 2 * MiB)
# Trim the middle; the rest must survive (trimmed content itself is unspecified).
h.trim(256 * KiB, 2 * MiB + 256 * KiB)
got = h.pread(MiB, 2 * MiB)
assert got[:256 * KiB] == data[:256 * KiB], "trim damaged data before the range"
assert got[512 * KiB:] == data[512 * KiB:], "trim damaged data after the range"
h.trim(4096, 15 * MiB, nbd.CMD_FLAG_FUA)
# A trimmed range can be written again.
h.pwrite(pat(31, 256 * KiB), 2 * MiB + 256 * KiB)
assert h.pread(256 * KiB, 2 * MiB + 256 * KiB) == pat(31, 256 * KiB)

# FUA writes, aligned and not.
h.pwrite(pat(32, 64 * KiB), 6 * MiB, nbd.CMD_FLAG_FUA)
h.pwrite(pat(33, 777), 7 * MiB + 3, nbd.CMD_FLAG_FUA)
assert h.pread(64 * KiB, 6 * MiB) == pat(32, 64 * KiB)
assert h.pread(777, 7 * MiB + 3) == pat(33, 777)
h.flush()
if h.can_cache():
    h.cache(MiB, 6 * MiB)
elif STRICT:
    raise AssertionError("CACHE not advertised")
assert h.pread(64 * KiB, 6 * MiB) == pat(32, 64 * KiB)
"#;

fn trim_fua_flush_cache(t: Transport) {
    script_on_memory(t, 16 * MIB, TRIM_FUA_FLUSH_CACHE);
}

const PIPELINING: &str = r#"
h.connect_uri(os.environ["URI"])
N = 64
CH = 64 * KiB
def wait_all(cookies):
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c), "command %d not complete" % c

# Many writes in flight at once, in a scattered order, with some FUA.
order = [(i * 37) % N for i in range(N)]
cookies = []
for i in order:
    buf = nbd.Buffer.from_bytearray(bytearray(pat(100 + i, CH)))
    flags = nbd.CMD_FLAG_FUA if i % 8 == 0 else 0
    cookies.append(h.aio_pwrite(buf, i * CH, flags=flags))
peak = h.aio_in_flight()
wait_all(cookies)
print("writes in flight at once:", peak)

# Many reads in flight, mixed with writes to other ranges and a flush.
bufs = {}
cookies = []
for i in order:
    bufs[i] = nbd.Buffer(CH)
    cookies.append(h.aio_pread(bufs[i], i * CH))
    if i % 4 == 0:
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pat(500 + i, 4096))), 32 * MiB + i * 4096))
cookies.append(h.aio_flush())
wait_all(cookies)
for i in range(N):
    assert bytes(bufs[i].to_bytearray()) == pat(100 + i, CH), "chunk %d read back wrong" % i
for i in range(0, N, 4):
    assert h.pread(4096, 32 * MiB + i * 4096) == pat(500 + i, 4096), "interleaved write %d lost" % i

# Large requests (several MiB) in flight together.
big = [pat(900 + k, 4 * MiB) for k in range(3)]
cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(big[k])), 40 * MiB + k * 4 * MiB) for k in range(3)]
wait_all(cookies)
rb = [nbd.Buffer(4 * MiB) for k in range(3)]
cookies = [h.aio_pread(rb[k], 40 * MiB + k * 4 * MiB) for k in range(3)]
wait_all(cookies)
for k in range(3):
    assert bytes(rb[k].to_bytearray()) == big[k], "big read %d wrong" % k
"#;

fn pipelining(t: Transport) {
    script_on_memory(t, 64 * MIB, PIPELINING);
}

const TWO_CONNECTIONS: &str = r#"
h.connect_uri(os.environ["URI"])
h2 = nbd.NBD()
h2.connect_uri(os.environ["URI"])
assert h.can_multi_conn() and h2.can_multi_conn(), "multi-conn not advertised"
# Write + flush on one, read on the other, both ways.
h.pwrite(pat(40, MiB), MiB)
h.flush()
assert h2.pread(MiB, MiB) == pat(40, MiB), "second connection does not see the first's write"
h2.pwrite(pat(41, 4096), 5 * MiB + 512)
h2.flush()
assert h.pread(4096, 5 * MiB + 512) == pat(41, 4096), "first connection does not see the second's write"
# Zero and trim through one are visible on the other.
h.zero(MiB, MiB)
h.flush()
assert h2.pread(MiB, MiB) == bytes(MiB)
h2.shutdown()
h.shutdown()
"#;

fn two_connections(t: Transport) {
    script_on_memory(t, 8 * MIB, TWO_CONNECTIONS);
}

fn read_only_rejects_writes(t: Transport) {
    if !require_tool("nbdsh") {
        return;
    }
    let (_dir, disk) = scratch("ro.img");
    let data = pattern(50, 2 * MIB as usize);
    std::fs::write(&disk, &data).unwrap();
    let server = file(&disk).listen(t).read_only().start();
    nbdsh_run(
        &server,
        r#"
h.connect_uri(os.environ["URI"])
assert h.is_read_only(), "export not flagged read-only"
before = h.pread(64 * KiB, 0)
# Turn off libnbd's own checks so the requests really reach the server.
h.set_strict_mode(0)
expect_error(lambda: h.pwrite(b"\xff" * 4096, 0), errno.EPERM, "write to read-only export")
expect_error(lambda: h.pwrite(b"\xff" * 4096, 0, nbd.CMD_FLAG_FUA), None, "FUA write to read-only export")
expect_error(lambda: h.zero(4096, 0), None, "zero on read-only export")
expect_error(lambda: h.trim(4096, 0), None, "trim on read-only export")
# The connection is still usable and nothing changed.
assert h.pread(64 * KiB, 0) == before, "read-only export changed"
h.flush() if h.can_flush() else None
"#,
    );
    drop(server);
    assert_same_bytes(
        "read-only backing file",
        &std::fs::read(&disk).unwrap(),
        &data,
    );
}

const OUT_OF_RANGE_REQUESTS_FAIL: &str = r#"
h.connect_uri(os.environ["URI"])
h.set_strict_mode(0)
size = h.get_size()
expect_error(lambda: h.pread(4096, size - 2048), errno.EINVAL, "read past the end")
# Past-the-end writes: ENOSPC is recommended, EINVAL accepted.
e = expect_error(lambda: h.pwrite(b"\x01" * 4096, size), None, "write past the end")
assert e.errnum in (errno.ENOSPC, errno.EINVAL), "write past end gave %s" % e
# The connection survives and the last bytes are intact.
assert h.pread(4096, size - 4096) == bytes(4096)
h.pwrite(b"\x02" * 4096, size - 4096)
assert h.pread(4096, size - 4096) == b"\x02" * 4096
"#;

fn out_of_range_requests_fail(t: Transport) {
    script_on_memory(t, MIB, OUT_OF_RANGE_REQUESTS_FAIL);
}

over_transports!(
    negotiation,
    block_status_base_allocation,
    write_zeroes_flags,
    trim_fua_flush_cache,
    pipelining,
    two_connections,
    read_only_rejects_writes,
    out_of_range_requests_fail,
);
