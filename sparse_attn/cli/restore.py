"""``sparse-attn restore``: restore images with a trained network; PNGs out, never over an input.

By default each image runs whole through the network, which is what the network computes (its
channel attention pools over the whole image, so tiles are a different, approximate network).
An image whose whole-image inference would not fit in the memory available (estimated from two
small probe runs, scaled by the pixel count) runs in exact row bands where the network has
``forward_streaming``, and is otherwise skipped with the memory it needs. ``--tile``
runs overlapping tiles instead (averaged where they overlap, or with ``--feather`` blended with
weights that fall off linearly towards each tile's edge); ``--tta`` averages the eight
flips/rotations (self-ensemble). Unreadable images are reported and skipped; the exit status is
1 when any image was skipped.
"""
import functools
import os
import re
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sparse_attn
from sparse_attn.streaming import MemoryBudgetError

from . import networks, runtime
from .data import dihedral, inverse_dihedral
from .errors import CliError
from .images import list_images, read_tensor, stem, to_rgb8, write_png

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROBE_SIDES = (32, 64)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "restore", help="restore images (a file, a folder or a glob) with a trained network",
        description=" ".join(__doc__.split("\n\n")[0:2]).replace("\n", " "))
    parser.add_argument("input", metavar="INPUT", help="an image, a folder of images, or a quoted glob ('rain/*.jpg')")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="where the restored PNGs go (NAME.png)")
    parser.add_argument("--model", default=None,
                        help=f"the network ({', '.join(networks.registry())}); default: recognised from --weights")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="checkpoint: an official release file ({'params': ...}), one of ours, or a state_dict")
    parser.add_argument("--backend", default="auto",
                        help=f"op backend ({', '.join(runtime.BACKEND_CHOICES)}; default auto)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="compute precision (default fp32)")
    parser.add_argument("--tile", type=int, default=None, metavar="N",
                        help="run N x N tiles (a multiple of 8) instead of the whole image (approximate)")
    parser.add_argument("--tile-overlap", type=int, default=32, metavar="N", help="tile overlap in pixels (default 32)")
    parser.add_argument("--feather", action="store_true", help="blend tiles with linearly falling weights")
    parser.add_argument("--tta", action="store_true", help="average the eight flips/rotations (8x the time)")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GB",
                        help="memory to plan whole-image inference against (default: what the device has free)")
    parser.set_defaults(run=run)


def run(args):
    files = list_images(args.input, "INPUT")
    device = runtime.device(args.device)
    dtype = DTYPES[args.dtype]
    _check_tiling(args)
    runtime.check_backend(args.backend)
    net = _network(args)
    net.eval().requires_grad_(False).to(device=device, dtype=dtype)
    if os.path.isfile(args.output_dir):
        raise CliError(f"OUTPUT_DIR: {args.output_dir} is a file")
    os.makedirs(args.output_dir, exist_ok=True)
    inputs = {os.path.realpath(f) for f in files}
    written, skipped = set(), 0
    limit = args.memory_limit * 2**30 if args.memory_limit is not None else None
    from tqdm import tqdm
    with sparse_attn.use_backend(args.backend), torch.no_grad():
        memory = None
        for path in files:
            target = os.path.join(args.output_dir, stem(path) + ".png")
            reason = _refusal(target, inputs, written)
            if reason:
                _report(f"skipped {path}: {reason}")
                skipped += 1
                continue
            try:
                image = read_tensor(path)
            except CliError as exc:
                _report(f"skipped {exc}")
                skipped += 1
                continue
            h, w = image.shape[-2:]
            forward = net
            if args.tile is None:
                memory = memory or MemoryModel.probe(net, device, dtype)
                forward, reason = whole_image_forward(net, memory.bytes_for(h, w), limit or available_bytes(device),
                                                      device)
                if reason:
                    _report(f"skipped {path} ({w}x{h}): {reason}")
                    skipped += 1
                    continue
            steps = (8 if args.tta else 1) * len(tile_grid(h, w, args.tile, args.tile_overlap))
            with tqdm(total=steps, desc=os.path.basename(path), unit="pass", leave=False) as progress:
                try:
                    restored = restore_image(forward, image[None].to(device=device, dtype=dtype), args, progress)
                except torch.OutOfMemoryError:
                    _report(f"skipped {path} ({w}x{h}): out of memory on {device}; use --tile 512")
                    skipped += 1
                    continue
                except MemoryBudgetError as exc:  # not even the narrowest row bands fit
                    _report(f"skipped {path} ({w}x{h}): {exc}; use --tile 512 (approximate)")
                    skipped += 1
                    continue
            write_png(to_rgb8(restored[0]), target)
            written.add(os.path.realpath(target))
    print(f"restored {len(written)} image(s) into {args.output_dir}" + (f"; skipped {skipped}" if skipped else ""))
    return 1 if skipped else 0


def _check_tiling(args):
    if args.tile is not None and (args.tile < 16 or args.tile % 8):
        raise CliError(f"--tile: expected a multiple of 8 of at least 16, got {args.tile}")
    if args.tile is not None and not 0 <= args.tile_overlap < args.tile // 2:
        raise CliError(f"--tile-overlap: expected 0 to {args.tile // 2 - 1} for tiles of {args.tile}, "
                       f"got {args.tile_overlap}")


def _network(args):
    if args.weights:
        return networks.load(args.model, args.weights)
    if not args.model:
        raise CliError("give --weights FILE (and optionally --model NAME)")
    print(f"note: no --weights: {args.model} runs with random weights (a smoke test, not a restoration)")
    return networks.build({"type": args.model})


def _report(message):
    """A skipped image, on stderr (between progress bars)."""
    from tqdm import tqdm
    tqdm.write(message, file=sys.stderr)


def whole_image_forward(net, needed, available, device):
    """(forward, None) with the forward that fits ``available`` bytes: the network itself, or,
    when whole-image inference would not fit and the network has one, its exact row-band
    ``forward_streaming``; else (None, why not, with the memory needed)."""
    if needed <= 0.9 * available:
        return net, None
    if hasattr(net, "forward_streaming") and not getattr(net, "streaming_unsupported", None):
        return functools.partial(net.forward_streaming, max_memory=int(0.8 * available)), None
    return None, (f"whole-image inference needs about {needed / 2**30:.1f} GB, {available / 2**30:.1f} GB is "
                  f"available on {device}{_no_streaming(net)}; use --tile 512 (approximate) or a smaller image")


def _no_streaming(net):
    return f" and {type(net).__name__} cannot stream" if getattr(net, "streaming_unsupported", None) else ""


def _refusal(target, inputs, written):
    """Why ``target`` must not be written (it is an input, or another input's result), or None."""
    real = os.path.realpath(target)
    if real in inputs:
        return f"its result {target} would overwrite an input; choose another OUTPUT_DIR"
    if real in written:
        return f"another input of the same name already wrote {target}"
    return None


# ---------------------------------------------------------------------------------------------
# Inference: whole image, tiles, self-ensemble
# ---------------------------------------------------------------------------------------------
def restore_image(net, image, args, progress):
    """The restored (1, 3, H, W) float32 image (TTA over the whole-image or tiled pass)."""
    modes = range(8) if args.tta else (0,)
    total = None
    for mode in modes:
        out = inverse_dihedral(run_tiled(net, dihedral(image, mode), args.tile, args.tile_overlap, args.feather,
                                         progress), mode)
        total = out if total is None else total + out
    return total / len(modes)


def tile_grid(h, w, tile, overlap):
    """[(top, left, height, width)] covering the image; one whole-image tile without ``tile``."""
    if tile is None:
        return [(0, 0, h, w)]

    def starts(size):
        if size <= tile:
            return [0]
        stride = tile - overlap
        return sorted(set(list(range(0, size - tile, stride)) + [size - tile]))
    return [(top, left, min(tile, h), min(tile, w)) for top in starts(h) for left in starts(w)]


def run_tiled(net, image, tile, overlap, feather, progress):
    """The network over the tiles of ``image`` (1, 3, H, W), blended (uniform or feathered)."""
    h, w = image.shape[-2:]
    grid = tile_grid(h, w, tile, overlap)
    if len(grid) == 1:
        out = networks.first_output(net(image)).float()
        progress.update()
        return out
    result = torch.zeros(1, 3, h, w, device=image.device)
    weights = torch.zeros(1, 1, h, w, device=image.device)
    for top, left, th, tw in grid:
        out = networks.first_output(net(image[..., top:top + th, left:left + tw])).float()
        weight = feather_weights(th, tw, overlap, image.device) if feather else torch.ones(1, 1, th, tw,
                                                                                          device=image.device)
        result[..., top:top + th, left:left + tw] += out * weight
        weights[..., top:top + th, left:left + tw] += weight
        progress.update()
    return result / weights


def feather_weights(h, w, overlap, device):
    """(1, 1, h, w) weights rising linearly over ``overlap`` pixels from each edge (never zero)."""
    def ramp(n):
        distance = torch.minimum(torch.arange(n, device=device), torch.arange(n, device=device).flip(0)) + 1
        return (distance.float() / (overlap + 1)).clamp(max=1.0)
    return (ramp(h)[:, None] * ramp(w)[None, :])[None, None]


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
class _PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages alive during the ops run inside (an estimate: storages
    are counted once while a Python tensor holds them)."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor)
        return out

    def _track(self, tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key[0] == 0:
            return
        holders = self.live.setdefault(key, [0])
        if holders[0] == 0:
            self.current += key[1]
            self.peak = max(self.peak, self.current)
        holders[0] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key):
        holders = self.live.get(key)
        if holders:
            holders[0] -= 1
            if holders[0] == 0:
                self.current -= key[1]
                del self.live[key]


class MemoryModel:
    """Peak bytes of whole-image inference as a + b * (padded pixels), fitted from two probes."""

    def __init__(self, constant, per_pixel):
        self.constant, self.per_pixel = constant, per_pixel

    @classmethod
    def probe(cls, net, device, dtype):
        peaks = []
        for side in PROBE_SIDES:
            probe = torch.rand(1, net.inp_channels if hasattr(net, "inp_channels") else 3, side, side,
                               device=device, dtype=dtype)
            mode = _PeakLiveBytes()
            with mode:
                networks.first_output(net(probe))
            peaks.append(mode.peak)
        per_pixel = max(0.0, (peaks[1] - peaks[0]) / (PROBE_SIDES[1] ** 2 - PROBE_SIDES[0] ** 2))
        return cls(max(0.0, peaks[0] - per_pixel * PROBE_SIDES[0] ** 2), per_pixel)

    def bytes_for(self, h, w):
        pixels = (h + (-h) % 8) * (w + (-w) % 8)
        return self.constant + self.per_pixel * pixels


def available_bytes(device):
    """Free memory on ``device``: CUDA's free memory, or the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            match = re.search(r"MemAvailable:\s+(\d+) kB", f.read())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
