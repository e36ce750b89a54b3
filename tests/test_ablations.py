"""The ablation commands on the tiny synthetic set: the alpha x beta grid writes its table and heat map, its
re-scoring of beta from the saved score terms reproduces the evaluator's own AUC at the trained beta, the
scoring-design study reproduces the evaluator's score terms and chooses on validation only (so does the
reconstruction-term study; an ensemble scores as its members' evaluation did), and ``record`` turns
the setting's folder into a result file with the settings the run really used."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from scripts import ablations, engines, metrics, reports, studies
from scripts.model_file import network_from_file
from sklearn.metrics import roc_auc_score


def test_ablation_commands_on_one_trained_setting(bundle_root, tiny_dataset, tmp_path):
    sets = [f"{key}={json.dumps(value)}" for key, value in TINY_OVERRIDES.items()]
    sets.append(f"dataset_dir={json.dumps(str(tiny_dataset))}")
    common = ["--configs", str(bundle_root / "configs" / "train.json")] + [a for p in sets for a in ("--set", p)]
    ablations.main(["alpha-beta", "--output", str(tmp_path), "--alphas", "0.5", *common])
    table = json.loads((tmp_path / "alpha_beta.json").read_text())
    assert table["alphas"] == [0.5] and len(table["test_auc"]) == 1 and len(table["test_auc"][0]) == 11
    assert (tmp_path / "alpha_beta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = table["runs"]["0.5"]
    assert run["scorer"]["beta"] == 0.9  # beta_selection is forced to fixed: every beta is scored afterwards
    at_trained_beta = table["test_auc"][0][table["betas"].index(0.9)]
    assert abs(at_trained_beta - 100 * run["paper_protocol"]["auc"]) < 1e-6
    model = tmp_path / "alpha_0.5" / "models" / "model.pt"
    trained_at = model.stat().st_mtime_ns
    ablations.main(["alpha-beta", "--output", str(tmp_path), "--alphas", "0.5", *common])  # a rerun: nothing trains
    assert model.stat().st_mtime_ns == trained_at
    assert json.loads((tmp_path / "alpha_beta.json").read_text())["test_auc"] == table["test_auc"]

    result_file = tmp_path / "result.json"
    ablations.main(
        ["record", "--run", str(tmp_path / "alpha_0.5"), "--output", str(result_file), "--data", "tiny synthetic"]
    )
    result = json.loads(result_file.read_text())
    assert result["data"] == "tiny synthetic" and result["wall_time_s"] > 0
    assert result["settings"]["alpha"] == 0.5 and result["settings"]["beta_selection"] == "fixed"
    assert result["settings"]["epochs"] == TINY_OVERRIDES["epochs"]
    assert result["test"]["paper_protocol"] == run["paper_protocol"]
    assert result["model_md5"] == hashlib.md5((tmp_path / "alpha_0.5" / "models" / "model.pt").read_bytes()).hexdigest()
    assert set(result["validation"]) >= {"auc", "f1", "acc", "sen", "spe"}

    study_dir = tmp_path / "scoring"
    ablations.main(["scoring", "--run", str(tmp_path / "alpha_0.5"), "--output", str(study_dir), *common])
    study = json.loads((study_dir / "scoring_designs.json").read_text())
    assert sorted(study["designs"]) == sorted(f"{f}/{r}" for f in ("nll", "density") for r in ("mean", "max", "topk"))
    rows = study["designs"]
    assert study["chosen_on_validation"] == max(rows, key=lambda name: rows[name]["validation_auc"])
    with open(tmp_path / "alpha_0.5" / "eval" / "test_scores.csv") as f:
        scored = list(csv.DictReader(f))
    labels = [int(r["label"]) for r in scored]
    for term in ("flow", "recon"):  # the trained run scored nll/mean: the study's pass gives the same terms
        expected = roc_auc_score(labels, [float(r[f"score_{term}"]) for r in scored])
        assert rows["nll/mean"][f"test_auc_{term}_term"] == pytest.approx(expected, abs=1e-6), term
    with pytest.raises(SystemExit):
        ablations.main(["scoring", "--output", str(study_dir), *common])

    recon_dir = tmp_path / "reconstruction"
    ablations.main(["reconstruction", "--run", str(tmp_path / "alpha_0.5"), "--output", str(recon_dir), *common])
    terms = json.loads((recon_dir / "reconstruction_terms.json").read_text())
    assert {"feature_cosine", "high_pass_ssim", "input_texture", "reconstruction_texture"} <= set(terms["terms"])
    for term, name in (("flow", "flow"), ("recon", "recon_ssim")):  # the same pass as the evaluator's
        expected = roc_auc_score(labels, [float(r[f"score_{term}"]) for r in scored])
        assert terms["terms"][name]["test_auc"] == pytest.approx(expected, abs=1e-6), name
    for name, row in terms["with_flow"].items():  # beta is the validation split's choice, from the paper's grid
        assert row["beta"] in ablations.BETAS and 0.0 <= row["validation_auc"] <= 1.0, name

    run_dir = str(tmp_path / "alpha_0.5")  # an ensemble of one setting twice is that setting, scored as evaluation did
    ablations.main(["ensemble", "--runs", run_dir, run_dir, "--output", str(tmp_path / "ensemble")])
    together = json.loads((tmp_path / "ensemble" / "ensemble.json").read_text())
    assert together["members"][run_dir]["test_auc"] == pytest.approx(run["paper_protocol"]["auc"], abs=1e-6)
    assert together["ensemble"] == pytest.approx(together["members"][run_dir], abs=1e-12)


def test_feature_screen_chooses_on_validation(bundle_root, tiny_dataset, tmp_path):
    sets = [f"{key}={json.dumps(value)}" for key, value in TINY_OVERRIDES.items()]
    sets += [f"dataset_dir={json.dumps(str(tiny_dataset))}", 'feature_norm="layernorm"']
    common = ["--configs", str(bundle_root / "configs" / "train.json")] + [a for p in sets for a in ("--set", p)]
    encoders = ["efficientnet-lite0", "efficientnet-lite2"]
    args = ["features", "--output", str(tmp_path), "--encoders", *encoders, "--seeds", "0", "1", "--probe_epochs", "2"]
    ablations.main([*args, *common])
    screen = json.loads((tmp_path / "feature_screen.json").read_text())
    table = screen["encoders"]
    assert list(table) == encoders and screen["seeds"] == [0, 1]
    assert table["efficientnet-lite0"]["channels"] == 112 and table["efficientnet-lite2"]["channels"] == 120
    assert screen["chosen_on_validation"] == max(encoders, key=lambda name: table[name]["validation_auc"]["mean"])
    for row in table.values():
        for run in row["runs"].values():
            assert len(run["by_epoch"]) == 2
            assert run["validation_auc"] == max(epoch["validation_auc"] for epoch in run["by_epoch"])
            assert run["test_auc"] == run["by_epoch"][run["kept_epoch"] - 1]["test_auc"]
        assert row["validation_auc"]["mean"] == pytest.approx(
            sum(run["validation_auc"] for run in row["runs"].values()) / 2
        )


def test_seed_summary_reports_the_kept_epochs_validation(tmp_path):
    """Mean and std over seeds use the kept epoch's validation AUC (val_kept_metrics.json), not the last epoch's."""
    runs, workdirs = {}, {}
    for seed, (kept, last, test) in {0: (0.90, 0.85, 0.80), 1: (0.94, 0.93, 0.84)}.items():
        workdirs[seed] = tmp_path / f"seed_{seed}"
        (workdirs[seed] / "eval").mkdir(parents=True)
        kept_record = {"epoch": 3 + seed, "paper_protocol": {"auc": kept}}
        (workdirs[seed] / "eval" / "val_kept_metrics.json").write_text(json.dumps(kept_record))
        (workdirs[seed] / "eval" / "val_metrics.json").write_text(json.dumps({"paper_protocol": {"auc": last}}))
        runs[seed] = {"paper_protocol": {"auc": test}, "wall_time_s": 10.0 * (seed + 1)}
    summary = ablations.seed_summary(runs, workdirs)
    assert summary["kept_epochs"] == [3, 4]
    assert summary["validation_auc"]["mean"] == pytest.approx(0.92) and summary["validation_auc"][
        "std"
    ] == pytest.approx(0.02)
    assert summary["test_auc"]["values"] == [0.80, 0.84] and summary["wall_time_s"]["mean"] == pytest.approx(15.0)


def test_ensemble_seeds_study_and_its_rule(bundle_root, tiny_dataset, tmp_path):
    """One command trains each member per seed, ensembles each seed's members as ``ensemble`` does, and decides the
    pre-registered rule against an earlier study; a baseline of other seeds is refused before anything trains."""
    sets = [f"{key}={json.dumps(value)}" for key, value in TINY_OVERRIDES.items()]
    sets.append(f"dataset_dir={json.dumps(str(tiny_dataset))}")
    common = ["--configs", str(bundle_root / "configs" / "train.json")] + [a for p in sets for a in ("--set", p)]
    members = ["--encoders", "efficientnet-lite0", "efficientnet-lite2", "--seeds", "0"]
    ablations.main(["ensemble-seeds", "--output", str(tmp_path / "a"), *members, *common, "--purpose", "a test"])
    study = json.loads((tmp_path / "a" / "ensemble_seeds.json").read_text())
    assert study["purpose"] == "a test" and study["encoders"] == ["efficientnet-lite0", "efficientnet-lite2"]
    assert study["members"]["efficientnet-lite2"]["seeds"] == [0] and "rule" not in study
    seed_table = json.loads((tmp_path / "a" / "seed_0" / "ensemble.json").read_text())
    assert study["ensemble"]["validation_auc"]["values"] == [seed_table["ensemble"]["validation_auc"]]
    assert study["ensemble"]["test_auc"]["values"] == [seed_table["ensemble"]["test_auc"]]
    for encoder in study["encoders"]:
        run = str(tmp_path / "a" / encoder / "AE-FLOW" / "seed_0")
        assert seed_table["members"][run]["test_auc"] == pytest.approx(
            study["members"][encoder]["test_auc"]["values"][0], abs=1e-6
        )

    baseline = tmp_path / "a" / "ensemble_seeds.json"  # the same design again: reused, equal, so the rule is not met
    ablations.main(["ensemble-seeds", "--output", str(tmp_path / "a"), *members, *common, "--baseline", str(baseline)])
    rule = json.loads(baseline.read_text())["rule"]
    assert rule["differences"] == [0.0] and rule["higher_in"] == 0 and rule["met"] is False
    assert rule["validation_sample_interval"] == [0.0, 0.0]  # the same scores, image for image
    scores = study["ensemble"]["validation_scores"]
    assert scores["labels"] == seed_table["validation_scores"]["labels"] and len(scores["values"]) == 1
    assert roc_auc_score(scores["labels"], scores["values"][0]) == pytest.approx(
        seed_table["ensemble"]["validation_auc"]
    )
    joint = ["--set", "encoder=efficientnet-lite0+efficientnet-lite2"]  # one model on both encoders' features
    ablations.main(
        ["compare", "--output", str(tmp_path / "j"), "--seeds", "0", *common, *joint, "--baseline", str(baseline)]
    )
    compared = json.loads((tmp_path / "j" / "comparison.json").read_text())["AE-FLOW"]
    model = network_from_file(tmp_path / "j" / "AE-FLOW" / "seed_0" / "models" / "model.pt")
    assert model.settings["encoder"] == "efficientnet-lite0+efficientnet-lite2"
    rule, ensemble_auc = compared["rule"], study["ensemble"]["validation_auc"]["values"][0]  # the record: the baseline
    assert rule["baseline_validation_auc"] == [round(100 * ensemble_auc, 2)]
    assert rule["differences"][0] == pytest.approx(
        100 * (compared["validation_auc"]["values"][0] - ensemble_auc), abs=0.01
    )
    assert len(rule["validation_sample_interval"]) == 2
    with pytest.raises(ValueError, match="seeds"):
        ablations.compare(["unused.json"], {}, tmp_path / "b", {"AE-FLOW": []}, [1], baseline)
    with pytest.raises(ValueError, match="seeds"):
        studies.ensemble_seeds(["unused.json"], {}, tmp_path / "b", ["x", "y"], [1], baseline)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        studies.ensemble_seeds(["unused.json"], {}, tmp_path / "b", ["x", "y"], [0], tmp_path / "missing.json")
    seed_table_file = tmp_path / "a" / "seed_0" / "ensemble.json"  # a JSON file, but not a study
    with pytest.raises(ValueError, match="not an ensemble-seeds study"):
        studies.ensemble_seeds(["unused.json"], {}, tmp_path / "b", ["x", "y"], [0], seed_table_file)
    assert not (tmp_path / "b").exists()


def test_compare_seeds_keeps_validation_scores_and_decides_the_rule_against_a_baseline(
    bundle_root, tiny_dataset, tmp_path
):
    """``compare --seeds`` keeps each seed's validation scores of its kept model (they reproduce the kept epoch's
    validation AUC), and with ``--baseline`` decides the study's rule per variant; a baseline that cannot be paired
    is refused before anything trains."""
    sets = [f"{key}={json.dumps(value)}" for key, value in TINY_OVERRIDES.items()]
    sets.append(f"dataset_dir={json.dumps(str(tiny_dataset))}")
    common = ["--configs", str(bundle_root / "configs" / "train.json")] + [a for p in sets for a in ("--set", p)]
    ablations.main(["compare", "--output", str(tmp_path / "a"), "--seeds", "0", *common])
    table = json.loads((tmp_path / "a" / "comparison.json").read_text())["AE-FLOW"]
    scores = table["validation_scores"]
    assert len(scores["values"]) == 1 and "rule" not in table
    with open(tmp_path / "a" / "AE-FLOW" / "seed_0" / "eval" / "val_scores.csv") as f:  # named as evaluation names
        assert scores["names"] == [row["name"] for row in csv.DictReader(f)]
    assert 100 * roc_auc_score(scores["labels"], scores["values"][0]) == pytest.approx(
        100 * table["validation_auc"]["values"][0], abs=1e-4
    )

    baseline = tmp_path / "a" / "comparison.json"  # the same setting again: reused, equal, so the rule is not met
    ablations.main(["compare", "--output", str(tmp_path / "a"), "--seeds", "0", *common, "--baseline", str(baseline)])
    rule = json.loads(baseline.read_text())["AE-FLOW"]["rule"]
    assert rule["differences"] == [0.0] and rule["met"] is False and rule["validation_sample_interval"] == [0.0, 0.0]
    variants = {"AE-FLOW": []}
    with pytest.raises(ValueError, match="seeds"):
        ablations.compare(["unused.json"], {}, tmp_path / "b", variants, [1], baseline)
    with pytest.raises(ValueError, match="no variant 'flow only'"):
        ablations.compare(["unused.json"], {}, tmp_path / "b", {"flow only": []}, [0], baseline)
    with pytest.raises(ValueError, match="needs --seeds"):
        ablations.compare(["unused.json"], {}, tmp_path / "b", variants, None, baseline)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ablations.compare(["unused.json"], {}, tmp_path / "b", variants, [0], tmp_path / "missing.json")
    assert not (tmp_path / "b").exists()


def test_study_writes_the_table_of_a_plan_with_each_rules_decision(bundle_root, tiny_dataset, tmp_path):
    """``study`` trains the configured design and each plan variant with the same seeds and decides each variant's
    rule against the configured design; rows hold what ``compare`` measured, and a rerun reuses every run."""
    sets = [f"{key}={json.dumps(value)}" for key, value in TINY_OVERRIDES.items()]
    sets.append(f"dataset_dir={json.dumps(str(tiny_dataset))}")
    common = ["--configs", str(bundle_root / "configs" / "train.json")] + [a for p in sets for a in ("--set", p)]
    plan = tmp_path / "plan.json"
    already = [
        {"name": "the configured alpha", "set": {"alpha": 0.5}},
        {"name": "same member", "encoders": ["efficientnet-lite0"]},
    ]
    plan.write_text(json.dumps({"variants": [*already, {"name": "No flow (alpha 0)", "set": {"alpha": 0.0}}]}))
    args = ["study", "--output", str(tmp_path / "s"), "--plan", str(plan), "--encoders", "efficientnet-lite0"]
    ablations.main([*args, "--seeds", "0", *common])
    table = json.loads((tmp_path / "s" / "study.json").read_text())
    baseline, variant = table["rows"]  # the variants that change nothing are named, not run
    assert sorted(table["not_run"]) == ["same member", "the configured alpha"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == ["baseline", "no_flow__alpha_0_"]
    assert baseline["design"] == studies.STUDY_BASELINE and "rule" not in baseline
    assert variant["changes"] == {"set": {"alpha": 0.0}} and variant["rule"]["margin"] == metrics.NOISE_MARGIN
    compared = json.loads((tmp_path / "s" / "no_flow__alpha_0_" / "comparison.json").read_text())["AE-FLOW"]
    assert variant["validation_auc"]["values"] == [round(100 * compared["validation_auc"]["values"][0], 2)]
    assert compared["runs"]["0"]["overrides"]["alpha"] == 0.0
    baseline_auc = json.loads((tmp_path / "s" / "baseline" / "comparison.json").read_text())["AE-FLOW"][
        "validation_auc"
    ]
    expected = round(100 * compared["validation_auc"]["values"][0], 2) - round(100 * baseline_auc["values"][0], 2)
    assert variant["rule"]["differences"] == [pytest.approx(expected, abs=0.011)]
    markdown = (tmp_path / "s" / "study.md").read_text().splitlines()
    assert len(markdown) == 4 and "baseline" in markdown[2] and "No flow (alpha 0)" in markdown[3]
    model = tmp_path / "s" / "baseline" / "AE-FLOW" / "seed_0" / "models" / "model.pt"
    written = model.stat().st_mtime_ns
    ablations.main([*args, "--seeds", "0", *common])  # a rerun trains nothing
    assert model.stat().st_mtime_ns == written


@pytest.mark.parametrize(
    "plan, message",
    [
        ({}, "A study plan is"),
        ({"variants": [{"set": {"alpha": 0.1}}]}, "needs a name"),
        ({"variants": [{"name": "a", "set": {"alpha": 0.1}, "seed": 3}]}, "unknown key"),
        ({"variants": [{"name": "a"}]}, "changes nothing"),
        ({"variants": [{"name": "a", "set": ["alpha"]}]}, "'set' is an object"),
        ({"variants": [{"name": "a b", "set": {"alpha": 0.1}}, {"name": "a_b", "encoders": ["x"]}]}, "used twice"),
        ({"variants": [{"name": "Baseline", "set": {"alpha": 0.1}}]}, "used twice"),
        ({"variants": [{"name": "Lite2", "set": {"encoder": "efficientnet-lite2"}}]}, "sets 'encoder'.*\"encoders\""),
        ({"variants": [{"name": "seed 7", "set": {"seed": 7}}]}, "sets 'seed'.*--seeds"),
        ({"variants": [{"name": "a", "encoders": ["efficientnet-lite0"] * 2}]}, "efficientnet-lite0 more than once"),
    ],
)
def test_study_plan_is_refused_before_training(plan, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        studies.study(["unused.json"], {}, tmp_path / "s", ["efficientnet-lite0"], [0], plan)
    assert not (tmp_path / "s").exists()


def test_paired_rule_needs_every_seed_higher_and_the_margin():
    def study(*aucs):  # a seed summary: an ensemble's or a compare variant's
        return {"seeds": [0, 1, 2], "validation_auc": {"values": list(aucs)}}

    baseline = study(0.940, 0.930, 0.950)
    met = metrics.paired_rule(study(0.955, 0.940, 0.960), baseline)
    assert met["met"] and met["higher_in"] == 3 and met["differences"] == [1.5, 1.0, 1.0]
    assert met["mean_difference"] == pytest.approx(1.17)
    assert not metrics.paired_rule(study(0.960, 0.925, 0.965), baseline)["met"]  # one seed lower
    small = metrics.paired_rule(study(0.945, 0.935, 0.955), baseline)  # higher everywhere, by 0.5 < 0.81
    assert small["higher_in"] == 3 and not small["met"] and small["validation_sample_interval"] is None


def test_paired_rule_also_needs_the_gain_beyond_the_validation_samples_noise():
    """Where both studies kept their validation scores, a gain the seeds agree on must also hold when the
    validation images are resampled: three lucky images are not enough, a gain spread over every image is."""
    rng = np.random.default_rng(0)
    labels = [0] * 60 + [1] * 60
    base_scores = rng.normal(size=(3, 120)) + 0.8 * np.asarray(labels)

    def study(scores):
        aucs = [roc_auc_score(labels, s) for s in scores]
        return {
            "seeds": [0, 1, 2],
            "validation_auc": {"values": aucs},
            "validation_scores": {"labels": labels, "values": [list(s) for s in scores]},
        }

    lucky = base_scores.copy()
    lucky[:, 60:63] += 10.0  # three abnormal images to the top: higher in every seed, by more than the margin
    rule = metrics.paired_rule(study(lucky), study(base_scores))
    assert rule["higher_in"] == 3 and rule["mean_difference"] > metrics.NOISE_MARGIN
    assert rule["validation_sample_interval"][0] <= 0 and not rule["met"]
    sharper = base_scores + 1.5 * np.asarray(labels)  # every abnormal image further from the normals
    rule = metrics.paired_rule(study(sharper), study(base_scores))
    assert rule["validation_sample_interval"][0] > 0 and rule["met"]
    other = study(base_scores)
    other["validation_scores"]["labels"] = labels[::-1]
    with pytest.raises(ValueError, match="different validation images"):
        metrics.paired_rule(study(base_scores), other)


def test_a_diverged_run_is_recorded_in_every_table_not_lost(bundle_root, tiny_dataset, tmp_path):
    """Issue 13: a run that diverges stops with the epoch named, and the study records it rather than dropping
    it. A learning rate of 1e30 sends the tiny run's loss to infinity at its second iteration: the study keeps the
    configured design's row, records the variant as diverged there (its rule not met), and a rerun reuses the
    record instead of training again; ``compare`` and ``alpha-beta`` keep the diverged setting as a row too."""
    sets = [f"{key}={json.dumps(value)}" for key, value in TINY_OVERRIDES.items()]
    sets.append(f"dataset_dir={json.dumps(str(tiny_dataset))}")
    common = ["--configs", str(bundle_root / "configs" / "train.json")] + [a for p in sets for a in ("--set", p)]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"variants": [{"name": "too fast", "set": {"learning_rate": 1e30}}]}))
    args = ["study", "--output", str(tmp_path / "s"), "--plan", str(plan), "--encoders", "efficientnet-lite0"]
    ablations.main([*args, "--seeds", "0", *common])
    baseline, diverged = json.loads((tmp_path / "s" / "study.json").read_text())["rows"]
    assert baseline["validation_auc"]["values"] and "diverged" not in baseline
    assert [{k: v for k, v in run.items() if k != "message"} for run in diverged["diverged"]] == [
        {"seed": 0, "what": "loss", "epoch": 1, "iteration": 2}
    ]
    assert diverged["rule"] == {"diverged": ["design"], "margin": metrics.NOISE_MARGIN, "met": False}
    row = (tmp_path / "s" / "study.md").read_text().splitlines()[3]
    assert row.startswith("| too fast | diverged at seed 0: epoch 1, iteration 2 (loss) |") and "not met" in row
    settings = tmp_path / "s" / "too_fast" / "AE-FLOW" / "seed_0" / "settings.json"
    assert json.loads(settings.read_text())["diverged"]["epoch"] == 1
    written = settings.stat().st_mtime_ns
    ablations.main([*args, "--seeds", "0", *common])  # a rerun reuses the record: nothing trains
    assert settings.stat().st_mtime_ns == written

    too_fast = [*common, "--set", "learning_rate=1e30"]
    ablations.main(["compare", "--output", str(tmp_path / "c"), *too_fast])
    assert json.loads((tmp_path / "c" / "comparison.json").read_text())["AE-FLOW"]["diverged"]["iteration"] == 2
    assert "| AE-FLOW | diverged at epoch 1, iteration 2 (loss) |" in (tmp_path / "c" / "comparison.md").read_text()
    ablations.main(["alpha-beta", "--output", str(tmp_path / "g"), "--alphas", "0.5", *too_fast])
    grid = json.loads((tmp_path / "g" / "alpha_beta.json").read_text())
    assert grid["test_auc"] == [[None] * len(ablations.BETAS)] and grid["runs"]["0.5"]["diverged"]["epoch"] == 1
    assert (tmp_path / "g" / "alpha_beta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_diverged_member_or_baseline_decides_no_rule(tmp_path):
    """An ensemble with a member diverged in a seed is recorded as diverged, not scored; the rule is not met when
    either side diverged, and the study table says which."""
    members = {
        "efficientnet-lite0": {"seeds": [0, 1], "validation_auc": {"values": [0.9, 0.9]}},
        "efficientnet-lite2": {
            "seeds": [0, 1],
            "diverged": [{"seed": 1, "what": "gradient", "epoch": 3, "iteration": 40}],
        },
    }
    summary = studies._ensemble_summary(tmp_path, members, [0, 1])
    assert summary == {"diverged": [{"encoder": "efficientnet-lite2", **members["efficientnet-lite2"]["diverged"][0]}]}
    finished = {"seeds": [0, 1], "validation_auc": {"values": [0.9, 0.9]}}
    assert metrics.paired_rule(finished, summary) == {"diverged": ["baseline"], "margin": 0.81, "met": False}
    assert metrics.paired_rule(summary, summary)["diverged"] == ["design", "baseline"]
    other = studies._study_row("other", {}, {**finished, "test_auc": finished["validation_auc"]})
    assert other["validation_auc"] == {"mean": 90.0, "std": 0.0, "values": [90.0, 90.0]}
    rows = [studies._study_row("baseline", {}, summary), {**other, "rule": metrics.paired_rule(finished, summary)}]
    lines = studies.study_markdown(rows).splitlines()
    assert "diverged at encoder efficientnet-lite2, seed 1: epoch 3, iteration 40 (gradient)" in lines[2]
    assert lines[2].endswith("| baseline |") and lines[3].endswith("| not met (the baseline diverged) |")


def test_the_shipped_study_plan_is_a_valid_plan(bundle_root):
    """``docs/study_plan.json``, which the README runs, passes the checks that refuse a plan before training."""
    plan = json.loads((bundle_root / "docs" / "study_plan.json").read_text())
    names = [variant["name"] for variant in studies.checked_plan(plan)]
    assert "the paper's image size" in names and len(names) == len(set(names))


def test_flow_probe_repeats_itself_for_a_seed():
    """FrEIA draws its channel permutations from NumPy: the probe's seed must fix them, as training's does, or two
    probes of one seed are two different flows."""
    generator = torch.Generator().manual_seed(0)
    train = (torch.randn(48, 8, 4, 4, generator=generator), np.zeros(48, dtype=int))
    labels = np.array([0, 1] * 40)
    shifted = torch.randn(80, 8, 4, 4, generator=generator) + torch.as_tensor(labels).view(-1, 1, 1, 1) * 0.3
    val, test = (shifted[:40], labels[:40]), (shifted[40:], labels[40:])
    probe = dict(feature_norm="layernorm", subnet="resnet", epochs=2, batch_size=16, lr=1e-3)
    first = ablations.flow_probe(train, val, test, seed=5, **probe)
    np.random.rand(7)  # whatever ran in between, NumPy's state included
    again = ablations.flow_probe(train, val, test, seed=5, **probe)
    assert again == first
    other = ablations.flow_probe(train, val, test, seed=6, **probe)
    assert other["by_epoch"] != first["by_epoch"]


@pytest.mark.parametrize(
    "args, needs",
    [
        (["scoring"], "scoring needs --run"),
        (["ensemble"], "ensemble needs --runs"),
        (["ensemble-seeds", "--encoders", "efficientnet-lite0", "--seeds", "0"], "--encoders (at least 2)"),
        (["ensemble-seeds", "--encoders", "efficientnet-lite0", "efficientnet-lite2"], "ensemble-seeds needs --seeds"),
        (["study", "--encoders", "efficientnet-lite0", "--seeds", "0"], "study needs --plan"),
    ],
)
def test_missing_arguments_are_named_before_anything_runs(tmp_path, capsys, args, needs):
    with pytest.raises(SystemExit) as stopped:
        ablations.main([*args, "--output", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert needs in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _fake_training(monkeypatch, diverges=lambda overrides: False) -> list[dict]:
    """``run_setting`` with its workflows replaced: training writes ``models/`` (or diverges at epoch 2, iteration
    5 where ``diverges(overrides)``), evaluation writes ``eval/``; returns the overrides of each training."""
    trained = []

    class Workflow:
        def __init__(self, root, configs, workflow_type, ckpt_dir, output_dir, **overrides):
            self.evaluates = str(configs[-1]).endswith("evaluate.json")
            self.models, self.eval, self.overrides = Path(ckpt_dir[2:-1]), Path(output_dir[2:-1]), overrides

        def run(self):
            if self.evaluates:
                reports.write_json(self.eval / "test_metrics.json", {"paper_protocol": {"auc": 0.75}})
                return
            trained.append(self.overrides)
            if diverges(self.overrides):
                raise engines.TrainingDiverged("loss", 2, 5)
            self.models.mkdir(parents=True, exist_ok=True)
            (self.models / "model.pt").write_bytes(json.dumps(self.overrides).encode())

        def finalize(self):
            pass

    monkeypatch.setattr(engines, "bundle_workflow", Workflow)
    return trained


def test_a_finished_run_is_trained_again_once_its_config_files_resolve_otherwise(
    bundle_root, tmp_path, monkeypatch, caplog
):
    """A run is reused only while its configs resolve to the settings its ``settings.json`` recorded: the same
    config files and overrides, with a file edited since, are another setting, trained again saying why."""
    trained = _fake_training(monkeypatch)
    extra = tmp_path / "study.json"
    extra.write_text(json.dumps({"learning_rate": 0.001}))
    configs, workdir = [str(bundle_root / "configs" / "train.json"), str(extra)], tmp_path / "run"
    first = ablations.run_or_reuse(configs, {"epochs": 1}, workdir)
    assert ablations.run_or_reuse(configs, {"epochs": 1}, workdir) == first and len(trained) == 1
    extra.write_text(json.dumps({"learning_rate": 0.01}))
    with caplog.at_level(logging.INFO, logger=ablations.__name__):
        ablations.run_or_reuse(configs, {"epochs": 1}, workdir)
    assert len(trained) == 2 and "learning_rate 0.001 -> 0.01" in caplog.text
    assert json.loads((workdir / "settings.json").read_text())["learning_rate"] == 0.01


def test_a_run_started_afresh_leaves_nothing_of_the_earlier_run_and_a_diverged_run_is_not_ensembled(
    bundle_root, tmp_path, monkeypatch
):
    """A run of other settings in a folder removes the earlier run's models/ and eval/ first, so a run that then
    diverges leaves none to be taken for its own (``ablations ensemble`` refuses it, naming where it diverged); a
    completed run whose budget alone changes keeps its state, which the training resumes from."""
    _fake_training(monkeypatch, diverges=lambda overrides: overrides.get("learning_rate") == 1.0)
    configs, workdir = [str(bundle_root / "configs" / "train.json")], tmp_path / "run"
    ablations.run_or_reuse(configs, {"learning_rate": 0.001}, workdir)
    assert (workdir / "models" / "model.pt").is_file() and (workdir / "eval" / "test_metrics.json").is_file()
    assert ablations.run_or_reuse(configs, {"learning_rate": 1.0}, workdir)["diverged"]["epoch"] == 2
    assert sorted(path.name for path in workdir.iterdir()) == ["settings.json"]
    with pytest.raises(ValueError, match="run .* diverged at epoch 2, iteration 5 \\(loss\\)"):
        ablations.ensemble([workdir, workdir], tmp_path / "ensemble")
    assert not (tmp_path / "ensemble").exists()

    longer = tmp_path / "longer"
    ablations.run_or_reuse(configs, {"epochs": 1}, longer)
    reports.write_json(longer / "models" / "resume" / "finished.json", {"epoch": 1})
    ablations.run_or_reuse(configs, {"epochs": 2}, longer)
    assert (longer / "models" / "resume" / "finished.json").is_file()


def test_repeated_encoders_or_seeds_are_refused_before_anything_trains(tmp_path):
    """A repeated encoder would make a one-model "ensemble", a repeated seed one run counted as two paired seeds."""
    plan = {"variants": [{"name": "a", "set": {"alpha": 0.1}}]}
    lite0, lite2 = "efficientnet-lite0", "efficientnet-lite2"
    calls = {
        "efficientnet-lite0": lambda: studies.ensemble_seeds(
            ["unused.json"], {}, tmp_path / "s", [lite0, lite2, lite0], [0]
        ),
        "--seeds lists 0": lambda: studies.ensemble_seeds(["unused.json"], {}, tmp_path / "s", [lite0, lite2], [0, 0]),
        "--seeds lists 1": lambda: ablations.compare(["unused.json"], {}, tmp_path / "s", {"AE-FLOW": []}, [0, 1, 1]),
        "--encoders lists": lambda: studies.study(["unused.json"], {}, tmp_path / "s", [lite0, lite0], [0], plan),
        "--seeds lists 2": lambda: studies.study(["unused.json"], {}, tmp_path / "s", [lite0], [2, 2], plan),
    }
    for message, call in calls.items():
        with pytest.raises(ValueError, match=f"{message}.* more than once"):
            call()
    assert not (tmp_path / "s").exists()


def test_a_baseline_is_paired_only_on_the_same_validation_images_and_members(tmp_path, monkeypatch, caplog):
    """The validation images' names are recorded beside their scores; a baseline that scored other images (even
    with the same labels) is refused, one that recorded no names is paired with a warning, and the same images
    under another data root pair. An ensemble-seeds baseline of other members is refused before training."""
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    names = [f"/data/split/{kind}/{i}.png" for i, kind in enumerate(("normal", "normal", "abnormal", "abnormal"))]
    monkeypatch.setattr(ablations, "run_or_reuse", lambda c, o, w: {"paper_protocol": {"auc": 0.8}, "wall_time_s": 1})
    monkeypatch.setattr(ablations, "kept_validation", lambda workdir: {"epoch": 1, "paper_protocol": {"auc": 0.9}})
    monkeypatch.setattr(ablations, "_calibrated_scores", lambda run, split, output: (labels, scores, names))
    monkeypatch.setattr(ablations, "write_comparison", lambda *args: None)
    variants, baseline = {"AE-FLOW": []}, tmp_path / "baseline.json"
    table = ablations.compare(["unused.json"], {}, tmp_path / "a", variants, [0, 1])["AE-FLOW"]
    assert table["validation_scores"]["names"] == names and len(table["validation_scores"]["values"]) == 2

    def paired(baseline_names):
        recorded = {key: value for key, value in table["validation_scores"].items() if key != "names"}
        recorded.update({} if baseline_names is None else {"names": baseline_names})
        reports.write_json(baseline, {"AE-FLOW": {**table, "validation_scores": recorded}})
        return ablations.compare(["unused.json"], {}, tmp_path / "a", variants, [0, 1], baseline)["AE-FLOW"]["rule"]

    assert paired([name.replace("/data/split", "/mnt/copy/split") for name in names])["differences"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="other validation images than this study \\(1 of 4 differ\\)"):
        paired([*names[:3], "/data/split/abnormal/9.png"])  # the same labels, another image
    with caplog.at_level(logging.WARNING, logger=ablations.__name__):
        assert paired(None)["differences"] == [0.0, 0.0]
    assert "recorded no validation image names" in caplog.text and "cannot be verified" in caplog.text

    per_seed = {"ensemble": {"validation_auc": 0.9, "test_auc": 0.8}}
    per_seed["validation_scores"] = {"labels": labels.tolist(), "names": names, "ensemble": scores.tolist()}
    monkeypatch.setattr(studies, "ensemble", lambda runs, output: per_seed)
    members = {encoder: {"seeds": [0]} for encoder in ("efficientnet-lite0", "efficientnet-lite2")}
    assert studies._ensemble_summary(tmp_path, members, [0])["validation_scores"]["names"] == names
    record = tmp_path / "ensemble_seeds.json"
    reports.write_json(
        record, {"seeds": [0], "encoders": list(members), "ensemble": {"validation_auc": {"values": [0.9]}}}
    )
    with pytest.raises(ValueError, match="is an ensemble of .* plan variant's 'encoders'"):
        studies.ensemble_seeds(
            ["unused.json"], {}, tmp_path / "b", ["efficientnet-lite0", "efficientnet-lite1"], [0], record
        )
    assert not (tmp_path / "b").exists()
