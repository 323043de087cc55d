"""The child process of a CPU peak-memory measurement (``memory.peak_bytes`` starts it):
``python -m benchmarks.memory_child '<json>'`` rebuilds the case from its group and spec, runs
one step and prints ``{"peak_bytes": ...}``, or ``{"error": ...}`` when the case cannot run.

It is the one module that turns a (group, spec) back into a case for memory measurements; kept
apart from ``memory`` so that the measuring code does not import the suite that uses it."""
import json
import sys

import torch

from .memory import peak_in_process
from .suite import make_case


def main(argv):
    try:
        payload = json.loads(argv[1])
        case = make_case(payload["group"], payload["spec"])
        peak = peak_in_process(case, payload["variant"], payload["mode"], torch.device(payload["device"]),
                               payload["warmup"])
        print(json.dumps({"peak_bytes": peak}))
    except Exception as exc:  # reported to the parent, which puts it in the table
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}))


if __name__ == "__main__":
    main(sys.argv)
