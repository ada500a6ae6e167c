"""Exponential moving average of a model's weights, kept in fp32 on every rank."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def _gathered(module: nn.Module):
    """Full parameters under ZeRO-3 (a no-op for other stages and plain modules)."""
    params = list(module.parameters())
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimiser step.

    The shadow is fp32 whatever the training precision, so a bf16 run does not lose the small
    updates that an EMA with decay 0.9999 is made of.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        with _gathered(module):
            self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        with _gathered(module):
            for n, p in module.named_parameters():
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module`` (a plain, unpartitioned copy)."""
        for n, p in module.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model; differing keys: "
                             f"{sorted(missing)[:5]}")
        self.decay = state["decay"]
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)
