"""The ablation commands on the tiny synthetic set: the alpha x beta grid writes its table and heat map, and its
re-scoring of beta from the saved score terms reproduces the evaluator's own AUC at the trained beta."""

from __future__ import annotations

import json

from conftest import TINY_OVERRIDES

from scripts import ablations


def test_alpha_beta_grid_rescoring_matches_the_evaluator(bundle_root, tiny_dataset, tmp_path):
    sets = [f"{key}={json.dumps(value)}" for key, value in TINY_OVERRIDES.items()]
    sets.append(f"dataset_dir={json.dumps(str(tiny_dataset))}")
    ablations.main(
        ["alpha-beta", "--configs", str(bundle_root / "configs" / "train.json"), "--output", str(tmp_path)]
        + [arg for pair in sets for arg in ("--set", pair)]
        + ["--alphas", "0.5"]
    )
    table = json.loads((tmp_path / "alpha_beta.json").read_text())
    assert table["alphas"] == [0.5] and len(table["test_auc"]) == 1 and len(table["test_auc"][0]) == 11
    assert (tmp_path / "alpha_beta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = table["runs"]["0.5"]
    assert run["scorer"]["beta"] == 0.9  # beta_selection is forced to fixed: every beta is scored afterwards
    at_trained_beta = table["test_auc"][0][table["betas"].index(0.9)]
    assert abs(at_trained_beta - 100 * run["paper_protocol"]["auc"]) < 1e-6
