"""The AR trainer's stream: token shards (:mod:`glotok.data.tokens`) through :class:`ShardStream`,
with its exact resume, re-partitioning, retries and damage counting.

A token shard holds one record per image *and* augmentation variant. Each epoch, each image
contributes one of its variants -- drawn from ``(seed, epoch, image key)``, the FAR recipe -- or
always the first (``variant: first``, the un-augmented centre crop); the other records are
passed over before decoding. Batches are ``{"indices": (B, 2, h, w) int64, "label": (B,),
"key": [...], "skipped": int}``.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import torch

from glotok.data.storage import StorageOptions
from glotok.data.stream import ShardStream, _batch_buffer
from glotok.data.tokens import read_token_manifest


class TokenCodec:
    def __init__(self, variants: list[str], grid: tuple[int, int], mode: str, seed: int):
        if mode not in ("random", "first"):
            raise ValueError(f"data.variant must be 'random' or 'first', got {mode!r}")
        self.variants, self.grid, self.mode, self.seed = list(variants), tuple(grid), mode, seed

    def chosen(self, image_key: str, epoch: int) -> str:
        if self.mode == "first" or len(self.variants) == 1:
            return self.variants[0]
        digest = hashlib.blake2b(f"{self.seed}:{epoch}:{image_key}".encode(), digest_size=8)
        return self.variants[int.from_bytes(digest.digest(), "little") % len(self.variants)]

    def accept(self, members: dict, key: str, epoch: int) -> bool:
        image_key, _, variant = key.rpartition("/")
        return variant == self.chosen(image_key, epoch)

    def buffers(self, batch_size: int) -> dict[str, torch.Tensor]:
        return {"indices": _batch_buffer((batch_size, 2, *self.grid), torch.int64)}

    def decode_into(self, members: dict, key: str, epoch: int, out: dict[str, torch.Tensor],
                    i: int) -> None:
        tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
        if tokens.shape != (2, *self.grid):
            raise ValueError(f"token map of shape {tokens.shape}, expected (2, {self.grid[0]}, "
                             f"{self.grid[1]})")
        out["indices"][i].copy_(torch.from_numpy(tokens.astype(np.int64)))


def build_token_stream(data_cfg: Any, batch_size: int, rank: int, world_size: int,
                       *, train: bool = True) -> ShardStream:
    """This rank's stream over ``data_cfg.source`` (a token manifest, local or ``s3://``)."""
    options = StorageOptions(data_cfg.s3_endpoint_url, data_cfg.s3_profile)
    manifest = read_token_manifest(data_cfg.source, options)
    codec = TokenCodec(manifest["variants"], manifest["tokenizer"]["grid"], data_cfg.variant,
                       data_cfg.seed)
    source = data_cfg.source if data_cfg.source.endswith(".json") else \
        f"{data_cfg.source.rstrip('/')}/manifest.json"
    return ShardStream(
        source, None, batch_size, train=train, num_workers=data_cfg.num_workers,
        prefetch_factor=data_cfg.prefetch_factor, read_ahead=data_cfg.read_ahead, rank=rank,
        world_size=world_size, seed=data_cfg.seed, shuffle_buffer=data_cfg.shuffle_buffer,
        options=options, retries=data_cfg.retries, retry_backoff=data_cfg.retry_backoff,
        codec=codec)
