"""The bundle as MONAI's tools see it, in the model-zoo's order: train -> evaluate -> infer on tiny synthetic
volumes. The metadata, network shape and export checks are in test_zoo_checks.py and test_export.py."""

from __future__ import annotations

import csv
import gc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
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
    protocol = metrics["validation_protocol"]  # the demo's 12 test slices: a 20 % part holds 2, often one class
    assert len(protocol["folds"]) == 5 or ("cannot hold both classes" in protocol["skipped"] and not protocol["folds"])
    for figure in ("test_roc.png", "test_score_distributions.png", "test_panels.png"):
        with open(f"{out}/{figure}", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(f"{out}/test_scores.csv")))
    assert len(rows) == metrics["paper_protocol"]["n_normal"] + metrics["paper_protocol"]["n_abnormal"]
    # the operating threshold chosen on validation is applied unchanged to the test set
    assert metrics["deployment_protocol"]["threshold"] == metrics["scorer"]["threshold"]


def test_inference_scores_volumes_slice_by_slice_and_saves_maps(bundle_root, tiny_dataset, trained, tmp_path):
    """Only the central slices that training used are scored; the maps of the others are NaN, their mask 0."""
    from scripts.preprocessing import central_slice_range

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
    scored = central_slice_range(depth, 0.5)
    assert len(rows) == len(volumes) * len(scored) < len(volumes) * depth
    assert {int(row["name"].rsplit("=", 1)[1]) for row in rows} == set(scored)
    assert len(list(csv.DictReader(open(tmp_path / "volume_scores.csv")))) == len(volumes)
    for volume in volumes:
        saved = nib.load(tmp_path / volume.name.replace(".nii.gz", "_anomaly_map.nii.gz"))
        original = nib.load(volume)
        assert saved.shape[:3] == original.shape  # back on the input's grid
        assert abs(saved.affine - original.affine).max() < 1e-4
        values = saved.get_fdata()
        outside = [k for k in range(depth) if k not in scored]
        assert np.isnan(values[..., outside]).all() and np.isfinite(values[..., scored.start : scored.stop]).all()
        mask = nib.load(tmp_path / volume.name.replace(".nii.gz", "_anomaly_mask.nii.gz")).get_fdata()
        assert mask[..., outside].sum() == 0
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


def test_volume_inference_scores_each_slice_exactly_as_evaluation(bundle_root, tiny_dataset, trained, tmp_path):
    """The same files, slice items in evaluation and whole volumes in inference: the same scores and decisions.
    Both score one slice per batch here: oneDNN's float32 convolutions round differently by batch size (about
    1e-5 on these scores), which is arithmetic, not the pipeline."""
    evaluation = {**trained, "output_dir": str(tmp_path / "eval"), "batch_size": 1, "encode_batch_size": 1}
    workflow = bundle_workflow(bundle_root, ["train.json", "evaluate.json"], "train", **evaluation)
    workflow.run()
    override = {"bundle_root": trained["bundle_root"], "ckpt_dir": trained["ckpt_dir"], "output_dir": str(tmp_path)}
    override.update(dataset_dir=str(tiny_dataset / "volumes"), input_glob="test_*_flair.nii.gz")
    workflow = bundle_workflow(bundle_root, ["inference.json"], "infer", **override, **{"inferer#slice_batch_size": 1})
    workflow.run()
    evaluated = {r["name"]: float(r["score"]) for r in csv.DictReader(open(tmp_path / "eval" / "test_scores.csv"))}
    inferred = {r["name"]: float(r["score"]) for r in csv.DictReader(open(tmp_path / "scores.csv"))}
    assert evaluated and set(evaluated) <= set(inferred)  # evaluation takes every second slice of the same range
    threshold = json.load(open(tmp_path / "eval" / "test_metrics.json"))["deployment_protocol"]["threshold"]
    for name, score in evaluated.items():
        assert abs(inferred[name] - score) <= 1e-5, name
        assert (inferred[name] >= threshold) == (score >= threshold), name


def test_whole_volume_inference_finds_the_demo_lesions(bundle_root, tmp_path):
    """The shipped demo model on the demo's test volumes (4 normal, 4 with a lesion): the volume scores rank the
    lesion volumes first at least as well as the slices rank in evaluation, and the mask lies in lesion slices."""
    from scripts.synthetic import prepare_default_dataset
    from sklearn.metrics import roc_auc_score

    prepare_default_dataset(tmp_path / "synthetic_brain")
    volumes = tmp_path / "synthetic_brain" / "volumes"
    override = {"bundle_root": str(bundle_root), "dataset_dir": str(volumes), "output_dir": str(tmp_path / "out")}
    workflow = bundle_workflow(bundle_root, ["inference.json"], "infer", input_glob="test_*_flair.nii.gz", **override)
    workflow.run()
    rows = list(csv.DictReader(open(tmp_path / "out" / "volume_scores.csv")))
    segmentations = {r["volume"]: nib.load(r["volume"].replace("_flair", "_seg")).get_fdata() > 0 for r in rows}
    labels = [int(segmentations[r["volume"]].any()) for r in rows]
    assert sum(labels) == 4 and len(labels) == 8
    volume_auc = roc_auc_score(labels, [float(r["score"]) for r in rows])
    claimed = json.loads((bundle_root / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert volume_auc >= claimed["synthetic_brain_test_auc"]  # measured: 1.0 against the slices' 0.943
    in_lesion_slices = in_lesion_volumes = everywhere = 0
    for volume, lesion in segmentations.items():
        mask = nib.load(tmp_path / "out" / Path(volume).name.replace(".nii.gz", "_anomaly_mask.nii.gz")).get_fdata()
        everywhere += mask.sum()
        if lesion.any():
            in_lesion_volumes += mask.sum()
            in_lesion_slices += mask[..., lesion.any(axis=(0, 1))].sum()
    # measured: 84 % of all mask voxels are in the lesion volumes, and all but one of those in lesion slices
    assert in_lesion_volumes >= 0.75 * everywhere and in_lesion_slices >= 0.95 * in_lesion_volumes > 0


def test_onnx_runtime_encoder_scores_as_pytorch(bundle_root, tiny_dataset, trained, tmp_path):
    """``encoder_runtime: onnxruntime`` (issue 16): the same scores as PyTorch's encoder, to ONNX Runtime's 1e-4."""
    override = {"bundle_root": trained["bundle_root"], "ckpt_dir": trained["ckpt_dir"]}
    override.update(dataset_dir=str(tiny_dataset / "volumes"), input_glob="test_*_flair.nii.gz")
    scores = {}
    for runtime in ("torch", "onnxruntime"):
        out = tmp_path / runtime
        workflow = bundle_workflow(
            bundle_root, ["inference.json"], "infer", **override, output_dir=str(out), encoder_runtime=runtime
        )
        assert workflow.network_def.encoder.runtime == runtime  # set in network_def: MONAI Label builds that id
        assert workflow.parser.get_parsed_content("batch_size") == 1  # volumes one at a time, on either runtime
        workflow.run()
        workflow.finalize()
        scores[runtime] = {r["name"]: float(r["score"]) for r in csv.DictReader(open(out / "scores.csv"))}
    assert scores["torch"] and scores["onnxruntime"].keys() == scores["torch"].keys()
    largest = max(abs(scores["onnxruntime"][name] - score) for name, score in scores["torch"].items())
    assert 0 < largest <= 1e-4  # another runtime's arithmetic, not another network
