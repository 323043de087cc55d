"""``sparse-attn synth``: a small paired data set made on the fly, for trying every job without a
download.

Clean crops come from the sample photographs that scikit-image ships (``skimage.data``); the
degraded inputs are made here:

- ``rain``: streaks of several densities, lengths, angles and brightnesses: sparse random drops
  smeared along a line (a motion kernel) and screen-blended over the photograph, as the
  synthetic deraining sets (Rain100/Rain200) are made.
- ``blur``: linear motion blur of random length and direction (GoPro-like camera shake).

The pairs are written in the layout of the deraining and deblurring sets::

    OUTPUT_DIR/train/input/0000.png   OUTPUT_DIR/train/target/0000.png
    OUTPUT_DIR/test/input/0000.png    OUTPUT_DIR/test/target/0000.png

The test pairs are cut from photographs that no training pair uses (held out).
"""
import math
import os

import numpy as np

from .errors import CliError
from .images import IMAGE_EXTENSIONS, write_png

# Colour photographs (and one greyscale) in scikit-image's wheel; none needs a download.
# The last HELD_OUT are kept for the test pairs.
SAMPLE_IMAGES = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "camera", "moon",
                 "page", "chelsea", "coins")
HELD_OUT = 2  # photographs kept for the test pairs


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "synth", help="make a small paired data set (rain streaks or motion blur over sample photographs)",
        description=__doc__.split("\n\n")[0] + " Writes OUTPUT_DIR/{train,test}/{input,target}/NNNN.png.")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to create (must be empty or absent)")
    parser.add_argument("--kind", choices=("rain", "blur"), default="rain", help="the degradation (default rain)")
    parser.add_argument("--count", type=int, default=32, help="training pairs (default 32)")
    parser.add_argument("--test-count", type=int, default=None,
                        help="held-out test pairs (default: a quarter of --count, at least 2)")
    parser.add_argument("--size", type=int, default=128, help="side of the square crops in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(run=run)


def run(args):
    if args.count < 1:
        raise CliError(f"--count: expected at least 1, got {args.count}")
    test_count = max(2, args.count // 4) if args.test_count is None else args.test_count
    if test_count < 0:
        raise CliError(f"--test-count: expected 0 or more, got {test_count}")
    if args.size < 16:
        raise CliError(f"--size: expected at least 16 pixels, got {args.size}")
    _check_empty(args.output_dir)
    photographs = sample_photographs()
    if len(photographs) <= HELD_OUT:
        raise CliError("scikit-image ships too few sample photographs here to hold some out for testing")
    degrade = {"rain": add_rain, "blur": add_motion_blur}[args.kind]
    rng = np.random.default_rng(args.seed)
    from tqdm import tqdm
    splits = (("train", photographs[:-HELD_OUT], args.count), ("test", photographs[-HELD_OUT:], test_count))
    with tqdm(total=args.count + test_count, desc=f"synth {args.kind}", unit="pair") as progress:
        for split, sources, count in splits:
            for index in range(count):
                clean = random_crop(sources[index % len(sources)], args.size, rng)
                degraded = degrade(clean, rng)
                name = f"{index:04d}.png"
                write_png(_to_uint8(clean), os.path.join(args.output_dir, split, "target", name))
                write_png(_to_uint8(degraded), os.path.join(args.output_dir, split, "input", name))
                progress.update()
    print(f"wrote {args.count} training and {test_count} test pairs ({args.kind}, {args.size}x{args.size}) "
          f"to {args.output_dir}/{{train,test}}/{{input,target}}")
    return 0


def _check_empty(folder):
    if os.path.isfile(folder):
        raise CliError(f"OUTPUT_DIR: {folder} is a file")
    for split in ("train", "test"):
        for side in ("input", "target"):
            path = os.path.join(folder, split, side)
            if os.path.isdir(path) and any(n.lower().endswith(IMAGE_EXTENSIONS) for n in os.listdir(path)):
                raise CliError(f"OUTPUT_DIR: {path} already holds images; choose a new folder")


def sample_photographs():
    """The sample images scikit-image ships, as (H, W, 3) float arrays in [0, 1], in a fixed order."""
    from skimage import data
    photographs = []
    for name in SAMPLE_IMAGES:
        try:
            image = getattr(data, name)()
        except Exception:  # an image this scikit-image version would have to download
            continue
        image = np.asarray(image)
        if image.dtype != np.uint8:
            continue
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        photographs.append(image[..., :3].astype(np.float64) / 255.0)
    return photographs


def random_crop(image, size, rng):
    """A size x size crop at a random place (the image reflect-padded first when it is smaller),
    randomly mirrored."""
    h, w = image.shape[:2]
    if h < size or w < size:
        image = np.pad(image, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="reflect")
        h, w = image.shape[:2]
    top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    crop = image[top:top + size, left:left + size]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def line_kernel(length, angle_degrees):
    """A normalised motion kernel: a line of ``length`` pixels through the centre at
    ``angle_degrees`` (0 = horizontal), drawn with bilinear weights so that any angle is smooth."""
    size = int(math.ceil(length)) | 1
    kernel = np.zeros((size, size))
    centre = size // 2
    dx, dy = math.cos(math.radians(angle_degrees)), -math.sin(math.radians(angle_degrees))
    for t in np.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * size):
        x, y = centre + t * dx, centre + t * dy
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        for yy, xx, weight in ((y0, x0, (1 - fx) * (1 - fy)), (y0, x0 + 1, fx * (1 - fy)),
                               (y0 + 1, x0, (1 - fx) * fy), (y0 + 1, x0 + 1, fx * fy)):
            if 0 <= yy < size and 0 <= xx < size:
                kernel[yy, xx] += weight
    return kernel / kernel.sum()


def add_rain(clean, rng):
    """Rain streaks over ``clean`` (H, W, 3 in [0, 1]): density, length, angle and brightness drawn
    per image; streaks are screen-blended (they brighten, as rain does)."""
    from scipy.ndimage import convolve, gaussian_filter
    h, w = clean.shape[:2]
    density = rng.choice([0.004, 0.008, 0.015])
    length = rng.uniform(8, 24)
    angle = 90 + rng.uniform(-30, 30)  # near vertical
    drops = (rng.random((h, w)) < density) * rng.uniform(0.5, 1.0, (h, w))
    streaks = convolve(gaussian_filter(drops, 0.6), line_kernel(length, angle), mode="wrap")
    streaks = np.clip(streaks / max(streaks.max(), 1e-8) * rng.uniform(0.6, 0.9), 0, 1)[..., None]
    return 1 - (1 - clean) * (1 - streaks)


def add_motion_blur(clean, rng):
    """Linear motion blur of ``clean`` (H, W, 3 in [0, 1]): length 5-21 pixels, any direction."""
    from scipy.ndimage import convolve
    kernel = line_kernel(rng.uniform(5, 21), rng.uniform(0, 180))
    return np.stack([convolve(clean[..., c], kernel, mode="reflect") for c in range(3)], axis=-1)


def _to_uint8(image):
    return np.ascontiguousarray(np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8))
