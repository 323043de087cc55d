"""Training data: random crops of paired images, drawn so that every iteration's batch is a pure
function of (seed, iteration).

That is what makes resuming exact (no sampler or RNG state to restore) and what makes a
``torchrun`` run with N processes see the same samples as one process with N times the batch:
iteration k takes the next B_k samples of an endless stream, where B_k is the global batch
(``mini_batch_sizes`` of its phase times the number of processes) and the stream walks the data
set epoch after epoch, each epoch in its own seeded order; process r takes its r-th share. The
crop position and the flip/rotation of the sample at stream position q are drawn from a
generator seeded with (seed, q).
"""
import bisect
import dataclasses

import numpy as np
import torch

from .errors import CliError
from .images import read_tensor


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of progressive training: up to and including iteration ``last_iter``."""
    last_iter: int
    batch_per_process: int
    patch: int


def progressive_phases(mini_batch_sizes, gt_sizes, iters, total_iter):
    """Phases of Restormer's progressive training (``iters`` per phase; the last one runs to
    ``total_iter``)."""
    if not (len(mini_batch_sizes) == len(gt_sizes) == len(iters)) or not iters:
        raise CliError(f"datasets.train: mini_batch_sizes, gt_sizes and iters must have the same, non-zero "
                       f"length (got {len(mini_batch_sizes)}, {len(gt_sizes)}, {len(iters)})")
    phases, end = [], 0
    for i, (batch, patch, count) in enumerate(zip(mini_batch_sizes, gt_sizes, iters)):
        end = total_iter if i == len(iters) - 1 else end + int(count)
        if int(batch) < 1 or int(patch) < 8:
            raise CliError(f"datasets.train: phase {i + 1} has batch {batch} and patch {patch} "
                           f"(need a batch of at least 1 and a patch of at least 8)")
        phases.append(Phase(max(end, 0), int(batch), int(patch)))
    return phases


def phase_of(phases, iteration):
    """The phase that iteration (1-based) belongs to: the first whose ``last_iter`` >= it."""
    index = bisect.bisect_left([p.last_iter for p in phases], iteration)
    return phases[min(index, len(phases) - 1)]


def stream_position(phases, iteration, world_size):
    """How many samples the iterations before ``iteration`` (1-based) consumed, all processes."""
    position, start = 0, 1
    for phase in phases:
        if iteration <= start:
            break
        done = min(iteration, phase.last_iter + 1) - start
        position += max(done, 0) * phase.batch_per_process * world_size
        start = phase.last_iter + 1
    if iteration > start:  # past the last phase's end: it goes on
        position += (iteration - start) * phases[-1].batch_per_process * world_size
    return position


class PairedCrops(torch.utils.data.Dataset):
    """Indexed by iteration (1-based): this process's (input, target) crops of that iteration,
    float tensors (b, 3, patch, patch) in [0, 1].

    pairs: [(name, input_path, target_path)]. geometric_augs: one of the eight flips/rotations
    per sample. shuffle: each epoch in a seeded random order (else in name order).
    """

    def __init__(self, pairs, phases, seed, world_size=1, rank=0, geometric_augs=True, shuffle=True):
        self.pairs, self.phases, self.seed = pairs, phases, seed
        self.world_size, self.rank = world_size, rank
        self.geometric_augs, self.shuffle = geometric_augs, shuffle
        self._orders = {}

    def __len__(self):
        return self.phases[-1].last_iter + 1

    def __getitem__(self, iteration):
        phase = phase_of(self.phases, iteration)
        first = stream_position(self.phases, iteration, self.world_size) + self.rank * phase.batch_per_process
        crops = [self.sample(first + i, phase.patch) for i in range(phase.batch_per_process)]
        return torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])

    def index_at(self, position):
        epoch, offset = divmod(position, len(self.pairs))
        if not self.shuffle:
            return offset
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.pairs), generator=generator).tolist()}
        return self._orders[epoch][offset]

    def sample(self, position, patch):
        """The (input, target) crop at stream ``position``."""
        name, input_path, target_path = self.pairs[self.index_at(position)]
        lq, gt = read_tensor(input_path), read_tensor(target_path)
        if lq.shape != gt.shape:
            raise CliError(f"{name}: input {lq.shape[2]}x{lq.shape[1]} and target {gt.shape[2]}x{gt.shape[1]} "
                           f"differ in size")
        rng = np.random.default_rng([self.seed, position])
        lq, gt = _pad_to(lq, patch), _pad_to(gt, patch)
        top = int(rng.integers(0, lq.shape[1] - patch + 1))
        left = int(rng.integers(0, lq.shape[2] - patch + 1))
        lq, gt = lq[:, top:top + patch, left:left + patch], gt[:, top:top + patch, left:left + patch]
        if self.geometric_augs:
            mode = int(rng.integers(0, 8))
            lq, gt = dihedral(lq, mode), dihedral(gt, mode)
        return lq.contiguous(), gt.contiguous()


def dihedral(image, mode):
    """One of the eight flips/rotations of (..., H, W): ``mode`` = 4 * flip + quarter turns."""
    if mode >= 4:
        image = image.flip(-1)
    return torch.rot90(image, mode % 4, dims=(-2, -1))


def inverse_dihedral(image, mode):
    image = torch.rot90(image, -(mode % 4), dims=(-2, -1))
    return image.flip(-1) if mode >= 4 else image


def _pad_to(image, patch):
    """Reflect-pad an image smaller than the patch (as Restormer's data set does)."""
    h, w = image.shape[-2:]
    pad_h, pad_w = max(0, patch - h), max(0, patch - w)
    if not pad_h and not pad_w:
        return image
    if pad_h >= h or pad_w >= w:
        raise CliError(f"an image of {w}x{h} is too small for {patch}x{patch} training crops")
    return torch.nn.functional.pad(image[None], (0, pad_w, 0, pad_h), mode="reflect")[0]
