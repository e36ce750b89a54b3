"""Reproducible and interruptible training: the same seed gives the same metrics, and a run killed with SIGKILL
mid-epoch, then re-run with the same command, ends exactly where an uninterrupted run ends.

Every run is a separate process that runs what ``python -m monai.bundle run`` runs (MONAI's bundle ``run`` with a
config, meta file, logging file and overrides); the killed one gets SIGKILL and is then launched again with the same
arguments. The processes are forked rather than started afresh only to skip re-importing MONAI, and all of them use
one thread, so that the runs compared do the same arithmetic.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import TINY_OVERRIDES, assert_same_state, run_forked
from monai.bundle.scripts import run as bundle_run

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


def _killed_in_epoch_2_then_rerun(bundle_root, override, tmp_path, capfd) -> None:
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

    assert run_forked(bundle_run, **arguments) == 0
    assert "Resumed training from" in "".join(capfd.readouterr())


def test_training_killed_mid_epoch_resumes_to_the_same_result(bundle_root, tiny_dataset, tmp_path, reference, capfd):
    override = _override(bundle_root, tiny_dataset, tmp_path)
    _killed_in_epoch_2_then_rerun(bundle_root, override, tmp_path, capfd)
    metrics, state = _results(override)
    expected_metrics, expected_state = reference
    for key, value in expected_metrics["paper_protocol"].items():
        assert metrics["paper_protocol"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    _assert_same_model(state, expected_state, atol=1e-4)
    final = torch.load(f"{override['ckpt_dir']}/resume/resume_checkpoint_{EPOCHS}.pt", weights_only=True)
    assert final["trainer"]["iteration"] == EPOCHS * final["trainer"]["epoch_length"]


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
