"""Images/s per core of the data pipeline on the same JPEG bytes, four ways, in one run.

    python benchmarks/data_pipeline.py [--image-size 256] [--copies 8] [--repeats 3]

- ``decode_only``: :func:`glotok.data.augment.decode_rgb` over the bytes in memory, at the size
  the training crop needs: the pipeline's own decode step, its upper limit.
- ``local``: :class:`glotok.data.stream.ShardStream` over local shards (read, tar parse, decode,
  LlamaGen random crop + flip, [-1, 1] floats, batches of 32, shuffle buffer).
- ``s3``: the same stream over the same shards on an S3 server on loopback (moto, in its own
  process: its CPU is the store's, not the pipeline's), with one shard of read-ahead.
- ``decode_crop`` (printed, not in the JSON): decode + crop + floats per image in a loop, no
  I/O or batching: the per-image work that bounds ``local``.
- ``baseline``: LlamaGen's loader, written here in plain PIL (torchvision is not installed): an
  ImageFolder over the same bytes as files, ``Image.open().convert("RGB")``, the ADM/LlamaGen
  random crop (box halving + bicubic, PIL), random flip, ToTensor + Normalize(0.5, 0.5),
  a torch DataLoader with the default collate.

Everything runs in this process with DataLoader ``num_workers=0`` and one torch thread, so
images per CPU-second of this process (all its threads, ``time.process_time``) is images/s per
core; more workers scale it by the cores given. Each figure is the best of ``--repeats`` passes
(the machine is shared). The bytes are the built-in sample photos (20 ImageNet validation
JPEGs at 512 px, and larger photos), the PNGs among them re-encoded once to JPEG q95.

Last line: one JSON object with ``decode_only``, ``local``, ``s3``, ``baseline`` (images/s per
core) and ``local_vs_decode``, ``local_vs_baseline``, ``s3_vs_local``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glotok.data import storage
from glotok.data.augment import decode_rgb, random_crop, to_unit_range
from glotok.data.sample import sample_photo_paths
from glotok.data.stream import ShardStream
from glotok.data.writer import make_shards


# --- the LlamaGen-style baseline -------------------------------------------------------------


def llamagen_random_crop(pil_image: Image.Image, image_size: int, crop_range: float) -> Image.Image:
    """ADM/LlamaGen ``random_crop_arr`` with glotok's crop range, as LlamaGen writes it."""
    smaller = random.randint(image_size, int(image_size * crop_range))
    while min(*pil_image.size) >= 2 * smaller:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = smaller / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(max(smaller, round(x * scale)) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y = random.randrange(arr.shape[0] - image_size + 1)
    x = random.randrange(arr.shape[1] - image_size + 1)
    return Image.fromarray(arr[y:y + image_size, x:x + image_size])


class ImageFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder + LlamaGen's tokenizer transform, in plain PIL/torch."""

    def __init__(self, root: Path, image_size: int, crop_range: float):
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.items = [(str(f), i) for i, c in enumerate(classes)
                      for f in sorted((root / c).iterdir())]
        self.image_size, self.crop_range = image_size, crop_range

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        img = llamagen_random_crop(img, self.image_size, self.crop_range)
        if random.random() < 0.5:  # RandomHorizontalFlip
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)  # ToTensor
        return x.sub_(0.5).div_(0.5), label  # Normalize(mean=0.5, std=0.5)


# --- fixtures: the bytes, the shards, the S3 server ------------------------------------------


def jpeg_bytes(path: str) -> bytes:
    """The file itself when it is a JPEG, else an RGB JPEG at quality 95."""
    data = Path(path).read_bytes()
    if data[:3] == b"\xff\xd8\xff":
        return data
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def build_inputs(root: Path, copies: int) -> list[bytes]:
    """Write the photos ``copies`` times as an ImageFolder tree; return their bytes."""
    photos = [(p, jpeg_bytes(p.path)) for p in sample_photo_paths()]
    all_bytes = []
    for c in range(copies):
        for i, (photo, data) in enumerate(photos):
            folder = root / f"class{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{photo.key}_{c}.jpg").write_bytes(data)
            all_bytes.append(data)
    return all_bytes


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()",
                             "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the moto S3 server did not start within 10 s")


# --- measuring -------------------------------------------------------------------------------


def measure(runs: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Best ``(images per CPU-second, images per wall-second)`` of each ``run() -> images``.
    Repeats go round-robin over the runs, so load from other processes hits all alike."""
    best = {name: (0.0, 0.0) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            n = run()
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            best[name] = (max(best[name][0], n / cpu), max(best[name][1], n / wall))
    return best


def count_stream(source: str, image_size: int, crop_range: float, seed: list[int]) -> int:
    seed[0] += 1  # another epoch each pass: fresh shuffles and crops, same work
    stream = ShardStream(source, image_size, 32, train=True, loop=False, drop_last=False,
                         num_workers=0, read_ahead=1, seed=seed[0], crop_range=crop_range)
    return sum(b["image"].shape[0] for b in stream)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--crop-range", type=float, default=1.1)
    p.add_argument("--copies", type=int, default=8, help="passes of the 37 photos per epoch")
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    size, crop = args.image_size, args.crop_range

    with tempfile.TemporaryDirectory(prefix="glotok-bench-") as tmp:
        tmp = Path(tmp)
        all_bytes = build_inputs(tmp / "tree", args.copies)
        make_shards(str(tmp / "tree"), str(tmp / "shards"), workers=1,
                    samples_per_shard=args.samples_per_shard)
        proc, endpoint = start_moto()
        try:
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            fs, _ = storage.filesystem("s3://bench")
            fs.mkdir("bench")
            for f in sorted((tmp / "shards").iterdir()):
                if f.is_file():
                    storage.write_bytes(f"s3://bench/shards/{f.name}", f.read_bytes())

            min_size = int(size * crop)
            seed = [0]
            loader = torch.utils.data.DataLoader(ImageFolder(tmp / "tree", size, crop),
                                                 batch_size=32, shuffle=True, num_workers=0)
            rng = random.Random(0)

            def decode_crop() -> int:  # the per-image math alone: what bounds `local`
                for d in all_bytes:
                    crop_ = random_crop(decode_rgb(d, min_size), size, crop, rng)
                    to_unit_range(crop_, torch.empty(crop_.shape))
                return len(all_bytes)

            best = measure({
                "decode_only": lambda: sum(1 for d in all_bytes if decode_rgb(d, min_size).size),
                "decode_crop": decode_crop,
                "local": lambda: count_stream(str(tmp / "shards" / "manifest.json"), size, crop,
                                              seed),
                "s3": lambda: count_stream("s3://bench/shards/manifest.json", size, crop, seed),
                "baseline": lambda: sum(x.shape[0] for x, _ in loader),
            }, args.repeats)
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    mb = sum(map(len, all_bytes)) / 1e6
    print(f"{len(all_bytes)} JPEGs ({mb:.1f} MB) per pass, crops {size}px (crop_range {crop}), "
          f"best of {args.repeats}, one process, one thread")
    for name, (cpu, wall) in best.items():
        print(f"  {name:12s} {cpu:8.1f} images/s per core   ({wall:7.1f} images/s wall)")
    print("  (decode_crop = decode + LlamaGen crop + [-1, 1] floats per image, no I/O: "
          f"local reaches {best['local'][0] / best['decode_crop'][0]:.2f} of it)")
    per_core = {name: round(cpu, 1) for name, (cpu, _) in best.items() if name != "decode_crop"}
    result = {**per_core,
              "local_vs_decode": round(per_core["local"] / per_core["decode_only"], 3),
              "local_vs_baseline": round(per_core["local"] / per_core["baseline"], 3),
              "s3_vs_local": round(per_core["s3"] / per_core["local"], 3)}
    assert all(math.isfinite(v) for v in result.values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
