"""The embedded default data set: deterministic synthetic brain-like MRI volumes, some with lesions.

It lets ``python -m monai.bundle run training`` work on a fresh machine with no data: the bundle writes NIfTI
volumes with segmentations and a slice-level MONAI datalist, then its own 3D-to-2D transforms slice them. It is
a smoke-test world, not a benchmark: lesions are bright FLAIR-like blobs in a textured head phantom.

>>> datalist = prepare_default_dataset("/tmp/aeflow_synthetic")  # doctest: +SKIP
>>> sorted(datalist)
['test', 'training', 'validation']
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from .preprocessing import central_slice_range

logger = logging.getLogger(__name__)

SHAPE = (96, 96, 48)  # H, W, D (axial slices along the last axis)
SPACING = (2.0, 2.0, 3.0)
CENTRAL_FRACTION = 0.5  # the paper keeps the central portion of each volume; train.json's slice_fraction
SPLITS = {"training": (8, 0), "validation": (3, 3), "test": (4, 4)}  # (healthy, with lesion) volumes
PNG_SPLITS = {"training": (24, 0), "validation": (5, 5), "test": (8, 8)}
DATALIST_NAME = "datalist.json"
DATASET_VERSION = 2


def _ellipsoid(grid, center, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii))


def synthetic_volume(rng: np.random.Generator, lesion: bool, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """One head phantom (float32, arbitrary MR-like units) and its lesion mask (uint8)."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    center = np.array(shape, dtype=np.float32) / 2 + rng.normal(0, 1.0, 3)
    scale = np.array(shape, dtype=np.float32) / np.array(SHAPE, dtype=np.float32)
    head_radii = np.array([40.0, 34.0, 26.0]) * scale * rng.uniform(0.92, 1.05, 3)
    head = _ellipsoid(grid, center, head_radii)
    brain = _ellipsoid(grid, center, head_radii * 0.88)
    white = _ellipsoid(grid, center, head_radii * 0.55)
    texture = gaussian_filter(rng.normal(0, 1, shape), sigma=2.0).astype(np.float32)
    volume = np.zeros(shape, np.float32)
    volume[head <= 1] = 220.0  # skull and scalp
    volume[brain <= 1] = 110.0 + 18.0 * texture[brain <= 1]  # grey matter
    volume[white <= 1] = 140.0 + 10.0 * texture[white <= 1]  # white matter
    for side in (-1, 1):  # lateral ventricles
        offset = center + np.array([side * 6.0, 2.0, 0.0]) * scale
        volume[_ellipsoid(grid, offset, head_radii * np.array([0.1, 0.25, 0.3])) <= 1] = 30.0
    mask = np.zeros(shape, np.uint8)
    if lesion:
        radius = rng.uniform(4.0, 8.0, 3) * np.array([1.0, 1.0, 0.7]) * scale
        for _ in range(100):  # a centre well inside the brain and within the central slices kept
            spot = center + rng.uniform(-0.5, 0.5, 3) * head_radii * np.array([1.0, 1.0, 0.6])
            if _ellipsoid([np.array(s) for s in spot], center, head_radii * 0.75) < 1:
                break
        blob = _ellipsoid(grid, spot, radius) + 0.4 * gaussian_filter(rng.normal(0, 1, shape), 1.5)
        mask[(blob <= 1) & (brain <= 1)] = 1
        volume[mask == 1] = 230.0 + 15.0 * texture[mask == 1]
    volume *= rng.uniform(0.85, 1.15)  # scanner gain
    volume += rng.normal(0, 4.0, shape).astype(np.float32)
    return np.clip(volume, 0, None).astype(np.float32), mask


def _slice_items(image: str, mask: np.ndarray) -> list[dict]:
    return [
        {"image": image, "slice": k, "label": int(mask[:, :, k].any())}
        for k in central_slice_range(mask.shape[2], CENTRAL_FRACTION)
    ]


def prepare_default_dataset(
    dataset_dir: str | os.PathLike, seed: int = 20230301, splits: dict = SPLITS, shape=SHAPE, slice_step: int = 2
) -> dict:
    """Write the volumes and ``datalist.json`` once (idempotent); return the datalist.

    Images are stored relative to ``dataset_dir`` in the datalist, as MONAI's ``load_decathlon_datalist`` expects.
    """
    root = Path(dataset_dir)
    datalist_file = root / DATALIST_NAME
    if datalist_file.is_file():
        datalist = json.loads(datalist_file.read_text())
        if datalist.get("version") == DATASET_VERSION:
            return datalist
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([*SPACING, 1.0])
    datalist: dict = {"version": DATASET_VERSION, "description": "AE-FLOW synthetic brain phantom (embedded default)"}
    for split, (healthy, with_lesion) in splits.items():
        items = []
        for index, lesion in enumerate([False] * healthy + [True] * with_lesion):
            volume, mask = synthetic_volume(rng, lesion, shape)
            name = f"volumes/{split}_{index:03d}"
            nib.save(nib.Nifti1Image(volume, affine), root / f"{name}_flair.nii.gz")
            nib.save(nib.Nifti1Image(mask, affine), root / f"{name}_seg.nii.gz")
            items += _slice_items(f"{name}_flair.nii.gz", mask)[::slice_step]
        datalist[split] = items
    tmp = datalist_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(datalist, indent=4))
    os.replace(tmp, datalist_file)  # the datalist appears only once every volume is written
    counts = {s: (sum(1 - i["label"] for i in datalist[s]), sum(i["label"] for i in datalist[s])) for s in splits}
    logger.info("Synthetic data set written to %s; (normal, abnormal) slices per split: %s", root, counts)
    return datalist


def prepare_png_slices(
    dataset_dir: str | os.PathLike, seed: int = 7, splits: dict = PNG_SPLITS, shape=SHAPE, slice_step: int = 2
) -> dict:
    """The phantoms as 8-bit PNG axial slices, each volume scaled by its 99.5th percentile as public brain-MRI PNG
    sets are made, with a 2D datalist: a brain-like check of the 2D settings (``configs/images_2d.json``), where
    the anomaly is the brightest tissue of the slice. Returns the datalist."""
    root = Path(dataset_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    datalist: dict = {"description": "AE-FLOW synthetic brain phantom, 8-bit PNG slices"}
    for split, (healthy, with_lesion) in splits.items():
        items = []
        for index, lesion in enumerate([False] * healthy + [True] * with_lesion):
            volume, mask = synthetic_volume(rng, lesion, shape)
            scaled = np.clip(volume / np.percentile(volume, 99.5) * 255, 0, 255).astype(np.uint8)
            for item in _slice_items("", mask)[::slice_step]:
                name = f"{split}_{index:03d}_{item['slice']:02d}.png"
                Image.fromarray(scaled[:, :, item["slice"]]).save(root / name)
                items.append({"image": name, "label": item["label"]})
        datalist[split] = items
    (root / DATALIST_NAME).write_text(json.dumps(datalist, indent=4))
    return datalist


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic brain phantoms as a 2D PNG slice data set.")
    parser.add_argument("output", help="folder for the PNG slices and datalist.json")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    written = prepare_png_slices(args.output, seed=args.seed)
    print({split: len(written[split]) for split in PNG_SPLITS})
