"""Seed-paired design studies (issue 13): a design trained once per seed and compared with another of the same
seeds by the study's rule (``metrics.paired_rule``), on validation alone.

``ensemble_seeds`` is one ensemble design: each member trained per seed through ``ablations.compare`` (finished
runs reused), each seed's members scored as one detector through ``ablations.ensemble``; with a baseline (an earlier
``ensemble_seeds.json``) it decides the rule. ``study`` is the whole table in one command, on any datalist: the
design as configured (one encoder: single models; several: their ensemble) is the baseline, each variant of a plan
(named ``--set`` overrides or other members, ``docs/study_plan.json``) is trained with the same seeds, and each row
carries the rule's decision. Both run as ``python -m scripts.ablations ensemble-seeds`` and ``... study``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from . import reports
from .ablations import (
    check_baseline_seeds,
    check_unique,
    checked_rule,
    compare,
    divergence_text,
    ensemble,
    mean_std,
    named_seed_scores,
)
from .options import config_parser

logger = logging.getLogger(__name__)


def _member_summary(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key != "runs"}


def _baseline_study(path: Path, seeds: list[int], encoders: list[str]) -> dict:
    """An earlier ``ensemble_seeds.json`` of the same seeds and members, checked before hours of training rather
    than after."""
    if not path.is_file():
        raise FileNotFoundError(f"The baseline {path} does not exist: pass an earlier study's ensemble_seeds.json.")
    earlier = json.loads(path.read_text())
    if "seeds" not in earlier or "validation_auc" not in earlier.get("ensemble", {}):
        raise ValueError(f"The baseline {path} is not an ensemble-seeds study (no seeds or ensemble validation AUC).")
    check_baseline_seeds(path, earlier["seeds"], seeds)
    if "encoders" in earlier and sorted(earlier["encoders"]) != sorted(encoders):
        raise ValueError(
            f"The baseline {path} is an ensemble of {earlier['encoders']}, this study of {list(encoders)}: the rule "
            "decides a change of settings between the same members. To compare other members, run `study` with "
            "a plan variant's 'encoders'."
        )
    return earlier


def ensemble_seeds(
    configs, overrides, output: Path, encoders: list[str], seeds: list[int], baseline: Path | None = None, **about
) -> dict:
    """A seed-paired ensemble study: every encoder trained once per seed (``compare``, so finished runs are reused),
    the members of each seed scored as one ensemble (``ensemble``), mean and std over seeds; with ``baseline``, an
    earlier study's ``ensemble_seeds.json``, the decision of ``paired_rule``. ``about`` (data, purpose, command) is
    copied into the result, which is the record committed under ``docs/results/``. If a member diverged in a
    seed, the ensemble is recorded as diverged (where each member stopped) and not scored."""
    if len(encoders) < 2 or not seeds:
        raise ValueError("ensemble-seeds needs two or more --encoders and one or more --seeds.")
    check_unique("--encoders", encoders)
    check_unique("--seeds", seeds)
    earlier = _baseline_study(Path(baseline), seeds, encoders) if baseline is not None else None
    members = {
        encoder: _member_summary(
            compare(configs, {**overrides, "encoder": encoder}, output / encoder, {"AE-FLOW": []}, seeds)["AE-FLOW"]
        )
        for encoder in encoders
    }
    study = {
        **{key: value for key, value in about.items() if value},
        "configs": list(configs),
        "overrides": overrides,
        "encoders": list(encoders),
        "seeds": list(seeds),
        "members": members,
        "ensemble": _ensemble_summary(output, members, seeds),
    }
    if earlier is not None:
        study["rule"] = {"baseline": str(baseline), **checked_rule(study["ensemble"], earlier["ensemble"], baseline)}
    reports.write_json(output / "ensemble_seeds.json", study)
    if "diverged" in study["ensemble"]:
        logger.error("ensemble of %s: %s", " + ".join(encoders), divergence_text(study["ensemble"]["diverged"]))
        return study
    validation, test = (study["ensemble"][split] for split in ("validation_auc", "test_auc"))
    logger.info(
        "ensemble of %s over seeds %s: validation AUC %.2f +- %.2f, test AUC %.2f +- %.2f",
        " + ".join(encoders),
        seeds,
        100 * validation["mean"],
        100 * validation["std"],
        100 * test["mean"],
        100 * test["std"],
    )
    if "rule" in study:
        logger.info("rule %s: %s", "met" if study["rule"]["met"] else "not met", study["rule"])
    return study


def _ensemble_summary(output: Path, members: dict, seeds: list[int]) -> dict:
    """Each seed's members scored as one detector, mean and std over seeds; or, if a member diverged in a seed,
    where each diverged member stopped."""
    diverged = [
        {"encoder": encoder, **run} for encoder, summary in members.items() for run in summary.get("diverged", [])
    ]
    if diverged:
        return {"diverged": diverged}
    per_seed = [
        ensemble([output / encoder / "AE-FLOW" / f"seed_{seed}" for encoder in members], output / f"seed_{seed}")
        for seed in seeds
    ]
    return {
        **{
            split: mean_std([table["ensemble"][split] for table in per_seed])
            for split in ("validation_auc", "test_auc")
        },
        "validation_scores": named_seed_scores(
            [[table["validation_scores"][key] for key in ("labels", "ensemble", "names")] for table in per_seed]
        ),
    }


PLAN_KEYS = {"name", "set", "encoders"}
# what a variant's 'set' cannot change (the runs are given them: it would be trained as the baseline), and how to ask
PLAN_REFUSED_SETTINGS = {
    "encoder": "a design's members are its 'encoders' (the baseline's: --encoders); give the variant "
    '"encoders": [...] instead.',
    "seed": "every design is trained with each of --seeds and paired with the baseline seed by seed; ask about "
    "seeds with --seeds (or compare --seeds), not in a variant.",
}


def checked_plan(plan: dict) -> list[dict]:
    """A study plan's variants (``{"variants": [{"name": ..., "set": {KEY: VALUE}, "encoders": [...]}, ...]}``),
    refused as a whole before any training when one is malformed: a study that fails at its fifth variant after
    hours of training has lost those hours."""
    variants = plan.get("variants") if isinstance(plan, dict) else None
    if not isinstance(variants, list) or not variants:
        raise ValueError('A study plan is {"variants": [{"name": ..., "set": {...}, "encoders": [...]}, ...]}.')
    names = set()
    for i, variant in enumerate(variants):
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str) or not variant["name"].strip():
            raise ValueError(f"Study plan variant {i} needs a name.")
        unknown = set(variant) - PLAN_KEYS
        if unknown:
            raise ValueError(f"Study plan variant {variant['name']!r} has unknown key(s) {sorted(unknown)}.")
        if not isinstance(variant.get("set", {}), dict) or not isinstance(variant.get("encoders", []), list):
            raise ValueError(f"Study plan variant {variant['name']!r}: 'set' is an object, 'encoders' a list.")
        for key, how in PLAN_REFUSED_SETTINGS.items():  # a design's encoders and seeds are the study's, not 'set'
            if key in variant.get("set", {}):
                raise ValueError(f"Study plan variant {variant['name']!r} sets {key!r}: {how}")
        check_unique(f"Study plan variant {variant['name']!r}: 'encoders'", variant.get("encoders", []))
        if not variant.get("set") and not variant.get("encoders"):
            raise ValueError(f"Study plan variant {variant['name']!r} changes nothing: give 'set' or 'encoders'.")
        folder = study_folder(variant["name"])
        if folder in names or folder == study_folder(STUDY_BASELINE):
            raise ValueError(f"Study plan variant name {variant['name']!r} is used twice (its folder: {folder}).")
        names.add(folder)
    return variants


STUDY_BASELINE = "baseline"  # the design as configured: its row's name and its folder


def study_folder(name: str) -> str:
    """A variant's folder under the study's output: its name, lower case, every other character an underscore."""
    return "".join(c if c.isalnum() else "_" for c in name.strip().lower())


def _design_summary(configs, overrides, output: Path, encoders: list[str], seeds: list[int]) -> dict:
    """One design trained per seed: a single encoder's models (``compare``) or an ensemble (``ensemble_seeds``);
    either way a seed summary with validation and test AUC and each seed's validation scores."""
    if len(encoders) == 1:
        return compare(configs, {**overrides, "encoder": encoders[0]}, output, {"AE-FLOW": []}, seeds)["AE-FLOW"]
    return ensemble_seeds(configs, overrides, output, encoders, seeds)["ensemble"]


def _changes_design(configs, overrides: dict, variant: dict, encoders: list[str]) -> bool:
    """Whether a plan variant differs from the configured design, so that hours are not spent re-training it."""
    if variant.get("encoders") and list(variant["encoders"]) != list(encoders):
        return True
    parser = config_parser(configs, overrides)
    return any(
        key not in parser or parser.get_parsed_content(key) != value for key, value in variant.get("set", {}).items()
    )


def _study_row(name: str, changes: dict, summary: dict) -> dict:
    """A design's row of the study table, in AUC points (a diverged design: where its runs stopped)."""
    row = {"design": name, "changes": changes}
    if "diverged" in summary:
        return {**row, "diverged": summary["diverged"]}
    for split in ("validation_auc", "test_auc"):
        values = 100 * np.asarray(summary[split]["values"], dtype=float)
        row[split] = {
            "mean": round(float(values.mean()), 2),
            "std": round(float(values.std()), 2),
            "values": [round(float(value), 2) for value in values],
        }
    return row


def study_markdown(rows: list[dict]) -> str:
    """The study table: each design's validation AUC per seed, its test AUC beside, and its rule's decision."""
    lines = [
        "| design | validation AUC (per seed) | test AUC | higher in | mean difference | 95 % interval | rule |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for row in rows:
        rule = row.get("rule")
        if "diverged" in row:
            cells = [divergence_text(row["diverged"]), "", "", "", "", "baseline" if rule is None else "not met"]
            lines.append(f"| {row['design']} | " + " | ".join(cells) + " |")
            continue
        validation, test = row["validation_auc"], row["test_auc"]
        seeds = ", ".join(f"{v:.2f}" for v in validation["values"])
        cells = [
            f"{validation['mean']:.2f} +- {validation['std']:.2f} ({seeds})",
            f"{test['mean']:.2f} +- {test['std']:.2f}",
        ]
        if rule is None:
            cells += ["", "", "", "baseline"]
        elif "diverged" in rule:  # the baseline diverged: nothing to compare with
            cells += ["", "", "", "not met (the baseline diverged)"]
        else:
            interval = rule["validation_sample_interval"]
            cells += [
                f"{rule['higher_in']} of {len(rule['differences'])}",
                f"{rule['mean_difference']:+.2f}",
                "-" if interval is None else f"{interval[0]:.2f} to {interval[1]:.2f}",
                "**met**" if rule["met"] else "not met",
            ]
        lines.append(f"| {row['design']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def study(configs, overrides, output: Path, encoders: list[str], seeds: list[int], plan: dict, **about) -> dict:
    """The study's table from one command, on any datalist (issue 13): the design as configured is the baseline,
    trained once per seed (one encoder: single models; several: their ensemble); each variant of ``plan`` changes
    it (``set``: config overrides; ``encoders``: other members), is trained with the same seeds, and is decided by
    ``paired_rule`` against the baseline on validation alone. Finished runs are reused, so an interrupted study
    resumes; ``study.json`` and ``study.md`` are rewritten after each variant. Test AUC is shown, never used."""
    variants = checked_plan(plan)
    if not encoders or not seeds:
        raise ValueError("A study needs one or more --encoders and one or more --seeds.")
    check_unique("--encoders", encoders)
    check_unique("--seeds", seeds)
    table = {**{key: value for key, value in about.items() if value}, "configs": list(configs)}
    table.update({"overrides": overrides, "encoders": list(encoders), "seeds": list(seeds), "rows": []})
    baseline = _design_summary(configs, overrides, output / study_folder(STUDY_BASELINE), encoders, seeds)
    table["rows"].append(_study_row(STUDY_BASELINE, {}, baseline))
    _write_study(output, table)
    for variant in variants:
        if _changes_design(configs, overrides, variant, encoders):
            folder, members = output / study_folder(variant["name"]), variant.get("encoders") or encoders
            summary = _design_summary(configs, {**overrides, **variant.get("set", {})}, folder, members, seeds)
            changes = {key: variant[key] for key in ("set", "encoders") if variant.get(key)}
            row = _study_row(variant["name"], changes, summary)
            table["rows"].append({**row, "rule": checked_rule(summary, baseline, "the configured design")})
        else:
            logger.info("%s: the configured design already has it; not run", variant["name"])
            table.setdefault("not_run", {})[variant["name"]] = "the configured design already has it"
        _write_study(output, table)
    for row in table["rows"]:
        rule = row.get("rule")
        if "diverged" in row:
            logger.error("%-30s %s", row["design"], divergence_text(row["diverged"]))
            continue
        logger.info(
            "%-30s validation AUC %.2f, test AUC %.2f%s",
            row["design"],
            row["validation_auc"]["mean"],
            row["test_auc"]["mean"],
            "" if rule is None else f"; rule {'met' if rule['met'] else 'not met'} ({_rule_difference(rule)})",
        )
    return table


def _rule_difference(rule: dict) -> str:
    return "the baseline diverged" if "diverged" in rule else f"{rule['mean_difference']:+.2f}"


def _write_study(output: Path, table: dict) -> None:
    reports.write_json(output / "study.json", table)
    with reports.atomic_path(output / "study.md") as tmp:
        Path(tmp).write_text(study_markdown(table["rows"]))
