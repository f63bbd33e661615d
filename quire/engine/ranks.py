"""What stopping a tensor-parallel group needs, kept apart from the engine so a finalizer can hold it
without keeping the engine alive."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from quire.distributed.comm import TPGroup
from quire.distributed.launch import WorkerProcesses
from quire.worker.step_inputs import send_stop

logger = logging.getLogger(__name__)


@dataclass
class Ranks:
    """What stopping the tensor-parallel ranks needs, kept apart from the engine so a finalizer can hold it."""

    group: TPGroup
    workers: WorkerProcesses | None
    threads: int  # torch threads before the engine shared the cores among ranks
    broken: bool = False  # a collective failed: the group cannot carry a stop message

    def stop(self) -> None:
        """Tell the workers to leave their loop, wait for the spawned ones, give the threads back."""
        if self.group.size > 1 and not self.broken:
            try:
                send_stop(self.group)
            except Exception as exc:  # a dead group: the workers have exited or will on their own
                logger.debug("could not send stop to the workers: %s", exc)
        if self.workers is not None:
            self.workers.stop()
        if self.group.size > 1:
            torch.set_num_threads(self.threads)
