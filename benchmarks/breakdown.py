"""Where a training step's time goes, per module: the profile table after the models' summary.

Every module of the network whose class belongs to sparse-attn opens a profiler range named by
its class while its forward runs. A forward op belongs to the innermost such range; a backward
op belongs to the forward op whose autograd node it runs (the profiler's sequence numbers link
the two). Times are self CPU times, so nothing is counted twice; ``(outside)`` is the loss and
the autograd engine's own bookkeeping.
"""
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

_BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
OUTSIDE = "(outside)"


@dataclass
class ModuleTime:
    label: str
    count: int        # modules of this class in the network
    forward_ms: float
    backward_ms: float

    @property
    def total_ms(self):
        return self.forward_ms + self.backward_ms


def _labelled_modules(model):
    """The network's own modules (its classes, not torch.nn's building blocks, nor our drop-in
    versions of them such as PointwiseConv2d, whose time counts toward the block holding them)."""
    return [m for m in model.modules()
            if type(m).__module__.split(".")[0] == "sparse_attn" and not isinstance(m, torch.nn.Conv2d)]


def module_breakdown(model, step):
    """Runs ``step()`` (one forward and backward of ``model``) under the profiler and returns a
    ModuleTime per module class, the slowest first."""
    modules = _labelled_modules(model)
    counts = defaultdict(int)
    handles, ranges = [], {}

    def enter(module, args):
        ranges[id(module)] = record_function(type(module).__name__)
        ranges[id(module)].__enter__()

    def leave(module, args, output):
        ranges.pop(id(module)).__exit__(None, None, None)

    for module in modules:
        counts[type(module).__name__] += 1
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    labels = set(counts)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        for handle in handles:
            handle.remove()
    return _attribute(prof.events(), labels, counts)


def _attribute(events, labels, counts):
    def ancestor(event, accept):
        while event is not None and not accept(event):
            event = event.cpu_parent
        return event

    forward_ms, backward_ms = defaultdict(float), defaultdict(float)
    label_of_sequence = {}
    backward = []
    for event in events:
        node = ancestor(event, lambda e: e.name.startswith(_BACKWARD_PREFIX))
        if node is not None:
            backward.append((event, node.sequence_nr))
            continue
        owner = ancestor(event, lambda e: e.name in labels)
        label = owner.name if owner is not None else OUTSIDE
        if event.sequence_nr >= 0:
            label_of_sequence.setdefault(event.sequence_nr, label)
        forward_ms[label] += event.self_cpu_time_total / 1e3
    for event, sequence in backward:
        backward_ms[label_of_sequence.get(sequence, OUTSIDE)] += event.self_cpu_time_total / 1e3
    rows = [ModuleTime(label, counts.get(label, 0), forward_ms[label], backward_ms[label])
            for label in set(forward_ms) | set(backward_ms)]
    return sorted(rows, key=lambda row: -row.total_ms)


def render(title, ours, reference):
    """Two breakdowns of the same network (ours, the reference backend's) as one text table, in
    the order of ours; each row's share is of our step's total."""
    theirs = {row.label: row for row in reference}
    total = sum(row.total_ms for row in ours) or 1.0
    lines = [title, f"  {'module':28} {'count':>5} {'fwd ms':>9} {'bwd ms':>9} {'share':>6} {'reference ms':>13} {'ratio':>6}"]
    for row in ours + [r for r in reference if r.label not in {o.label for o in ours}]:
        mine = row if row in ours else ModuleTime(row.label, row.count, 0.0, 0.0)
        other = theirs.get(row.label)
        ratio = f"{other.total_ms / mine.total_ms:5.2f}x" if other and mine.total_ms > 0 else ""
        lines.append(f"  {row.label:28} {row.count or '':>5} {mine.forward_ms:9.1f} {mine.backward_ms:9.1f} "
                     f"{mine.total_ms / total:6.1%} {other.total_ms if other else 0.0:13.1f} {ratio:>6}")
    ref_total = sum(row.total_ms for row in reference)
    lines.append(f"  {'total':28} {'':>5} {sum(r.forward_ms for r in ours):9.1f} {sum(r.backward_ms for r in ours):9.1f} "
                 f"{'':>6} {ref_total:13.1f} {ref_total / total:5.2f}x")
    return "\n".join(lines)
