"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019): a Wasserstein GAN of normal images, then an encoder that
maps an image to the latent code whose generated image matches it (the paper's izi_f training).

1. ``pretrain``: WGAN-GP (gradient penalty 10, ``critic_steps`` = 5 critic updates per generator update, Adam
   1e-4 with betas (0, 0.9)) for ``gan_epochs`` epochs, run by MONAI's ``GanTrainer`` over the training loader, before
   the first epoch of the bundle's trainer. ``gan_trained`` (saved with the model) marks it done, so a resumed run
   does not repeat it; a run killed during this phase starts it again.
2. The bundle's epochs train the encoder alone (generator and critic frozen) on the izi_f loss,
   ``mean((x - G(E(x)))**2) + kappa * mean((f(x) - f(G(E(x))))**2)`` with ``f`` the critic's last convolutional
   features; validation and the checkpoint choose among these epochs as for every method.

The score is the paper's ``A(x) = A_R(x) + kappa * A_D(x)``: the scorer's ``recon`` slot holds the image residual
``A_R``, its ``flow`` slot the critic-feature residual ``A_D``, with ``beta = kappa / (1 + kappa)`` and no
normalisation (``configs/baseline_f_anogan.json``), which is ``A(x) / (1 + kappa)``. The pixel map is the squared
residual, upsampled to the image.
"""

from __future__ import annotations

import logging

import torch
from monai.utils import convert_to_tensor

from . import gan_parts
from .base import ComparisonMethod, resize, term_maps

logger = logging.getLogger(__name__)
GRADIENT_PENALTY = 10.0


def gradient_penalty(critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): the critic's gradient norm pushed to 1 between real and fake samples."""
    mix = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    between = (mix * real + (1 - mix) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


class FAnoGAN(ComparisonMethod):
    method = "f-anogan"

    def __init__(
        self,
        gan_image_size: int = 64,
        latent_dim: int = 128,
        gan_epochs: int = 10,
        critic_steps: int = 5,
        kappa: float = 1.0,
        **common,
    ):
        super().__init__(
            gan_image_size=gan_image_size,
            latent_dim=latent_dim,
            gan_epochs=gan_epochs,
            critic_steps=critic_steps,
            kappa=kappa,
            **common,
        )
        gan_parts.gan_depth(gan_image_size)  # refuses a size the generator cannot produce
        channels = self.in_channels
        self.generator = gan_parts.ImageDecoder(channels, gan_image_size, latent_dim)
        self.critic = gan_parts.critic(channels, gan_image_size)
        self.image_encoder = gan_parts.image_encoder(channels, gan_image_size, latent_dim)
        self.register_buffer("gan_trained", torch.tensor(0))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The izi_f encoder's: the bundle's epochs train it alone."""
        return list(self.image_encoder.parameters())

    def pretrain(self, trainer) -> None:
        """The WGAN-GP phase through MONAI's ``GanTrainer``, once."""
        if int(self.gan_trained) or not self.settings["gan_epochs"]:
            return
        from ignite.handlers import ProgressBar
        from monai.engines import GanTrainer

        size, device = self.settings["gan_image_size"], trainer.state.device

        def real_images(batch, device=None, non_blocking=False, **kwargs):
            return resize(convert_to_tensor(batch["image"], track_meta=False).float(), size)

        def critic_loss(fake, real):
            real = real.to(device)
            fake = fake[: real.shape[0]].detach()  # GanTrainer draws a full batch of latents for a short last batch
            wasserstein = self.critic(fake).mean() - self.critic(real).mean()
            return wasserstein + GRADIENT_PENALTY * gradient_penalty(self.critic, real, fake)

        def generator_loss(fake):
            return -self.critic(fake).mean()

        optimizer_args = {"lr": 1e-4, "betas": (0.0, 0.9)}
        gan = GanTrainer(
            device=device,
            max_epochs=int(self.settings["gan_epochs"]),
            train_data_loader=trainer.data_loader,
            g_network=self.generator,
            g_optimizer=torch.optim.Adam(self.generator.parameters(), **optimizer_args),
            g_loss_function=generator_loss,
            d_network=self.critic,
            d_optimizer=torch.optim.Adam(self.critic.parameters(), **optimizer_args),
            d_loss_function=critic_loss,
            d_train_steps=int(self.settings["critic_steps"]),
            latent_shape=int(self.settings["latent_dim"]),
            d_prepare_batch=real_images,
        )
        ProgressBar(desc="f-AnoGAN WGAN-GP", persist=True).attach(gan)
        logger.info("f-AnoGAN: WGAN-GP training for %d epoch(s) before the encoder", self.settings["gan_epochs"])
        self.train()
        gan.run()
        self.gan_trained.fill_(1)

    def reconstruct(self, image: torch.Tensor):
        small = resize(image, self.settings["gan_image_size"])
        return small, self.generator(self.image_encoder(small))

    def residuals(self, small: torch.Tensor, reconstruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: A_R, the image residual, and A_D, the critic-feature residual."""
        image_residual = (small - reconstruction).pow(2).flatten(1).mean(dim=1)
        feature_residual = (
            (gan_parts.features(self.critic, small) - gan_parts.features(self.critic, reconstruction)).pow(2).mean(1)
        )
        return image_residual, feature_residual

    def training_losses(self, image: torch.Tensor, features=None) -> dict:
        self.generator.eval()  # frozen: its batch norm keeps the statistics of the GAN phase
        self.generator.requires_grad_(False)
        self.critic.requires_grad_(False)
        image_residual, feature_residual = self.residuals(*self.reconstruct(image))
        loss = (image_residual + self.settings["kappa"] * feature_residual).mean()
        return {
            "loss": loss,
            "loss_flow": feature_residual.mean().detach(),
            "loss_recon": image_residual.mean().detach(),
        }

    def anomaly_terms(self, image: torch.Tensor, features=None):
        small, reconstruction = self.reconstruct(image)
        image_residual, feature_residual = self.residuals(small, reconstruction)
        reconstruction = resize(reconstruction, image.shape[-2:])
        squared = (image - reconstruction).pow(2).mean(dim=1, keepdim=True)
        absolute = (image - reconstruction).abs().mean(dim=1, keepdim=True)
        maps = term_maps(image, flow=feature_residual, recon=squared, residual=absolute)
        return maps, {"flow": feature_residual, "recon": image_residual}, reconstruction
