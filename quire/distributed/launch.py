"""Starting the tensor-parallel group: spawned local workers, or ranks started by ``torchrun``.

* One host (the default): the driver (rank 0, the process that builds the engine) picks a free
  port on 127.0.0.1 and spawns ranks 1..k-1 as child processes, which it watches.
* Several hosts: every rank is started outside Quire with ``RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment (``torchrun`` sets them); rank 0 runs
  the engine, every other rank turns into a worker when it builds its engine (see README).
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# How long a rank may wait inside a forward's collective for the others (and at rendezvous).
# A rank that dies is noticed at once (its sockets close); this bounds a rank that hangs.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank exited or stopped answering: the engine cannot continue."""


@dataclass(frozen=True)
class Rendezvous:
    init_method: str  # tcp://host:port or env://
    rank: int
    size: int
    spawn_workers: bool  # True: this driver starts ranks 1..size-1 itself


def rendezvous_for(tensor_parallel_size: int) -> Rendezvous:
    """Environment rendezvous when ``RANK`` and ``WORLD_SIZE`` are set, else a local group on a free port."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        size = int(os.environ["WORLD_SIZE"])
        if size != tensor_parallel_size:
            raise ValueError(f"WORLD_SIZE={size} but tensor_parallel_size={tensor_parallel_size}; they must match")
        return Rendezvous("env://", int(os.environ["RANK"]), size, spawn_workers=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Rendezvous(f"tcp://127.0.0.1:{port}", 0, tensor_parallel_size, spawn_workers=True)


class WorkerProcesses:
    """The spawned local workers (ranks 1..size-1) of a driver: started, checked, stopped."""

    def __init__(self, target, args, rendezvous: Rendezvous) -> None:
        context = multiprocessing.get_context("spawn")
        self.procs = []
        for rank in range(1, rendezvous.size):
            worker = Rendezvous(rendezvous.init_method, rank, rendezvous.size, spawn_workers=False)
            proc = context.Process(target=target, args=(args, worker), name=f"quire-tp-worker-{rank}", daemon=True)
            proc.start()
            self.procs.append(proc)

    def dead(self) -> list[str]:
        """``rank N (exit code C)`` for every worker that has exited."""
        return [f"rank {r} (exit code {p.exitcode})" for r, p in enumerate(self.procs, 1) if p.exitcode is not None]

    def check(self) -> None:
        dead = self.dead()
        if dead:
            raise WorkerDiedError(f"tensor-parallel worker {', '.join(dead)} died")

    def stop(self, timeout: float = 5.0) -> None:
        for proc in self.procs:
            proc.join(timeout)
            if proc.exitcode is None:
                logger.warning("tensor-parallel worker %s did not stop; killing it", proc.name)
                proc.kill()
                proc.join(timeout)
