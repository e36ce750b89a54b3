"""What every adapter shares: the result (datalist + skipped items + warnings), the stratified hold-out of the
paper's appendix A (byte-identical files and, optionally, a patient's files kept in one split), the image check,
and writing the datalist."""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable

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


def _stable_order(item: dict) -> tuple:
    """A split's item order, independent of the shuffle."""
    return item["image"], item.get("slice", 0)


def stratified_holdout(
    items: list[dict], fraction: float, seed: int, unit_of: Callable[[dict], Hashable] | None = None
) -> tuple[list[dict], list[dict]]:
    """Split ``items`` into (held out, rest) with ``fraction`` of each class held out (the paper's appendix A).

    With ``unit_of`` (item -> key), the items of one key (e.g. a patient) are held out or kept together and the
    fraction counts units, each labelled by its items' label. Without it every item is its own unit, which
    shuffles exactly as the item-level carve always did.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {fraction}.")
    units: dict[Hashable, list[dict]] = defaultdict(list)
    for index, item in enumerate(items):
        units[unit_of(item) if unit_of else index].append(item)
    for key, members in units.items():
        if len({item["label"] for item in members}) > 1:
            listed = ", ".join(f"{Path(item['image']).name} (label {item['label']})" for item in members)
            raise ValueError(f"Group {key!r} holds normal and abnormal items: {listed}; a group needs one label.")
    rng = random.Random(seed)
    held, rest = [], []
    for label in (0, 1):
        group = [members for members in units.values() if members[0]["label"] == label]
        rng.shuffle(group)
        n_held = round(len(group) * fraction)
        held += [item for members in group[:n_held] for item in members]
        rest += [item for members in group[n_held:] for item in members]
    return sorted(held, key=_stable_order), sorted(rest, key=_stable_order)


def file_digests(items: list[dict]) -> dict[str, str]:
    """image path -> md5 of its bytes: byte-identical files are the same image, whatever their names."""
    digests = {}
    for item in items:
        if item["image"] not in digests:
            with open(item["image"], "rb") as f:
                digests[item["image"]] = hashlib.md5(f.read()).hexdigest()
    return digests


def duplicate_groups(items: list[dict], digests: dict[str, str]) -> list[list[dict]]:
    """Groups of two or more byte-identical files among ``items``, each in listed order."""
    by_digest: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        by_digest[digests[item["image"]]].append(item)
    return [group for group in by_digest.values() if len(group) > 1]


def _pattern_units(items: list[dict], group_pattern: str, duplicates: list[list[dict]]) -> dict[int, str]:
    """id(item) -> its group: the first regex group of the file name, merged across byte-identical files."""
    regex = re.compile(group_pattern)
    keys, unmatched = {}, []
    for item in items:
        match = regex.search(Path(item["image"]).name)
        if match is None:
            unmatched.append(Path(item["image"]).name)
        else:
            keys[id(item)] = match.group(1) if regex.groups else match.group(0)
    if unmatched:
        raise ValueError(
            f"--group-pattern {group_pattern!r} finds no group in {len(unmatched)} file name(s), "
            f"e.g. {', '.join(unmatched[:3])}; every file to carve needs one."
        )
    parent = {key: key for key in keys.values()}

    def root(key: str) -> str:
        while parent[key] != key:
            key = parent[key]
        return key

    for group in duplicates:  # a file and its copy under another group's name: one unit, or the copy leaks
        first = root(keys[id(group[0])])
        for item in group[1:]:
            parent[root(keys[id(item)])] = first
    return {id(item): root(keys[id(item)]) for item in items}


def carve_validation(
    items: list[dict], fraction: float, seed: int, digests: dict[str, str], group_pattern: str | None = None
) -> tuple[list[dict], list[dict], list[str]]:
    """The stratified hold-out of ``items`` -> (validation, test, notes), byte-identical files in one split.

    Without ``group_pattern`` the item-level carve is the one it always was, then each duplicate follows the split
    of the first-listed file of its group: a data set without duplicates keeps its split exactly. With it, the
    files whose names give the same first regex group (a patient id) are carved together as one unit.
    """
    duplicates = duplicate_groups(items, digests)
    notes = []
    if group_pattern is None:
        held, rest = stratified_holdout(items, fraction, seed)
        held_ids = {id(item) for item in held}
        moved = 0
        for group in duplicates:
            first_held = id(group[0]) in held_ids
            for item in group[1:]:
                if (id(item) in held_ids) != first_held:
                    moved += 1
                    if first_held:
                        held_ids.add(id(item))
                    else:
                        held_ids.discard(id(item))
        held = sorted((item for item in items if id(item) in held_ids), key=_stable_order)
        rest = sorted((item for item in items if id(item) not in held_ids), key=_stable_order)
        how = f"{moved} moved to the split of the first of their group"
    else:
        unit_of = _pattern_units(items, group_pattern, duplicates)
        try:
            held, rest = stratified_holdout(items, fraction, seed, lambda item: unit_of[id(item)])
        except ValueError as error:
            raise ValueError(f"--group-pattern {group_pattern!r}: {error}") from None
        n_held, n_rest = len({unit_of[id(i)] for i in held}), len({unit_of[id(i)] for i in rest})
        notes.append(f"groups     validation {n_held}  test {n_rest}  (by --group-pattern {group_pattern!r})")
        how = "carved with their group"
    if duplicates:
        n_files = sum(len(group) for group in duplicates)
        notes.append(
            f"duplicates {n_files} byte-identical file(s) in {len(duplicates)} group(s) kept in one split ({how})"
        )
    return held, rest, notes


def duplicate_warnings(datalist: dict[str, list[dict]], digests: dict[str, str]) -> list[str]:
    """Files byte-identical to one of an earlier split as the data set splits them (kept where they are: the data
    set's own), and byte-identical files labelled apart."""
    first_split: dict[str, str] = {}
    shared = Counter()
    for split in (s for s in SPLITS if s in datalist):
        for item in datalist[split]:
            earlier = first_split.setdefault(digests[item["image"]], split)
            if earlier != split:
                shared[split, earlier] += 1
    warnings = []
    if shared:
        listed = ", ".join(f"{n} in {split} duplicate {earlier}" for (split, earlier), n in shared.items())
        warnings.append(
            f"{sum(shared.values())} file(s) byte-identical to a file of an earlier split as the data set gives them "
            f"(not moved): {listed}"
        )
    everything = [item for items in datalist.values() for item in items]
    conflicting = [g for g in duplicate_groups(everything, digests) if len({item["label"] for item in g}) > 1]
    if conflicting:
        listed = "; ".join(", ".join(Path(item["image"]).name for item in group) for group in conflicting[:3])
        warnings.append(f"{len(conflicting)} group(s) of byte-identical files carry both labels, e.g. {listed}")
    return warnings


def split_validation(
    datalist: dict[str, list[dict]], skipped: list[dict], fraction: float, seed: int, group_pattern: str | None = None
) -> tuple[list[str], list[str]]:
    """Use the given validation split if it holds both classes; otherwise carve a stratified one from the test split.

    The threshold of the honest protocol is chosen on validation, which needs normal and abnormal items.
    Returns (notes, warnings) for the summary: duplicates kept together, duplicates the data set puts in two splits.
    """
    digests = file_digests([item for items in datalist.values() for item in items])
    validation = datalist.get("validation", [])
    notes = []
    if len({item["label"] for item in validation}) < 2:
        skipped += [{"path": i["image"], "reason": "validation split lacks a class; not used"} for i in validation]
        datalist["validation"], datalist["test"], notes = carve_validation(
            datalist["test"], fraction, seed, digests, group_pattern
        )
    elif group_pattern is not None:
        notes.append(f"groups     --group-pattern {group_pattern!r} not used: the validation folder is used as given")
    return notes, duplicate_warnings(datalist, digests)


def check_images(items: list[dict], skipped: list[dict]) -> tuple[list[dict], list[str]]:
    """Decode every image once: unreadable or truncated files are skipped, mixed sizes or channel counts become warnings.

    Mixed geometry is not an error: the bundle's 2D pipeline resizes to ``image_size`` and ``EnsureChannelsd``
    converts to ``in_channels``. But a user should know, e.g. that a class differs from the others in size.
    """
    from PIL import Image

    readable, sizes, modes = [], Counter(), Counter()
    for item in items:
        try:
            with Image.open(item["image"]) as image:
                size, mode = image.size, image.mode
                image.load()  # the header alone passes a truncated file
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
