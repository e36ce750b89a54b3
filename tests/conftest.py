"""Shared fixtures: a tiny synthetic data set in the bundle's datalist form, and the bundle's paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SHARED = BUNDLE_ROOT.parent / "shared"
sys.path.insert(0, str(BUNDLE_ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

# Settings that keep a whole train -> evaluate -> infer cycle to seconds on two CPU cores.
TINY_OVERRIDES = {"image_size": 64, "epochs": 1, "batch_size": 8, "num_workers": 0, "flow_blocks": 2}


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE_ROOT


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Five small phantom volumes (3 healthy for training, 1 + 1 for validation and test), every 4th slice."""
    from scripts.synthetic import prepare_default_dataset

    root = tmp_path_factory.mktemp("tiny_synthetic")
    prepare_default_dataset(
        root,
        seed=7,
        splits={"training": (3, 0), "validation": (1, 1), "test": (1, 1)},
        shape=(48, 48, 24),
        slice_step=2,
    )
    return root
