"""The frozen encoder's features, computed once per image, in batches, and optionally kept on disk.

The encoder never trains (paper 3.2), so running it every epoch repeats the same work; per item, as a transform
inside ``CacheDataset``, it also runs at batch size 1, the slowest way on a CPU. ``FeatureCacheDataset`` is a
``CacheDataset`` that runs the bundle's deterministic MONAI transforms per item as usual, then the encoder over
the cached images in batches, and stores ``features`` in each cached item; ``AEFlow.forward(image, features)``
then skips the encoder.

With ``cache_dir`` every item is also written to disk (atomically), keyed by the item, its file's content
(SHA-1 of the bytes), and a fingerprint of the preprocessing and the encoder (its name, a digest of its weights,
and its runtime where that is not PyTorch: evaluation's ONNX Runtime features never mix with training's). A
change of any of them selects another key, so a stale entry is never reused; a file that cannot be read (a crash
while writing, a truncated copy) or whose stored fingerprint or shape does not match is reported and rebuilt.
Random transforms after the cached ones disable nothing here, but their output would no longer match the cached
features: the constructor refuses a pipeline with random transforms when an encoder is given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from monai.data import CacheDataset, MetaTensor
from monai.transforms import Compose, RandomizableTrait, Transform
from monai.utils import convert_to_tensor
from tqdm import tqdm

from .options import flag
from .reports import atomic_path

logger = logging.getLogger(__name__)
CACHE_FORMAT = 1


def describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform pipeline's settings, for the cache fingerprint."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (list, tuple)):
        return [describe(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, torch.dtype):
        return str(obj)
    if depth < 6 and hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        fields = {k: v for k, v in vars(obj).items() if not k.startswith("_") and k not in ("R", "lazy")}
        return {"class": type(obj).__name__, **{k: describe(v, depth + 1) for k, v in sorted(fields.items())}}
    return type(obj).__name__


def file_digest(path: str) -> str:
    """SHA-1 of a file's bytes (0.02 ms for a Chest X-ray JPEG), computed once per file and process: every slice
    item of a volume, and both the read and the write of a cache miss, share their file's digest."""
    stat = os.stat(path)
    return _content_digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:  # size and time: a changed file is read again
    digest = hashlib.sha1()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encoder_digest(encoder: torch.nn.Module) -> str:
    """Digest of the encoder's class and weights: another encoder or other weights give another digest."""
    digest = hashlib.sha1(type(encoder).__name__.encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FeatureCacheDataset(CacheDataset):
    """``CacheDataset`` whose cached items also hold the frozen encoder's features (``encoder=None``: none).

    Args:
        data: datalist items.
        transform: the deterministic preprocessing (a ``Compose``); random transforms are refused with an encoder.
        encoder: the frozen encoder, or None to cache images only.
        cache_features: false to cache images only (the ``cache_features`` key, as typed on the command line).
        cache_dir: folder for the on-disk cache, or None for memory only.
        encode_batch_size: images per encoder call.
        device: where the encoder runs.
        kwargs: passed on to ``CacheDataset`` (``num_workers``, ``progress``, ...).
    """

    def __init__(
        self,
        data: Sequence,
        transform: Compose,
        encoder: torch.nn.Module | None = None,
        cache_features: bool | str = True,
        cache_dir: str | os.PathLike | None = None,
        encode_batch_size: int = 32,
        device: torch.device | str = "cpu",
        image_key: str = "image",
        features_key: str = "features",
        **kwargs,
    ):
        encoder = encoder if flag(cache_features, "cache_features") else None
        if encoder is not None and any(isinstance(t, RandomizableTrait) for t in transform.flatten().transforms):
            raise ValueError(
                "The feature cache is off limits with random transforms: features of one augmented view would be "
                "reused for every other view. Set cache_features to false to train with random augmentation."
            )
        self.encoder = encoder
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.encode_batch_size = int(encode_batch_size)
        self.device = torch.device(device)
        self.image_key = image_key
        self.features_key = features_key
        self.fingerprint = self._fingerprint(transform)
        if self.cache_dir is not None:
            self._check_writable(self.cache_dir)
        self.disk_hits = 0
        super().__init__(data, transform, cache_rate=1.0, **kwargs)

    def _fingerprint(self, transform: Compose) -> str:
        description = {
            "format": CACHE_FORMAT,
            "preprocessing": describe([t for t in transform.flatten().transforms if isinstance(t, Transform)]),
            "encoder": encoder_digest(self.encoder) if self.encoder is not None else None,
        }
        runtime = getattr(self.encoder, "runtime_for", lambda device: "torch")(self.device)
        if runtime != "torch":  # ONNX Runtime's features round differently: never mixed with PyTorch's
            description["runtime"] = runtime
        return hashlib.sha1(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()

    @staticmethod
    def _check_writable(folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / ".write_test"):
                pass
        except OSError as error:
            raise PermissionError(
                f"Feature cache directory {str(folder)!r} is not writable ({error}); choose another with "
                "--feature_cache_dir, or set it to null to keep the cache in memory."
            ) from error

    def _item_key(self, item: dict) -> str:
        """Keyed by the image's real path, so ``./data/x/../a.png`` and ``/abs/a.png`` share one entry, and by its
        content: a data set copied afresh (new modification times, same bytes) keeps its cache, an edited file
        does not."""
        source = str(item.get(self.image_key, ""))
        is_file = os.path.isfile(source)
        fields = {k: str(v) for k, v in sorted(item.items())}
        if is_file:
            fields[self.image_key] = os.path.realpath(source)
        described = {"item": fields, "file": file_digest(source) if is_file else None, "fingerprint": self.fingerprint}
        return hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def _cache_file(self, idx: int) -> Path:
        return self.cache_dir / f"{self._item_key(self.data[idx])}.pt"

    def _read(self, idx: int) -> dict | None:
        """A cached item from disk, or None when absent, unreadable or not of this fingerprint (all reported)."""
        path = self._cache_file(idx)
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a crash while writing, a truncated copy: rebuild, never trust
            logger.warning("Feature cache file %s is unreadable (%s); rebuilding it.", path, error)
            return None
        if stored.get("fingerprint") != self.fingerprint or (self.encoder is not None) != (
            self.features_key in stored["item"]
        ):
            logger.warning("Feature cache file %s belongs to another preprocessing or encoder; rebuilding it.", path)
            return None
        item = dict(stored["item"])
        item[self.image_key] = MetaTensor(item[self.image_key], meta={"filename_or_obj": stored["source"]})
        return item

    def _write(self, idx: int, item: dict) -> None:
        plain = {
            k: convert_to_tensor(v, track_meta=False) if isinstance(v, torch.Tensor) else v for k, v in item.items()
        }
        plain = {k: v for k, v in plain.items() if isinstance(v, (torch.Tensor, int, float, str))}
        record = {"fingerprint": self.fingerprint, "source": str(self.data[idx].get(self.image_key)), "item": plain}
        with atomic_path(self._cache_file(idx)) as tmp:
            torch.save(record, tmp)

    @torch.no_grad()
    def _encode(self, computed: dict[int, dict]) -> None:
        """Encode in batches; each batch is written to the disk cache at once, so an interrupted run keeps it."""
        self.encoder.to(self.device).eval()
        indices = list(computed)
        batches = range(0, len(indices), self.encode_batch_size)
        for start in tqdm(batches, desc="Encoding features", unit="batch", disable=not self.progress):
            chunk = indices[start : start + self.encode_batch_size]
            images = torch.stack([convert_to_tensor(computed[i][self.image_key], track_meta=False) for i in chunk])
            features = self.encoder(images.float().to(self.device)).cpu()
            for idx, feature in zip(chunk, features):
                computed[idx][self.features_key] = feature.clone()
                if self.cache_dir is not None:
                    self._write(idx, computed[idx])

    def _fill_cache(self, indices=None) -> list:
        indices = list(range(self.cache_num)) if indices is None else list(indices)
        found = {idx: self._read(idx) for idx in indices} if self.cache_dir is not None else {}
        found = {idx: item for idx, item in found.items() if item is not None}
        self.disk_hits = len(found)
        missing = [idx for idx in indices if idx not in found]
        computed = dict(zip(missing, super()._fill_cache(missing))) if missing else {}
        if computed and self.encoder is not None:
            logger.info(
                "Encoding %d image(s) with the frozen encoder, %d per batch.", len(computed), self.encode_batch_size
            )
            self._encode(computed)
        elif self.cache_dir is not None:
            for idx, item in computed.items():
                self._write(idx, item)
        if self.cache_dir is not None:
            logger.info("Feature cache %s: %d item(s) reused, %d computed.", self.cache_dir, len(found), len(computed))
        return [found[idx] if idx in found else computed[idx] for idx in indices]
