"""Reproducible and interruptible training: the same seed gives the same metrics, and a run killed with SIGKILL
mid-epoch, then re-run with the same command, ends exactly where an uninterrupted run ends (a re-run with other
settings is refused).

Every run is a separate process that runs what ``python -m monai.bundle run`` runs (MONAI's bundle ``run`` with a
config, meta file, logging file and overrides); the killed one gets SIGKILL and is then launched again with the same
arguments. The processes are forked rather than started afresh only to skip re-importing MONAI, and all of them use
one thread, so that the runs compared do the same arithmetic.
"""

from __future__ import annotations

import json
import logging
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, assert_same_state, run_forked
from ignite.engine import Engine, Events
from monai.bundle.scripts import run as bundle_run
from scripts.checkpoints import FiniteCheckpointSaver, ResumeCheckpoint
from scripts.handlers import AnomalyMetricsHandler, EarlyStopOnValidation
from scripts.scores import AnomalyScorer
from torch import nn

EPOCHS = 3


def _override(bundle_root, dataset, out) -> dict:
    return {
        "bundle_root": str(bundle_root),
        "dataset_dir": str(dataset),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "eval"),
        **TINY_OVERRIDES,
        "epochs": EPOCHS,
    }


def _configs(bundle_root) -> dict:
    return {
        "config_file": str(bundle_root / "configs" / "train.json"),
        "meta_file": str(bundle_root / "configs" / "metadata.json"),
        "logging_file": str(bundle_root / "configs" / "logging.conf"),
    }


def _results(override) -> tuple[dict, dict]:
    metrics = json.load(open(f"{override['output_dir']}/val_metrics.json"))
    return metrics, torch.load(f"{override['ckpt_dir']}/model.pt", weights_only=True)


def _train(bundle_root, override) -> tuple[dict, dict]:
    assert run_forked(bundle_run, **_configs(bundle_root), **override) == 0
    return _results(override)


@pytest.fixture(scope="module")
def reference(bundle_root, tiny_dataset, tmp_path_factory):
    return _train(bundle_root, _override(bundle_root, tiny_dataset, tmp_path_factory.mktemp("reference")))


def _assert_same_model(state, expected, atol=0.0):
    assert_same_state(state, expected, atol)


def test_same_seed_gives_identical_runs(bundle_root, tiny_dataset, tmp_path, reference):
    metrics, state = _train(bundle_root, _override(bundle_root, tiny_dataset, tmp_path))
    assert metrics == reference[0]
    _assert_same_model(state, reference[1])


def _killed_in_epoch_2_then_rerun(bundle_root, override, tmp_path, capfd, other_settings=None) -> str:
    marker = str(tmp_path / "killed")
    # the fault: SIGKILL at the first iteration of epoch 2, once (the marker file keeps the re-run alive)
    kill = (
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, lambda e: e.state.epoch == 2 "
        f"and not os.path.exists({marker!r}) and (open({marker!r}, 'w').close() or os.kill(os.getpid(), 9)))"
    )
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({**override, "run": ["$import ignite", kill, "$@train#trainer.run()"]}))
    arguments = {**_configs(bundle_root), "args_file": str(args_file)}

    assert run_forked(bundle_run, **arguments) == -9
    resume_files = sorted(os.listdir(f"{override['ckpt_dir']}/resume"))
    assert resume_files == ["resume_checkpoint_1.pt"], resume_files  # complete files only, no temporary left
    capfd.readouterr()
    refusal = ""
    if other_settings:  # the killed run's command with other settings: refused, its state kept
        other_file = tmp_path / "other_args.json"
        other_file.write_text(json.dumps({**json.loads(args_file.read_text()), **other_settings}))
        assert run_forked(bundle_run, **{**arguments, "args_file": str(other_file)}) != 0
        refusal = capfd.readouterr().err
        assert sorted(os.listdir(f"{override['ckpt_dir']}/resume")) == resume_files

    assert run_forked(bundle_run, **arguments) == 0
    assert "Resumed training from" in "".join(capfd.readouterr())
    return refusal


def test_training_killed_mid_epoch_resumes_to_the_same_result(bundle_root, tiny_dataset, tmp_path, reference, capfd):
    override = _override(bundle_root, tiny_dataset, tmp_path)
    refusal = _killed_in_epoch_2_then_rerun(bundle_root, override, tmp_path, capfd, {"learning_rate": 0.002})
    assert "learning_rate 0.001 but this run uses 0.002" in refusal and "start afresh with --resume false" in refusal
    metrics, state = _results(override)
    expected_metrics, expected_state = reference
    for key, value in expected_metrics["paper_protocol"].items():
        assert metrics["paper_protocol"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    _assert_same_model(state, expected_state, atol=1e-4)
    final = torch.load(f"{override['ckpt_dir']}/resume/resume_checkpoint_{EPOCHS}.pt", weights_only=True)
    assert final["trainer"]["iteration"] == EPOCHS * final["trainer"]["epoch_length"]
    # train.json's wiring: the settings and the best-so-far records travel in the resume state
    assert final["settings"]["dataset_dir"] == str(tiny_dataset) and final["settings"]["learning_rate"] == 0.001
    assert [epoch for epoch, _ in final["early_stop"]["history"]] == list(range(1, EPOCHS + 1))
    kept = json.load(open(f"{override['output_dir']}/val_kept_metrics.json"))
    assert final["kept_metrics"]["kept_epoch"] == kept["epoch"]


def test_cosine_schedule_resumes_on_its_curve(bundle_root, tiny_dataset, tmp_path, capfd):
    """The scheduler is resume state: a run killed in epoch 2 continues the cosine where it was, not from the top."""
    override = {**_override(bundle_root, tiny_dataset, tmp_path), "lr_schedule": "cosine"}
    _killed_in_epoch_2_then_rerun(bundle_root, override, tmp_path, capfd)
    for epoch in (EPOCHS - 1, EPOCHS):
        saved = torch.load(f"{override['ckpt_dir']}/resume/resume_checkpoint_{epoch}.pt", weights_only=True)
        group = saved["optimizer"]["param_groups"][0]
        assert saved["lr_scheduler"]["last_epoch"] == epoch
        # annealed over the whole budget: lr_t = lr_0 (1 + cos(pi t / T)) / 2, zero at the last epoch
        expected = group["initial_lr"] * (1 + math.cos(math.pi * epoch / EPOCHS)) / 2
        assert group["lr"] == pytest.approx(expected, abs=1e-12), epoch


def test_a_checkpoint_from_before_the_lr_schedule_resumes_at_a_constant_rate_and_a_cosine_run_is_refused(
    bundle_root, tiny_dataset, tmp_path, reference, capfd
):
    """Bundles before 0.8.0 saved no scheduler state (they trained at a constant rate): such a checkpoint resumes
    with the constant schedule to the uninterrupted run's result, and a cosine schedule is refused with the remedy."""
    override = {**_override(bundle_root, tiny_dataset, tmp_path), "epochs": 1}
    _train(bundle_root, override)
    path = f"{override['ckpt_dir']}/resume/resume_checkpoint_1.pt"
    old = torch.load(path, weights_only=True)
    del old["lr_scheduler"]
    torch.save(old, path)
    cosine = {**override, "epochs": EPOCHS, "lr_schedule": "cosine"}
    assert run_forked(bundle_run, **_configs(bundle_root), **cosine) != 0
    assert "has no 'lr_scheduler' state" in capfd.readouterr().err and os.path.isfile(path)  # refused, nothing lost
    metrics, state = _train(bundle_root, {**override, "epochs": EPOCHS})
    expected_metrics, expected_state = reference
    assert metrics["paper_protocol"]["auc"] == pytest.approx(expected_metrics["paper_protocol"]["auc"], abs=1e-4)
    _assert_same_model(state, expected_state, atol=1e-4)


# train.json's validation wiring at engine level, with the validation AUC of each epoch chosen by the test:
SEPARATION = (1.0, 3.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)  # the validation AUC peaks at epoch 2


class _Killed(Exception):
    """The process killed in an epoch."""


def _simulated_training(out, separation=SEPARATION, epochs=8, patience=2, kill_in_epoch=None) -> dict | None:
    """AnomalyMetricsHandler (calibrating, writing the kept metrics) and the best-model saver on the validator,
    EarlyStopOnValidation and ResumeCheckpoint (last) on the trainer, wired as train.json wires them. The validation
    after epoch k separates the classes by ``separation[k - 1]``; the weights after epoch k are all k. Returns what
    the run leaves and the epochs it trained, or None when killed."""
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    noise = np.random.default_rng(3).normal(size=60)
    network = nn.Module()
    network.lin = nn.Linear(2, 1)
    network.scorer = AnomalyScorer(beta=1.0, beta_selection="fixed")
    optimizer = torch.optim.Adam(network.lin.parameters(), lr=1e-3)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    metrics = AnomalyMetricsHandler(network, calibrate=True, output_dir=str(out / "eval"))
    saver = FiniteCheckpointSaver(
        str(out / "models"),
        {"model": network},
        save_key_metric=True,
        key_metric_name="val_auc",
        key_metric_filename="model.pt",
    )
    trained = []

    def step(engine, batch):
        if engine.state.epoch == kill_in_epoch:
            raise _Killed()
        network.lin.weight.data.fill_(engine.state.epoch)
        trained.append(engine.state.epoch)

    trainer, validator = Engine(step), Engine(lambda engine, batch: None)

    @validator.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        epoch = trainer.state.epoch
        metrics.reset()
        scores = noise + separation[epoch - 1] * labels
        metrics.records.update(
            name=[str(k) for k in range(60)], label=list(labels), score_flow=list(scores), score_recon=[0.0] * 60
        )
        metrics.complete(SimpleNamespace(state=SimpleNamespace(metrics=engine.state.metrics, epoch=epoch)))

    saver.attach(validator)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: validator.run([0], max_epochs=1))
    early_stop = EarlyStopOnValidation(validator, patience=patience)
    early_stop.attach(trainer)
    save_dict = {"model": network, "optimizer": optimizer, "best_model": saver}
    save_dict.update(early_stop=early_stop, kept_metrics=metrics)
    settings = {"learning_rate": 1e-3, "epochs": epochs, "early_stop_patience": patience}
    ResumeCheckpoint(str(out / "models" / "resume"), save_dict, settings=settings).attach(trainer)
    try:
        trainer.run([0, 1], max_epochs=epochs)
    except _Killed:
        return None
    kept = json.loads((out / "eval" / "val_kept_metrics.json").read_text())
    model = torch.load(out / "models" / "model.pt", weights_only=True)
    return {
        "stopped_after": trainer.state.epoch,
        "kept_epoch": kept["epoch"],
        "kept_auc": kept["paper_protocol"]["auc"],
        "model_epoch": model["lin.weight"].flatten()[0].item(),
        "trained": sorted(set(trained)),
    }


def _ended(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "trained"}


def test_a_run_killed_after_its_best_epoch_resumes_to_the_uninterrupted_runs_end(tmp_path):
    """The early-stop count and the kept metrics are resume state: the re-run neither trains past the early stop
    nor writes the kept metrics of a later, worse epoch than the one model.pt holds."""
    uninterrupted = _simulated_training(tmp_path / "uninterrupted")
    assert _ended(uninterrupted) == {**_ended(uninterrupted), "stopped_after": 4, "kept_epoch": 2, "model_epoch": 2}
    assert _simulated_training(tmp_path / "killed", kill_in_epoch=4) is None
    resumed = _simulated_training(tmp_path / "killed")
    assert resumed["trained"] == [4] and _ended(resumed) == _ended(uninterrupted)


def test_a_resumed_run_warns_of_a_budget_that_ends_at_its_best_as_the_uninterrupted_run(tmp_path, caplog):
    rising = (1.0, 1.5, 2.0, 3.0)
    with caplog.at_level(logging.WARNING, logger="scripts.handlers"):
        _simulated_training(tmp_path / "uninterrupted", rising, epochs=4, patience=None)
    warning = [r.getMessage() for r in caplog.records if "budget ended at the best" in r.getMessage()]
    assert len(warning) == 1 and "at epoch 4" in warning[0]
    caplog.clear()
    assert _simulated_training(tmp_path / "killed", rising, epochs=4, patience=None, kill_in_epoch=4) is None
    with caplog.at_level(logging.WARNING, logger="scripts.handlers"):
        _simulated_training(tmp_path / "killed", rising, epochs=4, patience=None)
    assert [r.getMessage() for r in caplog.records if "budget ended at the best" in r.getMessage()] == warning


def test_a_run_that_stopped_early_is_complete_unless_its_budget_changes(tmp_path, caplog):
    stopped = _simulated_training(tmp_path)
    assert stopped["stopped_after"] == 4
    with caplog.at_level(logging.INFO, logger="scripts.checkpoints"):
        again = _simulated_training(tmp_path)  # the same command: nothing to train
    assert again["trained"] == [] and _ended(again) == _ended(stopped) and "nothing to train" in caplog.text
    # more patience counts on from the two validations without improvement so far: one more, then it stops
    more_patience = _simulated_training(tmp_path, patience=3)
    assert more_patience["trained"] == [5] and more_patience["stopped_after"] == 5
    assert more_patience["kept_epoch"] == more_patience["model_epoch"] == 2
    more_epochs = _simulated_training(tmp_path, patience=3, epochs=10)  # a larger budget: it goes on, and stops
    assert more_epochs["trained"] == [6] and more_epochs["stopped_after"] == 6
