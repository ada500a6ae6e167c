"""One reader's walk through shards and epochs, with a position that resumes exactly.

A *reader* is one DataLoader worker of one rank: reader ``r`` of ``R = world_size *
num_workers``. What a reader reads is a list of :class:`Segment` s, records of one shard taken
with a stride. Per epoch (:func:`epoch_plan`) the shard order is shuffled by ``(seed, epoch)``
and, with at least ``R`` shards, dealt round-robin (reader ``r`` reads ``order[r::R]`` whole);
with fewer, every reader reads every shard and takes every ``R``-th record, offset by reader,
shard position and epoch (so with more readers than samples each reader still gets data within
``R`` epochs). Records then pass a shuffle buffer (fill to ``buffer_size``, then each arrival
swaps out a uniformly drawn entry; at the end of the epoch the rest is shuffled and drained), so
every epoch's records stay in that epoch.

The random draws are counter-based (a hash of seed, epoch, reader and draw number), so the
whole position is a handful of integers plus the buffer's ``(epoch, shard, record)``
identities: :class:`ReaderState`. Resuming re-reads only the shard under the cursor (skipping,
not decoding, what was taken) and the shards with records still in the buffer. A re-partitioned
position (:mod:`glotok.data.repartition`) carries an explicit plan instead of an epoch's.

Shards are fetched whole, ``read_ahead`` of them in advance on a background thread, so a remote
store's latency hides behind the decoding of the current shard.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

from glotok.data.wds import DamagedShardError, iter_records

logger = logging.getLogger(__name__)


class ShardInfo(NamedTuple):
    """A shard's URL or absolute path, and what its manifest promises (None: unknown)."""

    url: str
    num_samples: Optional[int] = None
    nbytes: Optional[int] = None


class Segment(NamedTuple):
    """Records ``start, start + step, ...`` of ``shard`` (``count`` of them; -1: to the end),
    read as part of ``epoch``."""

    epoch: int
    shard: int
    start: int
    step: int
    count: int = -1

    def index_of(self, record: int) -> Optional[int]:
        """Which of the segment's records ``record`` is, or None if it is not one of them."""
        k, rem = divmod(record - self.start, self.step)
        if record < self.start or rem or (self.count >= 0 and k >= self.count):
            return None
        return k


class Record(NamedTuple):
    """One raw sample: where it sits (``shard`` index, ``record`` index in the tar), its key,
    its members ``{extension: bytes}``, and the epoch it belongs to."""

    shard: int
    record: int
    key: str
    members: dict
    epoch: int


def epoch_plan(num_shards: int, epoch: int, reader: int, readers: int, seed: int,
               shuffle: bool) -> list[Segment]:
    """The segments reader ``reader`` of ``readers`` reads in ``epoch``, in reading order."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    if num_shards >= readers:
        return [Segment(epoch, s, 0, 1) for s in order[reader::readers]]
    return [Segment(epoch, s, (reader - p - epoch) % readers, readers)
            for p, s in enumerate(order)]


def flat(items: Sequence[tuple]) -> list[int]:
    return [int(x) for item in items for x in item]


def unflat(values: Sequence[int], width: int) -> list[tuple]:
    return [tuple(values[i:i + width]) for i in range(0, len(values), width)]


@dataclass
class ReaderState:
    """Everything a reader needs to continue exactly; plain ints so checkpoints stay portable."""

    epoch: int = 0
    plan: Optional[list] = None  # flat Segments of a re-partitioned remainder; None: epoch_plan
    segment: int = 0  # index into the plan
    record: int = 0  # raw records of that segment's shard already examined
    draws: int = 0  # random draws of this epoch's buffer so far
    flushing: bool = False  # the plan is read; the buffer drains in stored order
    done: bool = False  # a one-pass stream has finished
    buffer: list = field(default_factory=list)  # flat [epoch, shard, record, ...] in order
    corrupt: int = 0  # samples whose image or label did not decode (counted by the dataset)
    truncated: int = 0  # damaged shards: tar errors, or fewer bytes/samples than the manifest
    missing: int = 0  # samples a damaged shard should have held

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> "ReaderState":
        plan = state.get("plan")
        return cls(**{**state, "buffer": list(state["buffer"]),
                      "plan": None if plan is None else list(plan)})


class _ReadAhead:
    """Fetches upcoming shards on a daemon thread, ``ahead`` shards beyond the one in use."""

    def __init__(self, upcoming: Iterator[int], fetch: Callable[[int], bytes], ahead: int):
        self._upcoming, self._fetch, self._ahead = upcoming, fetch, ahead
        self._head: Optional[tuple[int, bytes]] = None
        self._ended = False  # the plan ran out, or a fetch failed (and was raised)
        if ahead > 0:
            self._slots = threading.Semaphore(ahead)
            self._ready: queue.Queue = queue.Queue()
            self._stop = threading.Event()
            threading.Thread(target=self._run, name="shard-read-ahead", daemon=True).start()

    def _run(self) -> None:
        for pos in self._upcoming:
            self._slots.acquire()
            if self._stop.is_set():
                return
            try:
                self._ready.put((pos, self._fetch(pos), None))
            except BaseException as exc:  # handed to the consumer, raised there
                self._ready.put((pos, None, exc))
                return
        self._ready.put(None)

    def peek(self) -> Optional[tuple[int, bytes]]:
        """The next ``(shard, bytes)`` without consuming it; None when there is none."""
        if self._head is None and not self._ended:
            if self._ahead == 0:
                pos = next(self._upcoming, None)
                self._ended = pos is None
                self._head = None if pos is None else (pos, self._fetch(pos))
            else:
                item = self._ready.get()
                self._ended = item is None or item[2] is not None
                if item is not None:
                    pos, data, exc = item
                    self._slots.release()
                    if exc is not None:
                        raise exc
                    self._head = (pos, data)
        return self._head

    def next(self) -> tuple[int, bytes]:
        head = self.peek()
        if head is None:
            raise RuntimeError("read-ahead ran past the planned shards (a bug)")
        self._head = None
        return head

    def close(self) -> None:
        if self._ahead > 0:
            self._stop.set()
            self._slots.release()  # wake a thread waiting for a slot so it sees the stop


def _parse(data: bytes) -> tuple[list, Optional[str]]:
    """All records of a shard, and the damage that ended them (None: intact)."""
    records: list = []
    try:
        records.extend(iter_records(data))
    except DamagedShardError as exc:
        return records, str(exc)
    return records, None


def _records(data: bytes, parsed: Optional[tuple]) -> Iterator[tuple[str, dict]]:
    if parsed is None:
        yield from iter_records(data)
        return
    yield from parsed[0]
    if parsed[1] is not None:
        raise DamagedShardError(parsed[1])


class ShardWalker:
    """Yields one reader's :class:`Record` s, epoch after epoch; :meth:`snapshot` is its position
    after the last record yielded.

    Args:
        shards: every shard of the stream, in manifest order (readers share this list).
        fetch: ``url -> bytes`` of a whole shard (with retries).
        reader, readers: this reader's index and the number of readers.
        seed: fixes shard order, buffer draws and (in the dataset) augmentation.
        shuffle: shuffle shard order and records (training); else read in order.
        buffer_size: records in the shuffle buffer (<= 1: none).
        loop: run on into the next epochs; else stop after the current one.
        state: where to start (a fresh ``ReaderState(epoch=e)`` or a snapshot).
        read_ahead: shards fetched in advance on a background thread (0: fetch in line).
    """

    def __init__(self, shards: Sequence[ShardInfo], fetch: Callable[[str], bytes], *,
                 reader: int, readers: int, seed: int, shuffle: bool, buffer_size: int,
                 loop: bool, state: ReaderState, read_ahead: int = 1):
        self.shards, self._fetch_url = list(shards), fetch
        self.reader, self.readers = reader, readers
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        self.buffer_size = buffer_size if shuffle else 0
        self.read_ahead = read_ahead
        self.state = state
        self._buffer: list[Record] = []
        self._warned: set[int] = set()

    def plan(self, epoch: int, explicit: Optional[list]) -> list[Segment]:
        if explicit is not None:
            return [Segment(*s) for s in unflat(explicit, 5)]
        return epoch_plan(len(self.shards), epoch, self.reader, self.readers, self.seed,
                          self.shuffle)

    def snapshot(self) -> dict:
        """The position after the last record yielded, as a plain dict."""
        state = self.state.to_dict()
        state["buffer"] = [x for r in self._buffer for x in (r.epoch, r.shard, r.record)]
        return state

    def _draw(self, bound: int) -> int:
        st = self.state
        digest = hashlib.blake2b(
            b"%d:%d:%d:%d:%d" % (self.seed, st.epoch, self.reader, self.readers, st.draws),
            digest_size=8).digest()
        st.draws += 1
        return int.from_bytes(digest, "little") % bound

    def _upcoming(self) -> Iterator[int]:
        """Shards in the order the walk needs them; a run of segments on one shard needs it once."""
        st = self.state
        epoch, plan = st.epoch, self.plan(st.epoch, st.plan)
        start, last = (len(plan) if st.flushing else st.segment), None
        while True:
            for seg in plan[start:]:
                if seg.shard != last:
                    yield seg.shard
                last = seg.shard
            if not self.loop:
                return
            epoch, start = epoch + 1, 0
            plan = self.plan(epoch, None)

    # ---- walking ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Record]:
        st = self.state
        if st.done:
            return
        ahead = _ReadAhead(self._upcoming(), lambda pos: self._fetch_url(self.shards[pos].url),
                           self.read_ahead)
        held: Optional[list] = None  # [shard, bytes, parsed records or None]
        try:
            self._buffer = self._restore_buffer(ahead)
            while True:
                if not st.flushing:
                    plan = self.plan(st.epoch, st.plan)
                    while st.segment < len(plan):
                        seg = plan[st.segment]
                        if held is None or held[0] != seg.shard:
                            held = [*ahead.next(), None]
                            assert held[0] == seg.shard, "read-ahead out of step with the plan"
                        nxt = plan[st.segment + 1] if st.segment + 1 < len(plan) else None
                        if held[2] is None and nxt is not None and nxt.shard == seg.shard:
                            held[2] = _parse(held[1])  # parse once for a run of segments
                        yield from self._take(seg, held[1], held[2])
                        st.segment, st.record = st.segment + 1, 0
                    for i in range(len(self._buffer) - 1, 0, -1):  # Fisher-Yates, counted draws
                        j = self._draw(i + 1)
                        self._buffer[i], self._buffer[j] = self._buffer[j], self._buffer[i]
                    st.flushing = True
                while self._buffer:
                    yield self._buffer.pop(0)
                if not self.loop:
                    st.done = True
                    return
                st.epoch, st.plan, st.segment, st.record = st.epoch + 1, None, 0, 0
                st.draws, st.flushing = 0, False
        finally:
            ahead.close()

    def _take(self, seg: Segment, data: bytes, parsed: Optional[tuple]) -> Iterator[Record]:
        """Feed one segment's records from the cursor on through the buffer; count damage."""
        st, taken, got, damage = self.state, 0, 0, None
        try:
            for i, (key, members) in enumerate(_records(data, parsed)):
                got = i + 1
                if seg.index_of(i) is not None:
                    taken += 1
                if i < st.record:
                    continue  # examined before the checkpoint: skipped raw, never decoded
                st.record = i + 1
                if seg.index_of(i) is None:
                    continue
                rec = Record(seg.shard, i, key, members, seg.epoch)
                if self.buffer_size <= 1:
                    yield rec
                elif len(self._buffer) < self.buffer_size:
                    self._buffer.append(rec)
                else:
                    j = self._draw(len(self._buffer))
                    out, self._buffer[j] = self._buffer[j], rec
                    yield out
        except DamagedShardError as exc:
            damage = str(exc)
        info = self.shards[seg.shard]
        expected = seg.count if seg.count >= 0 else None  # records of the segment that exist
        if expected is None and info.num_samples is not None:
            expected = max(0, (info.num_samples - 1 - seg.start) // seg.step + 1)
        if info.nbytes is not None and len(data) != info.nbytes:
            damage = damage or f"{len(data)} bytes where the manifest says {info.nbytes}"
        if expected is not None and taken < expected:
            damage = damage or f"{got} records, fewer than the manifest's {info.num_samples}"
        if damage is not None:
            self._count_damage(seg, damage, max(0, (expected or 0) - taken), got)

    def _count_damage(self, seg: Segment, reason: str, lost: int, got: int) -> None:
        st, info = self.state, self.shards[seg.shard]
        st.missing += lost
        # Several readers may share a shard; the one holding its first record counts it.
        if seg.start < seg.step:
            st.truncated += 1
            if seg.shard not in self._warned:
                self._warned.add(seg.shard)
                logger.warning("shard %s is damaged (%s): kept its %d intact samples, skipped "
                               "the rest; re-run tools/make_shards.py to rebuild it", info.url,
                               reason, got)

    def _restore_buffer(self, ahead: _ReadAhead) -> list[Record]:
        """Re-read the records a snapshot's buffer held: raw bytes only, no decoding."""
        st = self.state
        entries = unflat(st.buffer, 3)
        wanted: dict[int, set[int]] = {}
        for _, shard, record in entries:
            wanted.setdefault(shard, set()).add(record)
        found: dict[tuple[int, int], tuple[str, dict]] = {}
        for shard, records in wanted.items():
            head = ahead.peek() if not st.flushing else None
            # The shard under the cursor is the read-ahead's next one: use it, do not fetch twice.
            data = head[1] if head and head[0] == shard else self._fetch_url(self.shards[shard].url)
            try:
                for i, sample in enumerate(iter_records(data)):
                    if i in records:
                        found[shard, i] = sample
            except DamagedShardError:
                pass  # whatever is missing is reported below
        buffer = []
        for epoch, shard, record in entries:
            if (shard, record) not in found:
                raise RuntimeError(
                    f"cannot resume the data stream: record {record} of shard "
                    f"{self.shards[shard].url} was read before the checkpoint but is gone now, "
                    "so the shard changed since. Restore it, or start a fresh run")
            buffer.append(Record(shard, record, *found[shard, record], epoch))
        st.buffer = []
        return buffer
