"""A real MONAI Label server (0.8.5, ``monaibundle`` app) serving the runtime bundle on 127.0.0.1.

MONAI Label pins packages the bundle does not use (pydicom 2, numpy 1.26, jsonschema 3.2), so it lives in its own
virtual environment; ``.ci/run`` builds it and sets ``AEFLOW_MONAILABEL`` to its ``monailabel`` command. The
server gets the documented offline flags; the test sends ``/infer`` for a demo volume with a lesion and checks the
mask against the bundle's own inference, the scores in the JSON result, and a bad input's message.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import bundle_workflow

MONAILABEL = os.environ.get("AEFLOW_MONAILABEL", "")
pytestmark = pytest.mark.skipif(
    not (MONAILABEL and Path(MONAILABEL).is_file()),
    reason="MONAI Label is not installed here (.ci/run installs it in its own venv and sets AEFLOW_MONAILABEL)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", timeout: float = 300):
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _patchcore_model(bundle_root, data: Path, work: Path) -> Path:
    """A comparison method's model file (PatchCore, one pass over the demo's training slices)."""
    override = {"bundle_root": str(bundle_root), "dataset_dir": str(data), "ckpt_dir": str(work / "patchcore")}
    workflow = bundle_workflow(
        bundle_root, ["train.json", "baseline_patchcore.json"], "train", output_dir=str(work / "eval"), **override
    )
    workflow.run()
    workflow.finalize()
    return work / "patchcore" / "model.pt"


def _ensemble_model(bundle_root, data: Path, work: Path) -> Path:
    """An ensemble file (``scripts.ensemble``) of the demo model and a PatchCore model, calibrated on the demo's
    validation slices by ``configs/ensemble.json``."""
    members = [str(bundle_root / "models" / "model.pt"), str(_patchcore_model(bundle_root, data, work))]
    override = {"bundle_root": str(bundle_root), "dataset_dir": str(data), "ckpt_dir": str(work / "ensemble")}
    workflow = bundle_workflow(
        bundle_root,
        ["train.json", "ensemble.json"],
        "train",
        output_dir=str(work / "eval"),
        **override,
        ensemble_members=members,
    )
    workflow.run()
    workflow.finalize()
    return work / "ensemble" / "model.pt"


@pytest.fixture(scope="module", params=["ae-flow", "patchcore", "ae-flow-torch", "ensemble"])
def server(request, bundle_root, tmp_path_factory):
    """The server with the README's runtime bundle of the demo model, then of a comparison method's model (the
    model file names its method, so the same bundle code serves both), then of the demo model packaged with its
    encoder on PyTorch (``scripts.package --encoder-runtime torch``; the others keep the default ``auto``, ONNX
    Runtime on this CPU), then of an ensemble of the demo model and the PatchCore model."""
    from scripts.package import build
    from scripts.synthetic import prepare_default_dataset

    work = tmp_path_factory.mktemp("monailabel")
    env = {**os.environ, "PATH": f"{Path(MONAILABEL).parent}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    apps = work / "apps"
    subprocess.run(
        [MONAILABEL, "apps", "--download", "--name", "monaibundle", "--output", str(apps)], env=env, check=True
    )
    data = prepare_default_dataset(work / "synthetic_brain")
    model = {"patchcore": _patchcore_model, "ensemble": _ensemble_model}.get(request.param)
    model = model(bundle_root, work / "synthetic_brain", work) if model else None
    runtime = "torch" if request.param.endswith("torch") else None
    build(apps / "monaibundle" / "model" / "aeflow_anomaly", model, encoder_runtime=runtime)  # the README's bundle
    studies = work / "studies"
    studies.mkdir()
    source = work / "synthetic_brain" / "volumes" / "test_004_flair.nii.gz"  # a volume with a lesion
    shutil.copy(source, studies / "case_lesion.nii.gz")
    constant = nib.load(source)
    nib.save(nib.Nifti1Image(np.zeros(constant.shape, np.float32), constant.affine), studies / "case_blank.nii.gz")
    port = _free_port()
    command = [MONAILABEL, "start_server", "--app", str(apps / "monaibundle"), "--studies", str(studies)]
    command += ["--conf", "models", "aeflow_anomaly", "--conf", "skip_trainers", "true", "--conf", "preload", "true"]
    command += ["--conf", "zoo_source", "github", "--conf", "sam2", "false", "--host", "127.0.0.1", "--port", str(port)]
    log = open(work / "server.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if process.poll() is not None:
                pytest.fail(f"MONAI Label exited ({process.returncode}): {(work / 'server.log').read_text()[-3000:]}")
            try:
                status, body = _request(f"{base}/info/", timeout=5)
                if status == 200 and "aeflow_anomaly" in json.loads(body)["models"]:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(2)
        else:
            pytest.fail(f"MONAI Label did not serve the bundle in 600 s: {(work / 'server.log').read_text()[-3000:]}")
        yield base, work, data, runtime
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_label_server_returns_the_bundles_mask_and_scores(server, bundle_root, tmp_path):
    base, work, _, runtime = server
    status, body = _request(f"{base}/infer/aeflow_anomaly?image=case_lesion&output=image", method="POST")
    assert status == 200, body[:500]
    served = tmp_path / "served.nii.gz"
    served.write_bytes(body)
    status, body = _request(f"{base}/infer/aeflow_anomaly?image=case_lesion&output=json", method="POST")
    assert status == 200, body[:500]
    result = json.loads(body)
    bundle = work / "apps" / "monaibundle" / "model" / "aeflow_anomaly"
    override = {"bundle_root": str(bundle), "dataset_dir": str(work / "studies"), "output_dir": str(tmp_path / "own")}
    bundle_workflow(bundle, ["inference.json"], "infer", input_glob="case_lesion.nii.gz", **override).run()
    own_mask = np.asarray(nib.load(tmp_path / "own" / "case_lesion_anomaly_mask.nii.gz").dataobj)
    served_mask = np.asarray(nib.load(served).dataobj)
    assert served_mask.shape == own_mask.shape and own_mask.sum() > 0
    np.testing.assert_array_equal(served_mask, own_mask)
    own = json.loads((tmp_path / "own" / "case_lesion_scores.json").read_text())
    assert result["score"] == pytest.approx(own["score"], abs=1e-5)  # the scores reach the Label client
    assert result["max_slice"] == own["max_slice"] and result["anomalous"] == own["anomalous"]
    np.testing.assert_allclose(result["slice_scores"], own["slice_scores"], atol=1e-5)
    # the server's network_def carried the packaged runtime: the default auto is ONNX Runtime on a CPU
    assert ("exported to ONNX Runtime" in (work / "server.log").read_text()) == (runtime != "torch")


def test_label_server_names_a_bad_input(server):
    base, _, _, _ = server
    status, body = _request(f"{base}/infer/aeflow_anomaly?image=case_blank&output=json", method="POST")
    assert status == 422, body[:500]
    assert "the image is constant" in json.loads(body)["detail"]
