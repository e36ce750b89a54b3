"""The paper's ablations as commands: the alpha x beta AUC grid (figure 7) and the subnet x reconstruction-loss
table (table 3), plus a comparison of configurations (AE-FLOW, plain autoencoder, flow only; table 1).

Every setting is one ``train.json`` training followed by ``evaluate.json`` on the test split, run in this
process through MONAI's ``ConfigWorkflow`` with the given config files and overrides. Set ``--feature_cache_dir``
so that the frozen encoder's features are computed once and shared by every setting. Beta is a scoring weight,
not a training one: each trained alpha is re-scored at every beta from its test score terms, so the grid costs
one training per alpha.

    python -m scripts.ablations alpha-beta --configs configs/train.json configs/images_2d.json \
        configs/chest_xray.json --output docs/results/ablations/chest_xray --set epochs=20 \
        --set "feature_cache_dir=\\$'data/cache/chest_xray'"
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from . import reports

logger = logging.getLogger(__name__)
ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)
BETAS = tuple(round(0.1 * k, 1) for k in range(11))
SUBNETS = ("cnn2", "resnet")
RECON_LOSSES = ("mse", "ssim")


def _expression(path: Path) -> str:
    """A path as a config expression: MONAI appends to output_dir's raw value when it saves the run's config."""
    return f"$'{path}'"


def run_setting(configs: list[str], overrides: dict, workdir: Path) -> dict:
    """Train then evaluate one setting; returns its test metrics JSON with the wall time added."""
    from monai.bundle import ConfigWorkflow

    root = Path(configs[0]).resolve().parents[1]
    paths = {"ckpt_dir": _expression(workdir / "models"), "output_dir": _expression(workdir / "eval")}
    started = time.time()
    for extra, kind in (([], "train"), (["configs/evaluate.json"], "train")):
        workflow = ConfigWorkflow(
            config_file=[*configs, *[str(root / name) for name in extra]],
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=str(root / "configs" / "logging.conf"),
            workflow_type=kind,
            **{"bundle_root": str(root), **overrides, **paths},
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    metrics = json.loads((workdir / "eval" / "test_metrics.json").read_text())
    metrics["wall_time_s"] = round(time.time() - started, 1)
    metrics["overrides"] = overrides
    return metrics


def _term_arrays(eval_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(eval_dir / "test_scores.csv") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in rows])
    return labels, np.array([float(r["score_flow"]) for r in rows]), np.array([float(r["score_recon"]) for r in rows])


def beta_curve(eval_dir: Path, betas=BETAS) -> dict[float, float]:
    """Test AUC (%) at every beta, from one evaluation's raw terms standardised as the trained scorer does."""
    labels, flow, recon = _term_arrays(eval_dir)
    stats = json.loads((eval_dir / "test_metrics.json").read_text())["scorer"]
    if stats["normalization"] == "zscore":
        flow = (flow - stats["term_stats"]["flow"][0]) / stats["term_stats"]["flow"][1]
        recon = (recon - stats["term_stats"]["recon"][0]) / stats["term_stats"]["recon"][1]
    return {beta: 100 * float(roc_auc_score(labels, beta * flow + (1 - beta) * recon)) for beta in betas}


def alpha_beta(configs, overrides, output: Path, alphas=ALPHAS, betas=BETAS) -> dict:
    """Figure 7: one training per alpha, every beta scored from it; a JSON table and a heat-map PNG."""
    grid, runs = [], {}
    for alpha in alphas:
        workdir = output / f"alpha_{alpha:g}"
        runs[alpha] = run_setting(configs, {**overrides, "alpha": alpha, "beta_selection": "fixed"}, workdir)
        grid.append([beta_curve(workdir / "eval", betas)[beta] for beta in betas])
    table = {"alphas": list(alphas), "betas": list(betas), "test_auc": grid, "runs": runs}
    reports.write_json(output / "alpha_beta.json", table)
    reports.plot_heatmap(
        output / "alpha_beta.png", np.array(grid), alphas, betas, "alpha (loss)", "beta (score)", "test AUC (%)"
    )
    return table


def subnet_loss(configs, overrides, output: Path) -> dict:
    """Table 3: both flow subnets with both reconstruction losses."""
    table = {}
    for subnet in SUBNETS:
        for recon_loss in RECON_LOSSES:
            setting = {**overrides, "subnet": subnet, "recon_loss": recon_loss}
            table[f"{subnet}+{recon_loss}"] = run_setting(configs, setting, output / f"{subnet}_{recon_loss}")
    reports.write_json(output / "subnet_loss.json", table)
    return table


def compare(configs, overrides, output: Path, variants: dict[str, list[str]]) -> dict:
    """Table 1's rows from the same parts: each variant adds its override config files."""
    table = {
        name: run_setting([*configs, *extra], overrides, output / name.replace(" ", "_"))
        for name, extra in variants.items()
    }
    reports.write_json(output / "comparison.json", table)
    return table


def _overrides(pairs: list[str]) -> dict:
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
    parser.add_argument("kind", choices=("alpha-beta", "subnet-loss", "compare"))
    parser.add_argument("--configs", nargs="+", default=["configs/train.json"], help="bundle config files, in order")
    parser.add_argument("--output", required=True, help="folder for runs, tables and figures")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (JSON value)")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument(
        "--variant", action="append", metavar="NAME=CONFIG[,CONFIG]", help="compare: a named variant's extra configs"
    )
    args = parser.parse_args(argv)
    output, overrides = Path(args.output), _overrides(args.set)
    if args.kind == "alpha-beta":
        alpha_beta(args.configs, overrides, output, tuple(args.alphas))
    elif args.kind == "subnet-loss":
        subnet_loss(args.configs, overrides, output)
    else:
        variants = {}
        for spec in args.variant or ["AE-FLOW="]:
            name, _, files = spec.partition("=")
            variants[name] = [f for f in files.split(",") if f]
        compare(args.configs, overrides, output, variants)


if __name__ == "__main__":
    main()
