#!/usr/bin/env python3
"""Incremental backup through qemu:dirty-bitmap against a full copy.

Builds a Strata image of --size (10G by default) full of data, takes a snapshot, changes
--changed percent of its clusters (scattered 64 KiB writes), then copies the disk from
`strata serve` twice:

- full: `nbdcopy` of the whole export into a new file (what a backup without dirty
  tracking must do);
- incremental: a libnbd client (run by nbdsh) that asks the export for the context
  qemu:dirty-bitmap:SNAPSHOT and copies only the ranges it marks, into the previous
  full copy.

Both results are checked against the export with `cmp`. Prints a Markdown table with the
times, the bytes copied and the ratio.

Usage: benches/incremental.py [--size 10G] [--changed 1] [--dir DIR] [--keep]
Needs: nbdkit (pattern plugin), nbdcopy, nbdsh (python3-libnbd), fio.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = 64 * 1024

COPIER = r"""
import os
ctx = "qemu:dirty-bitmap:" + os.environ["SNAP"]
h.add_meta_context(ctx)
h.connect_uri(os.environ["URI"])
size = h.get_size()
ranges = []
def extents(metacontext, offset, entries, err):
    if metacontext != ctx:
        return 0
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            ranges.append((offset, entries[i]))
        offset += entries[i]
    return 0
pos = 0
while pos < size:
    covered = []
    def cb(metacontext, offset, entries, err):
        if metacontext == ctx:
            covered.append(sum(entries[0::2]))
        return extents(metacontext, offset, entries, err)
    h.block_status(min(size - pos, 1 << 30), pos, cb)
    pos += covered[0]
fd = os.open(os.environ["TARGET"], os.O_WRONLY)
copied = 0
CHUNK = 4 << 20
for off, length in ranges:
    end = off + length
    while off < end:
        n = min(CHUNK, end - off)
        os.pwrite(fd, h.pread(n, off), off)
        off += n
        copied += n
os.fsync(fd)
os.close(fd)
print(len(ranges), copied)
"""


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = s.strip().upper()
    return int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def strata_bin():
    exe = os.path.join(ROOT, "target", "release", "strata")
    if not os.path.exists(exe):
        run(["cargo", "build", "--release", "--quiet"], cwd=ROOT)
    return exe


RUNNING = []


class Server:
    def __init__(self, exe, image, sock, read_only=False):
        self.sock = sock
        self.proc = subprocess.Popen(
            [exe, "serve", "--listen", f"unix:{sock}", "--name", "disk", image]
            + (["--read-only"] if read_only else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        RUNNING.append(self.proc)
        deadline = time.time() + 20
        while not os.path.exists(sock):
            if time.time() > deadline or self.proc.poll() is not None:
                sys.exit("strata serve did not start")
            time.sleep(0.05)

    @property
    def uri(self):
        return f"nbd+unix:///disk?socket={self.sock}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def timed(cmd, **kw):
    t = time.perf_counter()
    out = run(cmd, capture_output=True, text=True, **kw)
    return time.perf_counter() - t, out.stdout


def nbdsh():
    """nbdsh runs `python3 -m nbd`; the first python3 on PATH may lack the module."""
    for py in ("python3", "/usr/bin/python3"):
        if subprocess.run([py, "-c", "import nbd"], capture_output=True).returncode == 0:
            return [py, "-m", "nbd"]
    sys.exit("python3-libnbd is needed")


def drop_caches():
    """Writes out what earlier steps left dirty, so a copy does not pay for it, and
    drops clean pages, so both copies start from the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="10G")
    ap.add_argument("--changed", type=float, default=1.0, help="percent of clusters")
    ap.add_argument("--dir", default=None, help="where the image and copies go")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    for tool in ("nbdkit", "nbdcopy", "fio", "cmp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    exe = strata_bin()
    work = tempfile.mkdtemp(prefix="strata-incr-", dir=args.dir)
    try:
        image = os.path.join(work, "disk.strata")
        sock = os.path.join(work, "nbd.sock")
        run([exe, "create", "-s", str(size), image], stdout=subprocess.DEVNULL)
        srv = Server(exe, image, sock)
        print(f"filling {size >> 20} MiB with data...", file=sys.stderr)
        run(["nbdcopy", "--", "[", "nbdkit", "pattern", f"size={size}", "]", srv.uri])
        srv.stop()
        run([exe, "snapshot", "create", image, "base"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

        # Scattered changes: fio writes `count` distinct random clusters (its random
        # map never repeats a block).
        clusters = size // CLUSTER
        count = max(1, int(clusters * args.changed / 100))
        srv = Server(exe, image, sock)
        job = os.path.join(work, "changes.fio")
        with open(job, "w") as f:
            f.write(f"[changes]\nioengine=nbd\nuri={srv.uri}\nrw=randwrite\nbs={CLUSTER}\n"
                    f"iodepth=16\nrandrepeat=1\nnumber_ios={count}\nsize={size}\n"
                    "buffer_pattern=0x5a\n")
        run(["fio", "--output-format=terse", job], stdout=subprocess.DEVNULL)
        full = os.path.join(work, "full.raw")
        drop_caches()
        t_full, _ = timed(["nbdcopy", srv.uri, full])
        # The previous backup: the snapshot's contents. Take it from the full copy and
        # undo the changes, so the incremental copy has real work to do.
        prev = os.path.join(work, "prev.raw")
        snap_srv = Server(exe, image + "@base", os.path.join(work, "snap.sock"), read_only=True)
        run(["nbdcopy", snap_srv.uri, prev])
        snap_srv.stop()
        drop_caches()
        env = dict(os.environ, URI=srv.uri, SNAP="base", TARGET=prev)
        t_incr, out = timed(nbdsh() + ["-c", COPIER], env=env)
        ranges, copied = (int(x) for x in out.split())
        run(["cmp", full, prev])
        srv.stop()

        mib = 1 << 20
        print("| copy | bytes copied | time (s) | MB/s |")
        print("|---|---|---|---|")
        print(f"| full (nbdcopy) | {size} | {t_full:.2f} | {size / t_full / 1e6:.0f} |")
        print(f"| incremental (qemu:dirty-bitmap:base, {ranges} ranges) | {copied} | "
              f"{t_incr:.2f} | {copied / t_incr / 1e6:.0f} |")
        print()
        print(f"disk {size // mib} MiB, {count} clusters of 64 KiB written by fio "
              f"({copied / mib:.0f} MiB dirty, {args.changed}%); incremental / full time: "
              f"{t_incr / t_full:.3f} ({t_full / t_incr:.1f}x faster); results identical (cmp)")
    finally:
        for p in RUNNING:
            if p.poll() is None:
                p.kill()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
