"""What the engine needs from the device it runs on, in one place.

The scheduler, the KV manager and the step logic do not know the device. What differs between a
CPU and a CUDA device is gathered here: pinned host memory, a side stream and events for the KV
block copies, memory figures for sizing the pool, the collective backend and the default dtype.

On a CPU every method still runs, so the code that uses them is exercised by the CPU tests:
``torch.cpu.Stream`` and ``torch.cpu.stream`` exist and do nothing, and an event is already
complete when recorded, since CPU ops finish before they return. The CUDA-only lines are the
``is_cuda`` branches of this module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from quire.config import DEVICES


class _DoneEvent:
    """A recorded point on a CPU stream: everything before it has run already."""

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when PyTorch sees one, else the CPU; ``cuda`` (or ``cuda:N``)
    is refused with the reason when this PyTorch has no usable CUDA device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {name!r}.") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {name!r}.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={name!r}, but this PyTorch sees no CUDA device (torch.cuda.is_available() is False; "
            f"torch {torch.__version__})."
        )
    return device


@dataclass(frozen=True)
class Platform:
    """The device's streams, events, host memory and figures, behind one small interface."""

    device: torch.device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def pin_memory(self) -> bool:
        """Host buffers that cross to the device are page-locked, so copies can be DMA and asynchronous."""
        return self.is_cuda

    @property
    def supports_bf16(self) -> bool:
        """Whether bfloat16 runs natively (a CPU always has some bfloat16 path)."""
        return torch.cuda.is_bf16_supported() if self.is_cuda else True

    @property
    def dist_backend(self) -> str:
        """The ``torch.distributed`` backend for tensors on this device."""
        return "nccl" if self.is_cuda else "gloo"

    def new_stream(self):
        """A stream for work that may overlap the forward (the KV swap copies)."""
        return torch.cuda.Stream(self.device) if self.is_cuda else torch.cpu.Stream()

    def current_stream(self):
        return torch.cuda.current_stream(self.device) if self.is_cuda else torch.cpu.current_stream()

    def use_stream(self, stream) -> contextlib.AbstractContextManager:
        """Run the ops queued inside the ``with`` on ``stream``."""
        return torch.cuda.stream(stream) if self.is_cuda else torch.cpu.stream(stream)

    def wait_stream(self, waiter, stream) -> None:
        """Work queued on ``waiter`` from now on starts after everything queued on ``stream`` so far."""
        if self.is_cuda:
            waiter.wait_stream(stream)

    def synchronize(self) -> None:
        """Wait for all work queued on the device (timing a step; a CPU runs its work when called)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def record_event(self, stream=None):
        """An event marking the end of the work queued on ``stream`` (default: the current one)."""
        if not self.is_cuda:
            return _DoneEvent()
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor, pinned when the device copies from it."""
        return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=self.pin_memory)

    def upload(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The host tensors on the device, in one host-to-device copy (see ``pack``); as they are on a CPU."""
        if self.device.type == "cpu":
            return tensors
        buffer, layout = pack(tensors, self.pin_memory)
        return unpack(buffer.to(self.device, non_blocking=True), layout)

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes of the device's memory."""
        if self.is_cuda:
            return torch.cuda.mem_get_info(self.device)
        from quire.models.loader import available_memory_bytes

        return available_memory_bytes(), _total_host_memory()

    @contextlib.contextmanager
    def measure_peak(self):
        """Yields a one-item list that holds, after the ``with``, the peak bytes in use on the device
        inside it: PyTorch's allocator's peak plus what is held outside it (the CUDA context,
        communication buffers, other processes). None on a CPU, whose allocator keeps no such figure."""
        peak: list[int | None] = [None]
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        yield peak
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            outside_torch = max(0, total - free - torch.cuda.memory_reserved(self.device))
            peak[0] = torch.cuda.max_memory_allocated(self.device) + outside_torch

    def release_cached(self) -> None:
        """Hand the allocator's cached, unused blocks back (after profiling, before sizing the pool)."""
        if self.is_cuda:
            torch.cuda.empty_cache()


Layout = list[tuple[torch.Size, torch.dtype]]


def pack(tensors: list[torch.Tensor], pin_memory: bool = False) -> tuple[torch.Tensor, Layout]:
    """Integer tensors flattened into one int64 host buffer, and what ``unpack`` needs to split it.

    A step's inputs are a handful of small tensors; one copy of one buffer costs one transfer's
    latency instead of one per tensor.
    """
    layout = [(t.shape, t.dtype) for t in tensors]
    total = sum(t.numel() for t in tensors)
    buffer = torch.empty(total, dtype=torch.int64, pin_memory=pin_memory)
    torch.cat([t.reshape(-1).to(torch.int64) for t in tensors], out=buffer)
    return buffer, layout


def unpack(buffer: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """The tensors ``pack`` flattened, in their shapes and dtypes, on ``buffer``'s device."""
    sizes = [shape.numel() for shape, _ in layout]
    return [
        part.view(shape).to(dtype) for part, (shape, dtype) in zip(buffer.split(sizes), layout, strict=True)
    ]


def _total_host_memory() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of tensor-parallel rank ``rank`` on this host: ``cuda`` without an index means one GPU a rank."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", rank % torch.cuda.device_count())
    return device
