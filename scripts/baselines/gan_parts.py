"""DCGAN-style parts of the two GAN baselines, from MONAI's building blocks (``Regressor``, ``Generator``,
``Discriminator``, ``Critic``), sized by the GAN's own image size.

The GANs work at ``gan_image_size`` (64 in both papers), not at the bundle's ``image_size``: the input is resized
to it, and pixel-level maps are resized back. Their decoders start from 4 x 4 and double per layer, so the size
must be 4 times a power of two (32, 64, 128, 256); any other size is refused before training, naming the key.
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers import Act, Norm
from monai.networks.nets import Critic, Discriminator, Generator, Regressor
from torch import nn

START_SIZE = 4
BASE_CHANNELS = 64
MAX_CHANNELS = 512


def gan_depth(gan_image_size: int) -> int:
    """Number of stride-2 layers between 4 x 4 and the GAN's image size."""
    depth = math.log2(gan_image_size / START_SIZE) if gan_image_size > 0 else -1
    if depth != int(depth) or depth < 3:
        raise ValueError(
            f"gan_image_size {gan_image_size} cannot be produced by the GAN's generator, which starts at "
            f"{START_SIZE} x {START_SIZE} and doubles per layer: use 32, 64, 128 or 256."
        )
    return int(depth)


def _channels(depth: int) -> tuple[int, ...]:
    return tuple(min(MAX_CHANNELS, BASE_CHANNELS * 2**i) for i in range(depth))


def _downsampling(in_channels: int, size: int, norm) -> dict:
    """The stack of stride-2 convolutions with leaky ReLU that the encoders, the discriminator and the critic share."""
    depth = gan_depth(size)
    return {
        "in_shape": (in_channels, size, size),
        "channels": _channels(depth),
        "strides": (2,) * depth,
        "kernel_size": 3,
        "num_res_units": 0,
        "act": (Act.LEAKYRELU, {"negative_slope": 0.2}),
        "norm": norm,
        "dropout": None,
    }


def image_encoder(in_channels: int, size: int, latent: int) -> Regressor:
    """Image (C, size, size) -> latent vector: strided convolutions with batch norm, then a linear layer."""
    return Regressor(out_shape=(latent,), **_downsampling(in_channels, size, Norm.BATCH))


class ImageDecoder(nn.Module):
    """Latent vector -> image in [0, 1]: MONAI's ``Generator`` (transposed convolutions from 4 x 4), then a sigmoid."""

    def __init__(self, in_channels: int, size: int, latent: int, norm=Norm.BATCH):
        super().__init__()
        depth = gan_depth(size)
        channels = _channels(depth)
        self.generator = Generator(
            latent_shape=(latent,),
            start_shape=(channels[-1], START_SIZE, START_SIZE),
            channels=(*reversed(channels[:-1]), in_channels),
            strides=(2,) * depth,
            kernel_size=3,
            num_res_units=0,
            act=Act.RELU,
            norm=norm,
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.generator(latent))


def discriminator(in_channels: int, size: int) -> Discriminator:
    """Real or reconstructed, as a logit (the loss applies the sigmoid: BCE with logits)."""
    return Discriminator(last_act=None, **_downsampling(in_channels, size, Norm.BATCH))


def critic(in_channels: int, size: int) -> Critic:
    """WGAN-GP critic, without batch norm: the gradient penalty is taken per sample."""
    return Critic(**_downsampling(in_channels, size, None))


def features(network: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The last convolutional features of a discriminator or critic (MONAI's ``net`` before its final layer)."""
    return network.net(image).flatten(1)
