"""The metrics handler's calibration on validation data: normalisation, beta choice and the stored threshold, and
the deployment protocol that applies that threshold unchanged to the test set."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scripts.handlers import AnomalyMetricsHandler
from scripts.scores import TERMS, AnomalyScorer
from torch import nn


def _records(handler, labels, flow, recon):
    handler.reset()
    handler.records.update(
        name=[f"image_{k}.png" for k in range(len(labels))],
        volume=[""] * len(labels),
        label=list(labels),
        score_flow=list(flow),
        score_recon=list(recon),
    )


def test_validation_calibration_then_deployment_protocol(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    # the reconstruction term separates, the flow term is noise: a validation-chosen beta must move towards 0
    flow, recon = 5.0 + rng.normal(size=80), -0.8 + 0.05 * rng.normal(size=80) + 0.2 * labels
    network = nn.Module()
    network.scorer = AnomalyScorer(beta=0.9, beta_selection="validation")
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}))

    validation = AnomalyMetricsHandler(network, prefix="val_", calibrate=True)
    _records(validation, labels, flow, recon)
    validation.complete(engine)
    scorer = network.scorer
    assert scorer.beta <= 0.3
    assert scorer.term_stats[0, 0].item() == pytest.approx(flow[labels == 0].mean(), rel=1e-5)
    assert torch.isfinite(scorer.threshold)
    assert engine.state.metrics["val_auc"] > 0.9
    state = network.state_dict()  # everything chosen on validation travels in the checkpoint
    assert {"scorer.beta_value", "scorer.threshold", "scorer.term_stats"} <= set(state)

    test = AnomalyMetricsHandler(network, prefix="test_", output_dir=str(tmp_path))
    _records(test, labels, flow + 0.1, recon)
    test.complete(engine)
    summary = json.load(open(tmp_path / "test_metrics.json"))
    deployed = summary["deployment_protocol"]
    assert deployed["threshold"] == scorer.threshold.item()
    assert summary["scorer"]["beta"] == scorer.beta and summary["scorer"]["beta_selection"] == "validation"
    assert deployed["auc"] == summary["paper_protocol"]["auc"]  # same scores, only the threshold differs


def test_validation_chooses_the_reduction_from_the_term_maps_and_reports_its_terms(tmp_path):
    """With ``score_reduction: validation`` the handler reduces each validation map every way; a small bright spot
    on the abnormal maps makes a peak-seeking reduction win, and the written scores are the chosen reduction's."""
    from scripts.scores import REDUCTIONS, reduce_map

    rng = np.random.default_rng(1)
    network = nn.Module()
    network.scorer = AnomalyScorer(beta=0.9, reduction="validation", beta_selection="validation")
    handler = AnomalyMetricsHandler(network, prefix="val_", calibrate=True, output_dir=str(tmp_path))
    handler.reset()
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}, batch={}, epoch=1))
    for labels in (torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),) * 6:
        maps = {name: torch.as_tensor(rng.normal(size=(8, 1, 16, 16)), dtype=torch.float32) for name in TERMS}
        maps["flow"][labels == 1, :, 4:6, 4:6] += 5.0
        terms = {name: reduce_map(maps[name], "mean") for name in TERMS}  # what the network reports today
        engine.state.output = {
            "score": network.scorer.combine(terms),
            "label": labels,
            **{f"score_{name}": terms[name] for name in TERMS},
            **{f"map_{name}": maps[name] for name in TERMS},
        }
        handler.collect(engine)
    handler.complete(engine)
    scorer = network.scorer
    assert scorer.reduction in ("max", "topk") and set(scorer.reduction_aucs) == set(REDUCTIONS)
    assert scorer.reduction_aucs[scorer.reduction] > scorer.reduction_aucs["mean"] + 0.1
    assert engine.state.metrics["val_auc"] == pytest.approx(scorer.reduction_aucs[scorer.reduction])
    kept = json.loads((tmp_path / "val_kept_metrics.json").read_text())["scorer"]
    assert (kept["reduction"], kept["reduction_selection"]) == (scorer.reduction, "validation")
    with open(tmp_path / "val_scores.csv") as f:
        written = [float(line.split(",")[3]) for line in f.read().splitlines()[1:]]  # score_flow
    assert written == pytest.approx(handler.records[f"score_flow@{scorer.reduction}"])


def test_fixed_beta_is_left_alone():
    network = nn.Module()
    network.scorer = AnomalyScorer(beta=0.9, beta_selection="fixed")
    handler = AnomalyMetricsHandler(network, calibrate=True)
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    _records(handler, labels, np.arange(20.0), -np.linspace(0.9, 0.5, 20))
    handler.complete(SimpleNamespace(state=SimpleNamespace(metrics={})))
    assert network.scorer.beta == 0.9


def test_kept_metrics_follow_the_best_validation_epoch(tmp_path):
    """``val_metrics.json`` is the latest epoch's; ``val_kept_metrics.json`` the best one's, as the saver keeps."""
    network = nn.Module()
    network.scorer = AnomalyScorer(beta=1.0, beta_selection="fixed")
    handler = AnomalyMetricsHandler(network, calibrate=True, output_dir=str(tmp_path))
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    rng = np.random.default_rng(3)
    noise = rng.normal(size=20)
    for epoch, separation in ((1, 1.0), (2, 0.2), (3, 3.0), (4, 1.0)):
        _records(handler, labels, noise + separation * labels, np.zeros(20) + rng.normal(size=20) * 1e-3)
        handler.complete(SimpleNamespace(state=SimpleNamespace(metrics={}, epoch=epoch)))
    latest = json.loads((tmp_path / "val_metrics.json").read_text())
    kept = json.loads((tmp_path / "val_kept_metrics.json").read_text())
    assert kept["epoch"] == 3 and kept["paper_protocol"]["auc"] > latest["paper_protocol"]["auc"]


def _train_with_validation_aucs(aucs, patience, interval=1):
    """A trainer whose validation after epoch k reports ``aucs[k - 1]``; returns the epochs it ran."""
    from ignite.engine import Engine, Events
    from scripts.handlers import EarlyStopOnValidation

    trainer, validator = Engine(lambda engine, batch: None), Engine(lambda engine, batch: None)
    validator.state.metrics = {}

    @trainer.on(Events.EPOCH_COMPLETED(every=interval))
    def validate(engine):  # attached first, as ValidationHandler is in train.json
        validator.state.metrics["val_auc"] = aucs[engine.state.epoch - 1]

    EarlyStopOnValidation(validator, patience=patience, interval=interval).attach(trainer)
    trainer.run([0, 1], max_epochs=len(aucs))
    return trainer.state.epoch


def test_early_stop_waits_patience_validations_after_the_best():
    aucs = [0.70, 0.80, 0.85, 0.84, 0.85, 0.83, 0.90, 0.91]
    assert _train_with_validation_aucs(aucs, patience=3) == 6  # best at 3; 4, 5, 6 do not beat it
    assert _train_with_validation_aucs(aucs, patience=4) == 8  # epoch 7 beats it in time
    assert _train_with_validation_aucs(aucs, patience=None) == 8
    # as `python -m monai.bundle run ... --early_stop_patience null` (or 3) hands it over: text
    assert _train_with_validation_aucs(aucs, patience="null") == 8
    assert _train_with_validation_aucs(aucs, patience="3") == 6
    # validation every second epoch: patience counts validations, not epochs
    assert _train_with_validation_aucs([0.9, 0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6, 0.5, 0.5], 2, interval=2) == 6


def test_a_budget_that_ends_at_the_best_validation_says_so(caplog):
    still_rising = "The budget ended at the best validation so far"
    with caplog.at_level(logging.WARNING, logger="scripts.handlers"):
        _train_with_validation_aucs([0.70, 0.80, 0.85], patience=None)
    assert still_rising in caplog.text and "0.8500 at epoch 3, up from 0.8000" in caplog.text
    caplog.clear()  # validation every second epoch of 5: the last one validated is epoch 4
    with caplog.at_level(logging.WARNING, logger="scripts.handlers"):
        _train_with_validation_aucs([0.70, 0.80, 0.85, 0.90, 0.95], patience=None, interval=2)
    assert "0.9000 at epoch 4, up from 0.8000" in caplog.text
    for aucs, patience in (([0.70, 0.90, 0.85], None), ([0.9, 0.8, 0.7, 0.95], 2), ([0.9], None)):
        caplog.clear()  # a peak before the end, an early stop (at epoch 3), a single validation: no warning
        with caplog.at_level(logging.WARNING, logger="scripts.handlers"):
            _train_with_validation_aucs(aucs, patience=patience)
        assert still_rising not in caplog.text


def test_early_stop_refuses_negative_patience():
    from scripts.handlers import EarlyStopOnValidation

    with pytest.raises(ValueError, match="early_stop_patience"):
        EarlyStopOnValidation(validator=None, patience=-1)
    with pytest.raises(ValueError, match="early_stop_patience"):
        EarlyStopOnValidation(validator=None, patience="five")


def test_lr_schedule_refuses_unknown_names_and_empty_budgets():
    from scripts.engines import lr_scheduler

    optimizer = torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        lr_scheduler(optimizer, "step")
    with pytest.raises(ValueError, match="epochs >= 1"):
        lr_scheduler(optimizer, "cosine", epochs=0)
    constant = lr_scheduler(optimizer, "constant", epochs=3)
    for _ in range(3):
        optimizer.step()
        constant.step()
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_a_validation_split_of_one_class_is_refused_before_training(tmp_path):
    """Its AUC is NaN: no epoch would ever beat the first, and model.pt would silently stay epoch 1's."""
    from ignite.engine import Engine
    from monai.data import DataLoader, Dataset

    network = nn.Module()
    network.scorer = AnomalyScorer(beta=1.0, beta_selection="fixed")
    validator = Engine(lambda engine, batch: None)
    validator.data_loader = DataLoader(Dataset([{"image": f"{k}.png", "label": 0} for k in range(6)]))
    refusal = "validation split has 6 normal .* and 0 abnormal .* needs both"
    with pytest.raises(ValueError, match=refusal):
        AnomalyMetricsHandler(network, calibrate=True, output_dir=str(tmp_path)).attach(validator)
    AnomalyMetricsHandler(network, prefix="test_").attach(validator)  # a test set is only measured: no refusal
    handler = AnomalyMetricsHandler(network, calibrate=True, output_dir=str(tmp_path))
    _records(handler, np.zeros(6, int), np.arange(6.0), np.zeros(6))  # labels known only from the batches
    with pytest.raises(ValueError, match="validation split has 6 normal .* and 0 abnormal"):
        handler.complete(SimpleNamespace(state=SimpleNamespace(metrics={}, epoch=1)))


def test_early_stop_counts_on_from_the_validations_of_a_resumed_run():
    """Its validations so far are its state: the count and best score, replayed, hold with another patience too."""
    from ignite.engine import Engine
    from scripts.handlers import EarlyStopOnValidation

    history = [[1, 0.70], [2, 0.90], [3, 0.85], [4, 0.88]]
    for patience, counter in ((3, 2), (None, None)):
        handler = EarlyStopOnValidation(validator=None, patience=patience)
        handler.attach(Engine(lambda engine, batch: None))
        handler.load_state_dict({"history": history})
        assert handler.state_dict() == {"history": history}
        if counter is not None:
            assert (handler.stopper.counter, handler.stopper.best_score) == (counter, 0.90)


def test_kept_metrics_are_only_replaced_by_a_better_epoch_than_the_interrupted_runs_best(tmp_path):
    network = nn.Module()
    network.scorer = AnomalyScorer(beta=1.0, beta_selection="fixed")
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    noise = np.random.default_rng(3).normal(size=20)
    before = AnomalyMetricsHandler(network, calibrate=True, output_dir=str(tmp_path))
    _records(before, labels, noise + 3.0 * labels, np.zeros(20))
    before.complete(SimpleNamespace(state=SimpleNamespace(metrics={}, epoch=2)))
    resumed = AnomalyMetricsHandler(network, calibrate=True, output_dir=str(tmp_path))
    resumed.load_state_dict(before.state_dict())
    _records(resumed, labels, noise + 0.5 * labels, np.zeros(20))  # a worse epoch after the resume
    resumed.complete(SimpleNamespace(state=SimpleNamespace(metrics={}, epoch=3)))
    assert json.loads((tmp_path / "val_kept_metrics.json").read_text())["epoch"] == 2
    assert resumed.state_dict() == {"kept_auc": before.kept_auc, "kept_epoch": 2}
