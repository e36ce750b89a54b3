"""Fault injection on input images: every bad file is refused with its path and the reason, or (with
``skip_bad_inputs``) left out and listed; a hypothesis fuzz drives the loader with malformed arrays and files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from monai.bundle import ConfigWorkflow
from PIL import Image
from scripts.inputs import FLOAT32_MAX, BadInputError, screen_items
from scripts.transforms import SelectSliced, StrictLoadImaged

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _nifti(path: Path, array) -> str:
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), path)
    return str(path)


def _load(path, reader="NibabelReader", **kwargs):
    return StrictLoadImaged("image", reader=reader, **kwargs)({"image": str(path)})["image"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """One valid file per format, the seeds of the truncation fuzz."""
    root = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    image = (rng.random((16, 16)) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "image.png")
    Image.fromarray(image).save(root / "image.jpg", quality=90)
    _nifti(root / "volume.nii.gz", rng.random((8, 8, 4)).astype(np.float32))
    _nifti(root / "volume.nii", rng.random((8, 8, 4)).astype(np.float32))
    return {path.suffix if path.suffix != ".gz" else ".nii.gz": path for path in root.iterdir()}


@pytest.mark.parametrize(
    "array,reason",
    [
        (np.full((8, 8, 4), np.nan, np.float32), r"non-finite voxels \(256 NaN, 0 Inf\)"),
        (np.where(np.eye(8)[..., None] > 0, np.inf, 1.0).repeat(4, 2).astype(np.float32), r"\(0 NaN, 32 Inf\)"),
        (np.full((8, 8, 4), 7.0, np.float32), "the image is constant"),
        (np.linspace(-3e38, 3e38, 256, dtype=np.float32).reshape(8, 8, 4), "overflows float32"),
        (np.linspace(-1e300, 1e300, 256).reshape(8, 8, 4), "non-finite"),  # float64 beyond float32: Inf on load
    ],
    ids=["nan", "inf", "constant", "extreme-range", "beyond-float32"],
)
def test_bad_voxels_are_refused_naming_the_file(tmp_path, array, reason):
    path = _nifti(tmp_path / "case.nii.gz", array)
    with pytest.raises(BadInputError, match=f"^{path}: .*{reason}"):
        _load(path)


def test_bad_paths_are_refused_naming_the_file(tmp_path, good):
    empty = tmp_path / "empty.nii.gz"
    empty.touch()
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    escaping = root / "link.nii.gz"
    escaping.symlink_to(good[".nii.gz"])  # inside the root by name, outside it in fact
    cases = [
        (empty, {}, "the file is empty"),
        (folder, {}, "a directory where an image file is expected"),
        (tmp_path / "missing.nii.gz", {}, "the file does not exist"),
        (good[".nii.gz"], {"data_root": str(root)}, "outside the data root"),
        (escaping, {"data_root": str(root)}, "outside the data root"),
        (tmp_path / "volume.xyz", {"reader": None}, "(no MONAI image reader supports|cannot be read with ITKReader)"),
    ]
    (tmp_path / "volume.xyz").write_bytes(b"not an image")
    for path, kwargs, reason in cases:
        with pytest.raises(BadInputError, match=f"{path.name}: .*{reason}"):
            _load(path, **kwargs)


def test_reader_none_does_not_fall_back_to_another_reader(tmp_path, good):
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good[".nii.gz"].read_bytes()[:200])
    with pytest.raises(BadInputError, match="truncated.nii.gz: cannot be read with NibabelReader"):
        _load(truncated, reader=None)
    assert _load(good[".png"], reader=None).shape[:2] == (16, 16)


def _outcome_is_clean(path, call):
    """Either a usable image comes back, or a BadInputError that starts with the file's path."""
    try:
        image = call()
    except BadInputError as error:
        assert str(error).startswith(str(path)), str(error)
        return None
    data = torch.as_tensor(image)
    assert torch.isfinite(data).all() and data.min() < data.max()
    return data


@FUZZ
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int16, np.uint8]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
        elements={"allow_nan": True, "allow_infinity": True},
    )
)
def test_fuzz_malformed_arrays(tmp_path, array):
    path = tmp_path / "fuzz.nii.gz"
    try:
        _nifti(path, array)
    except Exception:  # nibabel itself refuses some shapes and dtypes: nothing reaches the loader then
        return
    data = _outcome_is_clean(path, lambda: _load(path))
    with np.errstate(over="ignore", invalid="ignore"):
        loaded = array.astype(np.float32)  # what LoadImage hands over
        usable = array.ndim >= 2 and array.size > 0 and bool(np.isfinite(loaded).all())
        usable = usable and loaded.min() < loaded.max() and float(loaded.max()) - float(loaded.min()) <= FLOAT32_MAX
    assert (data is not None) == usable, f"{array.dtype} array of shape {array.shape}: loaded={data is not None}"
    if data is not None and data.ndim == 3:  # wrong dimensionality for slicing: named, never silent
        with pytest.raises(ValueError, match="channel-first 3D volume"):
            SelectSliced("image")({"image": data[None][..., 0], "slice": 0})


@FUZZ
@given(
    suffix=st.sampled_from([".png", ".jpg", ".nii.gz", ".nii"]), cut=st.floats(0.0, 1.0), noise=st.binary(max_size=64)
)
def test_fuzz_truncated_and_garbled_files(tmp_path, good, suffix, cut, noise):
    data = good[suffix].read_bytes()
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data[: int(len(data) * cut)] + noise)
    _outcome_is_clean(path, lambda: _load(path, reader=None))


def test_screening_fails_fast_by_default_and_skips_and_lists_on_request(tmp_path, good):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"")
    items = [{"image": str(good[".nii.gz"]), "slice": 0}, {"image": str(bad), "slice": 0}]
    with pytest.raises(BadInputError, match="bad.nii.gz: the file is empty"):
        screen_items(items)
    report = tmp_path / "bad_inputs.json"
    kept = screen_items(items, skip_bad_inputs=True, report_file=str(report))
    assert kept == items[:1]
    assert list(json.loads(report.read_text())["bad_files"]) == [str(bad)]
    screen_items(items[:1], skip_bad_inputs=True, report_file=str(report))  # a clean run replaces the old report
    assert json.loads(report.read_text()) == {"skipped_items": 0, "bad_files": {}}


def test_training_config_skips_and_lists_a_corrupt_volume(bundle_root, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    victim = data / "volumes" / "training_000_flair.nii.gz"
    victim.write_bytes(victim.read_bytes()[:300])
    gone = data / "volumes" / "training_001_flair.nii.gz"  # a missing file is skipped and listed too
    gone.unlink()
    workflow = ConfigWorkflow(
        config_file=str(bundle_root / "configs" / "train.json"),
        workflow_type="train",
        bundle_root=str(bundle_root),
        dataset_dir=str(data),
        output_dir=str(tmp_path / "eval"),
        ckpt_dir=str(tmp_path / "models"),
        skip_bad_inputs=True,
        **TINY_OVERRIDES,
    )
    workflow.initialize()
    train_items = workflow.parser.get_parsed_content("train#checked_data")
    assert train_items and not {item["image"] for item in train_items} & {str(victim), str(gone)}
    report = json.loads((tmp_path / "eval" / "train_bad_inputs.json").read_text())
    assert sorted(report["bad_files"]) == [str(victim), str(gone)] and report["skipped_items"] > 0
    assert "the file does not exist" in report["bad_files"][str(gone)]


def test_evaluation_lists_the_test_splits_bad_inputs_in_its_own_report(bundle_root):
    """Evaluation screens the test split; its report must not overwrite training's validation report."""
    from scripts.options import config_parser

    configs = [str(bundle_root / "configs" / name) for name in ("train.json", "evaluate.json")]
    parser = config_parser(configs, {"output_dir": "/out"})
    assert parser.get_parsed_content("validate#checked_data#report_file") == "/out/test_bad_inputs.json"
    assert parser.get_parsed_content("validate#data#split") == "test"
    train = config_parser(configs[:1], {"output_dir": "/out"})
    assert train.get_parsed_content("validate#checked_data#report_file") == "/out/validate_bad_inputs.json"
