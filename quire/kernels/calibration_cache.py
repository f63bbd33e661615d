"""Measurements made once per machine and kept on disk: the store every calibration shares.

A calibration times candidate paths on the machine that runs (a fraction of a second). Its result
holds while the machine, the thread count, the kernels and the libraries they call stay the same,
so it is kept in ``cache_dir()/calibration.json`` under a key that hashes all of those together
with the calibration's own parameters: another CPU behind the same home directory, a rebuilt
kernel, ``QUIRE_CPU_ISA`` or a library's ISA cap each measure again. ``QUIRE_RECALIBRATE=1``
measures again regardless and overwrites the entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from quire.cache_dir import cache_dir

logger = logging.getLogger(__name__)

# Environment caps that move the libraries the non-Quire paths run in (ATen's own vector code,
# oneDNN, MKL) below the CPU's level.
LIBRARY_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
RECALIBRATE_ENV = "QUIRE_RECALIBRATE"  # "1": measure again and overwrite the cached result


def cached_measurement(kind: str, params: list, measure: Callable[[], dict]) -> tuple[dict, bool]:
    """The stored result of calibration ``kind`` for ``params`` on this machine, or ``measure()``'s.

    Args:
        kind: which calibration (one entry per kind and parameters).
        params: what else the result depends on (ISA level, source hash, dtype, shapes), JSON-able.
        measure: runs the calibration; returns a JSON-able dict.

    Returns:
        (the result, True when it was measured by this call).
    """
    key = _key(kind, params)
    path = cache_dir() / "calibration.json"
    entries = _read(path)
    if key in entries and os.environ.get(RECALIBRATE_ENV, "") in ("", "0"):
        return entries[key], False
    result = measure()
    entries = _read(path)  # another process may have stored other entries meanwhile
    entries[key] = result
    _write(path, entries)
    return result, True


def _key(kind: str, params: list) -> str:
    from quire.kernels.cpu_kernel import cpu_flags

    caps = [torch.backends.cpu.get_cpu_capability(), *(os.environ.get(v, "") for v in LIBRARY_ISA_ENV)]
    what = [kind, platform.machine(), sorted(cpu_flags()), os.cpu_count(), torch.get_num_threads(),
            torch.__version__, caps, params]
    return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:16]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(path)  # atomic: concurrent processes never read half a file
    except OSError as exc:  # a read-only home: measure again next time
        logger.warning("could not keep the calibration at %s: %s", path, exc)
