"""MONAI transforms that MONAI lacks for AE-FLOW: 3D-to-2D slice selection, channel matching, a per-volume cache
for slice items, local (CLAHE) histogram equalisation, a deterministic grid-phase shift for training, and loading
without a silent reader fallback (the frozen encoder's features are cached by ``scripts.feature_cache``).

Everything else in the pipelines (loading with nibabel or ITK, orientation, intensity scaling, resizing) is
MONAI's own and wired in the JSON configs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRangePercentilesd
from monai.transforms.utils import rescale_array
from monai.utils import convert_to_dst_type, convert_to_numpy
from skimage.exposure import equalize_adapthist

from .inputs import BadInputError, StrictImageLoader


class LocalHistogramEqualised(MapTransform):
    """Contrast-limited adaptive histogram equalisation (CLAHE, scikit-image's ``equalize_adapthist``) of a
    channel-first 2D image, to [0, 1].

    MONAI's ``HistogramNormalized`` equalises one histogram over the whole image; CLAHE equalises each tile
    (``kernel_fraction`` of each side, rounded: 1/8 as in scikit-image) with its contrast gain limited by
    ``clip_limit``, a common preparation of chest films that raises faint local detail wherever the exposure puts
    it. On this bundle's Chest X-ray study it scored below the global equalisation (docs/results.md), so it is a
    mode to measure, not a default. The image is first min-max scaled, as ``equalize_adapthist`` expects; a colour
    image is equalised on its HSV value channel (scikit-image's rule), a grey one directly.
    """

    def __init__(
        self,
        keys: KeysCollection,
        clip_limit: float = 0.01,
        kernel_fraction: float = 0.125,
        num_bins: int = 256,
        allow_missing_keys=False,
    ):
        super().__init__(keys, allow_missing_keys)
        if not 0.0 < clip_limit <= 1.0 or not 0.0 < kernel_fraction <= 1.0 or int(num_bins) < 2:
            raise ValueError(
                "clahe needs 0 < clip_limit <= 1, 0 < kernel_fraction <= 1 and num_bins >= 2, got "
                f"{clip_limit}, {kernel_fraction} and {num_bins}."
            )
        self.clip_limit, self.kernel_fraction, self.num_bins = float(clip_limit), float(kernel_fraction), int(num_bins)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.ndim != 3 or image.shape[0] not in (1, 3):
                raise ValueError(
                    f"clahe equalises channel-first 2D grey or RGB images, got shape {tuple(image.shape)} for {key!r}."
                )
            array = rescale_array(convert_to_numpy(image, dtype=np.float64), 0.0, 1.0, dtype=None)
            kernel = [max(int(round(side * self.kernel_fraction)), 1) for side in array.shape[1:]]
            grey = array.shape[0] == 1
            plane = array[0] if grey else np.moveaxis(array, 0, -1)
            equalised = equalize_adapthist(plane, kernel_size=kernel, clip_limit=self.clip_limit, nbins=self.num_bins)
            equalised = equalised[None] if grey else np.moveaxis(equalised, -1, 0)
            d[key] = convert_to_dst_type(np.ascontiguousarray(equalised), image, dtype=torch.float32)[0]
        return d


class PercentileScaled(ScaleIntensityRangePercentilesd):
    """MONAI's percentile scaling, refusing an input whose two percentiles coincide (a volume under 0.5 % of whose
    voxels are not background): MONAI then warns and passes the raw intensities on, unscaled and unclipped."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        for key in self.key_iterator(dict(data)):
            low, high = np.percentile(convert_to_numpy(data[key]), [self.scaler.lower, self.scaler.upper])
            if low == high:
                source = (getattr(data[key], "meta", None) or {}).get("filename_or_obj", "the input image")
                raise BadInputError(
                    f"{source}: its {self.scaler.lower:g} and {self.scaler.upper:g} percentiles are both "
                    f"{low:g} (almost every voxel is background), so percentile scaling cannot spread it over [0, 1]"
                )
        return super().__call__(data)


class SelectSliced(MapTransform):
    """Take the 2D slice ``data[slice_key]`` along spatial ``axis`` of a channel-first 3D volume.

    A slice-level datalist item ``{"image": "case.nii.gz", "slice": 40, "label": 1}`` thus becomes a 2D image;
    this is how the bundle slices BraTS-like volumes on the fly (paper 3.1).
    """

    def __init__(self, keys: KeysCollection, slice_key: str = "slice", axis: int = 2, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.slice_key = slice_key
        self.axis = axis

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.slice_key not in d:
            raise KeyError(f"SelectSliced needs the slice index under {self.slice_key!r} in each datalist item.")
        index = int(d[self.slice_key])
        for key in self.key_iterator(d):
            volume = d[key]
            if volume.ndim != 4:
                raise ValueError(
                    f"SelectSliced expects a channel-first 3D volume (C, H, W, D) for {key!r}, got shape "
                    f"{tuple(volume.shape)} from {getattr(volume, 'meta', {}).get('filename_or_obj', 'input')}."
                )
            depth = volume.shape[self.axis + 1]
            if not 0 <= index < depth:
                raise IndexError(f"Slice {index} is outside the volume's {depth} slices along axis {self.axis}.")
            d[key] = volume.select(self.axis + 1, index)
        return d


class GridShiftd(MapTransform):
    """Move an image right and down by the whole pixels of its item's ``shift_key`` (``[right, down]``), filling
    the uncovered border by reflection; an item without it stays as it is.

    The frozen encoder samples the image on a grid of its stride; shifting by half a stride shows it the same film at
    another phase of that grid. Deterministic per item, so the shifted images' features are cached like any other
    (``scripts.datalists.with_grid_phases`` lists the phases of each training item)."""

    def __init__(self, keys: KeysCollection, shift_key: str = "grid_shift", allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.shift_key = shift_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.shift_key not in d:
            return d
        right, down = (int(step) for step in d[self.shift_key])
        for key in self.key_iterator(d):
            image = d[key]
            height, width = image.shape[-2:]
            if image.ndim != 3 or not (0 <= right < width and 0 <= down < height):
                raise ValueError(
                    f"GridShiftd shifts channel-first 2D images by less than their size, got shape "
                    f"{tuple(image.shape)} and shift {[right, down]} for {key!r}."
                )
            padded = F.pad(torch.as_tensor(image)[None], (right, 0, down, 0), mode="reflect")[0]
            d[key] = convert_to_dst_type(padded[..., :height, :width].contiguous(), image)[0]
        return d


def grid_phase_transforms(phases: int) -> list:
    """What moves each training item to its grid phase: nothing at one phase, ``GridShiftd`` otherwise (the items
    come from ``scripts.datalists.with_grid_phases``)."""
    return [GridShiftd("image")] if phases > 1 else []


class EnsureChannelsd(MapTransform):
    """Bring images to the network's channel count: colour to gray by channel mean, gray to colour by repetition."""

    def __init__(self, keys: KeysCollection, channels: int = 1, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}.")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] == self.channels:
                continue
            if self.channels == 1:
                d[key] = image[:3].mean(dim=0, keepdim=True)
            elif image.shape[0] == 1:
                d[key] = image.repeat(3, *([1] * (image.ndim - 1)))
            else:
                raise ValueError(f"Cannot turn a {image.shape[0]}-channel image into {self.channels} channels.")
        return d


class CachedVolumed(MapTransform):
    """Apply volume-level transforms once per volume and hand out copies to every slice item of that volume.

    A slice-level datalist names the same volume once per slice; loading, reorienting and percentile-scaling it
    again for each slice costs about a second per slice here. Items of a datalist are grouped by volume, so a
    small least-recently-used cache of preprocessed volumes removes that repetition.
    """

    def __init__(self, keys: KeysCollection, transform, cache_size: int = 2, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.transform = transform
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def _volume(self, key: Hashable, source) -> torch.Tensor:
        cache_key = (key, str(source))
        with self._lock:
            if cache_key in self._cache:
                self._cache.move_to_end(cache_key)
                return self._cache[cache_key]
        volume = self.transform({key: source})[key]
        with self._lock:
            self._cache[cache_key] = volume
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return volume

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._volume(key, d[key]).clone()  # a private copy: later transforms append to its metadata
        return d


class StrictLoadImaged(MapTransform):
    """``LoadImaged`` without the silent fallback to other readers, plus the checks of ``inputs.StrictImageLoader``.

    The named reader (or, with ``reader=None``, the one MONAI prefers for the file's suffix) is the only one
    tried; a missing, empty, unreadable, non-finite or constant image raises ``BadInputError`` naming the file
    and the reason, and so does a path outside ``data_root`` when that is set.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: str | None = "NibabelReader",
        reader_args: dict | None = None,
        data_root: str | None = None,
        allow_constant: bool = False,
        eight_bit_ceiling: float | None = None,
        allow_missing_keys=False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.loader = StrictImageLoader(reader, data_root, allow_constant, reader_args, eight_bit_ceiling)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
