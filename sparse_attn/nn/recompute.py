"""Saving a tensor for backward as the recipe that makes it rather than as its values.

A 1x1 convolution saves its input for the gradient of its weight. When that input is cheap to
make again from tensors that backward keeps anyway (the gate's output, from the hidden features
the gate's own backward keeps), holding it from forward to backward is memory spent for nothing.
"""
import contextlib

import torch


class _Recipe:
    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


def _same_tensor(a, b):
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.storage_offset() == b.storage_offset() and a.dtype == b.dtype)


@contextlib.contextmanager
def saved_as_recipe(tensor, make):
    """Within the block, where autograd would save ``tensor`` for backward it keeps ``make``, and
    backward calls ``make()`` (without grad) for the values. ``make`` must return the values of
    ``tensor`` exactly (the same op on the same inputs) and must hold only tensors that stay saved
    anyway, detached (a graph holding a tensor that holds the graph would never be freed).

    Every other tensor saved in the block goes to the saved-tensor hooks active outside it, if
    any (a memory measurement, checkpointing), as it would without this block.
    """
    # Compiled graphs choose what to save themselves (and trace no hooks).
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not tensor.requires_grad:
        yield
        return
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    def pack(saved):
        if _same_tensor(saved, tensor):
            return _Recipe(make)
        return outer_pack(saved) if outer_pack is not None else saved.detach()

    def unpack(packed):
        if isinstance(packed, _Recipe):
            with torch.no_grad():
                return packed.make()
        return outer_unpack(packed) if outer_unpack is not None else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
