"""The documented exports at the paper's 256 x 256: ``ckpt_export`` (traced TorchScript, metadata and inference
config embedded) and ``onnx_export`` give the eager network's anomaly maps, and so its image scores.

The exported forward returns the anomaly map only; the image score compared is the map's mean, which with the
default ``score_reduction`` "mean" is exactly ``network.score(image)["score"]`` (checked against eager too).
Tolerances: TorchScript 1e-5, ONNX Runtime 1e-4 (absolute and relative). The exports work because the
SSIM term is built from fixed shapes (``scripts.ssim``: depthwise kernels of the traced size), not at run time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ckpt_export, onnx_export
from monai.data import load_net_with_metadata

SIZE, BLOCKS = 256, 2


@pytest.fixture(scope="module")
def exported(bundle_root, tmp_path_factory):
    """A randomly initialised AE-FLOW (real ImageNet EfficientNet-Lite0 encoder), traced to TorchScript."""
    from scripts.networks import AEFlow

    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    net = AEFlow(image_size=SIZE, flow_blocks=BLOCKS)
    with torch.no_grad():  # move the flow and decoder off their initialisation, and calibrate the scorer
        for p in net.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        net.scorer.term_stats.copy_(torch.tensor([[0.1, 0.2], [-0.9, 0.05]]))
    torch.save(net.state_dict(), out / "model.pt")
    common = dict(
        net_id="network_def",
        ckpt_file=str(out / "model.pt"),
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        config_file=str(bundle_root / "configs" / "inference.json"),
        bundle_root=str(bundle_root),
        model_file=str(out / "model.pt"),
        use_trace=True,
        input_shape=[1, 1, SIZE, SIZE],
    )
    ckpt_export(filepath=str(out / "model.ts"), **common)
    return net.eval(), out, common


def _samples():
    torch.manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    phantom = ((xx**2 + yy**2) < 0.6).float() * 0.6 + ((xx - 0.3) ** 2 + yy**2 < 0.02).float() * 0.4
    return [torch.rand(1, 1, SIZE, SIZE), phantom[None, None]]


def test_torchscript_carries_metadata_and_inference_config(exported, bundle_root):
    out = exported[1]
    _, metadata, extra = load_net_with_metadata(str(out / "model.ts"), more_extra_files=("inference.json",))
    assert metadata["version"] == json.loads((bundle_root / "configs" / "metadata.json").read_text())["version"]
    assert "network_data_format" in metadata
    assert json.loads(extra["inference.json"])["preprocessing"]["_target_"] == "scripts.preprocessing.input_transforms"


def _compare(net, exported_forward, tolerance):
    for image in _samples():
        with torch.no_grad():
            eager = net(image)
            eager_score = net.score(image)["score"]
            exported_map = exported_forward(image)
        assert eager.shape == exported_map.shape == (1, 1, SIZE, SIZE)
        assert eager.std() > 0  # a map that varies, so agreement is not trivial
        torch.testing.assert_close(exported_map, eager, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(eager.mean(dim=(1, 2, 3)), eager_score, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(exported_map.mean().item(), eager_score.item(), atol=tolerance, rtol=tolerance)
        print(f"max |map diff| {float((exported_map - eager).abs().max()):.2e}; score {eager_score.item():.4f}")


def test_torchscript_matches_the_eager_network(exported):
    net, out, _ = exported
    traced = torch.jit.load(str(out / "model.ts")).eval()
    _compare(net, traced, 1e-5)


def test_onnx_matches_the_eager_network(exported):
    import onnxruntime

    net, out, common = exported
    onnx_export(filepath=str(out / "model.onnx"), converter_kwargs={"dynamo": False}, **common)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    _compare(net, lambda image: torch.from_numpy(session.run(None, {name: image.numpy()})[0]), 1e-4)
