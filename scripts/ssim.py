"""SSIM maps: one definition for the SSIM reconstruction loss of equation (1) and the ``-SSIM`` term of the anomaly
score of equation (2).

The 11 x 11 Gaussian window is separable, and a valid 1D convolution of a row of length n is a product with an
(n, n - w + 1) banded matrix. So the window is applied as two matrix products: the CPU's matrix kernel does about 4x
the arithmetic of the 11 x 11 convolution and still runs 4.6x faster than oneDNN's one-channel 11 x 11 convolution
(2.6 against 12.2 ms an image for the five moment maps of a 256 x 256 image, 2 threads), and its backward pass is
two matrix products too. Its effect on a training step: docs/benchmarks.md.
The maps equal MONAI's within float32 rounding (tests).

SSIM subtracts squared means from means of squares, which half precision cannot resolve: the maps are always
computed in float32, under autocast too.

>>> image = torch.rand(2, 1, 32, 32)
>>> ssim_map(image, image).shape, float(ssim_valid(image, image).mean().round(decimals=4))
(torch.Size([2, 1, 32, 32]), 1.0)
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F

SIGMA = 1.5  # the window of Wang et al. (2004) and of MONAI


def gaussian_profile(window: int = 11, sigma: float = SIGMA) -> torch.Tensor:
    """(window,) normalised 1D Gaussian; the 2D window is its outer product with itself."""
    offsets = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    profile = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return profile / profile.sum()


@functools.lru_cache(maxsize=16)
def _band_array(length: int, window: int) -> np.ndarray:
    if length < window:
        raise ValueError(f"SSIM needs images of at least {window} pixels a side (its window), got {length}.")
    profile = gaussian_profile(window).numpy()
    band = np.zeros((length, length - window + 1))
    columns = np.arange(length - window + 1)
    for offset, weight in enumerate(profile):  # band[j + offset, j] = profile[offset]
        band[columns + offset, columns] = weight
    return band.astype(np.float32)


def _band(length: int, window: int, device: torch.device) -> torch.Tensor:
    """(length, length - window + 1) matrix whose product with a row is the row's valid convolution. A fresh view
    of a cached NumPy array at every call, so that every traced invocation records the same constant."""
    with warnings.catch_warnings():  # the tracer's note that it is a constant: it is meant to be one
        warnings.filterwarnings("ignore", message="torch.from_numpy results are registered as constants")
        band = torch.from_numpy(_band_array(length, window))
    return band if device.type == "cpu" else band.to(device)


def gaussian_blur(moments: torch.Tensor, window: int = 11) -> torch.Tensor:
    """(N, H, W) -> (N, H - w + 1, W - w + 1): the valid convolution with the 2D Gaussian window."""
    height, width = int(moments.shape[-2]), int(moments.shape[-1])  # constants when traced: exports are fixed-size
    rows = _band(height, window, moments.device)
    columns = _band(width, window, moments.device)
    return rows.t() @ (moments @ columns)


def ssim_valid(
    image: torch.Tensor, reconstruction: torch.Tensor, data_range: float = 1.0, window: int = 11
) -> torch.Tensor:
    """Per-pixel SSIM inside the valid-convolution area, (B, C, H - w + 1, W - w + 1), in float32."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    with torch.autocast(image.device.type, enabled=False):
        x = reconstruction.float().flatten(0, 1)
        y = image.float().flatten(0, 1)
        if y.requires_grad or not x.requires_grad:
            mu_x, mu_y, xx, yy, xy = gaussian_blur(torch.cat([x, y, x * x, y * y, x * y]), window).chunk(5)
        else:  # the loss: the target's two moment maps need no gradient, which spares 2 of 5 maps' backward
            mu_x, xx, xy = gaussian_blur(torch.cat([x, x * x, x * y]), window).chunk(3)
            with torch.no_grad():
                mu_y, yy = gaussian_blur(torch.cat([y, y * y]), window).chunk(2)
        sigma_x, sigma_y, sigma_xy = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
        ssim = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * ((2 * sigma_xy + c2) / (sigma_x + sigma_y + c2))
    return ssim.reshape(image.shape[0], image.shape[1], *ssim.shape[-2:])


def ssim_map(image: torch.Tensor, reconstruction: torch.Tensor, data_range: float = 1.0, window: int = 11):
    """Per-pixel SSIM (B, 1, H, W), channel-averaged; the valid-convolution border is filled by replication."""
    ssim = ssim_valid(image, reconstruction, data_range, window).mean(dim=1, keepdim=True)
    pad = window // 2
    return F.pad(ssim, (pad, pad, pad, pad), mode="replicate")
