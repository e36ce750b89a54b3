"""Normalizing-flow bottleneck of AE-FLOW (paper section 2, "Normalizing flow bottleneck").

Each of the eight blocks is FrEIA's ``AllInOneBlock``, which is exactly the paper's block equation:
an affine coupling whose log-scale is soft-clamped as ``clamp * tanh(s)`` (clamp = 2), a global affine
("actnorm") step whose scale goes through ``Softplus(beta=0.5)``, and a fixed hard channel permutation.

>>> flow = build_flow(channels=16, height=8, width=8, subnet="cnn2")
>>> z_prime, log_jac_det = flow(torch.randn(2, 16, 8, 8))
>>> z_prime.shape, log_jac_det.shape
(torch.Size([2, 16, 8, 8]), torch.Size([2]))
"""

from __future__ import annotations

from typing import Callable

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

SUBNETS = ("cnn2", "resnet")
FLOW_INITS = ("identity", "pytorch")


class ResNetSubnet(nn.Module):
    """The paper's ResNet-type subnet: 3x3 conv + BN + ReLU, plus a 1x1-conv shortcut added to the output."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)

    def output_layers(self) -> list[nn.Module]:
        return [self.shortcut]


def cnn2_subnet(hidden_ratio: float = 1.0) -> Callable[[int, int], nn.Module]:
    """The FastFlow-style two-layer subnet the paper cites: 3x3 conv, ReLU, 1x1 conv."""

    def constructor(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(1, int(round(in_channels * hidden_ratio)))
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1),
        )

    return constructor


def subnet_constructor(subnet: str, hidden_ratio: float = 1.0) -> Callable[[int, int], nn.Module]:
    if subnet == "cnn2":
        return cnn2_subnet(hidden_ratio)
    if subnet == "resnet":
        return ResNetSubnet
    raise ValueError(f"Unknown flow subnet {subnet!r}; allowed values: {', '.join(SUBNETS)}.")


def zero_output_layers(subnet: nn.Module) -> None:
    """Start a coupling near the identity (as Glow and Real NVP do).

    With PyTorch's default initialisation the resnet subnet's linear shortcut makes each coupling's log-scale
    grow with its input; on EfficientNet-Lite features (std about 5) eight blocks blow the feature scale up a
    thousandfold and the initial flow NLL to about 1e8 nats per dimension, which the first epochs then spend
    undoing. Zeroing the layers that carry the input to the output keeps z' at the features' scale.
    """
    layers = subnet.output_layers() if hasattr(subnet, "output_layers") else [subnet[-1]]
    for layer in layers:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_flow(
    channels: int,
    height: int,
    width: int,
    subnet: str = "resnet",
    n_blocks: int = 8,
    clamp: float = 2.0,
    hidden_ratio: float = 1.0,
    init: str = "identity",
) -> Ff.SequenceINN:
    """Stack ``n_blocks`` AllInOneBlocks; calling the result returns ``(z_prime, log|det J|)`` per sample.

    ``init``: ``identity`` zeroes each subnet's output layers (see ``zero_output_layers``); ``pytorch`` keeps
    PyTorch's default initialisation, as FrEIA and anomalib's FastFlow do.
    """
    constructor = subnet_constructor(subnet, hidden_ratio)
    if n_blocks < 0:
        raise ValueError(f"flow n_blocks must be >= 0, got {n_blocks}.")
    if init not in FLOW_INITS:
        raise ValueError(f"Unknown flow_init {init!r}; allowed values: {', '.join(FLOW_INITS)}.")
    flow = Ff.SequenceINN(channels, height, width)
    for _ in range(n_blocks):
        flow.append(
            Fm.AllInOneBlock,
            subnet_constructor=constructor,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=False,
        )
        if init == "identity":
            zero_output_layers(flow.module_list[-1].subnet)
    return flow
