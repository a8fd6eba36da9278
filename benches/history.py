#!/usr/bin/env python3
"""Volumes with history measured against plain Strata images, with fio's nbd engine.

Three parts, each run against a release build serving over a Unix socket, with the
volumes in /dev/shm by default (--dir to choose), so that Strata, not a disk, is
measured:

  throughput  on a volume with history and on a Strata image of the same size, in the
              same run: 4K random writes at QD32 (a first pass over the whole disk, then
              overwrites for --runtime seconds), 4K random reads at QD32 of what was
              written, and 4K random writes at QD32 with a FLUSH every 32 writes (fio's
              --fsync=32), whose sync latency percentiles are the flush latency. Medians
              of --repeat runs, and their ratios history/plain.
  space       a sustained random-write load with a flush every --fsync-every writes,
              rate-limited, on a volume with a short window (--window) for --duration,
              sampled every --sample-every seconds: bytes allocated to the volume's
              directory (st_blocks), live bytes (log bytes holding current versions), and
              bytes written in the last window. Writes OUT_DIR/history-space.svg and
              OUT_DIR/history-space.csv.
  scale       a --scale-size volume with --scale-points restore points (4K writes at
              random, each followed by a flush, fio --fsync=1); then the time to open it
              after a crash (kill -9) and after a clean stop (the server's start until a
              read is answered, and `strata history --json`), `strata ctl serve-at` of
              --serve-at random points (from the request until the new export answers a
              read), and one `strata ctl rollback --at`.

Prints a table per part, then a markdown section for docs/benchmarks.md.

Usage: benches/history.py [--only throughput,space,scale] [--size 1G] [--runtime 5]
                          [--repeat 3] [--duration 10m] [--window 1m] [--dir /dev/shm]
"""

import argparse
import csv
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree from importing compare
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
import scaling  # noqa: E402  (SVG helpers)

ROOT = compare.ROOT
MIB = 1 << 20
PARTS = ["throughput", "space", "scale"]


# --- sizes and durations ----------------------------------------------------------------

def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parse_seconds(text):
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def mib(n):
    return n / MIB


# --- Strata -----------------------------------------------------------------------------

def strata(*args, check=True):
    return subprocess.run([compare.strata_binary(), *args], capture_output=True, text=True,
                          check=check)


def create_target(kind, path, size, window="1h"):
    """A volume with history (`history`) or a Strata image (`plain`) of `size` bytes."""
    extra = ["--history", window] if kind == "history" else []
    strata("create", path, "--size", str(size), *extra)


def remove_target(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


class Server:
    """`strata serve` of one target as export `disk` on a Unix socket, with a control
    socket and a metrics socket."""

    def __init__(self, target, workdir, name="disk"):
        self.sock = tempfile.mktemp(prefix="nbd-", suffix=".sock", dir=workdir)
        self.control = tempfile.mktemp(prefix="ctl-", suffix=".sock", dir=workdir)
        self.metrics = tempfile.mktemp(prefix="metrics-", suffix=".sock", dir=workdir)
        self.name = name
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [compare.strata_binary(), "serve", "--listen", f"unix:{self.sock}", "--name", name,
             "--control", self.control, "--metrics", f"unix:{self.metrics}", target],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_serving(self, timeout=600.0):
        """Seconds from the start until a read of the export is answered."""
        deadline = time.time() + timeout
        while True:
            try:
                with NbdClient(self.sock, self.name) as c:
                    c.read(0, 4096)
                return time.perf_counter() - self.started
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the server did not serve {self.sock}")
                time.sleep(0.005)

    def uri(self, export=None):
        return f"nbd+unix:///{export or self.name}?socket={self.sock}"

    def ctl(self, *args):
        return strata("ctl", "--socket", self.control, *args)

    def scrape(self):
        """The metrics as {name: value} for the samples of the export (or unlabelled)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(self.metrics)
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: strata\r\n\r\n")
            data = b""
            while chunk := s.recv(1 << 16):
                data += chunk
        body = data.split(b"\r\n\r\n", 1)[1].decode()
        out = {}
        for line in body.splitlines():
            if line.startswith("#") or not line:
                continue
            name, value = line.rsplit(" ", 1)
            if "{" in name:
                base, labels = name.split("{", 1)
                if labels != f'export="{self.name}"}}':
                    continue
                name = base
            out[name] = float(value)
        return out

    def stop(self, sig=signal.SIGTERM):
        """Stops the server; returns the seconds it took to exit."""
        t0 = time.perf_counter()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.perf_counter() - t0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()


class NbdClient:
    """The least of an NBD client: fixed newstyle handshake, NBD_OPT_GO, simple replies."""

    def __init__(self, path, export, timeout=60):
        self.s = socket.socket(socket.AF_UNIX)
        try:
            self.s.settimeout(timeout)
            self.s.connect(path)
            magic, opt, _flags = struct.unpack(">8s8sH", self._recv(18))
            if (magic, opt) != (b"NBDMAGIC", b"IHAVEOPT"):
                raise OSError("not a newstyle NBD server")
            self.s.sendall(struct.pack(">I", 1))  # NBD_FLAG_C_FIXED_NEWSTYLE
            name = export.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            self.s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)  # GO
            while True:
                _, _, reply, length = struct.unpack(">QIII", self._recv(20))
                payload = self._recv(length)
                if reply == 1:  # NBD_REP_ACK
                    break
                if reply & 0x8000_0000:
                    raise OSError(f"NBD_OPT_GO refused ({reply:#x}): {payload!r}")
        except BaseException:
            self.s.close()
            raise

    def _recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise OSError("the server closed the connection")
            buf += chunk
        return bytes(buf)

    def read(self, offset, length):
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, offset, length))
        magic, error, _ = struct.unpack(">IIQ", self._recv(16))
        if magic != 0x67446698 or error:
            raise OSError(f"read failed: magic {magic:#x}, error {error}")
        return self._recv(length)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 2, 0, 0))
        except OSError:
            pass
        self.s.close()


# --- fio --------------------------------------------------------------------------------

def fio(uri, rw, workdir, size, depth=32, runtime=None, extra=()):
    """Runs fio's nbd engine with 4K blocks; returns its job's JSON."""
    cmd = ["fio", "--name=history", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
           "--bs=4k", f"--iodepth={depth}", f"--size={size}", "--output-format=json",
           "--percentile_list=50:99", *extra]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=workdir).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


def percentile_us(lat, p):
    return lat.get("percentile", {}).get(f"{p:.6f}", 0) / 1000


# --- throughput -------------------------------------------------------------------------

THROUGHPUT_ROWS = [
    ("4k randwrite QD32, first pass", "fill_iops", "IOPS"),
    ("4k randwrite QD32", "write_iops", "IOPS"),
    ("4k randread QD32 (after random writes)", "read_iops", "IOPS"),
    ("4k randwrite QD32, flush every 32: writes", "fsync_write_iops", "IOPS"),
    ("FLUSH latency p50 (fsync=32)", "flush_p50_us", "us"),
    ("FLUSH latency p99 (fsync=32)", "flush_p99_us", "us"),
    ("server CPU per 4K write", "write_cpu_us", "us"),
    ("server CPU per 4K read", "read_cpu_us", "us"),
]


def throughput_once(kind, args, workdir):
    path = os.path.join(args.dir, f"strata-history-bench-{os.getpid()}-{kind}")
    create_target(kind, path, args.size_bytes)
    r = {}
    try:
        with Server(path, workdir) as srv:
            srv.wait_serving()
            uri = srv.uri()
            job = fio(uri, "randwrite", workdir, args.size_bytes)
            r["fill_iops"] = job["write"]["iops"]
            cpu0 = compare.cpu_seconds(srv.proc.pid)
            job = fio(uri, "randwrite", workdir, args.size_bytes, runtime=args.runtime)
            r["write_iops"] = job["write"]["iops"]
            r["write_cpu_us"] = ((compare.cpu_seconds(srv.proc.pid) - cpu0) * 1e6
                                 / max(job["write"]["total_ios"], 1))
            cpu0 = compare.cpu_seconds(srv.proc.pid)
            job = fio(uri, "randread", workdir, args.size_bytes, runtime=args.runtime)
            r["read_iops"] = job["read"]["iops"]
            r["read_cpu_us"] = ((compare.cpu_seconds(srv.proc.pid) - cpu0) * 1e6
                                / max(job["read"]["total_ios"], 1))
            job = fio(uri, "randwrite", workdir, args.size_bytes, runtime=args.runtime,
                      extra=["--fsync=32"])
            r["fsync_write_iops"] = job["write"]["iops"]
            r["flush_p50_us"] = percentile_us(job["sync"]["lat_ns"], 50)
            r["flush_p99_us"] = percentile_us(job["sync"]["lat_ns"], 99)
            r["flushes"] = job["sync"]["total_ios"]
    finally:
        remove_target(path)
    print(f"[throughput] {kind}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()),
          flush=True)
    return r


def bench_throughput(args, workdir):
    runs = {"history": [], "plain": []}
    for i in range(args.repeat):
        # Alternate which goes first, so that a drift of the machine favours neither.
        for kind in (("history", "plain") if i % 2 == 0 else ("plain", "history")):
            runs[kind].append(throughput_once(kind, args, workdir))
    return {k: compare.median_of(v) for k, v in runs.items()}


def throughput_table(res):
    lines = ["| workload | with history | plain image | history/plain |",
             "|---|---:|---:|---:|"]
    for label, key, unit in THROUGHPUT_ROWS:
        h, p = res["history"][key], res["plain"][key]
        fmt = (lambda v: f"{v:.0f}") if unit == "IOPS" else (lambda v: f"{v:.1f} us")
        ratio = f"{h / p:.2f}x" if p else "-"
        lines.append(f"| {label} | {fmt(h)} | {fmt(p)} | {ratio} |")
    return "\n".join(lines)


# --- space over time --------------------------------------------------------------------

def allocated_bytes(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass  # a segment removed while walking
    return total


def log_bytes(path):
    total = 0
    for name in os.listdir(path):
        if name.startswith("seg-"):
            try:
                total += os.stat(os.path.join(path, name)).st_size
            except FileNotFoundError:
                pass
    return total


def bench_space(args, workdir):
    path = os.path.join(args.dir, f"strata-history-space-{os.getpid()}")
    window = parse_seconds(args.window)
    duration = parse_seconds(args.duration)
    create_target("history", path, args.space_size_bytes, window=args.window)
    samples = []
    try:
        with Server(path, workdir) as srv:
            srv.wait_serving()
            load = subprocess.Popen(
                ["fio", "--name=space", "--ioengine=nbd", f"--uri={srv.uri()}",
                 "--rw=randwrite", "--norandommap", "--bs=4k", "--iodepth=8",
                 f"--size={args.space_size_bytes}",
                 f"--fsync={args.fsync_every}", f"--rate_iops={args.space_iops}",
                 "--time_based", f"--runtime={duration}", "--output-format=json"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir)
            t0 = time.time()
            try:
                while load.poll() is None:
                    m = srv.scrape()
                    logged = log_bytes(path)
                    history = m.get("strata_export_history_bytes", 0)
                    samples.append({
                        "t_s": time.time() - t0,
                        "disk_bytes": allocated_bytes(path),
                        "live_bytes": max(logged - history, 0),
                        "history_bytes": history,
                        "written_total": m.get("strata_export_written_bytes_total", 0),
                        "points": m.get("strata_export_history_points", 0),
                    })
                    s = samples[-1]
                    print(f"[space] {s['t_s']:6.1f} s: disk {mib(s['disk_bytes']):8.1f} MiB, "
                          f"live {mib(s['live_bytes']):8.1f} MiB, history "
                          f"{mib(s['history_bytes']):8.1f} MiB, {s['points']:.0f} points",
                          flush=True)
                    time.sleep(args.sample_every)
            finally:
                if load.poll() is None:
                    load.terminate()
                load.wait()
    finally:
        remove_target(path)
    for i, s in enumerate(samples):
        # Bytes written in the window ending now: against the last sample at or before
        # its start (the first sample before a whole window has passed).
        start = s["t_s"] - window
        before = [p for p in samples[:i + 1] if p["t_s"] <= start] or samples[:1]
        s["written_window_bytes"] = s["written_total"] - before[-1]["written_total"]
        s["ratio"] = ((s["disk_bytes"] - s["live_bytes"]) / s["written_window_bytes"]
                      if s["written_window_bytes"] else 0.0)
    after = [s["ratio"] for s in samples if s["t_s"] >= window]
    return {"samples": samples, "window": window, "duration": duration,
            "end_ratio": samples[-1]["ratio"] if samples else 0.0,
            "max_ratio": max(after) if after else 0.0}


SPACE_COLUMNS = ["t_s", "disk_bytes", "live_bytes", "history_bytes", "written_window_bytes",
                 "points", "ratio"]
SPACE_SERIES = [("disk_bytes", "allocated to the volume", "#1f6fb4"),
                ("live_bytes", "live data", "#2ca02c"),
                ("written_window_bytes", "written in the last window", "#d9531e")]


def space_svg(res, subtitle):
    samples = res["samples"]
    width, height = 960, 420
    x0, y0, w, h = 90, 70, 640, 280
    tmax = max(s["t_s"] for s in samples) or 1
    xticks = scaling.nice_ticks(tmax, 8)
    yticks = scaling.nice_ticks(max(mib(s[k]) for s in samples for k, _, _ in SPACE_SERIES)
                                * 1.05)

    def px(t):
        return x0 + t / xticks[-1] * w

    def py(v):
        return y0 + h - v / yticks[-1] * h

    font = scaling.FONT
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-family="sans-serif" '
             f'font-size="15" font-weight="bold">Space of a volume with history under a '
             f'sustained random-write load</text>',
             f'<text x="{width / 2}" y="40" text-anchor="middle" {font} fill="#555">'
             f'{scaling.esc(subtitle)}</text>']
    for t in yticks:
        parts.append(f'<line x1="{x0}" y1="{py(t):.1f}" x2="{x0 + w}" y2="{py(t):.1f}" '
                     f'stroke="#e4e4e4"/>')
        parts.append(f'<text x="{x0 - 6}" y="{py(t) + 4:.1f}" text-anchor="end" {font}>'
                     f'{scaling.tick_text(t)}</text>')
    for t in xticks:
        parts.append(f'<line x1="{px(t):.1f}" y1="{y0 + h}" x2="{px(t):.1f}" '
                     f'y2="{y0 + h + 5}" stroke="#333"/>')
        parts.append(f'<text x="{px(t):.1f}" y="{y0 + h + 18}" text-anchor="middle" {font}>'
                     f'{t:g}</text>')
    if res["window"] <= xticks[-1]:
        X = px(res["window"])
        parts.append(f'<line x1="{X:.1f}" y1="{y0}" x2="{X:.1f}" y2="{y0 + h}" '
                     f'stroke="#999" stroke-dasharray="4 4"/>')
        parts.append(f'<text x="{X + 4:.1f}" y="{y0 + 12}" {font} fill="#555">'
                     f'one window</text>')
    parts.append(f'<polyline points="{x0},{y0} {x0},{y0 + h} {x0 + w},{y0 + h}" fill="none" '
                 f'stroke="#333"/>')
    parts.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 38}" text-anchor="middle" {font}>'
                 f'seconds since the load started</text>')
    cy = y0 + h / 2
    parts.append(f'<text x="{x0 - 60}" y="{cy}" text-anchor="middle" {font} '
                 f'transform="rotate(-90 {x0 - 60} {cy})">MiB</text>')
    for i, (key, label, colour) in enumerate(SPACE_SERIES):
        coords = " ".join(f"{px(s['t_s']):.1f},{py(mib(s[key])):.1f}" for s in samples)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                     f'stroke-width="2"/>')
        ly = y0 + 10 + 22 * i
        lx = x0 + w + 20
        parts.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" stroke="{colour}" '
                     f'stroke-width="2"/>')
        parts.append(f'<text x="{lx + 30}" y="{ly + 4}" {font}>{scaling.esc(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_space_outputs(res, args):
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "history-space.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(SPACE_COLUMNS)
        for s in res["samples"]:
            out.writerow([f"{s['t_s']:.1f}"] + [f"{s[c]:.0f}" for c in SPACE_COLUMNS[1:-1]]
                         + [f"{s['ratio']:.3f}"])
    subtitle = (f"{args.space_size} disk, window {args.window}, {args.space_iops} random 4K "
                f"writes/s with a flush every {args.fsync_every}, {args.dir}; "
                f"{time.strftime('%Y-%m-%d')}")
    with open(os.path.join(args.out_dir, "history-space.svg"), "w") as f:
        f.write(space_svg(res, subtitle))


# --- scale ------------------------------------------------------------------------------

def quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def bench_scale(args, workdir):
    path = os.path.join(args.dir, f"strata-history-scale-{os.getpid()}")
    create_target("history", path, args.scale_size_bytes, window="30d")
    res = {}
    rng = random.Random(1)
    try:
        srv = Server(path, workdir)
        srv.wait_serving()
        secs, _ = timed(lambda: fio(
            srv.uri(), "randwrite", workdir, args.scale_size_bytes, depth=1,
            extra=["--fsync=1", f"--io_size={args.scale_points * 4096}", "--norandommap"]))
        res["write_s"] = secs
        points = json.loads(srv.ctl("--json", "history", "disk").stdout)["points"]
        res["points"] = len(points)
        res["log_mib"] = mib(log_bytes(path))
        print(f"[scale] {res['points']} points in {secs:.1f} s, log {res['log_mib']:.0f} MiB",
              flush=True)

        srv.stop(signal.SIGKILL)
        srv = Server(path, workdir)
        res["open_after_crash_s"] = srv.wait_serving()
        print(f"[scale] serving after kill -9 in {res['open_after_crash_s']:.3f} s", flush=True)

        times, ctl_times = [], []
        seqs = [p["seq"] for p in rng.sample(points, min(args.serve_at, len(points)))]
        for i, seq in enumerate(seqs):
            name = f"at{i}"
            t0 = time.perf_counter()
            srv.ctl("serve-at", "disk", str(seq), "--as", name)
            t1 = time.perf_counter()
            with NbdClient(srv.sock, name) as c:
                c.read(rng.randrange(args.scale_size_bytes // 4096) * 4096, 4096)
            times.append(time.perf_counter() - t0)
            ctl_times.append(t1 - t0)
            srv.ctl("remove", name)
        res["serve_at_p50_ms"] = quantile(times, 0.5) * 1e3
        res["serve_at_p99_ms"] = quantile(times, 0.99) * 1e3
        res["serve_at_ctl_p50_ms"] = quantile(ctl_times, 0.5) * 1e3
        # The CLI's own cost: a request that does nothing to the volume.
        noop = [timed(lambda: srv.ctl("server"))[0] for _ in range(10)]
        res["ctl_noop_ms"] = statistics.median(noop) * 1e3
        print(f"[scale] serve-at p50/p99 {res['serve_at_p50_ms']:.1f}/"
              f"{res['serve_at_p99_ms']:.1f} ms", flush=True)

        middle = points[len(points) // 2]["seq"]
        res["rollback_s"], _ = timed(
            lambda: srv.ctl("rollback", "disk", "--at", str(middle), "--force"))
        print(f"[scale] rollback in {res['rollback_s']:.3f} s", flush=True)

        res["stop_s"] = srv.stop()
        res["history_cli_s"], out = timed(lambda: strata("history", path, "--json"))
        res["history_cli_points"] = len(json.loads(out.stdout)["points"])
        srv = Server(path, workdir)
        res["open_clean_s"] = srv.wait_serving()
        srv.stop()
        print(f"[scale] clean stop {res['stop_s']:.3f} s, `strata history --json` "
              f"{res['history_cli_s']:.3f} s, serving after a clean stop in "
              f"{res['open_clean_s']:.3f} s", flush=True)
    finally:
        if "srv" in locals() and srv.proc.poll() is None:
            srv.stop()
        remove_target(path)
    return res


def scale_table(res, args):
    rows = [
        ("restore points made", f"{res['points']}"),
        ("time to make them (4K write + flush each, QD1)",
         f"{res['write_s']:.1f} s ({res['points'] / res['write_s']:.0f} points/s)"),
        ("log on disk", f"{res['log_mib']:.0f} MiB"),
        ("open after kill -9: server start until a read is answered",
         f"{res['open_after_crash_s'] * 1e3:.0f} ms"),
        (f"`strata ctl serve-at` of {args.serve_at} random points, until the export "
         "answers a read: p50 / p99",
         f"{res['serve_at_p50_ms']:.1f} / {res['serve_at_p99_ms']:.1f} ms"),
        ("of which the `strata ctl` command, p50 (a no-op `ctl server`: "
         f"{res['ctl_noop_ms']:.1f} ms)", f"{res['serve_at_ctl_p50_ms']:.1f} ms"),
        ("`strata ctl rollback --at` (middle point)", f"{res['rollback_s'] * 1e3:.0f} ms"),
        ("clean stop (checkpoint at close)", f"{res['stop_s'] * 1e3:.0f} ms"),
        ("`strata history --json` after it", f"{res['history_cli_s'] * 1e3:.0f} ms "
         f"({res['history_cli_points']} points listed)"),
        ("open after a clean stop: server start until a read is answered",
         f"{res['open_clean_s'] * 1e3:.0f} ms"),
    ]
    return "\n".join(["| measurement | result |", "|---|---|"]
                     + [f"| {a} | {b} |" for a, b in rows])


# --- main -------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(PARTS), help="throughput,space,scale")
    ap.add_argument("--dir", default="/dev/shm", help="where the volumes live")
    ap.add_argument("--size", default="1G", help="disk size for the throughput part")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per timed fio run")
    ap.add_argument("--repeat", type=int, default=3, help="throughput runs, median kept")
    ap.add_argument("--duration", default="10m", help="length of the space load")
    ap.add_argument("--window", default="1m", help="the space volume's --history")
    ap.add_argument("--space-size", default="1G", help="disk size for the space part")
    ap.add_argument("--space-iops", type=int, default=2000, help="rate of the space load")
    ap.add_argument("--fsync-every", type=int, default=64, help="writes per flush (space)")
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds (space)")
    ap.add_argument("--scale-size", default="10G", help="disk size for the scale part")
    ap.add_argument("--scale-points", type=int, default=100_000, help="points to make")
    ap.add_argument("--serve-at", type=int, default=100, help="points to serve (scale)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "docs"),
                    help="where history-space.svg and .csv go")
    args = ap.parse_args()
    parts = args.only.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f"unknown part: {', '.join(sorted(unknown))}")
    args.size_bytes = parse_size(args.size)
    args.space_size_bytes = parse_size(args.space_size)
    args.scale_size_bytes = parse_size(args.scale_size)
    if shutil.which("fio") is None:
        sys.exit("missing tool: fio")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)

    workdir = tempfile.mkdtemp(prefix="strata-history-")
    started = time.time()
    md = ["## Volumes with history", "", f"Machine: {compare.machine()}", ""]
    try:
        if "throughput" in parts:
            res = bench_throughput(args, workdir)
            table = throughput_table(res)
            print("\n" + table + "\n", flush=True)
            md += [f"`benches/history.py --only throughput --size {args.size} --runtime "
                   f"{args.runtime} --repeat {args.repeat}`: a volume with history against "
                   f"a Strata image of the same size, Unix socket, fio's nbd engine, medians "
                   f"of {args.repeat} runs, volumes in {args.dir}.", "", table, ""]
        if "space" in parts:
            res = bench_space(args, workdir)
            write_space_outputs(res, args)
            line = (f"(disk bytes - live bytes) / bytes written in the last window: "
                    f"{res['end_ratio']:.2f} at the end, at most {res['max_ratio']:.2f} after "
                    f"the first window")
            print("\n" + line + "\n", flush=True)
            md += [f"`benches/history.py --only space --duration {args.duration} --window "
                   f"{args.window} --space-size {args.space_size} --space-iops "
                   f"{args.space_iops} --fsync-every {args.fsync_every}`: {line}.", "",
                   "![Space of a volume with history over time](history-space.svg)", ""]
        if "scale" in parts:
            res = bench_scale(args, workdir)
            table = scale_table(res, args)
            print("\n" + table + "\n", flush=True)
            md += [f"`benches/history.py --only scale --scale-size {args.scale_size} "
                   f"--scale-points {args.scale_points} --serve-at {args.serve_at}`, volume "
                   f"in {args.dir}:", "", table, ""]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"done in {time.time() - started:.0f} s\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
