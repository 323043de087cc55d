"""``sparse-attn train``: train a restoration network on paired folders from BasicSR-style options.

The official DRSformer and Restormer option files work unchanged: keys this job does not use are
listed once at the start, never fatal. What it does with the ones it reads:

- ``datasets.train``: ``dataroot_lq`` (inputs) and ``dataroot_gt`` (targets), images paired by
  name; random crops, ``geometric_augs`` (the eight flips/rotations), ``use_shuffle``;
  progressive training with ``mini_batch_sizes`` / ``gt_sizes`` / ``iters`` (per-process batch
  and patch side of each phase), else ``batch_size_per_gpu`` and ``gt_size``;
  ``num_worker_per_gpu`` loader processes. ``datasets.val``: the validation pairs.
- ``network_g``: ``type`` (any network of sparse_attn.models) and its constructor arguments.
- ``train``: ``total_iter``, ``warmup_iter``, ``optim_g`` (AdamW, Adam or SGD), ``scheduler``
  (CosineAnnealingRestartCyclicLR: ``periods``, ``restart_weights``, ``eta_mins``),
  ``pixel_opt`` (L1Loss or MSELoss, ``loss_weight``, ``reduction``), ``use_grad_clip`` (norm
  0.01, as the official code), ``ema_decay``, ``mixing_augs`` (mixup). Ours: ``amp``
  (``bf16``/``fp16``), ``grad_checkpoint`` (recompute each transformer block in backward).
- ``val``: ``val_freq``, ``save_img``, ``metrics`` (``calculate_psnr`` / ``calculate_ssim`` with
  ``crop_border`` and ``test_y_channel``). ``logger``: ``print_freq``, ``save_checkpoint_freq``,
  ``use_tb_logger``. ``path``: ``pretrain_network_g``, ``strict_load_g``, ``resume_state``;
  ours: ``experiments_root`` (default ``experiments/<name>``). ``manual_seed``; ours:
  ``backend``, ``device``. ``dist_params.backend``: the process-group backend under torchrun.

Writes, as BasicSR does, ``<experiments_root>/models/net_g_<iter>.pth`` (``{"params": ...}``,
plus ``params_ema`` with EMA) and ``training_states/<iter>.state``; ``--resume`` continues from
the latest state exactly (every batch is a function of the seed and the iteration: see
:mod:`sparse_attn.cli.data`). Logs: ``train_log.csv``, ``val_log.csv`` and, where TensorBoard is
installed, ``tb_logger/``. Several GPUs: ``torchrun --nproc_per_node N -m sparse_attn.cli train
...`` (each process its share of every batch; process 0 logs, validates and saves).
"""
import argparse
import copy
import csv
import functools
import glob
import math
import os
import re
import time

import torch
import torch.nn.functional as F

import sparse_attn

from . import networks, runtime
from .data import PairedCrops, Phase, progressive_phases
from .errors import CliError
from .images import paired_files, read_tensor, to_rgb8, write_png
from .metrics import psnr_ssim
from .options import Options

GRAD_CLIP_NORM = 0.01  # the official training code's max gradient norm
SUPPORTED_SCHEDULERS = ("CosineAnnealingRestartCyclicLR",)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "train", help="train a network on paired folders from BasicSR-style YAML options",
        description="Train a restoration network from BasicSR-style YAML options (the official DRSformer and "
                    "Restormer files work unchanged). Several GPUs: torchrun --nproc_per_node N -m "
                    "sparse_attn.cli train --opt FILE.")
    parser.add_argument("--opt", "-opt", required=True, metavar="OPTIONS.yml", help="the YAML options file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an option, e.g. --set train.total_iter=1000 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest training state in the experiment folder")
    # Accepted for BasicSR's launch lines; torchrun's environment says the rank.
    parser.add_argument("--launcher", help=argparse.SUPPRESS)
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


def run(args):
    options = Options.load(args.opt, args.set)
    process_group = ProcessGroup(options)
    try:
        Training(options, process_group, resume=args.resume).fit()
    finally:
        process_group.close()
    return 0


# ---------------------------------------------------------------------------------------------
# Processes (torchrun)
# ---------------------------------------------------------------------------------------------
class ProcessGroup:
    """This process's rank in a torchrun launch (or a group of one), its device, and the
    collective helpers the loop needs."""

    def __init__(self, options):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = runtime.device(str(options.get("device", "auto")), "device",
                                     int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = options.get("dist_params.backend", "nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type != "cuda" and backend == "nccl":
            backend = "gloo"  # NCCL has no CPU tensors; the official files say nccl
        self.initialised = False
        if self.world_size > 1:
            torch.distributed.init_process_group(backend)
            self.initialised = True

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.initialised:
            torch.distributed.barrier()

    def mean(self, value):
        """The mean of a scalar tensor over the processes."""
        if self.initialised:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return value

    def close(self):
        if self.initialised:
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------
def cyclic_cosine_lr(base_lr, periods, restart_weights, eta_mins, step):
    """BasicSR's CosineAnnealingRestartCyclicLR after ``step`` scheduler steps: cycle i anneals
    from ``restart_weights[i]``-weighted ``base_lr`` to ``eta_mins[i]`` over ``periods[i]`` steps."""
    ends = [sum(periods[:i + 1]) for i in range(len(periods))]
    cycle = next((i for i, end in enumerate(ends) if step <= end), len(ends) - 1)
    start = ends[cycle - 1] if cycle else 0
    eta_min = eta_mins[cycle]
    return eta_min + restart_weights[cycle] * 0.5 * (base_lr - eta_min) * (
        1 + math.cos(math.pi * (step - start) / periods[cycle]))


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------
class Training:
    """Everything one training run needs, read from the options once; :meth:`fit` runs it."""

    def __init__(self, options, group, resume=False):
        self.opt, self.group = options, group
        name = options.get("name", "experiment")
        self.root = options.get("path.experiments_root", os.path.join("experiments", str(name)))
        self.seed = options.get("manual_seed", 0, int)
        self.total_iter = options.get("train.total_iter", kind=int)
        if self.total_iter < 1:
            raise CliError(f"train.total_iter: expected at least 1, got {self.total_iter}")
        self.backend = options.get("backend", "auto")
        runtime.check_backend(self.backend, "backend")
        self._read_data()
        self._build_network()
        self._read_optimisation()
        self._read_validation_and_logging()
        self.start_iter = self._resume_point(resume)
        if group.is_main:
            unused = options.unused()
            if unused:
                print(f"options not used: {', '.join(unused)}")

    # -- set-up --------------------------------------------------------------------------------
    def _read_data(self):
        opt = self.opt
        train_pairs = paired_files(opt.get("datasets.train.dataroot_lq"), opt.get("datasets.train.dataroot_gt"),
                                   "datasets.train.dataroot_lq", "datasets.train.dataroot_gt")
        batch = opt.get("datasets.train.batch_size_per_gpu", 1, int)
        patch = opt.get("datasets.train.gt_size", 128, int)
        if opt.has("datasets.train.mini_batch_sizes"):
            phases = progressive_phases(opt.get("datasets.train.mini_batch_sizes"), opt.get("datasets.train.gt_sizes"),
                                        opt.get("datasets.train.iters"), self.total_iter)
        else:
            phases = [Phase(self.total_iter, batch, patch)]
        self.phases = phases
        self.dataset = PairedCrops(train_pairs, phases, self.seed, self.group.world_size, self.group.rank,
                                   geometric_augs=opt.get("datasets.train.geometric_augs", False, bool),
                                   shuffle=opt.get("datasets.train.use_shuffle", True, bool))
        self.workers = min(opt.get("datasets.train.num_worker_per_gpu", 0, int), os.cpu_count() or 1)
        self.val_pairs = []
        if opt.has("datasets.val.dataroot_lq") or opt.has("datasets.val.dataroot_gt"):
            self.val_pairs = paired_files(opt.get("datasets.val.dataroot_lq"), opt.get("datasets.val.dataroot_gt"),
                                          "datasets.val.dataroot_lq", "datasets.val.dataroot_gt")

    def _build_network(self):
        opt = self.opt
        torch.manual_seed(self.seed)  # the same initial weights in every process
        self.net = networks.build(opt.get("network_g"))
        self.network_options = opt.get("network_g")
        pretrained = opt.get("path.pretrain_network_g", None)
        if pretrained:
            networks.load_weights(self.net, pretrained, "path.pretrain_network_g",
                                  strict=opt.get("path.strict_load_g", True, bool))
        if opt.get("train.grad_checkpoint", False, bool):
            checkpoint_transformer_blocks(self.net)
        self.net.to(self.group.device)
        self.ema_decay = opt.get("train.ema_decay", 0.0, float)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False) if self.ema_decay > 0 else None
        self.model = self.net
        if self.group.initialised:
            device_ids = [self.group.device.index] if self.group.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=device_ids)

    def _read_optimisation(self):
        opt = self.opt
        kind = opt.get("train.optim_g.type", "AdamW")
        optimisers = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}
        if kind not in optimisers:
            raise CliError(f"train.optim_g.type: {kind!r} is not supported (supported: {', '.join(optimisers)})")
        arguments = {k: v for k, v in opt.get("train.optim_g").items() if k != "type"}
        self.base_lr = opt.get("train.optim_g.lr", kind=float)
        for key in ("lr", "weight_decay", "eps"):
            if key in arguments:
                arguments[key] = opt.get(f"train.optim_g.{key}", kind=float)
        try:
            self.optimizer = optimisers[kind](self.net.parameters(), **arguments)
        except TypeError as exc:
            raise CliError(f"train.optim_g: {exc}") from None
        self.warmup_iter = opt.get("train.warmup_iter", -1, int)
        self.schedule = None
        if opt.has("train.scheduler"):
            kind = opt.get("train.scheduler.type")
            if kind not in SUPPORTED_SCHEDULERS:
                raise CliError(f"train.scheduler.type: {kind!r} is not supported "
                               f"(supported: {', '.join(SUPPORTED_SCHEDULERS)})")
            periods = [int(p) for p in opt.get("train.scheduler.periods")]
            weights = [float(w) for w in opt.get("train.scheduler.restart_weights", [1] * len(periods))]
            eta_mins = [float(e) for e in opt.get("train.scheduler.eta_mins", [0] * len(periods))]
            if not (len(periods) == len(weights) == len(eta_mins)) or min(periods) < 1:
                raise CliError("train.scheduler: periods, restart_weights and eta_mins need the same length "
                               "and positive periods")
            self.schedule = functools.partial(cyclic_cosine_lr, self.base_lr, periods, weights, eta_mins)
        loss_kind = opt.get("train.pixel_opt.type", "L1Loss")
        losses = {"L1Loss": F.l1_loss, "MSELoss": F.mse_loss}
        if loss_kind not in losses:
            raise CliError(f"train.pixel_opt.type: {loss_kind!r} is not supported (supported: {', '.join(losses)})")
        reduction = opt.get("train.pixel_opt.reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise CliError(f"train.pixel_opt.reduction: expected mean or sum, got {reduction!r}")
        self.loss_fn = functools.partial(losses[loss_kind], reduction=reduction)
        self.loss_weight = opt.get("train.pixel_opt.loss_weight", 1.0, float)
        self.grad_clip = opt.get("train.use_grad_clip", False, bool)
        self.mixup = opt.get("train.mixing_augs.mixup", False, bool)
        if self.mixup:
            self.mixup_beta = opt.get("train.mixing_augs.mixup_beta", 1.2, float)
            self.mixup_identity = opt.get("train.mixing_augs.use_identity", False, bool)
        amp = opt.get("train.amp", False)
        amp_dtypes = {False: None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if amp not in amp_dtypes:
            raise CliError(f"train.amp: expected false, bf16 or fp16, got {amp!r}")
        self.amp_dtype = amp_dtypes[amp]
        self.scaler = torch.amp.GradScaler(self.group.device.type, enabled=self.amp_dtype == torch.float16)

    def _read_validation_and_logging(self):
        opt = self.opt
        self.val_freq = opt.get("val.val_freq", 0, int) if self.val_pairs else 0
        self.save_img = opt.get("val.save_img", False, bool)
        self.metrics = {}
        for name in opt.get("val.metrics", {}):
            kind = opt.get(f"val.metrics.{name}.type")
            if kind not in ("calculate_psnr", "calculate_ssim"):
                raise CliError(f"val.metrics.{name}.type: {kind!r} is not supported (calculate_psnr, calculate_ssim)")
            self.metrics[name] = (kind, opt.get(f"val.metrics.{name}.crop_border", 0, int),
                                  opt.get(f"val.metrics.{name}.test_y_channel", False, bool))
        self.print_freq = max(1, opt.get("logger.print_freq", 100, int))
        self.save_freq = opt.get("logger.save_checkpoint_freq", 0, int)
        self.use_tensorboard = opt.get("logger.use_tb_logger", False, bool)

    def _resume_point(self, resume):
        """The last finished iteration of the state to resume from (0 for a fresh run)."""
        state_path = self.opt.get("path.resume_state", None)
        if resume and not state_path:
            states = glob.glob(os.path.join(self.root, "training_states", "*.state"))
            numbered = [(int(m.group(1)), p) for p in states
                        for m in [re.fullmatch(r"(\d+)\.state", os.path.basename(p))] if m]
            if not numbered:
                raise CliError(f"--resume: no training state in {os.path.join(self.root, 'training_states')}")
            state_path = max(numbered)[1]
        if not state_path:
            if self.group.is_main and os.path.isdir(os.path.join(self.root, "models")) and \
                    os.listdir(os.path.join(self.root, "models")):
                raise CliError(f"{self.root} already holds a run: use --resume, or another "
                               f"name / path.experiments_root")
            return 0
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            iteration = int(state["iter"])
            self.optimizer.load_state_dict(state["optimizers"][0])
        except FileNotFoundError:
            raise CliError(f"resume state {state_path} does not exist") from None
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CliError(f"resume state {state_path} cannot be read ({reason})") from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        weights = os.path.join(os.path.dirname(os.path.dirname(state_path)), "models", f"net_g_{iteration}.pth")
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
        self.net.load_state_dict(checkpoint["params"])
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint.get("params_ema", checkpoint["params"]))
        return iteration

    # -- the loop ------------------------------------------------------------------------------
    def fit(self):
        from tqdm import tqdm
        group, main = self.group, self.group.is_main
        if self.start_iter >= self.total_iter:
            if main:
                print(f"nothing to do: the run is at iteration {self.start_iter} of {self.total_iter}")
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                                             sampler=range(self.start_iter + 1, self.total_iter + 1))
        logger = Logger(self.root, self.use_tensorboard) if main else None
        if main:
            print(f"training {type(self.net).__name__} ({sum(p.numel() for p in self.net.parameters()):,} parameters) "
                  f"on {len(self.dataset.pairs)} pairs, {group.world_size} process(es) on {group.device}, "
                  f"iterations {self.start_iter + 1}-{self.total_iter}; writing to {self.root}")
        progress = tqdm(total=self.total_iter, initial=self.start_iter, desc="train", unit="it", disable=not main)
        self.model.train()
        started = time.perf_counter()
        with sparse_attn.use_backend(self.backend):
            for iteration, (lq, gt) in zip(range(self.start_iter + 1, self.total_iter + 1), loader):
                lr = self.learning_rate(iteration)
                loss = self.step(iteration, lq.to(group.device), gt.to(group.device), lr)
                loss = group.mean(loss.detach().float()).item()
                if not math.isfinite(loss):
                    raise CliError(f"iteration {iteration}: the loss is {loss}; lower train.optim_g.lr "
                                   f"or use train.amp: bf16 instead of fp16")
                if main:
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    progress.update()
                    if iteration % self.print_freq == 0 or iteration == self.total_iter:
                        logger.train(iteration, lr, loss, time.perf_counter() - started)
                if (self.save_freq and iteration % self.save_freq == 0) or iteration == self.total_iter:
                    if main:
                        self.save(iteration)
                    group.barrier()
                if self.val_freq and (iteration % self.val_freq == 0 or iteration == self.total_iter):
                    if main:
                        logger.validation(iteration, self.validate(iteration), progress)
                    group.barrier()
        progress.close()
        if main:
            logger.close()
            print(f"done: {os.path.join(self.root, 'models', f'net_g_{self.total_iter}.pth')}")

    def learning_rate(self, iteration):
        """BasicSR's order: linear warm-up to ``warmup_iter``, else the scheduler after
        ``iteration - 1`` steps (the first iteration runs at the base rate)."""
        if iteration < self.warmup_iter:
            return self.base_lr * iteration / self.warmup_iter
        return self.schedule(iteration - 1) if self.schedule else self.base_lr

    def step(self, iteration, lq, gt, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.mixup:
            gt, lq = self.mix(iteration, gt, lq)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.group.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            restored = networks.first_output(self.model(lq))
        loss = self.loss_weight * self.loss_fn(restored.float(), gt)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), GRAD_CLIP_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            with torch.no_grad():
                for mean, param in zip(self.ema.parameters(), self.net.parameters()):
                    mean.mul_(self.ema_decay).add_(param.detach(), alpha=1 - self.ema_decay)
        return loss

    def mix(self, iteration, gt, lq):
        """Restormer's mixup: with ``use_identity`` half of the batches stay as they are; otherwise
        each sample is blended with another of the batch with a Beta(beta, beta) weight."""
        generator = torch.Generator().manual_seed(self.seed * 7_919 + iteration * 104_729 + self.group.rank)
        if self.mixup_identity and torch.randint(0, 2, (1,), generator=generator).item() == 1:
            return gt, lq
        lam = _beta_sample(self.mixup_beta, generator)
        order = torch.randperm(gt.shape[0], generator=generator).to(gt.device)
        return lam * gt + (1 - lam) * gt[order], lam * lq + (1 - lam) * lq[order]

    # -- checkpoints and validation ------------------------------------------------------------
    def save(self, iteration):
        """models/net_g_<iter>.pth ({"params": ...}, as the official releases) and
        training_states/<iter>.state (optimiser, scaler), each written atomically."""
        checkpoint = {"params": self.net.state_dict(), "network_g": self.network_options}
        if self.ema is not None:
            checkpoint["params_ema"] = self.ema.state_dict()
        _save(checkpoint, os.path.join(self.root, "models", f"net_g_{iteration}.pth"))
        _save({"iter": iteration, "optimizers": [self.optimizer.state_dict()],
               "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None},
              os.path.join(self.root, "training_states", f"{iteration}.state"))

    @torch.no_grad()
    def validate(self, iteration):
        """{metric name: mean over the validation pairs} of the EMA network (else the network)."""
        net = self.ema if self.ema is not None else self.net
        was_training = net.training
        net.eval()
        totals = dict.fromkeys(self.metrics, 0.0)
        for name, input_path, target_path in self.val_pairs:
            lq = read_tensor(input_path)[None].to(self.group.device)
            restored = to_rgb8(networks.first_output(net(lq))[0])
            target = to_rgb8(read_tensor(target_path))
            if self.save_img:
                write_png(restored, os.path.join(self.root, "visualization", str(iteration), f"{name}.png"))
            for metric, (kind, crop_border, y_channel) in self.metrics.items():
                psnr, ssim = psnr_ssim(restored, target, crop_border, y_channel)
                totals[metric] += psnr if kind == "calculate_psnr" else ssim
        net.train(was_training)
        return {metric: total / len(self.val_pairs) for metric, total in totals.items()}


def _beta_sample(beta, generator):
    """A Beta(beta, beta) draw seeded from ``generator`` (torch has no seeded Beta sampler)."""
    import numpy as np
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(beta, beta))


def _save(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, temporary)
    os.replace(temporary, path)


def checkpoint_transformer_blocks(net):
    """Recompute every transformer block in backward (activation checkpointing): autograd keeps
    only each block's input."""
    from torch.utils.checkpoint import checkpoint

    from sparse_attn.models.common import TransformerBlock
    for module in net.modules():
        if isinstance(module, TransformerBlock):
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)


class Logger:
    """CSV logs (train_log.csv, val_log.csv) and, where TensorBoard is installed, tb_logger/."""

    def __init__(self, root, tensorboard):
        os.makedirs(root, exist_ok=True)
        self.root, self.writer = root, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(root, "tb_logger"))
            except ImportError:
                print("logger.use_tb_logger: TensorBoard is not installed (pip install tensorboard); CSV logs only")

    def _append(self, name, header, row):
        path = os.path.join(self.root, name)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(header)
            writer.writerow(row)

    def train(self, iteration, lr, loss, seconds):
        self._append("train_log.csv", ["iter", "lr", "loss", "seconds"], [iteration, lr, loss, f"{seconds:.1f}"])
        if self.writer:
            self.writer.add_scalar("losses/l_pix", loss, iteration)
            self.writer.add_scalar("lr", lr, iteration)

    def validation(self, iteration, results, progress):
        if not results:
            return
        self._append("val_log.csv", ["iter", *results], [iteration, *results.values()])
        progress.write(f"validation at {iteration}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        if self.writer:
            for name, value in results.items():
                self.writer.add_scalar(f"metrics/{name}", value, iteration)

    def close(self):
        if self.writer:
            self.writer.close()
