"""``sparse-attn eval``: PSNR and SSIM of restored images against their targets.

Pairs the two folders' images by name (the extension may differ), prints one row per image and
the mean, and optionally writes them as CSV (``name,psnr,ssim``, then a ``mean`` row). The
conventions are those of the papers' tables (see :mod:`sparse_attn.cli.metrics`): ``--y-channel``
for the deraining sets (Rain200L/H, DID, DDN, SPA), RGB for GoPro.
"""
import csv
import math
import os

from .errors import CliError
from .images import paired_files, read_rgb8
from .metrics import psnr_ssim


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "eval", help="PSNR / SSIM of restored images against their targets",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("pred_dir", metavar="PRED_DIR", help="folder of restored images")
    parser.add_argument("target_dir", metavar="TARGET_DIR", help="folder of ground-truth images (same names)")
    parser.add_argument("--y-channel", action="store_true",
                        help="on the Y channel of BT.601 YCbCr (MATLAB rgb2ycbcr), as the deraining papers")
    parser.add_argument("--crop-border", type=int, default=0, help="pixels dropped at each edge (default 0)")
    parser.add_argument("--csv", metavar="FILE", default=None, help="write name,psnr,ssim rows and a mean row")
    parser.set_defaults(run=run)


def evaluate_folders(pred_dir, target_dir, crop_border=0, y_channel=False, progress=True):
    """[(name, psnr, ssim)] over the paired images of two folders, sorted by name."""
    from tqdm import tqdm
    pairs = paired_files(pred_dir, target_dir, "PRED_DIR", "TARGET_DIR")
    rows = []
    for name, pred_path, target_path in tqdm(pairs, desc="eval", unit="image", disable=not progress):
        try:
            psnr, ssim = psnr_ssim(read_rgb8(pred_path), read_rgb8(target_path), crop_border, y_channel)
        except CliError as exc:
            raise CliError(f"{name}: {exc}") from None
        rows.append((name, psnr, ssim))
    return rows


def mean_row(rows):
    return ("mean", sum(r[1] for r in rows) / len(rows), sum(r[2] for r in rows) / len(rows))


def run(args):
    rows = evaluate_folders(args.pred_dir, args.target_dir, args.crop_border, args.y_channel)
    mean = mean_row(rows)
    space = "Y (BT.601)" if args.y_channel else "RGB"
    print(render(rows, mean, f"{len(rows)} images, {space}, crop border {args.crop_border}"))
    if args.csv:
        write_csv(args.csv, rows, mean)
        print(f"wrote {args.csv}")
    return 0


def render(rows, mean, title):
    """The rows and the mean as a table (rich)."""
    import io

    from rich.console import Console
    from rich.table import Table
    table = Table()
    table.add_column("name")
    table.add_column("PSNR (dB)", justify="right")
    table.add_column("SSIM", justify="right")
    for name, psnr, ssim in rows:
        table.add_row(name, _db(psnr), f"{ssim:.4f}")
    table.add_section()
    table.add_row(mean[0], _db(mean[1]), f"{mean[2]:.4f}")
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(table)
    return title + "\n" + console.file.getvalue().rstrip("\n")


def _db(value):
    return "inf" if math.isinf(value) else f"{value:.2f}"


def write_csv(path, rows, mean):
    """``name,psnr,ssim`` rows (full precision), then the mean row; written atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "psnr", "ssim"])
        for name, psnr, ssim in [*rows, mean]:
            writer.writerow([name, repr(psnr), repr(ssim)])
    os.replace(temporary, path)
