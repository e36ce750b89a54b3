"""The frozen-encoder feature cache: the same numbers as encoding on the fly, reuse from disk, and no stale,
half-written or foreign entry ever reused."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandFlipd, Resized, ScaleIntensityd
from PIL import Image
from scripts.feature_cache import FeatureCacheDataset
from scripts.losses import AEFlowLoss
from scripts.networks import AEFlow

SIZE = 32


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    items = []
    for k in range(6):
        path = folder / f"image_{k}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(path)
        items.append({"image": str(path), "label": k % 2})
    return items


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return AEFlow(encoder="efficientnet-lite0", encoder_weights="none", image_size=SIZE, flow_blocks=2).eval()


def _preprocessing(size: int = SIZE) -> Compose:
    return Compose(
        [
            LoadImaged("image", reader="PILReader"),
            EnsureChannelFirstd("image"),
            ScaleIntensityd("image"),
            Resized("image", spatial_size=(size, size)),
        ]
    )


def _dataset(items, network, cache_dir=None, size=SIZE, **kwargs):
    return FeatureCacheDataset(
        items, _preprocessing(size), encoder=network.encoder, cache_dir=cache_dir, encode_batch_size=4, **kwargs
    )


def test_cached_features_give_the_same_loss_and_scores_as_encoding_on_the_fly(images, network):
    dataset = _dataset(images, network)
    batch = torch.stack([dataset[k]["image"].as_tensor() for k in range(len(images))])
    cached = torch.stack([dataset[k]["features"] for k in range(len(images))])
    with torch.no_grad():
        torch.testing.assert_close(cached, network.encoder(batch), atol=1e-5, rtol=1e-4)
        loss = AEFlowLoss(alpha=0.5)
        network.train()
        on_the_fly, from_cache = network(batch), network(batch, cached)
        network.eval()
        torch.testing.assert_close(
            loss(*from_cache, batch)["loss"], loss(*on_the_fly, batch)["loss"], atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            network.score(batch, cached)["score"], network.score(batch)["score"], atol=1e-5, rtol=1e-4
        )


def test_disk_cache_is_reused_and_keyed_by_preprocessing(images, network, tmp_path):
    first = _dataset(images, network, tmp_path)
    assert first.disk_hits == 0 and len(list(tmp_path.glob("*.pt"))) == len(images)
    again = _dataset(images, network, tmp_path)
    assert again.disk_hits == len(images)
    torch.testing.assert_close(again[3]["features"], first[3]["features"])
    assert again[3]["image"].meta["filename_or_obj"] == images[3]["image"]
    resized = _dataset(images, network, tmp_path, size=2 * SIZE)  # another image size: another key, not reused
    assert resized.disk_hits == 0 and resized[0]["features"].shape[-1] == 2 * SIZE // 16


def test_another_spelling_of_the_same_path_reuses_the_cache(images, network, tmp_path, monkeypatch):
    _dataset(images, network, tmp_path)
    folder = Path(images[0]["image"]).parent
    monkeypatch.chdir(folder.parent)
    respelt = [{**item, "image": f"./{folder.name}/../{folder.name}/{Path(item['image']).name}"} for item in images]
    assert _dataset(respelt, network, tmp_path).disk_hits == len(images)


def test_the_cache_follows_the_files_content_not_its_modification_time(images, network, tmp_path):
    copies = tmp_path / "copies"
    copies.mkdir()
    items = []
    for item in images[:3]:
        copy = copies / Path(item["image"]).name
        copy.write_bytes(Path(item["image"]).read_bytes())
        items.append({**item, "image": str(copy)})
    cache = tmp_path / "cache"
    first = _dataset(items, network, cache)
    for item in items:  # the same bytes written again, later: a data set copied afresh
        Path(item["image"]).write_bytes(Path(item["image"]).read_bytes())
        os.utime(item["image"], (1, 1))
    assert _dataset(items, network, cache).disk_hits == len(items)
    edited = Path(items[0]["image"])
    Image.fromarray(np.zeros((40, 48), dtype=np.uint8)).save(edited)  # new content: encoded again
    again = _dataset(items, network, cache)
    assert again.disk_hits == len(items) - 1
    assert not torch.equal(again[0]["features"], first[0]["features"])


def test_a_file_shared_by_many_items_is_read_once_for_its_digest(images, tmp_path, monkeypatch):
    """Slices of one volume are items of one file: its digest is computed once, not once per slice."""
    from scripts import feature_cache

    feature_cache._content_digest.cache_clear()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: (opened.append(str(path)), real_open(path, *a, **k))[1])
    digests = {feature_cache.file_digest(images[0]["image"]) for _ in range(5)}
    assert len(digests) == 1 and opened.count(images[0]["image"]) == 1


def test_another_encoder_never_reuses_the_cache(images, network, tmp_path):
    _dataset(images, network, tmp_path)
    other = AEFlow(encoder="efficientnet-lite1", encoder_weights="none", image_size=SIZE, flow_blocks=2)
    assert _dataset(images, other, tmp_path).disk_hits == 0


def test_onnx_runtime_features_never_mix_with_pytorchs(images, tmp_path):
    """Evaluation scores with ONNX Runtime's encoder on a CPU (``encoder_runtime: auto``), training encodes with
    PyTorch's: each reads its own entries, and PyTorch's keep the key they had before runtimes existed."""
    torch.manual_seed(0)
    network = AEFlow(encoder="efficientnet-lite0", encoder_weights="none", image_size=SIZE, flow_blocks=2).eval()
    torch_keyed = _dataset(images, network, tmp_path).fingerprint
    network.encoder.use_runtime("auto")
    scored = _dataset(images, network, tmp_path)
    assert scored.disk_hits == 0 and scored.fingerprint != torch_keyed
    assert _dataset(images, network, tmp_path).disk_hits == len(images)  # and its own are reused
    on_gpu = FeatureCacheDataset([], _preprocessing(), encoder=network.encoder, device="cuda")  # auto: PyTorch there
    assert (
        on_gpu.fingerprint
        == FeatureCacheDataset([], _preprocessing(), encoder=network.encoder.use_runtime("torch")).fingerprint
    )


def test_half_written_cache_file_is_detected_and_rebuilt(images, network, tmp_path, caplog):
    reference = _dataset(images, network, tmp_path)
    victim = sorted(tmp_path.glob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:100])  # what a crash during a non-atomic write would leave
    with caplog.at_level(logging.WARNING):
        rebuilt = _dataset(images, network, tmp_path)
    assert rebuilt.disk_hits == len(images) - 1
    assert str(victim) in caplog.text and "unreadable" in caplog.text
    for k in range(len(images)):
        torch.testing.assert_close(rebuilt[k]["features"], reference[k]["features"])
    assert torch.load(victim, weights_only=True)["fingerprint"] == rebuilt.fingerprint  # rewritten whole


def test_cache_refuses_random_transforms_and_unwritable_folders(images, network, tmp_path):
    random_pipeline = Compose([*_preprocessing().transforms, RandFlipd("image", prob=0.5)])
    with pytest.raises(ValueError, match="random transforms"):
        FeatureCacheDataset(images, random_pipeline, encoder=network.encoder)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="not writable"):
        _dataset(images, network, blocker / "cache")
