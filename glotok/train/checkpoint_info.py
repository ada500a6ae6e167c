"""What a tokenizer checkpoint is, without building the model: for the offline tools' drivers.

The tools pin one checkpoint (a run directory resolves to its newest complete checkpoint once,
on the driver), name it in their outputs, and size their token arrays by its codebooks; their
workers then load exactly that checkpoint (:func:`glotok.train.export.load_tokenizer`).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import torch

from glotok.train.checkpoint import read_manifest
from glotok.train.export import resolve_checkpoint


@dataclass(frozen=True)
class TokenizerCheckpoint:
    """A complete tokenizer checkpoint: where, which step, and the model's shape.

    Attributes:
        url: the checkpoint directory (``.../checkpoints/step_XXXXXXXX``), local or ``s3://``.
        image_size: side of the square images it encodes (px).
        grid: side of its index map (``image_size / 2 ** (len(ch_mult) - 1)``).
        config_sha256: hash of the model section of its config.
    """

    url: str
    step: int
    image_size: int
    grid: int
    visual_codebook_size: int
    semantic_codebook_size: int
    codebook_dim: int
    has_ema: bool
    config_sha256: str

    def describe(self) -> dict:
        return {"checkpoint": self.url, "step": self.step, "image_size": self.image_size,
                "grid": [self.grid, self.grid], "config_sha256": self.config_sha256,
                "codebook_sizes": {"visual": self.visual_codebook_size,
                                   "semantic": self.semantic_codebook_size}}


def describe_checkpoint(path: str) -> TokenizerCheckpoint:
    """The checkpoint ``path`` names: a run directory (its newest complete checkpoint), a
    checkpoints directory, or one checkpoint directory; local or ``s3://``.

    Raises:
        FileNotFoundError: no complete checkpoint there.
    """
    storage, name = resolve_checkpoint(path)
    manifest = read_manifest(storage, name)
    if manifest is None:
        raise FileNotFoundError(f"checkpoint {storage.url_of(name)} is incomplete (a save was "
                                "interrupted): pass the run directory to use its newest "
                                "complete checkpoint")
    trainer = torch.load(io.BytesIO(storage.read_bytes(f"{name}/trainer.pt")),
                         map_location="cpu", weights_only=True)
    model = trainer["config"]["model"]
    grid = int(model["image_size"]) // 2 ** (len(model["ch_mult"]) - 1)
    digest = hashlib.sha256(json.dumps(model, sort_keys=True, default=str).encode()).hexdigest()
    return TokenizerCheckpoint(
        url=storage.url_of(name), step=int(manifest["step"]),
        image_size=int(model["image_size"]), grid=grid,
        visual_codebook_size=int(model["visual_codebook_size"]),
        semantic_codebook_size=int(model["semantic_codebook_size"]),
        codebook_dim=int(model["codebook_dim"]), has_ema=bool(trainer.get("ema")),
        config_sha256=digest)
