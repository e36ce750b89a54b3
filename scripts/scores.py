"""Anomaly score of AE-FLOW, the paper's equation (2): ``S = beta * S_flow + (1 - beta) * S_recon``.

Both terms are kept as maps so that one definition serves image and pixel level (paper figures 5 and 6):

* flow map: per feature location, the channel-mean ``0.5 * z'^2`` (``nll``), or ``-exp`` of its negative
  (``density``, the paper's "negative probability density", as FastFlow computes it). The log-det of the flow
  is deliberately left out: it scores the flow, not the sample (measured: including it drops Chest X-ray AUC
  from about 82 to 58, see docs/README.md). The map is upsampled bilinearly to the image size.
* reconstruction map: ``-SSIM`` with an 11 x 11 Gaussian window and a *fixed* data range, so that a score never
  depends on which other images share its batch.

Each term can be standardised with statistics of normal images (``normalization="zscore"``), which makes the
two terms commensurate before the beta-weighted sum. Which term carries the signal differs between data sets
(measured: the flow term on Chest X-ray, where -SSIM points the wrong way, the reconstruction terms on skin
lesions), so ``beta_selection="validation"`` lets the validation split choose beta from ``BETA_GRID``; the
chosen beta and the operating threshold (best F1 on validation) are buffers that travel with the model.

``AnomalyScorer.fit`` is the one place where the scorer is calibrated on validation data: the term statistics on
its normal images, beta, the image-level operating threshold (best F1) and the pixel threshold of the anomaly mask
(a high quantile of normal images' map values, so the mask is in the same units as the map). Training's validation,
``scripts.ablations`` and every deployment path use it and ``image_scores``, nothing else.

Each term map is reduced to an image-level term (``mean`` as in equation (2); ``max`` and ``topk`` favour small,
local anomalies) and the terms are combined; the pixel map combines the standardised term maps the same way, so
with ``mean`` the image score is the map's mean. Which reduction fits depends on the anomalies (measured: ``mean``
on Chest X-ray's diffuse pneumonia, ``topk`` on the demo's small lesions), so ``reduction="validation"`` lets the
validation split choose it with beta, leaving ``mean`` only for a clear gain; the chosen reduction is a buffer too
(``reduction_index``).

>>> scorer = AnomalyScorer(beta=0.9)
>>> maps = scorer.term_maps(torch.randn(2, 8, 4, 4), torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64))
>>> scorer.combine(maps).shape, scorer.image_scores(maps)["score"].shape
(torch.Size([2, 1, 64, 64]), torch.Size([2]))
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from .losses import check_weight
from .metrics import auc_standard_error, best_f1_threshold
from .ssim import checked_ssim_settings, ssim_map

FLOW_SCORES = ("nll", "density")
REDUCTIONS = ("mean", "max", "topk")
REDUCTION_SETTINGS = (*REDUCTIONS, "validation")  # "validation": one of REDUCTIONS, chosen in ``fit``
NORMALIZATIONS = ("none", "zscore")
TERMS = ("flow", "recon")
BETA_SELECTIONS = ("fixed", "validation")
BETA_GRID = tuple(round(0.1 * step, 1) for step in range(11))
VOLUME_AGGREGATION = "max"
PIXELS_PER_IMAGE = 4096  # normal-image map values kept per image to fit the mask's pixel threshold


def volume_score(slice_scores: torch.Tensor) -> tuple[float, int]:
    """A volume's score and the slice it comes from: the maximum over its scored slices, since one anomalous
    slice makes the volume anomalous."""
    scores = torch.as_tensor(slice_scores).float().flatten()
    top = int(torch.argmax(scores))
    return float(scores[top]), top


def pixel_sample(score_map: torch.Tensor, count: int = PIXELS_PER_IMAGE) -> torch.Tensor:
    """(B, 1, H, W) -> (B, about count): an evenly strided, deterministic sample of each map's values.

    The stride is prime to the map's width, so the sample visits every column: a stride that divides it (16 at
    256 x 256) kept one column in 16, on the edges between the encoder's 16-pixel cells where the upsampled map is
    an average of two, and set the mask's quantile too low."""
    flat = score_map.flatten(1)
    step = max(1, flat.shape[1] // count)
    while step > 1 and math.gcd(step, score_map.shape[-1]) != 1:
        step -= 1
    return flat[:, ::step]


def _check_option(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; allowed: {', '.join(allowed)}.")
    return value


def flow_score_map(z_prime: torch.Tensor, form: str = "nll") -> torch.Tensor:
    """(B, C, h, w) -> (B, 1, h, w) negative log-density per location (constants dropped)."""
    nll = 0.5 * z_prime.pow(2).mean(dim=1, keepdim=True)
    return -torch.exp(-nll) if form == "density" else nll


def reduce_map(score_map: torch.Tensor, reduction: str = "mean", topk_fraction: float = 0.05) -> torch.Tensor:
    """(B, 1, H, W) -> (B,) image-level score."""
    flat = score_map.flatten(1)
    if reduction == "mean":
        return flat.mean(dim=1)
    if reduction == "max":
        return flat.amax(dim=1)
    k = max(1, int(round(flat.shape[1] * topk_fraction)))
    return flat.topk(k, dim=1).values.mean(dim=1)


class AnomalyScorer(nn.Module):
    """Equation (2) as maps; ``term_stats`` (mean, std of each image-level term on normal images) is a buffer,
    so a calibrated scorer travels inside ``models/model.pt`` and the exported TorchScript."""

    defaulted_entries = ("reduction_index",)  # model files before bundle 0.11.0 lack it (scripts.checkpoints)

    def __init__(
        self,
        beta: float = 0.9,
        flow_score: str = "nll",
        reduction: str = "mean",
        topk_fraction: float = 0.05,
        normalization: str = "zscore",
        data_range: float = 1.0,
        ssim_window: int = 11,
        beta_selection: str = "fixed",
        mask_quantile: float = 0.999,
    ):
        super().__init__()
        self.configured_beta = check_weight("beta", beta)
        self.register_buffer("beta_value", torch.tensor(self.configured_beta))
        self.beta_selection = _check_option("beta_selection", beta_selection, BETA_SELECTIONS)
        self.flow_score = _check_option("flow_score", flow_score, FLOW_SCORES)
        reduction = _check_option("score_reduction", reduction, REDUCTION_SETTINGS)
        self.reduction_selection = "validation" if reduction == "validation" else "fixed"
        # the reduction in use, an index into REDUCTIONS; "mean", the paper's, until validation chooses
        self.register_buffer(
            "reduction_index", torch.tensor(REDUCTIONS.index(reduction if reduction in REDUCTIONS else "mean"))
        )
        self.reduction_aucs: dict[str, float] = {}
        self.normalization = _check_option("score_normalization", normalization, NORMALIZATIONS)
        if not 0.0 < topk_fraction <= 1.0:
            raise ValueError(f"topk_fraction must lie in (0, 1], got {topk_fraction}.")
        self.topk_fraction = topk_fraction
        self.ssim_window, self.data_range = checked_ssim_settings(ssim_window, data_range)
        # rows: flow, recon; columns: mean, std.  Identity until calibrated.
        self.register_buffer("term_stats", torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        # operating point for deployment: score >= threshold means abnormal; NaN until chosen on validation data
        self.register_buffer("threshold", torch.tensor(float("nan")))
        # anomaly-mask threshold in the map's units: the mask_quantile of normal validation images' map values
        if not 0.0 < mask_quantile < 1.0:
            raise ValueError(f"mask_quantile must lie in (0, 1), got {mask_quantile}.")
        self.mask_quantile = float(mask_quantile)
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))

    @property
    def reduction(self) -> str:
        return REDUCTIONS[int(self.reduction_index)]

    @property
    def beta(self) -> float:
        return round(float(self.beta_value), 6)  # float32 storage; 0.9 stays 0.9 in reports

    def set_beta(self, beta: float) -> None:
        self.beta_value.fill_(check_weight("beta", beta))

    def term_maps(self, z_prime: torch.Tensor, image: torch.Tensor, reconstruction: torch.Tensor | None):
        """Both score terms as image-sized maps, plus the absolute residual used in the figures; without a
        reconstruction (its term unweighted, not computed) those two maps are NaN."""
        flow = flow_score_map(z_prime, self.flow_score)
        flow = F.interpolate(flow, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if reconstruction is None:
            missing = torch.full_like(flow, float("nan"))
            return {"flow": flow, "recon": missing, "residual": missing}
        recon = -ssim_map(image, reconstruction, self.data_range, self.ssim_window)
        residual = (image - reconstruction).abs().mean(dim=1, keepdim=True)
        return {"flow": flow, "recon": recon, "residual": residual}

    def standardize(self, term: str, value: torch.Tensor) -> torch.Tensor:
        if self.normalization == "none":
            return value
        mean, std = self.term_stats[TERMS.index(term)].to(value.device)  # terms gathered on the CPU, GPU model
        return (value - mean) / std

    def weight(self, term: str, beta: float | None = None) -> float:
        """A term's weight in equation (2): beta for the flow term, 1 - beta for the reconstruction term."""
        beta = float(self.beta_value if beta is None else beta)  # unrounded: zero means exactly zero
        return beta if term == "flow" else 1.0 - beta

    def combine(self, terms: dict[str, torch.Tensor], beta: float | None = None) -> torch.Tensor:
        """Equation (2) on term maps or on reduced image-level terms alike. A term of weight zero is left out,
        not multiplied by zero (the same sum to the last bit for a finite term), so it may be NaN: not computed."""
        beta = self.beta_value.cpu() if beta is None else beta  # a CPU scalar joins terms on any device
        if self.weight("recon", beta) == 0:
            return beta * self.standardize("flow", terms["flow"])
        if self.weight("flow", beta) == 0:
            return (1.0 - beta) * self.standardize("recon", terms["recon"])
        return beta * self.standardize("flow", terms["flow"]) + (1.0 - beta) * self.standardize("recon", terms["recon"])

    def reduce(self, score_map: torch.Tensor) -> torch.Tensor:
        return reduce_map(score_map, self.reduction, self.topk_fraction)

    def image_scores(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Image-level score and its two raw (unstandardised) terms."""
        terms = {name: self.reduce(maps[name]) for name in TERMS}
        return {"score": self.combine(terms), "score_flow": terms["flow"], "score_recon": terms["recon"]}

    def choose_beta(self, labels, terms: dict[str, torch.Tensor]) -> dict[float, float]:
        """Set the beta of ``BETA_GRID`` with the best AUC on these (validation) terms; ties go to the configured
        beta. Returns the AUC of every beta."""
        aucs = {beta: float(roc_auc_score(labels, self.combine(terms, beta).cpu().numpy())) for beta in BETA_GRID}
        best = max(aucs.values())
        chosen = min((b for b, auc in aucs.items() if auc >= best - 1e-12), key=lambda b: abs(b - self.configured_beta))
        self.set_beta(chosen)
        return aucs

    def choose_reduction(self, labels, terms_by_reduction: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
        """Set the reduction whose terms, calibrated and with beta chosen as ``fit`` does, give the best AUC on
        these (validation) labels, if it beats ``mean``, equation (2)'s own, by more than one standard error of
        mean's AUC on this many images (``auc_standard_error``); otherwise ``mean``. A small split's noise then
        does not move the score off the paper's (measured: on HAM10000's 198 validation images ``max`` won by 0.6
        points and lost 4.9 on test; on the demo's lesions ``topk`` wins by 10). Returns every reduction's AUC."""
        labels = np.asarray(labels)
        normal, labelled = torch.as_tensor(labels == 0), labels >= 0
        aucs = {}
        for reduction in REDUCTIONS:
            terms = terms_by_reduction[reduction]
            self.calibrate(terms["flow"][normal], terms["recon"][normal])
            if self.beta_selection == "validation":
                aucs[reduction] = max(
                    self.choose_beta(labels[labelled], {k: v[labelled] for k, v in terms.items()}).values()
                )
            else:
                aucs[reduction] = float(roc_auc_score(labels[labelled], self.combine(terms)[labelled].cpu().numpy()))
        best = max(aucs, key=aucs.get)
        margin = auc_standard_error(aucs["mean"], int((labels == 1).sum()), int((labels == 0).sum()))
        self.reduction_index.fill_(REDUCTIONS.index(best if aucs[best] > aucs["mean"] + margin else "mean"))
        return aucs

    @torch.no_grad()
    def fit(
        self,
        labels,
        terms: dict[str, torch.Tensor],
        normal_pixels: dict[str, torch.Tensor] | None = None,
        terms_by_reduction: dict[str, dict[str, torch.Tensor]] | None = None,
    ):
        """Calibrate on validation data (labels: 0 normal, 1 abnormal, -1 unknown); returns its scores.

        Term statistics come from the normal images; the reduction (with ``reduction="validation"``, from
        ``terms_by_reduction``: the terms under every reduction), beta (with ``beta_selection="validation"``) and
        the operating threshold need both classes; ``normal_pixels`` (term-map values of normal images, see
        ``pixel_sample``) give the pixel threshold of the anomaly mask. ``terms`` are those of ``self.reduction``
        before the call; after it, the scores are those of the reduction chosen.
        """
        labels = np.asarray(labels)
        normal, labelled = torch.as_tensor(labels == 0), labels >= 0
        both_classes = bool((labels == 0).any() and (labels == 1).any())
        self.reduction_aucs = {}
        if self.reduction_selection == "validation" and both_classes and terms_by_reduction:
            self.reduction_aucs = self.choose_reduction(labels, terms_by_reduction)
            terms = terms_by_reduction[self.reduction]
        self.calibrate(terms["flow"][normal], terms["recon"][normal])
        self.beta_aucs = {}
        if self.beta_selection == "validation" and both_classes:
            self.beta_aucs = self.choose_beta(labels[labelled], {k: v[labelled] for k, v in terms.items()})
        scores = self.combine(terms)
        if both_classes:
            self.threshold.fill_(best_f1_threshold(labels[labelled], scores[labelled].cpu().numpy()))
        if normal_pixels is not None and normal_pixels["flow"].numel():
            values = self.combine(normal_pixels).flatten().float()
            self.pixel_threshold.fill_(float(np.quantile(values.cpu().numpy(), self.mask_quantile)))
        return scores

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a model file from before bundle 0.11.0 has no reduction_index: its reduction is its configured one
        state_dict.setdefault(f"{prefix}reduction_index", self.reduction_index.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def calibrate(self, flow_terms: torch.Tensor, recon_terms: torch.Tensor) -> None:
        """Store mean and std of each image-level term, measured on normal images only."""
        for row, values in enumerate((flow_terms, recon_terms)):
            values = values.detach().float().flatten()
            if values.numel() < 2 or not torch.isfinite(values).all():
                raise ValueError("Score calibration needs at least two finite scores of normal images.")
            std = values.std().clamp_min(1e-8)
            self.term_stats[row] = torch.stack([values.mean(), std]).to(self.term_stats)
