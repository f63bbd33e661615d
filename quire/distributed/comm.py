"""The tensor-parallel group: all-reduce, gather to the driver and step broadcasts over torch.distributed.

Built from its own rendezvous store and process-group objects (not ``init_process_group``'s
process-wide default group), so one process can create, tear down and recreate engines.
Two process groups share the store: ``compute`` for the collectives inside a forward, with a
timeout so a stuck rank cannot hang the others forever, and ``control`` for the driver's step
broadcasts, which idle workers wait on for as long as the server is idle. A rank that dies
closes its sockets, which makes the others' next collective raise at once.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# An idle server sends no steps: workers wait for the next one without a deadline.
_IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass
class CommStats:
    """Bytes each kind of traffic moved, as seen by this rank (sent by the driver / reduced / gathered)."""

    broadcast_bytes: int = 0
    all_reduce_bytes: int = 0
    gather_bytes: int = 0
    num_broadcasts: int = 0
    num_all_reduces: int = 0
    num_gathers: int = 0


@dataclass
class TPGroup:
    """This process's place in the tensor-parallel group; ``size == 1`` makes every collective a no-op."""

    rank: int = 0
    size: int = 1
    compute: object | None = None  # torch.distributed backend (gloo or nccl) for the forward's collectives
    control: object | None = None  # the same ranks, for step broadcasts (no deadline)
    stats: CommStats = field(default_factory=CommStats)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @classmethod
    def connect(
        cls, init_method: str, rank: int, size: int, timeout: datetime.timedelta, backend: str = "gloo"
    ) -> TPGroup:
        """Rendezvous (``tcp://host:port`` or ``env://``) and open the two process groups.

        ``backend`` is the forward's: gloo for CPU tensors, nccl for CUDA ones (``Platform.dist_backend``).
        The step broadcasts stay on gloo either way: a step travels as host tensors.
        """
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
        store, rank, size = next(dist.rendezvous(init_method, rank=rank, world_size=size, timeout=timeout))
        groups = []
        for name, deadline, kind in (("compute", timeout, backend), ("control", _IDLE_TIMEOUT, "gloo")):
            prefixed = dist.PrefixStore(f"quire/{name}", store)
            groups.append(_process_group(kind, prefixed, rank, size, deadline))
        return cls(rank=rank, size=size, compute=groups[0], control=groups[1])

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (row-parallel outputs, vocab-parallel embeddings)."""
        if self.size == 1:
            return x
        self.compute.allreduce([x]).wait()
        self.stats.all_reduce_bytes += x.numel() * x.element_size()
        self.stats.num_all_reduces += 1
        return x

    def gather_columns(self, x: torch.Tensor, widths: list[int]) -> torch.Tensor | None:
        """Concatenate every rank's ``x`` [rows, widths[rank]] along columns, on the driver only.

        Uneven widths are padded to the widest for the transfer (gather needs equal shapes).
        """
        if self.size == 1:
            return x
        width = max(widths)
        if x.shape[1] < width:
            x = torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], dim=1)
        x = x.contiguous()
        outputs = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else []
        self.compute.gather(outputs, x, 0).wait()
        self.stats.gather_bytes += x.numel() * x.element_size() * (self.size - 1 if self.is_driver else 1)
        self.stats.num_gathers += 1
        if not self.is_driver:
            return None
        return torch.cat([out[:, :w] for out, w in zip(outputs, widths, strict=True)], dim=1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """The driver's ``x`` into every rank's ``x`` (same shape and dtype everywhere)."""
        if self.size == 1:
            return x
        self.control.broadcast(x, 0).wait()
        self.stats.broadcast_bytes += x.numel() * x.element_size()
        self.stats.num_broadcasts += 1
        return x


def _process_group(kind: str, store, rank: int, size: int, timeout: datetime.timedelta):
    if kind == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    # CUDA builds of PyTorch only; the CPU wheel has no ProcessGroupNCCL.
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, size, options)
