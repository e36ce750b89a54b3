"""Whole-volume and 2D inference, bad input, and the contracts MONAI Deploy and MONAI Label hold the bundle to.

A small bundle (64 x 64, two flow blocks, random flow and decoder weights, the real EfficientNet-Lite0 encoder)
is laid out in a temporary folder as Deploy and Label would receive it. The Deploy and Label steps are replayed
in-process, step by step, from MONAI Deploy App SDK 4.0.0 ``MonaiBundleInferenceOperator`` and MONAI Label 0.8.5
``BundleInferTask`` (neither is a dependency); with the SDK installed, the application also runs end to end.
"""

from __future__ import annotations

import csv
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, run_forked
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, SaveImaged
from monai.utils import ensure_tuple
from PIL import Image as PILImage

SMALL = {"image_size": TINY_OVERRIDES["image_size"], "flow_blocks": TINY_OVERRIDES["flow_blocks"]}


@pytest.fixture(scope="module")
def small_bundle(bundle_root, tmp_path_factory):
    """configs/ (inference sized small), scripts/, LICENSE, models/model.pt (random) and models/model.ts."""
    from scripts.networks import AEFlow

    root = tmp_path_factory.mktemp("bundle") / "aeflow_anomaly"  # the folder name MONAI Label serves
    shutil.copytree(bundle_root / "configs", root / "configs")
    shutil.copytree(bundle_root / "scripts", root / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(bundle_root / "LICENSE", root / "LICENSE")
    config = json.loads((root / "configs" / "inference.json").read_text())
    config.update(SMALL)
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    torch.manual_seed(0)
    net = AEFlow(**SMALL)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        net.scorer.term_stats.copy_(torch.tensor([[0.1, 0.2], [-0.9, 0.05]]))
    (root / "models").mkdir()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    size = SMALL["image_size"]
    ckpt_export(
        net_id="network_def",
        filepath=str(root / "models" / "model.ts"),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "inference.json"),
        bundle_root=str(root),
        use_trace=True,
        input_shape=[1, 1, size, size],
    )
    return root


@pytest.fixture(scope="module")
def volume(tiny_dataset, tmp_path_factory):
    """Six slices of a phantom volume with a lesion: enough for slice and volume scores, cheap to score."""
    folder = tmp_path_factory.mktemp("volume")
    source = nib.load(sorted((tiny_dataset / "volumes").glob("test_*_flair.nii.gz"))[-1])
    nib.save(source.slicer[:, :, 9:15], folder / "case_flair.nii.gz")
    return folder / "case_flair.nii.gz"


def _infer(bundle, input_dir, output_dir, pattern="*.nii.gz", configs=("inference.json",), **override):
    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / name) for name in configs],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(bundle),
        dataset_dir=str(input_dir),
        input_glob=pattern,
        output_dir=str(output_dir),
        **override,
    )
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()


@pytest.fixture(scope="module")
def nibabel_run(small_bundle, volume, tmp_path_factory):
    out = tmp_path_factory.mktemp("nibabel_out")
    _infer(small_bundle, volume.parent, out, image_reader="NibabelReader")
    return out


def _csv(path):
    return list(csv.DictReader(open(path)))


def test_volume_inference_writes_slice_and_volume_scores_and_maps_on_the_input_grid(nibabel_run, volume):
    original = nib.load(volume)
    rows = _csv(nibabel_run / "scores.csv")
    assert len(rows) == original.shape[2]
    slice_scores = np.array([float(r["score"]) for r in rows])
    (volume_row,) = _csv(nibabel_run / "volume_scores.csv")
    # the documented aggregation: a volume scores as its most anomalous slice
    assert float(volume_row["score"]) == pytest.approx(slice_scores.max(), abs=1e-6)
    assert int(volume_row["max_slice"]) == int(slice_scores.argmax())
    score_map = nib.load(nibabel_run / "case_flair_anomaly_map.nii.gz")
    mask = nib.load(nibabel_run / "case_flair_anomaly_mask.nii.gz")
    for saved in (score_map, mask):
        assert saved.shape[:3] == original.shape
        np.testing.assert_allclose(saved.affine, original.affine, atol=1e-4)
    values = np.asarray(score_map.dataobj).squeeze()
    np.testing.assert_array_equal(np.asarray(mask.dataobj).squeeze(), (values > 3.0).astype(np.uint8))
    assert not (nibabel_run / ".partial").exists()


def test_itk_reader_gives_the_same_scores_and_grid(small_bundle, volume, nibabel_run, tmp_path):
    # in a forked child: ITK's teardown at interpreter exit takes minutes on a small CPU (over 4 minutes measured
    # after a plain `itk.imread`), and the pytest process never loads ITK
    exit_code = run_forked(_infer, small_bundle, volume.parent, tmp_path, image_reader="ITKReader")
    assert exit_code == 0
    itk_scores = [float(r["score"]) for r in _csv(tmp_path / "scores.csv")]
    nib_scores = [float(r["score"]) for r in _csv(nibabel_run / "scores.csv")]
    np.testing.assert_allclose(itk_scores, nib_scores, atol=1e-4, rtol=1e-5)
    saved = nib.load(tmp_path / "case_flair_anomaly_map.nii.gz")
    assert saved.shape[:3] == nib.load(volume).shape
    np.testing.assert_allclose(saved.affine, nib.load(volume).affine, atol=1e-4)


def _write_pngs(volume, folder, count=2):
    folder.mkdir(parents=True, exist_ok=True)
    data = np.asarray(nib.load(volume).dataobj, dtype=np.float32)
    data = (255 * (data - data.min()) / (data.max() - data.min())).astype(np.uint8)
    for k in range(count):
        PILImage.fromarray(data[:, :, data.shape[2] // 2 + k]).save(folder / f"slice_{k}.png")
    return sorted(folder.glob("*.png"))


def test_2d_images_run_through_the_2d_override(small_bundle, volume, tmp_path):
    pngs = _write_pngs(volume, tmp_path / "pngs")
    out = tmp_path / "out"
    _infer(small_bundle, tmp_path / "pngs", out, pattern="*.png", configs=("inference.json", "inference_2d.json"))
    assert len(_csv(out / "scores.csv")) == len(pngs)
    assert not (out / "volume_scores.csv").exists()
    for png in pngs:
        saved = nib.load(out / f"{png.stem}_anomaly_map.nii.gz")
        assert saved.shape[:2] in (PILImage.open(png).size, PILImage.open(png).size[::-1])


def _nifti(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.diag([1.5, 1.5, 2.0, 1.0])), path)


BAD_INPUTS = {
    "2d_volume": (lambda v, p: _nifti(p, v[:, :, 0]), r"2 spatial dimension.*expected a 3D volume"),
    "4d_two_channels": (lambda v, p: _nifti(p, np.stack([v, v], -1)), r"2 channels.*expected a 3D volume"),
    "not_an_image": (lambda v, p: p.write_text("not an image\n"), r"b_bad.nii.gz: cannot be read with NibabelReader"),
    "nan_voxels": (
        lambda v, p: _nifti(p, np.where(v > v.mean(), np.nan, v)),
        r"b_bad.nii.gz: the image has non-finite voxels \(\d+ NaN",
    ),
    "all_zero": (lambda v, p: _nifti(p, np.zeros_like(v)), r"b_bad.nii.gz: the image is constant \(every voxel is 0\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_and_nothing_is_written(small_bundle, volume, tmp_path, case):
    make, pattern = BAD_INPUTS[case]
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(volume, inputs / "a_good.nii.gz")  # scored first: its outputs must not survive the failure
    make(np.asarray(nib.load(volume).dataobj, dtype=np.float32), inputs / "b_bad.nii.gz")
    messages = _raised_messages(_infer, small_bundle, inputs, out)
    assert any("b_bad.nii.gz" in m for m in messages), messages
    assert any(re.search(pattern, m) for m in messages), messages
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_missing_model_is_named_before_anything_runs(small_bundle, volume, tmp_path):
    messages = _raised_messages(_infer, small_bundle, volume.parent, tmp_path / "out", ckpt_dir=str(tmp_path))
    assert any("model.pt" in m and "does not exist" in m for m in messages), messages
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def _raised_messages(call, *args, **kwargs):
    with pytest.raises(Exception) as error:
        call(*args, **kwargs)
    messages, cause = [], error.value
    while cause is not None:
        messages.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    return messages


# ---- MONAI Deploy: MonaiBundleInferenceOperator (App SDK 4.0.0), replayed step by step ----


def _deploy_parser(bundle, config_names=("inference",)):
    """``_read_directory_bundle_config``: metadata as ``_meta_``, the named configs, no bundle_root override."""
    parser = ConfigParser()
    parser.read_meta(f=json.loads((bundle / "configs" / "metadata.json").read_text()))
    parser.read_config([bundle / "configs" / f"{name}.json" for name in config_names])
    parser.parse()
    return parser


def _deploy_filter(compose, disallowed=("LoadImage", "SaveImage")):
    compose.transforms = tuple(t for t in compose.transforms if not any(d in type(t).__name__ for d in disallowed))
    return compose


def _deploy_run(bundle, path, config_names=("inference",), reader="NibabelReader"):
    """Returns the uint8 array the operator emits on ``pred``, and the postprocessing's dict."""
    from scripts.deploy import read_input

    parser = _deploy_parser(bundle, config_names)
    meta = parser["_meta_"]
    device = parser.get_parsed_content("device")
    inferer = parser.get_parsed_content("inferer")
    preprocessing = _deploy_filter(parser.get_parsed_content("preprocessing"))
    postprocessing = _deploy_filter(parser.get_parsed_content("postprocessing"))
    network = torch.jit.load(str(bundle / "models" / "model.ts"), map_location=device).eval()  # preferred over .pt
    input_name, output_name = next(iter(meta["network_data_format"]["inputs"])), next(
        iter(meta["network_data_format"]["outputs"])
    )
    array, image_meta = read_input(path, reader)  # what the app's loader emits as an SDK Image
    inputs = {input_name: MetaTensor.ensure_torch_and_prune_meta(torch.as_tensor(array), image_meta)}
    with torch.no_grad():
        inputs = preprocessing(inputs)
        first = inputs[input_name]
        outputs = inferer(inputs=first[None].float().to(device), network=network)
        post = {output_name: ensure_tuple(outputs)[0]}  # only the first output, batch item 0
        post.update(inputs)
        post = postprocessing(post)
    value = post[output_name].cpu().numpy()
    squeezed = np.squeeze(value, 0)
    emitted = squeezed.astype(np.uint8) if squeezed.ndim == 2 else np.swapaxes(squeezed, 0, 2).astype(np.uint8)
    return value, emitted, post


def test_deploy_operator_contract_for_a_volume(small_bundle, volume, nibabel_run):
    parser = _deploy_parser(small_bundle)
    for name in ("preprocessing", "inferer", "postprocessing", "device"):
        assert parser.get(name) is not None, name
    io = parser["_meta_"]["network_data_format"]
    assert list(io["inputs"]) == ["image"] and list(io["outputs"]) == ["pred"]
    assert io["inputs"]["image"]["type"] == io["outputs"]["pred"]["type"] == "image"
    value, emitted, post = _deploy_run(small_bundle, volume)
    # the operator casts to uint8: the postprocessing must already hold exactly representable 0/1 values
    np.testing.assert_array_equal(emitted, np.swapaxes(value[0], 0, 2))
    assert set(np.unique(emitted)) <= {0, 1}
    assert emitted.shape[::-1] == nib.load(volume).shape
    # the TorchScript model under Deploy scores like the eager bundle run
    bundle_scores = [float(r["score"]) for r in _csv(nibabel_run / "scores.csv")]
    np.testing.assert_allclose(post["scores"]["slice_scores"], bundle_scores, atol=1e-4, rtol=1e-5)
    saved_map = np.asarray(nib.load(nibabel_run / "case_flair_anomaly_map.nii.gz").dataobj).squeeze()
    np.testing.assert_allclose(np.asarray(post["anomaly_map"])[0], saved_map, atol=1e-4, rtol=1e-5)


def test_deploy_app_report_is_complete_for_a_2d_image(small_bundle, volume, tmp_path):
    from scripts.deploy import write_report

    (png,) = _write_pngs(volume, tmp_path / "png", count=1)
    value, emitted, post = _deploy_run(small_bundle, png, ("inference", "inference_2d"), reader="PILReader")
    assert emitted.shape == value.shape[1:] and set(np.unique(emitted)) <= {0, 1}
    written = write_report(tmp_path / "out", post)
    scores = json.loads(written["slice_0_scores.json"].read_text())
    assert scores["aggregation"] == "max" and len(scores["slice_scores"]) == 1
    assert scores["score"] == pytest.approx(float(np.asarray(post["anomaly_map"]).mean()), rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(written)  # no temporary files left


def test_deploy_app_runs_end_to_end(small_bundle, volume, tmp_path, bundle_root):
    pytest.importorskip("monai.deploy.core", reason="MONAI Deploy App SDK not installed (optional)")
    import runpy
    import sys

    out = tmp_path / "out"
    sys.argv = ["app", "-i", str(volume.parent), "-o", str(out), "-m", str(small_bundle)]
    app_globals = runpy.run_path(str(bundle_root / "deploy" / "app" / "app.py"), run_name="aeflow_app")
    app_globals["AEFlowAnomalyApp"]().run()
    scores = json.loads((out / "case_flair_scores.json").read_text())
    assert len(scores["slice_scores"]) == nib.load(volume).shape[2]
    assert nib.load(out / "case_flair_anomaly_mask.nii.gz").shape[:3] == nib.load(volume).shape


# ---- MONAI Label: monaibundle app, BundleInferTask (0.8.5), replayed ----


def test_monai_label_bundle_contract(small_bundle, volume):
    bundle = small_bundle
    assert not any(word in bundle.name for word in ("deepedit", "deepgrow", "detection"))  # type: segmentation
    assert (bundle / "configs" / "inference.json").is_file() and (bundle / "models" / "model.pt").is_file()
    config = ConfigParser()
    config.read_config(str(bundle / "configs" / "inference.json"))
    config.config.update({"bundle_root": str(bundle)})
    for name in ("device", "network_def", "preprocessing", "postprocessing", "inferer"):
        assert config.get(name) is not None, name
    network = config.get_parsed_content("network_def", instantiate=True)  # model.pt present: eager network
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    key_image, image = next(iter(metadata["network_data_format"]["inputs"].items()))
    key_pred, pred = next(iter(metadata["network_data_format"]["outputs"].items()))
    labels = {v.lower(): int(k) for k, v in pred.get("channel_def", {}).items() if v.lower() != "background"}
    assert (key_image, key_pred, labels) == ("image", "pred", {"anomaly": 1})
    assert len(image["spatial_shape"]) == 2  # Label serves it as a 2D model; volumes go through SliceInferer

    pre = list(config.get_parsed_content("preprocessing", instantiate=True).transforms)
    assert not any(isinstance(t, LoadImaged) for t in pre)  # Label would swap LoadImaged; the strict loader stays
    post = [t for t in config.get_parsed_content("postprocessing", instantiate=True).transforms]
    post = [t for t in post if not isinstance(t, SaveImaged)]  # Label's post_filter
    data = Compose(pre)({key_image: str(volume)})
    with torch.no_grad():
        data[key_pred] = config.get_parsed_content("inferer")(data[key_image][None], network)[0]
    data = Compose(post)(data)
    mask = np.asarray(data[key_pred])
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert mask.shape[1:] == nib.load(volume).shape  # restored to the study's grid
