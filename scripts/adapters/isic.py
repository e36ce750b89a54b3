"""ISIC 2018 task 3 (images + one-hot ground-truth CSV) -> datalist, as the paper uses it.

NV (nevus) is normal, the six other classes are abnormal (Lu & Xu 2018). Training takes the NV images of the
official training set; the official validation set (193 images: 123 NV, 70 other) is the paper's test set, and a
stratified fraction of it becomes our validation split (appendix A), byte-identical files kept in one split.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from .common import (
    IMAGE_SUFFIXES,
    SPLITS,
    AdapterResult,
    carve_validation,
    check_images,
    duplicate_warnings,
    file_digests,
)

CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
OFFICIAL = {  # folder and file names of the official download, relative to its root
    "train_images": "ISIC2018_Task3_Training_Input",
    "train_csv": "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv",
    "test_images": "ISIC2018_Task3_Validation_Input",
    "test_csv": "ISIC2018_Task3_Validation_GroundTruth/ISIC2018_Task3_Validation_GroundTruth.csv",
}


def official_paths(root: str) -> dict[str, str]:
    """The four inputs of ``isic2018`` inside an unpacked official download."""
    return {key: str(Path(root) / name) for key, name in OFFICIAL.items()}


def _read_ground_truth(csv_file: str, skipped: list[dict]) -> dict[str, str]:
    """image id -> class name; rows that are not one-hot are skipped with the row named."""
    if not Path(csv_file).is_file():
        raise FileNotFoundError(f"Ground-truth CSV {csv_file!r} does not exist.")
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("image", *CLASSES) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_file} lacks column(s) {missing}; expected image,{','.join(CLASSES)}.")
        classes = {}
        for line, row in enumerate(reader, start=2):
            try:
                hot = [c for c in CLASSES if float(row[c]) == 1.0]
                valid = len(hot) == 1 and all(float(row[c]) in (0.0, 1.0) for c in CLASSES)
            except (TypeError, ValueError):
                valid = False
            if not valid:
                reason = f"row {line} is not one-hot over {','.join(CLASSES)}"
                skipped.append({"path": f"{csv_file}:{row['image']}", "reason": reason})
            elif row["image"] in classes:
                skipped.append({"path": f"{csv_file}:{row['image']}", "reason": f"row {line} repeats the image"})
            else:
                classes[row["image"]] = hot[0]
    return classes


def _labelled_items(images: str, csv_file: str, normal_classes, skipped: list[dict]) -> list[dict]:
    """Match CSV rows with image files; a row without its image and an image without its row are both skipped.

    Two files of one image id (``ISIC_1.jpg``, ``ISIC_1.png``): the first by name is used, the other skipped, as a
    repeated CSV row is."""
    folder = Path(images)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {images!r} does not exist.")
    classes = _read_ground_truth(csv_file, skipped)
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.stem in files:
            skipped.append({"path": str(path), "reason": f"repeats image id {path.stem}; {files[path.stem]} is used"})
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files[path.stem] = path
        elif not path.name.startswith("."):
            skipped.append({"path": str(path), "reason": "not an image file"})
    for stem, path in files.items():
        if stem not in classes:
            skipped.append({"path": str(path), "reason": f"image has no row in {csv_file}"})
    items = []
    for image_id, name in classes.items():
        if image_id not in files:
            skipped.append(
                {"path": f"{csv_file}:{image_id}", "reason": f"CSV row names an image missing from {images}"}
            )
            continue
        items.append({"image": str(files[image_id]), "label": int(name not in normal_classes), "class": name})
    if not items:
        raise ValueError(f"No image of {images} matches a row of {csv_file}.")
    return items


def isic2018(
    train_images: str,
    train_csv: str,
    test_images: str,
    test_csv: str,
    normal_classes: tuple[str, ...] = ("NV",),
    validation_fraction: float = 0.2,
    seed: int = 0,
    check_headers: bool = True,
) -> AdapterResult:
    """Training: the normal-class images of the training set; test: the official validation set, of which a
    stratified ``validation_fraction`` becomes the validation split. Items keep their ISIC ``class`` name."""
    unknown = [c for c in normal_classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"Unknown ISIC class(es) {unknown}; allowed: {', '.join(CLASSES)}.")
    skipped: list[dict] = []
    training = _labelled_items(train_images, train_csv, normal_classes, skipped)
    left_out = Counter(item["class"] for item in training if item["label"])
    if left_out:
        listed = ", ".join(f"{name} {n}" for name, n in sorted(left_out.items()))
        reason = f"{sum(left_out.values())} abnormal training image(s) not used (training is normal only): {listed}"
        skipped.append({"path": train_csv, "reason": reason})
    training = [item for item in training if not item["label"]]
    test = _labelled_items(test_images, test_csv, normal_classes, skipped)
    warnings: list[str] = []
    if check_headers:
        readable, warnings = check_images(training + test, skipped)
        kept = {id(item) for item in readable}
        training, test = [i for i in training if id(i) in kept], [i for i in test if id(i) in kept]
    if len({item["label"] for item in test}) < 2:
        raise ValueError(f"The test set ({test_csv}) needs normal and abnormal images to evaluate.")
    digests = file_digests(training + test)
    validation, test, notes = carve_validation(test, validation_fraction, seed, digests)
    datalist = dict(zip(SPLITS, (training, validation, test)))
    return AdapterResult(datalist, skipped, warnings + duplicate_warnings(datalist, digests), notes)
