"""One shard's images, decoded in DataLoader worker processes, in record order, in batches.

The offline jobs hold a whole shard in memory (fetched once) and need its samples transformed
(decode + crops) in parallel with the model. :func:`decoded_batches` runs ``transform`` over
the records in ``num_workers`` forked processes (they inherit the records; only indices and the
decoded tensors cross process boundaries) and yields batches in record order::

    {"index": [i, ...], "key": [str, ...], "label": (B,) int64, "images": (B, V, 3, S, S) uint8,
     "skipped": [(key, reason), ...]}

A sample whose image does not decode is left out of ``images`` and listed in ``skipped``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from glotok.data.augment import ImageDecodeError
from glotok.data.shards import IMAGE_EXTENSIONS

Transform = Callable[[str, bytes], torch.Tensor]  # (key, image bytes) -> (V, 3, S, S) uint8


class _Records(torch.utils.data.Dataset):
    def __init__(self, records: list[tuple[str, dict]], transform: Transform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        key, members = self.records[i]
        data = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        try:
            if data is None:
                raise ImageDecodeError(f"no image member (it has {sorted(members)})")
            label = int(members["cls"].decode("ascii")) if "cls" in members else -1
            return {"index": i, "key": key, "label": label, "images": self.transform(key, data)}
        except (ImageDecodeError, ValueError, UnicodeDecodeError) as exc:
            return {"index": i, "key": key, "error": str(exc)}


def _collate(items: list[dict]) -> dict:
    good = [it for it in items if "error" not in it]
    images = torch.stack([it["images"] for it in good]) if good else None
    return {"index": [it["index"] for it in good], "key": [it["key"] for it in good],
            "label": torch.tensor([it["label"] for it in good], dtype=torch.int64),
            "images": images, "skipped": [(it["key"], it["error"]) for it in items
                                          if "error" in it]}


def default_decode_workers() -> int:
    """Decoding processes per worker: on a GPU every CPU thread this worker was given but one
    (decoding must keep up with the accelerator), on CPU one (the cores belong to the model)."""
    if torch.cuda.is_available():
        return max(2, min(16, torch.get_num_threads() - 1))
    return 1


def decoded_batches(records: list[tuple[str, dict]], transform: Transform, batch_size: int,
                    num_workers: int = 1, pin_memory: Optional[bool] = None) -> Iterator[dict]:
    """Batches of ``batch_size`` samples of ``records`` (``(key, {ext: bytes})``, e.g. from
    :func:`glotok.data.wds.iter_records`), decoded by ``transform`` in ``num_workers``
    processes (0: in this one) while the caller computes on the previous batches."""
    workers = min(num_workers, max(1, len(records) // max(1, batch_size)))
    loader = torch.utils.data.DataLoader(
        _Records(records, transform), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate, prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        multiprocessing_context="fork" if workers else None)
    yield from loader
