"""GloTok: a VQ tokenizer with a visual and a semantic codebook (arXiv 2511.14184).

    image -> Encoder -> h (z_channels)
      visual branch:   adapter -> l2 quantiser (visual codebook)   -> z_q_v + R_v(z_q_v)
      semantic branch: adapter -> l2 quantiser (semantic codebook) -> z_q_s + R_s(z_q_s)
    concat (2*D channels) -> 1x1 conv -> Decoder -> image

The semantic codebook is regularised by the histogram relation loss, which only sees codebook
weights. Each grid position carries two indices, ``indices[:, VISUAL]`` and
``indices[:, SEMANTIC]``, the order in which the FAR generator predicts them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from glotok.models.adapter import TransformerAdapter
from glotok.models.quantizer import L2NormQuantizer
from glotok.models.residual import ResidualRefiner
from glotok.models.vq16 import Decoder, Encoder

VISUAL, SEMANTIC = 0, 1


class Branch(nn.Module):
    """Adapter -> quantiser -> (optional) residual refinement, for one codebook."""

    def __init__(self, cfg, num_codes: int, grid: int, regularizer: Optional[nn.Module] = None):
        super().__init__()
        self.adapter = TransformerAdapter(cfg.z_channels, cfg.codebook_dim, grid,
                                          cfg.adapter_layers, cfg.adapter_width, cfg.adapter_heads)
        self.quantizer = L2NormQuantizer(num_codes, cfg.codebook_dim, regularizer)
        r = cfg.residual
        self.refiner = (ResidualRefiner(cfg.codebook_dim, grid, r.width, r.heads, r.mlp_ratio)
                        if r.enabled else None)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        q = self.quantizer(self.adapter(h))
        out = {"z_q": q.z_q, "indices": q.indices, "codebook_loss": q.codebook_loss,
               "commit_loss": q.commit_loss}
        if q.regularizer_loss is not None:
            out["regularizer_loss"] = q.regularizer_loss
        if self.refiner is None:
            out["residual_loss"] = q.z_q.new_zeros((), dtype=torch.float32)
            return out
        # One refiner pass serves both uses: its input is sg[z_q] (the code values), its output
        # is added to the straight-through z_q for the decoder, and it is trained to predict
        # sg[z] - sg[z_q]. The decoder's gradient still reaches the encoder through z_q.
        r = self.refiner(q.z_q.detach())
        out["residual_loss"] = F.mse_loss(r.float(), (q.z - q.z_q).detach().float())
        out["z_q"] = q.z_q + r
        return out

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) -> (B, D, h, w) refined latent."""
        z_q = self.quantizer.lookup(indices)
        return z_q if self.refiner is None else z_q + self.refiner(z_q)


class GloTokTokenizer(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] <-> indices (B, 2, H/16, W/16) (for ``ch_mult`` of 5).

    ``hist_loss``: the histogram relation loss module on the semantic codebook (optional).
    """

    def __init__(self, cfg, hist_loss: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        grid = cfg.image_size // self.downsample
        self.encoder = Encoder(cfg.ch, list(cfg.ch_mult), cfg.num_res_blocks, cfg.z_channels,
                               cfg.dropout)
        self.visual = Branch(cfg, cfg.visual_codebook_size, grid)
        self.semantic = Branch(cfg, cfg.semantic_codebook_size, grid, regularizer=hist_loss)
        self.post_quant_conv = nn.Conv2d(2 * cfg.codebook_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg.ch, list(cfg.ch_mult), cfg.num_res_blocks, cfg.z_channels,
                               cfg.dropout)

    @property
    def quantizers(self) -> dict[str, L2NormQuantizer]:
        return {"visual": self.visual.quantizer, "semantic": self.semantic.quantizer}

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the "
                             f"tokenizer's downsampling factor {self.downsample}")

    def _decode_latents(self, z_v: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(torch.cat([z_v, z_s], dim=1)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training forward. Returns a dict of tensors (a dict, so ZeRO-3 hooks can walk it):

        ``recon`` (B, 3, H, W); ``indices`` (B, 2, h, w); scalar losses summed over both
        branches: ``codebook_loss``, ``commit_loss``, ``residual_loss``; ``hist_loss`` when a
        histogram loss is attached (training only).
        """
        self._check_images(images)
        h = self.encoder(images)
        v, s = self.visual(h), self.semantic(h)
        out = {
            "recon": self._decode_latents(v["z_q"], s["z_q"]),
            "indices": torch.stack([v["indices"], s["indices"]], dim=1),
            "codebook_loss": v["codebook_loss"] + s["codebook_loss"],
            "commit_loss": v["commit_loss"] + s["commit_loss"],
            "residual_loss": v["residual_loss"] + s["residual_loss"],
        }
        if "regularizer_loss" in s:
            out["hist_loss"] = s["regularizer_loss"]
        return out

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2, H/f, W/f) int64: [:, 0] visual, [:, 1] semantic."""
        self._check_images(images)
        h = self.encoder(images)
        return torch.stack([self.visual.quantizer.nearest(self.visual.adapter(h)),
                            self.semantic.quantizer.nearest(self.semantic.adapter(h))], dim=1)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, 2, h, w) int -> (B, 3, h*f, w*f), not clamped."""
        if indices.dim() != 4 or indices.shape[1] != 2:
            raise ValueError(f"expected indices of shape (B, 2, h, w), got {tuple(indices.shape)}")
        indices = indices.long()
        return self._decode_latents(self.visual.decode_indices(indices[:, VISUAL]),
                                    self.semantic.decode_indices(indices[:, SEMANTIC]))
