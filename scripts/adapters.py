"""Dataset adapters: raw downloads -> the bundle's datalist (``{"training": [...], "validation": [...],
"test": [...]}``, items ``{"image": path, "label": 0 | 1}``, normal = 0, paths relative to the datalist).

Each adapter returns an ``AdapterResult`` that holds the datalist and every item it left out with the reason, so
that nothing is dropped silently; ``write_datalist`` writes it and prints counts per split and class.
``python -m scripts.adapters --help`` is the command-line entry point.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from . import reports

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_FOLDERS = {"training": ("train", "training"), "validation": ("val", "validation"), "test": ("test",)}


@dataclass
class AdapterResult:
    datalist: dict[str, list[dict]]
    skipped: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {"normal": sum(i["label"] == 0 for i in items), "abnormal": sum(i["label"] == 1 for i in items)}
            for split, items in self.datalist.items()
        }

    def summary(self) -> str:
        lines = [
            f"{split:<10} {c['normal']:>6} normal {c['abnormal']:>6} abnormal" for split, c in self.counts().items()
        ]
        lines.append(f"skipped    {len(self.skipped):>6}")
        lines += [f"  {s['path']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


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
            items.append({"image": str(path), "label": label})
        elif path.name.startswith("."):
            continue
        else:
            reason = "empty file" if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES else "not an image file"
            skipped.append({"path": str(path), "reason": reason})
    if not items:
        raise ValueError(f"Class folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
    return items


def stratified_holdout(items: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split ``items`` into (held out, rest) with ``fraction`` of each class held out (the paper's appendix A)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {fraction}.")
    rng = random.Random(seed)
    held, rest = [], []
    for label in (0, 1):
        group = [item for item in items if item["label"] == label]
        rng.shuffle(group)
        n_held = round(len(group) * fraction)
        held += group[:n_held]
        rest += group[n_held:]
    key = lambda item: item["image"]  # noqa: E731 - a stable order, independent of the shuffle
    return sorted(held, key=key), sorted(rest, key=key)


def image_folder(
    root: str,
    normal_classes: list[str],
    abnormal_classes: list[str] | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> AdapterResult:
    """``ROOT/<split>/<class>/*`` (Kermany OCT and Chest X-ray layout) -> datalist.

    Training keeps the normal classes only. Without a ``val`` folder (or when it lacks either class, like the
    16-image Chest X-ray ``val``), a stratified ``validation_fraction`` of the test split becomes the validation
    split, disjoint from the remaining test items, as in the paper's appendix A.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"Dataset root {root!r} does not exist.")
    skipped: list[dict] = []
    datalist: dict[str, list[dict]] = {}
    for split in SPLIT_FOLDERS:
        folder = _split_folder(base, split)
        if folder is None:
            continue
        present = sorted(p.name for p in folder.iterdir() if p.is_dir())
        wanted = {name: 0 for name in normal_classes}
        if split != "training":
            wanted.update({name: 1 for name in (abnormal_classes or [p for p in present if p not in normal_classes])})
        missing = [name for name in wanted if name not in present and not (split == "training" and wanted[name])]
        if missing:
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
    validation = datalist.get("validation", [])
    if len({item["label"] for item in validation}) < 2:
        if validation:
            skipped += [{"path": i["image"], "reason": "validation folder lacks a class; not used"} for i in validation]
        datalist["validation"], datalist["test"] = stratified_holdout(datalist["test"], validation_fraction, seed)
    return AdapterResult({split: datalist[split] for split in SPLIT_FOLDERS}, skipped)


def write_datalist(result: AdapterResult, datalist_file: str) -> str:
    """Write the datalist with paths relative to its folder, plus ``<name>_skipped.csv``; print the summary."""
    folder = Path(datalist_file).resolve().parent
    relative = {
        split: [{**item, "image": os.path.relpath(item["image"], folder)} for item in items]
        for split, items in result.datalist.items()
    }
    reports.write_json(datalist_file, relative)
    if result.skipped:
        reports.write_csv(str(Path(datalist_file).with_suffix("")) + "_skipped.csv", result.skipped)
    print(result.summary())
    return datalist_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.adapters", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="layout", required=True)
    folder = sub.add_parser("image-folder", help="ROOT/<split>/<class>/* images (OCT, Chest X-ray)")
    folder.add_argument("--root", required=True)
    folder.add_argument("--normal", nargs="+", required=True, help="normal class folder name(s)")
    folder.add_argument("--abnormal", nargs="*", help="abnormal class folder names (default: all others)")
    folder.add_argument("--validation-fraction", type=float, default=0.2)
    folder.add_argument("--seed", type=int, default=0)
    folder.add_argument("--output", required=True, help="datalist JSON to write")
    args = parser.parse_args(argv)
    if args.layout == "image-folder":
        result = image_folder(args.root, args.normal, args.abnormal, args.validation_fraction, args.seed)
    write_datalist(result, args.output)


if __name__ == "__main__":
    main()
