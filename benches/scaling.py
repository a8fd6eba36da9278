#!/usr/bin/env python3
"""Scaling curves of Strata, measured with fio's nbd engine and drawn as SVG charts.

Four curves, each point being the median of --repeat runs of 4K random reads over a Unix
socket, with the images in /dev/shm (so the server, not a disk, is measured):

  qd     throughput against queue depth 1..128, Strata and nbdkit on the same raw image;
  conns  throughput against the number of connections 1..16 (fio jobs, one connection
         each, QD8 per connection), Strata and nbdkit on the same raw image;
  depth  throughput against the depth of a chain of Strata overlays 1..100 over a raw
         base, each overlay holding a few MiB of its own, QD32 on the top;
  size   throughput against the virtual size of a sparse Strata image, 1 GiB..16 TiB,
         with a 1 GiB region written and read back at QD32; the cost should stay flat.

Every point also carries the server's CPU time per request (user+system time of the
server process over the run, from /proc, divided by the requests served). Each curve is
drawn as OUT_DIR/scaling-NAME.svg (throughput on the left, CPU per request on the right)
and its table is appended to OUT_DIR/scaling-results.md.

Usage: benches/scaling.py [--runtime SECS] [--repeat N] [--quick]
                          [--only qd,conns,depth,size] [--out-dir docs]
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree from importing compare
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

ROOT = compare.ROOT
GIB = 1 << 30

POINTS = {
    "qd": [1, 2, 4, 8, 16, 32, 64, 128],
    "conns": [1, 2, 4, 8, 16],
    "depth": [1, 2, 5, 10, 20, 50, 100],
    "size": [GIB << k for k in (0, 2, 4, 6, 8, 10, 12, 14)],  # 1G .. 16T
}
QUICK_POINTS = {
    "qd": [1, 8, 32, 128],
    "conns": [1, 4, 16],
    "depth": [1, 10, 100],
    "size": [GIB, GIB << 8, GIB << 14],
}
TITLES = {
    "qd": ("4K random read against queue depth (Unix socket, raw image in /dev/shm)",
           "queue depth"),
    "conns": ("4K random read against connections (QD8 each, Unix socket, raw image)",
              "connections (fio jobs)"),
    "depth": ("4K random read QD32 against overlay chain depth (Strata images)",
              "overlays over the raw base"),
    "size": ("4K random read QD32 of a 1 GiB region against virtual size (sparse image)",
             "virtual size"),
}
CURVES = ["qd", "conns", "depth", "size"]
BASE_SIZE = "1G"       # raw image of random data for qd, conns and depth
LAYER_MIB = 4          # data each overlay holds of its own


def human_size(n):
    for unit, shift in (("T", 40), ("G", 30), ("M", 20)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def point_label(curve, x):
    return human_size(x) if curve == "size" else str(x)


def median_run(server, image, workload, args, workdir, size=None, extra=()):
    runs = [compare.measure(server, image, "unix", workload, args, workdir, size, extra)
            for _ in range(args.repeat)]
    return compare.median_of(runs)


def report(curve, series, x, r):
    print(f"[{curve}] {series} {point_label(curve, x)}: {r['iops']:.0f} IOPS "
          f"{r['mbps']:.0f} MB/s p50/p99 {r['p50_us']:.0f}/{r['p99_us']:.0f} us "
          f"cpu {r['cpu_us_per_io']:.1f} us/io", flush=True)


def curve_qd(points, args, raw, workdir):
    out = {"strata": [], "nbdkit": []}
    for qd in points:
        for server in out:
            r = median_run(server, raw, ("", "randread", "4k", qd, 1), args, workdir)
            out[server].append((qd, r))
            report("qd", server, qd, r)
    return out


def curve_conns(points, args, raw, workdir):
    out = {"strata": [], "nbdkit": []}
    for jobs in points:
        for server in out:
            r = median_run(server, raw, ("", "randread", "4k", 8, jobs), args, workdir)
            out[server].append((jobs, r))
            report("conns", server, jobs, r)
    return out


def curve_depth(points, args, raw, workdir):
    """Builds the chain one overlay at a time, measuring the top at each listed depth."""
    out = {"strata": []}
    below = raw
    base_mib = os.path.getsize(raw) >> 20
    try:
        for depth in range(1, max(points) + 1):
            path = os.path.join(args.image_dir, f"strata-scale-{os.getpid()}-layer{depth}.strata")
            subprocess.run([compare.strata_binary(), "create", path, "--backing", below],
                           check=True, stdout=subprocess.DEVNULL)
            # Spread the layers' data over the image so reads land on every layer.
            offset = (depth * 37 * LAYER_MIB) % (base_mib - LAYER_MIB)
            compare.write_through_server(path, offset, LAYER_MIB, depth % 255 + 1, workdir)
            below = path
            if depth in points:
                r = median_run("strata", path, ("", "randread", "4k", 32, 1), args, workdir)
                out["strata"].append((depth, r))
                report("depth", "strata", depth, r)
    finally:
        for depth in range(1, max(points) + 1):
            path = os.path.join(args.image_dir, f"strata-scale-{os.getpid()}-layer{depth}.strata")
            if os.path.exists(path):
                os.unlink(path)
    return out


def curve_size(points, args, raw, workdir):
    """A sparse image per size, 1 GiB written in its middle, fio confined to that GiB."""
    out = {"strata": []}
    for size in points:
        path = os.path.join(args.image_dir, f"strata-scale-{os.getpid()}-size.strata")
        offset = (size // 2) // GIB * GIB
        try:
            subprocess.run([compare.strata_binary(), "create", path, "--size", str(size)],
                           check=True, stdout=subprocess.DEVNULL)
            compare.write_through_server(path, offset >> 20, 1024, 0x5a, workdir)
            r = median_run("strata", path, ("", "randread", "4k", 32, 1), args, workdir,
                           size="1G", extra=[f"--offset={offset}"])
        finally:
            if os.path.exists(path):
                os.unlink(path)
        out["strata"].append((size, r))
        report("size", "strata", size, r)
    return out


# --- SVG ------------------------------------------------------------------------------

COLOURS = {"strata": "#1f6fb4", "nbdkit": "#d9531e"}
FONT = 'font-family="sans-serif" font-size="12"'


def esc(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def nice_ticks(top, count=5):
    """Round tick values from 0 to at least `top`."""
    if top <= 0:
        top = 1
    raw = top / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    n = math.ceil(top / step - 1e-9)
    return [i * step for i in range(n + 1)]


def tick_text(v):
    if v >= 1000 and v % 1000 == 0:
        return f"{v / 1000:g}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:g}"


def panel(curve, data, key, ylabel, x0, y0, w, h):
    """One line chart at (x0, y0) of w x h pixels: axes, ticks, labels, a line per series."""
    xs = sorted({x for pts in data.values() for x, _ in pts})
    lo, hi = math.log(xs[0]), math.log(xs[-1])
    span = hi - lo or 1

    def px(x):
        return x0 + (math.log(x) - lo) / span * w if len(xs) > 1 else x0 + w / 2

    ticks = nice_ticks(max(r[key] for pts in data.values() for _, r in pts) * 1.05)
    top = ticks[-1]

    def py(v):
        return y0 + h - v / top * h

    out = []
    for t in ticks:
        y = py(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" '
                   f'stroke="#e4e4e4"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" {FONT}>'
                   f'{tick_text(t)}</text>')
    for x in xs:
        X = px(x)
        out.append(f'<line x1="{X:.1f}" y1="{y0 + h}" x2="{X:.1f}" y2="{y0 + h + 5}" '
                   f'stroke="#333"/>')
        out.append(f'<text x="{X:.1f}" y="{y0 + h + 18}" text-anchor="middle" {FONT}>'
                   f'{esc(point_label(curve, x))}</text>')
    out.append(f'<polyline points="{x0},{y0} {x0},{y0 + h} {x0 + w},{y0 + h}" fill="none" '
               f'stroke="#333"/>')
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 38}" text-anchor="middle" {FONT}>'
               f'{esc(TITLES[curve][1])} (log scale)</text>')
    cy = y0 + h / 2
    out.append(f'<text x="{x0 - 52}" y="{cy}" text-anchor="middle" {FONT} '
               f'transform="rotate(-90 {x0 - 52} {cy})">{esc(ylabel)}</text>')
    for series, pts in data.items():
        colour = COLOURS.get(series, "#333")
        coords = " ".join(f"{px(x):.1f},{py(r[key]):.1f}" for x, r in pts)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                   f'stroke-width="2"/>')
        for x, r in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(r[key]):.1f}" r="3" '
                       f'fill="{colour}"><title>{esc(series)} {esc(point_label(curve, x))}: '
                       f'{r[key]:.1f}</title></circle>')
    return out


def svg(curve, data, subtitle):
    width, height = 960, 400
    w, h = 360, 250
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-family="sans-serif" '
             f'font-size="15" font-weight="bold">{esc(TITLES[curve][0])}</text>',
             f'<text x="{width / 2}" y="40" text-anchor="middle" {FONT} fill="#555">'
             f'{esc(subtitle)}</text>']
    parts += panel(curve, data, "iops", "IOPS", 80, 76, w, h)
    parts += panel(curve, data, "cpu_us_per_io", "server CPU us per request", 540, 76, w, h)
    # Legend: one row above the right-hand panel, clear of the plotting area.
    y = 58
    for i, series in enumerate(data):
        lx = 540 + w - 100 * (len(data) - i)
        colour = COLOURS.get(series, "#333")
        parts.append(f'<line x1="{lx}" y1="{y}" x2="{lx + 24}" y2="{y}" stroke="{colour}" '
                     f'stroke-width="2"/>')
        parts.append(f'<text x="{lx + 30}" y="{y + 4}" {FONT}>{esc(series)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# --- Markdown -------------------------------------------------------------------------

def table(curve, data, args):
    series = list(data)
    head = [TITLES[curve][1]]
    for s in series:
        head += [f"{s} IOPS", f"{s} MB/s", f"{s} p50/p99 us", f"{s} CPU us/io"]
    lines = [f"### {TITLES[curve][0]}", "",
             f"`benches/scaling.py --only {curve} --runtime {args.runtime} --repeat "
             f"{args.repeat}{' --quick' if args.quick else ''}`, "
             f"{time.strftime('%Y-%m-%d')}; plot: `scaling-{curve}.svg`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_x = {}
    for s in series:
        for x, r in data[s]:
            by_x.setdefault(x, {})[s] = r
    for x in sorted(by_x):
        cells = [point_label(curve, x)]
        for s in series:
            r = by_x[x].get(s)
            cells += ([f"{r['iops']:.0f}", f"{r['mbps']:.0f}",
                       f"{r['p50_us']:.0f}/{r['p99_us']:.0f}", f"{r['cpu_us_per_io']:.1f}"]
                      if r else ["-"] * 4)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per point, median kept")
    ap.add_argument("--quick", action="store_true", help="fewer points, 1 s runs, 1 repeat")
    ap.add_argument("--only", default=",".join(CURVES), help="curves: qd,conns,depth,size")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--image-dir", default="/dev/shm")
    args = ap.parse_args()
    if args.quick:
        if "--runtime" not in sys.argv:
            args.runtime = 1
        if "--repeat" not in sys.argv:
            args.repeat = 1
    args.size = BASE_SIZE
    curves = args.only.split(",")
    unknown = set(curves) - set(CURVES)
    if unknown:
        sys.exit(f"unknown curve: {', '.join(sorted(unknown))}")
    tools = ["fio", "qemu-io"] + (["nbdkit"] if {"qd", "conns"} & set(curves) else [])
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    os.makedirs(args.out_dir, exist_ok=True)
    results = os.path.join(args.out_dir, "scaling-results.md")

    workdir = tempfile.mkdtemp(prefix="strata-scale-")
    raw = os.path.join(args.image_dir, f"strata-scale-{os.getpid()}.img")
    runners = {"qd": curve_qd, "conns": curve_conns, "depth": curve_depth,
               "size": curve_size}
    started = time.time()
    try:
        if {"qd", "conns", "depth"} & set(curves):
            subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M",
                            f"count={int(BASE_SIZE.rstrip('G')) * 1024}", "status=none"],
                           check=True)
        with open(results, "a") as f:
            f.write(f"## Scaling run of {time.strftime('%Y-%m-%d %H:%M')}\n\n"
                    f"Machine: {compare.machine()}\n\n"
                    f"fio nbd engine over a Unix socket, {args.runtime} s per run, "
                    f"median of {args.repeat} runs, images in {args.image_dir}.\n\n")
        for curve in curves:
            t0 = time.time()
            pts = (QUICK_POINTS if args.quick else POINTS)[curve]
            data = runners[curve](pts, args, raw, workdir)
            subtitle = (f"fio nbd engine, {args.runtime} s per point, median of "
                        f"{args.repeat}; {time.strftime('%Y-%m-%d')}")
            path = os.path.join(args.out_dir, f"scaling-{curve}.svg")
            with open(path, "w") as f:
                f.write(svg(curve, data, subtitle))
            with open(results, "a") as f:
                f.write(table(curve, data, args))
            print(f"[{curve}] wrote {path} in {time.time() - t0:.0f} s", flush=True)
    finally:
        if os.path.exists(raw):
            os.unlink(raw)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"done in {time.time() - started:.0f} s; tables appended to {results}")


if __name__ == "__main__":
    main()
