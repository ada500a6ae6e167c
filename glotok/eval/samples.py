"""Class-balanced samples from a trained FAR generator, decoded by its tokenizer, written in the
ADM evaluator's layout.

Image ``j`` of a run of ``N`` has class ``j % num_classes`` (so 50k images give 50 per
ImageNet class) and comes from chunk ``j // chunk_size``, generated with a torch generator
seeded by ``(seed, chunk)``: the images do not depend on how chunks are spread over workers,
and a rerun recomputes only missing chunks. Output::

    OUT/chunks/chunk_000000.npz   uint8 images (n, H, W, 3) and labels, one per chunk
    OUT/samples.npz               arr_0 (N, H, W, 3) uint8, arr_1 (N,) labels: the ADM layout
    OUT/grid.png                  the first 64 images
    OUT/samples.json              what made them: checkpoints, sampling settings, counts
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from glotok.utils.parallel import ShardWorker

CHUNKS = "chunks"


@dataclass(frozen=True)
class SampleSettings:
    num_images: int
    num_classes: int
    chunk_size: int
    cfg_scale: Optional[float]
    temperature: float
    top_k: int
    top_p: float
    seed: int

    def chunk_labels(self, chunk: int) -> np.ndarray:
        start = chunk * self.chunk_size
        stop = min(start + self.chunk_size, self.num_images)
        return np.arange(start, stop) % self.num_classes

    @property
    def num_chunks(self) -> int:
        return -(-self.num_images // self.chunk_size)

    def chunk_seed(self, chunk: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{chunk}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)


def chunk_name(chunk: int) -> str:
    return f"{CHUNKS}/chunk_{chunk:06d}.npz"


class SampleWorker(ShardWorker):
    """Holds the generator and the tokenizer; one task = one chunk of images."""

    def __init__(self, generator: str, tokenizer: str, output: str, settings: dict,
                 ema: bool = True):
        from glotok.train.export import load_far, load_tokenizer
        from glotok.utils.storage import Storage

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.far, self.far_cfg, _ = load_far(generator, ema=ema, device=device)
        self.tokenizer, _, _ = load_tokenizer(tokenizer, ema=ema, device=device)
        self.settings = SampleSettings(**settings)
        self.out = Storage(output)

    @torch.no_grad()
    def compute(self, task: int, data) -> dict:
        from glotok.sampling import generate
        from glotok.utils.images import to_uint8

        s = self.settings
        labels = torch.from_numpy(s.chunk_labels(task)).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(s.chunk_seed(task))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.device.type == "cuda"):
            indices = generate(self.far, labels, cfg_scale=s.cfg_scale, temperature=s.temperature,
                               top_k=s.top_k, top_p=s.top_p, generator=gen)
            images = self.tokenizer.decode(indices).float()
        return {"images": to_uint8(images), "labels": labels.cpu().numpy()}

    def commit(self, task: int, output: dict) -> dict:
        buf = io.BytesIO()
        np.savez(buf, images=output["images"], labels=output["labels"])
        self.out.write_bytes(chunk_name(task), buf.getvalue())
        return {"images": len(output["labels"])}


def done_chunks(out, settings: SampleSettings) -> set[int]:
    """Chunks already written whole (a chunk file is published in one atomic write)."""
    names = set(out.listdir(CHUNKS))
    return {c for c in range(settings.num_chunks) if chunk_name(c).split("/")[1] in names}


def write_adm_npz(out, settings: SampleSettings, path: Path) -> int:
    """Concatenate the chunks into one ``.npz`` (``arr_0`` images, ``arr_1`` labels) without
    holding all images in memory: the array is streamed into the zip entry chunk by chunk."""
    first = np.load(io.BytesIO(out.read_bytes(chunk_name(0))))["images"]
    shape = (settings.num_images, *first.shape[1:])
    labels = []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for c in range(settings.num_chunks):
                chunk = np.load(io.BytesIO(out.read_bytes(chunk_name(c))))
                f.write(np.ascontiguousarray(chunk["images"]).tobytes())
                labels.append(chunk["labels"])
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.concatenate(labels).astype(np.int64))
    tmp.replace(path)
    return shape[0]


def write_metadata(out, settings: SampleSettings, generator: str, tokenizer: str) -> None:
    out.write_text("samples.json", json.dumps(
        {"generator": generator, "tokenizer": tokenizer, "settings": asdict(settings),
         "layout": "ADM: arr_0 (N, H, W, 3) uint8, arr_1 (N,) int64 labels"}, indent=1))
