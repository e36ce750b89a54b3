"""Generic image folder ``ROOT/<split>/<class>/*`` (the Kermany OCT and Chest X-ray downloads) -> datalist."""

from __future__ import annotations

from pathlib import Path

from .common import IMAGE_SUFFIXES, SPLITS, AdapterResult, check_images, split_validation

SPLIT_FOLDERS = {"training": ("train", "training"), "validation": ("val", "validation"), "test": ("test",)}


def _split_folder(root: Path, split: str) -> Path | None:
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _class_items(folder: Path, label: int, skipped: list[dict]) -> list[dict]:
    """Image files of one class folder; anything else is listed as skipped, never dropped silently."""
    items = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.stat().st_size > 0:
            items.append({"image": str(path), "label": label, "class": folder.name})
        elif path.name.startswith("."):
            continue
        else:
            reason = "empty file" if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES else "not an image file"
            skipped.append({"path": str(path), "reason": reason})
    if not items:
        raise ValueError(f"Class folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
    return items


def image_folder(
    root: str,
    normal_classes: list[str],
    abnormal_classes: list[str] | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    check_headers: bool = True,
    group_pattern: str | None = None,
) -> AdapterResult:
    """``ROOT/<split>/<class>/*`` -> datalist; hidden folders (``.ipynb_checkpoints``) are no class.

    Training keeps the normal classes only. Without a ``val`` folder (or when it lacks either class, like the
    16-image Chest X-ray ``val``), a stratified ``validation_fraction`` of the test split becomes the validation
    split, disjoint from the remaining test items, as in the paper's appendix A; byte-identical files stay in one
    split, and with ``group_pattern`` (a regex whose first group is e.g. the patient id of a file name) so do the
    files of one group. ``check_headers`` decodes every image: unreadable files are skipped, mixed sizes or colour
    modes are reported as warnings.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"Dataset root {root!r} does not exist.")
    skipped: list[dict] = []
    warnings: list[str] = []
    datalist: dict[str, list[dict]] = {}
    folders: dict[str, Path] = {}
    for split in SPLITS:
        folder = _split_folder(base, split)
        if folder is None:
            continue
        folders[split] = folder
        present = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        wanted = dict.fromkeys(normal_classes, 0)
        if split != "training":
            wanted.update(dict.fromkeys(abnormal_classes or [p for p in present if p not in normal_classes], 1))
        missing = [name for name in wanted if name not in present and not (split == "training" and wanted[name])]
        if missing and split == "validation":  # a validation lacking a class is replaced by a carve from test
            warnings.append(f"validation folder {folder} lacks class folder(s) {missing}")
        elif missing:
            raise ValueError(f"Class folder(s) {missing} not found in {folder}; present: {present}.")
        for name in present:
            if name not in wanted:
                skipped.append({"path": str(folder / name), "reason": f"class {name!r} not used in split {split!r}"})
        datalist[split] = [
            item
            for name, label in wanted.items()
            if (folder / name).is_dir()
            for item in _class_items(folder / name, label, skipped)
        ]
    if "training" not in datalist or "test" not in datalist:
        raise ValueError(f"{root} needs a train (or training) and a test folder; found {sorted(datalist)}.")
    if check_headers:
        everything = [item for items in datalist.values() for item in items]
        readable, image_warnings = check_images(everything, skipped)
        warnings += image_warnings
        kept = {id(item) for item in readable}
        datalist = {split: [i for i in items if id(i) in kept] for split, items in datalist.items()}
    if len({item["label"] for item in datalist["test"]}) < 2:
        found = sorted({item["class"] for item in datalist["test"]})
        raise ValueError(
            f"The test split ({folders['test']}) needs normal and abnormal images to evaluate; found class(es) "
            f"{found} with normal class(es) {normal_classes}."
        )
    notes, duplicate_warnings = split_validation(datalist, skipped, validation_fraction, seed, group_pattern)
    return AdapterResult({split: datalist[split] for split in SPLITS}, skipped, warnings + duplicate_warnings, notes)
