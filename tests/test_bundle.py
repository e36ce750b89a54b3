"""The bundle as MONAI's tools see it, in the model-zoo's order: train -> evaluate -> infer on tiny synthetic
volumes. The metadata, network shape and export checks are in test_zoo_checks.py and test_export.py."""

from __future__ import annotations

import csv
import gc
import importlib.machinery
import json
import sys
import types

import nibabel as nib
import torch
from conftest import bundle_workflow


def test_training_writes_a_calibrated_checkpoint_and_validation_metrics(trained):
    state = torch.load(f"{trained['ckpt_dir']}/model.pt", weights_only=True)
    assert any(key.startswith("flow.") for key in state) and any(key.startswith("decoder.") for key in state)
    assert not torch.equal(state["scorer.term_stats"], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    metrics = json.load(open(f"{trained['output_dir']}/val_metrics.json"))
    assert 0.0 <= metrics["paper_protocol"]["auc"] <= 1.0


def test_evaluate_writes_metrics_and_figures(bundle_root, trained):
    workflow = bundle_workflow(bundle_root, ["train.json", "evaluate.json"], "train", **trained)
    workflow.run()
    workflow.finalize()
    out = trained["output_dir"]
    metrics = json.load(open(f"{out}/test_metrics.json"))
    for name in ("auc", "f1", "acc", "sen", "spe", "threshold"):
        assert name in metrics["paper_protocol"]
    assert len(metrics["validation_protocol"]["folds"]) == 5
    for figure in ("test_roc.png", "test_score_distributions.png", "test_panels.png"):
        with open(f"{out}/{figure}", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(f"{out}/test_scores.csv")))
    assert len(rows) == metrics["paper_protocol"]["n_normal"] + metrics["paper_protocol"]["n_abnormal"]
    # the operating threshold chosen on validation is applied unchanged to the test set
    assert metrics["deployment_protocol"]["threshold"] == metrics["scorer"]["threshold"]


def test_inference_scores_volumes_slice_by_slice_and_saves_maps(bundle_root, tiny_dataset, trained, tmp_path):
    override = {key: trained[key] for key in ("bundle_root", "ckpt_dir", "image_size", "flow_blocks")}
    override.update(
        dataset_dir=str(tiny_dataset / "volumes"), input_glob="test_*_flair.nii.gz", output_dir=str(tmp_path)
    )
    workflow = bundle_workflow(bundle_root, ["inference.json"], "infer", **override)
    workflow.run()
    workflow.finalize()
    volumes = sorted((tiny_dataset / "volumes").glob("test_*_flair.nii.gz"))
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    depth = nib.load(volumes[0]).shape[2]
    assert len(rows) == len(volumes) * depth
    assert len(list(csv.DictReader(open(tmp_path / "volume_scores.csv")))) == len(volumes)
    for volume in volumes:
        saved = nib.load(tmp_path / volume.name.replace(".nii.gz", "_anomaly_map.nii.gz"))
        original = nib.load(volume)
        assert saved.shape[:3] == original.shape  # back on the input's grid
        assert abs(saved.affine - original.affine).max() < 1e-4
        assert (tmp_path / volume.name.replace(".nii.gz", "_anomaly_mask.nii.gz")).is_file()
    assert not (tmp_path / ".partial").exists()


def test_only_the_bundle_cli_freezes_the_heap_before_exit(monkeypatch):
    from scripts.engines import freeze_heap_before_exit

    freeze_heap_before_exit()
    assert gc.get_freeze_count() == 0  # pytest is an in-process caller: it keeps collecting
    cli = types.ModuleType("__main__")
    cli.__spec__ = importlib.machinery.ModuleSpec("monai.bundle.__main__", None)
    monkeypatch.setitem(sys.modules, "__main__", cli)
    try:
        freeze_heap_before_exit()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
