"""A modelled contiguous address space with first-fit placement, for reservation allocators.

Contiguous-reservation systems (Orca, FasterTransformer) place each request's K/V in one run
of memory; what they lose to holes between runs (external fragmentation) depends only on the
placement, which this class reproduces without touching any memory.
"""

from __future__ import annotations

import bisect

__all__ = ["AddressSpace"]


class AddressSpace:
    """A contiguous range of ``size`` units with first-fit placement; free holes kept merged and sorted."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = [0] if size else []
        self._lengths: list[int] = [size] if size else []

    @property
    def holes(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._lengths, strict=True))

    @property
    def num_free(self) -> int:
        return sum(self._lengths)

    def fits(self, units: int) -> bool:
        return any(length >= units for length in self._lengths)

    def place(self, units: int) -> int | None:
        """Start of the lowest hole that holds ``units``, now taken; None when no hole is big enough."""
        for i, length in enumerate(self._lengths):
            if length >= units:
                start = self._starts[i]
                if length == units:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i] += units
                    self._lengths[i] -= units
                return start
        return None

    def release(self, start: int, units: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._lengths.insert(i, units)
        if i + 1 < len(self._starts) and start + units == self._starts[i + 1]:  # merge with the next hole
            self._lengths[i] += self._lengths.pop(i + 1)
            self._starts.pop(i + 1)
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start:  # and with the previous one
            self._lengths[i - 1] += self._lengths.pop(i)
            self._starts.pop(i)

    def free_units_below(self, units: int) -> int:
        """Free units in holes smaller than ``units``: memory a request of that size cannot use."""
        return sum(length for length in self._lengths if length < units)
