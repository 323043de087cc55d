"""PSNR and SSIM by the conventions of the deraining and deblurring papers' tables.

The math is scikit-image's (``skimage.metrics``, ``skimage.color``); this module only fixes the
conventions that BasicSR's ``calculate_psnr`` / ``calculate_ssim`` (and the authors' MATLAB
scripts) use, so that the numbers are comparable with the published ones:

- images are 8-bit; PSNR and SSIM are computed on the 0-255 scale (data range 255);
- ``y_channel``: the luma of BT.601 YCbCr as MATLAB's ``rgb2ycbcr`` defines it,
  Y = 16 + (65.481 R + 128.553 G + 24.966 B) with R, G, B in [0, 1], not rounded (as BasicSR's
  ``to_y_channel``); otherwise all RGB channels (GoPro's convention), SSIM averaged over them;
- SSIM with an 11x11 Gaussian window of sigma 1.5, population (not sample) covariances,
  K1 = 0.01, K2 = 0.03, averaged over the pixels whose window lies inside the image;
- ``crop_border``: that many pixels dropped at each edge first.
"""
import numpy as np

from .errors import CliError

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11


def prepare(rgb8, crop_border=0, y_channel=False):
    """(H, W, 3) uint8 -> float64 array on the 0-255 scale, cropped, as the metrics read it:
    (H', W') luma when ``y_channel``, else (H', W', 3)."""
    image = np.asarray(rgb8)
    if crop_border:
        image = image[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        from skimage.color import rgb2ycbcr
        return rgb2ycbcr(image)[..., 0]  # uint8 input is read as [0, 1]; Y comes out in [16, 235]
    return image.astype(np.float64)


def psnr_ssim(prediction, target, crop_border=0, y_channel=False):
    """(PSNR in dB, SSIM) of two (H, W, 3) uint8 images. PSNR is inf for identical images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    if prediction.shape != target.shape:
        raise CliError(f"sizes differ: prediction {_size(prediction)}, target {_size(target)}")
    if crop_border < 0 or 2 * crop_border >= min(target.shape[:2]):
        raise CliError(f"crop border {crop_border} leaves nothing of a {_size(target)} image")
    pred, true = prepare(prediction, crop_border, y_channel), prepare(target, crop_border, y_channel)
    if min(true.shape[:2]) < SSIM_WINDOW:
        raise CliError(f"a {_size(target)} image (after the crop border) is smaller than SSIM's "
                       f"{SSIM_WINDOW}x{SSIM_WINDOW} window")
    with np.errstate(divide="ignore"):  # identical images: PSNR is inf
        psnr = float(peak_signal_noise_ratio(true, pred, data_range=255))
    ssim = float(structural_similarity(true, pred, data_range=255, gaussian_weights=True, sigma=SSIM_SIGMA,
                                       use_sample_covariance=False,
                                       channel_axis=None if true.ndim == 2 else 2))
    return psnr, ssim


def _size(image):
    return f"{image.shape[1]}x{image.shape[0]}"
