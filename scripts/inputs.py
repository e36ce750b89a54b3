"""Input screening: every image that enters training or evaluation is a readable, non-empty file (inside the data
root when one is set) whose voxels are finite, not all equal, and in a range float32 arithmetic can scale.

Each refusal is a ``BadInputError`` naming the file and the reason. Training fails on the first bad input by
default; with ``skip_bad_inputs`` the bad ones are left out, logged and listed in a JSON report, never silently.

>>> check_path("/data/missing.nii.gz")  # doctest: +SKIP
BadInputError: /data/missing.nii.gz: the file does not exist
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch
from monai.transforms import LoadImage

from .options import flag

logger = logging.getLogger(__name__)
FLOAT32_MAX = float(np.finfo(np.float32).max)
# PIL modes whose values are grey levels or RGB as they are; other modes are converted (``plain_pil_mode``)
PLAIN_PIL_MODES = ("L", "RGB", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")
HIGH_BIT_PIL_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
GREY_PIL_MODES = ("1", "LA", "La")


try:  # a web framework that serves the bundle (MONAI Label's FastAPI server) answers these with their message
    from starlette.exceptions import HTTPException as _ServedError
except ImportError:  # pragma: no cover - starlette comes with mlflow
    _ServedError = None


class BadInputError(ValueError, *((_ServedError,) if _ServedError else ())):
    """An input image that cannot be used; the message starts with the file's path.

    It is also Starlette's ``HTTPException`` (status 422, the message as its detail), so a MONAI Label client
    that sends a bad image reads why it was refused instead of a bare "Internal Server Error".
    """

    status_code = 422  # what Starlette's HTTPException handler reads: the status, the detail, no extra headers
    headers = None

    def __init__(self, message: str):
        super().__init__(message)
        self.detail = message

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_path(path, data_root: str | None = None) -> str:
    """The path of an existing, non-empty regular file, inside ``data_root`` when that is set."""
    if not isinstance(path, (str, os.PathLike)):
        raise BadInputError(f"{path!r}: expected a file path, got a {type(path).__name__}")
    path = os.fspath(path)
    if data_root:
        root = os.path.realpath(data_root)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise BadInputError(f"{path}: the path points outside the data root {data_root}")
    if not os.path.exists(path):
        raise BadInputError(f"{path}: the file does not exist")
    if os.path.isdir(path):
        raise BadInputError(f"{path}: a directory where an image file is expected")
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise BadInputError(f"{path}: the file is empty")
    if not os.access(path, os.R_OK):
        raise BadInputError(f"{path}: the file is not readable (permissions)")
    return path


def check_array(image, path, allow_constant: bool = False) -> None:
    """Refuse voxels that would poison training: NaN/Inf, a constant image, or a range float32 cannot hold."""
    data = torch.as_tensor(image)
    if data.numel() == 0:
        raise BadInputError(f"{path}: the image has no voxels (shape {tuple(data.shape)})")
    if data.ndim < 2:
        raise BadInputError(f"{path}: expected an image with at least 2 dimensions, got shape {tuple(data.shape)}")
    if data.is_floating_point() or data.is_complex():
        finite = torch.isfinite(data)
        if not finite.all():
            nan, inf = int(torch.isnan(data).sum()), int(torch.isinf(data).sum())
            raise BadInputError(f"{path}: the image has non-finite voxels ({nan} NaN, {inf} Inf)")
    low, high = float(data.min()), float(data.max())
    if not allow_constant and low == high:
        raise BadInputError(f"{path}: the image is constant (every voxel is {low:g}); it carries no information")
    if high - low > FLOAT32_MAX:
        raise BadInputError(
            f"{path}: the intensity range [{low:g}, {high:g}] overflows float32 arithmetic; rescale the image"
        )


def plain_pil_mode(image):
    """A PIL image as grey levels or RGB. PILReader hands over a file's raw values, so without this a palette image
    is read as its palette indices, an alpha channel is averaged into grey and a CMYK JPEG turns black."""
    if image.mode in PLAIN_PIL_MODES:
        return image
    return image.convert("L" if image.mode in GREY_PIL_MODES else "RGB")


def check_bit_depth(image, path, eight_bit_ceiling: float | None) -> None:
    """Refuse a 16- or 32-bit image whose values lie beyond an 8-bit fixed intensity range (``eight_bit_ceiling``,
    the range's upper end): that range would clip it to white."""
    mode = getattr(image, "meta", {}).get("mode")
    if eight_bit_ceiling is None or mode not in HIGH_BIT_PIL_MODES:
        return
    high = float(torch.as_tensor(image).max())
    if high > eight_bit_ceiling:
        raise BadInputError(
            f"{path}: a {mode} image with values up to {high:g}, but this model reads 2D images on a fixed range "
            f"that ends at {eight_bit_ceiling:g} (input_spec intensity 'range'), which would clip it to white; convert the "
            'images to 8 bits, or train with --image_intensity \'{"mode": "percentiles", "lower": 0.5, "upper": 99.5}\''
        )


class StrictImageLoader:
    """Load an image with exactly one reader and check it.

    MONAI's ``LoadImage`` falls back to every other registered reader when the chosen one fails; for a truncated
    ``.nii.gz`` ITK then returns garbage voxels without an error. Here a named reader is the only one tried;
    without a name, the one reader MONAI would try first for that file suffix is the only one tried. PIL images
    come as grey levels or RGB (``plain_pil_mode``); ``eight_bit_ceiling`` refuses high-bit images that an 8-bit
    fixed range would clip (``check_bit_depth``).
    """

    def __init__(
        self,
        reader: str | None = "NibabelReader",
        data_root: str | None = None,
        allow_constant: bool = False,
        reader_args: dict | None = None,
        eight_bit_ceiling: float | None = None,
    ):
        # reader_args go to the named reader's constructor, e.g. PILReader's reverse_indexing
        reader_args = dict(reader_args or {})
        if reader == "PILReader":
            reader_args.setdefault("converter", plain_pil_mode)
        self.loader = LoadImage(reader=reader, image_only=True, **reader_args)
        self.eight_bit_ceiling = eight_bit_ceiling
        self.reader_name = reader
        self.reader = self.loader.readers[-1] if reader else None
        self.data_root = data_root
        self.allow_constant = allow_constant

    def reader_for(self, path: str):
        if self.reader is not None:
            return self.reader
        for reader in reversed(self.loader.readers):  # MONAI's own order of preference
            if reader.verify_suffix(path):
                return reader
        raise BadInputError(f"{path}: no MONAI image reader supports this file type")

    def __call__(self, path):
        path = check_path(path, self.data_root)
        reader = self.reader_for(path)
        try:
            image = self.loader(path, reader=reader)
        except Exception as error:
            raise BadInputError(f"{path}: cannot be read with {type(reader).__name__}: {error}") from error
        check_array(image, path, self.allow_constant)
        check_bit_depth(image, path, self.eight_bit_ceiling)
        return image


def screen_items(
    items: Sequence[dict],
    skip_bad_inputs: bool = False,
    reader: str | None = "NibabelReader",
    data_root: str | None = None,
    report_file: str | None = None,
    reader_args: dict | None = None,
    keys: Sequence[str] = ("image",),
) -> list[dict]:
    """Check a datalist before any data is cached.

    By default only the paths are checked (cheap), and the first bad one raises; the voxels are checked as each
    image is loaded. With ``skip_bad_inputs`` every distinct file is also loaded and checked once here (one extra
    read per file), and the items of bad files are dropped, logged, and listed in ``report_file``.
    """
    if not flag(skip_bad_inputs, "skip_bad_inputs"):
        for item in items:
            for key in keys:
                check_path(item[key], data_root)
        return list(items)
    loader = StrictImageLoader(reader, data_root, reader_args=reader_args)
    reasons: dict[str, str] = {}
    for path in dict.fromkeys(str(item[key]) for item in items for key in keys):
        try:
            loader(path)
        except BadInputError as error:
            reasons[path] = str(error)
    kept = [item for item in items if not any(str(item[key]) in reasons for key in keys)]
    if reasons:
        logger.warning(
            "skip_bad_inputs: left out %d item(s) from %d bad file(s):\n  %s",
            len(items) - len(kept),
            len(reasons),
            "\n  ".join(reasons.values()),
        )
    if report_file:  # also when nothing was bad: an earlier run's report must not stand for this one
        from .reports import write_json

        write_json(report_file, {"skipped_items": len(items) - len(kept), "bad_files": reasons})
    if not kept:
        raise BadInputError(f"every input is bad ({len(reasons)} file(s)); first: {next(iter(reasons.values()))}")
    return kept
