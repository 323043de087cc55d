"""Image files: finding them, pairing them by name, reading and writing them.

Images are read with Pillow as 8-bit RGB (greyscale and palette images are converted; 16-bit
images are scaled to 8 bits) and handed around as uint8 arrays (metrics) or float tensors in
[0, 1] of shape (3, H, W) (networks). PNGs are written through a temporary file and renamed, so
an interrupted run never leaves a truncated image behind.
"""
import glob
import os

import numpy as np
import torch

from .errors import CliError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_name(path):
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_images(source, what="input"):
    """The image files of ``source``: one file, a folder (not recursive) or a glob pattern,
    sorted by name. Raises CliError when it names nothing."""
    if os.path.isdir(source):
        files = [os.path.join(source, name) for name in os.listdir(source) if is_image_name(name)]
        if not files:
            raise CliError(f"{what}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {source}")
    elif os.path.isfile(source):
        files = [source]
    elif glob.has_magic(source):
        files = [f for f in glob.glob(source) if os.path.isfile(f) and is_image_name(f)]
        if not files:
            raise CliError(f"{what}: the pattern {source!r} matches no image file")
    else:
        raise CliError(f"{what}: {source} does not exist")
    return sorted(files)


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def paired_files(input_dir, target_dir, input_what="input", target_what="target"):
    """[(name, input_path, target_path)] of two folders whose images match by name (the extension
    may differ, e.g. PNG results against JPEG targets). Raises CliError on a missing folder or
    unmatched names."""
    for folder, what in ((input_dir, input_what), (target_dir, target_what)):
        if not os.path.isdir(folder):
            raise CliError(f"{what}: folder {folder} does not exist")
    inputs = _by_stem(list_images(input_dir, input_what), input_what)
    targets = _by_stem(list_images(target_dir, target_what), target_what)
    only_inputs = sorted(set(inputs) - set(targets))
    only_targets = sorted(set(targets) - set(inputs))
    if only_inputs or only_targets:
        parts = []
        if only_inputs:
            parts.append(f"{len(only_inputs)} in {input_dir} have no match in {target_dir} ({_examples(only_inputs)})")
        if only_targets:
            parts.append(f"{len(only_targets)} in {target_dir} have no match in {input_dir} "
                         f"({_examples(only_targets)})")
        raise CliError("image names do not pair up: " + "; ".join(parts))
    return [(name, inputs[name], targets[name]) for name in sorted(inputs)]


def _by_stem(files, what):
    found = {}
    for path in files:
        name = stem(path)
        if name in found:
            raise CliError(f"{what}: two images named {name!r} ({os.path.basename(found[name])}, "
                           f"{os.path.basename(path)})")
        found[name] = path
    return found


def _examples(names, limit=3):
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def read_rgb8(path):
    """(H, W, 3) uint8 array of the image at ``path``. Raises CliError when it cannot be read."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                scale = 255.0 / 65535.0 if array.max() > 255 else 1.0
                return np.repeat(np.round(array * scale).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
            return np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise CliError(f"{path}: cannot read the image ({_reason(exc)})") from None


def _reason(exc):
    return str(exc).split("\n")[0] or type(exc).__name__


def to_tensor(rgb8):
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb8)).permute(2, 0, 1).float().div_(255.0)


def to_rgb8(tensor):
    """(3, H, W) float in [0, 1] (clamped) -> (H, W, 3) uint8, rounded to the nearest level."""
    return tensor.detach().float().clamp(0, 1).mul(255.0).round().byte().permute(1, 2, 0).cpu().numpy()


def read_tensor(path):
    """(3, H, W) float32 tensor in [0, 1] of the image at ``path``."""
    return to_tensor(read_rgb8(path))


def write_png(rgb8, path):
    """Write an (H, W, 3) uint8 array as a PNG, atomically (temporary file, then rename)."""
    from PIL import Image
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        Image.fromarray(rgb8).save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
