"""Encoders, decoder and the assembled AE-FLOW: shapes, frozen parts, honest weight loading, clear errors."""

import json
import logging

import pytest
import torch
from scripts.decoder import Decoder
from scripts.encoders import EncoderWeightsUnavailable, build_encoder
from scripts.networks import AEFlow


@pytest.mark.parametrize(
    "name,channels", [("efficientnet-lite0", 112), ("efficientnet-lite1", 112), ("efficientnet-lite2", 120)]
)
@pytest.mark.parametrize("size", [256, 128])
def test_efficientnet_lite_imagenet_features_at_stride_16(name, channels, size):
    encoder = build_encoder(name, "imagenet")
    with torch.no_grad():
        features = encoder(torch.rand(1, 1, size, size))
    assert features.shape == (1, channels, size // 16, size // 16)
    assert features.abs().sum() > 0


def test_wide_resnet50_2_shape_at_paper_size_and_another():
    encoder = build_encoder("wide_resnet50_2", "none")
    with torch.no_grad():
        assert encoder(torch.rand(1, 3, 256, 256)).shape == (1, 1024, 16, 16)
        assert encoder(torch.rand(1, 1, 320, 192)).shape == (1, 1024, 20, 12)
    assert encoder.skip_channels == (512, 256, 64)


def test_missing_wide_resnet_weights_stop_with_remedies(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(EncoderWeightsUnavailable, match="efficientnet-lite0") as error:
        build_encoder("wide_resnet50_2", "imagenet")
    assert "--encoder_weights" in str(error.value) and str(tmp_path) in str(error.value)


def test_wide_resnet_weights_from_an_explicit_file_and_untrained_ones_refused(tmp_path):
    from torchvision.models import wide_resnet50_2

    reference = wide_resnet50_2(weights=None)
    torch.save(reference.state_dict(), tmp_path / "untrained.pth")  # keys and shapes fit: only the statistics tell
    with pytest.raises(RuntimeError, match="untrained.pth holds untrained wide_resnet50_2 weights"):
        build_encoder("wide_resnet50_2", str(tmp_path / "untrained.pth"))
    reference.train()
    with torch.no_grad():  # BatchNorm statistics of some images, as any trained network has
        reference(torch.rand(2, 3, 64, 64))
    torch.save(reference.state_dict(), tmp_path / "wrn.pth")
    encoder = build_encoder("wide_resnet50_2", str(tmp_path / "wrn.pth"))
    torch.testing.assert_close(encoder.body[0].weight, reference.conv1.weight)
    torch.testing.assert_close(encoder.body[1].running_mean, reference.bn1.running_mean)


def test_corrupt_weights_file_is_named(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="broken.pth"):
        build_encoder("efficientnet-lite0", str(bad))


def test_random_weights_are_announced(caplog):
    with caplog.at_level(logging.WARNING):
        build_encoder("efficientnet-lite0", "none")
    assert "RANDOM weights" in caplog.text


def test_joined_encoders_concatenate_each_parts_imagenet_features_and_round_trip_a_model_file(tmp_path):
    """``efficientnet-lite0+efficientnet-lite2``: each part's own ImageNet features, side by side on one grid; the
    decoder mirrors both; a model file of it loads with the same encoder and scores the same, on either runtime."""
    from scripts.model_file import network_from_file

    joined, parts = build_encoder("efficientnet-lite0+efficientnet-lite2"), [
        build_encoder(name) for name in ("efficientnet-lite0", "efficientnet-lite2")
    ]
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(joined(images), torch.cat([part(images) for part in parts], dim=1))
    assert joined.out_channels == 232 and joined.skip_channels == (40 + 48, 24 + 24, 16 + 16)
    torch.manual_seed(0)
    network = AEFlow(encoder="efficientnet-lite0+efficientnet-lite2", image_size=64, flow_blocks=2).eval()
    torch.save(network.state_dict(), tmp_path / "model.pt")
    loaded = network_from_file(tmp_path / "model.pt").eval()
    assert loaded.settings["encoder"] == "efficientnet-lite0+efficientnet-lite2" and loaded.feature_shape[0] == 232
    with torch.no_grad():
        expected = network.score(images)["score"]
        assert torch.equal(loaded.score(images)["score"], expected)
        loaded.encoder.use_runtime("onnxruntime")
        assert torch.allclose(loaded.score(images)["score"], expected, atol=1e-3)
    for bad in ("efficientnet-lite0+efficientnet-lite0", "efficientnet-lite0+resnet18"):
        with pytest.raises(ValueError, match="joined by '\\+'"):
            build_encoder(bad, "none")
    with pytest.raises(ValueError, match="its weights are 'imagenet' or 'none'"):
        build_encoder("efficientnet-lite0+efficientnet-lite2", str(tmp_path / "one_file.pth"))


def test_unknown_encoder_names_allowed_values():
    with pytest.raises(ValueError, match="wide_resnet50_2, efficientnet-lite0"):
        build_encoder("resnet18")


def test_decoder_mirrors_encoder_and_matches_target_range():
    decoder = Decoder(1024, (512, 256, 64), out_channels=3)
    out = decoder(torch.randn(1, 1024, 4, 4))
    assert out.shape == (1, 3, 64, 64) and out.min() >= 0 and out.max() <= 1
    transposed = [m for m in decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [m.out_channels for m in transposed] == [512, 256, 64, 3]
    assert all(m.kernel_size == (2, 2) and m.stride == (2, 2) for m in transposed)


def test_decoder_runs_channels_last_with_the_contiguous_layers_results_and_their_weights():
    """Channels-last is a memory order, not a model: weights saved in either order load into the other, and the
    decoder computes what the same layers compute in the default order (float32 rounding apart)."""
    torch.manual_seed(0)
    decoder = Decoder(112, (40, 24, 16), out_channels=1)
    assert decoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = torch.nn.Sequential(*[type(m)(**_layer_args(m)) for m in decoder])  # default memory order
    plain.load_state_dict({k: v.contiguous() for k, v in decoder.state_dict().items()})
    assert plain[0].weight.is_contiguous()
    z = torch.randn(2, 112, 16, 16)
    torch.testing.assert_close(decoder(z), plain(z), atol=1e-5, rtol=1e-5)
    reloaded = Decoder(112, (40, 24, 16), out_channels=1)
    reloaded.load_state_dict(plain.state_dict())  # a model file written before the decoder went channels-last
    assert reloaded[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(reloaded(z), decoder(z))


def _layer_args(module: torch.nn.Module) -> dict:
    if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
        return dict(
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
        )
    return {}


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return AEFlow(encoder="efficientnet-lite0", encoder_weights="imagenet", image_size=64, flow_blocks=8)


def test_only_flow_and_decoder_train_and_encoder_stays_frozen(tiny_net):
    tiny_net.train()
    assert not tiny_net.encoder.training and tiny_net.flow.training
    trainable = {id(p) for p in tiny_net.trainable_parameters()}
    assert all(id(p) not in trainable and not p.requires_grad for p in tiny_net.encoder.parameters())
    expected = {id(p) for p in [*tiny_net.flow.parameters(), *tiny_net.decoder.parameters()] if p.requires_grad}
    assert trainable == expected
    assert len(tiny_net.flow.module_list) == 8


def test_forward_modes(tiny_net):
    image = torch.rand(2, 1, 64, 64)
    tiny_net.train()
    out = tiny_net(image)
    assert out.z_prime.shape == (2, 112, 4, 4) and out.log_jac_det.shape == (2,)
    assert out.reconstruction.shape == image.shape
    tiny_net.eval()
    with torch.no_grad():
        anomaly_map = tiny_net(image)
        scores = tiny_net.score(image)
    assert anomaly_map.shape == (2, 1, 64, 64)
    torch.testing.assert_close(scores["anomaly_map"], anomaly_map)
    assert scores["score"].shape == (2,)
    # cached features give the same result as encoding on the fly
    with torch.no_grad():
        torch.testing.assert_close(tiny_net(image, tiny_net.encoder(image)), anomaly_map)


def test_plain_autoencoder_configuration_has_no_flow():
    net = AEFlow(encoder_weights="none", image_size=32, flow_blocks=0)
    net.train()
    out = net(torch.rand(1, 1, 32, 32))
    assert net.flow is None and float(out.log_jac_det) == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"image_size": 250}, "multiples of the encoder stride 16"),
        ({"subnet": "mlp"}, "cnn2, resnet"),
        ({"beta": -1}, "beta must lie in"),
        ({"in_channels": 2}, "in_channels must be 1"),
        ({"score_reduction": "median"}, "mean, max, topk"),
    ],
)
def test_bad_network_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AEFlow(encoder_weights="none", **{"image_size": 64, **kwargs})


def test_wrong_input_shape_is_explained(tiny_net):
    tiny_net.eval()
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, 64, 64\)"):
        tiny_net(torch.rand(1, 3, 64, 64))


def test_layernorm_affine_lowers_the_loss_for_free_and_the_no_affine_variant_has_none():
    """The learnt affine of ``layernorm`` is a change of volume the flow's likelihood does not count: shrinking it
    lowers the loss with the flow unchanged, which is why that loss is unbounded below. ``layernorm_no_affine``
    standardises the same way with nothing to learn, so the loss cannot be lowered that way."""
    from scripts.losses import flow_nll

    torch.manual_seed(0)
    affine = AEFlow(encoder_weights="none", image_size=64, flow_blocks=2, feature_norm="layernorm").eval()
    features = 5.0 + 3.0 * torch.randn(4, *affine.feature_shape)
    with torch.no_grad():
        before = flow_nll(*affine.flow_only(features)).mean()
        affine.feature_norm.weight.mul_(0.5)
        after = flow_nll(*affine.flow_only(features)).mean()
    assert after < before - 0.2  # 0.5 z'^2 shrinks about 4-fold; nothing counts the volume lost

    fixed = AEFlow(encoder_weights="none", image_size=64, flow_blocks=2, feature_norm="layernorm_no_affine").eval()
    assert list(fixed.feature_norm.parameters()) == []
    inside = fixed.feature_norm(features)
    assert abs(float(inside.mean())) < 1e-3 and abs(float(inside.std()) - 1.0) < 1e-2
    assert torch.allclose(inside, torch.nn.functional.layer_norm(features, fixed.feature_shape))
    with pytest.raises(ValueError, match="layernorm_no_affine"):
        AEFlow(encoder_weights="none", image_size=64, flow_blocks=2, feature_norm="LayerNorm")


def test_feature_norm_is_a_trained_layernorm_or_nothing_and_older_files_mean_nothing(tmp_path):
    """``feature_norm: layernorm`` (FastFlow's) standardises each image's features before the flow and trains with
    it; a model file written before the setting existed loads as the paper's "none"."""
    from scripts.model_file import decode, encode, network_from_file

    torch.manual_seed(0)
    normed = AEFlow(encoder_weights="none", image_size=64, flow_blocks=2, feature_norm="layernorm").eval()
    features = 5.0 + 3.0 * torch.randn(2, *normed.feature_shape)
    inside = normed.feature_norm(features)
    assert abs(float(inside.mean())) < 1e-3 and abs(float(inside.std()) - 1.0) < 1e-2
    assert any(p is normed.feature_norm.weight for p in normed.trainable_parameters())
    with pytest.raises(ValueError, match="Unknown feature_norm 'batch'"):
        AEFlow(encoder_weights="none", image_size=64, flow_blocks=2, feature_norm="batch")
    plain = AEFlow(encoder_weights="none", image_size=64, flow_blocks=2)
    state = plain.state_dict()
    description = decode(state["_extra_state"])
    del description["network"]["feature_norm"]
    state["_extra_state"] = encode(description)
    torch.save(state, tmp_path / "model.pt")
    assert network_from_file(tmp_path / "model.pt").settings["feature_norm"] == "none"


def test_a_model_file_describes_what_validation_chose(tmp_path, capsys):
    """``python -m scripts.model_file describe`` shows the configured settings and, under ``calibration``, the
    reduction and beta that validation chose, which the settings cannot show; an older file (no
    ``reduction_index``) loads with its configured reduction."""
    from scripts.model_file import main, network_from_file
    from scripts.scores import REDUCTIONS

    network = AEFlow(encoder_weights="none", image_size=64, flow_blocks=2, score_reduction="validation")
    network.scorer.reduction_index.fill_(REDUCTIONS.index("topk"))
    network.scorer.set_beta(0.4)
    torch.save(network.state_dict(), tmp_path / "model.pt")
    assert main(["describe", str(tmp_path / "model.pt")]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["network"]["score_reduction"] == "validation"
    assert (
        described["calibration"]["scorer"]["reduction"] == "topk" and described["calibration"]["scorer"]["beta"] == 0.4
    )
    state = AEFlow(encoder_weights="none", image_size=64, flow_blocks=2, score_reduction="max").state_dict()
    del state["scorer.reduction_index"]
    torch.save(state, tmp_path / "old.pt")
    assert network_from_file(tmp_path / "old.pt").scorer.reduction == "max"


def test_onnx_runtime_encoder_follows_the_loaded_weights():
    """The ONNX graph is exported from the weights in place at the first call, and again after a load."""
    torch.manual_seed(0)
    encoder, other = build_encoder("efficientnet-lite0", "none"), build_encoder("efficientnet-lite0", "none")
    images = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        expected, expected_other = encoder(images), other(images)
        encoder.use_runtime("onnxruntime")
        assert torch.allclose(encoder(images), expected, atol=1e-4)
        assert torch.allclose(encoder(images[:1].expand(-1, 3, -1, -1)), expected[:1], atol=1e-4)  # colour input
        encoder.load_state_dict(other.state_dict())
        assert torch.allclose(encoder(images), expected_other, atol=1e-4)
    with pytest.raises(ValueError, match="encoder_runtime must be one of"):
        encoder.use_runtime("tensorrt")


def test_auto_runtime_is_onnx_runtime_on_the_cpu_and_pytorch_on_a_gpu():
    """``auto``, the scoring default: ONNX Runtime where it is faster (the CPU), PyTorch where ONNX Runtime's CPU
    session cannot take the images (a GPU); the choice is made per call, from the images' device."""
    torch.manual_seed(0)
    encoder = build_encoder("efficientnet-lite0", "none")
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = encoder(images)
        assert encoder.runtime_for("cpu") == "torch" and not encoder._sessions  # training's: PyTorch everywhere
        encoder.use_runtime("auto")
        assert encoder.runtime_for("cpu") == "onnxruntime" and encoder.runtime_for(torch.device("cuda:0")) == "torch"
        assert torch.allclose(encoder(images), expected, atol=1e-4)
        assert encoder._sessions  # the CPU images went through an ONNX Runtime session
        assert encoder.use_runtime("onnxruntime").runtime_for("cuda") == "onnxruntime"  # forced: refused on a GPU


def _collect_inherited_encoder_then_encode(state: dict, images: torch.Tensor, expected: torch.Tensor) -> None:
    import gc

    gc.collect()  # frees the parent's encoder, inherited as garbage, and with it the session it held
    fresh = build_encoder("efficientnet-lite0", "none")
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(fresh.use_runtime("onnxruntime")(images), expected, atol=1e-4)


def test_a_forked_child_outlives_the_onnx_runtime_sessions_it_inherits():
    """A child forked after a session exists (a DataLoader worker, a DDP rank) must not wait for ever on that
    session's threads, which stayed in the parent, when the session's encoder is collected there (measured: without
    the fork hook of ``scripts.encoders`` this child hangs)."""
    import gc

    from conftest import run_forked

    torch.manual_seed(0)
    seeded = build_encoder("efficientnet-lite0", "none")
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = seeded(images)
        parent = build_encoder("efficientnet-lite0", "none")
        parent.load_state_dict(seeded.state_dict())
        parent.use_runtime("onnxruntime")(images)  # a live session in this process
    gc.disable()  # so that the garbage below is still there when the child is forked
    try:
        cycle = [parent]
        cycle.append(cycle)  # garbage only the collector frees, as a finished workflow's network is
        del parent, cycle
        code = run_forked(_collect_inherited_encoder_then_encode, seeded.state_dict(), images, expected, timeout=120)
    finally:
        gc.enable()
        gc.collect()
    assert code == 0


def test_inference_leaves_out_a_zero_weight_reconstruction_term_with_the_same_scores():
    """``skip_unweighted_terms`` with beta 1: no decoder and no SSIM map, and the score and anomaly map are the
    full computation's to the last bit; with beta below 1 it changes nothing."""
    torch.manual_seed(0)
    net = AEFlow(encoder="efficientnet-lite0", encoder_weights="none", image_size=64, flow_blocks=2).eval()
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        net.scorer.term_stats.copy_(torch.tensor([[0.4, 0.1], [-0.8, 0.05]]))
    decoded = []
    net.decoder.register_forward_hook(lambda *_: decoded.append(1))
    image = torch.rand(3, 1, 64, 64)
    for beta in (1.0, 0.9):
        net.scorer.set_beta(beta)
        with torch.no_grad():
            net.skip_unweighted_terms = False
            full = net.score(image)
            decoded.clear()
            net.skip_unweighted_terms = True
            fast = net.score(image)
        assert torch.equal(fast["score"], full["score"]) and torch.equal(fast["anomaly_map"], full["anomaly_map"])
        assert torch.equal(fast["score_flow"], full["score_flow"])
        if beta == 1.0:
            assert not decoded and torch.isnan(fast["reconstruction"]).all() and torch.isnan(fast["score_recon"]).all()
            assert torch.isfinite(full["score_recon"]).all()
        else:
            assert decoded and torch.equal(fast["score_recon"], full["score_recon"])
