"""``python -m sparse_attn.cli``: the same as the ``sparse-attn`` console script."""
import sys

from .main import main

sys.exit(main())
