"""MedMNIST ``.npz`` (PneumoniaMNIST, OCTMNIST, DermaMNIST, ...) -> PNG files + datalist.

The images are written as PNG files so that the bundle's 2D image pipeline (configs/images_2d.json) reads them
like any other image folder. The official train / val / test splits are kept; training keeps the normal label(s).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .common import SPLITS, AdapterResult, split_validation

NPZ_SPLITS = {"training": "train", "validation": "val", "test": "test"}


def _arrays(npz_file: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not Path(npz_file).is_file():
        raise FileNotFoundError(f"MedMNIST file {npz_file!r} does not exist.")
    with np.load(npz_file) as data:
        expected = [f"{name}_{kind}" for name in NPZ_SPLITS.values() for kind in ("images", "labels")]
        missing = [key for key in expected if key not in data.files]
        if missing:
            raise KeyError(
                f"{npz_file} lacks array(s) {missing}; a MedMNIST npz holds {expected} (found {data.files})."
            )
        arrays = {split: (data[f"{name}_images"], data[f"{name}_labels"]) for split, name in NPZ_SPLITS.items()}
    for split, (images, labels) in arrays.items():
        name = NPZ_SPLITS[split]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(
                f"{npz_file}: {name}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, 3) "
                "2D images (3D MedMNIST sets are not supported)."
            )
        if images.dtype != np.uint8:
            raise ValueError(f"{npz_file}: {name}_images has dtype {images.dtype}; MedMNIST images are uint8.")
        if labels.reshape(len(labels), -1).shape[1] != 1:
            raise ValueError(
                f"{npz_file}: {name}_labels has shape {labels.shape}; expected one class label per image "
                "(multi-label sets such as ChestMNIST are not supported)."
            )
        if len(labels) != len(images):
            raise ValueError(f"{npz_file}: {len(images)} {name}_images but {len(labels)} {name}_labels.")
    return arrays


def medmnist(
    npz_file: str, output_dir: str, normal_labels: list[int], validation_fraction: float = 0.2, seed: int = 0
) -> AdapterResult:
    """Write ``output_dir/<split>/<split>_<index>_label<class>.png`` and return the datalist of those files.

    Labels in ``normal_labels`` are normal (e.g. 0 for PneumoniaMNIST, 3 for OCTMNIST, 5 for DermaMNIST nevi),
    every other label abnormal. If the official val split lacks a class, a stratified ``validation_fraction`` of
    the test split is used instead (appendix A).
    """
    from PIL import Image

    arrays = _arrays(npz_file)
    present = sorted({int(v) for _, labels in arrays.values() for v in labels.reshape(-1)})
    unknown = [label for label in normal_labels if label not in present]
    if unknown:
        raise ValueError(f"Normal label(s) {unknown} do not occur in {npz_file}; labels present: {present}.")
    skipped: list[dict] = []
    datalist: dict[str, list[dict]] = {}
    for split, (images, labels) in arrays.items():
        folder = Path(output_dir) / NPZ_SPLITS[split]
        folder.mkdir(parents=True, exist_ok=True)
        items, left_out = [], Counter()
        for index, (image, value) in enumerate(zip(images, labels.reshape(-1))):
            label = int(int(value) not in normal_labels)
            if split == "training" and label:
                left_out[int(value)] += 1
                continue
            path = folder / f"{NPZ_SPLITS[split]}_{index:06d}_label{int(value)}.png"
            Image.fromarray(image).save(path)
            items.append({"image": str(path), "label": label, "class": int(value)})
        if left_out:
            listed = ", ".join(f"label {value} {n}" for value, n in sorted(left_out.items()))
            reason = (
                f"{sum(left_out.values())} abnormal training image(s) not written (training is normal only): {listed}"
            )
            skipped.append({"path": f"{npz_file}:train_images", "reason": reason})
        datalist[split] = items
    notes, warnings = split_validation(datalist, skipped, validation_fraction, seed)
    return AdapterResult({split: datalist[split] for split in SPLITS}, skipped, warnings, notes)
