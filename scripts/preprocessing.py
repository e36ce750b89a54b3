"""The one deterministic preprocessing of each input kind, built from the ``input_spec`` a model file stores.

Training, evaluation, inference, MONAI Deploy and MONAI Label all call these two builders, so an image is
prepared the same way wherever it is scored:

* ``item_transforms``: datalist items (a 2D image, or one slice ``{"image": volume, "slice": k}`` of a volume),
  for training and evaluation;
* ``input_transforms``: whole inputs (a 2D image or a 3D volume) as inference receives them, with the input
  checks that in-memory Deploy input needs. A volume is scored slice by slice within ``scored_slices``.

``input_spec`` is plain JSON (``configs/train.json`` and ``configs/images_2d.json`` define it):

* ``kind``: ``"volume"`` (3D, sliced along ``slice_axis``; ``slice_fraction``: the central part of the slices
  that training and calibration used, and the only part inference scores) or ``"image"`` (2D);
* ``reader`` and ``reader_args``: MONAI's image reader (no silent fallback to another);
* ``intensity``: ``{"mode": "percentiles", "lower": 0.5, "upper": 99.5}`` (per volume or image),
  ``{"mode": "range", "a_min": 0, "a_max": 255}`` (fixed, e.g. 8-bit images) or ``{"mode": "histogram",
  "num_bins": 256}`` (per-image histogram equalisation, so that films of other exposures get one grey-level
  distribution; Chest X-ray and HAM10000 since bundle 0.12.0, chosen on validation: docs/results.md) or
  ``{"mode": "clahe", "clip_limit": 0.01, "kernel_fraction": 0.125, "num_bins": 256}`` (contrast-limited adaptive
  histogram equalisation, 2D images only); all map to [0, 1];
* ``orientation`` (volumes): the axis codes volumes are turned to before slicing;
* ``anti_aliasing``: Gaussian smoothing before downsizing 2D images (volumes are resized in-plane without it).

>>> spec = {"kind": "image", "reader": "PILReader", "intensity": {"mode": "range", "a_min": 0, "a_max": 255}}
>>> [type(t).__name__ for t in item_transforms(spec, image_size=64, channels=1)][-3:]
['ScaleIntensityRanged', 'Resized', 'EnsureTyped']
"""

from __future__ import annotations

import copy

import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    HistogramNormalized,
    Orientationd,
    Resized,
    ScaleIntensityRanged,
)

from .transforms import (
    CachedVolumed,
    EnsureChannelsd,
    LocalHistogramEqualised,
    PercentileScaled,
    SelectSliced,
    StrictLoadImaged,
)

KINDS = ("volume", "image")
INTENSITY_MODES = ("percentiles", "range", "histogram", "clahe")
INTENSITY_DEFAULTS = {
    "histogram": {"num_bins": 256},
    "clahe": {"clip_limit": 0.01, "kernel_fraction": 0.125, "num_bins": 256},
}
DEFAULTS = {
    "volume": {
        "reader": "NibabelReader",
        "reader_args": {},
        "orientation": "RAS",
        "intensity": {"mode": "percentiles", "lower": 0.5, "upper": 99.5},
        "slice_axis": 2,
        "slice_fraction": 0.5,
        "anti_aliasing": False,
    },
    "image": {
        "reader": "PILReader",
        "reader_args": {"reverse_indexing": False},
        "intensity": {"mode": "range", "a_min": 0.0, "a_max": 255.0},
        "anti_aliasing": True,
    },
}


def resolve_spec(spec: dict) -> dict:
    """``spec`` with every default filled in and checked: what a model file stores, so that a later change of a
    default never changes how an existing model's inputs are prepared."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"input_spec kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    unknown = sorted(set(spec) - set(DEFAULTS[kind]) - {"kind"})
    if unknown:
        raise ValueError(f"input_spec of kind {kind!r} has unknown key(s) {unknown}; known: {sorted(DEFAULTS[kind])}.")
    resolved = {"kind": kind, **copy.deepcopy(DEFAULTS[kind]), **copy.deepcopy(spec)}
    mode = resolved["intensity"].get("mode")
    if mode not in INTENSITY_MODES:
        raise ValueError(f"input_spec intensity mode must be one of {', '.join(INTENSITY_MODES)}, got {mode!r}.")
    resolved["intensity"] = {"mode": mode, **INTENSITY_DEFAULTS.get(mode, {}), **resolved["intensity"]}
    if mode == "range" and not {"a_min", "a_max"} <= set(resolved["intensity"]):
        raise ValueError(f"input_spec intensity mode 'range' needs a_min and a_max, got {resolved['intensity']}.")
    if kind == "volume" and mode == "clahe":
        raise ValueError("input_spec intensity mode 'clahe' is for 2D images; volumes take 'percentiles' or 'range'.")
    if kind == "volume" and not 0.0 < float(resolved["slice_fraction"]) <= 1.0:
        raise ValueError(f"input_spec slice_fraction must lie in (0, 1], got {resolved['slice_fraction']}.")
    return resolved


def central_slice_range(depth: int, fraction: float = 0.5) -> range:
    """The central ``fraction`` of ``depth`` slices: the part of a volume the paper keeps (section 3.1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"slice fraction must lie in (0, 1], got {fraction}.")
    start = int(round(depth * (1 - fraction) / 2))
    return range(start, min(depth, start + max(int(round(depth * fraction)), 1)))


def scored_slices(spec: dict, depth: int) -> range:
    """The slices of a volume of ``depth`` slices that a model with this ``input_spec`` scores."""
    return central_slice_range(depth, float(resolve_spec(spec)["slice_fraction"]))


def _intensity(spec: dict):
    settings = {k: v for k, v in spec["intensity"].items() if k != "mode"}
    if spec["intensity"]["mode"] == "percentiles":
        return PercentileScaled("image", b_min=0.0, b_max=1.0, clip=True, **settings)
    if spec["intensity"]["mode"] == "histogram":
        return HistogramNormalized("image", min=0.0, max=1.0, **settings)
    if spec["intensity"]["mode"] == "clahe":
        return LocalHistogramEqualised("image", **settings)
    return ScaleIntensityRanged("image", b_min=0.0, b_max=1.0, clip=True, **settings)


def image_loader(spec: dict, data_root: str | None = None) -> StrictLoadImaged:
    """The strict loader of a resolved ``spec``: every path that reads a file (training, evaluation, inference,
    the MONAI Deploy app) reads it with the same checks."""
    intensity = spec["intensity"]
    eight_bit = spec["kind"] == "image" and intensity["mode"] == "range" and float(intensity["a_max"]) <= 255
    return StrictLoadImaged(
        "image",
        reader=spec["reader"],
        reader_args=spec["reader_args"],
        data_root=data_root,
        eight_bit_ceiling=float(intensity["a_max"]) if eight_bit else None,
    )


def _size(image_size) -> list[int]:
    return [int(image_size)] * 2 if isinstance(image_size, (int, float)) else [int(s) for s in image_size]


def _volume_steps(spec: dict, size: list[int], checks: list, data_root: str | None = None) -> list:
    """Load, orient, scale and resize in-plane a whole volume: shared by training items and inference inputs, so
    a slice is bit-for-bit the same either way."""
    return [
        image_loader(spec, data_root),
        EnsureChannelFirstd("image"),
        *checks,
        Orientationd("image", axcodes=spec["orientation"]),
        _intensity(spec),
        Resized("image", spatial_size=_in_plane(size, int(spec["slice_axis"])), mode="trilinear"),
    ]


def item_transforms(spec: dict, image_size, channels: int, data_root: str | None = None) -> list:
    """Training and evaluation items: a 2D image, or one slice of a volume (prepared once per volume)."""
    spec, size = resolve_spec(spec), _size(image_size)
    finish = [EnsureChannelsd("image", channels=channels), EnsureTyped("image", dtype=torch.float32)]
    if spec["kind"] == "image":
        resize = Resized("image", spatial_size=size, mode="bilinear", anti_aliasing=spec["anti_aliasing"])
        return [
            image_loader(spec, data_root),
            EnsureChannelFirstd("image"),
            finish[0],
            _intensity(spec),
            resize,
            finish[1],
        ]
    volume = Compose(_volume_steps(spec, size, checks=[], data_root=data_root))
    return [CachedVolumed("image", volume), SelectSliced("image", axis=spec["slice_axis"]), *finish]


def input_transforms(spec: dict, image_size, channels: int, check: bool = True) -> Compose:
    """Whole inference inputs, as the bundle's inference, MONAI Deploy and MONAI Label receive them.

    A volume keeps its depth and is prepared exactly as ``item_transforms`` prepares the volume its slices come
    from; a 2D image goes through the very transforms of ``item_transforms``. ``check`` adds ``CheckInputd``
    once the channel axis is known, before intensity scaling could hide non-finite or blank input.
    """
    from .deploy import CheckInputd

    spec, size = resolve_spec(spec), _size(image_size)
    checks = [CheckInputd("image", spatial_dims=3 if spec["kind"] == "volume" else 2, channels=channels)] * check
    if spec["kind"] == "image":  # the checks go right after the channel axis is made
        steps = item_transforms(spec, image_size, channels)
        return Compose([*steps[:2], *checks, *steps[2:]])
    finish = [EnsureChannelsd("image", channels=channels), EnsureTyped("image", dtype=torch.float32)]
    return Compose([*_volume_steps(spec, size, checks), *finish])


def _in_plane(size: list[int], axis: int) -> list[int]:
    """The 3D resize target that keeps ``axis`` (the slice axis) and sets the other two to ``size``."""
    target = list(size)
    target.insert(axis, -1)
    return target
