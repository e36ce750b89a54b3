"""PatchCore (Roth et al., CVPR 2022): a memory bank of the frozen encoder's locally aggregated patch features.

Training is one pass over the normal images: every patch feature (the stride-16 map after a 3 x 3 average, the
paper's local aggregation) is collected, then the greedy k-center coreset keeps ``coreset_ratio`` of them (picked
in a random projection to ``projection_dim`` dimensions, as the paper does for speed). A test patch scores its
distance to the nearest bank entry; the image score is the largest patch score, reweighted by how isolated its
nearest neighbour is in the bank (the paper's equation 7, with ``reweight_neighbours`` = b). The patch map is
upsampled to the image and smoothed with a Gaussian (sigma ``map_sigma`` pixels), as the paper's anomaly maps.

The features are the same ones AE-FLOW's flow sees, from the same feature cache.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from ..encoders import build_encoder
from .base import ComparisonMethod, resize, term_maps

logger = logging.getLogger(__name__)
QUERY_CHUNK = 4096


def greedy_coreset(features: torch.Tensor, count: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of ``count`` rows chosen by greedy k-center selection (each new row the farthest from those chosen)."""
    generator = torch.Generator().manual_seed(seed)
    points = features.float()
    if points.shape[1] > projection_dim:  # Johnson-Lindenstrauss: distances kept up to a small factor
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
        points = points @ projection.to(points)
    squared_norms = points.pow(2).sum(1)
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = int(torch.randint(len(points), (1,), generator=generator))
    nearest = torch.full_like(squared_norms, float("inf"))
    distance = torch.empty_like(squared_norms)
    for index in range(count):
        if index:
            chosen[index] = torch.argmax(nearest)
        centre = points[chosen[index]]
        # |p - c|^2 = |p|^2 - 2 p.c + |c|^2: one matrix-vector product, no (N, d) temporary per step
        torch.mv(points, centre, out=distance)
        distance.mul_(-2.0).add_(squared_norms).add_(squared_norms[chosen[index]])
        torch.minimum(nearest, distance, out=nearest)
    return chosen


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances and indices of each query's ``k`` nearest bank rows, in chunks that bound the memory."""
    distances, indices = [], []
    for chunk in queries.split(QUERY_CHUNK):
        d, i = torch.cdist(chunk, bank).topk(k, dim=1, largest=False)
        distances.append(d)
        indices.append(i)
    return torch.cat(distances), torch.cat(indices)


class PatchCore(ComparisonMethod):
    method = "patchcore"
    variable_shape_entries = ("memory_bank",)

    def __init__(
        self,
        encoder: str = "efficientnet-lite0",
        encoder_weights: str = "imagenet",
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        neighbourhood: int = 3,
        reweight_neighbours: int = 9,
        map_sigma: float = 4.0,
        seed: int = 0,
        **common,
    ):
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must lie in (0, 1], got {coreset_ratio}.")
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be an odd patch size (1, 3, 5, ...), got {neighbourhood}.")
        super().__init__(
            encoder=encoder,
            encoder_weights=str(encoder_weights),
            coreset_ratio=coreset_ratio,
            projection_dim=projection_dim,
            neighbourhood=neighbourhood,
            reweight_neighbours=reweight_neighbours,
            map_sigma=map_sigma,
            seed=seed,
            **common,
        )
        self.encoder = build_encoder(encoder, encoder_weights)
        self.register_buffer("memory_bank", torch.zeros(0, self.encoder.out_channels))
        self.smooth = GaussianFilter(spatial_dims=2, sigma=map_sigma) if map_sigma > 0 else torch.nn.Identity()
        self._collected: list[torch.Tensor] = []

    def patches(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h * w, C) locally aggregated patch features."""
        k = self.settings["neighbourhood"]
        if k > 1:
            features = F.avg_pool2d(features, k, stride=1, padding=k // 2)
        return features.flatten(2).transpose(1, 2)

    def training_losses(self, image: torch.Tensor, features: torch.Tensor | None) -> None:
        with torch.no_grad():
            patches = self.patches(self.features_of(image, features).float())
        self._collected.append(patches.flatten(0, 1).cpu())
        return None

    def epoch_completed(self) -> None:
        """Build the memory bank from the patches of this pass (the only training PatchCore has)."""
        if not self._collected:
            return
        patches = torch.cat(self._collected)
        self._collected = []
        count = max(1, int(round(self.settings["coreset_ratio"] * len(patches))))
        if count < len(patches):
            logger.info("PatchCore: greedy coreset of %d of %d patch features", count, len(patches))
            patches = patches[greedy_coreset(patches, count, self.settings["projection_dim"], self.settings["seed"])]
        self.memory_bank = patches.to(self.memory_bank.device)

    def anomaly_terms(self, image: torch.Tensor, features: torch.Tensor | None):
        if not len(self.memory_bank):
            raise RuntimeError("PatchCore has no memory bank yet: train it (one pass over the normal images) first.")
        feature_map = self.features_of(image, features).float()
        batch, _, height, width = feature_map.shape
        patches = self.patches(feature_map)
        distances, indices = nearest_neighbours(patches.flatten(0, 1), self.memory_bank)
        patch_scores = distances[:, 0].view(batch, height * width)
        # equation 7: the most anomalous patch, weighted by the isolation of its nearest bank entry
        top = patch_scores.argmax(dim=1)
        rows = torch.arange(batch, device=image.device)
        nearest_entry = self.memory_bank[indices.view(batch, -1)[rows, top]]
        b = min(self.settings["reweight_neighbours"], len(self.memory_bank))
        _, support = nearest_neighbours(nearest_entry, self.memory_bank, b)
        support_distances = torch.linalg.vector_norm(
            patches[rows, top].unsqueeze(1) - self.memory_bank[support], dim=-1
        )
        weights = 1.0 - torch.softmax(support_distances, dim=1)[:, 0]
        image_score = weights * patch_scores[rows, top]
        maps = term_maps(image, flow=self.smooth(resize(patch_scores.view(batch, 1, height, width), image.shape[-2:])))
        return maps, {"flow": image_score, "recon": torch.zeros_like(image_score)}, None
