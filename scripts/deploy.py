"""Inference for deployment: input checks, the scores and mask that MONAI Deploy and MONAI Label pass on, and
all-or-nothing outputs.

``configs/inference.json`` wires these into MONAI's pipeline, and the same ids serve three consumers: the bundle's
own ``python -m monai.bundle run`` (files on disk), MONAI Deploy's ``MonaiBundleInferenceOperator`` and MONAI
Label's ``monaibundle`` app (both drop ``LoadImage*``/``SaveImage*`` and hand the postprocessing's ``pred`` on,
Deploy cast to uint8). So the postprocessing ends with a 0/1 uint8 "anomaly" mask in ``pred`` and keeps the float
map under ``anomaly_map`` and the scores under ``scores``.

>>> scores = AnomalyScoresd("pred")({"pred": torch.rand(1, 8, 8, 5)})["scores"]
>>> len(scores["slice_scores"]), scores["aggregation"]
(5, 'max')
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Hashable, Mapping

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform

from .inputs import check_array
from .scores import REDUCTIONS, reduce_map
from .transforms import StrictLoadImaged

logger = logging.getLogger(__name__)
VOLUME_AGGREGATION = "max"


def _source(image) -> str:
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj") or "the input image")


def existing_file(path: str, what: str = "file") -> str:
    """Return ``path`` when it is a file; otherwise fail before any output is written, saying what is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} {path!r} does not exist. Train the bundle (README) or pass --ckpt_dir to the folder that "
            "holds model.pt."
        )
    return path


class CheckInputd(MapTransform):
    """Refuse what the network cannot score, naming the file: wrong dimensionality, channel counts that are
    neither the metadata's nor a colour image, and the voxels ``inputs.check_array`` refuses (non-finite,
    constant, beyond float32), which in-memory input from MONAI Deploy has not met in a loader.

    Place it after ``EnsureChannelFirstd`` and before intensity scaling, which would hide NaNs and blank images.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3, channels: int = 1, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        if spatial_dims not in (2, 3):
            raise ValueError(f"input_dims must be 2 (images) or 3 (volumes), got {spatial_dims}.")
        self.spatial_dims = spatial_dims
        self.channels = channels

    def _expected(self) -> str:
        kind = "a 3D volume" if self.spatial_dims == 3 else "a 2D image"
        return f"{kind} with {self.channels} channel(s) (or 3 colour channels or 1 gray channel, converted)"

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image, name = d[key], _source(d[key])
            shape = tuple(image.shape)
            if image.ndim - 1 != self.spatial_dims:
                hint = " (use configs/inference_2d.json for 2D images)" if image.ndim - 1 == 2 else ""
                raise ValueError(
                    f"Input {name} has {image.ndim - 1} spatial dimension(s) (channel-first shape {shape}); "
                    f"expected {self._expected()}{hint}."
                )
            if shape[0] not in {self.channels, 1, 3}:
                raise ValueError(
                    f"Input {name} has {shape[0]} channels (channel-first shape {shape}); expected {self._expected()}, "
                    "as configs/metadata.json network_data_format.inputs.image.num_channels says."
                )
            check_array(image, name)  # the loader's voxel checks, for in-memory input (MONAI Deploy)
        return d


class AnomalyScoresd(MapTransform):
    """Per-slice scores of a channel-first anomaly map on the network's grid, and the volume's score.

    A slice's score is its map reduced with the scorer's ``reduction``: with ``mean`` (the default) that is exactly
    the evaluator's image score of equation (2), because the standardised map is linear in its terms. A volume's
    score is the maximum over its slices (one anomalous slice makes the volume anomalous), as in the bundle's
    ``volume_scores.csv``. A 2D map gives one slice.
    """

    def __init__(
        self,
        keys: KeysCollection,
        scores_key: str = "scores",
        reduction: str = "mean",
        topk_fraction: float = 0.05,
        allow_missing_keys=False,
    ):
        super().__init__(keys, allow_missing_keys)
        if reduction not in REDUCTIONS:
            raise ValueError(f"Unknown score_reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}.")
        self.scores_key = scores_key
        self.reduction = reduction
        self.topk_fraction = topk_fraction

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            score_map = torch.as_tensor(d[key]).float()
            if score_map.ndim == 3:  # (C, H, W): a 2D image is a volume of one slice
                score_map = score_map[..., None]
            slices = score_map.permute(3, 0, 1, 2)  # (D, C, H, W)
            slice_scores = reduce_map(slices, self.reduction, self.topk_fraction)
            top = int(torch.argmax(slice_scores))
            d[self.scores_key] = {
                "source": _source(d[key]),
                "score": float(slice_scores[top]),
                "aggregation": VOLUME_AGGREGATION,
                "max_slice": top,
                "slice_reduction": self.reduction,
                "slice_scores": [float(s) for s in slice_scores],
            }
        return d


class AnomalyMaskd(MapTransform):
    """Turn the float anomaly map into the 0/1 uint8 "anomaly" mask that Deploy and Label pass on.

    The map is in standardised units (z-scores of normal images' terms); pixels above ``threshold`` form the mask.
    The float map stays available under ``map_key``.
    """

    def __init__(
        self, keys: KeysCollection, threshold: float = 3.0, map_key: str = "anomaly_map", allow_missing_keys=False
    ):
        super().__init__(keys, allow_missing_keys)
        self.threshold = float(threshold)
        self.map_key = map_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            score_map = d[key]
            mask = (torch.as_tensor(score_map) > self.threshold).to(torch.uint8)
            if isinstance(score_map, MetaTensor):
                mask = MetaTensor(
                    mask, meta=dict(score_map.meta), applied_operations=list(score_map.applied_operations)
                )
            d[self.map_key] = score_map
            d[key] = mask
        return d


class StagedOutputs:
    """All-or-nothing outputs: the run writes into ``staging_dir``; on completion every file moves into
    ``output_dir`` (each with an atomic rename), on an exception the staging folder is removed.

    So a bad input in the middle of a folder leaves the output folder as it was, never half-written.
    """

    def __init__(self, staging_dir: str, output_dir: str):
        self.staging_dir = Path(staging_dir)
        self.output_dir = Path(output_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    def started(self, engine: Engine | None = None) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)  # leftovers of a killed run
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    def completed(self, engine: Engine | None = None) -> None:
        for path in sorted(p for p in self.staging_dir.rglob("*") if p.is_file()):
            target = self.output_dir / path.relative_to(self.staging_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        logger.info("Inference outputs written to %s.", self.output_dir)

    def failed(self, engine: Engine, error: Exception) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        logger.error("Inference failed; nothing was written to %s.", self.output_dir)
        raise error


def read_input(path: str | os.PathLike, reader: str = "NibabelReader") -> tuple[np.ndarray, dict]:
    """An image file as a Deploy app hands it to the bundle operator: the array (gray images without a channel
    axis) and MONAI's metadata (affine, original channel dimension), read with the bundle's strict loader."""
    image = StrictLoadImaged("image", reader)({"image": str(path)})["image"]
    meta = dict(image.meta)
    meta["filename_or_obj"] = str(path)
    return image.numpy(), meta


def _stem(source: str) -> str:
    name = Path(source).name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".mha", ".nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _nifti_bytes(array: np.ndarray, affine) -> bytes:
    affine = to_affine_nd(3, np.asarray(affine, dtype=np.float64))
    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes(), compresslevel=6)


def write_report(output_dir: str | os.PathLike, post: Mapping) -> dict[str, Path]:
    """Write one input's float anomaly map, 0/1 mask (NIfTI, on the input's grid) and scores (JSON).

    ``post`` is the postprocessing's output (``anomaly_map``, ``pred``, ``scores``). All files are complete before
    any of them appears in ``output_dir``.
    """
    score_map, mask, scores = post["anomaly_map"], post["pred"], dict(post["scores"])
    affine = getattr(score_map, "affine", None)
    affine = np.eye(4) if affine is None else affine.cpu().numpy() if torch.is_tensor(affine) else affine
    stem = _stem(scores.get("source", "input"))
    contents = {
        f"{stem}_anomaly_map.nii.gz": _nifti_bytes(np.asarray(score_map, dtype=np.float32)[0], affine),
        f"{stem}_anomaly_mask.nii.gz": _nifti_bytes(np.asarray(mask, dtype=np.uint8)[0], affine),
        f"{stem}_scores.json": (json.dumps(scores, indent=4) + "\n").encode(),
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staged = {}
    try:
        for name, data in contents.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=output_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            staged[name] = tmp
        for name, tmp in staged.items():
            os.replace(tmp, output_dir / name)
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return {name: output_dir / name for name in contents}
