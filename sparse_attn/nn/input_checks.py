"""The input check of every module and network on the library: one message per mistake, naming
the argument, instead of an error from deep inside a convolution or an op."""
import torch


def check_feature_map(module, x, channels, name="x"):
    """Raise unless ``x`` is a (B, ``channels``, H, W) tensor that ``module`` can take: floating
    point, of the module's dtype (any floating dtype under autocast) and on its device.

    B may be 0. ``name`` is the argument's name in the messages.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name}: expected (B, {channels}, H, W), got {tuple(x.shape)}")
    weight = next(module.parameters(), None)
    if weight is None:
        return
    expected = str(weight.dtype).replace("torch.", "")
    if not x.is_floating_point():
        hint = " (images: convert with .float() / 255)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{name}: expected a floating-point tensor of the module's dtype {expected}, got "
                        f"{str(x.dtype).replace('torch.', '')}{hint}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: expected the module's dtype {expected}, got {str(x.dtype).replace('torch.', '')} "
                        f"(convert the input or the module with .to(dtype))")
    if x.device != weight.device:
        raise ValueError(f"{name}: expected a tensor on the module's device {weight.device}, got {x.device}")


def autocast_parameters(x, *params):
    """``params`` in x's dtype where they differ (None stays None): under autocast a fused op
    takes its weights in the dtype its input was cast to, as the convolution it replaces would."""
    return tuple(p.to(x.dtype) if p is not None and p.dtype != x.dtype else p for p in params)
