#!/usr/bin/env python3
"""Side-by-side fio benchmark of Strata, nbdkit and qemu-nbd on the same image.

Each server is started in turn on the same raw image (in /dev/shm by default, so the
measurement is of the servers, not of a disk), and fio's nbd engine runs the same
workloads against each, over TCP and over a Unix socket. For every run the table shows
IOPS, bandwidth, median and 99th percentile completion latency, and the server's CPU time
per request (user+system time of the server process over the run, from /proc, divided by
the requests served). The last column is Strata's figure over the best peer's.

With --backends, Strata also serves the same data as a Strata sparse image ("strata",
converted from the raw image, fully allocated) and as the top of a chain of ten overlays
over the raw image ("overlay10", each overlay holding 8 MiB of its own); those rows
compare Strata with itself on the raw image, since the other servers cannot read them.

Usage: benches/compare.py [--runtime SECS] [--repeat N] [--size SIZE] [--quick]
                          [--servers strata,nbdkit,qemu-nbd] [--transports tcp,unix]
                          [--backends raw,strata,overlay10] [--markdown FILE]
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
ARGS = None
# Backends the other servers can serve too, compared side by side.
PEER_BACKENDS = ("raw", "memory")

# name, fio rw, block size, iodepth, jobs
WORKLOADS = [
    ("4k randread QD1", "randread", "4k", 1, 1),
    ("4k randwrite QD1", "randwrite", "4k", 1, 1),
    ("4k randread QD32", "randread", "4k", 32, 1),
    ("4k randwrite QD32", "randwrite", "4k", 32, 1),
    ("4k randread QD32 x2 jobs", "randread", "4k", 32, 2),
    ("4k randwrite QD32 x2 jobs", "randwrite", "4k", 32, 2),
    ("4k randread QD8 x4 conns", "randread", "4k", 8, 4),
    ("4k randwrite QD8 x4 conns", "randwrite", "4k", 8, 4),
    ("1M read QD8", "read", "1M", 8, 1),
    ("1M write QD8", "write", "1M", 8, 1),
]
QUICK = {"4k randread QD32", "4k randwrite QD32", "1M read QD8", "1M write QD8"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(transport, where, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if transport == "tcp":
                with socket.create_connection(("127.0.0.1", where), timeout=1):
                    return
            else:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(where)
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not come up on {where}")


def anon_rss_mib(pid):
    """Private resident memory (heap, stacks): mapped file pages are not counted."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 (1-based) of the whole line.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def server_command(name, image, transport, where):
    if image == "memory":
        return memory_command(name, transport, where)
    if name == "strata":
        binary = os.path.join(ROOT, "target", "release", "strata")
        listen = f"127.0.0.1:{where}" if transport == "tcp" else f"unix:{where}"
        return [binary, "serve", "--listen", listen, "--name", "disk", image]
    if name == "nbdkit":
        addr = ["-p", str(where), "-i", "127.0.0.1"] if transport == "tcp" else ["-U", where]
        return ["nbdkit", "-f", "--exportname", "disk", *addr, "file", image]
    if name == "qemu-nbd":
        addr = ["-p", str(where), "-b", "127.0.0.1"] if transport == "tcp" else ["-k", where]
        return ["qemu-nbd", "-f", "raw", "-x", "disk", "-t", "-e", "16", "--cache=writeback",
                "--aio=threads", *addr, image]
    raise ValueError(name)


def memory_command(name, transport, where):
    size = ARGS.size
    if name == "strata":
        listen = f"127.0.0.1:{where}" if transport == "tcp" else f"unix:{where}"
        return [strata_binary(), "serve", "--listen", listen, "--name", "disk", f"memory:{size}"]
    if name == "nbdkit":
        addr = ["-p", str(where), "-i", "127.0.0.1"] if transport == "tcp" else ["-U", where]
        return ["nbdkit", "-f", "--exportname", "disk", *addr, "memory", size]
    raise ValueError(f"{name} has no memory backend")


def uri(transport, where):
    if transport == "tcp":
        return f"nbd://127.0.0.1:{where}/disk"
    return f"nbd+unix:///disk?socket={where}"


def pinned(side):
    """The taskset prefix for the server (side 0) or fio (side 1) under --pin."""
    if not ARGS or not ARGS.pin:
        return []
    return ["taskset", "-c", ARGS.pin.split(":")[side]]


def run_fio(target, rw, bs, depth, jobs, runtime, size, workdir, extra=(), time_based=True):
    cmd = pinned(1) + ["fio", "--name=bench", "--ioengine=nbd", f"--uri={target}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={depth}", f"--numjobs={jobs}", f"--size={size}",
           "--group_reporting", "--output-format=json", "--percentile_list=50:99", *extra]
    if time_based:
        cmd += ["--time_based", f"--runtime={runtime}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=workdir).stdout
    data = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": side["iops"],
        "mbps": side["bw_bytes"] / 1e6,
        "ios": side["total_ios"],
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
    }


def measure(server, image, transport, workload, args, workdir, size=None, extra=()):
    """Runs one workload against a fresh server; `size` and `extra` narrow fio's region."""
    _, rw, bs, depth, jobs = workload
    # A fresh socket path per run: some servers leave theirs behind on exit.
    where = (free_port() if transport == "tcp"
             else tempfile.mktemp(prefix=f"{server}-", suffix=".sock", dir=workdir))
    proc = subprocess.Popen(pinned(0) + server_command(server, image, transport, where),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(transport, where)
        if image == "memory":
            # A memory disk starts empty; fill it so reads are of data, not of holes.
            run_fio(uri(transport, where), "write", "1M", 8, 1, 0, args.size, workdir,
                    time_based=False)
        cpu0 = cpu_seconds(proc.pid)
        r = run_fio(uri(transport, where), rw, bs, depth, jobs, args.runtime,
                    size or args.size, workdir, extra)
        cpu1 = cpu_seconds(proc.pid)
        r["cpu_us_per_io"] = (cpu1 - cpu0) * 1e6 / max(r["ios"], 1)
        r["anon_mib"] = anon_rss_mib(proc.pid)
        return r
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def strata_binary():
    return os.path.join(ROOT, "target", "release", "strata")


def write_through_server(image, offset_mib, length_mib, pattern, workdir):
    """Writes a pattern into a Strata image by serving it and using qemu-io."""
    sock = tempfile.mktemp(prefix="prep-", suffix=".sock", dir=workdir)
    proc = subprocess.Popen([strata_binary(), "serve", "--listen", f"unix:{sock}",
                             "--name", "disk", image],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready("unix", sock)
        subprocess.run(["qemu-io", "-f", "raw", uri("unix", sock), "-c",
                        f"write -P {pattern} {offset_mib}M {length_mib}M"],
                       check=True, stdout=subprocess.DEVNULL)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def prepare_backend(backend, raw, workdir, image_dir):
    """Returns the path of an image holding the raw image's data in `backend`'s form."""
    if backend in ("raw", "memory"):
        return raw if backend == "raw" else "memory"
    if backend == "strata":
        path = os.path.join(image_dir, f"strata-bench-{os.getpid()}.strata")
        subprocess.run([strata_binary(), "convert", raw, path], check=True,
                       stdout=subprocess.DEVNULL)
        return path
    if backend == "overlay10":
        below = raw
        for i in range(1, 11):
            path = os.path.join(image_dir, f"strata-bench-{os.getpid()}-layer{i}.strata")
            subprocess.run([strata_binary(), "create", path, "--backing", below], check=True,
                           stdout=subprocess.DEVNULL)
            write_through_server(path, 64 * i, 8, i, workdir)
            below = path
        return below
    raise ValueError(backend)


def cleanup_backend(backend, image_dir):
    if backend in ("raw", "memory"):
        return
    for name in os.listdir(image_dir):
        if name.startswith(f"strata-bench-{os.getpid()}") and name.endswith(".strata"):
            os.unlink(os.path.join(image_dir, name))


def median_of(runs):
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for tool, flag in [("fio", "--version"), ("nbdkit", "--version"), ("qemu-nbd", "--version")]:
        try:
            versions.append(subprocess.run([tool, flag], capture_output=True, text=True)
                            .stdout.splitlines()[0])
        except (OSError, IndexError):
            versions.append(f"{tool}: missing")
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Linux {platform.release()}; "
            + "; ".join(versions))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--image-dir", default="/dev/shm")
    ap.add_argument("--servers", default="strata,nbdkit,qemu-nbd")
    ap.add_argument("--transports", default="tcp,unix")
    ap.add_argument("--backends", default="raw",
                    help="raw, memory, strata (sparse image), overlay10 (10-deep overlay chain)")
    ap.add_argument("--quick", action="store_true", help="QD32 random and sequential only")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--only", help="run only workloads whose name contains this text")
    ap.add_argument("--pin", metavar="SERVER_CPUS:FIO_CPUS",
                    help="pin the server and fio with taskset, e.g. 0:1 (apart) or 0:0 "
                         "(together); by default the kernel places them")
    args = ap.parse_args()
    global ARGS
    ARGS = args

    for tool in ["fio", *args.servers.split(",")]:
        if tool != "strata" and shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)

    workdir = tempfile.mkdtemp(prefix="strata-bench-")
    image = os.path.join(args.image_dir, f"strata-bench-{os.getpid()}.img")
    subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=1M",
                    f"count={int(args.size.rstrip('G')) * 1024}", "status=none"], check=True)
    servers = args.servers.split(",")
    workloads = [w for w in WORKLOADS if not args.quick or w[0] in QUICK]
    if args.only:
        workloads = [w for w in workloads if args.only in w[0]]
    rows = []
    raw_results = {}
    try:
        for backend in args.backends.split(","):
            target = prepare_backend(backend, image, workdir, args.image_dir)
            if backend == "raw":
                here = servers
            elif backend == "memory":
                here = [s for s in servers if s != "qemu-nbd"]
            else:
                here = ["strata"]
            try:
                for transport in args.transports.split(","):
                    for wl in workloads:
                        results = {}
                        for server in here:
                            runs = [measure(server, target, transport, wl, args, workdir)
                                    for _ in range(args.repeat)]
                            results[server] = median_of(runs)
                        if backend == "raw" and "strata" in results:
                            raw_results[(transport, wl[0])] = results["strata"]
                        rows.append((backend, transport, wl[0], results,
                                     raw_results.get((transport, wl[0]))))
                        print_row(rows[-1], here)
            finally:
                cleanup_backend(backend, args.image_dir)
    finally:
        os.unlink(image)
        shutil.rmtree(workdir, ignore_errors=True)
    table = render(rows, servers, args)
    print()
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


def ratio(results, servers, key, higher_is_better=True):
    peers = [results[s][key] for s in servers if s != "strata" and s in results]
    if "strata" not in results or not peers:
        return "-"
    best = max(peers) if higher_is_better else min(peers)
    mine = results["strata"][key]
    if best == 0 or mine == 0:
        return "-"
    return f"{(mine / best if higher_is_better else best / mine):.2f}x"


def print_row(row, servers):
    backend, transport, name, results, _ = row
    parts = [f"{s}: {results[s]['iops']:.0f} IOPS {results[s]['mbps']:.0f} MB/s "
             f"cpu {results[s]['cpu_us_per_io']:.1f} us/io" for s in servers]
    print(f"[{backend} {transport}] {name}: " + " | ".join(parts), flush=True)


def render(rows, servers, args):
    out = [f"Machine: {machine()}", "",
           f"fio nbd engine, {args.runtime} s per run, median of {args.repeat} runs, "
           f"image of {args.size} in {args.image_dir}"
           + (f", server on CPU {args.pin.split(':')[0]} and fio on CPU "
              f"{args.pin.split(':')[1]}" if args.pin else "") + ".", ""]
    head = ["backend", "transport", "workload"]
    for s in servers:
        head += [f"{s} IOPS", f"{s} MB/s", f"{s} p50/p99 us", f"{s} CPU us/io",
                 f"{s} anon MiB"]
    head += ["Strata/best IOPS", "best/Strata CPU", "best/Strata p50"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for backend, transport, name, results, _ in rows:
        if backend not in PEER_BACKENDS:
            continue
        cells = [backend, transport, name]
        for s in servers:
            r = results.get(s)
            if r is None:
                cells += ["-"] * 5
                continue
            cells += [f"{r['iops']:.0f}", f"{r['mbps']:.0f}",
                      f"{r['p50_us']:.0f}/{r['p99_us']:.0f}", f"{r['cpu_us_per_io']:.1f}",
                      f"{r['anon_mib']:.1f}"]
        cells += [ratio(results, servers, "iops"),
                  ratio(results, servers, "cpu_us_per_io", higher_is_better=False),
                  ratio(results, servers, "p50_us", higher_is_better=False)]
        out.append("| " + " | ".join(cells) + " |")
    others = [r for r in rows if r[0] not in PEER_BACKENDS]
    if others:
        out += ["", "Strata serving the same data from its own image formats, against Strata "
                "on the raw file in the same run:", "",
                "| backend | transport | workload | IOPS | MB/s | p50/p99 us | CPU us/io "
                "| vs raw IOPS |", "|---|---|---|---|---|---|---|---|"]
        for backend, transport, name, results, raw in others:
            r = results["strata"]
            vs = f"{r['iops'] / raw['iops']:.2f}x" if raw and raw["iops"] else "-"
            out.append(f"| {backend} | {transport} | {name} | {r['iops']:.0f} | "
                       f"{r['mbps']:.0f} | {r['p50_us']:.0f}/{r['p99_us']:.0f} | "
                       f"{r['cpu_us_per_io']:.1f} | {vs} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
