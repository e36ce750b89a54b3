"""Bad input stops early, with an error that names the file or the config key and what is allowed."""

from __future__ import annotations

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


def test_missing_dataset_dir_is_named(bundle_root, tmp_path):
    with pytest.raises(Exception, match="does_not_exist.*does not exist"):
        _initialize(bundle_root, dataset_dir=str(tmp_path / "does_not_exist"))


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
    with pytest.raises(Exception, match=match):
        _initialize(bundle_root, dataset_dir=str(tiny_dataset), **{key: value})


def test_corrupt_image_is_named(bundle_root, tiny_dataset, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(tiny_dataset, broken)
    victim = sorted((broken / "volumes").glob("training_000_flair.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated download
    workflow = _initialize(
        bundle_root, dataset_dir=str(broken), ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "e")
    )
    with pytest.raises(Exception) as error:
        workflow.run()
    text = "".join(str(e) for e in _chain(error.value))
    assert "training_000_flair.nii.gz" in text


def test_missing_image_in_datalist_is_named(bundle_root, tiny_dataset, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(tiny_dataset, broken)
    (broken / "volumes" / "validation_001_flair.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="validation_001_flair.nii.gz"):
        _initialize(bundle_root, dataset_dir=str(broken))


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
