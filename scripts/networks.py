"""AE-FLOW: frozen encoder -> normalizing flow -> decoder (paper section 2, figure 2).

The network describes itself: its settings and the ``input_spec`` of its preprocessing are its PyTorch extra state,
saved inside the state dict and checked on every load (``scripts.model_file``).

In eval mode ``forward`` returns one tensor, the pixel-level anomaly map (B, 1, H, W), because MONAI's tools
(Deploy's bundle operator, ``verify_net_in_out``, ``ckpt_export``, ``onnx_export``) keep a single output. In
train mode it returns ``FlowOutput`` (z', log|det J|, x') for the loss, as anomalib's FastFlow does; going
through ``forward`` keeps DistributedDataParallel's gradient hooks in play. ``score`` serves evaluation.

>>> net = AEFlow(encoder="efficientnet-lite0", encoder_weights="none", image_size=64)
>>> net(torch.rand(2, 1, 64, 64)).shape
torch.Size([2, 1, 64, 64])
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Sequence

import torch
from torch import nn

from .decoder import Decoder
from .encoders import STRIDE, build_encoder
from .flow import build_flow
from .model_file import check_description, describe, encode
from .preprocessing import resolve_spec
from .scores import AnomalyScorer

DEFAULT_INPUT_SPEC = {"kind": "volume"}
FEATURE_NORMS = ("none", "layernorm", "layernorm_no_affine")


def build_feature_norm(name: str, feature_shape: tuple[int, int, int]) -> nn.Module:
    """The normalisation of the frozen features before the flow: FastFlow's LayerNorm over (C, h, w), learnt with the
    flow (``layernorm``); the same without its elementwise affine (``layernorm_no_affine``); or none, the paper's.

    The affine's log-determinant is not part of the flow's likelihood, so with ``layernorm`` the loss is unbounded
    below: shrinking the affine lowers 0.5 z'^2 for free while the flow's counted log-det expands it back. A flow-only
    probe on Chest X-ray collapses after about 730 steps that way (docs/results/feature_norm_objective.json); early
    stopping on validation ends the shipped designs long before."""
    if name not in FEATURE_NORMS:
        raise ValueError(f"Unknown feature_norm {name!r}; allowed: {', '.join(FEATURE_NORMS)}.")
    if name == "none":
        return nn.Identity()
    return nn.LayerNorm(feature_shape, elementwise_affine=name == "layernorm")


class FlowOutput(NamedTuple):
    """What one pass through the flow and decoder produces; ``log_jac_det`` is needed by the loss only."""

    z_prime: torch.Tensor
    log_jac_det: torch.Tensor
    reconstruction: torch.Tensor


def checked_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (int(image_size), int(image_size)) if isinstance(image_size, (int, float)) else tuple(image_size)
    if len(size) != 2 or any(s <= 0 or s % STRIDE for s in size):
        raise ValueError(
            f"image_size {list(size)} cannot be reduced to a whole feature map: both sides must be positive "
            f"multiples of the encoder stride {STRIDE} (e.g. 256, the paper's size)."
        )
    return size


class AnomalyNetwork(nn.Module):
    """What every network of the bundle has (AE-FLOW and the comparison methods of ``scripts.baselines``), so that
    the engines, evaluation, model files and deployment paths serve any of them: its ``method`` name, ``settings``
    and ``input_spec`` saved as its extra state and checked on load, the input size and channels it takes, and the
    frozen ``encoder`` (not trained, and what the feature cache runs)."""

    method = ""

    def _set_inputs(self, image_size: int | Sequence[int], in_channels: int, input_spec: dict | None) -> None:
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (colour), got {in_channels}.")
        self.image_size = checked_image_size(image_size)
        self.in_channels = in_channels
        self.input_spec = resolve_spec(input_spec or DEFAULT_INPUT_SPEC)

    def get_extra_state(self) -> torch.Tensor:
        """What this network is, saved with its weights (``scripts.model_file``: JSON text as a uint8 tensor)."""
        return encode(describe(self.settings, self.input_spec, self.method))

    def set_extra_state(self, state) -> None:
        """Refuse a model file made for another network, naming every setting that differs."""
        signature = inspect.signature(type(self)).parameters
        defaults = {k: p.default for k, p in signature.items() if k in self.settings}
        check_description(state, self.method, self.settings, self.input_spec, defaults)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything but the frozen encoder (for AE-FLOW: the flow and the decoder, paper section 3.2)."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.") and p.requires_grad]

    def check_input(self, image: torch.Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != self.in_channels or tuple(image.shape[-2:]) != self.image_size:
            raise ValueError(
                f"{self.method} expects images of shape (B, {self.in_channels}, {self.image_size[0]}, "
                f"{self.image_size[1]}), got {tuple(image.shape)}."
            )

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.check_input(image)
        return self.encoder(image)

    def features_of(self, image: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """The frozen encoder's features: the cached ones when given (``scripts.feature_cache``), else computed."""
        return self.encode(image) if features is None else features


class AEFlow(AnomalyNetwork):
    """The three replaceable parts plus the scorer of equation (2); only ``flow`` and ``decoder`` train."""

    method = "ae-flow"

    def __init__(
        self,
        encoder: str = "efficientnet-lite0",
        encoder_weights: str = "imagenet",
        image_size: int | Sequence[int] = 256,
        in_channels: int = 1,
        subnet: str = "resnet",
        flow_blocks: int = 8,
        flow_clamp: float = 2.0,
        subnet_hidden_ratio: float = 1.0,
        flow_init: str = "identity",
        output_activation: str = "sigmoid",
        beta: float = 0.9,
        flow_score: str = "nll",
        score_reduction: str = "mean",
        score_topk_fraction: float = 0.05,
        score_normalization: str = "zscore",
        data_range: float = 1.0,
        ssim_window: int = 11,
        beta_selection: str = "fixed",
        mask_quantile: float = 0.999,
        feature_norm: str = "none",
        input_spec: dict | None = None,
    ):
        super().__init__()
        self._set_inputs(image_size, in_channels, input_spec)
        self.settings = {
            "encoder": encoder,
            "encoder_weights": str(encoder_weights),
            "image_size": list(self.image_size),
            "in_channels": in_channels,
            "subnet": subnet,
            "flow_blocks": flow_blocks,
            "flow_clamp": flow_clamp,
            "subnet_hidden_ratio": subnet_hidden_ratio,
            "flow_init": flow_init,
            "output_activation": output_activation,
            "beta": beta,
            "flow_score": flow_score,
            "score_reduction": score_reduction,
            "score_topk_fraction": score_topk_fraction,
            "score_normalization": score_normalization,
            "data_range": data_range,
            "ssim_window": ssim_window,
            "beta_selection": beta_selection,
            "mask_quantile": mask_quantile,
            "feature_norm": feature_norm,
        }
        self.encoder = build_encoder(encoder, encoder_weights)
        feature_size = (self.image_size[0] // STRIDE, self.image_size[1] // STRIDE)
        self.feature_shape = (self.encoder.out_channels, *feature_size)
        self.feature_norm = build_feature_norm(feature_norm, self.feature_shape)
        self.flow = (
            build_flow(
                *self.feature_shape,
                subnet=subnet,
                n_blocks=flow_blocks,
                clamp=flow_clamp,
                hidden_ratio=subnet_hidden_ratio,
                init=flow_init,
            )
            if flow_blocks > 0
            else None
        )
        self.decoder = Decoder(self.encoder.out_channels, self.encoder.skip_channels, in_channels, output_activation)
        self.skip_unweighted_terms = False  # how this process runs, not a setting (network_from_file)
        self.scorer = AnomalyScorer(
            beta=beta,
            flow_score=flow_score,
            reduction=score_reduction,
            topk_fraction=score_topk_fraction,
            normalization=score_normalization,
            data_range=data_range,
            ssim_window=ssim_window,
            beta_selection=beta_selection,
            mask_quantile=mask_quantile,
        )

    def flow_only(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z', log|det J|) of the (normalised) frozen features."""
        features = self.feature_norm(features)
        if self.flow is None:  # flow_blocks = 0: the plain autoencoder baseline of the paper's table 1
            return features, features.new_zeros(features.shape[0])
        return self.flow(features)

    def flow_decode(self, features: torch.Tensor) -> FlowOutput:
        z_prime, log_jac_det = self.flow_only(features)
        return FlowOutput(z_prime, log_jac_det, self.decoder(z_prime))

    def score(self, image: torch.Tensor, features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Everything evaluation needs from one pass: term maps, combined map, image scores, reconstruction.

        With ``skip_unweighted_terms`` (inference) and a reconstruction term of weight zero (beta 1, as validation
        chose on Chest X-ray), the decoder and the SSIM map are not run: the score and the map are the same to the
        last bit, and the reconstruction, its maps and ``score_recon`` are NaN."""
        features = self.features_of(image, features)
        if self.skip_unweighted_terms and self.scorer.weight("recon") == 0:
            z_prime, reconstruction = self.flow_only(features)[0], None
        else:
            z_prime, _, reconstruction = self.flow_decode(features)
        maps = self.scorer.term_maps(z_prime, image, reconstruction)
        result = {f"map_{name}": value for name, value in maps.items()}
        result["anomaly_map"] = self.scorer.combine(maps)
        result.update(self.scorer.image_scores(maps))
        result["reconstruction"] = torch.full_like(image, float("nan")) if reconstruction is None else reconstruction
        return result

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor | FlowOutput:
        """``features`` (from the feature cache) skips the frozen encoder."""
        out = self.flow_decode(self.features_of(image, features))
        if self.training:
            return out
        return self.scorer.combine(self.scorer.term_maps(out.z_prime, image, out.reconstruction))
