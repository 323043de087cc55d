"""``python -m benchmarks``: run the benchmark suite and report (``make bench`` runs this)."""
import argparse
import os
import sys

import torch

from . import suite, timing
from .case import Options


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run the sparse-attn benchmark suite: a summary per group (--wide: every "
                                     "column), the targets, CSV rows and plots.")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--full", action="store_const", dest="sweep", const="full", default="quick",
                       help="the complete sweep: 128², 256², 512², every peak memory and error, torch.compile "
                            "everywhere, the largest-image bisection (hours on a small CPU)")
    sweep.add_argument("--targets", action="store_const", dest="sweep", const="targets",
                       help="only the shapes the issues' targets are stated at (the models' are slow on CPU)")
    parser.add_argument("--only", choices=suite.GROUPS, action="append",
                        help="run only this group (repeatable)")
    parser.add_argument("--case", metavar="TEXT", help="run only the cases whose name and shape contain TEXT "
                        "(e.g. 'Restormer inference')")
    parser.add_argument("--threads", type=int, help="torch threads here and in the memory subprocesses "
                        "(default: torch's); the table's title states the count")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    parser.add_argument("--repeat", type=int, default=5, help="timed samples per measurement (default 5)")
    parser.add_argument("--budget-s", type=float, default=5.0,
                        help="seconds one measurement may take before it takes fewer samples, down to 3 "
                             "(default 5)")
    parser.add_argument("--mem-budget", type=float, default=8.0,
                        help="GB (2**30 bytes) for the largest-image search (default 8)")
    parser.add_argument("--no-errors", action="store_true", help="skip the float64 error columns")
    parser.add_argument("--no-write", action="store_true", help="print only: no CSV rows, no plots")
    parser.add_argument("--results-dir", default=None, help="where the CSV and PNG files go")
    parser.add_argument("--wide", action="store_true",
                        help="print every backend and column (the CSV has them all) instead of the summary")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of every failure")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected a positive count, got {args.threads}")
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the memory subprocesses inherit it
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # the references are exact fp32
        torch.backends.cudnn.allow_tf32 = False
    opts = Options(device=device, repeat=args.repeat, budget_s=args.budget_s, errors=not args.no_errors,
                   peak=True if args.sweep == "full" else None, verbose=args.verbose,
                   mem_budget_bytes=int(args.mem_budget * 2**30))
    if device.startswith("cuda"):
        opts.bandwidth_gbps = timing.copy_bandwidth_gbps(device)
    kwargs = {} if args.results_dir is None else {"results_dir": args.results_dir}
    suite.run(args.only or list(suite.GROUPS), opts, sweep=args.sweep, write=not args.no_write, wide=args.wide,
              match=args.case, **kwargs)


if __name__ == "__main__":
    main()
