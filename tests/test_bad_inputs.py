"""Bad input stops early, with an error that names the file or the config key and what is allowed."""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import TINY_OVERRIDES
from monai.bundle import ConfigWorkflow


def _initialize(bundle_root, **override):
    workflow = ConfigWorkflow(
        config_file=str(bundle_root / "configs" / "train.json"),
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        logging_file=str(bundle_root / "configs" / "logging.conf"),
        workflow_type="train",
        bundle_root=str(bundle_root),
        **{**TINY_OVERRIDES, **override},
    )
    workflow.initialize()  # the bundle validates network, loss and data list here, before any data is cached
    return workflow


def _assert_raises_naming(pattern: str, call, *args, **kwargs):
    """MONAI wraps a component's error in "Failed to instantiate component"; the user reads the whole chain."""
    with pytest.raises(Exception) as error:
        call(*args, **kwargs)
    messages = [str(e) for e in _chain(error.value)]
    assert any(re.search(pattern, m) for m in messages), messages


def test_missing_dataset_dir_is_named(bundle_root, tmp_path):
    _assert_raises_naming(
        "does_not_exist' does not exist", _initialize, bundle_root, dataset_dir=str(tmp_path / "does_not_exist")
    )


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("encoder", "resnet18", "Unknown encoder 'resnet18'; allowed values: wide_resnet50_2"),
        ("subnet", "unet", "Unknown flow subnet 'unet'; allowed values: cnn2, resnet"),
        ("alpha", 1.5, r"alpha must lie in \[0, 1\]"),
        ("beta", -0.2, r"beta must lie in \[0, 1\]"),
        ("image_size", 100, "image_size \\[100, 100\\] cannot be reduced to a whole feature map"),
        ("recon_loss", "l1", "Unknown recon_loss 'l1'; allowed: mse, ssim"),
    ],
)
def test_bad_overrides_name_the_key_and_allowed_values(bundle_root, tiny_dataset, key, value, match):
    _assert_raises_naming(match, _initialize, bundle_root, dataset_dir=str(tiny_dataset), **{key: value})


def test_corrupt_image_is_named(bundle_root, tiny_dataset, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(tiny_dataset, broken)
    victim = sorted((broken / "volumes").glob("training_000_flair.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated download
    workflow = _initialize(
        bundle_root, dataset_dir=str(broken), ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "e")
    )
    _assert_raises_naming("training_000_flair.nii.gz", workflow.run)


def test_missing_image_in_datalist_is_named(bundle_root, tiny_dataset, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(tiny_dataset, broken)
    (broken / "volumes" / "validation_001_flair.nii.gz").unlink()
    _assert_raises_naming(
        "validation_001_flair.nii.gz.*do not exist|do not exist.*validation_001",
        _initialize,
        bundle_root,
        dataset_dir=str(broken),
    )


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_an_almost_blank_volume_is_refused_not_passed_on_unscaled(tmp_path):
    """Under 0.5 % non-background voxels: both percentiles are 0, and MONAI would pass raw intensities (57-394)
    to a network trained on [0, 1]."""
    import nibabel as nib
    import numpy as np
    from monai.transforms import Compose
    from scripts.inputs import BadInputError
    from scripts.preprocessing import item_transforms

    volume = np.zeros((64, 64, 32), np.float32)
    volume[30:33, 30:33, 10:20] = np.linspace(57, 394, 90).reshape(3, 3, 10)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "sparse.nii.gz")
    prepare = Compose(item_transforms({"kind": "volume"}, 32, 1))
    with pytest.raises(Exception) as refused:
        prepare({"image": str(tmp_path / "sparse.nii.gz"), "slice": 16})
    error = refused.value
    while not isinstance(error, BadInputError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, BadInputError), refused.value
    assert str(error).startswith(str(tmp_path / "sparse.nii.gz")) and "percentiles are both 0" in str(error)
    volume[16:48, 16:48, 8:24] = 100.0  # a volume with an object is scaled into [0, 1] as before
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "object.nii.gz")
    image = prepare({"image": str(tmp_path / "object.nii.gz"), "slice": 16})["image"]
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
