"""Ignite handlers that turn the evaluator's per-image scores into the paper's metrics, reports and figures."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from . import reports
from .distributed import unwrapped
from .metrics import METRICS, anomaly_metrics, validation_protocol
from .options import optional_count
from .scores import REDUCTIONS, TERMS, pixel_sample, reduce_map, volume_score

logger = logging.getLogger(__name__)


BATCHABLE = (torch.Tensor, int, float, str)  # the per-item values a handler reads as one batch


class _StackedItems(Mapping):
    """Per-item dicts seen as one batch dict, each key stacked when first read: maps inverted onto each input's
    own grid differ in size between the inputs of a batch and are never stacked unless a handler reads them."""

    def __init__(self, items: list[dict]):
        self.items = items
        self.stacked: dict = {}

    def __getitem__(self, key):
        if key not in self.stacked:
            values = [item[key] for item in self.items]  # KeyError for a key the items lack
            if isinstance(values[0], str):
                self.stacked[key] = values
            elif isinstance(values[0], BATCHABLE):
                self.stacked[key] = torch.stack([torch.as_tensor(v) for v in values])
            else:
                raise KeyError(key)
        return self.stacked[key]

    def __iter__(self):
        return (k for k in self.items[0] if isinstance(self.items[0][k], BATCHABLE))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _batched(data) -> Mapping:
    """Engines with ``decollate=True`` hand over a list of per-item dicts; read it as one batch dict."""
    return data if isinstance(data, dict) else _StackedItems(data)


def batch_filenames(batch, key: str, count: int) -> list[str]:
    items = batch if isinstance(batch, list) else [batch]
    names: list = []
    for item in items:
        meta = getattr(item.get(key), "meta", None) or item.get(f"{key}_meta_dict") or {}
        found = meta.get("filename_or_obj", "")
        names += [found] if isinstance(found, str) else list(found)
    names = (names + [""] * count)[:count]
    slices = _batched(batch).get("slice")
    if slices is not None:
        names = [f"{n}#slice={int(s)}" for n, s in zip(names, torch.as_tensor(slices).view(-1))]
    return [str(n) for n in names]


class AnomalyMetricsHandler:
    """Collects score terms over an epoch; at its end computes AUC, F1, ACC, SEN, SPE into ``engine.state.metrics``.

    ``calibrate=True`` (validation during training) first fits the scorer on this epoch's images
    (``AnomalyScorer.fit``: normalisation, beta, operating threshold, the mask's pixel threshold); a checkpoint
    saved on this epoch's metric carries all of them.
    Without ``calibrate``, a stored threshold is applied unchanged (``deployment_protocol`` in the metrics JSON).
    With ``output_dir`` it also writes ``<prefix>metrics.json``, ``<prefix>scores.csv`` and, with ``plots``,
    the ROC curve, the score distributions and original / reconstruction / residual panels; with ``calibrate``,
    ``<prefix>kept_metrics.json`` holds the epoch and metrics of the best AUC so far, the model the checkpoint
    saver keeps (``<prefix>metrics.json`` is the latest epoch's); that best so far is resume state (``state_dict``).
    With ``calibrate``, a split without both normal and abnormal items is refused when attached (its AUC is NaN: no
    epoch could ever be chosen on it). Attach it before ``CheckpointSaver`` so the saver sees this epoch's metric.
    ``distributed=True`` (evaluation sharded by a ``DistributedSampler``) gathers every process's records first;
    process 0 writes the outputs.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        prefix: str = "val_",
        calibrate: bool = False,
        output_dir: str | None = None,
        plots: bool = False,
        n_panel_samples: int = 4,
        protocol_folds: int = 0,
        seed: int = 0,
        distributed: bool = False,
    ):
        self.network = network
        self.distributed = distributed
        self.prefix = prefix
        self.calibrate = calibrate
        self.output_dir = output_dir
        self.plots = plots
        self.n_panel_samples = n_panel_samples
        self.protocol_folds = protocol_folds
        self.seed = seed
        self.records: dict[str, list] = {}
        self.panels: list[dict] = []
        self.kept_auc = -np.inf  # the best validation AUC so far: the epoch the checkpoint saver keeps
        self.kept_epoch: int | None = None

    def state_dict(self) -> dict:
        return {"kept_auc": float(self.kept_auc), "kept_epoch": self.kept_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        """The best so far of the interrupted run: a resumed run only replaces the kept metrics when it beats it."""
        self.kept_auc, self.kept_epoch = float(state["kept_auc"]), state.get("kept_epoch")

    def attach(self, engine: Engine) -> None:
        if self.calibrate:
            items = getattr(getattr(getattr(engine, "data_loader", None), "dataset", None), "data", None)
            if isinstance(items, (list, tuple)) and all(isinstance(item, Mapping) for item in items):
                self._require_both_classes([int(item["label"]) for item in items if "label" in item])
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.complete)

    def _require_both_classes(self, labels) -> None:
        """Calibration and the kept epoch need the AUC, which needs normal and abnormal items."""
        labels = np.asarray(labels)
        n_normal, n_abnormal = int((labels == 0).sum()), int((labels == 1).sum())
        if len(labels) and not (n_normal and n_abnormal):
            raise ValueError(
                f"The validation split has {n_normal} normal (label 0) and {n_abnormal} abnormal (label 1) items: its "
                "AUC, which calibrates the scorer and chooses the epoch kept as model.pt, needs both: give the "
                "datalist's validation split normal and abnormal items."
            )

    def reset(self, engine: Engine | None = None) -> None:
        self.records = {"name": [], "volume": [], "slice": [], "label": [], "score_flow": [], "score_recon": []}
        if self._chooses_reduction:  # every reduction's terms, for the scorer to choose one (2D items only)
            self.records.update({f"score_{name}@{r}": [] for name in TERMS for r in REDUCTIONS})
        self.normal_pixels = {name: [] for name in TERMS}
        self.panels = []

    def collect(self, engine: Engine) -> None:
        output = _batched(engine.state.output)
        count = output["score"].shape[0]
        names = batch_filenames(engine.state.batch, "image", count)
        if output["score"].ndim == 2:  # volumes: one record per scored slice
            depth = output["score"].shape[1]
            self.records["volume"] += [n for n in names for _ in range(depth)]
            slices = output["slice_index"].tolist()
            self.records["slice"] += [k for ks in slices for k in ks]
            names = [f"{n}#slice={k}" for n, ks in zip(names, slices) for k in ks]
        else:
            self.records["volume"] += [""] * count
            self.records["slice"] += [-1] * count
        labels = output.get("label", torch.full((len(names),), -1)).view(-1)
        if labels.numel() != len(names):  # a volume-level label says nothing about each slice
            labels = torch.full((len(names),), -1)
        self.records["name"] += names
        self.records["label"] += [int(v) for v in labels.tolist()]
        for key in ("score_flow", "score_recon"):
            self.records[key] += output[key].reshape(-1).tolist()
        if self.calibrate and output["score"].ndim == 1:
            normal = labels == 0
            for name in TERMS:
                self.normal_pixels[name].append(pixel_sample(output[f"map_{name}"][normal]).cpu())
                if self._chooses_reduction:
                    for r in REDUCTIONS:
                        reduced = reduce_map(output[f"map_{name}"], r, self.scorer.topk_fraction)
                        self.records[f"score_{name}@{r}"] += reduced.reshape(-1).tolist()
        if self.plots and output["score"].ndim == 1:
            self._keep_panel_samples(output, labels)

    def _keep_panel_samples(self, output: dict, labels: torch.Tensor) -> None:
        for index, label in enumerate(labels.view(-1).tolist()):
            if sum(p["label"] == label for p in self.panels) < self.n_panel_samples // 2:
                sample = {key: output[key][index].cpu().numpy() for key in ("image", "reconstruction", "pred")}
                sample["residual"] = output["map_residual"][index].cpu().numpy()
                sample["anomaly_map"] = sample.pop("pred")
                sample["label"] = label
                sample["score"] = float(output["score"][index])
                self.panels.append(sample)

    @property
    def model(self) -> torch.nn.Module:
        return unwrapped(self.network)

    @property
    def scorer(self):
        return self.model.scorer

    @property
    def _chooses_reduction(self) -> bool:
        return self.calibrate and self.scorer.reduction_selection == "validation"

    def _gather(self) -> bool:
        """Merge every process's records (sharded evaluation); True on the process that writes the outputs."""
        if not self.distributed:
            return True
        shards = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shards, self.records)
        merged = {key: [value for shard in shards for value in shard[key]] for key in self.records}
        seen, keep = set(), []  # a padded sampler may hand one item to two processes: count it once
        for index, name in enumerate(merged["name"]):
            if name not in seen:
                seen.add(name)
                keep.append(index)
        self.records = {key: [values[i] for i in keep] for key, values in merged.items()}
        return torch.distributed.get_rank() == 0

    def complete(self, engine: Engine) -> dict:
        writer = self._gather()
        labels = np.asarray(self.records["label"])
        terms = {name: torch.tensor(self.records[f"score_{name}"]) for name in ("flow", "recon")}
        labelled = labels >= 0
        if self.calibrate:
            self._require_both_classes(labels[labelled])
            pixels = {
                name: torch.cat(values) if values else torch.zeros(0) for name, values in self.normal_pixels.items()
            }
            by_reduction = None
            if self._chooses_reduction and len(self.records["score_flow@mean"]) == len(labels):
                by_reduction = {
                    r: {name: torch.tensor(self.records[f"score_{name}@{r}"]) for name in TERMS} for r in REDUCTIONS
                }
            elif self._chooses_reduction:  # whole volumes: their slices' maps are not kept
                logger.warning("score_reduction validation needs 2D validation items; %s kept.", self.scorer.reduction)
            scores = self.scorer.fit(labels, terms, pixels, by_reduction).numpy()
            if by_reduction and self.scorer.reduction_aucs:
                terms = by_reduction[self.scorer.reduction]
                logger.info(
                    "score reduction chosen on validation: %s (AUC by reduction: %s)",
                    self.scorer.reduction,
                    {r: round(a, 4) for r, a in self.scorer.reduction_aucs.items()},
                )
            if self.scorer.beta_aucs:
                logger.info(
                    "beta chosen on validation: %.1f (AUC by beta: %s)",
                    self.scorer.beta,
                    {b: round(a, 4) for b, a in self.scorer.beta_aucs.items()},
                )
        else:
            scores = self.scorer.combine(terms).numpy()
        metrics = anomaly_metrics(labels[labelled], scores[labelled]) if labelled.any() else {}
        engine.state.metrics.update({f"{self.prefix}{k}": metrics[k] for k in METRICS if k in metrics})
        logger.info("%s", ", ".join(f"{self.prefix}{k}: {metrics[k]:.4f}" for k in METRICS if k in metrics))
        if self.output_dir and writer:
            self._write(labels, scores, terms, metrics)
            if self.calibrate and metrics.get("auc", -np.inf) > self.kept_auc:  # strictly better, as the saver
                self.kept_auc, self.kept_epoch = metrics["auc"], engine.state.epoch
                kept = {"epoch": engine.state.epoch, "paper_protocol": metrics, "scorer": self.scorer_description()}
                reports.write_json(os.path.join(self.output_dir, f"{self.prefix}kept_metrics.json"), kept)
        return metrics

    def _write(self, labels, scores, terms, metrics) -> None:
        out = self.output_dir
        rows = [
            {"name": n, "label": int(l), "score": float(s), "score_flow": float(f), "score_recon": float(r)}
            for n, l, s, f, r in zip(self.records["name"], labels, scores, terms["flow"], terms["recon"])
        ]
        reports.write_csv(os.path.join(out, f"{self.prefix}scores.csv"), rows)
        volumes = [v for v in dict.fromkeys(self.records["volume"]) if v]
        if volumes:
            reports.write_csv(os.path.join(out, f"{self.prefix}volume_scores.csv"), self.volume_rows(volumes, scores))
        summary = {"paper_protocol": metrics, "scorer": self.scorer_description()}
        both_classes = (labels == 0).any() and (labels == 1).any()
        threshold = float(self.scorer.threshold)
        if not self.calibrate and both_classes and np.isfinite(threshold):
            labelled = labels >= 0
            summary["deployment_protocol"] = anomaly_metrics(labels[labelled], scores[labelled], threshold)
        if self.protocol_folds and both_classes:
            summary["validation_protocol"] = validation_protocol(labels, scores, self.protocol_folds, seed=self.seed)
        reports.write_json(os.path.join(out, f"{self.prefix}metrics.json"), summary)
        if self.plots and both_classes:
            curves = {
                f"{getattr(self.model, 'method', '')} score": scores,
                "S_flow": terms["flow"].numpy(),
                "S_recon": terms["recon"].numpy(),
            }
            reports.plot_roc(os.path.join(out, f"{self.prefix}roc.png"), labels, curves)
            reports.plot_score_distributions(
                os.path.join(out, f"{self.prefix}score_distributions.png"), labels, scores, metrics.get("threshold")
            )
            reports.plot_panels(os.path.join(out, f"{self.prefix}panels.png"), self.panels)

    def volume_rows(self, volumes: list[str], scores: np.ndarray) -> list[dict]:
        """A volume's score (``scores.volume_score``) and the slice it comes from, among its scored slices."""
        owner, slices = np.asarray(self.records["volume"]), np.asarray(self.records["slice"])
        rows = []
        for volume in volumes:
            score, top = volume_score(torch.as_tensor(scores[owner == volume]))
            max_slice = int(slices[owner == volume][top])
            rows.append(
                {"volume": volume, "score": score, "max_slice": max_slice, "n_slices": int((owner == volume).sum())}
            )
        return rows

    def scorer_description(self) -> dict:
        scorer = self.scorer
        return {
            "beta": scorer.beta,
            "beta_selection": scorer.beta_selection,
            "threshold": float(scorer.threshold),
            "pixel_threshold": float(scorer.pixel_threshold),
            "mask_quantile": scorer.mask_quantile,
            "flow_score": scorer.flow_score,
            "reduction": scorer.reduction,
            "reduction_selection": scorer.reduction_selection,
            "normalization": scorer.normalization,
            "term_stats": {"flow": scorer.term_stats[0].tolist(), "recon": scorer.term_stats[1].tolist()},
        }


class MLflowDetailsHandler:
    """Adds what MONAI's ``--tracking mlflow`` handler does not record to the run that handler opened.

    ``python -m monai.bundle run ... --tracking mlflow`` appends a ``MLFlowHandler`` to the engine's handlers; this
    companion finds it on the same engine and logs, into its run: the AE-FLOW ``params`` once, the loss parts
    ``output_keys`` every iteration, and at completion every file matching ``artifact_globs`` in ``artifacts_dir``
    (metrics JSON, score CSV, figures). Without tracking it does nothing.

    MONAI's handler joins any unfinished run of the experiment: one left by a killed training, or by an evaluation
    (MONAI never closes a validator's run). When that run holds other values of these ``params`` (MLflow refuses to
    change a param), this run is tracked as a new run instead; a run of the same params (the killed training,
    resumed) goes on in its run. ``close_run`` (default: on an engine that is not a trainer, whose MONAI handler
    leaves its run open) ends the run at completion, so that an evaluation leaves no run for the next to join.
    """

    def __init__(
        self,
        params: dict | None = None,
        output_keys: tuple[str, ...] = (),
        artifacts_dir: str | None = None,
        artifact_globs: tuple[str, ...] = ("*metrics.json", "*scores.csv", "*.png"),
        close_run: bool | None = None,
    ):
        self.params = params or {}
        self.output_keys = tuple(output_keys)
        self.artifacts_dir = artifacts_dir
        self.artifact_globs = tuple(artifact_globs)
        self.close_run = close_run
        self._params_logged = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    @staticmethod
    def tracker(engine: Engine, opened: bool = True):
        """The MONAI ``MLFlowHandler`` attached to ``engine`` with an open run (any, with ``opened=False``)."""
        from monai.handlers import MLFlowHandler

        for handlers in engine._event_handlers.values():
            for entry in handlers:
                owner = getattr(entry[0], "__self__", None)
                if isinstance(owner, MLFlowHandler) and (owner.cur_run is not None or not opened):
                    return owner
        return None

    @staticmethod
    def _run_to_join(tracker):
        """The unfinished run ``MLFlowHandler.start`` would join (MONAI 1.x's rule), or None."""
        tracker._set_experiment()
        runs = tracker.client.search_runs(tracker.experiment.experiment_id)
        runs = [r for r in runs if r.info.run_name == tracker.run_name or not tracker.run_name]
        runs = [r for r in runs if r.info.status != tracker.run_finish_status]
        return runs[-1] if runs else None

    def _conflicts(self, tracker, run) -> dict:
        logged = tracker.client.get_run(run.info.run_id).data.params
        return {k: (logged[k], str(v)) for k, v in self.params.items() if k in logged and logged[k] != str(v)}

    def _own_run(self, engine: Engine, tracker) -> None:
        """Track this run in a new MLflow run where the one joined (or to be joined) holds other param values."""
        if not self.params:
            return
        run = tracker.cur_run or self._run_to_join(tracker)
        conflicts = self._conflicts(tracker, run) if run is not None else {}
        if not conflicts:
            return
        opened = tracker.cur_run is not None
        tracker._set_experiment()
        name = tracker.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        tracker.cur_run = tracker.client.create_run(experiment_id=tracker.experiment.experiment_id, run_name=name)
        logger.warning(
            "MLflow run %s (%s, left unfinished by a killed training or an evaluation) holds other params than this "
            "run's (%s): this run is tracked as a new run, %s.",
            run.info.run_id,
            run.info.status,
            "; ".join(f"{k} {old} there, {new} here" for k, (old, new) in conflicts.items()),
            tracker.cur_run.info.run_id,
        )
        if opened:  # MONAI's handler logged its own params into the other run already
            tracker._log_params({attr: getattr(engine.state, attr, None) for attr in tracker.default_tracking_params})

    def started(self, engine: Engine) -> None:
        tracker = self.tracker(engine, opened=False)
        if tracker is None:
            return
        self._own_run(engine, tracker)
        self._params_logged = False
        close = self.close_run
        if close is None:
            from monai.engines import Trainer

            close = not isinstance(engine, Trainer) and not tracker.close_on_complete
        if close and not engine.has_event_handler(self.close, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.close)  # after every handler attached before the run

    def _log_params_once(self, engine: Engine, tracker) -> None:
        if not self._params_logged and self.params:
            self._own_run(engine, tracker)  # MONAI's handler may have opened its run after this handler's start
            logged = tracker.client.get_run(tracker.cur_run.info.run_id).data.params
            tracker._log_params({k: str(v) for k, v in self.params.items() if k not in logged})
        self._params_logged = True

    def iteration_completed(self, engine: Engine) -> None:
        tracker = self.tracker(engine)
        if tracker is None:
            return
        self._log_params_once(engine, tracker)
        output = _batched(engine.state.output) if self.output_keys else {}
        values = {key: float(torch.as_tensor(output[key]).float().mean()) for key in self.output_keys if key in output}
        if values:
            tracker._log_metrics(values, step=engine.state.iteration)

    def completed(self, engine: Engine) -> None:
        tracker = self.tracker(engine)
        if tracker is None:
            return
        self._log_params_once(engine, tracker)
        if not self.artifacts_dir or not os.path.isdir(self.artifacts_dir):
            return
        run_id = tracker.cur_run.info.run_id
        for pattern in self.artifact_globs:
            for path in sorted(Path(self.artifacts_dir).glob(pattern)):
                tracker.client.log_artifact(run_id, str(path))

    def close(self, engine: Engine) -> None:
        tracker = self.tracker(engine)
        if tracker is not None:
            tracker.close()


class EarlyStopOnValidation:
    """Stops training when the validation metric has not improved for ``patience`` validations (issue 13: train
    until validation AUC stops improving; the best epoch is the one the checkpoint saver keeps).

    Ignite's ``EarlyStopping`` attached to the trainer, reading the validator's metric after each validation, so
    the config needs no reference from the validator back to the trainer (which would be circular).
    ``patience=None`` (or 0) disables it. The validations so far are resume state (``state_dict``): a resumed run
    counts on from them, as the uninterrupted run would, also with another patience.

    With or without patience, a run whose budget ends at its best validation so far is told so: the kept model may
    not be the best the setting reaches (measured on the synthetic lesion slices: a fixed 8 epochs kept epoch 8,
    validation AUC 94.51; with patience 5 the same seeds ran on to epochs 21-36 and reached 98.33).
    """

    def __init__(
        self,
        validator: Engine,
        patience: int | None = None,
        metric_name: str = "val_auc",
        interval: int = 1,
        min_delta: float = 0.0,
    ):
        self.validator = validator
        self.patience = optional_count(patience, "early_stop_patience (validations; 0 or null: off)") or 0
        self.metric_name = metric_name
        self.interval = max(1, int(interval))
        self.min_delta = float(min_delta)
        self.history: list[tuple[int, float]] = []  # (epoch, metric) of the run's validations, resumed ones included
        self.stopper = None

    def score(self, _engine: Engine) -> float:
        return float(self.validator.state.metrics[self.metric_name])

    def _record(self, trainer: Engine) -> None:
        self.history.append((trainer.state.epoch, self.score(trainer)))

    def state_dict(self) -> dict:
        return {"history": [[epoch, value] for epoch, value in self.history]}

    def load_state_dict(self, state: Mapping) -> None:
        self.history = [(int(epoch), float(value)) for epoch, value in state["history"]]
        if self.stopper is not None:
            self.stopper.counter, self.stopper.best_score = self._replayed()

    def _replayed(self) -> tuple[int, float | None]:
        """Ignite's count and best score after this run's validations so far, whatever the patience then."""
        from ignite.handlers import EarlyStopping

        patience = len(self.history) + 1
        replay = EarlyStopping(patience, lambda value: value, Engine(lambda *_: None), threshold=self.min_delta)
        for _, value in self.history:
            replay(value)  # its score function reads the value handed over; never reaches the patience
        return replay.counter, replay.best_score

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self._record)
        trainer.add_event_handler(Events.COMPLETED, self._warn_if_still_rising)
        if not self.patience:
            return
        from ignite.handlers import EarlyStopping

        self.stopper = EarlyStopping(self.patience, self.score, trainer, threshold=self.min_delta)
        self.stopper.logger = logger  # its "stopping" message goes to the run's log
        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.stopper)
        trainer.add_event_handler(Events.COMPLETED, self._report)

    def _warn_if_still_rising(self, trainer: Engine) -> None:
        history = self.history
        if trainer.state.epoch < trainer.state.max_epochs or len(history) < 2:
            return  # stopped early, or nothing to compare
        (last_epoch, last), earlier_best = history[-1], max(value for _, value in history[:-1])
        if last > earlier_best + self.min_delta:
            logger.warning(
                "The budget ended at the best validation so far (%s %.4f at epoch %d, up from %.4f): it may still be "
                "rising. More epochs, with early_stop_patience, may keep a better model.",
                self.metric_name,
                last,
                last_epoch,
                earlier_best,
            )

    def _report(self, trainer: Engine) -> None:
        if trainer.state.epoch < trainer.state.max_epochs:
            logger.info(
                "Early stop after epoch %d: %s did not improve on %.4f for %d validation(s).",
                trainer.state.epoch,
                self.metric_name,
                self.stopper.best_score,
                self.patience,
            )
