"""DifferNet (Rudolph, Wandt and Rosenhahn, WACV 2021): a normalizing flow on multi-scale pooled image features.

The frozen encoder sees the image at each of ``scales`` (1, 1/2, 1/4 as in the paper); each stride-16 map is
averaged to a vector and the vectors are concatenated (``MultiScalePooling``, which the feature cache stores, so
the three encodings run once per image). The flow is the paper's: ``flow_blocks`` GLOW coupling blocks (FrEIA)
with fully connected subnets of ``hidden`` units, clamp 3, a fixed random permutation between blocks, trained by
maximum likelihood. The score is the mean of ``z**2`` (the paper's negative log-likelihood without the log-det),
averaged over ``views`` transformed copies of the image: 1 (the image only), 2 (+ horizontal flip) or 4 (+ vertical
flip, + both). Training sees the image itself (the cached view), not the transformed ones.

DifferNet gives no localisation (its gradient maps are a separate step): the anomaly map is the image's score
everywhere.
"""

from __future__ import annotations

from typing import Sequence

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import build_encoder
from ..losses import flow_nll
from .base import ComparisonMethod, term_maps

VIEWS = {1: ((),), 2: ((), (-1,)), 4: ((), (-1,), (-2,), (-2, -1))}  # the image dimensions each view flips


class MultiScalePooling(nn.Module):
    """The frozen encoder on the image at several scales, each map averaged: (B, C * len(scales), 1, 1)."""

    def __init__(self, encoder: nn.Module, scales: Sequence[float]):
        super().__init__()
        self.encoder = encoder
        self.scales = tuple(float(s) for s in scales)
        self.out_channels = encoder.out_channels * len(self.scales)
        self.name = f"{encoder.name}@{','.join(f'{s:g}' for s in self.scales)}"

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        vectors = []
        for scale in self.scales:
            scaled = image if scale == 1 else F.interpolate(image, scale_factor=scale, mode="area")
            vectors.append(self.encoder(scaled).mean(dim=(2, 3)))
        return torch.cat(vectors, dim=1)[..., None, None]


def fully_connected(hidden: int):
    """DifferNet's subnet; its output layer starts at zero, so that the flow starts as the identity (as AE-FLOW's
    ``flow_init="identity"``): with PyTorch's default initialisation eight clamped couplings scale pooled features
    of magnitude ~50 to a first loss of ~1e19 and non-finite gradients (measured)."""

    def constructor(in_features: int, out_features: int) -> nn.Module:
        output = nn.Linear(hidden, out_features)
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), output)

    return constructor


class DifferNet(ComparisonMethod):
    method = "differnet"

    def __init__(
        self,
        encoder: str = "efficientnet-lite0",
        encoder_weights: str = "imagenet",
        scales: Sequence[float] = (1.0, 0.5, 0.25),
        flow_blocks: int = 8,
        hidden: int = 2048,
        clamp: float = 3.0,
        views: int = 1,
        seed: int = 0,
        **common,
    ):
        if views not in VIEWS:
            raise ValueError(f"DifferNet views must be one of {sorted(VIEWS)} (image, flips), got {views}.")
        super().__init__(
            encoder=encoder,
            encoder_weights=str(encoder_weights),
            scales=[float(s) for s in scales],
            flow_blocks=flow_blocks,
            hidden=hidden,
            clamp=clamp,
            views=views,
            seed=seed,
            **common,
        )
        smallest = min(self.image_size) * min(scales)
        if smallest < 16:
            raise ValueError(
                f"DifferNet scales {list(scales)} shrink a {min(self.image_size)}-pixel image below the encoder's "
                "stride of 16 pixels: raise image_size or drop the smallest scale."
            )
        self.encoder = MultiScalePooling(build_encoder(encoder, encoder_weights), scales)
        dims = self.encoder.out_channels
        self.flow = Ff.SequenceINN(dims)
        for block in range(flow_blocks):
            self.flow.append(Fm.PermuteRandom, seed=seed + block)
            self.flow.append(Fm.GLOWCouplingBlock, subnet_constructor=fully_connected(hidden), clamp=clamp)

    def vectors(self, image: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        return self.features_of(image, features).flatten(1).float()

    def training_losses(self, image: torch.Tensor, features: torch.Tensor | None) -> dict:
        z, log_jac_det = self.flow(self.vectors(image, features))
        loss = flow_nll(z, log_jac_det).mean()
        return {"loss": loss, "loss_flow": loss.detach()}

    def anomaly_terms(self, image: torch.Tensor, features: torch.Tensor | None):
        scores = []
        for dims in VIEWS[self.settings["views"]]:
            view = self.vectors(image, features) if not dims else self.vectors(image.flip(dims), None)
            z, _ = self.flow(view)
            scores.append(z.pow(2).mean(dim=1))
        score = torch.stack(scores).mean(dim=0)
        return term_maps(image, flow=score), {"flow": score, "recon": torch.zeros_like(score)}, None
