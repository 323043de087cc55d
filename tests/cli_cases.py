"""Helpers of the ``sparse-attn`` command tests: running the command in-process, a small paired
data set, and options files for a network small enough that a few dozen steps take seconds."""
import os

import torch
import yaml

from sparse_attn.cli.main import main

# DRSformer without MEFC at dim 8, one block per level: 0.28 M parameters.
TINY_NETWORK = {"type": "DRSformer", "dim": 8, "num_blocks": [1, 1, 1, 1], "heads": [1, 1, 1, 1], "mefc": False}


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``sparse-attn argv`` run in this process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    """A user error: non-zero status, one line on stderr naming the problem, no traceback."""
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("\r", "train:", "eval:"))]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def tiny_options(data, root, total_iter=40, **train):
    """An options dict (BasicSR layout) for the tiny network on ``data`` (a synth folder)."""
    return {
        "name": "tiny",
        "manual_seed": 10,
        "datasets": {
            "train": {"dataroot_lq": os.path.join(data, "train", "input"),
                      "dataroot_gt": os.path.join(data, "train", "target"),
                      "geometric_augs": True, "use_shuffle": True, "num_worker_per_gpu": 0,
                      "batch_size_per_gpu": 4, "gt_size": 32},
            "val": {"dataroot_lq": os.path.join(data, "test", "input"),
                    "dataroot_gt": os.path.join(data, "test", "target")}},
        "network_g": dict(TINY_NETWORK),
        "path": {"experiments_root": str(root)},
        "train": {"total_iter": total_iter, "use_grad_clip": False,
                  "optim_g": {"type": "AdamW", "lr": 2e-3, "weight_decay": 1e-4, "betas": [0.9, 0.999]},
                  "pixel_opt": {"type": "L1Loss", "loss_weight": 1, "reduction": "mean"}, **train},
        "logger": {"print_freq": 1, "save_checkpoint_freq": 10},
    }


def write_options(path, options):
    with open(path, "w") as f:
        yaml.safe_dump(options, f)
    return str(path)


def params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["params"]
