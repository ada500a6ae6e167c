"""PatchGAN discriminator and the GAN losses of the tokenizer objective.

The discriminator is taming-transformers' / LlamaGen's ``NLayerDiscriminator`` (pix2pix
PatchGAN), with the same layer layout and parameter names (``main.0.weight``, ...), so their
discriminator checkpoints load as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PatchGANDiscriminator",
    "hinge_d_loss",
    "hinge_g_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
]


class PatchGANDiscriminator(nn.Module):
    """Fully convolutional real/fake classifier over overlapping patches.

    Layout (kernel 4, padding 1 throughout): conv(in_ch -> ndf, stride 2) + LeakyReLU(0.2);
    then ``n_layers - 1`` blocks of conv(stride 2) + BatchNorm + LeakyReLU doubling the width
    (capped at 8 * ndf); one more such block with stride 1; a final stride-1 conv to 1 channel.
    With n_layers=3 each output logit sees a 70x70 input patch.

    Args:
        in_ch: input channels.
        ndf: width of the first layer.
        n_layers: number of stride-2 convolutions.

    forward: (B, in_ch, H, W) in [-1, 1] -> logits (B, 1, h, w); n_layers=3 gives h = H/8 - 2
    (256 -> 30, 64 -> 6).
    """

    def __init__(self, in_ch: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"loss.disc.n_layers must be >= 1, got {n_layers}")
        kw, pad = 4, 1
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, ndf, kw, stride=2, padding=pad),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution
            layers += [
                # No bias: BatchNorm's shift makes it redundant.
                nn.Conv2d(ndf * prev, ndf * mult, kw, stride=stride, padding=pad, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=pad))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN init, as taming's weights_init: conv biases keep PyTorch's default.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# Losses take logits of any shape (B, 1, h, w) and return a float32 scalar; they are computed
# in float32 because bf16 autocast would round the small margins of a converged discriminator.


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake)). Scalar."""
    loss_real = F.relu(1.0 - logits_real.float()).mean()
    loss_fake = F.relu(1.0 + logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean(fake). Scalar."""
    return -logits_fake.float().mean()


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator logistic loss: 0.5 * (mean softplus(-real) + mean softplus(fake)), i.e.
    the mean of BCE(real, 1) and BCE(fake, 0). Scalar."""
    loss_real = F.softplus(-logits_real.float()).mean()
    loss_fake = F.softplus(logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator non-saturating loss: mean softplus(-fake) = BCE(fake, 1). Scalar."""
    return F.softplus(-logits_fake.float()).mean()
