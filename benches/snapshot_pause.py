#!/usr/bin/env python3
"""How long clients wait while a snapshot is taken, under a write load, by disk size.

For each virtual size (1G, 1T and 16T by default; sparse) and each directory (/dev/shm
and a directory on disk), a Strata image gets some data of its own, is served with a
control socket, and fio writes 4 KiB blocks at random over its first GiB with queue
depth 32 from two jobs; meanwhile `strata ctl snapshot` is called --count times. Prints
the pause each snapshot reported (the time requests were held back, measured by the
server) and fio's worst completion latency over the run, next to its median.

Usage: benches/snapshot_pause.py [--sizes 1G,1T,16T] [--dirs /dev/shm,/var/tmp]
                                 [--count 10] [--interval 0.3]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strata_bin():
    exe = os.path.join(ROOT, "target", "release", "strata")
    if not os.path.exists(exe):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    return exe


def measure(exe, directory, size, count, interval):
    work = tempfile.mkdtemp(prefix="strata-pause-", dir=directory)
    server = None
    try:
        image = os.path.join(work, "disk.strata")
        subprocess.run([exe, "create", "-s", size, image], check=True, stdout=subprocess.DEVNULL)
        sock = os.path.join(work, "nbd.sock")
        ctl = os.path.join(work, "control.sock")
        server = subprocess.Popen(
            [exe, "serve", "--listen", f"unix:{sock}", "--name", "disk", "--control", ctl, image],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 20
        while not (os.path.exists(sock) and os.path.exists(ctl)):
            if time.time() > deadline or server.poll() is not None:
                sys.exit("strata serve did not start")
            time.sleep(0.05)
        uri = f"nbd+unix:///disk?socket={sock}"
        # Data spread over the disk (every 64th GiB, or every 16 MiB of a small one),
        # so the map has pages across it.
        spread = max(1, size_bytes(size) // 64)
        for i in range(64):
            subprocess.run(
                ["qemu-io", "-f", "raw", uri, "-c", f"write -P 0x{i + 1:02x} {i * spread} 64k"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        runtime = count * interval + 1.5
        fio = subprocess.Popen(
            [
                "fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                "--bs=4k", "--size=1G", "--iodepth=32", "--numjobs=2", "--time_based",
                f"--runtime={runtime}", "--group_reporting", "--output-format=json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        time.sleep(0.7)
        pauses = []
        for i in range(count):
            out = subprocess.run(
                [exe, "ctl", "--socket", ctl, "--json", "snapshot", "disk", f"s{i}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            pauses.append(json.loads(out)["pause_us"])
            time.sleep(interval)
        report, _ = fio.communicate(timeout=runtime + 60)
        # fio may print notes before its JSON.
        job = json.loads(report[report.index("{"):])["jobs"][0]["write"]
        clat = job["clat_ns"]
        return {
            "pauses": pauses,
            "iops": job["iops"],
            "p50_us": clat["percentile"]["50.000000"] / 1000,
            "max_us": clat["max"] / 1000,
        }
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def size_bytes(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1G,1T,16T")
    ap.add_argument("--dirs", default="/dev/shm,/var/tmp")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.3)
    args = ap.parse_args()
    for tool in ("fio", "qemu-io"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    exe = strata_bin()
    print("| directory | virtual size | snapshots | pause p50 (us) | pause max (us) | "
          "fio IOPS | fio write p50 (us) | fio worst write (us) |")
    print("|---|---|---|---|---|---|---|---|")
    for d in args.dirs.split(","):
        for size in args.sizes.split(","):
            r = measure(exe, d, size, args.count, args.interval)
            p = r["pauses"]
            print(f"| {d} | {size} | {len(p)} | {statistics.median(p):.0f} | {max(p)} | "
                  f"{r['iops']:.0f} | {r['p50_us']:.0f} | {r['max_us']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
