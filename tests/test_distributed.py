"""``configs/multi_gpu_train.json`` / ``multi_gpu_evaluate.json`` with two processes on the CPU (gloo): the
result has the single-process run's form, and only rank 0 writes checkpoints, metrics and MLflow records.

The ranks are forked from this process (as torchrun would start them, minus the re-import of MONAI that costs
minutes on a small CPU), each with the environment torchrun sets.
"""

from __future__ import annotations

import functools
import json
import os
import socket

import pytest
import torch
from conftest import bundle_workflow, run_forked_together, tiny_run_override
from mlflow.tracking import MlflowClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, root, configs: list[str], override: dict, tracking: bool) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    extra = {"tracking": "mlflow"} if tracking else {}
    workflow = bundle_workflow(root, configs, "train", **override, **extra)
    workflow.run()
    workflow.finalize()


def _launch(root, configs, override, world=2, tracking=False) -> None:
    port = _free_port()
    ranks = [functools.partial(_rank, rank, world, port, root, configs, override, tracking) for rank in range(world)]
    codes = run_forked_together(ranks, timeout=900)
    assert codes == [0] * world, f"rank exit codes {codes}"


@pytest.fixture(scope="module")
def distributed_run(bundle_root, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # output_dir as an expression: MONAI appends to its raw value when it logs the config to MLflow
    override = tiny_run_override(bundle_root, tiny_dataset, out, output_dir=f"$'{out / 'eval'}'")
    _launch(bundle_root, ["train.json", "multi_gpu_train.json"], override, tracking=True)
    return out, override


def test_two_gloo_processes_train_like_one(distributed_run, trained):
    out, _ = distributed_run
    single = torch.load(f"{trained['ckpt_dir']}/model.pt", weights_only=True)
    shared = torch.load(out / "models" / "model.pt", weights_only=True)
    assert {k: v.shape for k, v in shared.items()} == {k: v.shape for k, v in single.items()}
    assert all(
        torch.isfinite(v).all()
        for k, v in shared.items()
        if v.is_floating_point() and k not in ("scorer.threshold", "scorer.pixel_threshold")
    )
    ours = json.loads((out / "eval" / "val_metrics.json").read_text())
    theirs = json.loads(open(f"{trained['output_dir']}/val_metrics.json").read())
    assert ours.keys() == theirs.keys() and ours["paper_protocol"].keys() == theirs["paper_protocol"].keys()
    assert sorted(p.name for p in (out / "models").iterdir() if p.is_file()) == ["model.pt"]
    assert len(list((out / "models" / "resume").glob("*.pt"))) == 1  # one epoch, saved once (rank 0)


def test_only_rank_zero_records_to_mlflow(distributed_run):
    out, _ = distributed_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/eval/mlruns.db")
    experiment = client.get_experiment_by_name("monai_experiment")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and "val_auc" in runs[0].data.metrics


def test_sharded_evaluation_scores_every_test_item_once(bundle_root, tiny_dataset, distributed_run, tmp_path):
    _, override = distributed_run
    _launch(
        bundle_root,
        ["train.json", "evaluate.json", "multi_gpu_evaluate.json"],
        {**override, "output_dir": str(tmp_path)},
    )
    expected = len(json.loads((tiny_dataset / "datalist.json").read_text())["test"])
    names = [row.split(",")[0] for row in (tmp_path / "test_scores.csv").read_text().strip().splitlines()[1:]]
    assert len(names) == len(set(names)) == expected  # both shards gathered, none twice
    assert json.loads((tmp_path / "test_metrics.json").read_text())["paper_protocol"]["n_normal"] > 0


def test_more_processes_than_training_items_is_refused():
    from scripts.distributed import check_world_size

    with pytest.raises(ValueError, match="3 training item\\(s\\) for 4 processes"):
        check_world_size([1, 2, 3], 4)


def test_early_stopping_is_refused_under_ddp():
    """Only rank 0 validates; its early stop would leave the other ranks blocked in their next all-reduce."""
    from scripts.distributed import check_early_stopping

    with pytest.raises(ValueError, match="early_stop_patience 5 cannot be used with multi_gpu_train.json"):
        check_early_stopping(5)
    check_early_stopping(None)
    check_early_stopping(0)
