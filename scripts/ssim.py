"""SSIM maps: one definition for the SSIM reconstruction loss of equation (1) and the ``-SSIM`` term of the anomaly
score of equation (2).

The 11 x 11 Gaussian window is separable: it is applied as two 1D valid convolutions, each a depthwise convolution
whose channels are the map's rows (then its columns), which oneDNN runs about 2.4x faster than the two products
with banded matrices of bundle 0.10.0 (themselves 4.6x faster than one-channel 11 x 11 convolutions): an SSIM
loss of 64 maps of 256 x 256, forward and backward, 128 against 302 ms on two threads (docs/benchmarks.md). The
kernels have fixed shapes, so traced exports record them as constants.
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


def checked_ssim_settings(window, data_range) -> tuple[int, float]:
    """``(window, data_range)`` as the SSIM needs them: an odd window of 3 or more pixels (an even one would shift
    the padded map by half a pixel and stop scoring with a shape error after training went well) and a positive
    intensity range."""
    window, data_range = int(window), float(data_range)
    if window < 3 or window % 2 == 0:
        raise ValueError(f"ssim_window must be an odd number of pixels, 3 or more (the paper's: 11), got {window}.")
    if not data_range > 0:
        raise ValueError(f"data_range must be above 0 (images in [0, 1]: 1.0), got {data_range}.")
    return window, data_range


def gaussian_profile(window: int = 11, sigma: float = SIGMA) -> torch.Tensor:
    """(window,) normalised 1D Gaussian; the 2D window is its outer product with itself."""
    offsets = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    profile = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return profile / profile.sum()


@functools.lru_cache(maxsize=16)
def _kernel_array(channels: int, window: int) -> np.ndarray:
    return np.ascontiguousarray(
        np.broadcast_to(gaussian_profile(window).numpy().astype(np.float32), (channels, 1, 1, window))
    )


def _kernel(channels: int, window: int, device: torch.device) -> torch.Tensor:
    """(channels, 1, 1, window): the 1D window for every channel of a depthwise convolution. A fresh view of a
    cached NumPy array at every call, so that every traced invocation records the same constant."""
    with warnings.catch_warnings():  # the tracer's note that it is a constant: it is meant to be one
        warnings.filterwarnings("ignore", message="torch.from_numpy results are registered as constants")
        kernel = torch.from_numpy(_kernel_array(channels, window))
    return kernel if device.type == "cpu" else kernel.to(device)


def _blur_rows(maps: torch.Tensor, window: int) -> torch.Tensor:
    """(N, R, L) -> (N, R, L - w + 1): each row's valid convolution, its R rows the channels of one depthwise
    convolution."""
    rows = int(maps.shape[1])  # a constant when traced: exports are fixed-size
    return F.conv2d(maps.unsqueeze(2), _kernel(rows, window, maps.device), groups=rows).squeeze(2)


def gaussian_blur(moments: torch.Tensor, window: int = 11) -> torch.Tensor:
    """(N, H, W) -> (N, H - w + 1, W - w + 1): the valid convolution with the 2D Gaussian window."""
    if min(int(moments.shape[-2]), int(moments.shape[-1])) < window:
        raise ValueError(
            f"SSIM needs images of at least {window} pixels a side (its window), got {tuple(moments.shape[-2:])}."
        )
    return _blur_rows(_blur_rows(moments, window).transpose(1, 2), window).transpose(1, 2)


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
        mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y  # each product once: the map is memory-bound
        ssim = ((2 * mu_xy + c1) * (2 * (xy - mu_xy) + c2)) / ((mu_xx + mu_yy + c1) * (xx - mu_xx + yy - mu_yy + c2))
    return ssim.reshape(image.shape[0], image.shape[1], *ssim.shape[-2:])


def ssim_map(image: torch.Tensor, reconstruction: torch.Tensor, data_range: float = 1.0, window: int = 11):
    """Per-pixel SSIM (B, 1, H, W), channel-averaged; the valid-convolution border is filled by replication."""
    ssim = ssim_valid(image, reconstruction, data_range, window).mean(dim=1, keepdim=True)
    pad = window // 2
    return F.pad(ssim, (pad, pad, pad, pad), mode="replicate")
