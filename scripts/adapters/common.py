"""What every adapter shares: the result (datalist + skipped items + warnings), the stratified hold-out of the
paper's appendix A, the image-header check, and writing the datalist."""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("training", "validation", "test")


@dataclass
class AdapterResult:
    datalist: dict[str, list[dict]]
    skipped: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}
    warnings: list[str] = field(default_factory=list)  # things kept but worth knowing (mixed sizes, ...)
    notes: list[str] = field(default_factory=list)  # plain facts for the summary (cases per split, ...)

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {"normal": sum(i["label"] == 0 for i in items), "abnormal": sum(i["label"] == 1 for i in items)}
            for split, items in self.datalist.items()
        }

    def summary(self) -> str:
        lines = []
        for split, c in self.counts().items():
            lines.append(f"{split:<10} {c['normal']:>6} normal {c['abnormal']:>6} abnormal")
            classes = Counter(str(item["class"]) for item in self.datalist[split] if "class" in item)
            if classes:
                lines[-1] += "   (" + ", ".join(f"{name} {n}" for name, n in sorted(classes.items())) + ")"
        lines += self.notes + [f"warning: {w}" for w in self.warnings]
        lines.append(f"skipped    {len(self.skipped):>6}")
        lines += [f"  {s['path']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


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
    key = lambda item: (item["image"], item.get("slice", 0))  # noqa: E731 - a stable order, independent of the shuffle
    return sorted(held, key=key), sorted(rest, key=key)


def split_validation(datalist: dict[str, list[dict]], skipped: list[dict], fraction: float, seed: int) -> None:
    """Use the given validation split if it holds both classes; otherwise carve a stratified one from the test split.

    The threshold of the honest protocol is chosen on validation, which needs normal and abnormal items.
    """
    validation = datalist.get("validation", [])
    if len({item["label"] for item in validation}) < 2:
        skipped += [{"path": i["image"], "reason": "validation split lacks a class; not used"} for i in validation]
        datalist["validation"], datalist["test"] = stratified_holdout(datalist["test"], fraction, seed)


def check_images(items: list[dict], skipped: list[dict]) -> tuple[list[dict], list[str]]:
    """Read every image header once: unreadable files are skipped, mixed sizes or channel counts become warnings.

    Mixed geometry is not an error: the bundle's 2D pipeline resizes to ``image_size`` and ``EnsureChannelsd``
    converts to ``in_channels``. But a user should know, e.g. that a class differs from the others in size.
    """
    from PIL import Image

    readable, sizes, modes = [], Counter(), Counter()
    for item in items:
        try:
            with Image.open(item["image"]) as image:
                size, mode = image.size, image.mode
        except Exception as error:  # PIL raises several types for broken files
            skipped.append({"path": item["image"], "reason": f"unreadable image ({type(error).__name__}: {error})"})
            continue
        readable.append(item)
        sizes[f"{size[0]}x{size[1]}"] += 1
        modes[f"{mode} ({Image.getmodebands(mode)} channel(s))"] += 1
    warnings = []
    if len(sizes) > 1:
        listed = ", ".join(f"{size}: {n}" for size, n in sizes.most_common())
        warnings.append(f"images of {len(sizes)} sizes (width x height: count) {listed}; all are resized to image_size")
    if len(modes) > 1:
        listed = ", ".join(f"{mode}: {n}" for mode, n in modes.most_common())
        warnings.append(f"images of {len(modes)} colour modes {listed}; all are converted to in_channels")
    return readable, warnings


def write_datalist(result: AdapterResult, datalist_file: str) -> str:
    """Write the datalist with paths relative to its folder, plus ``<name>_skipped.csv``; print the summary."""
    from .. import reports  # matplotlib and scikit-learn come with it: only when writing

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
