"""Datalists: MONAI's ``{"training": [...], "validation": [...], "test": [...]}`` form, items with ``image`` and a
0/1 ``label`` (normal = 0). Training uses normal items only, as the method requires.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from monai.data import load_decathlon_datalist

from .encoders import STRIDE
from .options import flag
from .synthetic import prepare_default_dataset

logger = logging.getLogger(__name__)
SPLITS = ("training", "validation", "test")


def prepare_datalist(dataset_dir: str, datalist_file: str | None = None, generate_default: bool = False) -> str:
    """Return the datalist path; write the embedded synthetic data set first when asked to."""
    if generate_default:
        prepare_default_dataset(dataset_dir)
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(
            f"dataset_dir {dataset_dir!r} does not exist. Pass --dataset_dir pointing at your data (with a "
            "datalist.json, see docs/README.md), or leave it unset to use the embedded synthetic default."
        )
    datalist_file = datalist_file or os.path.join(dataset_dir, "datalist.json")
    if not os.path.isfile(datalist_file):
        raise FileNotFoundError(
            f"Datalist {datalist_file!r} does not exist; create it with the dataset adapters (docs/datasets.md)."
        )
    return datalist_file


def load_split(
    datalist_file: str,
    split: str,
    base_dir: str | None = None,
    normal_only: bool = False,
    keep_missing: bool | str = False,
) -> list[dict]:
    """Load one split with image paths made absolute; fail on missing files, naming them, unless ``keep_missing``
    (``skip_bad_inputs``: ``inputs.screen_items`` then leaves them out, listed in its report)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; allowed: {', '.join(SPLITS)}.")
    base_dir = base_dir or str(Path(datalist_file).parent)
    with open(datalist_file) as f:
        if split not in json.load(f):
            raise KeyError(f"Datalist {datalist_file} has no {split!r} split.")
    items = load_decathlon_datalist(datalist_file, is_segmentation=False, data_list_key=split, base_dir=base_dir)
    missing = [item["image"] for item in items if not os.path.isfile(item["image"])]
    if missing and not flag(keep_missing, "skip_bad_inputs"):
        raise FileNotFoundError(
            f"{len(missing)} image(s) of split {split!r} in {datalist_file} do not exist, e.g. {missing[:3]}."
        )
    for item in items:
        if int(item.get("label", 0)) not in (0, 1):
            raise ValueError(f"Item {item['image']} of {datalist_file} has label {item['label']!r}; expected 0 or 1.")
    if normal_only:
        abnormal = sum(int(item.get("label", 0)) for item in items)
        if abnormal:
            logger.info("Split %r: %d abnormal item(s) left out of training (normal data only).", split, abnormal)
        items = [item for item in items if int(item.get("label", 0)) == 0]
    if not items:
        raise ValueError(f"Split {split!r} of {datalist_file} has no usable items.")
    return items


def caseless_glob(pattern: str) -> str:
    """``pattern`` with each letter outside a ``[...]`` class matching either case: scanners and exports write
    ``.PNG`` and ``.JPG`` as often as ``.png``."""
    parts, in_class = [], False
    for char in pattern:
        in_class = (in_class or char == "[") and char != "]"
        parts.append(f"[{char.lower()}{char.upper()}]" if char.isalpha() and not in_class else char)
    return "".join(parts)


def list_inputs(directory: str, pattern: str | list[str] = "*") -> list[dict]:
    """Inference inputs: every file under ``directory`` matching ``pattern`` (or any of several) in either letter
    case, sorted, as ``{"image": path}``; the directory's other files are named in the log, not dropped silently."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Input directory {directory!r} does not exist.")
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    files = sorted({str(p) for glob in patterns for p in Path(directory).glob(caseless_glob(glob)) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"No input matches {' or '.join(map(repr, patterns))} in {directory!r}.")
    others = sorted(p.name for p in Path(directory).iterdir() if p.is_file() and str(p) not in files)
    if others:
        logger.warning(
            "%d file(s) in %s match none of %s and are not scored: %s%s",
            len(others),
            directory,
            patterns,
            ", ".join(others[:5]),
            " ..." if len(others) > 5 else "",
        )
    return [{"image": f} for f in files]


GRID_PHASES = (1, 4)


def with_grid_phases(items: list[dict], phases: int = 1) -> list[dict]:
    """Training items at ``phases`` phases of the encoder's sampling grid: 1, the items as they are; 4, each item
    also shifted by half the encoder's stride right, down and both (``scripts.transforms.GridShiftd`` reads
    ``grid_shift``).

    The models are tuned to the grid they were trained on (shifted views score lower: docs/results.md); a flow
    trained on all four phases sees each film's features sampled four ways."""
    if phases not in GRID_PHASES:
        raise ValueError(f"train_grid_phases must be one of {GRID_PHASES}, got {phases!r}.")
    if phases == 1:
        return items
    half = STRIDE // 2
    shifts = ([0, 0], [half, 0], [0, half], [half, half])
    return [{**item, "grid_shift": shift} for shift in shifts for item in items]
