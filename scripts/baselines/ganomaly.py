"""GANomaly (Akcay, Atapour-Abarghouei and Breckon, ACCV 2018): an encoder-decoder-encoder generator trained
adversarially on normal images.

The generator encodes the image to ``z`` (G_E), decodes it (G_D) and encodes the reconstruction again to ``z_hat``
(E). Its loss is the paper's ``w_adv * L_adv + w_con * L_con + w_enc * L_enc`` (1, 50, 1): feature matching on the
discriminator's last convolutional features, L1 between image and reconstruction, L2 between ``z`` and ``z_hat``.
The discriminator learns real from reconstructed with binary cross-entropy, and is re-initialised when its loss
collapses below 1e-5, as the authors' code does. The score is the latent distance ``mean((z - z_hat)**2)``; the
image-space residual is kept as the pixel-level map of the figures, and the anomaly map is the image score
everywhere (GANomaly scores images, not pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gan_parts
from .base import ComparisonMethod, resize, term_maps

COLLAPSED_D_LOSS = 1e-5


def _reinitialise(module: torch.nn.Module) -> None:
    for layer in module.modules():
        if layer is not module and hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


class GANomaly(ComparisonMethod):
    method = "ganomaly"

    def __init__(
        self,
        gan_image_size: int = 64,
        latent_dim: int = 100,
        w_adv: float = 1.0,
        w_con: float = 50.0,
        w_enc: float = 1.0,
        **common,
    ):
        super().__init__(
            gan_image_size=gan_image_size, latent_dim=latent_dim, w_adv=w_adv, w_con=w_con, w_enc=w_enc, **common
        )
        gan_parts.gan_depth(gan_image_size)  # refuses a size the decoder cannot produce
        channels = self.in_channels
        self.encoder_g = gan_parts.image_encoder(channels, gan_image_size, latent_dim)
        self.decoder_g = gan_parts.ImageDecoder(channels, gan_image_size, latent_dim)
        self.encoder_r = gan_parts.image_encoder(channels, gan_image_size, latent_dim)
        self.discriminator = gan_parts.discriminator(channels, gan_image_size)

    def generate(self, image: torch.Tensor):
        small = resize(image, self.settings["gan_image_size"])
        z = self.encoder_g(small)
        reconstruction = self.decoder_g(z)
        return small, z, reconstruction, self.encoder_r(reconstruction)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The generator's; ``discriminator_parameters`` go to the trainer's ``d_optimizer``."""
        return [p for name, p in self.named_parameters() if not name.startswith("discriminator.")]

    def discriminator_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.discriminator.parameters())

    def discriminator_losses(self, image: torch.Tensor, features=None) -> dict | None:
        with torch.no_grad():
            small, _, reconstruction, _ = self.generate(image)
        real, fake = self.discriminator(small), self.discriminator(reconstruction)
        loss = 0.5 * (
            F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        )
        if float(loss.detach()) < COLLAPSED_D_LOSS:  # nothing left to learn from it: start it afresh, no step
            _reinitialise(self.discriminator)
            return None
        return {"loss": loss}

    def training_losses(self, image: torch.Tensor, features=None) -> dict:
        small, z, reconstruction, z_hat = self.generate(image)
        adversarial = F.mse_loss(
            gan_parts.features(self.discriminator, reconstruction),
            gan_parts.features(self.discriminator, small).detach(),
        )
        contextual = F.l1_loss(reconstruction, small)
        latent = F.mse_loss(z_hat, z)
        s = self.settings
        loss = s["w_adv"] * adversarial + s["w_con"] * contextual + s["w_enc"] * latent
        return {"loss": loss, "loss_flow": latent.detach(), "loss_recon": contextual.detach()}

    def anomaly_terms(self, image: torch.Tensor, features=None):
        small, z, reconstruction, z_hat = self.generate(image)
        latent_distance = (z - z_hat).pow(2).mean(dim=1)
        reconstruction = resize(reconstruction, image.shape[-2:])
        residual = (image - reconstruction).abs().mean(dim=1, keepdim=True)
        maps = term_maps(image, flow=latent_distance, recon=residual)
        recon_term = residual.flatten(1).mean(dim=1)
        return maps, {"flow": latent_distance, "recon": recon_term}, reconstruction
