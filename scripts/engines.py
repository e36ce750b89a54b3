"""Ignite engines for AE-FLOW, as thin subclasses of MONAI's supervised engines.

AE-FLOW is not supervised: its target is its input, its loss needs the flow's log-det, and its evaluation needs
several score terms. Only ``_iteration`` changes; handlers, checkpointing, AMP, validation scheduling and
MLflow tracking stay MONAI's. A batch may carry cached encoder ``features`` (see ``scripts.feature_cache``), in which
case the frozen encoder is skipped.
"""

from __future__ import annotations

import gc
import logging
import sys

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor

logger = logging.getLogger(__name__)
NONFINITE_POLICIES = ("raise", "skip")


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


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if hasattr(network, "module") else network


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
        super().__init__(*args, **kwargs)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Unknown nonfinite policy {nonfinite!r}; allowed: {', '.join(NONFINITE_POLICIES)}.")
        self.grad_clip_norm = grad_clip_norm
        self.nonfinite = nonfinite
        self.image_key = image_key
        self.features_key = features_key
        self.state.skipped_batches = 0
        self._state_dict_user_keys.append("skipped_batches")  # saved with the trainer, so a resumed run keeps count

    def _nonfinite(self, engine, what: str) -> bool:
        message = (
            f"Non-finite {what} at epoch {engine.state.epoch}, iteration {engine.state.iteration}: the flow "
            "diverged. Lower the learning rate, set grad_clip_norm, or check the input images."
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(message)
        engine.state.skipped_batches += 1
        logger.warning("%s Batch skipped (%d so far).", message, engine.state.skipped_batches)
        engine.optimizer.zero_grad(set_to_none=True)
        return True

    def _iteration(self, engine, batchdata: dict) -> dict:
        images, features = _batch_tensors(engine, batchdata, self.image_key, self.features_key)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device_type=images.device.type, enabled=engine.amp):
            out = engine.network(images, features)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            parts = engine.loss_function(out.z_prime, out.log_jac_det, out.reconstruction.float(), images)
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
        if not torch.isfinite(loss) and self._nonfinite(engine, "loss"):
            return engine.state.output
        scaler = engine.scaler if engine.amp else None
        (scaler.scale(loss) if scaler is not None else loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if scaler is not None:
            scaler.unscale_(engine.optimizer)
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = self.grad_clip_norm if self.grad_clip_norm else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if not torch.isfinite(grad_norm) and self._nonfinite(engine, "gradient"):
            if scaler is not None:
                scaler.update()
            return engine.state.output
        if scaler is not None:
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class AnomalyEvaluator(SupervisedEvaluator):
    """Scores each image: combined anomaly map (``pred``), image score and its terms, reconstruction, residual.

    A 3D volume (B, C, H, W, D) is scored slice by slice along its last axis, ``slice_batch_size`` slices at a
    time: maps come back as (B, 1, H, W, D) and scores as (B, D), one per slice.
    """

    def __init__(
        self,
        *args,
        image_key: str = "image",
        label_key: str = "label",
        features_key: str = "features",
        slice_batch_size: int = 32,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.image_key = image_key
        self.label_key = label_key
        self.features_key = features_key
        self.slice_batch_size = slice_batch_size

    def _score(self, engine, network, images, features) -> dict:
        with engine.mode(network), torch.no_grad(), torch.autocast(images.device.type, enabled=engine.amp):
            if images.ndim == 4:
                return {key: value.float() for key, value in network.score(images, features).items()}
            if images.ndim != 5:
                raise ValueError(f"Expected a batch of 2D images or 3D volumes, got shape {tuple(images.shape)}.")
            batch, depth = images.shape[0], images.shape[-1]
            slices = images.permute(0, 4, 1, 2, 3).flatten(0, 1)  # (B * D, C, H, W)
            parts = [network.score(chunk) for chunk in slices.split(self.slice_batch_size)]
            merged = {key: torch.cat([p[key] for p in parts]).float() for key in parts[0]}
            return {
                key: value.view(batch, depth, *value.shape[1:]).permute(0, *range(2, value.ndim + 1), 1)
                for key, value in merged.items()
            }

    def _iteration(self, engine, batchdata: dict) -> dict:
        images, features = _batch_tensors(engine, batchdata, self.image_key, self.features_key)
        output = self._score(engine, _unwrap(engine.network), images, features)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        image = output["image"] = batchdata[self.image_key]
        output["pred"] = output.pop("anomaly_map")
        if isinstance(image, MetaTensor):  # so that Invertd and SaveImaged map it back onto the input's grid
            output["pred"] = MetaTensor(output["pred"])
            output["pred"].copy_meta_from(image)
        if self.label_key in batchdata:
            output["label"] = convert_to_tensor(batchdata[self.label_key], track_meta=False).view(-1)
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
