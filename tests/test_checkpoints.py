"""Fault injection on checkpoints: untrusted or foreign files are refused with the reason, and diverging training
(NaN loss or gradients) never leaves a non-finite checkpoint behind."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from conftest import assert_same_state
from ignite.engine import Engine, Events
from scripts.checkpoints import (
    CheckpointError,
    FiniteCheckpointSaver,
    ResumeCheckpoint,
    VerifiedCheckpointLoader,
    latest_resume_checkpoint,
    nonfinite_entries,
)
from scripts.engines import AEFlowTrainer
from scripts.losses import AEFlowLoss
from scripts.networks import AEFlow

SIZE = 32


def _net(**kwargs) -> AEFlow:
    torch.manual_seed(0)
    return AEFlow(**{"encoder_weights": "none", "image_size": SIZE, "flow_blocks": 1, **kwargs})


def _load(path, network):
    VerifiedCheckpointLoader(load_path=str(path), load_dict={"model": network})(Engine(lambda e, b: None))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(_net().state_dict(), path)
    return path


def test_matching_checkpoint_loads(saved):
    network = _net()
    for p in network.parameters():
        p.data.zero_()
    _load(saved, network)
    assert_same_state(network.state_dict(), torch.load(saved, weights_only=True))


@pytest.mark.parametrize("cut", [0, 100, -50])
def test_corrupt_checkpoint_is_refused(saved, tmp_path, cut):
    broken = tmp_path / "model.pt"
    data = saved.read_bytes()
    broken.write_bytes(b"" if cut == 0 else data[:cut])
    with pytest.raises(CheckpointError, match="model.pt is corrupt"):
        _load(broken, _net())


def test_checkpoint_holding_code_objects_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": argparse.Namespace(x=1)}, path)  # unpickling it would need an arbitrary class
    with pytest.raises(CheckpointError, match="not a plain weights file"):
        _load(path, _net())


def test_checkpoint_of_another_architecture_is_refused(saved):
    with pytest.raises(CheckpointError, match=r"another architecture \(differs in flow"):
        _load(saved, _net(flow_blocks=2))


def test_checkpoint_of_another_encoder_is_refused(saved):
    with pytest.raises(CheckpointError, match="another encoder than this network's 'efficientnet-lite1'"):
        _load(saved, _net(encoder="efficientnet-lite1"))


def _batches(n=3, batch=2):
    generator = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(batch, 1, SIZE, SIZE, generator=generator)} for _ in range(n)]


class _FaultyLoss(AEFlowLoss):
    """Equation (1), but NaN at one iteration (or a NaN gradient, with ``in_gradient``)."""

    def __init__(self, at_call: int, in_gradient: bool = False):
        super().__init__(alpha=0.5)
        self.at_call, self.in_gradient, self.calls = at_call, in_gradient, 0

    def forward(self, *args):
        parts = super().forward(*args)
        self.calls += 1
        if self.calls == self.at_call:
            loss = parts["loss"]
            if self.in_gradient:
                loss.register_hook(lambda grad: grad * float("nan"))
            else:
                parts["loss"] = loss * float("nan")
        return parts


def _train(tmp_path, loss, nonfinite, epochs=2):
    network = _net()
    optimizer = torch.optim.Adam(network.trainable_parameters(), lr=1e-3)
    trainer = AEFlowTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=_batches(),
        network=network,
        optimizer=optimizer,
        loss_function=loss,
        nonfinite=nonfinite,
        amp=False,
    )
    FiniteCheckpointSaver(str(tmp_path / "final"), {"model": network}, save_final=True).attach(trainer)
    ResumeCheckpoint(str(tmp_path / "resume"), {"model": network, "optimizer": optimizer}).attach(trainer)
    return trainer, network


def _saved_states(tmp_path):
    return [torch.load(p, weights_only=True) for p in sorted(tmp_path.rglob("*.pt"))]


def test_nan_loss_raises_naming_epoch_and_iteration_and_checkpoints_stay_finite(tmp_path):
    trainer, _ = _train(tmp_path, _FaultyLoss(at_call=5), "raise")  # 3 batches per epoch: epoch 2, iteration 5
    with pytest.raises(FloatingPointError, match="Non-finite loss at epoch 2, iteration 5"):
        trainer.run()
    states = _saved_states(tmp_path)
    assert len(states) >= 2  # the epoch-1 resume checkpoint and the final one written on the exception
    assert all(not nonfinite_entries(state) for state in states)


@pytest.mark.parametrize("in_gradient", [False, True])
def test_nan_batch_is_skipped_and_counted(tmp_path, in_gradient):
    trainer, network = _train(tmp_path, _FaultyLoss(at_call=2, in_gradient=in_gradient), "skip")
    trainer.run()
    assert trainer.state.skipped_batches == 1
    assert not nonfinite_entries(network.state_dict())
    assert all(not nonfinite_entries(state) for state in _saved_states(tmp_path))
    assert (
        torch.load(latest_resume_checkpoint(tmp_path / "resume"), weights_only=True)["trainer"]["skipped_batches"] == 1
    )


def test_non_finite_weights_are_never_saved(tmp_path):
    network = _net()
    engine = Engine(lambda e, b: None)
    saver = FiniteCheckpointSaver(str(tmp_path), {"model": network}, save_final=True, final_filename="model.pt")
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    good = torch.load(tmp_path / "model.pt", weights_only=True)
    with torch.no_grad():
        next(network.decoder.parameters()).fill_(float("nan"))
    engine.run([0], max_epochs=1)  # a diverged network at the end of a run: the good file must stay
    kept = torch.load(tmp_path / "model.pt", weights_only=True)
    assert_same_state(kept, good)  # the good file stays


def _resume_with(tmp_path, network, epochs=1, **others) -> Engine:
    """A run of ``network`` (and ``others``, e.g. its optimiser) in the resume folder an earlier ``_train`` used."""
    engine = Engine(lambda e, b: None)
    ResumeCheckpoint(str(tmp_path / "resume"), {"model": network, **others}).attach(engine)
    engine.run([0], max_epochs=epochs)
    return engine


def test_an_unfinished_runs_checkpoint_is_refused_naming_the_encoder_it_was_saved_with(tmp_path):
    trainer, _ = _train(tmp_path, _FaultyLoss(at_call=5), "raise")  # stops in epoch 2: its epoch-1 state is kept
    with pytest.raises(FloatingPointError):
        trainer.run()
    with pytest.raises(
        CheckpointError, match="saved with encoder 'efficientnet-lite0' but this run uses 'efficie"
    ) as refused:
        _resume_with(tmp_path, _net(encoder="efficientnet-lite1"))
    assert "of a run that did not complete: give this run its own --ckpt_dir, or start afresh" in str(refused.value)
    assert latest_resume_checkpoint(tmp_path / "resume").name == "resume_checkpoint_1.pt"  # nothing lost


def test_a_completed_runs_state_extends_that_run_and_yields_to_a_run_of_other_settings(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="scripts.checkpoints")
    trainer, network = _train(tmp_path, AEFlowLoss(alpha=0.5), "raise", epochs=1)
    trainer.run()
    assert (tmp_path / "resume" / "finished.json").is_file()
    extended = _resume_with(tmp_path, network, epochs=2)  # the same run, more epochs: it resumes
    assert "Resumed training from" in caplog.text and extended.state.epoch == 2
    caplog.clear()
    other = _net(encoder="efficientnet-lite1")  # the README's demo, then Chest X-ray, in one models/ folder
    fresh = _resume_with(tmp_path, other)
    assert "Its run had completed, so this run starts afresh" in caplog.text and fresh.state.epoch == 1
    saved = torch.load(latest_resume_checkpoint(tmp_path / "resume"), weights_only=True)
    assert saved["signature"]["encoder"] == "efficientnet-lite1" and saved["trainer"]["iteration"] == 1


def test_a_checkpoint_that_fits_the_network_but_not_the_optimiser_is_refused_with_the_remedy(tmp_path):
    trainer, network = _train(tmp_path, AEFlowLoss(alpha=0.5), "raise", epochs=1)
    trainer.run()
    params = list(network.trainable_parameters())
    two_groups = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=1e-3)
    with pytest.raises(CheckpointError, match="cannot be loaded into this run.*start afresh with --resume false"):
        _resume_with(tmp_path, network, epochs=2, optimizer=two_groups)


def test_an_unset_threshold_is_not_a_numerical_fault():
    state = _net().state_dict()
    assert torch.isnan(state["scorer.threshold"]) and not nonfinite_entries(state)  # NaN: not chosen yet
    state["scorer.threshold"] = torch.tensor(float("inf"))
    state["flow.module_list.0.subnet1.0.weight"] = torch.full((1,), float("nan"))
    assert sorted(nonfinite_entries(state)) == ["flow.module_list.0.subnet1.0.weight", "scorer.threshold"]


SETTINGS = {"learning_rate": 0.001, "alpha": 0.5, "dataset_dir": "/data/a", "seed": 1, "epochs": 2}


def _run_with_settings(tmp_path, settings, epochs=2, fail_in_epoch=None, schedule_epochs=None, save_dict=None):
    """A small run in ``tmp_path / "resume"`` whose settings are ``settings``; returns it and the steps it trained
    (a cosine schedule over ``schedule_epochs``, stepped each epoch, where given)."""
    torch.manual_seed(0)
    network = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=float(settings["learning_rate"]))
    steps = []

    def step(engine, batch):
        if engine.state.epoch == fail_in_epoch:
            raise RuntimeError("killed")
        optimizer.step()
        steps.append(engine.state.iteration)

    engine = Engine(step)
    objects = {"model": network, "optimizer": optimizer, **(save_dict or {})}
    if schedule_epochs:
        objects["lr_scheduler"] = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule_epochs)
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: objects["lr_scheduler"].step())
    ResumeCheckpoint(str(tmp_path / "resume"), objects, settings=settings).attach(engine)
    engine.run([0, 1], max_epochs=epochs)
    return engine, steps


def test_a_killed_run_resumed_with_other_settings_is_refused_naming_each_with_both_values(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="scripts.checkpoints")
    with pytest.raises(RuntimeError, match="killed"):
        _run_with_settings(tmp_path, SETTINGS, fail_in_epoch=2)
    with pytest.raises(CheckpointError) as refused:
        _run_with_settings(tmp_path, {**SETTINGS, "learning_rate": 0.002, "alpha": 0.7})
    message = str(refused.value)
    assert "learning_rate 0.001 but this run uses 0.002" in message and "alpha 0.5 but this run uses 0.7" in message
    assert "did not complete: give this run its own --ckpt_dir, or start afresh with --resume false" in message
    assert latest_resume_checkpoint(tmp_path / "resume").name == "resume_checkpoint_1.pt"  # nothing lost
    # the budget may grow (early_stop_patience too), and a value typed as text on the command line is the same
    extended = {**SETTINGS, "epochs": 3, "early_stop_patience": "5", "learning_rate": "1e-3"}
    engine, steps = _run_with_settings(tmp_path, extended, epochs=3)
    assert "Resumed training from" in caplog.text and engine.state.epoch == 3 and steps == [3, 4, 5, 6]


def test_a_completed_run_rerun_on_other_data_trains_afresh_and_the_same_command_trains_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="scripts.checkpoints")
    _run_with_settings(tmp_path, SETTINGS)
    engine, steps = _run_with_settings(tmp_path, SETTINGS)
    assert not steps and engine.state.epoch == 2 and "completed at epoch 2: nothing to train" in caplog.text
    caplog.clear()
    engine, steps = _run_with_settings(tmp_path, {**SETTINGS, "dataset_dir": "/data/b"})
    assert "dataset_dir '/data/a' but this run uses '/data/b'" in caplog.text and "starts afresh" in caplog.text
    assert steps == [1, 2, 3, 4]  # all of it, not "resumed" at its last epoch
    saved = torch.load(latest_resume_checkpoint(tmp_path / "resume"), weights_only=True)
    assert saved["settings"]["dataset_dir"] == "/data/b"


def test_a_cosine_run_is_not_stretched_over_a_new_budget(tmp_path, caplog):
    """The schedule anneals over the epochs the run started with (its T_max is resume state): more epochs would
    go on at a learning rate of zero, or restart the curve, so the extension is refused with the remedy."""
    _run_with_settings(tmp_path, SETTINGS, schedule_epochs=2)
    with pytest.raises(CheckpointError, match="over the 2 epochs .* keep --epochs 2, or start afresh with --resume f"):
        _run_with_settings(tmp_path, {**SETTINGS, "epochs": 4}, epochs=4, schedule_epochs=4)
    caplog.set_level(logging.INFO, logger="scripts.checkpoints")
    _, steps = _run_with_settings(tmp_path, SETTINGS, schedule_epochs=2)  # the same budget: complete, as it was
    assert not steps and "nothing to train" in caplog.text


def test_a_checkpoint_from_before_the_settings_resumes_with_a_warning(tmp_path, caplog):
    """Bundles before the settings check saved none: the run resumes as it did then, saying it cannot check."""
    with pytest.raises(RuntimeError, match="killed"):
        _run_with_settings(tmp_path, SETTINGS, fail_in_epoch=2)
    path = latest_resume_checkpoint(tmp_path / "resume")
    old = torch.load(path, weights_only=True)
    del old["settings"]
    torch.save(old, path)
    caplog.set_level(logging.INFO, logger="scripts.checkpoints")
    _, steps = _run_with_settings(tmp_path, SETTINGS)
    assert "predates the 'settings' state: its run's settings cannot be compared" in caplog.text and steps == [3, 4]
