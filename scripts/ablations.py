"""The paper's ablations as commands: the alpha x beta AUC grid (figure 7) and the subnet x reconstruction-loss
table (table 3), plus a comparison of configurations (AE-FLOW, plain autoencoder, flow only; table 1).

Every setting is one ``train.json`` training followed by ``evaluate.json`` on the test split, run in this
process through MONAI's ``ConfigWorkflow`` with the given config files and overrides. Set ``--feature_cache_dir``
so that the frozen encoder's features are computed once and shared by every setting. Beta is a scoring weight,
not a training one: each trained alpha is re-scored at every beta from its test score terms, so the grid costs
one training per alpha.

``compare --seeds`` trains every variant once per seed and reports mean and std of the kept model's validation AUC
and of its test AUC, keeping each seed's validation scores; with ``--baseline`` (an earlier ``comparison.json`` of
the same seeds) it decides the study's rule (``metrics.paired_rule``) for each variant. ``features`` screens
encoders cheaply: the flow alone on each encoder's cached features, once per seed, chosen on validation (the test
AUC is reported beside it, never used).

``scoring`` re-scores one trained model with every S_flow form x map reduction (the open points of equation (2)),
each calibrated on the validation split, so that the scoring design is chosen on validation data, not on test.
``reconstruction`` measures, on one trained model, candidate reconstruction terms (pixel MSE, a residual in the
encoder's feature space, SSIM of high-passed images) alone and beside the flow term, and the input's own texture
energy, which shows whether the residual follows the texture rather than the anomaly. ``ensemble`` scores several
trained settings (other encoders, seeds) as one detector, the mean of their calibrated scores, on validation and
test. ``ensemble-seeds`` and ``study`` run seed-paired design studies (``scripts.studies``): a design trained once
per seed and kept only if validation AUC is higher in every seed, by more than the noise margin on average, and
beyond what resampling the validation images alone can make (a paired bootstrap).

Each setting's folder also gets ``settings.json`` (the values of ``RECORDED_KEYS`` resolved from its configs and
overrides, and the wall time of training plus evaluation); ``record`` turns a setting's folder into the result
file committed under ``docs/results/``. A setting whose training diverges (``engines.TrainingDiverged``) is kept
as a result, ``{"diverged": {"what", "epoch", "iteration", "message"}}``, in its ``settings.json`` and in every
table, rather than ending the command and losing the settings before it; a rerun reuses it as it does a finished
setting (change the settings, e.g. ``grad_clip_norm``, to train it again). A setting is reused only while its configs
and overrides resolve to the values its ``settings.json`` recorded (a config file edited since makes another
setting); one trained afresh in the same folder first removes the earlier run's ``models/`` and ``eval/``.

    python -m scripts.ablations alpha-beta --configs configs/train.json configs/images_2d.json \
        configs/chest_xray.json --output docs/results/ablations/chest_xray --set epochs=20 \
        --set "feature_cache_dir=\\$'data/cache/chest_xray'"
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from monai.utils import convert_to_tensor, set_determinism
from sklearn.metrics import roc_auc_score

from . import reports
from .checkpoints import EXTENSIBLE_SETTINGS
from .encoders import EFFICIENTNET_LITE_PACKAGES
from .engines import TrainingDiverged
from .ensemble import combined
from .handlers import batch_filenames
from .metrics import anomaly_metrics, paired_rule, seed_scores
from .model_file import network_from_file
from .options import config_parser
from .scores import FLOW_SCORES, REDUCTIONS, AnomalyScorer, reduce_map

logger = logging.getLogger(__name__)
ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)
BETAS = tuple(round(0.1 * k, 1) for k in range(11))
SUBNETS = ("cnn2", "resnet")
RECON_LOSSES = ("mse", "ssim")
ENSEMBLE_RECORDED_KEYS = ("ensemble_members", "mask_quantile", "seed")
PROTOCOLS = ("paper_protocol", "deployment_protocol", "validation_protocol")
RECORDED_KEYS = (
    "encoder",
    "encoder_weights",
    "image_size",
    "in_channels",
    "subnet",
    "flow_blocks",
    "flow_init",
    "feature_norm",
    "alpha",
    "beta",
    "beta_selection",
    "recon_loss",
    "flow_normalization",
    "flow_score",
    "score_reduction",
    "score_normalization",
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "early_stop_patience",
    "train_grid_phases",
    "lr_schedule",
    "train_amp",
    "seed",
)


# the rows of the paper's table 1 and PatchCore: the config each adds to the bundle's (none for AE-FLOW itself)
METHOD_CONFIGS = {
    "ae-flow": [],
    "autoencoder": ["baseline_autoencoder.json"],
    "flow-only": ["baseline_flow_only.json"],
    "f-anogan": ["baseline_f_anogan.json"],
    "ganomaly": ["baseline_ganomaly.json"],
    "differnet": ["baseline_differnet.json"],
    "patchcore": ["baseline_patchcore.json"],
}


def method_variants(names: list[str], config_dir: Path) -> dict[str, list[str]]:
    """``compare --methods``: each named method's extra configs, from the folder of the bundle's configs."""
    unknown = [name for name in names if name not in METHOD_CONFIGS]
    if unknown:
        raise ValueError(f"Unknown method(s) {', '.join(unknown)}; known methods: {', '.join(METHOD_CONFIGS)}.")
    return {name: [str(config_dir / file) for file in METHOD_CONFIGS[name]] for name in names}


def _expression(path: Path) -> str:
    """A path as a config expression: MONAI appends to output_dir's raw value when it saves the run's config."""
    return f"$'{path}'"


def _study_parser(configs: list[str], overrides: dict, output: Path):
    """The bundle's configs with a study's overrides, writing nothing outside ``output``."""
    return config_parser(configs, {**overrides, "output_dir": _expression(output)})


def resolved_settings(configs: list[str], overrides: dict, keys=RECORDED_KEYS) -> dict:
    """The values a run used, resolved by MONAI's parser from the same config files and overrides (for an
    ensemble's assembly, ``configs/ensemble.json``: its members, whose files hold their own settings, and the md5
    of each member's file, so that an assembly is not reused once a member is trained again)."""
    parser = config_parser(configs, overrides)
    if parser.get("ensemble_members"):
        settings = {key: parser.get_parsed_content(key) for key in ENSEMBLE_RECORDED_KEYS if key in parser}
        return {**settings, "ensemble_member_md5": [_file_md5(path) for path in settings["ensemble_members"]]}
    return {key: parser.get_parsed_content(key) for key in keys if key in parser}


def _file_md5(path: str | os.PathLike) -> str | None:
    """A model file's md5 (None where there is no file), which traces a result to the model that produced it."""
    path = Path(path)
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None


def setting_record(configs: list[str], overrides: dict) -> dict:
    """What ``settings.json`` records of a setting before its wall time: its config files, its overrides and the
    values they resolve to."""
    return {"configs": list(configs), "overrides": overrides, **resolved_settings(configs, overrides)}


def setting_differences(recorded: dict, settings: dict) -> dict:
    """``{name: (recorded, now)}``: what differs between a run's ``settings.json`` and ``settings``
    (``setting_record``), compared as JSON stores them: the config files, each override, each resolved value (one
    that an older record lacks cannot be compared, and is not)."""
    now, unset = reports.as_json(settings), "(not set)"
    differing = {}
    if recorded.get("configs") != now["configs"]:
        differing["configs"] = (recorded.get("configs"), now["configs"])
    before, after = recorded.get("overrides") or {}, now["overrides"]
    for key in sorted(before.keys() | after.keys()):
        if before.get(key, unset) != after.get(key, unset):
            differing[key] = (before.get(key, unset), after.get(key, unset))
    for key, value in now.items():
        if key not in ("configs", "overrides") and key in recorded and recorded[key] != value:
            differing.setdefault(key, (recorded[key], value))
    return differing


def _difference_text(differing: dict) -> str:
    return "; ".join(f"{key} {before!r} -> {now!r}" for key, (before, now) in differing.items())


def _clear_earlier_run(workdir: Path, settings: dict) -> None:
    """Before a run, the record of the run that ended in ``workdir`` goes (this run's is written when it ends, so
    a killed run is never taken for the earlier one), and with it that run's ``models/`` and ``eval/`` when this
    run starts afresh, so that they are never taken for its results. It continues the earlier run (resumes from its
    state, ``checkpoints.ResumeCheckpoint``) only when that run completed and this one changes its budget alone
    (``EXTENSIBLE_SETTINGS``; not the epochs of a cosine schedule, which cannot be stretched)."""
    record = workdir / "settings.json"
    try:
        earlier = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return
    differing = setting_differences(earlier, settings)
    afresh = "diverged" in earlier or not set(differing) <= set(EXTENSIBLE_SETTINGS)
    if afresh or ("epochs" in differing and settings.get("lr_schedule") == "cosine"):
        for name in ("models", "eval"):
            shutil.rmtree(workdir / name, ignore_errors=True)
        logger.warning(
            "%s: removed the models/ and eval/ of the %s run there (%s): this run starts afresh.",
            workdir,
            "diverged" if "diverged" in earlier else "earlier",
            _difference_text(differing) or "the same settings",
        )
    record.unlink()


def run_setting(configs: list[str], overrides: dict, workdir: Path) -> dict:
    """Train then evaluate one setting; returns its test metrics JSON with the wall time added."""
    from .engines import bundle_workflow

    root = Path(configs[0]).resolve().parents[1]
    paths = {"ckpt_dir": _expression(workdir / "models"), "output_dir": _expression(workdir / "eval")}
    settings = setting_record(configs, overrides)
    _clear_earlier_run(workdir, settings)
    started = time.time()
    for extra in ([], ["configs/evaluate.json"]):
        workflow = bundle_workflow(root, [*configs, *[root / name for name in extra]], "train", **overrides, **paths)
        try:
            workflow.run()
        except Exception as error:
            diverged = _divergence(error)
            if diverged is None:
                raise
            wall_time_s = round(time.time() - started, 1)
            logger.error("%s: %s Recorded as diverged.", workdir, diverged["diverged"]["message"])
            reports.write_json(workdir / "settings.json", {**settings, "wall_time_s": wall_time_s, **diverged})
            return {**diverged, "wall_time_s": wall_time_s, "overrides": overrides}
        workflow.finalize()
    metrics = json.loads((workdir / "eval" / "test_metrics.json").read_text())
    metrics["wall_time_s"] = round(time.time() - started, 1)
    metrics["overrides"] = overrides
    reports.write_json(workdir / "settings.json", {**settings, "wall_time_s": metrics["wall_time_s"]})
    return metrics


def _divergence(error: BaseException) -> dict | None:
    """``{"diverged": ...}`` when training diverged behind ``error`` (MONAI's config parser wraps what a workflow
    raises, so the cause chain is searched), else None."""
    while error is not None:
        if isinstance(error, TrainingDiverged):
            return {"diverged": error.record()}
        error = error.__cause__ or error.__context__
    return None


def divergence_text(diverged: dict | list[dict]) -> str:
    """Where a run, or each diverged run of a design, diverged: ``seed 1: epoch 2, iteration 5 (loss)``."""
    texts = []
    for run in diverged if isinstance(diverged, list) else [diverged]:
        where = ", ".join(f"{key} {run[key]}" for key in ("encoder", "seed") if key in run)
        texts.append(
            f"{where + ': ' if where else ''}epoch {run['epoch']}, iteration {run['iteration']} ({run['what']})"
        )
    return "diverged at " + "; ".join(texts)


def kept_validation(workdir: Path) -> dict:
    """The validation metrics of the epoch kept in ``model.pt`` (older runs: the last epoch's, which may differ)."""
    kept = Path(workdir) / "eval" / "val_kept_metrics.json"
    return json.loads((kept if kept.is_file() else kept.with_name("val_metrics.json")).read_text())


def record(workdir: Path, output: Path, data: str, command: str, purpose: str = "") -> dict:
    """One committed result file from a setting's folder: what ran, on what, both protocols' metrics, and the md5
    of the model that produced them (so a shipped copy can be traced to its numbers)."""
    workdir = Path(workdir)
    settings = json.loads((workdir / "settings.json").read_text())
    test = json.loads((workdir / "eval" / "test_metrics.json").read_text())
    validation = kept_validation(workdir)
    result = {
        "data": data,
        "command": command,
        "purpose": purpose,
        "wall_time_s": settings.pop("wall_time_s"),
        "settings": settings,
        "validation": validation["paper_protocol"],
        "kept_epoch": validation.get("epoch"),
        "scorer": test["scorer"],
        "test": {key: test[key] for key in PROTOCOLS if key in test},
        "model_md5": hashlib.md5((workdir / "models" / "model.pt").read_bytes()).hexdigest(),
    }
    reports.write_json(output, result)
    return result


def _term_arrays(eval_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(eval_dir / "test_scores.csv") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in rows])
    return labels, np.array([float(r["score_flow"]) for r in rows]), np.array([float(r["score_recon"]) for r in rows])


def beta_curve(eval_dir: Path, betas=BETAS) -> dict[float, float]:
    """Test AUC (%) at every beta, from one evaluation's raw terms standardised as the trained scorer does."""
    labels, flow, recon = _term_arrays(eval_dir)
    stats = json.loads((eval_dir / "test_metrics.json").read_text())["scorer"]
    scorer = AnomalyScorer(normalization=stats["normalization"])
    scorer.term_stats.copy_(torch.tensor([stats["term_stats"]["flow"], stats["term_stats"]["recon"]]))
    terms = {"flow": torch.from_numpy(flow), "recon": torch.from_numpy(recon)}
    return {beta: 100 * float(roc_auc_score(labels, scorer.combine(terms, beta).numpy())) for beta in betas}


def alpha_beta(configs, overrides, output: Path, alphas=ALPHAS, betas=BETAS) -> dict:
    """Figure 7: one training per alpha, every beta scored from it; a JSON table and a heat-map PNG. A rerun reuses
    finished alphas."""
    grid, runs = [], {}
    for alpha in alphas:
        workdir = output / f"alpha_{alpha:g}"
        runs[alpha] = run_or_reuse(configs, {**overrides, "alpha": alpha, "beta_selection": "fixed"}, workdir)
        diverged = "diverged" in runs[alpha]  # its row stays empty (null in JSON, blank in the heat map)
        grid.append([None if diverged else beta_curve(workdir / "eval", betas)[beta] for beta in betas])
    table = {"alphas": list(alphas), "betas": list(betas), "test_auc": grid, "runs": runs}
    reports.write_json(output / "alpha_beta.json", table)
    values = np.array([[np.nan if auc is None else auc for auc in row] for row in grid], dtype=float)
    reports.plot_heatmap(
        output / "alpha_beta.png", values, alphas, betas, "alpha (loss)", "beta (score)", "test AUC (%)"
    )
    return table


def subnet_loss(configs, overrides, output: Path) -> dict:
    """Table 3: both flow subnets with both reconstruction losses; also as a comparison table (the kept model's
    validation AUC beside the test metrics) with every setting's ROC. A rerun reuses finished settings."""
    table, folders = {}, {}
    for subnet in SUBNETS:
        for recon_loss in RECON_LOSSES:
            name, setting = f"{subnet}+{recon_loss}", {**overrides, "subnet": subnet, "recon_loss": recon_loss}
            folders[name] = output / f"{subnet}_{recon_loss}"
            table[name] = run_or_reuse(configs, setting, folders[name])
    reports.write_json(output / "subnet_loss.json", table)
    write_comparison(output, table, folders)
    return table


def mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": [float(v) for v in values]}


def seed_summary(runs: dict[int, dict], workdirs: dict[int, Path]) -> dict:
    """Mean and std over seeds of the kept model's validation AUC (what chose it) and of its test AUC; a design
    with a diverged seed has none, and lists where each diverged seed stopped instead."""
    diverged = [{"seed": seed, **run["diverged"]} for seed, run in runs.items() if "diverged" in run]
    if diverged:
        return {"seeds": list(runs), "diverged": diverged, "runs": runs}
    validation = [kept_validation(workdirs[s]) for s in runs]
    return {
        "seeds": list(runs),
        "kept_epochs": [v.get("epoch") for v in validation],
        "validation_auc": mean_std([v["paper_protocol"]["auc"] for v in validation]),
        "test_auc": mean_std([r["paper_protocol"]["auc"] for r in runs.values()]),
        "wall_time_s": mean_std([r["wall_time_s"] for r in runs.values()]),
        "runs": runs,
    }


def finished_setting(configs: list[str], overrides: dict, workdir: Path) -> dict | None:
    """The test metrics of a setting already run in ``workdir`` with the same configs, overrides and resolved
    settings (a config file edited since makes another setting), or its divergence record (the same settings would
    diverge again); else None, saying what differs: an interrupted comparison resumes at the first unfinished
    variant."""
    try:
        settings = json.loads((workdir / "settings.json").read_text())
        differing = setting_differences(settings, setting_record(configs, overrides))
        if differing:
            logger.info(
                "%s: trained again, its settings differ from the run there: %s", workdir, _difference_text(differing)
            )
            return None
        if "diverged" in settings:
            return {key: settings[key] for key in ("diverged", "wall_time_s", "overrides")}
        metrics = json.loads((workdir / "eval" / "test_metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return {**metrics, "wall_time_s": settings.get("wall_time_s"), "overrides": overrides}


def run_or_reuse(configs: list[str], overrides: dict, workdir: Path) -> dict:
    done = finished_setting(configs, overrides, workdir)
    if done is not None:
        logger.info("%s: finished before with the same settings, reused", workdir)
        return done
    return run_setting(configs, overrides, workdir)


def comparison_rows(table: dict, folders: dict[str, Path]) -> list[dict]:
    """One row per variant: the kept model's validation AUC and the test metrics of both protocols (%)."""
    rows = []
    for name, result in table.items():
        if "diverged" in result:
            rows.append({"method": name, "diverged": divergence_text(result["diverged"])})
            continue
        if "test_auc" in result:  # a seed summary
            rows.append(
                {
                    "method": name,
                    "validation_auc": 100 * result["validation_auc"]["mean"],
                    "test_auc": 100 * result["test_auc"]["mean"],
                    "test_auc_std": 100 * result["test_auc"]["std"],
                    "seeds": len(result["seeds"]),
                    "wall_time_s": result["wall_time_s"]["mean"],
                }
            )
            continue
        paper, deployment = result["paper_protocol"], result.get("deployment_protocol", {})
        row = {"method": name, "validation_auc": 100 * kept_validation(folders[name])["paper_protocol"]["auc"]}
        row.update({f"test_{k}": 100 * paper[k] for k in ("auc", "f1", "acc", "sen", "spe")})
        row.update({f"deployment_{k}": 100 * deployment[k] for k in ("sen", "spe") if k in deployment})
        row["wall_time_s"] = result["wall_time_s"]
        rows.append(row)
    return rows


def comparison_markdown(rows: list[dict]) -> str:
    columns = [c for c in rows[0] if c != "method"] if rows else []
    for row in rows[1:]:
        columns += [c for c in row if c not in columns and c != "method"]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(output: Path, table: dict, folders: dict[str, Path]) -> None:
    """``comparison.json``, ``comparison.md`` and, for single runs, ``comparison_roc.png`` with every method."""
    reports.write_json(output / "comparison.json", table)
    rows = comparison_rows(table, folders)
    with reports.atomic_path(output / "comparison.md") as tmp:
        Path(tmp).write_text(comparison_markdown(rows))
    curves, labels = {}, None
    for name, folder in folders.items():
        scores_file = folder / "eval" / "test_scores.csv"
        if name in table and "diverged" not in table[name] and scores_file.is_file():
            with open(scores_file) as f:
                scored = list(csv.DictReader(f))
            labels = np.array([int(r["label"]) for r in scored])
            curves[name] = np.array([float(r["score"]) for r in scored])
    if curves and labels is not None and len(set(labels.tolist())) == 2:
        reports.plot_roc(output / "comparison_roc.png", labels, curves, title="ROC, test split")


def compare(
    configs,
    overrides,
    output: Path,
    variants: dict[str, list[str]],
    seeds: list[int] | None = None,
    baseline: Path | None = None,
) -> dict:
    """Table 1's rows: each variant adds its override config files (AE-FLOW's own parts for the autoencoder and
    flow-only rows, ``configs/baseline_<name>.json`` for the comparison methods). With ``seeds``, every variant is
    trained once per seed (initialisation, data order) and summarised as mean and std, with each seed's validation
    scores of its kept model; with ``baseline`` as well, an earlier ``comparison.json`` of the same seeds and
    variants, each variant gets ``paired_rule``'s decision against the variant of the same name there. The table is
    rewritten after each variant, so a finished variant is kept if a later one fails; a rerun reuses finished
    variants."""
    check_unique("--seeds", seeds or [])
    earlier = _baseline_comparison(Path(baseline), seeds, list(variants)) if baseline is not None else None
    table, folders = {}, {}
    for name, extra in variants.items():
        folders[name] = folder = output / name.replace(" ", "_")
        if not seeds:
            table[name] = run_or_reuse([*configs, *extra], overrides, folder)
        else:
            workdirs = {seed: folder / f"seed_{seed}" for seed in seeds}
            runs = {
                seed: run_or_reuse([*configs, *extra], {**overrides, "seed": seed}, workdirs[seed]) for seed in seeds
            }
            table[name] = seed_summary(runs, workdirs)
            if "diverged" not in table[name]:
                scored = [_calibrated_scores(workdirs[seed], "validation", folder) for seed in seeds]
                table[name]["validation_scores"] = named_seed_scores(scored)
            if earlier is not None:
                table[name]["rule"] = {"baseline": str(baseline), **checked_rule(table[name], earlier[name], baseline)}
                logger.info(
                    "%s: rule %s: %s", name, "met" if table[name]["rule"]["met"] else "not met", table[name]["rule"]
                )
        write_comparison(output, table, folders)
    return table


def check_unique(option: str, values: list) -> None:
    """A repeated seed or encoder would be trained once and counted twice (one model as a two-member ensemble, one
    run as two paired seeds): refused before anything trains."""
    repeated = [str(value) for value in dict.fromkeys(values) if list(values).count(value) > 1]
    if repeated:
        raise ValueError(f"{option} lists {', '.join(repeated)} more than once: give each once.")


def named_seed_scores(per_seed: list[tuple]) -> dict:
    """``metrics.seed_scores`` of each seed's (labels, scores, names), with the validation images' names beside:
    a later study pairs with this one only on the same images, which the labels alone cannot tell."""
    names = list(per_seed[0][2])
    if any(list(seed_names) != names for _, _, seed_names in per_seed):
        raise ValueError("The seeds scored different validation images.")
    return {**seed_scores([(labels, scores) for labels, scores, _ in per_seed]), "names": names}


def _portable_names(names: list[str]) -> list[str]:
    """Image names below the folder they all share: the same images under another data root compare equal."""
    root = os.path.dirname(os.path.commonprefix(names))
    return [name[len(root) :].lstrip("/") if root else name for name in names]


def checked_rule(design: dict, baseline: dict, source) -> dict:
    """``paired_rule``, once the baseline is known to have scored the same validation images as the design, by
    their names (the rule itself compares the labels, which two splits can share); a baseline recorded without
    names is paired with a warning that this cannot be verified."""
    if "diverged" not in design and "diverged" not in baseline:
        names = [summary.get("validation_scores", {}).get("names") for summary in (design, baseline)]
        if names[1] is None:
            logger.warning(
                "The baseline %s recorded no validation image names: that it scored the images this study scored "
                "cannot be verified (only their labels are compared).",
                source,
            )
        elif names[0] is not None and _portable_names(names[0]) != _portable_names(names[1]):
            differing = sum(a != b for a, b in zip(*map(_portable_names, names))) + abs(len(names[0]) - len(names[1]))
            raise ValueError(
                f"The baseline {source} scored other validation images than this study ({differing} of "
                f"{max(map(len, names))} differ): no paired rule. Give it a baseline run on the same datalist."
            )
    return paired_rule(design, baseline)


def check_baseline_seeds(path: Path, found: list[int], seeds: list[int]) -> None:
    """The rule pairs a study with its baseline seed by seed: a baseline of other seeds is refused before training."""
    if list(found) != list(seeds):
        raise ValueError(f"The baseline {path} was run with seeds {found}, this study with {seeds}.")


def _baseline_comparison(path: Path, seeds: list[int] | None, variants: list[str]) -> dict:
    """An earlier ``compare --seeds`` table holding every variant with the same seeds, checked before training; or
    an ``ensemble-seeds`` record of the same seeds, the baseline of every variant (a single model against the
    ensemble it might replace)."""
    if not seeds:
        raise ValueError("A baseline needs --seeds: the rule pairs the two comparisons seed by seed.")
    if not path.is_file():
        raise FileNotFoundError(f"The baseline {path} does not exist: pass an earlier comparison.json.")
    earlier = json.loads(path.read_text())
    if "ensemble" in earlier and "seeds" in earlier:
        check_baseline_seeds(path, earlier["seeds"], seeds)
        return {name: earlier["ensemble"] for name in variants}
    for name in variants:
        if list(earlier.get(name, {}).get("seeds", [])) != list(seeds):
            found = earlier.get(name, {}).get("seeds")
            raise ValueError(f"The baseline {path} has no variant {name!r} run with seeds {seeds} (found: {found}).")
    return earlier


def _cached_features(parser, section: str, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """A split's frozen-encoder features and labels, through the configs' own feature-cache dataset."""
    if section == "validate":
        parser["validate#data#split"] = split
    dataset = parser.get_parsed_content(f"{section}#dataset", lazy=False)
    items = [dataset[index] for index in range(len(dataset))]
    features = torch.stack([convert_to_tensor(item["features"], track_meta=False).float() for item in items])
    return features, np.array([int(item.get("label", 0)) for item in items])


def flow_probe(train, val, test, feature_norm: str, subnet: str, epochs: int, batch_size: int, lr: float, seed: int):
    """The flow of AE-FLOW alone (LayerNorm, 8 blocks, nll/mean score) on cached features: a cheap screen of what
    the flow can find in one set of features, per epoch, with the epoch kept by validation AUC.

    The seed is set as training sets it (``set_determinism``): FrEIA draws each block's channel permutation from
    NumPy, so seeding torch alone left the flow's permutations to chance and a probe's "seed" unrepeatable."""
    from .flow import build_flow
    from .losses import flow_nll
    from .networks import build_feature_norm
    from .scores import flow_score_map

    set_determinism(seed=seed)
    features, val_labels, test_labels = train[0], val[1], test[1]
    norm = build_feature_norm(feature_norm, features.shape[1:])
    flow = build_flow(*features.shape[1:], subnet=subnet)
    optimizer = torch.optim.Adam([*flow.parameters(), *norm.parameters()], lr=lr)

    def scores(split: torch.Tensor) -> np.ndarray:
        flow.eval()
        with torch.no_grad():
            out = [
                flow_score_map(flow(norm(split[b : b + 128]))[0]).mean(dim=(1, 2, 3)) for b in range(0, len(split), 128)
            ]
        flow.train()
        return torch.cat(out).numpy()

    history = []
    for _ in range(epochs):
        order = torch.randperm(len(features))
        for start in range(0, len(features), batch_size):
            z_prime, log_jac_det = flow(norm(features[order[start : start + batch_size]]))
            loss = flow_nll(z_prime, log_jac_det).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append(
            {
                "validation_auc": float(roc_auc_score(val_labels, scores(val[0]))),
                "test_auc": float(roc_auc_score(test_labels, scores(test[0]))),
            }
        )
    kept = max(range(epochs), key=lambda epoch: history[epoch]["validation_auc"])
    return {"kept_epoch": kept + 1, **history[kept], "by_epoch": history}


def feature_screen(configs, overrides, output: Path, encoders: list[str], seeds: list[int], epochs: int) -> dict:
    """Which frozen features suit the flow, chosen on validation: the flow alone on each encoder's cached features,
    once per seed; mean and std of the kept epoch's validation AUC decide, test AUC is reported beside it."""
    table = {}
    for encoder in encoders:
        parser = _study_parser(configs, {**overrides, "encoder": encoder}, output)
        splits = [_cached_features(parser, "train", "training")]
        splits += [_cached_features(parser, "validate", split) for split in ("validation", "test")]
        settings = {key: parser.get_parsed_content(key) for key in ("feature_norm", "subnet", "batch_size")}
        lr = parser.get_parsed_content("learning_rate")
        runs = {seed: flow_probe(*splits, **settings, epochs=epochs, lr=lr, seed=seed) for seed in seeds}
        table[encoder] = {
            "validation_auc": mean_std([run["validation_auc"] for run in runs.values()]),
            "test_auc": mean_std([run["test_auc"] for run in runs.values()]),
            "channels": int(splits[0][0].shape[1]),
            "runs": runs,
        }
        logger.info(
            "%-20s validation AUC %.4f +- %.4f  test AUC %.4f +- %.4f",
            encoder,
            table[encoder]["validation_auc"]["mean"],
            table[encoder]["validation_auc"]["std"],
            table[encoder]["test_auc"]["mean"],
            table[encoder]["test_auc"]["std"],
        )
    chosen = max(table, key=lambda name: table[name]["validation_auc"]["mean"])
    result = {"chosen_on_validation": chosen, "epochs": epochs, "seeds": list(seeds), "encoders": table}
    reports.write_json(output / "feature_screen.json", result)
    return result


def _split_passes(parser, network, split: str):
    """One no-grad pass over a split: per batch, its images, cached encoder features (None where the configs cache
    none: ``network.features_of`` computes them, and a method without an encoder needs none), labels and the
    images' names (as the evaluation's score CSV names them). A split without both classes is refused before
    anything is fitted on, or measured on, it."""
    parser["validate#data#split"] = split
    labels = []
    with torch.no_grad():
        for batch in parser.get_parsed_content("validate#dataloader"):
            images = convert_to_tensor(batch["image"], track_meta=False).float()
            features = convert_to_tensor(batch["features"], track_meta=False).float() if "features" in batch else None
            batch_labels = torch.as_tensor(batch["label"]).view(-1).tolist()
            labels += batch_labels
            yield images, features, batch_labels, batch_filenames(batch, "image", len(batch_labels))
    if set(labels) != {0, 1}:
        raise ValueError(f"The {split} split needs normal (0) and abnormal (1) items; its labels: {set(labels)}.")


def _split_terms(parser, network, split: str, designs) -> tuple[np.ndarray, dict]:
    """One pass over a split: its labels and, for every (S_flow form, reduction) design, both image-level terms."""
    base = network.scorer
    scorers = {
        form: AnomalyScorer(flow_score=form, data_range=base.data_range, ssim_window=base.ssim_window)
        for form in dict.fromkeys(form for form, _ in designs)
    }
    labels, terms = [], {design: {"flow": [], "recon": []} for design in designs}
    for images, features, batch_labels, _ in _split_passes(parser, network, split):
        features = network.features_of(images, features)
        out = network.flow_decode(features)
        maps = {form: scorer.term_maps(out.z_prime, images, out.reconstruction) for form, scorer in scorers.items()}
        labels += batch_labels
        for form, reduction in designs:
            for name in ("flow", "recon"):
                terms[form, reduction][name].append(reduce_map(maps[form][name], reduction, base.topk_fraction))
    return np.asarray(labels), {d: {n: torch.cat(v) for n, v in t.items()} for d, t in terms.items()}


def _design_metrics(form: str, val_labels, val_terms, test_labels, test_terms, preferred_beta: float) -> dict:
    """Fit the scorer on the validation split (normalisation, beta, threshold), apply it to test."""
    scorer = AnomalyScorer(beta=preferred_beta, flow_score=form, beta_selection="validation")
    scorer.fit(val_labels, val_terms)
    test = {name: scorer.standardize(name, value).numpy() for name, value in test_terms.items()}
    test_scores = scorer.combine(test_terms).numpy()
    return {
        "beta": scorer.beta,
        "validation_auc": scorer.beta_aucs[scorer.beta],
        "validation_auc_by_beta": scorer.beta_aucs,
        "test_auc_flow_term": float(roc_auc_score(test_labels, test["flow"])),
        "test_auc_recon_term": float(roc_auc_score(test_labels, test["recon"])),
        "test_paper_protocol": anomaly_metrics(test_labels, test_scores),
        "test_deployment_protocol": anomaly_metrics(test_labels, test_scores, float(scorer.threshold)),
    }


def scoring_designs(configs, overrides, workdir: Path, output: Path) -> dict:
    """Equation (2)'s open choices re-scored from one trained model: every S_flow form x map reduction, each with
    its own normalisation, beta and threshold chosen on the validation split, then measured on the test split.
    The design with the best validation AUC is marked; the test numbers never take part in the choice."""
    parser = _study_parser(configs, overrides, output)
    network = network_from_file(Path(workdir) / "models" / "model.pt").eval()
    designs = [(form, reduction) for form in FLOW_SCORES for reduction in REDUCTIONS]
    val_labels, val_terms = _split_terms(parser, network, "validation", designs)
    test_labels, test_terms = _split_terms(parser, network, "test", designs)
    rows = {
        f"{form}/{reduction}": _design_metrics(
            form, val_labels, val_terms[form, reduction], test_labels, test_terms[form, reduction], network.scorer.beta
        )
        for form, reduction in designs
    }
    chosen = max(rows, key=lambda name: rows[name]["validation_auc"])
    table = {"run": str(workdir), "chosen_on_validation": chosen, "designs": rows}
    reports.write_json(output / "scoring_designs.json", table)
    for name, row in rows.items():
        logger.info(
            "%-13s beta %.1f  validation AUC %.4f  test AUC %.4f (flow term %.4f, recon term %.4f)%s",
            name,
            row["beta"],
            row["validation_auc"],
            row["test_paper_protocol"]["auc"],
            row["test_auc_flow_term"],
            row["test_auc_recon_term"],
            "  <- chosen on validation" if name == chosen else "",
        )
    return table


HIGH_PASS_SIGMA = 4.0  # pixels at 256 x 256: keeps the lung's vessels and texture, drops the overall shading


def _reconstruction_candidates(parser, network, split: str) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Image-level values of the model's two terms and of the candidate reconstruction terms (issue 13, item 5),
    plus the input's own fine-texture energy, which needs no model and tells whether the residual follows it."""
    from monai.networks.layers import GaussianFilter

    from .ssim import ssim_map

    blur = GaussianFilter(spatial_dims=2, sigma=HIGH_PASS_SIGMA)
    scorer = network.scorer
    labels, values = [], {}
    for images, features, batch_labels, _ in _split_passes(parser, network, split):
        features = network.features_of(images, features)
        out = network.flow_decode(features)
        maps = scorer.term_maps(out.z_prime, images, out.reconstruction)
        residual_features = network.encode(out.reconstruction)
        detail, detail_rec = images - blur(images), out.reconstruction - blur(out.reconstruction)
        batch_values = {
            "flow": scorer.reduce(maps["flow"]),
            "recon_ssim": scorer.reduce(maps["recon"]),
            "recon_mse": (images - out.reconstruction).pow(2).flatten(1).mean(1),
            "feature_cosine": (1 - torch.cosine_similarity(features, residual_features, dim=1)).flatten(1).mean(1),
            "high_pass_ssim": -ssim_map(detail, detail_rec, scorer.data_range, scorer.ssim_window).flatten(1).mean(1),
            "input_texture": detail.pow(2).flatten(1).mean(1),
            "reconstruction_texture": detail_rec.pow(2).flatten(1).mean(1),
        }
        for name, value in batch_values.items():
            values.setdefault(name, []).append(value)
        labels += batch_labels
    return np.asarray(labels), {name: torch.cat(value) for name, value in values.items()}


def reconstruction_terms(configs, overrides, workdir: Path, output: Path) -> dict:
    """Why the reconstruction term points the wrong way on a data set, and whether another residual points the
    right way: the AUC of each candidate term alone, and of the flow term combined with it by the scorer fitted on
    the validation split (z-scores, beta, threshold), then applied to test. Test values take no part in a choice."""
    parser = _study_parser(configs, overrides, output)
    network = network_from_file(Path(workdir) / "models" / "model.pt").eval()
    val_labels, val = _reconstruction_candidates(parser, network, "validation")
    test_labels, test = _reconstruction_candidates(parser, network, "test")
    table = {"run": str(workdir), "high_pass_sigma": HIGH_PASS_SIGMA, "terms": {}, "with_flow": {}}
    for name in val:
        table["terms"][name] = {
            "validation_auc": float(roc_auc_score(val_labels, val[name])),
            "test_auc": float(roc_auc_score(test_labels, test[name])),
        }
    for name in ("recon_ssim", "recon_mse", "feature_cosine", "high_pass_ssim"):
        scorer = AnomalyScorer(beta=network.scorer.beta, beta_selection="validation")
        scorer.fit(val_labels, {"flow": val["flow"], "recon": val[name]})
        test_scores = scorer.combine({"flow": test["flow"], "recon": test[name]}).numpy()
        table["with_flow"][name] = {
            "beta": scorer.beta,
            "validation_auc": scorer.beta_aucs[scorer.beta],
            "test_auc": float(roc_auc_score(test_labels, test_scores)),
        }
    reports.write_json(output / "reconstruction_terms.json", table)
    for name, row in table["terms"].items():
        logger.info("%-22s alone: validation AUC %.4f  test AUC %.4f", name, row["validation_auc"], row["test_auc"])
    for name, row in table["with_flow"].items():
        logger.info(
            "flow + %-15s beta %.1f  validation AUC %.4f  test AUC %.4f",
            name,
            row["beta"],
            row["validation_auc"],
            row["test_auc"],
        )
    return table


def _calibrated_scores(run: Path, split: str, output: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A trained setting's image labels, scores (as evaluation computes them) and names on a split: its own configs
    and overrides from ``settings.json`` for the data, and what its model file says it is (encoder, size,
    preprocessing, calibration) for everything else, so a config changed since the run cannot re-type the model."""
    settings = json.loads((run / "settings.json").read_text())
    network = network_from_file(run / "models" / "model.pt").eval()
    described = {
        key: network.settings[key] for key in ("encoder", "image_size", "in_channels") if key in network.settings
    }
    overrides = {**settings["overrides"], **described, "input_spec": network.input_spec}
    parser = _study_parser(settings["configs"], overrides, output)
    labels, scores, names = [], [], []
    for images, features, batch_labels, batch_names in _split_passes(parser, network, split):
        scores.append(network.score(images, features)["score"])
        labels += batch_labels
        names += batch_names
    return np.asarray(labels), torch.cat(scores).numpy(), names


def ensemble(runs: list[Path], output: Path) -> dict:
    """Several trained settings as one detector (issue 13, item 6): the mean of their calibrated scores, each already
    z-scored on validation normals by its own model. Each member and the ensemble are measured on the validation
    split, where the choice is made, and on test beside it. A run that diverged is refused: its folder holds no
    model of its settings."""
    for run in runs:
        diverged = json.loads((Path(run) / "settings.json").read_text()).get("diverged")
        if diverged:
            raise ValueError(f"The run {run} {divergence_text(diverged)}: it has no model to ensemble.")
    table = {"runs": [str(run) for run in runs], "rule": "mean of the members' calibrated scores", "members": {}}
    means = {}
    for split in ("validation", "test"):
        members = {str(run): _calibrated_scores(run, split, output) for run in runs}
        labels, _, names = next(iter(members.values()))
        if any(len(y) != len(labels) or (y != labels).any() or n != names for y, _, n in members.values()):
            raise ValueError(f"The runs did not score the same {split} items in the same order: {table['runs']}.")
        for run, (_, scores, _) in members.items():
            table["members"].setdefault(run, {})[f"{split}_auc"] = float(roc_auc_score(labels, scores))
        ensemble_scores = combined([torch.from_numpy(scores) for _, scores, _ in members.values()]).numpy()
        means[split] = float(roc_auc_score(labels, ensemble_scores))
        if split == "validation":  # what a later study's paired rule resamples
            table["validation_scores"] = {
                "labels": labels.tolist(),
                "names": names,
                "ensemble": ensemble_scores.tolist(),
            }
    table["ensemble"] = {"validation_auc": means["validation"], "test_auc": means["test"]}
    reports.write_json(output / "ensemble.json", table)
    for name, row in {**table["members"], "ensemble": table["ensemble"]}.items():
        logger.info("%-60s validation AUC %.4f  test AUC %.4f", name, row["validation_auc"], row["test_auc"])
    return table


# what each sub-command cannot run without: argparse's dest and how many values at least
REQUIRED_ARGUMENTS = {
    "scoring": {"run": 1},
    "reconstruction": {"run": 1},
    "record": {"run": 1},
    "ensemble": {"runs": 1},
    "ensemble-seeds": {"encoders": 2, "seeds": 1},
    "study": {"plan": 1, "encoders": 1, "seeds": 1},
}


def _count(value) -> int:
    """How many values an argument got: a list's length, or 1 for a given single value."""
    return len(value) if isinstance(value, list) else int(bool(value))


def parse_overrides(pairs: list[str]) -> dict:
    result = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        try:
            result[key] = json.loads(value)
        except json.JSONDecodeError:
            result[key] = value
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.ablations", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "kind",
        choices=(
            "alpha-beta",
            "subnet-loss",
            "compare",
            "scoring",
            "reconstruction",
            "ensemble",
            "ensemble-seeds",
            "study",
            "features",
            "record",
        ),
    )
    parser.add_argument("--configs", nargs="+", default=["configs/train.json"], help="bundle config files, in order")
    parser.add_argument("--output", required=True, help="folder for runs, tables and figures; record: the JSON file")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (JSON value)")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument(
        "--variant", action="append", metavar="NAME=CONFIG[,CONFIG]", help="compare: a named variant's extra configs"
    )
    parser.add_argument(
        "--methods", nargs="+", metavar="NAME", help=f"compare: methods by name ({', '.join(METHOD_CONFIGS)})"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="compare, ensemble-seeds: one training per seed")
    parser.add_argument(
        "--encoders",
        nargs="+",
        help="features: encoders to screen (default: Lite0-2); ensemble-seeds, study: the members (study: one or more)",
    )
    parser.add_argument(
        "--baseline",
        help="for the rule: ensemble-seeds, an earlier ensemble_seeds.json; compare --seeds, an earlier comparison.json",
    )
    parser.add_argument("--plan", help="study: a JSON plan of variants, e.g. docs/study_plan.json")
    parser.add_argument("--probe_epochs", type=int, default=8, help="features: epochs of the flow-only probe")
    parser.add_argument(
        "--run", help="scoring, reconstruction, record: a trained setting's folder (models/, eval/, settings.json)"
    )
    parser.add_argument("--runs", nargs="+", help="ensemble: trained settings' folders (models/, settings.json)")
    parser.add_argument("--data", default="", help="record, ensemble-seeds: the data and its splits")
    parser.add_argument("--command", dest="command_line", default="", help="record, ensemble-seeds: the command run")
    parser.add_argument("--purpose", default="", help="record, ensemble-seeds: why, and the rule")
    args = parser.parse_args(argv)
    from . import studies  # studies builds on this module's commands

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the tables this command prints
    output, overrides = Path(args.output), parse_overrides(args.set)
    missing = [
        f"--{name}" + (f" (at least {least})" if least > 1 else "")
        for name, least in REQUIRED_ARGUMENTS.get(args.kind, {}).items()
        if _count(getattr(args, name)) < least
    ]
    if missing:
        parser.error(f"{args.kind} needs {' and '.join(missing)}")
    about = {"data": args.data, "purpose": args.purpose, "command": args.command_line}
    if args.kind == "record":
        record(Path(args.run), output, **about)
    elif args.kind == "scoring":
        scoring_designs(args.configs, overrides, Path(args.run), output)
    elif args.kind == "reconstruction":
        reconstruction_terms(args.configs, overrides, Path(args.run), output)
    elif args.kind == "ensemble":
        ensemble([Path(run) for run in args.runs], output)
    elif args.kind == "features":
        encoders = args.encoders or list(EFFICIENTNET_LITE_PACKAGES)
        feature_screen(args.configs, overrides, output, encoders, args.seeds or [0, 1, 2], args.probe_epochs)
    elif args.kind == "ensemble-seeds":
        studies.ensemble_seeds(args.configs, overrides, output, args.encoders, args.seeds, args.baseline, **about)
    elif args.kind == "study":
        try:
            plan = json.loads(Path(args.plan).read_text())
            studies.checked_plan(plan)
        except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            parser.error(f"--plan {args.plan}: {error}")
        studies.study(args.configs, overrides, output, args.encoders, args.seeds, plan, **about)
    elif args.kind == "alpha-beta":
        alpha_beta(args.configs, overrides, output, tuple(args.alphas))
    elif args.kind == "subnet-loss":
        subnet_loss(args.configs, overrides, output)
    else:
        variants = {}
        if args.methods:
            try:
                variants.update(method_variants(args.methods, Path(args.configs[0]).parent))
            except ValueError as error:
                parser.error(str(error))
        for spec in args.variant or ([] if args.methods else ["AE-FLOW="]):
            name, _, files = spec.partition("=")
            variants[name] = [f for f in files.split(",") if f]
        compare(args.configs, overrides, output, variants, args.seeds, args.baseline)


if __name__ == "__main__":
    main()
