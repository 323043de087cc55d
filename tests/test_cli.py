"""The ``sparse-attn`` jobs, run for real at small size on CPU: synth -> train -> eval -> restore,
exact resume, torchrun DDP against one process, the metrics against BasicSR's formulas, and bad
inputs (one line, non-zero exit, no traceback)."""
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_cases import TINY_NETWORK, assert_one_line_error, params, run_cli, tiny_options, write_options

from sparse_attn.cli import networks
from sparse_attn.cli.images import read_rgb8, write_png
from sparse_attn.cli.metrics import psnr_ssim
from sparse_attn.cli.synth import add_motion_blur, add_rain, sample_photographs


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks on a shared machine: OpenMP threads waiting on each other dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "rain"
    torch.set_num_threads(1)
    from sparse_attn.cli.main import main
    assert main(["synth", str(folder), "--count", "8", "--test-count", "3", "--size", "48"]) == 0
    return str(folder)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The tiny network trained for 40 steps (checkpoints every 10)."""
    root = tmp_path_factory.mktemp("experiment")
    options = tiny_options(data, root / "run", total_iter=40)
    options["val"] = {"val_freq": 40, "metrics": {"psnr": {"type": "calculate_psnr", "test_y_channel": True}}}
    from sparse_attn.cli.main import main
    torch.set_num_threads(1)
    assert main(["train", "--opt", write_options(root / "tiny.yml", options)]) == 0
    return root / "run"


# ---------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------
def test_synth_writes_paired_folders_deterministically(data, tmp_path, capsys):
    for split, count in (("train", 8), ("test", 3)):
        inputs = sorted(os.listdir(os.path.join(data, split, "input")))
        assert inputs == sorted(os.listdir(os.path.join(data, split, "target")))
        assert len(inputs) == count
        lq, gt = read_rgb8(os.path.join(data, split, "input", inputs[0])), read_rgb8(os.path.join(data, split,
                                                                                                 "target", inputs[0]))
        assert lq.shape == gt.shape == (48, 48, 3) and not np.array_equal(lq, gt)
    code, _, _ = run_cli(capsys, "synth", tmp_path / "again", "--count", "8", "--test-count", "3", "--size", "48")
    assert code == 0
    again = read_rgb8(tmp_path / "again" / "train" / "input" / "0003.png")
    assert np.array_equal(again, read_rgb8(os.path.join(data, "train", "input", "0003.png")))


def test_synth_degradations_change_the_image_as_they_should():
    clean = sample_photographs()[0][:64, :64]
    rng = np.random.default_rng(0)
    rainy = add_rain(clean, rng)
    assert (rainy >= clean - 1e-12).all() and (rainy - clean).max() > 0.3  # streaks brighten
    blurred = add_motion_blur(clean, rng)
    assert abs(blurred.mean() - clean.mean()) < 0.01  # a normalised kernel keeps the brightness
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(clean, axis=1)).mean()


# ---------------------------------------------------------------------------------------------
# train -> eval -> restore
# ---------------------------------------------------------------------------------------------
def test_train_loss_falls_and_checkpoints_are_official(trained):
    with open(trained / "train_log.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    checkpoint = torch.load(trained / "models" / "net_g_40.pth", map_location="cpu", weights_only=True)
    from sparse_attn.models import DRSformer
    net = DRSformer(**{k: v for k, v in TINY_NETWORK.items() if k != "type"})
    net.load_state_dict(checkpoint["params"])  # BasicSR's {"params": ...}: loads into the model as is
    state = torch.load(trained / "training_states" / "40.state", map_location="cpu", weights_only=True)
    assert state["iter"] == 40 and state["optimizers"][0]["state"]
    with open(trained / "val_log.csv") as f:
        assert [row["iter"] for row in csv.DictReader(f)] == ["40"]


def test_trained_network_beats_the_untrained_one_on_held_out_pairs(trained, data, tmp_path, capsys):
    torch.manual_seed(10)  # the training run's initial weights
    untrained = networks.build(TINY_NETWORK)
    torch.save({"params": untrained.state_dict()}, tmp_path / "untrained.pth")
    scores = {}
    for name, weights in (("trained", trained / "models" / "net_g_40.pth"), ("untrained", tmp_path / "untrained.pth")):
        code, _, err = run_cli(capsys, "restore", os.path.join(data, "test", "input"), tmp_path / name,
                               "--weights", weights, "--device", "cpu")
        assert code == 0, err
        assert sorted(os.listdir(tmp_path / name)) == ["0000.png", "0001.png", "0002.png"]
        code, out, err = run_cli(capsys, "eval", tmp_path / name, os.path.join(data, "test", "target"),
                                 "--y-channel", "--csv", tmp_path / f"{name}.csv")
        assert code == 0, err
        with open(tmp_path / f"{name}.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["name"] for r in rows] == ["0000", "0001", "0002", "mean"]
        scores[name] = float(rows[-1]["psnr"])
        assert abs(np.mean([float(r["psnr"]) for r in rows[:-1]]) - scores[name]) < 1e-9
    assert scores["trained"] > scores["untrained"] + 0.3, scores


def test_resume_continues_bit_exactly(data, tmp_path, capsys):
    whole = write_options(tmp_path / "whole.yml", tiny_options(data, tmp_path / "whole", total_iter=12,
                                                               mixing_augs={"mixup": True, "use_identity": True},
                                                               ema_decay=0.9))
    assert run_cli(capsys, "train", "--opt", whole)[0] == 0
    half = write_options(tmp_path / "half.yml", tiny_options(data, tmp_path / "half", total_iter=12,
                                                             mixing_augs={"mixup": True, "use_identity": True},
                                                             ema_decay=0.9))
    assert run_cli(capsys, "train", "--opt", half, "--set", "train.total_iter=10")[0] == 0
    code, _, err = run_cli(capsys, "train", "-opt", half, "--resume")
    assert code == 0, err
    for key in ("params", "params_ema"):
        a = torch.load(tmp_path / "whole" / "models" / "net_g_12.pth", weights_only=True)[key]
        b = torch.load(tmp_path / "half" / "models" / "net_g_12.pth", weights_only=True)[key]
        for name in a:
            assert torch.equal(a[name], b[name]), f"{key} {name}"


@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one_with_the_same_total_batch(data, tmp_path, capsys):
    # SGD: Adam divides by the root of tiny second moments and turns round-off (the all-reduce
    # sums in another order) into lr-sized differences, which would compare the optimiser.
    sgd = {"type": "SGD", "lr": 0.5, "momentum": 0.9}
    one = tiny_options(data, tmp_path / "one", total_iter=4, use_grad_clip=True, optim_g=sgd)
    one["datasets"]["train"]["batch_size_per_gpu"] = 4
    assert run_cli(capsys, "train", "--opt", write_options(tmp_path / "one.yml", one))[0] == 0
    two = tiny_options(data, tmp_path / "two", total_iter=4, use_grad_clip=True, optim_g=sgd)
    two["datasets"]["train"]["batch_size_per_gpu"] = 2
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "sparse_attn.cli", "train", "--opt", write_options(tmp_path / "two.yml", two)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = params(tmp_path / "one" / "models" / "net_g_4.pth"), params(tmp_path / "two" / "models" / "net_g_4.pth")
    initial = networks.build(TINY_NETWORK).state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# eval: the metrics against BasicSR's formulas (re-implemented here with numpy alone)
# ---------------------------------------------------------------------------------------------
def basicsr_y(rgb8):
    """BasicSR's to_y_channel: float32, BT.601 luma on the 0-255 scale, not rounded."""
    image = rgb8.astype(np.float32) / 255.0
    return (image @ np.array([65.481, 128.553, 24.966], dtype=np.float32) + 16.0).astype(np.float64)


def basicsr_psnr(a, b):
    return 20 * np.log10(255.0 / np.sqrt(np.mean((a - b) ** 2)))


def basicsr_ssim_channel(a, b):
    """BasicSR's _ssim: 11x11 Gaussian (sigma 1.5) filtering, keeping only the valid region."""
    x = np.arange(11) - 5
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    g /= g.sum()
    window = np.outer(g, g)

    def filt(image):
        return np.einsum("ijkl,kl->ij", np.lib.stride_tricks.sliding_window_view(image, (11, 11)), window)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = filt(a), filt(b)
    s11, s22, s12 = filt(a * a) - mu1 ** 2, filt(b * b) - mu2 ** 2, filt(a * b) - mu1 * mu2
    return np.mean((2 * mu1 * mu2 + c1) * (2 * s12 + c2) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2)))


def basicsr_metrics(pred, target, crop_border, y_channel):
    if crop_border:
        pred, target = pred[crop_border:-crop_border, crop_border:-crop_border], \
            target[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        a, b = basicsr_y(pred), basicsr_y(target)
        return basicsr_psnr(a, b), basicsr_ssim_channel(a, b)
    a, b = pred.astype(np.float64), target.astype(np.float64)
    return basicsr_psnr(a, b), np.mean([basicsr_ssim_channel(a[..., c], b[..., c]) for c in range(3)])


@pytest.mark.parametrize("degrade", [add_rain, add_motion_blur])
@pytest.mark.parametrize("crop_border,y_channel", [(0, True), (0, False), (4, True)])
def test_metrics_agree_with_basicsr(degrade, crop_border, y_channel):
    rng = np.random.default_rng(1)
    photograph = sample_photographs()[1][100:196, 200:280]  # a real photograph, 80 x 96
    target = np.round(photograph * 255).astype(np.uint8)
    pred = np.round(degrade(photograph, rng) * 255).clip(0, 255).astype(np.uint8)
    psnr, ssim = psnr_ssim(pred, target, crop_border, y_channel)
    expected_psnr, expected_ssim = basicsr_metrics(pred, target, crop_border, y_channel)
    assert 15 < expected_psnr < 45 and 0.3 < expected_ssim < 0.99  # a meaningful comparison
    assert abs(psnr - expected_psnr) < 0.01
    assert abs(ssim - expected_ssim) < 1e-4


def test_eval_csv_rows_and_mean(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        target = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        noisy = np.clip(target.astype(int) + rng.integers(-9, 10, target.shape), 0, 255).astype(np.uint8)
        write_png(target, str(tmp_path / "gt" / f"{name}.png"))
        write_png(noisy, str(tmp_path / "pred" / f"{name}.png"))
    code, out, err = run_cli(capsys, "eval", tmp_path / "pred", tmp_path / "gt", "--crop-border", "2",
                             "--csv", tmp_path / "m.csv")
    assert code == 0, err
    with open(tmp_path / "m.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["name", "psnr", "ssim"] and [r[0] for r in rows[1:]] == ["a", "b", "mean"]
    for name, psnr, ssim in rows[1:3]:
        expected = psnr_ssim(read_rgb8(tmp_path / "pred" / f"{name}.png"), read_rgb8(tmp_path / "gt" / f"{name}.png"),
                             crop_border=2)
        assert (float(psnr), float(ssim)) == pytest.approx(expected, abs=1e-12)
    assert float(rows[3][1]) == pytest.approx((float(rows[1][1]) + float(rows[2][1])) / 2, abs=1e-12)
    assert "mean" in out


# ---------------------------------------------------------------------------------------------
# restore
# ---------------------------------------------------------------------------------------------
class PixelwiseNet(torch.nn.Module):
    """A 1x1 convolution: tiles and the eight flips/rotations must not change its result."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("feather", [False, True])
def test_tiles_and_self_ensemble_reassemble_the_image(feather):
    from types import SimpleNamespace

    from tqdm import tqdm

    from sparse_attn.cli.restore import restore_image, tile_grid
    net = PixelwiseNet()
    image = torch.rand(1, 3, 45, 70)
    whole = net(image)
    assert len(tile_grid(45, 70, 24, 6)) == 3 * 4
    for tta in (False, True):
        args = SimpleNamespace(tile=24, tile_overlap=6, feather=feather, tta=tta)
        with tqdm(disable=True) as progress:
            torch.testing.assert_close(restore_image(net, image, args, progress), whole, rtol=1e-5, atol=1e-6)


def test_restore_writes_pngs_never_over_inputs_and_skips_bad_files(trained, data, tmp_path, capsys):
    folder = tmp_path / "in"
    shutil.copytree(os.path.join(data, "test", "input"), folder)
    (folder / "0001.png").write_bytes(b"not an image")
    before = (folder / "0000.png").read_bytes()
    weights = trained / "models" / "net_g_40.pth"
    code, out, err = run_cli(capsys, "restore", folder, folder, "--weights", weights)  # into its own folder
    assert code == 1 and (folder / "0000.png").read_bytes() == before
    assert "would overwrite an input" in err
    code, out, err = run_cli(capsys, "restore", str(folder / "*.png"), tmp_path / "out", "--weights", weights,
                             "--tile", "32", "--tile-overlap", "8", "--feather", "--tta")
    assert code == 1 and "0001.png: cannot read the image" in err  # reported, and the batch went on
    assert sorted(os.listdir(tmp_path / "out")) == ["0000.png", "0002.png"]
    assert read_rgb8(tmp_path / "out" / "0002.png").shape == read_rgb8(folder / "0002.png").shape


def test_restore_skips_an_image_that_fits_in_no_way(trained, data, tmp_path, capsys):
    code, out, err = run_cli(capsys, "restore", os.path.join(data, "test", "input", "0000.png"), tmp_path,
                             "--weights", trained / "models" / "net_g_40.pth", "--memory-limit", "0.00001")
    # Whole-image inference does not fit, nor do the narrowest row bands of streaming.
    assert code == 1 and "max_memory" in err and "cannot run DRSformer" in err and "--tile" in err
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# checkpoints and options
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,config", [
    ("DRSformer", {"dim": 8, "num_blocks": (1, 2, 1, 2), "heads": (1, 2, 2, 4), "mefc": True}),
    ("DRSformer", {"dim": 8, "num_blocks": (1, 1, 1, 1), "heads": (1, 1, 1, 1), "mefc": False}),
    ("Restormer", {"dim": 8, "num_blocks": (1, 1, 2, 1), "heads": (1, 2, 1, 1), "num_refinement_blocks": 2}),
])
def test_checkpoints_are_recognised_from_their_keys(name, config, tmp_path):
    net = networks.network_class(name)(**config)
    path = tmp_path / "official.pth"
    torch.save({"params": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)  # DDP-saved
    loaded = networks.load(None, str(path))
    assert type(loaded).__name__ == name
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_official_option_files_load_with_unused_keys_reported(data, tmp_path, capsys):
    # The keys of the official DRSformer / Restormer option files (values ours), with overrides.
    options = tiny_options(data, tmp_path / "run", total_iter=2)
    options.update({"model_type": "ImageCleanModel", "scale": 1, "num_gpu": 4,
                    "dist_params": {"backend": "nccl", "port": 29500}})
    train_set = options["datasets"]["train"]
    train_set.update({"name": "TrainSet", "type": "Dataset_PairedImage", "filename_tmpl": "{}",
                      "io_backend": {"type": "disk"}, "mini_batch_sizes": [2, 1], "iters": [1, 1],
                      "gt_sizes": [24, 32], "dataset_enlarge_ratio": 1, "prefetch_mode": None})
    options["train"].update({"warmup_iter": -1, "use_grad_clip": True,
                             "scheduler": {"type": "CosineAnnealingRestartCyclicLR", "periods": [1, 1],
                                           "restart_weights": [1, 1], "eta_mins": ["3e-4", "1e-6"]},
                             "mixing_augs": {"mixup": False, "mixup_beta": 1.2, "use_identity": True}})
    options["val"] = {"window_size": 8, "val_freq": "1e3", "save_img": False, "rgb2bgr": True, "use_image": True,
                      "max_minibatch": 8, "metrics": {"psnr": {"type": "calculate_psnr", "crop_border": 0,
                                                               "test_y_channel": True}}}
    options["logger"].update({"use_tb_logger": True, "wandb": {"project": None, "resume_id": None}})
    options["path"].update({"pretrain_network_g": None, "strict_load_g": True, "resume_state": None})
    path = write_options(tmp_path / "official.yml", options)
    code, out, err = run_cli(capsys, "train", "--opt", path, "--set", "train.optim_g.lr=1e-3")
    assert code == 0, err
    unused = next(line for line in out.splitlines() if line.startswith("options not used:"))
    for key in ("model_type", "num_gpu", "datasets.train.io_backend.type", "val.rgb2bgr", "logger.wandb.project"):
        assert key in unused
    for key in ("network_g", "train.scheduler", "datasets.train.gt_sizes", "val.metrics", "dist_params.backend"):
        assert key not in unused
    assert os.path.exists(tmp_path / "run" / "models" / "net_g_2.pth")


def test_cyclic_cosine_schedule_matches_basicsr():
    from sparse_attn.cli.train import cyclic_cosine_lr
    lr = [cyclic_cosine_lr(3e-4, [4, 8], [1, 1], [3e-4, 1e-6], step) for step in range(13)]
    assert lr[:5] == [3e-4] * 5  # first cycle: constant (eta_min = base)
    assert lr[8] == pytest.approx(1e-6 + 0.5 * (3e-4 - 1e-6) * (1 + np.cos(np.pi * 4 / 8)))
    assert lr[12] == pytest.approx(1e-6)


# ---------------------------------------------------------------------------------------------
# bad inputs: one line, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_give_one_clear_line(trained, data, tmp_path, capsys):
    weights = trained / "models" / "net_g_40.pth"
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    restormer = tmp_path / "restormer.pth"
    torch.save({"params": networks.build({"type": "Restormer", "dim": 8}).state_dict()}, restormer)
    (tmp_path / "gt").mkdir()
    write_png(np.zeros((16, 16, 3), np.uint8), str(tmp_path / "gt" / "other.png"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(os.path.join(data, "test", "target"), corrupt)
    (corrupt / "0001.png").write_bytes(b"\x89PNG broken")
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("train: [unclosed")
    test_input = os.path.join(data, "test", "input")
    cases = [
        (("eval", tmp_path / "missing", os.path.join(data, "test", "target")), "does not exist"),
        (("eval", test_input, tmp_path / "gt"), "do not pair up"),
        (("eval", test_input, corrupt), "cannot read the image"),
        (("restore", tmp_path / "missing.png", tmp_path / "o"), "does not exist"),
        (("restore", test_input, tmp_path / "o", "--weights", text), "not a PyTorch checkpoint"),
        (("restore", test_input, tmp_path / "o", "--model", "drsformer", "--weights", restormer),
         "is a Restormer checkpoint, not DRSformer"),
        (("restore", test_input, tmp_path / "o", "--weights", weights, "--backend", "cuda"), "--backend"),
        (("restore", test_input, tmp_path / "o", "--model", "nonet"), "unknown network"),
        (("train", "--opt", tmp_path / "missing.yml"), "does not exist"),
        (("train", "--opt", bad_yaml), "not valid YAML"),
        (("train", "--opt", write_options(tmp_path / "nodata.yml", tiny_options(tmp_path / "nodata", tmp_path / "r"))),
         "does not exist"),
        (("train", "--opt", write_options(tmp_path / "t.yml", tiny_options(data, tmp_path / "r")), "--set", "x"),
         "KEY=VALUE"),
        (("train", "--opt", write_options(tmp_path / "t.yml", tiny_options(data, tmp_path / "r")),
          "--set", "network_g.depth=3"), "takes no argument depth"),
        (("train", "--opt", write_options(tmp_path / "t.yml", tiny_options(data, tmp_path / "r")),
          "--set", "train.optim_g.lr=fast"), "train.optim_g.lr"),
        (("synth", tmp_path / "s", "--count", "0"), "--count"),
    ]
    for argv, fragment in cases:
        code, out, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, fragment)
    assert not os.path.exists(tmp_path / "o") or not os.listdir(tmp_path / "o")


def test_console_script_reports_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparse_attn.cli", "eval", str(tmp_path / "a"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"sparse-attn eval: error: PRED_DIR: folder {tmp_path / 'a'} "
                                                  f"does not exist"]


def test_bench_passes_its_arguments_to_the_benchmark_suite(capsys):
    code, out, err = run_cli(capsys, "bench", "--help")
    assert code == 0 and "python -m benchmarks" in out and "--targets" in out


def test_train_with_bf16_autocast_and_block_recomputation(data, tmp_path, capsys):
    options = tiny_options(data, tmp_path / "amp", total_iter=3, amp="bf16", grad_checkpoint=True)
    code, out, err = run_cli(capsys, "train", "--opt", write_options(tmp_path / "amp.yml", options))
    assert code == 0, err
    with open(tmp_path / "amp" / "train_log.csv") as f:
        assert all(np.isfinite(float(row["loss"])) for row in csv.DictReader(f))
    assert not any(torch.equal(v, w) for v, w in zip(params(tmp_path / "amp" / "models" / "net_g_3.pth").values(),
                                                      networks.build(TINY_NETWORK).state_dict().values())
                   if v.numel() > 8)


def test_restore_in_bf16_is_close_to_fp32(trained, data, tmp_path, capsys):
    image = os.path.join(data, "test", "input", "0000.png")
    weights = trained / "models" / "net_g_40.pth"
    for dtype in ("fp32", "bf16"):
        code, _, err = run_cli(capsys, "restore", image, tmp_path / dtype, "--weights", weights, "--dtype", dtype,
                               "--backend", "reference")
        assert code == 0, err
    psnr, _ = psnr_ssim(read_rgb8(tmp_path / "bf16" / "0000.png"), read_rgb8(tmp_path / "fp32" / "0000.png"))
    assert 30 < psnr < float("inf")  # bf16 rounds differently, but restores the same image


@pytest.mark.parametrize("job", ["synth", "train", "eval", "restore"])
def test_every_job_has_help(job, capsys):
    from sparse_attn.cli.main import main
    with pytest.raises(SystemExit) as exit_info:
        main([job, "--help"])
    assert exit_info.value.code == 0
    assert f"sparse-attn {job}" in capsys.readouterr().out


def test_a_too_large_image_streams_where_the_network_can():
    from sparse_attn.cli.restore import whole_image_forward

    class Streaming(PixelwiseNet):
        def forward_streaming(self, x, band_rows=None, max_memory=None):
            self.budget = max_memory
            return self(x)
    net, cpu = Streaming(), torch.device("cpu")
    assert whole_image_forward(net, 10, 100, cpu) == (net, None)
    forward, reason = whole_image_forward(net, 2**31, 2**30, cpu)
    image = torch.rand(1, 3, 8, 8)
    assert reason is None and torch.equal(forward(image), net(image)) and net.budget == int(0.8 * 2**30)
    forward, reason = whole_image_forward(PixelwiseNet(), 2**31, 2**30, cpu)
    assert forward is None and "needs about 2.0 GB, 1.0 GB is available on cpu" in reason

    class CannotStream(Streaming):  # as ALformer: the method exists and says why it cannot run
        streaming_unsupported = "its gates pool the whole image"
    forward, reason = whole_image_forward(CannotStream(), 2**31, 2**30, cpu)
    assert forward is None and "available on cpu and CannotStream cannot stream; use --tile" in reason
