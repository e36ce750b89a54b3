"""Ignite engines for AE-FLOW, as thin subclasses of MONAI's supervised engines.

AE-FLOW is not supervised: its target is its input, its loss needs the flow's log-det, and its evaluation needs
several score terms. Only ``_iteration`` changes; handlers, checkpointing, AMP, validation scheduling and
MLflow tracking stay MONAI's. A batch may carry cached encoder ``features`` (see ``scripts.feature_cache``), in which
case the frozen encoder is skipped.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import sys
from pathlib import Path

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from .distributed import unwrapped
from .options import flag, optional_positive
from .preprocessing import scored_slices

logger = logging.getLogger(__name__)
NONFINITE_POLICIES = ("raise", "skip")
RESULTS_KEY = "aeflow_results"


class TrainingDiverged(FloatingPointError):
    """Non-finite training under the ``"raise"`` policy, with where it happened as data: a study records the run
    as diverged at that epoch instead of losing the runs before it (MONAI's config parser wraps the error)."""

    def __init__(self, what: str, epoch: int, iteration: int):
        super().__init__(what, epoch, iteration)  # all of them: a copied or pickled error keeps them
        self.what, self.epoch, self.iteration = what, epoch, iteration

    def __str__(self) -> str:
        return (
            f"Non-finite {self.what} at epoch {self.epoch}, iteration {self.iteration}: the flow diverged. Lower the "
            "learning rate, set grad_clip_norm, or check the input images."
        )

    def record(self) -> dict:
        return {"what": self.what, "epoch": self.epoch, "iteration": self.iteration, "message": str(self)}


def freeze_heap_before_exit() -> None:
    """Spare the bundle CLI Python's final garbage collection, which walks every object that torch, MONAI, MLflow
    and ITK created: measured at 1.5 minutes of the 10-minute demo on two CPU cores, after the work was done.

    ``gc.freeze`` moves them out of the collector's reach, so the process ends within seconds. Only the
    ``python -m monai.bundle`` process, which exits right after ``finalize``, freezes; in-process callers (tests,
    MONAI Label) keep collecting as usual.
    """
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(main_spec, "name", None) == "monai.bundle.__main__":
        gc.freeze()


def bundle_workflow(bundle_root: str | Path, config_files: list[str], workflow_type: str, **overrides):
    """One of the bundle's workflows run in this process, as ``python -m monai.bundle run`` would run it: the given
    config files with the bundle's metadata and logging config; returns it initialised."""
    from monai.bundle import ConfigWorkflow

    root = Path(bundle_root)
    workflow = ConfigWorkflow(
        config_file=[str(name) for name in config_files],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        **{"bundle_root": str(root), **overrides},
    )
    workflow.initialize()
    return workflow


LR_SCHEDULES = ("constant", "cosine")


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str = "constant", epochs: int = 1):
    """The learning-rate schedule named by ``lr_schedule``, stepped once per epoch by MONAI's ``LrScheduleHandler``.

    ``cosine`` anneals to zero over ``epochs``, the run's budget; early stopping may end the run sooner. The
    scheduler is part of the resume state, so a resumed run continues on the same curve.
    """
    if schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if schedule == "cosine":
        if int(epochs) < 1:
            raise ValueError(f"lr_schedule 'cosine' needs epochs >= 1, got {epochs}.")
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(epochs))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}.")


def _batch_tensors(engine, batchdata: dict, image_key: str, features_key: str):
    device, non_blocking = engine.state.device, engine.non_blocking
    images = convert_to_tensor(batchdata[image_key], track_meta=False).to(device, non_blocking=non_blocking)
    features = batchdata.get(features_key)
    if features is not None:
        features = convert_to_tensor(features, track_meta=False).to(device, non_blocking=non_blocking)
    return images, features


class AEFlowTrainer(SupervisedTrainer):
    """Optimises equation (1); the output holds ``loss`` and its parts ``loss_flow`` and ``loss_recon``.

    A non-finite loss or gradient stops training with the epoch and iteration named (``nonfinite="raise"``), or
    skips that batch and counts it in ``engine.state.skipped_batches`` (``"skip"``); the optimiser never steps on
    a non-finite update, so no checkpoint can hold one. ``grad_clip_norm`` clips the global gradient norm.
    """

    def __init__(
        self,
        *args,
        grad_clip_norm: float | None = None,
        nonfinite: str = "raise",
        image_key: str = "image",
        features_key: str = "features",
        **kwargs,
    ):
        kwargs["amp"] = flag(kwargs.get("amp", False), "train_amp")
        super().__init__(*args, **kwargs)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Unknown nonfinite policy {nonfinite!r}; allowed: {', '.join(NONFINITE_POLICIES)}.")
        self.grad_clip_norm = optional_positive(grad_clip_norm, "grad_clip_norm")
        self.nonfinite = nonfinite
        self.image_key = image_key
        self.features_key = features_key
        self.state.skipped_batches = 0
        self._state_dict_user_keys.append("skipped_batches")  # saved with the trainer, so a resumed run keeps count

    def _nonfinite(self, engine, what: str) -> bool:
        diverged = TrainingDiverged(what, engine.state.epoch, engine.state.iteration)
        if self.nonfinite == "raise":
            raise diverged
        engine.state.skipped_batches += 1
        logger.warning("%s Batch skipped (%d so far).", diverged, engine.state.skipped_batches)
        engine.optimizer.zero_grad(set_to_none=True)
        return True

    def _iteration(self, engine, batchdata: dict) -> dict:
        images, features = _batch_tensors(engine, batchdata, self.image_key, self.features_key)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        # autocast (``train_amp``: float16 on CUDA, bfloat16 on CPU) covers the network; equation (1) sums
        # a per-dimension log-likelihood and an SSIM, both of which need float32
        with torch.autocast(device_type=images.device.type, enabled=engine.amp):
            out = engine.network(images, features)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        parts = engine.loss_function(
            out.z_prime.float(), out.log_jac_det.float(), out.reconstruction.float(), images.float()
        )
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = parts["loss"]
        # the image gives the output a batch dimension, so that MONAI's decollation (and with it the default
        # `--tracking mlflow` output transform) sees one item per image, as with MONAI's own trainers
        engine.state.output = {
            "image": images,
            "loss": loss.detach(),
            "loss_flow": parts["loss_flow"],
            "loss_recon": parts["loss_recon"],
        }
        if self._step(engine, loss, engine.optimizer, scaler=engine.scaler if engine.amp else None):
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _step(self, engine, loss: torch.Tensor, optimizer, what: str = "", scaler=None) -> bool:
        """One optimiser step on ``loss``, gradients clipped to ``grad_clip_norm``; False when the non-finite
        policy skipped it (``what`` names the loss in the message: "discriminator", ...)."""
        prefix = f"{what} " if what else ""
        if not torch.isfinite(loss) and self._nonfinite(engine, prefix + "loss"):
            return False
        (scaler.scale(loss) if scaler is not None else loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = self.grad_clip_norm if self.grad_clip_norm else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if not torch.isfinite(grad_norm):  # one check (a device sync on a GPU), two causes
            if _scale_overflow(scaler):
                scaler.step(optimizer)  # skipped by the scaler itself, which found the overflow when unscaling
                scaler.update()  # and lowers its scale
                optimizer.zero_grad(set_to_none=True)
                return False
            if self._nonfinite(engine, prefix + "gradient"):
                optimizer.zero_grad(set_to_none=True)  # the policy cleared the trainer's own optimiser; this one too
                if scaler is not None:
                    scaler.update()
                return False
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return True


def _scale_overflow(scaler) -> bool:
    """Non-finite gradients under float16 mixed precision are, at first, the loss scale's overflow: the scaler
    skips that step and halves its scale, as it is meant to (the bundle's first CUDA runs stopped at the first one,
    at iteration 1 or 791). Only at a scale below 1, where the unscaled gradients themselves are not finite, is it
    divergence for the non-finite policy."""
    return scaler is not None and scaler.is_enabled() and scaler.get_scale() >= 1.0


class BaselineTrainer(AEFlowTrainer):
    """Trains a comparison method (``scripts.baselines``) with the same handlers, checkpoints and non-finite policy
    as AE-FLOW; the network says what to optimise.

    Per iteration: ``d_steps`` updates of ``d_optimizer`` on ``network.discriminator_losses`` (adversarial
    methods), then one update of ``optimizer`` on ``network.training_losses`` (None: nothing to optimise, e.g.
    PatchCore collecting its memory bank). ``network.epoch_completed`` runs at the last iteration of each epoch,
    before validation; ``network.pretrain(trainer)`` runs once when training starts (after a resume is loaded).
    It runs in float32 on one device: ``amp`` and ``multi_gpu_train.json`` are AE-FLOW's.
    """

    def __init__(self, *args, d_optimizer=None, d_steps: int = 1, **kwargs):
        kwargs.setdefault("loss_function", None)
        super().__init__(*args, **kwargs)
        if hasattr(self.network, "module"):  # the network's own methods would bypass DDP's gradient averaging
            raise ValueError(
                "The comparison methods train on one device; multi_gpu_train.json serves AE-FLOW only. Train "
                "this method with train.json and its configs/baseline_<name>.json."
            )
        self.d_optimizer = d_optimizer
        self.d_steps = int(d_steps)
        if self.optimizer is None:  # nothing to optimise (PatchCore, an ensemble's assembly): MONAI's MLFlowHandler
            del self.optimizer  # logs the learning rate of any engine that has an `optimizer` attribute
        if hasattr(unwrapped(self.network), "pretrain"):
            self.add_event_handler(Events.STARTED, self._pretrain)

    def _pretrain(self, engine) -> None:
        unwrapped(engine.network).pretrain(engine)

    def _iteration(self, engine, batchdata: dict) -> dict:
        images, features = _batch_tensors(engine, batchdata, self.image_key, self.features_key)
        network = unwrapped(engine.network)
        engine.network.train()
        output = {"image": images}
        if self.d_optimizer is not None and hasattr(network, "discriminator_losses"):
            for _ in range(self.d_steps):
                self.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
                parts = network.discriminator_losses(images, features)
                if parts is None:
                    break
                self._step(engine, parts["loss"], self.d_optimizer, "discriminator")
                output.update({f"d_{k}": v.detach() for k, v in parts.items()})
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        parts = network.training_losses(images, features)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        if parts is not None:
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            self._step(engine, parts["loss"], optimizer, "training")
            output.update({k: v.detach() for k, v in parts.items()})
        for key in ("loss", "loss_flow", "loss_recon"):  # the keys train.json's StatsHandler and MLflow log
            output.setdefault(key, images.new_zeros(()))
        if engine.state.iteration % engine.state.epoch_length == 0 and hasattr(network, "epoch_completed"):
            network.epoch_completed()
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates the output here
        return engine.state.output


class AnomalyInferer(Inferer):
    """How every path scores an input: a batch of 2D images (B, C, H, W), or of 3D volumes (B, C, H, W, D) slice by
    slice along the model's ``slice_axis``, within the slices its ``input_spec`` says training and calibration
    used (``preprocessing.scored_slices``). The evaluator, the bundle's inference, MONAI Deploy and MONAI Label
    all come through here, so they score alike.

    ``score`` returns the network's score dict (``anomaly_map``, term maps, ``score`` and its terms, ...); for a
    volume, maps keep the full depth with NaN on slices not scored, image-level values come per scored slice, and
    ``slice_index`` says which slices those are. Called as an inferer (Deploy, Label), it returns the anomaly map
    as a ``MetaTensor`` whose ``meta[RESULTS_KEY]`` holds, per batch item (a JSON text), what postprocessing reports
    (``scripts.deploy.AnomalyScoresd``): the per-slice scores, the calibrated thresholds and the reduction.
    """

    def __init__(self, slice_batch_size: int = 32):
        super().__init__()
        self.slice_batch_size = int(slice_batch_size)

    @staticmethod
    def network_of(network: torch.nn.Module) -> torch.nn.Module:
        network = unwrapped(network)
        if not hasattr(network, "score"):
            raise TypeError(
                f"AnomalyInferer scores with the bundle's AE-FLOW network (models/model.pt), got a "
                f"{type(network).__name__}: a TorchScript or ONNX export computes the anomaly map only; serve the "
                "bundle folder without models/model.ts (python -m scripts.package), or take the map from forward()."
            )
        return network

    def score(self, inputs: torch.Tensor, network: torch.nn.Module, features: torch.Tensor | None = None) -> dict:
        network = self.network_of(network)
        inputs = convert_to_tensor(inputs, track_meta=False)
        if inputs.ndim == 4:
            return {key: value.float() for key, value in network.score(inputs, features).items()}
        if inputs.ndim != 5:
            raise ValueError(f"Expected a batch of 2D images or 3D volumes, got shape {tuple(inputs.shape)}.")
        axis = 2 + int(network.input_spec["slice_axis"])
        volumes = inputs.movedim(axis, -1)  # (B, C, h, w, D)
        batch, depth = volumes.shape[0], volumes.shape[-1]
        kept = scored_slices(network.input_spec, depth)
        slices = volumes[..., kept.start : kept.stop].permute(0, 4, 1, 2, 3).flatten(0, 1)  # (B * n, C, h, w)
        parts = [network.score(chunk) for chunk in slices.split(self.slice_batch_size)]
        result = {}
        for key in parts[0]:
            value = torch.cat([part[key] for part in parts]).float()
            value = value.view(batch, len(kept), *value.shape[1:])
            if value.ndim == 2:  # an image-level value per scored slice
                result[key] = value
                continue
            full = value.new_full((batch, depth, *value.shape[2:]), float("nan"))
            full[:, kept.start : kept.stop] = value
            result[key] = full.movedim(1, -1).movedim(-1, axis)
        result["slice_index"] = torch.arange(kept.start, kept.stop, device=inputs.device).expand(batch, -1)
        return result

    @staticmethod
    def prediction(result: dict, network: torch.nn.Module, like: torch.Tensor | None = None) -> MetaTensor:
        """The anomaly map as a MetaTensor carrying each batch item's image-level results."""
        scorer = unwrapped(network).scorer
        pred = MetaTensor(result["anomaly_map"])
        if isinstance(like, MetaTensor):  # so that Invertd maps it back onto the input's grid
            pred.copy_meta_from(like, copy_attr=False)
        scores = result["score"].reshape(result["score"].shape[0], -1)
        index = result.get("slice_index", torch.zeros_like(scores, dtype=torch.long))
        common = {
            "reduction": scorer.reduction,
            "threshold": float(scorer.threshold),
            "pixel_threshold": float(scorer.pixel_threshold),
        }
        # one JSON text per batch item: MONAI's decollation splits the list by item and leaves each text whole
        pred.meta[RESULTS_KEY] = [
            json.dumps({**common, "slice_scores": s.tolist(), "slice_index": [int(k) for k in i]})
            for s, i in zip(scores, index)
        ]
        return pred

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> MetaTensor:
        return self.prediction(self.score(inputs, network), network, inputs)


class AnomalyEvaluator(SupervisedEvaluator):
    """Scores each image with ``AnomalyInferer``: combined anomaly map (``pred``), image score and its terms,
    reconstruction, residual; volumes slice by slice (scores (B, n) for the n scored slices)."""

    def __init__(
        self, *args, image_key: str = "image", label_key: str = "label", features_key: str = "features", **kwargs
    ):
        if flag(kwargs.pop("amp", False), "amp"):
            raise ValueError(
                "AnomalyEvaluator scores in float32: MONAI Deploy and MONAI Label call the inferer directly, in "
                "float32, so validation (which calibrates the scorer), evaluation and inference do too, and every "
                "path scores the same; mixed precision is for training only (train_amp)."
            )
        super().__init__(*args, amp=False, **kwargs)
        if not isinstance(self.inferer, AnomalyInferer):
            raise TypeError(f"AnomalyEvaluator needs an AnomalyInferer, got {type(self.inferer).__name__}.")
        self.image_key = image_key
        self.label_key = label_key
        self.features_key = features_key

    def _iteration(self, engine, batchdata: dict) -> dict:
        images, features = _batch_tensors(engine, batchdata, self.image_key, self.features_key)
        # a network already in eval mode (inference) skips eval_mode's two walks over every module, ~7 ms an image
        mode = engine.mode(engine.network) if engine.network.training else contextlib.nullcontext()
        with mode, torch.no_grad():
            output = engine.inferer.score(images, engine.network, features)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        image = output["image"] = batchdata[self.image_key]
        output["pred"] = engine.inferer.prediction(output, engine.network, image)
        del output["anomaly_map"]
        if self.label_key in batchdata:
            output["label"] = convert_to_tensor(batchdata[self.label_key], track_meta=False).view(-1)
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
