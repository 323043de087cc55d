"""``sparse-attn``: the console command (registered in setup.py as a console script).

Every job is a module with ``add_parser(subparsers)`` and ``run(args) -> exit code``. A user's
mistake (a :class:`CliError`, a bad checkpoint, an unavailable backend, an unreadable file) is
reported as one line ``sparse-attn JOB: error: ...`` with exit status 2; ``--traceback`` shows
the Python traceback instead, for bug reports.
"""
import argparse
import os
import sys

from . import bench, evaluate, restore, synth, train
from .errors import CliError

JOBS = (synth, train, evaluate, restore, bench)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="sparse-attn",
        description="Restore images, train and evaluate the image-restoration transformers of sparse-attn, "
                    "make a small paired data set, and run the kernel benchmarks.",
        epilog="Start with: sparse-attn synth data/rain, then sparse-attn train --help.")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, print the Python traceback instead of one line")
    subparsers = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    for job in JOBS:
        job.add_parser(subparsers)
    return parser


def main(argv=None):
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(f"sparse-attn {args.job}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; --traceback for a bug report
        if args.traceback or os.environ.get("SPARSE_ATTN_TRACEBACK") == "1":
            raise
        print(f"sparse-attn {args.job}: error: {describe(exc)}", file=sys.stderr)
        return 2


def describe(exc):
    """One line saying what went wrong: the message (its lines joined), with the exception's type
    where the message alone would not say it."""
    message = str(exc).strip()
    if isinstance(exc, CliError):
        return message.replace("\n", " ")
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    if isinstance(exc, (ValueError, OSError, RuntimeError, TypeError)) and line:
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
