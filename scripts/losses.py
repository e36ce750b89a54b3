"""Training loss of AE-FLOW, the paper's equation (1): ``L = alpha * L_flow + (1 - alpha) * L_recon``.

``L_flow = -log p_Z(z) = -log p_Z'(z') - log|det dz'/dz|`` is the flow's negative log-likelihood. Summed over
the 1024 x 16 x 16 feature map it is about 1e5 per image, while the MSE is about 1e-2, so the paper's alpha
only means something after normalisation; ``flow_normalization`` makes that choice explicit (default: nats per
dimension, which every re-implementation uses up to the constant factor ln 2 of bits per dimension).

>>> loss = AEFlowLoss(alpha=0.5)
>>> parts = loss(torch.zeros(2, 4, 2, 2), torch.zeros(2), torch.ones(2, 1, 8, 8), torch.ones(2, 1, 8, 8))
>>> sorted(parts)
['loss', 'loss_flow', 'loss_recon']
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .ssim import checked_ssim_settings, ssim_valid

FLOW_NORMALIZATIONS = ("nats_per_dim", "bits_per_dim", "sum")
RECON_LOSSES = ("mse", "ssim")
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def check_weight(name: str, value: float) -> float:
    """Reject a loss or score weight outside [0, 1] early, naming the config key."""
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1] (the paper's convex weighting), got {value}.")
    return float(value)


def flow_nll(z_prime: torch.Tensor, log_jac_det: torch.Tensor, normalization: str = "nats_per_dim") -> torch.Tensor:
    """Per-sample ``-log p_Z(z)`` under a standard-normal prior on ``z'``, with the flow's log-det included."""
    if normalization not in FLOW_NORMALIZATIONS:
        raise ValueError(f"Unknown flow_normalization {normalization!r}; allowed: {', '.join(FLOW_NORMALIZATIONS)}.")
    dims = z_prime[0].numel()
    nll = 0.5 * z_prime.flatten(1).pow(2).sum(dim=1) + dims * HALF_LOG_2PI - log_jac_det
    if normalization == "sum":
        return nll
    nll = nll / dims
    return nll / math.log(2.0) if normalization == "bits_per_dim" else nll


class AEFlowLoss(nn.Module):
    """Equation (1); returns the total and both parts so that they can be logged separately."""

    def __init__(
        self,
        alpha: float = 0.5,
        recon_loss: str = "mse",
        flow_normalization: str = "nats_per_dim",
        data_range: float = 1.0,
        ssim_window: int = 11,
    ):
        super().__init__()
        self.alpha = check_weight("alpha", alpha)
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"Unknown recon_loss {recon_loss!r}; allowed: {', '.join(RECON_LOSSES)}.")
        self.recon_loss = recon_loss
        self.flow_normalization = flow_normalization
        flow_nll(torch.zeros(1, 1), torch.zeros(1), flow_normalization)  # validates the option early
        # MONAI's SSIMLoss, computed by separable matrix products (scripts.ssim)
        self.ssim_window, self.data_range = checked_ssim_settings(ssim_window, data_range)

    def forward(
        self, z_prime: torch.Tensor, log_jac_det: torch.Tensor, reconstruction: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        loss_flow = flow_nll(z_prime, log_jac_det, self.flow_normalization).mean()
        if self.recon_loss == "mse":
            loss_recon = torch.mean((reconstruction - target) ** 2)
        else:
            loss_recon = 1.0 - ssim_valid(target, reconstruction, self.data_range, self.ssim_window).mean()
        loss = self.alpha * loss_flow + (1.0 - self.alpha) * loss_recon
        return {"loss": loss, "loss_flow": loss_flow.detach(), "loss_recon": loss_recon.detach()}
