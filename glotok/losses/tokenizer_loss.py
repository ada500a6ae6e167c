"""The GloTok tokenizer objective (GLOTOK.md, "Tokenizer objective and recipe").

    L_G = w_rec * L2(x, x_hat) + w_p * perceptual(x, x_hat) + w_gan * GAN_G(x_hat)
        + w_q * (codebook + beta * commit) + w_res * L_res + w_hist * L_hist
    L_D = hinge(D(x), D(sg[x_hat]))

The GAN terms are active from ``gan_start_step`` on.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from glotok.models.discriminator import hinge_d_loss, hinge_g_loss


class TokenizerObjective(nn.Module):
    """Combines the terms; returns the total and a dict of detached terms for logging."""

    def __init__(self, cfg, perceptual: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        if cfg.perceptual_weight > 0 and perceptual is None:
            raise ValueError("loss.perceptual_weight > 0 needs a perceptual network")
        self.perceptual = perceptual

    def gan_active(self, step: int) -> bool:
        return self.cfg.gan_weight > 0 and step >= self.cfg.gan_start_step

    def generator_loss(self, images: torch.Tensor, out: dict[str, torch.Tensor],
                       logits_fake: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """images, out["recon"]: (B, 3, H, W); logits_fake: D(recon) or None before the GAN
        starts. The sum is computed in fp32 whatever the model's precision."""
        c = self.cfg
        recon = out["recon"].float()
        x = images.float()
        terms = {"rec": F.mse_loss(recon, x)}
        total = c.rec_weight * terms["rec"]
        if self.perceptual is not None and c.perceptual_weight > 0:
            terms["perceptual"] = self.perceptual(recon, x).mean().float()
            total = total + c.perceptual_weight * terms["perceptual"]
        terms["codebook"] = out["codebook_loss"].float()
        terms["commit"] = out["commit_loss"].float()
        total = total + c.codebook_weight * (terms["codebook"] + c.commit_beta * terms["commit"])
        terms["residual"] = out["residual_loss"].float()
        total = total + c.residual_weight * terms["residual"]
        if "hist_loss" in out:
            terms["hist"] = out["hist_loss"].float()
            total = total + c.hist_weight * terms["hist"]
        if logits_fake is not None:
            terms["gan_g"] = hinge_g_loss(logits_fake.float())
            total = total + c.gan_weight * terms["gan_g"]
        terms["total"] = total
        return total, {k: v.detach() for k, v in terms.items()}

    @staticmethod
    def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor
                           ) -> tuple[torch.Tensor, dict]:
        loss = hinge_d_loss(logits_real.float(), logits_fake.float())
        return loss, {"disc": loss.detach(), "logits_real": logits_real.detach().float().mean(),
                      "logits_fake": logits_fake.detach().float().mean()}
