"""Checkpoints you can trust: loaded without running code, checked against the network before use, never written
with non-finite values, and a full training state saved every epoch so that a killed run resumes where it was.

* ``VerifiedCheckpointLoader``: MONAI's ``CheckpointLoader`` that says *which* problem a refused checkpoint has
  (corrupt file, another encoder, another architecture) instead of a list of missing keys.
* ``FiniteCheckpointSaver``: MONAI's ``CheckpointSaver`` that refuses to write non-finite weights.
* ``ResumeCheckpoint``: network, optimiser, trainer (epoch, iteration), RNG state, the best-model tracker, the
  handlers' best-so-far records and the run's settings, written atomically at the end of every epoch; at start the
  latest one is loaded, when there is one and its settings are this run's.

>>> resume = ResumeCheckpoint("models/resume", {"model": net, "optimizer": opt})  # doctest: +SKIP
>>> resume.attach(trainer)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from .distributed import unwrapped
from .options import NULL_WORDS, flag, optional_count

logger = logging.getLogger(__name__)
RESUME_PREFIX = "resume"
FINISHED_FILE = "finished.json"  # in the resume folder: the epoch at which its run completed
_RESUME_FILE = re.compile(rf"^{RESUME_PREFIX}_checkpoint_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that must not be used; the message names the file and the reason."""


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """``torch.load`` with ``weights_only=True`` (a checkpoint is data, never code), with a readable refusal."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a file.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or not a plain weights file (truncated, not a PyTorch file, or it holds "
            f"objects that weights_only loading refuses): {error}"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"Checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict.")
    return checkpoint


# Buffers where NaN is a value, "not chosen yet": the scorer's thresholds before any validation.
NAN_MEANS_UNSET = ("scorer.threshold", "scorer.pixel_threshold")


def nonfinite_entries(state, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) state dict that hold NaN or Inf."""
    if isinstance(state, torch.Tensor):
        if prefix.endswith(NAN_MEANS_UNSET) and torch.isnan(state).all():
            return []
        return [prefix or "tensor"] if state.is_floating_point() and not torch.isfinite(state).all() else []
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [
        name for key, value in items for name in nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    ]


def _network_signature(network: torch.nn.Module) -> dict:
    network = unwrapped(network)
    encoder = getattr(network, "encoder", None)
    signature = {"encoder": getattr(encoder, "name", None)}
    for name in ("image_size", "in_channels"):
        if hasattr(network, name):
            value = getattr(network, name)
            signature[name] = list(value) if isinstance(value, tuple) else value
    return signature


def check_state_dict(network: torch.nn.Module, state: Mapping, path: str | os.PathLike) -> None:
    """Refuse a state dict that does not fit ``network``, saying whether the encoder or the architecture differs,
    or that the file predates self-describing model files."""
    from .model_file import EXTRA_STATE_KEY, old_file_message

    network = unwrapped(network)
    expected_state = network.state_dict()
    described = [k for k in expected_state if k.endswith(EXTRA_STATE_KEY)]
    if described and not any(k.endswith(EXTRA_STATE_KEY) for k in state):
        raise CheckpointError(old_file_message(path))
    expected = {k: tuple(v.shape) for k, v in expected_state.items() if k not in described}
    found = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor) and k not in described}
    if len(found) != len(state) - len(described) or not found:
        raise CheckpointError(f"Checkpoint {path} is not a network state dict (it has non-tensor entries or none).")
    # entries sized by their data (a memory bank), of the network or of a member of an ensemble
    variable = {
        f"{name}.{entry}" if name else entry
        for name, module in network.named_modules()
        for entry in getattr(module, "variable_shape_entries", ())
    }

    # entries newer than some model files, which the module fills in when a file lacks them
    defaulted = {
        f"{name}.{entry}" if name else entry
        for name, module in network.named_modules()
        for entry in getattr(module, "defaulted_entries", ())
    }

    def sized_by_data(key: str) -> bool:  # present on both sides; its size may differ
        return key in variable and key in expected and key in found

    def absent_by_age(key: str) -> bool:
        return key in defaulted and key not in found

    differing = sorted(
        k
        for k in expected.keys() | found.keys()
        if expected.get(k) != found.get(k) and not sized_by_data(k) and not absent_by_age(k)
    )
    if not differing:
        return
    parts = sorted({k.split(".")[0] for k in differing})
    example = ", ".join(
        f"{k}: checkpoint {found.get(k, 'missing')} vs network {expected.get(k, 'missing')}" for k in differing[:3]
    )
    if "encoder" in parts:  # a different backbone also changes the widths the flow and decoder see
        encoder = _network_signature(network)["encoder"]
        reason = f"it was saved with another encoder than this network's {encoder!r}"
    else:
        reason = f"it was saved from another architecture (differs in {', '.join(parts)}: flow_blocks, subnet, "
        reason += "image_size, in_channels or encoder settings)"
    raise CheckpointError(
        f"Checkpoint {path} does not fit the network: {reason}; {len(differing)} entries differ, e.g. {example}."
    )


class NetworkSignature:
    """The network settings a checkpoint was made with, saved next to its weights for a precise refusal message."""

    def __init__(self, network: torch.nn.Module):
        self.network = network

    def state_dict(self) -> dict:
        return _network_signature(self.network)

    def load_state_dict(self, state: Mapping) -> None:
        current = self.state_dict()
        differing = {k: (state.get(k), v) for k, v in current.items() if state.get(k) != v}
        if differing:
            raise CheckpointError(
                "the checkpoint was saved with "
                + "; ".join(f"{k} {saved!r} but this run uses {now!r}" for k, (saved, now) in differing.items())
            )


EXTENSIBLE_SETTINGS = ("epochs", "early_stop_patience")  # a resumed run may change its budget: that extends it


def _same_setting(saved, current) -> bool:
    """Equal, also as typed on the command line: ``--learning_rate 1e-3``, ``--train_amp false`` or
    ``--grad_clip_norm null`` as text."""
    saved, current = (None if isinstance(v, str) and v.strip().lower() in NULL_WORDS else v for v in (saved, current))
    if saved == current:
        return True
    try:
        return float(saved) == float(current)
    except (TypeError, ValueError):
        return str(saved).strip().lower() == str(current).strip().lower()


class RunSettings:
    """The settings a run was started with (``tracking_params``, data, seed), saved in its resume state: resuming
    with other settings would silently mix two runs (the old optimiser's learning rate, another data set)."""

    def __init__(self, settings: Mapping):
        # plain values (tuples as lists, paths and devices as text), as weights_only loading reads them back
        self.settings = json.loads(json.dumps(dict(settings), default=str))

    def state_dict(self) -> dict:
        return dict(self.settings)

    def differing(self, state: Mapping) -> dict:
        """``{setting: (saved, current)}`` for the settings other than the budget that differ (text: as shown)."""
        return {
            k: tuple(repr(side[k]) if k in side else "unset" for side in (state, self.settings))
            for k in sorted(state.keys() | self.settings.keys())
            if k not in EXTENSIBLE_SETTINGS
            and (k not in state or k not in self.settings or not _same_setting(state[k], self.settings[k]))
        }

    def load_state_dict(self, state: Mapping) -> None:
        differing = self.differing(state)
        if differing:
            raise CheckpointError(
                "the checkpoint was saved with "
                + "; ".join(f"{k} {saved} but this run uses {now}" for k, (saved, now) in differing.items())
                + f" ({' and '.join(EXTENSIBLE_SETTINGS)} may differ: that extends the run)"
            )


class RNGState:
    """Python, NumPy and torch (CPU and CUDA) random states, as plain tensors and tuples for ``weights_only``."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "gauss": float(gauss),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class KeyMetricTracker:
    """The best-metric record of a ``CheckpointSaver``, so a resumed run only replaces ``model.pt`` when it beats
    the best epoch before the interruption."""

    def __init__(self, saver: CheckpointSaver):
        if getattr(saver, "_key_metric_checkpoint", None) is None:
            raise ValueError("Only a CheckpointSaver with save_key_metric=True has a best-metric record to resume.")
        self.saver = saver

    def state_dict(self) -> dict:
        return dict(self.saver._key_metric_checkpoint.state_dict())

    def load_state_dict(self, state: Mapping) -> None:
        self.saver.load_state_dict(state)


def _check_objects(load_dict: Mapping, checkpoint: Mapping, path) -> None:
    """Every network against its saved weights (and signature), before anything is loaded."""
    single = len(load_dict) == 1 and next(iter(load_dict)) not in checkpoint
    for key, obj in load_dict.items():  # the saved settings first: they give the most precise refusal
        if isinstance(obj, (NetworkSignature, RunSettings)) and isinstance(checkpoint.get(key), Mapping):
            try:
                obj.load_state_dict(checkpoint[key])
            except CheckpointError as error:
                raise CheckpointError(f"Checkpoint {path} does not fit this run: {error}.") from error
    for key, obj in load_dict.items():
        if isinstance(obj, torch.nn.Module):
            state = checkpoint if single else checkpoint.get(key)
            if not isinstance(state, Mapping):
                raise CheckpointError(f"Checkpoint {path} has no {key!r} entry; it holds {sorted(checkpoint)}.")
            check_state_dict(obj, state, path)


def _load_objects(load_dict: Mapping, checkpoint: Mapping, path, strict: bool = True) -> None:
    """Check every network against its saved weights (and signature), then let Ignite load everything."""
    _check_objects(load_dict, checkpoint, path)
    try:
        Checkpoint.load_objects(to_load=dict(load_dict), checkpoint=dict(checkpoint), strict=strict)
    except (KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"Checkpoint {path} cannot be loaded into this run: {error}") from error


def load_network(network: torch.nn.Module, path: str | os.PathLike, map_location=None) -> torch.nn.Module:
    """Outside an engine (studies, exports): the same checks and refusals as ``VerifiedCheckpointLoader``."""
    _load_objects({"model": network}, load_checkpoint(path, map_location), path)
    return network


class VerifiedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` (``weights_only`` loading, trainer resume) with checks and plain refusals."""

    def __call__(self, engine: Engine) -> None:
        checkpoint = load_checkpoint(self.load_path, self.map_location)
        prior_max_epochs = engine.state.max_epochs
        _load_objects(self.load_dict, checkpoint, self.load_path, strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"Epoch count ({engine.state.epoch}) in checkpoint {self.load_path} is larger than max_epochs "
                f"({prior_max_epochs}); raise max_epochs to train further."
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")


def _save_dict_is_finite(save_dict: Mapping, what: str) -> bool:
    bad = [name for key, obj in save_dict.items() for name in nonfinite_entries(obj.state_dict(), key)]
    if bad:
        logger.error("Not saving %s: non-finite values in %s%s.", what, ", ".join(bad[:5]), " ..." * (len(bad) > 5))
    return not bad


class FiniteCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` that never writes a checkpoint with NaN or Inf weights; the last good file stays."""

    def _finite(self) -> bool:
        return _save_dict_is_finite(self.save_dict, f"checkpoint in {self.save_dir}")

    def completed(self, engine: Engine) -> None:
        if self._finite():
            super().completed(engine)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        if self._finite():
            super().exception_raised(engine, e)
        raise e

    def metrics_completed(self, engine: Engine) -> None:
        if self._finite():
            super().metrics_completed(engine)

    def interval_completed(self, engine: Engine) -> None:
        if self._finite():
            super().interval_completed(engine)


def latest_resume_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The resume checkpoint with the highest epoch in ``save_dir`` (files are complete: they are written
    atomically)."""
    found = [(int(m.group(1)), p) for p in Path(save_dir).glob("*.pt") if (m := _RESUME_FILE.match(p.name))]
    return max(found)[1] if found else None


def _without_state(obj) -> str | None:
    """How a run resumes from a checkpoint of an older bundle that lacks ``obj``'s state, or None: refused.

    A constant learning rate: its scheduler's state changes nothing, so the run resumes exactly. The settings and the
    validation handlers' records: the run resumes as older bundles resumed it, unchecked and with those records
    restarted."""
    from .handlers import AnomalyMetricsHandler, EarlyStopOnValidation

    if isinstance(obj, torch.optim.lr_scheduler.ConstantLR) and obj.factor == 1.0:
        return "it trained at a constant rate, which this run continues"
    if isinstance(obj, RunSettings):
        return "its run's settings cannot be compared with this run's, make sure they are the same"
    if isinstance(obj, (AnomalyMetricsHandler, EarlyStopOnValidation)):
        return "this run's best-so-far validation record (kept metrics, early-stop count) restarts at this epoch"
    return None


def _cosine_budget_change(objects: Mapping, checkpoint: Mapping, budget: int) -> str | None:
    """Why a cosine schedule cannot resume with another budget (``scripts.engines.lr_scheduler`` anneals to zero
    over the ``epochs`` the run started with, restored with its state), or None."""
    scheduler = objects.get("lr_scheduler")
    saved = checkpoint.get("lr_scheduler")
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or not isinstance(saved, Mapping):
        return None
    if saved.get("T_max") in (None, budget):
        return None
    return (
        f"its cosine learning-rate schedule anneals to zero over the {saved['T_max']} epochs the run started with, "
        f"and cannot be stretched to epochs {budget}: keep --epochs {saved['T_max']}"
    )


def _patience(value):
    """``early_stop_patience`` as the handler reads it (null, "null", 0: off), to compare two runs' budgets."""
    try:
        return optional_count(value, "early_stop_patience") or 0
    except ValueError:
        return value


class ResumeCheckpoint:
    """Save the full training state every epoch into ``save_dir``; with ``resume``, load the latest at start.

    ``save_dict`` names what to save besides the trainer and the RNG state, which are added here: the network,
    the optimiser, an LR scheduler, ``CheckpointSaver`` objects whose best-metric record must survive, and handlers
    with a best-so-far record (``state_dict``/``load_state_dict``: early stopping, the kept validation metrics), so
    that a resumed run ends as an uninterrupted one. ``settings`` (the run's ``tracking_params``, data and seed) are
    saved too: a re-run with other settings than the interrupted run's is refused, naming each difference, except
    ``epochs`` and ``early_stop_patience``, which extend the run.
    Attach it last among the trainer's handlers, so that validation (and its best-model save) of an epoch has run
    before that epoch's state is saved. Without ``resume`` old resume files are removed at start: a fresh run
    must never later be resumed from an older run's state. A run that completes says so in ``finished.json``: its
    state is kept, so the same run can be extended with more epochs (or more patience, after an early stop: with
    neither, a re-run has nothing to train), but a run of other settings in the same folder (the README's Chest
    X-ray command after the demo) replaces it instead of being refused. The state of a run that did not complete
    (killed, diverged) is never replaced: another run's settings are refused with the remedy.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping,
        resume: bool = True,
        n_saved: int = 2,
        map_location=None,
        network: torch.nn.Module | None = None,
        settings: Mapping | None = None,
    ):
        self.save_dir = save_dir
        self.resume = flag(resume, "resume")
        self.map_location = map_location
        self.n_saved = n_saved
        self.objects = {k: KeyMetricTracker(v) if isinstance(v, CheckpointSaver) else v for k, v in save_dict.items()}
        network = network or next((v for v in save_dict.values() if isinstance(v, torch.nn.Module)), None)
        if settings is not None:
            self.objects = {"settings": RunSettings(settings), **self.objects}
        if network is not None:
            self.objects = {"signature": NetworkSignature(network), **self.objects}
        self.objects["rng"] = RNGState()
        self.checkpoint: Checkpoint | None = None

    def attach(self, engine: Engine) -> None:
        self.objects["trainer"] = engine
        self.checkpoint = Checkpoint(
            self.objects,
            DiskSaver(self.save_dir, require_empty=False, atomic=True),
            filename_prefix=RESUME_PREFIX,
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.epoch,
        )
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _remove_state(self) -> None:
        for path in Path(self.save_dir).glob(f"{RESUME_PREFIX}_checkpoint_*.pt"):
            path.unlink()
        Path(self.save_dir, FINISHED_FILE).unlink(missing_ok=True)

    def _finished_at(self, latest: Path) -> bool:
        """Whether ``latest`` is the last state of a run that completed (not of one killed or diverged)."""
        marker = Path(self.save_dir, FINISHED_FILE)
        try:
            finished_epoch = json.loads(marker.read_text())["epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return finished_epoch == int(_RESUME_FILE.match(latest.name).group(1))

    def _same_budget(self, checkpoint: Mapping, max_epochs: int) -> bool:
        """Whether this run has the epochs and early-stop patience of the run that wrote ``checkpoint``."""
        saved = checkpoint.get("settings") if isinstance(checkpoint.get("settings"), Mapping) else {}
        current = self.objects["settings"].settings if "settings" in self.objects else {}
        trainer = checkpoint.get("trainer") if isinstance(checkpoint.get("trainer"), Mapping) else {}
        same_patience = _patience(saved.get("early_stop_patience")) == _patience(current.get("early_stop_patience"))
        return trainer.get("max_epochs") == max_epochs and same_patience

    def started(self, engine: Engine) -> None:
        latest = latest_resume_checkpoint(self.save_dir)
        if latest is None:
            return
        if not self.resume:
            self._remove_state()
            logger.info("resume is off: removed the resume checkpoints of an earlier run in %s.", self.save_dir)
            return
        checkpoint = load_checkpoint(latest, self.map_location)
        present = self._present_in(checkpoint, latest)
        try:
            _check_objects(present, checkpoint, latest)
        except CheckpointError as error:  # another run's checkpoint, e.g. the demo's in the same models/ folder
            if self._finished_at(latest):
                self._remove_state()
                logger.warning("%s Its run had completed, so this run starts afresh and replaces it.", error)
                return
            raise CheckpointError(
                f"{error} It is another run's resume checkpoint, of a run that did not complete: give this run its "
                f"own --ckpt_dir, or start afresh with --resume false (or delete {self.save_dir})."
            ) from error
        prior_max_epochs = engine.state.max_epochs
        cosine = _cosine_budget_change(present, checkpoint, prior_max_epochs)
        if cosine:
            raise CheckpointError(
                f"Resume checkpoint {latest} cannot continue this run: {cosine}, or start afresh with --resume false "
                f"(or delete {self.save_dir})."
            )
        try:
            _load_objects(present, checkpoint, latest)
        except CheckpointError as error:  # fits the network, but not the rest of this run's state
            raise CheckpointError(
                f"{error} Give this run its own --ckpt_dir, or start afresh with --resume false (or delete "
                f"{self.save_dir})."
            ) from error
        if engine.state.epoch > prior_max_epochs:
            raise ValueError(f"{latest} is at epoch {engine.state.epoch}, past max_epochs {prior_max_epochs}.")
        engine.state.max_epochs = prior_max_epochs
        saved = sorted(
            (int(_RESUME_FILE.match(p.name).group(1)), p.name)
            for p in Path(self.save_dir).glob("*.pt")
            if _RESUME_FILE.match(p.name)
        )
        self.checkpoint.load_state_dict({"_saved": saved})  # older files are rotated out as new ones are written
        if self._finished_at(latest) and (
            engine.state.epoch == prior_max_epochs or self._same_budget(checkpoint, prior_max_epochs)
        ):
            logger.info(
                "The run in %s completed at epoch %d: nothing to train. Raise --epochs (or, after an early stop, "
                "change --early_stop_patience) to train on, or start afresh with --resume false.",
                self.save_dir,
                engine.state.epoch,
            )
            if engine.state.epoch < prior_max_epochs:  # stopped early: its patience is spent, the loop would go on
                engine.terminate()
            return
        logger.info(
            "Resumed training from %s (epoch %d, iteration %d).", latest, engine.state.epoch, engine.state.iteration
        )

    def _present_in(self, checkpoint: Mapping, path) -> dict:
        """The objects to load from a checkpoint. One written by an older bundle may lack an entry added since (the
        learning-rate scheduler in 0.8.0; the settings and the validation handlers' records later): those whose
        absence ``_without_state`` explains resume without it; any other missing entry is refused with the remedy."""
        missing = [key for key in self.objects if key not in checkpoint]
        for key in missing:
            note = _without_state(self.objects[key])
            if note is None:
                hint = "continue it with a constant lr_schedule, as it was made, " if key == "lr_scheduler" else ""
                raise CheckpointError(
                    f"Resume checkpoint {path} was written by an older bundle and has no {key!r} state this run "
                    f"needs: {hint}or start afresh with --resume false (or delete {self.save_dir})."
                )
            exact = isinstance(self.objects[key], torch.optim.lr_scheduler.ConstantLR)  # resumes exactly all the same
            (logger.info if exact else logger.warning)("%s predates the %r state: %s.", path, key, note)
        return {key: value for key, value in self.objects.items() if key not in missing}

    def completed(self, engine: Engine) -> None:
        from .reports import write_json

        write_json(Path(self.save_dir, FINISHED_FILE), {"epoch": engine.state.epoch})

    def epoch_completed(self, engine: Engine) -> None:
        if _save_dict_is_finite({k: v for k, v in self.objects.items() if k != "trainer"}, "resume checkpoint"):
            self.checkpoint(engine)
