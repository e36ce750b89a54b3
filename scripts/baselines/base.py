"""What a comparison method shares with AE-FLOW, so that everything downstream of the network serves it unchanged.

A method's network has AE-FLOW's surface: ``settings`` and ``input_spec`` saved as its extra state with its method
name (``scripts.model_file``), ``image_size`` and ``in_channels``, ``encode`` for the frozen encoder (so the feature
cache serves it), ``score`` returning the same dict as ``AEFlow.score``, ``forward`` returning the anomaly map in
eval mode, and an ``AnomalyScorer`` that validation calibrates (term statistics, threshold, mask threshold) and
that travels in the model file. Evaluation, inference, MONAI Deploy and MONAI Label then score it as they score
AE-FLOW, through ``AnomalyInferer``.

The scorer's two slots keep their names in every file (``score_flow`` and ``score_recon`` columns): for a
comparison method ``flow`` holds its feature- or latent-space term and ``recon`` its image-space term, and ``beta``
(fixed) weights them as the method's paper does.

Training goes through ``scripts.engines.BaselineTrainer``, which asks the network for its losses
(``training_losses``; ``discriminator_losses`` for adversarial methods), calls ``epoch_completed`` at the end of
each training epoch and ``pretrain`` once before the first.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..networks import AnomalyNetwork
from ..scores import AnomalyScorer


class ComparisonMethod(AnomalyNetwork):
    """Base of the comparison methods: common settings, the scorer and the score dict."""

    # buffers whose size the training data decides (a memory bank): loaded at the file's size, not checked
    variable_shape_entries: tuple[str, ...] = ()

    def __init__(
        self,
        image_size: int | Sequence[int] = 256,
        in_channels: int = 1,
        beta: float = 1.0,
        score_normalization: str = "zscore",
        mask_quantile: float = 0.999,
        input_spec: dict | None = None,
        **settings,
    ):
        super().__init__()
        self._set_inputs(image_size, in_channels, input_spec)
        self.settings = {
            "image_size": list(self.image_size),
            "in_channels": in_channels,
            "beta": beta,
            "score_normalization": score_normalization,
            "mask_quantile": mask_quantile,
            **settings,
        }
        self.scorer = AnomalyScorer(
            beta=beta, normalization=score_normalization, beta_selection="fixed", mask_quantile=mask_quantile
        )

    def anomaly_terms(self, image: torch.Tensor, features: torch.Tensor | None):
        """(term maps {"flow", "recon", "residual"} at image size, image-level terms {"flow", "recon"},
        reconstruction or None)."""
        raise NotImplementedError

    def training_losses(self, image: torch.Tensor, features: torch.Tensor | None) -> dict | None:
        """``{"loss": ..., other parts}`` for the optimiser, or None when the method learns nothing by gradient."""
        raise NotImplementedError

    def score(self, image: torch.Tensor, features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.check_input(image)
        maps, terms, reconstruction = self.anomaly_terms(image, features)
        result = {f"map_{name}": value for name, value in maps.items()}
        result["anomaly_map"] = self.scorer.combine(maps)
        result["score"] = self.scorer.combine(terms)
        result["score_flow"], result["score_recon"] = terms["flow"], terms["recon"]
        # no reconstruction (feature-space methods): the figures' reconstruction row stays blank
        result["reconstruction"] = torch.full_like(image, float("nan")) if reconstruction is None else reconstruction
        return result

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(image, features)["anomaly_map"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.variable_shape_entries:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def term_maps(
    image: torch.Tensor,
    flow: torch.Tensor | None = None,
    recon: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> dict:
    """The term maps ``score`` combines, at image size. ``flow`` is a map (B, 1, H, W) or one value per image (B,):
    a method without localisation contributes that value everywhere. A missing term is zero; ``residual`` (the
    figures' |x - x'| row) is ``recon`` unless given."""
    zeros = image.new_zeros(image.shape[0], 1, *image.shape[-2:])
    if flow is not None and flow.ndim == 1:
        flow = flow.view(-1, 1, 1, 1).expand_as(zeros)
    recon = zeros if recon is None else recon
    return {
        "flow": zeros if flow is None else flow,
        "recon": recon,
        "residual": recon if residual is None else residual,
    }


def resize(image: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """The image at another size: a GAN's own (area averaging down), or back to the input's (bilinear up)."""
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if tuple(image.shape[-2:]) == size:
        return image
    mode = "area" if image.shape[-1] > size[-1] else "bilinear"
    return F.interpolate(image, size=size, mode=mode)
