"""Equations (1) and (2) on inputs whose values are known by hand."""

import math

import numpy as np
import pytest
import torch
from scripts.losses import HALF_LOG_2PI, AEFlowLoss, flow_nll
from scripts.scores import REDUCTIONS, AnomalyScorer, flow_score_map, reduce_map
from scripts.ssim import ssim_map


def test_flow_nll_normalisations_by_hand():
    z = torch.ones(2, 4, 2, 2)  # 16 dims, each contributing 0.5 * 1 + 0.5 * log(2 pi)
    log_det = torch.tensor([0.0, 16.0])
    per_dim = flow_nll(z, log_det, "nats_per_dim")
    torch.testing.assert_close(per_dim, torch.tensor([0.5 + HALF_LOG_2PI, 0.5 + HALF_LOG_2PI - 1.0]))
    torch.testing.assert_close(flow_nll(z, log_det, "sum"), per_dim * 16)
    torch.testing.assert_close(flow_nll(z, log_det, "bits_per_dim"), per_dim / math.log(2))
    with pytest.raises(ValueError, match="nats_per_dim"):
        flow_nll(z, log_det, "per_pixel")


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_equation_1_weights_flow_and_mse(alpha):
    z = torch.zeros(2, 4, 2, 2)
    recon = torch.full((2, 1, 16, 16), 0.5)
    target = torch.full((2, 1, 16, 16), 0.7)
    parts = AEFlowLoss(alpha=alpha)(z, torch.zeros(2), recon, target)
    torch.testing.assert_close(parts["loss_flow"], torch.tensor(HALF_LOG_2PI))
    torch.testing.assert_close(parts["loss_recon"], torch.tensor(0.04))
    torch.testing.assert_close(parts["loss"], torch.tensor(alpha * HALF_LOG_2PI + (1 - alpha) * 0.04))


def test_ssim_loss_option_is_zero_for_identical_images():
    image = torch.rand(2, 1, 32, 32)
    parts = AEFlowLoss(alpha=0.0, recon_loss="ssim")(torch.zeros(2, 4, 2, 2), torch.zeros(2), image, image)
    assert abs(float(parts["loss"])) < 1e-5


@pytest.mark.parametrize("channels,data_range", [(1, 1.0), (3, 255.0)])
def test_ssim_loss_equals_monais_ssim_loss(channels, data_range):
    """The separable-window loss is MONAI's SSIMLoss, computed about 5x cheaper."""
    from monai.losses import SSIMLoss

    torch.manual_seed(1)
    target = torch.rand(3, channels, 48, 48) * data_range
    recon = (target + torch.randn_like(target) * 0.2 * data_range).clamp(0, data_range)
    ours_input, reference_input = recon.clone().requires_grad_(True), recon.clone().requires_grad_(True)
    loss = AEFlowLoss(alpha=0.5, recon_loss="ssim", data_range=data_range)
    ours = loss(torch.zeros(3, 4, 2, 2), torch.zeros(3), ours_input, target)
    reference = SSIMLoss(spatial_dims=2, data_range=data_range, win_size=11)(reference_input, target)
    torch.testing.assert_close(ours["loss_recon"], reference, atol=1e-6, rtol=1e-5)
    assert float(reference) > 0.05  # noisy reconstructions: a loss that ignored its input would fail the comparison
    (2 * ours["loss"]).backward()  # (1 - alpha) = 0.5: the reconstruction part's gradient, with its own backward
    reference.backward()
    scale = reference_input.grad.abs().max()
    torch.testing.assert_close(ours_input.grad / scale, reference_input.grad / scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,value", [("alpha", -0.1), ("alpha", 1.5)])
def test_weights_outside_unit_interval_are_rejected(name, value):
    with pytest.raises(ValueError, match=f"{name} must lie in \\[0, 1\\]"):
        AEFlowLoss(alpha=value)


def test_beta_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match="beta must lie in"):
        AnomalyScorer(beta=2.0)


def test_flow_score_map_forms():
    z = torch.zeros(1, 3, 2, 2)
    z[0, :, 0, 0] = 2.0  # channel-mean of 0.5 z^2 is 2 at one location
    nll = flow_score_map(z, "nll")
    assert nll.shape == (1, 1, 2, 2)
    assert nll[0, 0, 0, 0] == 2.0 and nll[0, 0, 1, 1] == 0.0
    torch.testing.assert_close(flow_score_map(z, "density"), -torch.exp(-nll))


def test_ssim_map_is_one_for_identical_and_window_is_fixed_range():
    image = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(ssim_map(image, image), torch.ones(1, 1, 32, 32), atol=1e-5, rtol=0)
    # a fixed data range: the SSIM of one pair does not change when a brighter image shares the batch
    other = torch.rand(1, 1, 32, 32) * 0.5
    alone = ssim_map(image, other)
    in_batch = ssim_map(torch.cat([image, image * 0 + 1]), torch.cat([other, other]))[:1]
    torch.testing.assert_close(alone, in_batch)


@pytest.mark.parametrize("channels,data_range", [(1, 1.0), (3, 255.0)])
def test_ssim_map_equals_monais_ssim(channels, data_range):
    """The export-friendly SSIM is MONAI's, channel-averaged, inside the valid-convolution area."""
    from monai.metrics.regression import KernelType, compute_ssim_and_cs

    torch.manual_seed(0)
    image = torch.rand(2, channels, 40, 40) * data_range
    recon = (image + torch.randn_like(image) * 0.1 * data_range).clamp(0, data_range)
    reference, _ = compute_ssim_and_cs(
        recon, image, 2, [11, 11], [1.5, 1.5], data_range=data_range, kernel_type=KernelType.GAUSSIAN
    )
    ours = ssim_map(image, recon, data_range=data_range)
    torch.testing.assert_close(ours[..., 5:-5, 5:-5], reference.mean(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert ours.shape == (2, 1, 40, 40)


def test_reductions_by_hand():
    score_map = torch.arange(100.0).view(1, 1, 10, 10)
    assert reduce_map(score_map, "mean").item() == pytest.approx(49.5)
    assert reduce_map(score_map, "max").item() == 99.0
    assert reduce_map(score_map, "topk", topk_fraction=0.05).item() == pytest.approx(97.0)


def test_equation_2_with_zscore_calibration():
    scorer = AnomalyScorer(beta=0.9, normalization="zscore")
    scorer.calibrate(torch.tensor([1.0, 3.0]), torch.tensor([-0.9, -0.7]))  # means 2, -0.8; stds sqrt(2), sqrt(.02)
    terms = {"flow": torch.tensor([2.0 + math.sqrt(2)]), "recon": torch.tensor([-0.8 - 2 * math.sqrt(0.02)])}
    torch.testing.assert_close(scorer.combine(terms), torch.tensor([0.9 * 1.0 + 0.1 * -2.0]))
    plain = AnomalyScorer(beta=0.9, normalization="none")
    torch.testing.assert_close(plain.combine(terms), 0.9 * terms["flow"] + 0.1 * terms["recon"])


def test_image_score_of_mean_reduction_is_mean_of_anomaly_map():
    scorer = AnomalyScorer(beta=0.7, reduction="mean")
    scorer.calibrate(torch.tensor([0.5, 1.5, 1.0]), torch.tensor([-0.9, -0.5, -0.7]))
    maps = scorer.term_maps(torch.randn(2, 8, 4, 4), torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64))
    scores = scorer.image_scores(maps)
    torch.testing.assert_close(scores["score"], scorer.combine(maps).mean(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores["score_recon"], maps["recon"].mean(dim=(1, 2, 3)))


def _fit_terms(informative: str, rng) -> tuple[np.ndarray, dict]:
    labels = np.r_[np.zeros(60, int), np.ones(60, int)]
    signal, noise = rng.normal(size=120) + 3.0 * labels, rng.normal(size=120)
    pair = (signal, noise) if informative == "flow" else (noise, signal)
    return labels, {name: torch.tensor(values, dtype=torch.float32) for name, values in zip(("flow", "recon"), pair)}


@pytest.mark.parametrize("informative, expected_beta", [("flow", 1.0), ("recon", 0.0)])
def test_fit_chooses_the_beta_of_the_term_that_separates(informative, expected_beta):
    labels, terms = _fit_terms(informative, np.random.default_rng(2))
    scorer = AnomalyScorer(beta=0.5, beta_selection="validation")
    scores = scorer.fit(labels, terms)
    assert scorer.beta_aucs[scorer.beta] == max(scorer.beta_aucs.values())
    assert abs(scorer.beta - expected_beta) <= 0.3
    assert scorer.beta_aucs[expected_beta] > scorer.beta_aucs[1.0 - expected_beta]
    torch.testing.assert_close(scores, scorer.combine(terms))  # fit returns the scores of the fitted scorer
    normal = torch.as_tensor(labels == 0)
    torch.testing.assert_close(
        scorer.term_stats[0], torch.stack([terms["flow"][normal].mean(), terms["flow"][normal].std()])
    )
    assert float(scorer.threshold) in scores.tolist()  # the best-F1 operating point is an observed score


def test_fit_breaks_beta_ties_towards_the_configured_value():
    labels = np.array([0, 0, 1, 1])
    values = torch.tensor([0.1, 0.2, 0.8, 0.9])  # every beta separates perfectly
    scorer = AnomalyScorer(beta=0.7, beta_selection="validation")
    scorer.fit(labels, {"flow": values, "recon": values.clone()})
    assert scorer.beta == 0.7


def test_fit_without_both_classes_keeps_beta_and_leaves_the_threshold_unset():
    scorer = AnomalyScorer(beta=0.9, beta_selection="validation")
    scorer.fit(
        np.zeros(4, int), {"flow": torch.tensor([1.0, 2.0, 3.0, 4.0]), "recon": torch.tensor([0.1, 0.3, 0.2, 0.4])}
    )
    assert scorer.beta == 0.9 and scorer.beta_aucs == {} and torch.isnan(scorer.threshold)


def _terms_by_reduction(anomaly: str, rng) -> tuple[np.ndarray, dict]:
    """Noise maps of 40 normal and 40 abnormal images; the anomaly either a small bright spot (local) or a
    slight shift of the whole map (diffuse)."""
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    maps = torch.as_tensor(rng.normal(size=(80, 1, 32, 32)), dtype=torch.float32)
    if anomaly == "local":
        maps[40:, :, 10:13, 10:13] += 4.0
    else:
        maps[40:] += 0.15
    return labels, {r: {"flow": reduce_map(maps, r), "recon": reduce_map(maps.flip(0), r)} for r in REDUCTIONS}


@pytest.mark.parametrize("anomaly, expected", [("local", ("max", "topk")), ("diffuse", ("mean",))])
def test_fit_chooses_the_reduction_that_separates_on_validation(anomaly, expected):
    labels, by_reduction = _terms_by_reduction(anomaly, np.random.default_rng(0))
    scorer = AnomalyScorer(beta=0.9, reduction="validation", beta_selection="validation")
    assert scorer.reduction == "mean" and scorer.reduction_selection == "validation"  # equation (2)'s until fitted
    scores = scorer.fit(labels, by_reduction["mean"], terms_by_reduction=by_reduction)
    assert scorer.reduction in expected and set(scorer.reduction_aucs) == set(REDUCTIONS)
    assert scorer.reduction_aucs[scorer.reduction] == max(scorer.reduction_aucs.values())
    assert scorer.beta == 1.0  # the recon terms here are the flow's maps shuffled across labels: no signal
    chosen = by_reduction[scorer.reduction]
    torch.testing.assert_close(scores, scorer.combine(chosen))  # calibrated on the chosen reduction's terms
    normal = torch.as_tensor(labels == 0)
    torch.testing.assert_close(
        scorer.term_stats[0], torch.stack([chosen["flow"][normal].mean(), chosen["flow"][normal].std()])
    )
    fixed = AnomalyScorer(beta=0.9, reduction="mean", beta_selection="validation")
    fixed.fit(labels, by_reduction["mean"], terms_by_reduction=by_reduction)  # a fixed reduction is not chosen
    assert fixed.reduction == "mean" and fixed.reduction_aucs == {}


def test_a_reduction_better_by_less_than_the_validation_noise_leaves_mean():
    """``max`` beats ``mean`` on these 40 validation images, but by less than one standard error of the AUC."""
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    rng = np.random.default_rng(3)
    signal = torch.as_tensor(rng.normal(size=40) + 1.0 * labels, dtype=torch.float32)
    noise = torch.as_tensor(rng.normal(size=40), dtype=torch.float32)
    by_reduction = {
        "mean": {"flow": signal, "recon": noise},
        "max": {"flow": signal + 0.15 * torch.as_tensor(labels, dtype=torch.float32), "recon": noise},
        "topk": {"flow": signal, "recon": noise},
    }
    scorer = AnomalyScorer(beta=1.0, reduction="validation")
    scorer.fit(labels, by_reduction["mean"], terms_by_reduction=by_reduction)
    assert scorer.reduction_aucs["max"] > scorer.reduction_aucs["mean"] and scorer.reduction == "mean"


def test_the_chosen_reduction_travels_with_the_weights_and_old_files_keep_their_own():
    scorer = AnomalyScorer(reduction="validation")
    scorer.reduction_index.fill_(REDUCTIONS.index("topk"))
    state = scorer.state_dict()
    loaded = AnomalyScorer(reduction="validation")
    loaded.load_state_dict(state)
    assert loaded.reduction == "topk"
    del state["reduction_index"]  # a scorer saved before bundle 0.11.0
    old = AnomalyScorer(reduction="max")
    old.load_state_dict(state)
    assert old.reduction == "max"


def test_fit_sets_the_mask_threshold_at_the_quantile_of_normal_map_values():
    scorer = AnomalyScorer(beta=1.0, normalization="none", mask_quantile=0.99)
    pixels = {"flow": torch.arange(1000, dtype=torch.float32).view(10, 100), "recon": torch.zeros(10, 100)}
    scorer.fit(np.array([0, 0, 1]), {"flow": torch.tensor([0.0, 1.0, 5.0]), "recon": torch.zeros(3)}, pixels)
    assert float(scorer.pixel_threshold) == pytest.approx(np.quantile(np.arange(1000), 0.99))


@pytest.mark.parametrize("beta, missing", [(1.0, "recon"), (0.0, "flow")])
def test_a_term_of_weight_zero_is_left_out_so_it_may_be_missing(beta, missing):
    """The sum without the term equals the sum with it times zero, to the last bit, so an unweighted term that was
    not computed (NaN) changes nothing."""
    scorer = AnomalyScorer(beta=beta)
    scorer.term_stats.copy_(torch.tensor([[0.3, 0.2], [-0.5, 0.1]]))
    terms = {"flow": torch.randn(2, 1, 8, 8), "recon": torch.randn(2, 1, 8, 8)}
    absent = {**terms, missing: torch.full_like(terms[missing], float("nan"))}
    assert torch.equal(scorer.combine(absent), scorer.combine(terms))
    assert torch.isfinite(scorer.combine(absent)).all()
    assert torch.isnan(AnomalyScorer(beta=0.5).combine(absent)).all()  # a weighted term must be there


def test_ssim_stays_float32_under_autocast():
    """bfloat16 cannot resolve E[x^2] - E[x]^2: the map and the loss are float32 whatever autocast says."""
    torch.manual_seed(2)
    image = torch.rand(2, 1, 48, 48)
    recon = (image + 0.1 * torch.randn_like(image)).clamp(0, 1)
    reference = ssim_map(image, recon)
    low = recon.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = ssim_map(image, recon)
        loss = AEFlowLoss(alpha=0.0, recon_loss="ssim")(torch.zeros(2, 4, 2, 2), torch.zeros(2), low, image)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, reference, atol=0, rtol=0)
    loss["loss"].backward()
    assert low.grad is not None and torch.isfinite(low.grad).all()


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11 pixels a side"):
        ssim_map(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_an_even_ssim_window_or_a_non_positive_range_is_refused_when_built_not_at_the_first_validation():
    from scripts.losses import AEFlowLoss
    from scripts.scores import AnomalyScorer

    for build in (AnomalyScorer, AEFlowLoss):
        for window in (10, 1, 0):
            with pytest.raises(ValueError, match="ssim_window must be an odd number of pixels"):
                build(ssim_window=window)
        with pytest.raises(ValueError, match="data_range must be above 0"):
            build(data_range=0)
        assert build(ssim_window=7).ssim_window == 7


def test_the_mask_threshold_sample_visits_every_column_of_the_upsampled_map():
    """At 256 x 256 a stride of 16 kept only the columns between the encoder's 16-pixel cells, where the upsampled
    map averages two cells, and set the mask's quantile too low."""
    import torch.nn.functional as F
    from scripts.scores import pixel_sample

    for size in (128, 256, 512):
        columns = torch.arange(size).float().expand(1, 1, size, size)
        assert set(pixel_sample(columns).long().flatten().tolist()) == set(range(size)), size
    cells = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    upsampled = F.interpolate(cells, size=(256, 256), mode="bilinear", align_corners=False)
    full = torch.quantile(upsampled.flatten()[::5], 0.999)
    assert torch.quantile(pixel_sample(upsampled).flatten(), 0.999) == pytest.approx(float(full), rel=0.02)
