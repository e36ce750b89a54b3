"""BraTS 2021 cases (``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``) -> slice-level datalist.

As in the paper, the central portion of each volume is cut into axial slices; a slice is abnormal when the
segmentation marks tumour in it. Items are ``{"image": volume, "slice": k, "label": 0 | 1}``: the bundle's
``SelectSliced`` transform (configs/train.json) cuts slice ``k`` on the fly, so no 2D copy of the data is written.
Slice indices refer to the RAS-oriented volume, the orientation the bundle's ``Orientationd`` gives, whatever
the file's own axis order. Cases, not slices, are split, so that no patient is in two splits.
"""

from __future__ import annotations

import random
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np

from ..preprocessing import central_slice_range
from .common import SPLITS, AdapterResult

MODALITIES = ("flair", "t1", "t1ce", "t2")
READERS = ("nibabel", "itk")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def read_ras(path: str | Path, reader: str = "nibabel") -> np.ndarray:
    """A volume in RAS+ axis order, read with nibabel or ITK (the two readers the bundle offers)."""
    if reader == "nibabel":
        image = nib.load(str(path))
        array, affine = np.asanyarray(image.dataobj), image.affine
    elif reader == "itk":
        import itk  # slow to import: only when asked for

        image = itk.imread(str(path))
        array = itk.array_from_image(image).transpose(2, 1, 0)  # ITK indexes (z, y, x)
        affine = np.eye(4)
        affine[:3, :3] = itk.array_from_matrix(image.GetDirection()) * np.asarray(image.GetSpacing())
        affine[:3, 3] = np.asarray(image.GetOrigin())
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK's physical space is LPS
    else:
        raise ValueError(f"Unknown reader {reader!r}; allowed: {', '.join(READERS)}.")
    if array.ndim != 3:
        raise ValueError(f"{path} holds a {array.ndim}D image; expected a 3D volume.")
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )
    return nib.orientations.apply_orientation(array, transform)


def slice_range(depth: int, central_fraction: float = 0.5, first_last: tuple[int, int] | None = None) -> range:
    """The axial slices kept: ``first_last`` (inclusive, clipped to the volume) or the central fraction."""
    if first_last is not None:
        return range(max(first_last[0], 0), min(first_last[1], depth - 1) + 1)
    return central_slice_range(depth, central_fraction)


def _case_file(case_dir: Path, kind: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        path = case_dir / f"{case_dir.name}_{kind}{suffix}"
        if path.is_file():
            return path
    return None


def _scan_case(case_dir: Path, modality, reader, central_fraction, first_last, min_brain_fraction):
    """(slice items, skipped entries) of one case; every reason names the case."""
    case = case_dir.name
    files = {kind: _case_file(case_dir, kind) for kind in (*MODALITIES, "seg")}
    missing = [kind for kind, path in files.items() if path is None]
    if missing:
        expected = ", ".join(f"{case}_{kind}.nii.gz" for kind in missing)
        return [], [{"path": str(case_dir), "reason": f"case {case} lacks {', '.join(missing)} (expected {expected})"}]
    try:
        image = read_ras(files[modality], reader)
        seg = read_ras(files["seg"], reader)
    except Exception as error:  # a truncated download, a non-NIfTI file: skip the case, naming it
        return [], [{"path": str(case_dir), "reason": f"case {case} cannot be read with {reader}: {error}"}]
    if image.shape != seg.shape:
        reason = f"case {case}: segmentation shape {seg.shape} differs from the {modality} shape {image.shape}"
        return [], [{"path": str(case_dir), "reason": reason}]
    items, background = [], []
    for k in slice_range(image.shape[2], central_fraction, first_last):
        if np.count_nonzero(image[:, :, k]) < min_brain_fraction * image[:, :, k].size:
            background.append(k)
        else:
            items.append({"image": str(files[modality]), "slice": k, "label": int(np.any(seg[:, :, k] > 0))})
    skipped = []
    if background:
        reason = f"case {case}: {len(background)} slice(s) with brain fraction < {min_brain_fraction}: {background}"
        skipped.append({"path": str(files[modality]), "reason": reason})
    return items, skipped


def brats2021(
    root: str,
    modality: str = "flair",
    reader: str = "nibabel",
    central_fraction: float = 0.5,
    first_last: tuple[int, int] | None = None,
    min_brain_fraction: float = 0.05,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
) -> AdapterResult:
    """Scan every case folder under ``root``; split the usable cases with ``seed``; training keeps healthy slices.

    A slice is background (dropped, and listed per case) when fewer than ``min_brain_fraction`` of its voxels are
    nonzero: BraTS volumes are skull-stripped with a zero background. A case lacking any modality is skipped even
    if that modality is not the one used, so that the case split does not depend on ``modality``.
    """
    if modality not in MODALITIES:
        raise ValueError(f"Unknown modality {modality!r}; allowed: {', '.join(MODALITIES)}.")
    if reader not in READERS:
        raise ValueError(f"Unknown reader {reader!r}; allowed: {', '.join(READERS)}.")
    if not (0.0 <= validation_fraction < 1.0 and 0.0 < test_fraction < 1.0 and validation_fraction + test_fraction < 1):
        raise ValueError(
            f"Need 0 <= validation_fraction, 0 < test_fraction, sum < 1; got {validation_fraction}, "
            f"{test_fraction}."
        )
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"Dataset root {root!r} does not exist.")
    skipped: list[dict] = []
    case_dirs = []
    for path in sorted(base.iterdir()):
        if path.is_dir():
            case_dirs.append(path)
        elif not path.name.startswith("."):
            skipped.append({"path": str(path), "reason": "not a case folder"})
    scan = partial(
        _scan_case,
        modality=modality,
        reader=reader,
        central_fraction=central_fraction,
        first_last=first_last,
        min_brain_fraction=min_brain_fraction,
    )
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            scanned = list(pool.map(scan, case_dirs))
    else:
        scanned = [scan(case_dir) for case_dir in case_dirs]
    cases = {}
    for case_dir, (items, case_skipped) in zip(case_dirs, scanned):
        skipped += case_skipped
        if items:
            cases[case_dir.name] = items
        elif not case_skipped:
            skipped.append({"path": str(case_dir), "reason": f"case {case_dir.name}: no slice in the range kept"})
    if len(cases) < 3:
        raise ValueError(f"{root} holds {len(cases)} usable case(s); training, validation and test need at least 3.")
    names = sorted(cases)
    random.Random(seed).shuffle(names)
    n_test = max(1, round(len(names) * test_fraction))
    n_validation = max(1 if validation_fraction else 0, round(len(names) * validation_fraction))
    groups = {"test": names[:n_test], "validation": names[n_test : n_test + n_validation]}
    groups["training"] = names[n_test + n_validation :]
    if not groups["training"]:
        raise ValueError(f"No case of {root} is left for training; lower validation_fraction or test_fraction.")
    datalist = {split: [item for name in sorted(groups[split]) for item in cases[name]] for split in SPLITS}
    tumour = [item for item in datalist["training"] if item["label"]]
    if tumour:
        reason = f"{len(tumour)} tumour slice(s) of {len(groups['training'])} training case(s) not used (normal only)"
        skipped.append({"path": str(base), "reason": reason})
        datalist["training"] = [item for item in datalist["training"] if not item["label"]]
    warnings = [
        f"{split} split ({len(groups[split])} case(s)) lacks {'normal' if labels == {1} else 'tumour'} slices"
        for split in ("validation", "test")
        if (labels := {item["label"] for item in datalist[split]}) and len(labels) < 2
    ]
    notes = ["cases      " + "  ".join(f"{split} {len(groups[split])}" for split in SPLITS)]
    return AdapterResult(datalist, skipped, warnings, notes)
