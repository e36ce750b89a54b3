"""Inference as users and integrations run it: whole volumes and 2D images, bad input, models that describe
themselves, and the contracts MONAI Deploy and MONAI Label hold the bundle to.

Small bundles (64 x 64, two flow blocks, the real EfficientNet-Lite0 encoder, flow and decoder moved off their
initialisation, thresholds set from the test volume's own map) are laid out in temporary folders as Deploy and
Label receive them: configs/, scripts/, LICENSE and models/model.pt, which says what it is. The Deploy
application runs end to end (CI installs the SDK); the operator's and Label's steps are also replayed.
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
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, SaveImaged
from monai.utils import ensure_tuple
from PIL import Image as PILImage

SMALL = {"image_size": TINY_OVERRIDES["image_size"], "flow_blocks": TINY_OVERRIDES["flow_blocks"]}
IMAGE_SPEC = {"kind": "image", "reader": "PILReader", "reader_args": {"reverse_indexing": False}}


def _set_thresholds(net, references):
    """Thresholds inside the range of the ``references``' scores and map values, as validation would set them."""
    from scripts.engines import AnomalyInferer
    from scripts.preprocessing import input_transforms

    preprocessing = input_transforms(net.input_spec, net.image_size, net.in_channels)
    with torch.no_grad():
        results = [AnomalyInferer().score(preprocessing({"image": str(f)})["image"][None], net) for f in references]
        maps = torch.cat([r["anomaly_map"].flatten() for r in results])
        net.scorer.threshold.fill_(float(torch.cat([r["score"].flatten() for r in results]).median()))
        net.scorer.pixel_threshold.fill_(float(torch.quantile(maps[torch.isfinite(maps)], 0.9)))
    return results


def _save_model(path, references, input_spec=None, seed=0):
    """A small model file calibrated on the ``references`` (files) as validation would: term statistics, and
    thresholds inside the range of their scores and map values."""
    from scripts.networks import AEFlow

    torch.manual_seed(seed)
    np.random.seed(seed)  # FrEIA draws its channel permutations with NumPy
    net = AEFlow(**SMALL, input_spec=input_spec).eval()
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        results = _set_thresholds(net, references)
        for row, term in enumerate(("score_flow", "score_recon")):
            values = torch.cat([r[term].flatten() for r in results])
            net.scorer.term_stats[row] = torch.stack([values.mean(), values.std()])
    _set_thresholds(net, references)  # again, in the calibrated units
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def _bundle(bundle_root, folder, references, input_spec=None):
    """A runtime bundle as ``scripts.package`` lays it out, around a small model calibrated on ``references``."""
    from scripts.model_file import calibration, read_description
    from scripts.package import build

    model = _save_model(folder.parent / "model_source" / "model.pt", references, input_spec)
    build(folder, model)
    assert read_description(folder / "models" / "model.pt") == read_description(model)
    metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    assert metadata["calibration"] == calibration(model)  # an export from this bundle carries the decisions
    image = metadata["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == read_description(model)["network"]["image_size"]
    return folder


@pytest.fixture(scope="module")
def volume(tiny_dataset, tmp_path_factory):
    """Twelve slices of a phantom volume with a lesion; the central six are scored."""
    folder = tmp_path_factory.mktemp("volume")
    source = nib.load(sorted((tiny_dataset / "volumes").glob("test_*_flair.nii.gz"))[-1])
    nib.save(source.slicer[:, :, 6:18], folder / "case_flair.nii.gz")
    return folder / "case_flair.nii.gz"


@pytest.fixture(scope="module")
def small_bundle(bundle_root, volume, tmp_path_factory):
    """A volume model's bundle, in the folder name MONAI Label serves."""
    return _bundle(bundle_root, tmp_path_factory.mktemp("bundle") / "aeflow_anomaly", [volume])


def _write_images(volume, folder, suffixes=(".png", ".jpg"), count=5):
    folder.mkdir(parents=True, exist_ok=True)
    data = np.asarray(nib.load(volume).dataobj, dtype=np.float32)
    data = (255 * (data - data.min()) / (data.max() - data.min())).astype(np.uint8)
    for suffix in suffixes:
        for k in range(count):
            PILImage.fromarray(data[:, 10:, data.shape[2] // 2 + k]).save(folder / f"{suffix[1:]}_slice_{k}{suffix}")
    return sorted(p for p in folder.iterdir() if p.suffix in suffixes)


@pytest.fixture(scope="module")
def image_bundle(bundle_root, volume, tmp_path_factory):
    """A 2D model's bundle (PNG and JPEG input) and a folder of such images with a datalist."""
    images = _write_images(volume, tmp_path_factory.mktemp("images"))
    root = _bundle(bundle_root, tmp_path_factory.mktemp("image_bundle") / "aeflow_anomaly", images, IMAGE_SPEC)
    items = [{"image": p.name, "label": k % 2} for k, p in enumerate(images)]
    datalist = {"training": items, "validation": items, "test": items}
    (images[0].parent / "datalist.json").write_text(json.dumps(datalist, indent=4))
    return root, images


def _workflow(bundle, configs, workflow_type, **override):
    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / name) for name in configs],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle),
        **override,
    )
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()


def _infer(bundle, input_dir, output_dir, **override):
    _workflow(bundle, ["inference.json"], "infer", dataset_dir=str(input_dir), output_dir=str(output_dir), **override)


@pytest.fixture(scope="module")
def nibabel_run(small_bundle, volume, tmp_path_factory):
    out = tmp_path_factory.mktemp("nibabel_out")
    _infer(small_bundle, volume.parent, out, input_glob="*.nii.gz")
    return out


def _csv(path):
    return list(csv.DictReader(open(path)))


def test_volume_inference_scores_the_central_slices_and_maps_them_on_the_input_grid(nibabel_run, volume):
    from scripts.preprocessing import central_slice_range

    original = nib.load(volume)
    scored = central_slice_range(original.shape[2], 0.5)
    rows = _csv(nibabel_run / "scores.csv")
    assert [int(r["name"].rsplit("=", 1)[1]) for r in rows] == list(scored)
    slice_scores = np.array([float(r["score"]) for r in rows])
    (volume_row,) = _csv(nibabel_run / "volume_scores.csv")
    report = json.loads((nibabel_run / "case_flair_scores.json").read_text())
    # the documented aggregation: a volume scores as its most anomalous scored slice, named in volume coordinates
    assert float(volume_row["score"]) == pytest.approx(slice_scores.max(), abs=1e-6) == report["score"]
    assert int(volume_row["max_slice"]) == scored[int(slice_scores.argmax())] == report["max_slice"]
    np.testing.assert_allclose(report["slice_scores"], slice_scores, rtol=1e-6)
    assert report["anomalous"] == (report["score"] >= report["threshold"])
    score_map = nib.load(nibabel_run / "case_flair_anomaly_map.nii.gz")
    mask = nib.load(nibabel_run / "case_flair_anomaly_mask.nii.gz")
    for saved in (score_map, mask):
        assert saved.shape[:3] == original.shape
        np.testing.assert_allclose(saved.affine, original.affine, atol=1e-4)
    values, mask = np.asarray(score_map.dataobj).squeeze(), np.asarray(mask.dataobj).squeeze()
    outside = [k for k in range(original.shape[2]) if k not in scored]
    assert np.isnan(values[..., outside]).all() and mask[..., outside].sum() == 0
    inside = values[..., scored.start : scored.stop]
    assert np.isfinite(inside).all()
    np.testing.assert_array_equal(mask[..., scored.start : scored.stop], inside > report["mask_threshold"])
    assert 0 < mask.sum() < inside.size  # the calibrated pixel threshold sits inside the map's range
    assert not (nibabel_run / ".partial").exists()


def test_itk_reader_gives_the_same_scores_and_grid(small_bundle, volume, nibabel_run, tmp_path):
    """A model whose input_spec names ITK reads the file with ITK; same weights, same scores."""
    model = tmp_path / "itk" / "model.pt"
    _save_model(model, [volume], {"kind": "volume", "reader": "ITKReader"})
    # in a forked child: ITK's teardown at interpreter exit takes minutes on a small CPU
    exit_code = run_forked(_infer, small_bundle, volume.parent, tmp_path / "out", model_file=str(model))
    assert exit_code == 0
    itk_scores = [float(r["score"]) for r in _csv(tmp_path / "out" / "scores.csv")]
    nib_scores = [float(r["score"]) for r in _csv(nibabel_run / "scores.csv")]
    np.testing.assert_allclose(itk_scores, nib_scores, atol=1e-4, rtol=1e-5)
    saved = nib.load(tmp_path / "out" / "case_flair_anomaly_map.nii.gz")
    assert saved.shape[:3] == nib.load(volume).shape
    np.testing.assert_allclose(saved.affine, nib.load(volume).affine, atol=1e-4)


def test_2d_png_and_jpeg_score_in_inference_exactly_as_in_evaluation(image_bundle, tmp_path):
    """No size, subnet or 2D override anywhere: both workflows take the network and preprocessing from the file.

    Evaluation runs one image per batch here, as inference does: oneDNN's convolutions round differently for
    other batch sizes (measured: 1.1e-5 on these scores with batches of 10), which is float32, not the pipeline.
    """
    bundle, images = image_bundle
    folder = images[0].parent
    _workflow(
        bundle,
        ["train.json", "evaluate.json"],
        "train",
        dataset_dir=str(folder),
        ckpt_dir=str(bundle / "models"),
        output_dir=str(tmp_path / "eval"),
        batch_size=1,
        encode_batch_size=1,
    )
    _infer(bundle, folder, tmp_path / "infer")
    _infer(bundle, folder, tmp_path / "infer_batched", batch_size=16)  # measured slower on the 2-core CPU, allowed
    evaluated = {r["name"]: float(r["score"]) for r in _csv(tmp_path / "eval" / "test_scores.csv")}
    inferred = {r["name"]: float(r["score"]) for r in _csv(tmp_path / "infer" / "scores.csv")}
    batched = {r["name"]: float(r["score"]) for r in _csv(tmp_path / "infer_batched" / "scores.csv")}
    assert sorted(evaluated) == sorted(inferred) == sorted(batched) == sorted(str(p) for p in images)
    for name, score in evaluated.items():
        assert inferred[name] == pytest.approx(score, abs=1e-5), name
        assert batched[name] == pytest.approx(score, abs=1e-4), name  # float32 rounding of other batch sizes
    threshold = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())["deployment_protocol"]["threshold"]
    for image in images:
        report = json.loads((tmp_path / "infer" / f"{image.stem}_scores.json").read_text())
        assert report["threshold"] == pytest.approx(threshold)
        assert report["anomalous"] == (evaluated[str(image)] >= threshold)  # the same decision
        for kind in ("map", "mask"):
            with PILImage.open(tmp_path / "infer" / f"{image.stem}_anomaly_{kind}.png") as written:
                assert written.size == PILImage.open(image).size  # on the input's grid, in its pixel order
    with PILImage.open(tmp_path / "infer" / f"{images[0].stem}_anomaly_mask.png") as mask:
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert not list((tmp_path / "infer").glob("*.nii.gz"))  # NIfTI for 2D input only when asked


def test_batched_inference_of_images_of_different_sizes_writes_each_on_its_own_grid(image_bundle, tmp_path):
    """A batch holds inputs of any size (each is resized for the network); the maps inverted onto the inputs' grids
    differ in size and are written per input, with the scores of one image per batch."""
    bundle, images = image_bundle
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k, image in enumerate(images[:3]):
        with PILImage.open(image) as source:
            source.resize((40 + 7 * k, 36 + 5 * k)).save(folder / f"size{k}.png")
    _infer(bundle, folder, tmp_path / "single")
    _infer(bundle, folder, tmp_path / "batched", batch_size=3)
    single = {r["name"]: float(r["score"]) for r in _csv(tmp_path / "single" / "scores.csv")}
    batched = {r["name"]: float(r["score"]) for r in _csv(tmp_path / "batched" / "scores.csv")}
    assert sorted(batched) == sorted(single) and len(batched) == 3
    for name, score in single.items():
        assert batched[name] == pytest.approx(score, abs=1e-4), name
    for k in range(3):
        with PILImage.open(tmp_path / "batched" / f"size{k}_anomaly_map.png") as written:
            assert written.size == (40 + 7 * k, 36 + 5 * k)


def test_folder_benchmark_scores_every_class_folder_of_a_split(image_bundle, tmp_path, monkeypatch):
    """``scripts.benchmark --folder SPLIT --input-glob "*/*.png"`` times the whole split, its class folders together,
    with the same scores at every setting."""
    from scripts import benchmark

    bundle, images = image_bundle
    split = tmp_path / "test"
    for k, image in enumerate([p for p in images if p.suffix == ".png"][:4]):
        class_folder = split / ("normal", "abnormal")[k % 2]
        class_folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, class_folder / image.name)
    monkeypatch.chdir(tmp_path)
    rows = benchmark.folder_inference(
        str(bundle / "models"), str(split), [(1, 0, "torch"), (2, 0, "torch")], tmp_path / "out", "*/*.png"
    )
    assert [row["images"] for row in rows] == [len(list(split.glob("*/*.png")))] * 2 and rows[0]["images"] >= 2
    assert rows[1]["max_score_difference"] <= 1e-4


def test_inference_batches_2d_images_by_default_only_on_onnx_runtime(image_bundle):
    """Measured on the 2-core CPU (docs/benchmarks.md): batches of 8 speed up ONNX Runtime's encoder and slow
    PyTorch's, so the default batch follows the runtime; volumes are scored one at a time either way. The default
    runtime, ``auto``, is ONNX Runtime on a CPU, in inference and evaluation alike."""
    bundle, _ = image_bundle
    for runtime, expected in ((None, 8), ("auto", 8), ("torch", 1), ("onnxruntime", 8)):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
        if runtime is not None:
            parser.update({"encoder_runtime": runtime})
        assert parser.get_parsed_content("batch_size") == expected
        network = parser.get_parsed_content("network_def")
        assert network.encoder.runtime_for("cpu") == ("torch" if runtime == "torch" else "onnxruntime")
    parser.update({"device": "$torch.device('cuda')", "encoder_runtime": "auto"})  # PyTorch on a GPU: one at a time
    assert parser.get_parsed_content("batch_size") == 1
    evaluation = ConfigParser()
    evaluation.read_config([str(bundle / "configs" / name) for name in ("train.json", "evaluate.json")])
    assert evaluation.get("encoder_runtime") == parser.get("encoder_runtime") == "auto"


def test_inference_with_a_zero_weight_term_left_out_writes_the_same_outputs(image_bundle, tmp_path):
    """A model whose validation chose beta 1 (the shipped Chest X-ray members did): inference leaves the decoder and
    the SSIM map out by default (``skip_unweighted_terms``) and writes the scores, maps and masks of the full
    computation exactly; only the unweighted term's column is NaN."""
    from scripts.model_file import network_from_file
    from scripts.package import build

    bundle, images = image_bundle
    network = network_from_file(bundle / "models" / "model.pt")
    network.scorer.set_beta(1.0)
    torch.save(network.state_dict(), tmp_path / "beta_1.pt")
    beta_1 = build(tmp_path / "aeflow_beta_1", tmp_path / "beta_1.pt")
    folder = tmp_path / "in"
    folder.mkdir()
    for image in images[:3]:
        shutil.copy(image, folder / image.name)
    _infer(beta_1, folder, tmp_path / "skipped")  # the default
    _infer(beta_1, folder, tmp_path / "full", skip_unweighted_terms=False)
    skipped, full = _csv(tmp_path / "skipped" / "scores.csv"), _csv(tmp_path / "full" / "scores.csv")
    assert [(r["name"], r["score"], r["score_flow"]) for r in skipped] == [
        (r["name"], r["score"], r["score_flow"]) for r in full
    ]
    assert all(r["score_recon"] == "nan" for r in skipped) and all(r["score_recon"] != "nan" for r in full)
    for image in images[:3]:
        for name in (f"{image.stem}_scores.json", f"{image.stem}_anomaly_map.png", f"{image.stem}_anomaly_mask.png"):
            assert (tmp_path / "skipped" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def test_inputs_whose_outputs_would_collide_are_refused(image_bundle, tmp_path):
    bundle, images = image_bundle
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(images[0], inputs / "same.png")
    shutil.copy(images[-1], inputs / "same.jpg")
    messages = _raised_messages(_infer, bundle, inputs, tmp_path / "out")
    assert any("would write outputs of the same name (same_*)" in m for m in messages), messages
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_a_setting_that_contradicts_the_model_file_is_refused_naming_both_values(small_bundle, volume, tmp_path):
    messages = _raised_messages(_infer, small_bundle, volume.parent, tmp_path / "out", image_size=128, subnet="cnn2")
    assert any("image_size: the model file has [64, 64], this run asks for 128" in m for m in messages), messages
    assert any("subnet: the model file has 'resnet', this run asks for 'cnn2'" in m for m in messages), messages
    # settings stored in the input_spec, and those beside the architecture, are compared as well
    overrides = {
        "feature_norm": "layernorm",
        "slice_axis": 0,
        "image_intensity": {"mode": "range", "a_min": 0, "a_max": 1},
    }
    messages = _raised_messages(_infer, small_bundle, volume.parent, tmp_path / "out", **overrides)
    for line in ("feature_norm: the model file has 'none'", "slice_axis: the model file has 2", "image_intensity: the"):
        assert any(line in m for m in messages), (line, messages)
    _infer(small_bundle, volume.parent, tmp_path / "agreeing", image_size=64, flow_blocks=2)  # agreeing is fine


def test_a_model_file_from_before_self_description_is_explained_and_can_be_converted(small_bundle, volume, tmp_path):
    from scripts import model_file

    old = tmp_path / "old" / "model.pt"
    old.parent.mkdir()
    state = torch.load(small_bundle / "models" / "model.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "_extra_state"}, old)
    messages = _raised_messages(_infer, small_bundle, volume.parent, tmp_path / "out", ckpt_dir=str(old.parent))
    assert any(
        "saved before model files described themselves" in m and "scripts.model_file upgrade" in m for m in messages
    )
    new = tmp_path / "new" / "model.pt"
    configs = [str(small_bundle / "configs" / "train.json")]
    sets = ["image_size=64", "flow_blocks=2", "beta_selection='fixed'", "feature_norm='none'"]
    assert model_file.main(["upgrade", str(old), "--output", str(new), "--config_file", *configs, "--set", *sets]) == 0
    assert model_file.read_description(new)["network"]["image_size"] == [64, 64]
    converted = torch.load(new, weights_only=True)
    for key, value in state.items():
        if key != "_extra_state":
            torch.testing.assert_close(converted[key], value, equal_nan=True, msg=key)
    wrong = ["image_size=128"]  # a wrong config is refused, not guessed
    assert (
        model_file.main(
            ["upgrade", str(old), "--output", str(tmp_path / "x.pt"), "--config_file", *configs, "--set", *wrong]
        )
        == 2
    )


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
    messages = _raised_messages(_infer, small_bundle, inputs, out, input_glob="*.nii.gz")
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


# ---- MONAI Deploy: MonaiBundleInferenceOperator (App SDK 4.0.0), replayed step by step, then the app itself ----


def _deploy_parser(bundle):
    """``_read_directory_bundle_config``: metadata as ``_meta_``, the inference config, no bundle_root override."""
    parser = ConfigParser()
    parser.read_meta(f=json.loads((bundle / "configs" / "metadata.json").read_text()))
    parser.read_config([bundle / "configs" / "inference.json"])
    parser["bundle_root"] = str(bundle)
    parser.parse()
    return parser


def _deploy_filter(compose, disallowed=("LoadImage", "SaveImage")):
    compose.transforms = tuple(t for t in compose.transforms if not any(d in type(t).__name__ for d in disallowed))
    return compose


def _deploy_run(bundle, path):
    """The operator's steps on ``path``: the uint8 array it emits on ``pred``, and the postprocessing's dict."""
    from scripts.deploy import read_input
    from scripts.model_file import read_description

    parser = _deploy_parser(bundle)
    meta = parser["_meta_"]
    device = parser.get_parsed_content("device")
    inferer = parser.get_parsed_content("inferer")
    preprocessing = _deploy_filter(parser.get_parsed_content("preprocessing"))
    postprocessing = _deploy_filter(parser.get_parsed_content("postprocessing"))
    network = parser.get_parsed_content("network_def").to(device)  # no model.ts: the eager network from model.pt
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    network.eval()
    input_name, output_name = next(iter(meta["network_data_format"]["inputs"])), next(
        iter(meta["network_data_format"]["outputs"])
    )
    array, image_meta = read_input(path, read_description(bundle / "models" / "model.pt")["input_spec"])
    inputs = {input_name: MetaTensor.ensure_torch_and_prune_meta(torch.as_tensor(array), image_meta)}
    with torch.no_grad():
        inputs = preprocessing(inputs)
        first = inputs[input_name]
        outputs = inferer(inputs=first[None].float().to(device), network=network)
        post = {output_name: ensure_tuple(outputs)[0]}  # only the first output, still batched
        post.update(inputs)
        post = postprocessing(post)
    value = post[output_name].cpu().numpy()  # AnomalyScoresd has dropped the batch axis: (1, H, W, D)
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
    bundle_report = json.loads((nibabel_run / "case_flair_scores.json").read_text())
    np.testing.assert_allclose(post["scores"]["slice_scores"], bundle_report["slice_scores"], atol=1e-5)
    saved_map = np.asarray(nib.load(nibabel_run / "case_flair_anomaly_map.nii.gz").dataobj).squeeze()
    np.testing.assert_allclose(np.asarray(post["anomaly_map"])[0], saved_map, atol=1e-5, equal_nan=True)


def _run_app(bundle_root, bundle, input_dir, out):
    import runpy
    import sys

    sys.argv = ["app", "-i", str(input_dir), "-o", str(out), "-m", str(bundle)]
    app_globals = runpy.run_path(str(bundle_root / "deploy" / "app" / "app.py"), run_name="aeflow_app")
    app_globals["AEFlowAnomalyApp"]().run()


def test_deploy_app_scores_a_volume_as_the_bundle_does(small_bundle, volume, nibabel_run, tmp_path, bundle_root):
    pytest.importorskip("monai.deploy.core", reason="MONAI Deploy App SDK not installed (.ci/run installs it)")
    assert run_forked(_run_app, bundle_root, small_bundle, volume.parent, tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "case_flair_scores.json").read_text())
    expected = json.loads((nibabel_run / "case_flair_scores.json").read_text())
    np.testing.assert_allclose(report["slice_scores"], expected["slice_scores"], atol=1e-5)
    assert report["max_slice"] == expected["max_slice"] and report["anomalous"] == expected["anomalous"]
    # the app runs in a one-thread child: its float32 convolutions round a little differently (measured 2e-4 on
    # map values of about 5), so a mask voxel may flip only where the map is that close to the threshold
    app_map, bundle_map = (
        np.asarray(nib.load(o / "case_flair_anomaly_map.nii.gz").dataobj) for o in (tmp_path / "out", nibabel_run)
    )
    np.testing.assert_allclose(app_map, bundle_map, atol=1e-3, rtol=1e-4, equal_nan=True)
    app_mask, bundle_mask = (
        np.asarray(nib.load(o / "case_flair_anomaly_mask.nii.gz").dataobj) for o in (tmp_path / "out", nibabel_run)
    )
    near = np.abs(np.nan_to_num(bundle_map, nan=-np.inf) - expected["mask_threshold"]) < 1e-3
    np.testing.assert_array_equal(app_mask[~near], bundle_mask[~near])


def _app_scores_one_image_as_the_bundle(bundle_root, bundle, image, tmp_path, atol=1e-5, app_bundle=None):
    """The Deploy app (on ``app_bundle``, default ``bundle``) on one 2D image against the bundle's own inference:
    the same score, and map and mask PNGs within one grey level; returns the bundle's report."""
    single = tmp_path / "in"
    single.mkdir()
    shutil.copy(image, single / image.name)
    _infer(bundle, single, tmp_path / "bundle_out")
    assert run_forked(_run_app, bundle_root, app_bundle or bundle, single, tmp_path / "app_out") == 0
    report = json.loads((tmp_path / "app_out" / f"{image.stem}_scores.json").read_text())
    expected = json.loads((tmp_path / "bundle_out" / f"{image.stem}_scores.json").read_text())
    assert report["score"] == pytest.approx(expected["score"], abs=atol)
    for kind in ("map", "mask"):
        app_png = np.asarray(PILImage.open(tmp_path / "app_out" / f"{image.stem}_anomaly_{kind}.png"))
        bundle_png = np.asarray(PILImage.open(tmp_path / "bundle_out" / f"{image.stem}_anomaly_{kind}.png"))
        assert np.abs(app_png.astype(int) - bundle_png.astype(int)).max() <= 1, kind
    return expected


def test_deploy_app_scores_a_2d_image_as_the_bundle_does(image_bundle, tmp_path, bundle_root):
    pytest.importorskip("monai.deploy.core", reason="MONAI Deploy App SDK not installed (.ci/run installs it)")
    bundle, images = image_bundle
    _app_scores_one_image_as_the_bundle(bundle_root, bundle, images[0], tmp_path)


def test_deploy_app_runs_with_only_the_packages_its_requirements_install(image_bundle, tmp_path, bundle_root):
    """A MAP installs deploy/app/requirements.txt and nothing else: the app, run in a fresh interpreter that can
    import only those packages and their dependencies, scores a 2D image as the bundle's own inference does
    (bundle 0.15.0's MAP lacked scikit-learn, which scripts.deploy imports through the scorer)."""
    import subprocess
    import sys

    pytest.importorskip("monai.deploy.core", reason="MONAI Deploy App SDK not installed (.ci/run installs it)")
    bundle, images = image_bundle
    single = tmp_path / "in"
    single.mkdir()
    shutil.copy(images[0], single / images[0].name)
    _infer(bundle, single, tmp_path / "bundle_out")
    driver = bundle_root / "tests" / "deploy_app_with_only_its_requirements.py"
    args = ["-i", str(single), "-o", str(tmp_path / "app_out"), "-m", str(bundle)]
    done = subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "app_out" / f"{images[0].stem}_scores.json").read_text())
    expected = json.loads((tmp_path / "bundle_out" / f"{images[0].stem}_scores.json").read_text())
    assert report["score"] == pytest.approx(expected["score"], abs=1e-4)


def test_deploy_app_reads_files_with_the_bundles_checks_and_writes_what_its_inference_json_asks(
    image_bundle, tmp_path, bundle_root
):
    """The app's reader is the bundle's (a 16-bit image beyond an 8-bit fixed range is refused, not scored as white)
    and its report writer takes the packaged inference.json's write_nifti_for_2d (bundle 0.15.0 ignored it)."""
    from scripts.deploy import read_input
    from scripts.inputs import BadInputError

    pytest.importorskip("monai.deploy.core", reason="MONAI Deploy App SDK not installed (.ci/run installs it)")
    deep = tmp_path / "deep.png"
    PILImage.fromarray(np.tile(np.arange(0, 64000, 1000, dtype=np.uint16), (64, 1))).save(deep)
    with pytest.raises(Exception, match="clip it to white") as refused:
        read_input(deep, {"kind": "image", "intensity": {"mode": "range", "a_min": 0, "a_max": 255}})
    assert isinstance(refused.value, BadInputError) or isinstance(refused.value.__cause__, BadInputError)
    bundle, images = image_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    settings = json.loads((copy / "configs" / "inference.json").read_text())
    (copy / "configs" / "inference.json").write_text(json.dumps({**settings, "write_nifti_for_2d": True}, indent=4))
    single = tmp_path / "in"
    single.mkdir()
    shutil.copy(images[0], single / images[0].name)
    assert run_forked(_run_app, bundle_root, copy, single, tmp_path / "app_out") == 0
    written = sorted(p.name for p in (tmp_path / "app_out").iterdir())
    for kind in ("map", "mask"):
        assert (
            f"{images[0].stem}_anomaly_{kind}.png" in written and f"{images[0].stem}_anomaly_{kind}.nii.gz" in written
        )


def test_deploy_app_scores_an_ensemble_model_as_the_bundle_does(image_bundle, tmp_path, bundle_root):
    """An ensemble file (``scripts.ensemble``) packaged like any model: the app and the bundle score the mean of
    the members' calibrated scores."""
    pytest.importorskip("monai.deploy.core", reason="MONAI Deploy App SDK not installed (.ci/run installs it)")
    from scripts.engines import AnomalyInferer
    from scripts.ensemble import ensemble_of
    from scripts.package import build
    from scripts.preprocessing import input_transforms

    bundle, images = image_bundle
    members = [bundle / "models" / "model.pt", _save_model(tmp_path / "second" / "model.pt", images, IMAGE_SPEC, 1)]
    ensemble = ensemble_of(members).eval()
    _set_thresholds(ensemble, images)
    torch.save(ensemble.state_dict(), tmp_path / "ensemble_source.pt")
    ensemble_bundle = build(tmp_path / "aeflow_ensemble", tmp_path / "ensemble_source.pt")
    expected = _app_scores_one_image_as_the_bundle(bundle_root, ensemble_bundle, images[0], tmp_path)
    preprocessing = input_transforms(ensemble.input_spec, ensemble.image_size, ensemble.in_channels)
    image = preprocessing({"image": str(images[0])})["image"][None]
    with torch.no_grad():
        scores = [float(AnomalyInferer().score(image, member)["score"]) for member in ensemble.members]
    assert scores[0] != pytest.approx(scores[1], abs=1e-3)  # two different detectors
    assert expected["score"] == pytest.approx(sum(scores) / 2, abs=1e-5)


@pytest.mark.parametrize("runtime", ["auto", "torch"])
def test_deploy_app_runs_the_packaged_encoder_runtime(image_bundle, tmp_path, bundle_root, capfd, runtime):
    """``scripts.package --encoder-runtime``: with ``auto`` (the default) the app's encoder runs on ONNX Runtime on
    this CPU, as the bundle's inference does; with ``torch`` on PyTorch, its scores within ONNX Runtime's 1e-4."""
    pytest.importorskip("monai.deploy.core", reason="MONAI Deploy App SDK not installed (.ci/run installs it)")
    from scripts.package import build

    bundle, images = image_bundle
    app_bundle = build(tmp_path / f"aeflow_{runtime}", bundle / "models" / "model.pt", encoder_runtime=runtime)
    assert json.loads((app_bundle / "configs" / "inference.json").read_text())["encoder_runtime"] == runtime
    app_out = tmp_path / "app"
    app_out.mkdir()
    capfd.readouterr()
    _app_scores_one_image_as_the_bundle(bundle_root, bundle, images[0], app_out, atol=1e-4, app_bundle=app_bundle)
    exports = "".join(capfd.readouterr()).count("exported to ONNX Runtime")
    assert exports == (2 if runtime == "auto" else 1)  # the bundle's own inference, then the app's unless torch
    with pytest.raises(ValueError, match="encoder_runtime must be one of"):
        build(tmp_path / "refused", bundle / "models" / "model.pt", encoder_runtime="tensorrt")
    assert not (tmp_path / "refused").exists()


# ---- MONAI Label: monaibundle app, BundleInferTask (0.8.5), replayed (tests/test_monai_label.py runs a server) ----


def test_monai_label_bundle_contract(small_bundle, volume, nibabel_run):
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
    assert (key_image, key_pred, labels) == ("image", "pred", {"anomaly": 1})  # the runtime bundle's metadata

    pre = list(config.get_parsed_content("preprocessing", instantiate=True).transforms)
    assert not any(isinstance(t, LoadImaged) for t in pre)  # Label would swap LoadImaged; the strict loader stays
    post = list(config.get_parsed_content("postprocessing", instantiate=True).transforms)
    post = [t for t in post if not isinstance(t, SaveImaged)]  # Label's post_filter
    data = Compose(pre)({key_image: str(volume)})
    with torch.no_grad():
        data[key_pred] = config.get_parsed_content("inferer")(data[key_image][None], network)[0]
    data = Compose(post)(data)
    mask = np.asarray(data[key_pred])
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert mask.shape[1:] == nib.load(volume).shape  # restored to the study's grid
    bundle_mask = np.asarray(nib.load(nibabel_run / "case_flair_anomaly_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(mask[0], bundle_mask)


def test_application_package_version_is_the_bundles(bundle_root):
    """The MAP description (deploy/app/app.yaml) names the bundle version that metadata.json releases."""
    import yaml

    application = yaml.safe_load((bundle_root / "deploy" / "app" / "app.yaml").read_text())["application"]
    metadata = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    assert str(application["version"]) == metadata["version"]


@pytest.mark.parametrize("reverse_indexing", [True, False])
def test_written_png_holds_the_map_exactly_in_the_inputs_pixel_order(reverse_indexing):
    """Fast zlib level, same pixels: PNG is lossless, whatever the compression level."""
    import io

    from scripts.deploy import _png_bytes

    rendered = np.random.default_rng(0).integers(0, 256, size=(37, 53), dtype=np.uint8)
    written = np.asarray(
        PILImage.open(io.BytesIO(_png_bytes(rendered, {"reader_args": {"reverse_indexing": reverse_indexing}})))
    )
    np.testing.assert_array_equal(written, rendered.T if reverse_indexing else rendered)


def test_inference_outputs_are_readable_as_any_new_file_is(tmp_path):
    """Outputs are staged in mkstemp files (0600) and renamed: each gets the mode a plain open would give it, so a
    PACS reader or a MAP consumer under another user can read them."""
    import os

    from scripts.deploy import _atomic_files

    previous = os.umask(0o022)
    try:
        written = _atomic_files(tmp_path / "out", {"a_scores.json": b"{}", "a_anomaly_map.png": b"x"})
    finally:
        os.umask(previous)
    assert {name: path.stat().st_mode & 0o777 for name, path in written.items()} == {
        "a_scores.json": 0o644,
        "a_anomaly_map.png": 0o644,
    }
