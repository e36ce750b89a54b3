"""The bundle on a CUDA device, as a user with a GPU runs it: training calibrates on validation there, evaluation
and inference run there, and a model made on the GPU scores on the CPU as it does on the GPU.

Skipped where no CUDA device is present (this project's CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py`` (docs/benchmarks.md says when it last ran so).
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import bundle_workflow, tiny_run_override

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CPU = "$torch.device('cpu')"


def _scores(folder) -> dict[str, float]:
    with open(folder / "scores.csv") as f:
        return {row["name"]: float(row["score"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def gpu_run(bundle_root, tiny_dataset, tmp_path_factory):
    """Training and evaluation on the GPU (the configs' default device where CUDA is present), then inference of
    the test volumes on the GPU and on the CPU."""
    out = tmp_path_factory.mktemp("cuda_run")
    override = tiny_run_override(bundle_root, tiny_dataset, out)
    for configs in (["train.json"], ["train.json", "evaluate.json"]):
        workflow = bundle_workflow(bundle_root, configs, "train", **override)
        assert workflow.parser.get_parsed_content("device").type == "cuda"
        workflow.run()
        workflow.finalize()
    runs = {"cuda": {}, "cpu": {"device": CPU}}
    for name, extra in runs.items():
        workflow = bundle_workflow(
            bundle_root,
            ["inference.json"],
            "infer",
            bundle_root=str(bundle_root),
            ckpt_dir=override["ckpt_dir"],
            dataset_dir=str(tiny_dataset / "volumes"),
            input_glob="test_*_flair.nii.gz",
            output_dir=str(out / name),
            **extra,
        )
        workflow.run()
        workflow.finalize()
    return out


def test_training_calibrates_and_evaluation_reports_on_cuda(gpu_run):
    from scripts.model_file import network_from_file

    scorer = network_from_file(gpu_run / "models" / "model.pt", map_location="cpu").scorer
    assert torch.isfinite(scorer.threshold) and torch.isfinite(scorer.pixel_threshold)
    metrics = json.loads((gpu_run / "eval" / "test_metrics.json").read_text())
    assert 0.0 <= metrics["paper_protocol"]["auc"] <= 1.0


def test_a_gpu_model_scores_on_the_cpu_as_on_the_gpu(gpu_run):
    cpu, gpu = _scores(gpu_run / "cpu"), _scores(gpu_run / "cuda")
    assert cpu and sorted(cpu) == sorted(gpu)
    for name, score in cpu.items():
        # cuDNN's float32 convolutions run in TF32: measured up to 9.8e-3 on the Chest X-ray model (docs/benchmarks.md)
        assert gpu[name] == pytest.approx(score, abs=2e-2), name
