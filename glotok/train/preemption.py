"""Stopping cleanly: SIGTERM (preemption, `ray job stop`, Ctrl-C) -> checkpoint -> exit.

A signal sets a flag; the training loop checks it after every step and all ranks agree through
one tiny all-reduce, so every rank saves the same step. A watchdog ends the process if the save
overruns the grace period the platform gives (the previous checkpoint then stays the latest,
since an unfinished one is never published).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopSignal:
    def __init__(self, grace_s: float, external: Optional[Callable[[], bool]] = None):
        self.grace_s = grace_s
        self.external = external  # e.g. a Ray driver's stop request, polled by the loop
        self._flag = threading.Event()
        self._previous = {}

    def install(self) -> None:
        """Handle SIGTERM/SIGINT in this process (only possible from the main thread; under Ray
        Train the driver forwards its signal through ``external`` instead)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self._flag.is_set():
            return
        log.warning("received signal %d: checkpointing at the end of this step (grace %.0fs)",
                    signum, self.grace_s)
        self.request()

    def request(self) -> None:
        self._flag.set()
        timer = threading.Timer(self.grace_s, self._overrun)
        timer.daemon = True
        timer.start()

    def _overrun(self) -> None:
        log.error("checkpoint did not finish within the %.0fs grace period; exiting",
                  self.grace_s)
        os._exit(143)

    def local(self) -> bool:
        if not self._flag.is_set() and self.external is not None and self.external():
            self.request()
        return self._flag.is_set()

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was asked to stop (collective)."""
        flag = torch.tensor([1 if self.local() else 0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
