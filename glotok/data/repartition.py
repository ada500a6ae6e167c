"""Move stream positions to another number of readers without losing or repeating a sample.

Given the positions of all ``R_old`` readers (every rank's, from the checkpoint), the unseen rest
is, per old reader: the records in its shuffle buffer, the rest of the segment under its cursor,
the rest of its plan for its epoch and, in an endless stream, its whole plans for any later
epoch up to ``E``, the furthest epoch any reader reached. That union is exactly what the
uninterrupted run would still have read through epoch ``E``.

It is dealt to the ``R_new`` readers: buffered records sorted by shard and cut into contiguous
runs (a new reader fetches few shards for them), segments round-robin. Each new reader reads its
share as an explicit plan tagged with epoch ``E`` (records keep their own epoch for their crops),
then continues with epoch ``E + 1`` in the new layout. Every rank computes the same deal from
the same inputs, so no communication is needed. The order differs from the uninterrupted run
(it must: the readers differ); the set of samples per epoch does not.
"""

from __future__ import annotations

from typing import Optional, Sequence

from glotok.data.walker import ReaderState, Segment, epoch_plan, flat, unflat


def remaining(state: ReaderState, reader: int, readers: int, *, num_shards: int, seed: int,
              shuffle: bool, loop: bool, through_epoch: int) -> tuple[list[Segment], list[Segment]]:
    """``(buffered records as one-record segments, segments)`` that ``reader`` has not yet
    yielded, up to the end of ``through_epoch`` (its own epoch if it is not looping)."""
    if state.done:
        return [], []
    records = [Segment(e, s, r, 1, 1) for e, s, r in unflat(state.buffer, 3)]
    segments: list[Segment] = []
    if not state.flushing:
        plan = ([Segment(*x) for x in unflat(state.plan, 5)] if state.plan is not None
                else epoch_plan(num_shards, state.epoch, reader, readers, seed, shuffle))
        if state.segment < len(plan):
            seg = plan[state.segment]
            skip = max(0, -(-(state.record - seg.start) // seg.step))  # wanted records passed
            count = seg.count - skip if seg.count >= 0 else -1
            if count != 0:
                segments.append(seg._replace(start=seg.start + skip * seg.step, count=count))
            segments += plan[state.segment + 1:]
    if loop:
        for epoch in range(state.epoch + 1, through_epoch + 1):
            segments += epoch_plan(num_shards, epoch, reader, readers, seed, shuffle)
    return records, segments


def repartition(states: Sequence[Optional[dict]], new_readers: int, *, num_shards: int,
                seed: int, shuffle: bool, loop: bool, epoch: int) -> list[dict]:
    """Positions for ``new_readers`` readers that together read exactly the unseen rest of
    ``states`` (one per old reader, in reader order; None: it never yielded and starts at
    ``epoch``). Skip counters move to new reader 0, so totals are kept."""
    old = [ReaderState.from_dict(s) if s else ReaderState(epoch=epoch) for s in states]
    active = [s.epoch for s in old if not s.done]
    if not active:
        return [ReaderState(epoch=max(s.epoch for s in old), done=True).to_dict()
                for _ in range(new_readers)]
    last = max(active)
    records, segments = [], []
    for i, state in enumerate(old):
        r, s = remaining(state, i, len(old), num_shards=num_shards, seed=seed, shuffle=shuffle,
                         loop=loop, through_epoch=last)
        records += r
        segments += s
    records.sort(key=lambda seg: (seg.shard, seg.start, seg.epoch))
    bounds = [len(records) * k // new_readers for k in range(new_readers + 1)]
    new = [ReaderState(epoch=last, plan=flat(records[bounds[k]:bounds[k + 1]]
                                             + segments[k::new_readers]))
           for k in range(new_readers)]
    for counter in ("corrupt", "truncated", "missing"):
        setattr(new[0], counter, sum(getattr(s, counter) for s in old))
    return [s.to_dict() for s in new]
