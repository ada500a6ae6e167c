"""Process-group set-up that works the same under torchrun, Ray Train and a plain `python`."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_cpu_shm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at its first
    ``init_distributed`` (about a minute, again for every new venv path). It only speeds up CPU
    inference collectives; training over gloo does not need it, so we skip the build."""
    try:
        import importlib
        import sys

        importlib.import_module("deepspeed.comm.torch")
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    except Exception as e:  # a newer DeepSpeed may move it; then it just builds
        log.debug("could not skip DeepSpeed's shm op build: %s", e)


def init_distributed() -> DistInfo:
    """Join (or create) the default process group and pick this rank's device.

    Under torchrun or Ray Train the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) is already
    set, and Ray may have created the group. A plain single process gets a world of one on a
    free loopback port, so the same trainer code runs everywhere.
    """
    import deepspeed

    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:
        _skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
