"""Streaming cases (issue 16): exact full-image inference in row bands against ``forward``.

Each network (default configuration, seeded weights) restores one image three ways on a backend:
``forward`` (the baseline of the speed-up column), ``forward_streaming`` (row bands, exact) and
the official scripts' tiled inference (tiles of 256 with an overlap of 32, averaged where they
overlap; another network's result, since each tile pools its own attention). Time and peak
memory (a fresh process per peak on CPU) go in the table; the plot draws peak memory against
pixels for the three. The section after the table compares tiled and exact on a real photograph
(matplotlib's sample image): max abs difference and PSNR between them.
"""
import math

import torch
from torch import nn

from .case import EAGER, Case, Skipped, Variant, require_backend
from .report import Target, find_row, ratio

GROUP = "streaming"
MODELS = ("DRSformer", "Restormer")
TILE, TILE_OVERLAP = 256, 32  # the official test scripts' --tile / --tile_overlap of the issue
BAND_ROWS = 64


class Restore(nn.Module):
    """Runs ``model`` on ``backend`` the ``how`` way: "forward", "streaming" or "tiled"
    (``progress``: streaming's progress bar, off for timed runs; see ``forward_streaming``)."""

    def __init__(self, model, backend, how, band_rows=BAND_ROWS, progress=False):
        super().__init__()
        self.model, self.backend, self.how, self.band_rows, self.progress = model, backend, how, band_rows, progress

    def forward(self, x):
        import sparse_attn

        with sparse_attn.use_backend(self.backend):
            if self.how == "streaming":
                return self.model.forward_streaming(x, band_rows=self.band_rows, progress=self.progress)
            if self.how == "tiled":
                return tiled(self.model, x)
            return self.model(x)


def tiled(model, x, tile=TILE, overlap=TILE_OVERLAP):
    """The official test scripts' tiled inference: square tiles every ``tile - overlap`` pixels
    (the last flush with the bottom and right edges), each restored on its own, the results
    averaged where tiles overlap."""
    _, _, height, width = x.shape
    tile = min(tile, height, width)
    stride = tile - overlap
    rows = list(range(0, height - tile, stride)) + [height - tile]
    cols = list(range(0, width - tile, stride)) + [width - tile]
    total = torch.zeros((x.shape[0], model.out_channels, height, width), dtype=x.dtype, device=x.device)
    count = torch.zeros_like(total[:, :1])
    for top in rows:
        for left in cols:
            total[..., top:top + tile, left:left + tile] += model(x[..., top:top + tile, left:left + tile])
            count[..., top:top + tile, left:left + tile] += 1
    return total / count


def spec(model, side, backends=("native",)):
    return {"model": model, "batch": 1, "side": side, "backends": list(backends)}


def default_specs(sweep):
    """quick: both networks at 256² (a network's forward takes seconds per 128² on a small CPU);
    targets: DRSformer at 512² and 1024² (issue 16's targets are stated at 1024²);
    full: both networks at 512², 1024² and 2048², on native and reference."""
    if sweep == "full":
        return [spec(m, side, ("native", "reference")) for m in MODELS for side in (512, 1024, 2048)]
    if sweep == "targets":
        return [spec("DRSformer", side) for side in (512, 1024)]
    return [spec(m, 256) for m in MODELS]


def _network(name, device, dtype):
    import sparse_attn.models

    torch.manual_seed(0)
    return getattr(sparse_attn.models, name)().to(device=device, dtype=dtype).eval()


def forward_cannot_fit(model, backend, side, device, dtype=torch.float32):
    """Why whole-image ``forward`` of a side x side image must not be run here (its peak,
    extrapolated from two small probes as ``sparse-attn restore`` does, would not fit in 80% of
    the memory available now: on a shared machine it would take others' memory), or None."""
    import sparse_attn
    from sparse_attn.cli.restore import MemoryModel, available_bytes

    device = torch.device(device)
    with torch.no_grad(), sparse_attn.use_backend(backend):
        needed = MemoryModel.probe(model, device, dtype).bytes_for(side, side)
    available = available_bytes(device)
    if needed <= 0.8 * available:
        return None
    return (f"forward at {side}x{side} needs about {needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB is "
            f"available: it cannot run here")


def _variant(name, backend, how, side):
    def build(device, dtype):
        require_backend(backend, device)
        model = _network(name, device, dtype)
        if how == "forward" and (reason := forward_cannot_fit(model, backend, side, device, dtype)):
            raise Skipped(reason)
        return Restore(model, backend, how)
    label = {"forward": backend, "streaming": f"{backend} streaming", "tiled": f"{backend} tiled {TILE}/{TILE_OVERLAP}"}
    return Variant(label[how], build, EAGER if (backend, how) == ("native", "forward") else "backend")


def make_case(spec):
    name, b, side = spec["model"], spec["batch"], spec["side"]

    def inputs(device, dtype):
        generator = torch.Generator().manual_seed(0)
        return [torch.rand(b, 3, side, side, generator=generator).to(device=device, dtype=dtype)]

    variants = [_variant(name, backend, how, side) for backend in spec["backends"]
                for how in ("forward", "streaming", "tiled")]
    return Case(group=GROUP, name=f"{name} full image", shape=f"B{b} 3x{side}x{side}", spec=spec,
                pixels=side * side, inputs=inputs, variants=variants, time_forward=True, time_backward=False,
                peak_mode="inference", peak_warmup=False)


def targets(rows):
    """Issue 16's targets: CPU, fp32, default DRSformer, batch 1, 1024², on native."""
    shape = "B1 3x1024x1024"
    forward = find_row(rows, "DRSformer full image", shape, "native")
    streamed = find_row(rows, "DRSformer full image", shape, "native streaming")
    get = lambda row, field: getattr(row, field, None)  # noqa: E731
    return [
        Target("16", f"DRSformer {shape}: streaming peak / forward peak (native)",
               ratio(get(streamed, "peak_bytes"), get(forward, "peak_bytes")), "<=", 0.25, "%"),
        Target("16", f"DRSformer {shape}: streaming time / forward time (native)",
               ratio(get(streamed, "fwd_ms"), get(forward, "fwd_ms")), "<=", 1.3),
    ]


def section(rows, opts, sweep):
    """Tiled against exact on a real photograph (targets and full sweeps: a few minutes)."""
    title = f"\nTiled ({TILE}/{TILE_OVERLAP}) against exact whole-image inference on a photograph:"
    if sweep == "quick":
        return title + "\n  (measured by --targets and --full)"
    lines = [title]
    for name in MODELS:
        try:
            lines.append("  " + tiled_against_exact(name, opts.device))
        except Exception as exc:  # reported, not raised: the table is already measured
            lines.append(f"  {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return "\n".join(lines)


def photograph(device):
    """matplotlib's sample photograph (Grace Hopper, 600x512), RGB in [0, 1], (1, 3, H, W)."""
    import matplotlib.cbook
    import matplotlib.image

    pixels = matplotlib.image.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float().div(255).to(device)


def tiled_against_exact(name, device, crop=None):
    """One line: max abs difference and PSNR (peak 1) between tiled and exact restorations of
    the photograph (its top-left ``crop`` = (rows, columns) when given)."""
    image = photograph(device)
    if crop is not None:
        image = image[..., :crop[0], :crop[1]]
    model = _network(name, device, torch.float32)
    with torch.no_grad():
        exact = model.forward_streaming(image, band_rows=BAND_ROWS)
        tiles = tiled(model, image)
    difference = (tiles - exact).abs()
    mse = difference.square().mean().item()
    psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
    return (f"{name:10} {tuple(image.shape[-2:])}: max |tiled - exact| {difference.max().item():.4f}, "
            f"PSNR(tiled, exact) {psnr:.1f} dB (seeded weights, not a trained checkpoint)")


# ---------------------------------------------------------------------------------------------
# One cold measurement per way, each in a fresh process: `python -m benchmarks.streaming`
# ---------------------------------------------------------------------------------------------
def _measure_child(name, side, backend, how, band_rows):
    """In this process: {"peak": bytes above the baseline, "seconds" (wall clock), "cpu_seconds"
    (this process's CPU time: on a shared machine, with one thread, the measure of the work),
    "predicted": streaming's predicted peak} of one restoration of a side x side image, after a warm-up at 64² (library
    initialisation, not this size's work); {"skipped": why} for a forward that cannot fit here.
    Streaming's progress bar goes to stderr."""
    import time

    from sparse_attn.streaming import predicted_peak_bytes

    from .memory import cpu_peak_bytes_here

    model = _network(name, "cpu", torch.float32)
    if how == "forward" and (reason := forward_cannot_fit(model, backend, side, "cpu")):
        return {"skipped": reason}
    restore = Restore(model, backend, how, band_rows, progress=True)
    with torch.no_grad():
        Restore(model, backend, how, band_rows, progress=False)(torch.rand(1, 3, 64, 64))
        image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
        started, cpu_started = time.perf_counter(), time.process_time()
        peak = cpu_peak_bytes_here(lambda: restore(image), warmup=False)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"peak": peak, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "predicted": predicted_peak_bytes(model, image.shape, image.dtype, band_rows) if how == "streaming" else None}


CSV_FIELDS = ("model", "side", "backend", "how", "band_rows", "peak_bytes", "predicted_bytes", "seconds", "cpu_seconds",
              "threads", "load_average", "note")


def _append_csv(path, row):
    import csv
    import os

    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot_cold(csv_path, png_path, band_rows=BAND_ROWS):
    """Peak memory against pixels for the three ways, from the rows of ``csv_path``: one line per
    network, backend and way measured; streaming's predicted peak (``predicted_peak_bytes``, bands
    of ``band_rows``) dashed from 256² to 4096²; a forward skipped for lack of memory marked x at
    its extrapolated peak. Returns ``png_path``."""
    import csv
    import re

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparse_attn.streaming import predicted_peak_bytes

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    figure, axis = plt.subplots(figsize=(8.5, 5.5))
    lines, colors = {}, {}
    for row in rows:
        if row["peak_bytes"]:
            key = (row["model"], row["backend"], row["how"])
            lines.setdefault(key, {})[int(row["side"]) ** 2] = int(row["peak_bytes"]) / 2**20
    for key, points in sorted(lines.items()):
        model, backend, how = key
        label = f"{model} {backend} {how}" + (f" (bands of {rows_of(rows, key)})" if how == "streaming" else "")
        (line,) = axis.plot(*zip(*sorted(points.items())), marker="o", label=label)
        colors[key] = line.get_color()
    sides = (256, 512, 1024, 2048, 4096)
    for model in sorted({m for m, _, how in lines if how == "streaming"}):
        net = _network(model, "meta", torch.float32)
        peaks = [predicted_peak_bytes(net, (1, 3, side, side), torch.float32, band_rows) / 2**20 for side in sides]
        axis.plot([side ** 2 for side in sides], peaks, linestyle="--", color=colors.get((model, "native", "streaming")),
                  label=f"{model} streaming, predicted ({band_rows} rows)")
    for row in rows:
        needed = re.search(r"needs about ([0-9.]+) GiB", row["note"] or "")
        if not row["peak_bytes"] and needed:
            axis.plot([int(row["side"]) ** 2], [float(needed.group(1)) * 2**10], marker="x", markersize=10, linestyle="",
                      color=colors.get((row["model"], row["backend"], row["how"])),
                      label=f"{row['model']} {row['backend']} {row['how']} at {row['side']}²: extrapolated, cannot run here")
    axis.set(xscale="log", yscale="log", xlabel="pixels (H·W, square images)", ylabel="peak memory above the model (MiB)",
             title="Whole-image forward, exact streaming, tiled (256/32): CPU, fp32, batch 1")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    return png_path


def rows_of(rows, key):
    """The band heights of the streaming rows of ``key`` (model, backend, way), as text."""
    heights = sorted({int(r["band_rows"]) for r in rows if (r["model"], r["backend"], r["how"]) == key and r["peak_bytes"]})
    return "/".join(map(str, heights)) + " rows"


def main(argv=None):
    import argparse
    import json
    import os
    import subprocess
    import sys

    from .memory import child_env

    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming",
                                     description="Peak memory and time of forward, forward_streaming and tiled "
                                                 "inference, one cold run each in a fresh process (CPU, fp32). "
                                                 "A forward that would not fit in the memory available is skipped.")
    parser.add_argument("--model", default="DRSformer", choices=MODELS)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--backend", default="native")
    parser.add_argument("--band-rows", type=int, default=BAND_ROWS)
    parser.add_argument("--ways", default="forward,streaming", help="comma-separated: forward, streaming, tiled")
    parser.add_argument("--threads", type=int, help="torch threads in each run (default: torch's); on a "
                        "loaded machine one thread measures the work, several measure the contention")
    parser.add_argument("--csv", help="append one row per way to this CSV file")
    parser.add_argument("--plot", metavar="PNG", help="only draw peak memory against pixels from --csv into PNG")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plot:
        if not args.csv:
            parser.error("--plot: give the --csv file to read")
        print(plot_cold(args.csv, args.plot))
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_measure_child(args.model, args.side, args.backend, args.ways, args.band_rows)))
        return
    env = child_env()
    results = {}
    label = f"{args.model} {args.side}x{args.side} {args.backend}"
    for how in args.ways.split(","):
        command = [sys.executable, "-m", "benchmarks.streaming", "--child", "--model", args.model, "--side",
                   str(args.side), "--backend", args.backend, "--band-rows", str(args.band_rows), "--ways", how]
        command += ["--threads", str(args.threads)] if args.threads is not None else []
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)  # stderr: the progress bar
        row = dict(model=args.model, side=args.side, backend=args.backend, how=how,
                   band_rows=args.band_rows if how == "streaming" else None,
                   threads=torch.get_num_threads(), load_average=f"{os.getloadavg()[0]:.1f}")
        if done.returncode:
            print(f"{label} {how:9}: failed with exit status {done.returncode} (its error is above)", flush=True)
            row["note"] = f"failed: exit status {done.returncode}"
        else:
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if "skipped" in result:
                print(f"{label} {how:9}: skipped: {result['skipped']}", flush=True)
                row["note"] = result["skipped"]
            else:
                results[how] = result
                predicted = f" (predicted {result['predicted'] / 2**20:.1f})" if result["predicted"] else ""
                print(f"{label} {how:9}: peak {result['peak'] / 2**20:8.1f} MiB{predicted}, {result['seconds']:7.1f} s "
                      f"({result['cpu_seconds']:.1f} s of CPU)", flush=True)
                row.update(peak_bytes=result["peak"], predicted_bytes=result["predicted"], seconds=f"{result['seconds']:.1f}",
                           cpu_seconds=f"{result['cpu_seconds']:.1f}")
        if args.csv:
            _append_csv(args.csv, row)
    if "streaming" in results:
        streamed = results["streaming"]
        print(f"streaming peak per pixel: {streamed['peak'] / args.side ** 2:.0f} bytes")
        if "forward" in results:
            forward = results["forward"]
            print(f"streaming / forward: peak {streamed['peak'] / forward['peak']:.1%}, "
                  f"time {streamed['seconds'] / forward['seconds']:.2f}x, "
                  f"CPU time {streamed['cpu_seconds'] / forward['cpu_seconds']:.2f}x")


if __name__ == "__main__":
    main()
