"""Fault injection on checkpoints: untrusted or foreign files are refused with the reason, and diverging training
(NaN loss or gradients) never leaves a non-finite checkpoint behind."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from conftest import assert_same_state
from ignite.engine import Engine
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
