"""MLflow tracking as research groups use it: MONAI's ``--tracking mlflow`` with the default local sqlite store,
and a shared ``mlflow server`` on loopback, both read back through MLflow's client; runs left unfinished (a killed
training, an evaluation) never make the next tracked run crash."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import TINY_OVERRIDES
from ignite.engine import Engine
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigWorkflow


def _train_tracked(bundle_root, dataset, out, configs=("train.json",), **tracking):
    workflow = ConfigWorkflow(
        config_file=[str(bundle_root / "configs" / name) for name in configs],
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        logging_file=str(bundle_root / "configs" / "logging.conf"),
        workflow_type="train",
        tracking="mlflow",
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset),
        ckpt_dir=str(out / "models"),
        # an expression, not a literal: MONAI builds the path of the logged config by appending to the raw value
        output_dir=f"$'{out / 'eval'}'",
        **TINY_OVERRIDES,
        **tracking,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def _check_run(client: MlflowClient):
    experiment = client.get_experiment_by_name("monai_experiment")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    for param in ("encoder", "subnet", "alpha", "beta", "learning_rate", "epochs", "image_size"):
        assert param in run.data.params, param
    assert run.data.params["encoder"] == "efficientnet-lite0"
    for metric in ("train_loss", "loss_flow", "loss_recon", "val_auc", "val_f1"):
        assert metric in run.data.metrics, metric
    history = client.get_metric_history(run.info.run_id, "loss_flow")
    assert len(history) >= 2  # logged every iteration
    artifacts = [artifact.path for artifact in client.list_artifacts(run.info.run_id)]
    assert any(name.startswith("config_") and name.endswith(".json") for name in artifacts), artifacts
    assert "val_metrics.json" in artifacts and "val_scores.csv" in artifacts, artifacts


def test_local_sqlite_store(bundle_root, tiny_dataset, tmp_path):
    _train_tracked(bundle_root, tiny_dataset, tmp_path)  # MONAI's default: sqlite under output_dir
    _check_run(MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/eval/mlruns.db"))


@pytest.mark.parametrize("method", ["differnet", "patchcore"])  # PatchCore: a trainer with nothing to optimise
def test_comparison_method_is_tracked_like_ae_flow(bundle_root, tiny_dataset, tmp_path, method):
    _train_tracked(bundle_root, tiny_dataset, tmp_path, configs=("train.json", f"baseline_{method}.json"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/eval/mlruns.db")
    (run,) = client.search_runs([client.get_experiment_by_name("monai_experiment").experiment_id])
    assert run.data.params["method"] == method
    if method == "differnet":
        assert run.data.params["views"] == "1"
    for metric in ("train_loss", "loss_flow", "val_auc", "val_f1"):
        assert metric in run.data.metrics, metric
    assert "val_metrics.json" in [artifact.path for artifact in client.list_artifacts(run.info.run_id)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--default-artifact-root",
            str(tmp_path / "art"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the server's workers are stopped with it
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(2)
        assert server.poll() is None, "mlflow server exited"
    else:
        _stop(server)
        pytest.fail("mlflow server did not become healthy in 300 s")
    yield url
    _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL it if it has not exited within 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def test_shared_tracking_server(bundle_root, tiny_dataset, tmp_path, mlflow_server):
    _train_tracked(bundle_root, tiny_dataset, tmp_path, tracking_uri=mlflow_server)
    _check_run(MlflowClient(tracking_uri=mlflow_server))


def _tracked_engine(uri, params, closes=True, fail_at=None) -> Engine:
    """An engine tracked as ``--tracking mlflow`` tracks one: MONAI's handler first (``closes``: a trainer's, which
    ends its run at completion; else a validator's, which never does), then the bundle's, with ``params``."""
    from monai.handlers import MLFlowHandler
    from scripts.handlers import MLflowDetailsHandler

    def step(engine, batch):
        if engine.state.iteration == fail_at:
            raise RuntimeError("killed")
        return {"loss": torch.tensor(1.0), "loss_flow": torch.tensor(0.5)}

    engine = Engine(step)
    MLFlowHandler(tracking_uri=uri, output_transform=lambda output: output["loss"], close_on_complete=closes).attach(
        engine
    )
    MLflowDetailsHandler(params=params, output_keys=("loss_flow",)).attach(engine)
    return engine


def _runs(uri) -> list:
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("monai_experiment").experiment_id])
    return sorted((run.data.params.get("alpha"), run.info.status) for run in runs)


def test_a_run_left_unfinished_with_other_params_is_not_joined(tmp_path):
    """MONAI's handler joins any unfinished run; MLflow refuses to change a param of it. A killed training's run is
    joined by the same command, and a run of other params is tracked as a new run instead of crashing."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    with pytest.raises(RuntimeError, match="killed"):
        _tracked_engine(uri, {"alpha": 0.5}, fail_at=2).run([0] * 3, max_epochs=1)
    _tracked_engine(uri, {"alpha": 0.7}).run([0] * 3, max_epochs=1)
    assert _runs(uri) == [("0.5", "RUNNING"), ("0.7", "FINISHED")]
    _tracked_engine(uri, {"alpha": 0.5}).run([0] * 3, max_epochs=1)  # the killed run's command again: its run
    assert _runs(uri) == [("0.5", "FINISHED"), ("0.7", "FINISHED")]


def test_a_tracked_evaluation_closes_its_run(tmp_path):
    """An evaluation's run (MONAI's validator handler leaves it open) is closed, so the next training opens its own."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    _tracked_engine(uri, {"alpha": 0.5}, closes=False).run([0] * 2, max_epochs=1)
    assert _runs(uri) == [("0.5", "FINISHED")]
    _tracked_engine(uri, {"alpha": 0.7}).run([0] * 2, max_epochs=1)
    assert _runs(uri) == [("0.5", "FINISHED"), ("0.7", "FINISHED")]
