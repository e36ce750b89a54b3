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


class StrictImageLoader:
    """Load an image with exactly one reader and check it.

    MONAI's ``LoadImage`` falls back to every other registered reader when the chosen one fails; for a truncated
    ``.nii.gz`` ITK then returns garbage voxels without an error. Here a named reader is the only one tried;
    without a name, the one reader MONAI would try first for that file suffix is the only one tried.
    """

    def __init__(
        self,
        reader: str | None = "NibabelReader",
        data_root: str | None = None,
        allow_constant: bool = False,
        reader_args: dict | None = None,
    ):
        # reader_args go to the named reader's constructor, e.g. PILReader's reverse_indexing
        self.loader = LoadImage(reader=reader, image_only=True, **(reader_args or {}))
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
        if report_file:
            from .reports import write_json

            write_json(report_file, {"skipped_items": len(items) - len(kept), "bad_files": reasons})
    if not kept:
        raise BadInputError(f"every input is bad ({len(reasons)} file(s)); first: {next(iter(reasons.values()))}")
    return kept
