"""``sparse-attn bench``: the benchmark suite, exactly as ``python -m benchmarks`` with the same
arguments (``sparse-attn bench --help`` lists them). The suite lives in the repository's
``benchmarks/`` folder, so it runs from a clone (the current folder, or the one the package was
installed from in editable mode)."""
import os
import sys

from .errors import CliError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "bench", help="run the kernel benchmark suite (python -m benchmarks; --help lists its options)",
        description=__doc__.replace("\n", " "), add_help=False)
    parser.set_defaults(run=run, accepts_extra=True)


def run(args):
    main = _benchmarks_main()
    try:
        main(list(args.extra))
    except SystemExit as exc:  # argparse's --help and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return 0


def _benchmarks_main():
    """``benchmarks.__main__.main``, from the current folder or the source tree of this package."""
    clone = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for folder in (os.getcwd(), clone):
        if os.path.isfile(os.path.join(folder, "benchmarks", "__main__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            break
    try:
        from benchmarks.__main__ import main
    except ImportError as exc:
        raise CliError(f"the benchmark suite is not here ({exc}); run sparse-attn bench from a clone of the "
                       f"repository") from None
    return main
