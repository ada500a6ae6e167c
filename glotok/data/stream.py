"""The shard stream: WebDataset shards, local or ``s3://``, to training batches that resume exactly.

::

    stream = ShardStream("s3://bucket/imagenet/train/manifest.json", image_size=256,
                         batch_size=32, num_workers=8, rank=rank, world_size=world)
    batch = next(stream)            # {"image": (B, 3, S, S) float32 in [-1, 1], "label": (B,),
                                    #  "key": [str] * B, "skipped": int}
    state = stream.state_dict()     # save per rank with the checkpoint
    stream.load_state_dict(state)   # a new stream continues with the very next batch

**Sources.** A ``manifest.json`` written by ``tools/make_shards.py`` or the sample set (shard
names with sample counts and sizes, so truncation is detected), a brace pattern
(``s3://b/train-{000000..001281}.tar``), a directory of ``*.tar`` or a comma list. Remote URLs
go through :mod:`glotok.data.storage` (endpoint and profile from :class:`StorageOptions` or the
AWS environment); each shard read is retried with exponential backoff and then fails naming it.

**Order.** Each DataLoader worker of each rank is one reader (:mod:`glotok.data.walker`): shard
order shuffled by ``(seed, epoch)``, dealt round-robin to readers (with fewer shards than
readers, each reader takes every R-th record of every shard), then a shuffle buffer. A
sample's crop and flip come from ``(seed, epoch, key)``, the same under any layout. Training
streams are endless (each reader runs on into the next epoch); evaluation streams make one
ordered, center-cropped pass.

**Exact resume.** Every batch carries its worker's position (:class:`~glotok.data.walker.
ReaderState`) taken right after its last sample; :meth:`ShardStream.state_dict` keeps the
latest position of each worker and which worker's batch comes next, so positions of batches a
worker prefetched but the trainer never consumed are not recorded. On load each worker starts
at its position, fast-forwarding without decoding (it re-reads only the shard under its cursor
and those with records still in its buffer), and the DataLoader's round-robin is rotated to
start at the right worker. The remaining samples of the epoch are exactly those not yet seen,
in the same order, batch for batch.

**Layout changes re-partition.** A position belongs to a reader of a ``world_size x
num_workers`` layout. :meth:`ShardStream.load_state_dict` takes this rank's saved state and
needs the same layout (else :class:`StreamLayoutError`, naming both). When the number of ranks
or workers changes, :meth:`ShardStream.load_state_dict_repartitioned` takes *every* rank's
saved state (the trainer reads them all from the checkpoint) and deals the unseen rest of the
epoch to the new readers (:mod:`glotok.data.repartition`): no sample lost or repeated, in
another order; from the next epoch on the new layout reads as a fresh run would. Another shard
list, seed or buffer size fails either way.

**Damage is counted, not fatal.** An undecodable image or label is skipped (``corrupt``); a
truncated or corrupt tar keeps its intact samples and counts as ``truncated``, its lost samples
as ``missing`` (known from the manifest). ``batch["skipped"]`` and :meth:`ShardStream.metrics`
carry the totals of this rank to the trainer's log.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
from typing import Any, Iterator, Optional

import torch

from glotok.data import storage
from glotok.data.augment import (ImageDecodeError, center_crop, decode_rgb, random_crop,
                                 to_unit_range)
from glotok.data.shards import IMAGE_EXTENSIONS, expand_shards
from glotok.data.repartition import repartition
from glotok.data.storage import StorageOptions
from glotok.data.walker import ReaderState, ShardInfo, ShardWalker

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class StreamLayoutError(ValueError):
    """A saved stream position does not fit this stream (layout, shards, seed or buffer)."""


def resolve_shards(source: str, options: StorageOptions = StorageOptions(), *,
                   retries: int = 5, backoff: float = 0.5) -> list[ShardInfo]:
    """The shards of ``source``: a ``*.json`` manifest (local or remote; shard names relative to
    it, with sample counts and sizes) or anything :func:`glotok.data.shards.expand_shards`
    takes (brace pattern, glob, directory, comma list; counts unknown).

    Raises:
        FileNotFoundError: nothing matched, or a local shard is missing.
        ValueError: the manifest is not one (no ``shards`` list of names).
    """
    if not source.strip().endswith(".json"):
        return [ShardInfo(url) for url in expand_shards(source)]
    raw = storage.read_bytes(source, options, retries=retries, backoff=backoff)
    try:
        entries = json.loads(raw)["shards"]
        base = storage.parent(source)
        shards = []
        for e in entries:
            e = {"name": e} if isinstance(e, str) else e
            name = e.get("name") or e.get("path") or e["url"]
            url = name if "://" in name or os.path.isabs(name) else storage.join(base, name)
            shards.append(ShardInfo(url, e.get("num_samples"), e.get("bytes")))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"shard manifest {source} has no 'shards' list of names ({exc!r}); "
                         "rebuild it with tools/make_shards.py") from exc
    if not shards:
        raise FileNotFoundError(f"shard manifest {source} lists no shards")
    return shards


def _identity(batch: dict) -> dict:
    return batch  # the dataset yields whole batches; the DataLoader only moves them


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker, in shared memory from the start, so handing the
    batch to the main process copies nothing (what torch's default_collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for n in shape:
        numel *= n
    storage_ = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage_).view(shape)


class ImageCodec:
    """Turns a sample's image member into ``image`` float32 ``(3, S, S)`` in [-1, 1]: LlamaGen
    random crop + flip for training (drawn from ``(seed, epoch, key)``), center crop else."""

    def __init__(self, image_size: int, *, train: bool, crop_range: float, random_flip: bool,
                 seed: int):
        self.image_size, self.train = image_size, train
        self.crop_range, self.random_flip, self.seed = crop_range, random_flip, seed

    def buffers(self, batch_size: int) -> dict[str, torch.Tensor]:
        s = self.image_size
        return {"image": _batch_buffer((batch_size, 3, s, s))}

    def decode_into(self, members: dict, key: str, epoch: int, out: dict[str, torch.Tensor],
                    i: int) -> None:
        """Raises ImageDecodeError (or ValueError) when the sample has no usable image."""
        data = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if data is None:
            raise ImageDecodeError(f"no image member (it has {sorted(members)})")
        size = self.image_size
        if not self.train:
            arr = center_crop(decode_rgb(data, size), size)
        else:
            rng = random.Random(f"aug:{self.seed}:{epoch}:{key}")
            arr = random_crop(decode_rgb(data, int(size * self.crop_range)), size,
                              self.crop_range, rng, flip=self.random_flip)
        to_unit_range(arr, out["image"][i])


class ShardDataset(torch.utils.data.IterableDataset):
    """Batches from one rank's readers; each DataLoader worker is one reader.

    Yields dicts: the codec's tensors (``image`` float32 ``(B, 3, S, S)`` in [-1, 1] for
    :class:`ImageCodec`), ``label`` int64 ``(B,)`` (-1 without ``.cls``), ``key`` list of str,
    ``state`` the worker's position after the batch, and ``worker`` its logical index.
    ``resume`` (logical worker -> state) and ``rotation`` (which logical worker DataLoader
    worker 0 plays) are set by :class:`ShardStream` before it starts the workers.
    """

    def __init__(self, shards: list[ShardInfo], codec: Any, batch_size: int, *, train: bool,
                 shuffle_buffer: int, seed: int, rank: int, world_size: int, epoch: int,
                 loop: bool, drop_last: bool, options: StorageOptions, read_ahead: int,
                 retries: int, backoff: float):
        super().__init__()
        self.shards, self.codec, self.batch_size = shards, codec, batch_size
        self.train, self.shuffle_buffer, self.seed, self.epoch = train, shuffle_buffer, seed, epoch
        self.rank, self.world_size, self.loop, self.drop_last = rank, world_size, loop, drop_last
        self.options, self.read_ahead = options, read_ahead
        self.retries, self.backoff = retries, backoff
        self.resume: dict[int, dict] = {}
        self.rotation = 0
        self._logged: set[tuple[int, str]] = set()

    def _fetch(self, url: str) -> bytes:
        return storage.read_bytes(url, self.options, retries=self.retries, backoff=self.backoff)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        logical = (worker + self.rotation) % workers
        reader, readers = self.rank * workers + logical, self.world_size * workers
        saved = self.resume.get(logical)
        state = ReaderState.from_dict(saved) if saved else ReaderState(epoch=self.epoch)
        walker = ShardWalker(self.shards, self._fetch, reader=reader, readers=readers,
                             seed=self.seed, shuffle=self.train, buffer_size=self.shuffle_buffer,
                             loop=self.loop, state=state, read_ahead=self.read_ahead)
        out, labels, keys = self.codec.buffers(self.batch_size), [], []
        last_good_epoch = state.epoch
        accept = getattr(self.codec, "accept", None)
        for rec in walker:
            if accept is not None and not accept(rec.members, rec.key, rec.epoch):
                continue  # e.g. another augmentation variant of an image than this epoch's
            try:
                label = int(rec.members["cls"].decode("ascii")) if "cls" in rec.members else -1
                self.codec.decode_into(rec.members, rec.key, rec.epoch, out, len(keys))
            except (ImageDecodeError, ValueError, UnicodeDecodeError) as exc:
                state.corrupt += 1
                if (rec.shard, rec.key) not in self._logged:
                    self._logged.add((rec.shard, rec.key))
                    logger.warning("skipping sample %s of shard %s: %s", rec.key,
                                   self.shards[rec.shard].url, exc)
                if rec.epoch - last_good_epoch > readers + 1:
                    raise RuntimeError(
                        f"reader {reader} of {readers} got no usable sample in "
                        f"{rec.epoch - last_good_epoch} epochs over {len(self.shards)} shards: "
                        "check the shards (see the warnings above)") from exc
                continue
            last_good_epoch = rec.epoch
            labels.append(label)
            keys.append(rec.key)
            if len(keys) == self.batch_size:
                yield self._batch(out, labels, keys, walker, logical)
                out, labels, keys = self.codec.buffers(self.batch_size), [], []
        if keys and not self.drop_last:
            yield self._batch({k: v[:len(keys)] for k, v in out.items()}, labels, keys, walker,
                              logical)

    @staticmethod
    def _batch(tensors, labels, keys, walker: ShardWalker, logical: int) -> dict[str, Any]:
        return {**tensors, "label": torch.tensor(labels, dtype=torch.int64), "key": keys,
                "state": walker.snapshot(), "worker": logical}


class ShardStream:
    """Batches from shards for one rank: ``next()``, ``state_dict()``, ``load_state_dict()``.

    Args:
        source: manifest, pattern, directory or list (see :func:`resolve_shards`).
        image_size: side ``S`` of the square crops (of the default :class:`ImageCodec`).
        batch_size: samples per batch (per rank).
        train: random crop + flip, shuffled, endless; else center crop, in order, one pass.
        num_workers: DataLoader worker processes, each one reader (0: read in this process).
        prefetch_factor: batches each worker keeps ready ahead of the trainer.
        read_ahead: shards each reader downloads ahead of the one it decodes.
        rank, world_size: this rank and the number of ranks.
        seed: order and augmentation; every rank must pass the same seed.
        crop_range, random_flip, shuffle_buffer: LlamaGen crop jitter, flip, buffer depth.
        loop, drop_last: default to ``train``.
        epoch: the epoch a fresh stream starts in.
        options, retries, retry_backoff: how to reach remote shards and how hard to retry.
        codec: turns a sample's members into batch tensors (``buffers``, ``decode_into``, and
            optionally ``accept`` to pass over records); default :class:`ImageCodec`. The token
            stream of the AR trainer passes its own.
    """

    def __init__(self, source: str | list[ShardInfo], image_size: Optional[int], batch_size: int,
                 *, train: bool = True, num_workers: int = 2, prefetch_factor: int = 2,
                 read_ahead: int = 1, rank: int = 0, world_size: int = 1, seed: int = 0,
                 crop_range: float = 1.1, random_flip: bool = True, shuffle_buffer: int = 1000,
                 loop: Optional[bool] = None, drop_last: Optional[bool] = None, epoch: int = 0,
                 options: StorageOptions = StorageOptions(), retries: int = 5,
                 retry_backoff: float = 0.5, codec: Any = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if crop_range < 1:
            raise ValueError(f"crop_range must be >= 1 (1 = no scale jitter), got {crop_range}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, "
                             f"{num_workers}")
        shards = source if isinstance(source, list) else resolve_shards(
            source, options, retries=retries, backoff=retry_backoff)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.rank, self.world_size = rank, world_size
        if codec is None:
            codec = ImageCodec(image_size, train=train, crop_range=crop_range,
                               random_flip=random_flip, seed=seed)
        self.dataset = ShardDataset(
            shards, codec, batch_size, train=train, shuffle_buffer=shuffle_buffer, seed=seed,
            rank=rank,
            world_size=world_size, epoch=epoch, loop=train if loop is None else loop,
            drop_last=train if drop_last is None else drop_last, options=options,
            read_ahead=read_ahead, retries=retries, backoff=retry_backoff)
        self._iterator: Optional[Iterator] = None
        self._states: list[Optional[dict]] = [None] * self.workers
        self._next_worker = 0

    @property
    def workers(self) -> int:
        """Readers on this rank: DataLoader workers, or 1 when reading in this process."""
        return max(1, self.num_workers)

    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._start()
        batch = next(self._iterator)
        worker = batch.pop("worker")
        self._states[worker] = batch.pop("state")
        self._next_worker = (worker + 1) % self.workers
        batch["skipped"] = self.metrics()["skipped"]
        return batch

    def _start(self) -> None:
        ds = self.dataset
        ds.resume = {i: s for i, s in enumerate(self._states) if s is not None}
        ds.rotation = self._next_worker  # DataLoader worker 0 serves the batch that is due next
        # Our own generator: DataLoader draws the workers' base seed from it, and drawing from
        # the global RNG would shift the trainer's random stream after every resume.
        generator = torch.Generator().manual_seed(ds.seed)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, collate_fn=_identity, num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            pin_memory=torch.cuda.is_available(), persistent_workers=False, generator=generator)
        self._iterator = iter(loader)

    def close(self) -> None:
        """Stop the workers; the position is kept, the next ``next()`` restarts them."""
        self._iterator = None

    # ---- checkpointing ------------------------------------------------------------------------

    @functools.cached_property
    def _fingerprint(self) -> str:
        ds = self.dataset
        names = "\n".join(os.path.basename(s.url) for s in ds.shards)
        text = f"{names}|seed={ds.seed}|train={ds.train}|buffer={ds.shuffle_buffer}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: plain ints, strings and lists (``torch.load(weights_only)``)."""
        return {"version": STATE_VERSION, "world_size": self.world_size, "rank": self.rank,
                "num_workers": self.workers, "fingerprint": self._fingerprint,
                "epoch": self.dataset.epoch, "next_worker": self._next_worker,
                "workers": [dict(s) if s is not None else None for s in self._states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next batch is the one that followed it.

        Raises:
            StreamLayoutError: the state was saved with another number of ranks or workers,
                another rank, or other shards/seed/buffer; the message names both sides.
        """
        self._check(state)
        saved = (state["world_size"], state["num_workers"])
        if saved != (self.world_size, self.workers) or state["rank"] != self.rank:
            raise StreamLayoutError(
                f"the data stream position was saved by {saved[0]} ranks x {saved[1]} readers "
                f"per rank (rank {state['rank']}), this is rank {self.rank} of {self.world_size} "
                f"x {self.workers}. Resume with data.num_workers={saved[1]} (0 and 1 both mean "
                f"one reader) on {saved[0]} ranks, or load every rank's state with "
                "load_state_dict_repartitioned to re-deal the rest of the epoch")
        self.close()
        self.dataset.epoch = state["epoch"]
        self._states = [dict(s) if s is not None else None for s in state["workers"]]
        self._next_worker = state["next_worker"]

    def load_state_dict_repartitioned(self, states: list[dict[str, Any]],
                                      world_size: int) -> None:
        """Continue from the states of *all* ``world_size`` ranks of a run with another layout
        (ranks or workers): this rank's readers get their share of the unseen rest of the
        epoch (see the module docstring). An unchanged layout loads exactly, as
        :meth:`load_state_dict`. ``states`` may be the streams' states or the per-rank
        checkpoint dicts holding them under ``"data"``.

        Raises:
            StreamLayoutError: not one state per rank, or other shards/seed/buffer.
        """
        states = [s["data"] if "data" in s and "workers" not in s else s for s in states]
        if len(states) != world_size or [s["rank"] for s in states] != list(range(world_size)):
            raise StreamLayoutError(
                f"re-partitioning needs the data stream state of each of the {world_size} "
                f"saved ranks in rank order, got ranks {[s.get('rank') for s in states]}")
        for state in states:
            self._check(state)
        if (world_size, states[0]["num_workers"]) == (self.world_size, self.workers):
            self.load_state_dict(states[self.rank])
            return
        ds = self.dataset
        readers = repartition([w for s in states for w in s["workers"]],
                              self.world_size * self.workers, num_shards=len(ds.shards),
                              seed=ds.seed, shuffle=ds.train, loop=ds.loop,
                              epoch=states[0]["epoch"])
        self.close()
        ds.epoch = states[0]["epoch"]
        self._states = readers[self.rank * self.workers:(self.rank + 1) * self.workers]
        self._next_worker = 0
        logger.info("re-partitioned the data stream from %d x %d to %d x %d readers",
                    world_size, states[0]["num_workers"], self.world_size, self.workers)

    def _check(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise StreamLayoutError(
                f"data stream state has version {state.get('version')!r}, this glotok reads "
                f"{STATE_VERSION} (a checkpoint from an older reader has no exact position); "
                "start a new run.name")
        if state["fingerprint"] != self._fingerprint:
            raise StreamLayoutError(
                "the data stream position belongs to another shard list, seed or shuffle buffer "
                "than this stream's; resume with the same data.source, data.seed and "
                "data.shuffle_buffer, or start a new run")

    def metrics(self) -> dict[str, int]:
        """Totals of this rank so far (the trainer logs them as ``data/<name>``): ``skipped``
        samples (``corrupt`` + ``missing``), ``truncated_shards``, and ``epoch`` (the slowest
        worker's)."""
        states = [s or {} for s in self._states]
        total = {k: sum(s.get(k, 0) for s in states) for k in ("corrupt", "missing", "truncated")}
        return {"skipped": total["corrupt"] + total["missing"], "corrupt": total["corrupt"],
                "missing": total["missing"], "truncated_shards": total["truncated"],
                "epoch": min(s.get("epoch", self.dataset.epoch) for s in states)}
