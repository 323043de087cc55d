"""The ``sparse-attn`` command: the jobs users come for (DESIGN.md §8).

``sparse-attn synth``   a small paired data set from the sample photographs scikit-image ships
``sparse-attn train``   BasicSR-style YAML options, paired folders, ``torchrun`` DDP
``sparse-attn eval``    PSNR / SSIM over paired folders, by the conventions of the papers' tables
``sparse-attn restore`` images in, restored PNGs out
``sparse-attn bench``   the benchmark suite (``python -m benchmarks``)

Each job lives in its own module with a ``add_parser(subparsers)`` and a ``run(args)``; the
command itself is :func:`sparse_attn.cli.main.main`.
"""
