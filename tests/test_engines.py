"""Training precision (``train_amp``) and boolean keys typed on the command line.

``train_amp`` runs the network's forward pass under autocast (bfloat16 on a CPU) while equation (1) stays in float32:
the SSIM of a half-precision reconstruction would subtract nearly equal numbers. ``python -m monai.bundle run ...
--resume false`` hands the config the text "false", which every boolean key must read as false.
"""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from scripts.checkpoints import ResumeCheckpoint
from scripts.deploy import AnomalyOutputWriter
from scripts.engines import AEFlowTrainer
from scripts.feature_cache import FeatureCacheDataset
from scripts.losses import AEFlowLoss
from scripts.networks import AEFlow
from scripts.options import flag

SIZE = 32


def _batches(n=2, batch=2):
    generator = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(batch, 1, SIZE, SIZE, generator=generator)} for _ in range(n)]


class _RecordingLoss(AEFlowLoss):
    def __init__(self):
        super().__init__(alpha=0.5, recon_loss="ssim")
        self.dtypes, self.values = [], []

    def forward(self, *args):
        self.dtypes.append(tuple(arg.dtype for arg in args))
        parts = super().forward(*args)
        self.values.append(float(parts["loss"]))
        return parts


@pytest.mark.parametrize("train_amp", ["true", "false"])
def test_train_amp_runs_the_network_in_bfloat16_and_the_loss_in_float32(train_amp):
    torch.manual_seed(0)
    network = AEFlow(encoder_weights="none", image_size=SIZE, flow_blocks=1)
    decoder_dtypes = []
    network.decoder.register_forward_hook(lambda module, args, out: decoder_dtypes.append(out.dtype))
    loss = _RecordingLoss()
    before = [p.detach().clone() for p in network.trainable_parameters()]
    trainer = AEFlowTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=_batches(),
        network=network,
        optimizer=torch.optim.Adam(network.trainable_parameters(), lr=1e-3),
        loss_function=loss,
        amp=train_amp,  # as the command line types it
    )
    trainer.run()
    assert trainer.amp is (train_amp == "true")
    assert set(decoder_dtypes) == {torch.bfloat16 if train_amp == "true" else torch.float32}
    assert loss.dtypes and all(dtype == torch.float32 for dtypes in loss.dtypes for dtype in dtypes)
    assert all(math.isfinite(value) for value in loss.values)
    assert all(not torch.equal(b, p) for b, p in zip(before, network.trainable_parameters()))  # it trained


def _amp_trainer(batches: int, init_scale: float) -> AEFlowTrainer:
    """A float16-style run on the CPU: a CPU GradScaler plays the part CUDA's plays beside float16 autocast."""
    torch.manual_seed(0)
    network = AEFlow(encoder_weights="none", image_size=SIZE, flow_blocks=1)
    trainer = AEFlowTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=_batches(n=batches),
        network=network,
        optimizer=torch.optim.Adam(network.trainable_parameters(), lr=1e-3),
        loss_function=AEFlowLoss(alpha=0.5),
        amp=True,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer.add_event_handler(Events.STARTED, lambda engine: setattr(engine, "scaler", scaler))  # run() makes one
    return trainer


def test_a_loss_scale_overflow_is_skipped_by_the_scaler_and_training_goes_on():
    """The first CUDA runs stopped at a float16 scale overflow (an infinite scaled gradient) as if the flow had
    diverged. Here the first batch's gradient overflows, as at a too-large scale; the scaler must skip that step,
    halve its scale and train on."""
    trainer = _amp_trainer(batches=3, init_scale=2.0**16)
    overflows = iter([True])
    first = next(iter(trainer.network.trainable_parameters()))
    first.register_hook(lambda grad: grad * float("inf") if next(overflows, False) else grad)
    before = [p.detach().clone() for p in trainer.network.trainable_parameters()]
    trainer.run()
    assert trainer.scaler.get_scale() == 2.0**15  # one overflow seen, the scale halved once
    assert trainer.state.skipped_batches == 0  # not counted as divergence
    assert all(not torch.equal(b, p) for b, p in zip(before, trainer.network.trainable_parameters()))  # it trained


@pytest.mark.parametrize("init_scale", [0.5, None])
def test_gradients_that_are_not_finite_unscaled_still_stop_training(init_scale):
    trainer = _amp_trainer(batches=2, init_scale=init_scale or 1.0)
    if init_scale is None:
        trainer.add_event_handler(Events.STARTED, lambda engine: setattr(engine, "scaler", None))  # plain float32
    next(iter(trainer.network.trainable_parameters())).register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(FloatingPointError, match="Non-finite gradient at epoch 1, iteration 1"):
        trainer.run()


def test_command_line_booleans_mean_what_they_say(tmp_path):
    assert [flag(v, "k") for v in ("false", "False", "no", "0", False)] == [False] * 5
    assert [flag(v, "k") for v in ("true", "TRUE", "yes", "1", True)] == [True] * 5
    with pytest.raises(ValueError, match="resume must be true or false, got 'flase'"):
        flag("flase", "resume")
    network = AEFlow(encoder_weights="none", image_size=SIZE, flow_blocks=1)
    assert ResumeCheckpoint(str(tmp_path), {"model": network}, resume="false").resume is False

    def trainer(**setting):
        return AEFlowTrainer(
            device=torch.device("cpu"),
            max_epochs=1,
            train_data_loader=_batches(),
            network=network,
            optimizer=torch.optim.Adam(network.trainable_parameters()),
            loss_function=AEFlowLoss(),
            **setting,
        )

    with pytest.raises(ValueError, match="train_amp must be true or false"):
        trainer(amp="bf16")
    for wrong in (-1.0, 0, "nan", "strong"):  # a negative norm would reverse the gradient, not bound it
        with pytest.raises(ValueError, match="grad_clip_norm must be a number above 0, or null"):
            trainer(grad_clip_norm=wrong)
    assert trainer(grad_clip_norm="null").grad_clip_norm is None and trainer(grad_clip_norm=1).grad_clip_norm == 1.0
    assert AnomalyOutputWriter(str(tmp_path), network, nifti_for_2d="false").nifti_for_2d is False
    items = [{"image": torch.rand(1, SIZE, SIZE)}]
    from monai.transforms import Compose

    assert FeatureCacheDataset(items, Compose([]), encoder=network.encoder, cache_features="false").encoder is None
    assert FeatureCacheDataset(items, Compose([]), encoder=network.encoder, cache_features=True).encoder is not None


def test_scoring_runs_in_float32_on_every_path_whatever_amp_says(bundle_root):
    """MONAI Deploy and MONAI Label call the inferer directly, in float32; validation calibrates the scorer, so it
    (and evaluation, and the bundle's inference) must score in float32 too, even on CUDA where ``amp`` is on."""
    from scripts.engines import AnomalyEvaluator, AnomalyInferer
    from scripts.options import config_parser

    network = AEFlow(encoder_weights="none", image_size=SIZE, flow_blocks=1)
    with pytest.raises(ValueError, match="mixed precision is for training only"):
        AnomalyEvaluator(
            device=torch.device("cpu"), val_data_loader=_batches(), network=network, inferer=AnomalyInferer(), amp=True
        )
    evaluator = AnomalyEvaluator(
        device=torch.device("cpu"), val_data_loader=_batches(), network=network, inferer=AnomalyInferer()
    )
    assert evaluator.amp is False
    configs = {"train.json": "validate#evaluator", "inference.json": "evaluator"}
    for name, evaluator_id in configs.items():
        parser = config_parser([str(bundle_root / "configs" / name)], {"amp": True})
        assert "amp" not in parser.get(evaluator_id), name  # the trainer's train_amp follows amp; scoring does not
    assert config_parser([str(bundle_root / "configs" / "train.json")], {"amp": True}).get_parsed_content("train_amp")
